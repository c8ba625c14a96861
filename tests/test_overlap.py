"""Overlapped steps and mixed steps give the token streams of the synchronous, prefill-first loop.

The engine plans and launches step N+1 before it has processed step N's tokens (a decode's input
token is taken on the device), and a step carries running decodes and prefill chunks together.
Neither may change what a request gets: same tokens, text, finish reasons and log-probs, deltas
in order, with stop strings, stop tokens, EOS, max_tokens, aborts, preemption in a small pool and
mixed adapters -- on the fake runner (every code path of the engine, cheap) and on a tiny real
model (the device-side token feed, seeded sampling, LoRA)."""
import os
import random
import sys

import pytest

from jaxserve.sampling_params import SamplingParams
from scheduler import Scheduler, SchedulerConfig, Sequence, SamplingOptions

sys.path.insert(0, os.path.dirname(__file__))
from fake_runner import fake_engine, write_adapter  # noqa: E402

MODES = {   # name -> EngineConfig fields
    "sync-prefill-first": dict(async_scheduling=False, mixed_steps=False),
    "sync-mixed": dict(async_scheduling=False, mixed_steps=True),
    "overlap-prefill-first": dict(async_scheduling=True, mixed_steps=False),
    "overlap-mixed": dict(async_scheduling=True, mixed_steps=True),
}


def _drive(engine, requests, *, abort_at=None, join_every=2):
    """Add `requests` (request_id, prompt, params, adapter) one every `join_every` steps while
    the engine runs; abort `abort_at` = (request_id, after this many of its outputs). Returns
    request_id -> (token_ids, text, finish_reason, logprobs, concatenated text deltas)."""
    pending, done, deltas, lps, seen = list(requests), {}, {}, {}, {}
    step = 0
    while pending or engine.has_unfinished():
        if pending and step % join_every == 0:
            rid, prompt, params, adapter = pending.pop(0)
            engine.add_request(rid, prompt, params, adapter=adapter)
        for out in engine.step():
            deltas[out.request_id] = deltas.get(out.request_id, "") + out.new_text
            lps.setdefault(out.request_id, []).extend(out.new_logprobs or [])
            seen[out.request_id] = seen.get(out.request_id, 0) + 1
            if out.finished:
                done[out.request_id] = (out.token_ids, out.text, out.finish_reason,
                                        lps[out.request_id], deltas[out.request_id])
            elif abort_at and out.request_id == abort_at[0] and seen[out.request_id] == abort_at[1]:
                engine.abort(out.request_id)
        step += 1
        assert step < 10_000
    return done


# -- the fake runner: the engine's logic ---------------------------------------------------------
def _fake_requests(rng, n=24):
    reqs = []
    for i in range(n):
        prompt = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 40)))
        params = SamplingParams(
            max_tokens=rng.randint(1, 30), logprobs=rng.random() < 0.5,
            stop=rng.choice([[], ["k"], ["xy", "q"]]),
            stop_token_ids=rng.choice([[], [ord("m")]]),
            include_stop_str_in_output=rng.random() < 0.3)
        reqs.append((f"r{i}", prompt, params, rng.choice([None, None, "ad", "adapter2"])))
    return reqs


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("overlap-adapters")
    write_adapter(root / "ad", seed=1)
    write_adapter(root / "adapter2", seed=2)
    return root


def _fake(adapter_dir, mode, **kw):
    cfg = MODES[mode]
    engine = fake_engine(overlap=cfg["async_scheduling"], mixed_steps=cfg["mixed_steps"],
                         async_scheduling=cfg["async_scheduling"], **kw)
    engine.add_lora("ad", str(adapter_dir / "ad"))
    engine.add_lora("adapter2", str(adapter_dir / "adapter2"))
    return engine


