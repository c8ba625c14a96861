"""The native small-M bf16 matmul kernels (jaxserve/backends/cpu/cpu_matmul.*) and their use by
the CPU backend (CpuBackend.linear / gated_mlp / lm_head, and the model's steps through it).

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

Backend.linear casts the float32 result to x.dtype (bf16) and adds the bias in bf16: comparing
the kernel path with the XLA path there adds one bf16 rounding per side per step (at most half
an ulp, 2^-8 relative, each): 2^-7 * (|y| + |y + b|) on top of the float32 bound.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.backends.base import XlaBackend
from jaxserve.backends.cpu import cpu_matmul
from jaxserve.backends.cpu.backend import CpuBackend
from jaxserve.config import ModelConfig
from jaxserve.lora.apply import NoLora
from jaxserve.model import llama
from jaxserve.model.kv_cache import StepInput
from jaxserve.model.norms import rms_norm
from marks import fast_subset
from jaxserve.model.params import GATE_UP, Linear, Params
from jaxserve.model.weights import cast

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


@pytest.mark.parametrize("K,N", fast_subset(SHAPES, 2))
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


# --------------------------------------------------------------------------- the backend's ops

def _uses_kernel(fn, *args):
    text = jax.jit(fn).lower(*args).as_text()
    return cpu_matmul.TARGET in text or cpu_matmul.TARGET_T in text


def _bf16_close(out, ref_f32_y, extra, K, S, seed, what):
    """out: bf16 result of the kernel path; ref: the XLA path's bf16 result; see the module
    docstring for the bound."""
    bound = 2 * K * U * S + 2.0 ** -7 * extra
    err = np.abs(f32(out) - f32(ref_f32_y)) - bound * 1.001
    assert (err <= 0).all(), f"seed={seed} {what}: off by {err.max():.3e} over the tolerance"


# The ops read no model shapes from the config; the backends want one.
CFG = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=1,
                  num_heads=4, num_kv_heads=2, head_dim=16)


def _linear(w, *biases):
    """A Linear of one part per bias given (default: one part, no bias) over w [K, sum]."""
    biases = biases or (None,)
    n = w.shape[1] // len(biases)
    return Linear(w=w, b=None if all(b is None for b in biases) else tuple(biases),
                  sizes=(n,) * len(biases))


def _xla_path(x, w, b):
    y = jnp.einsum("bth,ho->bto", x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    return y if b is None else y + b.astype(y.dtype)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_two_rows_matches_xla_path(monkeypatch, bias):
    """CpuBackend.linear on bf16 weights with 2 rows (batch-2 decode) takes the kernel under jit
    and gives the XLA path's (XlaBackend.linear's) result; with the kernels disabled it is the
    XLA path."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    K, N = 576, 960
    x = jnp.asarray(rng.standard_normal((2, 1, K), np.float32), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((K, N), np.float32) * 0.05, jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((N,), np.float32), jnp.bfloat16) if bias else None

    cpu = CpuBackend(CFG, jnp.bfloat16)
    assert cpu.matmul_kernels
    proj = lambda x, w, b: cpu.linear(x, _linear(w, b))[0]
    assert _uses_kernel(proj, x, w, b)
    out = jax.jit(proj)(x, w, b)
    ref = jax.jit(_xla_path)(x, w, b)
    xla = jax.jit(lambda x, w, b: XlaBackend(CFG, jnp.bfloat16).linear(x, _linear(w, b))[0])
    assert not _uses_kernel(xla, x, w, b)
    np.testing.assert_array_equal(f32(xla(x, w, b)), f32(ref))
    assert out.dtype == ref.dtype == jnp.bfloat16 and out.shape == ref.shape == (2, 1, N)
    y = f32(x) @ f32(w)
    S = np.abs(f32(x)) @ np.abs(f32(w))
    extra = np.abs(y) + (np.abs(y + f32(b)) if bias else 0.0)
    _bf16_close(out, ref, extra, K, S, seed, "linear kernel vs XLA")

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
    off = CpuBackend(CFG, jnp.bfloat16)
    assert not off.matmul_kernels
    proj_off = lambda x, w, b: off.linear(x, _linear(w, b))[0]
    assert not _uses_kernel(proj_off, x, w, b)
    np.testing.assert_array_equal(f32(jax.jit(proj_off)(x, w, b)), f32(ref))
    # A backend made while the kernels loaded decides again at trace time.
    assert not _uses_kernel(lambda x, w, b: cpu.linear(x, _linear(w, b))[0], x, w, b)


