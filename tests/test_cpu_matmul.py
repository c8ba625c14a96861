"""The native small-M bf16 matmul kernels (jaxserve/backends/cpu/cpu_matmul.*) and their use in llama.

Seeds are fresh each run and printed on failure. The whole module skips when the kernel is
unavailable (no compiler, JAXSERVE_CPU_KERNELS=0, not the CPU backend).

Tolerance (kernel against a float32 numpy product of the same values, per output element y[m, n]):

    |y - ref| <= 2 * K * 2^-24 * S[m, n],   S = |x| @ |w|  (sum_k |x_mk w_kn|)

Both sides compute the same exact inputs (bf16 weights widen to float32 exactly; x is the same
float32/bf16 value) in float32: only the rounding of the products and of the summation differ.
A float32 sum of K products, in any order, is within gamma_K * S ~ K * u * S of the exact value
(u = 2^-24, the float32 unit roundoff; the kernel's fused multiply-adds round each product
zero times, numpy/BLAS at most once, which gamma_K covers); two such results are within twice
that. This worst-case bound is loose (typical errors are ~sqrt(K) * u * S), so test_exact_integers
adds a check that catches any wrong or missing term exactly: small integer inputs, for which
every partial sum is an integer below 2^24 and every order of summation gives the exact result.

llama._proj casts the float32 result to x.dtype (bf16) and adds the bias in bf16: comparing the
kernel path with the XLA path there adds one bf16 rounding per side per step (at most half an
ulp, 2^-8 relative, each): 2^-7 * (|y| + |y + b|) on top of the float32 bound.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.backends.cpu import cpu_matmul
from jaxserve.model import llama

if not cpu_matmul.available():
    pytest.skip(f"native CPU matmul kernel unavailable: {cpu_matmul.unavailable_reason()}",
                allow_module_level=True)

U = 2.0 ** -24


def fresh_seed():
    return int(np.random.SeedSequence().entropy % (1 << 31))


def f32(a):
    return np.asarray(jnp.asarray(a).astype(jnp.float32))


def check(y, x, w, transposed, seed, what=""):
    """y: the kernel's result for x [..., K] and w ([K, N], or [N, K] when transposed)."""
    xf, wf = f32(x), f32(w)
    wk = wf.T if transposed else wf                       # [K, N]
    K = wk.shape[0]
    assert y.dtype == jnp.float32 and y.shape == x.shape[:-1] + (wk.shape[1],), \
        f"seed={seed} {what}: {y.shape} {y.dtype}"
    ref = xf @ wk
    S = np.abs(xf) @ np.abs(wk)
    err = np.abs(np.asarray(y) - ref) - 2 * K * U * S
    assert np.isfinite(np.asarray(y)).all(), f"seed={seed} {what}: non-finite output"
    assert (err <= 0).all(), (f"seed={seed} {what}: off by {err.max():.3e} over the tolerance "
                              f"at {np.unravel_index(err.argmax(), err.shape)}")


mm = jax.jit(cpu_matmul.matmul)
mm_t = jax.jit(cpu_matmul.matmul_t)

ROWS = [1, 2, 3, 5, 8, 17]
SHAPES = [(576, 960), (100, 37), (1536, 576), (7, 3), (64, 200)]   # (K, N)


@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("w_dtype", [jnp.bfloat16, jnp.float32])
def test_matches_reference(K, N, x_dtype, w_dtype):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal((K, N), np.float32) * 0.05, w_dtype)
    e = jnp.asarray(rng.standard_normal((N, K), np.float32) * 0.05, w_dtype)
    for M in ROWS:
        x = jnp.asarray(rng.standard_normal((M, K), np.float32), x_dtype)
        what = f"M={M} K={K} N={N} x {x_dtype.__name__} w {w_dtype.__name__}"
        check(mm(x, w), x, w, False, seed, "matmul " + what)
        check(mm_t(x, e), x, e, True, seed, "matmul_t " + what)


