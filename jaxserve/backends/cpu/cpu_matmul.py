"""Small-M matmuls against bf16 (and f32) weights on XLA:CPU (FFI custom calls, cpu_matmul.cc).

Decode at batch 1-8 reads every weight once per step, so it is bound by memory bandwidth; but
XLA:CPU's dot with bf16 weights and a few rows runs far below it (x[M, 576] @ W[576, 3072] bf16
with float32 accumulation: ~5 GB/s of weights at M = 1, ~10-15 GB/s at M = 2-8, against ~25 GB/s
for float32 weights). The kernels here stream the bf16 weights once, widen them exactly to
float32 (bits << 16) and accumulate in float32 against x in float32 (a bf16 x is widened, never
the other way round), spread over XLA's intra-op thread pool:

  matmul(x, w)    x [..., K] @ w [K, N]        (projections: [in, out])
  matmul_t(x, e)  x [..., K] @ e[N, K]^T       (tied-embedding LM head: one contiguous row of
                                                e per output)

Both return float32 [..., N]; x may be float32 or bfloat16 (other float dtypes are cast to
float32 first); the weights are bfloat16, or float32 (the same kernels without the widening:
XLA's float32 dot also falls below bandwidth at M = 2-16). They work under jit; the custom call
has no partitioning rule, so keep it out of sharded (tensor-parallel) programs.

Built at install time like cpu_attention (native_build: `jaxserve build-kernels`, into
`$JAXSERVE_CACHE_DIR` as `cpu_matmul-<key>.so`). `available()` never raises; it is False with
JAXSERVE_CPU_KERNELS=0, off the CPU backend, without a compiler, or if the build fails.
The CPU backend (backend.py) uses these when `use_for` says so (see ROW_RANGES).
"""
from __future__ import annotations

import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.backends.cpu import native_build

log = logging.getLogger("jaxserve.cpu_matmul")

TARGET = "jaxserve_matmul_bf16"            # x @ W
TARGET_T = "jaxserve_matmul_t_bf16"        # x @ E^T
TARGET_AMX = "jaxserve_matmul_amx"         # bf16 x @ AMX-packed bf16 W
TARGET_SWIGLU = "jaxserve_swiglu_amx"      # silu(x @ Wg) * (x @ Wu), [Wg Wu] AMX-packed
TARGET_AMX_NORM = "jaxserve_matmul_amx_norm"       # rms_norm(x) @ W, W AMX-packed
TARGET_SWIGLU_NORM = "jaxserve_swiglu_amx_norm"    # the SwiGLU of rms_norm(x)
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_matmul.cc")
_LIB = native_build.NativeLibrary(
    "cpu_matmul", _SOURCE, {TARGET: "JaxserveMatmulBf16", TARGET_T: "JaxserveMatmulTBf16",
                 TARGET_AMX: "JaxserveMatmulAmx", TARGET_SWIGLU: "JaxserveSwigluAmx",
                 TARGET_AMX_NORM: "JaxserveMatmulAmxNorm",
                 TARGET_SWIGLU_NORM: "JaxserveSwigluAmxNorm"},
    "native CPU bf16 matmul", log)

# When llama's projections / LM head take the kernel: for x with `rows` rows (x's leading dims
# multiplied) against weights of this dtype and layout ("nn": x @ W, "nt": x @ E^T, the tied
# head), ROW_RANGES[dtype, layout] = (fewest, most) rows. Measured with
# scripts/bench_cpu_matmul.py on the default model's shapes, weights cycled from DRAM (2-core
# Sapphire Rapids, ~28 GB/s of read bandwidth; the tables: bench_results/cpu_matmul*.json):
#   bf16 x @ W: the kernel reads the weights at 20-35 GB/s for M = 1-8, 1.3-17x XLA's dot (XLA:
#     ~2 GB/s at M = 1, 8-17 GB/s at M = 2-8); at M = 12-16 its float32 multiply-adds are the
#     limit (~8-15 GB/s) and XLA is as fast or faster: crossover at 8 (MAX_ROWS).
#   bf16 x @ E^T (49152 x 576): 23 GB/s at M = 1 (XLA 0.9), 1.0-1.3x XLA at M = 4, 0.8-0.9x at
#     M = 8: up to 4.
#   f32 x @ W: XLA's dot already streams at ~26 GB/s for M = 1 (the kernel: the same), but drops
#     to 9-18 GB/s for M = 2-16, where the kernel keeps 15-38 GB/s (1.5-2.6x); still 1.5x at
#     M = 24-32, 1.0x at 64; kept to 2..16 (decode-sized batches).
#   f32 x @ E^T: 0.9x at M = 1, 1.1-1.5x at M = 2-8, ~1.1x at 16, < 1 from 24: 2..8.
MAX_ROWS = 8
ROW_RANGES = {
    ("bfloat16", "nn"): (1, MAX_ROWS),
    ("bfloat16", "nt"): (1, 4),
    ("float32", "nn"): (2, 16),
    ("float32", "nt"): (2, 8),
}


