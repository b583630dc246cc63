import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import * as real from '@aws-sdk/middleware-endpoint-discovery';
import { describe, expect, it } from 'vitest';
import * as stub from '../../functions/endpoint-discovery.ts';

// functions/endpoint-discovery.ts stands in for @aws-sdk/middleware-endpoint-discovery in the
// bundles (BUNDLE_ALIASES): every name the DynamoDB client imports from it must be there, and
// resolve as the real one does with discovery off.
const CLIENT = join(import.meta.dirname, '../../node_modules/@aws-sdk/client-dynamodb/dist-es');

function importedNames(dir: string): Set<string> {
  const names = new Set<string>();
  for (const entry of readdirSync(dir, { recursive: true, withFileTypes: true })) {
    if (!entry.isFile() || !entry.name.endsWith('.js')) continue;
    const text = readFileSync(join(entry.parentPath, entry.name), 'utf8');
    for (const match of text.matchAll(
      /import\s*\{([^}]*)\}\s*from\s*"@aws-sdk\/middleware-endpoint-discovery"/g,
    )) {
      for (const name of (match[1] ?? '').split(',')) if (name.trim()) names.add(name.trim());
    }
  }
  return names;
}

describe('the endpoint-discovery stand-in of the function bundles', () => {
  it('exports every name the DynamoDB client (ESM build, as bundled) imports from the real package', () => {
    const names = importedNames(CLIENT);
    expect([...names].sort()).toEqual([
      'NODE_ENDPOINT_DISCOVERY_CONFIG_OPTIONS',
      'resolveEndpointDiscoveryConfig',
    ]);
    for (const name of names) expect(stub).toHaveProperty(name);
    // getEndpointDiscoveryPlugin (the middleware) is used by no command of the client.
    expect(names.has('getEndpointDiscoveryPlugin')).toBe(false);
  });

  it('resolves as the real package does with discovery off, without an endpoint cache', async () => {
    const ctor = class DescribeEndpoints {};
    const fromReal = real.resolveEndpointDiscoveryConfig({ endpointDiscoveryEnabled: false } as never, {
      endpointDiscoveryCommandCtor: ctor as never,
    }) as unknown as Record<string, unknown>;
    const fromStub = stub.resolveEndpointDiscoveryConfig({}, { endpointDiscoveryCommandCtor: ctor });
    expect(fromStub.endpointDiscoveryCommandCtor).toBe(fromReal.endpointDiscoveryCommandCtor);
    expect(await fromStub.endpointDiscoveryEnabled()).toBe(
      await (fromReal.endpointDiscoveryEnabled as () => Promise<boolean>)(),
    );
    expect(fromStub.isClientEndpointDiscoveryEnabled).toBe(false);
    expect(fromStub).not.toHaveProperty('endpointCache');
    expect(stub.NODE_ENDPOINT_DISCOVERY_CONFIG_OPTIONS.environmentVariableSelector()).toBeUndefined();
  });
});
