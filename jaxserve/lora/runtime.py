"""The runner's LoRA side: copy adapters into pool pages, and build a step's adapter slots.

A load's life: the scheduler's `AdapterCache` picks pages and lists (name, pages) in the plan;
`stage` packs the adapter on the host and starts the host-to-device copy (`jax.device_put` is
asynchronous); `write` scatters it into the donated pool. Loads the step needs are written before
the step is launched; prefetches (adapters of requests still waiting) after it, so their copy
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
from jaxserve.step_builder import LoraSlots, pow2_at_least
from jaxserve.lora.slots import build_slots, lora_buckets
from jaxserve.model.kv_cache import stored


# Rows of the cached decode slot weights re-gathered per call (LoraRuntime.slot_weights): a fixed
# size, so the update is one program per step shape, not one per number of changed rows.
UPDATE_ROWS = 8


class LoraRuntime:
    def __init__(self, store: LoraStore):
        self.store = store
        self.layout = store.layout
        self.num_pages_written = 0
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
        return [(name, jax.device_put(idx), jax.device_put(buf))
                for name, idx, buf in self.stage_host(loads)]

    def stage_host(self, loads: list[tuple[str, list[int]]]):
        """The loads as host arrays: (name, page indices [n], packed pages [L, n, page_elems])."""
        staged = []
        for name, pages in loads:
            n = pow2_at_least(len(pages))           # few write shapes; padding goes to the null page
            idx = np.zeros((n,), np.int32)
            idx[:len(pages)] = pages
            staged.append((name, idx, self.store.packed(name, n)))
            self.num_pages_written += len(pages)
            self._generation[name] = self._generation.get(name, 0) + 1
        return staged

    def write(self, kv, staged):
        for _, idx, buf in staged:
            kv = self._write(kv, idx, buf)
        return kv

    # -- a step's slots ---------------------------------------------------------------------
    def slots(self, plan, B: int, T: int, rows: list[int]):
        """The plan's adapter slots (jaxserve/lora/slots.py), keyed by each adapter's current
        load generation."""
        return build_slots(self.store, self._generation, MODULES, plan, B, T, rows)

    def buckets(self) -> list[tuple]:
        """Every (rank bucket, module set) a step's slots can have (jaxserve/lora/slots.py)."""
        return lora_buckets(self.layout.max_rank, MODULES)

    # -- warm-up (jaxserve/runner.py): every program a load or a step's slots can compile -----
    def empty_slots(self, B: int, T: int, max_rank: int, modules: tuple) -> LoraSlots:
        """Slots of shape (B, T, max_rank, modules) holding no adapter (every page the null
        page, every rank 0)."""
        L = self.layout.cfg.num_layers
        return LoraSlots(
            idx=np.full((B * T,), -1, np.int32),
            pages=tuple(np.zeros((B, self.layout.pages_for_rank(m, max_rank)), np.int32)
                        for m in modules),
            ranks=np.zeros((L, len(modules), B), np.int32),
            scales=np.zeros((L, len(modules), B), np.float32),
            modules=modules, max_rank=max_rank, row_keys=[None] * B)

    def load_sizes(self) -> list[int]:
        """The page counts `stage` pads a load to: powers of two up to the largest adapter
        (every module at max_rank, or the store's page cap)."""
        most = min(self.store.max_pages,
                   sum(self.layout.pages_for_rank(m, self.layout.max_rank) for m in MODULES))
        return sorted({pow2_at_least(n) for n in range(1, max(most, 1) + 1)})

    def warm_loads(self, kv):
        """Run the pool write of every load size, writing zeros into the null page."""
        L, E = self.layout.cfg.num_layers, self.layout.page_elems
        for n in self.load_sizes():
            kv = self._write(kv, jax.device_put(np.zeros((n,), np.int32)),
                             jax.device_put(np.zeros((L, n, E), np.float32)))
        return kv

    def warm_update(self, kv, batch: LoraBatch):
        """Run the cached decode weights' row update for this shape (after a step of it, which
        gathered them), then forget the cache (warm-up rows hold null-page contents)."""
        if self._cached is not None:
            _, keys, weights = self._cached
            n = min(len(keys), UPDATE_ROWS)
            sel = np.zeros((n,), np.int32)
            sub = dataclasses.replace(batch, pages=tuple(p[sel] for p in batch.pages))
            self._update(self.layout.cfg, weights, kv, sub, sel)
        self._cached = None

    # -- a step's slot weights (single device) ----------------------------------------------
    def slot_weights(self, kv, batch: LoraBatch, row_keys: list, cache: bool):
        """Every layer's weights of the batch's slots, gathered from the pool in a call of their
        own (inside the step, XLA may order a gather after a layer's in-place K/V write, and
        then copies the whole pool to keep its pre-write contents).

        With `cache` (decode), the last step's weights are reused and only rows whose occupant
        changed are re-gathered and written in place: a row's weights are B rows x rank x
        (in + out) x layers of pool pages, 140 MB per step at batch 32 and rank 8 on the default
        model, which cost ~45 ms to gather on the 2-core VM; a row keeps its sequence across
        steps (StepBuilder._decode_rows). A row's key is its adapter and how many times that
        adapter was loaded, so a reload into other (or the same) pages is re-gathered.

        The weights are kept as the pool stores values (uint16 bits for bf16 on CPU; the layers
        decode them): XLA:CPU writes rows into a bf16 array out of place, copying every slot's
        weights (~55 ms per update at batch 32, rank 8, q/k/v/o on the 2-core VM), and into a
        uint16 one in place (~1 ms).
        """
        keys = row_keys
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
            n = min(len(keys), UPDATE_ROWS)
            for s in range(0, len(changed), n):   # n rows per call (a fixed program shape)
                part = changed[s:s + n]
                sel = np.full((n,), part[0], np.int32)   # pad: repeat a row
                sel[:len(part)] = part
                sub = dataclasses.replace(batch, pages=tuple(p[sel] for p in batch.pages))
                weights = self._update(self.layout.cfg, weights, kv, sub, sel)
                self.num_rows_gathered += len(part)
            keys = [k if k is not None else o for k, o in zip(keys, old_keys)]
        self._cached = (shape, keys, weights)
        return weights


