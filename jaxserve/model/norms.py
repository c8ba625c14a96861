"""Normalization shared by the model math, the LoRA path and the backends' fused kernels."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x, w, eps):
    """x / sqrt(mean(x^2) + eps) * w, computed in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * w.astype(jnp.float32)).astype(x.dtype)


def norm_weight(w, unit_offset: bool):
    """The factor rms_norm scales by for a checkpoint's norm weight `w`: w itself, or, for a
    unit-offset norm (Gemma: x_normed * (1 + w)), 1 + w in float32, as HF computes it
    (1.0 + w.float()). Passing the result as rms_norm's `w` (and as the weight of a backend's
    fused norm, which takes float32) gives Gemma's norm with the same arithmetic. None stays
    None (a norm the family does not have)."""
    if w is None or not unit_offset:
        return w
    return 1.0 + w.astype(jnp.float32)
