"""Policies by name, for `--scheduler NAME` on every entry point."""
from __future__ import annotations

from scheduler.baselines import LCFPolicy, RPMPolicy
from scheduler.cost import CostFunction, LinearCost
from scheduler.policy import FCFSPolicy, Policy
from scheduler.predict import MovingAveragePredictor, OraclePredictor
from scheduler.vtc import VTCPolicy

POLICY_NAMES = ("fcfs", "vtc", "wvtc", "vtc-oracle", "vtc-predict", "lcf", "rpm")
_ALIASES = {"weighted": "wvtc", "weighted-vtc": "wvtc", "vtc-weighted": "wvtc"}


def make_policy(name: str, *, fair_weights: dict[str, float] | None = None, w_p: float = 1.0,
                w_q: float = 2.0, cost: CostFunction | None = None,
                cached_token_weight: float | None = None, **kw) -> Policy:
    """Build a policy. `fair_weights` apply to every VTC variant (clients not listed weigh 1).

    `cached_token_weight`: the charge of a prompt token served from the prefix cache, as a
    fraction of its prefill cost (VTC variants; None = scheduler.cost.DEFAULT_CACHED_TOKEN_WEIGHT;
    refused for policies without counters).
    Extra keywords: client_ttl_s (VTC variants), alpha and seed (vtc-oracle),
    initial_prediction (vtc-predict), max_requests_per_window and window_s (rpm).
    Raises ValueError for an unknown name or keyword.
    """
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in POLICY_NAMES:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(POLICY_NAMES)}")
    cost = cost or LinearCost(w_p, w_q)
    if cached_token_weight is not None and key in ("fcfs", "rpm"):
        raise ValueError(f"scheduler {key!r} keeps no service counters: the cached-token weight "
                         "applies to the VTC schedulers")
    vtc_kw = {} if cached_token_weight is None else {"cached_token_weight": cached_token_weight}
    if key == "fcfs":
        _no_extra(key, kw)
        return FCFSPolicy()
    if key == "rpm":
        return RPMPolicy(**_take(key, kw, "max_requests_per_window", "window_s"))
    if key == "lcf":
        return LCFPolicy(cost=cost, weights=fair_weights, **vtc_kw,
                         **_take(key, kw, "client_ttl_s"))
    predictor = None
    if key == "vtc-oracle":
        opts = _take(key, kw, "alpha", "seed", "client_ttl_s")
        predictor = OraclePredictor(opts.pop("alpha", 0.0), opts.pop("seed", 0))
    elif key == "vtc-predict":
        opts = _take(key, kw, "initial_prediction", "client_ttl_s")
        predictor = MovingAveragePredictor(opts.pop("initial_prediction", 0))
    else:
        opts = _take(key, kw, "client_ttl_s")
    if key == "wvtc" and not fair_weights:
        raise ValueError("scheduler 'wvtc' needs fair weights (client=weight,...)")
    policy = VTCPolicy(cost=cost, weights=fair_weights, predictor=predictor, **vtc_kw, **opts)
    policy.name = key
    return policy


def _take(key: str, kw: dict, *allowed: str) -> dict:
    unknown = set(kw) - set(allowed)
    if unknown:
        raise ValueError(f"scheduler {key!r} takes no option(s) {', '.join(sorted(unknown))}")
    return dict(kw)


def _no_extra(key: str, kw: dict) -> None:
    _take(key, kw)
