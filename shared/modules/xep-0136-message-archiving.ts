/**
 * XEP-0136 Message Archiving, `http://jabber.org/protocol/archive`: the seed draft 0.9 (the
 * contract) and the 0.5 draft's own requests (`<save/>`, `<otr/>`/`<record/>`, `maxitems` with
 * `partial`). Decoding, preference rules, collection rules and encoding live in `xep-0136/`;
 * this file registers the requests, the automatic archiving hooks and the pushes.
 *
 * Automatic archiving, exactly once per message and archiving user:
 * - the sender's copy is archived when the message it sent was first delivered to a session or
 *   stored offline (`message-routed`, `message-stored-offline`), if the sending stream had
 *   `<auto save='true'/>` when it sent it: the stanza event at acceptance remembers the stanza
 *   object, the first routing event archives it and forgets it. A message that is refused
 *   (unknown user, remote domain) is never archived; a fan-out to several resources once.
 * - the recipient's copy is archived when the message is first routed to the user: put on a
 *   session whose stream has auto on (`message-routed`), or stored offline while no stream is
 *   there (`message-stored-offline`, see `archivesWhileOffline`). A message re-routed by stream
 *   management (carrying this server's XEP-0203 stamp, or stored with `acceptedAt`) was decided
 *   at its first routing and is never archived again; a flood from offline storage fires no
 *   routing event. Clients cannot forge the stamp: it is removed from what they send.
 * - a frame delivered again (SQS redelivers one whose first attempt archived and then died
 *   before the frame's end; the stream function retries one in place): each copy's entry
 *   carries the frame's delivery key for its owner and direction (core/frame.ts), and a
 *   redelivery that finds it archives nothing (`archivedByFrame`, read on redeliveries only).
 *   The in-memory guards above hold within one delivery; the key across deliveries.
 */
import { randomBytes } from 'node:crypto';
import { type Element, Element as XmlElement } from 'ltx';
import { deliver, POST_LIMIT_BYTES } from '../core/delivery.ts';
import { type DeliveryKey, frameTimeLeft, nextDeliveryKey } from '../core/frame.ts';
import {
  type BoundStream,
  DEFERRED_RESULT,
  type IqRequest,
  type Server,
  type StanzaEvent,
  type SweepRun,
} from '../core/host.ts';
import { iqResult } from '../core/stanzas.ts';
import { RetryLaterError } from '../core/transient.ts';
import { StanzaError } from '../errors.ts';
import { bareJid, fullJid, type Jid, parseJid } from '../jid.ts';
import { serialize } from '../outbound.ts';
import type {
  ArchivedEntry,
  ArchivePrefs,
  EntryInput,
  Mode,
  Page,
  PageRequest,
  SweepStep,
} from '../store/archive.ts';
import { changeKeyOf, PrefsVersionConflictError } from '../store/archive.ts';
import type { ArchiveStreamState, ResourceRecord } from '../store/sessions.ts';
import { NS } from '../xml/namespaces.ts';
import {
  archiveDecision,
  checkContentMix,
  entryFromMessage,
  resolveEntryTimes,
  startsNewCollection,
  threadOf,
  timeAttribute,
} from './xep-0136/collections.ts';
import {
  ARCHIVE_FEATURES,
  ARCHIVE_NS,
  ARCHIVE_REQUESTS,
  type ArchiveRequest,
  decodeRequest,
  type ManualEntry,
  type MethodType,
} from './xep-0136/decode.ts';
import {
  encodeCollection,
  encodeKeys,
  encodeList,
  encodeModified,
  encodeOtr,
  encodePrefPush,
  encodePrefs,
  encodeRecordPush,
  encodeSave,
} from './xep-0136/encode.ts';
import { archiveStanzaError, collectionNotFound } from './xep-0136/errors.ts';
import {
  applyPrefChange,
  asksForRefusedSaveAll,
  checkAutoRequest,
  effectiveMode,
  itemOf,
  retention,
  type ServicePolicy,
} from './xep-0136/preferences.ts';

/** 0.5 §2: "save" for the Save Mode feature, "otr" for the Off-the-Record Mode feature. */
const FEATURES_05 = ['save', 'otr'].map((name) => `${ARCHIVE_NS}#${name}`);

/** Room kept for the iq wrapper around a paged answer (its attributes, the `<set/>`). */
const ENVELOPE_BYTES = 2048;

/**
 * §8.3 remove: collections removed per round (each a tombstone write and its items' deletes, one
 * after another: 10–40 ms a collection), and the invocation time a round must have left (ms).
 */
export const REMOVE_ROUND_COLLECTIONS = 100;
const REMOVE_ROUND_MS = 10_000;

/** The service's defaults and limits, from configuration (README "Configuration"). */
export function servicePolicy(server: Server): ServicePolicy & { autoRequired: boolean } {
  const { config } = server;
  const expire = config.archiveDefaultExpireSeconds;
  return {
    default: {
      save: config.archiveDefaultSave,
      otr: config.archiveDefaultOtr,
      ...(expire > 0 && config.archiveDefaultSave !== 'false' ? { expire } : {}),
    },
    methods: { auto: 'allow', local: 'allow', manual: 'allow' },
    allowSaveAll: config.archiveAllowSaveAll,
    maxExpire: config.archiveMaxExpireSeconds,
    autoRequired: config.archiveAutoRequired,
  };
}

