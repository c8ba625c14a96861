"""Normalization shared by the model math, the LoRA path and the backends' fused kernels."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x, w, eps):
    """x / sqrt(mean(x^2) + eps) * w, computed in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * w.astype(jnp.float32)).astype(x.dtype)
