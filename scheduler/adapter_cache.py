"""Which LoRA adapters are resident in the device pool, and how many KV pages each one holds.

Plain Python (no JAX): the scheduler asks this cache, never the device. Adapter weights live in
pages of the *same* `BlockAllocator` that hands out KV pages, so an adapter's pages are pages no
request can use for its KV cache, and admission accounts for both (see `jaxserve/lora/pool.py`
for the byte layout inside a page).

A request's adapter is:
  1. prefetched (optional): loaded while the request still waits at the head of the queue,
     using free pages only; it stays unpinned, so KV demand may evict it again;
  2. acquired at admission: made resident if it is not (evicting least-recently-used unpinned
     adapters if needed) and pinned (one reference per running request);
  3. released when the request finishes, is aborted or preempted; with no references left it
     stays cached (LRU) until its pages are wanted by KV or by another adapter.
Loads are recorded in `pending_loads` (name, pages); the engine drains them into the step plan
and the runner copies the weights into those pages before the step that needs them.

Unpinned adapters compete with cached prefix pages (`BlockAllocator`, evictable pages) for the
pool. `adapters_first=True` (the scheduler's default order): idle adapters are evicted before
cached prefix pages are touched. `adapters_first=False` ("prefix-first"): pages are taken from
free and cached prefix pages before any idle adapter is evicted. docs/architecture.md
("Prefix caching") gives the default and the measurement behind it.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from scheduler.block_allocator import BlockAllocator


class AdapterCache:
    def __init__(self, allocator: BlockAllocator, pages_needed: Callable[[str], int], *,
                 max_pages: int | None = None, adapters_first: bool = False):
        self.allocator = allocator
        self.adapters_first = adapters_first
        self.pages_needed = pages_needed     # adapter name -> pages its weights take
        self.max_pages = max_pages           # cap on pages held by adapters (None: the pool)
        self._pages: OrderedDict[str, list[int]] = OrderedDict()   # resident, LRU first
        self._refs: dict[str, int] = {}
        self.pending_loads: list[tuple[str, list[int]]] = []
        self.num_loads = 0
        self.num_evictions = 0

    # -- queries -----------------------------------------------------------------------------
    def is_resident(self, name: str) -> bool:
        return name in self._pages

    def pages_of(self, name: str) -> list[int]:
        return self._pages[name]

    def num_refs(self, name: str) -> int:
        return self._refs.get(name, 0)

    @property
    def resident(self) -> list[str]:
        return list(self._pages)

    @property
    def num_pages_held(self) -> int:
        return sum(len(p) for p in self._pages.values())

    @property
    def num_evictable_pages(self) -> int:
        return sum(len(p) for n, p in self._pages.items() if not self._refs.get(n))

    # -- residency ---------------------------------------------------------------------------
    def _room(self, n: int) -> bool:
        """n pages can be allocated without evicting an adapter -- nor, adapters first, a
        cached prefix page."""
        a = self.allocator
        return n <= (a.num_free_uncached if self.adapters_first else a.num_free)

    def _fits_cap(self, n: int) -> bool:
        return self.max_pages is None or self.num_pages_held + n <= self.max_pages

    def _load(self, name: str, evict: bool) -> bool:
        n = self.pages_needed(name)
        if evict:
            # Only as much eviction as the load needs; pinned adapters are never touched.
            while not (self._room(n) and self._fits_cap(n)):
                if not self._evict_one():
                    if self.allocator.can_allocate(n) and self._fits_cap(n):
                        break      # (adapters first: the rest comes from cached prefixes)
                    return False
        elif not (self._room(n) and self._fits_cap(n)):
            return False
        pages = self.allocator.allocate(n)
        self._pages[name] = pages
        self.pending_loads.append((name, pages))
        self.num_loads += 1
        return True

    def _evict_one(self) -> bool:
        victim = next((n for n in self._pages if not self._refs.get(n)), None)
        if victim is None:
            return False
        self.evict(victim)
        return True

    def evict(self, name: str) -> None:
        if self._refs.get(name):
            raise ValueError(f"adapter {name!r} is in use by {self._refs[name]} running request(s)")
        pages = self._pages.pop(name, None)
        if pages is None:
            return
        self.pending_loads = [(n, p) for n, p in self.pending_loads if n != name]
        self.allocator.free(pages)
        self.num_evictions += 1

    def can_acquire(self, name: str) -> bool:
        """True when acquire(name) would succeed (it is resident, or room can be made)."""
        if name in self._pages:
            return True
        n = self.pages_needed(name)
        held = self.num_pages_held - self.num_evictable_pages
        return (n <= self.allocator.num_free + self.num_evictable_pages
                and (self.max_pages is None or held + n <= self.max_pages))

    def acquire(self, name: str) -> bool:
        """Make `name` resident and pin it for one running request. False if it cannot fit."""
        if name not in self._pages and not self._load(name, evict=True):
            return False
        self._pages.move_to_end(name)
        self._refs[name] = self._refs.get(name, 0) + 1
        return True

    def release(self, name: str) -> None:
        refs = self._refs.get(name, 0)
        if refs <= 0:
            raise ValueError(f"adapter {name!r} released more often than acquired")
        if refs == 1:
            del self._refs[name]
        else:
            self._refs[name] = refs - 1

    def prefetch(self, name: str) -> bool:
        """Load without pinning, never evicting an adapter (nor, adapters first, a cached
        prefix). True if resident after."""
        if name in self._pages:
            return True
        return self._load(name, evict=False)

    def reclaim(self, num_pages: int) -> None:
        """Evict unpinned adapters (LRU first) until `num_pages` pages can be allocated (adapters
        first: without touching cached prefix pages), if possible."""
        while not self._room(num_pages) and self._evict_one():
            pass

    def drain_loads(self) -> list[tuple[str, list[int]]]:
        loads, self.pending_loads = self.pending_loads, []
        return loads
