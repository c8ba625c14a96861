"""Names for the K/V of full pages, for automatic prefix caching.

A full page of a request is named by a hash chained over the page before it: the hash of page
i covers page i-1's hash, page i's token ids and, for the first page, everything else its K/V
depends on -- the LoRA adapter serving the request (the same tokens under another adapter have
other K/V) and the request's cache salt (requests with different salts never share). The model,
its dtype and the page size are the server's and the same for every request. Equal hashes
therefore mean equal K/V for the whole prefix up to that page. SHA-256 keeps a tenant from
crafting a prompt whose page collides with another tenant's.
"""
from __future__ import annotations

import hashlib
from array import array

from scheduler.sequence import Sequence


def first_page_seed(adapter: str | None, cache_salt: str | None) -> bytes:
    h = hashlib.sha256(b"jaxserve-prefix-v1")
    for part in (adapter, cache_salt):
        if part is None:
            h.update(b"\x00")
        else:
            b = part.encode("utf-8", "surrogatepass")
            h.update(b"\x01" + len(b).to_bytes(8, "little") + b)
    return h.digest()


def page_hash(parent: bytes, token_ids) -> bytes:
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


def extend_hashes(seq: Sequence, page_size: int, num_pages: int) -> list[bytes]:
    """seq.block_hashes extended to its first `num_pages` full pages (as far as its known
    tokens go) and returned."""
    hashes = seq.block_hashes
    n = min(num_pages, seq.num_tokens // page_size)
    if len(hashes) >= n:
        return hashes
    ids = seq.token_ids
    parent = hashes[-1] if hashes else first_page_seed(seq.adapter, seq.cache_salt)
    for i in range(len(hashes), n):
        parent = page_hash(parent, ids[i * page_size:(i + 1) * page_size])
        hashes.append(parent)
    return hashes


class PrefixCacheStats:
    """Tokens looked up at admission and tokens found cached, in total and per adapter
    (vLLM's prefix_cache_queries / prefix_cache_hits)."""

    def __init__(self):
        self.queries = 0
        self.hits = 0
        self.by_adapter: dict[str | None, list[int]] = {}   # adapter -> [queries, hits]

    def record(self, adapter: str | None, queried: int, hit: int) -> None:
        self.queries += queried
        self.hits += hit
        q = self.by_adapter.setdefault(adapter, [0, 0])
        q[0] += queried
        q[1] += hit

    def as_dict(self) -> dict:
        return {"queries": self.queries, "hits": self.hits,
                "hit_rate": self.hits / self.queries if self.queries else 0.0,
                "by_adapter": {a: {"queries": q, "hits": h}
                               for a, (q, h) in self.by_adapter.items()}}
