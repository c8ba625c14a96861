#!/usr/bin/env python
"""Which to evict first when the pool is full: cached prefix pages or idle LoRA adapters?

Runs the real `Scheduler` (no model: every sampled token is known, steps take no time) over
multi-tenant workloads where KV, cached prefixes and adapters compete for one pool, once per
eviction order (`--cache-eviction-order`), and counts the work each order causes:
  recomputed prompt tokens  prompt tokens prefilled (a prefix evicted is prefilled again)
  adapter pages loaded      pages copied into the pool by adapter loads (an adapter evicted
                            is loaded again when next used)
and prices them with per-unit costs for two machines:
  cpu   this 2-core VM, SmolLM2-135M bf16 (`--cpu-prefill-tok-s`: measured, 16 prompts of
        512 tokens through LLMEngine.generate; an adapter page is a host memcpy of a KV page's
        bytes at `--cpu-copy-gb-s`)
  h100  an 8B Llama on one H100 (estimates: prefill at 40% of 989 TFLOP/s bf16, adapter
        pages over PCIe 5 at 25 GB/s)
Workloads (`--requests` each, tenant popularity Zipf(`--zipf`), seeded):
  tenants    every tenant has its own adapter and system prompt; a request is the tenant's
             system prompt + a unique question (prefix reuse within a tenant)
  no-reuse   the same tenants and adapters, every prompt unique (cached pages are never hit)

  .venv/bin/python scripts/bench_eviction_order.py [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
from scheduler import Scheduler, SchedulerConfig, Sequence  # noqa: E402
from scheduler.scheduler import EVICTION_ORDERS  # noqa: E402
from scheduler.sequence import FinishReason  # noqa: E402

# SmolLM2-135M: 30 layers, hidden 576, 9 heads, 3 KV heads of 64
LAYERS, HIDDEN, KV_DIM = 30, 576, 3 * 64


def kv_page_bytes(page_size: int, dtype_bytes: int = 2) -> int:
    return 2 * LAYERS * KV_DIM * page_size * dtype_bytes


def adapter_pages(rank: int, page_size: int, dtype_bytes: int = 2) -> int:
    """Pages of a rank-r adapter on q, k, v, o (A: in x r, B: r x out per projection)."""
    per_layer = sum(rank * (i + o) for i, o in ((HIDDEN, HIDDEN), (HIDDEN, KV_DIM),
                                                (HIDDEN, KV_DIM), (HIDDEN, HIDDEN)))
    return math.ceil(per_layer * LAYERS * dtype_bytes / kv_page_bytes(page_size, dtype_bytes))


def workload(kind: str, args, rng: random.Random) -> list[tuple[int, list[int]]]:
    """(tenant, prompt ids) per request."""
    weights = [1.0 / (t + 1) ** args.zipf for t in range(args.tenants)]
    systems = [[rng.randrange(1, 49000) for _ in range(args.system_tokens)]
               for _ in range(args.tenants)]
    reqs = []
    for _ in range(args.requests):
        t = rng.choices(range(args.tenants), weights)[0]
        question = [rng.randrange(1, 49000) for _ in range(args.question_tokens)]
        head = (systems[t] if kind == "tenants"
                else [rng.randrange(1, 49000) for _ in range(args.system_tokens)])
        reqs.append((t, head + question))
    return reqs


def run(order: str, reqs, args) -> dict:
    a_pages = adapter_pages(args.rank, args.page_size)
    sched = Scheduler(
        SchedulerConfig(num_pages=args.num_pages, page_size=args.page_size,
                        max_num_seqs=args.max_num_seqs, max_prefill_tokens=args.max_prefill_tokens,
                        max_model_len=4096, mixed_steps=True, enable_prefix_caching=True,
                        cache_eviction_order=order),
        adapter_pages=lambda name: a_pages)
    pending = [Sequence(i, ids, max_tokens=args.output_tokens, adapter=f"t{t}")
               for i, (t, ids) in enumerate(reqs)]
    pending.reverse()
    prefill_tokens = loaded_pages = steps = 0
    live = 0
    while pending or sched.has_work:
        # a closed loop: `--concurrency` requests in the system at once
        while pending and live < args.concurrency:
            sched.add(pending.pop())
            live += 1
        plan = sched.schedule()
        steps += 1
        prefill_tokens += plan.num_prefill_tokens
        loaded_pages += sum(len(p) for _, p in plan.adapter_loads)
        for seq in sched.update(plan, [7 if plan.samples(i) else None
                                       for i in range(len(plan.seqs))]):
            if seq.num_output_tokens >= seq.max_tokens:
                sched.finish(seq, FinishReason.LENGTH)
                live -= 1
        if steps > 100 * len(reqs):
            raise RuntimeError("no progress")
    stats = sched.prefix_cache_stats()
    return {"order": order, "prompt_tokens": sum(len(ids) for _, ids in reqs),
            "recomputed_prompt_tokens": prefill_tokens, "adapter_pages_loaded": loaded_pages,
            "adapter_loads": sched.adapters.num_loads, "hit_rate": stats["hit_rate"],
            "cache_evictions": sched.allocator.num_cache_evictions, "steps": steps}


def costs(args) -> dict:
    """Seconds per prefilled token and per adapter page loaded, per machine."""
    cpu_page = kv_page_bytes(args.page_size) / (args.cpu_copy_gb_s * 1e9)
    # 8B Llama: 2 * 8e9 FLOPs per token at 40% of 989 TFLOP/s; its KV page (32 layers, 8 KV
    # heads of 128, bf16, 16 tokens) over PCIe 5 at 25 GB/s
    h100_page = (2 * 32 * 8 * 128 * args.page_size * 2) / 25e9
    return {"cpu": (1.0 / args.cpu_prefill_tok_s, cpu_page),
            "h100": (2 * 8e9 / (0.4 * 989e12), h100_page)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--tenants", type=int, default=32)
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--system-tokens", type=int, default=512)
    p.add_argument("--question-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--num-pages", type=int, default=801,
                   help="pool pages (default: 800 usable = 12,800 tokens; the tenants' prefixes "
                        "and adapters together need more)")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-prefill-tokens", type=int, default=512)
    p.add_argument("--cpu-prefill-tok-s", type=float, default=1180.0,
                   help="prefill tokens/s of this machine (SmolLM2 bf16, 16 prompts of 512)")
    p.add_argument("--cpu-copy-gb-s", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    a_pages = adapter_pages(args.rank, args.page_size)
    need = args.tenants * (a_pages + args.system_tokens // args.page_size)
    print(f"pool {args.num_pages - 1} pages; each adapter {a_pages} pages, each system prompt "
          f"{args.system_tokens // args.page_size}; all tenants' adapters + prefixes: {need}")
    unit = costs(args)
    rows = []
    for kind in ("tenants", "no-reuse"):
        reqs = workload(kind, args, random.Random(args.seed))
        for order in EVICTION_ORDERS:
            r = run(order, reqs, args)
            r["workload"] = kind
            for m, (tok_s, page_s) in unit.items():
                r[f"{m}_s"] = r["recomputed_prompt_tokens"] * tok_s + r["adapter_pages_loaded"] * page_s
            rows.append(r)
    print("\n| workload | order | hit rate | prompt tokens prefilled | adapter loads | "
          "adapter pages loaded | cpu s | h100 s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['order']} | {r['hit_rate']:.1%} | "
              f"{r['recomputed_prompt_tokens']:,} / {r['prompt_tokens']:,} | {r['adapter_loads']:,} | "
              f"{r['adapter_pages_loaded']:,} | {r['cpu_s']:.1f} | {r['h100_s']:.2f} |")
    print(f"\nunit costs (s): prefill token, adapter page: "
          + "; ".join(f"{m} {t:.2e}, {pg:.2e}" for m, (t, pg) in unit.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
