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


def stored(x, pool_dtype):
    """Values -> how a pool of `pool_dtype` holds them. A backend may store a bfloat16 pool as
    its uint16 bit patterns (the CPU backend does: XLA:CPU scatters into uint16 in place, into
    bfloat16 out of place); that is a bit cast, not a conversion."""
    if jnp.dtype(pool_dtype) == jnp.uint16:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    return x.astype(pool_dtype)


def values(x):
    """Pool contents (or pages gathered from it) -> values (uint16 bit patterns back to
    bfloat16; anything else as it is)."""
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x


def init_kv_pages(cfg: ModelConfig, num_pages: int, page_size: int, dtype) -> KVPages:
    """An empty pool holding `dtype` (a value dtype, or uint16 for bfloat16 bit patterns)."""
    shape = (cfg.num_layers, cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
    return KVPages(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


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
    # runs layer by layer (llama.step_rope); a model with local-RoPE layers (Gemma 3) holds both
    # bases stacked, [2, B, T, D/2], and each layer takes its own. None: the step computes them.
    rope: tuple | None = None
    # Prompt logprobs (jaxserve/scoring.py): [B, T] int32, the token each position's logits are
    # scored against (-1: none). None (the usual case) leaves the step program as it is.
    score_targets: jax.Array | None = None
