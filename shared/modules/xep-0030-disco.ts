/**
 * XEP-0030 Service Discovery (v2.5), `http://jabber.org/protocol/disco#info` and `#items`.
 * The server's features and nodes are what the other modules added to the host
 * (`disco-feature`, `disco-node`), so disco never advertises something nobody serves.
 */
import { Element } from 'ltx';
import type { IqRequest, Server } from '../core/host.ts';
import { mayQueryAccount } from '../core/router.ts';
import { StanzaError } from '../errors.ts';
import { bareJid } from '../jid.ts';
import { NS } from '../xml/namespaces.ts';

export function register(server: Server): void {
  const { host } = server;
  for (const kind of ['disco-feature', 'disco-account-feature'] as const) {
    host.add(kind, NS.discoInfo);
    host.add(kind, NS.discoItems);
  }
  /** XEP-0030 §3.2/§4.2: a query on a node goes to the module that offers it. */
  const nodeHandler = (node: string) => host.items('disco-node').find((entry) => entry.node === node);
  /**
   * A node nobody offers: XEP-0030 §8, on another account the requester may not query, "no
   * matter if the request specifies a node or not" (service-unavailable for info, an empty
   * result for items, the same whether the account exists); else item-not-found (§3.2).
   */
  const unknownNode = async (request: IqRequest): Promise<'refused' | 'not-found'> => {
    const { from, to } = request;
    const other = to.local !== '' && bareJid(to) !== bareJid(from);
    if (other && !(await mayQueryAccount(server, bareJid(from), bareJid(to)))) return 'refused';
    return 'not-found';
  };

  // Answers for any account itself (XEP-0030 §8: the same error whether or not the account
  // exists), so the router's existence check never runs first and tells the difference.
  host.iq(
    'get',
    NS.discoInfo,
    'query',
    async (request) => {
      const node = request.payload.attrs.node;
      if (node !== undefined) {
        const handler = nodeHandler(node);
        if (handler) return handler.info(request);
        if ((await unknownNode(request)) === 'refused')
          throw new StanzaError('cancel', 'service-unavailable');
        throw new StanzaError('cancel', 'item-not-found');
      }
      const query = new Element('query', { xmlns: NS.discoInfo });
      if (request.to.local) {
        // XEP-0030 §8: "the server MUST return a <service-unavailable/> error if the target entity
        // does not exist or if the requesting entity is not authorized to receive presence from
        // the target entity" — the same answer for an account that does not exist.
        if (!(await mayQueryAccount(server, bareJid(request.from), bareJid(request.to))))
          throw new StanzaError('cancel', 'service-unavailable');
        query.c('identity', { category: 'account', type: 'registered' });
        for (const feature of [...new Set(host.items('disco-account-feature'))].sort())
          query.c('feature', { var: feature });
        return query;
      }
      query.c('identity', { category: 'server', type: 'im', name: 'Nimbus' });
      for (const feature of [...new Set(host.items('disco-feature'))].sort())
        query.c('feature', { var: feature });
      return query;
    },
    { answersForAnyAccount: true, repeatable: true },
  );

  host.iq(
    'get',
    NS.discoItems,
    'query',
    async (request) => {
      const node = request.payload.attrs.node;
      if (node !== undefined) {
        const handler = nodeHandler(node);
        if (handler) return handler.items(request);
        if ((await unknownNode(request)) === 'refused')
          return new Element('query', { xmlns: NS.discoItems, node });
        throw new StanzaError('cancel', 'item-not-found');
      }
      // No components or services yet; and XEP-0030 §8: for an account the answer is an empty
      // result whether it exists or not, so disco#items reveals nothing.
      return new Element('query', { xmlns: NS.discoItems });
    },
    { answersForAnyAccount: true, repeatable: true },
  );
}
