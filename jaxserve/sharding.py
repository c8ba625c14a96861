"""Tensor parallelism, applied from outside the model math.

The model (jaxserve/model) names only logical axes (`weights.describe`). This module owns:
  * `make_mesh(tp)`: a 1-D mesh over `tp` devices, axis "tp";
  * `rules(ep)`: the one table from logical axes to mesh axes (Megatron: q/k/v/gate/up split on
    their output, o/down on their input, the vocabulary split for embedding and LM head; a
    mixture of experts' weights split inside each expert (`ep` 1) or by whole experts (`ep` =
    tp, expert parallelism); `RULES` is the table at ep 1);
  * `HeadLayout`: when the head counts do not divide `tp`, heads are padded (zero weights) and
    KV heads replicated so that every device holds whole GQA groups; the model then runs on
    `layout.config`, an ordinary ModelConfig with more heads, and computes the same function;
  * `Placement`: where a backend holds the weights (the loader creates each array there);
    `shard_weights`, `zeros_kv` (the pool, created sharded) and the step shardings for
    `jax.jit`; XLA's SPMD partitioner then inserts the collectives (two all-reduces of
    [tokens, hidden] per layer);
  * `check_parallel`: which (tp, ep) a model can run with, refused with the reason.
LoRA sits in `shard_map` (jaxserve/lora), and so do the experts (jaxserve/backends/moe_mesh.py),
with specs derived from the same table.

Multi-host: `initialize_distributed()` before any other JAX call (see docs/parallelism.md).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxserve.config import ModelConfig
from jaxserve.model.kv_cache import KV_AXES, KVPages
from jaxserve.model.weights import Weights, build, logical_axes

log = logging.getLogger("jaxserve.sharding")

TP = "tp"

def rules(ep: int = 1) -> dict[str, str | None]:
    """The one table: logical axis -> mesh axis (None = replicated on every device), for a
    mixture of experts' weights split `ep` ways by whole experts (ep = tp) or, with ep 1, each
    expert split on its own intermediate axis like a dense MLP. Only the two expert axes
    depend on ep."""
    return {
        "layers": None,
        "embed": None,        # the residual stream is replicated
        "q_heads": TP,        # wq/bq output, wo input
        "kv_heads": TP,       # wk/wv output, the KV pool's heads
        "mlp": TP,            # gate/up output, down input
        "vocab": TP,          # embedding rows, LM head columns
        "head_dim": None,
        "pages": None,
        "page_size": None,
        # experts' gate/up [E, H, Im], down [E, Im, H]: whole experts per device (ep = tp), or
        # every expert's gate/up output and down input split (ep 1)
        "experts": TP if ep > 1 else None,
        "moe_mlp": None if ep > 1 else TP,
        "expert_logits": None,   # the router's [H, E] columns: every device routes every token
        # LoRA weights live in KV pages, so they follow "kv_heads"; how an adapter is cut across a
        # page's per-device slices (S-LoRA's split) is in jaxserve/lora/tp.py.
    }


RULES: dict[str, str | None] = rules(1)


def spec(axes: tuple[str, ...], shape: tuple[int, ...] | None = None, mesh: Mesh | None = None,
         ep: int = 1) -> P:
    """PartitionSpec for an array with these logical axes (`rules(ep)`). With shape and mesh, a
    dimension the mesh axis does not divide is replicated instead (logged), e.g. an odd
    vocabulary (`check_parallel` refuses this for the expert axes)."""
    table = rules(ep)
    out = []
    for i, name in enumerate(axes):
        m = table[name]
        if m is not None and shape is not None and mesh is not None and shape[i] % mesh.shape[m]:
            log.warning("axis %s of size %d is not divisible by %s=%d: replicated", name, shape[i],
                        m, mesh.shape[m])
            m = None
        out.append(m)
    return P(*out)


def make_mesh(tp: int, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    if tp < 1 or tp > len(devices):
        raise ValueError(f"--tp {tp} needs {tp} devices, but {len(devices)} are visible "
                         f"({devices[0].platform}); on CPU set XLA_FLAGS="
                         "--xla_force_host_platform_device_count=N before starting")
    return Mesh(np.asarray(devices[:tp]), (TP,))


def check_parallel(cfg: ModelConfig, tp: int, ep: int = 1) -> None:
    """Refuse (ValueError, naming the flag) a (tp, ep) the model cannot run with: expert
    parallelism spans the whole mesh (ep 1 or ep = tp, as vLLM's --enable-expert-parallel
    makes the expert group the tensor-parallel group), needs a mixture of experts and an expert
    count it divides; with ep 1 under tp each expert's intermediate size must divide by tp."""
    if ep < 1 or (ep != 1 and ep != tp):
        raise ValueError(f"--ep {ep} with --tp {tp}: expert parallelism splits the experts over "
                         f"all tensor-parallel devices, so --ep must be 1 or {tp}")
    E = cfg.num_experts
    if ep > 1 and not E:
        raise ValueError(f"--ep {ep}: the model ({cfg.architecture}) has no experts; expert "
                         "parallelism is for mixture-of-experts models (use --ep 1)")
    if ep > 1 and E % ep:
        raise ValueError(f"--ep {ep}: the model's {E} experts do not divide into {ep} equal "
                         f"groups; use an --ep (and --tp) that divides {E}, or --ep 1")
    if E and ep == 1 and tp > 1 and cfg.moe_intermediate_size % tp:
        raise ValueError(f"--tp {tp}: the experts' intermediate size "
                         f"{cfg.moe_intermediate_size} is not divisible by {tp}; use --ep {tp} "
                         "(whole experts per device) or a --tp that divides it")


