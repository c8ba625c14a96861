"""Service cost functions: how many counter units a request's tokens are worth.

VTC charges a request's prefill once at admission and each output token as it is produced.
A cost function says how much: `prefill(n_p)` for a prompt of n_p tokens, and
`token(n_p, k)` for the k-th output token (k = 1 for the token produced by prefill).
Summed over a finished request the charges equal h(n_p, n_q), the request's total cost.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass


# Prefix caching: what a prompt token served from cache is charged, as a fraction of its
# prefill cost. It skips the prefill's compute, but it still holds pool pages for the request's
# life and every decode step's attention reads it; exactly 0 would give a tenant whose prompts
# others have cached its prompt service for free. 0.1 is also what providers price cached input
# at. docs/fairness.md shows how it moves the split between two tenants.
DEFAULT_CACHED_TOKEN_WEIGHT = 0.1


def prefill_charge(cost: "CostFunction", num_prompt_tokens: int, num_cached: int,
                   cached_token_weight: float) -> float:
    """The prefill charge of a prompt whose first `num_cached` tokens came from the cache:
    the cached tokens' marginal prefill cost at `cached_token_weight`."""
    full = cost.prefill(num_prompt_tokens)
    if num_cached <= 0 or cached_token_weight == 1:
        return full
    cached_part = full - cost.prefill(num_prompt_tokens - num_cached)
    return full - (1.0 - cached_token_weight) * cached_part


class CostFunction(abc.ABC):
    @abc.abstractmethod
    def prefill(self, num_prompt_tokens: int) -> float:
        """h(n_p, 0): charged once, when the request is first admitted."""

    @abc.abstractmethod
    def token(self, num_prompt_tokens: int, k: int) -> float:
        """h(n_p, k) - h(n_p, k-1): charged for the k-th output token (k >= 1)."""

    def total(self, num_prompt_tokens: int, num_output_tokens: int) -> float:
        return self.prefill(num_prompt_tokens) + sum(
            self.token(num_prompt_tokens, k) for k in range(1, num_output_tokens + 1))

    @property
    def max_token_cost(self) -> float:
        """Largest single-token charge, for the fairness bound U (linear costs only)."""
        raise NotImplementedError


@dataclass(frozen=True)
class LinearCost(CostFunction):
    """The paper's default: W = w_p * input tokens + w_q * output tokens."""

    w_p: float = 1.0
    w_q: float = 2.0

    def __post_init__(self):
        if self.w_p < 0 or self.w_q < 0 or self.w_p + self.w_q == 0:
            raise ValueError(f"cost weights must be non-negative and not both 0, got "
                             f"w_p={self.w_p}, w_q={self.w_q}")

    def prefill(self, num_prompt_tokens):
        return self.w_p * num_prompt_tokens

    def token(self, num_prompt_tokens, k):
        return self.w_q

    def total(self, num_prompt_tokens, num_output_tokens):
        return self.w_p * num_prompt_tokens + self.w_q * num_output_tokens

    @property
    def max_token_cost(self):
        return self.w_q


@dataclass(frozen=True)
class QuadraticCost(CostFunction):
    """A profiled cost h(n_p, n_q) = c0 + c_p n_p + c_q n_q + c_pq n_p n_q + c_qq n_q^2.

    Fitted to measured step times it charges what a request really costs the GPU: a long
    output attends to a growing context, so later tokens cost more than early ones.
    """

    c0: float = 0.0
    c_p: float = 1.0
    c_q: float = 2.0
    c_pq: float = 0.0
    c_qq: float = 0.0

    def h(self, n_p: int, n_q: int) -> float:
        return (self.c0 + self.c_p * n_p + self.c_q * n_q + self.c_pq * n_p * n_q
                + self.c_qq * n_q * n_q)

    def prefill(self, num_prompt_tokens):
        return self.h(num_prompt_tokens, 0)

    def token(self, num_prompt_tokens, k):
        return self.h(num_prompt_tokens, k) - self.h(num_prompt_tokens, k - 1)

    def total(self, num_prompt_tokens, num_output_tokens):
        return self.h(num_prompt_tokens, num_output_tokens)

    @classmethod
    def fit(cls, samples: list[tuple[int, int, float]]) -> "QuadraticCost":
        """Least-squares fit to (n_p, n_q, measured seconds) samples, e.g. whole-request
        times profiled on the engine. numpy is imported here only (it never pulls in JAX)."""
        import numpy as np

        if len(samples) < 5:
            raise ValueError(f"need at least 5 samples to fit 5 coefficients, got {len(samples)}")
        a = np.array([[1.0, p, q, p * q, q * q] for p, q, _ in samples])
        y = np.array([t for _, _, t in samples])
        coef, *_ = np.linalg.lstsq(a, y, rcond=None)
        return cls(*map(float, coef))


def make_cost(spec: dict | None, w_p: float = 1.0, w_q: float = 2.0) -> CostFunction:
    """A cost from a JSON-able spec: None -> linear(w_p, w_q); {"kind": "quadratic", ...}."""
    if spec is None:
        return LinearCost(w_p, w_q)
    spec = dict(spec)
    kind = spec.pop("kind", "linear")
    if kind == "linear":
        return LinearCost(spec.get("w_p", w_p), spec.get("w_q", w_q))
    if kind == "quadratic":
        return QuadraticCost(**spec)
    raise ValueError(f"unknown cost kind {kind!r} (expected 'linear' or 'quadratic')")
