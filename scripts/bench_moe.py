"""The mixture-of-experts layer: grouped matmul (jaxserve/model/moe.py expert_mlp, ragged dots
over the tokens sorted by expert) against the dense reference (every expert on every token).

    python scripts/bench_moe.py [--tokens 16,256,2048] [--experts 8,64] [--top-k 2,8]
                                [--widths mixtral:128:448,qwen3moe:128:48] [--dtype float32]
                                [--iters 5] [--dense-max-gflop 200] [--out bench_results/moe.json]

One row per (width, tokens, experts, top-k) with top-k <= experts. Both sides run the same
layer on the same inputs: router logits x @ W_r [H, E], route (softmax, top-k, renormalised),
then the experts' SwiGLUs, weighted and summed per token (float32 out); `--widths` names
(hidden H, expert width Im) pairs: the defaults are Mixtral-like (Im = 3.5 H) and
Qwen3-30B-A3B-like (Im = 0.375 H) at widths small enough for a CPU (Mixtral 8x7B is 4096:14336,
Qwen3-30B-A3B 2048:768 with 128 experts, top-8: pass them on an accelerator).

Columns: ms = median over --iters runs of the jitted layer; routed GFLOP = 2 * 3 * N * k * H * Im
(the work the routed pairs need) and GFLOP/s = that / grouped ms; dense GFLOP = the reference's
2 * 3 * N * E * H * Im; x = dense ms / grouped ms; max|d| = largest difference between the two
outputs relative to the reference's largest value. The reference is skipped (its columns
empty, the reason in the JSON) where its work exceeds --dense-max-gflop. Compile time is not
counted. Nothing here is a threshold: the script reports.

On CPU the comparison says little about the grouped matmul itself: XLA:CPU compiles
ragged_dot as one dense dot of the rows, masked per group and widened to [N * k, E * H], times
the experts stacked [E * H, Im] (E times the routed work; see the compiled HLO), so there the
grouped layer is no faster than the reference. TPU compiles ragged_dot natively; run this on
the accelerator for the number that matters.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxserve.model import moe  # noqa: E402


def median_s(fn, args, iters):
    out = jax.block_until_ready(fn(*args))      # compile + warm up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


@functools.partial(jax.jit, static_argnames=("k", "impl"))
def layer(x, router, gate, up, down, *, k, impl):
    logits = jnp.einsum("nh,he->ne", x, router, preferred_element_type=jnp.float32)
    weights, experts = moe.route(logits, k, True)
    f = moe.expert_mlp if impl == "grouped" else moe.dense_reference
    return f(x, weights, experts, gate, up, down, "silu")


def _ints(s):
    return [int(v) for v in s.split(",")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokens", default="16,256,2048", help="tokens per call (N)")
    ap.add_argument("--experts", default="8,64", help="experts (E)")
    ap.add_argument("--top-k", default="2,8", help="experts per token (k)")
    ap.add_argument("--widths", default="mixtral:128:448,qwen3moe:128:48",
                    help="name:hidden:expert_width, comma-separated")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                    help="weights and activations (default: float32 on CPU, bfloat16 elsewhere)")
    ap.add_argument("--iters", type=int, default=5, help="timed runs per row")
    ap.add_argument("--dense-max-gflop", type=float, default=200.0,
                    help="skip the dense reference where its work exceeds this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join("bench_results", "moe.json"),
                    help="JSON results ('' for none)")
    args = ap.parse_args(argv)
    dtype = jnp.dtype(args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16"))
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; {dtype.name}")
    hdr = (f"{'width':9} {'H:Im':>9} {'N':>5} {'E':>3} {'k':>2} {'grouped ms':>10} "
           f"{'routed GFLOP':>12} {'GFLOP/s':>8} {'dense ms':>9} {'dense GFLOP':>11} "
           f"{'x':>6} {'max|d|':>8}")
    print(hdr)
    rng = np.random.default_rng(args.seed)
    rows = []

    def save(rows):
        if not args.out:
            return
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(dict(device=dev.device_kind, platform=jax.default_backend(),
                           jax=jax.__version__, dtype=dtype.name, iters=args.iters,
                           argv=sys.argv[1:] if argv is None else list(argv), rows=rows),
                      fh, indent=1)
    for spec in args.widths.split(","):
        name, H, Im = spec.split(":")
        H, Im = int(H), int(Im)
        for E in _ints(args.experts):
            def w(*shape):
                return jnp.asarray(rng.standard_normal(shape, np.float32) / shape[-2] ** 0.5,
                                   dtype)
            router, gate, up, down = w(H, E), w(E, H, Im), w(E, H, Im), w(E, Im, H)
            for N in _ints(args.tokens):
                x = jnp.asarray(rng.standard_normal((N, H), np.float32), dtype)
                for k in _ints(args.top_k):
                    if k > E:
                        continue
                    routed = 2 * 3 * N * k * H * Im / 1e9
                    dense = 2 * 3 * N * E * H * Im / 1e9
                    t_g, y_g = median_s(functools.partial(layer, k=k, impl="grouped"),
                                        (x, router, gate, up, down), args.iters)
                    row = dict(width=name, hidden=H, expert_width=Im, tokens=N, experts=E,
                               top_k=k, dtype=dtype.name, grouped_ms=t_g * 1e3,
                               routed_gflop=routed, grouped_gflops=routed / t_g,
                               dense_gflop=dense, dense_ms=None, dense_over_grouped=None,
                               max_rel_diff=None, dense_skipped=None)
                    if dense <= args.dense_max_gflop:
                        t_d, y_d = median_s(functools.partial(layer, k=k, impl="dense"),
                                            (x, router, gate, up, down), args.iters)
                        ref = np.asarray(y_d, np.float32)
                        d = np.abs(np.asarray(y_g, np.float32) - ref).max() / np.abs(ref).max()
                        row.update(dense_ms=t_d * 1e3, dense_over_grouped=t_d / t_g,
                                   max_rel_diff=float(d))
                    else:
                        row["dense_skipped"] = (f"{dense:.0f} GFLOP > --dense-max-gflop "
                                                f"{args.dense_max_gflop:g}")
                    rows.append(row)

                    def f(v, fmt):
                        return "" if v is None else format(v, fmt)
                    print(f"{name:9} {f'{H}:{Im}':>9} {N:>5} {E:>3} {k:>2} {t_g * 1e3:>10.3f} "
                          f"{routed:>12.4f} {routed / t_g:>8.1f} {f(row['dense_ms'], '.3f'):>9} "
                          f"{dense:>11.3f} {f(row['dense_over_grouped'], '.2f'):>6} "
                          f"{f(row['max_rel_diff'], '.1e'):>8}", flush=True)
                    save(rows)    # after every row: a long sweep cut short keeps its rows
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
