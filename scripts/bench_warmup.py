#!/usr/bin/env python
"""Warm-up time: how long `jaxserve serve --warmup full` compiles the engine's bucket set.

Builds the engine (default model unless --model), lists StepBuilder.shapes() for its limits and
warms them up (ModelRunner.warmup), printing a table (kind, programs, seconds, seconds per
program) and writing JSON. Run it twice with the same --compilation-cache-dir for the cold and
the cached time. --sample K warms every K-th prefill bucket only (all decode buckets) and also
reports the full set's time extrapolated per kind, for sets too large to time whole on a CPU.

  .venv/bin/python scripts/bench_warmup.py --compilation-cache-dir /tmp/xla-warm [--sample 8]
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    from jaxserve import compile_cache
    from jaxserve.cli import add_engine_arguments, engine_config_from_args
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_arguments(p)
    p.add_argument("--lora", action="store_true", help="include the LoRA buckets")
    p.add_argument("--sample", type=int, default=1, help="warm every K-th prefill bucket")
    p.add_argument("--json", default="bench_warmup.json")
    args = p.parse_args(argv)
    cache = compile_cache.enable(args.compilation_cache_dir)
    from jaxserve.engine import LLMEngine
    t0 = time.perf_counter()
    engine = LLMEngine(engine_config_from_args(args))
    load_s = time.perf_counter() - t0
    runner = engine.runner
    shapes = runner.builder.shapes(lora=args.lora)
    rows = []
    for kind in ("decode", "prefill"):
        of_kind = [s for s in shapes if s[0] == kind]
        chosen = of_kind if kind == "decode" else of_kind[::args.sample]
        n, secs = runner.warmup(shapes=chosen)
        rows.append(dict(kind=kind, in_set=len(of_kind), warmed=len(chosen), compiled=n,
                         seconds=round(secs, 2), per_program=round(secs / max(len(chosen), 1), 3),
                         full_set_seconds=round(secs / max(len(chosen), 1) * len(of_kind), 1)))
    print(f"{runner.backend.describe()}; cache: {cache}; engine start {load_s:.1f} s",
          file=sys.stderr)
    print("| kind | buckets in the set | warmed | seconds | s / program | full set, s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['in_set']} | {r['warmed']} | {r['seconds']} | "
              f"{r['per_program']} | {r['full_set_seconds']} |")
    with open(args.json, "w") as f:
        json.dump(dict(args=vars(args), cache=cache, engine_start_s=load_s, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
