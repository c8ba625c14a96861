"""Data-parallel checks (`--dp 2 --tp 2`), run in a fresh process on 4 simulated CPU devices.

The device count is fixed when JAX starts, so tests/test_dp.py runs this file as a subprocess
and reads one JSON object from its last line:
    python tests/dp_check.py WORKDIR
WORKDIR gets the tiny random model (tests/lora_helpers.py) and an adapter. Every loop is
bounded in steps; nothing here measures time.
"""
from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(__file__))

from lora_helpers import make_adapter, make_base  # noqa: E402

from jaxserve.engine import EngineConfig, LLMEngine  # noqa: E402
from jaxserve.sampling_params import SamplingParams  # noqa: E402

W_P, W_Q = 1.0, 2.0            # VTC's service weights (docs/fairness.md)
PROMPT, OUTPUT = 8, 8          # every fairness request: 8 prompt tokens, 8 output tokens
PERIOD = 4                     # steps between arrival bursts
# One burst: 10 requests, dispatched in this order. The light tenant A sends 2, the heavy
# tenant B 8 (4x A's load); A's two sit at even slots, so round-robin over 2 servers always
# sends A's requests to server 0 (see tests/test_dp.py for why that matters).
BURST = ["A", "B", "A", "B", "B", "B", "B", "B", "B", "B"]
WARMUP, MEASURE = 24, 96       # steps: until both tenants are backlogged, then counted


def config(model: str, dp: int) -> EngineConfig:
    """Each replica (or server): tp 2, 4 batch rows, 12 pages of 16 tokens. Few shape buckets
    (a request spans at most 2 pages, a prefill chunk 16 tokens): few programs to compile."""
    return EngineConfig(model=model, dtype="float32", page_size=16, num_pages=12, max_num_seqs=4,
                        max_prefill_tokens=16, max_model_len=32, scheduler="vtc", dp=dp, tp=2)


def replica_pages(engine) -> list[dict]:
    """Per replica: pages in use, and how many of them resident adapters hold."""
    reps = getattr(engine.scheduler, "replicas", [engine.scheduler])
    return [{"used": r.allocator.num_used,
             "adapter_pages": r.adapters.num_pages_held if r.adapters is not None else 0,
             "resident": sorted(r.adapters.resident) if r.adapters is not None else []}
            for r in reps]


