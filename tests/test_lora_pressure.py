"""More distinct adapters than fit in the pool at once: swapping, pinning, runtime add/remove."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from lora_helpers import make_adapter, make_base, prompts, torch_greedy  # noqa: E402

NUM_TOKENS = 16
NUM_ADAPTERS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_pressure")
    base = make_base(str(root / "base"), seed=5)
    models = {f"a{i}": make_adapter(base, str(root / f"a{i}"), seed=100 + i, r=8, lora_alpha=16,
                                    target_modules="all-linear") for i in range(NUM_ADAPTERS)}
    from jaxserve.engine import EngineConfig, LLMEngine
    # 74 usable pages: a rank-8 all-linear adapter takes 29, so two adapters plus ~4 requests'
    # KV fit, three adapters never do.
    engine = LLMEngine(EngineConfig(model=str(root / "base"), dtype="float32", page_size=8, num_pages=75,
                                    max_num_seqs=4, max_prefill_tokens=32, max_model_len=48,
                                    max_loras=4, max_lora_rank=8))
    for name in models:
        engine.add_lora(name, str(root / name))
    return root, base, models, engine


@pytest.mark.slow
def test_swap_under_pressure_all_correct_and_nothing_leaks(setup):
    _, base, models, engine = setup
    from jaxserve.sampling_params import SamplingParams
    assert engine.loras.pages_needed("a0") == 29
    names = [f"a{i % NUM_ADAPTERS}" for i in range(10)] + [None, None]
    ps = prompts(len(names), seed=11, lo=4, hi=12)
    sp = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
    for i, (p, a) in enumerate(zip(ps, names)):
        engine.add_request(f"p{i}", p, sp, adapter=a)
    cache = engine.scheduler.adapters
    alloc = engine.scheduler.allocator
    out, max_resident = {}, 0
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = o.token_ids
        max_resident = max(max_resident, len(cache.resident))
        # Pinned adapters are resident; pages are KV + adapters, never more than the pool.
        assert all(cache.is_resident(s.adapter) for s in engine.scheduler.running if s.adapter)
        kv = sum(len(s.block_table) for s in engine.scheduler.running)
        assert kv + cache.num_pages_held == alloc.num_used
    assert max_resident <= 2 and cache.num_evictions >= NUM_ADAPTERS - 2
    for i, (p, a) in enumerate(zip(ps, names)):
        ref, _ = torch_greedy(models[a] if a else base, p, NUM_TOKENS)
        assert out[f"p{i}"] == ref, (i, a)
    # Nothing pinned; only cached adapters hold pages; removing them frees the whole pool.
    assert not cache._refs and alloc.num_used == cache.num_pages_held
    for name in list(engine.list_loras()):
        engine.remove_lora(name)
    assert alloc.num_used == 0 and alloc.num_free == alloc.num_usable
    assert engine.list_loras() == []
    for name in models:   # re-register for the next test
        engine.add_lora(name, str(setup[0] / name))


def test_add_remove_while_running(setup):
    root, base, models, engine = setup
    from jaxserve.sampling_params import SamplingParams
    sp = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
    p = prompts(2, seed=21, lo=4, hi=10)
    engine.add_request("run-a1", p[0], sp, adapter="a1")
    engine.step()
    with pytest.raises(ValueError, match="in use"):
        engine.remove_lora("a1")
    engine.remove_lora("a2")                       # unused: fine while others run
    with pytest.raises(ValueError, match="unknown adapter"):
        engine.add_request("run-a2", p[1], sp, adapter="a2")
    engine.add_lora("late", str(root / "a3"))      # added mid-run, used at once
    engine.add_request("run-late", p[1], sp, adapter="late")
    out = {}
    while engine.has_unfinished():
        out.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    assert out["run-a1"] == torch_greedy(models["a1"], p[0], NUM_TOKENS)[0]
    assert out["run-late"] == torch_greedy(models["a3"], p[1], NUM_TOKENS)[0]
    engine.remove_lora("a1")                       # finished now: removal allowed
    assert "a1" not in engine.list_loras() and not engine.scheduler.adapters.is_resident("a1")



def test_step_shape_does_not_depend_on_distinct_adapters(setup):
    """One slot per batch row: a batch mixing 3 adapters and the base model builds the same
    program inputs (shapes, static fields) as a batch using one adapter, so the number of
    distinct adapters never selects a different (or more costly) compiled step."""
    from types import SimpleNamespace

    import jax
    root, engine = setup[0], setup[3]
    for name in ("a0", "a1", "a2"):
        if name not in engine.list_loras():
            engine.add_lora(name, str(root / name))
    n = engine.loras.pages_needed("a0")

    def plan(names):
        distinct = [a for a in dict.fromkeys(names) if a]
        pages = {a: list(range(1 + i * n, 1 + (i + 1) * n)) for i, a in enumerate(distinct)}
        return SimpleNamespace(adapter_pages=pages, seqs=[SimpleNamespace(adapter=a) for a in names],
                               num_new_tokens=[1] * len(names))

    from jaxserve.lora.pool import LoraBatch
    s1 = engine.runner.lora.slots(plan(["a0"] * 4), 4, 1, [0, 1, 2, 3])
    s2 = engine.runner.lora.slots(plan(["a0", "a1", "a2", None]), 4, 1, [0, 1, 2, 3])
    (idx1, one), (idx2, mixed) = [(s.idx, LoraBatch.from_slots(s)) for s in (s1, s2)]
    shapes = lambda b: jax.tree.map(lambda x: x.shape, b)  # noqa: E731
    assert shapes(one) == shapes(mixed)
    assert (one.modules, one.max_rank) == (mixed.modules, mixed.max_rank) == (one.modules, 8)
    assert idx1.tolist() == [0, 1, 2, 3] and idx2.tolist() == [0, 1, 2, -1]
    assert (mixed.ranks[:, :, 3] == 0).all() and (mixed.ranks[:, :, :3] == 8).all()
    assert mixed.pages[0][1, 0] == 1 + n and (mixed.pages[0][3] == 0).all()


def test_decode_regathers_only_rows_whose_adapter_changed(setup):
    """Decode keeps each sequence in its batch row and re-gathers adapter weights only for rows
    whose occupant changed; outputs still equal PEFT's (a stale row would differ)."""
    root, base, models, engine = setup
    from jaxserve.sampling_params import SamplingParams
    for name in ("a0", "a1"):
        if name not in engine.list_loras():
            engine.add_lora(name, str(root / name))
    lora = engine.runner.lora
    ps = prompts(4, seed=31, lo=4, hi=10)
    names = ["a0", "a1", "a0", None]
    lens = [NUM_TOKENS, 6, 10, NUM_TOKENS]      # rows leave at different steps
    for i, (p, a, n) in enumerate(zip(ps, names, lens)):
        engine.add_request(f"rg{i}", p, SamplingParams(max_tokens=n, temperature=0.0,
                                                        ignore_eos=True), adapter=a)
    out, decode_rows = {}, 0
    while engine.has_unfinished():
        decoding = not engine.scheduler.num_waiting and not any(
            s.is_prefilling for s in engine.scheduler.running)
        before = lora.num_rows_gathered
        out.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
        if decoding:
            decode_rows += lora.num_rows_gathered - before
    # The first decode step gathers its 4 rows; later steps only rows that changed (none here:
    # rows that finish become base rows, the others keep their adapter), except once when two
    # sequences are left in rows {0, 3}: compacted into a batch of 2, whose 2 rows are gathered.
    # Gathering every row of every decode step would be ~50 rows.
    assert decode_rows <= 4 + 2
    for i, (p, a, n) in enumerate(zip(ps, names, lens)):
        assert out[f"rg{i}"] == torch_greedy(models[a] if a else base, p, n)[0], (i, a)


