import { describe, expect, it } from 'vitest';
import LRUCache from '../../functions/lru-cache.ts';

// functions/lru-cache.ts stands in for mnemonist's LRUCache in the bundles (BUNDLE_ALIASES):
// the calls @aws-sdk/endpoint-cache makes must behave as mnemonist's do.
describe('the LRU cache the bundles use for the SDK endpoint cache', () => {
  it('evicts the least recently used key beyond its capacity', () => {
    const cache = new LRUCache<string, number>(2);
    cache.set('a', 1).set('b', 2);
    expect(cache.get('a')).toBe(1); // a is now the most recent
    cache.set('c', 3);
    expect(cache.has('b')).toBe(false);
    expect([cache.get('a'), cache.get('c'), cache.size]).toEqual([1, 3, 2]);
  });

  it('peek does not refresh a key, get does', () => {
    const cache = new LRUCache<string, number>(2);
    cache.set('a', 1).set('b', 2);
    expect(cache.peek('a')).toBe(1);
    cache.set('c', 3);
    expect(cache.has('a')).toBe(false);
    expect(cache.get('missing')).toBeUndefined();
  });

  it('set on an existing key replaces its value without growing, and clear empties it', () => {
    const cache = new LRUCache<string, number[]>(3);
    cache.set('k', [1]).set('k', []);
    expect(cache.size).toBe(1);
    expect(cache.peek('k')).toEqual([]);
    cache.clear();
    expect(cache.size).toBe(0);
    expect(() => new LRUCache(0)).toThrow();
  });
});
