"""Step-time model of the engine for the simulator.

Defaults follow the paper's setup (Llama-2-7B on an A10G): a decode step takes about 37 ms,
prefill about 0.215 ms per prompt token. Calibrate from our own engine by measuring step
times and fitting `decode = a + b * batch (+ c * context tokens)`, `prefill = d + e * tokens`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from scheduler.scheduler import StepPlan


@dataclass(frozen=True)
class CostModel:
    decode_base_s: float = 0.037        # a: one decode step, independent of batch
    decode_per_seq_s: float = 0.0       # b: per running sequence in the decode batch
    decode_per_kv_token_s: float = 0.0  # c: per token of context attended to in the batch
    prefill_base_s: float = 0.0         # d: one prefill step
    prefill_per_token_s: float = 0.000215  # e: per prompt token prefilled

    def __post_init__(self):
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"cost model {f.name} must be non-negative, got {getattr(self, f.name)}")
        if self.decode_base_s + self.decode_per_seq_s + self.decode_per_kv_token_s <= 0:
            raise ValueError("decode steps must take time (all decode coefficients are 0)")
        if self.prefill_base_s + self.prefill_per_token_s <= 0:
            raise ValueError("prefill steps must take time (all prefill coefficients are 0)")

    def step_time(self, plan: StepPlan) -> float:
        """A plan's time: its prefill part and its decode part (a mixed step has both; the
        scheduler has already counted this step's tokens as computed)."""
        t = 0.0
        if plan.has_prefill:
            t += self.prefill_base_s + self.prefill_per_token_s * plan.num_prefill_tokens
        dec = [plan.seqs[i] for i in plan.decode_indices()]
        if dec:
            t += self.decode_base_s + self.decode_per_seq_s * len(dec)
            if self.decode_per_kv_token_s:
                t += self.decode_per_kv_token_s * sum(s.num_computed_tokens for s in dec)
        return t

    @classmethod
    def from_dict(cls, d: dict) -> "CostModel":
        """Flat coefficient names, or {"decode_step_s": {"a": .., "b": ..},
        "prefill_per_token_s": ..} as written by a calibration run."""
        d = dict(d)
        decode = d.pop("decode_step_s", None)
        if isinstance(decode, dict):
            d.setdefault("decode_base_s", decode.get("a", 0.0))
            d.setdefault("decode_per_seq_s", decode.get("b", 0.0))
        elif decode is not None:
            d.setdefault("decode_base_s", decode)
        prefill = d.get("prefill_step_s")
        if isinstance(d.pop("prefill_step_s", None), dict):
            d.setdefault("prefill_base_s", prefill.get("a", 0.0))
            d.setdefault("prefill_per_token_s", prefill.get("b", 0.0))
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown cost model key(s) {sorted(unknown)}; known: {sorted(names)}")
        return cls(**{k: float(v) for k, v in d.items()})

    @classmethod
    def from_json(cls, path: str) -> "CostModel":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        return asdict(self)
