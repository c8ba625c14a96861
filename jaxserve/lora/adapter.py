"""One LoRA adapter on the host, and reading it from a PEFT directory.

An adapter is kept in the engine's layout: per projection, A as rows `[L, R_m, in]` and B
transposed `[L, R_m, out]` (one row per rank), with per-layer ranks and scales so `rank_pattern`,
`alpha_pattern` and `layers_to_transform` reduce to numbers (rank 0 = not adapted there).
Everything the engine cannot serve exactly is refused with `AdapterError`, never served wrong.
"""
from __future__ import annotations

import contextvars
import json
import math
import os
import re
import time
from dataclasses import dataclass

import jax
import numpy as np
import regex   # re's superset (a transformers dependency), for its match timeout

from jaxserve.config import ModelConfig
from jaxserve.model import families

# The PEFT modules (projections) adapters may target, in the order of the per-module tables
# (ranks, scales, the pool's pages); which weight each adapts is in the model family's spec.
MODULES = families.LORA_MODULES
_SUPPORTED_PEFT_TYPES = ("LORA",)
# Bounds on what an adapter_config.json may say (far past any real adapter): a rank beyond
# MAX_CONFIG_RANK or a scale (lora_alpha / r, or / sqrt(r)) beyond MAX_LORA_SCALE in size is
# refused as a hostile or broken file, as are regexes longer than MAX_PATTERN_CHARS.
MAX_CONFIG_RANK = 1 << 16
MAX_LORA_SCALE = 1e4
MAX_PATTERN_CHARS = 1000
# A config's regexes are matched against short module paths; a pattern that backtracks
# catastrophically (`(.*)*x` takes forever under `re`) is refused instead of hanging the
# engine thread that loads it: each match may take REGEX_TIMEOUT_S, all of one adapter's
# matches together REGEX_BUDGET_S.
REGEX_TIMEOUT_S = 0.25
REGEX_BUDGET_S = 1.0
_regex_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "jaxserve_lora_regex_deadline", default=None)


class AdapterError(ValueError):
    """An adapter the engine refuses to serve (the message says which field or tensor, and why)."""


def module_dims(cfg: ModelConfig, module: str) -> tuple[int, int]:
    """(in, out) of a projection."""
    return families.for_config(cfg).lora_dims(cfg, module)


def module_path(cfg: ModelConfig, layer: int, module: str) -> str:
    """The module's name in the HF model (what PEFT matches its patterns against)."""
    return families.for_config(cfg).lora_weight(module).module_path(layer)


def _module_paths(cfg: ModelConfig) -> dict[str, tuple[int, str]]:
    """HF module path -> (layer, module), for every projection an adapter may target."""
    family = families.for_config(cfg)
    return {family.lora_weight(m).module_path(i): (i, m)
            for i in range(cfg.num_layers) for m in family.lora_modules}


def _moe_paths(cfg: ModelConfig) -> list[str]:
    """A mixture of experts' modules in every layer, which LoRA may not target: the router and
    the experts (their container, e.g. model.layers.0.mlp.experts, and each expert's
    projections, model.layers.0.mlp.experts.3.gate_proj)."""
    out = []
    for w in families.for_config(cfg).layer_weights:
        if "experts" not in w.axes and "expert_logits" not in w.axes:
            continue
        for i in range(cfg.num_layers):
            if not w.per_expert:
                out.append(w.module_path(i))
                continue
            container = w.hf.split(".{e}")[0].format(i=i)
            out += [container] + [w.hf.format(i=i, e=e).rsplit(".", 1)[0]
                                  for e in range(cfg.num_experts)]
    return list(dict.fromkeys(out))


def _moe_module(cfg: ModelConfig, path: str) -> str | None:
    """The mixture-of-experts module (router or experts) `path` is or lies in, or None."""
    for p in _moe_paths(cfg):
        if path == p or path.startswith(p + "."):
            return p
    return None


def _moe_refusal(cfg: ModelConfig, path: str) -> str:
    return (f"LoRA on {path} (a mixture of experts' router or experts) is not supported: "
            f"adapters on this model may target only "
            f"{', '.join(families.for_config(cfg).lora_modules)}")


def _vocab_paths(cfg: ModelConfig) -> list[str]:
    """The embedding and LM head modules (over the vocabulary), which LoRA may not target."""
    return [w.module_path() for w in families.for_config(cfg).weights if "vocab" in w.axes]


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

