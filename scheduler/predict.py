"""Output-length predictors for VTC with length prediction.

With a prediction, VTC charges `w_q * pred` up front at admission (so a client cannot win
many slots in one round with requests whose cost is not yet visible), charges output tokens
only beyond `pred`, and refunds `w_q * (pred - out)` at finish when it over-predicted.
"""
from __future__ import annotations

import abc
import random

from scheduler.sequence import Sequence

# Key in Sequence.extra under which a simulator or benchmark may store a request's true
# output length (the engine does not know it; the oracle then falls back to max_tokens).
TRUE_OUTPUT_LEN = "true_output_len"


class LengthPredictor(abc.ABC):
    @abc.abstractmethod
    def predict(self, seq: Sequence) -> int: ...

    def observe(self, client_id: str, num_output_tokens: int) -> None:
        """A request of `client_id` finished with this many output tokens."""

    def forget(self, client_id: str) -> None:
        pass


class OraclePredictor(LengthPredictor):
    """The true length, optionally perturbed by a uniform relative error in [-alpha, alpha]."""

    def __init__(self, alpha: float = 0.0, seed: int = 0):
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        self.alpha = alpha
        self._rng = random.Random(seed)

    def predict(self, seq):
        true_len = seq.extra.get(TRUE_OUTPUT_LEN, seq.max_tokens)
        if self.alpha == 0.0:
            return int(true_len)
        return max(0, round(true_len * (1.0 + self._rng.uniform(-self.alpha, self.alpha))))


class MovingAveragePredictor(LengthPredictor):
    """Per client: pred <- (4 pred + out) / 5; the first finished request seeds it.

    Until a client has finished a request its prediction is `initial` (0 = plain VTC).
    """

    def __init__(self, initial: int = 0):
        self.initial = initial
        self._pred: dict[str, float] = {}

    def predict(self, seq):
        return round(self._pred.get(seq.client_id, self.initial))

    def observe(self, client_id, num_output_tokens):
        prev = self._pred.get(client_id)
        self._pred[client_id] = (float(num_output_tokens) if prev is None
                                 else (4.0 * prev + num_output_tokens) / 5.0)

    def forget(self, client_id):
        self._pred.pop(client_id, None)
