"""The Llama family: Llama 2/3, Mistral, Qwen2, SmolLM.

They share one layer (RMSNorm, GQA attention with RoPE, SwiGLU MLP) and differ in biases
(Qwen2: q/k/v; Llama `attention_bias`: q/k/v/o) and in Mistral's sliding window.
"""
from __future__ import annotations

from jaxserve.model.families.base import Family, WeightSpec as W, hf_common_fields

_ATTN = "model.layers.{i}.self_attn"
_MLP = "model.layers.{i}.mlp"


def _qkv_bias(cfg):
    return cfg.qkv_bias


def _o_bias(cfg):
    return cfg.o_bias


def _untied(cfg):
    return not cfg.tie_word_embeddings


WEIGHTS = (
    W("embed", ("vocab", "embed"), "model.embed_tokens.weight", "token_embd.weight"),
    W("final_norm", ("embed",), "model.norm.weight", "output_norm.weight", init="ones"),
    W("lm_head", ("embed", "vocab"), "lm_head.weight", "output.weight", transpose=True,
      when=_untied),
)

LAYER_WEIGHTS = (
    W("attn_norm", ("embed",), "model.layers.{i}.input_layernorm.weight",
      "blk.{i}.attn_norm.weight", init="ones"),
    W("wq", ("embed", "q_heads"), f"{_ATTN}.q_proj.weight", "blk.{i}.attn_q.weight",
      transpose=True, gguf_rope_heads="num_heads", lora="q_proj"),
    W("wk", ("embed", "kv_heads"), f"{_ATTN}.k_proj.weight", "blk.{i}.attn_k.weight",
      transpose=True, gguf_rope_heads="num_kv_heads", lora="k_proj"),
    W("wv", ("embed", "kv_heads"), f"{_ATTN}.v_proj.weight", "blk.{i}.attn_v.weight",
      transpose=True, lora="v_proj"),
    W("wo", ("q_heads", "embed"), f"{_ATTN}.o_proj.weight", "blk.{i}.attn_output.weight",
      transpose=True, lora="o_proj"),
    W("bq", ("q_heads",), f"{_ATTN}.q_proj.bias", "blk.{i}.attn_q.bias", init="zeros",
      gguf_rope_heads="num_heads", when=_qkv_bias),
    W("bk", ("kv_heads",), f"{_ATTN}.k_proj.bias", "blk.{i}.attn_k.bias", init="zeros",
      gguf_rope_heads="num_kv_heads", when=_qkv_bias),
    W("bv", ("kv_heads",), f"{_ATTN}.v_proj.bias", "blk.{i}.attn_v.bias", init="zeros",
      when=_qkv_bias),
    W("bo", ("embed",), f"{_ATTN}.o_proj.bias", "blk.{i}.attn_output.bias", init="zeros",
      when=_o_bias),
    W("mlp_norm", ("embed",), "model.layers.{i}.post_attention_layernorm.weight",
      "blk.{i}.ffn_norm.weight", init="ones"),
    W("w_gate", ("embed", "mlp"), f"{_MLP}.gate_proj.weight", "blk.{i}.ffn_gate.weight",
      transpose=True, lora="gate_proj"),
    W("w_up", ("embed", "mlp"), f"{_MLP}.up_proj.weight", "blk.{i}.ffn_up.weight",
      transpose=True, lora="up_proj"),
    W("w_down", ("mlp", "embed"), f"{_MLP}.down_proj.weight", "blk.{i}.ffn_down.weight",
      transpose=True, lora="down_proj"),
)


def config_fields(d: dict, arch: str) -> dict:
    from jaxserve.config import ConfigError
    fields = hf_common_fields(d)
    if arch == "qwen2" and d.get("use_sliding_window"):
        # Qwen2's window applies from layer max_window_layers on; the tuple below could say so,
        # but the forward pass has one window for all layers.
        raise ConfigError("Qwen2 with use_sliding_window=true (per-layer windows) is not supported")
    if d.get("mlp_bias"):
        raise ConfigError("mlp_bias=true (biases on gate/up/down) is not supported")
    window = d.get("sliding_window") if arch == "mistral" else None
    attention_bias = bool(d.get("attention_bias", False))
    fields.update(
        qkv_bias=arch == "qwen2" or attention_bias,
        o_bias=arch != "qwen2" and attention_bias,
        layer_windows=(int(window),) * fields["num_layers"] if window else (),
        architecture=arch,
    )
    return fields


def gguf_config(arch: str, field, shapes: dict) -> dict:
    """llama.cpp's metadata keys -> the HF config.json fields they stand for."""
    n_heads = int(field(f"{arch}.attention.head_count"))
    hidden = int(field(f"{arch}.embedding_length"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(shapes["token_embd.weight"][0]),
        "hidden_size": hidden,
        "intermediate_size": int(field(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(field(f"{arch}.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(field(f"{arch}.attention.head_count_kv", n_heads)),
        "head_dim": int(field(f"{arch}.attention.key_length", hidden // n_heads)),
        "rms_norm_eps": float(field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(field(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(field(f"{arch}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in shapes,
    }


LLAMA = Family(
    name="llama",
    architectures={"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                   "Qwen2ForCausalLM": "qwen2"},
    weights=WEIGHTS,
    layer_weights=LAYER_WEIGHTS,
    config_fields=config_fields,
    gguf_architectures=("llama",),
    gguf_config=gguf_config,
)
