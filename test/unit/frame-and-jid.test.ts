/**
 * RFC 7395 framing (one element per frame), RFC 6120 §11.1 restricted XML, and RFC 7622 JIDs.
 */
import { describe, expect, it } from 'vitest';
import { StanzaError, StreamError } from '../../shared/errors.ts';
import { bareJid, fullJid, parseJid } from '../../shared/jid.ts';
import { outsideCdata, parseFrame } from '../../shared/xml/frame.ts';

function streamCondition(frame: string, max = 65536): string | undefined {
  try {
    parseFrame(frame, max);
    return undefined;
  } catch (error) {
    if (error instanceof StreamError) return error.condition;
    throw error;
  }
}

describe('parseFrame', () => {
  it('parses one element with namespaces, entities and CDATA', () => {
    const el = parseFrame(
      `<message xmlns='jabber:client' to='a@b'><body>x &amp; &#65;<![CDATA[<y>]]></body></message>`,
      1000,
    );
    expect(el.name).toBe('message');
    expect(el.getChildText('body')).toBe('x & A<y>');
  });

  it.each([
    ['two elements', '<a/><b/>', 'not-well-formed'],
    ['a mismatched end tag', '<a></b>', 'not-well-formed'],
    ['an unclosed element', '<a><b/>', 'not-well-formed'],
    ['text outside the element', 'x<a/>', 'not-well-formed'],
    ['nothing', '', 'not-well-formed'],
    ['a DOCTYPE', '<!DOCTYPE a><a/>', 'restricted-xml'],
    ['a comment', '<a><!-- c --></a>', 'restricted-xml'],
    ['a processing instruction', '<?xml-stylesheet href="a"?><a/>', 'restricted-xml'],
    ['a processing instruction after the element starts', '<a><?xml version="1.0"?></a>', 'restricted-xml'],
    ['an XML declaration not at the start', ' <?xml version="1.0"?><a/>', 'restricted-xml'],
    ['a second XML declaration', '<?xml version="1.0"?><?xml version="1.0"?><a/>', 'restricted-xml'],
    [
      'an XML declaration of another encoding',
      "<?xml version='1.0' encoding='ISO-8859-1'?><a/>",
      'unsupported-encoding',
    ],
    ['an undeclared entity', '<a>&lol;</a>', 'restricted-xml'],
  ])('refuses %s', (_name, frame, condition) => {
    expect(streamCondition(frame)).toBe(condition);
  });

  it('takes an XML declaration at the start of a frame: RFC 7395 §3.3.3 "The inclusion of XML declarations, however, is NOT RECOMMENDED"', () => {
    const open = parseFrame(
      "<?xml version='1.0' encoding='UTF-8'?><open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='localhost' version='1.0'/>",
      1000,
    );
    expect(open.name).toBe('open');
    expect(open.attrs).toMatchObject({ to: 'localhost', version: '1.0' });
    expect(parseFrame('<?xml version="1.0" standalone="yes" ?><a/>', 1000).name).toBe('a');
  });

  it('refuses a frame over the stanza limit with policy-violation, counting UTF-8 bytes', () => {
    expect(streamCondition(`<a>${'é'.repeat(40)}</a>`, 80)).toBe('policy-violation');
    expect(streamCondition(`<a>${'e'.repeat(40)}</a>`, 80)).toBeUndefined();
  });

  it('does not mistake markup-like text inside CDATA for restricted XML', () => {
    expect(streamCondition('<a><![CDATA[<!-- not a comment --> <?pi?>]]></a>')).toBeUndefined();
  });

  it('keeps every element in its namespace when it unprefixes one (Namespaces in XML 1.0 §6.2)', () => {
    // "The scope of a default namespace declaration extends from the beginning of the start-tag
    // in which it appears to the end of the corresponding end-tag, excluding the scope of any
    // inner default namespace declarations": `item` is in urn:example:inner, though its parent
    // is in urn:example:outer by its prefix. Rewritten to `<x xmlns='urn:example:outer'>`, the
    // parent would otherwise pull `item` into its own namespace as the stanza is routed on.
    const message = parseFrame(
      "<message xmlns='jabber:client' to='alice@localhost/r'><o:x xmlns:o='urn:example:outer' xmlns='urn:example:inner'><item><deep/></item><o:y/></o:x></message>",
      1000,
    );
    const outer = message.getChild('x', 'urn:example:outer');
    expect(outer).toBeDefined();
    expect(outer?.getChild('item')?.getNS()).toBe('urn:example:inner');
    expect(outer?.getChild('item')?.getChild('deep')?.getNS()).toBe('urn:example:inner');
    expect(outer?.getChild('y')?.getNS()).toBe('urn:example:outer');
    // Serialised for the recipient, and parsed again, it says the same.
    const again = parseFrame(message.toString(), 1000).getChild('x', 'urn:example:outer');
    expect(again?.getChild('item')?.getNS()).toBe('urn:example:inner');
    expect(again?.getChild('y')?.getNS()).toBe('urn:example:outer');
    // A prefixed stanza and payload are dispatched as their unprefixed forms.
    const ping = parseFrame(
      "<c:iq xmlns:c='jabber:client' type='get' id='p'><p:ping xmlns:p='urn:xmpp:ping'/></c:iq>",
      1000,
    );
    expect(ping.name).toBe('iq');
    expect(ping.getNS()).toBe('jabber:client');
    expect(ping.getChild('ping', 'urn:xmpp:ping')).toBeDefined();
    // No namespace is jabber:client, as for a stanza without xmlns: never `xmlns=""`, which ltx
    // reads as unset (the server would see the body in jabber:client, a recipient in none).
    const prefixed = parseFrame("<c:message xmlns:c='jabber:client'><body>hi</body></c:message>", 1000);
    expect(prefixed.getChild('body', 'jabber:client')?.getText()).toBe('hi');
    expect(prefixed.toString()).not.toContain('xmlns=""');
    // Nothing is added where nothing changes.
    expect(
      parseFrame(
        "<message xmlns='jabber:client'><body>hi</body><x xmlns='urn:a'><y/></x></message>",
        1000,
      ).toString(),
    ).toBe('<message xmlns="jabber:client"><body>hi</body><x xmlns="urn:a"><y/></x></message>');
  });
});

