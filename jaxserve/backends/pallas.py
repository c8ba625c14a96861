"""The Pallas backend: attention and LoRA through the kernels of pallas_kernels/ (GPU, TPU; on
CPU only in interpret mode, for tests). Everything else as the XLA backend."""
from __future__ import annotations

import jax

from jaxserve.backends.base import XlaBackend
from jaxserve.lora.apply import gathered_lora
from jaxserve.model.kv_cache import KVPages, StepInput


class PallasBackend(XlaBackend):
    name = "pallas"

    def __init__(self, cfg, dtype, *, mesh=None, layer_loop: str = "scan",
                 interpret: bool | None = None):
        super().__init__(cfg, dtype, mesh=mesh, layer_loop=layer_loop)
        # Pallas on CPU can only run in interpret mode.
        self.interpret = (jax.default_backend() == "cpu") if interpret is None else interpret

    def describe(self) -> str:
        mode = " (interpret mode)" if self.interpret else ""
        return super().describe().replace("attention and LoRA in plain XLA",
                                          f"Pallas attention and LoRA kernels{mode}")

    def attention(self, q, kv: KVPages, layer, step: StepInput, *, scale, sliding_window):
        from pallas_kernels import paged_attention as pk
        return pk.paged_attention(q, kv.k[layer], kv.v[layer], step.block_tables, step.kv_lens,
                                  step.positions, scale=scale, sliding_window=sliding_window,
                                  interpret=self.interpret)

    def lora_delta(self, x, a, b, idx, ranks, scales):
        B, T, din = x.shape
        y = gathered_lora(x.reshape(B * T, din), a.astype(x.dtype), b.astype(x.dtype), idx,
                          ranks, scales, impl="pallas", interpret=self.interpret)
        return y.reshape(B, T, -1)
