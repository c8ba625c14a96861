"""Adapter residency in the scheduler (no JAX), and the gathered LoRA math."""
import subprocess
import sys

import numpy as np
import pytest

from scheduler import BlockAllocator, FinishReason, Scheduler, SchedulerConfig, Sequence
from scheduler.adapter_cache import AdapterCache

SIZES = {"a": 4, "b": 4, "c": 6}


def test_scheduler_with_adapters_imports_no_jax():
    code = "import sys, scheduler, scheduler.adapter_cache; assert 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lru_pinning_and_reclaim():
    alloc = BlockAllocator(11)                       # 10 usable
    cache = AdapterCache(alloc, SIZES.__getitem__)
    assert cache.acquire("a") and cache.acquire("b")
    cache.release("a")                               # a cached, b pinned
    assert cache.acquire("c")                        # needs 6, 2 free: evicts a (LRU, unpinned)
    assert not cache.is_resident("a") and cache.is_resident("b") and cache.is_resident("c")
    assert not cache.acquire("a")                    # b and c pinned: no room, nothing evicted
    assert cache.is_resident("b") and cache.is_resident("c")
    with pytest.raises(ValueError, match="in use"):
        cache.evict("b")
    cache.release("c")
    cache.reclaim(6)                                 # KV wants 6: c goes, b stays
    assert alloc.num_free == 6 and cache.resident == ["b"]
    cache.release("b")
    with pytest.raises(ValueError):
        cache.release("b")
    loads = cache.drain_loads()
    assert [n for n, _ in loads] == ["b"]             # evicted loads never reach the device
    assert cache.prefetch("a") and cache.num_refs("a") == 0


def _seq(i, adapter, n=8, out=4):
    return Sequence(seq_id=i, prompt_token_ids=list(range(n)), max_tokens=out, adapter=adapter)


def test_admission_counts_adapter_pages_and_plan_lists_loads():
    # 14 usable pages of 4 tokens. Each request: 8 prompt tokens = 2 KV pages; adapters 4 pages.
    sched = Scheduler(SchedulerConfig(num_pages=15, page_size=4, max_num_seqs=8,
                                      max_prefill_tokens=64, max_model_len=16),
                      adapter_pages=SIZES.__getitem__, max_adapters_per_batch=2)
    for i, a in enumerate(["a", "a", "b", "c", None]):
        sched.add(_seq(i, a))
    plan = sched.schedule()
    # a (4) + 2x2 KV + b (4) + 2 KV = 14 pages: c can neither fit nor exceed 2 adapters; FCFS stops there.
    assert [s.seq_id for s in plan.seqs] == [0, 1, 2]
    assert [n for n, _ in plan.adapter_loads] == ["a", "b"]
    assert set(plan.adapter_pages) == {"a", "b"} and len(plan.adapter_pages["a"]) == 4
    assert sched.allocator.num_free == 0
    for s in list(sched.running):
        sched.finish(s, FinishReason.LENGTH)
    assert sched.adapters.num_refs("a") == 0 and sched.allocator.num_free == 6   # a, b cached
    plan = sched.schedule()                          # c evicts LRU adapters to fit
    assert [s.seq_id for s in plan.seqs] == [3, 4] and sched.adapters.is_resident("c")
    assert [n for n, _ in plan.adapter_loads] == ["c"]


def test_decode_growth_reclaims_cached_adapters_before_preempting():
    sched = Scheduler(SchedulerConfig(num_pages=9, page_size=4, max_num_seqs=8,
                                      max_prefill_tokens=64, max_model_len=16),
                      adapter_pages=SIZES.__getitem__)
    sched.adapters.prefetch("a")                     # 4 pages cached, unpinned
    sched.add(_seq(0, None, n=4, out=8))
    sched.add(_seq(1, None, n=4, out=8))
    sched.update(sched.schedule(), [1, 1])
    while sched.has_work:                            # growth needs pages held by "a"
        plan = sched.schedule()
        assert not plan.preempted
        for s in sched.update(plan, [1] * len(plan.seqs)):
            if s.num_output_tokens >= s.max_tokens:
                sched.finish(s, FinishReason.LENGTH)
    assert not sched.adapters.is_resident("a") and sched.adapters.num_evictions == 1


def test_gathered_lora_matches_dense_reference():
    import jax.numpy as jnp
    from jaxserve.lora.apply import gathered_lora
    rng = np.random.default_rng(0)
    S, R, din, dout, T = 3, 16, 24, 40, 11
    a = rng.normal(size=(S, R, din)).astype(np.float32)
    b = rng.normal(size=(S, R, dout)).astype(np.float32)
    ranks = np.array([16, 8, 3], np.int32)
    scales = np.array([0.5, 2.0, 1.5], np.float32)
    for s, r in enumerate(ranks):     # rows past the rank hold garbage in the pool
        a[s, r:] = np.nan
        b[s, r:] = np.nan
    idx = rng.integers(-1, S, T).astype(np.int32)
    x = rng.normal(size=(T, din)).astype(np.float32)
    y = np.asarray(gathered_lora(jnp.asarray(x), a, b, jnp.asarray(idx), ranks, scales))
    for t in range(T):
        s = idx[t]
        want = np.zeros(dout) if s < 0 else scales[s] * (x[t] @ a[s, :ranks[s]].T) @ b[s, :ranks[s]]
        np.testing.assert_allclose(y[t], want, rtol=1e-5, atol=1e-5)
