"""Mixture-of-experts MLP: routing and the experts as one grouped matmul.

A token's router logits [E] pick its top-k experts; the layer's output is the routing-weighted
sum of those experts' gated MLPs. `expert_mlp` computes only the (token, slot) pairs that were
routed: the pairs are sorted by expert so each expert's rows are contiguous, and each of the
three projections is one `jax.lax.ragged_dot` (a grouped matmul: rows of group g times expert
g's matrix), which XLA lowers to a grouped GEMM on GPU and TPU. Work is N * k rows, not N * E.

Expert parallelism: a device holding experts [first_expert, first_expert + E_local) calls
`expert_mlp` with its slice of the weights and the global expert ids; pairs routed to other
devices' experts are sorted past its groups and contribute zero, so summing (psum) the devices'
outputs gives the whole layer.

`dense_reference` runs every expert on every token (N * E rows) and weights them densely: the
tests' and the benchmark's reference, never the serving path.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def _activation(act) -> Callable:
    if callable(act):
        return act
    if act == "silu":
        return jax.nn.silu
    if act == "gelu_tanh":
        return lambda x: jax.nn.gelu(x.astype(jnp.float32), approximate=True).astype(x.dtype)
    raise ValueError(f"unknown MLP activation {act!r}")


def route(logits, k: int, renormalize: bool):
    """Router logits [N, E] -> (weights [N, k] float32, experts [N, k] int32).

    Softmax over all E experts in float32, then the top k probabilities (highest first), then,
    with `renormalize`, those k divided by their sum (Mixtral always; Qwen3-MoE when the config
    sets norm_topk_prob), as transformers' MixtralTopKRouter / Qwen3MoeTopKRouter do."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def expert_mlp(x, weights, experts, w_gate, w_up, w_down, act, *, first_expert=0):
    """The routed experts' gated MLPs, weighted and summed per token.

    x [N, H] (the normed hidden states); weights [N, k] float32 and experts [N, k] int32 (global
    expert ids) from `route`; w_gate, w_up [E_local, H, Im] and w_down [E_local, Im, H] for the
    experts [first_expert, first_expert + E_local) (first_expert may be traced, e.g. a device's
    index times E_local); act: a callable or "silu" | "gelu_tanh". Returns [N, H] float32: sum
    over the k slots of weight * down(act(x @ gate) * (x @ up)), counting only slots routed to
    the local experts.

    The N * k (token, slot) pairs are sorted by local expert (pairs of other devices' experts
    last, outside every group), gathered, multiplied by one ragged_dot per projection with
    group sizes = the pairs per expert, weighted, and un-sorted by a gather (no scatter).
    Projections accumulate in float32; the gate/up products and the activation are in x's
    dtype, as the dense MLP's are."""
    n, k = experts.shape
    e_local = w_gate.shape[0]
    act = _activation(act)
    local = experts.reshape(-1) - first_expert                        # [N*k]
    mine = (local >= 0) & (local < e_local)
    key = jnp.where(mine, local, e_local).astype(jnp.int32)           # others: past the groups
    order = jnp.argsort(key, stable=True)                             # [N*k] pair ids by expert
    group_sizes = jnp.bincount(key, length=e_local + 1)[:e_local].astype(jnp.int32)
    xs = x[order // k]                                                # [N*k, H]
    g = jax.lax.ragged_dot(xs, w_gate, group_sizes, preferred_element_type=jnp.float32)
    u = jax.lax.ragged_dot(xs, w_up, group_sizes, preferred_element_type=jnp.float32)
    h = act(g.astype(x.dtype)) * u.astype(x.dtype)
    y = jax.lax.ragged_dot(h, w_down, group_sizes, preferred_element_type=jnp.float32)
    w_sorted = weights.reshape(-1).astype(jnp.float32)[order]
    y = jnp.where(mine[order][:, None], y * w_sorted[:, None], 0.0)
    inverse = jnp.argsort(order)                                      # pair id -> sorted row
    return jnp.sum(y[inverse].reshape(n, k, -1), axis=1)


def dense_reference(x, weights, experts, w_gate, w_up, w_down, act, *, first_expert=0):
    """What `expert_mlp` computes, by running every local expert on every token ([N, E_local]
    dense combination weights; zero where a token did not pick the expert). Same arguments and
    result; for tests and the benchmark."""
    e_local = w_gate.shape[0]
    act = _activation(act)
    ids = first_expert + jnp.arange(e_local, dtype=jnp.int32)
    combine = jnp.sum(jnp.where(experts[:, :, None] == ids, weights.astype(jnp.float32)[:, :, None],
                                0.0), axis=1)                         # [N, E_local]
    g = jnp.einsum("nh,ehi->eni", x, w_gate, preferred_element_type=jnp.float32)
    u = jnp.einsum("nh,ehi->eni", x, w_up, preferred_element_type=jnp.float32)
    h = act(g.astype(x.dtype)) * u.astype(x.dtype)
    y = jnp.einsum("eni,eih->enh", h, w_down, preferred_element_type=jnp.float32)
    return jnp.einsum("ne,enh->nh", combine, y)
