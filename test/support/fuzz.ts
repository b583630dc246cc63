/**
 * Stanzas a hostile or buggy client might send, drawn from a seeded generator: the namespaces
 * and elements Nimbus serves (RFC 6120/6121, XEP-0013, XEP-0030, XEP-0059, XEP-0136 in both
 * drafts, XEP-0198, XEP-0199) and some it does not, with attribute values chosen to break
 * parsers (out-of-range numbers, malformed dates and JIDs, long and non-ASCII text).
 * Well-formed XML only: what the framing layer refuses (RFC 6120 §4.9.3.13 `not-well-formed`)
 * is the adversarial suite's business. Kept apart from clients and servers so that the same
 * seed always draws the same stanzas (test/e2e/fuzz.test.ts).
 */

import { escapeXml } from '../../infra/local/offline-seed.ts';

/** The fault suite's seedable generator (mulberry32), so that a seed always draws the same. */
export { mulberry32 as seeded } from '../../infra/local/faults.ts';

export interface FuzzContext {
  domain: string;
  /** The bare JIDs of the accounts taking part (the sender's own among them). */
  users: readonly string[];
  /** The resources those accounts bind. */
  resources: readonly string[];
  /**
   * Values seen in the server's answers, by the attribute they fill (`node`, `start`, `rsm` for
   * XEP-0059 ids): requests then name things that exist, the sender's own or someone else's.
   */
  harvest?: ReadonlyMap<string, readonly string[]>;
}

export interface FuzzStanza {
  /** The frame's text. */
  xml: string;
  /** An iq get or set: exactly one response with this id must come back (RFC 6120 §8.2.3). */
  expectsResponse?: string;
  /** What it is, for a failure's message. */
  label: string;
  /** Its id, if it has one, and the JID it is addressed to, if any (as sent, unescaped). */
  id?: string;
  to?: string;
}

export const NS = {
  roster: 'jabber:iq:roster',
  archive: 'http://jabber.org/protocol/archive',
  offline: 'http://jabber.org/protocol/offline',
  discoInfo: 'http://jabber.org/protocol/disco#info',
  discoItems: 'http://jabber.org/protocol/disco#items',
  version: 'jabber:iq:version',
  ping: 'urn:xmpp:ping',
  rsm: 'http://jabber.org/protocol/rsm',
  sm3: 'urn:xmpp:sm:3',
  sm1: 'urn:xmpp:sm:1',
  delay: 'urn:xmpp:delay',
  session: 'urn:ietf:params:xml:ns:xmpp-session',
  bind: 'urn:ietf:params:xml:ns:xmpp-bind',
  stanzas: 'urn:ietf:params:xml:ns:xmpp-stanzas',
} as const;

/** Namespaces of requests Nimbus does not serve: each must still get an answer. */
const UNSERVED = [
  'jabber:iq:private',
  'vcard-temp',
  'urn:xmpp:blocking',
  'urn:xmpp:mam:2',
  'jabber:iq:last',
  'x:unknown',
];

function toAttr(to: string | undefined): string {
  return to === undefined ? '' : ` to='${escapeXml(to)}'`;
}

export class StanzaFuzzer {
  private serial = 0;

  constructor(
    private readonly random: () => number,
    private readonly context: FuzzContext,
    private readonly idPrefix: string,
  ) {}

  private pick<T>(options: readonly T[]): T {
    return options[Math.floor(this.random() * options.length)] as T;
  }

  private chance(p: number): boolean {
    return this.random() < p;
  }

  private int(max: number): number {
    return Math.floor(this.random() * max);
  }

  /** An attribute value meant to trip whatever reads it. */
  private value(): string {
    return this.pick([
      '',
      ' ',
      '0',
      '1',
      '-1',
      '2147483648',
      '99999999999999999999999',
      '1e309',
      'NaN',
      '0x10',
      '3.5',
      'true',
      'false',
      'abc',
      '1970-01-01T00:00:00Z',
      '2026-02-30T25:61:61Z',
      '9999-12-31T23:59:59Z',
      '0000-01-01T00:00:00Z',
      '2026-12-03',
      'x'.repeat(3000),
      'ünïcødé ✓ 𝄞',
      '\u200b',
      this.jid(),
    ]);
  }

