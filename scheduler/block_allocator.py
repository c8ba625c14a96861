"""Page allocator for the paged KV pool (host side, plain Python).

Page 0 is reserved as the "null page": padded tokens write their K/V there and padded
block-table entries point at it, so device code never needs a branch for padding.
"""
from __future__ import annotations


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
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        return self.num_pages - self.num_reserved

    @property
    def num_used(self) -> int:
        return len(self._used)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            raise OutOfPages(f"asked for {n} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        self._used.update(pages)
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if p not in self._used:
                raise ValueError(f"page {p} freed but not allocated (double free or foreign page)")
        for p in pages:
            self._used.remove(p)
            self._free.append(p)
