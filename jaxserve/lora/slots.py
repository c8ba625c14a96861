"""A step's adapter slots, on the host (numpy only; imports no JAX).

One slot per batch row (S = B; plan sequence j sits in row rows[j]): a row's slot holds its
sequence's adapter, or nothing (rank 0) for a base-model row. The step's program therefore
depends on the batch shape, the adapted modules and the rank bucket only, never on how many
distinct adapters the batch mixes: 1 or 64 adapters in a batch of 64 run the same program at
the same cost. Rows sharing an adapter read its pages twice (a few MB per step at rank 8).
The rank bucket R is the smallest power of two >= the largest rank in the step (at most the
layout's max_rank): only R rows per slot are gathered and multiplied.
"""
from __future__ import annotations

import numpy as np

from jaxserve.step_builder import LoraSlots, pow2_at_least


def build_slots(store, generations: dict, modules_order: tuple, plan, B: int, T: int,
                rows: list[int]) -> LoraSlots | None:
    """LoraSlots for the plan's sequences, or None when none has an adapter.

    store: the LoraStore (get(name) -> LoraAdapter, layout); generations: adapter -> how many
    times it was written into the pool (a row's key, so a reload is re-gathered);
    modules_order: every LoRA module in the order adapters index their ranks and scales."""
    names = list(plan.adapter_pages)
    if not names:
        return None
    layout = store.layout
    adapters = {n: store.get(n) for n in names}
    modules = tuple(m for m in modules_order if any(m in a.weights.a for a in adapters.values()))
    stored = max(w.shape[1] for a in adapters.values() for w in a.weights.a.values())
    R = min(pow2_at_least(stored), layout.max_rank)
    L = layout.cfg.num_layers
    pages = [np.zeros((B, layout.pages_for_rank(m, R)), np.int32) for m in modules]
    ranks = np.zeros((L, len(modules), B), np.int32)
    scales = np.zeros((L, len(modules), B), np.float32)
    idx = np.full((B, T), -1, np.int32)
    split = {n: layout.split_pages(a, plan.adapter_pages[n]) for n, a in adapters.items()}
    keys: list = [None] * B
    for j, seq in enumerate(plan.seqs):
        i = rows[j]
        if seq.adapter is None:
            continue
        keys[i] = (seq.adapter, generations.get(seq.adapter, 0))
        ad = adapters[seq.adapter]
        for mi, m in enumerate(modules):
            if m in split[seq.adapter]:
                own = split[seq.adapter][m]
                pages[mi][i, :len(own)] = own
                ranks[:, mi, i] = ad.weights.ranks[:, modules_order.index(m)]
                scales[:, mi, i] = ad.weights.scales[:, modules_order.index(m)]
        idx[i, :plan.num_new_tokens[j]] = i
    return LoraSlots(idx=idx.reshape(-1), pages=tuple(pages), ranks=ranks, scales=scales,
                     modules=modules, max_rank=R, row_keys=keys)
