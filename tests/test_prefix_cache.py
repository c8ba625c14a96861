"""Automatic prefix caching: the allocator's reference counts, the scheduler's reuse of cached
pages, and greedy outputs of a real (tiny) model identical with caching on and off.

References: the allocator's invariants (every page in exactly one state), and the engine
without caching (which recomputes every prompt) for the outputs."""
import os
import random
import sys

import pytest
from hypothesis import given, settings, strategies as st

from scheduler import Scheduler, SchedulerConfig, Sequence
from scheduler.block_allocator import BlockAllocator, OutOfPages
from scheduler.cost import LinearCost, prefill_charge
from scheduler.prefix_cache import extend_hashes
from scheduler.sequence import FinishReason
from scheduler.vtc import VTCPolicy

sys.path.insert(0, os.path.dirname(__file__))
from test_overlap import _drive, tiny  # noqa: E402,F401  (tiny: a fixture used below)


# -- the allocator ----------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("aflrut"), st.integers(0, 7), st.integers(0, 5)),
                max_size=80))
def test_allocator_reference_counts_never_leak(ops):
    """Random allocate / free / register / lookup+acquire / uncache sequences: after each op
    every page is in exactly one state; pages held (by the model of the holders below) are
    exactly the referenced ones with the right counts; eviction never takes a held page."""
    a = BlockAllocator(10)
    holders: list[list[int]] = []           # each holder's pages (a request's block table)
    for op, x, n in ops:
        if op == "a":
            try:
                pages = a.allocate(n)
            except OutOfPages:
                assert n > a.num_free
                continue
            held = {p for h in holders for p in h}
            assert not held & set(pages), "an allocation took a page in use"
            holders.append(pages)
        elif op == "f" and holders:
            a.free(holders.pop(x % len(holders))[::-1])
        elif op == "r" and holders:
            h = holders[x % len(holders)]
            if h:
                a.register(h[n % len(h)], bytes([n % 3, x % 2]), tag=x % 2)
        elif op == "l":
            hashes = [bytes([i % 3, x % 2]) for i in range(n)]
            pages = a.lookup(hashes)
            a.acquire(pages)
            holders.append(pages)
        elif op == "u":
            a.uncache(x % 2, everything=n == 0)
        elif op == "t" and holders:          # a page held twice by one holder is not a thing
            continue
        a.check()
        counts: dict[int, int] = {}
        for h in holders:
            for p in h:
                counts[p] = counts.get(p, 0) + 1
        assert counts == {p: a.num_refs(p) for p in counts} and a.num_used == len(counts)
    for h in holders:
        a.free(h)
    a.check()
    assert a.num_used == 0 and a.num_free == a.num_usable


def test_allocator_evicts_least_recently_released_and_tail_first():
    a = BlockAllocator(7)                      # 6 usable
    x, y = a.allocate(3), a.allocate(3)
    for i, p in enumerate(x):
        a.register(p, b"x%d" % i)
    for i, p in enumerate(y):
        a.register(p, b"y%d" % i)
    a.free(x[::-1])
    a.free(y[::-1])
    assert a.num_free == 6 and a.num_cached == 6 and a.num_used == 0
    assert a.allocate(1) == [x[2]]             # x released first, its tail first
    assert a.lookup([b"x0", b"x1", b"x2"]) == x[:2]
    a.acquire(a.lookup([b"y0"]))               # held again: never evicted
    got = a.allocate(4)
    assert y[0] not in got and set(got) == {x[0], x[1], y[2], y[1]}
    with pytest.raises(OutOfPages):
        a.allocate(1)
    a.check()


# -- the scheduler ------------------------------------------------------------------------------
def _run(sched, seqs, steps=200):
    """Drive the scheduler synchronously, every sampled token 7, until `seqs` finish."""
    for _ in range(steps):
        if all(s.is_finished for s in seqs):
            return
        plan = sched.schedule()
        produced = sched.update(plan, [7 if plan.samples(i) else None
                                       for i in range(len(plan.seqs))])
        for s in produced:
            if s.num_output_tokens >= s.max_tokens:
                sched.finish(s, FinishReason.LENGTH)
    raise AssertionError("did not finish")


def _sched(num_pages=64, **kw):
    return Scheduler(SchedulerConfig(num_pages=num_pages, page_size=4, max_num_seqs=8,
                                     max_prefill_tokens=64, max_model_len=64,
                                     enable_prefix_caching=True, mixed_steps=True, **kw))


