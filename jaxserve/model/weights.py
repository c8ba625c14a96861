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
    wq: jax.Array              # [L, H, Hq*D]
    wk: jax.Array              # [L, H, Hkv*D]
    wv: jax.Array              # [L, H, Hkv*D]
    wo: jax.Array              # [L, Hq*D, H]
    mlp_norm: jax.Array        # [L, H]   before the MLP
    w_gate: jax.Array | None = None  # [L, H, I]  (None: a mixture of experts instead)
    w_up: jax.Array | None = None    # [L, H, I]
    w_down: jax.Array | None = None  # [L, I, H]
    bq: jax.Array | None = None  # [L, Hq*D]  (Qwen2, attention_bias)
    bk: jax.Array | None = None  # [L, Hkv*D]
    bv: jax.Array | None = None  # [L, Hkv*D]
    bo: jax.Array | None = None  # [L, H]     (Llama attention_bias)
    q_norm: jax.Array | None = None  # [L, D]  RMSNorm of each query head before RoPE (Qwen3)
    k_norm: jax.Array | None = None  # [L, D]  the same for each key head
    post_attn_norm: jax.Array | None = None  # [L, H]  of the attention output (Gemma 2/3)
    post_mlp_norm: jax.Array | None = None   # [L, H]  of the MLP output (Gemma 2/3)
    router: jax.Array | None = None   # [L, H, E]      expert logits (mixture of experts)
    we_gate: jax.Array | None = None  # [L, E, H, Im]  each expert's projections
    we_up: jax.Array | None = None    # [L, E, H, Im]
    we_down: jax.Array | None = None  # [L, E, Im, H]


@jax.tree_util.register_dataclass
@dataclass
class Weights:
    embed: jax.Array           # [V, H]
    layers: LayerWeights
    final_norm: jax.Array      # [H]
    lm_head: jax.Array | None  # [H, V]; None when tied to `embed`


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


def cast(weights: Weights, dtype) -> Weights:
    """A new tree with every array in `dtype` (arrays already in it are the same arrays)."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda a: a if a.dtype == dtype else a.astype(dtype), weights)


def logical_axes(cfg: ModelConfig) -> Weights:
    """The same tree shape as Weights, holding each array's logical axes (for sharding)."""
    return build(cfg, lambda name, spec: spec.axes)
