/**
 * `@aws-sdk/middleware-endpoint-discovery` as the DynamoDB client uses it in a function: the
 * client resolves its endpoint-discovery settings (`resolveEndpointDiscoveryConfig`, reading
 * `NODE_ENDPOINT_DISCOVERY_CONFIG_OPTIONS`), and no command Nimbus sends requires discovery, so
 * its middleware is never added. Discovery stays off (DynamoDB's regional endpoint), and the
 * endpoint cache the real resolver builds (`@aws-sdk/endpoint-cache` and its LRU map, about
 * 1.7 KB of the minified stream bundle) is not built.
 *
 * Nothing imports this file: `XmppFunction` (infra/constructs/xmpp-function.ts) aliases
 * `@aws-sdk/middleware-endpoint-discovery` to it when bundling a function. Tests, benches, the
 * local runner and the admin CLI run from source with the real package.
 */

/** What the client's runtime config loads: nothing from the environment or config files. */
export const NODE_ENDPOINT_DISCOVERY_CONFIG_OPTIONS = {
  environmentVariableSelector: (): undefined => undefined,
  configFileSelector: (): undefined => undefined,
  default: undefined,
};

/** The resolved settings the real resolver returns, with discovery off and no cache. */
export function resolveEndpointDiscoveryConfig<T extends object>(
  input: T,
  { endpointDiscoveryCommandCtor }: { endpointDiscoveryCommandCtor: unknown },
): T & {
  endpointDiscoveryCommandCtor: unknown;
  endpointDiscoveryEnabled: () => Promise<boolean>;
  isClientEndpointDiscoveryEnabled: boolean;
} {
  return Object.assign(input, {
    endpointDiscoveryCommandCtor,
    endpointDiscoveryEnabled: () => Promise.resolve(false),
    isClientEndpointDiscoveryEnabled: false,
  });
}
