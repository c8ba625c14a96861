"""`jaxserve bench`: offline throughput on N prompts, per batch size, beside HF transformers.

Each batch size runs twice: once to compile every bucket it touches, then measured, on other
prompts of the same lengths: every request's prompt is its own random draw, so the measured
run finds nothing of the warm-up's (or another request's) in the prefix cache and prefills
every token; the printed prefix-cache hit rate (prompt tokens served from cache / looked up,
over the measured run) shows it. Decode
throughput counts only decode steps (tokens / seconds spent in decode steps); end-to-end
throughput counts prefill too and is what is compared with HF `generate` (which has no
separate decode timer). MFU = achieved model FLOP/s in decode / measured matmul peak in the
serving dtype. HBM roofline = decode tok/s / the tok/s at which the step's least bytes (every
weight once, each row's K/V) move at the device's memory bandwidth (nominal for known GPUs and
TPUs, else measured: the faster of a copy and a reduction).
HF runs in the same dtype as the engine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-sizes", default="1,8,32,64", help="comma-separated")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-prompts", type=int, default=None, help="default: the batch size")
    p.add_argument("--compare-hf", action="store_true", help="run HF transformers generate too")
    p.add_argument("--hf-dtype", default="same", choices=["same", "float32", "bfloat16"],
                   help="dtype HF runs in (default: the engine's --dtype)")
    p.add_argument("--output", default="bench_results/bench.json")


def measure_matmul_peak(n: int = 2048, repeats: int = 30, dtype: str = "float32") -> float:
    """Matmul FLOP/s measured with JAX on this machine in the serving dtype (bf16 inputs
    accumulate in f32, as the model's projections do): the fastest of `repeats` timed 2048^2
    matmuls. A peak, so the best observation: on a shared VM a mean would fold the
    neighbours' load into the denominator and inflate the MFU."""
    import jax
    import jax.numpy as jnp
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    return 2 * n**3 / _best_seconds(f, a, repeats)


def _best_seconds(f, x, repeats: int) -> float:
    """The fastest of `repeats` timed calls f(x), after one untimed call (compile)."""
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return best


# Nominal memory bandwidth (bytes/s) by device kind: the HBM roofline's denominator. Devices
# not listed use the bandwidth measured here (`measure_bandwidth`), named as such.
HBM_BYTES_PER_S = {
    "H200": 4.8e12, "H100 SXM": 3.35e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12,
    "H100 NVL": 3.9e12, "A100-SXM4-80GB": 2.04e12, "A100 80GB PCIe": 1.94e12,
    "A100-SXM4-40GB": 1.56e12, "L40S": 0.864e12, "L4": 0.3e12,
    "TPU v4": 1.2e12, "TPU v5 lite": 0.819e12, "TPU v5e": 0.819e12, "TPU v5p": 2.765e12,
    "TPU v6 lite": 1.64e12, "TPU v6e": 1.64e12,
}


def measure_bandwidth(nbytes: int = 256 << 20, repeats: int = 10) -> float:
    """Memory bandwidth of one device, bytes per second, best of `repeats`: the faster of a
    copy (read + write) and a reduction (read only). XLA:CPU runs the copy on one thread and
    the reduction on all cores (4 vs 39 GB/s on the 2-core VM), so a copy alone would put a
    step that streams its weights with every core above 100% of its "roofline"."""
    import jax
    import jax.numpy as jnp
    x = jnp.ones((nbytes // 4,), jnp.float32)
    return max(moved / _best_seconds(jax.jit(fn), x, repeats)
               for moved, fn in ((2 * x.nbytes, lambda a: a * 1.0001), (x.nbytes, jnp.sum)))


def memory_bandwidth() -> tuple[float, str]:
    """(bytes/s, where the number comes from) for the first device."""
    import jax
    kind = jax.devices()[0].device_kind
    for name, bw in HBM_BYTES_PER_S.items():
        if name in kind:
            return bw, f"{kind} nominal"
    big = jax.default_backend() != "cpu"
    return measure_bandwidth((2 << 30) if big else (256 << 20)), f"{kind} measured"


def decode_step_bytes(engine, batch: int, context: int) -> int:
    """Bytes one decode step must read at least, per device: every weight once, and each
    row's K/V for `context` tokens (the HBM roofline's numerator)."""
    import jax
    cfg, runner = engine.model_config, engine.runner
    tp = getattr(runner.backend, "tp", 1)
    weights = sum(a.nbytes for a in jax.tree.leaves(runner.params)) // tp
    kv_token = (2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
                * runner.kv.k.dtype.itemsize) // tp
    return weights + batch * context * kv_token


def _prompts(vocab: int, num: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    # Avoid the first ids (special tokens) so every prompt is ordinary text tokens.
    return [rng.integers(100, vocab, size=length).tolist() for _ in range(num)]


def _run_ours(engine, prompts, output_len):
    from jaxserve.sampling_params import SamplingParams
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    cache0 = engine.stats()["prefix_cache"]
    for i, p in enumerate(prompts):
        engine.add_request(f"bench-{time.monotonic_ns()}-{i}", p, params)
    decode_s = 0.0
    decode_tokens = 0
    t0 = time.perf_counter()
    total = 0
    while engine.has_unfinished():
        s = time.perf_counter()
        is_prefill = bool(engine.scheduler.running and any(x.is_prefilling for x in engine.scheduler.running)) \
            or engine.scheduler.num_waiting > 0
        outs = engine.step()
        dt = time.perf_counter() - s
        total += len(outs)
        if not is_prefill:
            decode_s += dt
            decode_tokens += len(outs)
    wall = time.perf_counter() - t0
    cache = engine.stats()["prefix_cache"]
    queries, hits = cache["queries"] - cache0["queries"], cache["hits"] - cache0["hits"]
    return {"wall_s": wall, "tokens": total, "e2e_tok_s": total / wall,
            "decode_tok_s": decode_tokens / decode_s if decode_s else 0.0,
            "prefix_cache_queries": queries, "prefix_cache_hits": hits,
            "prefix_cache_hit_rate": hits / queries if queries else 0.0}


def _run_hf(hf, prompts, output_len, pad_id):
    import torch
    B = len(prompts)
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        hf.generate(input_ids=ids[:, :8], attention_mask=mask[:, :8], max_new_tokens=2, do_sample=False,
                    pad_token_id=pad_id)  # warm-up
        t = time.perf_counter()
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=output_len,
                          min_new_tokens=output_len, do_sample=False, pad_token_id=pad_id)
        wall = time.perf_counter() - t
        # HF has no decode timer: time the prefill alone (one new token) on the same prompts;
        # the decode steps are the difference.
        t = time.perf_counter()
        hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False,
                    pad_token_id=pad_id)
        prefill = time.perf_counter() - t
    n = (out.shape[1] - ids.shape[1]) * B
    decode = (n - B) / (wall - prefill) if wall > prefill and n > B else 0.0
    return {"wall_s": wall, "tokens": n, "e2e_tok_s": n / wall, "prefill_s": prefill,
            "decode_tok_s": decode}


def _load_hf(engine, dtype_name: str):
    import torch
    from transformers import AutoModelForCausalLM
    m = engine.model
    kw = {"gguf_file": m.gguf_file} if m.gguf_file else {}
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    hf = AutoModelForCausalLM.from_pretrained(m.tokenizer_dir, dtype=dtype, **kw)
    return hf.eval()


def run_bench(args) -> int:
    from jaxserve.cli import engine_config_from_args
    from jaxserve.engine import EngineConfig, LLMEngine, resolve_config_dtype
    from jaxserve.replicas import refuse_remote
    import dataclasses
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    # --dtype auto resolved once: the matmul peak and HF run in the dtype the engine serves
    base_cfg = resolve_config_dtype(engine_config_from_args(args))
    refuse_remote(base_cfg.dp, base_cfg.tp, "bench")
    if args.compare_hf and base_cfg.load_format == "dummy":
        raise ValueError("--compare-hf runs HF on the checkpoint's weights: not with "
                         "--load-format dummy (random weights)")
    max_len = args.input_len + args.output_len
    hf_dtype = base_cfg.dtype if args.hf_dtype == "same" else args.hf_dtype
    peak = measure_matmul_peak(dtype=base_cfg.dtype)
    # The fp32 peak too: MFU against it is the yardstick whatever dtype serves.
    peak32 = peak if base_cfg.dtype == "float32" else measure_matmul_peak(dtype="float32")
    bandwidth, bandwidth_source = memory_bandwidth()
    # The pool: sized to the batch unless --num-pages / --kv-cache-gb ask for one (a step
    # must not get slower with a larger pool; scripts/device_check.sh compares two sizes).
    pool_given = args.num_pages is not None or args.kv_cache_gb not in (
        None, EngineConfig.kv_cache_gb)
    rows = []
    engine = None
    hf = None
    for B in batch_sizes:
        pool = {} if pool_given else dict(num_pages=B * (-(-max_len // base_cfg.page_size)) + 2)
        cfg = dataclasses.replace(base_cfg, max_num_seqs=B, max_model_len=max(max_len, 64),
                                  max_prefill_tokens=max(base_cfg.max_prefill_tokens, args.input_len),
                                  **pool)
        # Each batch size loads the model again (the engine gives its weights to its runner):
        # the previous engine's weights and pool are released first.
        engine = None
        engine = LLMEngine(cfg)
        n = args.num_prompts or B
        vocab = engine.model_config.vocab_size
        # compile every bucket, on prompts of their own (the same ones would be cached)
        _run_ours(engine, _prompts(vocab, n, args.input_len, seed=1), args.output_len)
        prompts = _prompts(vocab, n, args.input_len)
        ours = _run_ours(engine, prompts, args.output_len)
        ctx = args.input_len + args.output_len / 2
        flops = engine.model_config.flops_per_token(int(ctx))
        step_bytes = decode_step_bytes(engine, min(B, n), int(ctx))
        roofline_tok_s = min(B, n) * bandwidth / step_bytes
        row = {"batch": B, "prompts": n, "ours_decode_tok_s": ours["decode_tok_s"],
               "ours_e2e_tok_s": ours["e2e_tok_s"],
               "mfu_decode": ours["decode_tok_s"] * flops / peak, "_flops_per_token": flops,
               "num_pages": engine.runner.kv.num_pages,
               "decode_step_ms": 1e3 * min(B, n) / ours["decode_tok_s"] if ours["decode_tok_s"] else None,
               "roofline_decode_tok_s": roofline_tok_s,
               "hbm_roofline_pct": 100 * ours["decode_tok_s"] / roofline_tok_s,
               **{k: ours[k] for k in ("prefix_cache_queries", "prefix_cache_hits",
                                       "prefix_cache_hit_rate")}}
        if args.compare_hf:
            if hf is None:
                hf = _load_hf(engine, hf_dtype)
            h = _run_hf(hf, prompts, args.output_len, engine.tokenizer.hf.eos_token_id or 0)
            row["hf_e2e_tok_s"] = h["e2e_tok_s"]
            row["ratio_e2e"] = ours["e2e_tok_s"] / h["e2e_tok_s"]
            row["hf_decode_tok_s"] = h["decode_tok_s"]
            row["ratio_decode"] = ours["decode_tok_s"] / h["decode_tok_s"] if h["decode_tok_s"] else 0.0
        rows.append(row)
        print(_fmt_row(row), flush=True)
    peak = max(peak, measure_matmul_peak(dtype=base_cfg.dtype))   # again at the end: the VM's load drifts
    peak32 = peak if base_cfg.dtype == "float32" else max(peak32, measure_matmul_peak(dtype="float32"))
    for r in rows:
        flops = r.pop("_flops_per_token")
        r["mfu_decode"] = r["ours_decode_tok_s"] * flops / peak
        r["mfu_decode_fp32_peak"] = r["ours_decode_tok_s"] * flops / peak32
    result = {
        "model": engine.model_name, "dtype": base_cfg.dtype, "input_len": args.input_len,
        "output_len": args.output_len, "matmul_peak_gflops": peak / 1e9,
        "matmul_peak_dtype": base_cfg.dtype, "matmul_peak_fp32_gflops": peak32 / 1e9,
        "memory_bandwidth_gb_s": bandwidth / 1e9, "memory_bandwidth_source": bandwidth_source,
        "hf_dtype": hf_dtype if args.compare_hf else None, "backend": engine.runner.backend.name,
        "backend_detail": engine.runner.backend.describe(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "rows": rows}
    print(f"\nmodel {engine.model_name} ({engine.runner.backend.describe()}), "
          f"input {args.input_len}, output "
          f"{args.output_len}, {base_cfg.dtype} matmul peak {peak / 1e9:.0f} GFLOP/s, fp32 peak "
          f"{peak32 / 1e9:.0f} GFLOP/s, memory {bandwidth / 1e9:.0f} GB/s ({bandwidth_source})"
          + (f", HF in {hf_dtype}" if args.compare_hf else ""))
    print(_table(rows))
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.output}")
    return 0


def _fmt_row(r):
    s = (f"batch {r['batch']:>3}: decode {r['ours_decode_tok_s']:8.1f} tok/s, e2e "
         f"{r['ours_e2e_tok_s']:8.1f} tok/s, MFU {100 * r['mfu_decode']:5.1f}%, HBM roofline "
         f"{r['hbm_roofline_pct']:5.1f}%, prefix cache {_hit_rate(r)}")
    if "hf_e2e_tok_s" in r:
        s += (f", HF decode {r['hf_decode_tok_s']:8.1f} e2e {r['hf_e2e_tok_s']:8.1f} tok/s, "
              f"ratio decode {r['ratio_decode']:.2f}x e2e {r['ratio_e2e']:.2f}x")
    return s


def _table(rows) -> str:
    hdr = ("| batch | jaxserve decode tok/s | HF decode tok/s | ratio (decode) | jaxserve e2e tok/s "
           "| HF e2e tok/s | ratio (e2e) | decode MFU | MFU of fp32 peak | HBM roofline "
           "| prefix-cache hits |")
    lines = [hdr, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hf = "hf_e2e_tok_s" in r
        cell = lambda k, f="{:.1f}": f.format(r[k]) if hf else "-"  # noqa: E731
        lines.append(f"| {r['batch']} | {r['ours_decode_tok_s']:.1f} | {cell('hf_decode_tok_s')} | "
                     f"{cell('ratio_decode', '{:.2f}x')} | {r['ours_e2e_tok_s']:.1f} | "
                     f"{cell('hf_e2e_tok_s')} | {cell('ratio_e2e', '{:.2f}x')} | "
                     f"{100 * r['mfu_decode']:.1f}% | {100 * r['mfu_decode_fp32_peak']:.1f}% | "
                     f"{r['hbm_roofline_pct']:.1f}% | {_hit_rate(r)} |")
    return "\n".join(lines)


def _hit_rate(r) -> str:
    """Prompt tokens served from the prefix cache / looked up, over the measured run."""
    return (f"{100 * r['prefix_cache_hit_rate']:.1f}% ({r['prefix_cache_hits']}/"
            f"{r['prefix_cache_queries']} tokens)")
