"""Small-M matmuls on CPU: the native kernel (jaxserve.backends.cpu.cpu_matmul) vs XLA's dot.

    python scripts/bench_cpu_matmul.py [--rows 1,2,4,8,16] [--copies 30] [--reps 7]
                                       [--weight-dtype bfloat16|float32] [--shapes a,b]
                                       [--json bench_results/cpu_matmul[_f32].json]

Shapes of the default model (SmolLM2-135M, hidden 576, intermediate 1536, vocab 49152), bf16
weights (or f32 with --weight-dtype float32): x [M, K] @ W [K, N] for the fused q|k|v
(576x960), o_proj (576x576), fused gate|up (576x3072) and down_proj (1536x576); and the tied LM
head x @ E^T with E [49152, 576]. x has the weights' dtype, as in the engine's decode; both
sides return float32.

Each weight shape is held in `--copies` distinct copies and one jitted program runs the matmul
once on each copy, chained (the next x depends on the previous result), so that, as in a decode
step over the 30 layers, each weight is read after all the others (copies MB = their total; the
default model's bf16 weights are ~270 MB in all). Whether that total misses the last-level cache
depends on the CPU (printed: its size as the OS reports it; a VM may report the host's). ms =
median over `--reps` runs of the program divided by the number of copies; GB/s = bytes of the
weight / ms.
XLA: jnp.dot(x, w, preferred_element_type=f32) and, for the head, jnp.einsum('mk,nk->mn', x, e,
preferred_element_type=f32). Read-bandwidth reference, measured in the same run: jnp.sum of a
512 MB float32 array (XLA's reduce). max|d|/S: the kernel's largest error against a float64
product of the same values, relative to sum_k |x_k w_k| of that output.
With --kernel amx, `swiglu` is swiglu_amx (silu(x @ Wg) * (x @ Wu), bf16 out) on the packed fused
gate|up weight against the same in XLA; its max|d|/S is relative to the largest activation.
"""
from __future__ import annotations

import argparse
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

from jaxserve.backends.cpu import cpu_matmul  # noqa: E402

SHAPES = [  # (name, layout, K, N): "nn" = x @ W [K, N], "nt" = x @ E^T with E [N, K]
    ("qkv", "nn", 576, 960),
    ("o_proj", "nn", 576, 576),
    ("gate_up", "nn", 576, 3072),
    ("down", "nn", 1536, 576),
    ("lm_head", "nt", 576, 49152),
    ("swiglu", "swiglu", 576, 3072),   # --kernel amx only: swiglu_amx on the packed [Wg Wu]
]


def chained(fn, copies):
    """One program: y_i = fn(x_i, w_i) for each copy, x_{i+1} = x_i + 0 * y_i[0, 0] (a data
    dependency, so XLA runs the matmuls one after another, not concurrently)."""
    def run(x, *ws):
        acc = jnp.zeros((), jnp.float32)
        for w in ws:
            y = fn(x, w)
            s = y[0, 0]
            acc = acc + s
            x = x + (s * 0).astype(x.dtype)
        return acc
    return jax.jit(run)


