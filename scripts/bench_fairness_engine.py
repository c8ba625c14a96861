"""Fairness on the real engine: two clients, B sending at twice A's rate, both saturating.

Arrivals are driven in engine steps (A adds one request, B two, every `--period` steps), so
the workload is identical across policies and machines. Service per client counts
w_p * prompt tokens (when its prefill completes) + w_q * output tokens produced in the
measured window. Prints a table (service ratio B/A, tokens per step, tokens per second) and
writes JSON.

    python scripts/bench_fairness_engine.py --steps 400
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

W_P, W_Q = 1.0, 2.0


def run_two_clients(engine, *, steps: int, period: int, prompt_len: int, output_len: int,
                    warmup_steps: int = 0) -> dict:
    """Drive `engine` for `steps` steps; return per-client service and throughput."""
    from jaxserve.sampling_params import SamplingParams
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    prompt = list(range(1000, 1000 + prompt_len))
    client_of: dict[str, str] = {}
    service = {"A": 0.0, "B": 0.0}
    tokens = 0
    n = 0
    t_start = None
    for step in range(warmup_steps + steps):
        if step == warmup_steps:
            service = {"A": 0.0, "B": 0.0}
            tokens = 0
            t_start = time.perf_counter()
        if step % period == 0:
            for client, count in (("A", 1), ("B", 2)):
                for _ in range(count):
                    rid = f"{client}-{n}"
                    n += 1
                    client_of[rid] = client
                    engine.add_request(rid, prompt, params, client_id=client)
        for out in engine.step():
            c = client_of[out.request_id]
            if len(out.token_ids) == 1:  # the first token: the prefill completed this step
                service[c] += W_P * out.num_prompt_tokens
            service[c] += W_Q * len(out.new_token_ids)
            tokens += len(out.new_token_ids)
    wall = time.perf_counter() - t_start
    for rid in list(client_of):
        engine.abort(rid)
    return {"service": service, "ratio_b_over_a": service["B"] / max(service["A"], 1e-9),
            "tokens": tokens, "tokens_per_step": tokens / steps, "tokens_per_s": tokens / wall,
            "stats": engine.stats()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--warmup-steps", type=int, default=60)
    p.add_argument("--period", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--output", default="bench_results/fairness_engine.json")
    args = p.parse_args(argv)
    from jaxserve.engine import EngineConfig, LLMEngine
    from jaxserve.loader import load_model
    model = load_model()
    results = {}
    for policy in ("fcfs", "vtc"):
        engine = LLMEngine(EngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=256, num_pages=256,
                                        scheduler=policy), model=model)
        results[policy] = run_two_clients(engine, steps=args.steps, period=args.period,
                                          prompt_len=args.prompt_len, output_len=args.output_len,
                                          warmup_steps=args.warmup_steps)
        r = results[policy]
        print(f"{policy:5s} service A {r['service']['A']:9.0f}  B {r['service']['B']:9.0f}  "
              f"B/A {r['ratio_b_over_a']:.2f}  tokens/step {r['tokens_per_step']:.2f}  "
              f"tokens/s {r['tokens_per_s']:.1f}", flush=True)
    v, f = results["vtc"], results["fcfs"]
    print(f"vtc/fcfs throughput: {v['tokens_per_step'] / f['tokens_per_step']:.3f} per step, "
          f"{v['tokens_per_s'] / f['tokens_per_s']:.3f} per second")
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as fh:
        json.dump({"args": vars(args), "results": {k: {kk: vv for kk, vv in r.items() if kk != "stats"}
                                                   for k, r in results.items()}}, fh, indent=2)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
