import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import * as stub from '../../functions/event-streams.ts';

// functions/event-streams.ts stands in for @smithy/core/event-streams in the bundles
// (BUNDLE_ALIASES). The SDK code the functions bundle must reach it only through the protocols'
// dynamic import for event-stream operations, which DynamoDB and the Management API do not have.
const MODULES = join(import.meta.dirname, '../../node_modules');
const BUNDLED = [
  '@smithy/core/dist-es',
  '@aws-sdk/core/dist-es',
  '@aws-sdk/client-dynamodb/dist-es',
  '@aws-sdk/client-apigatewaymanagementapi/dist-es',
  '@aws-sdk/lib-dynamodb/dist-es',
];

/** Every import of `@smithy/core/event-streams` in the bundled packages' ESM builds. */
function importsOfEventStreams(): { file: string; text: string }[] {
  const found: { file: string; text: string }[] = [];
  for (const root of BUNDLED) {
    const dir = join(MODULES, root);
    for (const entry of readdirSync(dir, { recursive: true, withFileTypes: true })) {
      if (!entry.isFile() || !entry.name.endsWith('.js')) continue;
      const file = join(entry.parentPath, entry.name);
      const text = readFileSync(file, 'utf8');
      for (const match of text.matchAll(/^.*["']@smithy\/core\/event-streams["'].*$/gm))
        found.push({ file: file.slice(MODULES.length + 1), text: match[0].trim() });
    }
  }
  return found;
}

describe('the event-streams stand-in of the function bundles', () => {
  it("replaces the only import of the real module: the protocols' dynamic one, for event-stream operations", () => {
    const imports = importsOfEventStreams();
    expect(imports.map((i) => i.file)).toEqual(['@smithy/core/dist-es/submodules/protocols/HttpProtocol.js']);
    const [only] = imports;
    expect(only?.text).toBe(
      'const { EventStreamSerde, eventStreamSerdeProvider } = await import("@smithy/core/event-streams");',
    );
    expect(stub.EventStreamSerde).toBeTypeOf('function');
    expect(stub.eventStreamSerdeProvider).toBeTypeOf('function');
  });

  it('fails loudly if an operation ever needs event streams', () => {
    expect(() => new stub.EventStreamSerde({})).toThrow(/event streams are not in this bundle/);
    expect(() => stub.eventStreamSerdeProvider({})).toThrow(/event streams are not in this bundle/);
  });
});