def _search(fn, pattern: str, path: str):
    """fn (regex.match / regex.fullmatch) with a time bound; a pattern that exceeds it (or that
    does not compile) is an AdapterError."""
    timeout = REGEX_TIMEOUT_S
    deadline = _regex_deadline.get()
    if deadline is not None:
        timeout = min(timeout, deadline - time.monotonic())
    try:
        if timeout <= 0:
            raise TimeoutError
        return fn(pattern, path, timeout=timeout)
    except TimeoutError:
        raise AdapterError(f"the regex {pattern!r:.80} takes too long to match module names "
                           "(catastrophic backtracking?)") from None
    except (regex.error, RecursionError, OverflowError) as e:
        raise AdapterError(f"{pattern!r:.80} is not a valid regex: {e}") from None


def _pattern_key(patterns, path: str):
    """PEFT's rule for rank_pattern/alpha_pattern keys: a regex matching a dotted suffix."""
    for key in patterns:
        if _search(regex.match, rf"(.*\.)?({key})$", path):
            return key
    return None


def _matches(target, path: str) -> bool:
    if target is None:
        return False
    if isinstance(target, str):
        return _search(regex.fullmatch, target, path) is not None
    return any(path == t or path.endswith("." + t) for t in target)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_pattern(pattern, field: str, where: str) -> None:
    if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN_CHARS:
        raise AdapterError(f"{where}: {field} must hold strings of at most {MAX_PATTERN_CHARS} "
                           f"characters, got {pattern!r:.80}")
    try:
        regex.compile(pattern)
    except (regex.error, RecursionError, OverflowError) as e:
        raise AdapterError(f"{where}: {field} {pattern!r:.80} is not a valid regex: {e}") from None


def check_config_types(cfg, where: str) -> None:
    """The JSON types and ranges of the fields the loader reads, so that reading them cannot
    fail later: a wrong type, a non-finite or huge lora_alpha, a rank that is not an integer in
    [1, MAX_CONFIG_RANK], a target_modules that is neither a regex nor a list of names."""
    if not isinstance(cfg, dict):
        raise AdapterError(f"{where}: adapter_config.json must hold a JSON object, "
                           f"got {type(cfg).__name__}")
    for field in ("peft_type", "bias"):
        if cfg.get(field) is not None and not isinstance(cfg[field], str):
            raise AdapterError(f"{where}: {field} must be a string, got {cfg[field]!r:.80}")
    for field in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias", "use_qalora"):
        if cfg.get(field) is not None and not isinstance(cfg[field], bool):
            raise AdapterError(f"{where}: {field} must be true or false, got {cfg[field]!r:.80}")

    def rank(v, field: str) -> None:
        if not _is_int(v) or not 1 <= v <= MAX_CONFIG_RANK:
            raise AdapterError(f"{where}: {field} must be an integer in [1, {MAX_CONFIG_RANK}], "
                               f"got {v!r:.80}")

    def alpha(v, field: str) -> None:
        if not _is_number(v) or not math.isfinite(v) or abs(v) > MAX_LORA_SCALE * MAX_CONFIG_RANK:
            raise AdapterError(f"{where}: {field} must be a finite number, got {v!r:.80}")

    rank(cfg.get("r", 8), "r")
    alpha(cfg.get("lora_alpha", 8), "lora_alpha")
    for field, check in (("rank_pattern", rank), ("alpha_pattern", alpha)):
        pat = cfg.get(field)
        if pat is None:
            continue
        if not isinstance(pat, dict):
            raise AdapterError(f"{where}: {field} must be an object, got {pat!r:.80}")
        for key, v in pat.items():
            _check_pattern(key, f"{field} key", where)
            check(v, f"{field}[{key!r:.80}]")
    for field in ("target_modules", "exclude_modules"):
        v = cfg.get(field)
        if isinstance(v, str):
            _check_pattern(v, field, where)
        elif v is not None and (not isinstance(v, list) or not all(
                isinstance(t, str) and len(t) <= MAX_PATTERN_CHARS for t in v)):
            raise AdapterError(f"{where}: {field} must be a regex string or a list of module "
                               f"names, got {v!r:.80}")
    layers = cfg.get("layers_to_transform")
    if layers is not None and not _is_int(layers) and not (
            isinstance(layers, list) and all(_is_int(i) for i in layers)):
        raise AdapterError(f"{where}: layers_to_transform must be an integer or a list of "
                           f"integers, got {layers!r:.80}")


