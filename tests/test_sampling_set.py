"""The full sampling set (jaxserve/sampling.py): each parameter checked on logits against a numpy
reference of the processed distribution, the step builder's arrays (persistent decode rows, bad
words' pairs, bans spilled into the mask), the engine on a tiny model (greedy under a bias and
penalties against HF logits + the reference, min_tokens, allowed_token_ids, bad words, rows of a
batch independent, overlapped = synchronous, the device's penalty counts), and the server (the
fields reach the engine, 400s naming them, top-logprob response shapes)."""
from __future__ import annotations

import os
import random
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.sampling import NON_FINITE, SamplingInput, _process, sample, unpack_bits
from jaxserve.sampling_params import (MAX_BANS, MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS, PROMPT_BIT,
                                      SamplingParams)
from jaxserve.step_builder import StepBuilder, pack_mask
from scheduler import SamplingOptions, Sequence, StepPlan

sys.path.insert(0, os.path.dirname(__file__))

_sample = jax.jit(sample)
_proc = jax.jit(_process)
N = 4000   # draws per distribution check: a probability is estimated to within ~0.024


# ------------------------------------------------------------------ the numpy reference
def ref_process(x, row: dict) -> np.ndarray:
    """vLLM's order on one row of logits: mask, bans, bias, repetition, frequency, presence."""
    x = np.asarray(x, np.float64).copy()
    V = len(x)
    if row.get("allowed") is not None:
        keep = np.zeros(V, bool)
        keep[list(row["allowed"])] = True
        x[~keep] = -np.inf
    for trigger, tok in row.get("bans", ()):
        if trigger < 0 or trigger == row.get("last"):
            x[tok] = -np.inf
    for tok, b in row.get("bias", {}).items():
        x[tok] += b
    counts = row.get("counts")
    if counts is not None:
        seen = counts > 0
        if row.get("prompt") is not None:
            seen_any = seen.copy()
            seen_any[list(row["prompt"])] = True
        else:
            seen_any = seen
        rep = np.where(seen_any, row.get("repetition", 1.0), 1.0)
        x = np.where(x > 0, x / rep, x * rep)
        x = x - row.get("frequency", 0.0) * counts - row.get("presence", 0.0) * seen
    return x


