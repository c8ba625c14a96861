"""Model configuration: the static description of a Llama-family checkpoint.

Hashable and frozen so it can be a static argument of `jax.jit`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
ROPE_TYPES = ("default", "linear", "llama3")


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
    sliding_window: int | None = None
    architecture: str = "llama"

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

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        H, I, L = self.hidden_size, self.intermediate_size, self.num_layers
        per_layer = H * (self.q_size + 2 * self.kv_size) + self.q_size * H + 3 * H * I + 2 * H
        head = 0 if self.tie_word_embeddings else self.vocab_size * H
        return self.vocab_size * H + L * per_layer + H + head

    def flops_per_token(self, context_len: int = 0) -> float:
        """Forward FLOPs for one token: 2 x matmul parameters (incl. the LM head) + attention."""
        H, I, L = self.hidden_size, self.intermediate_size, self.num_layers
        matmul = L * (H * (self.q_size + 2 * self.kv_size) + self.q_size * H + 3 * H * I)
        matmul += self.vocab_size * H
        attn = L * 2 * self.num_heads * self.head_dim * context_len
        return 2.0 * matmul + 2.0 * attn

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        archs = d.get("architectures") or []
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            mt = d.get("model_type")
            if mt in ("llama", "mistral", "qwen2") and not archs:
                arch = mt
            else:
                raise ConfigError(
                    f"unsupported architecture {archs or mt!r}; jaxserve serves "
                    f"{sorted(SUPPORTED_ARCHITECTURES)}")
        try:
            num_heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            required = {k: d[k] for k in ("vocab_size", "intermediate_size", "num_hidden_layers")}
        except KeyError as e:
            raise ConfigError(f"config.json is missing the field {e.args[0]!r}") from None
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        if arch == "qwen2" and d.get("use_sliding_window"):
            raise ConfigError("Qwen2 with use_sliding_window=true (per-layer windows) is not supported")
        window = d.get("sliding_window") if arch == "mistral" else None
        head_dim = d.get("head_dim") or hidden // num_heads
        return cls(
            vocab_size=int(required["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(required["intermediate_size"]),
            num_layers=int(required["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=float(theta),
            rope_type=str(rope_type),
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or bool(d.get("attention_bias", False)),
            o_bias=arch != "qwen2" and bool(d.get("attention_bias", False)),
            sliding_window=int(window) if window else None,
            architecture=arch,
        )


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
