"""LoRA flags for the `jaxserve` command line (parsed only at the entry point)."""
from __future__ import annotations

import argparse


def add_lora_arguments(p: argparse.ArgumentParser, per_request: bool = True) -> None:
    from jaxserve.engine import EngineConfig as C   # defaults: the config's
    g = p.add_argument_group("LoRA adapters")
    g.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                   help="register an adapter (PEFT or Orbax directory); repeatable")
    if per_request:
        g.add_argument("--adapter", default=None, metavar="NAME",
                       help="adapter to generate with (one registered with --lora)")
    g.add_argument("--max-loras", type=int, default=C.max_loras,
                   help="cap on distinct adapters in one batch (default: none)")
    g.add_argument("--max-lora-rank", type=int, default=C.max_lora_rank)
    g.add_argument("--lora-max-pages", type=int, default=C.lora_max_pages,
                   help="cap on KV-pool pages adapters may hold (default: any free page)")


def parse_lora_flags(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise SystemExit(f"jaxserve: error: --lora expects NAME=PATH, got {item!r}")
        out.append((name.strip(), path.strip()))
    return out


def lora_engine_kwargs(args) -> dict:
    """EngineConfig fields from the flags (absent flags keep EngineConfig's defaults)."""
    names = ("max_loras", "max_lora_rank", "lora_max_pages")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def register_loras(engine, args) -> str | None:
    """Add every --lora adapter to the engine; returns --adapter (checked to be registered)."""
    for name, path in parse_lora_flags(getattr(args, "lora", [])):
        engine.add_lora(name, path)
    adapter = getattr(args, "adapter", None)
    if adapter is not None and adapter not in engine.list_loras():
        raise SystemExit(f"jaxserve: error: --adapter {adapter!r} is not registered "
                         f"(use --lora {adapter}=PATH; registered: {engine.list_loras() or 'none'})")
    return adapter