# ----------------------------------------------------------------------------- head layout

@dataclass(frozen=True)
class HeadLayout:
    """Where each device-friendly ("virtual") head comes from.

    KV heads are padded to `num_kv` (a multiple or a divisor of tp) and, when fewer than tp,
    each is replicated `replicas` times; a KV head's G query heads are split over its replicas
    in runs of `group`, padded with zero heads. q_src[i] / kv_src[i] is the real head behind
    virtual head i, or -1 for a zero head. Zero query heads contribute nothing: their rows of
    wo are zero. Padded KV heads are only attended by zero query heads.
    """
    config: ModelConfig          # the model as it runs on the mesh (virtual head counts)
    q_src: tuple[int, ...]
    kv_src: tuple[int, ...]

    @property
    def is_identity(self) -> bool:
        return (self.q_src == tuple(range(len(self.q_src)))
                and self.kv_src == tuple(range(len(self.kv_src))))


def head_layout(cfg: ModelConfig, tp: int) -> HeadLayout:
    Hq, Hkv = cfg.num_heads, cfg.num_kv_heads
    G = Hq // Hkv
    num_kv = next(n for n in range(Hkv, Hkv * tp + 1) if n % tp == 0 or tp % n == 0)
    replicas = max(1, tp // num_kv)
    group = math.ceil(G / replicas)          # query heads per virtual KV head
    kv_src, q_src = [], []
    for k in range(num_kv):
        for r in range(replicas):
            kv_src.append(k if k < Hkv else -1)
            for g in range(r * group, (r + 1) * group):
                q_src.append(k * G + g if k < Hkv and g < G else -1)
    virt = dataclasses.replace(cfg, num_heads=len(q_src), num_kv_heads=len(kv_src))
    return HeadLayout(virt, tuple(q_src), tuple(kv_src))


def _take_heads(a, axis: int, src: tuple[int, ...], head_dim: int, xp=np):
    """Re-lay a [.., heads*head_dim, ..] axis to the virtual heads (zeros where src is -1);
    xp: numpy, or jax.numpy inside a jitted function."""
    shape = a.shape
    a = a.reshape(shape[:axis] + (shape[axis] // head_dim, head_dim) + shape[axis + 1:])
    idx = np.asarray(src)
    out = xp.take(a, np.maximum(idx, 0), axis=axis)
    mask = (idx >= 0).reshape((-1,) + (1,) * (out.ndim - axis - 1))
    out = xp.where(mask, out, xp.zeros((), out.dtype))
    return out.reshape(shape[:axis] + (len(src) * head_dim,) + shape[axis + 1:])


def relayout(a, axes: tuple[str, ...], layout: HeadLayout, head_dim: int, xp=np):
    """One array (weights or an adapter stack) with its q_heads/kv_heads axes re-laid (numpy;
    xp=jax.numpy inside a jitted function)."""
    a = xp.asarray(a)
    for i, name in enumerate(axes):
        if name == "q_heads":
            a = _take_heads(a, i, layout.q_src, head_dim, xp)
        elif name == "kv_heads":
            a = _take_heads(a, i, layout.kv_src, head_dim, xp)
    return a


def head_sources(name: str, layout: HeadLayout) -> tuple[int, ...] | None:
    """The real head behind each virtual head of a `q_heads` / `kv_heads` axis (None for any
    other axis, or when the axis is not re-laid)."""
    src = layout.q_src if name == "q_heads" else layout.kv_src if name == "kv_heads" else None
    return None if src is None or src == tuple(range(len(src))) else src


# ----------------------------------------------------------------------------- placement

def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(s, str) for s in x)


def weight_shardings(cfg: ModelConfig, mesh: Mesh, ep: int = 1) -> Weights:
    """NamedShardings in a tree shaped like Weights (cfg: the config as run on the mesh)."""
    return build(cfg, lambda name, s: NamedSharding(mesh, spec(s.axes, s.shape, mesh, ep)))


@dataclass(frozen=True)
class Placement:
    """Where a backend holds the canonical weights: on one device, or on a mesh by `rules(ep)`
    with heads re-laid by `layout`. The loader creates each array directly in this placement
    (each device's part read or generated on its own), so nothing is staged whole on one
    device."""
    cfg: ModelConfig             # the checkpoint's config
    layout: HeadLayout           # identity on one device
    mesh: Mesh | None = None
    device: jax.Device | None = None   # one device (mesh None): this one; None: JAX's default
    ep: int = 1                  # experts split by whole experts over the mesh (ep = tp) or not

    @property
    def run_config(self) -> ModelConfig:
        """The config of the arrays as placed (virtual head counts under tp)."""
        return self.layout.config

    def sharding(self, shape: tuple[int, ...], axes: tuple[str, ...]) -> jax.sharding.Sharding:
        """The sharding of an array of this (run-config) shape and logical axes."""
        if self.mesh is None:
            return jax.sharding.SingleDeviceSharding(self.device or jax.devices()[0])
        return NamedSharding(self.mesh, spec(axes, shape, self.mesh, self.ep))


def placement(cfg: ModelConfig, mesh: Mesh | None = None, ep: int = 1) -> Placement:
    """One device (mesh None), or the mesh with `head_layout`'s padded/replicated heads and the
    experts split by `rules(ep)`."""
    if mesh is None:
        return Placement(cfg, head_layout(cfg, 1))
    return Placement(cfg, head_layout(cfg, mesh.shape[TP]), mesh, ep=ep)


def shard_weights(weights: Weights, cfg: ModelConfig, mesh: Mesh,
                  layout: HeadLayout | None = None, ep: int = 1) -> Weights:
    """Re-lay heads for `layout` (if given) and place every array on the mesh by `rules(ep)`. An
    array already in its place (the loader puts it there: run-config shape and the target
    sharding) is kept as it is; one with the run-config shape elsewhere is moved; one with the
    checkpoint's shape is re-laid on the host first. (The shapes tell them apart: a re-laid
    axis always has more heads than the checkpoint's.)"""
    layout = layout or head_layout(cfg, mesh.shape[TP])
    axes = logical_axes(cfg)
    shardings = weight_shardings(layout.config, mesh, ep)
    run_shapes = build(layout.config, lambda name, s: s.shape)

    def place(a, ax, sh, run_shape):
        if tuple(a.shape) == run_shape:
            if isinstance(a, jax.Array) and a.sharding.is_equivalent_to(sh, a.ndim):
                return a
            return jax.device_put(a, sh)
        return jax.device_put(relayout(a, ax, layout, cfg.head_dim), sh)
    return jax.tree.map(place, weights, axes, shardings, run_shapes)


def kv_sharding(mesh: Mesh, kv: KVPages) -> KVPages:
    s = NamedSharding(mesh, spec(KV_AXES, kv.k.shape, mesh))
    return KVPages(k=s, v=s)


def shard_kv(kv: KVPages, mesh: Mesh) -> KVPages:
    return jax.device_put(kv, kv_sharding(mesh, kv))


def zeros_kv(shape: tuple[int, ...], dtype, mesh: Mesh) -> KVPages:
    """An empty pool created sharded: each device allocates and zeroes only its own part
    (a jitted zeros with out_shardings; never whole on one device first)."""
    s = NamedSharding(mesh, spec(KV_AXES, shape, mesh))
    return KVPages(k=_sharded_zeros(tuple(shape), jax.numpy.dtype(dtype), s),
                   v=_sharded_zeros(tuple(shape), jax.numpy.dtype(dtype), s))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _sharded_zeros(shape, dtype, sharding):
    return jax.lax.with_sharding_constraint(jax.numpy.zeros(shape, dtype), sharding)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def logits_shardings(mesh: Mesh, cfg: ModelConfig) -> tuple[NamedSharding, NamedSharding]:
    """Logits [B, V] as the LM head makes them (split on vocab), then replicated for sampling:
    pinning both makes XLA gather the [B, V] logits, never the [H, V] head."""
    return (NamedSharding(mesh, P(None, spec(("vocab",), (cfg.vocab_size,), mesh)[0])),
            replicated(mesh))


def put_replicated(tree, mesh: Mesh):
    """Host arrays -> replicated global arrays. Multi-host needs every process to pass the same
    values (the engine loop is deterministic, so it does)."""
    s = replicated(mesh)
    if jax.process_count() == 1 or s.is_fully_addressable:   # this process's devices only
        return jax.device_put(tree, s)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(s, np.asarray(x)), tree)


# ----------------------------------------------------------------------------- multi-host

def initialize_distributed(enable: bool | None = None) -> bool:
    """Join a multi-process JAX run (TPU pod slice, multi-node GPU) before any device is touched.

    Enabled by `enable=True` (`--distributed`) or JAXSERVE_DISTRIBUTED=1. The coordinator comes
    from JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID;
    with none of them set, JAX auto-detects the cluster (TPU pods, SLURM, Open MPI, Kubernetes).
    Returns whether it initialized.
    """
    if enable is None:
        enable = os.environ.get("JAXSERVE_DISTRIBUTED", "0").lower() in ("1", "true", "yes")
    if not enable:
        return False
    kw = {}
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kw["coordinator_address"] = os.environ["JAX_COORDINATOR_ADDRESS"]
    if os.environ.get("JAX_NUM_PROCESSES"):
        kw["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if os.environ.get("JAX_PROCESS_ID"):
        kw["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kw)
    log.info("distributed: process %d of %d, %d devices (%d local)", jax.process_index(),
             jax.process_count(), jax.device_count(), jax.local_device_count())
    return True