@pytest.mark.parametrize("K,N", [(576, 960), (100, 37), (33, 65)])
def test_exact_integers(K, N):
    """Integer inputs: every partial sum is exact, so any summation order gives the exact result
    and the kernel must match it bit for bit (a skipped, repeated or misplaced term shows)."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    for M in ROWS:
        x = rng.integers(-8, 9, (M, K)).astype(np.float32)
        w = rng.integers(-16, 17, (K, N)).astype(np.float32)
        ref = x @ w                                     # |partial sums| <= 1536 * 128 < 2^24
        for xd in (jnp.float32, jnp.bfloat16):
            for wd in (jnp.bfloat16, jnp.float32):
                xj = jnp.asarray(x, xd)
                np.testing.assert_array_equal(np.asarray(mm(xj, jnp.asarray(w, wd))), ref,
                                              err_msg=f"seed={seed} matmul M={M} w {wd}")
                np.testing.assert_array_equal(np.asarray(mm_t(xj, jnp.asarray(w.T, wd))), ref,
                                              err_msg=f"seed={seed} matmul_t M={M} w {wd}")


def test_leading_dims_and_large_values():
    """[..., K] inputs are flattened and restored; values far from 1 stay within tolerance."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal((96, 70), np.float32) * 30.0, jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((2, 3, 96), np.float32) * 1e3)
    y = mm(x, w)
    assert y.shape == (2, 3, 70)
    check(y, x, w, False, seed, "3-D x")
    y_t = mm_t(x[0], w.T)
    check(y_t, x[0], w.T, True, seed, "2-D x, transposed")
    empty = cpu_matmul.matmul(jnp.zeros((0, 96)), w)
    assert empty.shape == (0, 70) and empty.dtype == jnp.float32


