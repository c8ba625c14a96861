"""Multi-LoRA inside the layer: y += scale_i * (x A_i^T) B_i, with i the adapter of each row.

The runner gives every batch row its own slot (jaxserve/lora/runtime.py), so the XLA path
(`lora_by_row_xla`) is a batched shrink and expand over rows: its cost is that of one adapter
per row whatever the number of distinct adapters in the batch. The Pallas kernels
(pallas_kernels/lora.py) keep the gathered interface: a [S, R, in] rows of A, b [S, R, out] B
transposed, ranks/scales [S], idx [T] per token (-1 = base model, adds zero); the runner's
rows are their slots. Rows at or past a slot's rank (zeros, or null-page garbage) are masked.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxserve.lora.adapter import module_dims
from jaxserve.lora.pool import LoraBatch, gather_slots

IMPLS = ("xla", "pallas")


def _mask_rows(a, b, ranks):
    live = jnp.arange(a.shape[1])[None, :] < ranks[:, None]                   # [S, R]
    return jnp.where(live[:, :, None], a, 0), jnp.where(live[:, :, None], b, 0)


def lora_by_row_xla(x, a, b, ranks, scales):
    """x [B, T, in]; a [B, R, in], b [B, R, out], ranks/scales [B] for each row -> [B, T, out].

    A base-model row has rank 0 and gets exactly zero. Shrink is a batched matmul over rows;
    the expand is a batched matmul for decode (T == 1) and a multiply-reduce over the few rank
    rows for prefill, where XLA:CPU's batched dot with an 8..64-wide contraction ran 2-4x slower
    (measured at B=8, T=64 and B=4, T=256, ranks 8 and 16).
    """
    a, b = _mask_rows(a, b, ranks)
    v = jnp.einsum("btf,brf->btr", x, a.astype(x.dtype), preferred_element_type=jnp.float32)
    v = v * scales[:, None, None]
    if x.shape[1] == 1:
        y = jnp.einsum("btr,bro->bto", v, b.astype(jnp.float32))
    else:
        y = (v[..., None] * b.astype(jnp.float32)[:, None]).sum(axis=-2)
    return y.astype(x.dtype)


def gathered_lora(x, a, b, idx, ranks, scales, *, impl: str = "xla", interpret: bool = False):
    """Per-token gathered LoRA on flat tokens x [T, in] (the Pallas kernels' interface; impl
    "xla" is pallas_kernels.lora's plain per-token gather)."""
    if impl not in IMPLS:
        raise ValueError(f"LoRA impl must be one of {IMPLS}, got {impl!r}")
    from pallas_kernels.lora import gathered_lora as kernel
    a, b = _mask_rows(a, b, ranks)
    return kernel(x, a, b, idx, ranks, scales, impl=impl, interpret=interpret)


def gather_all_layers(cfg, lora: LoraBatch, k_pool, v_pool) -> tuple:
    """Every layer's slot weights, per adapted module: ((a [L, S, R, in], b [L, S, R, out]), ...).

    Done once before the layer scan: reading adapter pages from the pool inside the scan,
    after the layer has scattered its K/V into that pool, makes XLA copy the whole pool every
    layer (measured ~15x slower steps on CPU). Adapter pages are never K/V-written, so the
    pre-step pool holds exactly the weights the layers need.
    """
    layers = jnp.arange(cfg.num_layers)
    return tuple(
        jax.vmap(lambda l, mi=mi, m=m: gather_slots(k_pool, v_pool, l, lora.pages[mi],
                                                     *module_dims(cfg, m), lora.max_rank))(layers)
        for mi, m in enumerate(lora.modules))


def make_layer_lora(cfg, lora: LoraBatch, lora_idx, k_pool, v_pool, layer, ranks, scales,
                    slot_weights=None, *, impl: str, interpret: bool, base):
    """A function lora_proj(module, x[B, T, in], w, b) -> base(x, w, b) + LoRA [B, T, out], for one
    layer (`base`: the model's projection). Under tensor parallelism (`lora.mesh`), see
    jaxserve/lora/tp.py: row-parallel projections then add LoRA before the base all-reduce.

    ranks/scales: this layer's [len(lora.modules), S]. Weights come from the pool pages as it is
    at the time of the call (adapter pages are never written by the step's K/V writes).
    """
    if lora.mesh is not None:
        from jaxserve.lora.tp import make_layer_lora_tp
        return make_layer_lora_tp(cfg, lora, lora_idx, k_pool, v_pool, layer, ranks, scales,
                                  base=base)

    if slot_weights is None:   # not pre-gathered (see gather_all_layers): read the pool now
        slot_weights = tuple(gather_slots(k_pool, v_pool, layer, lora.pages[mi],
                                          *module_dims(cfg, m), lora.max_rank)
                             for mi, m in enumerate(lora.modules))
    slot_weights = dict(zip(lora.modules, slot_weights))

    def delta(module: str, x):
        if module not in lora.modules:
            return None
        mi = lora.modules.index(module)
        din, dout = module_dims(cfg, module)
        a, b = slot_weights[module]                 # one slot per batch row: [B, R, in/out]
        B, T, _ = x.shape
        if impl == "xla":
            return lora_by_row_xla(x, a, b, ranks[mi], scales[mi])
        y = gathered_lora(x.reshape(B * T, din), a.astype(x.dtype), b.astype(x.dtype), lora_idx,
                          ranks[mi], scales[mi], impl=impl, interpret=interpret)
        return y.reshape(B, T, dout)

    def lora_proj(module: str, x, w, b=None):
        y, d = base(x, w, b), delta(module, x)
        return y if d is None else y + d
    lora_proj.delta = delta   # for fused base projections (model/llama.py)
    return lora_proj

