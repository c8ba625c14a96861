"""Tensor-parallel checks, run in a fresh process with simulated CPU devices.

The device count must be fixed before JAX starts, and pytest's process has already started it,
so tests/test_tp_*.py run this file as a subprocess and read one JSON object from its last line:
    python tests/tp_check.py greedy --model tiny9 --tp 2 4 8 [--lora]
    python tests/tp_check.py hlo --model tiny9 --tp 4 [--lora]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxserve import sharding  # noqa: E402
from jaxserve.config import ModelConfig  # noqa: E402
from jaxserve.model import llama  # noqa: E402
from jaxserve.model.kv_cache import StepInput, init_kv_pages  # noqa: E402
from jaxserve.model.weights import init_random  # noqa: E402
from jaxserve.runner import ModelRunner  # noqa: E402
from jaxserve.sampling_params import SamplingParams  # noqa: E402
from scheduler import Scheduler, SchedulerConfig, Sequence  # noqa: E402

PAGE = 4
TINY = {  # q heads / kv heads: 9/3 like the default model (pads), 8/2 (replicates KV at tp 4, 8)
    "tiny9": dict(num_heads=9, num_kv_heads=3),
    "tiny8": dict(num_heads=8, num_kv_heads=2),
}


def load(name: str):
    if name == "default":
        from jaxserve.loader import load_model
        m = load_model()
        return m.config, m.weights
    cfg = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_layers=2,
                      head_dim=16, **TINY[name])
    return cfg, init_random(cfg, seed=1, std=0.08)


def prompts(cfg: ModelConfig, n: int = 3) -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [rng.integers(1, cfg.vocab_size, 5 + 3 * i).tolist() for i in range(n)]


def make_runner(cfg, weights, tp):
    return ModelRunner(cfg, weights, num_pages=32, page_size=PAGE, max_num_seqs=4,
                       max_prefill_tokens=32, max_model_len=64, attention_impl="xla", tp=tp)


def greedy(runner: ModelRunner, cfg, max_tokens: int):
    """Scheduler + runner loop (the engine's step without text). Returns tokens and logprobs."""
    sched = Scheduler(SchedulerConfig(num_pages=32, page_size=PAGE, max_num_seqs=4,
                                      max_prefill_tokens=32, max_model_len=64))
    seqs = []
    for i, ids in enumerate(prompts(cfg)):
        p = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        seqs.append(Sequence(seq_id=i, prompt_token_ids=ids, max_tokens=max_tokens, params=p))
        sched.add(seqs[-1])
    lps = {s.seq_id: [] for s in seqs}
    while not all(s.is_finished for s in seqs):
        plan = sched.schedule()
        toks, lp = runner.run(plan)
        for s, t, l in zip(plan.seqs, toks, lp):
            if t is not None:
                lps[s.seq_id].append(l)
        sched.update(plan, toks)
    return [list(s.output_token_ids) for s in seqs], [lps[s.seq_id] for s in seqs]


def forward_logits(cfg, weights, tp: int):
    """All-position logits of a prefill then one decode step, through the sharded jit."""
    ps = prompts(cfg, 2)
    T = max(map(len, ps))
    B, pages_per = len(ps), -(-(T + 1) // PAGE)
    table = np.arange(1, 1 + B * pages_per, dtype=np.int32).reshape(B, pages_per)
    tok = np.zeros((B, T), np.int32)
    pos = np.full((B, T), -1, np.int32)
    for b, p in enumerate(ps):
        tok[b, :len(p)], pos[b, :len(p)] = p, np.arange(len(p))
    safe = np.maximum(pos, 0)
    pages = np.where(pos >= 0, np.take_along_axis(table, safe // PAGE, 1), 0)
    lens = np.array([len(p) for p in ps], np.int32)
    pre = StepInput(tok, pos, table, lens, pages.reshape(-1), (safe % PAGE).reshape(-1),
                    lens - 1)
    dec_pos = lens[:, None]
    dec = StepInput(tok[:, :1] + 1, dec_pos, table, lens + 1,
                    table[np.arange(B), lens // PAGE], lens % PAGE, np.zeros(B, np.int32))
    layout = sharding.head_layout(cfg, tp)
    vc = layout.config
    mesh = sharding.make_mesh(tp)
    w = sharding.shard_weights(weights, cfg, mesh, layout)
    kv = sharding.shard_kv(init_kv_pages(vc, B * pages_per + 1, PAGE), mesh)
    kv_sh = sharding.kv_sharding(mesh, kv)
    fn = jax.jit(lambda w, kv, s: llama.forward(w, vc, s, kv, all_logits=True),
                 in_shardings=(sharding.weight_shardings(vc, mesh), kv_sh,
                               sharding.replicated(mesh)),
                 out_shardings=(sharding.replicated(mesh), kv_sh))
    out = []
    for s in (pre, dec):
        logits, kv = fn(w, kv, s)
        out.append(np.where((s.positions >= 0)[..., None], np.asarray(logits), 0.0))
    return out


COLLECTIVE = re.compile(r"= (\w+\[[\d,]*\])(?:\{[^}]*\})? (all-reduce|all-gather|reduce-scatter|"
                        r"all-to-all|collective-permute)(?:-start)?\(")


def collectives(hlo: str) -> list[list[str]]:
    """[op, result shape] for every collective in compiled HLO text (scan bodies appear once)."""
    return sorted([op, shape] for shape, op in COLLECTIVE.findall(hlo))


def decode_hlo(runner: ModelRunner, batch: int) -> str:
    P = runner.max_pages_per_seq
    z = lambda *s: np.zeros(s, np.int32)  # noqa: E731
    step = StepInput(z(batch, 1), z(batch, 1), z(batch, P), z(batch), z(batch), z(batch), z(batch))
    from jaxserve.sampling import SamplingInput
    samp = SamplingInput(np.zeros(batch, np.float32), z(batch), np.ones(batch, np.float32),
                         np.zeros(batch, np.uint32), z(batch))
    return runner._step.lower(runner.weights, runner.kv, step, samp).compile().as_text()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("check", choices=["greedy", "hlo"])
    ap.add_argument("--model", default="tiny9")
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--max-tokens", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args(argv)
    cfg, weights = load(args.model)
    result = {"model": args.model, "devices": jax.device_count()}
    if args.check == "greedy":
        ref_tokens, ref_lps = greedy(make_runner(cfg, weights, 1), cfg, args.max_tokens)
        ref_logits = forward_logits(cfg, weights, 1)
        result["tp1"] = {"tokens": ref_tokens}
        for tp in args.tp:
            tokens, lps = greedy(make_runner(cfg, weights, tp), cfg, args.max_tokens)
            logits = forward_logits(cfg, weights, tp)
            result[f"tp{tp}"] = {
                "tokens": tokens,
                "max_logprob_diff": float(max(abs(a - b) for x, y in zip(lps, ref_lps)
                                              for a, b in zip(x, y))),
                "max_logit_diff": float(max(np.abs(a - b).max() for a, b in zip(logits, ref_logits))),
                "logit_scale": float(max(np.abs(a).max() for a in ref_logits)),
                "num_heads": sharding.head_layout(cfg, tp).config.num_heads,
                "num_kv_heads": sharding.head_layout(cfg, tp).config.num_kv_heads,
            }
    else:
        for tp in args.tp:
            runner = make_runner(cfg, weights, tp)
            result[f"tp{tp}"] = {"collectives": collectives(decode_hlo(runner, args.batch)),
                                 "hidden": cfg.hidden_size, "vocab": cfg.vocab_size}
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