type Policy = ReturnType<typeof servicePolicy>;

export function register(server: Server): void {
  const { host } = server;
  const policy = servicePolicy(server);
  for (const feature of [...ARCHIVE_FEATURES, ...FEATURES_05]) host.add('disco-feature', feature);
  // XEP-0059 §4: lists, collections, changes and keys are paged with Result Set Management.
  host.add('disco-feature', NS.rsm);
  for (const name of ARCHIVE_REQUESTS) {
    for (const type of ['get', 'set'] as const) {
      // The handler refuses every other account itself, the same way whether it exists or not.
      host.iq(type, ARCHIVE_NS, name, (request) => handleRequest(server, policy, request), {
        answersForAnyAccount: true,
      });
    }
  }

  const sent = new WeakMap<Element, { owner: string; at: number }>();
  const reRouted = new WeakSet<Element>();
  const archivedFor = new WeakMap<Element, Set<string>>();
  const once = (stanza: Element, owner: string): boolean => {
    const owners = archivedFor.get(stanza) ?? new Set<string>();
    archivedFor.set(stanza, owners);
    if (owners.has(owner)) return false;
    owners.add(owner);
    return true;
  };

  // The sender's side, at acceptance (before routing; returns undefined so routing goes on).
  const accept = ({ stream, stanza }: StanzaEvent) => {
    // (A client's delay claiming to be this server's is gone already: core/router.ts.)
    if (autoOn(stream.state.archive, policy)) sent.set(stanza, { owner: stream.user, at: Date.now() });
    return undefined;
  };
  host.hook('message/bare', accept, { priority: 20 });
  host.hook('message/full', accept, { priority: 20 });

  /** `to`: the full JID of the session that took it (§5.2 "the full JID with which the messages were exchanged"). */
  const archiveSender = async (stanza: Element, to: string | undefined) => {
    const pending = sent.get(stanza);
    if (!pending) return;
    sent.delete(stanza);
    if (!to || !once(stanza, `${pending.owner}>`)) return;
    await archiveSafely(server, policy, pending.owner, to, 'to', stanza, pending.at);
  };

  host.hook('message-routed', async ({ stanza, to }) => {
    await archiveSender(stanza, `${to.user}/${to.resource}`);
    // XEP-0203 stamp of this server: a stream-management re-route, decided at its first routing.
    if (hasServerStamp(stanza, server.config.domain)) return undefined;
    if (!autoOn(to.archive, policy) || !stanza.attrs.from) return undefined;
    if (!once(stanza, to.user)) return undefined;
    await archiveSafely(server, policy, to.user, stanza.attrs.from, 'from', stanza, Date.now());
    return undefined;
  });
  host.hook(
    'message-offline',
    ({ stanza, acceptedAt }) => {
      if (acceptedAt !== undefined) reRouted.add(stanza);
      return undefined;
    },
    { priority: 20 },
  );
  host.hook('message-stored-offline', async ({ stanza, user, storedAt }) => {
    await archiveSender(stanza, user);
    if (reRouted.has(stanza) || !stanza.attrs.from) return undefined;
    if (!(await archivesWhileOffline(server, policy, user))) return undefined;
    if (!once(stanza, user)) return undefined;
    await archiveSafely(server, policy, user, stanza.attrs.from, 'from', stanza, storedAt);
    return undefined;
  });

  // XEP-0198: a resumed stream is the same stream; its archiving state moves to the new row.
  host.hook('session-resumed', async ({ stream, resource }) => {
    const archive = resource?.archive;
    if (!archive) return undefined;
    stream.update({ archive });
    await server.sessions.setResourceArchive(stream.user, stream.resource, stream.connectionId, archive);
    return undefined;
  });

  // The sweeper's phases (core/lifecycle.ts `runSweep`), after stream management's expiries and
  // re-routes (priorities 30, 20) and before its liveness probes (-10); each collection on its own.
  // Only where sweeps run (folded at build time, see `bundleDefines`).
  if (process.env.NIMBUS_SWEEPS !== 'false') {
    const step = (run: SweepRun, phase: string): SweepStep => ({
      hasTime: () => run.hasTime(),
      onError: (error, fields) => run.failed(phase, error, fields),
    });
    host.hook(
      'sweep',
      (run) =>
        run.phase('archive-purge', () => server.archive.purgePending(undefined, step(run, 'archive-purge'))),
      { priority: 10 },
    );
    // 0.9 §10: what expired is reported by <modified/> as changed or removed.
    host.hook(
      'sweep',
      (run) =>
        run.phase('archive-expiry', () =>
          server.archive.sweepExpiring(undefined, step(run, 'archive-expiry')),
        ),
      { priority: 10 },
    );
  }
}

// ---------------------------------------------------------------------------------------------
// Automatic archiving

/** §7.1: "Automatic archiving MUST default to disabled for each new stream … unless administrator policies require" it. */
function autoOn(state: ArchiveStreamState | undefined, policy: Policy): boolean {
  return state?.auto ?? policy.autoRequired;
}