describe('parseJid', () => {
  it('case-folds localpart and domain, keeps the resource, strips a trailing dot', () => {
    const jid = parseJid('Juliet@Capulet.Example./Balcony');
    expect(jid).toEqual({ local: 'juliet', domain: 'capulet.example', resource: 'Balcony' });
    expect(bareJid(jid)).toBe('juliet@capulet.example');
    expect(fullJid(jid)).toBe('juliet@capulet.example/Balcony');
  });

  it('takes IP literals, internationalized labels and underscores in the domain', () => {
    expect(parseJid('juliet@127.0.0.1').domain).toBe('127.0.0.1');
    expect(parseJid('juliet@[::1]/r').domain).toBe('[::1]');
    expect(parseJid('juliet@München.example').domain).toBe('münchen.example');
    expect(parseJid('juliet@xmpp_1.internal').domain).toBe('xmpp_1.internal');
  });

  it.each([
    ['an empty localpart', '@example.com'],
    ['an empty resource', 'a@example.com/'],
    ['a forbidden localpart character', 'a"b@example.com'],
    ['two @', 'a@b@example.com'],
    ['an empty domain', 'a@'],
    ['a localpart over 1023 bytes', `${'a'.repeat(1024)}@example.com`],
    ['a resource over 1023 bytes', `a@example.com/${'r'.repeat(1024)}`],
    ['a control character', 'a\u0001b@example.com'],
    // RFC 7622 §3.2: the domainpart is a domain name or an IP literal.
    ['a port in the domain', 'bob@localhost:5222'],
    ['an empty domain label', 'bob@capulet..example'],
    ['a domain of dots', 'bob@..'],
    ['punctuation in the domain', 'bob@capulet!example'],
  ])('refuses %s with jid-malformed', (_name, text) => {
    try {
      parseJid(text);
      expect.unreachable();
    } catch (error) {
      expect(error).toBeInstanceOf(StanzaError);
      expect((error as StanzaError).condition).toBe('jid-malformed');
    }
  });
});

describe('CDATA sections and restricted markup', () => {
  it('strips terminated CDATA sections, and an unterminated one to the end', () => {
    expect(outsideCdata('<a><![CDATA[<!-- x -->]]>b<![CDATA[c]]></a>')).toBe('<a>b</a>');
    expect(outsideCdata(`<a>${'<![CDATA['.repeat(3)}</a>`)).toBe('<a>');
    expect(outsideCdata('<a>plain</a>')).toBe('<a>plain</a>');
  });

  it('lets a comment inside CDATA through as text, and refuses one outside', () => {
    expect(
      parseFrame('<message><body><![CDATA[<!-- text -->]]></body></message>', 65536).getChildText('body'),
    ).toBe('<!-- text -->');
    expect(() => parseFrame('<message><!-- no --><body/></message>', 65536)).toThrow(
      expect.objectContaining({ condition: 'restricted-xml' }),
    );
  });

  it('refuses a frame of many unterminated CDATA openings as not well-formed', () => {
    const frame = `<message><body>${'<![CDATA['.repeat(7000)}</body></message>`;
    expect(() => parseFrame(frame, 65536)).toThrow(expect.objectContaining({ condition: 'not-well-formed' }));
  });
});