  /**
   * A value of the kind the attribute takes, mostly well-formed so that the request reaches the
   * code behind its parser: a date near now or one harvested from an answer, a count, one of the
   * attribute's words; now and then a hostile value instead.
   */
  private typed(name: string): string {
    if (this.chance(0.12)) return this.value();
    const harvested = this.context.harvest?.get(name);
    if (harvested && harvested.length > 0 && this.chance(0.5)) return this.pick(harvested);
    switch (name) {
      case 'with':
      case 'jid':
      case 'from':
        // Mostly a well-formed JID, so that the request gets past its checks to the archive.
        return this.chance(0.7) ? this.wellFormedJid() : this.jid();
      case 'start':
      case 'end':
      case 'utc':
      case 'stamp':
        return new Date(
          Date.UTC(2026, 11, 3, 0, 0, 0) + (this.int(200) - 100) * 3_600_000 + this.int(3) * 1000,
        )
          .toISOString()
          .replace(/\.000Z$/, this.chance(0.5) ? 'Z' : '.000Z');
      case 'secs':
      case 'expire':
      case 'maxitems':
      case 'timeout':
      case 'max':
      case 'index':
        return String(this.pick([0, 1, 2, 3, 5, 10, 100, 1000, 86400]));
      case 'save':
        return this.pick(['true', 'false', 'body', 'message', 'stream']);
      case 'otr':
        return this.pick(['approve', 'concede', 'forbid', 'oppose', 'prefer', 'require', 'true', 'false']);
      case 'use':
        return this.pick(['concede', 'forbid', 'prefer']);
      case 'type':
        return this.pick(['auto', 'local', 'manual']);
      case 'scope':
        return this.pick(['global', 'session']);
      case 'subscription':
        return this.pick(['none', 'to', 'from', 'both', 'remove']);
      case 'ask':
        return 'subscribe';
      case 'action':
        return this.pick(['view', 'remove']);
      case 'exactmatch':
      case 'open':
      case 'crypt':
      case 'encrypt':
      case 'unset':
      case 'approved':
        return this.pick(['true', 'false', '1', '0']);
      default:
        return this.pick(['a', 'thread-1', 'node-1', 'x']);
    }
  }

  /** A well-formed JID: an account's bare or full JID, or one of another domain. */
  private wellFormedJid(): string {
    const { users, resources } = this.context;
    const user = this.pick(users);
    return this.pick([
      user,
      `${user}/${this.pick(resources)}`,
      'juliet@capulet.example/chamber',
      'romeo@montague.example',
    ]);
  }

  /** A JID, well-formed or not, local or not, existing or not. */
  jid(): string {
    const { domain, users, resources } = this.context;
    const user = this.pick(users);
    return this.pick([
      user,
      user,
      `${user}/${this.pick(resources)}`,
      `${user}/${this.pick(resources)}`,
      `${user}/nobody-here`,
      domain,
      `${domain}/res`,
      `nosuchuser@${domain}`,
      `nosuchuser@${domain}/x`,
      'someone@remote.example',
      'remote.example',
      '@',
      `a@b@${domain}`,
      `/${domain}`,
      `${user}/`,
      `@${domain}`,
      `${'l'.repeat(1100)}@${domain}`,
      `UPPER@${domain.toUpperCase()}`,
      `ünï@${domain}`,
      `user name@${domain}`,
      '',
    ]);
  }

  /** Some of the attributes named, each once (a repeated attribute is not well-formed XML). */
  private attrs(names: readonly string[], p = 0.5, skip: readonly string[] = []): string {
    let out = '';
    for (const name of names) {
      if (skip.includes(name)) continue;
      if (this.chance(p)) out += ` ${name}='${escapeXml(this.typed(name))}'`;
    }
    return out;
  }

  private text(): string {
    return escapeXml(
      this.pick(['hi', '', ' ', 'x'.repeat(2000), '<b>not markup</b>', 'ünïcødé 𝄞', this.value()]),
    );
  }

