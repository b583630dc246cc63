/**
 * A tiny static site for the browser test: the npm `converse.js` package's `dist/` served as it
 * is under `/dist/`, and an `index.html` that initialises Converse with the given settings. Only
 * node:http; nothing is fetched from outside.
 */
import { readFile } from 'node:fs/promises';
import { createServer } from 'node:http';
import { createRequire } from 'node:module';
import type { AddressInfo } from 'node:net';
import { dirname, extname, join, normalize, sep } from 'node:path';

const CONTENT_TYPES: Record<string, string> = {
  '.css': 'text/css; charset=utf-8',
  '.html': 'text/html; charset=utf-8',
  '.ico': 'image/x-icon',
  '.js': 'text/javascript; charset=utf-8',
  '.json': 'application/json',
  '.map': 'application/json',
  '.mp3': 'audio/mpeg',
  '.ogg': 'audio/ogg',
  '.png': 'image/png',
  '.svg': 'image/svg+xml',
  '.ttf': 'font/ttf',
  '.wasm': 'application/wasm',
};

/** The installed package's `dist/` directory. */
export function converseDistDir(): string {
  const require = createRequire(import.meta.url);
  return dirname(require.resolve('converse.js/dist/converse.min.js'));
}

export interface ConverseSite {
  /** `http://127.0.0.1:<port>/` */
  url: string;
  close(): Promise<void>;
}

/**
 * A Converse plugin for the test only: it gives the page `window.nimbusProbe` (Converse's plugin
 * API, and the state of its named promises such as `rosterContactsFetched`), and logs each
 * Converse event to the console at debug level as `[converse event] <name>`.
 */
const PROBE_PLUGIN = `
      converse.plugins.add('nimbus-test-probe', {
        initialize() {
          const c = this._converse;
          window.nimbusProbe = {
            api: c.api,
            promises: () =>
              Object.fromEntries(
                Object.entries(c.promises).map(([name, p]) => [
                  name,
                  p.isResolved ? 'resolved' : p.isRejected ? 'rejected' : 'pending',
                ]),
              ),
          };
          c.on('all', (name) => console.debug('[converse event] ' + name));
        },
      });`;

/** Serves index.html calling `converse.initialize(settings)`, and Converse's dist/. */
export async function startConverseSite(settings: Record<string, unknown>): Promise<ConverseSite> {
  const dist = converseDistDir();
  // The probe plugin runs only when whitelisted, like any plugin that is not Converse's own.
  const withProbe = {
    ...settings,
    whitelisted_plugins: [
      ...((settings.whitelisted_plugins as string[] | undefined) ?? []),
      'nimbus-test-probe',
    ],
  };
  // JSON inside a <script>: "<" escaped so that no value can close the element.
  const settingsJson = JSON.stringify(withProbe).replace(/</g, '\\u003c');
  const index = `<!doctype html>
<html lang="en">
  <head>
    <meta charset="utf-8" />
    <title>Nimbus · Converse.js</title>
    <link rel="stylesheet" href="/dist/converse.min.css" />
  </head>
  <body class="converse-fullscreen">
    <script type="module">
      // Converse 14's dist is an ES module (its default export is the public API).
      import converse from '/dist/converse.min.js';${PROBE_PLUGIN}
      converse.initialize(${settingsJson});
    </script>
  </body>
</html>
`;
  const server = createServer(async (request, response) => {
    const path = decodeURIComponent(new URL(request.url ?? '/', 'http://localhost').pathname);
    if (path === '/' || path === '/index.html') {
      response.writeHead(200, { 'Content-Type': CONTENT_TYPES['.html'], 'Cache-Control': 'no-store' });
      response.end(index);
      return;
    }
    if (path === '/favicon.ico') {
      response.writeHead(204).end();
      return;
    }
    // dist/ is also the site root: Converse's OMEMO library fetches curve25519_compiled.wasm
    // relative to the page rather than to its own script.
    const file = normalize(join(dist, path.replace(/^\/dist\//, '/')));
    if (!file.startsWith(dist + sep)) {
      response.writeHead(404).end();
      return;
    }
    try {
      const body = await readFile(file);
      response.writeHead(200, {
        'Content-Type': CONTENT_TYPES[extname(file)] ?? 'application/octet-stream',
        'Content-Length': body.length,
      });
      response.end(body);
    } catch {
      response.writeHead(404).end();
    }
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}/`,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
