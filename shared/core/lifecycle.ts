/**
 * The session lifecycle, once: a session ends (clean close, stream error), vanishes (410 Gone,
 * `$disconnect`), expires (a stream-management window closed) or is replaced by a new bind of
 * its resource. Each way ends in `endSession`, which releases the resource row exactly once,
 * fires `session-ended` for whoever must be told (presence), and re-routes what the session had
 * not got acknowledged.
 */
import { Element } from 'ltx';
import { sequentialContexts } from '../context.ts';
import { type StreamError, streamErrorElement } from '../errors.ts';
import type { ConnectionState, NewConnection, ResourceRecord } from '../store/sessions.ts';
import { NS } from '../xml/namespaces.ts';
import { closeConnection, inFanOut, post } from './delivery.ts';
import { withTimeLeft } from './frame.ts';
import type {
  EventPayloads,
  Server,
  SessionEndReason,
  SessionRef,
  SweepRun,
  UndeliveredStanza,
} from './host.ts';
import { rerouteUndelivered } from './router.ts';

/** The lifecycle's defaults on the host: a vanished connection's session ends unless a module keeps it. */
export function registerLifecycle(server: Server): void {
  server.host.hook(
    'connection-vanished',
    async (event) => {
      const state = event.state ?? (await server.sessions.getConnection(event.connectionId));
      // A 410 or a probe comes before the connection's last frames: its row stays (fenced) for
      // them until its own $disconnect.
      if (state) return void (await endStream(server, state, 'gone', { keepRow: !event.disconnected }));
      if (event.resource) {
        // No row left (its $disconnect was lost or is still queued): release the resource all the same.
        const { user, resource, connectionId } = event.resource;
        await endSession(server, { user, resource, connectionId }, 'gone');
      }
    },
    { priority: -100 },
  );
}

/**
 * Tells a deleted account's contacts what the deletion changed for them (host event
 * 'stream-revoked'), as one of its streams or detached sessions ends: best effort, never in the
 * way of that end (a failure is logged; the stream ends all the same).
 */
export async function tellRevoked(server: Server, event: EventPayloads['stream-revoked']): Promise<void> {
  try {
    await server.host.fire('stream-revoked', event);
  } catch (error) {
    server.log.warn('contacts of a deleted account not told', { user: event.user, error });
  }
}

/** The session a connection's state describes, if it has bound a resource. */
export function sessionOf(state: ConnectionState): SessionRef | undefined {
  if (!state.user || !state.resource) return undefined;
  return {
    user: state.user,
    resource: state.resource,
    connectionId: state.connectionId,
    ...(state.sm ? { smId: state.sm.id } : {}),
    ...(state.directedTo ? { directedTo: state.directedTo } : {}),
    state,
  };
}

/** Ends a connection's stream for good: its session if bound, and its row. */
export async function endStream(
  server: Server,
  state: ConnectionState,
  reason: SessionEndReason,
  options: EndOptions = {},
): Promise<void> {
  const session = sessionOf(state);
  if (session) await endSession(server, session, reason, options);
  else await dropConnectionRow(server, state.connectionId, options);
}

export interface EndOptions {
  /** The resource row was already taken over (a new bind returned it): nothing to release. */
  released?: ResourceRecord;
  /**
   * The connection's own last event (its `$disconnect`) is still to come, and frames of it may
   * be queued before it (a stanza counted for XEP-0198 whose routing is being retried): its row
   * is fenced, not deleted, so they still find it; the `$disconnect` deletes it.
   */
  keepRow?: boolean;
  /**
   * The connection's own frame ended the stream: its row is marked ended instead of deleted, so
   * that the frames its client sent before the socket closed, queued behind this one, stop there
   * instead of starting a new stream (a stream's first frame creates the row).
   */
  ownEnd?: boolean | { create: NewConnection };
}

async function dropConnectionRow(server: Server, connectionId: string, options: EndOptions): Promise<void> {
  if (options.keepRow) await server.sessions.fenceConnection(connectionId);
  else if (options.ownEnd) {
    // One write, as the delete it replaces; the $disconnect then writes nothing, and the row
    // expires. A stream its first frame ended has no row yet: the mark is the row.
    const create = typeof options.ownEnd === 'object' ? options.ownEnd : {};
    await server.sessions.updateConnection(connectionId, { ended: true }, create);
  } else await server.sessions.deleteConnection(connectionId);
}

/**
 * Ends a session exactly once: modules hand back what was not delivered (`session-ending`), the
 * resource row is released under its owner's condition, the undelivered stanzas are re-routed,
 * and `session-ended` is fired only by the one caller that released it.
 */