  private rsm(always = false): string {
    if (!always && !this.chance(0.5)) return '';
    const parts: string[] = [];
    if (this.chance(0.7)) parts.push(`<max>${escapeXml(this.typed('max'))}</max>`);
    if (this.chance(0.3)) parts.push(`<after>${escapeXml(this.typed('rsm'))}</after>`);
    if (this.chance(0.3))
      parts.push(this.chance(0.3) ? '<before/>' : `<before>${escapeXml(this.typed('rsm'))}</before>`);
    if (this.chance(0.2)) parts.push(`<index>${escapeXml(this.typed('index'))}</index>`);
    return `<set xmlns='${NS.rsm}'>${parts.join('')}</set>`;
  }

  /** A child of some archive request: an item, a method, an entry, a key. */
  private archiveChild(): string {
    return this.pick([
      () => `<item${this.attrs(['jid', 'save', 'otr', 'expire', 'exactmatch'])}/>`,
      () => `<default${this.attrs(['save', 'otr', 'expire', 'unset'])}/>`,
      () => `<method${this.attrs(['type', 'use'])}/>`,
      () => `<auto${this.attrs(['save', 'scope', 'encrypt'])}/>`,
      () => `<to${this.attrs(['secs', 'utc', 'name', 'jid'])}><body>${this.text()}</body></to>`,
      () => `<from${this.attrs(['secs', 'utc', 'name', 'jid'])}><body>${this.text()}</body></from>`,
      () => `<note${this.attrs(['utc'])}>${this.text()}</note>`,
      () => `<EncryptedKey xmlns='http://www.w3.org/2001/04/xmlenc#'${this.attrs(['Id'])}/>`,
      () => `<session${this.attrs(['thread', 'save', 'otr', 'timeout'])}/>`,
      () => `<next${this.attrs(['with', 'start'])}/>`,
      () => `<previous${this.attrs(['with', 'start'])}/>`,
      () => `<x xmlns='jabber:x:data' type='submit'/>`,
      () => this.rsm(),
    ])();
  }

  /** Children the archive request takes (per the drafts), now and then a foreign one. */
  private archiveChildren(name: string): string {
    const kinds: Record<string, ReadonlyArray<() => string>> = {
      pref: [
        () => `<item${this.attrs(['jid', 'save', 'otr', 'expire', 'exactmatch'], 0.7)}/>`,
        () => `<default${this.attrs(['save', 'otr', 'expire', 'unset'], 0.7)}/>`,
        () => `<method${this.attrs(['type', 'use'], 0.9)}/>`,
        () => `<auto${this.attrs(['save', 'scope'], 0.8)}/>`,
      ],
      save: [
        () => `<item${this.attrs(['jid', 'save', 'otr', 'expire'], 0.7)}/>`,
        () => `<default${this.attrs(['save', 'otr', 'expire'], 0.7)}/>`,
      ],
      store: [
        () => `<to${this.attrs(['secs', 'utc', 'name', 'jid'], 0.4)}><body>${this.text()}</body></to>`,
        () => `<from${this.attrs(['secs', 'utc', 'name', 'jid'], 0.4)}><body>${this.text()}</body></from>`,
        () => `<note${this.attrs(['utc'], 0.5)}>${this.text()}</note>`,
        () => `<next${this.attrs(['with', 'start'], 0.8)}/>`,
        () => `<previous${this.attrs(['with', 'start'], 0.8)}/>`,
        () => `<EncryptedData xmlns='http://www.w3.org/2001/04/xmlenc#'/>`,
        () => `<EncryptedKey xmlns='http://www.w3.org/2001/04/xmlenc#'${this.attrs(['Id'], 0.8)}/>`,
      ],
      itemremove: [() => `<item${this.attrs(['jid', 'exactmatch'], 0.8)}/>`],
      sessionremove: [() => `<session${this.attrs(['thread'], 0.9)}/>`],
      keys: [() => `<EncryptedKey xmlns='http://www.w3.org/2001/04/xmlenc#'${this.attrs(['Id'], 0.8)}/>`],
      delete: [() => `<EncryptedKey xmlns='http://www.w3.org/2001/04/xmlenc#'${this.attrs(['Id'], 0.8)}/>`],
    };
    const own = kinds[name] ?? [];
    // A request that takes no children mostly gets none.
    if (own.length === 0 && this.chance(0.85)) return '';
    let out = '';
    const count = name === 'store' ? this.int(5) : this.int(3);
    for (let i = 0; i < count; i += 1) {
      out += own.length > 0 && this.chance(0.9) ? this.pick(own)() : this.archiveChild();
    }
    return out;
  }

