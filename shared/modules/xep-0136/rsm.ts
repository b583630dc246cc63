/**
 * XEP-0059 Result Set Management for the archive's requests: a thin adapter over the core's
 * shared decoder and encoder (core/rsm.ts), with the archive's two additions: a request's
 * `<set/>` holds only max/after/before/index, each once (anything else is `bad-request`), and a
 * `<modified/>` reply carries `<last/>` without `<first/>` (XEP-0136 §10's example).
 */
import type { Element } from 'ltx';
import { decodePageRequest, encodePageReply } from '../../core/rsm.ts';
import { StanzaError } from '../../errors.ts';
import { NS } from '../../xml/namespaces.ts';

export interface RsmRequest {
  /** Whether the request carried `<set/>` (the reply then carries one too). */
  present: boolean;
  max: number;
  after?: string;
  before?: string;
  /** XEP-0059 §2.5: an empty `<before/>` asks for the last page. */
  lastPage: boolean;
  index?: number;
}

export interface RsmResult {
  first?: string;
  firstIndex?: number;
  last?: string;
  count?: number;
}

function badRequest(text: string): StanzaError {
  return new StanzaError('modify', 'bad-request', text);
}

const SET_CHILDREN = new Set(['max', 'after', 'before', 'index']);

/**
 * The longest UID a `<list/>` reply can hand out: a DynamoDB sort key's 1,024 bytes less the `c#`
 * of a collection's (a `<keys/>` UID, a key's `keyRef`, has no prefix: 1,024). A longer `<after/>`
 * or `<before/>` names no item, so no page follows it: XEP-0059 §2.6 answers a UID whose item is
 * gone (and does not give the next item) with `item-not-found`. As a key bound it would fail the
 * Query (internal-server-error before session 33).
 */
export const COLLECTION_UID_BYTES = 1022;

/**
 * The `<set/>` child of `parent`. XEP-0059 §2.1: the responding entity may return fewer items
 * than `<max/>` asks for, so a larger max is capped at `limits.max` instead of refused.
 */
export function decodeRsm(
  parent: Element,
  limits: { defaultMax: number; max: number },
  uidBytes = COLLECTION_UID_BYTES,
): RsmRequest {
  const set = parent.getChild('set', NS.rsm);
  if (set) {
    const seen = new Set<string>();
    for (const child of set.getChildElements()) {
      if (!SET_CHILDREN.has(child.name) || child.getNS() !== NS.rsm)
        throw badRequest(`unexpected <${child.name}/> in a request's set`);
      if (seen.has(child.name)) throw badRequest(`more than one <${child.name}/>`);
      seen.add(child.name);
    }
  }
  const page = decodePageRequest(parent, { defaultMax: limits.defaultMax, maxMax: limits.max });
  for (const uid of [page.after, page.before]) {
    if (uid !== undefined && Buffer.byteLength(uid, 'utf8') > uidBytes)
      throw new StanzaError('cancel', 'item-not-found', 'No such item');
  }
  return {
    present: page.rsm,
    max: page.max,
    after: page.after,
    before: page.before,
    lastPage: page.lastPage,
    index: page.index,
  };
}

/**
 * The reply's `<set/>`. XEP-0059 §3.2: "If there are no items in the page, then the <first/>
 * and <last/> elements MUST NOT be included".
 */
export function encodeRsm(result: RsmResult): Element {
  const set = encodePageReply(result);
  if (result.first === undefined && result.last !== undefined) {
    const count = set.getChild('count');
    if (count) set.remove(count);
    set.c('last').t(result.last);
    if (count) set.cnode(count);
  }
  return set;
}