/** Whether this stream or any other connected resource of its user archives automatically. */
async function anyAutoArchiving(server: Server, stream: BoundStream, policy: Policy): Promise<boolean> {
  if (autoOn(stream.state.archive, policy)) return true;
  const resources = await server.sessions.listResources(stream.user);
  return resources.some(
    (resource) => resource.resource !== stream.resource && autoOn(resource.archive, policy),
  );
}

function hasServerStamp(stanza: Element, domain: string): boolean {
  return stanza.getChildren('delay', NS.delay).some((delay) => delay.attrs.from === domain);
}

/**
 * A message stored while the user has no stream to take it has no stream whose auto flag
 * decides. It is archived for the recipient when the service requires automatic archiving, or
 * when the user's preferences say its clients SHOULD use it (`<method type='auto'
 * use='prefer'/>`, §3.2): the stream that will take it would have auto on.
 */
async function archivesWhileOffline(server: Server, policy: Policy, user: string): Promise<boolean> {
  if (policy.autoRequired) return true;
  const prefs = await server.archive.getPrefs(user);
  return (prefs.methods.auto ?? policy.methods.auto) === 'prefer';
}

/** Archiving never costs the message its delivery: a failure is logged, and routing goes on. */
async function archiveSafely(
  server: Server,
  policy: Policy,
  owner: string,
  contact: string,
  direction: 'to' | 'from',
  stanza: Element,
  at: number,
): Promise<void> {
  // Taken before anything is awaited: the same key on every delivery of the frame (one copy per
  // owner and direction in a frame, see `once`). Undefined outside a frame (a sweeper's re-route).
  const delivery = nextDeliveryKey(`archive:${owner}:${direction}`);
  try {
    await archiveMessage(server, policy, owner, parseJid(contact), direction, stanza, at, delivery);
  } catch (error) {
    server.log.error('message not archived', { owner, error });
  }
}

/**
 * The automatic archiving pipeline for one user: the mode for the contact (§3 precedence), the
 * decision (§7, hints), the open collection or a new one (idle gap, new thread), one append.
 * `delivery`: the frame's key for this copy (core/frame.ts), written on the entry; a redelivery
 * of the frame that finds it written (an earlier delivery archived it, then failed or died before
 * the frame's end) writes nothing: a message is archived once per user, however often its frame
 * comes.
 */
export async function archiveMessage(
  server: Server,
  policy: Policy,
  owner: string,
  contact: Jid,
  direction: 'to' | 'from',
  stanza: Element,
  at: number,
  delivery?: DeliveryKey,
): Promise<boolean> {
  const prefs = await server.archive.getPrefs(owner);
  const mode = effectiveMode(prefs, contact, policy);
  const decision = archiveDecision(stanza, mode);
  if (!decision.archive) return false;
  const expireSeconds = expiryOf(mode, policy);
  const withJid = fullJid(contact);
  const thread = threadOf(stanza);
  // The entry's frame key: the direction with it, as a message to oneself has both in one collection.
  const frameKey = delivery && `${direction} ${delivery.key}`;
  let open = await server.archive.findOpenCollection(owner, withJid);
  if (
    delivery?.redelivered &&
    frameKey &&
    (await server.archive.archivedByFrame(owner, { with: withJid, key: frameKey, since: delivery.at }, open))
  ) {
    server.log.info('message archived by an earlier delivery of its frame', { owner, direction });
    return true;
  }
  const current = open && {
    start: open.header.start,
    thread: open.thread,
    lastAt: open.last?.at,
    expireSeconds: open.expireSeconds,
  };
  const next = { at, thread, expireSeconds: expireSeconds || undefined };
  if (startsNewCollection(current, next, server.config.archiveCollectionGapSeconds * 1000)) {
    open = await server.archive.startCollection(
      owner,
      {
        with: withJid,
        start: at,
        ...(thread ? { thread } : {}),
        ...(expireSeconds ? { expireSeconds } : {}),
      },
      open,
    );
  }
  await server.archive.appendMessage(
    owner,
    open as NonNullable<typeof open>,
    {
      ...entryFromMessage(stanza, direction, decision.save, at),
      ...(frameKey ? { frameKey } : {}),
    },
    expireSeconds ? { expireSeconds } : {},
  );
  return true;
}

/** §3.2 'expire': the mode's, else the service's default expiry, capped by the service's longest. */
function expiryOf(mode: Mode, policy: Policy): number | undefined {
  return retention({ ...mode, expire: mode.expire ?? policy.default.expire }, policy.maxExpire);
}

// ---------------------------------------------------------------------------------------------
// Requests

async function handleRequest(
  server: Server,
  policy: Policy,
  request: IqRequest,
): Promise<Element | undefined | typeof DEFERRED_RESULT> {
  const { stream } = request;
  // Nobody reads, lists or changes another user's archive, nor learns whether it exists: the
  // same answer for every other account (the router checks no existence for this handler).
  if (request.to.local && bareJid(request.to) !== stream.user)
    throw new StanzaError('cancel', 'service-unavailable');
  const decoded = decodeRequest(request.type, request.payload);
  try {
    return await serve(server, policy, request, decoded);
  } catch (error) {
    throw archiveStanzaError(error) ?? error;
  }
}

