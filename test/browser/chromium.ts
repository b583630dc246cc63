/**
 * Debian's Chromium (`apt-get install chromium`) driven by playwright-core. No browser is ever
 * downloaded: a missing binary fails the run with the command that installs it.
 */
import { accessSync, constants } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type BrowserContext, chromium } from 'playwright-core';

export const CHROMIUM_PATH = process.env.CHROMIUM_PATH || '/usr/bin/chromium';

export const INSTALL_HINT =
  "Install Debian's Chromium with `sudo apt-get install chromium` (or point CHROMIUM_PATH at a Chromium binary); `npm run test:browser` never downloads a browser.";

/** Throws the install hint when the binary is missing or not executable. */
export function assertChromiumInstalled(): void {
  try {
    accessSync(CHROMIUM_PATH, constants.X_OK);
  } catch {
    throw new Error(`Chromium not found at ${CHROMIUM_PATH}. ${INSTALL_HINT}`);
  }
}

// The machine has no outside network: without these, Chromium keeps dialling Google's services
// (component updates, sync, QUIC probes) and floods the log with refused connections.
const QUIET_FLAGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

export interface LaunchedChromium {
  context: BrowserContext;
  close(): Promise<void>;
}

/** A headless Chromium with a fresh profile directory, removed again by `close()`. */
export async function launchChromium(): Promise<LaunchedChromium> {
  assertChromiumInstalled();
  const userDataDir = await mkdtemp(join(tmpdir(), 'nimbus-chromium-'));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM_PATH,
    headless: true,
    args: QUIET_FLAGS,
    viewport: { width: 1280, height: 800 },
  });
  return {
    context,
    async close() {
      await context.close().catch(() => {});
      await rm(userDataDir, { recursive: true, force: true });
    },
  };
}
