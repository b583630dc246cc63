/**
 * RFC 6120 §7 resource binding (`urn:ietf:params:xml:ns:xmpp-bind`) and the legacy session iq
 * of RFC 3921 (`urn:ietf:params:xml:ns:xmpp-session`), answered with an empty result.
 */
import { randomBytes } from 'node:crypto';
import { Element } from 'ltx';
import { frameDerived } from '../core/frame.ts';
import { HANDLED, isBound, type Server, type Stream } from '../core/host.ts';
import { replaceSession } from '../core/lifecycle.ts';
import { errorReplyTo } from '../core/stanzas.ts';
import { RetryLaterError } from '../core/transient.ts';
import { StanzaError, StreamError } from '../errors.ts';
import { parseJid } from '../jid.ts';
import {
  fitsResourceKey,
  MAX_RESOURCE_BYTES,
  ResourceBusyError,
  type ResourceRecord,
  ResourceTakenError,
} from '../store/sessions.ts';
import { NS } from '../xml/namespaces.ts';

export function register(server: Server): void {
  const { host } = server;
  host.hook('stream-features', ({ stream, features }) => {
    if (!stream.user || stream.state.resource) return undefined;
    features.c('bind', { xmlns: NS.bind });
    // RFC 6121 Appendix E: the session feature is advertised as optional for old clients.
    features.c('session', { xmlns: NS.session }).c('optional');
    return undefined;
  });
  host.hook('stanza-before-bind', ({ stream, stanza }) => bind(stream, stanza));
  host.iq('set', NS.session, 'session', async () => undefined, { targets: ['server'], repeatable: true });
  host.iq(
    'set',
    NS.bind,
    'bind',
    async () => {
      throw new StanzaError('cancel', 'not-allowed', 'This stream already has a resource');
    },
    { targets: ['server'], repeatable: true },
  );
}

function requestedResource(bind: Element): string | undefined {
  const text = bind.getChildText('resource');
  if (text === null || text === undefined || text.trim() === '') return undefined;
  return text.trim();
}

/**
 * RFC 6120 §7.6: "the server MUST generate a resourcepart on behalf of the client". The same on
 * every delivery of the frame (derived from its id, unguessable): a redelivered bind whose first
 * attempt bound and answered binds the name the client was told, not a second one.
 */
async function generatedResource(stream: Stream): Promise<string> {
  const derived = frameDerived(await stream.server.decoySecret(), `bind\n${stream.connectionId}`);
  return (derived ? Buffer.from(derived, 'base64url') : randomBytes(6)).toString('hex').slice(0, 12);
}

/**
 * Whether binding `resource` would pass MAX_RESOURCES_PER_ACCOUNT connected resources. A
 * stream-management session detached from its socket (waiting for a resume) is not connected:
 * its sessions are only looked up when the rows alone reach the limit, so a login pays one
 * Query, and a client that reloads a page with a new resource each time is never refused for
 * the sessions its earlier pages left waiting. A bind an earlier attempt of this frame began
 * (its row written, or a takeover recorded) is finished, never refused half-way: a row left
 * bound by a stream told it was not would receive stanzas, and a takeover would leave the
 * session it displaced unended.
 */
async function overResourceLimit(stream: Stream & { user: string }, resource: string): Promise<boolean> {
  const { server } = stream;
  const limit = server.config.maxResourcesPerAccount;
  if (limit <= 0 || stream.state.replacing) return false;
  const { others, own } = await server.sessions.otherResources(stream.user, resource, stream.connectionId);
  if (own || others.length < limit) return false;
  // Detached sessions too have a bound: a client that connects, enables resumption and drops,
  // over and over, would otherwise grow the account's rows (and what a message to its bare JID
  // is queued for) without end.
  if (others.length >= limit * DETACHED_FACTOR) return true;
  const smIds = others.flatMap((other) => (other.smId ? [other.smId] : []));
  const attached = smIds.length > 0 ? await server.host.stanzaQueue?.attached(smIds) : undefined;
  const connected = others.filter((other) => !other.smId || attached?.has(other.smId) !== false);
  return connected.length >= limit;
}

/** Resources, connected or detached, an account may have: this many times the limit. */
const DETACHED_FACTOR = 4;

/** A bind this long after authentication checks that the account is still the one it logged in as. */
export const LATE_BIND_MS = 5000;

async function accountGoneSinceLogin(stream: Stream & { user: string }): Promise<boolean> {
  const { authenticatedAt, accountCreatedAt } = stream.state;
  // A stream that authenticated before its login time was recorded (the code before session 34)
  // is left as it was.
  if (authenticatedAt === undefined || Date.now() - authenticatedAt < LATE_BIND_MS) return false;
  const createdAt = await stream.server.users.createdAtOf(stream.user);
  return createdAt === undefined || (accountCreatedAt !== undefined && createdAt !== accountCreatedAt);
}