async function serve(
  server: Server,
  policy: Policy,
  request: IqRequest,
  decoded: ArchiveRequest,
): Promise<Element | undefined | typeof DEFERRED_RESULT> {
  const { stream } = request;
  const owner = stream.user;
  const archive = server.archive;
  switch (decoded.kind) {
    case 'pref-get': {
      // §3.2: "Once it has received a request for archiving preferences from the client, the
      // server MUST send any subsequent changes … to the client until the stream is closed".
      await markStream(stream, { pref: true });
      const prefs = await archive.getPrefs(owner);
      return encodePrefs(prefs, autoOn(stream.state.archive, policy), policy);
    }
    case 'pref-set': {
      // §3.3: refused "If it does not allow the saving of full message stanza content, and the
      // client set the value of the 'save' attribute to "all", and any of the user's connected
      // resources have Automated Archiving enabled" (the preferences also guide clients' own
      // archiving; enabling it later while 'all' is set is refused too, §7.3).
      if (asksForRefusedSaveAll(decoded, policy) && (await anyAutoArchiving(server, stream, policy)))
        throw new StanzaError(
          'cancel',
          'feature-not-implemented',
          "the server does not keep full stanzas (save='all')",
        );
      // §3.3: "If administrator policies require that at least the <body/> … of every message is
      // logged automatically, and the client sets the value of the 'save' attribute to 'false'".
      if (
        policy.autoRequired &&
        (decoded.default?.save === 'false' || decoded.items.some((i) => i.mode.save === 'false'))
      )
        throw new StanzaError('cancel', 'feature-not-implemented', 'every message is archived here');
      const change = await updatePrefs(server, owner, decoded, policy);
      // §3.3: the result, then "The server then MUST inform all of the user's connected
      // resources that have previously requested the user's archiving preferences".
      await stream.send(iqResult(request.stanza));
      await pushPrefChange(server, owner, change, policy, {
        pref: () =>
          encodePrefPush(
            { default: decoded.default, items: decoded.items, methods: decoded.methods },
            policy.maxExpire,
          ),
      });
      return DEFERRED_RESULT;
    }
    case 'auto': {
      // §7.3: "If administrator policies require that every message is logged automatically, and
      // the client is trying to disable automatic archiving".
      if (policy.autoRequired && !decoded.save)
        throw new StanzaError('cancel', 'feature-not-implemented', 'every message is archived here');
      checkAutoRequest(decoded, await archive.getPrefs(owner), policy);
      await markStream(stream, { auto: decoded.save });
      if (!decoded.save) {
        // §7.1: "If the client switches off all auto-archiving then the server MUST close and
        // store all active collections" — all: no other stream of the user records any more.
        const others = (await server.sessions.listResources(owner)).filter(
          (r) => r.resource !== stream.resource && autoOn(r.archive, policy),
        );
        if (others.length === 0) await archive.closeOpenCollections(owner);
      }
      return undefined;
    }
    case 'list': {
      // A 0.5 request (maxitems, or neither it nor <set/>) is continued from one second after
      // the last collection's start: read one more, to end a cut page where that loses nothing.
      const zeroFive = !decoded.page.present;
      const fetched = await archive.listCollections(
        owner,
        { with: decoded.with, start: decoded.start, end: decoded.end },
        {
          ...decoded.page,
          lastPage: decoded.page.lastPage,
          ...(zeroFive ? { max: decoded.page.max + 1 } : {}),
        },
      );
      const page = zeroFive ? atMost(fetched, decoded.page.max, (header) => header.id) : fetched;
      return fitToPost(
        page,
        (p) => {
          if (!zeroFive) return encodeList(p, decoded);
          // Read one past the page (consistently, with no byte cap): whether more follow is
          // known, where the count (an eventually consistent COUNT) may not have the newest yet.
          const cut = endBeforeContinuation(p, fetched.items, (header) => header.id, collectionsApart);
          return encodeList(cut, decoded, fetched.items.length > cut.items.length);
        },
        (header) => header.id,
        decoded.page,
      );
    }
    case 'retrieve': {
      const zeroFive = !decoded.page.present;
      const asked = zeroFive ? { ...decoded.page, max: decoded.page.max + 1 } : decoded.page;
      const fetched =
        (await archive.retrieveMessages(owner, { with: decoded.with, start: decoded.start }, asked)) ??
        (zeroFive ? await continuePartial(server, owner, { ...decoded, page: asked }) : undefined);
      if (!fetched) throw collectionNotFound();
      const header = fetched.header;
      const uid = (entry: ArchivedEntry) => String(entry.seq);
      const page = zeroFive ? { ...atMost(fetched, decoded.page.max, uid), header } : fetched;
      // A page never ends on an entry shown with `utc` (its exact time, not whole seconds from
      // the start): the continuation from a second after it could pass the next entry by.
      const entriesApart = (last: ArchivedEntry, next: ArchivedEntry) =>
        !('utc' in timeAttribute(header.start, last, 'start')) &&
        shownSecond(header.start, next.at) > shownSecond(header.start, last.at);
      const encode = async (whole: Page<ArchivedEntry>) => {
        const p = zeroFive ? endBeforeContinuation(whole, fetched.items, uid, entriesApart) : whole;
        const carried = p.items.flatMap((e) => (e.keyName ? [e.keyName] : []));
        // §8.2: "the server MUST return all the <EncryptedKey/> elements … whose symmetric key
        // name … is referenced"; with <KeyName/>s, "only those … whose public key name … is specified".
        const keys =
          carried.length === 0
            ? []
            : await archive.keysForCollection(
                owner,
                header,
                carried,
                decoded.keyNames.length > 0 ? decoded.keyNames : undefined,
              );
        return encodeCollection(header, p, keys, decoded.page);
      };
      return fitToPost(page, encode, uid, decoded.page);
    }
    case 'remove': {
      const filter = {
        with: decoded.with,
        start: decoded.start,
        end: decoded.end,
        exact: decoded.exact,
        open: decoded.open,
        // "only collections that are currently being recorded automatically": those the next
        // message would join (core of startsNewCollection: the idle gap).
        openWithinMs: server.config.archiveCollectionGapSeconds * 1000,
      };
      let removed = 0;
      // That this frame removes collections is recorded on the connection's row before the first
      // is removed (one UpdateItem, only when there is one to remove): any later attempt of the
      // frame, whether this one was handed back to go on (below) or died after its last round
      // (before the frame's end saved it as handled), finds that and answers the same result,
      // though it finds nothing left to remove.
      const recordRemoving = async () => {
        if (stream.frameId === '' || stream.state.archiveRemoving === stream.frameId) return;
        stream.update({ archiveRemoving: stream.frameId });
        await stream.commit();
      };
      for (;;) {
        // Up to REMOVE_ROUND_COLLECTIONS a round. Too little of the invocation left for another:
        // the frame is handed back and comes again within seconds, and its next attempt goes on
        // with what is left (what is removed is a tombstone already); nothing is answered
        // meanwhile.
        if ((frameTimeLeft() ?? Number.POSITIVE_INFINITY) < REMOVE_ROUND_MS)
          throw new RetryLaterError('archive removal continues in the next attempt');
        const result = await archive.removeCollections(owner, filter, {
          maxCollections: REMOVE_ROUND_COLLECTIONS,
          beforeRemoving: recordRemoving,
        });
        removed += result.removed.length;
        if (!result.more) break;
      }
      const removedBefore = stream.frameId !== '' && stream.state.archiveRemoving === stream.frameId;
      if (stream.state.archiveRemoving !== undefined) stream.update({ archiveRemoving: undefined });
      // §8.3: "If the specified collection (or collections) do not exist then the server MUST
      // return an <item-not-found/> error"; an attempt that finds none left after an earlier
      // attempt of its frame removed them answers the success that attempt earned.
      if (removed === 0 && !removedBefore) throw collectionNotFound();
      return undefined;
    }
    case 'store':
      await storeManually(server, policy, owner, decoded);
      return undefined;
    case 'keys': {
      const page = await archive.listKeys(owner, decoded.keyName, decoded.page);
      return fitToPost(page, encodeKeys, (key) => key.ref ?? '', decoded.page);
    }
    case 'delete': {
      const deleted = await archive.deleteKeys(
        owner,
        { with: decoded.with, start: decoded.start },
        decoded.keyNames,
      );
      if (deleted === undefined) throw collectionNotFound();
      return undefined;
    }
    case 'modified': {
      const after =
        decoded.after === undefined ? undefined : changeKeyOf(decoded.after.ms, decoded.after.subMillisecond);
      const page = await archive.modifiedSince(owner, after, decoded.page.max);
      return encodeModified(page);
    }
    case 'save-get':
      // 0.5 §3.1: "The server also remembers that the requesting resource is "save-mode aware"".
      await markStream(stream, { save: true });
      return encodeSave(await archive.getPrefs(owner), policy);
    case 'save-set': {
      if (policy.autoRequired && (decoded.default === false || decoded.items.some((i) => !i.save)))
        throw new StanzaError('cancel', 'not-allowed', 'every message is archived here');
      const change = await updatePrefs(server, owner, decoded, policy);
      // 0.5 §3.1: "it acknowledges the change", then "MUST inform all of the user's connected
      // resources" (the save-mode aware ones: those are the ones it remembers).
      await stream.send(iqResult(request.stanza));
      await pushPrefChange(server, owner, change, policy, {
        save: () => {
          const save = new XmlElement('save', { xmlns: ARCHIVE_NS });
          if (decoded.default !== undefined) save.c('default', { save: String(decoded.default) });
          for (const item of decoded.items) save.c('item', { jid: item.jid, save: String(item.save) });
          return save;
        },
      });
      return DEFERRED_RESULT;
    }
    case 'otr-get':
      // 0.5 §3.2: "the requesting resource is now "OTR aware"".
      await markStream(stream, { otr: true });
      return encodeOtr(await archive.getPrefs(owner));
    case 'record-set': {
      // 0.5 §3.2: "Such a deployment MUST return a <not-allowed/> error in response to a request
      // to enter Off-the-Record mode".
      if (policy.autoRequired && decoded.otr)
        throw new StanzaError('cancel', 'not-allowed', 'every message is archived here');
      const change = await updatePrefs(server, owner, decoded, policy);
      // 0.5 §3.2: "broadcasts to all of the user's otr-aware resources", then the result.
      await pushPrefChange(server, owner, change, policy, {
        otr: () => [encodeRecordPush(decoded.jid, decoded.otr)],
      });
      await notifyContact(server, owner, decoded.jid, decoded.otr);
      return undefined;
    }
  }
}

