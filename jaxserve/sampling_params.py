"""Per-request generation parameters (validated once, here, never mutated)."""
from __future__ import annotations

from dataclasses import dataclass

from jaxserve.admission import AdmissionError

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = 16       # None: the rest of the context (resolved at admission)
    temperature: float = 1.0          # 0 means greedy
    top_k: int = 0                    # 0 disables
    top_p: float = 1.0                # 1 disables
    seed: int | None = None           # same seed + same prompt -> same tokens, in any batch
    stop: tuple[str, ...] = ()        # stop strings (not included in the output text)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False            # return the log-probability of each chosen token
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        def bad(msg: str, param: str):
            raise AdmissionError(msg, param=param)
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or any(
                not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_CHARS for s in stop):
            bad(f"stop strings must have 1 to {MAX_STOP_CHARS} characters", "stop")
        if len(stop) > MAX_STOP_STRINGS:
            bad(f"at most {MAX_STOP_STRINGS} stop strings", "stop")
        object.__setattr__(self, "stop", tuple(stop))
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids must be non-negative integers", "stop_token_ids")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens")
        for name, lo, hi, lo_open in (("temperature", 0.0, 100.0, False),
                                      ("top_p", 0.0, 1.0, True)):
            v = getattr(self, name)
            if (not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi
                    or (lo_open and v == lo)):
                bad(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}", name)
        if not _is_int(self.top_k) or self.top_k < 0:
            bad(f"top_k must be an integer >= 0 (or -1 in the API), got {self.top_k!r}", "top_k")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < 2**63):
            bad(f"seed must be an integer in [0, 2**63), got {self.seed!r}", "seed")
