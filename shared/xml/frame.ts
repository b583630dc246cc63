/**
 * RFC 7395 framing: every WebSocket message carries exactly one complete XML element.
 * This module turns a frame into an ltx element, refusing what RFC 6120 §11.1 forbids.
 */
import { Element } from 'ltx';
import SaxLtx from 'ltx/src/parsers/ltx.js';
import { StreamError } from '../errors.ts';

// RFC 6120 §11.1: "comments, processing instructions, internal or external DTD subsets,
// internal or external entity references (with the exception of the predefined entities)"
// MUST NOT appear. They are refused before parsing, so nothing is ever expanded.
const RESTRICTED_MARKUP = /<\?|<!(?!\[CDATA\[)/;
const ENTITY_REFERENCE = /&([^;&\s]*);/g;
const PREDEFINED_ENTITY = /^(lt|gt|amp|quot|apos|#[0-9]+|#x[0-9a-fA-F]+)$/;

function refuseRestrictedXml(frame: string): void {
  if (RESTRICTED_MARKUP.test(stripCdata(frame))) {
    throw new StreamError('restricted-xml', 'Comments, processing instructions and DTDs are not allowed');
  }
  for (const match of stripCdata(frame).matchAll(ENTITY_REFERENCE)) {
    if (!PREDEFINED_ENTITY.test(match[1] ?? '')) {
      throw new StreamError('restricted-xml', 'Only the predefined XML entities are allowed');
    }
  }
}

function stripCdata(frame: string): string {
  return frame.includes('<![CDATA[') ? frame.replace(/<!\[CDATA\[[\s\S]*?\]\]>/g, '') : frame;
}

/** Parses one frame into one element; any other shape is `not-well-formed`. */
export function parseFrame(frame: string, maxBytes: number): Element {
  if (Buffer.byteLength(frame, 'utf8') > maxBytes) {
    throw new StreamError('policy-violation', `Stanza larger than ${maxBytes} bytes`);
  }
  refuseRestrictedXml(frame);

  const parser = new SaxLtx();
  let root: Element | undefined;
  let current: Element | undefined;
  let problem: string | undefined;
  const fail = (reason: string) => {
    problem ??= reason;
  };

  parser.on('startElement', (name: string, attrs: Record<string, string>) => {
    if (root && !current) return fail('more than one element in a frame');
    const child = new Element(name, attrs);
    if (current) current.cnode(child);
    else root = child;
    current = child;
  });
  parser.on('endElement', (name: string) => {
    if (!current || current.name !== name) return fail(`unexpected end tag </${name}>`);
    current = current.parent ?? undefined;
  });
  parser.on('text', (text: string) => {
    if (current) current.t(text);
    else if (text.trim() !== '') fail('text outside the element');
  });
  parser.on('error', (error: Error) => fail(error.message));

  try {
    parser.write(frame);
    parser.end();
  } catch (error) {
    fail((error as Error).message);
  }
  if (problem) throw new StreamError('not-well-formed', `Not well-formed: ${problem}`);
  if (!root || current) throw new StreamError('not-well-formed', 'A frame must hold one complete element');
  return root;
}
