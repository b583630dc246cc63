/**
 * XEP-0030 Service Discovery (v2.5), `http://jabber.org/protocol/disco#info` and `#items`.
 * The server's features are gathered from what the feature modules register, so disco never
 * advertises something the router cannot serve.
 */
import { Element } from 'ltx';
import { StanzaError } from '../errors.ts';
import { bareJid } from '../jid.ts';
import type { IqRequest, Router } from '../router.ts';
import { NS } from '../xml/namespaces.ts';

/** A feature can answer disco#info / disco#items for a node of its own (e.g. XEP-0013). */
export interface DiscoNode {
  info(request: IqRequest): Promise<Element>;
  items(request: IqRequest): Promise<Element>;
}

const nodes = new Map<string, DiscoNode>();

export function registerNode(node: string, handler: DiscoNode): void {
  nodes.set(node, handler);
}

export function register(router: Router): void {
  router.feature(NS.discoInfo, NS.discoItems);

  router.iq(['server', 'account'], 'get', NS.discoInfo, 'query', async (request) => {
    const node = request.payload.attrs.node;
    if (node !== undefined) {
      const handler = nodes.get(node);
      if (!handler) throw new StanzaError('cancel', 'item-not-found');
      return handler.info(request);
    }
    const query = new Element('query', { xmlns: NS.discoInfo });
    if (request.to.local) {
      // XEP-0030 §8: "the server MUST return a <service-unavailable/> error if the target entity
      // does not exist or if the requesting entity is not authorized to receive presence from
      // the target entity" — without subscriptions, only the user's own account qualifies.
      if (bareJid(request.to) !== bareJid(request.from))
        throw new StanzaError('cancel', 'service-unavailable');
      query.c('identity', { category: 'account', type: 'registered' });
      query.c('feature', { var: NS.discoInfo });
      return query;
    }
    query.c('identity', { category: 'server', type: 'im', name: 'Nimbus' });
    for (const feature of [...router.features].sort()) query.c('feature', { var: feature });
    return query;
  });

  router.iq(
    ['server', 'account'],
    'get',
    NS.discoItems,
    'query',
    async (request) => {
      const node = request.payload.attrs.node;
      if (node !== undefined) {
        const handler = nodes.get(node);
        if (!handler) throw new StanzaError('cancel', 'item-not-found');
        return handler.items(request);
      }
      // No components or services yet; and XEP-0030 §8: for an account the answer is an empty
      // result whether it exists or not, so disco#items reveals nothing.
      return new Element('query', { xmlns: NS.discoItems });
    },
    { answersForAnyAccount: true },
  );
}
