/**
 * The AWS SDK's default credential chain (`@aws-sdk/credential-provider-node`) cut to what a
 * Lambda function meets: the execution role's credentials in the environment
 * (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, which Lambda always sets,
 * and which the full chain also tries first), or else a container credentials endpoint
 * (`AWS_CONTAINER_CREDENTIALS_FULL_URI` / `_RELATIVE_URI`).
 *
 * Nothing imports this file: `XmppFunction` (infra/constructs/xmpp-function.ts) aliases
 * `@aws-sdk/credential-provider-node` to it when bundling a function, which drops the SSO, STS,
 * INI-file, process and instance-metadata providers (about 80 KB of the minified bundle, and
 * their load time) that a Lambda function never reaches. Tests, benches, the local runner and
 * the admin CLI run from source with the SDK's full chain.
 */
import { fromEnv } from '@aws-sdk/credential-provider-env';
import { fromHttp } from '@aws-sdk/credential-provider-http';

type ProviderInit = Parameters<typeof fromHttp>[0] & Parameters<typeof fromEnv>[0];
type CredentialProvider = ReturnType<typeof fromEnv>;

function containerEndpoint(): boolean {
  return Boolean(
    process.env.AWS_CONTAINER_CREDENTIALS_FULL_URI || process.env.AWS_CONTAINER_CREDENTIALS_RELATIVE_URI,
  );
}

/** Same name and call shape as the SDK's `defaultProvider`; the clients memoize what it returns. */
export const defaultProvider = (init: ProviderInit = {}): CredentialProvider => {
  const environment = fromEnv(init);
  // fromHttp throws at once when no endpoint is set: built only when one is.
  return async (properties) =>
    !process.env.AWS_ACCESS_KEY_ID && containerEndpoint()
      ? fromHttp(init)(properties)
      : environment(properties);
};
