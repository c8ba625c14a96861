"""Paged attention kernels: decode (one query per sequence) and prefill/mixed (ragged, causal).

Layout (see jaxserve/model/attention.py):
  q:            [batch, q_len, num_q_heads, head_dim]
  k/v_pages:    [layers, num_kv_heads, num_pages, page_size, head_dim] with `layer` (an int32
                scalar, may be traced): the stacked pool of every layer, read in place; or one
                layer's [num_kv_heads, num_pages, page_size, head_dim]
  block_tables: [batch, max_pages] int32 (unused entries -> page 0)
  kv_lens:      [batch] int32
  q_positions:  [batch, q_len] int32, -1 = padding query (its output is zeros)

How the kernels see the problem. The wrapper turns positions, lengths and the sliding window into
one half-open key interval per query row, [lo, hi): hi = min(pos + 1, kv_len), lo = pos - window + 1
(or 0). A padding row gets the empty interval [BIG, 0). Query heads of one GQA group share a KV
head, so they are folded into the rows of one tile and one K/V page load serves all of them:
  q tile: [rows, head_dim] with rows = tokens_per_tile * heads_per_tile (token-major).
A group larger than a tile's head slots is split into `head_splits` sub-groups, each its own
"virtual head" of the grid (kv head = virtual head // head_splits). Decode tiles hold the whole
group (one token); prefill tiles hold >= 64 tokens of as many heads as fit in the chip's row
budget (`_gpu_tiling`), so a 512-token chunk reads each head's K/V 8 x head_splits times.

The pool is never sliced outside the kernel: the kernels receive the whole stacked pool and the
layer index and address pages as pool[layer, kv_head, page] themselves. A slice outside would
be materialized as an operand copy of a layer's pool on every layer of every step.
A kernel instance walks page blocks from min(lo) to max(hi) through the block table, gathering
`pages_per_block` pages at a time, with an online softmax (running max m, sum l, accumulator acc,
all f32). Rows with no visible key finish with l == 0 and are written as zeros (a row whose own
scores are NaN keeps NaN: its request's logits then show it, as on the XLA path).
Keys a row may not see are excluded by selection, never by a zero weight (0 x NaN is NaN): their
scores are replaced, and the V rows of keys outside the tile's interval [min(lo), max(hi)) --
past the sequence's kv_len: stale rows of a page's earlier owner, adapter weights, the null
page, any of them possibly inf or NaN -- are zeroed before p @ V.

Variants:
  * portable kernels (`_decode_call`, `_prefill_call`): pages gathered by indexing the pool
    with (layer, kv head, vector of page ids). Runs in interpret mode on any backend and lowers through
    Pallas' Triton backend on GPU. Decode splits the key range over `num_splits` programs
    (flash-decoding) and merges the partial softmaxes in jnp.
  * TPU kernel (pallas_kernels/paged_attention_tpu.py): layer, page ids and block ranges
    scalar-prefetched into SMEM, pages DMA'd from the HBM pool into double-buffered VMEM
    scratch, one page per softmax step. Runs on TPU (Mosaic) and under TPU interpret mode on
    CPU.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

_NEG = -1e30          # finite "minus infinity": keeps exp(m_old - m_new) NaN-free for empty rows
_EMPTY_LO = 1 << 30   # lo of a row that sees nothing (padding query / padding head)


# ----------------------------------------------------------------------------- reference

def paged_attention_ref(q, k_pages, v_pages, block_tables, kv_lens, q_positions, *, scale,
                        sliding_window=None, softcap=None):
    """Plain jnp, f32 throughout: key j of sequence b lives at page block_tables[b, j // S], slot j % S.
    softcap c: score s -> c * tanh(s / c) before masking (HF Gemma 2's eager attention)."""
    B, Tq, Hq, D = q.shape
    Hkv, _, S, _ = k_pages.shape
    G = Hq // Hkv
    P = block_tables.shape[1]
    j = jnp.arange(P * S)
    page = block_tables[:, j // S]                                  # [B, P*S]
    k = k_pages[:, page, j % S].astype(jnp.float32)                 # [Hkv, B, P*S, D]
    v = v_pages[:, page, j % S].astype(jnp.float32)
    v = jnp.where((j < kv_lens[:, None])[None, :, :, None], v, 0.0)  # stale rows may be NaN
    k = jnp.repeat(k, G, axis=0)                                    # [Hq, B, K, D]
    v = jnp.repeat(v, G, axis=0)
    s = jnp.einsum("bthd,hbkd->bhtk", q.astype(jnp.float32), k,
                   precision=lax.Precision.HIGHEST) * scale
    if softcap is not None:
        s = jnp.tanh(s / softcap) * softcap
    pos = q_positions[:, None, :, None]
    visible = (j <= pos) & (j < kv_lens[:, None, None, None])
    if sliding_window is not None:
        visible &= pos - j < sliding_window
    s = jnp.where(visible, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(visible, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    denom = p.sum(-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bhtk,hbkd->bthd", p, v, precision=lax.Precision.HIGHEST)
    return out.astype(q.dtype)


# ----------------------------------------------------------------------------- shared pieces

def _row_bounds(q_positions, kv_lens, sliding_window):
    """[B, T] key interval [lo, hi) per query token; padding tokens get [_EMPTY_LO, 0)."""
    pos = q_positions.astype(jnp.int32)
    valid = pos >= 0
    hi = jnp.minimum(pos + 1, kv_lens[:, None].astype(jnp.int32))
    lo = jnp.zeros_like(pos) if sliding_window is None else jnp.maximum(pos - sliding_window + 1, 0)
    hi = jnp.where(valid, jnp.maximum(hi, 0), 0)
    lo = jnp.where(valid & (hi > lo), lo, _EMPTY_LO)
    return lo, hi


def _group_rows(q, q_positions, kv_lens, sliding_window, num_kv_heads, head_slots, tokens_pad,
                head_splits=1):
    """q -> [B, Hkv * head_splits, Tp * head_slots, D] (token-major rows; virtual head
    h * head_splits + s holds query heads s * head_slots ... of KV head h) and lo/hi ->
    [B, head_splits, Tp * head_slots]."""
    B, Tq, Hq, D = q.shape
    G = Hq // num_kv_heads
    Gpad, hs, gt = head_splits * head_slots, head_splits, head_slots
    lo, hi = _row_bounds(q_positions, kv_lens, sliding_window)
    qg = q.reshape(B, Tq, num_kv_heads, G, D)
    qg = jnp.pad(qg, ((0, 0), (0, tokens_pad - Tq), (0, 0), (0, Gpad - G), (0, 0)))
    qg = qg.reshape(B, tokens_pad, num_kv_heads, hs, gt, D)
    qg = jnp.transpose(qg, (0, 2, 3, 1, 4, 5)).reshape(B, num_kv_heads * hs, tokens_pad * gt, D)
    lo = jnp.pad(lo, ((0, 0), (0, tokens_pad - Tq)), constant_values=_EMPTY_LO)
    hi = jnp.pad(hi, ((0, 0), (0, tokens_pad - Tq)))
    head_ok = (jnp.arange(Gpad) < G).reshape(hs, 1, gt)          # padded heads see nothing
    lo = jnp.where(head_ok[None], lo[:, None, :, None], _EMPTY_LO).reshape(B, hs, -1)
    hi = jnp.where(head_ok[None], hi[:, None, :, None], 0).reshape(B, hs, -1)
    return qg, lo, hi


def _ungroup_rows(out, B, Tq, Hkv, G, tokens_pad, head_slots, head_splits=1):
    D = out.shape[-1]
    hs, gt = head_splits, head_slots
    out = out.reshape(B, Hkv, hs, tokens_pad, gt, D)
    out = jnp.transpose(out, (0, 3, 1, 2, 4, 5)).reshape(B, tokens_pad, Hkv, hs * gt, D)
    return out[:, :Tq, :, :G].reshape(B, Tq, Hkv * G, D)


def _stacked_pool(k_pages, v_pages, layer):
    """The pools as [L, Hkv, N, S, D] and the layer as a one-element int32 array (a single
    layer's [Hkv, N, S, D] pool becomes layer 0 of a one-layer stack)."""
    if layer is None:
        k_pages, v_pages, layer = k_pages[None], v_pages[None], 0
    return k_pages, v_pages, jnp.asarray(layer, jnp.int32).reshape(1)


def _static_softcap(softcap):
    """The soft-capping constant as a Python float (a kernel parameter), or None."""
    if softcap is None:
        return None
    try:
        softcap = float(softcap)
    except TypeError as e:   # a traced value
        raise TypeError(f"softcap must be a static float, got {softcap!r}") from e
    if not softcap > 0:
        raise ValueError(f"softcap must be positive, got {softcap}")
    return softcap


def _pad_block_tables(block_tables, multiple):
    P = block_tables.shape[1]
    return jnp.pad(block_tables.astype(jnp.int32), ((0, 0), (0, -P % multiple)))


def _scores(s, scale, softcap):
    """Raw q.k products -> the scores the softmax sees: times scale, then soft-capped
    (c * tanh(s * scale / c), the 1/c folded into the scale) when softcap is given."""
    if softcap is None:
        return s * scale
    return jnp.tanh(s * (scale / softcap)) * softcap


def _softmax_step(q, k, v, key0, lo, hi, tile_lo, tile_hi, carry, scale, softcap):
    """One online-softmax update. q [R, D]; k, v [K, D]; key0 = position of k[0]; lo/hi [R];
    tile_lo/tile_hi: the tile's key interval (min(lo), max(hi)), outside which V is zeroed."""
    acc, m, l = carry
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    key = key0 + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    mask = (key >= lo[:, None]) & (key < hi[:, None])
    v_key = key0 + lax.broadcasted_iota(jnp.int32, v.shape, 0)
    v = jnp.where((v_key >= tile_lo) & (v_key < tile_hi), v, jnp.zeros_like(v))
    s = jnp.where(mask, _scores(s, scale, softcap), _NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
    corr = jnp.exp(m - m_new)
    l = corr * l + jnp.sum(p, axis=1)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)
    return corr[:, None] * acc + pv, m_new, l


def _walk_pages(q, k_ref, v_ref, layer, head, bt_ref, lo, hi, blk_begin, blk_end,
                pages_per_block, scale, softcap):
    """Online softmax over page blocks [blk_begin, blk_end) of pool[layer, head], the pages
    gathered through the block table."""
    R, D = q.shape
    S = k_ref.shape[3]
    bk = pages_per_block * S
    tile_lo, tile_hi = jnp.min(lo), jnp.max(hi)

    def body(j, carry):
        pages = bt_ref[pl.ds(j * pages_per_block, pages_per_block)]
        k = k_ref[layer, head, pages].reshape(bk, D)
        v = v_ref[layer, head, pages].reshape(bk, D)
        return _softmax_step(q, k, v, j * bk, lo, hi, tile_lo, tile_hi, carry, scale, softcap)

    init = (jnp.zeros((R, D), jnp.float32), jnp.full((R,), _NEG, jnp.float32),
            jnp.zeros((R,), jnp.float32))
    return lax.fori_loop(blk_begin, blk_end, body, init)


def _whole(shape):
    """A block that is the whole array (the pool: the kernel indexes it itself)."""
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _compiler_params(interpret, num_warps, num_stages):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _poisoned(shape, dtype):
    return jnp.full(shape, jnp.nan if jnp.issubdtype(dtype, jnp.floating) else -1, dtype)


# ----------------------------------------------------------------------------- prefill kernel

def _prefill_kernel(layer_ref, bt_ref, lo_ref, hi_ref, q_ref, k_ref, v_ref, *rest, scale,
                    softcap, pages_per_block, head_splits):
    o_ref = rest[-1]                       # rest = (poisoned_out_alias?, o_ref)
    lo, hi = lo_ref[...], hi_ref[...]
    bk = pages_per_block * k_ref.shape[3]
    blk_begin = jnp.min(lo) // bk
    blk_end = (jnp.max(hi) + bk - 1) // bk
    head = pl.program_id(1) // head_splits
    acc, _, l = _walk_pages(q_ref[...], k_ref, v_ref, layer_ref[0], head, bt_ref, lo, hi,
                            blk_begin, blk_end, pages_per_block, scale, softcap)
    # l == 0: no visible key (zeros); a NaN l (the row's own values) stays NaN, as in XLA.
    out = jnp.where(l[:, None] != 0, acc / jnp.where(l != 0, l, 1.0)[:, None], 0.0)
    o_ref[...] = out.astype(o_ref.dtype)


def _prefill_call(qg, k_pages, v_pages, layer, bt, lo, hi, *, scale, softcap, rows_per_tile,
                  pages_per_block, head_splits, interpret, num_warps=4, num_stages=2,
                  poison=False):
    B, VH, N, D = qg.shape
    hs = head_splits
    Pp = bt.shape[1]
    grid = (B, VH, N // rows_per_tile)
    rows = pl.BlockSpec((None, None, rows_per_tile), lambda b, h, i: (b, h % hs, i))
    tile = pl.BlockSpec((None, None, rows_per_tile, D), lambda b, h, i: (b, h, i, 0))
    in_specs = [_whole((1,)), pl.BlockSpec((None, Pp), lambda b, h, i: (b, 0)), rows, rows, tile,
                _whole(k_pages.shape), _whole(v_pages.shape)]
    args = [layer, bt, lo, hi, qg, k_pages, v_pages]
    aliases = {}
    if poison:      # tests: start from a NaN-filled output so any element never written fails
        in_specs.append(tile)
        args.append(_poisoned(qg.shape, qg.dtype))
        aliases = {len(args) - 1: 0}
    return pl.pallas_call(
        functools.partial(_prefill_kernel, scale=scale, softcap=softcap,
                          pages_per_block=pages_per_block, head_splits=hs),
        grid=grid, in_specs=in_specs, out_specs=tile,
        out_shape=jax.ShapeDtypeStruct(qg.shape, qg.dtype),
        input_output_aliases=aliases, interpret=interpret,
        compiler_params=_compiler_params(interpret, num_warps, num_stages),
        name="paged_attention_prefill",
    )(*args)


# ----------------------------------------------------------------------------- decode kernel

def _decode_kernel(layer_ref, bt_ref, lo_ref, hi_ref, q_ref, k_ref, v_ref, *rest, scale,
                   softcap, pages_per_block, blocks_per_split):
    o_ref, m_ref, l_ref = rest[-3:]
    split = pl.program_id(2)
    lo, hi = lo_ref[...], hi_ref[...]
    bk = pages_per_block * k_ref.shape[3]
    blk_begin = jnp.maximum(jnp.min(lo) // bk, split * blocks_per_split)
    blk_end = jnp.minimum((jnp.max(hi) + bk - 1) // bk, (split + 1) * blocks_per_split)
    acc, m, l = _walk_pages(q_ref[...], k_ref, v_ref, layer_ref[0], pl.program_id(1), bt_ref,
                            lo, hi, blk_begin, blk_end, pages_per_block, scale, softcap)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _decode_call(qg, k_pages, v_pages, layer, bt, lo, hi, *, scale, softcap, pages_per_block,
                 num_splits, interpret, num_warps=4, num_stages=2, poison=False):
    """Partial softmax per split: acc [B, Hkv, splits, Gp, D], m and l [B, Hkv, splits, Gp]."""
    B, Hkv, Gp, D = qg.shape
    Pp = bt.shape[1]
    blocks_per_split = pl.cdiv(Pp // pages_per_block, num_splits)
    grid = (B, Hkv, num_splits)
    rows = pl.BlockSpec((None, None, Gp), lambda b, h, s: (b, 0, 0))
    in_specs = [_whole((1,)), pl.BlockSpec((None, Pp), lambda b, h, s: (b, 0)), rows, rows,
                pl.BlockSpec((None, None, Gp, D), lambda b, h, s: (b, h, 0, 0)),
                _whole(k_pages.shape), _whole(v_pages.shape)]
    out_specs = [pl.BlockSpec((None, None, None, Gp, D), lambda b, h, s: (b, h, s, 0, 0)),
                 pl.BlockSpec((None, None, None, Gp), lambda b, h, s: (b, h, s, 0)),
                 pl.BlockSpec((None, None, None, Gp), lambda b, h, s: (b, h, s, 0))]
    out_shape = [jax.ShapeDtypeStruct((B, Hkv, num_splits, Gp, D), jnp.float32),
                 jax.ShapeDtypeStruct((B, Hkv, num_splits, Gp), jnp.float32),
                 jax.ShapeDtypeStruct((B, Hkv, num_splits, Gp), jnp.float32)]
    args = [layer, bt, lo, hi, qg, k_pages, v_pages]
    aliases = {}
    if poison:
        for i, (spec, shp) in enumerate(zip(out_specs, out_shape)):
            in_specs.append(spec)
            args.append(_poisoned(shp.shape, shp.dtype))
            aliases[len(args) - 1] = i
    return pl.pallas_call(
        functools.partial(_decode_kernel, scale=scale, softcap=softcap,
                          pages_per_block=pages_per_block, blocks_per_split=blocks_per_split),
        grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        input_output_aliases=aliases, interpret=interpret,
        compiler_params=_compiler_params(interpret, num_warps, num_stages),
        name="paged_attention_decode",
    )(*args)


def _merge_splits(acc, m, l):
    """Combine per-split partial softmaxes: acc [..., s, G, D], m/l [..., s, G] -> [..., G, D]."""
    m_all = jnp.max(m, axis=-2, keepdims=True)
    w = jnp.where(l != 0, jnp.exp(m - m_all), 0.0)     # a NaN split stays NaN
    denom = jnp.sum(w * l, axis=-2)
    num = jnp.sum(w[..., None] * acc, axis=-3)
    return jnp.where(denom[..., None] != 0, num / jnp.where(denom != 0, denom, 1.0)[..., None],
                     0.0)


# ----------------------------------------------------------------------------- tiling

def _pow2_at_least(n, floor=1):
    p = floor
    while p < n:
        p *= 2
    return p


def default_num_splits(batch, num_kv_heads, num_page_blocks, target_programs=256):
    """Enough (batch, head, split) programs to fill a GPU; never more splits than page blocks."""
    want = pl.cdiv(target_programs, max(1, batch * num_kv_heads))
    return int(max(1, min(want, num_page_blocks)))


@dataclasses.dataclass(frozen=True)
class GpuTiling:
    """How one kernel call is cut on a GPU (Triton). rows: query rows per tile (tokens x head
    slots); keys: keys per softmax step; warps/stages: Triton's num_warps / num_stages."""
    rows: int
    keys: int
    num_warps: int
    num_stages: int


def gpu_device_kind() -> str:
    """The first GPU's name ("NVIDIA H200"), or "" where there is none (lowering from a CPU)."""
    try:
        return jax.devices("gpu")[0].device_kind
    except RuntimeError:
        return ""


def _gpu_tiling(kind: str, decode: bool, head_dim: int) -> GpuTiling:
    """Per chip and shape. Decode is bandwidth-bound: a tile is one token's whole GQA group
    (padded to Triton's 16-row dot minimum), 128 keys per step, warps for the head dim.
    Prefill is compute-bound: 128 rows (>= 64 tokens x up to 2 heads of a group) against 64
    keys, FlashAttention-2's shape for head_dim <= 128; Hopper's larger shared memory takes
    one more pipeline stage. Unknown chips (and lowering without one) get the Hopper choice."""
    ampere = any(n in kind for n in ("A100", "A10", "A30", "A40", "L4", "L40", "RTX"))
    big_d = head_dim > 128
    if decode:
        return GpuTiling(rows=16, keys=128, num_warps=8 if big_d else 4,
                         num_stages=2 if ampere or big_d else 3)
    return GpuTiling(rows=64 if big_d else 128, keys=32 if big_d else 64, num_warps=8,
                     num_stages=2 if ampere else 3)


# ----------------------------------------------------------------------------- wrapper

def paged_attention(q, k_pages, v_pages, block_tables, kv_lens, q_positions, *, scale,
                    sliding_window=None, softcap=None, layer=None, interpret=False,
                    pages_per_block=None, num_splits=None, tokens_per_tile=None, backend=None,
                    poison=False):
    """Dispatch: decode kernel for q_len == 1, prefill kernel otherwise.

    sliding_window: None, an int, or an int32 scalar (traced is fine: it only moves each row's
    key interval, computed outside the kernels by _row_bounds). softcap: None or a static float
    c, applied inside the kernels to each score (c * tanh(s / c)) before masking.

    k_pages/v_pages: the stacked pool [L, Hkv, N, S, D] with `layer`, or one layer's
    [Hkv, N, S, D]. interpret=True (or a CPU backend) runs the portable kernels in Pallas
    interpret mode (cut into GPU tiles when backend="gpu"); GPU runs them through Triton; TPU
    runs the Mosaic kernel (interpret=True there runs the portable kernel). `poison` (tests only) makes every kernel output start as
    NaN.
    """
    k_pages, v_pages, layer = _stacked_pool(k_pages, v_pages, layer)
    softcap = _static_softcap(softcap)
    B, Tq, Hq, D = q.shape
    _, Hkv, _, S, _ = k_pages.shape
    if Hq % Hkv:
        raise ValueError(f"num_q_heads {Hq} is not a multiple of num_kv_heads {Hkv}")
    G = Hq // Hkv
    backend = backend or jax.default_backend()
    if backend == "cpu":
        interpret = True
    if backend == "tpu" and not interpret:
        from pallas_kernels import paged_attention_tpu
        return paged_attention_tpu.paged_attention_tpu(
            q, k_pages, v_pages, block_tables, kv_lens, q_positions, scale=scale,
            sliding_window=sliding_window, softcap=softcap, pages_per_block=pages_per_block,
            layer=layer)
    # GPU tiles (also in interpret mode with backend="gpu": tests check the GPU cut on CPU);
    # elsewhere interpret mode takes few, large steps.
    on_gpu = backend == "gpu"
    P = block_tables.shape[1]
    Gp = _pow2_at_least(G)
    if on_gpu:
        tiling = _gpu_tiling(gpu_device_kind() if not interpret else "", Tq == 1, D)
        keys = tiling.keys
    else:
        tiling, keys = None, 128
    warps = dict(num_warps=tiling.num_warps, num_stages=tiling.num_stages) if tiling else {}
    if pages_per_block is None:
        pages_per_block = max(1, min(_pow2_at_least(P), keys // S if S < keys else 1))
    bt = _pad_block_tables(block_tables, pages_per_block)
    if Tq == 1:
        rows = max(Gp, tiling.rows) if on_gpu else Gp  # Triton's dot wants >= 16 rows
        num_blocks = bt.shape[1] // pages_per_block
        splits = num_splits or (default_num_splits(B, Hkv, num_blocks) if on_gpu else 1)
        bt = _pad_block_tables(bt, pages_per_block * splits)
        qg, lo, hi = _group_rows(q, q_positions, kv_lens, sliding_window, Hkv, rows, 1)
        acc, m, l = _decode_call(qg, k_pages, v_pages, layer, bt, lo, hi, scale=scale,
                                 softcap=softcap, pages_per_block=pages_per_block,
                                 num_splits=splits,
                                 interpret=interpret, poison=poison, **warps)
        out = _merge_splits(acc, m, l).astype(q.dtype)            # [B, Hkv, rows, D]
        return _ungroup_rows(out, B, 1, Hkv, G, 1, rows)
    if on_gpu:   # >= 64 tokens per tile, as many of the group's heads as the row budget holds
        slots = max(1, min(Gp, tiling.rows // 64))
        bq = tokens_per_tile or min(tiling.rows // slots, _pow2_at_least(Tq))
        slots = max(slots, pl.cdiv(16, bq))                        # Triton's 16-row minimum
    else:
        slots = Gp
        bq = tokens_per_tile or max(1, 64 // Gp)
    splits = pl.cdiv(G, slots)
    Tp = pl.cdiv(Tq, bq) * bq
    qg, lo, hi = _group_rows(q, q_positions, kv_lens, sliding_window, Hkv, slots, Tp, splits)
    out = _prefill_call(qg, k_pages, v_pages, layer, bt, lo, hi, scale=scale, softcap=softcap,
                        rows_per_tile=bq * slots, pages_per_block=pages_per_block,
                        head_splits=splits, interpret=interpret, poison=poison, **warps)
    return _ungroup_rows(out, B, Tq, Hkv, G, Tp, slots, splits)
