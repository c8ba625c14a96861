"""Time the Pallas kernels against the XLA path, jax's bundled kernels and the HBM roofline.

    python scripts/bench_kernels.py [--quick] [--json out.json] [--iters N]

Rows: paged-attention decode and prefill; gathered LoRA decode (64 distinct adapters vs one) and
prefill. Each row reports the median time, the bytes the kernel must move at least (inputs read
once, outputs written once), and the share of the measured copy bandwidth that this represents
(`roofline %` = bytes / bandwidth / time). Peers that do not apply to the backend or fail are
reported with the reason instead of a time.

--quick uses tiny shapes and, on CPU, Pallas interpret mode: it proves the script works there but
its timings are meaningless (interpret mode is an emulator).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxserve.model.attention import paged_attention_xla  # noqa: E402
from pallas_kernels import lora, paged_attention as pa  # noqa: E402

BACKEND = jax.default_backend()
INTERPRET = BACKEND == "cpu"
# XLA:CPU has no bf16 x bf16 -> f32 dot; use f32 there (timings on CPU are meaningless anyway).
DTYPE = jnp.float32 if BACKEND == "cpu" else jnp.bfloat16


def timeit(fn, *args, iters):
    """Median wall time of the jitted fn, and its output."""
    fn = jax.jit(fn)
    out = jax.block_until_ready(fn(*args))              # compile + warm up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def measure_bandwidth(nbytes, iters):
    """Device copy bandwidth (read + write) from a large elementwise copy."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    t, _ = timeit(lambda a: a * 1.0001, x, iters=iters)
    return 2 * x.nbytes / t


def nbytes(*arrays):
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in arrays)


class Table:
    def __init__(self, bandwidth, iters):
        self.rows, self.bw, self.iters = [], bandwidth, iters

    def add(self, case, impl, fn, args, min_bytes, note="", baseline=None):
        """Time fn(*args); with `baseline` (another impl's output) also report max |difference|."""
        row = dict(case=case, impl=impl, bytes=min_bytes, note=note)
        try:
            t, out = timeit(fn, *args, iters=self.iters)
            row.update(time_ms=t * 1e3, roofline_pct=100 * min_bytes / self.bw / t, output=out)
            if baseline is not None:
                diff = float(jnp.max(jnp.abs(out.astype(jnp.float32) -
                                             baseline.astype(jnp.float32))))
                row["max_abs_diff_vs_xla"] = diff
                row["note"] = (f"|d|={diff:.1e} " + note).strip()
        except Exception as e:                           # a peer that cannot run here
            row.update(time_ms=None, roofline_pct=None, note=f"n/a: {type(e).__name__}: "
                       f"{str(e).splitlines()[0][:90]}")
        self._print(row)
        out = row.pop("output", None)
        self.rows.append(row)
        return out

    @staticmethod
    def header():
        print(f"{'case':34} {'impl':26} {'time ms':>10} {'MB moved':>9} {'roofline':>9}  note")

    @staticmethod
    def _print(r):
        t = f"{r['time_ms']:10.3f}" if r["time_ms"] is not None else f"{'-':>10}"
        p = f"{r['roofline_pct']:8.1f}%" if r["roofline_pct"] is not None else f"{'-':>9}"
        print(f"{r['case']:34} {r['impl']:26} {t} {r['bytes'] / 1e6:9.2f} {p}  {r['note']}",
              flush=True)


# ----------------------------------------------------------------------------- attention