def test_admission_reuses_the_longest_cached_chain_but_not_the_last_token_page():
    sched = _sched()
    a = Sequence(0, list(range(1, 15)), max_tokens=2)          # 14 tokens: pages 0-2 full
    sched.add(a)
    _run(sched, [a])
    # pages 0-2; page 3 (positions 12-15) lacks the K/V of the last output token
    assert sched.allocator.num_cached == 3
    # 12-token prefix shared, then different: 3 pages hit
    b = Sequence(1, list(range(1, 13)) + [99, 98], max_tokens=1)
    # the same 12 tokens only: the page holding the last token is recomputed -> 2 pages hit
    c = Sequence(2, list(range(1, 13)), max_tokens=1)
    # same tokens under an adapter, or another salt: no hit
    d = Sequence(3, list(range(1, 15)), max_tokens=1, cache_salt="tenant-x")
    for s in (b, c, d):
        sched.add(s)
    plan = sched.schedule()
    got = {s.seq_id: (st, n) for s, st, n in zip(plan.seqs, plan.start_positions,
                                                 plan.num_new_tokens)}
    assert got == {1: (12, 2), 2: (8, 4), 3: (0, 14)}
    assert (b.num_cached_tokens, c.num_cached_tokens, d.num_cached_tokens) == (12, 8, 0)
    assert b.block_table[:3] == c.block_table[:2] + [b.block_table[2]]
    assert c.block_table[2] != b.block_table[2]     # c's last page is its own
    stats = sched.prefix_cache_stats()
    assert stats["queries"] == 14 + 14 + 12 + 14 and stats["hits"] == 12 + 8
    sched.update(plan, [7 if plan.samples(i) else None for i in range(len(plan.seqs))])
    for s in (b, c, d):
        sched.finish(s, FinishReason.LENGTH)
    sched.allocator.check()
    assert sched.allocator.num_used == 0


def test_adapter_is_part_of_the_page_name():
    ids = list(range(1, 10))
    base = Sequence(0, ids, max_tokens=1)
    lora = Sequence(1, ids, max_tokens=1, adapter="a")
    assert extend_hashes(base, 4, 2) != extend_hashes(lora, 4, 2)
    assert extend_hashes(Sequence(2, ids, 1, adapter="a"), 4, 2) == lora.block_hashes


def test_preempted_request_resumes_from_its_own_cached_pages():
    # 9 usable pages of 4 tokens; two requests growing to 20 tokens each need 10 -> preemption
    sched = _sched(num_pages=10)
    a = Sequence(0, list(range(1, 13)), max_tokens=8)
    b = Sequence(1, list(range(50, 62)), max_tokens=8)
    sched.add(a), sched.add(b)
    resumed = []
    for _ in range(200):
        if a.is_finished and b.is_finished:
            break
        plan = sched.schedule()
        for i, s in enumerate(plan.seqs):
            if not plan.is_decode(i) and s.num_preemptions:
                resumed.append(plan.start_positions[i])
        produced = sched.update(plan, [7 if plan.samples(i) else None
                                       for i in range(len(plan.seqs))])
        for s in produced:
            if s.num_output_tokens >= s.max_tokens:
                sched.finish(s, FinishReason.LENGTH)
        sched.allocator.check()
    assert a.num_preemptions + b.num_preemptions > 0
    assert resumed and max(resumed) > 0      # resumed past its cached pages, not from 0
    assert sched.allocator.num_used == 0


def test_remove_adapter_forgets_its_pages():
    sched = Scheduler(SchedulerConfig(num_pages=32, page_size=4, max_num_seqs=4,
                                      max_prefill_tokens=64, max_model_len=64,
                                      enable_prefix_caching=True), adapter_pages=lambda n: 2)
    a = Sequence(0, list(range(1, 14)), max_tokens=1, adapter="x")
    b = Sequence(1, list(range(1, 14)), max_tokens=1)
    sched.add(a), sched.add(b)
    _run(sched, [a, b])
    assert sched.allocator.num_cached == 6
    sched.adapters.evict("x")
    assert sched.forget_cached("x") == 3 and sched.allocator.num_cached == 3
    sched.allocator.check()


def test_vtc_charges_cached_prompt_tokens_at_their_weight():
    cost = LinearCost(1.0, 2.0)
    assert prefill_charge(cost, 100, 60, 0.1) == pytest.approx(40 + 6)
    assert prefill_charge(cost, 100, 60, 1.0) == 100 and prefill_charge(cost, 100, 0, 0.0) == 100
    for w, want in ((0.0, 2.0), (0.5, 6.0), (1.0, 10.0)):
        pol = VTCPolicy(cost, cached_token_weight=w)
        sched = Scheduler(SchedulerConfig(num_pages=32, page_size=4, max_num_seqs=4,
                                          max_prefill_tokens=64, max_model_len=64,
                                          enable_prefix_caching=True), pol)
        first = Sequence(0, list(range(1, 11)), max_tokens=1, client_id="a")
        sched.add(first)
        _run(sched, [first])
        assert pol.clients["a"].charged == pytest.approx(10 + 2)
        again = Sequence(1, list(range(1, 11)), max_tokens=1, client_id="b")   # 8 cached
        sched.add(again)
        sched.schedule()
        assert again.num_cached_tokens == 8
        assert pol.clients["b"].charged == pytest.approx(want)
        assert pol.stats()["clients"]["b"]["cached_tokens"] == 8


