"""Gemma 2 and Gemma 3 (text): the Llama layer with Gemma's differences.

  embeddings times sqrt(hidden_size); RMSNorm scales by (1 + w) (every norm, q/k norms too);
  four norms per layer: input_layernorm (attn_norm), post_attention_layernorm on the attention
  output before the residual add (post_attn_norm), pre_feedforward_layernorm (mlp_norm) and
  post_feedforward_layernorm on the MLP output (post_mlp_norm); GeGLU (gelu, tanh approximation);
  scores scaled by query_pre_attn_scalar ** -0.5; sliding-window and full layers alternating
  (config.json `layer_types`); tied embeddings.
  Gemma 2: attention logit and final logit soft-capping.
  Gemma 3: per-head q/k norms before RoPE, and a separate RoPE base for the sliding layers.

GGUF (llama.cpp's convert_hf_to_gguf.py, Gemma2Model / Gemma3Model): every `*norm.weight` is
written with 1 added (llama.cpp's norm multiplies by the stored weight), which `gguf_shift`
takes off again; q/k are not permuted (Gemma runs NEOX-style RoPE in llama.cpp, the HF layout).
llama.cpp fixes the layer pattern (Gemma 2: even layers sliding; Gemma 3: 5 sliding, 1 full),
the local RoPE base (10000) and the attention scale (head_dim ** -0.5, or
(hidden / heads) ** -0.5 for the 27B models, known by their layer count) instead of storing
them; gguf_config does the same.
"""
from __future__ import annotations

from jaxserve.model.families.base import Family, WeightSpec as W, hf_common_fields
from jaxserve.model.families.llama import _ATTN, _MLP, LAYER_WEIGHTS as LLAMA_LAYER_WEIGHTS

_LAYER = "model.layers.{i}"
_llama = {w.name: w for w in LLAMA_LAYER_WEIGHTS}


def _untied(cfg):
    return not cfg.tie_word_embeddings


def _norm(name, hf, gguf, axes=("embed",)):
    """A Gemma norm weight: zero-initialized (the scale is 1 + w), +1 in GGUF files."""
    return W(name, axes, hf, gguf, init="zeros", gguf_shift=1.0)


WEIGHTS = (
    W("embed", ("vocab", "embed"), "model.embed_tokens.weight", "token_embd.weight"),
    _norm("final_norm", "model.norm.weight", "output_norm.weight"),
    W("lm_head", ("embed", "vocab"), "lm_head.weight", "output.weight", transpose=True,
      when=_untied),
)