def batch_input(rows: list[dict], V: int, S: int = 4, **base) -> SamplingInput:
    """A SamplingInput with every field, from per-row dicts as ref_process reads them."""
    B, W = len(rows), -(-V // 32)
    counts = np.zeros((S, V), np.int32)
    f = lambda k, d: np.array([r.get(k, d) for r in rows], np.float32)   # noqa: E731
    slots = np.full(B, -1, np.int32)
    bias_ids = np.full((B, MAX_LOGIT_BIAS), -1, np.int32)
    bias_vals = np.zeros((B, MAX_LOGIT_BIAS), np.float32)
    ban_ids = np.full((B, MAX_BANS), -1, np.int32)
    ban_if = np.full((B, MAX_BANS), -1, np.int32)
    allowed = np.full((B, W), 0xFFFFFFFF, np.uint32)
    for r, row in enumerate(rows):
        if row.get("counts") is not None:
            slots[r] = row["slot"]
            counts[row["slot"]] = row["counts"]
            counts[row["slot"], sorted(row.get("prompt") or ())] |= PROMPT_BIT
        for j, (t, b) in enumerate(row.get("bias", {}).items()):
            bias_ids[r, j], bias_vals[r, j] = t, b
        for j, (c, t) in enumerate(row.get("bans", ())):
            ban_if[r, j], ban_ids[r, j] = c, t
        if row.get("allowed") is not None:
            allowed[r] = pack_mask(sorted(row["allowed"]), V)
    kw = dict(temperature=np.zeros(B, np.float32), top_k=np.zeros(B, np.int32),
              top_p=np.ones(B, np.float32), seeds=np.arange(B, dtype=np.uint32),
              counters=np.zeros(B, np.int32), logprobs=np.bool_(True))
    kw.update(base)
    return SamplingInput(
        **kw, top_logprobs=np.bool_(False), min_p=f("min_p", 0.0),
        presence=f("presence", 0.0), frequency=f("frequency", 0.0),
        repetition=f("repetition", 1.0), pen_slots=slots, counts=counts,
        bias_ids=bias_ids, bias_vals=bias_vals, ban_ids=ban_ids, ban_if=ban_if,
        last_tokens=np.array([[r.get("last", 0)] for r in rows], np.int32), allowed=allowed,
        use_allowed=np.bool_(any(r.get("allowed") is not None for r in rows)))


def _rows(rng, V):
    counts = lambda: rng.integers(0, 3, V) * (rng.random(V) < 0.1)   # noqa: E731
    return [
        {},                                                     # no feature: unchanged
        dict(slot=2, counts=counts(), prompt={1, 2, 3, 250}, presence=0.7, frequency=0.4,
             repetition=1.6),
        dict(slot=0, counts=counts(), prompt={4, 5}, repetition=0.5),
        dict(bias={5: 50.0, 17: -30.0, V - 1: 2.5}),
        dict(bans=[(-1, 7), (-1, 8), (33, 9), (34, 10)], last=33),
        dict(allowed={3, 44, 250}, bias={44: 1.5}, slot=1, counts=counts(), presence=-2.0,
             frequency=2.0),
    ]


# ------------------------------------------------------------------ on logits
def test_processing_matches_the_reference_and_greedy_takes_its_argmax():
    rng = np.random.default_rng()
    V = 300                              # not a multiple of 32: a partial last mask word
    rows = _rows(rng, V)
    logits = rng.normal(0, 3, (len(rows), V)).astype(np.float32)
    s = batch_input(rows, V)
    got = np.asarray(_proc(jnp.asarray(logits), s))
    for r, row in enumerate(rows):
        want = ref_process(logits[r], row)
        np.testing.assert_array_equal(np.isinf(got[r]), np.isinf(want), f"row {r}")
        fin = np.isfinite(want)
        np.testing.assert_allclose(got[r][fin], want[fin], rtol=1e-5, atol=1e-4, err_msg=f"row {r}")
    tokens, (lps, _, _) = _sample(jnp.asarray(logits), s)
    want_tok = [int(np.argmax(ref_process(logits[r], row))) for r, row in enumerate(rows)]
    assert np.asarray(tokens).tolist() == want_tok
    # the log-probs are the model's own (before any processing)
    x = logits.astype(np.float64)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    np.testing.assert_allclose(np.asarray(lps), x[np.arange(len(rows)), want_tok] - lse, atol=1e-4)


def _draws(row_logits, row: dict, temperature: float, seed: int, **extra):
    """N draws of one row (N counters), each under the row's features."""
    V = len(row_logits)
    rows = [row] * N
    s = batch_input(rows, V, temperature=np.full(N, temperature, np.float32),
                    seeds=np.full(N, seed, np.uint32), counters=np.arange(N, dtype=np.int32),
                    top_k=np.zeros(N, np.int32), top_p=np.ones(N, np.float32),
                    logprobs=np.bool_(False))
    for k, v in extra.items():
        setattr(s, k, v)
    logits = jnp.broadcast_to(jnp.asarray(row_logits, jnp.float32), (N, V))
    return np.bincount(np.asarray(_sample(logits, s)[0]), minlength=V) / N


def _softmax(x):
    e = np.exp(x - x[np.isfinite(x)].max())
    return e / e.sum()


def test_penalised_and_biased_sampling_draws_from_the_processed_distribution():
    rng = np.random.default_rng()
    V = 40
    logits = rng.normal(0, 1.5, V)
    counts = np.zeros(V, np.int64)
    counts[[0, 1, 2, 3]] = [1, 2, 4, 1]
    order = np.argsort(-logits)[:6]
    row = dict(slot=0, counts=counts, prompt={int(order[0]), int(order[1])}, presence=0.5,
               frequency=0.3, repetition=1.5, bias={int(order[5]): 2.0},
               bans=[(-1, int(order[2]))])
    got = _draws(logits, row, 0.8, seed=int(rng.integers(2**31)))
    want = _softmax(ref_process(logits, row) / 0.8)
    assert got[int(order[2])] == 0
    assert np.abs(got - want).max() < 0.03


def test_min_p_drops_tokens_under_its_share_of_the_top_probability():
    rng = np.random.default_rng()
    V = 30
    logits = rng.normal(0, 2, V)
    T, min_p = 0.7, 0.15
    got = _draws(logits, {}, T, seed=int(rng.integers(2**31)),
                 min_p=np.full(N, min_p, np.float32))
    p = _softmax(logits / T)
    keep = p >= min_p * p.max()
    want = np.where(keep, p, 0) / p[keep].sum()
    assert got[~keep].sum() == 0 and keep.sum() < V
    assert np.abs(got - want).max() < 0.03


def test_a_row_allowing_no_token_samples_non_finite_alone():
    rng = np.random.default_rng()
    V = 64
    rows = [dict(allowed=set()), dict(allowed={5}), {}]
    s = batch_input(rows, V)
    s.allowed[0] = 0
    logits = rng.normal(0, 1, (3, V)).astype(np.float32)
    toks = np.asarray(_sample(jnp.asarray(logits), s)[0])
    assert toks.tolist() == [NON_FINITE, 5, int(np.argmax(logits[2]))]
    s.temperature = np.ones(3, np.float32)          # sampled rows too
    toks = np.asarray(_sample(jnp.asarray(logits), s)[0])
    assert toks[0] == NON_FINITE and toks[1] == 5 and 0 <= toks[2] < V


def test_top_logprobs_are_the_models_most_likely_tokens():
    rng = np.random.default_rng()
    B, V = 4, 5000           # > 20 blocks of 128: the two-level top-k
    logits = rng.normal(0, 2, (B, V)).astype(np.float32)
    s = batch_input([{}] * B, V, temperature=np.array([0, 0.9, 0, 1.0], np.float32))
    s.top_logprobs = np.bool_(True)
    toks, (lp, ids, tlp) = _sample(jnp.asarray(logits), s)
    x = logits.astype(np.float64)
    logp = x - (np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
                + x.max(-1, keepdims=True))
    want = np.argsort(-logp, axis=-1)[:, :MAX_TOP_LOGPROBS]
    np.testing.assert_array_equal(np.asarray(ids), want)
    np.testing.assert_allclose(np.asarray(tlp), np.take_along_axis(logp, want, -1), atol=1e-4)
    s.top_logprobs = np.bool_(False)                # off: same tokens, no work
    toks2, (_, ids2, _) = _sample(jnp.asarray(logits), s)
    assert np.asarray(toks).tolist() == np.asarray(toks2).tolist()
    assert not np.asarray(ids2).any()


def test_two_level_top_k_is_lax_top_k():
    """The k largest of rows whose largest values crowd one block, spread over blocks, sit in
    the padded last block, or tie (values; ids where there are no ties)."""
    from jaxserve.sampling import _top_k_blocks
    rng = np.random.default_rng()
    for V in (49152, 5001, 2600):
        x = rng.standard_normal((5, V)).astype(np.float32)
        x[0, 256:276] += 20.0                        # all in one block
        x[1, rng.choice(V, 20, replace=False)] += 20.0
        x[2, V - 15:] += 20.0                        # the partial last block
        x[3] = np.round(x[3])                        # ties
        vals, ids = _top_k_blocks(jnp.asarray(x), 20)
        want_vals, want_ids = jax.lax.top_k(jnp.asarray(x), 20)
        np.testing.assert_array_equal(np.asarray(vals), np.asarray(want_vals))
        rows = [0, 1, 2, 4]
        np.testing.assert_array_equal(np.asarray(ids)[rows], np.asarray(want_ids)[rows])
        np.testing.assert_array_equal(np.take_along_axis(x, np.asarray(ids), 1), np.asarray(vals))


def test_a_rows_token_does_not_depend_on_the_other_rows():
    rng = np.random.default_rng()
    V = 300
    rows = _rows(rng, V)
    logits = rng.normal(0, 2, (len(rows), V)).astype(np.float32)
    temps = np.array([0.8, 1.0, 0.0, 0.9, 1.2, 0.7], np.float32)
    both = _sample(jnp.asarray(logits), batch_input(rows, V, temperature=temps))[0]
    for r in range(len(rows)):
        alone = _sample(jnp.asarray(logits[r:r + 1]), batch_input(
            [rows[r]], V, temperature=temps[r:r + 1], seeds=np.array([r], np.uint32)))[0]
        assert int(alone[0]) == int(both[r]), r


def test_token_mask_packing():
    rng = np.random.default_rng()
    for V in (1, 31, 32, 33, 1000, 49152):
        ids = sorted(set(rng.integers(0, V, max(1, V // 7)).tolist()))
        words = pack_mask(ids, V)
        assert words.shape == (-(-V // 32),) and words.dtype == np.uint32
        bits = np.asarray(unpack_bits(jnp.asarray(words), V))
        assert np.nonzero(bits)[0].tolist() == ids


# ------------------------------------------------------------------ the step builder
def _seq(i, prompt, sampling, out=()):
    s = Sequence(seq_id=i, prompt_token_ids=list(prompt), max_tokens=32, sampling=sampling)
    s.output_token_ids = list(out)
    s.block_table = [1, 2, 3, 4]
    return s


def test_bad_words_pairs_min_tokens_and_spill():
    b = StepBuilder(page_size=16, max_num_seqs=4, max_prefill_tokens=32, max_model_len=64,
                    vocab_size=100)
    words = ((7,), (20, 21), (30, 31, 32))
    s = _seq(0, [1, 2, 30], SamplingOptions(bad_words=words), out=[5, 30])
    s.num_pending_tokens = 1                                   # sampled, not known yet
    plan = StepPlan(is_prefill=False, seqs=[s], num_new_tokens=[1], start_positions=[5])
    built = b.build_call(plan, [0], [0], is_prefill=False)     # its last token is pending
    assert built.from_device == [(0, 0)]
    pairs = sorted(zip(built.ban_if[0].tolist(), built.ban_ids[0].tolist()))
    # 7 always; 21 after 20 (a 2-token word: its trigger is the last token); 32 after 31
    # (the token before the last is 30, an output token)
    assert [p for p in pairs if p[1] >= 0] == [(-1, 7), (20, 21), (31, 32)]
    s.output_token_ids.append(31)                             # now known: resolved on the host
    s.num_pending_tokens = 0
    plan = StepPlan(is_prefill=False, seqs=[s], num_new_tokens=[1], start_positions=[5])
    built = b.build_call(plan, [0], [0], is_prefill=False)
    assert sorted(t for t in built.ban_ids[0].tolist() if t >= 0) == [7, 32]
    assert (built.ban_if[0] == -1).all()
    # a word's earlier tokens must be output tokens (vLLM matches the output only)
    s2 = _seq(1, [1, 2, 30, 31], SamplingOptions(bad_words=words))
    plan = StepPlan(is_prefill=True, seqs=[s2], num_new_tokens=[4], start_positions=[0])
    built = b.build_call(plan, [0], [0], is_prefill=True)
    assert sorted(t for t in built.ban_ids[0].tolist() if t >= 0) == [7]
    # min_tokens: its stop tokens banned while fewer tokens came out; more than MAX_BANS
    # unconditional bans spill into the token mask
    stops = tuple(range(10, 10 + MAX_BANS + 5))
    s3 = _seq(2, [1, 2], SamplingOptions(min_tokens=2, min_tokens_ban=stops), out=[3])
    plan = StepPlan(is_prefill=False, seqs=[s3], num_new_tokens=[1], start_positions=[2])
    built = b.build_call(plan, [0], [0], is_prefill=False)
    banned = set(built.ban_ids[0].tolist()) - {-1}
    masked = set(np.nonzero(~np.asarray(unpack_bits(jnp.asarray(built.allowed[0]), 100)))[0].tolist())
    assert banned | masked == set(stops) and len(banned) == MAX_BANS and not banned & masked
    s3.output_token_ids.append(4)                             # 2 tokens: no more bans
    plan = StepPlan(is_prefill=False, seqs=[s3], num_new_tokens=[1], start_positions=[3])
    built = b.build_call(plan, [0], [0], is_prefill=False)
    assert built.ban_ids is None and built.allowed is None


SET_ARRAYS = ("min_p", "presence", "frequency", "repetition", "temperature")


def _random_options(rng, i) -> SamplingOptions:
    kw = dict(temperature=rng.choice([0.0, 0.7]), seed=i)
    if rng.random() < 0.5:
        kw.update(presence_penalty=0.5, frequency_penalty=0.2, repetition_penalty=1.3)
    if rng.random() < 0.3:
        kw.update(logit_bias=((3, 1.0), (7, -2.0)))
    if rng.random() < 0.3:
        kw.update(min_tokens=3, min_tokens_ban=(1, 2))
    if rng.random() < 0.3:
        kw.update(bad_words=((5,), (8, 9)))
    if rng.random() < 0.2:
        kw.update(allowed_token_ids=tuple(range(10, 30)))
    if rng.random() < 0.2:
        kw.update(top_logprobs=3, min_p=0.1)
    return SamplingOptions(**kw)


def test_persistent_decode_rows_carry_the_sampling_set_as_a_fresh_build():
    """As test_step_builder's check of the kept decode arrays, with every sampling feature."""
    from scheduler import FinishReason, Scheduler, SchedulerConfig
    for seed, overlap in ((0, False), (1, True), (2, True)):
        rng = random.Random(seed)
        sched = Scheduler(SchedulerConfig(num_pages=30, page_size=4, max_num_seqs=8,
                                          max_prefill_tokens=24, max_model_len=64))
        mk = lambda: StepBuilder(page_size=4, max_num_seqs=8, max_prefill_tokens=24,  # noqa: E731
                                 max_model_len=64, vocab_size=50)
        kept, fresh = mk(), mk()
        next_id, inflight, decodes = 0, None, 0
        for _ in range(100):
            while rng.random() < 0.3:
                n = rng.randint(1, 20)
                sched.add(Sequence(seq_id=next_id, prompt_token_ids=[rng.randrange(50) for _ in range(n)],
                                   max_tokens=rng.randint(1, 64 - n),
                                   sampling=_random_options(rng, next_id)))
                next_id += 1
            plan = sched.schedule()
            for built in kept.build(plan):
                if built.is_prefill:
                    continue
                decodes += 1
                ref = fresh.build_call(plan, built.seqs, built.rows, is_prefill=False)
                for name in SET_ARRAYS:
                    np.testing.assert_array_equal(getattr(built, name), getattr(ref, name), name)
                np.testing.assert_array_equal(built.pen_slots >= 0, ref.pen_slots >= 0)
                assert built.want_top == ref.want_top
                for name in ("bias_ids", "bias_vals", "ban_ids", "ban_if", "allowed"):
                    a, r = getattr(built, name), getattr(ref, name)
                    assert (a is None) == (r is None), name
                    if a is not None:
                        np.testing.assert_array_equal(a, r, name)
            # each builder's slots: one per penalised running sequence, never shared
            for b in (kept, fresh):
                live = [s for sid, (slot, s) in b._slots.items()]
                assert len({slot for slot, _ in b._slots.values()}) == len(b._slots)
                assert all(s.sampling.uses_penalties for s in live)
                b.slot_writes.clear()
            done = [] if inflight is None and overlap else [inflight or plan]
            inflight = plan if overlap else None
            for p in done:
                toks = [rng.randrange(50) if p.samples(i) else None for i in range(len(p.seqs))]
                for s in sched.update(p, toks):
                    if s.num_output_tokens >= s.max_tokens or rng.random() < 0.05:
                        sched.finish(s, FinishReason.LENGTH)
        assert decodes > 20


# ------------------------------------------------------------------ the engine, tiny model
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from lora_helpers import make_base
    root = tmp_path_factory.mktemp("sampling_set")
    model = make_base(str(root / "base"), seed=5)
    return str(root / "base"), model


def _engine(tiny, **kw):
    from jaxserve.engine import EngineConfig, LLMEngine
    cfg = dict(model=tiny[0], dtype="float32", page_size=4, num_pages=64, max_num_seqs=8,
               max_prefill_tokens=32, max_model_len=64)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg))


@pytest.fixture(scope="module")
def eng(tiny):
    return _engine(tiny)


PROMPT = [3, 4, 5, 6, 7]


def greedy(**kw):
    return SamplingParams(**{"max_tokens": 8, "temperature": 0.0, "ignore_eos": True, **kw})


def test_greedy_with_penalties_and_bias_follows_hf_logits_under_the_reference(eng, tiny):
    """Token by token: HF's logits of the sequence so far, processed by ref_process (the
    penalties over the prompt and the tokens generated so far), argmax = the engine's token."""
    import torch
    model = tiny[1]
    params = dict(presence_penalty=0.6, frequency_penalty=0.9, repetition_penalty=1.4,
                  logit_bias={42: 3.0, 43: 2.5})
    out = eng.generate([PROMPT], greedy(**params))[0].token_ids
    ids = list(PROMPT)
    with torch.no_grad():
        for tok in out:
            x = model(torch.tensor([ids])).logits[0, -1].double().numpy()
            counts = np.bincount(ids[len(PROMPT):], minlength=len(x))
            ref = ref_process(x, dict(counts=counts, prompt=set(PROMPT), presence=0.6,
                                      frequency=0.9, repetition=1.4, bias={42: 3.0, 43: 2.5}))
            assert tok == int(np.argmax(ref)), (ids, tok)
            ids.append(tok)
    plain = eng.generate([PROMPT], greedy())[0].token_ids
    biased = eng.generate([PROMPT], greedy(logit_bias={42: 3.0, 43: 2.5}))[0].token_ids
    assert out != biased and biased != plain     # both the bias and the penalties acted


def test_logit_bias_forces_a_token(eng):
    assert eng.generate([PROMPT], greedy(logit_bias={42: 100}))[0].token_ids == [42] * 8
    out = eng.generate([PROMPT], greedy(logit_bias={42: 100}, frequency_penalty=2.0,
                                        presence_penalty=2.0))[0].token_ids
    assert out.count(42) == 8      # +100 outweighs -2 x 8 - 2


def test_min_tokens_delays_eos_and_stop_tokens(eng):
    eos = 1      # make_base's EOS
    out = eng.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0,
                                                logit_bias={eos: 100}))[0]
    assert out.token_ids == [eos] and out.finish_reason == "stop"
    out = eng.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0, min_tokens=3,
                                                logit_bias={eos: 100}))[0]
    assert len(out.token_ids) == 4 and eos not in out.token_ids[:3] and out.token_ids[3] == eos
    assert out.finish_reason == "stop"
    out = eng.generate([PROMPT], SamplingParams(max_tokens=8, temperature=1.0, seed=3, min_tokens=5,
                                                stop_token_ids=[9], logit_bias={9: 100}))[0]
    assert len(out.token_ids) == 6 and out.token_ids[5] == 9 and 9 not in out.token_ids[:5]


def test_allowed_token_ids_restrict_sampled_output(eng):
    allowed = [10, 20, 30, 77]
    outs = eng.generate([PROMPT] * 3, [SamplingParams(max_tokens=12, temperature=1.0, seed=i,
                                                      ignore_eos=True, allowed_token_ids=allowed)
                                       for i in range(3)])
    toks = [t for o in outs for t in o.token_ids]
    assert set(toks) <= set(allowed) and len(set(toks)) > 1


def test_bad_words_are_never_generated(eng):
    """(The tiny tokenizer matches its special tokens w0, w1, w2 inside words: the words here
    avoid them.)"""
    plain = eng.generate([PROMPT], greedy())[0].token_ids
    assert eng.tokenizer.hf(f"w{plain[0]}", add_special_tokens=False)["input_ids"] == plain[:1]
    out = eng.generate([PROMPT], greedy(bad_words=[f"w{plain[0]}"]))[0].token_ids
    assert out[0] != plain[0] and plain[0] not in out
    # several tokens: banned where the tokens before its last were just generated
    out = eng.generate([PROMPT], greedy(logit_bias={5: 30.0}, bad_words=["w5 w5"]))[0].token_ids
    assert out[0::2] == [5] * 4 and 5 not in out[1::2]
    out = eng.generate([PROMPT], greedy(max_tokens=9, logit_bias={5: 30.0},
                                        bad_words=["w5 w5 w5"]))[0].token_ids
    assert out[0:2] == out[3:5] == out[6:8] == [5, 5] and 5 not in out[2::3]


def test_top_logprobs_through_the_engine(eng, tiny):
    import torch
    out = eng.generate([PROMPT], greedy(logprobs=True, top_logprobs=5))[0]
    assert len(out.new_top_logprobs) == len(out.token_ids) == 8
    with torch.no_grad():
        x = torch.log_softmax(tiny[1](torch.tensor([PROMPT])).logits[0, -1].double(), -1).numpy()
    first = out.new_top_logprobs[0]
    assert [t for t, _ in first] == np.argsort(-x)[:5].tolist()
    np.testing.assert_allclose([lp for _, lp in first], np.sort(x)[::-1][:5], atol=1e-4)
    for tok, lp, top in zip(out.token_ids, out.new_logprobs, out.new_top_logprobs):
        assert top[0] == (tok, pytest.approx(lp, abs=1e-6)) and len(top) == 5
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)


