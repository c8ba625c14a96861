"""Unified paging: LoRA weights live in pages of the KV pool itself.

S-LoRA's unit is one hidden-size vector, which fits neither GQA (K/V rows are Hkv*D < H wide) nor
MLP adapters (rows of width I). Our unit is the KV page, whatever is stored in it: a page is
`2 * Hkv * page_size * D` elements in every layer (its K half, then its V half). An adapter's
projection m of stored rank R_m is written row-interleaved, row j = [A_m[j] (in_m), B_m^T[j]
(out_m)], so R_m * (in_m + out_m) elements per layer, cut into `ceil(... / page_elems)` pages taken
from the same `BlockAllocator` as KV pages. Layer l of the adapter sits in layer l of its pages,
so the layer scan reads an adapter's weights from the pool slice it already carries.

Consequences: memory held by adapters is exactly memory not available to KV (one budget, no
separate adapter heap, no fragmentation beyond one partial page per projection); row widths of
any size (GQA K/V, MLP) pack the same way; admission needs only page counts (plain Python).

Per step, the runner gives each batch row a slot holding its sequence's adapter (or none), and,
per projection, the row's page list padded with the null page 0 to the pages a rank-R projection
needs, R = the step's largest rank rounded up to a power of two. The layers gather those pages
into dense `[B, R, in]` / `[B, R, out]` stacks; rows past an adapter's rank (zeros, or null-page
garbage) are masked by its rank. The step's shapes, and so its program and cost, depend on the
batch and R, never on how many distinct adapters the batch mixes.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.lora.adapter import MODULES, LoraAdapter, module_dims
from jaxserve.model.kv_cache import KVPages, stored, values


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["pages", "ranks", "scales", "weights"],
                   meta_fields=["modules", "max_rank", "mesh"])
@dataclass
class LoraBatch:
    """Adapter slots of one step (S = batch rows, one slot each; see jaxserve/lora/runtime.py)."""
    pages: tuple          # per module in `modules`: [S, pages_for_rank(m, max_rank)] int32
    ranks: jax.Array      # [L, len(modules), S] int32 (0 for empty slots)
    scales: jax.Array     # [L, len(modules), S] float32
    modules: tuple = field(default=())   # static: projections some adapter of the step adapts
    max_rank: int = 0                    # static: rows gathered per slot (the step's rank bucket)
    mesh: object = None                  # static: the tp Mesh when sharded (jaxserve/lora/tp.py)
    # every layer's slot weights, gathered from `pages` by a call of their own before the step
    # (jaxserve.lora.runtime.LoraRuntime.slot_weights), as the pool stores values (decoded by
    # llama.lora_layer_inputs); None: the step gathers them itself
    weights: tuple | None = None

    @classmethod
    def from_slots(cls, slots, mesh=None) -> "LoraBatch":
        """A step's host-built slots (jaxserve.step_builder.LoraSlots) as the step's input."""
        return cls(pages=slots.pages, ranks=slots.ranks, scales=slots.scales,
                   modules=slots.modules, max_rank=slots.max_rank, mesh=mesh)


@dataclass(frozen=True)
class PageLayout:
    cfg: ModelConfig
    page_size: int
    max_rank: int

    @property
    def page_elems(self) -> int:
        """Elements one page holds in one layer (K half + V half)."""
        return 2 * self.cfg.num_kv_heads * self.page_size * self.cfg.head_dim

    def width(self, module: str) -> int:
        din, dout = module_dims(self.cfg, module)
        return din + dout

    def pages_for_rank(self, module: str, rank: int) -> int:
        return math.ceil(rank * self.width(module) / self.page_elems)

    def module_pages(self, adapter: LoraAdapter) -> dict[str, int]:
        return {m: self.pages_for_rank(m, adapter.weights.a[m].shape[1]) for m in adapter.modules}

    def num_pages(self, adapter: LoraAdapter) -> int:
        return sum(self.module_pages(adapter).values())

    def split_pages(self, adapter: LoraAdapter, pages: list[int]) -> dict[str, list[int]]:
        """An adapter's page list, cut per projection (in MODULES order)."""
        out, i = {}, 0
        for m, n in self.module_pages(adapter).items():
            out[m] = pages[i:i + n]
            i += n
        return out

    def pack(self, adapter: LoraAdapter, num_pages: int | None = None) -> np.ndarray:
        """The adapter's page contents: [L, num_pages, page_elems] float32, modules in order,
        written straight into one zeroed buffer (pages past the adapter's own, up to
        `num_pages`, stay zero)."""
        L, E = self.cfg.num_layers, self.page_elems
        own = self.module_pages(adapter)
        out = np.zeros((L, num_pages or sum(own.values()), E), np.float32)
        flat, i = out.reshape(L, -1), 0
        for m, n in own.items():
            a, b = adapter.weights.a[m], adapter.weights.b[m]           # [L, R, in], [L, R, out]
            R, din = a.shape[1], a.shape[2]
            rows = flat[:, i * E:i * E + R * (din + b.shape[2])].reshape(L, R, -1)
            assert np.may_share_memory(rows, out)   # a view (splitting the last axis), not a copy
            rows[..., :din], rows[..., din:] = a, b
            i += n
        return out


@functools.partial(jax.jit, donate_argnums=(0,))
def write_pages(kv: KVPages, pages: jax.Array, data: jax.Array) -> KVPages:
    """Write `data` [L, n, page_elems] into pool pages `pages` [n] (padding entries: page 0)."""
    L, Hkv, _, S, D = kv.k.shape
    data = stored(data, kv.k.dtype).reshape(L, -1, 2, Hkv, S, D)
    k = jnp.swapaxes(data[:, :, 0], 1, 2)       # [L, Hkv, n, S, D]
    v = jnp.swapaxes(data[:, :, 1], 1, 2)
    return KVPages(k=kv.k.at[:, :, pages].set(k), v=kv.v.at[:, :, pages].set(v))


def gather_slots(k_pool, v_pool, layer, pages, din: int, dout: int, max_rank: int):
    """Dense per-slot stacks for one layer: a [S, max_rank, din], b [S, max_rank, dout]."""
    S, P = pages.shape
    kp = values(k_pool[layer, :, pages])         # indexed dims first: [S, P, Hkv, page, D]
    vp = values(v_pool[layer, :, pages])
    flat = jnp.stack([kp, vp], axis=2).reshape(S, -1)[:, :max_rank * (din + dout)]
    rows = flat.reshape(S, max_rank, din + dout)
    return rows[..., :din], rows[..., din:]