LAYER_WEIGHTS = (
    _norm("attn_norm", f"{_LAYER}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    W("wq", ("embed", "q_heads"), f"{_ATTN}.q_proj.weight", "blk.{i}.attn_q.weight",
      transpose=True, lora="q_proj"),
    W("wk", ("embed", "kv_heads"), f"{_ATTN}.k_proj.weight", "blk.{i}.attn_k.weight",
      transpose=True, lora="k_proj"),
    _llama["wv"], _llama["wo"],
    W("bq", ("q_heads",), f"{_ATTN}.q_proj.bias", "blk.{i}.attn_q.bias", init="zeros",
      when=lambda cfg: cfg.qkv_bias),
    W("bk", ("kv_heads",), f"{_ATTN}.k_proj.bias", "blk.{i}.attn_k.bias", init="zeros",
      when=lambda cfg: cfg.qkv_bias),
    _llama["bv"], _llama["bo"],
    _norm("post_attn_norm", f"{_LAYER}.post_attention_layernorm.weight",
          "blk.{i}.post_attention_norm.weight"),
    _norm("mlp_norm", f"{_LAYER}.pre_feedforward_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    _llama["w_gate"], _llama["w_up"], _llama["w_down"],
    _norm("post_mlp_norm", f"{_LAYER}.post_feedforward_layernorm.weight",
          "blk.{i}.post_ffw_norm.weight"),
)

QK_NORMS = (
    _norm("q_norm", f"{_ATTN}.q_norm.weight", "blk.{i}.attn_q_norm.weight", ("head_dim",)),
    _norm("k_norm", f"{_ATTN}.k_norm.weight", "blk.{i}.attn_k_norm.weight", ("head_dim",)),
)

_SLIDING, _FULL = "sliding_attention", "full_attention"
# transformers' defaults where a Gemma config.json leaves a field out
_DEFAULTS = {
    "gemma2": dict(attn_logit_softcapping=50.0, final_logit_softcapping=30.0, rope_theta=10000.0),
    "gemma3_text": dict(attn_logit_softcapping=None, final_logit_softcapping=None,
                        rope_theta=1_000_000.0),
}
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new")   # 0.5 x (1 + tanh(...)) alike


def layer_types(d: dict, arch: str, num_layers: int) -> list[str]:
    """Each layer's attention type: config.json `layer_types` (transformers v5 writes it), else
    the architecture's rule (Gemma 2: even layers sliding; Gemma 3: every
    `sliding_window_pattern`-th layer full, the rest sliding)."""
    from jaxserve.config import ConfigError
    types = d.get("layer_types")
    if types is None:
        if arch == "gemma2":
            types = [_SLIDING if i % 2 == 0 else _FULL for i in range(num_layers)]
        else:
            pattern = int(d.get("sliding_window_pattern", d.get("_sliding_window_pattern", 6)))
            types = [_SLIDING if (i + 1) % pattern else _FULL for i in range(num_layers)]
    types = list(types)
    if len(types) != num_layers or set(types) - {_SLIDING, _FULL}:
        raise ConfigError(f"layer_types must list {num_layers} entries of {_SLIDING!r} / "
                          f"{_FULL!r}, got {types}")
    return types


def _rope_fields(rope: dict, what: str) -> dict:
    from jaxserve.config import ConfigError
    rope_type = str(rope.get("rope_type", rope.get("type", "default")) or "default")
    if rope_type not in ("default", "linear", "llama3"):
        raise ConfigError(f"{what} RoPE type {rope_type!r} is not supported")
    return dict(
        rope_theta=float(rope["rope_theta"]), rope_type=rope_type,
        rope_factor=float(rope.get("factor", 1.0)),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_original_max_position=int(rope.get("original_max_position_embeddings", 8192)))


def config_fields(d: dict, arch: str) -> dict:
    from jaxserve.config import ConfigError
    defaults = _DEFAULTS[arch]
    fields = hf_common_fields(d)
    L = fields["num_layers"]
    if d.get("use_bidirectional_attention"):
        raise ConfigError("use_bidirectional_attention=true (an embedding model) is not supported")
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in _GELU_TANH:
        raise ConfigError(f"Gemma hidden_activation {act!r} is not supported (supported: "
                          f"{list(_GELU_TANH)})")
    window = d.get("sliding_window", 4096)
    types = layer_types(d, arch, L)
    attention_bias = bool(d.get("attention_bias", False))
    fields.update(
        head_dim=int(d.get("head_dim") or 256),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        qkv_bias=attention_bias, o_bias=attention_bias,
        layer_windows=tuple(int(window) if t == _SLIDING and window else None for t in types),
        norm_unit_offset=True, embed_scale=True, mlp_activation="gelu_tanh", sandwich_norms=True,
        attn_scale=float(d.get("query_pre_attn_scalar", 256)) ** -0.5,
        attn_softcap=d.get("attn_logit_softcapping", defaults["attn_logit_softcapping"]),
        final_softcap=d.get("final_logit_softcapping", defaults["final_logit_softcapping"]),
        architecture=arch,
    )
    for k in ("attn_softcap", "final_softcap"):
        if fields[k] is not None:
            fields[k] = float(fields[k])
    if arch == "gemma3_text":
        rp = d.get("rope_parameters")
        if isinstance(rp, dict) and (_FULL in rp or _SLIDING in rp):   # transformers v5
            full, local = dict(rp.get(_FULL) or {}), dict(rp.get(_SLIDING) or {})
        else:                       # older configs: rope_theta (+ rope_scaling), local base
            full = dict(d.get("rope_scaling") or rp or {})
            local = {"rope_theta": d.get("rope_local_base_freq", 10000.0)}
            full.setdefault("rope_theta", d.get("rope_theta", defaults["rope_theta"]))
        full.setdefault("rope_theta", defaults["rope_theta"])
        local.setdefault("rope_theta", 10000.0)
        local_fields = _rope_fields(local, "the sliding layers'")
        if local_fields["rope_type"] != "default":
            raise ConfigError("a scaled RoPE on the sliding layers "
                              f"({local_fields['rope_type']!r}) is not supported")
        fields.update(_rope_fields(full, "the full layers'"),
                      rope_local_theta=local_fields["rope_theta"],
                      layer_rope_local=tuple(t == _SLIDING for t in types))
    return fields


def gguf_config(arch: str, field, shapes: dict) -> dict:
    """llama.cpp's Gemma metadata -> an HF config.json (what llama.cpp does not store, it fixes
    per architecture; see the module docstring)."""
    n_heads = int(field(f"{arch}.attention.head_count"))
    hidden = int(field(f"{arch}.embedding_length"))
    layers = int(field(f"{arch}.block_count"))
    head_dim = int(field(f"{arch}.attention.key_length", hidden // n_heads))
    big = {"gemma2": 46, "gemma3": 62}[arch]          # the 27B models' layer counts
    d = {
        "architectures": ["Gemma2ForCausalLM" if arch == "gemma2" else "Gemma3ForCausalLM"],
        "vocab_size": int(shapes["token_embd.weight"][0]),
        "hidden_size": hidden,
        "intermediate_size": int(field(f"{arch}.feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(field(f"{arch}.attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(field(f"{arch}.context_length", 8192)),
        "tie_word_embeddings": "output.weight" not in shapes,
        "query_pre_attn_scalar": hidden // n_heads if layers == big else head_dim,
        "sliding_window": int(field(f"{arch}.attention.sliding_window", 4096)),
        "final_logit_softcapping": field(f"{arch}.final_logit_softcapping"),
    }
    if arch == "gemma2":
        d["attn_logit_softcapping"] = field(f"{arch}.attn_logit_softcapping")
        d["rope_theta"] = float(field(f"{arch}.rope.freq_base", 10000.0))
    else:
        full = {"rope_theta": float(field(f"{arch}.rope.freq_base", 1_000_000.0)),
                "rope_type": "default"}
        scaling = field(f"{arch}.rope.scaling.type")
        if scaling not in (None, "none"):
            full.update(rope_type=str(scaling),
                        factor=float(field(f"{arch}.rope.scaling.factor", 1.0)))
        d["rope_parameters"] = {_FULL: full, _SLIDING: {"rope_theta": 10000.0,
                                                        "rope_type": "default"}}
    return d


GEMMA2 = Family(
    name="gemma2",
    architectures={"Gemma2ForCausalLM": "gemma2"},
    weights=WEIGHTS,
    layer_weights=LAYER_WEIGHTS,
    config_fields=config_fields,
    gguf_architectures=("gemma2",),
    gguf_config=gguf_config,
)

GEMMA3 = Family(
    name="gemma3",
    architectures={"Gemma3ForCausalLM": "gemma3_text"},
    weights=WEIGHTS,
    layer_weights=LAYER_WEIGHTS + QK_NORMS,
    config_fields=config_fields,
    gguf_architectures=("gemma3",),
    gguf_config=gguf_config,
)