/** Reads, changes and stores the preferences, again when another change won the race. */
/**
 * XEP-0136 0.5 §4.3: "the client MAY then request the remainder of the collection, taking care to
 * set the value of the 'start' attribute to one second after the time of the last <from/> or
 * <to/> element in the partial collection that it received": a `start` that begins no collection
 * continues the last one with that JID begun before it, from that time on.
 */
async function continuePartial(
  server: Server,
  owner: string,
  request: { with: string; start: number; page: PageRequest },
) {
  const jid = parseJid(request.with);
  const kind = jid.resource ? 'full' : jid.local ? 'bare' : 'domain';
  // The collections with that JID (a bare or domain JID's index holds its resources' too)
  // begun before the time, newest last.
  const before = await server.archive.listCollections(
    owner,
    { with: { kind, jid: request.with }, end: request.start },
    { max: 20, lastPage: true },
  );
  const containing = before.items.filter((header) => header.with === request.with).at(-1);
  if (!containing) return undefined;
  // The client adds the second to the time it read: the collection's start plus the `secs`,
  // whole seconds of rounded offsets. The entries shown at that second or later follow (a cut
  // page ends between two such seconds: endBeforeContinuation). A time between whole seconds
  // (not one read off a reply) keeps everything from that time on, too.
  const shown = Math.ceil((request.start - containing.start) / 1000);
  const page = await server.archive.retrieveMessages(owner, containing, request.page, {
    atOrAfter: Math.min(request.start, containing.start + shown * 1000 - 500),
  });
  // A time after the collection's last entry lies in no collection: 0.9 §8.2 and 0.5 §4.3, "If
  // the collection does not exist then the server MUST return an <item-not-found/> error".
  return page && page.count > 0 ? page : undefined;
}

