"""Decode attention on CPU: the cpu backend's (its native kernel, jaxserve.backends.cpu.cpu_attention)
vs the xla backend's.

    python scripts/bench_cpu_attention.py [--iters N] [--batches 1,32,64] [--contexts 128,256]
                                          [--json out.json]

Default-model shapes (SmolLM2-135M: 9 query heads, 3 KV heads, head_dim 64, 30 layers) over a
stacked pool [30, 3, N, 16, 64] as the engine holds it, with the layer index a traced argument
that moves to the next layer on every call (so consecutive calls do not find the K/V in cache).
Both run as the engine calls them, `backend.attention(q, kv, layer, step, ...)` under jax.jit,
each over the pool as that backend stores it (the same values; the cpu backend holds bf16 as
its uint16 bits, the xla backend as bf16). Batch 1, 32, 64 with 128 and 256 tokens of context
(every row at full context, pages shuffled), fp32 and bf16 pools with the query in the pool's
dtype, as in the engine. `GB/s` = bytes of K/V the kernel must read (each visible row once)
divided by its median time; `speedup` = XLA time / kernel time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxserve.backends.base import XlaBackend  # noqa: E402
from jaxserve.backends.cpu import cpu_attention  # noqa: E402
from jaxserve.backends.cpu.backend import CpuBackend  # noqa: E402
from jaxserve.config import ModelConfig  # noqa: E402
from jaxserve.model.kv_cache import KVPages, StepInput, stored  # noqa: E402

LAYERS, HQ, HKV, D, S = 30, 9, 3, 64, 16
BATCHES, CONTEXTS = (1, 32, 64), (128, 256)


def median_ms(calls, layers, iters, rounds=4):
    """Median ms per call of each (fn, args): fn(*args, layer); the fns take turns in `rounds`
    rounds so that background noise hits them alike."""
    for fn, args in calls:
        for i in range(3):                                       # compile + warm up
            jax.block_until_ready(fn(*args, jnp.int32(i)))
    times = [[] for _ in calls]
    for r in range(rounds):
        for (fn, args), ts in zip(calls, times):
            for i in range(max(1, iters // rounds)):
                layer = jnp.int32((r * iters + i) % layers)
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*args, layer))
                ts.append(time.perf_counter() - t0)
    return [1e3 * statistics.median(ts) for ts in times]


def decode_step(bt, lens, pos):
    """The StepInput fields attention reads (the write fields are unused here)."""
    B = bt.shape[0]
    zeros = jnp.zeros((B,), jnp.int32)
    return StepInput(tokens=jnp.zeros((B, 1), jnp.int32), positions=pos, block_tables=bt,
                     kv_lens=lens, slot_pages=zeros, slot_offsets=zeros, logits_index=zeros)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--iters", type=int, default=80, help="timed calls per implementation")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="batch sizes")
    ap.add_argument("--contexts", default=",".join(map(str, CONTEXTS)),
                    help="tokens of context per row")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    if not cpu_attention.available():
        sys.exit(f"kernel unavailable: {cpu_attention.unavailable_reason()}")
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__},"
          f" {os.cpu_count()} CPUs")
    rng = np.random.default_rng(0)
    max_pages = max(batches) * -(-max(contexts) // S)
    N = 1 + max_pages                                            # page 0: the null page
    scale = D ** -0.5
    cfg = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_layers=LAYERS, num_heads=HQ, num_kv_heads=HKV, head_dim=D)

    def attention(backend):
        return jax.jit(lambda q, kv, step, layer: backend.attention(
            q, kv, layer, step, scale=scale, sliding_window=None))
    rows = []
    print(f"{'pool':5} {'batch':>5} {'ctx':>5} {'KV MB':>7} {'kernel ms':>10} {'GB/s':>7} "
          f"{'xla ms':>9} {'speedup':>8} {'max|d|':>8}")
    for dtype in (jnp.float32, jnp.bfloat16):
        cpu, xla = CpuBackend(cfg, dtype), XlaBackend(cfg, dtype)
        kernel, ref = attention(cpu), attention(xla)
        shape = (LAYERS, HKV, N, S, D)
        k = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
        v = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
        pools = {b.name: KVPages(k=stored(k, b.pool_dtype()), v=stored(v, b.pool_dtype()))
                 for b in (cpu, xla)}
        del k, v
        item = jnp.dtype(dtype).itemsize
        for B in batches:
            for ctx in contexts:
                P = -(-ctx // S)
                q = jnp.asarray(rng.standard_normal((B, 1, HQ, D)), dtype)   # as the engine
                bt = jnp.asarray(1 + rng.permutation(max_pages)[:B * P].reshape(B, P), jnp.int32)
                lens = jnp.full((B,), ctx, jnp.int32)
                pos = jnp.full((B, 1), ctx - 1, jnp.int32)
                step = decode_step(bt, lens, pos)
                a_k, a_x = (q, pools["cpu"], step), (q, pools["xla"], step)
                layer = jnp.int32(min(3, LAYERS - 1))
                diff = float(jnp.max(jnp.abs(kernel(*a_k, layer).astype(jnp.float32)
                                             - ref(*a_x, layer).astype(jnp.float32))))
                t_k, t_x = median_ms(((kernel, a_k), (ref, a_x)), LAYERS, args.iters)
                kv_bytes = 2 * B * ctx * HKV * D * item
                row = dict(pool=jnp.dtype(dtype).name, batch=B, ctx=ctx, kv_bytes=kv_bytes,
                           kernel_ms=t_k, xla_ms=t_x, kernel_gb_s=kv_bytes / t_k / 1e6,
                           speedup=t_x / t_k, max_abs_diff=diff)
                rows.append(row)
                print(f"{'fp32' if dtype == jnp.float32 else 'bf16':5} {B:5} {ctx:5} "
                      f"{kv_bytes / 1e6:7.2f} {t_k:10.3f} {row['kernel_gb_s']:7.1f} {t_x:9.3f} "
                      f"{row['speedup']:7.2f}x {diff:8.1e}", flush=True)
        del pools
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(jax=jax.__version__, cpus=os.cpu_count(), rows=rows), f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
