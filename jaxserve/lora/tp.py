"""Multi-LoRA under tensor parallelism, aligned with the Megatron split as in S-LoRA.

  projection                 A (shrink)        v after shrink       B (expand)     collective
  q k v gate up (column)     split on rank     [T, r/N] per device  split on out   all-gather v
  o down (row)               split on input    partial [T, r]       split on out   all-reduce v
For row-parallel projections the LoRA output [T, H/N] is added into this device's column slice
of the base partial sum, so the base all-reduce carries it: LoRA adds only [T, r]-sized traffic.

Adapters are sharded, not replicated: each device's slice of a pool page (its KV heads,
2 * Hkv/N * page_size * D elements per layer) holds that device's shard of the adapter, packed
in row groups so that a rank-r adapter takes pages in proportion to r, as with tp=1:
  column, group j < ceil(r/N) on device d: [A[d*rl + j] (in), B^T[d'*rl + j, d's out cols] for
            d' = 0..N-1 (N * out/N)]                          rl = ceil(r/N), r padded with zeros
  row,    group j < r on device d:        [A[j, d's in cols] (in/N), B^T[j, d's out cols] (H/N)]
The split uses each layer's own rank, so masks need only the per-layer ranks the batch carries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxserve.lora.adapter import MODULES, LoraAdapter, module_dims
from jaxserve.lora.pool import PageLayout
from jaxserve.model.kv_cache import KV_AXES, values
from jaxserve.model.norms import rms_norm
from jaxserve.sharding import TP, HeadLayout, relayout, spec

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")
# logical axes of one module's B^T [L, R, out] (A's in axis for o is q_heads), for head relayout
_HEAD_AXIS = {"q_proj": ("b", "q_heads"), "k_proj": ("b", "kv_heads"), "v_proj": ("b", "kv_heads"),
              "o_proj": ("a", "q_heads")}


@dataclass(frozen=True)
class ShardedPageLayout(PageLayout):
    """PageLayout for a pool sharded over `tp` devices on its KV heads. `cfg` is the model as
    run on the mesh (virtual heads, see jaxserve.sharding.HeadLayout); page counts and packing
    are per device, and every device holds the same number of rows of every adapter."""
    tp: int = 1
    heads: HeadLayout | None = None

    @property
    def page_elems(self) -> int:
        """Elements of one page's slice on one device, in one layer."""
        return 2 * (self.cfg.num_kv_heads // self.tp) * self.page_size * self.cfg.head_dim

    def rows(self, module: str, rank: int) -> int:
        return math.ceil(rank / self.tp) if module in COLUMN else rank

    def width(self, module: str) -> int:
        din, dout = module_dims(self.cfg, module)
        return din + dout if module in COLUMN else (din + dout) // self.tp

    def pages_for_rank(self, module: str, rank: int) -> int:
        return math.ceil(self.rows(module, rank) * self.width(module) / self.page_elems)

    def _virtual(self, adapter: LoraAdapter, m: str):
        """A [L, R, in], B^T [L, R, out] with q/k/v/o heads re-laid to the virtual heads."""
        a, b = adapter.weights.a[m], adapter.weights.b[m]
        if m in _HEAD_AXIS and self.heads is not None and not self.heads.is_identity:
            which, axis = _HEAD_AXIS[m]
            fix = lambda x: relayout(x, ("layers", "lora_rank", axis), self.heads,  # noqa: E731
                                     self.cfg.head_dim)
            a, b = (fix(a), b) if which == "a" else (a, fix(b))
        return np.asarray(a, np.float32), np.asarray(b, np.float32)

    def _device_rows(self, m: str, a, b, ranks) -> np.ndarray:
        """[N, L, rows(R), width] row groups of every device (zeros past each layer's rank)."""
        N, L, R = self.tp, a.shape[0], a.shape[1]
        din, dout = a.shape[2], b.shape[2]
        out = np.zeros((N, L, self.rows(m, R), self.width(m)), np.float32)
        for layer in range(L):
            r = int(ranks[layer])
            if r == 0:
                continue
            if m in COLUMN:
                rl = math.ceil(r / N)
                ap = np.zeros((N * rl, din), np.float32)
                bp = np.zeros((N * rl, dout), np.float32)
                ap[:r], bp[:r] = a[layer, :r], b[layer, :r]
                for d in range(N):
                    cols = bp[:, d * dout // N:(d + 1) * dout // N]            # [N*rl, out/N]
                    blk = cols.reshape(N, rl, dout // N).transpose(1, 0, 2)    # [rl, N, out/N]
                    out[d, layer, :rl] = np.concatenate(
                        [ap[d * rl:(d + 1) * rl], blk.reshape(rl, dout)], axis=1)
            else:
                for d in range(N):
                    out[d, layer, :r] = np.concatenate(
                        [a[layer, :r, d * din // N:(d + 1) * din // N],
                         b[layer, :r, d * dout // N:(d + 1) * dout // N]], axis=1)
        return out

    def pack(self, adapter: LoraAdapter, num_pages: int | None = None) -> np.ndarray:
        """[L, num_pages, 2 * Hkv * page_size * D]: each device's slice of each page in place
        (pages past the adapter's own, up to `num_pages`, zero)."""
        N, E = self.tp, self.page_elems
        L, h, S, D = self.cfg.num_layers, self.cfg.num_kv_heads // N, self.page_size, self.cfg.head_dim
        parts = []
        for m, n in self.module_pages(adapter).items():
            a, b = self._virtual(adapter, m)
            rows = self._device_rows(m, a, b, adapter.weights.ranks[:, MODULES.index(m)])
            flat = np.zeros((N, L, n * E), np.float32)
            flat[:, :, :rows[0, 0].size] = rows.reshape(N, L, -1)
            parts.append(flat.reshape(N, L, n, 2, h, S, D))
        dev = np.concatenate(parts, axis=2)                          # [N, L, pages, 2, h, S, D]
        packed = np.moveaxis(dev, 0, 3).reshape(L, dev.shape[2], -1)  # heads: device-major
        if num_pages is None or num_pages == packed.shape[1]:
            return packed
        out = np.zeros((L, num_pages, packed.shape[2]), np.float32)
        out[:, :packed.shape[1]] = packed
        return out


def sharded_layout(layout: PageLayout, heads: HeadLayout, tp: int) -> ShardedPageLayout:
    return ShardedPageLayout(heads.config, layout.page_size, layout.max_rank, tp=tp, heads=heads)


# ----------------------------------------------------------------------------- in the step

def _gather_rows(k_pool, v_pool, layer, pages, rows: int, width: int):
    """This device's row groups of every slot: [S, rows, width] (from its slice of the pages)."""
    S = pages.shape[0]
    kp, vp = values(k_pool[layer, :, pages]), values(v_pool[layer, :, pages])   # [S, P, h, page, D]
    flat = jnp.stack([kp, vp], axis=2).reshape(S, -1)[:, :rows * width]
    return flat.reshape(S, rows, width)


def _token_slots(idx, ranks, scales):
    live = idx >= 0
    slot = jnp.where(live, idx, 0)
    return slot, jnp.where(live, ranks[slot], 0), jnp.where(live, scales[slot], 0.0)


class TpLayerLora:
    """jaxserve.lora.apply.LayerLora for a step sharded over `lora.mesh`: column-parallel parts
    get their delta after the base projection; a row-parallel projection is computed here with
    its LoRA added into the partial sum before the base all-reduce."""

    def __init__(self, cfg, lora, lora_idx, k_pool, v_pool, layer, ranks, scales):
        self.cfg, self.lora, self.idx = cfg, lora, lora_idx
        self.k_pool, self.v_pool, self.layer = k_pool, v_pool, layer
        self.ranks, self.scales = ranks, scales

    def adapts(self, modules) -> bool:
        return bool(set(modules) & set(self.lora.modules))

    def _args(self, mi):
        return (self.k_pool, self.v_pool, self.layer, self.lora.pages[mi], self.idx,
                self.ranks[mi], self.scales[mi])

    def project(self, modules, x, p, norm, linear):
        if not self.adapts(modules):
            return linear(x, p, norm)
        mesh, lora = self.lora.mesh, self.lora
        h = x if norm is None else rms_norm(x, *norm)
        B, T, _ = x.shape
        if len(modules) == 1 and modules[0] in ROW:      # o, down: one part, its own all-reduce
            m = modules[0]
            mi = lora.modules.index(m)
            din, dout = module_dims(self.cfg, m)
            y = _row(mesh, lora.max_rank, din, dout)(h.reshape(B * T, din), p.w, *self._args(mi))
            y = y.reshape(B, T, dout)
            return [y if p.b is None or p.b[0] is None else y + p.b[0].astype(y.dtype)]
        out = []
        for m, y in zip(modules, linear(x, p, norm)):
            if m in lora.modules:
                mi = lora.modules.index(m)
                din, dout = module_dims(self.cfg, m)
                d = _column(mesh, lora.max_rank, din, dout)(h.reshape(B * T, din), *self._args(mi))
                y = y + d.reshape(B, T, dout)
            out.append(y)
        return out


def _column(mesh, max_rank: int, din: int, dout: int):
    N = mesh.shape[TP]
    RL = math.ceil(max_rank / N)
    kv_spec = spec(KV_AXES)   # adapter pages are KV pages: split on kv_heads

    def f(x, kp, vp, layer, pages, idx, rk, sc):       # x [T, in] replicated
        rows = _gather_rows(kp, vp, layer, pages, RL, din + dout)
        a, bb = rows[..., :din], rows[..., din:].reshape(-1, RL, N, dout // N)
        slot, rank, scale = _token_slots(idx, rk, sc)
        v = jnp.einsum("th,tjh->tj", x, a[slot].astype(x.dtype),
                       preferred_element_type=jnp.float32)          # [T, rl] shrink
        rl = (rank + N - 1) // N
        live = jnp.arange(RL)[None, :] < rl[:, None]                  # [T, rl]
        v = jnp.where(live, v, 0.0) * scale[:, None]
        v = lax.all_gather(v, TP, axis=1)                             # [T, N, rl]
        # rows past the rank hold whatever the pages hold (0 * NaN = NaN): select, not scale
        b_rows = jnp.where(live[:, :, None, None], bb[slot].astype(jnp.float32), 0.0)
        y = jnp.einsum("tdj,tjdo->to", v, b_rows)
        return y.astype(x.dtype)                                      # [T, out/N]
    return jax.shard_map(f, mesh=mesh, out_specs=P(None, TP),
                         in_specs=(P(), kv_spec, kv_spec, P(), P(), P(), P(), P()))


def _row(mesh, max_rank: int, din: int, dout: int):
    N = mesh.shape[TP]
    R = max_rank
    kv_spec = spec(KV_AXES)

    def f(x, w, kp, vp, layer, pages, idx, rk, sc):    # x [T, in/N], w [in/N, H]
        partial = jnp.einsum("ti,io->to", x, w, preferred_element_type=jnp.float32)
        rows = _gather_rows(kp, vp, layer, pages, R, (din + dout) // N)
        a, bb = rows[..., :din // N], rows[..., din // N:]
        slot, rank, scale = _token_slots(idx, rk, sc)
        v = jnp.einsum("ti,tji->tj", x, a[slot].astype(x.dtype),
                       preferred_element_type=jnp.float32)          # [T, r] partial shrink
        live = jnp.arange(R)[None, :] < rank[:, None]                 # [T, r]
        v = lax.psum(jnp.where(live, v, 0.0) * scale[:, None], TP)   # all-reduce [T, r]
        b_rows = jnp.where(live[:, :, None], bb[slot].astype(jnp.float32), 0.0)
        y = jnp.einsum("tj,tjo->to", v, b_rows)                       # [T, H/N]
        off = lax.axis_index(TP) * (dout // N)
        mine = lax.dynamic_slice_in_dim(partial, off, dout // N, axis=1) + y
        partial = lax.dynamic_update_slice_in_dim(partial, mine, off, axis=1)
        return lax.psum(partial, TP).astype(x.dtype)                  # the base all-reduce
    return jax.shard_map(f, mesh=mesh, out_specs=P(),
                         in_specs=(P(None, TP), P(TP, None), kv_spec, kv_spec, P(), P(), P(),
                                   P(), P()))
