"""The Pallas backend: attention and LoRA through the kernels of pallas_kernels/. GPU: both
through Pallas' Triton lowering; TPU: the Mosaic attention kernel, LoRA in XLA (there is no
Mosaic LoRA kernel yet); CPU: interpret mode, for tests. Everything else as the XLA backend."""
from __future__ import annotations

import jax

from jaxserve.backends.base import XlaBackend
from jaxserve.lora.apply import gathered_lora
from jaxserve.model.kv_cache import KVPages, StepInput


class PallasBackend(XlaBackend):
    name = "pallas"

    def __init__(self, cfg, dtype, *, mesh=None, layer_loop: str = "scan",
                 interpret: bool | None = None, platform: str | None = None):
        """platform: "gpu", "tpu" or "cpu" (default: JAX's); given, it lets this process lower a
        step for a device it does not have. Pallas on CPU runs only in interpret mode."""
        super().__init__(cfg, dtype, mesh=mesh, layer_loop=layer_loop)
        self.platform = platform or jax.default_backend()
        self.interpret = (self.platform == "cpu") if interpret is None else interpret
        self.lora_kernels = not (self.platform == "tpu" and not self.interpret)

    def kernels(self) -> str:
        mode = " (interpret mode)" if self.interpret else ""
        return ("Pallas attention and LoRA kernels" if self.lora_kernels
                else "Pallas attention kernel, LoRA in XLA") + mode

    def attention(self, q, kv: KVPages, layer, step: StepInput, *, scale, sliding_window):
        from pallas_kernels import paged_attention as pk
        return pk.paged_attention(q, kv.k[layer], kv.v[layer], step.block_tables, step.kv_lens,
                                  step.positions, scale=scale, sliding_window=sliding_window,
                                  interpret=self.interpret, backend=self.platform)

    def lora_delta(self, x, a, b, idx, ranks, scales):
        if not self.lora_kernels:
            return super().lora_delta(x, a, b, idx, ranks, scales)
        B, T, din = x.shape
        y = gathered_lora(x.reshape(B * T, din), a.astype(x.dtype), b.astype(x.dtype), idx,
                          ranks, scales, impl="pallas", interpret=self.interpret,
                          backend=self.platform)
        return y.reshape(B, T, -1)
