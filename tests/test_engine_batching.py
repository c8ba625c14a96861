"""Continuous batching on the real default model: a prompt's greedy tokens do not depend on
what else is in the batch, when it joins, or whether it was preempted and recomputed."""
import numpy as np
import pytest

from jaxserve.engine import EngineConfig, LLMEngine
from jaxserve.sampling_params import SamplingParams

pytestmark = pytest.mark.slow   # the real default model

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea:",
    "List the planets of the solar system in order from the Sun: Mercury,",
    "def add(a, b):",
    "Q: What is 12 times 12?\nA:",
]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def _alone(engine, prompt, params=GREEDY):
    return engine.generate([prompt], params)[0].token_ids


def _staggered(engine, prompts, params, join_every=3):
    """Requests join one at a time every `join_every` steps while others decode."""
    pending = list(enumerate(prompts))
    done = {}
    step = 0
    while pending or engine.has_unfinished():
        if pending and step % join_every == 0:
            i, p = pending.pop(0)
            engine.add_request(f"stagger-{i}", p, params)
        for out in engine.step():
            if out.finished:
                done[int(out.request_id.split("-")[1])] = out.token_ids
        step += 1
    return [done[i] for i in range(len(prompts))]


def test_batch_invariance_with_staggered_joins(default_engine):
    alone = [_alone(default_engine, p) for p in PROMPTS]
    batched = _staggered(default_engine, PROMPTS, GREEDY)
    assert batched == alone
    assert default_engine.stats()["num_free_pages"] == default_engine.stats()["num_total_pages"]


def test_batch_invariance_across_preemption(default_model, default_engine):
    # 5 requests of ~10-20 prompt tokens + 24 outputs need ~3 pages of 16 each at the end;
    # a pool of 9 usable pages forces preemption (recompute) mid-decode.
    small = LLMEngine(EngineConfig(dtype="float32", max_num_seqs=8, max_model_len=512, num_pages=10, max_prefill_tokens=256),
                      model=default_model)
    batched = _staggered(small, PROMPTS, GREEDY, join_every=1)
    assert small.num_preemptions_total > 0
    alone = [_alone(default_engine, p) for p in PROMPTS]
    assert batched == alone
    assert small.stats()["num_free_pages"] == small.stats()["num_total_pages"]


def test_dropped_programs_are_rebuilt_and_outputs_unchanged(default_model, default_engine,
                                                              monkeypatch):
    """With no room for compiled programs (map budget 0), the runner keeps only the last one
    and rebuilds the others when needed: outputs are those of an engine that keeps them all."""
    import jaxserve.runner as runner_mod
    monkeypatch.setattr(runner_mod, "_map_budget", lambda: 0)
    eng = LLMEngine(EngineConfig(dtype="float32", max_num_seqs=4, max_model_len=256, num_pages=40,
                                 max_prefill_tokens=64), model=default_model)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    batched = _staggered(eng, PROMPTS[:3], params, join_every=2)
    assert eng.runner.num_programs_dropped > 0 and len(eng.runner._compiled) == 1
    assert batched == [_alone(default_engine, p, params) for p in PROMPTS[:3]]


def test_seeded_sampling_is_batch_invariant(default_engine):
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=40, seed=1234, ignore_eos=True)
    alone = _alone(default_engine, PROMPTS[1], params)
    again = _alone(default_engine, PROMPTS[1], params)
    assert alone == again
    mixed = [GREEDY, params, GREEDY]
    outs = default_engine.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], mixed)
    assert outs[1].token_ids == alone
    other_seed = _alone(default_engine, PROMPTS[1], SamplingParams(**{**params.__dict__, "seed": 99}))
    assert other_seed != alone  # 16 tokens at T=0.9: equal by chance has negligible probability


