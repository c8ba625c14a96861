"""PEFT adapter directory (or a folder of them) -> Orbax checkpoints, validated against a base model.

`python scripts/convert_peft_to_orbax.py SRC DST [--model PATH]`: SRC is one adapter directory
(DST becomes its checkpoint) or a folder of adapter directories (DST/<name> for each). Every
adapter is parsed and checked exactly as `engine.add_lora` would, so a checkpoint that exists is
one the engine serves; failures are listed by name with the reason, and the exit status is 1.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from jaxserve.config import ModelConfig


def _is_peft_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def _base_config(model: str | None) -> ModelConfig:
    """Only the base model's config is needed (its weights are not read)."""
    from jaxserve.loader import load_config
    return load_config(model)


def _progress(i: int, n: int, name: str, t0: float, out=sys.stderr) -> None:
    width = 30
    done = int(width * i / max(n, 1))
    rate = i / max(time.perf_counter() - t0, 1e-9)
    out.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {rate:5.1f}/s {name[:40]:<40}")
    if i == n:
        out.write("\n")
    out.flush()


def convert(src: str, dst: str, model_cfg: ModelConfig, progress: bool = True) -> list[tuple[str, str]]:
    """Convert; returns [(adapter name, error)] for the adapters that were refused."""
    from jaxserve.lora.adapter import AdapterError, load_peft
    from jaxserve.lora.orbax_io import save_orbax
    if not os.path.isdir(src):
        raise AdapterError(f"{src!r} is not a directory")
    if _is_peft_dir(src):
        jobs = [(os.path.basename(os.path.normpath(src)), src, dst)]
    else:
        names = sorted(d for d in os.listdir(src) if _is_peft_dir(os.path.join(src, d)))
        if not names:
            raise AdapterError(f"{src!r} holds no PEFT adapter directories (adapter_config.json)")
        os.makedirs(dst, exist_ok=True)
        jobs = [(n, os.path.join(src, n), os.path.join(dst, n)) for n in names]
    failures = []
    t0 = time.perf_counter()
    for i, (name, s, d) in enumerate(jobs):
        try:
            save_orbax(load_peft(name, s, model_cfg), d, model_cfg)
        except AdapterError as e:
            failures.append((name, str(e)))
        if progress:
            _progress(i + 1, len(jobs), name, t0)
    return failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="a PEFT adapter directory, or a folder of them")
    p.add_argument("dst", help="the Orbax checkpoint directory (or folder of them) to create")
    p.add_argument("--model", default=None,
                   help="base model the adapters must fit (default: embedded SmolLM2-135M)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    from jaxserve.lora.adapter import AdapterError
    try:
        failures = convert(args.src, args.dst, _base_config(args.model), progress=not args.quiet)
    except (AdapterError, ValueError, OSError) as e:
        print(f"convert_peft_to_orbax: error: {e}", file=sys.stderr)
        return 1
    for name, err in failures:
        print(f"convert_peft_to_orbax: refused {name}: {err}", file=sys.stderr)
    return 1 if failures else 0