def test_python_errors():
    x = jnp.ones((2, 8), jnp.float32)
    w = jnp.ones((8, 4), jnp.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        cpu_matmul.matmul(x, w.astype(jnp.float16))
    with pytest.raises(ValueError, match=r"K 8 != 5"):
        cpu_matmul.matmul(x, jnp.ones((5, 4), jnp.bfloat16))
    with pytest.raises(ValueError, match=r"K 8 != 4"):
        cpu_matmul.matmul_t(x, w)                      # e must be [N, K]
    with pytest.raises(ValueError, match="2-D"):
        cpu_matmul.matmul(x, jnp.ones((1, 8, 4), jnp.bfloat16))
    with pytest.raises(ValueError, match="float"):
        cpu_matmul.matmul(jnp.ones((2, 8), jnp.int32), w)
    # float16 x is widened to float32 first
    check(cpu_matmul.matmul(x.astype(jnp.float16), w), x, w, False, None, "float16 x")


def test_kernel_validates_operands():
    """The custom call itself rejects bad operands with a clear message (called directly)."""
    x = jnp.ones((2, 8), jnp.float32)
    w = jnp.ones((8, 4), jnp.bfloat16)

    def call(target, out_shape, out_dtype, *args):
        return jax.block_until_ready(jax.ffi.ffi_call(
            target, jax.ShapeDtypeStruct(out_shape, out_dtype))(*args))

    with pytest.raises(Exception, match="W must be bfloat16 or float32, got float16"):
        call(cpu_matmul.TARGET, (2, 4), jnp.float32, x, w.astype(jnp.float16))
    with pytest.raises(Exception, match="E must be bfloat16 or float32, got another dtype"):
        call(cpu_matmul.TARGET_T, (2, 4), jnp.float32, x, w.T.astype(jnp.int32))
    with pytest.raises(Exception, match="x must be float32 or bfloat16, got float16"):
        call(cpu_matmul.TARGET, (2, 4), jnp.float32, x.astype(jnp.float16), w)
    with pytest.raises(Exception, match="contracting dims differ"):
        call(cpu_matmul.TARGET_T, (2, 8), jnp.float32, x, w)
    with pytest.raises(Exception, match=r"result must be float32 \[M=2, N=4\]"):
        call(cpu_matmul.TARGET, (2, 5), jnp.float32, x, w)
    with pytest.raises(Exception, match="x must be \\[M, K\\]"):
        call(cpu_matmul.TARGET, (2, 4), jnp.float32, x[None], w)


def test_disabled(monkeypatch):
    monkeypatch.setenv("JAXSERVE_CPU_KERNELS", "0")
    assert not cpu_matmul.available()
    x, w = jnp.ones((2, 8)), jnp.ones((8, 4), jnp.bfloat16)
    assert not cpu_matmul.use_for(x, w)
    with pytest.raises(RuntimeError, match="JAXSERVE_CPU_KERNELS=0"):
        cpu_matmul.matmul(x, w)


# --------------------------------------------------------------------------- llama dispatch

def _uses_kernel(fn, *args):
    text = jax.jit(fn).lower(*args).as_text()
    return cpu_matmul.TARGET in text or cpu_matmul.TARGET_T in text


def _bf16_close(out, ref_f32_y, extra, K, S, seed, what):
    """out: bf16 result of the kernel path; ref: the XLA path's bf16 result; see the module
    docstring for the bound."""
    bound = 2 * K * U * S + 2.0 ** -7 * extra
    err = np.abs(f32(out) - f32(ref_f32_y)) - bound * 1.001
    assert (err <= 0).all(), f"seed={seed} {what}: off by {err.max():.3e} over the tolerance"


@pytest.mark.parametrize("bias", [False, True])
def test_proj_two_rows_matches_xla_path(monkeypatch, bias):
    """llama._proj on bf16 weights with 2 rows (batch-2 decode) takes the kernel under jit and
    gives the XLA path's result; with the kernel disabled it is the XLA path."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    K, N = 576, 960
    x = jnp.asarray(rng.standard_normal((2, 1, K), np.float32), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((K, N), np.float32) * 0.05, jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((N,), np.float32), jnp.bfloat16) if bias else None

    def xla_path(x, w, b):
        y = jnp.einsum("bth,ho->bto", x, w, preferred_element_type=jnp.float32).astype(x.dtype)
        return y if b is None else y + b.astype(y.dtype)

    proj = lambda x, w, b: llama._proj(x, w, b)
    assert _uses_kernel(proj, x, w, b)
    out = jax.jit(proj)(x, w, b)
    ref = jax.jit(xla_path)(x, w, b)
    assert out.dtype == ref.dtype == jnp.bfloat16 and out.shape == ref.shape == (2, 1, N)
    y = f32(x) @ f32(w)
    S = np.abs(f32(x)) @ np.abs(f32(w))
    extra = np.abs(y) + (np.abs(y + f32(b)) if bias else 0.0)
    _bf16_close(out, ref, extra, K, S, seed, "_proj kernel vs XLA")

    # Outside ROW_RANGES: the XLA path (bf16: more than MAX_ROWS rows; f32: one row, or more
    # than its maximum); other weight dtypes too.
    x9 = jnp.asarray(rng.standard_normal((cpu_matmul.MAX_ROWS + 1, 1, K)), jnp.bfloat16)
    assert not _uses_kernel(proj, x9, w, b)
    lo, hi = cpu_matmul.ROW_RANGES["float32", "nn"]
    w32 = w.astype(jnp.float32)
    assert _uses_kernel(proj, jnp.zeros((lo, 1, K)), w32, b)
    assert not _uses_kernel(proj, jnp.zeros((lo - 1, 1, K)), w32, b)
    assert not _uses_kernel(proj, jnp.zeros((hi + 1, 1, K)), w32, b)
    assert not _uses_kernel(proj, x.astype(jnp.float16), w.astype(jnp.float16), b)

    monkeypatch.setenv("JAXSERVE_CPU_KERNELS", "0")
    proj_off = lambda x, w, b: llama._proj(x, w, b)      # a fresh function: traced again
    assert not _uses_kernel(proj_off, x, w, b)
    np.testing.assert_array_equal(f32(jax.jit(proj_off)(x, w, b)), f32(ref))


@pytest.mark.parametrize("tied", [True, False])
def test_lm_head_two_rows_matches_xla_path(monkeypatch, tied):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    H, V = 576, 4099                                    # V not a multiple of any block
    h = jnp.asarray(rng.standard_normal((2, H), np.float32), jnp.bfloat16)
    emb = jnp.asarray(rng.standard_normal((V, H), np.float32) * 0.05, jnp.bfloat16)
    head_w = None if tied else jnp.asarray(rng.standard_normal((H, V), np.float32) * 0.05,
                                           jnp.bfloat16)
    weights = types.SimpleNamespace(embed=emb, lm_head=head_w)
    wk = f32(emb).T if tied else f32(head_w)             # [H, V]

    def xla_path(h):
        if tied:
            return jnp.einsum("...h,vh->...v", h, emb, preferred_element_type=jnp.float32)
        return jnp.einsum("...h,hv->...v", h, head_w, preferred_element_type=jnp.float32)

    head = lambda h: llama.lm_head(weights, h)
    assert _uses_kernel(head, h)
    out = jax.jit(head)(h)
    ref = jax.jit(xla_path)(h)
    assert out.dtype == ref.dtype == jnp.float32 and out.shape == ref.shape == (2, V)
    S = np.abs(f32(h)) @ np.abs(wk)
    err = np.abs(np.asarray(out) - np.asarray(ref)) - 2 * H * U * S
    assert (err <= 0).all(), f"seed={seed}: lm_head off by {err.max():.3e} over the tolerance"
    check(out, h, emb if tied else head_w, tied, seed, "lm_head")

    monkeypatch.setenv("JAXSERVE_CPU_KERNELS", "0")
    head_off = lambda h: llama.lm_head(weights, h)
    assert not _uses_kernel(head_off, h)
    np.testing.assert_array_equal(np.asarray(jax.jit(head_off)(h)), np.asarray(ref))


def test_builds_into_cache_dir(tmp_path):
    """A fresh cache dir gets cpu_matmul-<key>.so (no temporary left behind)."""
    env = dict(os.environ, JAXSERVE_CACHE_DIR=str(tmp_path), JAX_PLATFORMS="cpu")
    env.pop("JAXSERVE_CPU_KERNELS", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", "from jaxserve.backends.cpu import cpu_matmul as c; "
                        "print('AVAILABLE', c.available())"], env=env, cwd=root,
                       capture_output=True, text=True, timeout=300)
    assert "AVAILABLE True" in r.stdout, r.stderr
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 1 and files[0].startswith("cpu_matmul-") and files[0].endswith(".so")


def _tiny_llama_case(tmp_path, tied):
    """A fresh tiny HF Llama saved to tmp_path and loaded by us, a 14-token prompt as a 9-token
    prefill chunk then one token per step, and HF's float32 logits for it:
    (seed, model, chunks, ref)."""
    import tests.test_model_hf as hf_test
    from jaxserve.loader import load_hf_dir
    from tests.tiny_models import make_hf_model

    seed = fresh_seed()
    hf = make_hf_model("llama", tmp_path, seed=seed % 1000, tie_word_embeddings=tied)
    model = load_hf_dir(str(tmp_path))
    ids = np.random.default_rng(seed).integers(0, 512, size=14).tolist()
    chunks = [ids[:9]] + [[t] for t in ids[9:]]
    return seed, model, chunks, hf_test.hf_logits(hf, ids)


@pytest.mark.parametrize("tied", [False, True])
def test_bf16_decode_steps_close_to_hf(monkeypatch, tmp_path, tied):
    """End to end: a tiny bf16 Llama run as a 9-token prefill then one token per step (1 row:
    every projection and the LM head of those steps take the kernel, inside the layer scan) stays
    as close to HF's float32 logits as test_model_hf's bf16 check demands, and as close as the
    same run on the XLA path."""
    import tests.test_model_hf as hf_test

    seed, model, chunks, ref = _tiny_llama_case(tmp_path, tied)

    calls = []
    real = (cpu_matmul.matmul, cpu_matmul.matmul_t)
    monkeypatch.setattr(cpu_matmul, "matmul", lambda *a: calls.append("nn") or real[0](*a))
    monkeypatch.setattr(cpu_matmul, "matmul_t", lambda *a: calls.append("nt") or real[1](*a))

    def run():   # a fresh jit each time: traced again with the current dispatch
        monkeypatch.setattr(hf_test, "_forward", jax.jit(
            llama.forward, static_argnames=("cfg", "all_logits", "attn_impl")))
        return hf_test.paged_prefill_logits(model, chunks, dtype=jnp.bfloat16)

    ours = run()
    assert ("nt" if tied else "nn") in calls and calls.count("nn") >= 4, calls
    bound = 0.15 * max(1.0, np.abs(ref).max() / 5)      # test_model_hf's bf16 bound
    assert np.abs(ours - ref).max() < bound, f"seed={seed}"
    monkeypatch.setattr(cpu_matmul, "ROW_RANGES", {})   # everything on the XLA path
    calls.clear()
    xla = run()
    assert not calls
    assert np.abs(xla - ref).max() < bound, f"seed={seed}"
    # The two paths differ by float32 summation order before bf16 rounding: far below the
    # bf16 drift against HF.
    assert np.abs(ours - xla).max() < bound, f"seed={seed}"


def test_f32_proj_matches_xla_path():
    """float32 weights (the CPU default dtype) take the kernel within their ROW_RANGES: same
    result as the XLA path within the float32 bound (no bf16 rounding here)."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    K, N = 576, 960
    w = jnp.asarray(rng.standard_normal((K, N), np.float32) * 0.05)
    lo, hi = cpu_matmul.ROW_RANGES["float32", "nn"]
    for rows in (lo, hi):
        x = jnp.asarray(rng.standard_normal((rows, 1, K), np.float32))
        proj = lambda x, w: llama._proj(x, w)
        assert _uses_kernel(proj, x, w)
        out = jax.jit(proj)(x, w)
        ref = jnp.einsum("bth,ho->bto", x, w, preferred_element_type=jnp.float32)
        S = np.abs(f32(x)) @ np.abs(f32(w))
        err = np.abs(f32(out) - f32(ref)) - 2 * K * U * S
        assert (err <= 0).all(), f"seed={seed} rows={rows}: off by {err.max():.3e}"


# ----------------------------------------------------------------------------- AMX, packed W
#
# matmul_amx multiplies bf16 x by bf16 W on the tile unit: exact products (bf16 x bf16 fits in
# float32) summed in float32, so the float32 bound above holds as it is. Without AMX (or for
# float32 x) it is an XLA einsum over the packed layout: the same bound.

amx = pytest.mark.skipif(not cpu_matmul.amx_available(), reason="no AMX on this CPU")
mm_amx = jax.jit(cpu_matmul.matmul_amx)
AMX_ROWS = [1, 5, 16, 17, 33, 64, 100]


@pytest.mark.parametrize("K,N", SHAPES + [(576, 3072), (32, 32)])
def test_amx_pack_round_trip(K, N):
    seed = fresh_seed()
    w = jnp.asarray(np.random.default_rng(seed).standard_normal((K, N)), jnp.bfloat16)
    p = cpu_matmul.pack_amx(w)
    assert p.shape == (K, N) and p.data.shape == (-(-N // 32), -(-K // 32), 2, 16, 32)
    np.testing.assert_array_equal(np.asarray(p.unpack()), np.asarray(w), err_msg=f"seed={seed}")
    # Padding is zeros: the packed data holds exactly W's values and nothing else.
    assert np.count_nonzero(np.asarray(p.data)) == np.count_nonzero(np.asarray(w))


@amx
@pytest.mark.parametrize("K,N", SHAPES)
def test_amx_matches_reference(K, N):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal((K, N), np.float32) * 0.05, jnp.bfloat16)
    p = cpu_matmul.pack_amx(w)
    for M in AMX_ROWS:
        x = jnp.asarray(rng.standard_normal((M, K), np.float32), jnp.bfloat16)
        check(mm_amx(x, p), x, w, False, seed, f"matmul_amx M={M} K={K} N={N}")


@pytest.mark.parametrize("K,N", [(576, 960), (100, 37)])
def test_amx_fallback_matches_reference(monkeypatch, K, N):
    """The XLA einsum over the packed layout: float32 x, and bf16 x with AMX switched off."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal((K, N), np.float32) * 0.05, jnp.bfloat16)
    p = cpu_matmul.pack_amx(w)
    monkeypatch.setenv("JAXSERVE_CPU_AMX", "0")
    assert not cpu_matmul.amx_available()
    for M in (1, 17):
        for xd in (jnp.float32, jnp.bfloat16):
            x = jnp.asarray(rng.standard_normal((2, M, K), np.float32), xd)
            y = jax.jit(cpu_matmul.matmul_amx)(x, p)
            assert y.shape == (2, M, N)
            check(y, x, w, False, seed, f"fallback M={M} x {xd.__name__}")


@amx
@pytest.mark.parametrize("K,N", [(576, 960), (100, 37), (33, 65), (64, 4000)])
def test_amx_exact_integers(K, N):
    """Small integers (exact in bf16; every partial sum exact in float32): the tile path must
    give the exact product, so a dropped, repeated or misplaced term or tile shows."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    w = rng.integers(-16, 17, (K, N)).astype(np.float32)
    p = cpu_matmul.pack_amx(jnp.asarray(w, jnp.bfloat16))
    for M in AMX_ROWS:
        x = rng.integers(-8, 9, (M, K)).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(mm_amx(jnp.asarray(x, jnp.bfloat16), p)), x @ w,
                                      err_msg=f"seed={seed} M={M}")


@amx
def test_amx_kernel_validates_operands():
    w = cpu_matmul.pack_amx(jnp.ones((64, 40), jnp.bfloat16))
    x = jnp.ones((3, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="K differs"):
        cpu_matmul.matmul_amx(jnp.ones((3, 65), jnp.bfloat16), w)
    call = lambda xx, data, n: jax.ffi.ffi_call(
        cpu_matmul.TARGET_AMX, jax.ShapeDtypeStruct((xx.shape[0], n), jnp.float32))(xx, data)
    with pytest.raises(Exception, match="packed W must be bfloat16"):   # K = 96: Kb 3, not 2
        jax.block_until_ready(call(jnp.ones((3, 96), jnp.bfloat16), w.data, 40))
    with pytest.raises(Exception, match="result must be float32"):      # N past the strips
        jax.block_until_ready(call(x, w.data, 65))
    with pytest.raises(Exception, match="x must be bfloat16"):
        jax.block_until_ready(call(x.astype(jnp.float32), w.data, 40))


@amx
@pytest.mark.parametrize("tied", [False, True])
def test_amx_decode_steps_close_to_hf(monkeypatch, tmp_path, tied):
    """End to end: a tiny bf16 Llama with its projections fused and packed by
    weights.pack_for_amx (and the tied head; gate|up through swiglu_amx), run as a 9-token prefill then one token per step, stays within
    test_model_hf's bf16 bound of HF's float32 logits, and within that bound of the unpacked
    XLA path. The two differ by float32 summation order before the bf16 roundings, and the AMX
    path's RMSNorm (inside the matmul call) can round an element of h one bf16 ulp away from
    XLA's, so they drift apart about as far as each drifts from HF (seen: 0.24-0.51 of the bound,
    each from HF 0.25-0.66)."""
    import types

    import tests.test_model_hf as hf_test
    from jaxserve.model.weights import cast, fuse_projections, pack_for_amx

    seed, model, chunks, ref = _tiny_llama_case(tmp_path, tied)

    w16 = fuse_projections(cast(model.weights, jnp.bfloat16))   # as the runner holds them
    head, layers = pack_for_amx(w16, llama.unstack_layers(w16.layers))
    assert isinstance(layers[0].wqkv, cpu_matmul.AmxPacked)
    assert isinstance(head.lm_head, cpu_matmul.AmxPacked) == tied
    packed = dataclasses.replace(head, layers=jax.tree.map(lambda *a: jnp.stack(a), *layers))

    calls = []
    real, real_swiglu = cpu_matmul.matmul_amx, cpu_matmul.swiglu_amx
    monkeypatch.setattr(cpu_matmul, "matmul_amx",
                        lambda *a, **kw: calls.append("mm") or real(*a, **kw))
    monkeypatch.setattr(cpu_matmul, "swiglu_amx",
                        lambda *a, **kw: calls.append("swiglu") or real_swiglu(*a, **kw))

    def run(weights):   # a fresh jit each time
        monkeypatch.setattr(hf_test, "_forward", jax.jit(
            llama.forward, static_argnames=("cfg", "all_logits", "attn_impl")))
        return hf_test.paged_prefill_logits(types.SimpleNamespace(config=model.config,
                                                                  weights=weights),
                                            chunks, dtype=jnp.bfloat16)

    ours = run(packed)
    # qkv, o, down (+ the head) on matmul_amx, gate|up with SwiGLU on swiglu_amx
    assert calls.count("mm") >= 3 + tied and "swiglu" in calls, calls
    xla = run(w16)
    bound = 0.15 * max(1.0, np.abs(ref).max() / 5)      # test_model_hf's bf16 bound
    assert np.abs(ours - ref).max() < bound, f"seed={seed}"
    assert np.abs(ours - xla).max() < bound, f"seed={seed}"


def _swiglu_check(a, x, w, seed, what):
    """a: swiglu_amx's bf16 result for x and the fused [Wg Wu] w. Reference in float64; bound:
    the final bf16 rounding (2^-8 relative) plus the float32 matmul error (2K u S per product,
    test_matches_reference) carried through silu(g) * u (|silu'| <= 1.1)."""
    xf, wf = f32(x).astype(np.float64), f32(w).astype(np.float64)
    K, half = wf.shape[0], wf.shape[1] // 2
    y, S = xf @ wf, np.abs(xf) @ np.abs(wf)
    g, u = y[..., :half], y[..., half:]
    silu = g / (1 + np.exp(-g))
    ref = silu * u
    dg, du = 2 * K * U * S[..., :half], 2 * K * U * S[..., half:]
    bound = 2.0 ** -8 * np.abs(ref) + 1.1 * (np.abs(u) * dg + (np.abs(silu) + dg) * du) + 1e-30
    a = f32(a).astype(np.float64)
    assert a.shape == ref.shape, f"seed={seed} {what}: {a.shape}"
    err = np.abs(a - ref) - bound
    assert (err <= 0).all(), (f"seed={seed} {what}: off by {err.max():.3e} over the bound at "
                              f"{np.unravel_index(err.argmax(), err.shape)}")


@amx
@pytest.mark.parametrize("K,N", [(576, 3072), (64, 128), (100, 64)])
def test_swiglu_amx_matches_reference(K, N):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal((K, N), np.float32) * 0.05, jnp.bfloat16)
    p = cpu_matmul.pack_amx(w)
    assert cpu_matmul.swiglu_fits(p)
    for M in AMX_ROWS:
        x = jnp.asarray(rng.standard_normal((M, K), np.float32), jnp.bfloat16)
        y = jax.jit(cpu_matmul.swiglu_amx)(x, p)
        assert y.dtype == jnp.bfloat16
        _swiglu_check(y, x, w, seed, f"swiglu_amx M={M} K={K} N={N}")


def test_swiglu_fallback_matches_reference(monkeypatch):
    """Without AMX, and for a [Wg Wu] whose halves are not whole strips: matmul_amx, then XLA."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    for K, N, amx_on in ((576, 3072, "0"), (64, 96, "1")):   # N = 96: halves of 48 columns
        monkeypatch.setenv("JAXSERVE_CPU_AMX", amx_on)
        w = jnp.asarray(rng.standard_normal((K, N), np.float32) * 0.05, jnp.bfloat16)
        p = cpu_matmul.pack_amx(w)
        x = jnp.asarray(rng.standard_normal((2, 5, K), np.float32), jnp.bfloat16)
        y = jax.jit(cpu_matmul.swiglu_amx)(x, p)
        assert y.shape == (2, 5, N // 2)
        _swiglu_check(y, x, w, seed, f"fallback K={K} N={N} AMX={amx_on}")


@amx
def test_swiglu_kernel_validates_operands():
    w = cpu_matmul.pack_amx(jnp.ones((64, 96), jnp.bfloat16))     # 3 strips: no even split
    x = jnp.ones((3, 64), jnp.bfloat16)
    call = lambda n: jax.ffi.ffi_call(cpu_matmul.TARGET_SWIGLU,
                                      jax.ShapeDtypeStruct((3, n), jnp.bfloat16))(x, w.data)
    with pytest.raises(Exception, match="even number of 32-column strips"):
        jax.block_until_ready(call(48))


# ----------------------------------------------------------------------------- fused RMSNorm
#
# matmul_amx / swiglu_amx with norm=(weight, eps) multiply h = llama.rms_norm(x, weight, eps),
# made while x is packed. h is rounded to bf16 like the XLA norm's, but r = 1/sqrt(mean(x^2)+eps)
# comes from another summation order, so an element of h can be one bf16 ulp (2^-7 relative)
# away: |y - y_ref| <= 2^-7 sum_k |h_k w_k| (+ the float32 product bound, far smaller). (One
# flipped element changes every output of its row, so exact agreement is not asserted.) A norm
# skipped or a weight ignored moves y by O(|y|), far outside; the fallback (no AMX) is the XLA
# norm itself, so there the results are identical.

def _norm_case(seed, M, K, N):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((M, K), np.float32) * 3, jnp.bfloat16)
    nw = jnp.asarray(1 + 0.3 * rng.standard_normal(K, np.float32), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((K, N), np.float32) * 0.05, jnp.bfloat16)
    return x, nw, w, np.asarray(llama.rms_norm(x, nw, 1e-5), np.float32)


@amx
@pytest.mark.parametrize("K,N", [(576, 960), (100, 37), (1536, 576)])
def test_amx_fused_norm_matches_xla_norm(K, N):
    seed = fresh_seed()
    for M in (1, 17, 64):
        x, nw, w, h = _norm_case(seed + M, M, K, N)
        p = cpu_matmul.pack_amx(w)
        y = np.asarray(jax.jit(lambda x: cpu_matmul.matmul_amx(x, p, norm=(nw, 1e-5)))(x))
        ref = np.asarray(jax.jit(cpu_matmul.matmul_amx)(jnp.asarray(h, jnp.bfloat16), p))
        S = np.abs(h).astype(np.float64) @ np.abs(f32(w)).astype(np.float64)
        err = np.abs(y - ref) - (2.0 ** -7 * S + 1e-6)
        assert (err <= 0).all(), f"seed={seed} M={M}: off by {err.max():.3e}"


@amx
def test_swiglu_fused_norm_matches_xla_norm():
    seed = fresh_seed()
    x, nw, w, h = _norm_case(seed, 33, 576, 3072)
    p = cpu_matmul.pack_amx(w)
    y = f32(jax.jit(lambda x: cpu_matmul.swiglu_amx(x, p, norm=(nw, 1e-5)))(x))
    _swiglu_check(y.astype(jnp.bfloat16), jnp.asarray(h, jnp.bfloat16), w, seed, "fused norm")


def test_fused_norm_fallback_is_the_xla_norm(monkeypatch):
    monkeypatch.setenv("JAXSERVE_CPU_AMX", "0")
    seed = fresh_seed()
    x, nw, w, h = _norm_case(seed, 5, 64, 96)
    p = cpu_matmul.pack_amx(w)
    hb = jnp.asarray(h, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(cpu_matmul.matmul_amx(x, p, norm=(nw, 1e-5))),
                                  np.asarray(cpu_matmul.matmul_amx(hb, p)))
    np.testing.assert_array_equal(f32(cpu_matmul.swiglu_amx(x, p, norm=(nw, 1e-5))),
                                  f32(cpu_matmul.swiglu_amx(hb, p)))


@amx
def test_fused_norm_validates_the_weight():
    p = cpu_matmul.pack_amx(jnp.ones((64, 64), jnp.bfloat16))
    x = jnp.ones((3, 64), jnp.bfloat16)
    with pytest.raises(Exception, match="norm weight must be bfloat16 or float32"):
        jax.block_until_ready(jax.ffi.ffi_call(
            cpu_matmul.TARGET_AMX_NORM, jax.ShapeDtypeStruct((3, 64), jnp.float32))(
                x, jnp.ones((63,), jnp.bfloat16), p.data, eps=np.float32(1e-5)))