# The tied LM head (49152 x 576) takes matmul_amx up to this many rows. Single calls, bf16,
# 2-core Sapphire Rapids VM (median of 40, fourth session): 1.4-1.8 ms at M = 16 (XLA 2.1),
# 1.7-1.9 at 32 (XLA 2.6-3.4), 2.4-2.6 at 64 (XLA 3.7-3.9); past 64 rows the kernel's times
# scattered (96: 3.3-6.3 vs 4.7-5.8; 128: 4.1-9.7 vs 6.2-7.9), so larger batches take XLA.
AMX_HEAD_MAX_ROWS = 64


def amx_available() -> bool:
    """Whether matmul_amx runs on the tile unit here: the kernel is available, was built for a
    CPU with AMX (Sapphire Rapids or later), Linux granted the tile state, and JAXSERVE_CPU_AMX
    is not "0"."""
    if os.environ.get("JAXSERVE_CPU_AMX", "1") == "0" or not available():
        return False
    return bool(_LIB.state["lib"].JaxserveAmxAvailable())


@jax.tree_util.register_pytree_node_class
class AmxPacked:
    """A bfloat16 weight W [K, N] stored for the AMX kernel (see cpu_matmul.cc):
    data [ceil(N/32), ceil(K/32), 2, 16, 32], data[s, kb, t, p, 2n + e] = W[32kb + 2p + e,
    32s + 16t + n] (zero-padded). A pytree (data is the leaf; K and N are static), so it can
    stand in for W in a params tree passed through jit; the CPU backend's matmul takes it."""

    def __init__(self, data, k: int, n: int):
        self.data, self.k, self.n = data, int(k), int(n)

    def tree_flatten(self):
        return (self.data,), (self.k, self.n)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.k, self.n)

    @property
    def dtype(self):
        return self.data.dtype

    def unpack(self):
        """W [K, N] again."""
        ns, kb = self.data.shape[:2]
        w = self.data.reshape(ns, kb, 2, 16, 16, 2).transpose(1, 3, 5, 0, 2, 4)
        return w.reshape(kb * 32, ns * 32)[:self.k, :self.n]


