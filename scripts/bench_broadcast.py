"""What multi-host serving sends per step (jaxserve/distributed.py), and how long it takes.

For each message kind: its size, and the time from the leader's `encode` until a follower
process (forked, on the other end of a loopback TCP socket) has decoded it into the arrays it
replays (and acknowledged with one byte, whose round trip is included). The steps are the
executor's real calls (StepBuilder buckets, BuiltStep arrays) of the default model's shapes
(SmolLM2-135M: vocabulary 49,152, 30 layers), max_model_len 2048, pages of 16 tokens:
  decode B      one decode call of B rows (plain sampling: what most steps send);
  decode B all  the same with every optional sampling-set array (bias, bans, a structured-
                output token mask per row) and LoRA slots (rank 16, 7 modules);
  prefill chunk a 512-token prefill call (4 rows x 128 tokens);
  result B      what a remote data-parallel replica's first process sends back per call
                (--dp across processes): B sampled tokens and log-probs (top-20: with 20
                alternatives each); timed the same way, leader to follower;
  slot write    a penalty slot's counts (one vocabulary row, sent when a request with
                penalties starts);
  adapter load  one rank-16 adapter on all 7 modules written into pool pages.

  python scripts/bench_broadcast.py [--reps 200] [--out bench_broadcast.json]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxserve.distributed import decode, encode  # noqa: E402
from jaxserve.sampling import MAX_BANS, MAX_LOGIT_BIAS  # noqa: E402
from jaxserve.step_builder import BuiltStep, LoraSlots  # noqa: E402

VOCAB, LAYERS, PAGES = 49152, 30, 2048 // 16
MODULES = ("q", "k", "v", "o", "gate", "up", "down")
PAGE_ELEMS = 2 * 3 * 16 * 64   # K and V halves of one page of one layer (3 KV heads x 64)


def decode_call(B: int, full: bool = False) -> BuiltStep:
    rng = np.random.default_rng(B)
    b = BuiltStep.empty(False, B, 1, PAGES)
    b.tokens[:] = rng.integers(0, VOCAB, (B, 1))
    b.positions[:] = rng.integers(0, 2000, (B, 1))
    b.block_tables[:] = rng.integers(0, 10_000, (B, PAGES))
    b.kv_lens[:] = b.positions[:, 0] + 1
    b.seqs, b.rows, b.samples = list(range(B)), list(range(B)), [True] * B
    if full:
        b.bias_ids = rng.integers(0, VOCAB, (B, MAX_LOGIT_BIAS)).astype(np.int32)
        b.bias_vals = rng.random((B, MAX_LOGIT_BIAS), np.float32)
        b.ban_ids = rng.integers(0, VOCAB, (B, MAX_BANS)).astype(np.int32)
        b.ban_if = rng.integers(-1, VOCAB, (B, MAX_BANS)).astype(np.int32)
        b.allowed = rng.integers(0, 2 ** 32, (B, -(-VOCAB // 32)), dtype=np.uint32)
        b.lora = LoraSlots(idx=np.zeros((B,), np.int32),
                           pages=tuple(np.zeros((B, 3), np.int32) for _ in MODULES),
                           ranks=np.full((LAYERS, len(MODULES), B), 16, np.int32),
                           scales=np.ones((LAYERS, len(MODULES), B), np.float32),
                           modules=MODULES, max_rank=16, row_keys=[("ad", 1)] * B)
    return b


def prefill_call(B: int = 4, T: int = 128) -> BuiltStep:
    b = BuiltStep.empty(True, B, T, PAGES)
    b.tokens[:] = np.random.default_rng(0).integers(0, VOCAB, (B, T))
    b.positions[:] = np.arange(T)
    b.seqs, b.rows, b.samples = list(range(B)), list(range(B)), [True] * B
    return b


def messages() -> dict[str, tuple]:
    pages = 32   # 3 pages per module x 7, padded to a power of two (LoraRuntime.stage_host)
    calls = {
        "decode 64": ("call", (decode_call(64),)),
        "decode 256": ("call", (decode_call(256),)),
        "decode 64 all": ("call", (decode_call(64, True),)),
        "decode 256 all": ("call", (decode_call(256, True),)),
        "prefill chunk 512": ("call", (prefill_call(),)),
        "slot write": ("write_slot", (3, np.zeros((VOCAB,), np.int32))),
        "adapter load": ("write_adapters", ([("ad", np.arange(pages, dtype=np.int32),
                                              np.zeros((LAYERS, pages, PAGE_ELEMS), np.float32))],)),
    }
    out = {name: (0, kind, args) for name, (kind, args) in calls.items()}
    # what a remote data-parallel replica's first process sends back per call (--dp across
    # processes): tokens and log-probs, with 20 top log-probs in the "all" rows
    for B in (64, 256):
        out[f"result {B}"] = ("result", 1, (np.zeros(B, np.int32), np.zeros(B, np.float32), None))
        out[f"result {B} top-20"] = ("result", 1, (np.zeros(B, np.int32), (
            np.zeros(B, np.float32), np.zeros((B, 20), np.int32),
            np.zeros((B, 20), np.float32)), None))
    return out


def _follower(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            msg = decode(s)
            if msg[1] == "stop":
                return
            s.sendall(b"k")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--out", default="bench_broadcast.json")
    args = p.parse_args()
    srv = socket.create_server(("127.0.0.1", 0))
    child = multiprocessing.get_context("fork").Process(
        target=_follower, args=(srv.getsockname()[1],), daemon=True)
    child.start()
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rows = []
    for name, msg in messages().items():
        times, encode_s = [], []
        for _ in range(args.reps + 5):
            t0 = time.perf_counter()
            data = b"".join(encode(msg))
            t1 = time.perf_counter()
            conn.sendall(data)
            conn.recv(1)
            times.append(time.perf_counter() - t0)
            encode_s.append(t1 - t0)
        times, encode_s = times[5:], encode_s[5:]   # the first ones warm the socket's buffers
        rows.append(dict(message=name, bytes=len(data),
                         encode_ms=1e3 * statistics.median(encode_s),
                         send_replay_receive_ms=1e3 * statistics.median(times),
                         p90_ms=1e3 * sorted(times)[int(0.9 * len(times))]))
    conn.sendall(b"".join(encode((None, "stop", ()))))
    child.join(10)
    host = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
    print(f"step channel over loopback TCP ({host}); median of {args.reps}")
    print(f"{'message':<20} {'bytes':>10} {'encode ms':>10} {'send+receive ms':>16} {'p90 ms':>8}")
    for r in rows:
        print(f"{r['message']:<20} {r['bytes']:>10,} {r['encode_ms']:>10.3f} "
              f"{r['send_replay_receive_ms']:>16.3f} {r['p90_ms']:>8.3f}")
    with open(args.out, "w") as f:
        json.dump({"host": host, "reps": args.reps, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