def test_linear_splits_parts_with_their_biases():
    """A fused weight's parts come back split, each with its own bias (None: no bias), the
    kernel path as the XLA path (the same bound as above, per part)."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    K, n = 64, 48
    x = jnp.asarray(rng.standard_normal((3, 1, K), np.float32), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((K, 3 * n), np.float32) * 0.1, jnp.bfloat16)
    bq = jnp.asarray(rng.standard_normal((n,), np.float32), jnp.bfloat16)
    bv = jnp.asarray(rng.standard_normal((n,), np.float32), jnp.bfloat16)
    p = _linear(w, bq, None, bv)
    cpu = CpuBackend(CFG, jnp.bfloat16)
    assert _uses_kernel(lambda x: cpu.linear(x, p), x)
    parts = jax.jit(lambda x: cpu.linear(x, p))(x)
    assert [a.shape for a in parts] == [(3, 1, n)] * 3
    for i, (part, b) in enumerate(zip(parts, (bq, None, bv))):
        wi = w[:, i * n:(i + 1) * n]
        ref = _xla_path(x, wi, b)
        y = f32(x) @ f32(wi)
        extra = np.abs(y) + (np.abs(y + f32(b)) if b is not None else 0.0)
        _bf16_close(part, ref, extra, K, np.abs(f32(x)) @ np.abs(f32(wi)), seed, f"part {i}")


@pytest.mark.parametrize("tied", [True, False])
def test_lm_head_two_rows_matches_xla_path(monkeypatch, tied):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    H, V = 576, 4099                                    # V not a multiple of any block
    h = jnp.asarray(rng.standard_normal((2, H), np.float32), jnp.bfloat16)
    emb = jnp.asarray(rng.standard_normal((V, H), np.float32) * 0.05, jnp.bfloat16)
    head_w = None if tied else jnp.asarray(rng.standard_normal((H, V), np.float32) * 0.05,
                                           jnp.bfloat16)
    params = Params(embed=emb, layers=(), final_norm=jnp.ones((H,), jnp.bfloat16),
                    lm_head=head_w)
    wk = f32(emb).T if tied else f32(head_w)             # [H, V]

    def xla_path(h):
        if tied:
            return jnp.einsum("...h,vh->...v", h, emb, preferred_element_type=jnp.float32)
        return jnp.einsum("...h,hv->...v", h, head_w, preferred_element_type=jnp.float32)

    cpu = CpuBackend(CFG, jnp.bfloat16)
    head = lambda h: cpu.lm_head(h, params)
    assert _uses_kernel(head, h)
    out = jax.jit(head)(h)
    ref = jax.jit(xla_path)(h)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(lambda h: XlaBackend(CFG, jnp.bfloat16).lm_head(h, params))(h)),
        np.asarray(ref))
    assert out.dtype == ref.dtype == jnp.float32 and out.shape == ref.shape == (2, V)
    S = np.abs(f32(h)) @ np.abs(wk)
    err = np.abs(np.asarray(out) - np.asarray(ref)) - 2 * H * U * S
    assert (err <= 0).all(), f"seed={seed}: lm_head off by {err.max():.3e} over the tolerance"
    check(out, h, emb if tied else head_w, tied, seed, "lm_head")

    monkeypatch.setenv("JAXSERVE_CPU_KERNELS", "0")
    off = CpuBackend(CFG, jnp.bfloat16)
    head_off = lambda h: off.lm_head(h, params)
    assert not _uses_kernel(head_off, h)
    np.testing.assert_array_equal(np.asarray(jax.jit(head_off)(h)), np.asarray(ref))


@pytest.mark.slow   # compiles the kernel
def test_builds_into_cache_dir(tmp_path):
    """A fresh cache dir gets cpu_matmul-<key>.so (no temporary left behind)."""
    env = dict(os.environ, JAXSERVE_CACHE_DIR=str(tmp_path), JAX_PLATFORMS="cpu")
    env.pop("JAXSERVE_CPU_KERNELS", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", "from jaxserve.backends.cpu import cpu_matmul as c; "
                        "print('AVAILABLE', c.available())"], env=env, cwd=root,
                       capture_output=True, text=True)
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


def backend_logits(cfg, backend, params, ids_chunks, page_size=4, seed=0):
    """test_model_hf.paged_prefill_logits through `backend`: the prompt in chunks over shuffled
    pages of the backend's pool, each chunk a step as the backend runs it (stacked params: one
    scan, llama.forward; per-layer params: embed, llama.decoder_layer per layer, llama.head).
    All logits [T, V] as float32. Fresh jits: traced with the current dispatch."""
    T = sum(len(c) for c in ids_chunks)
    P = -(-T // page_size)
    table = np.random.default_rng(seed).permutation(np.arange(1, 2 * P + 1))[:P]
    kv = backend.init_pool(2 * P + 1, page_size)
    per_layer = isinstance(params.layers, tuple)
    if per_layer:
        layer_fn = jax.jit(llama.decoder_layer, static_argnums=(0, 1))
        head_fn = jax.jit(llama.head, static_argnums=(1, 2), static_argnames="all_logits")
    else:
        forward = jax.jit(llama.forward, static_argnums=(1, 2), static_argnames="all_logits")
    out, start = [], 0
    for chunk in ids_chunks:
        n = len(chunk)
        pos = np.arange(start, start + n)
        step = StepInput(tokens=jnp.array([chunk], jnp.int32),
                         positions=jnp.array([pos], jnp.int32),
                         block_tables=jnp.array([table], jnp.int32),
                         kv_lens=jnp.array([start + n], jnp.int32),
                         slot_pages=jnp.array(table[pos // page_size], jnp.int32),
                         slot_offsets=jnp.array(pos % page_size, jnp.int32),
                         logits_index=jnp.array([n - 1], jnp.int32))
        if per_layer:
            step = dataclasses.replace(step, rope=llama.step_rope(cfg, step))
            x = llama.embed(params, cfg, step)
            for i, lp in enumerate(params.layers):
                x, kv = layer_fn(cfg, backend, lp, x, kv, jnp.int32(i), step)
            logits = head_fn(params, cfg, backend, x, step, all_logits=True)
        else:
            logits, kv = forward(params, cfg, backend, step, kv, all_logits=True)
        out.append(np.asarray(logits[0], np.float32))
        start += n
    return np.concatenate(out)


@pytest.mark.parametrize("layer_loop", ["scan", "per-layer"])
@pytest.mark.parametrize("tied", fast_subset([False, True], 1))
def test_bf16_decode_steps_close_to_hf(monkeypatch, tmp_path, tied, layer_loop):
    """End to end: a tiny bf16 Llama on the CPU backend run as a 9-token prefill then one token
    per step (1 row: every projection and the LM head of those steps take the kernel, inside the
    layer scan or in each layer's call) stays as close to HF's float32 logits as
    test_model_hf's bf16 check demands, as close as the same run on the XLA path (the CPU
    backend with no ROW_RANGES), and as close as the XLA backend."""
    seed, model, chunks, ref = _tiny_llama_case(tmp_path, tied)
    cfg = model.config
    w16 = cast(model.weights, jnp.bfloat16)

    calls, amx_calls = [], []
    real = (cpu_matmul.matmul, cpu_matmul.matmul_t, cpu_matmul.matmul_amx, cpu_matmul.swiglu_amx)
    monkeypatch.setattr(cpu_matmul, "matmul", lambda *a: calls.append("nn") or real[0](*a))
    monkeypatch.setattr(cpu_matmul, "matmul_t", lambda *a: calls.append("nt") or real[1](*a))
    monkeypatch.setattr(cpu_matmul, "matmul_amx",
                        lambda *a, **k: amx_calls.append("amx") or real[2](*a, **k))
    monkeypatch.setattr(cpu_matmul, "swiglu_amx",
                        lambda *a, **k: amx_calls.append("swiglu") or real[3](*a, **k))

    def run(backend):
        params = backend.prepare(w16)
        assert isinstance(params.layers, tuple) == (layer_loop == "per-layer")
        return backend_logits(cfg, backend, params, chunks)

    cpu = CpuBackend(cfg, jnp.bfloat16, layer_loop=layer_loop)
    assert cpu.pool_dtype() == jnp.uint16
    ours = run(cpu)
    if amx_calls:    # AMX-packed weights (per layer, on CPUs with AMX): the tile-unit kernel
        assert cpu_matmul.amx_available() and amx_calls.count("amx") >= 4, amx_calls
    else:
        assert ("nt" if tied else "nn") in calls and calls.count("nn") >= 4, calls
    bound = 0.15 * max(1.0, np.abs(ref).max() / 5)      # test_model_hf's bf16 bound
    assert np.abs(ours - ref).max() < bound, f"seed={seed}"
    calls.clear()
    xla_backend = run(XlaBackend(cfg, jnp.bfloat16, layer_loop=layer_loop))
    assert not calls
    assert np.abs(xla_backend - ref).max() < bound, f"seed={seed}"
    assert np.abs(ours - xla_backend).max() < bound, f"seed={seed}"
    monkeypatch.setattr(cpu_matmul, "ROW_RANGES", {})   # every matmul on the XLA path
    xla = run(cpu)
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
    cpu = CpuBackend(CFG, jnp.float32)
    for rows in (lo, hi):
        x = jnp.asarray(rng.standard_normal((rows, 1, K), np.float32))
        proj = lambda x, w: cpu.linear(x, _linear(w))[0]
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


@pytest.mark.parametrize("tiles", [pytest.param(True, marks=amx, id="tiles"),
                                   pytest.param(False, id="emulated")])
@pytest.mark.parametrize("tied", [False, True])
def test_amx_decode_steps_close_to_hf(monkeypatch, tmp_path, tied, tiles):
    """End to end: a tiny bf16 Llama whose projections CpuBackend.prepare fused and packed
    (and the tied head; gate|up through swiglu_amx), run layer by layer as a 9-token prefill
    then one token per step, stays within test_model_hf's bf16 bound of HF's float32 logits, and
    within that bound of the same backend on the unpacked weights. The two differ by float32
    summation order before the bf16 roundings, and the AMX path's RMSNorm (inside the matmul
    call) can round an element of h one bf16 ulp away from XLA's, so they drift apart about as
    far as each drifts from HF (seen: 0.24-0.51 of the bound, each from HF 0.25-0.66).
    tiles: on the tile unit (CPUs with AMX). emulated: AMX switched off (JAXSERVE_CPU_AMX=0) and
    the backend told to pack anyway, so the packed weights go through matmul_amx's XLA einsum
    over the packed layout (the same packing and dispatch, on any CPU)."""
    seed, model, chunks, ref = _tiny_llama_case(tmp_path, tied)
    cfg = model.config
    w16 = cast(model.weights, jnp.bfloat16)
    if not tiles:
        monkeypatch.setenv("JAXSERVE_CPU_AMX", "0")
    backend = CpuBackend(cfg, jnp.bfloat16)              # per-layer, as select makes it on CPU
    assert backend.layer_loop == "per-layer" and backend.amx == tiles
    backend.amx = True
    packed = backend.prepare(w16)
    lp = packed.layers[0]
    assert all(isinstance(p.w, cpu_matmul.AmxPacked) for p in (lp.qkv, lp.o, lp.gate_up, lp.down))
    assert lp.qkv.sizes == (cfg.q_size, cfg.num_kv_heads * cfg.head_dim,
                            cfg.num_kv_heads * cfg.head_dim)
    assert isinstance(packed.lm_head, cpu_matmul.AmxPacked) == tied
    plain_backend = CpuBackend(cfg, jnp.bfloat16)
    plain_backend.amx = False
    plain = plain_backend.prepare(w16)
    assert not any(isinstance(leaf, cpu_matmul.AmxPacked) for leaf in jax.tree.leaves(
        plain, is_leaf=lambda a: isinstance(a, cpu_matmul.AmxPacked)))

    calls = []
    real, real_swiglu = cpu_matmul.matmul_amx, cpu_matmul.swiglu_amx
    monkeypatch.setattr(cpu_matmul, "matmul_amx",
                        lambda *a, **kw: calls.append("mm") or real(*a, **kw))
    monkeypatch.setattr(cpu_matmul, "swiglu_amx",
                        lambda *a, **kw: calls.append("swiglu") or real_swiglu(*a, **kw))

    ours = backend_logits(cfg, backend, packed, chunks)
    # qkv, o, down (+ the head) on matmul_amx, gate|up with SwiGLU on swiglu_amx
    assert calls.count("mm") >= 3 + tied and "swiglu" in calls, calls
    calls.clear()
    xla = backend_logits(cfg, plain_backend, plain, chunks)
    assert not calls
    bound = 0.15 * max(1.0, np.abs(ref).max() / 5)      # test_model_hf's bf16 bound
    assert np.abs(ours - ref).max() < bound, f"seed={seed}"
    assert np.abs(ours - xla).max() < bound, f"seed={seed}"


@pytest.mark.parametrize("norm", [False, True])
def test_linear_packed_matches_plain(monkeypatch, norm):
    """CpuBackend.linear on a fused q|k|v Linear whose weight is AMX-packed gives each part (with
    its bias) as on the plain weight: within the float32 bound and both bf16 roundings; with the
    RMSNorm fused, also the norm's one-ulp h differences (see the fused RMSNorm section below).
    On the tile unit where AMX is, else matmul_amx's XLA einsum over the packed layout."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    K, n = 576, 192
    x, nw, w, h = _norm_case(seed, 5, K, 3 * n)
    x = x.reshape(5, 1, K)
    b = jnp.asarray(rng.standard_normal((n,), np.float32), jnp.bfloat16)
    cpu = CpuBackend(CFG, jnp.bfloat16)
    packed, plain = _linear(cpu_matmul.pack_amx(w), b, None, b), _linear(w, b, None, b)
    nrm = (nw, 1e-5) if norm else None
    out = jax.jit(lambda x: cpu.linear(x, packed, nrm))(x)
    ref = jax.jit(lambda x: cpu.linear(x, plain, nrm))(x)
    hx = h.reshape(5, 1, K) if norm else f32(x)
    for i, (o, r) in enumerate(zip(out, ref)):
        assert o.dtype == r.dtype == jnp.bfloat16 and o.shape == r.shape == (5, 1, n)
        wi = f32(w)[:, i * n:(i + 1) * n]
        y, S = hx @ wi, np.abs(hx) @ np.abs(wi)
        extra = np.abs(y) + (np.abs(y + f32(b)) if i != 1 else 0.0)
        if norm:   # one flipped h element moves its row's outputs by up to 2^-7 |h_k w_k|
            extra = extra + S
        _bf16_close(o, r, extra, K, S, seed, f"packed part {i} norm={norm}")