/** The preferences before and after a change. */
interface PrefsChange {
  before: ArchivePrefs;
  after: ArchivePrefs;
}

async function updatePrefs(
  server: Server,
  owner: string,
  change: ArchiveRequest,
  policy: Policy,
): Promise<PrefsChange> {
  for (let attempt = 0; ; attempt++) {
    const before = await server.archive.getPrefs(owner);
    const next = applyPrefChange(before, change, policy);
    checkPrefsSize(before, next);
    try {
      return { before, after: await server.archive.putPrefs(owner, next) };
    } catch (error) {
      if (!(error instanceof PrefsVersionConflictError) || attempt >= 3) throw error;
    }
  }
}

/**
 * The preferences are one item, read for every message archived for the user (and every one
 * stored offline for them), and answered in one `<pref/>`: a change that grows them past
 * MAX_PREF_ITEMS per-contact modes or MAX_PREF_BYTES is refused; one that shrinks them is not.
 */
export const MAX_PREF_ITEMS = 500;
export const MAX_PREF_BYTES = 64 * 1024;

function checkPrefsSize(before: ArchivePrefs, next: ArchivePrefs): void {
  const count = (prefs: ArchivePrefs) => Object.keys(prefs.items).length;
  const bytes = (prefs: ArchivePrefs) =>
    Buffer.byteLength(JSON.stringify([prefs.default, prefs.items, prefs.methods]), 'utf8');
  const over = count(next) > MAX_PREF_ITEMS || bytes(next) > MAX_PREF_BYTES;
  if (over && (count(next) > count(before) || bytes(next) > bytes(before)))
    throw new StanzaError(
      'cancel',
      'not-acceptable',
      `Archiving preferences are limited to ${MAX_PREF_ITEMS} items and ${MAX_PREF_BYTES} bytes`,
    );
}

const sameMode = (a: Mode | undefined, b: Mode | undefined) => JSON.stringify(a) === JSON.stringify(b);
const savesIn = (mode: Mode | undefined) => mode !== undefined && mode.save !== 'false';
const offRecord = (mode: Mode | undefined) => mode?.otr === 'require';

/**
 * Tells each of the user's resources that asked for the preferences, in the form it asked in,
 * of a change made by whichever request: 0.9 §3.2 "MUST send any subsequent changes to any of the
 * user's archiving preferences to the client until the stream is closed", and 0.5 §3.1/§3.2 the
 * save-mode aware and the OTR-aware ones. The request's own form carries its own words (`own`);
 * the other forms are made from what changed in the stored preferences, and go only when
 * something they show changed.
 */
