/**
 * XEP-0082 (Jabber Date and Time Profiles) DateTime as XEP-0136 0.9 uses it: collection
 * `start`/`end`, note and message `utc`, the `<modified/>` cursor. XEP-0136 §5.2: "the UTC start
 * time of the conversation thread, which MUST be UTC and adhere to the DateTime format specified
 * in XEP-0082". Only `Z` (or a zero offset) is accepted; anything else is `bad-request`.
 */
import { StanzaError } from '../../errors.ts';

/** The last millisecond an XEP-0082 DateTime (four-digit years) can name: 9999-12-31T23:59:59.999Z. */
export const LAST_DATETIME_MS = 253_402_300_799_999;

/** A parsed DateTime: ms since the epoch, plus the fraction digits beyond the millisecond. */
export interface DateTimeValue {
  ms: number;
  /** Digits of the second's fraction after the third (XEP-0082 allows any number). */
  subMillisecond: string;
}

// XEP-0082 §3.2: CCYY-MM-DDThh:mm:ss[.sss]TZD
const DATE_TIME = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})$/;

/** Parses a DateTime attribute; `what` names it in the error text. */
export function parseDateTime(text: string, what: string): DateTimeValue {
  const match = DATE_TIME.exec(text.trim());
  if (!match) throw new StanzaError('modify', 'bad-request', `${what} is not an XEP-0082 DateTime`);
  const [, year, month, day, hour, minute, second, fraction = '', zone] = match;
  if (zone !== 'Z' && zone !== '+00:00' && zone !== '-00:00')
    throw new StanzaError('modify', 'bad-request', `${what} must be UTC`);
  const [y, mo, d, h, mi, s] = [year, month, day, hour, minute, second].map(Number) as number[];
  const date = new Date(0);
  // setUTCFullYear, not Date.UTC: Date.UTC maps the years 0–99 to 1900–1999.
  date.setUTCFullYear(y as number, (mo as number) - 1, d);
  date.setUTCHours(h as number, mi, s, Number(fraction.padEnd(3, '0').slice(0, 3)));
  if (
    date.getUTCFullYear() !== y ||
    date.getUTCMonth() !== (mo as number) - 1 ||
    date.getUTCDate() !== d ||
    date.getUTCHours() !== h ||
    date.getUTCMinutes() !== mi ||
    date.getUTCSeconds() !== s
  ) {
    throw new StanzaError('modify', 'bad-request', `${what} is not a valid date and time`);
  }
  return { ms: date.getTime(), subMillisecond: fraction.slice(3).replace(/0+$/, '') };
}

/** `1469-07-21T02:56:15Z`, with milliseconds only when there are some. */
export function formatDateTime(ms: number): string {
  const iso = new Date(ms).toISOString();
  return iso.endsWith('.000Z') ? `${iso.slice(0, -5)}Z` : iso;
}