def test_gated_mlp_packed(monkeypatch):
    """CpuBackend.gated_mlp on a packed gate|up: norm, matmul and SwiGLU through swiglu_amx
    (the _swiglu_check bound against the normed h); a step whose LoRA adapts gate/up instead
    goes through linear (the deltas join g and u before the activation), as the XLA backend."""
    seed = fresh_seed()
    x, nw, w, h = _norm_case(seed, 3, 576, 3072)
    x = x.reshape(3, 1, 576)
    p = _linear(cpu_matmul.pack_amx(w), None, None)
    cpu = CpuBackend(CFG, jnp.bfloat16)
    calls = []
    real = cpu_matmul.swiglu_amx
    monkeypatch.setattr(cpu_matmul, "swiglu_amx", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    y = jax.jit(lambda x: cpu.gated_mlp(x, p, (nw, 1e-5), NoLora(), GATE_UP, jax.nn.silu))(x)
    assert calls and y.dtype == jnp.bfloat16 and y.shape == (3, 1, 1536)
    _swiglu_check(y.reshape(3, 1536), jnp.asarray(h, jnp.bfloat16), w, seed, "gated_mlp")

    class AdaptsGateUp(NoLora):   # a LoRA touching gate/up whose deltas are zero
        def adapts(self, modules):
            return True
    calls.clear()
    y2 = jax.jit(lambda x: cpu.gated_mlp(x, p, (nw, 1e-5), AdaptsGateUp(), GATE_UP,
                                         jax.nn.silu))(x)
    assert not calls
    ref = jax.jit(lambda x: XlaBackend(CFG, jnp.bfloat16).gated_mlp(
        x, _linear(w, None, None), (nw, 1e-5), NoLora(), GATE_UP, jax.nn.silu))(x)
    # g and u from packed vs plain weights: each within a few bf16 ulp, then the same bf16 ops
    np.testing.assert_allclose(f32(y2), f32(ref), atol=2e-2 * np.abs(f32(ref)).max(), rtol=0,
                               err_msg=f"seed={seed}")


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
# matmul_amx / swiglu_amx with norm=(weight, eps) multiply h = norms.rms_norm(x, weight, eps),
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
    return x, nw, w, np.asarray(rms_norm(x, nw, 1e-5), np.float32)


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
