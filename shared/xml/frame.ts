/**
 * RFC 7395 framing: every WebSocket message carries exactly one complete XML element.
 * This module turns a frame into an ltx element, refusing what RFC 6120 §11.1 forbids.
 *
 * The tokenizer is saxes, a strict, namespace-aware XML 1.0 parser: characters outside the
 * XML Char production, duplicate attributes, `<` in attribute values, stray `&`, unbound
 * prefixes and mismatched tags are all errors, not guesses. Prefixed elements are rewritten
 * to their local name with a default `xmlns`, so `<p:ping xmlns:p='urn:xmpp:ping'/>` and
 * `<ping xmlns='urn:xmpp:ping'/>` are dispatched alike.
 */
import { Element } from 'ltx';
import { SaxesParser, type SaxesTagNS } from 'saxes';
import { StreamError } from '../errors.ts';
import { NS } from './namespaces.ts';

// RFC 6120 §11.1: "comments, processing instructions, internal or external DTD subsets,
// internal or external entity references (with the exception of the predefined entities)"
// MUST NOT appear. They are refused before parsing, so nothing is ever expanded.
const RESTRICTED_MARKUP = /<\?|<!(?!\[CDATA\[)/;
const ENTITY_REFERENCE = /&([^;&\s<]*);/g;
const PREDEFINED_ENTITY = /^(lt|gt|amp|quot|apos|#[0-9]+|#x[0-9a-fA-F]+)$/;

/** Deeper payloads are refused: nobody needs them, and serialising them recurses. */
export const MAX_DEPTH = 64;

/**
 * The frame without its CDATA sections, in one forward pass. (A lazy regular expression here was
 * quadratic on many `<![CDATA[` without `]]>`: 270 ms for a 72 KB frame, before login.) An
 * unterminated section ends the text: the parser refuses such a frame as not well-formed.
 */
export function outsideCdata(frame: string): string {
  let outside = '';
  let from = 0;
  for (;;) {
    const start = frame.indexOf('<![CDATA[', from);
    if (start === -1) return outside + frame.slice(from);
    outside += frame.slice(from, start);
    const end = frame.indexOf(']]>', start + 9);
    if (end === -1) return outside;
    from = end + 3;
  }
}

function refuseRestrictedXml(frame: string): void {
  const outside = outsideCdata(frame);
  if (RESTRICTED_MARKUP.test(outside)) {
    throw new StreamError('restricted-xml', 'Comments, processing instructions and DTDs are not allowed');
  }
  for (const match of outside.matchAll(ENTITY_REFERENCE)) {
    if (!PREDEFINED_ENTITY.test(match[1] ?? '')) {
      throw new StreamError('restricted-xml', 'Only the predefined XML entities are allowed');
    }
  }
}

/**
 * The element, unprefixed, in the namespace the parser resolved for it (`tag.uri`), given its
 * parent's namespace as rewritten (`inherited`). A prefixed element gets a default `xmlns` of its
 * namespace, which replaces any default it declared itself: its unprefixed children that were in
 * that replaced default (or in any namespace other than the one they now inherit) get it stated
 * explicitly, so that `<o:x xmlns:o='urn:outer' xmlns='urn:inner'><item/></o:x>` keeps `item`
 * in `urn:inner` (Namespaces in XML 1.0 §6.2), as it is routed on.
 */
function elementOf(tag: SaxesTagNS, inherited: string): Element {
  const attrs: Record<string, string> = {};
  for (const attribute of Object.values(tag.attributes)) attrs[attribute.name] = attribute.value;
  const uri = namespaceOf(tag);
  if (tag.prefix || uri !== inherited) attrs.xmlns = uri;
  return new Element(tag.prefix ? tag.local : tag.name, attrs);
}

/**
 * The namespace an element is taken in: no namespace is `jabber:client`, as a stanza without
 * `xmlns` is taken (RFC 7395 frames carry stanzas qualified by it). ltx cannot say "no
 * namespace" under a namespaced parent (it reads `xmlns=""` as unset and looks further up).
 */
function namespaceOf(tag: SaxesTagNS): string {
  return tag.uri === '' ? NS.client : tag.uri;
}

/** An XML declaration (XML 1.0 §2.8 XMLDecl), only at the very start of a document. */
const XML_DECLARATION =
  /^<\?xml\s+version\s*=\s*(["'])1\.[0-9]+\1(?:\s+encoding\s*=\s*(["'])([A-Za-z][A-Za-z0-9._-]*)\2)?(?:\s+standalone\s*=\s*(["'])(?:yes|no)\4)?\s*\?>/;

/**
 * RFC 7395 §3.3.3: each message is a standalone XML document; "The inclusion of XML
 * declarations, however, is NOT RECOMMENDED" — not forbidden (nor is it a processing
 * instruction, RFC 6120 §11.1): one at the start of a frame is taken off. WebSocket text is
 * UTF-8, so a declaration naming another encoding is RFC 6120 §4.9.3.22 unsupported-encoding.
 */
function withoutXmlDeclaration(frame: string): string {
  const declaration = XML_DECLARATION.exec(frame);
  if (!declaration) return frame;
  const encoding = declaration[3];
  if (encoding !== undefined && !/^utf-?8$/i.test(encoding)) {
    throw new StreamError('unsupported-encoding', 'WebSocket frames are UTF-8');
  }
  return frame.slice(declaration[0].length);
}

/** Parses one frame into one element; any other shape is a stream error. */
export function parseFrame(input: string, maxBytes: number): Element {
  if (Buffer.byteLength(input, 'utf8') > maxBytes) {
    throw new StreamError('policy-violation', `Stanza larger than ${maxBytes} bytes`);
  }
  const frame = withoutXmlDeclaration(input);
  refuseRestrictedXml(frame);

  const parser = new SaxesParser({ xmlns: true, position: false });
  let root: Element | undefined;
  let current: Element | undefined;
  let depth = 0;
  // The namespace of each open element, as its rewritten form states or inherits it.
  const namespaces: string[] = [];
  let problem: StreamError | undefined;
  // The first problem stops the parser: a frame already refused is not read further (8,000 levels
  // of nesting past MAX_DEPTH cost 760 ms when the parser went on to the end).
  const fail = (error: StreamError): never => {
    problem ??= error;
    throw error;
  };
  const restricted = () => fail(new StreamError('restricted-xml', 'Only elements and text are allowed'));

  parser.on('doctype', restricted);
  parser.on('comment', restricted);
  parser.on('processinginstruction', restricted);
  parser.on('xmldecl', restricted);
  parser.on('opentag', (tag) => {
    depth += 1;
    if (depth > MAX_DEPTH)
      return fail(new StreamError('policy-violation', `Elements nested deeper than ${MAX_DEPTH}`));
    if (root && !current) return fail(new StreamError('not-well-formed', 'More than one element in a frame'));
    const element = elementOf(tag, namespaces.at(-1) ?? NS.client);
    namespaces.push(namespaceOf(tag));
    if (current) current.cnode(element);
    else root = element;
    current = element;
  });
  parser.on('closetag', () => {
    depth -= 1;
    namespaces.pop();
    current = current?.parent ?? undefined;
  });
  const text = (value: string) => {
    if (current) current.t(value);
  };
  parser.on('text', text);
  parser.on('cdata', text);
  parser.on('error', (error) => {
    // RFC 6120 §4.9.3.2: an undeclared prefix has a condition of its own.
    if (/prefix/i.test(error.message) && /unbound|undefined|not defined/i.test(error.message)) {
      fail(new StreamError('bad-namespace-prefix', 'A namespace prefix is not declared'));
    } else {
      fail(new StreamError('not-well-formed', 'Not well-formed XML'));
    }
  });

  try {
    parser.write(frame);
    parser.close();
  } catch {
    throw problem ?? new StreamError('not-well-formed', 'Not well-formed XML');
  }
  if (problem) throw problem;
  if (!root || current) throw new StreamError('not-well-formed', 'A frame must hold one complete element');
  return root;
}
