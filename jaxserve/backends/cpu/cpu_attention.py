"""Native paged decode attention for XLA:CPU (an XLA FFI custom call, cpu_attention.cc).

The plain XLA path (attention.paged_attention_xla) gathers each sequence's pages into a copy and
then runs small batched einsums. The kernel here reads each visible K/V row of the pool once,
does all query heads of a GQA group against it, and keeps an online softmax in float32; rows
(batch row, kv head) are spread over XLA's intra-op thread pool. Decode only (q_len == 1).

The shared library is built at install time by native_build (`jaxserve build-kernels`; g++
-O3 -march=native into `$JAXSERVE_CACHE_DIR`, default `~/.cache/jaxserve/kernels/`, as
`cpu_attention-<key>.so`) and loaded when the CPU backend is constructed.

`available()` says whether the kernel can be used (never raises; logs the reason once when not):
it is False with JAXSERVE_CPU_KERNELS=0 (or false/no/off), off the CPU backend, without a
compiler, or if the build or load fails. `jaxserve.backends.select("auto")` uses it on CPU.
"""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.backends.cpu import native_build
from jaxserve.backends.cpu.native_build import cache_dir  # noqa: F401 -- part of this module's API

log = logging.getLogger("jaxserve.cpu_attention")

TARGET = "jaxserve_paged_decode_attention"
_SYMBOL = "JaxservePagedDecodeAttention"
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_attention.cc")
_POOL_DTYPES = (jnp.float32, jnp.uint16, jnp.bfloat16)   # uint16: bf16 bit patterns (kv_cache)

_LIB = native_build.NativeLibrary("cpu_attention", _SOURCE, {TARGET: _SYMBOL},
                                  "native CPU paged attention", log)


def _load():
    """The loaded library with its FFI target registered, or None (reason in
    unavailable_reason())."""
    return _LIB.load()


def unavailable_reason() -> str | None:
    """Why available() is False, or None when it is True."""
    return _LIB.unavailable_reason()


def available() -> bool:
    """Whether paged_decode_attention can run here (builds the kernel on first call)."""
    return _LIB.available()


_NO_WINDOW = (1 << 31) - 1   # the window operand of "no sliding window": beyond any context


def paged_decode_attention(q, k_pool, v_pool, block_tables, kv_lens, q_positions, *, scale,
                           sliding_window=None, softcap=None, layer=None):
    """Decode attention over the paged pool; the calling convention of paged_attention_xla.

    q: [B, 1, Hq, D], any float dtype (the kernel computes in float32; the result is cast back
    to q.dtype). k_pool, v_pool: [L, Hkv, N, S, D] with `layer` (an int32 scalar, traced is fine),
    else [Hkv, N, S, D]; float32, bfloat16, or uint16 holding bfloat16 bits (kv_cache's CPU
    storage). block_tables [B, P], kv_lens [B], q_positions [B, 1] int32.
    sliding_window: None, an int or an int32 scalar (traced is fine): it is an operand of the
    custom call, so one compiled program serves layers with different windows (a window <= 0
    sees nothing: zeros). softcap: None or a static float, an attribute (each score s ->
    softcap * tanh(s / softcap) before the softmax).

    Raises RuntimeError when the kernel is not available (see available()), and an XLA runtime
    error if a block-table entry of a page with visible keys is outside [0, N).
    """
    B, Tq, Hq, D = q.shape
    if Tq != 1:
        raise ValueError(f"paged_decode_attention is for decode (q_len 1), got q_len {Tq}")
    if layer is None:
        k_pool, v_pool, layer = k_pool[None], v_pool[None], 0
    if k_pool.ndim != 5 or v_pool.shape != k_pool.shape:
        raise ValueError(f"pools must be [L, Hkv, N, S, D] (with layer) or [Hkv, N, S, D]; got "
                         f"{k_pool.shape} and {v_pool.shape}")
    if k_pool.dtype != v_pool.dtype or not any(k_pool.dtype == d for d in _POOL_DTYPES):
        raise ValueError(f"pool dtype must be one of float32, bfloat16, uint16 (bf16 bits), got "
                         f"{k_pool.dtype} / {v_pool.dtype}")
    if sliding_window is None:
        window = jnp.int32(_NO_WINDOW)
    elif isinstance(sliding_window, int):
        window = jnp.int32(max(min(sliding_window, _NO_WINDOW), 0))
    else:
        window = jnp.asarray(sliding_window, jnp.int32).reshape(())
    if softcap is not None:
        try:
            softcap = float(softcap)
        except TypeError as e:   # a traced value
            raise TypeError(f"softcap must be a static float, got {softcap!r}") from e
        if not softcap > 0:
            raise ValueError(f"softcap must be positive, got {softcap}")
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"native CPU paged attention unavailable: {reason}")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((B, Hq, D), jnp.float32))
    out = call(q[:, 0].astype(jnp.float32), k_pool, v_pool,
               jnp.asarray(layer, jnp.int32).reshape(()), window, block_tables.astype(jnp.int32),
               kv_lens.astype(jnp.int32), q_positions[:, 0].astype(jnp.int32),
               scale=np.float32(scale), softcap=np.float32(softcap or 0.0))
    return out[:, None].astype(q.dtype)
