"""Load time, host peak memory and device bytes of loading a checkpoint, each in a fresh process.

    python scripts/bench_load.py CHECKPOINT [--tp 1 2] [--dtype bfloat16] [--backend auto]
        [--path engine|legacy] [--load-format auto|dummy] [--json out.json]

Each (tp) runs in its own subprocess (host peak is per process; tp > 1 runs on simulated CPU
devices, XLA_FLAGS=--xla_force_host_platform_device_count) and goes through the engine's
loading path up to the prepared params:
  engine   backends.select -> loader.load_model(placement=the backend's) -> backend.prepare
           (consuming the canonical weights), as LLMEngine does
  legacy   loader.load_model -> weights.cast -> backends.select -> backend.prepare with the
           LoadedModel kept alive, as LLMEngine did before issue 17 (runs on older commits)
Reported per run: load seconds (to the prepared params on device), host peak RSS (the child's
ru_maxrss) and its peak above the baseline after importing jax, checkpoint bytes, peak above
baseline / checkpoint bytes, and the bytes of every live jax array after loading (summed over
their device shards, so replicated arrays count once per device; and the largest per device)
/ checkpoint bytes (with no weight files, --load-format dummy: / the weights' bytes in
--dtype). On a CPU host "device" arrays live in host memory too, so the host peak
includes them.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def checkpoint_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(f) for f in glob.glob(os.path.join(path, "*.safetensors")))


def child(args) -> dict:
    import gc
    import resource
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, ROOT)
    from jaxserve import backends, loader

    jnp.zeros(1).block_until_ready()              # the client is up: part of the baseline
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    dtype = jnp.dtype(args.dtype)
    t0 = time.perf_counter()
    keep = None
    if args.path == "legacy":
        from jaxserve.model.weights import cast
        keep = loader.load_model(args.checkpoint, dtype)
        backend = backends.select(args.backend, keep.config, dtype, tp=args.tp)
        params = backend.prepare(cast(keep.weights, dtype))
    else:
        cfg = loader.load_config(args.checkpoint)
        backend = backends.select(args.backend, cfg, dtype, tp=args.tp)
        model = loader.load_model(args.checkpoint, dtype, placement=backend.placement(),
                                  load_format=args.load_format)
        weights = model.weights
        del model                                 # as the engine: the backend's from here on
        params = backend.prepare(weights, consume=True)
        del weights
    jax.block_until_ready(params)
    load_s = time.perf_counter() - t0
    gc.collect()
    per_device: dict[str, int] = {}
    for a in jax.live_arrays():
        for s in a.addressable_shards:
            per_device[str(s.device)] = per_device.get(str(s.device), 0) + s.data.nbytes
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del keep, params
    from jaxserve.model.weights import describe
    specs = describe(loader.load_config(args.checkpoint))
    specs = [*specs.pop("layers").values(), *specs.values()]
    weight_bytes = sum(int(np.prod(s.shape)) for s in specs) * dtype.itemsize
    return {"tp": args.tp, "path": args.path, "backend": backend.name, "dtype": args.dtype,
            "weight_bytes": weight_bytes,
            "load_s": load_s, "host_peak_bytes": peak_kb * 1024,
            "host_peak_above_baseline_bytes": (peak_kb - base_kb) * 1024,
            "baseline_bytes": base_kb * 1024,
            "device_bytes_total": sum(per_device.values()),
            "device_bytes_max_per_device": max(per_device.values(), default=0),
            "num_devices_used": len(per_device)}


def run_child(args, tp: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={max(tp, 1)}").strip()
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cmd = [sys.executable, os.path.abspath(__file__), args.checkpoint, "--child", "--tp", str(tp),
           "--dtype", args.dtype, "--backend", args.backend, "--path", args.path,
           "--load-format", args.load_format]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"tp={tp} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows, ck_bytes: int) -> str:
    gib = 2**30
    lines = ["| path | tp | backend | load s | host peak GiB | above baseline GiB | "
             "above baseline / checkpoint | device GiB (all devices) | device / checkpoint | "
             "max per device GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['path']} | {r['tp']} | {r['backend']} | {r['load_s']:.1f} | "
            f"{r['host_peak_bytes'] / gib:.2f} | {r['host_peak_above_baseline_bytes'] / gib:.2f} | "
            f"{r['host_peak_above_baseline_bytes'] / ck_bytes:.2f}x | "
            f"{r['device_bytes_total'] / gib:.2f} | {r['device_bytes_total'] / ck_bytes:.2f}x | "
            f"{r['device_bytes_max_per_device'] / gib:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--path", default="engine", choices=["engine", "legacy"])
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    ap.add_argument("--json", default="bench_results/load.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.tp = args.tp[0]
        print(json.dumps(child(args)))
        return 0
    ck = checkpoint_bytes(args.checkpoint)
    rows = []
    for tp in args.tp:
        rows.append(run_child(args, tp))
        r = rows[-1]
        print(f"tp {tp}: {r['load_s']:.1f} s, host peak above baseline "
              f"{r['host_peak_above_baseline_bytes'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    if not ck:   # --load-format dummy on a config-only directory: the weights' own size
        ck = rows[0]["weight_bytes"]
    print(f"checkpoint {args.checkpoint}: {ck / 2**30:.2f} GiB; commit {commit}")
    print(table(rows, ck))
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"checkpoint": args.checkpoint, "checkpoint_bytes": ck, "commit": commit,
                   "argv": sys.argv[1:], "rows": rows}, f, indent=2)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
