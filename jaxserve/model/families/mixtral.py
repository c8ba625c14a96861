"""Mixtral: the Llama attention (with Mistral's optional sliding window) and a mixture of
experts in place of the MLP. The router `block_sparse_moe.gate` [E, H] scores the experts; each
token's top `num_experts_per_tok` are softmax-weighted over all experts, then renormalised to sum
to 1; each expert is a SwiGLU MLP (w1 gate, w3 up, w2 down) of width `intermediate_size`.
Checkpoints store one tensor per expert, stacked on load into [E, ...] (jaxserve/loader.py)."""
from __future__ import annotations

from jaxserve.model.families.base import Family, WeightSpec as W, hf_common_fields
from jaxserve.model.families.llama import LAYER_WEIGHTS, WEIGHTS

_MOE = "model.layers.{i}.block_sparse_moe"
DENSE_MLP = ("w_gate", "w_up", "w_down")

# The Llama layer's weights without its dense MLP: attention, its norm, the pre-MLP norm.
ATTENTION_WEIGHTS = tuple(w for w in LAYER_WEIGHTS if w.name not in DENSE_MLP)

EXPERTS = (
    W("router", ("embed", "expert_logits"), f"{_MOE}.gate.weight", transpose=True),
    W("we_gate", ("experts", "embed", "moe_mlp"), f"{_MOE}.experts.{{e}}.w1.weight",
      transpose=True),
    W("we_up", ("experts", "embed", "moe_mlp"), f"{_MOE}.experts.{{e}}.w3.weight",
      transpose=True),
    W("we_down", ("experts", "moe_mlp", "embed"), f"{_MOE}.experts.{{e}}.w2.weight",
      transpose=True),
)


def moe_check(d: dict, family: str) -> None:
    """What a mixture-of-experts family refuses in any config: experts other than SwiGLU."""
    from jaxserve.config import ConfigError
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{family} with hidden_act={act!r} is not supported (experts are SwiGLU: "
                          "silu)")


def config_fields(d: dict, arch: str) -> dict:
    from jaxserve.config import ConfigError
    moe_check(d, "Mixtral")
    fields = hf_common_fields(d)
    try:
        experts, k = int(d["num_local_experts"]), int(d["num_experts_per_tok"])
    except KeyError as e:
        raise ConfigError(f"config.json is missing the field {e.args[0]!r}") from None
    window = d.get("sliding_window")
    fields.update(
        num_experts=experts,
        experts_per_token=k,
        moe_intermediate_size=fields["intermediate_size"],   # each expert's width
        moe_renormalize=True,
        layer_windows=(int(window),) * fields["num_layers"] if window else (),
        architecture=arch,
    )
    return fields


MIXTRAL = Family(
    name="mixtral",
    architectures={"MixtralForCausalLM": "mixtral"},
    weights=WEIGHTS,
    layer_weights=ATTENTION_WEIGHTS + EXPERTS,
    config_fields=config_fields,
)