  /** An archive request and the iq type it is served with (mostly; the other type now and then). */
  private archiveRequest(): { type: string; payload: string } {
    const [name, own, type] = this.pick([
      ['pref', [], 'get'],
      ['pref', [], 'set'],
      ['auto', ['save', 'scope'], 'set'],
      ['list', ['with', 'start', 'end', 'exactmatch', 'open'], 'get'],
      ['list', ['with', 'start', 'end', 'exactmatch', 'open'], 'get'],
      ['retrieve', ['with', 'start', 'maxitems'], 'get'],
      ['retrieve', ['with', 'start', 'maxitems'], 'get'],
      ['remove', ['with', 'start', 'end', 'exactmatch', 'open'], 'set'],
      ['save', [], 'get'],
      ['save', [], 'set'],
      ['store', ['with', 'start', 'thread', 'subject', 'crypt'], 'set'],
      ['store', ['with', 'start', 'thread', 'subject', 'crypt'], 'set'],
      ['keys', ['with', 'start'], 'get'],
      ['delete', ['with', 'start'], 'set'],
      ['modified', ['start'], 'get'],
      ['otr', ['jid'], 'get'],
      ['record', ['jid', 'otr'], 'set'],
      ['itemremove', [], 'set'],
      ['sessionremove', [], 'set'],
    ] as const);
    const others = [
      'with',
      'start',
      'end',
      'exactmatch',
      'open',
      'save',
      'otr',
      'version',
      'maxitems',
      'expire',
    ];
    const attrs = this.attrs(own, 0.85) + this.attrs(others, 0.05, own);
    const paged =
      ['list', 'retrieve', 'keys', 'modified'].includes(name) && this.chance(0.7) ? this.rsm(true) : '';
    // A get carries no children but its <set/> (mostly).
    const children = type === 'set' || this.chance(0.1) ? this.archiveChildren(name) : '';
    const payload = `<${name} xmlns='${NS.archive}'${attrs}>${children}${paged}</${name}>`;
    return { type: this.chance(0.9) ? type : type === 'get' ? 'set' : 'get', payload };
  }

  private rosterRequest(): { type: string; payload: string } {
    if (this.chance(0.35))
      return { type: 'get', payload: `<query xmlns='${NS.roster}'${this.attrs(['ver'], 0.3)}/>` };
    let items = '';
    // RFC 6121 §2.3.3: a roster set carries exactly one item (mostly so here).
    const count = this.chance(0.85) ? 1 : this.int(3);
    for (let i = 0; i < count; i += 1) {
      let groups = '';
      for (let g = this.int(3); g > 0; g -= 1) groups += `<group>${this.text()}</group>`;
      const subscription = this.chance(0.25)
        ? ` subscription='${this.pick(['remove', 'remove', 'both', 'none'])}'`
        : '';
      items += `<item jid='${escapeXml(this.jid())}'${subscription}${this.attrs(['name', 'ask', 'approved'], 0.3)}>${groups}</item>`;
    }
    return { type: 'set', payload: `<query xmlns='${NS.roster}'>${items}</query>` };
  }

  private offlineRequest(): { type: string; payload: string } {
    const node = () => escapeXml(this.typed('node'));
    return this.pick([
      () => ({ type: 'get', payload: `<query xmlns='${NS.discoInfo}' node='${NS.offline}'/>` }),
      () => ({ type: 'get', payload: `<query xmlns='${NS.discoItems}' node='${NS.offline}'/>` }),
      () => ({ type: 'get', payload: `<offline xmlns='${NS.offline}'><fetch/></offline>` }),
      () => ({ type: 'set', payload: `<offline xmlns='${NS.offline}'><purge/></offline>` }),
      () => ({
        type: 'get',
        payload: `<offline xmlns='${NS.offline}'><item action='view' node='${node()}'/></offline>`,
      }),
      () => ({
        type: 'set',
        payload: `<offline xmlns='${NS.offline}'><item action='remove' node='${node()}'/></offline>`,
      }),
      () => {
        let items = '';
        for (let i = this.int(3); i > 0; i -= 1)
          items += `<item${this.attrs(['action', 'node', 'jid'], 0.6)}/>`;
        const extra = this.pick(['', '<fetch/>', '<purge/>', '<fetch/><purge/>']);
        return {
          type: this.pick(['get', 'set']),
          payload: `<offline xmlns='${NS.offline}'>${items}${extra}</offline>`,
        };
      },
    ])();
  }

  private request(): { type: string; payload: string } {
    const any = () => this.pick(['get', 'set']);
    return this.pick([
      () => this.archiveRequest(),
      () => this.archiveRequest(),
      () => this.archiveRequest(),
      () => this.archiveRequest(),
      () => this.rosterRequest(),
      () => this.rosterRequest(),
      () => this.offlineRequest(),
      () => this.offlineRequest(),
      () => ({ type: any(), payload: `<query xmlns='${NS.discoInfo}'${this.attrs(['node'])}/>` }),
      () => ({
        type: any(),
        payload: `<query xmlns='${NS.discoItems}'${this.attrs(['node'])}>${this.rsm()}</query>`,
      }),
      () => ({ type: any(), payload: `<query xmlns='${NS.version}'/>` }),
      () => ({ type: any(), payload: `<ping xmlns='${NS.ping}'/>` }),
      () => ({ type: any(), payload: `<session xmlns='${NS.session}'/>` }),
      () => ({ type: any(), payload: `<bind xmlns='${NS.bind}'><resource>${this.text()}</resource></bind>` }),
      () => ({ type: any(), payload: `<query xmlns='${this.pick(UNSERVED)}'/>` }),
      () => ({ type: any(), payload: '' }),
      () => ({ type: any(), payload: `<a xmlns='x:one'/><b xmlns='x:two'/>` }),
    ])();
  }

  /** Mostly the sender's own account (no 'to'), where the requests are served. */
  private target(): string | undefined {
    return this.chance(0.6) ? undefined : this.jid();
  }

  private nextId(): string {
    this.serial += 1;
    return `${this.idPrefix}-${this.serial}`;
  }

