/**
 * The composition root: the one file that knows every module. A new specification is a new
 * file in `shared/modules/` plus one line in MODULES; modules depend on the core's interfaces,
 * never on this file or on each other's internals.
 */
import { createServerCore, type Module, type Server, type ServerOptions } from './core/server.ts';
import * as metrics from './modules/metrics.ts';
import * as bind from './modules/rfc6120-bind.ts';
import * as sasl from './modules/rfc6120-sasl.ts';
import * as presence from './modules/rfc6121-presence.ts';
import * as roster from './modules/rfc6121-roster.ts';
import * as flexibleOffline from './modules/xep-0013-flexible-offline.ts';
import * as disco from './modules/xep-0030-disco.ts';
import * as softwareVersion from './modules/xep-0092-software-version.ts';
import * as messageArchiving from './modules/xep-0136-message-archiving.ts';
import * as offlineStorage from './modules/xep-0160-offline-storage.ts';
import * as streamManagement from './modules/xep-0198-stream-management.ts';
import * as ping from './modules/xep-0199-ping.ts';
import * as streamLimits from './modules/xep-0478-stream-limits.ts';

export type { Server, ServerOptions } from './core/server.ts';

/** In registration order; hooks of equal priority run in this order. */
export const MODULES: readonly Module[] = [
  sasl,
  bind,
  streamManagement,
  streamLimits,
  presence,
  roster,
  disco,
  ping,
  softwareVersion,
  offlineStorage,
  flexibleOffline,
  messageArchiving,
  metrics,
];

export function createServer(options: ServerOptions): Server {
  const server = createServerCore(options);
  for (const module of MODULES) module.register(server);
  return server;
}
