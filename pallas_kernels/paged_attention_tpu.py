"""Paged attention for TPU (Mosaic): page ids scalar-prefetched, pages DMA'd HBM -> VMEM.

Same math and row layout as pallas_kernels.paged_attention (one [rows, head_dim] query tile per
(sequence, kv head, token tile); key interval [lo, hi) per row). What changes on TPU:
  * the layer index, block_tables, each tile's page-block range [blk_lo, blk_hi) and key
    interval [key_lo, key_hi) (min(lo), max(hi) of its rows) live in SMEM
    (PrefetchScalarGridSpec), so the kernel can address pages before touching vector memory;
  * the stacked K/V pools stay in HBM (memory_space ANY), whole: the kernel DMAs
    pool[layer, head, page] itself, nothing is sliced outside it; each page block is
    `pages_per_block` page DMAs
    into one half of a double-buffered VMEM scratch, the next block's DMAs are started before the
    current block is computed;
  * the online softmax keeps m and l as [rows, 1] columns (2-D, the shape Mosaic likes) and goes
    one page at a time through the loaded block, so no value reshape is needed.
Masked keys are excluded by selection: scores replaced, and V rows outside the tile's key
interval (past the sequence's kv_len: stale, possibly NaN) zeroed before p @ V.
Used for decode (token tile of 1) and prefill alike. Runs under TPU interpret mode on CPU
(`interpret=True` -> pltpu.InterpretParams()), which simulates the DMAs and semaphores.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.paged_attention import (_NEG, _group_rows, _pad_block_tables, _pow2_at_least,
                                            _scores, _stacked_pool, _static_softcap,
                                            _ungroup_rows)


def _tpu_kernel(layer_ref, bt_ref, blk_lo_ref, blk_hi_ref,           # SMEM (scalar prefetch)
                key_lo_ref, key_hi_ref,
                lo_ref, hi_ref, q_ref, k_hbm, v_hbm,                 # VMEM blocks / HBM pools
                *rest, scale, softcap, pages_per_block, max_pages, num_tiles):
    o_ref, k_buf, v_buf, sems = rest[-4:]
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    S = k_buf.shape[2]
    layer = layer_ref[0]
    tile = b * num_tiles + i
    blk_lo, blk_hi = blk_lo_ref[tile], blk_hi_ref[tile]
    key_lo, key_hi = key_lo_ref[tile], key_hi_ref[tile]

    def copies(j, slot):
        out = []
        for p in range(pages_per_block):
            page = bt_ref[b * max_pages + j * pages_per_block + p]
            out.append(pltpu.make_async_copy(k_hbm.at[layer, h, page], k_buf.at[slot, p], sems.at[0, slot]))
            out.append(pltpu.make_async_copy(v_hbm.at[layer, h, page], v_buf.at[slot, p], sems.at[1, slot]))
        return out

    @pl.when(blk_lo < blk_hi)
    def _():
        for c in copies(blk_lo, 0):
            c.start()

    q = q_ref[...]
    lo, hi = lo_ref[...], hi_ref[...]                                   # [R, 1] int32
    R, D = q.shape

    def block(j, carry):
        slot = (j - blk_lo) % 2

        @pl.when(j + 1 < blk_hi)
        def _():
            for c in copies(j + 1, 1 - slot):
                c.start()

        for c in copies(j, slot):
            c.wait()
        acc, m, l = carry
        for p in range(pages_per_block):
            k, v = k_buf[slot, p], v_buf[slot, p]                       # [S, D]
            s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            key0 = (j * pages_per_block + p) * S
            key = key0 + lax.broadcasted_iota(jnp.int32, (R, S), 1)
            v_key = key0 + lax.broadcasted_iota(jnp.int32, v.shape, 0)
            v = jnp.where((v_key >= key_lo) & (v_key < key_hi), v, jnp.zeros_like(v))
            mask = (key >= lo) & (key < hi)
            s = jnp.where(mask, _scores(s, scale, softcap), _NEG)
            m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
            pr = jnp.where(mask, jnp.exp(s - m_new), 0.0)
            corr = jnp.exp(m - m_new)
            l = corr * l + jnp.sum(pr, axis=1, keepdims=True)
            acc = corr * acc + lax.dot_general(pr.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                               preferred_element_type=jnp.float32)
            m = m_new
        return acc, m, l

    init = (jnp.zeros((R, D), jnp.float32), jnp.full((R, 1), _NEG, jnp.float32),
            jnp.zeros((R, 1), jnp.float32))
    acc, _, l = lax.fori_loop(blk_lo, blk_hi, block, init)
    out = jnp.where(l != 0, acc / jnp.where(l != 0, l, 1.0), 0.0)  # NaN l (own values) stays
    o_ref[...] = out.astype(o_ref.dtype)


def paged_attention_tpu(q, k_pages, v_pages, block_tables, kv_lens, q_positions, *, scale,
                        sliding_window=None, softcap=None, layer=None, pages_per_block=None,
                        tokens_per_tile=None, interpret=False, poison=False):
    """k_pages/v_pages: the stacked pool [L, Hkv, N, S, D] with `layer`, or one layer's
    [Hkv, N, S, D]. sliding_window (None, an int or a traced int32 scalar) only moves the rows'
    key intervals and the tiles' page ranges, computed here and scalar-prefetched; softcap (a
    static float) caps the scores inside the kernel."""
    k_pages, v_pages, layer = _stacked_pool(k_pages, v_pages, layer)
    softcap = _static_softcap(softcap)
    B, Tq, Hq, D = q.shape
    _, Hkv, num_pages, S, _ = k_pages.shape
    G = Hq // Hkv
    P = block_tables.shape[1]
    ppb = pages_per_block or max(1, min(P, 128 // S if S < 128 else 1))
    sublanes = 16 if q.dtype == jnp.bfloat16 else 8         # a tile's rows fill whole vregs
    Gp = _pow2_at_least(G)
    if Tq == 1:
        bq, Gp = 1, max(Gp, sublanes)
    else:                                                   # powers of two: R % sublanes == 0
        # >= 64 tokens per tile (fewer only for a shorter chunk): K/V read once per 64 tokens
        bq = _pow2_at_least(tokens_per_tile or min(max(64, 128 // Gp), _pow2_at_least(Tq)))
        bq = max(bq, sublanes // Gp)
    R = bq * Gp
    Tp = pl.cdiv(Tq, bq) * bq
    nq = Tp // bq
    bt = _pad_block_tables(block_tables, ppb)
    Pp = bt.shape[1]
    qg, lo, hi = _group_rows(q, q_positions, kv_lens, sliding_window, Hkv, Gp, Tp)
    bk = ppb * S
    lo, hi = lo[:, 0], hi[:, 0]                             # one head split: [B, Tp * Gp]
    lo_t, hi_t = lo.reshape(B, nq, R), hi.reshape(B, nq, R)
    key_lo = jnp.min(lo_t, axis=-1).reshape(-1).astype(jnp.int32)
    key_hi = jnp.max(hi_t, axis=-1).reshape(-1).astype(jnp.int32)
    blk_lo = key_lo // bk
    blk_hi = (key_hi + bk - 1) // bk
    blk_lo = jnp.minimum(blk_lo, blk_hi).astype(jnp.int32)  # empty tiles: lo == hi, no DMA

    rows = pl.BlockSpec((None, R, 1), lambda b, h, i, *_: (b, i, 0))
    tile = pl.BlockSpec((None, None, R, D), lambda b, h, i, *_: (b, h, i, 0))
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    in_specs = [rows, rows, tile, hbm, hbm]
    args = [lo[..., None], hi[..., None], qg, k_pages, v_pages]
    aliases = {}
    if poison:
        in_specs.append(tile)
        args.append(jnp.full(qg.shape, jnp.nan, qg.dtype))
        aliases = {6 + len(args) - 1: 0}                    # index counts the 6 prefetch args
    kernel = functools.partial(_tpu_kernel, scale=scale, softcap=softcap, pages_per_block=ppb,
                               max_pages=Pp, num_tiles=nq)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6, grid=(B, Hkv, nq), in_specs=in_specs, out_specs=tile,
            scratch_shapes=[pltpu.VMEM((2, ppb, S, D), k_pages.dtype),
                            pltpu.VMEM((2, ppb, S, D), v_pages.dtype),
                            pltpu.SemaphoreType.DMA((2, 2))]),
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        input_output_aliases=aliases,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="paged_attention_tpu",
    )(layer, bt.reshape(-1), blk_lo, blk_hi, key_lo, key_hi, *args)
    return _ungroup_rows(out, B, Tq, Hkv, G, Tp, Gp)