def _refuse_config(cfg: dict, where: str) -> None:
    check_config_types(cfg, where)
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
    params = cfg.get("target_parameters")
    if params:   # PEFT's LoRA on bare parameters (a mixture of experts' stacked experts, router)
        for t in params if isinstance(params, list) else []:
            module = t.rsplit(".", 1)[0] if isinstance(t, str) else None
            for path in _moe_paths(model_cfg) if module else []:
                if path == module or path.endswith("." + module):
                    raise AdapterError(f"{where}: target_parameters {t!r:.80}: "
                                       f"{_moe_refusal(model_cfg, path)}")
        raise AdapterError(f"{where}: target_parameters={params!r:.120} (LoRA on parameters that "
                           "are not nn.Linear projections) is not supported")
    if not all_linear:
        for path in _vocab_paths(model_cfg):
            if _matches(target, path):
                raise AdapterError(f"{where}: LoRA on {path} (embedding / LM head) is not supported")
        for path in _moe_paths(model_cfg):
            if _matches(target, path) and not _matches(cfg.get("exclude_modules"), path):
                raise AdapterError(f"{where}: {_moe_refusal(model_cfg, path)}")
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < model_cfg.num_layers]
        if bad:
            raise AdapterError(f"{where}: layers_to_transform {bad} outside the base model's "
                               f"{model_cfg.num_layers} layers")
    out = set()
    for path, (i, m) in _module_paths(model_cfg).items():
        if layers is not None and i not in layers:
            continue
        if (all_linear or _matches(target, path)) and not _matches(cfg.get("exclude_modules"), path):
            out.add((i, m))
    return out


# -- reading a PEFT directory ---------------------------------------------------------------------

# PEFT's tensor names: base_model.model.<module path>.lora_{A,B}[.<adapter name>].weight
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$")
_LAYER = re.compile(r"\.(\d+)\.")


def _explain_key(key: str, cfg: ModelConfig) -> str:
    if "lora_magnitude_vector" in key:
        return "a DoRA magnitude vector (DoRA is not supported)"
    if "lora_embedding" in key:
        return "embedding LoRA (not supported)"
    if "modules_to_save" in key or "original_module" in key:
        return "a modules_to_save copy of a base module (not supported)"
    if key.endswith(".bias"):
        return "a LoRA bias (not supported)"
    if any(p in key for p in _vocab_paths(cfg)):
        return "LoRA on the embedding or LM head (not supported)"
    m = _KEY.match(key)
    moe = _moe_module(cfg, m["path"]) if m is not None else None
    if moe is not None:
        return _moe_refusal(cfg, moe)
    return f"not a LoRA A/B weight of a projection jaxserve adapts ({', '.join(MODULES)})"