MIXED = [greedy(), greedy(logit_bias={42: 5.0}), greedy(repetition_penalty=1.8, presence_penalty=1.0),
         SamplingParams(max_tokens=8, temperature=0.9, seed=11, ignore_eos=True, min_p=0.05,
                        frequency_penalty=1.5),
         SamplingParams(max_tokens=8, temperature=1.0, seed=12, ignore_eos=True,
                        allowed_token_ids=list(range(40, 80)), top_logprobs=2, logprobs=True),
         greedy(bad_words=["w5 w5", "w38"], min_tokens=4, logit_bias={5: 4.0})]


def test_rows_of_one_batch_are_independent(eng):
    together = eng.generate([PROMPT] * len(MIXED), MIXED)
    for p, out in zip(MIXED, together):
        alone = eng.generate([PROMPT], p)[0]
        assert alone.token_ids == out.token_ids
    assert len({tuple(o.token_ids) for o in together}) >= 4


def _streams(engine, requests, join_every=2):
    pending, done, step = list(requests), {}, 0
    while pending or engine.has_unfinished():
        if pending and step % join_every == 0:
            rid, prompt, params = pending.pop(0)
            engine.add_request(rid, prompt, params)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = (out.token_ids, out.finish_reason)
        step += 1
    return done


def test_overlapped_steps_equal_synchronous_ones_with_the_sampling_set(tiny):
    """Penalty counts, bad words' pairs (the last token still on the device) and min_tokens in
    the overlapped loop, with preemption in a small pool, against the synchronous loop."""
    rng = random.Random(4)
    reqs = []
    for i in range(10):
        prompt = [rng.randrange(3, 250) for _ in range(rng.randint(3, 14))]
        p = MIXED[i % len(MIXED)]
        reqs.append((f"r{i}", prompt, SamplingParams(**{**p.__dict__, "max_tokens": 14,
                                                        "seed": i})))
    runs = {}
    for name, kw in {"sync": dict(async_scheduling=False),
                     "overlap": dict(async_scheduling=True)}.items():
        e = _engine(tiny, num_pages=14, **kw)     # 13 usable pages of 4: preemption
        runs[name] = _streams(e, reqs)
        if name == "overlap":
            assert e.num_preemptions_total > 0
    assert runs["sync"] == runs["overlap"]


