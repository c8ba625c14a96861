"""Adapters as Orbax checkpoints: the arrays (our layout, `LoraWeights`) plus a JSON config.

Layout of a checkpoint directory (orbax-checkpoint Composite):
  params/  StandardSave of {"a": {module: [L, R, in]}, "b": {module: [L, R, out]}, "ranks", "scales"}
  config/  JsonSave of {"peft_config": <adapter_config.json as read>, "base": <shape facts>}
The base facts let a load refuse an adapter written for another model before touching arrays.
"""
from __future__ import annotations

import os

import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.lora.adapter import (MAX_LORA_SCALE, MODULES, AdapterError, LoraAdapter,
                                   LoraWeights, check_config_types, check_rank, check_tensor,
                                   module_dims)

FORMAT = "jaxserve-lora-orbax-v1"


def is_orbax_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "params")) and os.path.isdir(os.path.join(path, "config"))


def _base_facts(cfg: ModelConfig) -> dict:
    return {"num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "q_size": cfg.q_size, "kv_size": cfg.kv_size}


def save_orbax(adapter: LoraAdapter, path: str, model_cfg: ModelConfig) -> None:
    import orbax.checkpoint as ocp
    path = os.path.abspath(path)
    if os.path.exists(path):
        raise AdapterError(f"{path} already exists (refusing to overwrite)")
    w = adapter.weights
    tree = {"a": dict(w.a), "b": dict(w.b), "ranks": w.ranks, "scales": w.scales}
    config = {"format": FORMAT, "name": adapter.name, "peft_config": adapter.config,
              "base": _base_facts(model_cfg)}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(path, args=ocp.args.Composite(params=ocp.args.StandardSave(tree),
                                                 config=ocp.args.JsonSave(config)))


def load_orbax(name: str, path: str, model_cfg: ModelConfig,
               max_rank: int | None = None, dtype=None) -> LoraAdapter:
    """Read and validate a checkpoint; every refusal is an AdapterError, whatever the files
    hold (Orbax's own failures on a damaged checkpoint are reported as one too). max_rank: the
    highest rank the caller serves (None: any), checked before the arrays are converted;
    dtype: the dtype the adapter will be served in (check_tensor)."""
    path = os.path.abspath(path)
    if not is_orbax_dir(path):
        raise AdapterError(f"{path} is not a jaxserve Orbax adapter (expected params/ and config/)")
    try:
        return _load_orbax(name, path, model_cfg, max_rank, dtype)
    except (AdapterError, OSError):
        raise
    except Exception as e:
        raise AdapterError(f"{path}: malformed adapter checkpoint ({type(e).__name__}: {e})") from None


def _load_orbax(name: str, path: str, model_cfg: ModelConfig,
                max_rank: int | None, dtype) -> LoraAdapter:
    import orbax.checkpoint as ocp
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        config = ckptr.restore(path, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            fmt = config.get("format") if isinstance(config, dict) else config
            raise AdapterError(f"{path}: unknown adapter checkpoint format {fmt!r:.80}")
        base = _base_facts(model_cfg)
        if config.get("base") != base:
            raise AdapterError(f"{path}: adapter was converted for a base model with "
                               f"{config.get('base')}, this model has {base}")
        tree = ckptr.restore(path, args=ocp.args.Composite(params=ocp.args.StandardRestore())).params
    L = model_cfg.num_layers
    ranks = np.asarray(tree["ranks"], np.int32)
    scales = np.asarray(tree["scales"], np.float32)
    if ranks.shape != (L, len(MODULES)) or scales.shape != ranks.shape:
        raise AdapterError(f"{path}: ranks/scales have shape {ranks.shape}, expected {(L, len(MODULES))}")
    if (ranks < 0).any():
        raise AdapterError(f"{path}: negative ranks {sorted(set(ranks[ranks < 0].tolist()))}")
    for mi, m in enumerate(MODULES):   # before the arrays are converted (copied) below
        check_rank(f"a.{m}", int(ranks[:, mi].max()), max_rank, path)
    a = {m: np.asarray(v, np.float32) for m, v in tree["a"].items()}
    b = {m: np.asarray(v, np.float32) for m, v in tree["b"].items()}
    check_tensor("scales", scales, path)
    if (np.abs(scales) > MAX_LORA_SCALE).any():
        raise AdapterError(f"{path}: scales beyond {MAX_LORA_SCALE:g} in size "
                           f"(max {float(np.abs(scales).max()):g})")
    if set(b) != set(a):
        raise AdapterError(f"{path}: modules {sorted(set(a) ^ set(b))} lack their A or B arrays")
    for m in a:
        if m not in MODULES or m not in b:
            raise AdapterError(f"{path}: unexpected module {m!r}")
        din, dout = module_dims(model_cfg, m)
        R = int(ranks[:, MODULES.index(m)].max())
        if a[m].shape != (L, R, din) or b[m].shape != (L, R, dout):
            raise AdapterError(f"{path}: {m} arrays {a[m].shape}/{b[m].shape} do not match the base "
                               f"model ({(L, R, din)}/{(L, R, dout)})")
        check_tensor(f"a.{m}", a[m], path, dtype)
        check_tensor(f"b.{m}", b[m], path, dtype)
    if any((ranks[:, MODULES.index(m)] > 0).any() for m in MODULES if m not in a):
        raise AdapterError(f"{path}: ranks name modules that have no arrays")
    peft_config = config.get("peft_config") or {}
    check_config_types(peft_config, path)   # kept with the adapter: as strict as at conversion
    return LoraAdapter(name, LoraWeights(a=a, b=b, ranks=ranks, scales=scales), dict(peft_config))