@pytest.mark.parametrize("pool", ["roomy", "small"])
def test_fake_streams_identical_in_every_mode(adapter_dir, pool):
    kw = dict(max_num_seqs=6, max_model_len=128) if pool == "roomy" else \
        dict(max_num_seqs=6, max_model_len=128, num_pages=40)   # 4-token pages: preemption
    reqs = _fake_requests(random.Random(3))
    results, engines = {}, {}
    for mode in MODES:
        engine = engines[mode] = _fake(adapter_dir, mode, **kw)
        results[mode] = _drive(engine, reqs, abort_at=("r5", 3))
        stats = engine.stats()
        assert stats["num_free_pages"] + engine.scheduler.adapters.num_pages_held \
            == stats["num_total_pages"], mode
        assert not engine.has_unfinished() and not engine.scheduler.running
    ref = results["sync-prefill-first"]
    for mode, got in results.items():
        assert got.keys() == ref.keys(), mode
        for rid in ref:
            assert got[rid] == ref[rid], (mode, rid)
            assert got[rid][4] == got[rid][1]    # the deltas add up to the text, in order
    assert "r5" not in ref                        # aborted mid-stream
    if pool == "small":
        assert all(e.num_preemptions_total > 0 for e in engines.values())
    assert {r[2] for r in ref.values()} == {"stop", "length"}


def test_overlap_computes_one_extra_token_and_drops_it(adapter_dir):
    """A request that stops at step N was already planned into step N+1: that token is computed
    and dropped, and nothing of it reaches the output."""
    sync, over = _fake(adapter_dir, "sync-mixed"), _fake(adapter_dir, "overlap-mixed")
    params = SamplingParams(max_tokens=50, stop=["e"])     # the 'e' comes within 26 tokens
    for engine in (sync, over):
        (out,) = engine.generate(["abc"], params)
        assert out.finish_reason == "stop" and "e" not in out.text
    assert over.runner.num_steps == sync.runner.num_steps + 1
    assert over.stats()["num_free_pages"] == over.stats()["num_total_pages"]


def test_mixed_steps_keep_decoding_while_a_prompt_arrives(adapter_dir):
    """With mixed steps, a new arrival's prefill rides along with the running decodes: every step
    gives the running request a token. Prefill-first pauses it for the arrival's step."""
    gaps = {}
    for mode in ("sync-mixed", "sync-prefill-first"):
        engine = _fake(adapter_dir, mode)
        engine.add_request("running", "abc", SamplingParams(max_tokens=20, ignore_eos=True))
        engine.step()                                   # prefill of "running"
        engine.add_request("arrival", "hello world", SamplingParams(max_tokens=5))
        got = [any(o.request_id == "running" for o in engine.step()) for _ in range(3)]
        gaps[mode] = got
    assert gaps["sync-mixed"] == [True, True, True]
    assert gaps["sync-prefill-first"] == [False, True, True]


def test_token_budget_splits_decodes_and_prefill():
    """max_num_batched_tokens: decodes first (one token each), prefill chunks get the rest."""
    sched = Scheduler(SchedulerConfig(num_pages=200, page_size=4, max_num_seqs=8,
                                      max_prefill_tokens=64, max_model_len=256, mixed_steps=True,
                                      max_num_batched_tokens=20))
    seqs = [Sequence(seq_id=i, prompt_token_ids=[1] * 6, max_tokens=10,
                     sampling=SamplingOptions()) for i in range(4)]
    for s in seqs:
        sched.add(s)
    plan = sched.schedule()         # prefill only: 4 x 6 = 24 > 20 -> the last prompt chunked
    assert plan.num_new_tokens == [6, 6, 6, 2] and not plan.decode_indices()
    sched.update(plan, [5 if plan.samples(i) else None for i in range(4)])
    late = Sequence(seq_id=9, prompt_token_ids=[1] * 40, max_tokens=4, sampling=SamplingOptions())
    sched.add(late)
    plan = sched.schedule()         # 3 decodes, the rest of seq 3 (4), then 13 of the late one
    assert [plan.is_decode(i) for i in range(len(plan.seqs))] == [True] * 3 + [False] * 2
    assert plan.num_new_tokens == [1, 1, 1, 4, 13] and plan.num_tokens == 20


