"""Token sampling on device, per request: every processing step of the full sampling set,
then greedy, temperature, min-p, top-k, top-p, seeded draws.

One program serves every combination: each row carries its own parameters, each feature is
applied under a `lax.cond` on "some row of this batch uses it", so a batch without it pays a
scalar test. The order is vLLM's (v1 sampler):
  1. the token mask (`allowed`: structured output, allowed_token_ids, spilled bans), then
     the sparse bans (`ban_ids` / `ban_if`: bad words, min_tokens' stop tokens) -> -inf;
  2. logit_bias (sparse, `bias_ids` / `bias_vals`, added);
  3. penalties: repetition (prompt + output tokens: a positive logit divided by it, a negative
     one multiplied), then frequency (x count in the output) and presence (x appeared);
  4. greedy rows take the argmax of that; the others divide by the temperature, drop tokens
     under min_p x the most likely one's probability, then top-k / top-p, and draw.
Log-probabilities (the chosen token's and the top-K alternatives) are of the model's own
distribution, before any of that (vLLM's default "raw" logprobs).

Penalty state. The counts of each penalised request's output tokens live on the device, in a
table `counts` [S, V] int32 (S = the engine's max_num_seqs), each entry with PROMPT_BIT set
where the token is in the request's prompt (one gather gives both); a row reads its request's
slot (`pen_slots`, -1 = none).
The step builder gives a request a slot when it first samples and writes the slot from what the
host knows (its prompt, its output tokens so far); after each call the executor adds every
sampled token to its row's slot with one small scatter (jaxserve/runner.py `_count_put`). The
host never needs the token a step sampled to penalise the next one, so the overlapped loop (the
next step built before this one's tokens are known) penalises exactly as the synchronous one.
A slot follows the request, not the batch row, so rows may move; a request keeps it while it
runs, through preemption (its tokens stand), and a slot freed (finished, or reclaimed while its
request waits) is written whole again when next taken. Memory: S x V x 4 bytes (12.6 MB for 64
sequences at SmolLM2's 49k vocabulary), allocated once with the pool.

Bad words of several tokens need the token before the one sampled, which in the overlapped
loop is still on the device: the host lists (trigger, banned) pairs whose earlier tokens match
what it knows, and a pair bans its token where the row's last token is the trigger
(`last_tokens`, taken on the device with the input tokens). trigger -1 bans unconditionally.

Each row's random key is derived from (its seed, how many tokens it has generated), so a
request samples the same tokens alone, in any batch, and after a preemption. Every operation
is per row: a row of NaN logits changes no other row's token or log-prob.

A row whose logits are not finite (NaN or +inf anywhere, or no finite value: its max is not
finite), or whose mask and bans leave no token, samples NON_FINITE instead of a token id; the
engine finishes that request with an error (jaxserve/engine.py).

Fields left None (callers that build a SamplingInput by hand) leave their feature out of the
program; the executor always passes every field, so one program serves any mix of requests.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxserve.sampling_params import (MAX_BANS, MAX_LOGIT_BIAS,  # noqa: F401
                                      MAX_TOP_LOGPROBS, PROMPT_BIT)

NON_FINITE = -1       # the "token" of a row whose logits are not finite
MAX_CANDIDATES = 1024  # top-k / top-p look at the 1024 most likely tokens (see below)


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
    # [] bool: whether any row wants top alternatives; with a value (not None) sample()
    # returns (tokens, (logprobs, top ids [B, K], top logprobs [B, K])), K = MAX_TOP_LOGPROBS
    top_logprobs: jax.Array | None = None
    min_p: jax.Array | None = None          # [B] float32, 0 = off
    presence: jax.Array | None = None       # [B] float32 presence penalty, 0 = off
    frequency: jax.Array | None = None      # [B] float32 frequency penalty, 0 = off
    repetition: jax.Array | None = None     # [B] float32 repetition penalty, 1 = off
    pen_slots: jax.Array | None = None      # [B] int32: the row's penalty slot, -1 = none
    counts: jax.Array | None = None         # [S, V] int32: output token counts (+ PROMPT_BIT)
    bias_ids: jax.Array | None = None       # [B, MAX_LOGIT_BIAS] int32, -1 = unused
    bias_vals: jax.Array | None = None      # [B, MAX_LOGIT_BIAS] float32
    ban_ids: jax.Array | None = None        # [B, MAX_BANS] int32: token banned, -1 = unused
    ban_if: jax.Array | None = None         # [B, MAX_BANS] int32: only after this token (-1: always)
    last_tokens: jax.Array | None = None    # [B, 1] int32: each row's last token (ban_if)
    allowed: jax.Array | None = None        # [B, ceil(V/32)] uint32: bit t%32 of word t//32
    use_allowed: jax.Array | bool = False   # [] bool: any row constrained by `allowed`


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


def _top_k_blocks(x, k: int, block: int = 128):
    """lax.top_k(x, k) for rows of x [B, V], in two levels: the k blocks with the largest maxima
    hold the k largest values (a value's block has a maximum at least as large), so top_k runs
    over those k x block candidates. XLA:CPU's top_k over 32 x 49k logits took ~8 ms."""
    B, V = x.shape
    nb = -(-V // block)
    if k * block >= V:
        return jax.lax.top_k(x, k)
    xb = jnp.pad(x, ((0, 0), (0, nb * block - V)), constant_values=-jnp.inf).reshape(B, nb, block)
    _, blocks = jax.lax.top_k(xb.max(axis=-1), k)                           # [B, k]
    cand = jnp.take_along_axis(xb, blocks[:, :, None], axis=1).reshape(B, k * block)
    vals, j = jax.lax.top_k(cand, k)
    ids = jnp.take_along_axis(blocks, j // block, axis=1) * block + j % block
    return vals, ids


def unpack_bits(words, V: int):
    """[..., ceil(V/32)] uint32 bitmask -> [..., V] bool (bit t % 32 of word t // 32)."""
    bits = (words[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    return bits.reshape(*words.shape[:-1], -1)[..., :V].astype(bool)


def _scatter_rows(x, ids, vals, add: bool):
    """x [B, V] with vals written (or added) at (row, ids[row, j]); ids < 0 are skipped."""
    B, V = x.shape
    ids = jnp.where(ids >= 0, ids, V)                      # out of range: dropped
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], ids.shape)
    ref = x.at[rows, ids]
    return ref.add(vals, mode="drop") if add else ref.set(vals, mode="drop")


def _penalize(x, s: SamplingInput):
    """Repetition over the prompt and output tokens, then frequency and presence over the
    output tokens (vLLM's apply_penalties; OpenAI's definition of the last two)."""
    entry = jnp.where((s.pen_slots >= 0)[:, None], s.counts[jnp.maximum(s.pen_slots, 0)], 0)
    counts = entry & (PROMPT_BIT - 1)
    seen = counts > 0
    scale = jnp.where(seen | (entry >= PROMPT_BIT),
                      jnp.where(x > 0, (1.0 / s.repetition)[:, None], s.repetition[:, None]), 1.0)
    return x * scale - (s.frequency[:, None] * counts.astype(jnp.float32)
                        + jnp.where(seen, s.presence[:, None], 0.0))


def _process(x, s: SamplingInput):
    """Steps 1-3 of the module docstring, each under its own cond."""
    B, V = x.shape
    if s.allowed is not None:
        x = jax.lax.cond(jnp.asarray(s.use_allowed, bool),
                         lambda x: jnp.where(unpack_bits(s.allowed, V), x, -jnp.inf),
                         lambda x: x, x)
    if s.ban_ids is not None:
        def ban(x):
            hit = (s.ban_if < 0) | (s.ban_if == s.last_tokens.reshape(B, 1))
            ids = jnp.where(hit, s.ban_ids, -1)
            return _scatter_rows(x, ids, jnp.full(ids.shape, -jnp.inf, x.dtype), add=False)
        x = jax.lax.cond(jnp.any(s.ban_ids >= 0), ban, lambda x: x, x)
    if s.bias_ids is not None:
        x = jax.lax.cond(jnp.any(s.bias_ids >= 0),
                         lambda x: _scatter_rows(x, s.bias_ids, s.bias_vals, add=True),
                         lambda x: x, x)
    if s.pen_slots is not None:
        x = jax.lax.cond(jnp.any(s.pen_slots >= 0), lambda x: _penalize(x, s), lambda x: x, x)
    return x


def _uses_processing(s: SamplingInput):
    """[] bool: whether any step of _process applies to some row (None: none can)."""
    flags = []
    if s.allowed is not None:
        flags.append(jnp.asarray(s.use_allowed, bool))
    if s.ban_ids is not None:
        flags.append(jnp.any(s.ban_ids >= 0))
    if s.bias_ids is not None:
        flags.append(jnp.any(s.bias_ids >= 0))
    if s.pen_slots is not None:
        flags.append(jnp.any(s.pen_slots >= 0))
    if not flags:
        return None
    return jnp.any(jnp.stack(flags))


def _draw(seeds, counters, logits):
    """One categorical draw per row, keyed by (seed, counter) so rows are batch-independent."""
    def draw(seed, counter, row):
        return jax.random.categorical(jax.random.fold_in(jax.random.key(seed), counter), row)
    return jax.vmap(draw)(seeds, counters, logits).astype(jnp.int32)


def _filtered_sample(logits, row_max, greedy, s: SamplingInput):
    """Temperature, min-p, then top-k and top-p, then a draw (greedy rows: `greedy`).

    A full-vocabulary sort costs ~300 ms for 32 rows of 49k logits on a 2-core CPU; top-k and
    top-p are computed on the MAX_CANDIDATES largest logits instead (lax.top_k, ~15 ms). This is
    exact for top_k <= MAX_CANDIDATES and for nuclei within the top MAX_CANDIDATES tokens (top-p
    mass is measured against the full distribution, after min-p); a wider nucleus is cut at that
    many tokens. Rows with neither filter draw from the full vocabulary.
    """
    V = logits.shape[-1]
    C = min(V, MAX_CANDIDATES)
    temp = jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
    scaled = logits / temp
    if s.min_p is not None:
        # p(t) < min_p * p(max)  <=>  scaled(t) < scaled(max) + log(min_p)
        floor = row_max / temp + jnp.log(s.min_p)[:, None]          # -inf where min_p = 0
        scaled = jax.lax.cond(jnp.any(s.min_p > 0),
                              lambda x: jnp.where(x < floor, -jnp.inf, x), lambda x: x, scaled)
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
    return jnp.where(s.temperature > 0, sampled, greedy).astype(jnp.int32)


def _choose(x, row_max, greedy, s: SamplingInput):
    """The tokens of (processed) logits x, given their row max and argmax."""
    return jax.lax.cond(jnp.all(s.temperature == 0), lambda: greedy,
                        lambda: _filtered_sample(x, row_max, greedy, s))


def sample(logits, s: SamplingInput):
    """logits: [B, V] float32 -> (tokens [B] int32, logprobs [B] float32 of the chosen tokens
    under the model's distribution; NaN unless s.logprobs). With s.top_logprobs given, the
    second item is (logprobs [B], top ids [B, K] int32, top logprobs [B, K] float32), the K
    most likely tokens (zeros unless s.top_logprobs). A row whose logits are not finite, or
    that allows no token, gets the token NON_FINITE."""
    logits = logits.astype(jnp.float32)
    m, greedy = _row_max_argmax(logits)
    uses = _uses_processing(s)
    if uses is None:
        tokens, pm = _choose(logits, m, greedy, s), m
    else:
        # Both branches end in _choose (not one cond yielding the processed logits): a cond
        # whose branch returns its operand copies it, [B, V] floats each step.
        def processed():
            x = _process(logits, s)
            xm, xg = _row_max_argmax(x)
            return _choose(x, xm, xg, s), xm
        tokens, pm = jax.lax.cond(uses, processed, lambda: (_choose(logits, m, greedy, s), m))
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    want_lse = jnp.asarray(s.logprobs, bool)
    if s.top_logprobs is not None:
        want_lse = want_lse | jnp.asarray(s.top_logprobs, bool)
    lse = jax.lax.cond(want_lse,
                       lambda: m[:, 0] + jnp.log(jnp.sum(jnp.exp(logits - m), axis=-1)),
                       lambda: jnp.full_like(chosen, jnp.nan))
    # The row max is NaN when any logit is (XLA's max propagates NaN), +inf when one is; the
    # chosen logit is checked too (jnp.argmax picks a NaN first). The processed max is -inf
    # when the mask and bans left no token.
    ok = jnp.isfinite(m[:, 0]) & jnp.isfinite(chosen) & jnp.isfinite(pm[:, 0])
    tokens = jnp.where(ok, tokens, NON_FINITE)
    if s.top_logprobs is None:
        return tokens, chosen - lse
    K = min(MAX_TOP_LOGPROBS, logits.shape[-1])

    def top():
        vals, ids = _top_k_blocks(logits, K)
        return ids.astype(jnp.int32), vals - lse[:, None]
    top_ids, top_lps = jax.lax.cond(
        jnp.asarray(s.top_logprobs, bool), top,
        lambda: (jnp.zeros((logits.shape[0], K), jnp.int32),
                 jnp.zeros((logits.shape[0], K), jnp.float32)))
    return tokens, (chosen - lse, top_ids, top_lps)
