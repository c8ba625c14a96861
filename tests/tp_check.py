"""Tensor-parallel checks, run in a fresh process with simulated CPU devices.

The device count must be fixed before JAX starts, and pytest's process has already started it,
so tests/test_tp_*.py run this file as a subprocess and read one JSON object from its last line:
    python tests/tp_check.py greedy --model tiny9 --tp 2 4 8 [--lora] [--backend pallas]
    python tests/tp_check.py lora --heads 9 3 --tp 2 4 8
    python tests/tp_check.py hlo --model tiny9 --tp 4 [--lora]
    python tests/tp_check.py greedy --model moe --tp 2 4 --ep 2 4    (ep N: tp N with --ep N)
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxserve import sharding  # noqa: E402
from jaxserve.config import ModelConfig  # noqa: E402
from jaxserve.model import llama  # noqa: E402
from jaxserve.backends.base import XlaBackend  # noqa: E402
from jaxserve.model import params as params_lib  # noqa: E402
from jaxserve.model.kv_cache import StepInput  # noqa: E402
from jaxserve.model.weights import init_random  # noqa: E402
from jaxserve.runner import ModelRunner  # noqa: E402
from jaxserve.sampling_params import SamplingParams  # noqa: E402
from scheduler import (FinishReason, SamplingOptions, Scheduler, SchedulerConfig,  # noqa: E402
                       Sequence)

PAGE = 4
TINY = {  # q heads / kv heads: 9/3 like the default model (pads), 8/2 (replicates KV at tp 4, 8)
    "tiny9": dict(num_heads=9, num_kv_heads=3),
    "tiny8": dict(num_heads=8, num_kv_heads=2),
    # a Qwen3-MoE-shaped mixture of experts: 8 experts, top 2 (not renormalised), width 32
    "moe": dict(num_heads=8, num_kv_heads=2, num_experts=8, experts_per_token=2,
                moe_intermediate_size=32, moe_renormalize=False, architecture="qwen3_moe"),
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


def make_runner(cfg, weights, tp, backend="xla", ep=1):
    return ModelRunner(cfg, weights, num_pages=32, page_size=PAGE, max_num_seqs=4,
                       max_prefill_tokens=32, max_model_len=64, backend=backend, tp=tp, ep=ep)


def max_steps(num_seqs: int, max_tokens: int) -> int:
    """More engine steps than num_seqs requests of max_tokens need (a prefill chunk and a decode
    step per token each, even one request at a time): a loop that runs past it is stuck, and
    the check fails instead of running forever."""
    return 4 * num_seqs * (max_tokens + 2)


def greedy(runner: ModelRunner, cfg, max_tokens: int):
    """Scheduler + runner loop (the engine's step without text). Returns tokens and logprobs."""
    sched = Scheduler(SchedulerConfig(num_pages=32, page_size=PAGE, max_num_seqs=4,
                                      max_prefill_tokens=32, max_model_len=64))
    seqs = []
    for i, ids in enumerate(prompts(cfg)):
        seqs.append(Sequence(seq_id=i, prompt_token_ids=ids, max_tokens=max_tokens,
                             sampling=SamplingOptions(logprobs=True)))
        sched.add(seqs[-1])
    lps = {s.seq_id: [] for s in seqs}
    for _ in range(max_steps(len(seqs), max_tokens)):
        if all(s.is_finished for s in seqs):
            break
        plan = sched.schedule()
        toks, lp = runner.run(plan)
        for s, t, l in zip(plan.seqs, toks, lp):
            if t is not None:
                lps[s.seq_id].append(l)
        for s in sched.update(plan, toks):   # the engine's output processor decides this
            if s.num_output_tokens >= s.max_tokens:
                sched.finish(s, FinishReason.LENGTH)
    else:
        raise RuntimeError(f"unfinished after {max_steps(len(seqs), max_tokens)} steps")
    return [list(s.output_token_ids) for s in seqs], [lps[s.seq_id] for s in seqs]


def forward_logits(cfg, weights, tp: int, ep: int = 1):
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
    # tp=1: a 1-device mesh
    backend = XlaBackend(cfg, jnp.float32, mesh=sharding.make_mesh(tp), ep=ep)
    vc, mesh = backend.run_config, backend.mesh
    w = backend.prepare(weights)
    kv = backend.init_pool(B * pages_per + 1, PAGE)
    kv_sh = sharding.kv_sharding(mesh, kv)
    fn = jax.jit(lambda w, kv, s: llama.forward(w, vc, backend, s, kv, all_logits=True),
                 in_shardings=(jax.tree.map(lambda a: a.sharding, w), kv_sh,
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
    P = runner.builder.max_pages_per_seq
    z = lambda *s: np.zeros(s, np.int32)  # noqa: E731
    step = StepInput(z(batch, 1), z(batch, 1), z(batch, P), z(batch), z(batch), z(batch), z(batch))
    from jaxserve.sampling import SamplingInput
    samp = SamplingInput(np.zeros(batch, np.float32), z(batch), np.ones(batch, np.float32),
                         np.zeros(batch, np.uint32), z(batch))
    return runner.programs.compile(runner.params, runner.kv, step, samp).as_text()


# ----------------------------------------------------------------------------- LoRA

LORA_NAMES = ("qv8", "all16rs", "pattern")   # ranks 4..32, q/v only, all-linear, per-layer ranks


def lora_setup(root: str, heads: tuple[int, int]):
    """A tiny HF Llama (with tokenizer) and PEFT adapters on disk (tests/lora_helpers.py)."""
    import lora_helpers
    base = lora_helpers.make_base(os.path.join(root, "base"), num_attention_heads=heads[0],
                                  num_key_value_heads=heads[1], hidden_size=8 * heads[0])
    lora_helpers.make_adapters(base, root, LORA_NAMES)
    return os.path.join(root, "base"), lora_helpers.prompts(4, seed=3, lo=4, hi=9)


ENGINE_KW = dict(dtype="float32", num_pages=512, page_size=8, max_num_seqs=4, max_prefill_tokens=64,
                 max_model_len=64, max_loras=4, max_lora_rank=32, backend="xla")


def lora_engine(base_path: str, root: str, tp: int):
    from jaxserve.engine import EngineConfig, LLMEngine
    eng = LLMEngine(EngineConfig(model=base_path, tp=tp, **ENGINE_KW))
    for name in LORA_NAMES:
        eng.add_lora(name, os.path.join(root, name))
    return eng


def synthetic_adapter(cfg: ModelConfig, name: str, rank: int, modules, seed: int):
    """A random adapter in the engine's layout (no PEFT files), for the default model."""
    from jaxserve.lora.adapter import MODULES, LoraAdapter, LoraWeights, module_dims
    rng = np.random.default_rng(seed)
    L = cfg.num_layers
    a, b = {}, {}
    ranks = np.zeros((L, len(MODULES)), np.int32)
    for m in modules:
        din, dout = module_dims(cfg, m)
        a[m] = (rng.normal(size=(L, rank, din)) / din ** 0.5).astype(np.float32)
        b[m] = (rng.normal(size=(L, rank, dout)) * 0.5 / rank ** 0.5).astype(np.float32)
        ranks[:, MODULES.index(m)] = rank
    scales = np.where(ranks > 0, 2.0, 0.0).astype(np.float32)
    return LoraAdapter(name, LoraWeights(a=a, b=b, ranks=ranks, scales=scales), {})


DEFAULT_LORAS = {"d_qv8": (8, ("q_proj", "v_proj")),
                 "d_all16": (16, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                  "down_proj")),
                 "d_kod24": (24, ("k_proj", "o_proj", "down_proj"))}


def default_lora_engine(model, tp: int):
    from jaxserve.engine import EngineConfig, LLMEngine
    eng = LLMEngine(EngineConfig(tp=tp, **ENGINE_KW), model=model)
    for i, (name, (rank, modules)) in enumerate(DEFAULT_LORAS.items()):
        eng.add_lora(name, synthetic_adapter(model.config, name, rank, modules, seed=10 + i))
    return eng


def lora_first_logits(eng, ps, adapters):
    """Logits [B, V] of the first (prefill) step of a mixed-adapter batch, adapters written."""
    runner = eng.runner
    for i, (p, a) in enumerate(zip(ps, adapters)):
        eng.add_request(f"x{i}", p, SamplingParams(max_tokens=1, temperature=0.0), adapter=a)
    plan = eng.scheduler.schedule()
    assert len(plan.seqs) == len(ps) and set(plan.adapter_pages) == {a for a in adapters if a}
    n = len(plan.seqs)
    step, _ = runner._inputs(runner.builder.build_call(plan, list(range(n)), list(range(n))))
    runner.kv = runner.lora.write(runner.kv, runner.lora.stage(plan.adapter_loads))

    backend = runner.backend
    fwd = jax.jit(lambda w, kv, s: llama.forward(w, backend.run_config, backend, s, kv)[0])
    logits = np.asarray(fwd(params_lib.stack(runner.params), runner.kv, step))[:len(ps)]
    for i in range(len(ps)):
        eng.abort(f"x{i}")
    return logits


def lora_pass(eng, ps, adapters, max_tokens: int, what: str):
    """Greedy continuations of prompts `ps` under `adapters`, all in one batch: (token ids,
    log-probs) per prompt."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                            logprobs=True)
    ids = [f"p{next(_PASS_IDS)}" for _ in ps]
    for rid, p, a in zip(ids, ps, adapters):
        eng.add_request(rid, p, params, adapter=a)
    final, lps = {}, {rid: [] for rid in ids}
    for _ in range(max_steps(len(ids), max_tokens)):
        if len(final) == len(ids):
            break
        for o in eng.step():
            lps[o.request_id] += o.new_logprobs or []
            if o.finished:
                final[o.request_id] = o
    else:
        raise RuntimeError(f"{what}: unfinished after {max_steps(len(ids), max_tokens)} steps")
    return [final[r].token_ids for r in ids], [lps[r] for r in ids]


_PASS_IDS = itertools.count()


def lora_check(args):
    import tempfile
    result = {"devices": jax.device_count()}
    with tempfile.TemporaryDirectory() as root:
        if args.model == "default":
            from jaxserve.loader import load_model
            model = load_model()
            ps = [[int(t) for t in p] for p in prompts(model.config, 4)]
            adapters = [None, *DEFAULT_LORAS]
            make = lambda tp: default_lora_engine(model, tp)  # noqa: E731
        else:
            base_path, ps = lora_setup(root, tuple(args.heads))
            adapters = [None, *LORA_NAMES]
            make = lambda tp: lora_engine(base_path, root, tp)  # noqa: E731
        runs = {}
        for tp in [1, *args.tp]:
            eng = make(tp)
            logits = lora_first_logits(eng, ps, adapters)
            tokens, lps = lora_pass(eng, ps, adapters, args.max_tokens, f"tp={tp}")
            runs[tp] = dict(tokens=tokens, lps=lps, logits=logits)
            if args.cached_rerun:
                # prompts of three pages and more, run twice: the second run's prefixes come
                # from the (sharded) pool pages the first one cached
                long_ps = [(p * 8)[:3 * eng.config.page_size + 1] for p in ps]
                first, _ = lora_pass(eng, long_ps, adapters, args.max_tokens, f"tp={tp}")
                hits = eng.stats()["prefix_cache"]["hits"]
                second, _ = lora_pass(eng, long_ps, adapters, args.max_tokens, f"tp={tp}")
                runs[tp]["cached"] = dict(first=first, second=second,
                                          hits=eng.stats()["prefix_cache"]["hits"] - hits)
        ref = runs[1]
        result["tp1"] = {"tokens": ref["tokens"]}
        # adapters must matter, or equality with tp=1 would prove nothing
        result["adapters_change_tokens"] = len({tuple(t) for t in ref["tokens"]}) == len(ps)
        result["adapter_logit_effect"] = float(np.abs(ref["logits"][1:] - ref["logits"][0]).max())
        if args.cached_rerun:
            result["cached_tp1"] = ref["cached"]
        for tp in args.tp:
            r = runs[tp]
            if args.cached_rerun:
                result[f"cached_tp{tp}"] = r["cached"]
            result[f"tp{tp}"] = {
                "tokens": r["tokens"],
                "max_logit_diff": float(np.abs(r["logits"] - ref["logits"]).max()),
                "logit_scale": float(np.abs(ref["logits"]).max()),
                "max_logprob_diff": float(max(abs(a - b) for x, y in zip(r["lps"], ref["lps"])
                                              for a, b in zip(x, y))),
            }
    return result


def lora_hlo_check(args):
    """Collectives of one mixed-adapter decode step (every projection adapted by some adapter)."""
    import tempfile
    from jaxserve.sampling import SamplingInput  # noqa: F401  (the runner builds it)
    result = {"devices": jax.device_count()}
    with tempfile.TemporaryDirectory() as root:
        base_path, ps = lora_setup(root, tuple(args.heads))
        for tp in args.tp:
            eng = lora_engine(base_path, root, tp)
            for i, (p, a) in enumerate(zip(ps, [None, *LORA_NAMES])):
                eng.add_request(f"r{i}", p, SamplingParams(max_tokens=4, temperature=0.0), adapter=a)
            eng.step()                                   # the prefill; the next plan decodes
            plan = eng.scheduler.schedule()
            assert not plan.is_prefill and len(plan.seqs) == len(ps)
            (built,) = eng.runner.builder.build(plan)
            step, samp = eng.runner._inputs(built)
            hlo = eng.runner.programs.compile(eng.runner.params, eng.runner.kv, step,
                                              samp).as_text()
            cfg = eng.model_config
            result[f"tp{tp}"] = {"collectives": collectives(hlo), "modules": list(step.lora.modules),
                                 "tokens": int(step.tokens.size), "max_rank": step.lora.max_rank,
                                 "hidden": cfg.hidden_size, "vocab": cfg.vocab_size,
                                 "batch": int(step.tokens.shape[0])}
    return result


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("check", choices=["greedy", "hlo", "lora", "lora-hlo"])
    ap.add_argument("--heads", type=int, nargs=2, default=[9, 3])
    ap.add_argument("--model", default="tiny9")
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--ep", type=int, nargs="*", default=[],
                    help="mixture of experts: also run tp N with --ep N (result key epN)")
    ap.add_argument("--max-tokens", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--cached-rerun", action="store_true",
                    help="lora: also run 3-page prompts twice (the second from the prefix cache)")
    ap.add_argument("--backend", default="xla", help="the sharded runs' backend (tp=1: xla)")
    args = ap.parse_args(argv)
    if args.check in ("lora", "lora-hlo"):
        print(json.dumps((lora_check if args.check == "lora" else lora_hlo_check)(args)))
        return 0
    cfg, weights = load(args.model)
    result = {"model": args.model, "devices": jax.device_count()}
    # (result key, tp, ep): the tensor-parallel runs, then the expert-parallel ones
    runs = [(f"tp{tp}", tp, 1) for tp in args.tp] + [(f"ep{ep}", ep, ep) for ep in args.ep]
    if args.check == "greedy":
        ref_tokens, ref_lps = greedy(make_runner(cfg, weights, 1), cfg, args.max_tokens)
        ref_logits = forward_logits(cfg, weights, 1)
        result["tp1"] = {"tokens": ref_tokens}
        if cfg.num_experts:   # the experts must matter, or equality with tp=1 would prove nothing
            no_experts = dataclasses.replace(weights, layers=dataclasses.replace(
                weights.layers, we_down=jnp.zeros_like(weights.layers.we_down)))
            result["experts_logit_effect"] = float(max(
                np.abs(a - b).max() for a, b in zip(forward_logits(cfg, no_experts, 1), ref_logits)))
        for key, tp, ep in runs:
            runner = make_runner(cfg, weights, tp, args.backend, ep)
            tokens, lps = greedy(runner, cfg, args.max_tokens)
            logits = forward_logits(cfg, weights, tp, ep)
            result[key] = {
                "tokens": tokens,
                "max_logprob_diff": float(max(abs(a - b) for x, y in zip(lps, ref_lps)
                                              for a, b in zip(x, y))),
                "max_logit_diff": float(max(np.abs(a - b).max() for a, b in zip(logits, ref_logits))),
                "logit_scale": float(max(np.abs(a).max() for a in ref_logits)),
                "num_heads": sharding.head_layout(cfg, tp).config.num_heads,
                "num_kv_heads": sharding.head_layout(cfg, tp).config.num_kv_heads,
                "describe": runner.backend.describe(),
            }
            if cfg.num_experts:   # what one device holds of the stacked expert weights
                lp = runner.params.layers
                shard = lambda a: list(a.addressable_shards[0].data.shape)  # noqa: E731
                result[key]["device_shapes"] = {
                    "router": shard(lp.router), "gate": shard(lp.experts.gate),
                    "up": shard(lp.experts.up), "down": shard(lp.experts.down)}
    else:
        for key, tp, ep in runs:
            runner = make_runner(cfg, weights, tp, ep=ep)
            result[key] = {"collectives": collectives(decode_hlo(runner, args.batch)),
                           "hidden": cfg.hidden_size, "vocab": cfg.vocab_size}
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