async function pushPrefChange(
  server: Server,
  owner: string,
  { before, after }: PrefsChange,
  policy: Policy,
  own: { pref?: () => Element; save?: () => Element; otr?: () => Element[] },
): Promise<void> {
  // A contact without an item of its own follows the default (the user's, else the service's).
  const modeOf = (prefs: ArchivePrefs, jid: string) =>
    itemOf(prefs.items, jid) ?? prefs.default ?? policy.default;
  const jids = [...new Set([...Object.keys(before.items), ...Object.keys(after.items)])].filter(
    (jid) => !sameMode(itemOf(before.items, jid), itemOf(after.items, jid)),
  );
  const defaultChanged = !sameMode(before.default, after.default);
  const pref = (): Element | undefined => {
    // 0.9 §3.2: the server "MUST send any subsequent changes to any of the user's archiving
    // preferences". An item the change removed (0.5's OTR off for a contact that had no item
    // before) has no removal in the 0.9 seed: it goes as the item it now amounts to, the mode the
    // contact follows (the default), so that no resource keeps a stale otr='require' for it.
    const items = jids.map((jid) => ({ jid, mode: modeOf(after, jid) }));
    const methods = (Object.keys(after.methods) as MethodType[])
      .filter((type) => before.methods[type] !== after.methods[type])
      .map((type) => ({ type, use: after.methods[type] as string }));
    if (!defaultChanged && items.length === 0 && methods.length === 0) return undefined;
    return encodePrefPush(
      { ...(defaultChanged ? { default: after.default } : {}), items, methods },
      policy.maxExpire,
    );
  };
  const save = (): Element | undefined => {
    const saveDefault =
      defaultChanged &&
      savesIn(before.default ?? policy.default) !== savesIn(after.default ?? policy.default);
    // 0.5 lists each contact with an item: one that came, went or changed its boolean.
    const items = jids.filter(
      (jid) =>
        (itemOf(before.items, jid) === undefined) !== (itemOf(after.items, jid) === undefined) ||
        savesIn(modeOf(before, jid)) !== savesIn(modeOf(after, jid)),
    );
    if (!saveDefault && items.length === 0) return undefined;
    const element = new XmlElement('save', { xmlns: ARCHIVE_NS });
    if (saveDefault) element.c('default', { save: String(savesIn(after.default ?? policy.default)) });
    for (const jid of items) element.c('item', { jid, save: String(savesIn(modeOf(after, jid))) });
    return element;
  };
  const otr = (): Element[] =>
    jids
      .filter((jid) => offRecord(modeOf(before, jid)) !== offRecord(modeOf(after, jid)))
      .map((jid) => encodeRecordPush(jid, offRecord(modeOf(after, jid))));
  const resources = (await server.sessions.listResources(owner)).filter(
    (r) => r.archive?.pref || r.archive?.save || r.archive?.otr,
  );
  for (const resource of resources) {
    const payloads: Element[] = [];
    const take = (element: Element | undefined) => {
      if (element) payloads.push(element);
    };
    if (resource.archive?.pref) take(own.pref ? own.pref() : pref());
    if (resource.archive?.save) take(own.save ? own.save() : save());
    if (resource.archive?.otr) payloads.push(...(own.otr ? own.otr() : otr()));
    for (const payload of payloads) await pushTo(server, resource, payload);
  }
}

/** Records per-stream archiving state on the connection (this stream) and the resource row (pushes, routing). */
async function markStream(stream: BoundStream, changes: Partial<ArchiveStreamState>): Promise<void> {
  const current = stream.state.archive ?? {};
  if (Object.entries(changes).every(([k, v]) => current[k as keyof ArchiveStreamState] === v)) return;
  const archive = { ...current, ...changes };
  stream.update({ archive });
  await stream.server.sessions.setResourceArchive(stream.user, stream.resource, stream.connectionId, archive);
}

/**
 * A push (an iq set from the server, §3.3) to one of the user's resources, through the one
 * delivery path. The client's result comes back without a full-JID `to` and the router drops it.
 */
async function pushTo(server: Server, resource: ResourceRecord, payload: Element): Promise<void> {
  const iq = new XmlElement('iq', {
    type: 'set',
    id: `push-${randomBytes(6).toString('hex')}`,
    to: `${resource.user}/${resource.resource}`,
  });
  iq.cnode(payload);
  try {
    await deliver(server, resource, iq);
  } catch (error) {
    if (!(error instanceof StanzaError)) throw error;
  }
}

/**
 * 0.5 §3.2: "It also sends a message to the contact's server that chats with Juliet are not to
 * be saved", and the contact's server "swaps the JIDs … and broadcasts the change to all of the
 * contact's otr-aware resources". For a local contact both servers are this one: the contact's
 * OTR-aware resources get the swapped push. The contact's stored preferences are not changed:
 * nobody changes another user's archive settings; the contact's client decides.
 */
async function notifyContact(server: Server, owner: string, contact: string, otr: boolean): Promise<void> {
  const jid = parseJid(contact);
  if (!jid.local || jid.domain !== server.config.domain || bareJid(jid) === owner) return;
  // "a shared off-the-record state": shared with a contact, one with a presence subscription to
  // or from the user in the contact's roster. Anyone else's resources get nothing, so that a
  // stranger cannot push iq sets to any account by naming it.
  const entry = await server.roster.getEntry(bareJid(jid), owner);
  if (!entry || entry.subscription === 'none') return;
  const resources = (await server.sessions.listResources(bareJid(jid))).filter(
    (r) => r.archive?.otr === true,
  );
  for (const resource of resources) await pushTo(server, resource, encodeRecordPush(owner, otr));
}

// ---------------------------------------------------------------------------------------------
// Manual archiving

/** The element stored for an uploaded entry: `secs`/`utc` go (they are recomputed), a note keeps its `utc`. */
function storedXml(entry: ManualEntry): string {
  const el = new XmlElement(entry.element.name, { ...entry.element.attrs });
  el.children = entry.element.children;
  delete el.attrs.secs;
  if (entry.kind !== 'note') delete el.attrs.utc;
  if (entry.kind === 'to' || entry.kind === 'from' || entry.kind === 'note') delete el.attrs.xmlns;
  return el.toString();
}

