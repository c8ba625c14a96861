"""Qwen3 (dense): the Llama layer plus an RMSNorm over each query and key head before RoPE;
`attention_bias` puts biases on q, k, v and o alike.

GGUF (llama.cpp architecture "qwen3"): the Llama tensor names plus blk.N.attn_q_norm /
attn_k_norm. llama.cpp runs Qwen3 with NEOX RoPE (rotary pairs split in halves, as HF), so its
converter (Qwen2Model's tensor handling) stores q and k unpermuted, unlike Llama's.
"""
from __future__ import annotations

import dataclasses

from jaxserve.model.families import llama
from jaxserve.model.families.base import Family, WeightSpec as W, hf_common_fields
from jaxserve.model.families.llama import WEIGHTS, _ATTN

# The Llama weights, q/k (and their biases) without llama.cpp's RoPE row permutation.
LAYER_WEIGHTS = tuple(dataclasses.replace(w, gguf_rope_heads=None) for w in llama.LAYER_WEIGHTS)

QK_NORMS = (
    W("q_norm", ("head_dim",), f"{_ATTN}.q_norm.weight", "blk.{i}.attn_q_norm.weight",
      init="ones"),
    W("k_norm", ("head_dim",), f"{_ATTN}.k_norm.weight", "blk.{i}.attn_k_norm.weight",
      init="ones"),
)


def config_fields(d: dict, arch: str) -> dict:
    from jaxserve.config import ConfigError
    fields = hf_common_fields(d)
    if d.get("use_sliding_window"):
        raise ConfigError("Qwen3 with use_sliding_window=true (per-layer windows) is not supported")
    attention_bias = bool(d.get("attention_bias", False))
    fields.update(qkv_bias=attention_bias, o_bias=attention_bias, architecture=arch)
    return fields


def gguf_config(arch: str, field, shapes: dict) -> dict:
    """llama.cpp's qwen3 metadata (the same keys as llama's) -> HF config.json fields; biases
    are present when the file has them."""
    d = llama.gguf_config(arch, field, shapes)
    d.update(architectures=["Qwen3ForCausalLM"],
             attention_bias="blk.0.attn_q.bias" in shapes)
    return d


QWEN3 = Family(
    name="qwen3",
    architectures={"Qwen3ForCausalLM": "qwen3"},
    weights=WEIGHTS,
    layer_weights=LAYER_WEIGHTS + QK_NORMS,
    config_fields=config_fields,
    gguf_architectures=("qwen3",),
    gguf_config=gguf_config,
)
