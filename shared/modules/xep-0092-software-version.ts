/** XEP-0092 Software Version (v1.1), `jabber:iq:version`: the server's name and version. */
import { Element } from 'ltx';
import type { Server } from '../core/host.ts';
import { NS } from '../xml/namespaces.ts';

/** `version` is package.json's (test/e2e/core.test.ts checks they agree). */
export const SOFTWARE = { name: 'Nimbus', version: '0.1.0' };

export function register(server: Server): void {
  server.host.add('disco-feature', NS.version);
  server.host.iq(
    'get',
    NS.version,
    'query',
    async () => {
      const query = new Element('query', { xmlns: NS.version });
      query.c('name').t(SOFTWARE.name);
      query.c('version').t(SOFTWARE.version);
      return query;
    },
    { targets: ['server'], repeatable: true },
  );
}
