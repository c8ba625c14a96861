"""The native CPU decode-attention kernel (jaxserve/backends/cpu/cpu_attention.*) against the reference.

Cases come from test_kernels_attention.make_case: shuffled non-contiguous pages, ragged lengths,
padding rows, and garbage (|x| up to 1e3) in unused pages, the null page 0 and past each
sequence's last token, so a key read without its mask moves the result far outside tolerance.
Seeds are fresh each run and printed on failure. The whole module skips when the kernel is
unavailable (no compiler, JAXSERVE_CPU_KERNELS=0, not the CPU backend).

Tolerances (max abs error against pallas_kernels.paged_attention.paged_attention_ref in f32 on
the same input values; |out| <= max|v| ~ 4):
  f32 pools (and bf16 pools with an f32 query): 1e-4. Everything is f32 in both; the kernel sums
        in another order (online softmax over blocks of 64 keys, lane-split dot products) and
        uses its own exp (within a few ulp); observed ~1e-6. Same bound as the Pallas tests.
  bf16 query (output cast to bf16): 2^-8 * |ref| + 1e-4 per element. The bf16 pool values are
        widened to f32 exactly, so the only extra error is rounding the f32 result to bf16 once:
        at most half a bf16 ulp, i.e. 2^-8 of the value, plus the f32 bound above.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve import backends, sharding
from jaxserve.backends.base import XlaBackend
from jaxserve.backends.cpu import cpu_attention
from jaxserve.backends.cpu.backend import CpuBackend
from jaxserve.config import ModelConfig
from jaxserve.model.attention import FULL_WINDOW
from jaxserve.model.kv_cache import KVPages, StepInput, stored
from marks import fast_subset
from pallas_kernels.paged_attention import paged_attention_ref
from test_kernels_attention import CAP_SCALE, SOFTCAP, fresh_seed, make_case, stale_nan

if not cpu_attention.available():
    pytest.skip(f"native CPU attention kernel unavailable: {cpu_attention.unavailable_reason()}",
                allow_module_level=True)

TOL_F32 = 1e-4


def bits(x):
    """A bf16 pool as the CPU backend stores it (its pool_dtype() for bfloat16): its uint16
    bits."""
    return stored(x, jnp.uint16)


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window"))
def kernel(q, k, v, bt, lens, pos, layer=None, *, scale, sliding_window=None):
    return cpu_attention.paged_decode_attention(q, k, v, bt, lens, pos, scale=scale,
                                                sliding_window=sliding_window, layer=layer)


def reference(case, scale, window):
    q, k, v, bt, lens, pos = case
    f32 = lambda x: x.astype(jnp.float32)
    return np.asarray(paged_attention_ref(f32(q), f32(k), f32(v), bt, lens, pos, scale=scale,
                                          sliding_window=window))


def check_against_ref(out, case, seed, scale, window):
    q, pos = case[0], case[5]
    ref = reference(case, scale, window)
    assert out.shape == q.shape and out.dtype == q.dtype, f"seed={seed}"
    out32 = np.asarray(out, np.float32)
    assert np.isfinite(out32).all(), f"seed={seed}: non-finite output"
    pad = np.asarray(pos)[:, 0] < 0
    assert (out32[pad] == 0).all(), f"seed={seed}: padding rows must give exact zeros"
    if q.dtype == jnp.bfloat16:
        err = np.abs(out32 - ref) - (2.0 ** -8 * np.abs(ref) + TOL_F32)
        assert (err <= 0).all(), f"seed={seed}: bf16 output off by {err.max():.2e} over tolerance"
    else:
        np.testing.assert_allclose(out32, ref, atol=TOL_F32, rtol=0, err_msg=f"seed={seed}")


def run_case(seed, *, dtype, q_dtype=None, window=None, scale=None, batch=5, **shape):
    case = make_case(seed, dtype=dtype, batch=batch, q_len=1, **shape)
    q, k, v, bt, lens, pos = case
    if q_dtype is not None:
        q = q.astype(q_dtype)
        case = (q,) + case[1:]
    pool = (bits(k), bits(v)) if dtype == jnp.bfloat16 else (k, v)
    scale = scale or shape["head_dim"] ** -0.5
    out = kernel(q, *pool, bt, lens, pos, scale=scale, sliding_window=window)
    check_against_ref(out, case, seed, scale, window)


# A covering grid: each GQA group 1/3/4, head_dim 64/128, page 8/16, both pool dtypes, with
# and without a small window, appears.
GRID = [
    # page, Hkv, G, D, pool dtype, window
    (8, 2, 1, 64, jnp.float32, None),
    (16, 3, 3, 64, jnp.float32, None),        # the default model's shape
    (16, 1, 4, 128, jnp.float32, 7),
    (8, 2, 3, 128, jnp.float32, 3),
    (16, 2, 1, 128, jnp.bfloat16, None),
    (8, 3, 3, 64, jnp.bfloat16, 5),
    (16, 2, 4, 64, jnp.bfloat16, 11),
    (8, 1, 4, 128, jnp.bfloat16, None),
]


@pytest.mark.parametrize("page_size,hkv,group,head_dim,dtype,window", fast_subset(GRID, 3))
def test_decode_grid(page_size, hkv, group, head_dim, dtype, window):
    run_case(fresh_seed(), dtype=dtype, window=window, num_kv_heads=hkv, group=group,
             head_dim=head_dim, page_size=page_size, max_pages=6)


@pytest.mark.parametrize("group,head_dim", [(3, 64), (4, 128)])
def test_bf16_pool_f32_query(group, head_dim):
    """bf16 pool bits widened exactly: with an f32 query, f32 tolerance. A pool of dtype
    bfloat16 itself (not its uint16 bits) is read the same way."""
    seed = fresh_seed()
    run_case(seed, dtype=jnp.bfloat16, q_dtype=jnp.float32, num_kv_heads=2, group=group,
             head_dim=head_dim, page_size=16, max_pages=5)
    q, k, v, bt, lens, pos = make_case(seed, dtype=jnp.bfloat16, batch=3, q_len=1, num_kv_heads=2,
                                       group=group, head_dim=head_dim, page_size=16, max_pages=5)
    out = kernel(q, k, v, bt, lens, pos, scale=0.1)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(
        kernel(q, bits(k), bits(v), bt, lens, pos, scale=0.1), np.float32))
    check_against_ref(out, (q, k, v, bt, lens, pos), seed, 0.1, None)


@pytest.mark.parametrize("head_dim", [48, 80, 20])
def test_other_head_dims(head_dim):
    """head_dims other than 64/128 take the generic loop path (and may not fill a vector)."""
    for dtype in (jnp.float32, jnp.bfloat16):
        run_case(fresh_seed(), dtype=dtype, window=None if head_dim != 80 else 9, num_kv_heads=2,
                 group=3, head_dim=head_dim, page_size=8, max_pages=4)


@pytest.mark.parametrize("last_page", ["full", "empty", "one"])
def test_last_page_edges(last_page):
    for window in (None, 1, 16):
        run_case(fresh_seed(), dtype=jnp.float32, window=window, num_kv_heads=2, group=2,
                 head_dim=64, page_size=8, max_pages=4, last_page=last_page)


def test_long_context_blocks_and_windows():
    """Many pages per sequence (several 64-key blocks, partial ones), windows that skip whole
    pages or exceed the context, and a large scale (scores spread over ~100: the softmax's
    running max and exp far from 0)."""
    for window in (None, 5, 37, 1000):
        run_case(fresh_seed(), dtype=jnp.float32, window=window, batch=3, num_kv_heads=1,
                 group=4, head_dim=64, page_size=8, max_pages=24)
    run_case(fresh_seed(), dtype=jnp.float32, scale=1.5, batch=3, num_kv_heads=2, group=3,
             head_dim=128, page_size=16, max_pages=10)


def test_query_before_end_of_sequence():
    """kv_lens past the query's position (keys after it already written): j <= p must bind."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    for dtype, window in ((jnp.float32, None), (jnp.bfloat16, 4)):
        q, k, v, bt, lens, pos = make_case(seed, batch=6, q_len=1, num_kv_heads=2, group=3,
                                           head_dim=64, page_size=8, max_pages=5, dtype=dtype,
                                           last_page="full")
        back = rng.integers(1, 12, pos.shape)
        pos = jnp.where(pos - back >= 0, pos - back, pos).astype(jnp.int32)
        pool = (bits(k), bits(v)) if dtype == jnp.bfloat16 else (k, v)
        out = kernel(q, *pool, bt, lens, pos, scale=0.125, sliding_window=window)
        check_against_ref(out, (q, k, v, bt, lens, pos), seed, 0.125, window)


