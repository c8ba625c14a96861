"""The runner's LoRA side: copy adapters into pool pages, and build a step's adapter slots.

A load's life: the scheduler's `AdapterCache` picks pages and lists (name, pages) in the plan;
`stage` packs the adapter on the host and starts the host-to-device copy (`jax.device_put` is
asynchronous); `write` scatters it into the donated pool. Loads the step needs are written before
the step is dispatched; prefetches (adapters of requests still waiting) after it, so their copy
overlaps the step and their scatter queues behind it instead of delaying it.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxserve.lora.adapter import MODULES
from jaxserve.lora.apply import gather_all_layers
from jaxserve.lora.pool import LoraBatch, write_pages
from jaxserve.lora.store import LoraStore
from jaxserve.model.kv_cache import encode


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class LoraRuntime:
    def __init__(self, store: LoraStore):
        self.store = store
        self.layout = store.layout
        self.num_pages_written = 0
        self.mesh = None                    # set by a tensor-parallel runner
        self._generation: dict[str, int] = {}   # adapter -> how many times it was loaded
        cfg = store.layout.cfg
        self._gather = jax.jit(
            lambda kv, lora: _as_stored(gather_all_layers(cfg, lora, kv.k, kv.v), kv.k.dtype))
        self._update = jax.jit(_update_rows, static_argnums=(0,), donate_argnums=(1,))
        # In place (the pool donated): run eagerly, each adapter load copied the whole KV pool
        # (~0.4 GB for the LoRA benchmark's bf16 pool, ~40 ms per load on the 2-core VM).
        self._write = jax.jit(write_pages, donate_argnums=(0,))
        self._cached = None      # decode: (shape key, per-row keys, slot weights) of the last step
        self.num_rows_gathered = 0

    # -- loads ------------------------------------------------------------------------------
    def stage(self, loads: list[tuple[str, list[int]]]):
        staged = []
        for name, pages in loads:
            n = _pow2(len(pages))           # few write shapes; padding goes to the null page
            idx = np.zeros((n,), np.int32)
            idx[:len(pages)] = pages
            staged.append((name, jax.device_put(idx), jax.device_put(self.store.packed(name, n))))
            self.num_pages_written += len(pages)
            self._generation[name] = self._generation.get(name, 0) + 1
        return staged

    def write(self, kv, staged):
        for _, idx, buf in staged:
            kv = self._write(kv, idx, buf)
        return kv

    # -- a step's slots ---------------------------------------------------------------------
    def build(self, plan, B: int, T: int, rows: list[int]):
        """(lora_idx [B*T] int32, LoraBatch) for the plan, or (None, None) with no adapter.

        One slot per batch row (S = B; plan sequence j sits in row rows[j]): a row's slot
        holds its sequence's adapter, or nothing
        (rank 0) for a base-model row. The step's program therefore depends on the batch shape,
        the adapted modules and the rank bucket only, never on how many distinct adapters the
        batch mixes: 1 or 64 adapters in a batch of 64 run the same program at the same cost.
        Rows sharing an adapter read its pages twice (a few MB per step at rank 8).
        The rank bucket R is the smallest power of two >= the largest rank in the step (at most
        max_lora_rank): only R rows per slot are gathered and multiplied.
        """
        names = list(plan.adapter_pages)
        if not names:
            return None, None
        adapters = {n: self.store.get(n) for n in names}
        modules = tuple(m for m in MODULES if any(m in a.weights.a for a in adapters.values()))
        stored = max(w.shape[1] for a in adapters.values() for w in a.weights.a.values())
        R = min(_pow2(stored), self.layout.max_rank)
        L = self.layout.cfg.num_layers
        pages = [np.zeros((B, self.layout.pages_for_rank(m, R)), np.int32) for m in modules]
        ranks = np.zeros((L, len(modules), B), np.int32)
        scales = np.zeros((L, len(modules), B), np.float32)
        idx = np.full((B, T), -1, np.int32)
        split = {n: self.layout.split_pages(a, plan.adapter_pages[n]) for n, a in adapters.items()}
        keys: list = [None] * B
        for j, seq in enumerate(plan.seqs):
            i = rows[j]
            if seq.adapter is None:
                continue
            keys[i] = (seq.adapter, self._generation.get(seq.adapter, 0))
            ad = adapters[seq.adapter]
            for mi, m in enumerate(modules):
                if m in split[seq.adapter]:
                    own = split[seq.adapter][m]
                    pages[mi][i, :len(own)] = own
                    ranks[:, mi, i] = ad.weights.ranks[:, MODULES.index(m)]
                    scales[:, mi, i] = ad.weights.scales[:, MODULES.index(m)]
            idx[i, :plan.num_new_tokens[j]] = i
        batch = LoraBatch(pages=tuple(pages), ranks=ranks, scales=scales, modules=modules,
                          max_rank=R, mesh=self.mesh)
        self._row_keys = keys
        return idx.reshape(-1), batch

    # -- a step's slot weights (single device) ----------------------------------------------
    def slot_weights(self, kv, batch: LoraBatch, cache: bool):
        """Every layer's weights of the batch's slots, gathered from the pool in a call of their
        own (inside the step, XLA may order a gather after a layer's in-place K/V write, and
        then copies the whole pool to keep its pre-write contents).

        With `cache` (decode), the last step's weights are reused and only rows whose occupant
        changed are re-gathered and written in place: a row's weights are B rows x rank x
        (in + out) x layers of pool pages, 140 MB per step at batch 32 and rank 8 on the default
        model, which cost ~45 ms to gather on the 2-core VM; a row keeps its sequence across
        steps (ModelRunner._decode_rows). A row's key is its adapter and how many times that
        adapter was loaded, so a reload into other (or the same) pages is re-gathered.

        The weights are kept as the pool stores values (uint16 bits for bf16 on CPU; the layers
        decode them): XLA:CPU writes rows into a bf16 array out of place, copying every slot's
        weights (~55 ms per update at batch 32, rank 8, q/k/v/o on the 2-core VM), and into a
        uint16 one in place (~1 ms).
        """
        keys = self._row_keys
        shape = (len(keys), batch.max_rank, batch.modules)
        if not cache:
            self.num_rows_gathered += len(keys)
            return self._gather(kv, batch)
        if self._cached is None or self._cached[0] != shape:
            weights = self._gather(kv, batch)
            self.num_rows_gathered += len(keys)
        else:
            _, old_keys, weights = self._cached
            changed = [i for i, k in enumerate(keys) if k is not None and k != old_keys[i]]
            if changed:
                sel = np.full((_pow2(len(changed)),), changed[0], np.int32)   # pad: repeat a row
                sel[:len(changed)] = changed
                sub = dataclasses.replace(batch, pages=tuple(p[sel] for p in batch.pages))
                weights = self._update(self.layout.cfg, weights, kv, sub, sel)
                self.num_rows_gathered += len(changed)
            keys = [k if k is not None else o for k, o in zip(keys, old_keys)]
        self._cached = (shape, keys, weights)
        return weights


def _as_stored(weights, pool_dtype):
    """Slot weights in the pool's stored dtype (kv_cache.storage_dtype)."""
    return jax.tree.map(lambda w: encode(w, pool_dtype), weights)


def _update_rows(cfg, weights, kv, sub: LoraBatch, rows):
    """Gather `sub`'s slots and write them at batch rows `rows` of the cached slot weights."""
    new = _as_stored(gather_all_layers(cfg, sub, kv.k, kv.v), kv.k.dtype)
    return tuple((a.at[:, rows].set(na), b.at[:, rows].set(nb))
                 for (a, b), (na, nb) in zip(weights, new))


def make_lora_store(model_cfg, config, num_pages: int) -> LoraStore:
    """The engine's store: page layout from the pool, per-adapter page limit from the budget."""
    from jaxserve.lora.pool import PageLayout
    layout = PageLayout(model_cfg, config.page_size, config.max_lora_rank)
    if getattr(config, "tp", 1) > 1:   # adapters sharded with the pool's heads
        from jaxserve.lora.tp import sharded_layout
        from jaxserve.sharding import head_layout
        layout = sharded_layout(layout, head_layout(model_cfg, config.tp), config.tp)
    usable = num_pages - 1
    cap = usable if config.lora_max_pages is None else min(usable, config.lora_max_pages)
    return LoraStore(model_cfg, layout, max_pages=cap)
