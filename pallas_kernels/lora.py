"""Gathered multi-LoRA: y[t] = scale_s * (x[t] A_s^T) B_s with s = idx[t], masked to rank r_s.

Adapter pool, one stack per projection:
  a:      [num_slots, max_rank, in_dim]    rows of A
  b:      [num_slots, max_rank, out_dim]   B stored transposed: one row per rank
  ranks:  [num_slots] int32                rows >= rank are ignored (garbage, even NaN)
  scales: [num_slots] float32              lora_alpha / r (or / sqrt(r) for rsLoRA)
  idx:    [T] int32                        adapter slot per token, -1 = no adapter (adds zero)

Paths:
  * XLA (`lora_shrink`, `lora_expand`, `gathered_lora(impl="xla")`): gather each token's A and B
    rows, two batched einsums. Cost independent of num_slots (unlike a one-hot einsum).
  * MBGMV kernel (decode, few tokens): one program per token, walks only ceil(rank / rank_block)
    rank blocks of its adapter, so a rank-8 adapter in a max_rank-128 pool reads 1/16 of the rows.
    Shrink and expand are fused; v never goes to HBM.
  * MBGMM kernel (prefill, many tokens): the wrapper sorts tokens by slot and pads every slot's
    segment to a multiple of the token tile, so each tile belongs to one adapter; a tile does
    [tile, in] x [in, R] then [tile, R] x [R, out] as real matmuls, then tokens are unsorted.
    (Sorting inside the wrapper keeps one interface for the engine; the extra cost is one gather of
    x and one of y, O(T * (in + out)), small next to the matmuls.)
  * TPU (`grouped_lora`): the same sort as MBGMM, then `lax.ragged_dot` twice, which XLA:TPU
    runs as its grouped-matmul (megablox gmm) kernel.
References: `gathered_lora_ref` (plain jnp, per-slot dense then select, f32) and
`gathered_lora_ragged_ref` (sorted tokens through `jax.lax.ragged_dot`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

IMPLS = ("xla", "pallas")
BGMV_MAX_TOKENS = 128   # above this the grouped (MBGMM) kernel wins: tokens share adapter reads


# ----------------------------------------------------------------------------- references

def gathered_lora_ref(x, a, b, idx, ranks, scales):
    """Every slot applied to every token in f32, then each token picks its own; -1 picks zero."""
    hp = lax.Precision.HIGHEST
    R = a.shape[1]
    rank_ok = jnp.arange(R)[None, :] < ranks[:, None]                       # [S, R]
    v = jnp.einsum("th,srh->str", x.astype(jnp.float32), a.astype(jnp.float32), precision=hp)
    v = jnp.where(rank_ok[:, None, :], v, 0.0) * scales[:, None, None]
    b_ok = jnp.where(rank_ok[:, :, None], b.astype(jnp.float32), 0.0)
    y_all = jnp.einsum("str,sro->sto", v, b_ok, precision=hp)                  # [S, T, out]
    y = jnp.take_along_axis(y_all, jnp.maximum(idx, 0)[None, :, None], axis=0)[0]
    return jnp.where(idx[:, None] >= 0, y, 0.0).astype(x.dtype)


def gathered_lora_ragged_ref(x, a, b, idx, ranks, scales):
    """Sort tokens by slot, grouped matmuls with lax.ragged_dot, unsort. No-adapter tokens go last,
    past sum(group_sizes), where ragged_dot yields zeros."""
    S = a.shape[0]
    key = jnp.where(idx >= 0, idx, S)
    order = jnp.argsort(key, stable=True)
    sizes = jnp.bincount(key, length=S + 1)[:S].astype(jnp.int32)
    xs = x[order].astype(jnp.float32)
    v = lax.ragged_dot(xs, jnp.swapaxes(a, 1, 2).astype(jnp.float32), sizes,
                       precision=lax.Precision.HIGHEST)                        # [T, R]
    slot = jnp.maximum(key[order], 0).clip(max=S - 1)
    live = key[order] < S
    v = jnp.where((jnp.arange(a.shape[1])[None, :] < ranks[slot][:, None]) & live[:, None], v, 0.0)
    v = v * jnp.where(live, scales[slot], 0.0)[:, None]
    b_ok = jnp.where(jnp.arange(a.shape[1])[None, :, None] < ranks[:, None, None],
                     b.astype(jnp.float32), 0.0)
    ys = lax.ragged_dot(v, b_ok, sizes, precision=lax.Precision.HIGHEST)
    return jnp.zeros_like(ys).at[order].set(ys).astype(x.dtype)


# ----------------------------------------------------------------------------- XLA path

def _token_rank_scale(idx, ranks, scales):
    slot = jnp.maximum(idx, 0)
    live = idx >= 0
    return slot, jnp.where(live, ranks[slot], 0), jnp.where(live, scales[slot], 0.0)


def lora_shrink(x, a, idx, ranks):
    """v[t, j] = x[t] . A_{idx[t]}[j] for j < rank, else 0. [T, in] -> [T, max_rank] f32."""
    slot, tok_rank, _ = _token_rank_scale(idx, ranks, jnp.zeros(ranks.shape, jnp.float32))
    v = jnp.einsum("th,trh->tr", x, a[slot], preferred_element_type=jnp.float32)
    return jnp.where(jnp.arange(a.shape[1])[None, :] < tok_rank[:, None], v, 0.0)


def lora_expand(v, b, idx, scales, ranks):
    """y[t] = scale * sum_{j < rank} v[t, j] B_{idx[t]}[j]. [T, max_rank] -> [T, out] f32."""
    slot, tok_rank, tok_scale = _token_rank_scale(idx, ranks, scales)
    live = jnp.arange(b.shape[1])[None, :] < tok_rank[:, None]                # [T, R]
    v = jnp.where(live, v, 0.0) * tok_scale[:, None]
    b_rows = jnp.where(live[:, :, None], b[slot], 0)        # rows past rank may hold NaN garbage
    return jnp.einsum("tr,tro->to", v.astype(b.dtype), b_rows, preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------- helpers

def _chunk(dim, cap):
    """Largest power of two <= cap dividing dim (dim itself if it has none >= 8)."""
    c = cap
    while c >= 8:
        if dim % c == 0:
            return c
        c //= 2
    return dim


def _compiler_params(interpret):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu
    return plgpu.CompilerParams(num_warps=4, num_stages=2)


# ----------------------------------------------------------------------------- MBGMV (decode)

def _bgmv_kernel(slot_ref, rank_ref, scale_ref, x_ref, a_ref, b_ref, *rest, rank_block, in_block,
                 out_block):
    y_ref = rest[-1]
    slot, rank, scale = slot_ref[0], rank_ref[0], scale_ref[0]
    in_dim, out_dim = x_ref.shape[0], y_ref.shape[0]

    def zero(n, c):
        y_ref[pl.ds(n * out_block, out_block)] = jnp.zeros((out_block,), jnp.float32)
        return c
    lax.fori_loop(0, out_dim // out_block, zero, 0)

    def rank_step(j, c):
        rows = pl.ds(j * rank_block, rank_block)

        def shrink(k, v):
            cols = pl.ds(k * in_block, in_block)
            a_blk = a_ref[slot, rows, cols].astype(jnp.float32)             # [rb, bk]
            return v + jnp.sum(a_blk * x_ref[cols].astype(jnp.float32)[None, :], axis=1)
        v = lax.fori_loop(0, in_dim // in_block, shrink, jnp.zeros((rank_block,), jnp.float32))
        live = j * rank_block + lax.broadcasted_iota(jnp.int32, (rank_block,), 0) < rank
        v = jnp.where(live, v, 0.0) * scale

        def expand(n, c):
            cols = pl.ds(n * out_block, out_block)
            b_blk = jnp.where(live[:, None], b_ref[slot, rows, cols].astype(jnp.float32), 0.0)
            y_ref[cols] = y_ref[cols] + jnp.sum(v[:, None] * b_blk, axis=0)
            return c
        return lax.fori_loop(0, out_dim // out_block, expand, c)

    # Only the rank blocks this adapter uses; none for "no adapter" (rank 0).
    lax.fori_loop(0, (rank + rank_block - 1) // rank_block, rank_step, 0)


def mbgmv(x, a, b, idx, ranks, scales, *, interpret=False, rank_block=None, poison=False):
    """Per-token gathered LoRA (decode). Returns f32 [T, out]."""
    T, in_dim = x.shape
    S, R, out_dim = b.shape
    rb = rank_block or min(R, 16)
    if R % rb:
        raise ValueError(f"max_rank {R} must be a multiple of rank_block {rb}")
    bk, bn = _chunk(in_dim, 512), _chunk(out_dim, 512)
    slot, tok_rank, tok_scale = _token_rank_scale(idx, ranks, scales)
    one = pl.BlockSpec((1,), lambda t: (t,))
    row = lambda d: pl.BlockSpec((None, d), lambda t: (t, 0))
    whole = lambda arr: pl.BlockSpec(arr.shape, lambda t: (0,) * arr.ndim)
    in_specs = [one, one, one, row(in_dim), whole(a), whole(b)]
    args = [slot.astype(jnp.int32), tok_rank.astype(jnp.int32), tok_scale.astype(jnp.float32),
            x, a, b]
    aliases = {}
    if poison:      # tests: NaN-filled output, so any element left unwritten fails
        in_specs.append(row(out_dim))
        args.append(jnp.full((T, out_dim), jnp.nan, jnp.float32))
        aliases = {len(args) - 1: 0}
    return pl.pallas_call(
        functools.partial(_bgmv_kernel, rank_block=rb, in_block=bk, out_block=bn),
        grid=(T,), in_specs=in_specs, out_specs=row(out_dim),
        out_shape=jax.ShapeDtypeStruct((T, out_dim), jnp.float32),
        input_output_aliases=aliases, interpret=interpret,
        compiler_params=_compiler_params(interpret), name="lora_mbgmv",
    )(*args)


# ----------------------------------------------------------------------------- MBGMM (prefill)

def _bgmm_kernel(slot_ref, rank_ref, scale_ref, x_ref, a_ref, b_ref, *rest, in_block, out_block):
    y_ref = rest[-1]
    slot, rank, scale = slot_ref[0], rank_ref[0], scale_ref[0]
    bm, in_dim = x_ref.shape
    out_dim = y_ref.shape[1]
    R = a_ref.shape[1]

    @pl.when(slot < 0)
    def _():
        def zero(n, c):
            y_ref[:, pl.ds(n * out_block, out_block)] = jnp.zeros((bm, out_block), jnp.float32)
            return c
        lax.fori_loop(0, out_dim // out_block, zero, 0)

    @pl.when(slot >= 0)
    def _():
        def shrink(k, v):
            cols = pl.ds(k * in_block, in_block)
            return v + lax.dot_general(x_ref[:, cols], a_ref[slot, :, cols],
                                       (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        v = lax.fori_loop(0, in_dim // in_block, shrink, jnp.zeros((bm, R), jnp.float32))
        live = lax.broadcasted_iota(jnp.int32, (bm, R), 1) < rank
        v = (jnp.where(live, v, 0.0) * scale).astype(b_ref.dtype)
        b_live = lax.broadcasted_iota(jnp.int32, (R, out_block), 0) < rank

        def expand(n, c):
            cols = pl.ds(n * out_block, out_block)
            b_blk = jnp.where(b_live, b_ref[slot, :, cols], 0)    # rows past rank: may be NaN
            y_ref[:, cols] = jnp.dot(v, b_blk, preferred_element_type=jnp.float32)
            return c
        lax.fori_loop(0, out_dim // out_block, expand, 0)


def group_tokens(idx, num_slots, tile):
    """Sorted-and-padded layout for MBGMM.

    Returns (order, dest, tile_slot): sorted token i is original token order[i] and sits at row
    dest[i] of the padded layout; tile_slot[k] is the adapter of tile k (-1: no adapter / empty).
    Each slot's segment starts on a tile boundary; the padded row count is a static upper bound.
    """
    T = idx.shape[0]
    key = jnp.where(idx >= 0, idx, num_slots)                 # no-adapter tokens: last group
    order = jnp.argsort(key, stable=True)
    skey = key[order]
    counts = jnp.bincount(key, length=num_slots + 1)
    padded = (counts + tile - 1) // tile * tile
    start = jnp.cumsum(counts) - counts
    pstart = jnp.cumsum(padded) - padded
    dest = pstart[skey] + jnp.arange(T) - start[skey]
    max_groups = min(num_slots + 1, T)
    num_tiles = pl.cdiv(T + max_groups * (tile - 1), tile)
    tile_row = jnp.arange(num_tiles) * tile
    group = jnp.searchsorted(jnp.cumsum(padded), tile_row, side="right")
    tile_slot = jnp.where(group < num_slots, group, -1).astype(jnp.int32)
    return order, dest, tile_slot


def mbgmm(x, a, b, idx, ranks, scales, *, interpret=False, tile=16, poison=False):
    """Segment-grouped LoRA (prefill): sort by slot, one adapter per tile, unsort. f32 [T, out]."""
    T, in_dim = x.shape
    S, R, out_dim = b.shape
    order, dest, tile_slot = group_tokens(idx, S, tile)
    num_tiles = tile_slot.shape[0]
    xp = jnp.zeros((num_tiles * tile, in_dim), x.dtype).at[dest].set(x[order])
    live = tile_slot >= 0
    tslot = jnp.maximum(tile_slot, 0)
    trank = jnp.where(live, ranks[tslot], 0).astype(jnp.int32)
    tscale = jnp.where(live, scales[tslot], 0.0).astype(jnp.float32)
    one = pl.BlockSpec((1,), lambda i: (i,))
    rows = lambda d: pl.BlockSpec((tile, d), lambda i: (i, 0))
    whole = lambda arr: pl.BlockSpec(arr.shape, lambda i: (0,) * arr.ndim)
    in_specs = [one, one, one, rows(in_dim), whole(a), whole(b)]
    args = [tile_slot, trank, tscale, xp, a, b]
    aliases = {}
    if poison:
        in_specs.append(rows(out_dim))
        args.append(jnp.full((num_tiles * tile, out_dim), jnp.nan, jnp.float32))
        aliases = {len(args) - 1: 0}
    yp = pl.pallas_call(
        functools.partial(_bgmm_kernel, in_block=_chunk(in_dim, 256), out_block=_chunk(out_dim, 256)),
        grid=(num_tiles,), in_specs=in_specs, out_specs=rows(out_dim),
        out_shape=jax.ShapeDtypeStruct((num_tiles * tile, out_dim), jnp.float32),
        input_output_aliases=aliases, interpret=interpret,
        compiler_params=_compiler_params(interpret), name="lora_mbgmm",
    )(*args)
    return jnp.zeros((T, out_dim), jnp.float32).at[order].set(yp[dest])


# ----------------------------------------------------------------------------- TPU: grouped matmul

def grouped_lora(x, a, b, idx, ranks, scales):
    """The TPU path: tokens sorted by slot, shrink and expand as two grouped matmuls
    (`lax.ragged_dot`, which XLA:TPU runs as a Mosaic grouped-matmul kernel, megablox's gmm), in
    x's dtype with f32 accumulation, then unsorted. A slot's rows past its rank are zeroed in B
    (and the rank mask on v) so that garbage rows never contribute; no-adapter tokens sort last,
    past sum(group_sizes), where ragged_dot yields zeros."""
    S, R, _ = a.shape
    key = jnp.where(idx >= 0, idx, S)
    order = jnp.argsort(key, stable=True)
    sizes = jnp.bincount(key, length=S + 1)[:S].astype(jnp.int32)
    slot = jnp.minimum(key[order], S - 1)
    live = key[order] < S
    v = lax.ragged_dot(x[order], jnp.swapaxes(a, 1, 2).astype(x.dtype), sizes,
                       preferred_element_type=jnp.float32)                     # [T, R]
    rank_ok = (jnp.arange(R)[None, :] < ranks[slot][:, None]) & live[:, None]
    v = jnp.where(rank_ok, v, 0.0) * jnp.where(live, scales[slot], 0.0)[:, None]
    b_ok = jnp.where(jnp.arange(R)[None, :, None] < ranks[:, None, None], b.astype(x.dtype), 0)
    ys = lax.ragged_dot(v.astype(x.dtype), b_ok, sizes, preferred_element_type=jnp.float32)
    return jnp.zeros_like(ys).at[order].set(ys).astype(x.dtype)


# ----------------------------------------------------------------------------- entry point

def gathered_lora(x, a, b, idx, ranks, scales, *, impl="xla", interpret=False, kernel="auto",
                  backend=None):
    """scale * (x A^T) B per token's adapter, in x's dtype. kernel: auto | bgmv | bgmm (Pallas)."""
    if impl == "xla":
        return lora_expand(lora_shrink(x, a, idx, ranks), b, idx, scales, ranks).astype(x.dtype)
    if impl != "pallas":
        raise ValueError(f"LoRA impl must be one of {IMPLS}, got {impl!r}")
    backend = backend or jax.default_backend()
    if backend == "cpu":
        interpret = True
    if backend == "tpu" and not interpret:
        return grouped_lora(x, a, b, idx, ranks, scales)
    if not interpret and a.shape[1] < 16:     # Triton dots need >= 16 on every side
        pad = ((0, 0), (0, 16 - a.shape[1]), (0, 0))
        a, b = jnp.pad(a, pad), jnp.pad(b, pad)
    if kernel == "auto":
        kernel = "bgmv" if x.shape[0] <= BGMV_MAX_TOKENS else "bgmm"
    fn = mbgmv if kernel == "bgmv" else mbgmm
    return fn(x, a, b, idx, ranks, scales, interpret=interpret).astype(x.dtype)
