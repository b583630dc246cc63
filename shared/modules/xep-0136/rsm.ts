/**
 * XEP-0059 Result Set Management (`http://jabber.org/protocol/rsm`) for the archive's requests:
 * `<set/>` in, `<set/>` out. Generic; it moves to the core once a second module pages.
 */
import { Element } from 'ltx';
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
 * The `<set/>` child of `parent`. XEP-0059 §2.1: the responding entity may return fewer items
 * than `<max/>` asks for, so a larger max is capped at `limits.max` instead of refused.
 */
export function decodeRsm(parent: Element, limits: { defaultMax: number; max: number }): RsmRequest {
  const set = parent.getChild('set', NS.rsm);
  if (!set) return { present: false, max: limits.defaultMax, lastPage: false };
  const text: Record<string, string> = {};
  for (const child of set.getChildElements()) {
    if (!SET_CHILDREN.has(child.name)) throw badRequest(`unexpected <${child.name}/> in a request's set`);
    if (child.name in text) throw badRequest(`more than one <${child.name}/>`);
    text[child.name] = child.getText().trim();
  }
  const { max, after, before, index } = text;
  if (max !== undefined && !/^\d{1,9}$/.test(max)) throw badRequest('max is a non-negative integer');
  if (index !== undefined && !/^\d{1,9}$/.test(index)) throw badRequest('index is a non-negative integer');
  if (after !== undefined && before !== undefined) throw badRequest('after and before exclude each other');
  if (index !== undefined && (after !== undefined || before !== undefined))
    throw badRequest('index excludes after and before');
  if (after === '') throw badRequest('after needs the UID of an item');
  return {
    present: true,
    max: max === undefined ? limits.defaultMax : Math.min(Number(max), limits.max),
    after,
    before: before === '' ? undefined : before,
    lastPage: before === '',
    index: index === undefined ? undefined : Number(index),
  };
}

/**
 * The reply's `<set/>`. XEP-0059 §3.2: "If there are no items in the page, then the <first/>
 * and <last/> elements MUST NOT be included".
 */
export function encodeRsm(result: RsmResult): Element {
  const set = new Element('set', { xmlns: NS.rsm });
  if (result.first !== undefined && result.last !== undefined) {
    set
      .c('first', result.firstIndex === undefined ? {} : { index: String(result.firstIndex) })
      .t(result.first);
    set.c('last').t(result.last);
  } else if (result.last !== undefined) {
    set.c('last').t(result.last);
  }
  if (result.count !== undefined) set.c('count').t(String(result.count));
  return set;
}
