/**
 * XEP-0059 Result Set Management (v1.0), `http://jabber.org/protocol/rsm`: decoding a request's
 * `<set/>` into a page request, and encoding the `<set/>` of a reply. Shared by every paged
 * answer (XEP-0013 headers, XEP-0136 lists and collections).
 */
import { Element } from 'ltx';
import { StanzaError } from '../errors.ts';
import { NS } from '../xml/namespaces.ts';

export interface PageRequest {
  /** Whether the request carried `<set/>` (its reply then always carries `<set/>`). */
  rsm: boolean;
  /** Items wanted, already capped at the handler's maximum. */
  max: number;
  /** Items strictly after this UID (forwards). */
  after?: string;
  /** Items strictly before this UID (backwards). */
  before?: string;
  /** XEP-0059 §2.5: an empty `<before/>` asks for the last page. */
  lastPage: boolean;
  /** XEP-0059 §2.6: the index of the first item wanted (page jumping). */
  index?: number;
}

export interface PageLimits {
  /** Page size when the request does not say. */
  defaultMax: number;
  /** XEP-0059 §2.1: "the responding entity MAY return fewer items than requested". */
  maxMax: number;
}

function badRequest(text: string): StanzaError {
  return new StanzaError('modify', 'bad-request', text);
}

function childText(set: Element, name: string): string | undefined {
  const child = set.getChild(name, NS.rsm);
  return child ? child.getText().trim() : undefined;
}

/** Decodes the `<set/>` child of `parent` (absent: the first page of the default size). */
export function decodePageRequest(parent: Element, limits: PageLimits): PageRequest {
  const set = parent.getChild('set', NS.rsm);
  if (!set) return { rsm: false, max: limits.defaultMax, lastPage: false };
  const maxText = childText(set, 'max');
  if (maxText !== undefined && !/^\d{1,9}$/.test(maxText)) throw badRequest('max is a non-negative integer');
  const max = maxText === undefined ? limits.defaultMax : Math.min(Number(maxText), limits.maxMax);
  const after = childText(set, 'after');
  const before = childText(set, 'before');
  const index = childText(set, 'index');
  if (after !== undefined && before !== undefined) throw badRequest('use after or before, not both');
  if (after === '') throw badRequest('after needs the UID of an item');
  if (index !== undefined) {
    if (!/^\d{1,9}$/.test(index)) throw badRequest('index is a non-negative integer');
    if (after !== undefined || before !== undefined) throw badRequest('index excludes after and before');
  }
  return {
    rsm: true,
    max,
    ...(after !== undefined ? { after } : {}),
    ...(before !== undefined && before !== '' ? { before } : {}),
    lastPage: before === '',
    ...(index !== undefined ? { index: Number(index) } : {}),
  };
}

export interface PageReply {
  /** UIDs of the page's first and last items (none when the page is empty). */
  first?: string;
  last?: string;
  /** Position of the first item in the full set, when known. */
  firstIndex?: number;
  /** Size of the full set, when known (XEP-0059 §2.1: it may be approximate). */
  count?: number;
}

/** XEP-0059 §2.2: "If there are no items in the page, then the <first/> and <last/> elements MUST NOT be included." */
export function encodePageReply(reply: PageReply): Element {
  const set = new Element('set', { xmlns: NS.rsm });
  if (reply.first !== undefined && reply.last !== undefined) {
    set.c('first', reply.firstIndex === undefined ? {} : { index: String(reply.firstIndex) }).t(reply.first);
    set.c('last').t(reply.last);
  }
  if (reply.count !== undefined) set.c('count').t(String(reply.count));
  return set;
}
