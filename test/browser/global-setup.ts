/** Fails `npm run test:browser` at once, with the install command, when Chromium is missing. */
import { assertChromiumInstalled } from './chromium.ts';

export default function setup(): void {
  assertChromiumInstalled();
}
