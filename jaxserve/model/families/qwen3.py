"""Qwen3 (dense): the Llama layer plus an RMSNorm over each query and key head before RoPE;
`attention_bias` puts biases on q, k, v and o alike."""
from __future__ import annotations

from jaxserve.model.families.base import Family, WeightSpec as W, hf_common_fields
from jaxserve.model.families.llama import LAYER_WEIGHTS, WEIGHTS, _ATTN

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


QWEN3 = Family(
    name="qwen3",
    architectures={"Qwen3ForCausalLM": "qwen3"},
    weights=WEIGHTS,
    layer_weights=LAYER_WEIGHTS + QK_NORMS,
    config_fields=config_fields,
)
