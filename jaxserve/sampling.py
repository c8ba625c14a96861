"""Token sampling on device, per request: greedy, temperature, top-k, top-p, seeded.

Each row's random key is derived from (its seed, how many tokens it has generated), so a
request samples the same tokens alone, in any batch, and after a preemption. Every operation
is per row: a row of NaN logits changes no other row's token or log-prob.

A row whose logits are not finite (NaN or +inf anywhere, or no finite value: its max is not
finite) samples NON_FINITE instead of a token id; the engine finishes that request with an
error (jaxserve/engine.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclass
class SamplingInput:
    temperature: jax.Array   # [B] float32, 0 = greedy
    top_k: jax.Array         # [B] int32, 0 = off
    top_p: jax.Array         # [B] float32, 1 = off
    seeds: jax.Array         # [B] uint32
    counters: jax.Array      # [B] int32: output tokens generated so far
    # [] bool: whether any row wants its log-prob. Without, the full-vocabulary logsumexp is
    # skipped (~2 ms for 32 x 49k logits on the 2-core VM) and the log-probs returned are NaN.
    logprobs: jax.Array | bool = True


NON_FINITE = -1       # the "token" of a row whose logits are not finite
MAX_CANDIDATES = 1024  # top-k / top-p look at the 1024 most likely tokens (see below)


def _row_max_argmax(x, block: int = 128):
    """(max [B, 1], first index of it [B]) per row, as jnp.argmax but in two levels: block
    maxima, the first block holding the row max, then the first index within that block.
    XLA:CPU runs jnp.argmax as a variadic (value, index) reduce that does not vectorize: 5 ms
    for 64 x 49k logits on the 2-core VM, against ~0.6 ms this way."""
    B, V = x.shape
    nb = -(-V // block)
    xb = jnp.pad(x, ((0, 0), (0, nb * block - V)), constant_values=-jnp.inf).reshape(B, nb, block)
    bmax = xb.max(axis=-1)                                            # [B, nb]
    b = jnp.argmax(bmax, axis=-1)                                     # first block with the max
    inner = jnp.take_along_axis(xb, b[:, None, None], axis=1)[:, 0]   # [B, block]
    idx = b * block + jnp.argmax(inner, axis=-1)
    return jnp.take_along_axis(bmax, b[:, None], axis=1), idx.astype(jnp.int32)


def _draw(seeds, counters, logits):
    """One categorical draw per row, keyed by (seed, counter) so rows are batch-independent."""
    def draw(seed, counter, row):
        return jax.random.categorical(jax.random.fold_in(jax.random.key(seed), counter), row)
    return jax.vmap(draw)(seeds, counters, logits).astype(jnp.int32)


def _filtered_sample(logits, s: SamplingInput):
    """Temperature, then top-k and top-p, then a draw.

    A full-vocabulary sort costs ~300 ms for 32 rows of 49k logits on a 2-core CPU; top-k and
    top-p are computed on the MAX_CANDIDATES largest logits instead (lax.top_k, ~15 ms). This is
    exact for top_k <= MAX_CANDIDATES and for nuclei within the top MAX_CANDIDATES tokens (top-p
    mass is measured against the full distribution); a wider nucleus is cut at that many tokens.
    Rows with neither filter draw from the full vocabulary.
    """
    V = logits.shape[-1]
    C = min(V, MAX_CANDIDATES)
    temp = jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
    scaled = logits / temp
    cand, cand_idx = jax.lax.top_k(scaled, C)                                  # sorted, [B, C]
    k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, C), C)
    ranks = jnp.arange(C)[None, :]
    probs = jnp.exp(cand - jax.nn.logsumexp(scaled, axis=-1, keepdims=True))   # full-vocab mass
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (ranks < k[:, None]) & (mass_before < s.top_p[:, None])
    keep = keep.at[:, 0].set(True)
    filtered = jnp.where(keep, cand, -jnp.inf)
    from_cands = jnp.take_along_axis(cand_idx, _draw(s.seeds, s.counters, filtered)[:, None], axis=-1)[:, 0]
    is_filtered = (s.top_k > 0) | (s.top_p < 1.0)
    full = jax.lax.cond(jnp.any(~is_filtered & (s.temperature > 0)),
                        lambda: _draw(s.seeds, s.counters, scaled),
                        lambda: jnp.zeros(logits.shape[:1], jnp.int32))
    sampled = jnp.where(is_filtered, from_cands, full)
    return jnp.where(s.temperature > 0, sampled, _row_max_argmax(logits)[1]).astype(jnp.int32)


def sample(logits, s: SamplingInput):
    """logits: [B, V] float32 -> (tokens [B] int32, logprobs [B] float32 of the chosen tokens
    under the unmodified distribution; NaN unless s.logprobs). A row whose logits are not
    finite gets the token NON_FINITE."""
    logits = logits.astype(jnp.float32)
    m, greedy = _row_max_argmax(logits)
    tokens = jax.lax.cond(jnp.all(s.temperature == 0), lambda: greedy,
                          lambda: _filtered_sample(logits, s))
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    lse = jax.lax.cond(jnp.asarray(s.logprobs, bool),
                       lambda: m[:, 0] + jnp.log(jnp.sum(jnp.exp(logits - m), axis=-1)),
                       lambda: jnp.full_like(chosen, jnp.nan))
    # The row max is NaN when any logit is (XLA's max propagates NaN), +inf when one is; the
    # chosen logit is checked too (jnp.argmax picks a NaN first).
    tokens = jnp.where(jnp.isfinite(m[:, 0]) & jnp.isfinite(chosen), tokens, NON_FINITE)
    return tokens, chosen - lse
