"""The startup check of a multi-host group (jaxserve/distributed.py): what every process must
have loaded alike, as a fingerprint each follower sends to process 0, and the parts that
differ, named for the error message."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os


def _file_digest(path: str, sample: int = 1 << 20) -> str:
    """Size and sha256 of the first and last MiB (the header names every tensor's shape and
    offset; the sampled data catches a different training step of the same architecture)."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        h.update(f.read(sample))
        if size > sample:
            f.seek(max(sample, size - sample))
            h.update(f.read(sample))
    return f"{size}:{h.hexdigest()[:16]}"


_SAMPLE = 1 << 16


def fingerprint(engine) -> dict[str, object]:
    """What must be equal on every process, by part: the engine and model configs, the
    checkpoint's files (sampled digests), the prepared weights' shapes and dtypes, and a
    checksum of (a strided sample of) the weights every process holds whole (replicated)."""
    import jax
    import numpy as np
    cfg = dataclasses.asdict(engine.config)
    cfg.pop("model")   # the path may differ between hosts; the files are compared instead
    files = {}
    m = engine.model
    if m is not None:
        names = [m.gguf_file] if m.gguf_file else sorted(
            f for f in os.listdir(m.tokenizer_dir) if not f.startswith("."))
        for name in names:
            path = os.path.join(m.tokenizer_dir, name)
            if os.path.isfile(path):
                files[name] = _file_digest(path)
    leaves = jax.tree_util.tree_leaves_with_path(engine.runner.params)
    shapes = hashlib.sha256(repr([(jax.tree_util.keystr(k), tuple(x.shape), str(x.dtype))
                                  for k, x in leaves]).encode()).hexdigest()[:16]
    sums = []
    for k, x in leaves:
        if isinstance(x, jax.Array) and x.sharding.is_fully_replicated:
            # up to _SAMPLE evenly strided values (a replica at tp 1 holds every weight whole:
            # reading them all to the host would take the model's size twice over)
            local = x.addressable_data(0).reshape(-1)
            local = np.asarray(local[::max(1, local.size // _SAMPLE)], np.float64)
            sums.append(f"{jax.tree_util.keystr(k)}={local.sum():.6e}")
    return {"engine config": json.dumps(cfg, sort_keys=True, default=str),
            "model config": repr(engine.model_config),
            "checkpoint files": files,
            "weight shapes and dtypes": shapes,
            "replicated weights' checksum": hashlib.sha256(
                "|".join(sums).encode()).hexdigest()[:16]}


def differences(mine: dict, theirs: dict, pid: int = 1) -> list[str]:
    """The parts of process 0's fingerprint and process `pid`'s that differ, each named
    (files by name, config fields with both values)."""
    out = []
    for part in mine:
        a, b = mine[part], theirs.get(part)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            names = sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
            out.append(f"{part} ({', '.join(names)})")
        elif part == "engine config" and isinstance(b, str):
            ca, cb = json.loads(a), json.loads(b)
            fields = [f"{k}: {ca.get(k)!r} on process 0, {cb.get(k)!r} on process {pid}"
                      for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)]
            out.append(f"{part} ({', '.join(fields)})")
        else:
            out.append(part)
    return out
