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
from jaxserve.model.kv_cache import KVPages, values
from jaxserve.model.norms import rms_norm

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


def gathered_lora(x, a, b, idx, ranks, scales, *, impl: str = "xla", interpret: bool = False,
                  backend: str | None = None):
    """Per-token gathered LoRA on flat tokens x [T, in] (the Pallas kernels' interface; impl
    "xla" is pallas_kernels.lora's plain per-token gather)."""
    if impl not in IMPLS:
        raise ValueError(f"LoRA impl must be one of {IMPLS}, got {impl!r}")
    from pallas_kernels.lora import gathered_lora as kernel
    a, b = _mask_rows(a, b, ranks)
    return kernel(x, a, b, idx, ranks, scales, impl=impl, interpret=interpret, backend=backend)


def gather_all_layers(cfg, lora: LoraBatch, k_pool, v_pool) -> tuple:
    """Every layer's slot weights, per adapted module: ((a [L, S, R, in], b [L, S, R, out]), ...).

    Done once before the layers: reading adapter pages from the pool inside a layer scan,
    after the layer has scattered its K/V into that pool, makes XLA copy the whole pool every
    layer. Adapter pages are never K/V-written, so the pre-step pool holds exactly the weights
    the layers need.
    """
    layers = jnp.arange(cfg.num_layers)
    return tuple(
        jax.vmap(lambda l, mi=mi, m=m: gather_slots(k_pool, v_pool, l, lora.pages[mi],
                                                     *module_dims(cfg, m), lora.max_rank))(layers)
        for mi, m in enumerate(lora.modules))


def stacked_inputs(cfg, lora: LoraBatch | None, kv: KVPages):
    """The step's per-layer LoRA inputs on a leading layers axis, (ranks, scales[, slot
    weights]), or None for a step without adapters. Single device: the slot weights, pre-gathered
    (LoraRuntime.slot_weights, as the pool stores values) or gathered here; under tensor
    parallelism each layer reads its pages itself (jaxserve/lora/tp.py)."""
    if lora is None:
        return None
    xs = (lora.ranks, lora.scales)
    if lora.mesh is None:
        xs += (jax.tree.map(values, lora.weights) if lora.weights is not None
               else gather_all_layers(cfg, lora, kv.k, kv.v),)
    return xs


class NoLora:
    """The LoRA of a step without adapters: projections are the backend's alone."""

    def project(self, modules, x, p, norm, linear):
        return linear(x, p, norm)

    def adapts(self, modules) -> bool:
        return False


class LayerLora:
    """One layer's multi-LoRA on one device: each adapted part of a projection gets
    scale * (h A^T) B of its row's slot added, h being the projection's (normed) input.

    `delta(x [B, T, in], a [B, R, in], b [B, R, out], idx [B*T], ranks [B], scales [B])` is the
    backend's LoRA matmul pair (shrink, expand)."""

    def __init__(self, cfg, lora: LoraBatch, idx, ranks, scales, slot_weights, delta):
        self.cfg, self.lora, self.idx = cfg, lora, idx
        self.ranks, self.scales = ranks, scales
        self.weights = dict(zip(lora.modules, slot_weights))
        self.delta = delta

    def adapts(self, modules) -> bool:
        return bool(set(modules) & set(self.lora.modules))

    def project(self, modules, x, p, norm, linear):
        ys = linear(x, p, norm)
        if not self.adapts(modules):
            return ys
        h = x if norm is None else rms_norm(x, *norm)
        out = []
        for m, y in zip(modules, ys):
            if m in self.lora.modules:
                mi = self.lora.modules.index(m)
                a, b = self.weights[m]                     # one slot per batch row: [B, R, in/out]
                y = y + self.delta(h, a, b, self.idx, self.ranks[mi], self.scales[mi])
            out.append(y)
        return out


def layer_lora(cfg, lora: LoraBatch | None, lora_idx, kv: KVPages, layer, xs, delta):
    """The LoRA of one layer: NoLora without adapters, LayerLora on one device, the sharded
    form under tensor parallelism. `xs`: this layer's slice of stacked_inputs."""
    if lora is None:
        return NoLora()
    if lora.mesh is not None:
        from jaxserve.lora.tp import TpLayerLora
        return TpLayerLora(cfg, lora, lora_idx, kv.k, kv.v, layer, *xs)
    return LayerLora(cfg, lora, lora_idx, *xs, delta=delta)
