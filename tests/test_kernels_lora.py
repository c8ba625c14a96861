"""Gathered-LoRA kernels (MBGMV, MBGMM) and the XLA path against the references, interpret mode.

Fresh random inputs each run. Rows of A and B beyond each adapter's rank hold large garbage (1e3,
and some NaN in B), so a rank mask that leaks moves the result far outside tolerance. Kernels run with poison=True
(outputs start as NaN). Mixed ranks 8..128 share one max_rank=128 pool; idx mixes -1 ("no
adapter") with every slot.

Tolerances (max abs error vs an f32 reference; |y| is O(1) by construction, see make_case):
  f32:  1e-4. Different summation order over in_dim <= 256 and rank <= 128 products of O(0.1)
        terms; observed ~1e-6.
  bf16: 3e-2 absolute + 2e-2 relative. The reference computes in f32 from the same bf16 inputs;
        the kernels round v (rank-dim intermediate) to bf16 before the expand matmul in MBGMM
        (rel. 2^-9 per term) and the result is rounded to bf16 (rel. 2^-9).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels import lora

GARBAGE = 1e3
TOL = {jnp.float32: dict(atol=1e-4, rtol=0), jnp.bfloat16: dict(atol=3e-2, rtol=2e-2)}
ON_CPU = jax.default_backend() == "cpu"


def fresh_seed():
    return int(np.random.SeedSequence().entropy % (1 << 31))


def make_case(seed, *, tokens, in_dim, out_dim, num_slots, max_rank=128, dtype=jnp.float32,
              ranks=None, no_adapter_share=0.25):
    rng = np.random.default_rng(seed)
    if ranks is None:
        choices = [r for r in (8, 16, 24, 32, 64, 128) if r <= max_rank]
        ranks = rng.choice(choices, num_slots)
    ranks = np.asarray(ranks, np.int32)
    a = rng.uniform(-GARBAGE, GARBAGE, (num_slots, max_rank, in_dim))
    b = rng.uniform(-GARBAGE, GARBAGE, (num_slots, max_rank, out_dim))
    b[rng.random(b.shape) < 0.01] = np.nan   # rows past rank may be NaN (overwritten below)
    for s, r in enumerate(ranks):       # real rows scaled so x A^T B stays O(1)
        a[s, :r] = rng.standard_normal((r, in_dim)) / np.sqrt(in_dim)
        b[s, :r] = rng.standard_normal((r, out_dim)) / np.sqrt(r)
    scales = rng.uniform(0.25, 2.0, num_slots).astype(np.float32)
    idx = rng.integers(0, num_slots, tokens).astype(np.int32)
    idx[rng.random(tokens) < no_adapter_share] = -1
    x = rng.standard_normal((tokens, in_dim))
    c = lambda v: jnp.asarray(v, dtype)
    return c(x), c(a), c(b), jnp.asarray(idx), jnp.asarray(ranks), jnp.asarray(scales)


def assert_close(out, ref, dtype, seed):
    out32, ref32 = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out32).all(), f"seed={seed}: non-finite output (unwritten or leaked)"
    np.testing.assert_allclose(out32, ref32, err_msg=f"seed={seed}", **TOL[dtype])


def run_kernel(kernel, case, **kw):
    fn = lora.mbgmv if kernel == "bgmv" else lora.mbgmm
    return fn(*case, interpret=True, poison=True, **kw)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kernel", ["bgmv", "bgmm"])
def test_kernel_mixed_ranks(kernel, dtype):
    seed = fresh_seed()
    case = make_case(seed, tokens=12 if kernel == "bgmv" else 40, in_dim=128, out_dim=96,
                     num_slots=6, ranks=[8, 128, 16, 64, 24, 32], dtype=dtype)
    out = run_kernel(kernel, case, **({"tile": 8} if kernel == "bgmm" else {}))
    ref = lora.gathered_lora_ref(*case)
    assert_close(out, ref, dtype, seed)
    idx = np.asarray(case[3])
    assert (np.asarray(out)[idx < 0] == 0).all(), "no-adapter tokens must get exact zeros"


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**31 - 1), kernel=st.sampled_from(["bgmv", "bgmm"]),
       tokens=st.integers(1, 20), in_dim=st.sampled_from([64, 96, 256]),
       out_dim=st.sampled_from([32, 64, 160]), num_slots=st.integers(1, 5),
       max_rank=st.sampled_from([16, 64, 128]), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       tile=st.sampled_from([4, 8, 16]))
@pytest.mark.slow
def test_random_shapes(seed, kernel, tokens, in_dim, out_dim, num_slots, max_rank, dtype, tile):
    case = make_case(seed, tokens=tokens, in_dim=in_dim, out_dim=out_dim, num_slots=num_slots,
                     max_rank=max_rank, dtype=dtype)
    out = run_kernel(kernel, case, **({"tile": tile} if kernel == "bgmm" else {}))
    assert_close(out, lora.gathered_lora_ref(*case), dtype, seed)


def test_all_tokens_one_adapter_and_none():
    seed = fresh_seed()
    for share in (0.0, 1.0):
        case = make_case(seed, tokens=10, in_dim=64, out_dim=64, num_slots=3, max_rank=32,
                         no_adapter_share=share)
        case = (case[0], case[1], case[2], jnp.where(case[3] >= 0, 1, -1).astype(jnp.int32),
                *case[4:])
        ref = lora.gathered_lora_ref(*case)
        for kernel in ("bgmv", "bgmm"):
            assert_close(run_kernel(kernel, case), ref, jnp.float32, seed)


def test_xla_path_and_ragged_dot_reference():
    seed = fresh_seed()
    for dtype in (jnp.float32, jnp.bfloat16):
        case = make_case(seed, tokens=33, in_dim=96, out_dim=80, num_slots=7, dtype=dtype)
        ref = lora.gathered_lora_ref(*case)
        assert_close(lora.gathered_lora(*case, impl="xla"), ref, dtype, seed)
        assert_close(lora.gathered_lora_ragged_ref(*case), ref, dtype, seed)


def test_shrink_expand_pieces():
    seed = fresh_seed()
    x, a, b, idx, ranks, scales = make_case(seed, tokens=9, in_dim=64, out_dim=48, num_slots=4)
    v = np.asarray(lora.lora_shrink(x, a, idx, ranks))
    x_, a_, b_ = (np.asarray(t, np.float64) for t in (x, a, b))
    for t, s in enumerate(np.asarray(idx)):
        want = np.zeros(a.shape[1])
        y_want = np.zeros(b.shape[2])
        if s >= 0:
            r = int(ranks[s])
            want[:r] = a_[s, :r] @ x_[t]
            y_want = float(scales[s]) * want[:r] @ b_[s, :r]
        np.testing.assert_allclose(v[t], want, atol=1e-4, err_msg=f"seed={seed} t={t}")
        y = np.asarray(lora.lora_expand(jnp.asarray(v), b, idx, scales, ranks))[t]
        np.testing.assert_allclose(y, y_want, atol=1e-4, err_msg=f"seed={seed} t={t}")


def test_group_tokens_layout():
    rng = np.random.default_rng(fresh_seed())
    S, tile = 5, 4
    idx = rng.integers(-1, S, 29).astype(np.int32)
    order, dest, tile_slot = (np.asarray(t) for t in lora.group_tokens(jnp.asarray(idx), S, tile))
    assert sorted(order.tolist()) == list(range(len(idx)))
    assert len(set(dest.tolist())) == len(idx), "two tokens share a padded row"
    for i, row in enumerate(dest):
        want = idx[order[i]]
        assert tile_slot[row // tile] == (want if want >= 0 else -1)
    assert len(tile_slot) * tile >= dest.max() + 1


def test_entry_point_dispatch():
    seed = fresh_seed()
    case = make_case(seed, tokens=6, in_dim=64, out_dim=32, num_slots=3, max_rank=16)
    ref = lora.gathered_lora_ref(*case)
    for kernel in ("auto", "bgmv", "bgmm"):
        out = lora.gathered_lora(*case, impl="pallas", interpret=True, kernel=kernel)
        assert out.dtype == case[0].dtype
        assert_close(out, ref, jnp.float32, seed)
    with pytest.raises(ValueError):
        lora.gathered_lora(*case, impl="onehot")


# --------------------------------------------------------------------------- lowering checks

@pytest.mark.parametrize("kernel,tokens", [("bgmv", 64), ("bgmm", 300)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_for_gpu_triton(kernel, tokens, dtype):
    sds = jax.ShapeDtypeStruct
    S, R, IN, OUT = 5, 8, 896, 640         # non-power-of-two dims, rank padded to 16 for Triton
    shapes = [sds((tokens, IN), dtype), sds((S, R, IN), dtype), sds((S, R, OUT), dtype),
              sds((tokens,), jnp.int32), sds((S,), jnp.int32), sds((S,), jnp.float32)]
    f = functools.partial(lora.gathered_lora, impl="pallas", kernel=kernel, backend="gpu")
    text = jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tpu_grouped_path(dtype):
    """The TPU path (two ragged_dot grouped matmuls over slot-sorted tokens) against the
    reference, here on CPU, and it lowers for TPU where the Pallas kernels do not exist."""
    seed = fresh_seed()
    case = make_case(seed, tokens=37, in_dim=96, out_dim=80, num_slots=6, dtype=dtype)
    out = lora.gathered_lora(*case, impl="pallas", backend="tpu")
    assert out.dtype == dtype
    assert_close(out, lora.gathered_lora_ref(*case), dtype, seed)
    shapes = [jax.ShapeDtypeStruct(t.shape, t.dtype) for t in case]
    f = functools.partial(lora.gathered_lora, impl="pallas", backend="tpu")
    text = jax.jit(f).trace(*shapes).lower(lowering_platforms=("tpu",)).as_text()
    assert "ragged_dot" in text or "ragged" in text


# --------------------------------------------------------------------------- on a real device

@pytest.mark.gpu
@pytest.mark.skipif(ON_CPU, reason="needs a GPU or TPU")
@pytest.mark.parametrize("tokens", [48, 400])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_kernel_on_device(tokens, dtype):
    seed = fresh_seed()
    case = make_case(seed, tokens=tokens, in_dim=512, out_dim=384, num_slots=16, dtype=dtype)
    out = jax.jit(functools.partial(lora.gathered_lora, impl="pallas"))(*case)
    # Device matmuls may use TF32 for f32 inputs: the bf16 tolerance for both.
    assert_close(out, lora.gathered_lora_ref(*case), jnp.bfloat16, seed)