def test_device_counts_follow_each_penalised_sequence(tiny):
    """After every synchronous step, each penalised running sequence's slot of the device's
    table holds the counts of its output tokens and PROMPT_BIT on its prompt's tokens (slots
    move through preemption and reuse)."""
    e = _engine(tiny, num_pages=14, async_scheduling=False)
    b, runner = e.runner.builder, e.runner
    rng = random.Random(2)
    for i in range(8):
        prompt = [rng.randrange(3, 250) for _ in range(rng.randint(3, 12))]
        e.add_request(f"c{i}", prompt, SamplingParams(
            max_tokens=14, temperature=1.0, seed=i, ignore_eos=True,
            frequency_penalty=0.5 if i % 3 else 0.0, repetition_penalty=1.2 if i % 2 else 1.0))
    checked = 0
    while e.has_unfinished():
        e.step()
        table = np.asarray(runner._pen_counts)
        for seq in e.scheduler.running:
            hit = b._slots.get(seq.seq_id)
            if hit is None or not seq.output_token_ids:
                continue
            want = np.bincount(seq.output_token_ids, minlength=table.shape[1]).astype(np.int32)
            want[seq.prompt_token_ids] |= PROMPT_BIT
            np.testing.assert_array_equal(table[hit[0]], want)
            checked += 1
    assert checked > 20 and e.num_preemptions_total > 0


