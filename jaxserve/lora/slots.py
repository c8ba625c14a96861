"""A step's adapter slots, on the host (numpy only; imports no JAX).

One slot per batch row (S = B; plan sequence j sits in row rows[j]): a row's slot holds its
sequence's adapter, or nothing (rank 0) for a base-model row. The step's program therefore
depends on the batch shape, the adapted modules and the rank bucket only, never on how many
distinct adapters the batch mixes: 1 or 64 adapters in a batch of 64 run the same program at
the same cost. Rows sharing an adapter read its pages twice (a few MB per step at rank 8).
The rank bucket R is the smallest power of two >= the largest rank in the step, at least
MIN_RANK_BUCKET and at most the layout's max_rank: only R rows per slot are gathered and
multiplied. The module set is bucketed too: the attention projections when every adapter of the
step adapts only those, else every projection (MODULE_SETS); a module no adapter of the step has
runs at rank 0. So a step's LoRA part is one of len(rank buckets) x 2 (`lora_buckets`), not one
per subset of the seven projections.
"""
from __future__ import annotations

import numpy as np

from jaxserve.step_builder import LoraSlots, bucket

# Ranks below this pad to it: gathering and multiplying 8 rows instead of 1, 2 or 4 costs little
# next to the base step, and three buckets fewer means three program sets fewer.
MIN_RANK_BUCKET = 8
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def rank_bucket(rank: int, max_rank: int) -> int:
    """The rows gathered per slot for a step whose largest stored rank is `rank`."""
    return bucket(rank, max_rank, lo=MIN_RANK_BUCKET)


def module_sets(modules_order: tuple) -> list[tuple]:
    """The module sets a step may use, smallest first: the attention projections, then all."""
    attn = tuple(m for m in modules_order if m in ATTENTION_MODULES)
    return [attn, tuple(modules_order)] if attn and attn != tuple(modules_order) else [tuple(modules_order)]


def module_set(adapted, modules_order: tuple) -> tuple:
    """The smallest module set holding every module in `adapted`."""
    return next(ms for ms in module_sets(modules_order) if set(adapted) <= set(ms))


def lora_buckets(max_rank: int, modules_order: tuple) -> list[tuple]:
    """Every (rank bucket, module set) a step can have."""
    ranks = sorted({rank_bucket(r, max_rank) for r in range(1, max_rank + 1)})
    return [(R, ms) for R in ranks for ms in module_sets(modules_order)]


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
    modules = module_set({m for a in adapters.values() for m in a.weights.a}, modules_order)
    stored = max(w.shape[1] for a in adapters.values() for w in a.weights.a.values())
    R = rank_bucket(stored, layout.max_rank)
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
