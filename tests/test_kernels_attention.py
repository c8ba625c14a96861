"""Paged-attention kernels against the plain-jnp reference, in Pallas interpret mode on CPU.

Inputs are fresh each run (hypothesis draws, or a fresh numpy seed printed on failure). Every
kernel runs with poison=True: its outputs start as NaN, so an element it never writes fails.
Unused pages, the null page 0 and the tail of each sequence's last page hold large garbage (1e3),
so a key read without its mask moves the result far outside tolerance.

Tolerances (max abs error against an f32 reference on the same inputs, |out| <= max|v| ~ 4):
  f32:  1e-4. The kernel sums in another order (online softmax over page blocks); observed ~1e-6,
        the bound K * eps_f32 * max|s| for K <= 512 keys is ~1e-4.
  bf16: 3e-2. Probabilities are rounded to bf16 before the P.V matmul (rel. 2^-9) and the output
        is rounded to bf16 (half an ulp of a value up to 4 is 2^-7 = 8e-3); both together stay
        below 3e-2 with margin.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marks import fast_subset
from pallas_kernels import paged_attention as pa

GARBAGE = 1e3
TOL = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2}
ON_CPU = jax.default_backend() == "cpu"


def make_case(seed, *, batch, q_len, num_kv_heads, group, head_dim, page_size, max_pages,
              dtype, last_page="mixed"):
    """Random paged KV over shuffled, non-contiguous pages; positions ragged per sequence.

    last_page: 'full' (kv_len % page_size == 0), 'empty' (one extra page allocated, no token in
    it), 'one' (one token in the last page), or 'mixed' (each sequence picks one of these or random).
    """
    rng = np.random.default_rng(seed)
    num_pages = 1 + batch * max_pages + 3                 # page 0 is the null page, 3 spare
    hq = num_kv_heads * group
    q = rng.standard_normal((batch, q_len, hq, head_dim))
    k = rng.uniform(-GARBAGE, GARBAGE, (num_kv_heads, num_pages, page_size, head_dim))
    v = rng.uniform(-GARBAGE, GARBAGE, (num_kv_heads, num_pages, page_size, head_dim))
    perm = rng.permutation(np.arange(1, num_pages))
    bt = np.zeros((batch, max_pages), np.int32)
    lens = np.zeros(batch, np.int32)
    pos = np.full((batch, q_len), -1, np.int32)
    used = 0
    for b in range(batch):
        kind = last_page if last_page != "mixed" else rng.choice(["full", "empty", "one", "rand"])
        cap = max_pages * page_size
        if kind == "full":
            L = page_size * int(rng.integers(1, max_pages + 1))
        elif kind == "empty":
            L = page_size * int(rng.integers(0, max_pages))
        elif kind == "one":
            L = page_size * int(rng.integers(0, max_pages)) + 1
        else:
            L = int(rng.integers(0, cap + 1))
        n_pages = -(-L // page_size) + (kind == "empty" and L < cap)
        bt[b, :n_pages] = perm[used:used + n_pages]
        used += n_pages
        for p in range(-(-L // page_size)):               # real K/V only where tokens live
            n_tok = min(page_size, L - p * page_size)
            k[:, bt[b, p], :n_tok] = rng.standard_normal((num_kv_heads, n_tok, head_dim))
            v[:, bt[b, p], :n_tok] = rng.standard_normal((num_kv_heads, n_tok, head_dim))
        lens[b] = L
        n_q = int(rng.integers(0, min(q_len, L) + 1)) if L else 0
        if b == 0 and L:
            n_q = min(q_len, L)                           # at least one row with real queries
        pos[b, :n_q] = np.arange(L - n_q, L)              # the newest n_q tokens, then padding
    cast = lambda x: jnp.asarray(x, dtype)
    return (cast(q), cast(k), cast(v), jnp.asarray(bt), jnp.asarray(lens), jnp.asarray(pos))


def check(seed, *, dtype, scale=None, sliding_window=None, kernel_kw=None, **shape):
    args = make_case(seed, dtype=dtype, **shape)
    scale = scale or shape["head_dim"] ** -0.5
    out = pa.paged_attention(*args, scale=scale, sliding_window=sliding_window, interpret=True,
                             poison=True, **(kernel_kw or {}))
    ref = pa.paged_attention_ref(*args, scale=scale, sliding_window=sliding_window)
    assert out.shape == ref.shape and out.dtype == args[0].dtype
    out32, ref32 = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out32).all(), f"seed={seed}: non-finite output (unwritten or leaked)"
    pad = np.asarray(args[5]) < 0
    assert (out32[pad] == 0).all(), f"seed={seed}: padding queries must give exact zeros"
    np.testing.assert_allclose(out32, ref32, atol=TOL[dtype], rtol=0, err_msg=f"seed={seed}")


def fresh_seed():
    return int(np.random.SeedSequence().entropy % (1 << 31))


# A covering grid: every page size, GQA ratio, head dim and dtype appears, with both kernels.
GRID = [
    # page, Hkv, G, D, dtype, window
    (8, 2, 1, 64, jnp.float32, None),
    (16, 1, 2, 128, jnp.bfloat16, None),
    (32, 2, 4, 64, jnp.float32, 7),
    (8, 1, 8, 128, jnp.bfloat16, 19),
    (16, 4, 2, 64, jnp.float32, None),
    (32, 1, 8, 64, jnp.bfloat16, None),
]


@pytest.mark.parametrize("page_size,hkv,group,head_dim,dtype,window", fast_subset(GRID, 2))
def test_decode_grid(page_size, hkv, group, head_dim, dtype, window):
    check(fresh_seed(), dtype=dtype, sliding_window=window, batch=4, q_len=1, num_kv_heads=hkv,
          group=group, head_dim=head_dim, page_size=page_size, max_pages=6,
          kernel_kw=dict(pages_per_block=2, num_splits=2))


@pytest.mark.parametrize("page_size,hkv,group,head_dim,dtype,window", fast_subset(GRID, 2))
def test_prefill_grid(page_size, hkv, group, head_dim, dtype, window):
    check(fresh_seed(), dtype=dtype, sliding_window=window, batch=3, q_len=9, num_kv_heads=hkv,
          group=group, head_dim=head_dim, page_size=page_size, max_pages=5,
          kernel_kw=dict(pages_per_block=2, tokens_per_tile=4))


@pytest.mark.parametrize("last_page", ["full", "empty", "one"])
@pytest.mark.parametrize("q_len", fast_subset([1, 6], 1))
def test_last_page_edges(last_page, q_len):
    check(fresh_seed(), dtype=jnp.float32, batch=3, q_len=q_len, num_kv_heads=2, group=2,
          head_dim=64, page_size=8, max_pages=4, last_page=last_page,
          kernel_kw=dict(pages_per_block=1))


@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**31 - 1), q_len=st.sampled_from([1, 5]),
       page_size=st.sampled_from([8, 16, 32]), group=st.sampled_from([1, 2, 4, 8]),
       head_dim=st.sampled_from([64, 128]), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       window=st.one_of(st.none(), st.integers(1, 40)), pages_per_block=st.sampled_from([1, 2, 4]),
       num_splits=st.sampled_from([1, 3]))
@pytest.mark.slow
def test_random_shapes(seed, q_len, page_size, group, head_dim, dtype, window, pages_per_block,
                       num_splits):
    kw = dict(pages_per_block=pages_per_block)
    kw.update(num_splits=num_splits) if q_len == 1 else kw.update(tokens_per_tile=2)
    check(seed, dtype=dtype, sliding_window=window, batch=2, q_len=q_len, num_kv_heads=2,
          group=group, head_dim=head_dim, page_size=page_size, max_pages=7, kernel_kw=kw)


def test_long_sequence_many_pages():
    """One sequence over 24 shuffled pages, decode and a 16-token chunk at the end."""
    for q_len in (1, 16):
        check(fresh_seed(), dtype=jnp.float32, batch=1, q_len=q_len, num_kv_heads=1, group=4,
              head_dim=64, page_size=8, max_pages=24, last_page="one",
              kernel_kw=dict(pages_per_block=4))


def test_default_tiling_matches():
    """Wrapper defaults (no tuning knobs), as the engine calls it."""
    for q_len in (1, 3):
        check(fresh_seed(), dtype=jnp.float32, batch=2, q_len=q_len, num_kv_heads=2, group=2,
              head_dim=64, page_size=16, max_pages=3)


def test_reference_agrees_with_xla_path():
    """The engine's XLA path and our reference describe the same attention."""
    from jaxserve.model.attention import paged_attention_xla
    args = make_case(fresh_seed(), batch=3, q_len=5, num_kv_heads=2, group=2, head_dim=64,
                     page_size=8, max_pages=4, dtype=jnp.float32)
    for w in (None, 6):
        ref = pa.paged_attention_ref(*args, scale=0.125, sliding_window=w)
        xla = paged_attention_xla(*args, scale=0.125, sliding_window=w)
        np.testing.assert_allclose(np.asarray(xla), np.asarray(ref), atol=1e-4, rtol=0)