  private iq(): FuzzStanza {
    const request = this.request();
    // Now and then a response, or a type iq does not have, with the same payload.
    const type = this.chance(0.85) ? request.type : this.pick(['result', 'error', 'bogus']);
    const id = this.nextId();
    const payload = request.payload;
    const error =
      type === 'error' ? `<error type='cancel'><item-not-found xmlns='${NS.stanzas}'/></error>` : '';
    const to = this.target();
    const xml = `<iq type='${type}' id='${id}'${toAttr(to)}>${payload}${error}</iq>`;
    const answered = type === 'get' || type === 'set';
    const what = /^<([a-zA-Z]+) xmlns='([^']*)'/.exec(payload);
    const label = `iq ${type} ${what ? `${what[2]?.split(/[/:#]/).pop()}:${what[1]}` : 'empty'}${to ? ' to' : ''}`;
    return {
      xml,
      label,
      id,
      ...(to !== undefined ? { to } : {}),
      ...(answered ? { expectsResponse: id } : {}),
    };
  }

  private message(): FuzzStanza {
    const type = this.pick(['chat', 'chat', 'normal', 'headline', 'groupchat', 'error', 'bogus', '']);
    const typeAttr = type ? ` type='${type}'` : '';
    let children = this.chance(0.8) ? `<body>${this.text()}</body>` : '';
    if (this.chance(0.3)) children += `<thread>${this.text()}</thread>`;
    if (this.chance(0.2)) children += `<subject>${this.text()}</subject>`;
    if (this.chance(0.15)) children += `<delay xmlns='${NS.delay}'${this.attrs(['stamp', 'from'], 0.8)}/>`;
    if (this.chance(0.1))
      children += `<offline xmlns='${NS.offline}'><item node='${escapeXml(this.value())}'/></offline>`;
    if (this.chance(0.1)) children += `<no-store xmlns='urn:xmpp:hints'/>`;
    if (this.chance(0.1)) children += `<record xmlns='${NS.archive}'${this.attrs(['otr'], 1)}/>`;
    if (this.chance(0.1)) children += `<request xmlns='urn:xmpp:receipts'/>`;
    if (type === 'error')
      children += `<error type='cancel'><service-unavailable xmlns='${NS.stanzas}'/></error>`;
    const id = this.chance(0.8) ? this.nextId() : undefined;
    const to = this.target();
    return {
      xml: `<message${typeAttr}${id ? ` id='${id}'` : ''}${toAttr(to)}>${children}</message>`,
      label: `message ${type}`,
      ...(id ? { id } : {}),
      ...(to !== undefined ? { to } : {}),
    };
  }

  private presence(): FuzzStanza {
    const type = this.pick([
      '',
      '',
      'unavailable',
      'subscribe',
      'subscribe',
      'subscribed',
      'subscribed',
      'unsubscribe',
      'unsubscribed',
      'probe',
      'error',
      'bogus',
    ]);
    const typeAttr = type ? ` type='${type}'` : '';
    let children = '';
    if (this.chance(0.4))
      children += `<show>${escapeXml(this.pick(['away', 'chat', 'dnd', 'xa', 'bogus', '']))}</show>`;
    if (this.chance(0.4)) children += `<status>${this.text()}</status>`;
    if (this.chance(0.3))
      children += `<priority>${escapeXml(this.pick(['0', '-128', '127', '128', '-129', 'x', '', '5']))}</priority>`;
    if (this.chance(0.1)) children += `<delay xmlns='${NS.delay}' stamp='${escapeXml(this.value())}'/>`;
    if (this.chance(0.1))
      children += `<c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='n' ver='${escapeXml(this.value())}'/>`;
    if (type === 'error')
      children += `<error type='cancel'><remote-server-not-found xmlns='${NS.stanzas}'/></error>`;
    // A subscription stanza mostly to one of the accounts (RFC 6121 §3: to a bare JID), so that
    // subscriptions come and go between them; other presence broadcast or directed anywhere.
    const subscription = ['subscribe', 'subscribed', 'unsubscribe', 'unsubscribed'].includes(type);
    const target = subscription
      ? this.chance(0.8)
        ? this.pick(this.context.users)
        : this.jid()
      : this.chance(0.5)
        ? undefined
        : this.jid();
    const to = target === undefined ? '' : ` to='${escapeXml(target)}'`;
    return {
      xml: `<presence${typeAttr}${to}>${children}</presence>`,
      label: `presence ${type || 'available'}`,
    };
  }

  /** XEP-0198 elements, and a top-level element nobody serves. */
  private nonza(): FuzzStanza {
    const xml = this.pick([
      `<r xmlns='${NS.sm3}'/>`,
      `<a xmlns='${NS.sm3}' h='${escapeXml(this.pick(['0', '1', '-1', 'x', '4294967295', '4294967296', '']))}'/>`,
      `<enable xmlns='${NS.sm3}' resume='true'/>`,
      `<enable xmlns='${NS.sm1}'/>`,
      `<resume xmlns='${NS.sm3}' h='0' previd='${escapeXml(this.value())}'/>`,
      `<r xmlns='${NS.sm1}'/>`,
      `<unknown xmlns='x:top-level'/>`,
    ]);
    return { xml, label: 'nonza' };
  }

  next(): FuzzStanza {
    const roll = this.random();
    if (roll < 0.45) return this.iq();
    if (roll < 0.72) return this.message();
    if (roll < 0.95) return this.presence();
    return this.nonza();
  }
}
