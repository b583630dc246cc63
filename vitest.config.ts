import { configDefaults, defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    // The real-browser test has its own command and config (vitest.browser.config.ts).
    exclude: [...configDefaults.exclude, 'test/browser/**'],
    globalSetup: ['test/support/global-setup.ts'],
    testTimeout: 30_000,
    hookTimeout: 60_000,
    // Lambda runs Node.js 22; the tests run on the machine's Node 20 without the SDK's nag.
    env: { AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED: 'true' },
    // xmpp.js 0.14 may write to a socket it has already dropped when a test closes a client
    // (@xmpp/connection's write() on a null socket); that client-side race is not ours to
    // fail on. Every other unhandled error fails the run.
    onUnhandledError(error) {
      const stack = String((error as Error).stack ?? '');
      if (/reading 'write'/.test(String(error.message)) && stack.includes('@xmpp/connection')) return false;
    },
  },
});
