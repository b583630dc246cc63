/**
 * JIDs (RFC 7622): parsing, validation and normalisation of addresses.
 *
 * Normalisation here is case-folding of localpart and domain plus NFC; the full PRECIS
 * profiles are not implemented (no dependency ships them well), so exotic scripts compare
 * as they were sent after NFC.
 */
import { StanzaError } from './errors.ts';

export interface Jid {
  local: string;
  domain: string;
  resource: string;
}

const MAX_PART_BYTES = 1023;
// RFC 7622 §3.3.1: the localpart MUST NOT contain " & ' / : < > @
const LOCALPART_FORBIDDEN = /["&'/:<>@\s]/;
// Controls (and DEL) are never valid in any part.
// biome-ignore lint/suspicious/noControlCharactersInRegex: the point is to refuse them
const CONTROL = /[\u0000-\u001f\u007f]/;

function bytes(part: string): number {
  return Buffer.byteLength(part, 'utf8');
}

function checkPart(part: string, what: string): void {
  if (bytes(part) > MAX_PART_BYTES)
    throw new StanzaError('modify', 'jid-malformed', `${what} over 1023 bytes`);
  if (CONTROL.test(part)) throw new StanzaError('modify', 'jid-malformed', `${what} has control characters`);
}

// ASCII that no domain label holds (RFC 7622 §3.2: a domainpart is an IP literal or a domain
// name, whose ASCII is letters, digits and hyphens; the underscore is let through, as resolvers
// do). Non-ASCII is an internationalized label's, compared after NFC (no IDNA here).
const DOMAIN_ASCII_FORBIDDEN = /[!-,:-@[-^`{-~]/;
// An IPv6 literal (RFC 7622 §3.2: "IP-literal", as in a URI).
const IPV6_LITERAL = /^\[[0-9a-f:.]+\]$/;

/**
 * RFC 7622 §3.2: a domain name or an IP literal. Refused: a port (`localhost:5222`), an empty
 * label (`a..b`), punctuation; accepted: IPv4, bracketed IPv6, internationalized labels.
 */
function validDomain(domain: string): boolean {
  if (IPV6_LITERAL.test(domain)) return true;
  return domain.split('.').every((label) => label !== '' && !DOMAIN_ASCII_FORBIDDEN.test(label));
}

/** Parses and normalises a JID; anything invalid is the stanza error `jid-malformed`. */
export function parseJid(text: string): Jid {
  const slash = text.indexOf('/');
  const bareText = slash === -1 ? text : text.slice(0, slash);
  const resource = slash === -1 ? '' : text.slice(slash + 1).normalize('NFC');
  const at = bareText.indexOf('@');
  const local = (at === -1 ? '' : bareText.slice(0, at)).normalize('NFC').toLowerCase();
  let domain = (at === -1 ? bareText : bareText.slice(at + 1)).normalize('NFC').toLowerCase();
  // RFC 7622 §3.2: a trailing dot on the domain is stripped before comparison.
  if (domain.endsWith('.')) domain = domain.slice(0, -1);

  if (at !== -1 && local === '') throw new StanzaError('modify', 'jid-malformed', 'Empty localpart');
  if (slash !== -1 && resource === '') throw new StanzaError('modify', 'jid-malformed', 'Empty resourcepart');
  if (domain === '' || /[\s@/]/.test(domain) || !validDomain(domain))
    throw new StanzaError('modify', 'jid-malformed', 'Invalid domainpart');
  if (LOCALPART_FORBIDDEN.test(local)) throw new StanzaError('modify', 'jid-malformed', 'Invalid localpart');
  checkPart(local, 'localpart');
  checkPart(domain, 'domainpart');
  checkPart(resource, 'resourcepart');
  return { local, domain, resource };
}

export function bareJid(jid: Jid): string {
  return jid.local ? `${jid.local}@${jid.domain}` : jid.domain;
}

export function fullJid(jid: Jid): string {
  return jid.resource ? `${bareJid(jid)}/${jid.resource}` : bareJid(jid);
}

/** Splits a normalised bare JID string (as stored) back into its parts. */
export function splitBare(bare: string): { local: string; domain: string } {
  const at = bare.indexOf('@');
  return { local: bare.slice(0, at), domain: bare.slice(at + 1) };
}

/** A bound session's address, from the stored bare JID and resource. */
export function fullJidOf(bare: string, resource: string): Jid {
  return { ...splitBare(bare), resource };
}
