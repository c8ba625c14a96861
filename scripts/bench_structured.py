"""Decode throughput with every row of the batch under a JSON schema, against no constraint.

Modes, each on the same engine and prompts (fresh random token ids per run, prefix caching
off, so every run prefills the same work):
  none       unconstrained (ignore_eos), the overlapped loop as served
  none-sync  unconstrained with the overlapped loop off: what running synchronously costs
  json       every row under SCHEMA (a list of at least 100 records, so no row can finish
             before --output-len tokens): masks computed on the host per row and step,
             applied on the device, steps synchronous
Decode throughput = tokens produced after every row's first token / the seconds since then.
Each mode runs once untimed (compiles its buckets), then --repeats times; the best run is
reported (a shared machine's noise only slows runs down). Every constrained output is checked
to be a prefix the grammar accepts. The mask column is the host time spent in mask_provider
per step (the llguidance calls for all rows).

  python scripts/bench_structured.py --batch 32 --output-len 128 --json bench_results/structured.json
"""
from __future__ import annotations

import argparse
import json
import random
import time

SCHEMA = {
    "type": "object",
    "properties": {"people": {"type": "array", "minItems": 100, "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 32},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "role": {"enum": ["admin", "editor", "viewer"]},
            "email": {"type": "string", "maxLength": 64},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 16},
                     "maxItems": 4},
            "address": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 24},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False},
            "active": {"type": "boolean"}},
        "required": ["name", "age", "role", "email", "tags", "address", "active"],
        "additionalProperties": False}}},
    "required": ["people"], "additionalProperties": False,
}


def run(engine, mode: str, batch: int, input_len: int, output_len: int, seed: int) -> dict:
    from jaxserve.sampling_params import SamplingParams
    from jaxserve.structured import Constraint
    rng = random.Random(seed)
    V = engine.model_config.vocab_size
    c = Constraint.json_schema(SCHEMA) if mode == "json" else None
    params = SamplingParams(max_tokens=output_len, temperature=1.0, seed=seed,
                            ignore_eos=c is None, structured=c)
    ids = []
    for i in range(batch):
        ids.append(f"{mode}-{seed}-{i}")
        engine.add_request(ids[-1], [rng.randrange(V) for _ in range(input_len)], params)
    engine.overlap = mode != "none-sync" and engine.config.async_scheduling
    mask_s, steps = 0.0, 0
    inner = engine.structured.mask

    def timed(seq):
        nonlocal mask_s
        t = time.perf_counter()
        m = inner(seq)
        mask_s += time.perf_counter() - t
        return m

    engine.mask_provider = timed
    started, produced, t0, done = set(), 0, None, {}
    while len(done) < batch:
        outs = engine.step()
        steps += 1
        for out in outs:
            if t0 is not None:
                produced += len(out.new_token_ids)
            started.add(out.request_id)
            if out.finished:
                done[out.request_id] = out
        if t0 is None and len(started) == batch:
            t0, mask_s, steps = time.perf_counter(), 0.0, 0
    seconds = time.perf_counter() - t0
    engine.mask_provider = inner
    engine.overlap = engine.config.async_scheduling
    if c is not None:
        template = engine.structured.compiler.submit(c).result()
        for out in done.values():
            m = template.deep_copy()
            assert m.consume_tokens(out.token_ids), m.get_error()
            assert out.finish_reason == "length", out.finish_reason
    return {"mode": mode, "tokens": produced, "seconds": seconds, "tok_s": produced / seconds,
            "steps": steps, "mask_ms_per_step": 1e3 * mask_s / max(steps, 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the embedded SmolLM2)")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--modes", default="none,none-sync,json")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    import jax
    from jaxserve.engine import EngineConfig, LLMEngine
    engine = LLMEngine(EngineConfig(
        model=args.model, load_format=args.load_format, dtype=args.dtype,
        max_num_seqs=args.batch, max_model_len=args.input_len + args.output_len + 16,
        max_prefill_tokens=max(512, args.input_len), enable_prefix_caching=False))
    rows = []
    modes = args.modes.split(",")
    for mode in modes:    # compile every bucket the modes touch
        run(engine, mode, args.batch, args.input_len, 8, seed=999)
    for r in range(args.repeats):
        for mode in modes:
            rows.append(run(engine, mode, args.batch, args.input_len, args.output_len, seed=r))
            print(json.dumps(rows[-1]), flush=True)
    best = {m: max((x for x in rows if x["mode"] == m), key=lambda x: x["tok_s"]) for m in modes}
    base = best.get("none")
    print(f"\n{jax.default_backend()} {engine.model_name} {engine.config.dtype}, batch "
          f"{args.batch}, {args.input_len} prompt + {args.output_len} output tokens (best of "
          f"{args.repeats})")
    print("| mode | decode tok/s | vs none | mask ms/step |\n| --- | --- | --- | --- |")
    for m, x in best.items():
        rel = f"{100 * x['tok_s'] / base['tok_s']:.1f}%" if base else "-"
        print(f"| {m} | {x['tok_s']:.1f} | {rel} | {x['mask_ms_per_step']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"platform": jax.default_backend(), "model": engine.model_name,
                       "batch": args.batch, "runs": rows,
                       "best": best}, f, indent=1)


if __name__ == "__main__":
    main()
