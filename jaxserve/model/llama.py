"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM) as pure functions over prepared params.

One path of plain math. Everything device-specific is an op of `backend` (jaxserve/backends):
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
from jaxserve.model.kv_cache import KVPages, StepInput
from jaxserve.model.norms import rms_norm
from jaxserve.model.params import DOWN, GATE_UP, O, QKV, LayerParams, Params

__all__ = ["rms_norm", "rope_tables", "apply_rope", "embed", "decoder_layer", "forward", "head"]


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


def step_rope(cfg: ModelConfig, step: StepInput):
    """The step's RoPE tables (computed once per step, shared by every layer)."""
    return rope_tables(step.positions, jnp.asarray(rope_inv_freq(cfg), jnp.float32))


def embed(params: Params, step: StepInput):
    return params.embed[step.tokens]


def _layer(cfg: ModelConfig, backend, step: StepInput, x, kv: KVPages, lp: LayerParams, layer,
           lora_xs):
    B, T, _ = x.shape
    D, eps = cfg.head_dim, cfg.rms_norm_eps
    # LoRA is added to each projection's output: to q/k before RoPE and to k/v before the write.
    lora = layer_lora(cfg, step.lora, step.lora_idx, kv, layer, lora_xs, backend.lora_delta)
    with jax.named_scope("attention"):
        q, k, v = lora.project(QKV, x, lp.qkv, (lp.attn_norm, eps), backend.linear)
        q, k = q.reshape(B, T, cfg.num_heads, D), k.reshape(B, T, cfg.num_kv_heads, D)
        if lp.q_norm is not None:    # the family has per-head q/k norms (a static fact)
            q, k = rms_norm(q, lp.q_norm, eps), rms_norm(k, lp.k_norm, eps)
        q, k = apply_rope(q, step.rope), apply_rope(k, step.rope)
        kv = backend.write_kv(kv, layer, k.reshape(B * T, cfg.num_kv_heads, D),
                              v.reshape(B * T, cfg.num_kv_heads, D), step)
        attn = backend.attention(q, kv, layer, step, scale=D ** -0.5,
                                 sliding_window=cfg.sliding_window)
        (o,) = lora.project(O, attn.reshape(B, T, cfg.q_size), lp.o, None, backend.linear)
        x = x + o
    with jax.named_scope("mlp"):
        act = backend.gated_mlp(x, lp.gate_up, (lp.mlp_norm, eps), lora, GATE_UP, jax.nn.silu)
        (d,) = lora.project(DOWN, act, lp.down, None, backend.linear)
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
    x = embed(params, step)
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
    h = rms_norm(x, params.final_norm, cfg.rms_norm_eps)
    if not all_logits:
        h = jnp.take_along_axis(h, step.logits_index[:, None, None], axis=1)[:, 0]
    return backend.lm_head(h, params)


def forward(params: Params, cfg: ModelConfig, backend, step: StepInput, kv: KVPages, *,
            all_logits: bool = False):
    """Returns (logits, kv). logits: [B, V] float32 at each row's `logits_index`, or
    [B, T, V] when all_logits."""
    x, kv = hidden_states(params, cfg, backend, step, kv)
    return head(params, cfg, backend, x, step, all_logits), kv
