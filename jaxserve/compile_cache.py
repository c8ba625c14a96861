"""The persistent compilation cache: every compiled program is also written to disk, so a
restarted server reads its step programs back instead of compiling them again (the warm-up of
a second `jaxserve serve` start; docs/benchmarks.md "Warm-up (issue 17)").

Where: --compilation-cache-dir DIR if given ("" turns the cache off), else $JAXSERVE_CACHE_DIR
(same meaning), else jax's own $JAX_COMPILATION_CACHE_DIR, else ~/.cache/jaxserve/xla. Every
program is cached, however small or quick to compile (jax's defaults skip programs compiled in
under a second: most of a small model's). Set once at process start, before the first compile:
jax reads the setting when it first compiles.
"""
from __future__ import annotations

import argparse
import os

DEFAULT_DIR = os.path.join("~", ".cache", "jaxserve", "xla")


def add_argument(g: argparse._ActionsContainer) -> None:
    g.add_argument("--compilation-cache-dir", default=None, metavar="DIR",
                   help="persistent compilation cache: compiled programs kept across restarts "
                        "(default: $JAXSERVE_CACHE_DIR, else $JAX_COMPILATION_CACHE_DIR, else "
                        f"{DEFAULT_DIR}; an empty string turns it off)")


def resolve(flag: str | None) -> str | None:
    """The cache directory (expanded), or None when off."""
    if flag is None:
        flag = os.environ.get("JAXSERVE_CACHE_DIR")
    if flag is None:
        flag = os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_DIR
    return os.path.expanduser(flag) if flag else None


def enable(flag: str | None) -> str | None:
    """Turn the cache on at the resolved directory (or off). Returns the directory or None."""
    import jax
    path = resolve(flag)
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path