def test_poison_catches_unwritten_output():
    """The poisoning mechanism itself: a kernel that skips its store leaves NaN behind."""
    from jax.experimental import pallas as pl

    def lazy_kernel(x_ref, o_init_ref, o_ref):
        @pl.when(pl.program_id(0) == 0)
        def _():
            o_ref[...] = x_ref[...]

    x = jnp.ones((2, 8), jnp.float32)
    spec = pl.BlockSpec((1, 8), lambda i: (i, 0))
    out = pl.pallas_call(lazy_kernel, grid=(2,), in_specs=[spec, spec], out_specs=spec,
                         out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                         input_output_aliases={1: 0}, interpret=True)(x, jnp.full_like(x, jnp.nan))
    assert np.isfinite(np.asarray(out[0])).all() and np.isnan(np.asarray(out[1])).all()


def test_merge_splits_handles_empty_splits():
    acc = jnp.zeros((1, 3, 2, 4))
    m = jnp.full((1, 3, 2), pa._NEG)
    l = jnp.zeros((1, 3, 2))
    acc = acc.at[0, 1].set(6.0)
    l = l.at[0, 1].set(2.0)
    m = m.at[0, 1].set(0.5)
    out = pa._merge_splits(acc, m, l)
    np.testing.assert_allclose(np.asarray(out[0]), 3.0)
    empty = pa._merge_splits(jnp.zeros((2, 2, 4)), jnp.full((2, 2), pa._NEG), jnp.zeros((2, 2)))
    assert (np.asarray(empty) == 0).all()