def read_peft_config(path: str) -> dict:
    cpath = os.path.join(path, "adapter_config.json")
    try:
        with open(cpath, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise AdapterError(f"{path}: no adapter_config.json (is this a PEFT adapter directory?)") from None
    except (ValueError, RecursionError) as e:   # not JSON, not UTF-8, nested too deep
        raise AdapterError(f"{cpath} is not valid JSON: {e}") from None


def check_tensor(key: str, arr: np.ndarray, where: str, dtype=None) -> None:
    """A LoRA weight must hold only finite values: one NaN or inf would reach every token the
    adapter touches (and, through shared pages, possibly other requests). With `dtype` (the
    dtype the adapter is served in: its pages are the KV pool's), also none beyond that
    dtype's range, which would become inf when stored (bfloat16 holds up to ~3.39e38, less
    than float32's ~3.40e38)."""
    finite = np.isfinite(arr)
    if not finite.all():
        bad = int(arr.size - finite.sum())
        raise AdapterError(f"{where}: tensor {key!r} holds {bad} non-finite value(s) (NaN or inf)")
    if dtype is not None and arr.size:
        limit = float(np.finfo(dtype).max)
        if float(np.abs(arr).max()) > limit:
            bad = int((np.abs(arr) > limit).sum())
            raise AdapterError(f"{where}: tensor {key!r} holds {bad} value(s) beyond the range "
                               f"of {np.dtype(dtype).name} (at most {limit:.4g} in size), the "
                               "dtype adapters are served in")


def check_rank(tensor: str, rank: int, max_rank: int | None, where: str) -> None:
    """Refuse a rank above max_rank (the engine's max_lora_rank; None: no limit), naming the
    tensor; the store's own check (LoraStore.validate) says the same, later."""
    if max_rank is not None and rank > max_rank:
        raise AdapterError(f"{where}: tensor {tensor!r} has rank {rank}, above "
                           f"max_lora_rank={max_rank}")


def read_peft_tensors(path: str, dtype=None) -> dict[str, np.ndarray]:
    """The file's LoRA weights as float32, each checked (check_tensor; `dtype`: as there)."""
    st = os.path.join(path, "adapter_model.safetensors")
    if not os.path.exists(st):
        raise AdapterError(f"{path}: no adapter_model.safetensors (only safetensors adapters are read)")
    from safetensors.torch import load_file
    try:
        raw = load_file(st)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise AdapterError(f"{st}: cannot read safetensors: {e}") from None
    out = {}
    for k, v in raw.items():
        if not v.dtype.is_floating_point:
            raise AdapterError(f"{path}: tensor {k!r} has dtype {str(v.dtype).removeprefix('torch.')}"
                               "; LoRA weights must be floating point")
        out[k] = v.float().numpy()
        check_tensor(k, out[k], path, dtype)
    return out


def from_peft_arrays(name: str, cfg: dict, tensors: dict[str, np.ndarray], model_cfg: ModelConfig,
                     where: str, max_rank: int | None = None) -> LoraAdapter:
    """Validate a PEFT config + tensors against the base model and convert to our layout.
    max_rank: the highest rank the caller serves (the engine's max_lora_rank; None: any); a
    module of a higher rank is refused before any padded array is allocated."""
    token = _regex_deadline.set(time.monotonic() + REGEX_BUDGET_S)
    try:
        return _from_peft_arrays(name, cfg, tensors, model_cfg, where, max_rank)
    finally:
        _regex_deadline.reset(token)


def _from_peft_arrays(name: str, cfg: dict, tensors: dict[str, np.ndarray],
                      model_cfg: ModelConfig, where: str, max_rank: int | None) -> LoraAdapter:
    _refuse_config(cfg, where)
    expected = _targets(cfg, model_cfg, where)
    paths = _module_paths(model_cfg)
    found: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, arr in tensors.items():
        if len(key) > MAX_PATTERN_CHARS:
            raise AdapterError(f"{where}: tensor name {key[:80]!r}... is {len(key)} characters long")
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"{where}: tensor {key!r} is {_explain_key(key, model_cfg)}")
        path = m["path"]
        if path not in paths:
            layer = _LAYER.search(path)
            if layer and int(layer[1]) >= model_cfg.num_layers:
                raise AdapterError(f"{where}: tensor {key!r} is for layer {layer[1]}, the base "
                                   f"model has {model_cfg.num_layers} layers (adapter for a "
                                   "different model?)")
            raise AdapterError(f"{where}: tensor {key!r} is {_explain_key(key, model_cfg)}")
        found.setdefault(paths[path], {})[m["ab"]] = arr
    if not found:
        raise AdapterError(f"{where}: adapter_model.safetensors holds no LoRA weights")
    extra = sorted(set(found) - expected)
    missing = sorted(expected - set(found))
    if extra:
        raise AdapterError(f"{where}: weights for {module_path(model_cfg, *extra[0])} which "
                           "target_modules / layers_to_transform do not select")
    r0, alpha0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rank_pat, alpha_pat = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    L, M = model_cfg.num_layers, len(MODULES)
    ranks = np.zeros((L, M), np.int32)
    scales = np.zeros((L, M), np.float32)
    for (layer, module), ab in found.items():
        path = module_path(model_cfg, layer, module)
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
        # Every layer is padded to the module's highest rank below: refused here, one layer's
        # rank past the limit cannot make that cost (layers x its size) of host memory.
        check_rank(f"{path}.lora_A", r, max_rank, where)
        mi = MODULES.index(module)
        ranks[layer, mi] = r
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        if not abs(scale) <= MAX_LORA_SCALE:
            raise AdapterError(f"{where}: {path} has scale {scale:g} (lora_alpha {alpha:g}, "
                               f"rank {r}{', rsLoRA' if cfg.get('use_rslora') else ''}); "
                               f"at most {MAX_LORA_SCALE:g} in size is accepted")
        scales[layer, mi] = scale
    if missing:   # after the shape checks: a shape error is the clearer message for a wrong base
        raise AdapterError(f"{where}: target_modules selects "
                           f"{module_path(model_cfg, *missing[0])} but the adapter has no weights "
                           "for it")
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


def load_peft(name: str, path: str, model_cfg: ModelConfig,
              max_rank: int | None = None, dtype=None) -> LoraAdapter:
    """Read and validate a PEFT directory; every refusal is an AdapterError, whatever the
    files hold (an unexpected failure on a malformed file is reported as one too). max_rank:
    as for from_peft_arrays; dtype: the dtype the adapter will be served in (check_tensor)."""
    if not os.path.isdir(path):
        raise AdapterError(f"adapter path {path!r} is not a directory")
    try:
        cfg = read_peft_config(path)
        check_config_types(cfg, path)   # before the tensors: a config error is the clearer one
        return from_peft_arrays(name, cfg, read_peft_tensors(path, dtype), model_cfg, where=path,
                                max_rank=max_rank)
    except (AdapterError, OSError):
        raise
    except Exception as e:
        raise AdapterError(f"{path}: malformed adapter ({type(e).__name__}: {e})") from None
