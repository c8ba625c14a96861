"""The paged KV pool on device, and the per-step metadata that addresses it."""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxserve.config import ModelConfig


KV_AXES = ("layers", "kv_heads", "pages", "page_size", "head_dim")  # logical axes of k and v


@jax.tree_util.register_dataclass
@dataclass
class KVPages:
    k: jax.Array  # [layers, kv_heads, num_pages, page_size, head_dim]
    v: jax.Array  # [layers, kv_heads, num_pages, page_size, head_dim]

    @property
    def num_pages(self) -> int:
        return self.k.shape[2]

    @property
    def page_size(self) -> int:
        return self.k.shape[3]


def storage_dtype(dtype):
    """How the pool stores values of `dtype`.

    On CPU a bfloat16 pool is kept as its uint16 bit pattern: XLA:CPU scatters into a bf16
    array out of place (it copied the whole pool, ~100 ms per layer write on the default
    model), and into a uint16 one in place (~0.03 ms). Readers view gathered pages with
    `decode`, writers store through `encode`; elsewhere the pool holds `dtype` itself.
    """
    if jnp.dtype(dtype) == jnp.bfloat16 and jax.default_backend() == "cpu":
        return jnp.uint16
    return dtype


def encode(x, pool_dtype):
    """Values -> the pool's stored form (see storage_dtype)."""
    if jnp.dtype(pool_dtype) == jnp.uint16:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    return x.astype(pool_dtype)


def decode(x):
    """Pool contents (or pages gathered from it) -> values."""
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x


def init_kv_pages(cfg: ModelConfig, num_pages: int, page_size: int, dtype=jnp.float32) -> KVPages:
    shape = (cfg.num_layers, cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
    dt = storage_dtype(dtype)
    return KVPages(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt))


def bytes_per_page(cfg: ModelConfig, page_size: int, dtype=jnp.float32) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * page_size * cfg.head_dim * jnp.dtype(dtype).itemsize


@jax.tree_util.register_dataclass
@dataclass
class StepInput:
    """Everything one forward step needs besides weights and the pool (a padded bucket).

    Padding tokens have position -1, write to the null page 0 and are never read.
    """
    tokens: jax.Array         # [B, T] int32
    positions: jax.Array      # [B, T] int32, -1 for padding
    block_tables: jax.Array   # [B, P] int32, 0 for unused entries
    kv_lens: jax.Array        # [B] int32: K/V tokens valid after this step's writes
    slot_pages: jax.Array     # [B*T] int32: page each token's K/V goes to
    slot_offsets: jax.Array   # [B*T] int32: offset within that page
    logits_index: jax.Array   # [B] int32: which of the T tokens gives the row's next-token logits
    # LoRA (None when no request of the step has an adapter: the base-only program is unchanged)
    lora_idx: jax.Array | None = None  # [B*T] int32: slot in `lora` of each token, -1 = base model
    lora: "LoraBatch | None" = None    # jaxserve.lora.pool.LoraBatch: this step's adapter slots
    # RoPE (cos, sin) [B, T, D/2] float32 of `positions`, computed once per step when the step
    # runs layer by layer (llama.rope_tables); None: each layer computes them.
    rope: tuple | None = None
