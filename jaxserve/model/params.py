"""The weights as the layer math reads them, prepared by a backend from the canonical weights.

The canonical tree (jaxserve/model/weights.py) holds one array per checkpoint tensor. The math
reads projections grouped as it uses them: q|k|v, o, gate|up, down, each a `Linear` whose
weight is whatever the backend made of the canonical arrays: the parts fused into one matrix,
kept one per part (tensor parallelism shards each on its own), or a backend's weight type (the
CPU backend's AMX tile layout; a quantized weight would be one more). `Backend.linear` decides
from that type how to multiply; the model never looks.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from jaxserve.model.weights import Weights

QKV = ("q_proj", "k_proj", "v_proj")
O = ("o_proj",)
GATE_UP = ("gate_proj", "up_proj")
DOWN = ("down_proj",)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["w", "b"],
                   meta_fields=["sizes"])
@dataclass
class Linear:
    """x @ W for one or more output parts.

    w: [in, sum(sizes)] (the parts fused), a tuple of [in, size_i] (one per part), or a
       backend's weight type standing in for the fused matrix; stacked layers add a leading
       [L] axis to every array.
    b: per part, a bias [size_i] or None; None when no part has one.
    sizes: static, each part's output size.
    """
    w: Any
    b: tuple | None
    sizes: tuple[int, ...]


@jax.tree_util.register_dataclass
@dataclass
class Experts:
    """A mixture of experts' weights, one SwiGLU MLP per expert (stacked layers add a leading
    [L] axis): the canonical arrays, which jaxserve/model/moe.py's grouped matmuls read as
    they are."""
    gate: jax.Array    # [E, H, Im]
    up: jax.Array      # [E, H, Im]
    down: jax.Array    # [E, Im, H]


@jax.tree_util.register_dataclass
@dataclass
class LayerParams:
    attn_norm: jax.Array   # [H]
    qkv: Linear            # parts q, k, v: [H -> Hq*D, Hkv*D, Hkv*D]
    o: Linear              # [Hq*D -> H]
    mlp_norm: jax.Array    # [H]
    gate_up: Linear | None = None     # parts gate, up: [H -> I, I]  (None: experts instead)
    down: Linear | None = None        # [I -> H]
    q_norm: jax.Array | None = None   # [D] per-head RMSNorm of q, k before RoPE (None: none)
    k_norm: jax.Array | None = None   # [D]
    post_attn_norm: jax.Array | None = None  # [H] of the attention output (Gemma 2/3)
    post_mlp_norm: jax.Array | None = None   # [H] of the MLP output
    router: Any = None     # [H, E] expert logits (mixture of experts)
    experts: Any = None    # the experts' weights as the backend's `moe` reads them


@jax.tree_util.register_dataclass
@dataclass
class Params:
    embed: jax.Array       # [V, H]
    # stacked (a leading [L] axis, for a scan over layers), or a tuple of one LayerParams per
    # layer (for one device call per layer)
    layers: Any
    final_norm: jax.Array  # [H]
    lm_head: Any           # [H, V]; None when tied to `embed`; or a backend's weight type


def _linear(ws, bs, fuse: bool) -> Linear:
    sizes = tuple(int(w.shape[-1]) for w in ws)
    b = None if all(x is None for x in bs) else tuple(bs)
    w = jnp.concatenate(ws, axis=-1) if fuse and len(ws) > 1 else (ws[0] if len(ws) == 1
                                                                    else tuple(ws))
    return Linear(w=w, b=b, sizes=sizes)


# canonical LayerWeights fields behind each projection: (weights, biases)
_PROJECTIONS = {"qkv": (("wq", "wk", "wv"), ("bq", "bk", "bv")), "o": (("wo",), ("bo",)),
                "gate_up": (("w_gate", "w_up"), (None, None)), "down": (("w_down",), (None,))}
_NORMS = ("attn_norm", "mlp_norm", "q_norm", "k_norm", "post_attn_norm", "post_mlp_norm")
_DENSE_MLP = ("gate_up", "down")
_EXPERTS = ("we_gate", "we_up", "we_down")


def _projections(lw) -> dict:
    """The projections this model has: a mixture of experts has no dense gate|up, down."""
    if lw.w_gate is None:
        return {k: v for k, v in _PROJECTIONS.items() if k not in _DENSE_MLP}
    return _PROJECTIONS


def _drop(lw, fields, consume: bool) -> None:
    """consume: the canonical arrays behind a prepared projection leave the weights tree (freed
    unless someone else holds them)."""
    if consume:
        for f in fields:
            if f is not None:
                setattr(lw, f, None)


def empty(weights: Weights) -> None:
    """Drop every array from a weights tree (they are freed unless someone else holds them)."""
    for f in dataclasses.fields(weights.layers):
        setattr(weights.layers, f.name, None)
    for f in dataclasses.fields(weights):
        if f.name != "layers":
            setattr(weights, f.name, None)


def from_weights(weights: Weights, fuse: bool, consume: bool = False) -> Params:
    """Stacked Params over the canonical weights. `fuse`: one matrix for q|k|v and one for
    gate|up (fewer, wider matmuls on one device); else one array per part (tensor parallelism,
    where each part is sharded on its own output axis). Unfused, the arrays are the canonical
    ones, not copies. consume: each projection's canonical parts are dropped from `weights`
    once its Linear exists, so the fused copy and the parts are not all held at once."""
    lw = weights.layers
    linears = {}
    for key, (ws, bs) in _projections(lw).items():
        linears[key] = _linear(tuple(getattr(lw, w) for w in ws),
                               tuple(None if b is None else getattr(lw, b) for b in bs), fuse)
        _drop(lw, ws + bs, consume)
    if lw.router is not None:
        linears.update(router=lw.router, experts=Experts(*(getattr(lw, w) for w in _EXPERTS)))
        _drop(lw, ("router",) + _EXPERTS, consume)
    layers = LayerParams(**{n: getattr(lw, n) for n in _NORMS}, **linears)
    _drop(lw, _NORMS, consume)
    return Params(embed=weights.embed, layers=layers, final_norm=weights.final_norm,
                  lm_head=weights.lm_head)


@jax.jit
def _layer_of(arrays, i):
    """Layer i of stacked arrays (own buffers), the parts concatenated when more than one."""
    parts = [a[i] for a in arrays]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def from_weights_per_layer(weights: Weights, consume: bool = False) -> Params:
    """Per-layer Params (a tuple of LayerParams, each with its own buffers; q|k|v and gate|up
    fused) made straight from the canonical stacked weights, one projection at a time: with
    consume, that projection's canonical arrays are dropped before the next one is made, so
    at most one projection is held twice."""
    lw = weights.layers
    L = lw.attn_norm.shape[0]
    per_layer = [{} for _ in range(L)]
    for key, (ws, bs) in _projections(lw).items():
        w_parts = tuple(getattr(lw, w) for w in ws)
        b_parts = tuple(None if b is None else getattr(lw, b) for b in bs)
        sizes = tuple(int(w.shape[-1]) for w in w_parts)
        has_b = any(b is not None for b in b_parts)
        for i in range(L):
            b = tuple(None if x is None else _layer_of((x,), i) for x in b_parts) if has_b else None
            per_layer[i][key] = Linear(w=_layer_of(w_parts, i), b=b, sizes=sizes)
        del w_parts, b_parts
        _drop(lw, ws + bs, consume)
    for name in _NORMS + (("router",) + _EXPERTS if lw.router is not None else ()):
        a = getattr(lw, name)
        for i in range(L):
            per_layer[i][name] = None if a is None else _layer_of((a,), i)
        del a
        _drop(lw, (name,), consume)
    if "router" in per_layer[0]:
        for d in per_layer:
            d["experts"] = Experts(*(d.pop(w) for w in _EXPERTS))
    return Params(embed=weights.embed, layers=tuple(LayerParams(**d) for d in per_layer),
                  final_norm=weights.final_norm, lm_head=weights.lm_head)


def unstack(params: Params) -> Params:
    """Stacked layers -> a tuple of per-layer LayerParams (own buffers, no leading axis)."""
    n = jax.tree.leaves(params.layers)[0].shape[0]
    layers = tuple(jax.tree.map(lambda a, i=i: jnp.array(a[i], copy=True), params.layers)
                   for i in range(n))
    return dataclasses.replace(params, layers=layers)


def stack(params: Params) -> Params:
    """Per-layer layers -> stacked (for a scan over layers); stacked params as they are."""
    if not isinstance(params.layers, tuple):
        return params
    return dataclasses.replace(params, layers=jax.tree.map(lambda *a: jnp.stack(a),
                                                           *params.layers))
