"""Qwen3-MoE: the Qwen3 attention (per-head q/k RMSNorms before RoPE) and a mixture of experts in
place of the MLP in every layer. The router `mlp.gate` [E, H] scores the experts; each token's
top `num_experts_per_tok` are softmax-weighted over all experts, renormalised to sum to 1 only
when `norm_topk_prob`; each expert is a SwiGLU MLP of width `moe_intermediate_size`. Checkpoints
store one tensor per expert, stacked on load into [E, ...] (jaxserve/loader.py).

Configs mixing dense and MoE layers (`decoder_sparse_step` > 1 or `mlp_only_layers`) are
refused: the layers are one stacked program with one kind of MLP."""
from __future__ import annotations

from jaxserve.model.families.base import Family, WeightSpec as W
from jaxserve.model.families.llama import WEIGHTS, _MLP
from jaxserve.model.families.mixtral import ATTENTION_WEIGHTS, moe_check
from jaxserve.model.families.qwen3 import QK_NORMS
from jaxserve.model.families.qwen3 import config_fields as qwen3_fields

EXPERTS = (
    W("router", ("embed", "expert_logits"), f"{_MLP}.gate.weight", transpose=True),
    W("we_gate", ("experts", "embed", "moe_mlp"), f"{_MLP}.experts.{{e}}.gate_proj.weight",
      transpose=True),
    W("we_up", ("experts", "embed", "moe_mlp"), f"{_MLP}.experts.{{e}}.up_proj.weight",
      transpose=True),
    W("we_down", ("experts", "moe_mlp", "embed"), f"{_MLP}.experts.{{e}}.down_proj.weight",
      transpose=True),
)


def config_fields(d: dict, arch: str) -> dict:
    from jaxserve.config import ConfigError
    moe_check(d, "Qwen3-MoE")
    step = d.get("decoder_sparse_step", 1)
    if step != 1:
        raise ConfigError(f"Qwen3-MoE with decoder_sparse_step={step!r} (dense MLP layers between "
                          "the MoE layers) is not supported")
    if d.get("mlp_only_layers"):
        raise ConfigError(f"Qwen3-MoE with mlp_only_layers={d['mlp_only_layers']!r} (dense MLP "
                          "layers) is not supported")
    fields = qwen3_fields(d, arch)
    try:
        # the released checkpoints say num_experts; transformers v5 writes num_local_experts
        experts = int(d["num_local_experts"] if "num_local_experts" in d else d["num_experts"])
        k, width = int(d["num_experts_per_tok"]), int(d["moe_intermediate_size"])
    except KeyError as e:
        raise ConfigError(f"config.json is missing the field {e.args[0]!r}") from None
    if experts <= 0:
        raise ConfigError(f"Qwen3-MoE with num_experts={experts} (no experts) is not supported")
    fields.update(num_experts=experts, experts_per_token=k, moe_intermediate_size=width,
                  moe_renormalize=bool(d.get("norm_topk_prob", False)))
    return fields


QWEN3_MOE = Family(
    name="qwen3_moe",
    architectures={"Qwen3MoeForCausalLM": "qwen3_moe"},
    weights=WEIGHTS,
    layer_weights=ATTENTION_WEIGHTS + QK_NORMS + EXPERTS,
    config_fields=config_fields,
)