export async function endSession(
  server: Server,
  session: SessionRef,
  reason: SessionEndReason,
  options: EndOptions = {},
): Promise<void> {
  const undelivered: UndeliveredStanza[] = [];
  const afterReroute: (() => Promise<void>)[] = [];
  const elsewhere = await server.host.fire('session-ending', { session, reason, undelivered, afterReroute });
  const released = elsewhere
    ? undefined
    : (options.released ??
      (session.smId
        ? await server.sessions.releaseSmResource(session.user, session.resource, session.smId)
        : session.connectionId
          ? await server.sessions.releaseResource(session.user, session.resource, session.connectionId)
          : undefined));
  // Re-routed before anything else can fail: a redelivery of this frame may not end the session
  // again (its rows are gone), and what it held would wait for the sweeper.
  server.metrics.count('StanzasRerouted', undelivered.length);
  if (undelivered.length > 0 && sequentialContexts() && inFanOut()) {
    // Ended among deliveries running side by side (a broadcast reached a full, silent queue),
    // where the frame's context is a variable (Lambda): each re-routed stanza runs under a frame
    // of its own (its keys), which the deliveries beside it would read too. The queue keeps them,
    // its re-route unfinished, and the sweeper re-routes them (REROUTE_RETRY_MS after the end).
    server.log.info('re-route left to the sweeper: the session ended among concurrent deliveries', {
      user: session.user,
      resource: session.resource,
      stanzas: undelivered.length,
    });
  } else {
    await rerouteUndelivered(server, session.user, undelivered);
    for (const after of afterReroute) await after();
  }
  if (released) {
    await server.host.fire('session-ended', { session, reason, wasAvailable: released.available });
  }
  if (session.connectionId) await dropConnectionRow(server, session.connectionId, options);
}

/**
 * Ends another connection's stream from the server's side: the stream error, `<close/>`, and
 * the socket closed. Its session is ended by the caller (the connection may be gone already).
 */
export async function kickConnection(
  server: Server,
  connectionId: string,
  error: StreamError,
): Promise<void> {
  await server.host.fire('stream-error', { connectionId, condition: error.condition });
  if ((await post(server, connectionId, streamErrorElement(error))) === 'sent') {
    await post(server, connectionId, new Element('close', { xmlns: NS.framing }));
  }
  await closeConnection(server, connectionId);
}

/**
 * RFC 6120 §7.7.2.2: a new bind of a resource that is in use; the server's policy is
 * "override": the old session gets a <conflict/> stream error and ends as `replaced`.
 */
export async function replaceSession(
  server: Server,
  previous: ResourceRecord,
  error: StreamError,
  depth = 0,
): Promise<void> {
  await kickConnection(server, previous.connectionId, error);
  // Fenced, not just read: frames of the old connection queued before the kick stop here, so the
  // count the session ends with holds every stanza it routed (XEP-0198's <failed h/>).
  const state = await server.sessions.fenceConnection(previous.connectionId);
  // That connection's bind had taken the resource over from an older session and not yet ended
  // it (its frame failed right after the takeover, and its redelivery will now stop at the
  // fence): ended here, or nobody would end it.
  const unfinished = state?.replacing;
  if (
    depth < 2 &&
    unfinished &&
    unfinished.user === previous.user &&
    unfinished.resource === previous.resource &&
    unfinished.connectionId !== previous.connectionId
  )
    await replaceSession(server, unfinished, error, depth + 1);
  await endSession(
    server,
    {
      user: previous.user,
      resource: previous.resource,
      connectionId: previous.connectionId,
      ...(previous.smId ? { smId: previous.smId } : {}),
      ...(state?.directedTo ? { directedTo: state.directedTo } : {}),
      ...(state ? { state } : {}),
    },
    'replaced',
    { released: previous, keepRow: true },
  );
}

export interface SweepOptions {
  /** Whether to start more work (the invocation's time left); default: always. */
  hasTime?: () => boolean;
  /**
   * The invocation's time left (ms), seen by the work as `frameTimeLeft()`: a delivery that
   * started in time still stops before the invocation ends (XEP-0198's posts in order).
   */
  timeLeftMs?: () => number;
}

export interface SweepOutcome {
  /** Sessions ended. */
  swept: number;
  /** Items and phases that failed (each logged; tried again next run). */
  failed: number;
  /** The run stopped starting work for lack of time: the rest waits for the next run. */
  cutShort: boolean;
}

/**
 * The sweeper's run: modules expire what outlived its time, one phase per `sweep` hook (in
 * priority order), each phase and each item on its own. A phase that throws, or an item that
 * fails, is logged and counted (`SweepFailures`, by phase), and the run goes on with the next:
 * one failing probe never costs the run its expiries, re-routes or archive sweep. Once
 * `hasTime` says no, no new item starts (`SweepsCutShort`).
 */
export async function runSweep(
  server: Server,
  now: number,
  options: SweepOptions = {},
): Promise<SweepOutcome> {
  const outcome: SweepOutcome = { swept: 0, failed: 0, cutShort: false };
  const failed = (phase: string, error: unknown, fields: Record<string, unknown> = {}) => {
    outcome.failed += 1;
    server.metrics.count('SweepFailures', 1, phase);
    server.log.error('sweep: failed, going on with the rest', { phase, ...fields, error });
  };
  const run: SweepRun = {
    now,
    swept: 0,
    hasTime() {
      if (outcome.cutShort) return false;
      if (options.hasTime && !options.hasTime()) outcome.cutShort = true;
      return !outcome.cutShort;
    },
    async phase(name, work) {
      if (!run.hasTime()) return undefined;
      try {
        await work();
      } catch (error) {
        failed(name, error);
      }
      return undefined;
    },
    failed,
  };
  const sweepAll = () => server.host.fireEach('sweep', run, (error) => failed('hook', error));
  await (options.timeLeftMs ? withTimeLeft(options.timeLeftMs, sweepAll) : sweepAll());
  if (outcome.cutShort) {
    server.metrics.count('SweepsCutShort');
    server.log.warn('sweep: short of time, the rest waits for the next run', { swept: run.swept });
  }
  return { ...outcome, swept: run.swept };
}

/** `runSweep`, for how many sessions ended. */
export async function sweep(server: Server, now: number, options: SweepOptions = {}): Promise<number> {
  return (await runSweep(server, now, options)).swept;
}
