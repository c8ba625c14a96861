"""The backend boundary, and its plain-XLA implementation (runs on every JAX platform).

A backend owns everything device-specific about a step:
  storage    how the KV pool is held (`init_pool`)
  weights    what the layer math reads, prepared from the canonical weights (`prepare`:
             fused, per part, per layer, packed, sharded)
  ops        `linear`, `gated_mlp`, `lm_head`, `write_kv`, `attention`, `lora_delta`
  the step   one scanned program or one call per layer (`layer_loop`; jaxserve/backends/
             programs.py compiles either)
The model (jaxserve/model/llama.py) is one path of plain math over these ops.

`linear` dispatches on the weight's type, as jax-llm-examples' einsum does on a quantized array
and vLLM's linear layers do through their "quant method": a plain array is an einsum here; a
backend's own weight type (the CPU backend's AMX tile layout) its own kernel. A quantized linear
(int8/fp8 weights with scales) is one more weight type: `prepare` makes it from the canonical
weights and `matmul` learns its case; the model does not change.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxserve import sharding
from jaxserve.backends import moe_mesh
from jaxserve.config import ModelConfig
from jaxserve.lora.apply import lora_by_row_xla
from jaxserve.model import params as params_lib
from jaxserve.model.attention import paged_attention_xla, write_kv
from jaxserve.model.kv_cache import KVPages, StepInput, init_kv_pages
from jaxserve.model import moe as moe_lib
from jaxserve.model.norms import norm_weight, rms_norm
from jaxserve.model.params import Linear, Params
from jaxserve.model.weights import Weights

LAYER_LOOPS = ("scan", "per-layer")


class XlaBackend:
    """Plain XLA ops; the reference the other backends agree with. Tensor parallel when given a
    mesh: weights and pool sharded by jaxserve.sharding's table, projections kept one array per
    part (each sharded on its own output axis)."""

    name = "xla"

    def __init__(self, cfg: ModelConfig, dtype=jnp.float32, *, mesh=None,
                 layer_loop: str = "scan", ep: int = 1):
        if layer_loop not in LAYER_LOOPS:
            raise ValueError(f"unknown layer loop {layer_loop!r}; choose from {LAYER_LOOPS}")
        if layer_loop == "per-layer" and mesh is not None:
            raise ValueError("layer_loop 'per-layer' runs unsharded; use 'scan' with tp > 1")
        self.cfg, self.dtype, self.mesh, self.layer_loop = cfg, jnp.dtype(dtype), mesh, layer_loop
        self.why = "constructed directly"    # why this backend runs (set by select)
        self.tp = 1 if mesh is None else mesh.shape[sharding.TP]
        # experts split by whole experts over the mesh (ep = tp) or inside each expert (ep 1)
        sharding.check_parallel(cfg, self.tp, ep)
        self.ep = ep
        # the model as run on the mesh: heads padded or replicated to divide tp
        self.run_config = cfg if mesh is None else sharding.head_layout(cfg, self.tp).config

    # -- what is in use, for the start-up log ----------------------------------------------------
    def describe(self) -> str:
        tp = f", tp={self.tp}" if self.mesh is not None else ""
        if self.mesh is not None and self.cfg.num_experts:
            tp += f", ep={self.ep}"
        return (f"{self.name} backend on {jax.default_backend()} ({self.dtype.name}, "
                f"layers: {self.layer_loop}{tp}): {self.kernels()}")

    def kernels(self) -> str:
        """What computes attention, LoRA and the matmuls, in words."""
        return "attention and LoRA in plain XLA"

    # -- storage -------------------------------------------------------------------------------
    def pool_dtype(self):
        return self.dtype

    def init_pool(self, num_pages: int, page_size: int) -> KVPages:
        """The empty pool; under tp created sharded (each device zeroes only its KV heads)."""
        if self.mesh is None:
            return init_kv_pages(self.run_config, num_pages, page_size, self.pool_dtype())
        c = self.run_config
        shape = (c.num_layers, c.num_kv_heads, num_pages, page_size, c.head_dim)
        return sharding.zeros_kv(shape, self.pool_dtype(), self.mesh)

    # -- weights -------------------------------------------------------------------------------
    def placement(self) -> sharding.Placement:
        """Where `prepare` wants the canonical weights: the loader creates them there
        (jaxserve.loader.load_model(placement=...)), so `prepare` moves nothing."""
        return sharding.placement(self.cfg, self.mesh, self.ep)

    def prepare(self, weights: Weights, *, consume: bool = False) -> Params:
        """Canonical weights -> what the layers read. One device: q|k|v and gate|up fused (fewer,
        wider matmuls); per layer when the step runs one call per layer. Tensor parallel: the
        canonical arrays sharded, one per part (arrays already in `placement()` are used as
        they are). consume: the caller gives `weights` up: each canonical array is dropped from
        it as soon as its prepared form exists, so the model is not held twice (arrays anyone
        else still references stay alive)."""
        if self.mesh is not None:
            layout = sharding.head_layout(self.cfg, self.tp)
            placed = sharding.shard_weights(weights, self.cfg, self.mesh, layout, ep=self.ep)
            if consume:
                params_lib.empty(weights)
            return params_lib.from_weights(placed, fuse=False)
        if self.layer_loop == "per-layer":
            return params_lib.from_weights_per_layer(weights, consume=consume)
        return params_lib.from_weights(weights, fuse=True, consume=consume)

    # -- ops -----------------------------------------------------------------------------------
    def matmul(self, x, w):
        """x [..., in] @ w -> float32 [..., out], for one weight as `prepare` stored it."""
        return jnp.einsum("...h,ho->...o", x, w, preferred_element_type=jnp.float32)

    def linear(self, x, p: Linear, norm=None) -> list:
        """Each part of x @ W (+ bias) in x's dtype. norm = (weight, eps): of rms_norm(x)."""
        if norm is not None:
            x = rms_norm(x, *norm)
        y = [self.matmul(x, w) for w in p.w] if isinstance(p.w, tuple) else self.matmul(x, p.w)
        return split_parts(y, p, x.dtype)

    def gated_mlp(self, x, p: Linear, norm, lora, modules, act):
        """act(gate) * up of the two parts of p (with their LoRA), in x's dtype."""
        g, u = lora.project(modules, x, p, norm, self.linear)
        return act(g) * u

    def moe(self, x, lp, cfg: ModelConfig):
        """The mixture-of-experts MLP, in place of gated_mlp + down: x [B, T, H] -> [B, T, H] in
        x's dtype. The pre-MLP norm, the router's logits (rounded to x's dtype, as the HF
        layer's linear gives them), each token's top-k experts (jaxserve/model/moe.py route)
        and their weighted SwiGLUs as grouped matmuls over the tokens sorted by expert
        (moe.expert_mlp)."""
        B, T, H = x.shape
        h = rms_norm(x, norm_weight(lp.mlp_norm, cfg.norm_unit_offset), cfg.rms_norm_eps)
        h = h.reshape(B * T, H)
        logits = jnp.einsum("nh,he->ne", h, lp.router, preferred_element_type=jnp.float32)
        weights, experts = moe_lib.route(logits.astype(x.dtype), cfg.experts_per_token,
                                         cfg.moe_renormalize)
        e = lp.experts
        if self.mesh is None:
            y = moe_lib.expert_mlp(h, weights, experts, e.gate, e.up, e.down, cfg.mlp_activation)
        else:   # tokens and routing replicated; each device's experts (or slices), one psum
            y = moe_mesh.expert_mlp(h, weights, experts, e.gate, e.up, e.down,
                                    cfg.mlp_activation, mesh=self.mesh, ep=self.ep)
        return y.astype(x.dtype).reshape(B, T, H)

    def lm_head(self, h, params: Params):
        """h [..., H] -> float32 logits [..., V] (tied: against the embedding, no transpose)."""
        if params.lm_head is None:
            return jnp.einsum("...h,vh->...v", h, params.embed, preferred_element_type=jnp.float32)
        return self.matmul(h, params.lm_head)

    def write_kv(self, kv: KVPages, layer, k, v, step: StepInput) -> KVPages:
        kp, vp = write_kv(kv.k, kv.v, k, v, step.slot_pages, step.slot_offsets, layer=layer)
        return KVPages(k=kp, v=vp)

    def attention(self, q, kv: KVPages, layer, step: StepInput, *, scale, sliding_window,
                  softcap=None):
        """q [B, T, Hq, D] over layer `layer` of the pool -> [B, T, Hq, D] in q's dtype.
        sliding_window: None, an int, or an int32 scalar that may be traced (a mixed model's
        layer window, FULL_WINDOW for its full layers); softcap: None or a static float (each
        score s -> softcap * tanh(s / softcap) before masking). See model/attention.py."""
        return paged_attention_xla(q, kv.k, kv.v, step.block_tables, step.kv_lens,
                                   step.positions, scale=scale, sliding_window=sliding_window,
                                   softcap=softcap, layer=layer)

    def lora_delta(self, x, a, b, idx, ranks, scales):
        """LoRA of each batch row's slot: x [B, T, in], a [B, R, in], b [B, R, out]."""
        return lora_by_row_xla(x, a, b, ranks, scales)

    # -- programs ------------------------------------------------------------------------------
    def min_decode_rows(self) -> int:
        """Fewest rows a decode step is padded to. XLA:CPU runs a one-row bfloat16 matmul as a
        slow matrix-vector product: bfloat16 decode on CPU pads to two rows."""
        return 2 if self.dtype == jnp.bfloat16 and jax.default_backend() == "cpu" else 1

    def attention_reads_padded_pages(self, prefill: bool) -> bool:
        """Whether attention's cost grows with the block table's width (pages past a row's
        kv_len). XLA's gather reads every page of the table, so the step builder buckets the
        width to the step's longest row; a backend whose kernels stop at kv_len returns False
        and gets one width (fewer programs, jaxserve/step_builder.py)."""
        return True


def split_parts(y, p: Linear, dtype) -> list:
    """A projection's float32 product (one array over all parts, or a list of one per part) ->
    each part in `dtype`, with its bias."""
    if not isinstance(y, list):
        y, start, parts = y, 0, []
        for size in p.sizes:
            parts.append(y[..., start:start + size])
            start += size
        y = parts
    ys = [part.astype(dtype) for part in y]
    if p.b is None:
        return ys
    return [part if b is None else part + b.astype(part.dtype) for part, b in zip(ys, p.b)]