def test_many_rows_threads():
    """Enough (row, kv head) items for every thread of the pool to take some."""
    run_case(fresh_seed(), dtype=jnp.float32, batch=48, num_kv_heads=3, group=3, head_dim=64,
             page_size=16, max_pages=5)


def test_stacked_pool_traced_layer():
    """Engine layout: a layers axis in front, the layer index traced under jit. Layer 0 is all
    garbage; layers 1 and 2 are two different valid pools over the same pages."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    for dtype in (jnp.float32, jnp.bfloat16):
        q, k, v, bt, lens, pos = make_case(seed, batch=4, q_len=1, num_kv_heads=2, group=3,
                                           head_dim=64, page_size=16, max_pages=5, dtype=dtype)
        garbage = jnp.asarray(rng.uniform(-1e3, 1e3, k.shape), dtype)
        k2, v2 = (-v).astype(dtype), (k * 0.5).astype(dtype)
        kl, vl = jnp.stack([garbage, k, k2]), jnp.stack([garbage, v, v2])
        if dtype == jnp.bfloat16:
            kl, vl = bits(kl), bits(vl)
        for layer, (kk, vv) in ((1, (k, v)), (2, (k2, v2))):
            out = kernel(q, kl, vl, bt, lens, pos, jnp.int32(layer), scale=0.125)
            check_against_ref(out, (q, kk, vv, bt, lens, pos), seed, 0.125, None)

        def scan_layers(q, kl, vl):   # as the engine's layer scan calls it
            def body(c, layer):
                return c, cpu_attention.paged_decode_attention(q, kl, vl, bt, lens, pos,
                                                               scale=0.125, layer=layer)
            return jax.lax.scan(body, 0, jnp.arange(3, dtype=jnp.int32))[1]
        outs = jax.jit(scan_layers)(q, kl, vl)
        np.testing.assert_array_equal(np.asarray(outs[1], np.float32),
                                      np.asarray(kernel(q, kl, vl, bt, lens, pos, jnp.int32(1),
                                                        scale=0.125), np.float32))


def test_bad_block_table_and_layer_are_errors():
    q, k, v, bt, lens, pos = make_case(fresh_seed(), batch=2, q_len=1, num_kv_heads=1, group=2,
                                       head_dim=64, page_size=8, max_pages=3,
                                       dtype=jnp.float32, last_page="full")
    N = k.shape[1]
    for bad in (N, -1):
        with pytest.raises(Exception, match=r"outside \[0, num_pages"):
            jax.block_until_ready(kernel(q, k, v, bt.at[0, 0].set(bad), lens, pos, scale=0.1))
    # An entry past the visible pages is never read, whatever it holds.
    lens1 = lens.at[0].set(1)
    pos1 = pos.at[0, 0].set(0)
    out = kernel(q, k, v, bt.at[0, 2].set(10 ** 6), lens1, pos1, scale=0.1)
    check_against_ref(out, (q, k, v, bt, lens1, pos1), None, 0.1, None)
    with pytest.raises(Exception, match="layer 1 out of range"):
        jax.block_until_ready(kernel(q, k[None], v[None], bt, lens, pos, jnp.int32(1), scale=0.1))
    with pytest.raises(ValueError, match="decode"):
        cpu_attention.paged_decode_attention(jnp.zeros((2, 3, 2, 64)), k, v, bt, lens,
                                             jnp.zeros((2, 3), jnp.int32), scale=0.1)


def test_empty_window_gives_zeros():
    q, k, v, bt, lens, pos = make_case(fresh_seed(), batch=2, q_len=1, num_kv_heads=1, group=2,
                                       head_dim=64, page_size=8, max_pages=3, dtype=jnp.float32)
    out = cpu_attention.paged_decode_attention(q, k, v, bt, lens, pos, scale=0.1, sliding_window=0)
    assert (np.asarray(out) == 0).all()


# --------------------------------------------------------------------------- the backend op

def _cfg(num_kv_heads, group, head_dim, num_layers=2):
    return ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=num_layers,
                       num_heads=num_kv_heads * group, num_kv_heads=num_kv_heads,
                       head_dim=head_dim)


def _attention_step(bt, lens, pos):
    """A StepInput carrying what attention reads (the write fields are unused here)."""
    B, T = pos.shape
    zeros = jnp.zeros((B * T,), jnp.int32)
    return StepInput(tokens=jnp.zeros((B, T), jnp.int32), positions=pos, block_tables=bt,
                     kv_lens=lens, slot_pages=zeros, slot_offsets=zeros,
                     logits_index=jnp.zeros((B,), jnp.int32))


@pytest.mark.parametrize("q_len", [1, 5])
def test_backend_attention_matches_xla(q_len):
    """CpuBackend.attention = XlaBackend.attention, each over the pool as it stores it (the CPU
    backend's bf16 pool: uint16 bits): the kernel for decode, XLA for prefill; the layer index
    traced, each layer of the stacked pool holding different K/V."""
    seed = fresh_seed()
    for dtype, window in ((jnp.float32, None), (jnp.bfloat16, 6)):
        q, k, v, bt, lens, pos = make_case(seed, batch=3, q_len=q_len, num_kv_heads=2, group=3,
                                           head_dim=64, page_size=8, max_pages=4, dtype=dtype)
        cfg = _cfg(2, 3, 64)
        cpu, xla = CpuBackend(cfg, dtype), XlaBackend(cfg, dtype)
        assert cpu.pool_dtype() == (jnp.uint16 if dtype == jnp.bfloat16 else dtype)
        assert xla.pool_dtype() == dtype
        kl, vl = jnp.stack([k, (-v).astype(dtype)]), jnp.stack([(k * 0.5).astype(dtype), v])
        pools = {b.name: KVPages(k=stored(kl, b.pool_dtype()), v=stored(vl, b.pool_dtype()))
                 for b in (cpu, xla)}
        step = _attention_step(bt, lens, pos)

        def attend(backend):
            return jax.jit(lambda q, kv, layer, step: backend.attention(
                q, kv, layer, step, scale=0.125, sliding_window=window))

        for layer in (jnp.int32(0), jnp.int32(1)):
            out = attend(cpu)(q, pools["cpu"], layer, step)
            ref = attend(xla)(q, pools["xla"], layer, step)
            assert out.dtype == ref.dtype == q.dtype
            tol = TOL_F32 if dtype == jnp.float32 else 2.0 ** -7 * 4 + TOL_F32  # both rounded
            np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                                       atol=tol, rtol=0, err_msg=f"seed={seed}")
        text = attend(cpu).lower(q, pools["cpu"], jnp.int32(1), step).as_text()
        if q_len > 1:   # prefill must not have gone through the custom call
            assert cpu_attention.TARGET not in text
        else:
            assert cpu_attention.TARGET in text


def test_select_backend(monkeypatch, caplog):
    """backends.select: auto on CPU is the cpu backend when its kernels load and the step is
    unsharded, else xla; an explicit cpu that cannot run falls back to xla with a warning."""
    cfg = _cfg(2, 3, 64)
    select = functools.partial(backends.select, cfg=cfg, dtype=jnp.float32)
    assert select("xla").name == "xla"
    if jax.device_count() == 1:
        assert select("auto").name == "cpu"
        assert select("cpu").name == "cpu"
    assert select("auto", tp=1).name == "cpu"
    # tp > 1 in this one-device process: select's mesh stood in for (only its size is read)
    monkeypatch.setattr(sharding, "make_mesh", lambda tp: types.SimpleNamespace(
        shape={sharding.TP: tp}))
    assert select("auto", tp=2).name == "xla"       # tp shards the pool: no custom call
    with caplog.at_level("WARNING"):
        assert select("cpu", tp=2).name == "xla"
    assert "tensor parallel" in caplog.text
    monkeypatch.setenv("JAXSERVE_CPU_KERNELS", "0")
    assert not cpu_attention.available()
    assert select("auto", tp=1).name == "xla"
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert select("cpu", tp=1).name == "xla"
    assert "JAXSERVE_CPU_KERNELS=0" in caplog.text
    with pytest.raises(ValueError, match="unknown backend"):
        select("onehot")


def _fresh_process(env_extra, code):
    env = dict(os.environ, **env_extra)
    env.pop("JAXSERVE_CPU_KERNELS", None)
    env.setdefault("JAX_PLATFORMS", "cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                          text=True)


@pytest.mark.slow   # compiles the kernel
def test_build_into_cache_dir_and_failures(tmp_path):
    """A fresh cache dir gets one .so (no temporary left behind) that a second process reuses;
    a missing compiler makes available() False with a logged reason instead of raising."""
    code = ("import logging; logging.basicConfig();"
            "from jaxserve.backends.cpu import cpu_attention as c; print('AVAILABLE', c.available())")
    r = _fresh_process({"JAXSERVE_CACHE_DIR": str(tmp_path)}, code)
    assert "AVAILABLE True" in r.stdout, r.stderr
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 1 and files[0].startswith("cpu_attention-") and files[0].endswith(".so")
    mtime = os.path.getmtime(tmp_path / files[0])
    r = _fresh_process({"JAXSERVE_CACHE_DIR": str(tmp_path)}, code)
    assert "AVAILABLE True" in r.stdout and os.path.getmtime(tmp_path / files[0]) == mtime
    r = _fresh_process({"JAXSERVE_CACHE_DIR": str(tmp_path / "other"),
                        "CXX": "/nonexistent/g++"}, code)
    assert "AVAILABLE False" in r.stdout, r.stderr
    assert "no C++ compiler" in r.stderr


@pytest.mark.parametrize("head_dim", fast_subset([8, 64], 1))
def test_engine_greedy_matches_xla(tmp_path, head_dim):
    """End to end (tiny GQA Llama, chunked prefill, decode across pages): the engine on backend
    'cpu' (native decode attention and matmuls) gives the XLA backend's greedy tokens, and
    log-probs within 1e-4."""
    from jaxserve.engine import EngineConfig, LLMEngine
    from jaxserve.sampling_params import SamplingParams
    from lora_helpers import make_base, prompts
    make_base(str(tmp_path), hidden_size=64, head_dim=head_dim)
    batch = prompts(3, seed=11, lo=6, hi=20)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=True)
    outs = {}
    for impl in ("xla", "cpu"):
        engine = LLMEngine(EngineConfig(model=str(tmp_path), dtype="float32", backend=impl, page_size=4,
                                        num_pages=40, max_num_seqs=4, max_prefill_tokens=16,
                                        max_model_len=64))
        assert engine.runner.backend.name == impl
        outs[impl] = engine.generate(batch, params)
    for a, b in zip(outs["cpu"], outs["xla"]):
        assert a.token_ids == b.token_ids
        assert a.new_logprobs and len(a.new_logprobs) == len(b.new_logprobs) == 10
        np.testing.assert_allclose(a.new_logprobs, b.new_logprobs, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- soft-capping, traced windows
# Gemma 2/3: the window is an operand of the custom call (a traced int32 scalar: one compiled
# program for every layer, FULL_WINDOW for a mixed model's full layers), the soft-cap an
# attribute. SOFTCAP / CAP_SCALE as in test_kernels_attention: the cap saturates most scores.
# Tolerances as above: the kernel's tanh (a rational approximation, a few ulp) has slope <= 1,
# so a capped score is off by ~1e-6 at most, well inside TOL_F32.


def traced_kernel(traces):
    """The kernel jitted with the window a traced argument; each trace appends to `traces`."""
    @functools.partial(jax.jit, static_argnames=("scale", "softcap"))
    def f(window, q, k, v, bt, lens, pos, *, scale, softcap):
        traces.append(window)
        return cpu_attention.paged_decode_attention(q, k, v, bt, lens, pos, scale=scale,
                                                    sliding_window=window, softcap=softcap)
    return f


def reference_capped(case, scale, window, softcap):
    q, k, v, bt, lens, pos = case
    f32 = lambda x: x.astype(jnp.float32)   # noqa: E731
    return np.asarray(paged_attention_ref(f32(q), f32(k), f32(v), bt, lens, pos, scale=scale,
                                          sliding_window=window, softcap=softcap))


@pytest.mark.parametrize("dtype,q_dtype,softcap", [
    (jnp.float32, jnp.float32, SOFTCAP),
    (jnp.bfloat16, jnp.bfloat16, SOFTCAP),
    (jnp.bfloat16, jnp.float32, None),
])
def test_softcap_and_traced_window(dtype, q_dtype, softcap):
    """One trace of the kernel with a traced window serves windows 3, 9 and FULL_WINDOW (= no
    window), soft-capped or not, over a pool whose non-token rows are NaN/inf."""
    seed = fresh_seed()
    S = 8
    case = make_case(seed, dtype=dtype, batch=5, q_len=1, num_kv_heads=2, group=3, head_dim=64,
                     page_size=S, max_pages=4, last_page="full")
    case = (case[0].astype(q_dtype),) + case[1:]
    q, k, v, bt, lens, pos = stale_nan(case, S)
    pool = (bits(k), bits(v)) if dtype == jnp.bfloat16 else (k, v)
    refs = {w: reference_capped(case, CAP_SCALE, None if w == FULL_WINDOW else w, softcap)
            for w in (3, 9, FULL_WINDOW)}
    assert np.abs(refs[3] - refs[FULL_WINDOW]).max() > 1e-2, f"seed={seed}"
    if softcap is not None:
        uncapped = reference_capped(case, CAP_SCALE, None, None)
        assert np.abs(uncapped - refs[FULL_WINDOW]).max() > 1e-2, f"seed={seed}"
    traces = []
    kernel_w = traced_kernel(traces)
    for w, ref in refs.items():
        out = kernel_w(jnp.int32(w), q, *pool, bt, lens, pos, scale=CAP_SCALE,
                            softcap=softcap)
        out32 = np.asarray(out, np.float32)
        assert out.dtype == q.dtype and np.isfinite(out32).all(), f"seed={seed}, window {w}"
        assert (out32[np.asarray(pos)[:, 0] < 0] == 0).all(), f"seed={seed}"
        tol = TOL_F32 + (2.0 ** -8 * np.abs(ref) if q_dtype == jnp.bfloat16 else 0)
        err = np.abs(out32 - ref) - tol
        assert (err <= 0).all(), f"seed={seed}, window {w}: off by {err.max():.2e} over tolerance"
    assert len(traces) == 1, "the window must be an operand, not part of the program"
    # FULL_WINDOW is no window, bit for bit (both see every causal key).
    np.testing.assert_array_equal(
        np.asarray(kernel_w(jnp.int32(FULL_WINDOW), q, *pool, bt, lens, pos,
                                 scale=CAP_SCALE, softcap=softcap)),
        np.asarray(cpu_attention.paged_decode_attention(q, *pool, bt, lens, pos, scale=CAP_SCALE,
                                                        softcap=softcap)))


def test_softcap_range():
    """Scores from ~0 (tanh(t) = t) through the clamp (|s / c| > 7.9, tanh = 1 in float32), head
    dims on both code paths: against the reference's jnp.tanh."""
    for head_dim, softcap, scale in ((128, 2.0, 1.5), (64, 30.0, 1.5), (48, 0.5, 0.3),
                                     (64, 1e4, 0.125)):
        seed = fresh_seed()
        case = make_case(seed, dtype=jnp.float32, batch=4, q_len=1, num_kv_heads=2, group=2,
                         head_dim=head_dim, page_size=16, max_pages=6)
        out = cpu_attention.paged_decode_attention(*case, scale=scale, softcap=softcap)
        ref = reference_capped(case, scale, None, softcap)
        np.testing.assert_allclose(np.asarray(out), ref, atol=TOL_F32, rtol=0,
                                   err_msg=f"seed={seed}, head_dim {head_dim}, cap {softcap}")


def test_per_layer_windows_chosen_in_scan():
    """As a mixed model runs it: a layer scan over the stacked pool, each layer's window picked
    in-graph from the layer index (FULL_WINDOW for full layers), one custom call in the program."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    case = make_case(seed, dtype=jnp.float32, batch=4, q_len=1, num_kv_heads=2, group=2,
                     head_dim=64, page_size=8, max_pages=5, last_page="full")
    q, k, v, bt, lens, pos = case
    ks = [k, (-v).astype(k.dtype), jnp.asarray(rng.standard_normal(k.shape), k.dtype)]
    vs = [v, (k * 0.5).astype(k.dtype), jnp.asarray(rng.standard_normal(k.shape), k.dtype)]
    windows = (4, FULL_WINDOW, 11)

    def scan_layers(q, kl, vl):
        table = jnp.asarray(windows, jnp.int32)

        def body(c, layer):
            return c, cpu_attention.paged_decode_attention(
                q, kl, vl, bt, lens, pos, scale=CAP_SCALE, sliding_window=table[layer],
                softcap=SOFTCAP, layer=layer)
        return jax.lax.scan(body, 0, jnp.arange(3, dtype=jnp.int32))[1]

    f = jax.jit(scan_layers)
    outs = f(q, jnp.stack(ks), jnp.stack(vs))
    assert f.lower(q, jnp.stack(ks), jnp.stack(vs)).as_text().count(cpu_attention.TARGET) == 1
    for layer, w in enumerate(windows):
        ref = reference_capped((q, ks[layer], vs[layer], bt, lens, pos), CAP_SCALE,
                               None if w == FULL_WINDOW else w, SOFTCAP)
        np.testing.assert_allclose(np.asarray(outs[layer]), ref, atol=TOL_F32, rtol=0,
                                   err_msg=f"seed={seed}, layer {layer}")


@pytest.mark.parametrize("q_len", [1, 5])
def test_backend_attention_softcap_traced_window(q_len):
    """CpuBackend.attention (kernel for decode, XLA for prefill) = XlaBackend.attention with a
    soft-cap and the window a traced argument of the jitted step."""
    seed = fresh_seed()
    for dtype in (jnp.float32, jnp.bfloat16):
        q, k, v, bt, lens, pos = make_case(seed, batch=3, q_len=q_len, num_kv_heads=2, group=3,
                                           head_dim=64, page_size=8, max_pages=4, dtype=dtype,
                                           last_page="full")
        cfg = _cfg(2, 3, 64)
        cpu, xla = CpuBackend(cfg, dtype), XlaBackend(cfg, dtype)
        kl, vl = jnp.stack([k, (-v).astype(dtype)]), jnp.stack([(k * 0.5).astype(dtype), v])
        pools = {b.name: KVPages(k=stored(kl, b.pool_dtype()), v=stored(vl, b.pool_dtype()))
                 for b in (cpu, xla)}
        step = _attention_step(bt, lens, pos)

        def attend(backend):
            return jax.jit(lambda q, kv, layer, window, step: backend.attention(
                q, kv, layer, step, scale=CAP_SCALE, sliding_window=window, softcap=SOFTCAP))

        for layer, window in ((0, 3), (1, FULL_WINDOW)):
            args = (jnp.int32(layer), jnp.int32(window), step)
            out = attend(cpu)(q, pools["cpu"], *args)
            ref = attend(xla)(q, pools["xla"], *args)
            tol = TOL_F32 if dtype == jnp.float32 else 2.0 ** -7 * 4 + TOL_F32  # both rounded
            np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                                       atol=tol, rtol=0, err_msg=f"seed={seed}")
