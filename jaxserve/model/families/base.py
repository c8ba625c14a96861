"""What a model family is: its weights, their names in each checkpoint format, its configs.

A `Family` lists every canonical weight once (`WeightSpec`): its logical axes (which give its
shape, from the config, and its sharding), how a random model initializes it, and its names in
HF safetensors, GGUF (llama.cpp) and PEFT. From that one list, jaxserve/model/weights.py builds
the pytrees, jaxserve/loader.py reads checkpoints and jaxserve/lora/adapter.py matches adapters.
The family also maps an HF config.json (or GGUF metadata) to ModelConfig fields, including
per-layer static attributes (tuples indexed by layer, e.g. `ModelConfig.layer_windows`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from jaxserve.config import ModelConfig

# logical axis -> the ModelConfig size it stands for (an array's shape is read off its axes)
AXIS_SIZES = {
    "vocab": "vocab_size",
    "embed": "hidden_size",
    "q_heads": "q_size",        # num_heads * head_dim
    "kv_heads": "kv_size",      # num_kv_heads * head_dim
    "mlp": "intermediate_size",
    "head_dim": "head_dim",
    "experts": "num_experts",
    "moe_mlp": "moe_intermediate_size",
    "expert_logits": "num_experts",   # the router's output columns (replicated under ep)
}


@dataclass(frozen=True)
class WeightSpec:
    """One canonical weight. Per-layer names hold `{i}`, the layer index.

    Projections are stored `[in, out]` (x @ W); checkpoints store torch's `[out, in]`, which
    `transpose` undoes on load.
    """
    name: str                    # field of Weights / LayerWeights
    axes: tuple[str, ...]        # logical axes of one layer's array (AXIS_SIZES)
    hf: str                      # HF safetensors tensor name
    gguf: str | None = None      # llama.cpp tensor name (None: the family has no GGUF form of it)
    init: str = "normal"         # "normal" | "ones" | "zeros" (random models)
    transpose: bool = False      # checkpoint layout is [out, in]
    gguf_rope_heads: str | None = None  # ModelConfig head count whose rows llama.cpp permuted
    #                                     for its RoPE (q: "num_heads", k: "num_kv_heads")
    gguf_shift: float = 0.0      # what llama.cpp's converter added to the values (Gemma's norm
    #                              weights: +1); the GGUF loader subtracts it
    lora: str | None = None      # PEFT module (an nn.Linear) whose weight this is
    when: Callable[[ModelConfig], bool] | None = None   # optional weight: present iff when(cfg)

    def is_present(self, cfg: ModelConfig) -> bool:
        return self.when is None or bool(self.when(cfg))

    def shape(self, cfg: ModelConfig) -> tuple[int, ...]:
        return tuple(getattr(cfg, AXIS_SIZES[a]) for a in self.axes)

    @property
    def per_expert(self) -> bool:
        """The checkpoint stores one tensor per expert, `hf` naming it with `{e}` (the expert
        index) as well as `{i}`: the loaders stack them on the leading `experts` axis (each
        tensor is the weight's shape without it, transposed when `transpose`)."""
        return "{e}" in self.hf

    def module_path(self, layer: int | None = None) -> str:
        """The torch module holding this weight, e.g. model.layers.3.self_attn.q_proj (what
        PEFT matches target_modules against)."""
        return self.hf.format(i=layer).rsplit(".", 1)[0]


@dataclass(frozen=True)
class Family:
    name: str
    architectures: dict[str, str]          # HF `architectures` entry -> ModelConfig.architecture
    weights: tuple[WeightSpec, ...]        # outside the layers: embedding, final norm, LM head
    layer_weights: tuple[WeightSpec, ...]  # in every layer, stacked on a leading `layers` axis
    # (HF config dict, architecture) -> ModelConfig fields
    config_fields: Callable[[dict, str], dict]
    # GGUF `general.architecture` values, and (architecture, metadata getter, tensor shapes)
    # -> an HF-style config dict for config_fields
    gguf_architectures: tuple[str, ...] = ()
    gguf_config: Callable[[str, Callable, dict], dict] | None = None
    _by_name: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        by_name = {w.name: w for w in self.weights + self.layer_weights}
        if len(by_name) != len(self.weights) + len(self.layer_weights):
            raise ValueError(f"family {self.name}: two weights share a name")
        object.__setattr__(self, "_by_name", by_name)

    @property
    def model_types(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.architectures.values()))

    def weight(self, name: str) -> WeightSpec:
        """A weight by its field name (a `layers.` prefix, as weights.build names them, is ok)."""
        return self._by_name[name.removeprefix("layers.")]

    @property
    def lora_modules(self) -> tuple[str, ...]:
        return tuple(w.lora for w in self.layer_weights if w.lora is not None)

    def lora_weight(self, module: str) -> WeightSpec:
        return next(w for w in self.layer_weights if w.lora == module)

    def lora_dims(self, cfg: ModelConfig, module: str) -> tuple[int, int]:
        """(in, out) of the projection a PEFT module adapts."""
        din, dout = self.lora_weight(module).shape(cfg)
        return din, dout


def hf_common_fields(d: dict) -> dict:
    """The ModelConfig fields every decoder-only HF config spells the same way (sizes, RMSNorm,
    RoPE and its scaling, tied embeddings); a family adds its own."""
    from jaxserve.config import ConfigError
    try:
        num_heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        required = {k: d[k] for k in ("vocab_size", "intermediate_size", "num_hidden_layers")}
    except KeyError as e:
        raise ConfigError(f"config.json is missing the field {e.args[0]!r}") from None
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    return dict(
        vocab_size=int(required["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(required["intermediate_size"]),
        num_layers=int(required["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
        head_dim=int(d.get("head_dim") or hidden // num_heads),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
        rope_type=str(rope.get("rope_type", rope.get("type", "default")) or "default"),
        rope_factor=float(rope.get("factor", 1.0)),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
        max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
    )
