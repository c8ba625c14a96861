"""The Pallas backend: attention and LoRA through the kernels of pallas_kernels/. GPU: both
through Pallas' Triton lowering; TPU: the Mosaic attention kernel, and LoRA as one batched
matmul per projection in XLA (each batch row has its own adapter slot, so the grouped matmul of
a step is a batched one, which the MXU runs as it is; token-indexed callers get
pallas_kernels.lora.grouped_lora, XLA's ragged_dot); CPU: interpret mode, for tests.
Everything else as the XLA backend."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxserve import sharding
from jaxserve.backends.base import XlaBackend
from jaxserve.lora.apply import gathered_lora
from jaxserve.model.kv_cache import KV_AXES, KVPages, StepInput


class PallasBackend(XlaBackend):
    name = "pallas"

    def __init__(self, cfg, dtype, *, mesh=None, layer_loop: str = "scan",
                 interpret: bool | None = None, platform: str | None = None, ep: int = 1):
        """platform: "gpu", "tpu" or "cpu" (default: JAX's); given, it lets this process lower a
        step for a device it does not have. Pallas on CPU runs only in interpret mode."""
        super().__init__(cfg, dtype, mesh=mesh, layer_loop=layer_loop, ep=ep)
        self.platform = platform or jax.default_backend()
        self.interpret = (self.platform == "cpu") if interpret is None else interpret
        self.lora_kernels = not (self.platform == "tpu" and not self.interpret)

    def kernels(self) -> str:
        mode = " (interpret mode)" if self.interpret else ""
        return ("Pallas attention and LoRA kernels" if self.lora_kernels
                else "Pallas attention kernel, LoRA as row-batched matmuls in XLA") + mode

    def attention(self, q, kv: KVPages, layer, step: StepInput, *, scale, sliding_window,
                  softcap=None):
        """The kernel gets the whole stacked pool and the layer index and reads the layer's
        pages in place (a slice kv.k[layer] would be copied into a kernel operand: a layer's
        pool per layer per step). Under tensor parallelism each device runs the kernel on its
        own KV heads (shard_map): a kernel has no partitioning rule, so without it the pool
        would be gathered onto every device. A traced sliding window enters the shard_map as
        an operand, replicated like the layer index."""
        from pallas_kernels import paged_attention as pk

        def attend(q, k, v, block_tables, kv_lens, positions, layer, *traced_window):
            window = traced_window[0] if traced_window else sliding_window
            return pk.paged_attention(q, k, v, block_tables, kv_lens, positions, scale=scale,
                                      sliding_window=window, softcap=softcap, layer=layer,
                                      interpret=self.interpret, backend=self.platform)
        args = (q, kv.k, kv.v, step.block_tables, step.kv_lens, step.positions,
                jnp.asarray(layer, jnp.int32))
        if not (sliding_window is None or isinstance(sliding_window, int)):
            args += (jnp.asarray(sliding_window, jnp.int32),)
        if self.mesh is None:
            return attend(*args)
        heads = P(None, None, sharding.TP, None)                  # q [B, T, Hq, D]
        pool = sharding.spec(KV_AXES, kv.k.shape, self.mesh)
        return jax.shard_map(attend, mesh=self.mesh, check_vma=False,
                             in_specs=(heads, pool, pool) + (P(),) * (len(args) - 3),
                             out_specs=heads)(*args)

    def attention_reads_padded_pages(self, prefill: bool) -> bool:
        # Every kernel walks a row's pages only up to its kv_len (and from its window start):
        # the block table's width costs nothing, so one width serves every step.
        return False

    def lora_delta(self, x, a, b, idx, ranks, scales):
        if not self.lora_kernels:
            return super().lora_delta(x, a, b, idx, ranks, scales)
        B, T, din = x.shape
        y = gathered_lora(x.reshape(B * T, din), a.astype(x.dtype), b.astype(x.dtype), idx,
                          ranks, scales, impl="pallas", interpret=self.interpret,
                          backend=self.platform)
        return y.reshape(B, T, -1)
