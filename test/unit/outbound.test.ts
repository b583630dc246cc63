/**
 * The outbound port (docs/design.md "One outbound port") under the core's delivery path: what it is
 * handed is serialised with the content namespace on stanzas (RFC 7395 §3.3.3), counted, and
 * a 410 Gone comes back as 'gone'.
 */
import { Element } from 'ltx';
import { describe, expect, it } from 'vitest';
import { Outbound, RecordingPort } from '../../shared/outbound.ts';

describe('Outbound', () => {
  it('sends stanzas with xmlns jabber:client and nonzas as they are, counting posts and bytes', async () => {
    const port = new RecordingPort();
    const outbound = new Outbound(port);
    expect(await outbound.send('c1', new Element('message', { to: 'a@b' }).c('body').t('hi').root())).toBe(
      'sent',
    );
    expect(await outbound.send('c1', new Element('r', { xmlns: 'urn:xmpp:sm:3' }))).toBe('sent');
    expect(port.frames.get('c1')).toEqual([
      '<message to="a@b" xmlns="jabber:client"><body>hi</body></message>',
      '<r xmlns="urn:xmpp:sm:3"/>',
    ]);
    expect(outbound.counters.posts).toBe(2);
    expect(outbound.counters.bytes).toBe(
      Buffer.byteLength(
        '<message to="a@b" xmlns="jabber:client"><body>hi</body></message><r xmlns="urn:xmpp:sm:3"/>',
      ),
    );
  });

  it('reports a vanished connection as gone and counts it', async () => {
    const port = new RecordingPort();
    port.gone.add('c2');
    const outbound = new Outbound(port);
    expect(await outbound.send('c2', new Element('presence'))).toBe('gone');
    expect(outbound.counters.gone).toBe(1);
    await outbound.close('c2');
    expect(port.closed.has('c2')).toBe(true);
  });
});
