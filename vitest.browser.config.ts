import { defineConfig } from 'vitest/config';

/**
 * `npm run test:browser`: Converse.js in Debian's Chromium against the local stack. Kept apart
 * from vitest.config.ts so that `npm test` never needs a browser.
 */
export default defineConfig({
  test: {
    include: ['test/browser/**/*.test.ts'],
    // The Chromium check first, so a missing browser fails before DynamoDB Local starts.
    globalSetup: ['test/browser/global-setup.ts', 'test/support/global-setup.ts'],
    testTimeout: 60_000,
    hookTimeout: 90_000,
    env: { AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED: 'true' },
    reporters: ['verbose'],
    onUnhandledError(error) {
      const stack = String((error as Error).stack ?? '');
      if (/reading 'write'/.test(String(error.message)) && stack.includes('@xmpp/connection')) return false;
    },
  },
});
