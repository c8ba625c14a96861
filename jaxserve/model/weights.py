"""The canonical weights as registered dataclass pytrees: one array per checkpoint tensor.

Which arrays a model has comes from its family's spec (jaxserve/model/families): `describe(cfg)`
turns it into shapes and logical axes, and `build`, `init_random`, the loaders and the sharding
rules derive from that. Layer weights are stacked on a leading `layers` axis so the forward
pass is one `lax.scan`. Projections are stored `[in, out]` (x @ W). A field here for every
weight any family lists; a family's optional weights are None where it has none.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.model import families


@jax.tree_util.register_dataclass
@dataclass
class LayerWeights:
    attn_norm: jax.Array       # [L, H]
    wq: jax.Array | None       # [L, H, Hq*D]   (None once fused into wqkv)
    wk: jax.Array | None       # [L, H, Hkv*D]
    wv: jax.Array | None       # [L, H, Hkv*D]
    wo: jax.Array              # [L, Hq*D, H]
    mlp_norm: jax.Array        # [L, H]
    w_gate: jax.Array | None   # [L, H, I]      (None once fused into w_gate_up)
    w_up: jax.Array | None     # [L, H, I]
    w_down: jax.Array          # [L, I, H]
    bq: jax.Array | None = None  # [L, Hq*D]  (Qwen2, attention_bias)
    bk: jax.Array | None = None  # [L, Hkv*D]
    bv: jax.Array | None = None  # [L, Hkv*D]
    bo: jax.Array | None = None  # [L, H]     (Llama attention_bias)
    # Derived by fuse_projections (single device): one matmul instead of three / two.
    wqkv: jax.Array | None = None       # [L, H, Hq*D + 2*Hkv*D]
    w_gate_up: jax.Array | None = None  # [L, H, 2*I]


@jax.tree_util.register_dataclass
@dataclass
class Weights:
    embed: jax.Array           # [V, H]
    layers: LayerWeights
    final_norm: jax.Array      # [H]
    lm_head: jax.Array | None  # [H, V]; None when tied to `embed` (or, on CPU with AMX, the
    #                            tied embed^T packed for the tile unit: see pack_for_amx)


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    axes: tuple[str, ...]      # logical axis names, mapped to a mesh by the sharding rules
    init: str = "normal"       # "normal" | "ones" | "zeros"


def describe(cfg: ModelConfig) -> dict:
    """Every weight the config's family lists and the config has: name -> ArraySpec (layer
    weights under 'layers', with the leading `layers` axis)."""
    family = families.for_config(cfg)
    L = cfg.num_layers
    layers = {w.name: ArraySpec((L, *w.shape(cfg)), ("layers", *w.axes), w.init)
              for w in family.layer_weights if w.is_present(cfg)}
    top = {w.name: ArraySpec(w.shape(cfg), w.axes, w.init)
           for w in family.weights if w.is_present(cfg)}
    return {**top, "layers": layers}


def build(cfg: ModelConfig, make) -> Weights:
    """Build a Weights tree by calling make(name, spec) for every described array (a weight
    the config does not have is None)."""
    d = describe(cfg)
    layers = LayerWeights(**{k: make(f"layers.{k}", s) for k, s in d.pop("layers").items()})
    top = {f.name: None for f in dataclasses.fields(Weights) if f.name != "layers"}
    top.update((k, make(k, s)) for k, s in d.items())
    return Weights(layers=layers, **top)


def init_random(cfg: ModelConfig, seed: int = 0, dtype=jnp.float32, std: float = 0.02) -> Weights:
    rng = np.random.default_rng(seed)

    def make(name, spec: ArraySpec):
        if spec.init == "ones":
            a = np.ones(spec.shape, np.float32)
        elif spec.init == "zeros":
            a = np.zeros(spec.shape, np.float32)
        else:
            a = rng.normal(0.0, std, spec.shape).astype(np.float32)
        return jnp.asarray(a, dtype)

    return build(cfg, make)


def fuse_projections(weights: Weights) -> Weights:
    """Concatenate q|k|v and gate|up along their outputs (and drop the parts).

    Fewer, wider matmuls: on a 2-core CPU at batch 64 the layer matmuls run ~1.6x faster.
    Only for an unsharded model; tensor parallelism shards the separate projections.
    """
    lw = weights.layers
    if lw.wqkv is not None:
        return weights
    fused = dataclasses.replace(
        lw, wqkv=jnp.concatenate([lw.wq, lw.wk, lw.wv], axis=-1),
        w_gate_up=jnp.concatenate([lw.w_gate, lw.w_up], axis=-1),
        wq=None, wk=None, wv=None, w_gate=None, w_up=None)
    return dataclasses.replace(weights, layers=fused)


PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "wqkv", "w_gate_up")


def pack_for_amx(weights: Weights, layers: list[LayerWeights]) -> tuple[Weights, list[LayerWeights]]:
    """For bf16 decode on a CPU with AMX (jaxserve.backends.cpu.cpu_matmul.matmul_amx): each layer's
    bfloat16 projection matrices repacked into the tile layout (cpu_matmul.AmxPacked, replacing
    them), and a tied LM head given a packed copy of embed^T as `lm_head` (embed stays for the
    token lookup and for heads over many rows, where XLA's dot is as fast). Per-layer weights
    (the runner's layer-by-layer mode); anything not bfloat16 is left as it is."""
    from jaxserve.backends.cpu import cpu_matmul

    def pack(lw: LayerWeights) -> LayerWeights:
        return dataclasses.replace(lw, **{
            f: cpu_matmul.pack_amx(getattr(lw, f)) for f in PROJECTIONS
            if getattr(lw, f) is not None and getattr(lw, f).dtype == jnp.bfloat16})

    if weights.lm_head is None and weights.embed.dtype == jnp.bfloat16:
        weights = dataclasses.replace(weights, lm_head=cpu_matmul.pack_amx(weights.embed.T))
    return weights, [pack(lw) for lw in layers]


def cast(weights: Weights, dtype) -> Weights:
    return jax.tree.map(lambda a: a.astype(dtype), weights)


def logical_axes(cfg: ModelConfig) -> Weights:
    """The same tree shape as Weights, holding each array's logical axes (for sharding)."""
    return build(cfg, lambda name, spec: spec.axes)
