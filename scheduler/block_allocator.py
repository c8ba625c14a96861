"""Page allocator for the paged KV pool (host side, plain Python), with the prefix cache's
bookkeeping.

Page 0 is reserved as the "null page": padded tokens write their K/V there and padded
block-table entries point at it, so device code never needs a branch for padding.

Every usable page is in exactly one state:
  free        holds nothing worth keeping
  referenced  held by one or more running requests (or an adapter); `_refs[page]` counts them
  evictable   holds a cached prefix page (a registered hash) that nobody references
A referenced page may also be cached (its hash registered): it then serves as a prefix for
new requests while its owner runs, and becomes evictable when the last reference goes.
`allocate` takes free pages first, then evicts evictable pages least recently released first.
Callers release a request's pages tail first, so within one request the leaves of its chain
go before the pages they extend.
"""
from __future__ import annotations

from collections import OrderedDict


class OutOfPages(Exception):
    pass


class BlockAllocator:
    def __init__(self, num_pages: int, num_reserved: int = 1):
        if num_pages <= num_reserved:
            raise ValueError(f"num_pages={num_pages} must exceed the {num_reserved} reserved page(s)")
        self.num_pages = num_pages
        self.num_reserved = num_reserved
        # Stack of free pages; low ids handed out first (pop from the end of a reversed list).
        self._free: list[int] = list(range(num_pages - 1, num_reserved - 1, -1))
        self._refs: dict[int, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()   # least recently released first
        self._page_of: dict[bytes, int] = {}       # block hash -> the page holding that K/V
        self._hash_of: dict[int, bytes] = {}
        self._tag_of: dict[int, object] = {}       # page -> what its K/V depends on (an adapter)
        self.num_cache_evictions = 0

    # -- counts ------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Pages `allocate` can hand out: free ones and cached ones nobody references."""
        return len(self._free) + len(self._evictable)

    @property
    def num_free_uncached(self) -> int:
        """Pages `allocate` can hand out without evicting a cached prefix."""
        return len(self._free)

    @property
    def num_usable(self) -> int:
        return self.num_pages - self.num_reserved

    @property
    def num_used(self) -> int:
        """Pages referenced by running requests or adapters."""
        return len(self._refs)

    @property
    def num_cached(self) -> int:
        """Pages holding a registered prefix (referenced or not)."""
        return len(self._hash_of)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def num_refs(self, page: int) -> int:
        return self._refs.get(page, 0)

    # -- allocation --------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > self.num_free:
            raise OutOfPages(f"asked for {n} pages, {self.num_free} free")
        pages = []
        for _ in range(n):
            if self._free:
                p = self._free.pop()
            else:
                p, _ = self._evictable.popitem(last=False)
                self._forget(p)
                self.num_cache_evictions += 1
            self._refs[p] = 1
            pages.append(p)
        return pages

    def free(self, pages: list[int]) -> None:
        """Drop one reference to each page; a page nobody references becomes free, or
        evictable when it holds a cached prefix (in the order given: the first goes first)."""
        for p in pages:
            if p not in self._refs:
                raise ValueError(f"page {p} freed but not allocated (double free or foreign page)")
        for p in pages:
            r = self._refs[p]
            if r > 1:
                self._refs[p] = r - 1
                continue
            del self._refs[p]
            if p in self._hash_of:
                self._evictable[p] = None
            else:
                self._free.append(p)

    # -- the prefix cache --------------------------------------------------------------------
    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The pages of the longest prefix of `hashes` that is cached (referenced or not)."""
        pages = []
        for h in hashes:
            p = self._page_of.get(h)
            if p is None:
                break
            pages.append(p)
        return pages

    def acquire(self, pages: list[int]) -> None:
        """One more reference to each of these cached pages (taking evictable ones back)."""
        for p in pages:
            if p not in self._hash_of:
                raise ValueError(f"page {p} acquired but holds no cached prefix")
        for p in pages:
            if p in self._refs:
                self._refs[p] += 1
            else:
                del self._evictable[p]
                self._refs[p] = 1

    def share(self, pages: list[int]) -> None:
        """One more reference to each of these referenced pages (a sample taking its sibling's
        prompt pages; they hold K/V whether or not they are cached)."""
        for p in pages:
            if p not in self._refs:
                raise ValueError(f"page {p} shared but not referenced")
        for p in pages:
            self._refs[p] += 1

    def register(self, page: int, block_hash: bytes, tag: object = None) -> bool:
        """Record that referenced `page` holds the K/V named by `block_hash`. False (nothing
        recorded) when another page already holds it: the first one stays the cached copy."""
        if page not in self._refs:
            raise ValueError(f"page {page} registered but not allocated")
        if block_hash in self._page_of or page in self._hash_of:
            return False
        self._page_of[block_hash] = page
        self._hash_of[page] = block_hash
        if tag is not None:
            self._tag_of[page] = tag
        return True

    def uncache(self, tag: object = None, *, everything: bool = False) -> int:
        """Forget the cached prefixes computed under `tag` (an adapter that is removed: a new
        one of that name has other weights), or all of them. Evictable pages become free;
        referenced ones stay with their holders, no longer shared. Returns pages forgotten."""
        pages = (list(self._hash_of) if everything
                 else [p for p, t in self._tag_of.items() if t == tag])
        self.forget(pages)
        return len(pages)

    def forget(self, pages: list[int]) -> None:
        """Take `pages` out of the prefix cache (their K/V must not be reused: computed under a
        removed adapter, or by a request whose values went non-finite). Evictable ones become
        free; referenced ones stay with their holders, no longer shared."""
        for p in pages:
            self._forget(p)
            if p in self._evictable:
                del self._evictable[p]
                self._free.append(p)

    def _forget(self, page: int) -> None:
        h = self._hash_of.pop(page, None)
        if h is not None:
            del self._page_of[h]
        self._tag_of.pop(page, None)

    def check(self) -> None:
        """Assert the invariants (tests): every usable page in exactly one state, the hash
        maps each other's inverse, evictable pages cached and unreferenced."""
        free, refd, evict = set(self._free), set(self._refs), set(self._evictable)
        assert len(free) == len(self._free), "a page is twice in the free list"
        assert not (free & refd) and not (free & evict) and not (refd & evict)
        assert free | refd | evict == set(range(self.num_reserved, self.num_pages))
        assert all(r > 0 for r in self._refs.values())
        assert evict <= set(self._hash_of) and not (free & set(self._hash_of))
        assert {p: h for h, p in self._page_of.items()} == self._hash_of
        assert set(self._tag_of) <= set(self._hash_of)
