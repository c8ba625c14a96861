"""The model families jaxserve serves, and finding the one a checkpoint or config belongs to.

Adding a family: a module here defining a `Family` (see base.py and docs/model_families.md),
listed in FAMILIES.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from jaxserve.model.families.base import AXIS_SIZES, Family, WeightSpec, hf_common_fields
from jaxserve.model.families.gemma import GEMMA2, GEMMA3
from jaxserve.model.families.llama import LLAMA
from jaxserve.model.families.mixtral import MIXTRAL
from jaxserve.model.families.qwen3 import QWEN3
from jaxserve.model.families.qwen3_moe import QWEN3_MOE

if TYPE_CHECKING:
    from jaxserve.config import ModelConfig

FAMILIES: tuple[Family, ...] = (LLAMA, QWEN3, GEMMA2, GEMMA3, MIXTRAL, QWEN3_MOE)

# Every PEFT module any family adapts, in one order: the engine's per-module tables
# (adapter ranks and scales, the LoRA pool's pages) are indexed by it.
LORA_MODULES: tuple[str, ...] = tuple(dict.fromkeys(m for f in FAMILIES for m in f.lora_modules))

__all__ = ["AXIS_SIZES", "FAMILIES", "LORA_MODULES", "Family", "WeightSpec", "for_config",
           "for_gguf", "for_hf_config", "hf_common_fields"]


def _supported() -> list[str]:
    return sorted(a for f in FAMILIES for a in f.architectures)


def for_hf_config(d: dict) -> tuple[Family, str]:
    """(family, ModelConfig.architecture) of an HF config.json, by its `architectures` (or, when
    that is empty, its `model_type`)."""
    from jaxserve.config import ConfigError
    archs = d.get("architectures") or []
    for a in archs:
        for f in FAMILIES:
            if a in f.architectures:
                return f, f.architectures[a]
    mt = d.get("model_type")
    if not archs:
        for f in FAMILIES:
            if mt in f.model_types:
                return f, mt
    raise ConfigError(f"unsupported architecture {archs or mt!r}; jaxserve serves {_supported()}")


def for_config(cfg: ModelConfig) -> Family:
    for f in FAMILIES:
        if cfg.architecture in f.model_types:
            return f
    raise ValueError(f"no model family has architecture {cfg.architecture!r}")


def for_gguf(arch: str) -> Family:
    from jaxserve.config import ConfigError
    for f in FAMILIES:
        if arch in f.gguf_architectures:
            return f
    known = sorted(a for f in FAMILIES for a in f.gguf_architectures)
    raise ConfigError(f"GGUF architecture {arch!r} is not supported (supported: {known})")
