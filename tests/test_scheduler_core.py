"""Allocator and continuous-batching scheduler: property tests (no JAX)."""
import subprocess
import sys

from hypothesis import given, settings, strategies as st

from scheduler import BlockAllocator, FinishReason, Scheduler, SchedulerConfig, Sequence
from scheduler.block_allocator import OutOfPages


def test_scheduler_package_does_not_import_jax():
    code = "import scheduler, sys; assert 'jax' not in sys.modules and 'jaxlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 9)), max_size=200), st.integers(2, 40))
def test_allocator_never_leaks_or_double_allocates(ops, num_pages):
    alloc = BlockAllocator(num_pages)
    held: list[list[int]] = []
    for is_alloc, k in ops:
        if is_alloc:
            if alloc.can_allocate(k):
                held.append(alloc.allocate(k))
            else:
                try:
                    alloc.allocate(k)
                    raise AssertionError("allocate beyond capacity succeeded")
                except OutOfPages:
                    pass
        elif held:
            alloc.free(held.pop(k % len(held)))
        flat = [p for pages in held for p in pages]
        assert len(flat) == len(set(flat)), "a page was handed out twice"
        assert 0 not in flat, "the null page was handed out"
        assert alloc.num_free + len(flat) == num_pages - 1
    for pages in held:
        alloc.free(pages)
    assert alloc.num_free == num_pages - 1


def test_double_free_is_an_error():
    alloc = BlockAllocator(4)
    pages = alloc.allocate(2)
    alloc.free(pages)
    try:
        alloc.free(pages)
        raise AssertionError("double free accepted")
    except ValueError:
        pass


def _drive(sched: Scheduler, seqs, rng_tokens=7, max_steps=10000):
    """Run the scheduler with a fake runner that samples token `rng_tokens` every time, and
    finish each sequence at its max_tokens."""
    pending = list(seqs)
    step = 0
    while (pending or sched.has_work) and step < max_steps:
        if pending:
            sched.add(pending.pop(0))
        plan = sched.schedule()
        toks = [rng_tokens if plan.samples(i) else None for i in range(len(plan.seqs))]
        # Invariants at every step: block tables cover the tokens being written, no page shared.
        for i, s in enumerate(plan.seqs):
            end = plan.start_positions[i] + plan.num_new_tokens[i]
            assert len(s.block_table) * sched.config.page_size >= end
        tables = [p for s in sched.running for p in s.block_table]
        assert len(tables) == len(set(tables))
        assert sched.allocator.num_used == len(tables)
        for s in sched.update(plan, toks):
            if s.num_output_tokens >= s.max_tokens:  # the engine's output processor decides this
                sched.finish(s, FinishReason.LENGTH)
        step += 1
    return step


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 60), st.integers(1, 40)), min_size=1, max_size=25),
       st.integers(6, 40), st.sampled_from([4, 8, 16]), st.integers(8, 64))
def test_all_requests_finish_and_pool_is_free(reqs, num_pages, page_size, prefill_budget):
    cfg = SchedulerConfig(num_pages=num_pages, page_size=page_size, max_num_seqs=8,
                          max_prefill_tokens=prefill_budget, max_model_len=128)
    sched = Scheduler(cfg)
    seqs = []
    for i, (p, m) in enumerate(reqs):
        s = Sequence(seq_id=i, prompt_token_ids=[1] * p, max_tokens=m)
        if sched.pages_for(p + m) <= cfg.num_pages - 1:
            seqs.append(s)
    _drive(sched, seqs)
    assert not sched.has_work
    for s in seqs:
        assert s.finish_reason is FinishReason.LENGTH
        assert s.num_output_tokens == s.max_tokens
    assert sched.allocator.num_free == num_pages - 1


def test_preemption_happens_and_recovers():
    cfg = SchedulerConfig(num_pages=9, page_size=4, max_num_seqs=4, max_prefill_tokens=64,
                          max_model_len=64)
    sched = Scheduler(cfg)
    seqs = [Sequence(seq_id=i, prompt_token_ids=[1] * 6, max_tokens=20) for i in range(3)]
    _drive(sched, seqs)
    assert sum(s.num_preemptions for s in seqs) > 0
    assert all(s.num_output_tokens == 20 for s in seqs)
    assert sched.allocator.num_free == 8


def test_abort_waiting_and_running_frees_pages():
    cfg = SchedulerConfig(num_pages=20, page_size=4, max_num_seqs=1, max_prefill_tokens=64)
    sched = Scheduler(cfg)
    a = Sequence(seq_id=1, prompt_token_ids=[1] * 9, max_tokens=5)
    b = Sequence(seq_id=2, prompt_token_ids=[1] * 9, max_tokens=5)
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    assert plan.seqs == [a]
    sched.abort(2)
    sched.abort(1)
    assert a.finish_reason is FinishReason.ABORT and b.finish_reason is FinishReason.ABORT
    assert sched.allocator.num_free == 19 and not sched.has_work