# -- a real tiny model: outputs identical with caching on and off --------------------------------
# (`tiny`: test_overlap's base model and "qv4" adapter, written once per module)


def _requests(seed=0):
    """Prompts sharing prefixes at page boundaries (page 4) and off them, whole prompts that
    are prefixes of others, repeats, the same prompts under an adapter."""
    from jaxserve.sampling_params import SamplingParams
    rng = random.Random(seed)
    system = [rng.randrange(3, 250) for _ in range(16)]
    other = [rng.randrange(3, 250) for _ in range(9)]
    prompts = [system + [5, 6, 7], system[:8] + [9] * 6, system[:10] + [11, 12], system,
               system[:12], system + [5, 6, 7], other + system[:5], other, other + [3],
               system + [5, 6, 7, 8, 9, 10, 11, 12, 13]]
    reqs = []
    for i, p in enumerate(prompts * 2):
        adapter = "qv4" if i >= len(prompts) and i % 2 else None
        reqs.append((f"r{i}", p, SamplingParams(max_tokens=rng.randint(3, 12), temperature=0.0,
                                                logprobs=True, ignore_eos=True), adapter))
    return reqs


def _engine(root, caching, num_pages, **kw):
    from jaxserve.engine import EngineConfig, LLMEngine
    engine = LLMEngine(EngineConfig(model=str(root / "base"), dtype="float32", page_size=4,
                                    num_pages=num_pages, max_num_seqs=4, max_prefill_tokens=16,
                                    max_model_len=64, max_lora_rank=8,
                                    enable_prefix_caching=caching, **kw))
    engine.add_lora("qv4", str(root / "qv4"))
    return engine


@pytest.mark.parametrize("num_pages,mode", [(200, "sync"), (17, "overlap")])
def test_greedy_outputs_identical_with_caching_on_and_off(tiny, num_pages, mode):
    reqs = _requests()
    kw = dict(async_scheduling=mode == "overlap")
    out = {}
    for caching in (False, True):
        engine = _engine(tiny, caching, num_pages, **kw)
        out[caching] = _drive(engine, reqs, join_every=3, abort_at=("r1", 2))
        stats = engine.stats()
        alloc = engine.scheduler.allocator
        alloc.check()
        assert alloc.num_used == engine.scheduler.adapters.num_pages_held   # no KV page leaked
        if caching:
            pc = stats["prefix_cache"]
            assert pc["hits"] >= 40, pc                       # the comparison is not vacuous
            assert pc["by_adapter"]["qv4"]["hits"] > 0 and pc["by_adapter"][None]["hits"] > 0
            if num_pages == 17:
                assert engine.num_preemptions_total > 0
        else:
            assert stats["prefix_cache"]["hits"] == 0 and alloc.num_cached == 0
    off, on = out[False], out[True]
    assert off.keys() == on.keys() and "r1" not in on
    for rid in off:
        assert on[rid][0] == off[rid][0], rid                  # greedy tokens
        assert on[rid][3] == pytest.approx(off[rid][3], abs=2e-4), rid


@pytest.mark.parametrize("order", ["adapters-first", "prefix-first"])
def test_eviction_order_between_idle_adapters_and_cached_prefixes(order):
    # 12 usable pages: adapter x (4 pages) idle, a's 3 cached prefix pages evictable, 5 free
    sched = Scheduler(SchedulerConfig(num_pages=13, page_size=4, max_num_seqs=4,
                                      max_prefill_tokens=64, max_model_len=64,
                                      enable_prefix_caching=True, cache_eviction_order=order),
                      adapter_pages=lambda n: 4)
    x = Sequence(0, [1, 2], max_tokens=1, adapter="x")
    a = Sequence(1, list(range(1, 14)), max_tokens=1)
    sched.add(x), sched.add(a)
    _run(sched, [x, a])
    alloc = sched.allocator
    assert sched.adapters.is_resident("x") and alloc.num_cached == 3
    assert alloc.num_free_uncached == 5 and alloc.num_free == 8
    b = Sequence(2, list(range(100, 124)), max_tokens=1)      # 6 pages: one more than is free
    sched.add(b)
    sched.schedule()
    if order == "adapters-first":
        assert not sched.adapters.is_resident("x") and alloc.num_cached == 3
    else:
        assert sched.adapters.is_resident("x") and alloc.num_cached == 2
        assert len(alloc.lookup(a.block_hashes)) == 2      # the chain's leaf went first
    alloc.check()
