"""The decoder of the Llama family (Llama 2/3, Mistral, Qwen2, SmolLM), Qwen3 and Gemma 2/3 as
pure functions over prepared params.

One path of plain math; what a family changes is a static branch on a ModelConfig field or on
which params it has: per-head q/k norms (Qwen3, Gemma 3), unit-offset norms (x_normed * (1 + w)),
the scaled embedding, the norms on the attention and MLP outputs, GeGLU, the attention scale and
soft-capping (Gemma), and per-layer windows and RoPE bases, picked in-graph from the layer index
(the index is traced in the scan and in the per-layer programs). Everything device-specific is an op of `backend` (jaxserve/backends):
how a projection multiplies (`linear`, `gated_mlp`, `lm_head`), how K/V are written and read
(`write_kv`, `attention`) and the LoRA matmuls (`lora_delta`). The backend also decides how a
step runs: `forward` scans the layers in one program; `embed` -> `decoder_layer` x L -> `head`
are the same step in pieces, one device call each (jaxserve/backends/programs.py).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxserve.config import ModelConfig, rope_inv_freq
from jaxserve.lora.apply import layer_lora, stacked_inputs
from jaxserve.model.attention import FULL_WINDOW
from jaxserve.model.kv_cache import KVPages, StepInput
from jaxserve.model.norms import norm_weight, rms_norm
from jaxserve.model.params import DOWN, GATE_UP, O, QKV, LayerParams, Params

__all__ = ["rms_norm", "rope_tables", "apply_rope", "step_rope", "layer_rope", "layer_window",
           "embed", "decoder_layer", "forward", "head"]


def rope_tables(positions, inv_freq):
    """(cos, sin) [B, T, D/2] float32 of the rotation angles positions * inv_freq."""
    ang = positions.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x, tables):
    """x: [B, T, heads, D]; HF's rotate-half convention (first half / second half pairs).
    `tables`: rope_tables(positions, inv_freq)."""
    cos, sin = tables
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def local_rope_inv_freq(cfg: ModelConfig):
    """Inverse frequencies of the layers in cfg.layer_rope_local: base rope_local_theta, no
    scaling (Gemma 3's sliding layers)."""
    return rope_inv_freq(dataclasses.replace(cfg, rope_theta=cfg.rope_local_theta,
                                             rope_type="default", rope_factor=1.0))


def step_rope(cfg: ModelConfig, step: StepInput):
    """The step's RoPE tables (computed once per step, shared by every layer): (cos, sin), each
    [B, T, D/2]; a model with local-RoPE layers gets both bases stacked, [2, B, T, D/2]
    (0: rope_theta, 1: rope_local_theta), and each layer takes its own (layer_rope)."""
    tables = rope_tables(step.positions, jnp.asarray(rope_inv_freq(cfg), jnp.float32))
    if not any(cfg.layer_rope_local):
        return tables
    local = rope_tables(step.positions, jnp.asarray(local_rope_inv_freq(cfg), jnp.float32))
    return tuple(jnp.stack(pair) for pair in zip(tables, local))


def layer_rope(cfg: ModelConfig, rope, layer):
    """Layer `layer`'s (cos, sin) out of step_rope's tables (`layer` may be traced)."""
    if not any(cfg.layer_rope_local):
        return rope
    which = jnp.asarray(cfg.layer_rope_local, jnp.int32)[layer]
    return tuple(t[which] for t in rope)


def layer_window(cfg: ModelConfig, layer):
    """Layer `layer`'s sliding window for backend.attention: None or the int every layer
    shares; where layers differ, an int32 scalar picked in-graph from the static per-layer
    table (FULL_WINDOW for a full-attention layer), so one program serves every layer."""
    windows = set(cfg.layer_windows) or {None}
    if len(windows) == 1:
        return windows.pop()
    table = [FULL_WINDOW if w is None else w for w in cfg.layer_windows]
    return jnp.asarray(table, jnp.int32)[layer]


def gelu_tanh(x):
    """GELU, tanh approximation (HF's gelu_pytorch_tanh), computed in float32 as torch does for
    bfloat16 and rounded once."""
    return jax.nn.gelu(x.astype(jnp.float32), approximate=True).astype(x.dtype)


ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": gelu_tanh}


def embed(params: Params, cfg: ModelConfig, step: StepInput):
    x = params.embed[step.tokens]
    if cfg.embed_scale:   # HF casts sqrt(hidden) to the activation dtype first
        x = x * jnp.asarray(cfg.hidden_size ** 0.5, x.dtype)
    return x


def _layer(cfg: ModelConfig, backend, step: StepInput, x, kv: KVPages, lp: LayerParams, layer,
           lora_xs):
    B, T, _ = x.shape
    D, eps = cfg.head_dim, cfg.rms_norm_eps

    def nw(w):   # a norm weight as rms_norm takes it (1 + w in float32 for Gemma's norms)
        return norm_weight(w, cfg.norm_unit_offset)

    # LoRA is added to each projection's output: to q/k before RoPE and to k/v before the write.
    lora = layer_lora(cfg, step.lora, step.lora_idx, kv, layer, lora_xs, backend.lora_delta)
    with jax.named_scope("attention"):
        q, k, v = lora.project(QKV, x, lp.qkv, (nw(lp.attn_norm), eps), backend.linear)
        q, k = q.reshape(B, T, cfg.num_heads, D), k.reshape(B, T, cfg.num_kv_heads, D)
        if lp.q_norm is not None:    # the family has per-head q/k norms (a static fact)
            q, k = rms_norm(q, nw(lp.q_norm), eps), rms_norm(k, nw(lp.k_norm), eps)
        rope = layer_rope(cfg, step.rope, layer)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        kv = backend.write_kv(kv, layer, k.reshape(B * T, cfg.num_kv_heads, D),
                              v.reshape(B * T, cfg.num_kv_heads, D), step)
        attn = backend.attention(q, kv, layer, step,
                                 scale=D ** -0.5 if cfg.attn_scale is None else cfg.attn_scale,
                                 sliding_window=layer_window(cfg, layer),
                                 softcap=cfg.attn_softcap)
        (o,) = lora.project(O, attn.reshape(B, T, cfg.q_size), lp.o, None, backend.linear)
        if cfg.sandwich_norms:
            o = rms_norm(o, nw(lp.post_attn_norm), eps)
        x = x + o
    with jax.named_scope("mlp"):
        if lp.router is not None:    # a mixture of experts (a static fact of the family)
            d = backend.moe(x, lp, cfg)
        else:
            act = backend.gated_mlp(x, lp.gate_up, (nw(lp.mlp_norm), eps), lora, GATE_UP,
                                    ACTIVATIONS[cfg.mlp_activation])
            (d,) = lora.project(DOWN, act, lp.down, None, backend.linear)
        if cfg.sandwich_norms:
            d = rms_norm(d, nw(lp.post_mlp_norm), eps)
        x = x + d
    return x, kv


def decoder_layer(cfg: ModelConfig, backend, lp: LayerParams, x, kv: KVPages, layer,
                  step: StepInput):
    """One decoder layer on its own (unstacked) params: (x, kv) -> (x, kv). `layer` (an int32
    scalar, may be traced) selects the pool's layer; `step.rope` must be set (step_rope) and the
    step's LoRA slot weights pre-gathered (LoraBatch.weights)."""
    lora_xs = stacked_inputs(cfg, step.lora, kv)
    if lora_xs is not None:
        lora_xs = jax.tree.map(lambda a: a[layer], lora_xs)
    return _layer(cfg, backend, step, x, kv, lp, layer, lora_xs)


def hidden_states(params: Params, cfg: ModelConfig, backend, step: StepInput, kv: KVPages):
    """Last layer's output [B, T, H] and the updated pool: one scan over the stacked layers."""
    x = embed(params, cfg, step)
    step = step if step.rope is not None else _with_rope(cfg, step)

    def body(carry, xs):
        x, kv = carry
        lp, layer, lora_xs = xs
        return _layer(cfg, backend, step, x, kv, lp, layer, lora_xs), None

    layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    (x, kv), _ = jax.lax.scan(body, (x, kv),
                              (params.layers, layers, stacked_inputs(cfg, step.lora, kv)))
    return x, kv


def _with_rope(cfg: ModelConfig, step: StepInput) -> StepInput:
    return dataclasses.replace(step, rope=step_rope(cfg, step))


def head(params: Params, cfg: ModelConfig, backend, x, step: StepInput, all_logits: bool = False):
    """Last layer's output [B, T, H] -> logits: [B, V] float32 at each row's `logits_index`, or
    [B, T, V] when all_logits."""
    h = rms_norm(x, norm_weight(params.final_norm, cfg.norm_unit_offset), cfg.rms_norm_eps)
    if not all_logits:
        h = jnp.take_along_axis(h, step.logits_index[:, None, None], axis=1)[:, 0]
    logits = backend.lm_head(h, params)
    if cfg.final_softcap is not None:
        logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
    return logits


def forward(params: Params, cfg: ModelConfig, backend, step: StepInput, kv: KVPages, *,
            all_logits: bool = False):
    """Returns (logits, kv). logits: [B, V] float32 at each row's `logits_index`, or
    [B, T, V] when all_logits."""
    x, kv = hidden_states(params, cfg, backend, step, kv)
    return head(params, cfg, backend, x, step, all_logits), kv
