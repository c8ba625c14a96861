"""Continuous batching on the real default model: a prompt's greedy tokens do not depend on
what else is in the batch, when it joins, or whether it was preempted and recomputed."""
import numpy as np

from jaxserve.engine import EngineConfig, LLMEngine
from jaxserve.sampling_params import SamplingParams

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
    small = LLMEngine(EngineConfig(max_num_seqs=8, max_model_len=512, num_pages=10, max_prefill_tokens=256),
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
    eng = LLMEngine(EngineConfig(max_num_seqs=4, max_model_len=256, num_pages=40,
                                 max_prefill_tokens=64), model=default_model)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    batched = _staggered(eng, PROMPTS[:3], params, join_every=2)
    assert eng.runner.num_programs_dropped > 0 and len(eng.runner._programs) == 1
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


def test_page_buckets_bound_padding_and_stay_few():
    from jaxserve.runner import fine_bucket as page_bucket
    buckets = {page_bucket(n, 128) for n in range(1, 129)}
    assert sorted(buckets) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128]
    for n in range(1, 129):
        p = page_bucket(n, 128)
        assert n <= p and (p == n or p < 1.5 * n)   # padding stays under a third of the bucket
    assert page_bucket(200, 128) == 128


def test_prefill_groups_split_by_chunk_bucket():
    from jaxserve.runner import fine_bucket, prefill_groups
    tb = lambda n: fine_bucket(n, 512, lo=16)   # noqa: E731
    rb = lambda n: fine_bucket(n, 64)           # noqa: E731
    # 133, 130 -> 192; 87 -> 96; 36 -> 48; 12, 10 -> 16. With no cost per call, every bucket
    # gets its own call; at 48 token slots a call, 36 joins 87 (2 x 96 < 96 + 48 + 48) and the
    # short pair stays apart (it would pad to 3 x 48 or 4 x 96).
    assert prefill_groups([36, 87, 133, 130, 10, 12], tb, rb, call_cost=0) == [[2, 3], [1], [0], [5, 4]]
    assert prefill_groups([36, 87, 133, 130, 10, 12], tb, rb, call_cost=48) == [[2, 3], [1, 0], [5, 4]]
    assert prefill_groups([128] * 4, tb, rb) == [[0, 1, 2, 3]]
    # a huge per-call cost: one call
    assert prefill_groups([36, 87, 133, 10], tb, rb, call_cost=10**6) == [[2, 1, 0, 3]]


def test_prefill_groups_is_the_cheapest_split():
    """The DP's split costs exactly as little as the best of every split of the sorted
    sequences into runs (brute force), and covers each sequence once."""
    import itertools
    import random
    from jaxserve.runner import fine_bucket, prefill_groups
    tb = lambda n: fine_bucket(n, 512, lo=16)   # noqa: E731
    rb = lambda n: fine_bucket(n, 64)           # noqa: E731
    rng = random.Random(0)
    for _ in range(200):
        chunks = [rng.randint(1, 300) for _ in range(rng.randint(1, 7))]
        cc = rng.choice([0, 16, 48, 200])
        cost = lambda gs: sum(cc + rb(len(g)) * tb(max(chunks[i] for i in g)) for g in gs)  # noqa: E731
        groups = prefill_groups(chunks, tb, rb, call_cost=cc)
        assert sorted(i for g in groups for i in g) == list(range(len(chunks)))
        order = sorted(range(len(chunks)), key=lambda i: -chunks[i])
        best = min(cost([order[a:b] for a, b in zip((0,) + cuts, cuts + (len(order),))])
                   for k in range(len(order))
                   for cuts in itertools.combinations(range(1, len(order)), k))
        assert cost(groups) == best
