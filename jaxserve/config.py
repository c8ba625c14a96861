"""Model configuration: the static description of a checkpoint.

Hashable and frozen so it can be a static argument of `jax.jit`. Which HF config fields fill it
is each model family's business (jaxserve/model/families).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

ROPE_TYPES = ("default", "linear", "llama3")
MLP_ACTIVATIONS = ("silu", "gelu_tanh")


class ConfigError(ValueError):
    """A checkpoint's configuration that we cannot serve (named field, clear reason)."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    # Per-layer static attributes: one entry per layer (empty: the default in every layer).
    layer_windows: tuple[int | None, ...] = ()   # sliding window (None: full attention)
    layer_rope_local: tuple[bool, ...] = ()      # the layer uses the local RoPE (rope_local_theta)
    # Gemma 2/3 (defaults: the Llama layer)
    norm_unit_offset: bool = False       # RMSNorm scales by (1 + w)
    embed_scale: bool = False            # embeddings times sqrt(hidden_size), in the activation dtype
    mlp_activation: str = "silu"         # of the gate: "silu" (SwiGLU) | "gelu_tanh" (GeGLU)
    sandwich_norms: bool = False         # RMSNorm on the attention and MLP outputs too
    attn_scale: float | None = None      # score scale (None: head_dim ** -0.5)
    attn_softcap: float | None = None    # scores -> c * tanh(s / c)
    final_softcap: float | None = None   # logits -> c * tanh(l / c)
    rope_local_theta: float | None = None  # RoPE base of the layers in layer_rope_local
    # Mixture of experts (num_experts 0: a dense MLP)
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    moe_renormalize: bool = True         # the top-k routing weights rescaled to sum to 1
    architecture: str = "llama"                  # model type; names its family (model/families)

    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
                raise ConfigError(f"config field {f} must be a positive integer, got {getattr(self, f)!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_kv_heads})")
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope type {self.rope_type!r} is not supported (supported: {ROPE_TYPES})")
        for f in ("layer_windows", "layer_rope_local"):
            if getattr(self, f) and len(getattr(self, f)) != self.num_layers:
                raise ConfigError(f"{f} has {len(getattr(self, f))} entries for "
                                  f"{self.num_layers} layers")
        if any(w is not None and w <= 0 for w in self.layer_windows):
            raise ConfigError(f"sliding windows must be positive, got {self.layer_windows}")
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ConfigError(f"MLP activation {self.mlp_activation!r} is not supported "
                              f"(supported: {MLP_ACTIVATIONS})")
        if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok must be in [1, {self.num_experts}], got "
                              f"{self.experts_per_token}")

    @property
    def sliding_window(self) -> int | None:
        """The window every layer shares (None: full attention); refused when layers differ.
        The layer math reads the per-layer windows (jaxserve/model/llama.py layer_window)."""
        windows = set(self.layer_windows) or {None}
        if len(windows) > 1:
            raise ConfigError(f"layers with different sliding windows {sorted(windows, key=str)} "
                              "are not supported")
        return windows.pop()

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def flops_per_token(self, context_len: int = 0) -> float:
        """Forward FLOPs for one token: 2 x matmul parameters (incl. the LM head) + attention."""
        H, I, L = self.hidden_size, self.intermediate_size, self.num_layers
        if self.num_experts:     # the experts a token is routed to, and the router
            I = self.experts_per_token * self.moe_intermediate_size
            router = H * self.num_experts
        else:
            router = 0
        matmul = L * (H * (self.q_size + 2 * self.kv_size) + self.q_size * H + 3 * H * I
                      + router)
        matmul += self.vocab_size * H
        attn = L * 2 * self.num_heads * self.head_dim * context_len
        return 2.0 * matmul + 2.0 * attn

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        """From an HF config.json, by the model family its architecture belongs to."""
        from jaxserve.model import families
        family, arch = families.for_hf_config(d)
        return cls(**family.config_fields(d, arch))


def rope_inv_freq(cfg: ModelConfig):
    """Inverse frequencies [head_dim/2] (numpy, float64), with the configured scaling."""
    import numpy as np
    D = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, D, 2, dtype=np.float64) / D))
    if cfg.rope_type == "linear":
        inv = inv / cfg.rope_factor
    elif cfg.rope_type == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, a smooth blend between.
        low_wl = cfg.rope_original_max_position / cfg.rope_low_freq_factor
        high_wl = cfg.rope_original_max_position / cfg.rope_high_freq_factor
        wl = 2 * math.pi / inv
        smooth = (cfg.rope_original_max_position / wl - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        blended = (1 - smooth) * inv / cfg.rope_factor + smooth * inv
        inv = np.where(wl > low_wl, inv / cfg.rope_factor, np.where(wl < high_wl, inv, blended))
    return inv
