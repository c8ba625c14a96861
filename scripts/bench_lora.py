#!/usr/bin/env python
"""S-LoRA's synthetic multi-adapter workload through jaxserve and through HF PEFT, in one run.

Workload (S-LoRA's generator, restated): request i uses adapter floor(np.random.power(alpha) * n),
inter-arrival times Gamma(1/cv^2, cv^2/rate), input/output lengths uniform in [lo, hi], greedy,
ignore_eos, seed 42. Metrics: throughput = completed requests / wall time including the drain;
average first-token latency (arrival -> first token). jaxserve runs one engine for every setting
(programs compiled in warm-up passes of the same workload before each measurement, repeated
while new step shapes appear, not timed; "new programs" counts shapes first seen while timed;
--repeats timed runs, the median reported, all kept in the JSON; before each, every adapter is
removed and added again, so none starts resident on the device and each used one is loaded). PEFT serves the same requests in
arrival order, in batches of up to --max-num-seqs with mixed adapters (`generate(adapter_names=...)`), each batch
decoding to its longest output (what static batching does).

Adapters: n distinct names (n = 1, 10, 100, 1000), all on q,k,v,o at the given rank. Their
weights are drawn from --num-weight-sets random sets (to keep 1000 adapters in host RAM on a
laptop); the engine still treats each name as its own adapter (own pages, loads, evictions).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

import numpy as np


def workload(num_requests, num_adapters, alpha, rate, cv, lo_in, hi_in, lo_out, hi_out, vocab, seed=42):
    rng = np.random.default_rng(seed)
    np.random.seed(seed)
    ids = np.floor(np.random.power(alpha, num_requests) * num_adapters).astype(int)
    gaps = rng.gamma(1 / cv ** 2, cv ** 2 / rate, num_requests)
    arrivals = np.cumsum(gaps) - gaps[0]
    reqs = []
    for i in range(num_requests):
        n_in, n_out = int(rng.integers(lo_in, hi_in + 1)), int(rng.integers(lo_out, hi_out + 1))
        reqs.append(dict(arrival=float(arrivals[i]), adapter=int(ids[i]), out=n_out,
                         prompt=[int(t) for t in rng.integers(10, vocab, n_in)]))
    return reqs


def make_weight_sets(cfg, rank, num_sets, seed=0):
    from jaxserve.lora.adapter import MODULES, LoraAdapter, LoraWeights, module_dims
    rng = np.random.default_rng(seed)
    L, mods = cfg.num_layers, ("q_proj", "k_proj", "v_proj", "o_proj")
    sets = []
    for _ in range(num_sets):
        a, b = {}, {}
        for m in mods:
            din, dout = module_dims(cfg, m)
            a[m] = (rng.normal(size=(L, rank, din)) / np.sqrt(din)).astype(np.float32)
            b[m] = (rng.normal(size=(L, rank, dout)) * 0.02).astype(np.float32)
        ranks = np.zeros((L, len(MODULES)), np.int32)
        ranks[:, :4] = rank
        scales = np.where(ranks > 0, 2.0, 0.0).astype(np.float32)
        sets.append((a, b, ranks, scales))
    return sets, (lambda name, s: LoraAdapter(name, LoraWeights(*sets[s]), {"r": rank}))


def run_jaxserve(engine, reqs, prefix):
    from jaxserve.sampling_params import SamplingParams
    pending = sorted(range(len(reqs)), key=lambda i: reqs[i]["arrival"])
    t0 = time.perf_counter()
    first, done = {}, 0
    while done < len(reqs):
        now = time.perf_counter() - t0
        while pending and reqs[pending[0]]["arrival"] <= now:
            i = pending.pop(0)
            r = reqs[i]
            engine.add_request(f"{prefix}-{i}", r["prompt"], SamplingParams(
                max_tokens=r["out"], temperature=0.0, ignore_eos=True),
                adapter=f"{prefix}-{r['adapter']}" if prefix else None)
        if not engine.has_unfinished():
            time.sleep(max(0.0, reqs[pending[0]]["arrival"] - now))
            continue
        for o in engine.step():
            i = int(o.request_id.rsplit("-", 1)[1])
            first.setdefault(i, time.perf_counter() - t0 - reqs[i]["arrival"])
            done += o.finished
    wall = time.perf_counter() - t0
    return dict(throughput=len(reqs) / wall, ttft=float(np.mean(list(first.values()))), wall=wall,
                tokens_per_s=sum(r["out"] for r in reqs) / wall)


def run_peft(base_dir, reqs, n, weight_sets, rank, max_batch, tmp, dtype="float32"):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, dtype)).eval()
    used = sorted({r["adapter"] for r in reqs})
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = None
    t_load = time.perf_counter()
    for j, a in enumerate(used):     # only the adapters the workload uses (PEFT holds all on device)
        name = f"a{a}"
        model = get_peft_model(base, cfg, adapter_name=name) if model is None else model
        if j:
            model.add_adapter(name, cfg)
        a_set, b_set, _, _ = weight_sets[a % len(weight_sets)]
        with torch.no_grad():
            for mod_name, mod in model.named_modules():
                if hasattr(mod, "lora_A") and name in mod.lora_A:
                    proj = mod_name.rsplit(".", 1)[1]
                    layer = int(mod_name.split("layers.")[1].split(".")[0])
                    mod.lora_A[name].weight.copy_(torch.from_numpy(a_set[proj][layer]))
                    mod.lora_B[name].weight.copy_(torch.from_numpy(b_set[proj][layer].T.copy()))
    model.eval()
    load_s = time.perf_counter() - t_load

    class FirstToken(LogitsProcessor):
        def __init__(self):
            self.t = None

        def __call__(self, input_ids, scores):
            self.t = self.t or time.perf_counter()
            return scores

    order = sorted(range(len(reqs)), key=lambda i: reqs[i]["arrival"])
    t0 = time.perf_counter()
    ttft = []
    while order:
        now = time.perf_counter() - t0
        ready = [i for i in order if reqs[i]["arrival"] <= now][:max_batch]
        if not ready:
            time.sleep(reqs[order[0]]["arrival"] - now)
            continue
        for i in ready:
            order.remove(i)
        L = max(len(reqs[i]["prompt"]) for i in ready)
        ids = torch.zeros((len(ready), L), dtype=torch.long)
        mask = torch.zeros((len(ready), L), dtype=torch.long)
        for k, i in enumerate(ready):   # left padding
            p = reqs[i]["prompt"]
            ids[k, L - len(p):] = torch.tensor(p)
            mask[k, L - len(p):] = 1
        out_len = max(reqs[i]["out"] for i in ready)
        ft = FirstToken()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=out_len,
                           min_new_tokens=out_len, do_sample=False, pad_token_id=0,
                           adapter_names=[f"a{reqs[i]['adapter']}" for i in ready],
                           logits_processor=LogitsProcessorList([ft]))
        ttft += [ft.t - t0 - reqs[i]["arrival"] for i in ready]
    wall = time.perf_counter() - t0
    return dict(throughput=len(reqs) / wall, ttft=float(np.mean(ttft)), wall=wall,
                tokens_per_s=sum(r["out"] for r in reqs) / wall, load_s=load_s)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="S-LoRA synthetic workload: jaxserve vs HF PEFT")
    p.add_argument("--model", default=None, help="HF dir or GGUF (default: embedded SmolLM2-135M)")
    p.add_argument("--num-adapters", default="1,10,100,1000")
    p.add_argument("--ranks", default="8,16")
    p.add_argument("--num-requests", type=int, default=24)
    p.add_argument("--alpha", type=float, default=1.0, help="adapter popularity np.random.power(alpha)")
    p.add_argument("--rate", type=float, default=4.0, help="requests per second")
    p.add_argument("--cv", type=float, default=1.0)
    p.add_argument("--input-len", default="8,512")
    p.add_argument("--output-len", default="8,512")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-loras", type=int, default=None,
                   help="cap on distinct adapters per batch (default: none)")
    p.add_argument("--num-pages", type=int, default=1024)
    p.add_argument("--num-weight-sets", type=int, default=8)
    p.add_argument("--peft-max-adapters", type=int, default=100,
                   help="skip PEFT above this many adapters (it keeps every adapter as modules)")
    p.add_argument("--no-peft", action="store_true")
    p.add_argument("--warmup", type=int, default=6,
                   help="most warm-up passes per setting (they stop when no new step shape appears)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed jaxserve runs per setting; the median is reported")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="jaxserve's and PEFT's dtype (PEFT keeps its adapter weights in float32, "
                        "its default)")
    p.add_argument("--json", default="bench_lora.json")
    args = p.parse_args(argv)
    from jaxserve.engine import EngineConfig, LLMEngine
    lo_in, hi_in = map(int, args.input_len.split(","))
    lo_out, hi_out = map(int, args.output_len.split(","))
    ranks = [int(r) for r in args.ranks.split(",")]
    counts = [int(n) for n in args.num_adapters.split(",")]
    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, num_pages=args.num_pages,
                                    max_num_seqs=args.max_num_seqs, max_loras=args.max_loras,
                                    max_lora_rank=max(ranks), max_model_len=hi_in + hi_out + 16,
                                    max_prefill_tokens=max(256, hi_in)))
    cfg = engine.model_config
    results = []
    tmp = tempfile.mkdtemp()
    base_dir = None
    for rank in ranks:
        sets, make = make_weight_sets(cfg, rank, args.num_weight_sets, seed=rank)
        for n in counts:
            prefix = f"r{rank}n{n}"
            for a in range(n):
                engine.add_lora(f"{prefix}-{a}", make(f"{prefix}-{a}", a % len(sets)))
            reqs = workload(args.num_requests, n, args.alpha, args.rate, args.cv, lo_in, hi_in,
                            lo_out, hi_out, cfg.vocab_size)
            def cold_run():   # every adapter re-registered: none resident on the device
                for a in range(n):
                    engine.remove_lora(f"{prefix}-{a}")
                    engine.add_lora(f"{prefix}-{a}", make(f"{prefix}-{a}", a % len(sets)))
                return run_jaxserve(engine, reqs, prefix)
            # Warm-up for every setting, under the timed runs' conditions (adapters cold):
            # compile the step shapes this workload touches. Shapes depend on timing (which
            # requests share a step), so repeat while new ones appear (up to --warmup passes).
            t = time.perf_counter()
            for _ in range(args.warmup):
                seen = num_programs(engine)
                cold_run()
                if num_programs(engine) == seen:
                    break
            print(f"warm-up (compiles) {time.perf_counter() - t:.1f}s", file=sys.stderr)
            loads0 = engine.scheduler.adapters.num_loads
            programs0 = num_programs(engine)
            # Timed runs of the same workload; the one with the median throughput is reported
            # (a run can meet a step shape the warm-up did not, and pay its compile).
            runs = sorted((cold_run() for _ in range(args.repeats)), key=lambda r: r["throughput"])
            row = dict(rank=rank, num_adapters=n, jaxserve=dict(runs[len(runs) // 2]))
            row["jaxserve"]["all_throughputs"] = [r["throughput"] for r in runs]
            row["jaxserve"]["adapter_loads"] = engine.scheduler.adapters.num_loads - loads0
            # step shapes first seen while timed (compiled, or read from the persistent cache)
            row["jaxserve"]["new_programs"] = num_programs(engine) - programs0
            if not args.no_peft and n <= args.peft_max_adapters:
                if base_dir is None:
                    base_dir = export_hf(engine, tmp)
                row["peft"] = run_peft(base_dir, reqs, n, sets, rank, args.max_num_seqs, tmp,
                                       args.dtype)
            results.append(row)
            for name in [x for x in engine.list_loras()]:
                engine.remove_lora(name)
            print(fmt_row(row), file=sys.stderr, flush=True)
    print(table(results))
    with open(args.json, "w") as f:
        json.dump(dict(args=vars(args), results=results), f, indent=1)
    return 0


def num_programs(engine) -> int:
    """Step programs the engine's runner has compiled so far: those it holds (runner._compiled,
    one per shape bucket) and those it dropped to stay under the memory-map budget (a dropped
    one met again counts again: it is compiled, or read from the persistent cache, again)."""
    return len(engine.runner._compiled) + engine.runner.num_programs_dropped


def export_hf(engine, tmp):
    """The engine's base weights as an HF Llama checkpoint, so PEFT runs the very same model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jaxserve.loader import hf_tensors
    from jaxserve.loader import load_model
    # the engine holds only its prepared params: the canonical weights are read again (fp32)
    c, w = engine.model_config, load_model(engine.config.model).weights
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta, max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings))
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in hf_tensors(c, w).items()}
    hf.load_state_dict(sd, strict=False)
    path = os.path.join(tmp, "base")
    hf.save_pretrained(path)
    return path


def fmt_row(r):
    j, pf = r["jaxserve"], r.get("peft")
    s = (f"rank {r['rank']:>3} adapters {r['num_adapters']:>5}: jaxserve {j['throughput']:.2f} req/s "
         f"ttft {j['ttft']:.2f}s loads {j['adapter_loads']} new programs {j['new_programs']}")
    if pf:
        s += f" | PEFT {pf['throughput']:.2f} req/s ttft {pf['ttft']:.2f}s ({j['throughput'] / pf['throughput']:.1f}x)"
    return s


def table(results):
    lines = ["| rank | adapters | jaxserve req/s | jaxserve tok/s | jaxserve TTFT s | adapter loads | "
             "new programs | PEFT req/s | PEFT TTFT s | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        j, pf = r["jaxserve"], r.get("peft")
        lines.append(f"| {r['rank']} | {r['num_adapters']} | {j['throughput']:.2f} | {j['tokens_per_s']:.1f} | "
                     f"{j['ttft']:.2f} | {j['adapter_loads']} | {j['new_programs']} | " +
                     (f"{pf['throughput']:.2f} | {pf['ttft']:.2f} | {j['throughput'] / pf['throughput']:.1f}x |"
                      if pf else "n/a | n/a | n/a |"))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
