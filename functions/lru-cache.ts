/**
 * A bounded least-recently-used map with the part of `mnemonist/lru-cache`'s API that the AWS
 * SDK's `@aws-sdk/endpoint-cache` calls (`get`, `set`, `has`, `peek`, `clear`, `size`).
 *
 * Nothing imports this file: `XmppFunction` (infra/constructs/xmpp-function.ts) aliases
 * `mnemonist/lru-cache` to it when bundling a function. The DynamoDB client builds an endpoint
 * cache for endpoint discovery, which Nimbus never turns on; mnemonist's cache and its helpers
 * were about 7 KB of the minified stream bundle. A JavaScript `Map` keeps insertion order, so
 * moving a key to the end on use and evicting the first key is an LRU.
 */
export default class LRUCache<K, V> {
  private readonly entries = new Map<K, V>();

  constructor(readonly capacity: number) {
    if (!(capacity > 0)) throw new Error('LRUCache: capacity must be a positive number');
  }

  get size(): number {
    return this.entries.size;
  }

  has(key: K): boolean {
    return this.entries.has(key);
  }

  /** The value without making it the most recently used. */
  peek(key: K): V | undefined {
    return this.entries.get(key);
  }

  get(key: K): V | undefined {
    if (!this.entries.has(key)) return undefined;
    const value = this.entries.get(key) as V;
    this.entries.delete(key);
    this.entries.set(key, value);
    return value;
  }

  set(key: K, value: V): this {
    this.entries.delete(key);
    this.entries.set(key, value);
    if (this.entries.size > this.capacity) {
      const oldest = this.entries.keys().next();
      if (!oldest.done) this.entries.delete(oldest.value);
    }
    return this;
  }

  clear(): void {
    this.entries.clear();
  }
}