def paged_inputs(rng, B, Tq, ctx, Hq, Hkv, D, S, dtype):
    P = -(-ctx // S)
    num_pages = 1 + B * P
    q = jnp.asarray(rng.standard_normal((B, Tq, Hq, D)), dtype)
    k = jnp.asarray(rng.standard_normal((Hkv, num_pages, S, D)), dtype)
    v = jnp.asarray(rng.standard_normal((Hkv, num_pages, S, D)), dtype)
    bt = jnp.asarray(1 + rng.permutation(B * P).reshape(B, P), jnp.int32)
    lens = jnp.full((B,), ctx, jnp.int32)
    pos = jnp.asarray(np.broadcast_to(np.arange(ctx - Tq, ctx), (B, Tq)), jnp.int32)
    return q, k, v, bt, lens, pos


def bench_attention(table, rng, quick):
    dtype = DTYPE
    if quick:
        B, ctx, Hq, Hkv, D, S, Tq_pre = 2, 64, 16, 1, 64, 8, 16   # G=16: bundled GPU kernel's block_h
    else:
        B, ctx, Hq, Hkv, D, S, Tq_pre = 64, 2048, 32, 8, 128, 16, 512
    scale = D ** -0.5
    # decode
    q, k, v, bt, lens, pos = paged_inputs(rng, B, 1, ctx, Hq, Hkv, D, S, dtype)
    kv_bytes = 2 * B * ctx * Hkv * D * jnp.dtype(dtype).itemsize
    moved = kv_bytes + 2 * nbytes(q) + nbytes(bt, lens, pos)
    case = f"attn decode B={B} ctx={ctx} H={Hq}/{Hkv}"
    ours = functools.partial(pa.paged_attention, scale=scale, interpret=INTERPRET)
    base = table.add(case, "xla gather", functools.partial(paged_attention_xla, scale=scale),
                     (q, k, v, bt, lens, pos), moved)
    table.add(case, "pallas (ours)", ours, (q, k, v, bt, lens, pos), moved, baseline=base)
    # The engine's call: the whole stacked pool of every layer and a layer index (read in
    # place). Same bytes moved as one layer's pool: the time must match the row above.
    L = 8
    ks, vs = jnp.stack([k] * L), jnp.stack([v] * L)
    table.add(f"{case} pool of {L} layers", "pallas (ours), layer 5",
              lambda q, ks, vs, bt, lens, pos: pa.paged_attention(
                  q, ks, vs, bt, lens, pos, scale=scale, layer=jnp.int32(5),
                  interpret=INTERPRET), (q, ks, vs, bt, lens, pos), moved, baseline=base)
    del ks, vs
    q3 = q[:, 0]
    if BACKEND == "gpu" or quick:
        from jax.experimental.pallas.ops.gpu import paged_attention as gpu_pa
        P = bt.shape[1]
        kw = dict(pages_per_compute_block=min(8, P // 2), k_splits=2 if quick else 16,
                  interpret=INTERPRET)
        fn = lambda q3, k, v, bt, lens: gpu_pa.paged_attention(q3 * scale, k, v, bt, lens, **kw)[:, None]
        table.add(case, "jax ops.gpu.paged_attention", fn, (q3, k, v, bt, lens), moved,
                  baseline=base)
    if BACKEND == "tpu":
        from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as tpu_pa
        fn = lambda q3, k, v, bt, lens: tpu_pa(q3 * scale, k, v, lens, bt,
                                               pages_per_compute_block=8)[:, None]
        table.add(case, "jax ops.tpu.paged_attention", fn, (q3, k, v, bt, lens), moved,
                  baseline=base)
    # prefill chunk at the end of the context
    q, k, v, bt, lens, pos = paged_inputs(rng, max(1, B // 16), Tq_pre, ctx, Hq, Hkv, D, S, dtype)
    b = q.shape[0]
    moved = 2 * b * ctx * Hkv * D * jnp.dtype(dtype).itemsize + 2 * nbytes(q)
    case = f"attn prefill B={b} q={Tq_pre} ctx={ctx}"
    base = table.add(case, "xla gather", functools.partial(paged_attention_xla, scale=scale),
                     (q, k, v, bt, lens, pos), moved)
    table.add(case, "pallas (ours)", ours, (q, k, v, bt, lens, pos), moved, baseline=base,
              note="compute-bound: roofline % is low by nature")


# ----------------------------------------------------------------------------- LoRA

def lora_inputs(rng, T, IN, OUT, slots, R, dtype, distinct):
    x = jnp.asarray(rng.standard_normal((T, IN)), dtype)
    a = jnp.asarray(rng.standard_normal((slots, R, IN)) * 0.02, dtype)
    b = jnp.asarray(rng.standard_normal((slots, R, OUT)) * 0.02, dtype)
    idx = jnp.asarray(rng.integers(0, distinct, T) if distinct > 1 else np.zeros(T), jnp.int32)
    if distinct == T:
        idx = jnp.asarray(rng.permutation(T) % slots, jnp.int32)
    ranks = jnp.full((slots,), R, jnp.int32)
    scales = jnp.full((slots,), 2.0, jnp.float32)
    return x, a, b, idx, ranks, scales


def onehot_lora(x, a, b, idx, ranks, scales):
    """The peers' approach (tpu-inference, sglang-jax): cost grows with the number of slots."""
    oh = jax.nn.one_hot(idx, a.shape[0], dtype=x.dtype) * scales[None, :].astype(x.dtype)
    v = jnp.einsum("td,ts,srd->tr", x, oh, a)
    return jnp.einsum("tr,ts,sro->to", v, jax.nn.one_hot(idx, a.shape[0], dtype=x.dtype), b)


def bench_lora(table, rng, quick):
    dtype = DTYPE
    item = jnp.dtype(dtype).itemsize
    if quick:
        T_dec, T_pre, IN, OUT, R, slots, groups = 8, 32, 64, 64, 16, 8, 4
    else:
        T_dec, T_pre, IN, OUT, R, slots, groups = 64, 2048, 4096, 4096, 16, 64, 8
    ours_v = functools.partial(lora.gathered_lora, impl="pallas", kernel="bgmv", interpret=INTERPRET)
    ours_m = functools.partial(lora.gathered_lora, impl="pallas", kernel="bgmm", interpret=INTERPRET)
    xla = functools.partial(lora.gathered_lora, impl="xla")
    for distinct in (1, T_dec):
        args = lora_inputs(rng, T_dec, IN, OUT, slots, R, dtype, distinct)
        n_adapters = len(set(np.asarray(args[3]).tolist()))
        moved = n_adapters * R * (IN + OUT) * item + T_dec * (IN + OUT) * item
        case = f"lora decode T={T_dec} adapters={n_adapters}"
        base = table.add(case, "xla gather", xla, args, moved)
        table.add(case, "pallas MBGMV (ours)", ours_v, args, moved, baseline=base)
        table.add(case, "one-hot einsum (peers)", onehot_lora, args, moved, baseline=base)
    args = lora_inputs(rng, T_pre, IN, OUT, slots, R, dtype, groups)
    moved = groups * R * (IN + OUT) * item + T_pre * (IN + OUT) * item
    case = f"lora prefill T={T_pre} adapters={groups}"
    base = table.add(case, "xla gather", xla, args, moved)
    table.add(case, "pallas MBGMM (ours)", ours_m, args, moved, baseline=base)
    table.add(case, "sorted lax.ragged_dot", lora.gathered_lora_ragged_ref, args, moved,
              note="f32 HIGHEST reference", baseline=base)
    table.add(case, "grouped_lora (ours, TPU path)", lora.grouped_lora, args, moved,
              baseline=base)

    def megablox(x, a, b, idx, ranks, scales):
        from jax.experimental.pallas.ops.tpu.megablox import gmm
        order = jnp.argsort(idx)
        sizes = jnp.bincount(idx, length=a.shape[0]).astype(jnp.int32)
        xs = x[order]
        tile = (min(128, x.shape[0]), min(128, x.shape[1]), min(128, a.shape[1]))
        v = gmm(xs, jnp.swapaxes(a, 1, 2), sizes, tiling=tile, interpret=INTERPRET)
        v = (v * scales[idx[order]][:, None]).astype(x.dtype)
        ys = gmm(v, b, sizes, tiling=(tile[0], tile[2], min(128, b.shape[2])), interpret=INTERPRET)
        return jnp.zeros_like(ys).at[order].set(ys).astype(x.dtype)
    if BACKEND == "tpu" or quick:
        table.add(case, "megablox gmm (jax, TPU)", megablox, args, moved, baseline=base)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (required on CPU)")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--json", default="bench_kernels.json", help="where to write the rows")
    args = ap.parse_args(argv)
    if BACKEND == "cpu" and not args.quick:
        ap.error("on CPU only --quick is supported (Pallas runs in interpret mode)")
    iters = args.iters or (3 if args.quick else 50)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({BACKEND}), jax {jax.__version__}")
    if INTERPRET:
        print("NOTE: CPU + Pallas interpret mode: the timings below are meaningless.")
    bw = measure_bandwidth((64 if args.quick else 2048) << 20, iters)
    print(f"measured copy bandwidth: {bw / 1e9:.1f} GB/s")
    table = Table(bw, iters)
    Table.header()
    rng = np.random.default_rng(0)
    bench_attention(table, rng, args.quick)
    bench_lora(table, rng, args.quick)
    dec = [r for r in table.rows if r["case"].startswith("lora decode") and "ours" in r["impl"]]
    if len(dec) == 2 and all(r["time_ms"] for r in dec):
        print(f"LoRA decode, {dec[1]['case'].split('adapters=')[1]} adapters vs 1: "
              f"{dec[1]['time_ms'] / dec[0]['time_ms']:.2f}x")
    out = dict(device=str(device.device_kind), backend=BACKEND, interpret=INTERPRET,
               quick=args.quick, jax=jax.__version__, bandwidth_bytes_per_s=bw, rows=table.rows)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