# --------------------------------------------------------------------------- lowering checks
# No GPU/TPU here, but Pallas lowers to Triton IR / Mosaic MLIR in Python, so lowering for the
# other platform catches unsupported ops and bad block shapes without the hardware.

def _shapes(B, Tq, Hkv, G, D, S, P, N, dtype):
    sds = jax.ShapeDtypeStruct
    return [sds((B, Tq, Hkv * G, D), dtype), sds((Hkv, N, S, D), dtype), sds((Hkv, N, S, D), dtype),
            sds((B, P), jnp.int32), sds((B,), jnp.int32), sds((B, Tq), jnp.int32)]


@pytest.mark.parametrize("q_len", [1, 32])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_for_gpu_triton(q_len, dtype):
    f = functools.partial(pa.paged_attention, scale=0.1, sliding_window=64, backend="gpu")
    text = jax.jit(f).trace(*_shapes(8, q_len, 2, 4, 128, 16, 9, 80, dtype)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "triton" in text


@pytest.mark.parametrize("q_len", [1, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tpu_kernel_lowers_for_mosaic(q_len, head_dim, dtype):
    f = functools.partial(pa.paged_attention, scale=0.1, sliding_window=None, backend="tpu")
    text = jax.jit(f).trace(*_shapes(4, q_len, 2, 4, head_dim, 16, 9, 80, dtype)).lower(
        lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text


# --------------------------------------------------------------------------- the stacked pool

def _stacked(args, layer, num_layers=3, seed=0):
    """The case's pool as layer `layer` of a [L, Hkv, N, S, D] pool whose other layers hold
    garbage: reading any other layer (or a copy of the wrong one) fails the comparison."""
    q, k, v = args[:3]
    rng = np.random.default_rng(seed)
    junk = lambda: jnp.asarray(rng.uniform(-GARBAGE, GARBAGE, (num_layers,) + k.shape), k.dtype)  # noqa: E731
    ks, vs = junk().at[layer].set(k), junk().at[layer].set(v)
    return (q, ks, vs) + tuple(args[3:])


@pytest.mark.parametrize("q_len", [1, 9])
def test_stacked_pool_read_in_place(q_len):
    """Given the whole stacked pool and a (traced) layer index, the kernel reads that layer."""
    seed = fresh_seed()
    args = make_case(seed, batch=3, q_len=q_len, num_kv_heads=2, group=2, head_dim=64,
                     page_size=8, max_pages=4, dtype=jnp.float32)
    ref = pa.paged_attention_ref(*args, scale=0.125)
    stacked = _stacked(args, layer=1, seed=seed)
    f = jax.jit(lambda layer, *a: pa.paged_attention(*a, scale=0.125, layer=layer,
                                                     interpret=True, poison=True))
    out = f(jnp.int32(1), *stacked)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=TOL[jnp.float32], rtol=0,
                               err_msg=f"seed={seed}")


# GPU tiles, run in interpret mode: decode's 16-row group tiles and split key ranges, prefill's
# >= 64-token tiles with the GQA group split over head_splits "virtual heads".
@pytest.mark.parametrize("q_len,group,head_dim", fast_subset([
    (1, 4, 128),      # Llama-3: group of 4 in a 16-row decode tile
    (100, 4, 128),    # two 64-token tiles x 2 head splits of 2 heads
    (70, 3, 64),      # SmolLM2's group of 3: the second split has one padded head slot
    (5, 1, 64),       # a short chunk: fewer tokens per tile, rows padded to 16
    (130, 8, 256),    # head_dim 256: 64-row tiles, a group of 8 in 8 splits
], 2))
def test_gpu_tiling_interpreted(q_len, group, head_dim):
    seed = fresh_seed()
    args = make_case(seed, batch=2, q_len=q_len, num_kv_heads=2, group=group, head_dim=head_dim,
                     page_size=16, max_pages=10, dtype=jnp.float32)
    out = pa.paged_attention(*_stacked(args, layer=2, seed=seed), scale=0.1, layer=2,
                             sliding_window=37 if q_len > 1 else None, interpret=True,
                             backend="gpu", poison=True)
    ref = pa.paged_attention_ref(*args, scale=0.1, sliding_window=37 if q_len > 1 else None)
    out32 = np.asarray(out)
    assert np.isfinite(out32).all(), f"seed={seed}"
    np.testing.assert_allclose(out32, np.asarray(ref), atol=TOL[jnp.float32], rtol=0,
                               err_msg=f"seed={seed}")


def test_gpu_tiling_choices():
    """Prefill tiles hold >= 64 tokens (fewer only for a shorter chunk); decode tiles the whole
    group; Hopper pipelines one stage deeper than Ampere."""
    t = pa._gpu_tiling("NVIDIA H200", decode=False, head_dim=128)
    assert t.rows >= 128 and t.num_stages == 3
    assert pa._gpu_tiling("NVIDIA A100-SXM4-80GB", decode=False, head_dim=128).num_stages == 2
    assert pa._gpu_tiling("NVIDIA H100 80GB HBM3", decode=True, head_dim=128).rows == 16


# --------------------------------------------------------------------------- TPU kernel, simulated
# TPU interpret mode runs the Mosaic kernel's DMAs, semaphores and SMEM/VMEM on CPU.

@pytest.mark.parametrize("q_len,page_size,group,dtype,window", fast_subset([
    (1, 8, 4, jnp.float32, None),
    (7, 16, 2, jnp.bfloat16, 11),
], 1))
def test_tpu_kernel_interpret(q_len, page_size, group, dtype, window):
    from jax.experimental.pallas import tpu as pltpu
    from pallas_kernels.paged_attention_tpu import paged_attention_tpu
    seed = fresh_seed()
    args = make_case(seed, batch=2, q_len=q_len, num_kv_heads=2, group=group, head_dim=64,
                     page_size=page_size, max_pages=5, dtype=dtype)
    try:   # the stacked pool, read in place at layer 1
        out = paged_attention_tpu(*_stacked(args, layer=1, seed=seed), scale=0.125,
                                  sliding_window=window, layer=jnp.int32(1), interpret=True,
                                  poison=True, pages_per_block=2, tokens_per_tile=2)
    finally:
        pltpu.reset_tpu_interpret_mode_state()
    ref = pa.paged_attention_ref(*args, scale=0.125, sliding_window=window)
    out32 = np.asarray(out, np.float32)
    assert np.isfinite(out32).all(), f"seed={seed}"
    np.testing.assert_allclose(out32, np.asarray(ref, np.float32), atol=TOL[dtype], rtol=0,
                               err_msg=f"seed={seed}")


# --------------------------------------------------------------------------- on a real device

@pytest.mark.gpu
@pytest.mark.skipif(ON_CPU, reason="needs a GPU or TPU")
@pytest.mark.parametrize("q_len", [1, 24])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_kernel_on_device(q_len, dtype):
    args = make_case(fresh_seed(), batch=8, q_len=q_len, num_kv_heads=2, group=4, head_dim=128,
                     page_size=16, max_pages=12, dtype=dtype)
    for w in (None, 50):
        out = jax.jit(functools.partial(pa.paged_attention, scale=0.088, sliding_window=w))(*args)
        ref = pa.paged_attention_ref(*args, scale=0.088, sliding_window=w)
        # Device dots may use TF32 for f32 inputs: bf16-level tolerance for both dtypes.
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                                   atol=3e-2, rtol=0)


# --------------------------------------------------------------------------- soft-capping, traced windows
# Gemma 2/3: a static soft-cap on the scores (s -> c * tanh(s / c) before masking), and each
# layer's sliding window chosen in-graph from the layer index: a traced int32 scalar, FULL_WINDOW
# for a mixed model's full-attention layers, one compiled program for every layer.
# Scale 0.5 on N(0, 1) queries and keys of head_dim 16 spreads the scores over |s| ~ 2-8;
# SOFTCAP = 2 saturates most of them, so an implementation that skipped (or misplaced) the cap
# lands far outside tolerance (asserted on the reference itself). Tolerances as TOL above: the cap
# is computed in float32 by every implementation and its slope is at most 1, so it adds no error
# beyond ~1 ulp of a score.

SOFTCAP = 2.0
CAP_SCALE = 0.5


def stale_nan(args, page_size):
    """make_case's inputs with every pool row that holds no sequence's token (past each kv_len,
    unused pages, the null page) set to NaN (even pages) or inf (odd pages): a key or value read
    without its mask, or masked by multiplying with 0, makes the output non-finite."""
    q, k, v, bt, lens, pos = args
    live = np.zeros(k.shape[1:3], bool)                                   # [pages, page_size]
    for b, L in enumerate(np.asarray(lens)):
        for j in range(int(L)):
            live[int(bt[b, j // page_size]), j % page_size] = True
    bad = np.where(np.arange(k.shape[1])[:, None] % 2 == 0, np.nan, np.inf)  # [pages, 1]
    stale = lambda x: jnp.asarray(np.where(live[None, :, :, None], np.asarray(x, np.float32),  # noqa: E731
                                           bad[None, :, :, None]), x.dtype)
    return (q, stale(k), stale(v), bt, lens, pos)


def capped_implementations(q_len):
    """Every attention implementation of the pool, called as f(*args, scale=, sliding_window=,
    softcap=), in small tiles (several page blocks, splits, token tiles per call)."""
    from jaxserve.model.attention import paged_attention_xla
    from pallas_kernels.paged_attention_tpu import paged_attention_tpu
    tiles = (dict(pages_per_block=2, num_splits=2) if q_len == 1 else
             dict(pages_per_block=2, tokens_per_tile=4))
    return {"xla": paged_attention_xla,
            "pallas": functools.partial(pa.paged_attention, interpret=True, poison=True, **tiles),
            "pallas-gpu-tiles": functools.partial(pa.paged_attention, interpret=True, poison=True,
                                                  backend="gpu"),
            "tpu": functools.partial(paged_attention_tpu, interpret=True, poison=True,
                                     pages_per_block=2, tokens_per_tile=2)}


@pytest.mark.parametrize("q_len,dtype,softcap", [
    (1, jnp.float32, SOFTCAP),     # decode
    (6, jnp.bfloat16, SOFTCAP),    # a chunk of prefill, ragged rows
    (1, jnp.bfloat16, None),
    (6, jnp.float32, None),
])
def test_softcap_and_traced_window(q_len, dtype, softcap):
    """Each implementation under jit with the window a traced argument: one trace serves a
    sliding layer (window 5) and a full layer (FULL_WINDOW, which must equal no window), with
    and without the soft-cap, over a pool whose non-token rows are NaN/inf (selected out, never
    multiplied by 0)."""
    from jax.experimental.pallas import tpu as pltpu
    from jaxserve.model.attention import FULL_WINDOW
    seed = fresh_seed()
    S = 8
    # Full last pages: every sequence holds >= 8 keys, so window 5 hides some of them.
    args = make_case(seed, batch=3, q_len=q_len, num_kv_heads=2, group=2, head_dim=16,
                     page_size=S, max_pages=4, dtype=dtype, last_page="full")
    ref = functools.partial(pa.paged_attention_ref, *args, scale=CAP_SCALE)
    refs = {w: np.asarray(ref(sliding_window=None if w == FULL_WINDOW else w, softcap=softcap),
                          np.float32) for w in (5, FULL_WINDOW)}
    # The case is one where each option matters.
    assert np.abs(refs[5] - refs[FULL_WINDOW]).max() > 10 * TOL[dtype], f"seed={seed}"
    if softcap is not None:
        uncapped = np.asarray(ref(sliding_window=None), np.float32)
        assert np.abs(uncapped - refs[FULL_WINDOW]).max() > 10 * TOL[dtype], f"seed={seed}"
    nan_args = stale_nan(args, S)
    pad = np.asarray(args[5]) < 0
    for name, impl in capped_implementations(q_len).items():
        traces = []

        def attend(window, *a, impl=impl, traces=traces):
            traces.append(window)
            return impl(*a, scale=CAP_SCALE, sliding_window=window, softcap=softcap)

        attend = jax.jit(attend)
        try:
            outs = {w: np.asarray(attend(jnp.int32(w), *nan_args), np.float32) for w in refs}
        finally:
            pltpu.reset_tpu_interpret_mode_state()
        assert len(traces) == 1, f"{name}: the window must not be static (traced {len(traces)}x)"
        for w, out in outs.items():
            msg = f"{name}, window {w}, seed={seed}"
            assert np.isfinite(out).all(), f"{msg}: non-finite output (a masked row leaked)"
            assert (out[pad] == 0).all(), f"{msg}: padding queries must give exact zeros"
            np.testing.assert_allclose(out, refs[w], atol=TOL[dtype], rtol=0, err_msg=msg)


def test_xla_full_window_and_no_options_unchanged():
    """The XLA path with FULL_WINDOW (traced) is no window, bit for bit, and window=None,
    softcap=None compute what they did before the options existed: the reference's masked
    softmax (tolerance) and a layer read in place (bit for bit against its own slice)."""
    from jaxserve.model.attention import FULL_WINDOW, paged_attention_xla
    seed = fresh_seed()
    args = make_case(seed, batch=3, q_len=5, num_kv_heads=2, group=2, head_dim=16, page_size=8,
                     max_pages=4, dtype=jnp.float32)
    plain = jax.jit(functools.partial(paged_attention_xla, scale=CAP_SCALE))(*args)
    full = jax.jit(lambda w, *a: paged_attention_xla(*a, scale=CAP_SCALE, sliding_window=w))(
        jnp.int32(FULL_WINDOW), *args)
    np.testing.assert_array_equal(np.asarray(full), np.asarray(plain), err_msg=f"seed={seed}")
    for softcap in (None, 50.0):   # Gemma 2's cap: barely bends scores this small
        out = paged_attention_xla(*args, scale=CAP_SCALE, softcap=softcap)
        ref = pa.paged_attention_ref(*args, scale=CAP_SCALE, softcap=softcap)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=TOL[jnp.float32],
                                   rtol=0, err_msg=f"seed={seed}")


def test_softcap_must_be_static():
    args = make_case(0, batch=1, q_len=1, num_kv_heads=1, group=1, head_dim=16, page_size=8,
                     max_pages=2, dtype=jnp.float32)
    f = jax.jit(lambda c, *a: pa.paged_attention(*a, scale=0.1, softcap=c, interpret=True))
    with pytest.raises(TypeError, match="softcap must be a static float"):
        f(jnp.float32(2.0), *args)
    with pytest.raises(ValueError, match="positive"):
        pa.paged_attention(*args, scale=0.1, softcap=0.0, interpret=True)


@pytest.mark.parametrize("q_len", [1, 32])
def test_softcap_and_traced_window_lower_for_gpu_and_tpu(q_len):
    """The soft-capped kernels with a traced window lower for Triton and Mosaic (tanh in both)."""
    def f(window, *a, backend):
        return pa.paged_attention(*a, scale=0.1, sliding_window=window, softcap=50.0,
                                  backend=backend)
    shapes = _shapes(4, q_len, 2, 4, 128, 16, 9, 80, jnp.bfloat16)
    window = jax.ShapeDtypeStruct((), jnp.int32)
    gpu = jax.jit(functools.partial(f, backend="gpu")).trace(window, *shapes).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "triton" in gpu
    tpu = jax.jit(functools.partial(f, backend="tpu")).trace(window, *shapes).lower(
        lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in tpu


@pytest.mark.parametrize("q_len", [1, 5])
def test_pallas_backend_softcap_traced_window(q_len):
    """PallasBackend.attention (interpret mode; with and without a mesh, where the traced window
    enters the shard_map as a replicated operand) = XlaBackend.attention, soft-capped, the layer
    and the window traced arguments of the jitted step."""
    from jaxserve import sharding
    from jaxserve.backends.base import XlaBackend
    from jaxserve.backends.pallas import PallasBackend
    from jaxserve.config import ModelConfig
    from jaxserve.model.attention import FULL_WINDOW
    from jaxserve.model.kv_cache import KVPages, StepInput
    seed = fresh_seed()
    q, k, v, bt, lens, pos = make_case(seed, batch=2, q_len=q_len, num_kv_heads=2, group=2,
                                       head_dim=16, page_size=8, max_pages=3,
                                       dtype=jnp.float32, last_page="full")
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16)
    kv = KVPages(k=jnp.stack([k, -v]), v=jnp.stack([k * 0.5, v]))
    zeros = jnp.zeros((pos.size,), jnp.int32)
    step = StepInput(tokens=jnp.zeros(pos.shape, jnp.int32), positions=pos, block_tables=bt,
                     kv_lens=lens, slot_pages=zeros, slot_offsets=zeros,
                     logits_index=jnp.zeros((pos.shape[0],), jnp.int32))

    def attend(backend):
        return jax.jit(lambda q, kv, layer, window, step: backend.attention(
            q, kv, layer, step, scale=CAP_SCALE, sliding_window=window, softcap=SOFTCAP))

    xla = attend(XlaBackend(cfg, jnp.float32))
    for mesh in (None, sharding.make_mesh(1)):
        pallas = attend(PallasBackend(cfg, jnp.float32, mesh=mesh, interpret=True))
        for layer, window in ((1, 3), (0, FULL_WINDOW)):
            args = (q, kv, jnp.int32(layer), jnp.int32(window), step)
            np.testing.assert_allclose(np.asarray(pallas(*args)), np.asarray(xla(*args)),
                                       atol=TOL[jnp.float32], rtol=0,
                                       err_msg=f"seed={seed}, mesh {mesh}, layer {layer}")
