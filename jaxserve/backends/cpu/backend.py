"""The CPU backend: XLA:CPU plus native kernels (FFI custom calls built from the C++ here).

  pool       bfloat16 stored as its uint16 bit patterns (XLA:CPU scatters into a uint16 array
             in place, into a bfloat16 one out of place: a copy of the whole pool per write)
  weights    per layer (one device call per layer: inside a scan XLA:CPU copied each layer's
             weight slice out of the stack before its matmuls); bfloat16 projections and the
             tied head packed into the AMX tile layout on CPUs with AMX
  linear     AMX-packed weights: cpu_matmul.matmul_amx (the RMSNorm fused into it); plain
             weights with few rows: cpu_matmul's small-M kernels (cpu_matmul.ROW_RANGES); else
             XLA's dot
  gated_mlp  norm, gate|up matmul and SwiGLU in one AMX call when no adapter touches gate/up
  attention  decode through cpu_attention's kernel (reads each visible K/V row once);
             prefill in XLA
Unsharded only: the custom calls have no partitioning rule.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from jaxserve.backends.base import XlaBackend, split_parts
from jaxserve.backends.cpu import cpu_attention, cpu_matmul
from jaxserve.model.kv_cache import KVPages, StepInput
from jaxserve.model.params import Linear, Params


def runs_amx() -> bool:
    """Whether this CPU runs the backend's AMX tile matmuls (bfloat16 is then the fast dtype)."""
    return cpu_matmul.amx_available()


def unavailable_reason(tp: int = 1) -> str | None:
    """Why this backend cannot run here (None: it can)."""
    if jax.default_backend() != "cpu":
        return f"the JAX platform is {jax.default_backend()!r}, not 'cpu'"
    if tp > 1:
        return f"tensor parallel (tp={tp}): the native kernels have no partitioning rule"
    return cpu_attention.unavailable_reason()


class CpuBackend(XlaBackend):
    name = "cpu"

    def __init__(self, cfg, dtype, *, layer_loop: str = "per-layer"):
        super().__init__(cfg, dtype, mesh=None, layer_loop=layer_loop)
        self.matmul_kernels = cpu_matmul.available()
        # Only per-layer weights are packed (a scan slices its weights out of a stack).
        self.amx = (self.dtype == jnp.bfloat16 and layer_loop == "per-layer"
                    and cpu_matmul.amx_available())

    def kernels(self) -> str:
        mm = ("AMX tile matmuls (bf16), small-M native matmuls" if self.amx else
              "small-M native matmuls" if self.matmul_kernels else
              f"XLA matmuls (native: {cpu_matmul.unavailable_reason()})")
        amx_note = "" if self.amx or self.dtype != jnp.bfloat16 else "; AMX unused: " + (
            "needs --layer-loop per-layer" if self.layer_loop != "per-layer" else
            "no native kernels" if not self.matmul_kernels else
            "JAXSERVE_CPU_AMX=0" if os.environ.get("JAXSERVE_CPU_AMX", "1") == "0" else
            "this CPU has no AMX")
        return f"native decode attention, {mm}{amx_note}"

    def pool_dtype(self):
        return jnp.uint16 if self.dtype == jnp.bfloat16 else self.dtype

    def prepare(self, weights, *, consume: bool = False) -> Params:
        params = super().prepare(weights, consume=consume)
        if not self.amx:
            return params

        def pack(p: Linear | None) -> Linear | None:
            if p is None or p.w.dtype != jnp.bfloat16:   # None: experts instead of an MLP
                return p
            return Linear(w=cpu_matmul.pack_amx(p.w), b=p.b, sizes=p.sizes)

        # layer by layer, each unpacked layer dropped once packed (one layer held twice)
        layers = list(params.layers)
        params = dataclasses.replace(params, layers=None)
        for i, lp in enumerate(layers):
            layers[i] = dataclasses.replace(lp, qkv=pack(lp.qkv), o=pack(lp.o),
                                            gate_up=pack(lp.gate_up), down=pack(lp.down))
        del lp
        layers = tuple(layers)
        lm_head = params.lm_head
        if lm_head is None and params.embed.dtype == jnp.bfloat16:
            # The tied head gets a packed embed^T (embed stays for the token lookup and for
            # heads over more rows than AMX_HEAD_MAX_ROWS).
            lm_head = cpu_matmul.pack_amx(params.embed.T)
        return Params(embed=params.embed, layers=layers, final_norm=params.final_norm,
                      lm_head=lm_head)

    # -- ops -----------------------------------------------------------------------------------
    def matmul(self, x, w):
        if isinstance(w, cpu_matmul.AmxPacked):
            return cpu_matmul.matmul_amx(x, w)
        if self.matmul_kernels and cpu_matmul.use_for(x, w):
            return cpu_matmul.matmul(x, w)
        return super().matmul(x, w)

    def linear(self, x, p: Linear, norm=None) -> list:
        if norm is not None and isinstance(p.w, cpu_matmul.AmxPacked):
            # The norm inside the AMX call: x is normalized while it is packed into tiles.
            return split_parts(cpu_matmul.matmul_amx(x, p.w, norm=norm), p, x.dtype)
        return super().linear(x, p, norm)

    def gated_mlp(self, x, p: Linear, norm, lora, modules, act):
        # The fused kernel computes SiLU only: GeGLU (Gemma) takes the packed matmul (with the
        # fused norm) below and its activation in XLA. A unit-offset norm arrives as its float32
        # factor 1 + w (norms.norm_weight), which the fused norm takes as it is.
        if (isinstance(p.w, cpu_matmul.AmxPacked) and act is jax.nn.silu
                and x.dtype == jnp.bfloat16 and not lora.adapts(modules)):
            # norm, gate|up matmul and SwiGLU in one native call
            return cpu_matmul.swiglu_amx(x, p.w, norm=norm)
        return super().gated_mlp(x, p, norm, lora, modules, act)

    def lm_head(self, h, params: Params):
        if isinstance(params.lm_head, cpu_matmul.AmxPacked):   # the tied embed^T, packed
            if cpu_matmul.rows(h) <= cpu_matmul.AMX_HEAD_MAX_ROWS:
                return cpu_matmul.matmul_amx(h, params.lm_head)
            return jnp.einsum("...h,vh->...v", h, params.embed, preferred_element_type=jnp.float32)
        if (params.lm_head is None and self.matmul_kernels
                and cpu_matmul.use_for(h, params.embed, transposed=True)):
            return cpu_matmul.matmul_t(h, params.embed)
        return super().lm_head(h, params)

    def attention(self, q, kv: KVPages, layer, step: StepInput, *, scale, sliding_window,
                  softcap=None):
        if q.shape[1] != 1:    # prefill: XLA
            return super().attention(q, kv, layer, step, scale=scale,
                                     sliding_window=sliding_window, softcap=softcap)
        return cpu_attention.paged_decode_attention(
            q, kv.k, kv.v, step.block_tables, step.kv_lens, step.positions, scale=scale,
            sliding_window=sliding_window, softcap=softcap, layer=layer)

    def min_decode_rows(self) -> int:
        # XLA:CPU runs a one-row bf16 matmul as a slow matrix-vector product: without the
        # small-M kernels to take those rows, bf16 decode pads to two rows.
        return 2 if self.dtype == jnp.bfloat16 and not self.matmul_kernels else 1

    def attention_reads_padded_pages(self, prefill: bool) -> bool:
        # The native decode kernel reads each row's pages up to its kv_len; prefill is XLA's.
        return prefill
