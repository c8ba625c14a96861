"""Gathered multi-LoRA inside the layer: y += scale_s * (x A_s^T) B_s with s = each token's slot.

`gathered_lora` keeps the Pallas kernels' interface (pallas_kernels/lora.py): a [S, R, in] rows
of A, b [S, R, out] B transposed, ranks/scales [S], idx [T] (-1 = base model, adds zero). The
XLA path (lora_by_slot_xla) multiplies every token by the batch's few slots densely and keeps
each token's own slot (faster on CPU than per-token gathers: pallas_kernels.lora's
lora_shrink/lora_expand and gathered_lora_ref); the Pallas kernels gather. Rows at or past a
slot's rank are masked.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxserve.lora.adapter import module_dims
from jaxserve.lora.pool import LoraBatch, gather_slots

IMPLS = ("xla", "pallas")


def lora_by_slot_xla(x, a, b, idx, ranks, scales):
    """The CPU path: every token against every slot's A in one dense matmul, then each token
    keeps only its own slot's row before the expand.

    S (distinct adapters in one batch, at most max_loras) is small, so the extra
    T*S*R*(in+out) FLOPs are a few percent of the base projections, whereas per-token gathers
    of A and B rows (pallas_kernels.lora.lora_shrink/expand) are batched mat-vecs that XLA:CPU
    runs slowly.
    """
    S, R, _ = a.shape
    live = jnp.arange(R)[None, :] < ranks[:, None]                            # [S, R]
    a = jnp.where(live[:, :, None], a, 0)           # rows past rank may hold NaN garbage
    b = jnp.where(live[:, :, None], b, 0)
    v = jnp.einsum("th,srh->tsr", x, a, preferred_element_type=jnp.float32)    # [T, S, R]
    own = idx[:, None] == jnp.arange(S)[None, :]                              # [T, S]; -1: none
    v = jnp.where(own[:, :, None], v * scales[None, :, None], 0.0)
    y = jnp.einsum("tsr,sro->to", v.astype(b.dtype), b, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def gathered_lora(x, a, b, idx, ranks, scales, *, impl: str = "xla", interpret: bool = False):
    if impl == "xla":
        return lora_by_slot_xla(x, a, b, idx, ranks, scales)
    if impl == "pallas":
        from pallas_kernels.lora import gathered_lora as kernel
        return kernel(x, a, b, idx, ranks, scales, impl="pallas", interpret=interpret)
    raise ValueError(f"LoRA impl must be one of {IMPLS}, got {impl!r}")


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
        a, b = slot_weights[module]
        B, T, _ = x.shape
        y = gathered_lora(x.reshape(B * T, din), a.astype(x.dtype), b.astype(x.dtype), lora_idx,
                          ranks[mi], scales[mi], impl=impl, interpret=interpret)
        return y.reshape(B, T, dout)

    def lora_proj(module: str, x, w, b=None):
        y, d = base(x, w, b), delta(module, x)
        return y if d is None else y + d
    lora_proj.delta = delta   # for fused base projections (model/llama.py)
    return lora_proj

