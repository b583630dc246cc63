/** XEP-0092 Software Version (v1.1), `jabber:iq:version`: the server's name and version. */
import { Element } from 'ltx';
import type { Router } from '../router.ts';
import { NS } from '../xml/namespaces.ts';

export const SOFTWARE = { name: 'Nimbus', version: '0.1.0' };

export function register(router: Router): void {
  router.feature(NS.version);
  router.iq(['server'], 'get', NS.version, 'query', async () => {
    const query = new Element('query', { xmlns: NS.version });
    query.c('name').t(SOFTWARE.name);
    query.c('version').t(SOFTWARE.version);
    return query;
  });
}
