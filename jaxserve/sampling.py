"""Token sampling on device, per request: greedy, temperature, top-k, top-p, seeded.

Each row's random key is derived from (its seed, how many tokens it has generated), so a
request samples the same tokens alone, in any batch, and after a preemption.
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


def _filtered_sample(logits, s: SamplingInput):
    V = logits.shape[-1]
    temp = jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
    scaled = logits / temp
    sorted_desc = -jnp.sort(-scaled, axis=-1)                                  # [B, V]
    # top-k: keep logits >= the k-th largest.
    k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, V), V)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
    # top-p over the top-k survivors: keep the smallest prefix whose mass reaches p.
    ranks = jnp.arange(V)[None, :]
    masked_sorted = jnp.where(ranks < k[:, None], sorted_desc, -jnp.inf)
    probs = jax.nn.softmax(masked_sorted, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = (mass_before < s.top_p[:, None]) & (ranks < k[:, None])
    num_keep = jnp.maximum(keep_sorted.sum(-1), 1)
    pth = jnp.take_along_axis(sorted_desc, (num_keep - 1)[:, None], axis=-1)
    cutoff = jnp.maximum(kth, pth)
    filtered = jnp.where(scaled >= cutoff, scaled, -jnp.inf)

    def draw(seed, counter, row):
        key = jax.random.fold_in(jax.random.key(seed), counter)
        return jax.random.categorical(key, row)

    sampled = jax.vmap(draw)(s.seeds, s.counters, filtered)
    return jnp.where(s.temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def sample(logits, s: SamplingInput):
    """logits: [B, V] float32 -> (tokens [B] int32, logprobs [B] float32 of the chosen tokens
    under the unmodified distribution)."""
    logits = logits.astype(jnp.float32)
    tokens = jax.lax.cond(
        jnp.all(s.temperature == 0),
        lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32),
        lambda: _filtered_sample(logits, s))
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen
