"""Ahead-of-time warm-up: the step builder's bucket set is closed (nothing it builds falls
outside `StepBuilder.shapes()`), and after `ModelRunner.warmup` a mixed workload compiles
nothing, neither a step program nor any other jitted call (JAX's own compile events)."""
import dataclasses
import os
import random
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxserve.step_builder import StepBuilder
from scheduler import SamplingOptions, Sequence, StepPlan

sys.path.insert(0, os.path.dirname(__file__))


# -- the bucket set is closed under build ------------------------------------------------------
def _plans(rng: random.Random, page: int, max_seqs: int, max_prefill: int, max_len: int, steps: int):
    """A run of plans as the scheduler makes them: prefill chunks within the token budget
    (chunked prompts resume where they stopped), decodes of up to max_seqs running sequences,
    sequences finishing at random (holes in the decode rows)."""
    running, waiting, next_id = [], [], 0
    for _ in range(steps):
        while len(waiting) + len(running) < max_seqs and rng.random() < 0.6:
            n = rng.randint(1, max_len - 1)
            s = Sequence(seq_id=next_id, prompt_token_ids=[3] * n, max_tokens=max_len - n,
                         sampling=SamplingOptions())
            s.block_table = list(range(1, 1 + -(-n // page)))
            waiting.append(s)
            next_id += 1
        if waiting and rng.random() < 0.5:
            budget, seqs, chunks, starts = max_prefill, [], [], []
            for s in list(waiting):
                if budget == 0:
                    break
                k = min(s.num_prompt_tokens - s.num_computed_tokens, budget)
                seqs.append(s), chunks.append(k), starts.append(s.num_computed_tokens)
                budget -= k
            yield StepPlan(is_prefill=True, seqs=seqs, num_new_tokens=chunks, start_positions=starts)
            for s, k in zip(seqs, chunks):
                s.num_computed_tokens += k
                if s.num_computed_tokens == s.num_prompt_tokens:
                    waiting.remove(s)
                    running.append(s)
        elif running:
            yield StepPlan(is_prefill=False, seqs=list(running), num_new_tokens=[1] * len(running),
                           start_positions=[s.num_tokens - 1 for s in running])
            for s in list(running):
                s.output_token_ids.append(5)
                if s.num_tokens > len(s.block_table) * page:
                    s.block_table.append(len(s.block_table) + 1)
                s.num_computed_tokens = s.num_tokens - 1
                if s.num_tokens >= s.num_prompt_tokens + s.max_tokens or rng.random() < 0.1:
                    running.remove(s)


@settings(max_examples=60)
@given(seed=st.integers(0, 2**31), page=st.sampled_from([1, 4, 16]),
       max_seqs=st.integers(1, 40), max_prefill=st.integers(1, 300), max_len=st.integers(2, 700),
       min_rows=st.sampled_from([1, 2]), bucket_pages=st.sampled_from([(True, True), (False, True),
                                                                      (False, False)]))
def test_builder_never_leaves_its_bucket_set(seed, page, max_seqs, max_prefill, max_len, min_rows,
                                             bucket_pages):
    builder = StepBuilder(page_size=page, max_num_seqs=max_seqs, max_prefill_tokens=max_prefill,
                          max_model_len=max_len, min_decode_rows=min_rows, bucket_pages=bucket_pages)
    shapes = builder.shapes()
    assert len(set(shapes)) == len(shapes)
    allowed = set(shapes)
    for plan in _plans(random.Random(seed), page, max_seqs, max_prefill, max_len, steps=40):
        for built in builder.build(plan):
            assert built.shape in allowed, (built.shape, plan.num_new_tokens)
            if built.is_prefill:   # a prefill call stays within the step's token slots
                assert built.tokens.size <= builder.prefill_slots or built.tokens.shape[0] == 1


def test_bucket_set_size_for_the_documented_configs():
    """The counts docs/architecture.md quotes (same limits, page size 16)."""
    counts = {}
    for seqs, m, ln in [(64, 512, 2048), (256, 512, 8192)]:
        for bp in [(True, True), (False, True), (False, False)]:
            b = StepBuilder(page_size=16, max_num_seqs=seqs, max_prefill_tokens=m,
                            max_model_len=ln, bucket_pages=bp)
            shapes = b.shapes()
            counts[seqs, bp] = (sum(s[0] == "decode" for s in shapes),
                                sum(s[0] == "prefill" for s in shapes))
    assert counts[64, (True, True)] == (77, 448)
    assert counts[64, (False, True)] == (7, 448)
    assert counts[64, (False, False)] == (7, 52)
    assert counts[256, (False, False)] == (9, 52)
    assert counts[256, (True, True)] == (117, 552)


def test_lora_buckets_cover_every_adapter_mix():
    """A step's (rank bucket, module set) is one of lora_buckets, whatever its adapters."""
    from jaxserve.config import ModelConfig
    from jaxserve.lora.adapter import MODULES, LoraAdapter, LoraWeights, module_dims
    from jaxserve.lora.pool import PageLayout
    from jaxserve.lora.slots import build_slots, lora_buckets
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8)
    layout = PageLayout(cfg, 4, 32)

    class Store:
        def __init__(self):
            self.layout, self.adapters = layout, {}

        def get(self, name):
            return self.adapters[name]

    rng = random.Random(0)
    store, allowed = Store(), set(lora_buckets(32, MODULES))
    for i in range(30):
        mods = rng.sample(MODULES, rng.randint(1, len(MODULES)))
        r = rng.randint(1, 32)
        a = {m: np.zeros((2, r, module_dims(cfg, m)[0]), np.float32) for m in mods}
        b = {m: np.zeros((2, r, module_dims(cfg, m)[1]), np.float32) for m in mods}
        ranks = np.array([[r if m in mods else 0 for m in MODULES]] * 2, np.int32)
        store.adapters[f"a{i}"] = LoraAdapter(f"a{i}", LoraWeights(a, b, ranks, ranks * 1.0), {})
    for _ in range(50):
        names = rng.sample(sorted(store.adapters), rng.randint(1, 4))
        seqs = [Sequence(seq_id=j, prompt_token_ids=[1], max_tokens=4, sampling=SamplingOptions(),
                         adapter=n) for j, n in enumerate(names)]
        pages = {n: list(range(1, 1 + layout.num_pages(store.get(n)))) for n in names}
        plan = StepPlan(is_prefill=False, seqs=seqs, num_new_tokens=[1] * len(seqs),
                        start_positions=[0] * len(seqs), adapter_pages=pages)
        slots = build_slots(store, {}, MODULES, plan, 4, 1, list(range(len(seqs))))
        assert (slots.max_rank, slots.modules) in allowed
        assert slots.max_rank >= max(store.get(n).max_rank for n in names)


# -- nothing compiles after warm-up ------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_engine(tmp_path_factory):
    from lora_helpers import make_adapter, make_base
    root = tmp_path_factory.mktemp("warmup")
    base = make_base(str(root / "base"), seed=3)
    make_adapter(base, str(root / "qv4"), seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    make_adapter(base, str(root / "all8"), seed=2, r=8, lora_alpha=16, target_modules="all-linear")
    from jaxserve.engine import EngineConfig, LLMEngine
    # Small limits keep the bucket set small: 4 rows, 32-token prefills, 2 pages a sequence.
    # The pool (21 usable pages; a rank-8 all-linear adapter takes 17) forces adapter swaps
    # and preemption.
    engine = LLMEngine(EngineConfig(model=str(root / "base"), page_size=16, num_pages=22,
                                    max_num_seqs=4, max_prefill_tokens=32, max_model_len=32,
                                    max_lora_rank=8))
    engine.add_lora("qv4", str(root / "qv4"))
    engine.add_lora("all8", str(root / "all8"))
    return engine


class CompileEvents:
    """Counts JAX's compile-path events (tracing, lowering, XLA compiles or persistent-cache
    reads) while installed: any jitted call or eager op meeting a new shape fires them."""

    def __init__(self):
        self.events = []

    def __call__(self, event, duration, **kw):
        if event.startswith("/jax/core/compile"):
            self.events.append((event, kw.get("fun_name")))

    def __enter__(self):
        import jax.monitoring
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        import jax.monitoring
        jax.monitoring.unregister_event_duration_listener(self)


def _workload(engine):
    from jaxserve.sampling_params import SamplingParams
    rng = random.Random(7)
    adapters = [None, "qv4", "all8", None, "qv4"]
    for i in range(14):
        n = rng.choice([1, 3, 9, 17, 20, 24, 30])            # 20 + 20 > 32: chunked prefill
        prompt = [rng.randrange(3, 250) for _ in range(n)]
        sp = SamplingParams(max_tokens=min(32 - n, rng.randint(1, 12)), ignore_eos=True,
                            temperature=rng.choice([0.0, 0.8]), top_k=rng.choice([0, 5]),
                            top_p=rng.choice([1.0, 0.9]), logprobs=rng.random() < 0.3, seed=i)
        engine.add_request(f"w{i}", prompt, sp, adapter=adapters[i % len(adapters)])
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    return steps


def test_nothing_compiles_after_warmup(lora_engine, monkeypatch):
    engine = lora_engine
    runner = engine.runner
    # What is checked here is that the bucket set is closed. Programs the runner drops when
    # the process nears vm.max_map_count (and rebuilds: test_engine_batching checks that) depend
    # on what else this process compiled, so that budget is lifted for this test.
    import jaxserve.runner as runner_mod
    monkeypatch.setattr(runner_mod, "_map_budget", lambda: None)
    programs, _ = runner.warmup(lora=True)
    assert programs == len(runner.builder.shapes(lora=True))
    compiled0 = len(runner._compiled) + runner.num_programs_dropped
    met, build = [], runner.builder.build
    runner.builder.build = lambda plan: [met.append(b.shape) or b for b in build(plan)]
    try:
        with CompileEvents() as events:
            _workload(engine)           # overlapped, mixed steps (the defaults)
            # and the synchronous prefill-first loop, which preempts in this pool
            engine.scheduler.config = dataclasses.replace(engine.scheduler.config,
                                                          mixed_steps=False)
            engine.overlap = False
            _workload(engine)
    finally:
        del runner.builder.build
    assert len(runner._compiled) + runner.num_programs_dropped == compiled0, "step programs compiled"
    assert events.events == [], events.events
    # the workload met what it is meant to: base and adapter steps (both module sets), chunked
    # prefills, several batch sizes, adapter swaps in a small pool
    kinds = {(s[0], s[5] if len(s) > 4 else None) for s in met}
    assert {k for k, _ in kinds} == {"decode", "prefill"} and len({m for _, m in kinds}) == 3
    assert {s[1] for s in met if s[0] == "decode"} >= {1, 2, 4}
    assert engine.scheduler.adapters.num_evictions > 0 and engine.num_preemptions_total > 0