def _as_stored(weights, pool_dtype):
    """Slot weights as the pool stores values (kv_cache.stored)."""
    return jax.tree.map(lambda w: stored(w, pool_dtype), weights)


def _update_rows(cfg, weights, kv, sub: LoraBatch, rows):
    """Gather `sub`'s slots and write them at batch rows `rows` of the cached slot weights."""
    new = _as_stored(gather_all_layers(cfg, sub, kv.k, kv.v), kv.k.dtype)
    return tuple((a.at[:, rows].set(na), b.at[:, rows].set(nb))
                 for (a, b), (na, nb) in zip(weights, new))


def make_lora_store(model_cfg, config, num_pages: int) -> LoraStore:
    """The engine's store: page layout from the pool, per-adapter page limit from the budget,
    the pool's dtype (the model's) as the serving dtype adapter weights must fit."""
    from jaxserve.dtypes import DTYPES
    from jaxserve.lora.pool import PageLayout
    layout = PageLayout(model_cfg, config.page_size, config.max_lora_rank)
    if getattr(config, "tp", 1) > 1:   # adapters sharded with the pool's heads
        from jaxserve.lora.tp import sharded_layout
        from jaxserve.sharding import head_layout
        layout = sharded_layout(layout, head_layout(model_cfg, config.tp), config.tp)
    usable = num_pages - 1
    cap = usable if config.lora_max_pages is None else min(usable, config.lora_max_pages)
    return LoraStore(model_cfg, layout, max_pages=cap, dtype=DTYPES.get(getattr(config, "dtype", None)))
