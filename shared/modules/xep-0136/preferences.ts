/**
 * XEP-0136 0.9 §3 Archiving Preferences: which Save Mode and OTR Mode apply to a contact, and
 * how a `<pref/>` set (or a 0.5 `<save/>` / `<record/>`) changes the stored preferences.
 */
import { StanzaError } from '../../errors.ts';
import type { Jid } from '../../jid.ts';
import { bareJid, fullJid } from '../../jid.ts';
import type { ArchivePrefs, Mode } from '../../store/archive.ts';
import type { ArchiveRequest, MethodType, MethodUse } from './decode.ts';

/**
 * The item stored for `jid`, if any: an own key only (a JID such as `constructor` must not read
 * what every JavaScript object inherits).
 */
export function itemOf(items: Record<string, Mode>, jid: string): Mode | undefined {
  return Object.hasOwn(items, jid) ? items[jid] : undefined;
}

/** The server's defaults (§3.2 "Server Returns Service Default Preferences"). */
export interface ServicePolicy {
  default: Mode;
  methods: Record<MethodType, MethodUse>;
  /** Whether the server keeps full stanzas (save='all'); §3.3 lets it refuse them. */
  allowSaveAll: boolean;
  /** Longest the server keeps an archived message, in seconds, whatever a mode asks (0 or unset: none). */
  maxExpire?: number;
}

/**
 * §3.2 'expire', "how many seconds after messages are archived that the server SHOULD delete
 * them", as the server applies it: a mode's own (0 and none mean forever), capped by the service's
 * longest (`maxExpire`), which also applies to a mode without one, and whatever the mode's save
 * (a manual `<store/>` under a mode that saves nothing is kept no longer). Undefined: forever.
 */
export function retention(mode: Pick<Mode, 'expire'>, maxExpire = 0): number | undefined {
  const asked = mode.expire === 0 ? undefined : mode.expire;
  if (maxExpire <= 0) return asked;
  return asked === undefined ? maxExpire : Math.min(asked, maxExpire);
}

export const SERVICE_POLICY: ServicePolicy = {
  default: { save: 'false', otr: 'allow' },
  methods: { auto: 'allow', local: 'allow', manual: 'allow' },
  allowSaveAll: true,
};

export interface EffectiveMode extends Mode {
  /** Which rule decided: an item's JID, the user's default, or the service's. */
  source: 'full' | 'bare' | 'domain' | 'default' | 'service';
}

/**
 * The mode for messages exchanged with `contact`: an item for the full JID, else for the bare
 * JID, else for the domain, else the user's default, else the service's.
 */
export function effectiveMode(
  prefs: ArchivePrefs,
  contact: Jid,
  policy: ServicePolicy = SERVICE_POLICY,
): EffectiveMode {
  const candidates: [EffectiveMode['source'], string][] = [
    ['full', fullJid(contact)],
    ['bare', bareJid(contact)],
    ['domain', contact.domain],
  ];
  for (const [source, jid] of candidates) {
    if (source === 'full' && !contact.resource) continue;
    if (source === 'bare' && !contact.local) continue;
    const mode = itemOf(prefs.items, jid);
    if (mode) return { ...mode, source };
  }
  if (prefs.default) return { ...prefs.default, source: 'default' };
  return { ...policy.default, source: 'service' };
}

/** The preferences after a `<pref/>`, `<save/>` or `<record/>` set (a pure merge; the caller stores it). */
export function applyPrefChange(
  prefs: ArchivePrefs,
  request: ArchiveRequest,
  policy: ServicePolicy = SERVICE_POLICY,
): ArchivePrefs {
  const next: ArchivePrefs = { ...prefs, items: { ...prefs.items }, methods: { ...prefs.methods } };
  switch (request.kind) {
    case 'pref-set':
      if (request.default) next.default = request.default;
      for (const { jid, mode } of request.items) next.items[jid] = mode;
      for (const { type, use } of request.methods) next.methods[type] = use;
      return next;
    case 'save-set': {
      // XEP-0136 0.5 §3.1: a boolean Save Mode. true keeps bodies (0.9's recommended 'body'),
      // false keeps nothing; the OTR Mode and expiry already stored are kept.
      const current = (jid?: string) => (jid ? itemOf(next.items, jid) : next.default) ?? policy.default;
      const save = (on: boolean): Mode['save'] => (on ? 'body' : 'false');
      if (request.default !== undefined) {
        const base = current();
        next.default = { ...base, save: save(request.default), otr: adjustOtr(base.otr, request.default) };
      }
      for (const item of request.items) {
        // A Save Mode the user sets for a contact off the record is the one to come back to when
        // the record is on again (not what the contact had before it went off).
        const { beforeOtr: _, ...base } = itemOf(next.items, item.jid) ?? current();
        next.items[item.jid] = { ...base, save: save(item.save), otr: adjustOtr(base.otr, item.save) };
      }
      return next;
    }
    case 'record-set': {
      // XEP-0136 0.5 §3.2: otr='true' takes chats with the contact off the record: nothing saved.
      // The OTR state is one "that can be enabled and disabled by either user": turning it off
      // gives back the Save Mode (and expiry) the contact had before, or the default.
      const item = itemOf(next.items, request.jid);
      if (request.otr) {
        if (item?.otr === 'require' && item.save === 'false') return next;
        const { beforeOtr: _, ...kept } = item ?? ({} as Mode);
        next.items[request.jid] = { save: 'false', otr: 'require', beforeOtr: item ? kept : 'default' };
        return next;
      }
      if (item?.beforeOtr === 'default') delete next.items[request.jid];
      else if (item?.beforeOtr) next.items[request.jid] = item.beforeOtr;
      else {
        const base = item ?? next.default ?? policy.default;
        next.items[request.jid] = { ...base, otr: base.otr === 'require' ? 'allow' : base.otr };
      }
      return next;
    }
    default:
      return next;
  }
}

/** 0.9 §3.2 keeps otr='require' only with save='false': saving again relaxes it to 'allow'. */
function adjustOtr(otr: Mode['otr'], saving: boolean): Mode['otr'] {
  return saving && otr === 'require' ? 'allow' : otr;
}

/**
 * §3.3: "The server MAY be configured to return a <feature-not-implemented/> error … If it does
 * not allow the saving of full message stanza content, and the client set the value of the
 * 'save' attribute to 'all'". True when the change asks for what the policy refuses.
 */
export function asksForRefusedSaveAll(
  request: ArchiveRequest,
  policy: ServicePolicy = SERVICE_POLICY,
): boolean {
  if (policy.allowSaveAll || request.kind !== 'pref-set') return false;
  return request.default?.save === 'all' || request.items.some((i) => i.mode.save === 'all');
}

/**
 * §7.3: "The server MUST return a <feature-not-implemented/> error … If the client is trying to
 * enable encryption, but the server does not support encryption", and when enabling
 * auto-archiving while the user has the 'all' Save Mode somewhere and the server refuses it.
 */
export function checkAutoRequest(
  request: { save: boolean; encrypt: boolean },
  prefs: ArchivePrefs,
  policy: ServicePolicy = SERVICE_POLICY,
): void {
  if (!request.save) return;
  if (request.encrypt)
    throw new StanzaError(
      'cancel',
      'feature-not-implemented',
      'the server does not encrypt archived collections',
    );
  const modes = [prefs.default, ...Object.values(prefs.items)];
  if (!policy.allowSaveAll && modes.some((m) => m?.save === 'all'))
    throw new StanzaError(
      'cancel',
      'feature-not-implemented',
      "the server does not keep full stanzas (save='all')",
    );
}