def test_pending_tokens_let_the_next_step_be_planned_first():
    """The scheduler plans step N+1 before N's tokens are known: N's sampled token counts as
    pending, N+1's decode starts after it, and a preempted sequence keeps its pending token."""
    sched = Scheduler(SchedulerConfig(num_pages=4, page_size=4, max_num_seqs=4,
                                      max_prefill_tokens=64, max_model_len=12, mixed_steps=True))
    a = Sequence(seq_id=0, prompt_token_ids=[1] * 4, max_tokens=8, sampling=SamplingOptions())
    b = Sequence(seq_id=1, prompt_token_ids=[1] * 4, max_tokens=8, sampling=SamplingOptions())
    sched.add(a), sched.add(b)
    p1 = sched.schedule()
    assert p1.num_new_tokens == [4, 4] and a.num_pending_tokens == 1 and a.num_computed_tokens == 4
    p2 = sched.schedule()               # before p1's tokens: decodes at position 4
    assert p2.decode_indices() == [0] and p2.start_positions == [4]
    assert b in p2.preempted            # 3 usable pages: a's second page preempts b
    assert a.num_pending_tokens == 2 and b.num_pending_tokens == 1
    produced = sched.update(p1, [7, 8])
    assert produced == [a, b] and b.output_token_ids == [8] and b.num_pending_tokens == 0
    assert a.output_token_ids == [7] and a.num_pending_tokens == 1
    sched.update(p2, [9])
    assert a.output_token_ids == [7, 9] and a.num_pending_tokens == 0


# -- a tiny real model: the device-side token feed -----------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from lora_helpers import make_adapter, make_base
    root = tmp_path_factory.mktemp("overlap-real")
    base = make_base(str(root / "base"), seed=5)
    make_adapter(base, str(root / "qv4"), seed=1, r=4, lora_alpha=8,
                 target_modules=["q_proj", "v_proj"])
    return root


def _real(root, mode, num_pages):
    from jaxserve.engine import EngineConfig, LLMEngine
    engine = LLMEngine(EngineConfig(model=str(root / "base"), dtype="float32", page_size=4,
                                    num_pages=num_pages, max_num_seqs=6, max_prefill_tokens=32,
                                    max_model_len=64, max_lora_rank=8, **MODES[mode]))
    engine.add_lora("qv4", str(root / "qv4"))
    return engine


@pytest.mark.parametrize("num_pages", [400, 24])
def test_real_streams_identical_overlapped_and_synchronous(tiny, num_pages):
    rng = random.Random(11)
    reqs = []
    for i in range(12):
        prompt = [rng.randrange(3, 250) for _ in range(rng.randint(2, 30))]
        params = SamplingParams(
            max_tokens=rng.randint(1, 20), temperature=rng.choice([0.0, 0.9]),
            top_k=rng.choice([0, 8]), seed=100 + i, logprobs=rng.random() < 0.5,
            stop=rng.choice([[], ["w7"]]), stop_token_ids=rng.choice([[], [rng.randrange(3, 250)]]),
            ignore_eos=rng.random() < 0.5)
        reqs.append((f"r{i}", prompt, params, rng.choice([None, "qv4"])))
    out, fed = {}, []
    for mode in ("sync-prefill-first", "overlap-mixed"):
        engine = _real(tiny, mode, num_pages)
        build = engine.runner.builder.build
        engine.runner.builder.build = lambda plan: [
            fed.append((mode, len(b.from_device))) or b for b in build(plan)]
        out[mode] = _drive(engine, reqs, abort_at=("r2", 2))
        assert engine.stats()["num_free_pages"] + engine.scheduler.adapters.num_pages_held \
            == engine.stats()["num_total_pages"]
        if num_pages == 24:
            assert engine.num_preemptions_total > 0, mode
    # overlapped decodes took their input tokens on the device; synchronous ones never do
    assert sum(n for m, n in fed if m == "overlap-mixed") > 50
    assert sum(n for m, n in fed if m == "sync-prefill-first") == 0
    a, b = out["sync-prefill-first"], out["overlap-mixed"]
    assert a.keys() == b.keys() and "r2" not in a
    for rid in a:
        assert a[rid][:3] == b[rid][:3], rid
        assert b[rid][4] == b[rid][1]
        assert a[rid][3] == pytest.approx(b[rid][3], abs=1e-4)


def test_switching_the_loop_mid_run_keeps_the_streams(adapter_dir):
    """The engine's overlap can be turned off and on between steps, with a step in flight (the
    device check does this to time both loops on one engine): same outputs as throughout."""
    reqs = _fake_requests(random.Random(5), n=10)
    ref = _drive(_fake(adapter_dir, "sync-mixed"), reqs)
    engine = _fake(adapter_dir, "overlap-mixed")
    step = engine.step

    def switching():
        engine.overlap = not engine.overlap if engine.runner.num_steps % 3 == 0 else engine.overlap
        return step()
    engine.step = switching
    assert _drive(engine, reqs) == ref