def median_s(f, args, reps):
    jax.block_until_ready(f(*args))           # compile
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def read_bandwidth(reps):
    a = jnp.ones((512 << 20) // 4, jnp.float32)
    f = jax.jit(jnp.sum)
    t = median_s(f, (a,), reps)
    del a
    return (512 << 20) / t / 1e9


def llc_size() -> str:
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        levels = sorted((d for d in os.listdir(base) if d.startswith("index")),
                        key=lambda d: int(d[5:]))
        with open(os.path.join(base, levels[-1], "size")) as f:
            return f.read().strip()
    except (OSError, IndexError):
        return "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", default="1,2,4,8,16", help="values of M")
    ap.add_argument("--copies", type=int, default=30, help="distinct copies of each weight")
    ap.add_argument("--reps", type=int, default=7, help="timed runs of each program")
    ap.add_argument("--shapes", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--weight-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="weights (and x) dtype")
    ap.add_argument("--kernel", default="small-m", choices=("small-m", "amx"),
                    help="small-m: matmul / matmul_t; amx: matmul_amx on weights packed with "
                         "pack_amx (the head: E^T packed), bf16 only")
    ap.add_argument("--json", default=None,
                    help="default: bench_results/cpu_matmul.json (f32: cpu_matmul_f32.json); "
                         "'' for none")
    args = ap.parse_args(argv)
    if not cpu_matmul.available():
        sys.exit(f"kernel unavailable: {cpu_matmul.unavailable_reason()}")
    rows_list = [int(m) for m in args.rows.split(",")]
    wdt = jnp.dtype(args.weight_dtype)
    amx = args.kernel == "amx"
    if amx and (wdt != jnp.bfloat16 or not cpu_matmul.amx_available()):
        sys.exit("--kernel amx needs bfloat16 weights and AMX (cpu_matmul.amx_available())")
    if args.json is None:
        args.json = os.path.join("bench_results", "cpu_matmul_amx.json" if amx else
                                 "cpu_matmul.json" if wdt == jnp.bfloat16
                                 else "cpu_matmul_f32.json")
    shapes = [s for s in SHAPES if (args.shapes is None or s[0] in args.shapes.split(","))
              and (amx or s[1] != "swiglu")]
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__},"
          f" {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    print(f"last-level cache (as reported): {llc_size()}; weights {wdt.name}, "
          f"{args.copies} copies")
    bw = read_bandwidth(args.reps)
    print(f"read-bandwidth reference: jnp.sum over 512 MB f32: {bw:.1f} GB/s")
    rng = np.random.default_rng(0)
    xla_nn = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)
    xla_nt = lambda x, e: jnp.einsum("mk,nk->mn", x, e, preferred_element_type=jnp.float32)

    def xla_swiglu(x, w):
        y = xla_nn(x, w)
        return jax.nn.silu(y[:, :w.shape[1] // 2]) * y[:, w.shape[1] // 2:]
    xla_fns = {"nn": xla_nn, "nt": xla_nt, "swiglu": xla_swiglu}
    results = []
    hdr = (f"{'shape':8} {'K x N':>11} {'M':>3} {'MB':>6} {'copies MB':>9} {'kernel ms':>10} "
           f"{'GB/s':>6} "
           f"{'xla ms':>8} {'GB/s':>6} {'speedup':>8} {'max|d|/S':>9}")
    print(hdr)
    for name, layout, K, N in shapes:
        wshape = (N, K) if layout == "nt" else (K, N)
        base = rng.standard_normal(wshape, np.float32) * 0.05
        # Distinct copies: each a different buffer (and slightly different values).
        ws = [jnp.asarray(base * (1.0 + 1e-3 * i), wdt) for i in range(args.copies)]
        nbytes = K * N * jnp.dtype(wdt).itemsize
        kfn = cpu_matmul.matmul if layout == "nn" else cpu_matmul.matmul_t
        kws = ws
        if amx:
            kfn = cpu_matmul.swiglu_amx if layout == "swiglu" else cpu_matmul.matmul_amx
            kws = [cpu_matmul.pack_amx(w.T if layout == "nt" else w) for w in ws]
        kern = chained(kfn, args.copies)
        xla = chained(xla_fns[layout], args.copies)
        for M in rows_list:
            x = jnp.asarray(rng.standard_normal((M, K), np.float32), wdt)
            # Correctness on the way: both against a float64 product of the same values.
            w0 = np.asarray(ws[0], np.float64)
            x0 = np.asarray(x, np.float64)
            wt = w0.T if layout == "nt" else w0
            ref, S = x0 @ wt, np.abs(x0) @ np.abs(wt)
            yk = np.asarray(jax.jit(kfn)(x, kws[0]), np.float64)
            if layout == "swiglu":   # bf16 output: relative to the largest activation
                h = N // 2
                ref = ref[:, :h] / (1 + np.exp(-ref[:, :h])) * ref[:, h:]
                S = np.abs(ref).max()
            err = float((np.abs(yk - ref) / S).max())
            tk = median_s(kern, (x, *kws), args.reps) / args.copies
            tx = median_s(xla, (x, *ws), args.reps) / args.copies
            row = dict(shape=name, layout=layout, K=K, N=N, M=M, weight_mb=nbytes / 2 ** 20,
                       kernel_ms=tk * 1e3, kernel_gbps=nbytes / tk / 1e9, xla_ms=tx * 1e3,
                       xla_gbps=nbytes / tx / 1e9, speedup=tx / tk, max_rel_err=err)
            results.append(row)
            print(f"{name:8} {f'{K}x{N}':>11} {M:>3} {nbytes / 2 ** 20:6.2f} "
                  f"{nbytes * args.copies / 2 ** 20:9.0f} {tk * 1e3:10.3f} "
                  f"{row['kernel_gbps']:6.1f} {tx * 1e3:8.3f} {row['xla_gbps']:6.1f} "
                  f"{row['speedup']:7.2f}x {err:9.1e}", flush=True)
        del ws, kws
    out = dict(device=jax.devices()[0].device_kind, cpus=os.cpu_count(), jax=jax.__version__,
               weight_dtype=wdt.name, kernel=args.kernel, copies=args.copies, reps=args.reps, llc=llc_size(),
               read_bandwidth_gbps=bw, rows=results)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