/** Before bind, the only stanza allowed is the bind request (RFC 6120 §7.1). */
async function bind(stream: Stream & { user: string }, stanza: Element): Promise<typeof HANDLED | undefined> {
  const request = stanza.getChild('bind', NS.bind);
  if (stanza.name !== 'iq' || !request) return undefined;
  const { server, user } = stream;
  if (stanza.attrs.type !== 'set' || stanza.getChildElements().length !== 1) {
    if (stanza.attrs.type !== 'get' && stanza.attrs.type !== 'set') return undefined;
    // A bind request of the wrong shape: RFC 6120 §8.2.3 "An IQ stanza of type 'get' or 'set'
    // MUST contain exactly one child element", and §7.7.2.1 answers a bind the server cannot
    // process with <bad-request/> (not the <not-authorized/> of a stanza before bind).
    const reply = errorReplyTo(
      stanza,
      new StanzaError('modify', 'bad-request', "Bind with one <bind/> in an iq of type 'set'"),
    );
    if (reply) await stream.send(reply);
    return HANDLED;
  }
  // RFC 6120 §8.1.3: "the 'id' attribute is REQUIRED for IQ stanzas" (the router's rule for every
  // other iq): the answer could not be matched to the request.
  if (stanza.attrs.id === undefined) {
    const reply = errorReplyTo(stanza, new StanzaError('modify', 'bad-request', 'iq needs an id'));
    if (reply) await stream.send(reply);
    return HANDLED;
  }
  const wanted = requestedResource(request);
  // Outside the try: the secret's read may fail transiently (the frame is tried again then).
  const generated = wanted === undefined ? await generatedResource(stream) : undefined;
  let resource: string;
  try {
    resource = generated ?? parseJid(`${user}/${wanted}`).resource;
    if (Buffer.byteLength(resource, 'utf8') > MAX_RESOURCE_BYTES || !fitsResourceKey(resource))
      throw new Error('resource too long for this server');
  } catch {
    // RFC 6120 §7.7.2.1: a resource that cannot be processed is bad-request.
    const reply = errorReplyTo(stanza, new StanzaError('modify', 'bad-request', 'Invalid resource'));
    // The same answer on a redelivery, though a resource may have been let go meanwhile.
    if (reply) await stream.answerOnce(reply);
    return HANDLED;
  }

  // An account deletion revokes the streams it finds by their resources: one authenticated but
  // not bound yet escapes it, and would bind as the account (or as an account created again under
  // the JID, someone else). A bind soon after authentication (every client's) is trusted; a late
  // one reads the account first (one strongly consistent GetItem), and ends the stream as a
  // revoked one ends (RFC 6120 §4.9.3.12 <not-authorized/>) if it is gone or is another one.
  if (await accountGoneSinceLogin(stream)) throw new StreamError('not-authorized', 'Account deleted');

  // RFC 6120 §7.6.2.1: "If the account has reached a limit on the number of simultaneous
  // connected resources allowed, the server MUST return a <resource-constraint/> stanza error."
  // Rebinding a resource the account holds (a takeover, or this bind redelivered) adds none.
  // Two binds at once may both pass: the limit is kept to within the binds in flight.
  if (await overResourceLimit(stream, resource)) {
    const limit = server.config.maxResourcesPerAccount;
    const reply = errorReplyTo(
      stanza,
      new StanzaError('wait', 'resource-constraint', `This account has ${limit} resources connected already`),
    );
    // The same answer on a redelivery, though a resource may have been let go meanwhile: the
    // client must not be told both that the bind failed and that it succeeded.
    if (reply) await stream.answerOnce(reply);
    return HANDLED;
  }

  // RFC 6120 §7.7.2.2: the server's policy here is "override": the old session gets a
  // <conflict/> stream error and is closed, the new one binds; what the old session had not
  // delivered is re-routed (possibly to this very resource once it is available, or offline).
  // The row taken over is recorded on this stream's row before the write that takes it: a
  // redelivery of this frame (the bind failed part-way, even right after the takeover) finds the
  // resource its own and finishes the replacement, instead of leaving a detached
  // stream-management session to hold its stanzas until its resumption window closes.
  const recordTakeover = async (held: ResourceRecord) => {
    stream.update({ replacing: held });
    await stream.commit();
  };
  let previous: ResourceRecord | undefined;
  try {
    previous = await server.sessions.bindResource(
      {
        user,
        resource,
        connectionId: stream.connectionId,
        connectedAt: stream.state.connectedAt,
        available: false,
        priority: 0,
        boundAt: Date.now(),
        // Until its first presence the stream may still switch to a stream-management queue.
        ...(server.host.stanzaQueue ? { mayQueue: true } : {}),
      },
      recordTakeover,
    );
  } catch (error) {
    if (error instanceof ResourceBusyError) throw new RetryLaterError(error.message);
    if (!(error instanceof ResourceTakenError)) throw error;
    // A takeover recorded by an earlier attempt did not happen (the session it recorded still
    // holds the row, or a newer one that took it in between ended it: see replaceSession).
    if (stream.state.replacing) {
      stream.update({ replacing: undefined });
      await stream.commit();
    }
    // RFC 6120 §7.7.2.2: the server may "disallow the new resource binding attempt and maintain
    // the existing session": a newer connection holds the resource (this bind, from an older
    // one, was handled late: its client has most likely connected anew since).
    const reply = errorReplyTo(
      stanza,
      new StanzaError('cancel', 'conflict', 'The resource is bound on a newer connection'),
    );
    // The same answer on a redelivery, though the newer connection may have let go meanwhile:
    // a client told <conflict/> does not expect its bind to have succeeded.
    if (reply) await stream.answerOnce(reply);
    return HANDLED;
  }
  // The row as the takeover replaced it (its presence may have changed since it was recorded);
  // on a redelivery, which finds the row its own, the record.
  const replacing =
    previous && previous.connectionId !== stream.connectionId ? previous : stream.state.replacing;
  if (replacing && replacing.user === user && replacing.resource === resource) {
    await replaceSession(server, replacing, new StreamError('conflict', 'Replaced by a new connection'));
    stream.update({ replacing: undefined });
  }
  stream.update({ resource });
  const result = new Element('iq', { type: 'result', id: stanza.attrs.id });
  result.c('bind', { xmlns: NS.bind }).c('jid').t(`${user}/${resource}`);
  await stream.send(result);
  if (isBound(stream)) await server.host.fire('session-bound', { stream });
  return HANDLED;
}