# ------------------------------------------------------------------ the server
@pytest.fixture(scope="module")
def fake_srv():
    """The server on the fake engine: its runner gives each request that asks for top
    logprobs the alternatives (token + 1, token + 2, ...) with log-probs LOGPROB - 1, - 2, ..."""
    from fake_runner import LOGPROB, fake_engine
    from jaxserve.runner import TokenLogprobs
    from server_harness import ServerThread
    eng = fake_engine(max_num_seqs=4, num_pages=512, max_model_len=256)
    run, seen = eng.runner.run, []

    def run_with_tops(plan):
        toks, lps = run(plan)
        for i, seq in enumerate(plan.seqs):
            n = seq.sampling.top_logprobs
            if toks[i] is not None and n:
                lps[i] = TokenLogprobs(lps[i], [(toks[i] + k, LOGPROB - k) for k in range(n)])
        return toks, lps
    eng.runner.run = run_with_tops
    add = eng.add_request

    def spy(request_id, prompt, params, **kw):
        seen.append(params)
        return add(request_id, prompt, params, **kw)
    eng.add_request = spy
    with ServerThread(eng) as s:
        s.seen = seen
        yield s


FIELDS = {"presence_penalty": 0.5, "frequency_penalty": -1.5, "repetition_penalty": 1.7,
          "logit_bias": {"5": 10, "77": -100}, "min_p": 0.1, "min_tokens": 2,
          "bad_words": ["ab", "c"], "allowed_token_ids": [97, 98, 99],
          "stop_token_ids": [120], "include_stop_str_in_output": True}
