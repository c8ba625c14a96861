"""The serving dtype: `--dtype auto|float32|bfloat16`, resolved once at engine start.

auto:
  GPU / TPU       bfloat16, whatever the checkpoint stores. bf16 checkpoints (Llama 3, most
                  current ones) are served as they are; fp16 ones as bf16 (jaxserve has no
                  fp16 path; bf16 keeps fp16's values within 8 mantissa bits and never
                  overflows); fp32 ones as bf16 too, as vLLM serves fp32 checkpoints in 16 bits:
                  fp32 would double the weights' and the KV pool's memory and halve decode,
                  which reads every weight each step. `--dtype float32` serves them in fp32.
  CPU with AMX    bfloat16: the CPU backend's AMX tile matmuls run bf16 (several times the fp32
                  speed, README "Measured numbers"); the check is the CPU backend's own
                  (the cpu backend's runs_amx: the kernel built for AMX, the tile state granted,
                  JAXSERVE_CPU_AMX not 0).
  other CPUs      float32: XLA:CPU's bf16 matmuls are no faster there, and fp32 gives HF's
                  numbers.
The checkpoint's own dtype (HF config.json `dtype` / `torch_dtype`; a GGUF file's file type)
is read for the start-up log.
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
CHOICES = ("auto",) + tuple(DTYPES)
ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")

# GGUF general.file_type (llama.cpp's LlamaFileType): the float ones; anything else is quantized.
_GGUF_FLOAT_TYPES = {0: "float32", 1: "float16", 32: "bfloat16"}


def checkpoint_dtype(path: str | None) -> str | None:
    """The dtype a checkpoint stores its weights in: "float32", "bfloat16", "float16",
    "quantized" (a quantized GGUF file), or None when it cannot be told (no field, unreadable
    path; loading reports such errors itself). path None: the embedded default model."""
    try:
        if path is None:
            from jaxserve.loader import default_model_path
            path = default_model_path()
        if os.path.isfile(path) and path.endswith(".gguf"):
            return _gguf_dtype(path)
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    for key in ("dtype", "torch_dtype"):   # transformers >= 4.56 writes "dtype"
        value = cfg.get(key) if isinstance(cfg, dict) else None
        if isinstance(value, str):
            return value.removeprefix("torch.")
    return None


def _gguf_dtype(path: str) -> str | None:
    import gguf
    try:
        field = gguf.GGUFReader(path).fields.get("general.file_type")
    except Exception:   # a malformed file: loading it names the problem
        return None
    if field is None:
        return None
    return _GGUF_FLOAT_TYPES.get(int(field.contents()), "quantized")


def resolve(requested: str, *, platform: str, checkpoint: str | None,
            amx: bool | None = None) -> tuple[str, str]:
    """(dtype name, why in words) for `requested` (auto | float32 | bfloat16) on `platform`
    (jax.default_backend()). amx: whether the CPU runs AMX tile matmuls (None: ask the CPU
    backend)."""
    if requested not in CHOICES:
        raise ValueError(f"dtype must be one of {list(CHOICES)}, got {requested!r}")
    ckpt = f"checkpoint {checkpoint or 'dtype unknown'}"
    if requested != "auto":
        return requested, f"--dtype {requested} ({ckpt})"
    if platform in ACCELERATORS:
        return "bfloat16", f"auto on {platform}: bfloat16 ({ckpt})"
    if amx is None:
        from jaxserve.backends.cpu import backend as cpu
        amx = cpu.runs_amx()
    if amx:
        return "bfloat16", f"auto on {platform}: bfloat16, this CPU runs AMX tile matmuls ({ckpt})"
    return "float32", f"auto on {platform}: float32, no AMX on this CPU ({ckpt})"


def resolve_for_model(requested: str, model_path: str | None) -> tuple[str, str]:
    """resolve() for the checkpoint at model_path (None: the embedded model) on JAX's default
    backend."""
    import jax
    return resolve(requested, platform=jax.default_backend(),
                   checkpoint=checkpoint_dtype(model_path))
