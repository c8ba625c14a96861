"""Gathered multi-LoRA inside the layer: y += scale_s * (x A_s^T) B_s with s = each token's slot.

`gathered_lora` keeps the Pallas kernels' interface (pallas_kernels/lora.py): a [S, R, in] rows
of A, b [S, R, out] B transposed, ranks/scales [S], idx [T] (-1 = base model, adds zero). The
plain-jnp path gathers each token's rows (cost independent of how many slots exist, unlike a
one-hot einsum over slots) and masks rows at or past the token's rank.
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxserve.lora.adapter import module_dims
from jaxserve.lora.pool import LoraBatch, gather_slots

IMPLS = ("xla", "pallas")


def gathered_lora_xla(x, a, b, idx, ranks, scales):
    live = idx >= 0
    slot = jnp.where(live, idx, 0)
    rank = jnp.where(live, ranks[slot], 0)
    scale = jnp.where(live, scales[slot], 0.0)
    v = jnp.einsum("th,trh->tr", x, a[slot], preferred_element_type=jnp.float32)   # shrink
    live_rows = jnp.arange(a.shape[1])[None, :] < rank[:, None]                      # [T, R]
    v = jnp.where(live_rows, v, 0.0) * scale[:, None]
    # B rows past the rank too: pool rows there are whatever the pages hold (0 * NaN = NaN).
    b_rows = jnp.where(live_rows[:, :, None], b[slot], 0)
    y = jnp.einsum("tr,tro->to", v.astype(b.dtype), b_rows, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)                                                        # expand


def gathered_lora(x, a, b, idx, ranks, scales, *, impl: str = "xla", interpret: bool = False):
    if impl == "xla":
        return gathered_lora_xla(x, a, b, idx, ranks, scales)
    if impl == "pallas":
        from pallas_kernels.lora import gathered_lora as kernel
        return kernel(x, a, b, idx, ranks, scales, impl="pallas", interpret=interpret)
    raise ValueError(f"LoRA impl must be one of {IMPLS}, got {impl!r}")


def make_layer_lora(cfg, lora: LoraBatch, lora_idx, k_pool, v_pool, layer, ranks, scales, *,
                    impl: str, interpret: bool, base):
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

    def delta(module: str, x):
        if module not in lora.modules:
            return None
        mi = lora.modules.index(module)
        din, dout = module_dims(cfg, module)
        a, b = gather_slots(k_pool, v_pool, layer, lora.pages[mi], din, dout, lora.max_rank)
        B, T, _ = x.shape
        y = gathered_lora(x.reshape(B * T, din), a.astype(x.dtype), b.astype(x.dtype), lora_idx,
                          ranks[mi], scales[mi], impl=impl, interpret=interpret)
        return y.reshape(B, T, dout)

    def lora_proj(module: str, x, w, b=None):
        y, d = base(x, w, b), delta(module, x)
        return y if d is None else y + d
    lora_proj.delta = delta   # for fused base projections (model/llama.py)
    return lora_proj

