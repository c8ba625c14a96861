"""The step builder on its own: plans -> padded host arrays, no JAX (the engine's tests run it
end to end). Plans are built by hand from scheduler Sequences."""
import subprocess
import sys

import numpy as np

from jaxserve.step_builder import StepBuilder
from scheduler import FinishReason, SamplingOptions, Sequence, StepPlan

PAGE = 4


def test_step_builder_imports_no_jax():
    code = ("import sys, jaxserve.step_builder, jaxserve.lora.slots; "
            "assert 'jax' not in sys.modules, 'jax imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def _seq(seq_id, num_prompt, num_out=0, pages=None, **sampling):
    s = Sequence(seq_id=seq_id, prompt_token_ids=list(range(100 + seq_id, 100 + seq_id + num_prompt)),
                 max_tokens=64, sampling=SamplingOptions(**sampling))
    s.output_token_ids = [7] * num_out
    n = -(-(num_prompt + num_out) // PAGE)
    s.block_table = pages or list(range(1 + 10 * seq_id, 1 + 10 * seq_id + n))
    return s


def _decode(seqs):
    return StepPlan(is_prefill=False, seqs=seqs, num_new_tokens=[1] * len(seqs),
                    start_positions=[s.num_tokens - 1 for s in seqs])


def _builder(**kw):
    args = dict(page_size=PAGE, max_num_seqs=8, max_prefill_tokens=64, max_model_len=64)
    return StepBuilder(**{**args, **kw})


def test_decode_arrays():
    a = _seq(0, 5, 2, temperature=0.7, top_k=5, top_p=0.9, seed=123, logprobs=True)
    b = _seq(1, 3, 0)
    (built,) = _builder().build(_decode([a, b]))
    assert not built.is_prefill and built.rows == [0, 1] and built.samples == [True, True]
    assert built.tokens.shape == (2, 1) and built.block_tables.shape == (2, 2)
    assert built.shape == ("decode", 2, 1, 2)
    # a: 7 tokens, the last (position 6) is this step's input: page a.block_table[1], offset 2
    assert built.tokens[0, 0] == 7 and built.positions[0, 0] == 6 and built.kv_lens[0] == 7
    assert built.slot_pages[0] == a.block_table[1] and built.slot_offsets[0] == 2
    assert built.positions[1, 0] == 2 and built.tokens[1, 0] == b.prompt_token_ids[-1]
    np.testing.assert_array_equal(built.block_tables[1], [b.block_table[0], 0])   # null page pad
    assert built.temperature[0] == np.float32(0.7) and built.top_k[0] == 5
    assert built.seeds[0] == 123 and built.counters[0] == 2 and built.counters[1] == 0
    assert built.want_logprobs
    assert built.lora is None


def test_decode_rows_stay_put_and_compact():
    builder = _builder()
    seqs = [_seq(i, 3) for i in range(4)]
    (b0,) = builder.build(_decode(seqs))
    assert b0.rows == [0, 1, 2, 3]
    (b1,) = builder.build(_decode([seqs[0], seqs[3], _seq(9, 2)]))   # 1, 2 finished; 9 new
    assert b1.rows == [0, 3, 1] and b1.tokens.shape[0] == 4          # kept rows, lowest free
    (b2,) = builder.build(_decode([seqs[3]]))                        # row 3 would need 4 rows
    assert b2.rows == [0] and b2.tokens.shape[0] == 1                 # compacted


def test_min_decode_rows_pads():
    (built,) = _builder(min_decode_rows=2).build(_decode([_seq(0, 3)]))
    assert built.tokens.shape == (2, 1) and built.positions[1, 0] == -1


def test_prefill_groups_and_chunks():
    long, short = _seq(0, 40), _seq(1, 3)
    plan = StepPlan(is_prefill=True, seqs=[long, short], num_new_tokens=[32, 3],
                    start_positions=[0, 0])
    calls = _builder().build(plan)
    # 32 vs 3 tokens: apart costs 48 + 32 + 48 + 16 token slots, together 48 + 2 x 32
    assert [c.seqs for c in calls] == [[0, 1]]
    (c,) = calls
    assert c.samples == [False, True]       # the long prompt's chunk stops short of its end
    assert c.tokens.shape == (2, 32) and c.logits_index.tolist() == [31, 2]
    assert c.positions[1, 3] == -1 and c.slot_pages.shape == (64,)
    many = [_seq(i, 60 if i < 2 else 2) for i in range(6)]
    plan = StepPlan(is_prefill=True, seqs=many, num_new_tokens=[60, 60, 2, 2, 2, 2],
                    start_positions=[0] * 6)
    calls = _builder(max_prefill_tokens=128).build(plan)   # the plan's 128 tokens fit a step
    assert sorted(i for c in calls for i in c.seqs) == list(range(6)) and len(calls) == 2
    assert {c.tokens.shape for c in calls} == {(2, 64), (4, 16)}


def test_page_buckets_bound_padding_and_stay_few():
    from jaxserve.step_builder import fine_bucket as page_bucket
    buckets = {page_bucket(n, 128) for n in range(1, 129)}
    assert sorted(buckets) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128]
    for n in range(1, 129):
        p = page_bucket(n, 128)
        assert n <= p and (p == n or p < 1.5 * n)   # padding stays under a third of the bucket
    assert page_bucket(200, 128) == 128


def test_prefill_groups_split_by_chunk_bucket():
    from jaxserve.step_builder import fine_bucket, prefill_groups
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
    from jaxserve.step_builder import fine_bucket, prefill_groups
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


ARRAYS = ("tokens", "positions", "block_tables", "kv_lens", "slot_pages", "slot_offsets",
          "logits_index", "temperature", "top_k", "top_p", "seeds", "counters")


def _check_persistent_decode_matches_fresh(seed, mixed, overlap, page_bucketing):
    """Over a run of real scheduler plans (mixed or prefill-first steps, tokens known at once
    or one step late, finishes, preemption in a small pool, resumed sequences), the decode call
    that build() keeps updating in place equals the one build_call makes from scratch."""
    import random
    from scheduler import Scheduler, SchedulerConfig
    rng = random.Random(seed)
    sched = Scheduler(SchedulerConfig(num_pages=30, page_size=PAGE, max_num_seqs=8,
                                      max_prefill_tokens=24, max_model_len=64, mixed_steps=mixed))
    kept = _builder(bucket_pages=(page_bucketing, True))
    fresh = _builder(bucket_pages=(page_bucketing, True))
    next_id, inflight, decodes = 0, None, 0
    for _ in range(120):
        while rng.random() < 0.3:
            n = rng.randint(1, 20)
            sched.add(Sequence(seq_id=next_id, prompt_token_ids=[rng.randrange(50) for _ in range(n)],
                               max_tokens=rng.randint(1, 64 - n),
                               sampling=SamplingOptions(temperature=rng.choice([0.0, 0.5]),
                                                        seed=next_id, logprobs=rng.random() < 0.3)))
            next_id += 1
        plan = sched.schedule()
        for built in kept.build(plan):
            if built.is_prefill:
                continue
            decodes += 1
            ref = fresh.build_call(plan, built.seqs, built.rows, is_prefill=False)
            assert built.shape == ref.shape and built.samples == ref.samples
            for name in ARRAYS:
                np.testing.assert_array_equal(getattr(built, name), getattr(ref, name), name)
            assert built.from_device == ref.from_device
            assert built.want_logprobs == ref.want_logprobs
        done = [] if inflight is None and overlap else [inflight or plan]
        inflight = plan if overlap else None
        for p in done:
            toks = [rng.randrange(50) if p.samples(i) else None for i in range(len(p.seqs))]
            for s in sched.update(p, toks):
                if s.num_output_tokens >= s.max_tokens or rng.random() < 0.05:
                    sched.finish(s, FinishReason.LENGTH)
    assert decodes > 20


def test_persistent_decode_arrays_match_a_fresh_build():
    for seed in range(6):
        for mixed in (False, True):
            for overlap in (False, True):
                _check_persistent_decode_matches_fresh(seed, mixed, overlap, seed % 2 == 0)
