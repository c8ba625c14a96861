"""A mixture of experts' expert MLPs on a tensor-parallel mesh (the mesh branch of `moe`).

Tokens and their routing (router weights [H, E] replicated, so every device computes the same
top-k) are replicated; the experts' weights are split by `jaxserve.sharding.rules(ep)`:

  ep 1   every expert's gate/up output and down input split over the tp devices: a device runs
         all routed (token, expert) pairs on its [H, Im/tp] slices and holds a partial sum of
         each token's output (as the dense MLP's row-parallel down does);
  ep tp  whole experts: device d holds experts [d * E/tp, (d + 1) * E/tp) and computes only the
         pairs routed to them (`expert_mlp`'s first_expert; the others contribute zero).

Either way each device's [tokens, hidden] result is a partial sum, and one all-reduce (psum,
float32) over the mesh completes the layer: the only collective of the MoE block. The step is
otherwise GSPMD (jaxserve/backends/programs.py); this part is a `shard_map` so that the sort,
the group sizes and the grouped matmuls run on each device's own experts, with nothing
gathered. The collectives' sizes are in docs/parallelism.md.
"""
from __future__ import annotations

import jax
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from jaxserve import sharding
from jaxserve.model import moe

# logical axes of one layer's expert weights (as the MoE families declare them)
GATE_UP_AXES = ("experts", "embed", "moe_mlp")    # we_gate, we_up [E, H, Im]
DOWN_AXES = ("experts", "moe_mlp", "embed")       # we_down [E, Im, H]


def expert_mlp(x, weights, experts, w_gate, w_up, w_down, act, *, mesh: Mesh, ep: int):
    """`jaxserve.model.moe.expert_mlp` over the mesh: x [N, H], weights / experts [N, k] (global
    expert ids) replicated; w_gate, w_up [E, H, Im] and w_down [E, Im, H] (all experts, sharded
    by `rules(ep)`). Returns [N, H] float32, replicated: the psum of the devices' parts."""
    gu = sharding.spec(GATE_UP_AXES, w_gate.shape, mesh, ep)
    dn = sharding.spec(DOWN_AXES, w_down.shape, mesh, ep)
    for s, shape in ((gu, w_gate.shape), (dn, w_down.shape)):
        if sharding.TP not in tuple(s):   # spec() replicated an axis tp does not divide
            raise ValueError(f"expert weights {shape} cannot be split over tp={mesh.shape[sharding.TP]}"
                             f" with ep={ep} (jaxserve.sharding.check_parallel refuses this)")

    def part(x, weights, experts, w_gate, w_up, w_down):
        # ep: this device's experts start at its index times the experts it holds
        first = lax.axis_index(sharding.TP) * w_gate.shape[0] if ep > 1 else 0
        y = moe.expert_mlp(x, weights, experts, w_gate, w_up, w_down, act, first_expert=first)
        return lax.psum(y, sharding.TP)

    return jax.shard_map(part, mesh=mesh, in_specs=(P(), P(), P(), gu, gu, dn),
                         out_specs=P())(x, weights, experts, w_gate, w_up, w_down)