def pack_amx(w) -> AmxPacked:
    """W [K, N] (cast to bfloat16) -> AmxPacked."""
    if w.ndim != 2:
        raise ValueError(f"pack_amx: W must be [K, N], got shape {w.shape}")
    k, n = w.shape
    kp, np_ = -(-k // 32) * 32, -(-n // 32) * 32
    w = jnp.pad(jnp.asarray(w, jnp.bfloat16), ((0, kp - k), (0, np_ - n)))
    data = w.reshape(kp // 32, 16, 2, np_ // 32, 2, 16).transpose(3, 0, 4, 1, 5, 2)
    return AmxPacked(data.reshape(np_ // 32, kp // 32, 2, 16, 32), k, n)


def _on_tiles(x) -> bool:
    """Whether a bfloat16 x goes to the AMX kernels (decided at trace time): the CPU backend with
    one device (the custom calls have no partitioning rule) and amx_available()."""
    return (x.dtype == jnp.bfloat16 and jax.default_backend() == "cpu"
            and jax.device_count() == 1 and amx_available())


def _normed(x, norm):
    """llama.rms_norm(x, *norm) (norm = (weight, eps)), for the paths without the fused norm."""
    from jaxserve.model.norms import rms_norm
    return rms_norm(x, *norm)


def _tile_call(target, x, w: AmxPacked, out_n: int, out_dtype, norm=None):
    """The AMX custom call on x [..., K] (with the RMSNorm prologue when norm = (weight, eps))."""
    x2 = x.reshape(rows(x), w.k)
    out = jax.ShapeDtypeStruct((x2.shape[0], out_n), out_dtype)
    if norm is None:
        y = jax.ffi.ffi_call(target, out)(x2, w.data)
    else:
        weight, eps = norm
        y = jax.ffi.ffi_call(target, out)(x2, weight, w.data, eps=np.float32(eps))
    return y.reshape(*x.shape[:-1], out_n)


def matmul_amx(x, w: AmxPacked, norm=None):
    """x [..., K] @ W (AmxPacked) -> float32 [..., N]. On the tile unit for bfloat16 x where
    amx_available(); otherwise (float32 x, or no AMX) an XLA einsum over the packed layout, the
    same products in float32. With norm = (weight [K], eps): the product of
    llama.rms_norm(x, weight, eps), on the tile unit computed while x is packed (one call, no
    separate norm ops; r = 1/sqrt(mean(x^2) + eps) in one float32 chain, so rarely an element of
    the bf16 h is one ulp from XLA's)."""
    if x.shape[-1] != w.k:
        raise ValueError(f"matmul_amx: x {x.shape} and packed W [K={w.k}, N={w.n}]: K differs")
    if _on_tiles(x):
        return _tile_call(TARGET_AMX if norm is None else TARGET_AMX_NORM, x, w, w.n,
                          jnp.float32, norm)
    if norm is not None:
        x = _normed(x, norm)
    ns, kb = w.data.shape[:2]
    xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, kb * 32 - w.k)])
    xp = xp.reshape(*x.shape[:-1], kb, 16, 2)
    y = jnp.einsum("...kpe,sktpne->...stn", xp, w.data.reshape(ns, kb, 2, 16, 16, 2),
                   preferred_element_type=jnp.float32)
    return y.reshape(*x.shape[:-1], ns * 32)[..., :w.n]


def swiglu_fits(w: AmxPacked) -> bool:
    """Whether swiglu_amx can take this packed [Wg Wu] on the tile unit: each half a whole number
    of 32-column strips."""
    return w.n % 64 == 0


def swiglu_amx(x, w: AmxPacked, norm=None):
    """silu(x @ Wg) * (x @ Wu) as bfloat16 [..., N/2], for w the packed fused [Wg Wu] [K, N]
    (the fused gate|up of model/params.py). On the tile unit for bfloat16 x where amx_available()
    and swiglu_fits(w): the activation computed in float32 from the float32 products and
    rounded once to bfloat16 (the XLA path rounds g and u to bfloat16 first, then silu(g) and the
    product: a few bfloat16 ulp apart). Otherwise matmul_amx, then the same in XLA. `norm`: as
    matmul_amx's."""
    half = w.n // 2
    if swiglu_fits(w) and _on_tiles(x):
        return _tile_call(TARGET_SWIGLU if norm is None else TARGET_SWIGLU_NORM, x, w, half,
                          jnp.bfloat16, norm)
    y = matmul_amx(x, w, norm)
    return (jax.nn.silu(y[..., :half]) * y[..., half:]).astype(jnp.bfloat16)


def unavailable_reason() -> str | None:
    """Why available() is False, or None when it is True."""
    return _LIB.unavailable_reason()


def available() -> bool:
    """Whether matmul / matmul_t can run here (builds the kernel on first call)."""
    return _LIB.available()


def rows(x) -> int:
    """Rows of x as the kernel sees them: the product of its leading dims (static)."""
    return math.prod(x.shape[:-1])


def use_for(x, w, transposed: bool = False) -> bool:
    """Whether llama's projections / LM head should take the kernel for x against weight w
    (w [K, N]; with `transposed`, the tied head's e [N, K]), decided at trace time from static
    shapes: the CPU backend with one device (the custom call has no partitioning rule), a
    bfloat16 or float32 weight, rows(x) within ROW_RANGES, and the kernel available."""
    lo, hi = ROW_RANGES.get((jnp.dtype(w.dtype).name, "nt" if transposed else "nn"), (1, 0))
    if not lo <= rows(x) <= hi:
        return False
    if jax.default_backend() != "cpu" or jax.device_count() != 1:
        return False
    return available()


def _prepare(x, w, name: str, w_layout: str):
    if w.ndim != 2:
        raise ValueError(f"{name}: weight must be 2-D {w_layout}, got shape {w.shape}")
    if w.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"{name}: weight must be bfloat16 or float32, got {w.dtype}")
    if x.ndim < 1:
        raise ValueError(f"{name}: x must be [..., K], got a scalar")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name}: x must be a float array, got {x.dtype}")
    if x.dtype not in (jnp.float32, jnp.bfloat16):
        x = x.astype(jnp.float32)
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"native CPU bf16 matmul unavailable: {reason}")
    return x.reshape(rows(x), x.shape[-1])


def _call(target, x, w, name: str, wname: str, layout: str, k_axis: int):
    x2 = _prepare(x, w, name, layout)
    K, N = w.shape[k_axis], w.shape[1 - k_axis]
    if x.shape[-1] != K:
        raise ValueError(f"{name}: x {x.shape} and {wname} {w.shape}: K {x.shape[-1]} != {K}")
    y = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x2.shape[0], N), jnp.float32))(x2, w)
    return y.reshape(*x.shape[:-1], N)


def matmul(x, w):
    """x [..., K] (float32 or bfloat16) @ w [K, N] (bfloat16 or float32) -> float32 [..., N]."""
    return _call(TARGET, x, w, "matmul", "w", "[K, N]", k_axis=0)


def matmul_t(x, e):
    """x [..., K] (float32 or bfloat16) @ e[N, K]^T (e bfloat16 or float32) -> float32
    [..., N]."""
    return _call(TARGET_T, x, e, "matmul_t", "e", "[N, K]", k_axis=1)
