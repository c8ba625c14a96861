"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM) as pure functions over a weights pytree.

forward(weights, cfg, step, kv) -> (logits, kv): one scan over layers; the K/V of this step's
tokens are scattered into the paged pool, then each query attends over its sequence's pages.
The same step also comes in pieces, embed -> decoder_layer x L (per-layer weights) -> head, for
running one layer per device call (jaxserve.runner, layer_loop="dispatch").
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig, rope_inv_freq
from jaxserve.lora.adapter import module_dims
from jaxserve.lora.apply import gather_all_layers, make_layer_lora
from jaxserve.model.attention import paged_attention, write_kv
from jaxserve.model.kv_cache import KVPages, StepInput, decode
from jaxserve.model.weights import LayerWeights, Weights


def rms_norm(x, w, eps):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * w.astype(jnp.float32)).astype(x.dtype)


def rope_tables(positions, inv_freq):
    """(cos, sin) [B, T, D/2] float32 of the rotation angles positions * inv_freq."""
    ang = positions.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x, positions, inv_freq, tables=None):
    """x: [B, T, heads, D]; HF's rotate-half convention (first half / second half pairs).
    `tables`: rope_tables(positions, inv_freq), if already computed."""
    cos, sin = rope_tables(positions, inv_freq) if tables is None else tables
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _proj(x, w, b=None):
    from jaxserve.backends.cpu import cpu_matmul   # few rows on CPU: native kernel (see ROW_RANGES)
    if isinstance(w, cpu_matmul.AmxPacked):   # packed for AMX (weights.pack_for_amx)
        y = cpu_matmul.matmul_amx(x, w).astype(x.dtype)
    elif cpu_matmul.use_for(x, w):
        y = cpu_matmul.matmul(x, w).astype(x.dtype)
    else:
        y = jnp.einsum("bth,ho->bto", x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    return y if b is None else y + b.astype(y.dtype)


def _layer(cfg: ModelConfig, attn_impl: str, interpret: bool, inv_freq, step: StepInput,
           carry, xs, lora_impl: str = "xla"):
    x, k_pool, v_pool = carry
    lw, layer, lora_xs = xs
    B, T, _ = x.shape
    D = cfg.head_dim
    # LoRA (only when the step has adapters; the base-only program has none of this): added to
    # each projection's output, so to q/k before RoPE and to k/v before the K/V write.
    lora_proj = None if step.lora is None else make_layer_lora(
        cfg, step.lora, step.lora_idx, k_pool, v_pool, layer, *lora_xs, impl=lora_impl,
        interpret=interpret, base=_proj)

    def proj(module, inp, w, b=None):
        return _proj(inp, w, b) if lora_proj is None else lora_proj(module, inp, w, b)

    def fused(modules, inp, w, biases, y=None):
        """One matmul for several projections (see weights.fuse_projections; or its result y),
        then per part its bias and LoRA delta."""
        y = _proj(inp, w) if y is None else y
        outs, start = [], 0
        for module, b in zip(modules, biases):
            size = module_dims(cfg, module)[1]
            o = y[..., start:start + size]
            start += size
            if b is not None:
                o = o + b.astype(o.dtype)
            d = None if lora_proj is None else lora_proj.delta(module, inp)
            outs.append(o if d is None else o + d)
        return outs

    from jaxserve.backends.cpu import cpu_matmul
    eps = cfg.rms_norm_eps
    with jax.named_scope("attention"):
        if isinstance(lw.wqkv, cpu_matmul.AmxPacked) and lora_proj is None:
            # The norm inside the AMX call (no LoRA delta needs h in this step).
            y = cpu_matmul.matmul_amx(x, lw.wqkv, norm=(lw.attn_norm, eps)).astype(x.dtype)
            q, k, v = fused(("q_proj", "k_proj", "v_proj"), None, lw.wqkv, (lw.bq, lw.bk, lw.bv),
                            y=y)
        elif lw.wqkv is not None:
            h = rms_norm(x, lw.attn_norm, eps)
            q, k, v = fused(("q_proj", "k_proj", "v_proj"), h, lw.wqkv, (lw.bq, lw.bk, lw.bv))
        else:
            h = rms_norm(x, lw.attn_norm, eps)
            q, k, v = (proj("q_proj", h, lw.wq, lw.bq), proj("k_proj", h, lw.wk, lw.bk),
                       proj("v_proj", h, lw.wv, lw.bv))
        q = q.reshape(B, T, cfg.num_heads, D)
        k = k.reshape(B, T, cfg.num_kv_heads, D)
        v = v.reshape(B, T, cfg.num_kv_heads, D)
        q = apply_rope(q, step.positions, inv_freq, step.rope)
        k = apply_rope(k, step.positions, inv_freq, step.rope)
        k_pool, v_pool = write_kv(k_pool, v_pool, k.reshape(B * T, cfg.num_kv_heads, D),
                                  v.reshape(B * T, cfg.num_kv_heads, D),
                                  step.slot_pages, step.slot_offsets, layer=layer)
        attn = paged_attention(q, k_pool, v_pool, step.block_tables, step.kv_lens, step.positions,
                               scale=D ** -0.5, sliding_window=cfg.sliding_window,
                               impl=attn_impl, interpret=interpret, layer=layer)
        x = x + proj("o_proj", attn.reshape(B, T, cfg.q_size), lw.wo, lw.bo)
    with jax.named_scope("mlp"):
        if (isinstance(lw.w_gate_up, cpu_matmul.AmxPacked) and x.dtype == jnp.bfloat16
                and (step.lora is None or not {"gate_proj", "up_proj"} & set(step.lora.modules))):
            # norm, gate|up matmul and SwiGLU in one native call (no LoRA on gate/up here)
            act = cpu_matmul.swiglu_amx(x, lw.w_gate_up, norm=(lw.mlp_norm, eps))
        else:
            h = rms_norm(x, lw.mlp_norm, eps)
            if lw.w_gate_up is not None:
                g, u = fused(("gate_proj", "up_proj"), h, lw.w_gate_up, (None, None))
            else:
                g, u = proj("gate_proj", h, lw.w_gate), proj("up_proj", h, lw.w_up)
            act = jax.nn.silu(g) * u
        x = x + proj("down_proj", act, lw.w_down)
    return (x, k_pool, v_pool), None


def lora_layer_inputs(cfg: ModelConfig, step: StepInput, kv: KVPages):
    """The step's per-layer LoRA inputs, stacked on a leading layers axis (None without
    adapters): (ranks, scales[, slot weights])."""
    if step.lora is None:
        return None
    lora_xs = (step.lora.ranks, step.lora.scales)
    if step.lora.mesh is None:   # single device: adapter weights read once, before the layers
        # Pre-gathered weights (LoraRuntime.slot_weights) come as the pool stores values.
        lora_xs += (jax.tree.map(decode, step.lora.weights) if step.lora.weights is not None
                    else gather_all_layers(cfg, step.lora, kv.k, kv.v),)
    return lora_xs


def embed(weights: Weights, step: StepInput):
    return weights.embed[step.tokens]


def decoder_layer(cfg: ModelConfig, lw: LayerWeights, x, kv: KVPages, layer, step: StepInput, *,
                  attn_impl: str = "xla", interpret: bool = False, lora_impl: str = "xla"):
    """One decoder layer on its own (unstacked) weights: (x, kv) -> (x, kv). `layer` (an int32
    scalar, may be traced) selects the pool's layer; the step's LoRA inputs must be pre-gathered
    (LoraBatch.weights) and are indexed here. For running layer by layer (jaxserve.runner)."""
    lora_xs = lora_layer_inputs(cfg, step, kv)
    if lora_xs is not None:
        if step.lora.mesh is None and step.lora.weights is None:
            raise ValueError("decoder_layer needs the step's LoRA slot weights gathered first")
        lora_xs = jax.tree.map(lambda a: a[layer], lora_xs)
    inv_freq = jnp.asarray(rope_inv_freq(cfg), jnp.float32)
    (x, k, v), _ = _layer(cfg, attn_impl, interpret, inv_freq, step, (x, kv.k, kv.v),
                          (lw, layer, lora_xs), lora_impl=lora_impl)
    return x, KVPages(k=k, v=v)


def hidden_states(weights: Weights, cfg: ModelConfig, step: StepInput, kv: KVPages, *,
                  attn_impl: str = "xla", interpret: bool = False, lora_impl: str = "xla"):
    """Final-norm hidden states [B, T, H] and the updated pool: one scan over the stacked layers."""
    x = embed(weights, step)
    inv_freq = jnp.asarray(rope_inv_freq(cfg), jnp.float32)
    body = functools.partial(_layer, cfg, attn_impl, interpret, inv_freq, step, lora_impl=lora_impl)
    layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    lora_xs = lora_layer_inputs(cfg, step, kv)
    (x, k, v), _ = jax.lax.scan(body, (x, kv.k, kv.v), (weights.layers, layers, lora_xs))
    return rms_norm(x, weights.final_norm, cfg.rms_norm_eps), KVPages(k=k, v=v)


def head(weights: Weights, cfg: ModelConfig, x, step: StepInput, all_logits: bool = False):
    """Last layer's output [B, T, H] -> logits: [B, V] float32 at each row's `logits_index`, or
    [B, T, V] when all_logits."""
    h = rms_norm(x, weights.final_norm, cfg.rms_norm_eps)
    if not all_logits:
        h = jnp.take_along_axis(h, step.logits_index[:, None, None], axis=1)[:, 0]
    return lm_head(weights, h)


def lm_head(weights: Weights, h):
    from jaxserve.backends.cpu import cpu_matmul   # few rows on CPU: native kernel (see ROW_RANGES)
    if isinstance(weights.lm_head, cpu_matmul.AmxPacked):   # tied embed^T (pack_for_amx)
        if cpu_matmul.rows(h) <= cpu_matmul.AMX_HEAD_MAX_ROWS:
            return cpu_matmul.matmul_amx(h, weights.lm_head)
        return jnp.einsum("...h,vh->...v", h, weights.embed, preferred_element_type=jnp.float32)
    if weights.lm_head is None:  # tied: contract with the embedding's hidden axis, no transpose
        if cpu_matmul.use_for(h, weights.embed, transposed=True):
            return cpu_matmul.matmul_t(h, weights.embed)
        return jnp.einsum("...h,vh->...v", h, weights.embed, preferred_element_type=jnp.float32)
    if cpu_matmul.use_for(h, weights.lm_head):
        return cpu_matmul.matmul(h, weights.lm_head)
    return jnp.einsum("...h,hv->...v", h, weights.lm_head, preferred_element_type=jnp.float32)


def forward(weights: Weights, cfg: ModelConfig, step: StepInput, kv: KVPages, *,
            attn_impl: str = "xla", interpret: bool = False, all_logits: bool = False,
            lora_impl: str = "xla"):
    """Returns (logits, kv). logits: [B, V] float32 at each row's `logits_index`, or
    [B, T, V] when all_logits."""
    h, kv = hidden_states(weights, cfg, step, kv, attn_impl=attn_impl, interpret=interpret,
                          lora_impl=lora_impl)
    if not all_logits:
        h = jnp.take_along_axis(h, step.logits_index[:, None, None], axis=1)[:, 0]
    return lm_head(weights, h), kv


def unstack_layers(layers: LayerWeights) -> list[LayerWeights]:
    """Stacked layer weights -> one LayerWeights per layer (own buffers, no leading axis)."""
    n = jax.tree.leaves(layers)[0].shape[0]
    return [jax.tree.map(lambda a, i=i: jnp.array(a[i], copy=True), layers) for i in range(n)]