PARSED = dict(FIELDS, logit_bias={5: 10.0, 77: -100.0}, bad_words=("ab", "c"),
              allowed_token_ids=(97, 98, 99), stop_token_ids=(120,))


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/generate"])
def test_the_sampling_fields_reach_the_engine(fake_srv, path):
    from test_server_fake import http
    body = ({"prompt": "hi"} if path == "/v1/completions" else
            {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else
            {"inputs": "hi", "parameters": {}})
    target = body["parameters"] if path == "/generate" else body
    target.update(FIELDS, max_tokens=4) if path != "/generate" else \
        target.update(FIELDS, max_new_tokens=4)
    del fake_srv.seen[:]
    st, b = http(fake_srv.url, path, body)
    assert st == 200, b
    p = fake_srv.seen[-1]
    for name, want in PARSED.items():
        assert getattr(p, name) == want, name


BAD = [({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
       ({"repetition_penalty": 0}, "repetition_penalty"), ({"min_p": 1.5}, "min_p"),
       ({"min_tokens": -1}, "min_tokens"), ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
       ({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
       ({"logit_bias": {"5": "a"}}, "logit_bias"), ({"logit_bias": [1]}, "logit_bias"),
       ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
       ({"logit_bias": {str(0x110000): 1}}, "logit_bias"),
       ({"bad_words": "x"}, "bad_words"), ({"bad_words": [""]}, "bad_words"),
       ({"bad_words": ["x"] * 33}, "bad_words"),
       ({"allowed_token_ids": [-1]}, "allowed_token_ids"), ({"allowed_token_ids": []}, "allowed_token_ids"),
       ({"allowed_token_ids": [0x110000]}, "allowed_token_ids"),
       ({"stop_token_ids": ["a"]}, "stop_token_ids"), ({"logprobs": 21}, "logprobs")]


@pytest.mark.parametrize("extra,param", BAD, ids=[f"{i}:{p}" for i, (_, p) in enumerate(BAD)])
def test_bad_sampling_values_are_400s_naming_the_field(fake_srv, extra, param):
    from test_server_fake import http
    st, b = http(fake_srv.url, "/v1/completions", {"prompt": "hi", "max_tokens": 4, **extra})
    assert st == 400 and b["error"]["param"] == param, b


def test_chat_top_logprobs_bounds(fake_srv):
    from test_server_fake import http
    msgs = [{"role": "user", "content": "hi"}]
    for extra in ({"top_logprobs": 21, "logprobs": True}, {"top_logprobs": 2}):
        st, b = http(fake_srv.url, "/v1/chat/completions", {"messages": msgs, **extra})
        assert st == 400 and b["error"]["param"] == "top_logprobs", b


def test_top_logprobs_response_shapes(fake_srv):
    """Completions: per token {text: logprob} of the chosen token and the N alternatives (as
    vLLM fills OpenAI's legacy shape); chat: per token `top_logprobs`, N entries; streamed and
    not, the same."""
    from fake_runner import LOGPROB
    from server_harness import parse_sse
    from test_server_fake import http
    st, b = http(fake_srv.url, "/v1/completions", {"prompt": "hi", "max_tokens": 3, "logprobs": 2})
    lp = b["choices"][0]["logprobs"]
    assert st == 200 and len(lp["top_logprobs"]) == 3
    for tok, top in zip(lp["tokens"], lp["top_logprobs"]):
        nxt = chr(ord(tok) + 1)
        assert top == {tok: LOGPROB, nxt: LOGPROB - 1}
    st, b = http(fake_srv.url, "/v1/completions", {"prompt": "hi", "max_tokens": 3, "logprobs": 0})
    assert [list(d) for d in b["choices"][0]["logprobs"]["top_logprobs"]] == [
        [t] for t in b["choices"][0]["logprobs"]["tokens"]]
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "logprobs": True,
            "top_logprobs": 3}
    st, b = http(fake_srv.url, "/v1/chat/completions", body)
    content = b["choices"][0]["logprobs"]["content"]
    assert st == 200 and len(content) == 3
    for c in content:
        assert [e["logprob"] for e in c["top_logprobs"]] == [LOGPROB, LOGPROB - 1, LOGPROB - 2]
        assert c["top_logprobs"][0]["token"] == c["token"]
        assert c["top_logprobs"][1]["bytes"] == list(chr(ord(c["token"]) + 1).encode())
    st, raw = http(fake_srv.url, "/v1/chat/completions", {**body, "stream": True})
    events = parse_sse(raw)
    streamed = [c for e in events if e != "[DONE]" for ch in e["choices"]
                if ch.get("logprobs") for c in ch["logprobs"]["content"]]
    assert streamed == content
