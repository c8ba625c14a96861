"""Paged attention in plain XLA, and the K/V write into the pool: the reference every backend's
attention agrees with (jaxserve/backends: `pallas` and `cpu` replace the read with kernels).

Layout (shared by every implementation, and the same as jax's bundled paged-attention kernels):
  k_pages, v_pages: [num_kv_heads, num_pages, page_size, head_dim]   (one layer), or with a
                    leading layers axis and `layer` given
  block_tables:     [batch, max_pages_per_seq] int32; unused entries point at page 0 (null page)
  kv_lens:          [batch] int32; tokens of K/V valid for each sequence, including this step's
  q_positions:      [batch, q_len] int32; absolute position of each query token, -1 for padding
  q:                [batch, q_len, num_q_heads, head_dim]

Query token at position p of sequence b sees keys j with j <= p, j < kv_lens[b], and, with a
sliding window w, p - j < w. Decode is q_len == 1; prefill (also chunked) is q_len > 1.

Every implementation (this one, pallas_kernels/paged_attention*.py, the CPU backend's native
kernel) takes the same two per-layer options:
  sliding_window  None (no window), a Python int, or an int32 scalar jax value that may be traced
                  (a model whose layers differ picks each layer's window in-graph from the layer
                  index, so one program serves every layer). A full-attention layer of such a
                  model passes FULL_WINDOW, which no position difference reaches.
  softcap         None, or a static float c: each score s (already multiplied by scale) becomes
                  c * tanh(s / c) before masking (Gemma 2's attention logit soft-capping, as HF
                  transformers computes it).
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxserve.model.kv_cache import stored, values

# The sliding window of a full-attention layer in a model that mixes windowed and full layers:
# p - j < FULL_WINDOW holds for every position pair (positions stay far below 2**30), so such a
# layer sees its whole causal context, and p - FULL_WINDOW + 1 does not overflow int32.
FULL_WINDOW = 1 << 30


def write_kv(k_pages, v_pages, k, v, slot_pages, slot_offsets, layer=None):
    """Scatter this step's K/V into the pool (in place when the pool is donated).

    k, v: [num_tokens, num_kv_heads, head_dim]; slot_pages/slot_offsets: [num_tokens] int32
    (padding tokens target the null page 0, whose contents are never read unmasked).
    With `layer`, the pool has a leading layers axis and only that layer is written.
    """
    k, v = stored(k, k_pages.dtype), stored(v, v_pages.dtype)
    if layer is None:
        return (k_pages.at[:, slot_pages, slot_offsets].set(jnp.swapaxes(k, 0, 1)),
                v_pages.at[:, slot_pages, slot_offsets].set(jnp.swapaxes(v, 0, 1)))
    # A scalar layer index plus array indices split by a slice: numpy puts the indexed dims
    # first, so the update is [num_tokens, kv_heads, head_dim] as given.
    return (k_pages.at[layer, :, slot_pages, slot_offsets].set(k),
            v_pages.at[layer, :, slot_pages, slot_offsets].set(v))


def paged_attention_xla(q, k_pages, v_pages, block_tables, kv_lens, q_positions, *,
                        scale: float, sliding_window=None, softcap: float | None = None,
                        layer=None):
    """Plain XLA path: gather each sequence's pages, then dense masked GQA attention.

    sliding_window: None, an int or an int32 scalar (traced is fine); softcap: None or a float
    (see the module docstring).

    With `layer`, the pool has a leading layers axis; indexing it inside the gather avoids
    copying the layer's whole pool.
    """
    B, Tq, Hq, D = q.shape
    Hkv, _, S, _ = k_pages.shape[-4:]
    P = block_tables.shape[1]
    if layer is None:   # [Hkv, B, P, S, D] -> [B, P, Hkv, S, D]
        k = jnp.moveaxis(k_pages[:, block_tables], 0, 2)
        v = jnp.moveaxis(v_pages[:, block_tables], 0, 2)
    else:               # indexed dims come first: [B, P, Hkv, S, D]
        k = k_pages[layer, :, block_tables]
        v = v_pages[layer, :, block_tables]
    # Scores and softmax in float32 (XLA:CPU also has no bf16 x bf16 -> f32 dot).
    k, v = values(k).astype(jnp.float32), values(v).astype(jnp.float32)
    key_pos = jnp.arange(P * S, dtype=jnp.int32).reshape(P, S)
    # Rows past a sequence's kv_len (stale K/V of a page's earlier owner, adapter weights, the
    # null page's padding writes) may hold anything, inf and NaN included: their V rows are
    # selected out here, since a zero weight times NaN is NaN. K needs no such step: each score
    # comes from one key row, and masked scores are replaced below.
    v = jnp.where((key_pos < kv_lens[:, None, None])[:, :, None, :, None], v, 0.0)
    qp = q_positions[:, :, None, None]                                        # [B, Tq, 1, 1]
    mask = (key_pos <= qp) & (key_pos < kv_lens[:, None, None, None])         # [B, Tq, P, S]
    if sliding_window is not None:
        mask &= qp - key_pos < sliding_window
    return _attend(q, k, v, mask, scale, softcap)


def _attend(q, k, v, mask, scale, softcap=None):
    """Masked GQA attention of q [B, Tq, Hq, D] over gathered pages k, v [B, P, Hkv, S, D].

    The contractions run on the gathered layout as it comes out of the gather (no transpose
    to [B, Hkv, P*S, D] first: on CPU that copy cost as much as the gather itself; measured
    35% faster for decode at batch 32 over 16 pages). Softmax over (P, S) with a masked max.
    """
    B, Tq, Hq, D = q.shape
    Hkv = k.shape[2]
    qg = q.reshape(B, Tq, Hkv, Hq // Hkv, D).astype(jnp.float32) * scale
    s = jnp.einsum("btkgd,bpksd->bkgtps", qg, k, preferred_element_type=jnp.float32)
    if softcap is not None:
        s = jnp.tanh(s / softcap) * softcap
    mask = mask[:, None, None]                                                 # [B,1,1,Tq,P,S]
    # Masked positions are excluded by selection (never by multiplying with 0): their scores
    # may be NaN (a stale key row), and v holds zeros past each row's kv_len.
    s = jnp.where(mask, s, -1e30)
    e = jnp.where(mask, jnp.exp(s - s.max(axis=(-2, -1), keepdims=True)), 0.0)
    den = e.sum(axis=(-2, -1))                                                 # [B, Hkv, G, Tq]
    out = jnp.einsum("bkgtps,bpksd->bkgtd", e, v, preferred_element_type=jnp.float32)
    # A row with no visible key (padding query) has den == 0 and e == 0: output 0, not NaN.
    out = out / jnp.maximum(den, 1e-30)[..., None]
    return jnp.moveaxis(out, 3, 1).reshape(B, Tq, Hq, D).astype(q.dtype)
