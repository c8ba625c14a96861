"""One LoRA adapter on the host, and reading it from a PEFT directory.

An adapter is kept in the engine's layout: per projection, A as rows `[L, R_m, in]` and B
transposed `[L, R_m, out]` (one row per rank), with per-layer ranks and scales so `rank_pattern`,
`alpha_pattern` and `layers_to_transform` reduce to numbers (rank 0 = not adapted there).
Everything the engine cannot serve exactly is refused with `AdapterError`, never served wrong.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import jax
import numpy as np

from jaxserve.config import ModelConfig

# PEFT module name -> (our weight name, parent module in HF Llama)
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
           "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_NON_LINEAR_TARGETS = ("model.embed_tokens", "lm_head")
_SUPPORTED_PEFT_TYPES = ("LORA",)


class AdapterError(ValueError):
    """An adapter the engine refuses to serve (the message says which field or tensor, and why)."""


def module_dims(cfg: ModelConfig, module: str) -> tuple[int, int]:
    """(in, out) of a projection."""
    H, I, Q, K = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    return {"q_proj": (H, Q), "k_proj": (H, K), "v_proj": (H, K), "o_proj": (Q, H),
            "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}[module]


def module_path(layer: int, module: str) -> str:
    """The module's name inside HF's LlamaForCausalLM (what PEFT matches its patterns against)."""
    return f"model.layers.{layer}.{_PARENT[module]}.{module}"


@jax.tree_util.register_dataclass
@dataclass
class LoraWeights:
    """The arrays of one adapter (numpy on the host; the tree Orbax saves)."""
    a: dict            # module -> [L, R_m, in]   rows of A
    b: dict            # module -> [L, R_m, out]  B transposed
    ranks: np.ndarray  # [L, len(MODULES)] int32, 0 where a module is not adapted in a layer
    scales: np.ndarray  # [L, len(MODULES)] float32: lora_alpha / r, or / sqrt(r) with rsLoRA


@dataclass
class LoraAdapter:
    name: str
    weights: LoraWeights
    config: dict         # the PEFT adapter_config, as read

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(m for m in MODULES if m in self.weights.a)

    @property
    def max_rank(self) -> int:
        return int(self.weights.ranks.max(initial=0))

    @property
    def num_bytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self.weights))


# -- PEFT config -------------------------------------------------------------------------------

def _pattern_key(patterns, path: str):
    """PEFT's rule for rank_pattern/alpha_pattern keys: a regex matching a dotted suffix."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return None


def _matches(target, path: str) -> bool:
    if target is None:
        return False
    if isinstance(target, str):
        return re.fullmatch(target, path) is not None
    return any(path == t or path.endswith("." + t) for t in target)


def _refuse_config(cfg: dict, where: str) -> None:
    ptype = str(cfg.get("peft_type", "LORA")).upper()
    if ptype not in _SUPPORTED_PEFT_TYPES:
        raise AdapterError(f"{where}: peft_type {ptype!r} is not supported (only LoRA)")
    checks = [
        (cfg.get("use_dora"), "DoRA (use_dora=true) is not supported: its magnitude vectors "
                              "change the base projection, which batched LoRA cannot apply"),
        (cfg.get("modules_to_save"), f"modules_to_save={cfg.get('modules_to_save')!r} replaces "
                                     "whole base modules per adapter; not supported"),
        (cfg.get("bias", "none") not in (None, "none"), f"bias={cfg.get('bias')!r}: adapters that "
                                                        "train biases are not supported"),
        (cfg.get("lora_bias"), "lora_bias=true (a bias on lora_B) is not supported"),
        (cfg.get("fan_in_fan_out"), "fan_in_fan_out=true is for Conv1D (GPT-2 style) weights; "
                                    "Llama projections are nn.Linear"),
        (cfg.get("layer_replication"), "layer_replication is not supported"),
        (cfg.get("trainable_token_indices"), "trainable_token_indices (embedding rows) is not "
                                             "supported"),
        (cfg.get("use_qalora"), "QALoRA is not supported"),
    ]
    for bad, why in checks:
        if bad:
            raise AdapterError(f"{where}: {why}")


def _targets(cfg: dict, model_cfg: ModelConfig, where: str) -> set[tuple[int, str]]:
    """(layer, module) pairs the config adapts, by PEFT's matching rules."""
    target = cfg.get("target_modules")
    if target is None:
        raise AdapterError(f"{where}: target_modules is missing")
    all_linear = isinstance(target, str) and target.lower() == "all-linear"
    if not all_linear:
        for path in _NON_LINEAR_TARGETS:
            if _matches(target, path):
                raise AdapterError(f"{where}: LoRA on {path} (embedding / LM head) is not supported")
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < model_cfg.num_layers]
        if bad:
            raise AdapterError(f"{where}: layers_to_transform {bad} outside the base model's "
                               f"{model_cfg.num_layers} layers")
    out = set()
    for i in range(model_cfg.num_layers):
        if layers is not None and i not in layers:
            continue
        for m in MODULES:
            path = module_path(i, m)
            if (all_linear or _matches(target, path)) and not _matches(cfg.get("exclude_modules"), path):
                out.add((i, m))
    return out


# -- reading a PEFT directory ---------------------------------------------------------------------

_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)"
                  r"\.lora_([AB])(?:\.[\w-]+)?\.weight$")


def _explain_key(key: str) -> str:
    if "lora_magnitude_vector" in key:
        return "a DoRA magnitude vector (DoRA is not supported)"
    if "lora_embedding" in key or "embed_tokens" in key:
        return "embedding LoRA (not supported)"
    if "modules_to_save" in key or "original_module" in key:
        return "a modules_to_save copy of a base module (not supported)"
    if key.endswith(".bias"):
        return "a LoRA bias (not supported)"
    if "lm_head" in key:
        return "LoRA on the LM head (not supported)"
    return "not a LoRA A/B weight of a Llama projection"


def read_peft_config(path: str) -> dict:
    cpath = os.path.join(path, "adapter_config.json")
    try:
        with open(cpath) as f:
            return json.load(f)
    except FileNotFoundError:
        raise AdapterError(f"{path}: no adapter_config.json (is this a PEFT adapter directory?)") from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cpath} is not valid JSON: {e}") from None


def read_peft_tensors(path: str) -> dict[str, np.ndarray]:
    st = os.path.join(path, "adapter_model.safetensors")
    if not os.path.exists(st):
        raise AdapterError(f"{path}: no adapter_model.safetensors (only safetensors adapters are read)")
    from safetensors.torch import load_file
    try:
        return {k: v.float().numpy() for k, v in load_file(st).items()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise AdapterError(f"{st}: cannot read safetensors: {e}") from None


def from_peft_arrays(name: str, cfg: dict, tensors: dict[str, np.ndarray], model_cfg: ModelConfig,
                     where: str) -> LoraAdapter:
    """Validate a PEFT config + tensors against the base model and convert to our layout."""
    _refuse_config(cfg, where)
    expected = _targets(cfg, model_cfg, where)
    found: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, arr in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"{where}: tensor {key!r} is {_explain_key(key)}")
        layer, parent, module, ab = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if module not in MODULES or _PARENT[module] != parent:
            raise AdapterError(f"{where}: tensor {key!r} targets {parent}.{module}, which is not a "
                               f"projection jaxserve adapts ({', '.join(MODULES)})")
        if layer >= model_cfg.num_layers:
            raise AdapterError(f"{where}: tensor {key!r} is for layer {layer}, the base model has "
                               f"{model_cfg.num_layers} layers (adapter for a different model?)")
        found.setdefault((layer, module), {})[ab] = arr
    if not found:
        raise AdapterError(f"{where}: adapter_model.safetensors holds no LoRA weights")
    extra = sorted(set(found) - expected)
    missing = sorted(expected - set(found))
    if extra:
        raise AdapterError(f"{where}: weights for {module_path(*extra[0])} which target_modules / "
                           f"layers_to_transform do not select")
    r0, alpha0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rank_pat, alpha_pat = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    L, M = model_cfg.num_layers, len(MODULES)
    ranks = np.zeros((L, M), np.int32)
    scales = np.zeros((L, M), np.float32)
    for (layer, module), ab in found.items():
        path = module_path(layer, module)
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{where}: {path} has lora_{'A' if 'B' in ab else 'B'} missing")
        rk = _pattern_key(rank_pat, path)
        r = int(rank_pat[rk] if rk is not None else r0)
        ak = _pattern_key(alpha_pat, path)
        alpha = float(alpha_pat[ak] if ak is not None else alpha0)
        din, dout = module_dims(model_cfg, module)
        for ab_name, want in (("A", (r, din)), ("B", (dout, r))):
            got = tuple(ab[ab_name].shape)
            if got != want:
                raise AdapterError(
                    f"{where}: {path}.lora_{ab_name} has shape {got}, expected {want} (rank {r}; "
                    f"base projection {din}->{dout}): adapter for a different base model?")
        if r <= 0:
            raise AdapterError(f"{where}: {path} has rank {r}")
        mi = MODULES.index(module)
        ranks[layer, mi] = r
        scales[layer, mi] = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    if missing:   # after the shape checks: a shape error is the clearer message for a wrong base
        raise AdapterError(f"{where}: target_modules selects {module_path(*missing[0])} but the "
                           "adapter has no weights for it")
    a, b = {}, {}
    for module in MODULES:
        mi = MODULES.index(module)
        if not ranks[:, mi].any():
            continue
        din, dout = module_dims(model_cfg, module)
        R = int(ranks[:, mi].max())
        a[module] = np.zeros((L, R, din), np.float32)
        b[module] = np.zeros((L, R, dout), np.float32)
        for layer in range(L):
            ab = found.get((layer, module))
            if ab is not None:
                r = ab["A"].shape[0]
                a[module][layer, :r] = ab["A"]
                b[module][layer, :r] = ab["B"].T
    return LoraAdapter(name, LoraWeights(a=a, b=b, ranks=ranks, scales=scales), dict(cfg))


def load_peft(name: str, path: str, model_cfg: ModelConfig) -> LoraAdapter:
    if not os.path.isdir(path):
        raise AdapterError(f"adapter path {path!r} is not a directory")
    cfg = read_peft_config(path)
    return from_peft_arrays(name, cfg, read_peft_tensors(path), model_cfg, where=path)