def test_bf16_cached_slot_weights_update_changed_rows_exactly(setup):
    """bf16 on CPU: the cached slot weights are kept as the pool's uint16 bits (XLA:CPU writes
    rows into a bf16 array out of place), the rows whose adapter changed are re-gathered into
    them, and the result is exactly a fresh gather of the new batch."""
    import jax
    import numpy as np
    from types import SimpleNamespace
    from jaxserve.engine import EngineConfig, LLMEngine
    from jaxserve.lora.pool import LoraBatch
    root, _, _, _ = setup
    engine = LLMEngine(EngineConfig(model=str(root / "base"), dtype="bfloat16", page_size=8,
                                    num_pages=120, max_num_seqs=4, max_prefill_tokens=32,
                                    max_model_len=48, max_loras=4, max_lora_rank=8))
    names = ("a0", "a1", "a2")
    for name in names:
        engine.add_lora(name, str(root / name))
    rt, n = engine.runner.lora, engine.loras.pages_needed("a0")
    pages = {a: list(range(1 + i * n, 1 + (i + 1) * n)) for i, a in enumerate(names)}
    kv = rt.write(engine.runner.kv, rt.stage(list(pages.items())))

    def batch(row_adapters):
        plan = SimpleNamespace(adapter_pages={a: pages[a] for a in set(row_adapters) if a},
                               seqs=[SimpleNamespace(adapter=a) for a in row_adapters],
                               num_new_tokens=[1] * len(row_adapters))
        slots = rt.slots(plan, 4, 1, [0, 1, 2, 3])
        return LoraBatch.from_slots(slots), slots.row_keys

    rt.slot_weights(kv, *batch(["a0", "a1", "a0", None]), cache=True)
    before = rt.num_rows_gathered
    new, keys = batch(["a2", "a1", "a0", "a1"])      # rows 0 and 3 change
    cached = rt.slot_weights(kv, new, keys, cache=True)
    assert rt.num_rows_gathered - before == 2
    fresh = rt._gather(kv, new)
    stored = engine.runner.kv.k.dtype
    for c, f in zip(jax.tree.leaves(cached), jax.tree.leaves(fresh)):
        assert c.dtype == f.dtype == stored
        np.testing.assert_array_equal(np.asarray(c), np.asarray(f))
