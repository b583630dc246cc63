/**
 * `@smithy/core/event-streams` as the functions' clients use it: not at all. The SDK's HTTP
 * protocols load it (`HttpProtocol.loadEventStreamCapability`, a dynamic import) only for an
 * operation with an event-stream input or output, and no operation of DynamoDB or of the API
 * Gateway Management API has one. A one-file bundle inlines dynamic imports, so the codec, the
 * marshallers and the serde (about 15 KB of the minified stream bundle) came along unused.
 *
 * Nothing imports this file: `XmppFunction` (infra/constructs/xmpp-function.ts) aliases
 * `@smithy/core/event-streams` to it when bundling a function. Tests, benches, the local runner
 * and the admin CLI run from source with the real module. Were a future client to need event
 * streams, its first such call fails loudly here instead of misbehaving.
 */

function unavailable(): never {
  throw new Error(
    'event streams are not in this bundle (functions/event-streams.ts): no Nimbus call uses them',
  );
}

/** What HttpProtocol.loadEventStreamCapability constructs. */
export class EventStreamSerde {
  constructor(_options: unknown) {
    unavailable();
  }
}

/** What HttpProtocol.loadEventStreamCapability resolves its marshaller with. */
export function eventStreamSerdeProvider(_options: unknown): never {
  unavailable();
}
