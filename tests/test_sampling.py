"""On-device sampling against exact distributions computed in numpy."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.sampling import MAX_CANDIDATES, SamplingInput, sample

_sample = jax.jit(sample)
N = 4000  # draws per check: a probability p is estimated to within ~3*sqrt(p(1-p)/N) <= 0.024


def _draws(logits_row, temperature=1.0, top_k=0, top_p=1.0, seed=0):
    """N independent draws from one row, using N different counters (as N generated tokens)."""
    logits = jnp.broadcast_to(jnp.asarray(logits_row, jnp.float32), (N, len(logits_row)))
    s = SamplingInput(temperature=jnp.full((N,), temperature, jnp.float32),
                      top_k=jnp.full((N,), top_k, jnp.int32), top_p=jnp.full((N,), top_p, jnp.float32),
                      seeds=jnp.full((N,), seed, jnp.uint32), counters=jnp.arange(N, dtype=jnp.int32))
    toks, lps = _sample(logits, s)
    return np.asarray(toks), np.asarray(lps)


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_temperature_sampling_matches_softmax():
    rng = np.random.default_rng()
    logits = rng.normal(0, 2, 50)
    toks, _ = _draws(logits, temperature=0.7, seed=int(rng.integers(2**31)))
    want = _softmax(logits / 0.7)
    got = np.bincount(toks, minlength=50) / N
    assert np.abs(got - want).max() < 0.03


def test_top_k_and_top_p_restrict_and_renormalize():
    logits = np.log(np.array([0.4, 0.3, 0.15, 0.1, 0.05]))
    toks, _ = _draws(logits, top_k=2, seed=3)
    got = np.bincount(toks, minlength=5) / N
    assert got[2:].sum() == 0 and abs(got[0] - 0.4 / 0.7) < 0.03
    toks, _ = _draws(logits, top_p=0.8, seed=4)   # nucleus {0.4, 0.3, 0.15}: mass before 3rd is 0.7
    got = np.bincount(toks, minlength=5) / N
    assert got[3:].sum() == 0 and abs(got[2] - 0.15 / 0.85) < 0.03


def test_greedy_and_logprobs_and_large_vocab():
    rng = np.random.default_rng()
    V = 3 * MAX_CANDIDATES + 7
    logits = rng.normal(0, 1, (4, V)).astype(np.float32)
    s = SamplingInput(temperature=jnp.array([0.0, 0.0, 1.0, 1.0], jnp.float32),
                      top_k=jnp.array([0, 0, 1, 0], jnp.int32), top_p=jnp.array([1.0, 0.5, 1.0, 1e-6], jnp.float32),
                      seeds=jnp.zeros((4,), jnp.uint32), counters=jnp.zeros((4,), jnp.int32))
    toks, lps = _sample(jnp.asarray(logits), s)
    toks, lps = np.asarray(toks), np.asarray(lps)
    # greedy rows, top_k=1 and a tiny top_p all give the argmax
    assert (toks == logits.argmax(-1)).all()
    ref = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    np.testing.assert_allclose(lps, ref[np.arange(4), toks], atol=1e-5)


def test_same_seed_same_counter_same_token_in_any_batch():
    rng = np.random.default_rng()
    row = rng.normal(0, 1, 300).astype(np.float32)
    other = rng.normal(0, 1, (5, 300)).astype(np.float32)
    def run(batch):
        B = len(batch)
        s = SamplingInput(temperature=jnp.ones((B,)), top_k=jnp.zeros((B,), jnp.int32),
                          top_p=jnp.full((B,), 0.9), seeds=jnp.array([7] + [1] * (B - 1), jnp.uint32),
                          counters=jnp.full((B,), 5, jnp.int32))
        return int(np.asarray(_sample(jnp.asarray(np.stack(batch)), s)[0])[0])
    assert run([row]) == run([row, *other])


def test_two_level_argmax_is_numpys_argmax():
    """Fresh random rows, with ties (first index wins), a constant row, the max in the last
    (padded) block, and vocabularies that are not a multiple of the block."""
    from jaxserve.sampling import _row_max_argmax
    rng = np.random.default_rng()
    for V in (49152, 1000, 129, 7):
        x = rng.standard_normal((6, V)).astype(np.float32)
        x[1, [3, V // 2, V - 1]] = 50.0          # tie: first index
        x[2, :] = 3.0                            # all equal: index 0
        x[3, V - 1] = 1e9                        # in the last, partial block
        x[4] = np.round(x[4])                    # many ties
        m, idx = _row_max_argmax(jnp.asarray(x))
        np.testing.assert_array_equal(np.asarray(idx), x.argmax(-1))
        np.testing.assert_array_equal(np.asarray(m)[:, 0], x.max(-1))


def test_logprobs_switch():
    """With logprobs off the same tokens come back and the log-probs are NaN (the engine only
    reports them for requests that asked); on, they are log-softmax of the chosen tokens."""
    rng = np.random.default_rng()
    B, V = 5, 1000
    logits = rng.normal(0, 3, (B, V)).astype(np.float32)
    base = dict(temperature=jnp.array([0.0, 0.0, 0.8, 1.0, 0.0], jnp.float32),
                top_k=jnp.zeros((B,), jnp.int32), top_p=jnp.ones((B,), jnp.float32),
                seeds=jnp.arange(B, dtype=jnp.uint32), counters=jnp.zeros((B,), jnp.int32))
    t_on, lp_on = _sample(jnp.asarray(logits), SamplingInput(**base, logprobs=np.bool_(True)))
    t_off, lp_off = _sample(jnp.asarray(logits), SamplingInput(**base, logprobs=np.bool_(False)))
    np.testing.assert_array_equal(np.asarray(t_on), np.asarray(t_off))
    assert np.isnan(np.asarray(lp_off)).all()
    x = logits.astype(np.float64)
    ref = x - (x.max(-1, keepdims=True) + np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1,
                                                                                   keepdims=True)))
    np.testing.assert_allclose(np.asarray(lp_on), ref[np.arange(B), np.asarray(t_on)], atol=1e-5)