/** §5.3: creates the collection or appends to it; §6: encrypted content never mixes with plain. */
async function storeManually(
  server: Server,
  policy: Policy,
  owner: string,
  request: Extract<ArchiveRequest, { kind: 'store' }>,
): Promise<void> {
  const delivery = nextDeliveryKey(`archive-store:${owner}`);
  const ref = { with: request.with, start: request.start };
  const existing = await server.archive.getCollection(owner, ref);
  checkContentMix(existing?.header, request);
  const times = resolveEntryTimes(request.start, existing?.last?.messageAt, request.entries, Date.now());
  const entries: EntryInput[] = request.entries.map((entry, i) => {
    const time = times[i] as { at: number; utc: boolean };
    return {
      kind: entry.kind,
      at: time.at,
      ...(time.utc ? { utc: true } : {}),
      xml: storedXml(entry),
      ...(entry.keyName ? { keyName: entry.keyName } : {}),
    };
  });
  const prefs = await server.archive.getPrefs(owner);
  const expireSeconds = expiryOf(effectiveMode(prefs, parseJid(request.with), policy), policy);
  await server.archive.storeManual(
    owner,
    {
      ref,
      ...(request.subject !== undefined ? { subject: request.subject } : {}),
      entries,
      keys: request.keys,
      ...(expireSeconds ? { expireSeconds } : {}),
    },
    existing,
    // In a frame, the entries are planned once and written at their planned places: a redelivery
    // of the frame (its first delivery stored them and died before the frame's end, or one of the
    // writes was throttled) stores nothing twice, with the times the first computed (the times
    // computed now count from entries it stored itself).
    delivery ? { frame: { key: delivery.key, redelivered: delivery.redelivered } } : {},
  );
}

// ---------------------------------------------------------------------------------------------
// Answers that fit one WebSocket message

const REPLY_BUDGET = POST_LIMIT_BYTES - ENVELOPE_BYTES;

/**
 * A page whose answer would pass API Gateway's post limit is cut to the items that fit: the
 * `<set/>` (or 0.5's `partial='true'`) tells the client where to go on. Never truncated silently.
 */
async function fitToPost<T>(
  page: Page<T>,
  encode: (page: Page<T>) => Element | Promise<Element>,
  uid: (item: T) => string,
  request: PageRequest,
): Promise<Element> {
  // XEP-0059 §2.5: paging backwards, "the *last* item in the page … MUST be the item that
  // immediately *preceeds* the item that the requesting entity indicated": a cut keeps the end.
  const backwards = request.before !== undefined || request.lastPage === true;
  let current = page;
  for (;;) {
    const element = await encode(current);
    const bytes = Buffer.byteLength(serialize(element));
    if (bytes <= REPLY_BUDGET || current.items.length <= 1) return element;
    const keep = Math.floor((current.items.length * REPLY_BUDGET) / bytes);
    current = shorten(current, Math.max(1, Math.min(current.items.length - 1, keep)), uid, backwards);
  }
}

/** The page cut to its first `max` items (a 0.5 reply read one more: endBeforeContinuation). */
function atMost<T>(page: Page<T>, max: number, uid: (item: T) => string): Page<T> {
  return page.items.length > max ? shorten(page, max, uid, false) : page;
}

/**
 * XEP-0136 0.5 §4.3: a client continues a partial reply from "one second after the time of the
 * last <from/> or <to/> element" (§4.2: "of the last collection") it received. A page cut where
 * the next item is shown less than a second after its last would lose that item, so the page
 * ends earlier, where the next item (the first left out, from `all`, the items read) is a second
 * on (`apart`). A page whose every item is that close to the next is left as it is.
 */
function endBeforeContinuation<T>(
  page: Page<T>,
  all: readonly T[],
  uid: (item: T) => string,
  apart: (last: T, next: T) => boolean,
): Page<T> {
  let next = all[page.items.length];
  if (next === undefined) return page;
  let kept = page.items.length;
  while (kept > 0 && !apart(page.items[kept - 1] as T, next)) {
    next = page.items[kept - 1] as T;
    kept -= 1;
  }
  return kept === 0 || kept === page.items.length ? page : shorten(page, kept, uid, false);
}

/** §5.2: an entry's time as a client reads it, the collection's start plus whole `secs`. */
function shownSecond(start: number, at: number): number {
  return Math.round((at - start) / 1000);
}

/** A list's next collection starts a second or more after the last: "one second after" finds it. */
function collectionsApart(last: { start: number }, next: { start: number }): boolean {
  return next.start >= last.start + 1000;
}

function shorten<T>(page: Page<T>, keep: number, uid: (item: T) => string, backwards: boolean): Page<T> {
  if (!backwards) {
    const items = page.items.slice(0, keep);
    const lastItem = items.at(-1);
    return { ...page, items, last: lastItem === undefined ? undefined : uid(lastItem) };
  }
  const dropped = page.items.length - keep;
  const items = page.items.slice(dropped);
  const firstItem = items[0];
  return {
    ...page,
    items,
    first: firstItem === undefined ? undefined : uid(firstItem),
    ...(page.firstIndex !== undefined ? { firstIndex: page.firstIndex + dropped } : {}),
  };
}