def greedy(engines: dict) -> dict:
    """The same greedy requests (more than one replica's batch, prompts of several pages and
    chunks) on every engine."""
    prompts = [[3 + (7 * i + j) % 200 for j in range(3 + 3 * i)] for i in range(8)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    out = {}
    for name, engine in engines.items():
        out[name] = [o.token_ids for o in engine.generate(prompts, params)]
        out[name + "_pages"] = replica_pages(engine)
    return out


def fairness(step_all, add) -> dict:
    """Drive the arrival pattern for WARMUP + MEASURE steps; service per tenant (w_p * prompt
    tokens when the prefill completes, w_q * output tokens) in the measured steps. `add(k,
    rid, client)` submits slot k's request; `step_all()` steps every engine once."""
    params = SamplingParams(max_tokens=OUTPUT, temperature=0.0, ignore_eos=True)
    prompt = list(range(10, 10 + PROMPT))
    client_of, service, k = {}, {"A": 0.0, "B": 0.0}, 0
    for step in range(WARMUP + MEASURE):
        if step == WARMUP:
            service = {"A": 0.0, "B": 0.0}
        if step % PERIOD == 0:
            for client in BURST:
                rid = f"{client}-{k}"
                client_of[rid] = client
                add(k, rid, client, prompt, params)
                k += 1
        for out in step_all():
            c = client_of[out.request_id]
            if len(out.token_ids) == len(out.new_token_ids):   # its first tokens: prefill done
                service[c] += W_P * out.num_prompt_tokens
            service[c] += W_Q * len(out.new_token_ids)
    return {"service": service, "ratio_b_over_a": service["B"] / max(service["A"], 1e-9),
            "requests": list(client_of)}


def drain(engines: list, rids: list) -> None:
    """Abort whatever of `rids` is unfinished and step until every engine is idle."""
    for e in engines:
        for rid in rids:
            e.abort(rid)
        for _ in range(8):
            if not e.has_unfinished() and not e.scheduler.has_work:
                break
            e.step()


def main() -> int:
    root = sys.argv[1]
    base = os.path.join(root, "base")
    if not os.path.exists(os.path.join(base, "config.json")):
        model = make_base(base)
        make_adapter(model, os.path.join(root, "a1"), seed=1, r=8, lora_alpha=16,
                     target_modules=["q_proj", "v_proj"])
    dp2 = LLMEngine(config(base, dp=2))
    solo = [LLMEngine(config(base, dp=1)) for _ in range(2)]
    from jaxserve import compile_cache    # the servers' programs are replica 0's: compiled once
    compile_cache.enable(os.path.join(root, "xla_cache"))
    res = {"devices": __import__("jax").device_count()}

    # 1. greedy outputs of dp 2 = dp 1; pages back after the requests finish
    res["greedy"] = greedy({"dp2": dp2, "dp1": solo[0]})

    # 2. fairness: one scheduler over both replicas against two servers behind round-robin
    res["global"] = fairness(dp2.step, lambda k, rid, c, p, sp: dp2.add_request(
        rid, p, sp, client_id=c))
    drain([dp2], res["global"].pop("requests"))
    res["global"]["pages_after"] = replica_pages(dp2)

    def step_pair():
        return solo[0].step() + solo[1].step()
    res["round_robin"] = fairness(step_pair, lambda k, rid, c, p, sp: solo[k % 2].add_request(
        rid, p, sp, client_id=c))
    drain(solo, res["round_robin"].pop("requests"))

    # 3. adapter locality: with both replicas idle, a1's first request lands on replica 0 and
    # loads a1 there. Then base-1 goes to replica 1 (both idle; replica 1 has more free pages:
    # a1 holds some of replica 0's), base-2 to replica 0 (replica 1 has one running), and
    # lora-2, on equal running counts, to replica 0, where a1 is resident, although replica 1
    # has more free pages (least-loaded alone would pick replica 1)
    for e in (dp2, solo[0]):
        e.add_lora("a1", os.path.join(root, "a1"))
    long = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    short = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompt = [5, 6, 7, 8, 9, 10, 11]
    outs = {}

    def run(*requests):
        for rid, params, adapter in requests:
            dp2.add_request(rid, prompt, params, adapter=adapter)
        dp2.step()
        where = {rid: dp2.output.sequence(rid).replica for rid, _, _ in requests}
        pages = replica_pages(dp2)
        while dp2.has_unfinished():
            for o in dp2.step():
                if o.finished:
                    outs[o.request_id] = o.token_ids
        return where, pages
    first, _ = run(("lora-1", short, "a1"))
    second, pages_mid = run(("base-1", long, None), ("base-2", long, None), ("lora-2", short, "a1"))
    res["locality"] = {
        "first": first, "second": second, "pages_mid": pages_mid,
        "pages_after": replica_pages(dp2), "outputs": outs,
        "lora_ref": solo[0].generate([prompt], short, adapter="a1")[0].token_ids,
        "base_ref": solo[0].generate([prompt], long)[0].token_ids}
    # what the server and bench read from an engine's runner and stats, summed over replicas
    stats = dp2.stats()
    res["stats"] = {k: stats[k] for k in ("num_total_pages", "num_free_pages", "num_running",
                                          "num_waiting", "num_programs_compiled")}
    res["runner"] = {"dropped": dp2.runner.num_programs_dropped,
                     "shapes": len(dp2.runner.builder.shapes(lora=False)),
                     "num_pages": dp2.runner.kv.num_pages}
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
