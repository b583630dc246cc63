// xmpp.js ships no type declarations; these cover what the tests and the bench use.
declare module '@xmpp/client' {
  import type { EventEmitter } from 'node:events';
  import type { Element } from 'ltx';

  export function xml(
    name: string,
    attrs?: Record<string, string | number | undefined> | null,
    ...children: unknown[]
  ): Element;
  export function jid(value: string): {
    toString(): string;
    bare(): { toString(): string };
    local: string;
    resource: string;
  };

  export interface Client extends EventEmitter {
    start(): Promise<{ toString(): string }>;
    stop(): Promise<void>;
    send(...stanzas: Element[]): Promise<void>;
    status: string;
    jid?: { toString(): string };
    socket?: { socket?: { terminate?: () => void; close?: () => void } } & Record<string, unknown>;
    reconnect: { stop(): void; start(): void; reconnect(): Promise<void> };
    iqCaller: {
      request(stanza: Element, timeout?: number): Promise<Element>;
      get(el: Element, to?: string): Promise<Element>;
      set(el: Element, to?: string): Promise<Element>;
    };
    iqCallee: {
      set(ns: string, name: string, handler: (context: { stanza: Element }) => unknown): void;
      get(ns: string, name: string, handler: (context: { stanza: Element }) => unknown): void;
    };
    streamManagement: EventEmitter & {
      enabled: boolean;
      id: string;
      inbound: number;
      outbound: number;
      allowResume: boolean;
    };
    disconnect(): Promise<void>;
    [key: string]: unknown;
  }

  export function client(options: Record<string, unknown>): Client;
}
