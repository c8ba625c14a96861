"""The runner's LoRA side: copy adapters into pool pages, and build a step's adapter slots.

A load's life: the scheduler's `AdapterCache` picks pages and lists (name, pages) in the plan;
`stage` packs the adapter on the host and starts the host-to-device copy (`jax.device_put` is
asynchronous); `write` scatters it into the donated pool. Loads the step needs are written before
the step is dispatched; prefetches (adapters of requests still waiting) after it, so their copy
overlaps the step and their scatter queues behind it instead of delaying it.
"""
from __future__ import annotations

import jax
import numpy as np

from jaxserve.lora.adapter import MODULES
from jaxserve.lora.pool import LoraBatch, write_pages
from jaxserve.lora.store import LoraStore


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class LoraRuntime:
    def __init__(self, store: LoraStore, max_slots: int, impl: str = "xla"):
        self.store = store
        self.layout = store.layout
        self.max_slots = max_slots          # distinct adapters in one step
        self.impl = impl
        self.num_pages_written = 0
        self.mesh = None                    # set by a tensor-parallel runner

    # -- loads ------------------------------------------------------------------------------
    def stage(self, loads: list[tuple[str, list[int]]]):
        staged = []
        for name, pages in loads:
            data = self.store.packed(name)
            n = _pow2(len(pages))           # few write shapes; padding goes to the null page
            idx = np.zeros((n,), np.int32)
            idx[:len(pages)] = pages
            buf = np.zeros((data.shape[0], n, data.shape[2]), np.float32)
            buf[:, :len(pages)] = data
            staged.append((name, jax.device_put(idx), jax.device_put(buf)))
            self.num_pages_written += len(pages)
        return staged

    def write(self, kv, staged):
        for _, idx, buf in staged:
            kv = write_pages(kv, idx, buf)
        return kv

    # -- a step's slots ---------------------------------------------------------------------
    def build(self, plan, B: int, T: int):
        """(lora_idx [B*T] int32, LoraBatch) for the plan, or (None, None) with no adapter."""
        names = list(plan.adapter_pages)
        if not names:
            return None, None
        if len(names) > self.max_slots:
            raise RuntimeError(f"{len(names)} adapters in one step, max_loras={self.max_slots}")
        S = min(_pow2(len(names)), _pow2(self.max_slots))
        slot_of = {n: i for i, n in enumerate(names)}
        adapters = [self.store.get(n) for n in names]
        modules = tuple(m for m in MODULES if any(m in a.weights.a for a in adapters))
        L = self.layout.cfg.num_layers
        pages = [np.zeros((S, self.layout.pages_per_slot(m)), np.int32) for m in modules]
        ranks = np.zeros((L, len(modules), S), np.int32)
        scales = np.zeros((L, len(modules), S), np.float32)
        for s, (name, ad) in enumerate(zip(names, adapters)):
            split = self.layout.split_pages(ad, plan.adapter_pages[name])
            for j, m in enumerate(modules):
                if m in split:
                    pages[j][s, :len(split[m])] = split[m]
                    ranks[:, j, s] = ad.weights.ranks[:, MODULES.index(m)]
                    scales[:, j, s] = ad.weights.scales[:, MODULES.index(m)]
        idx = np.full((B, T), -1, np.int32)
        for i, seq in enumerate(plan.seqs):
            if seq.adapter is not None:
                idx[i, :plan.num_new_tokens[i]] = slot_of[seq.adapter]
        batch = LoraBatch(pages=tuple(pages), ranks=ranks, scales=scales, modules=modules,
                          max_rank=self.layout.max_rank, mesh=self.mesh)
        return idx.reshape(-1), batch


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
