"""Admission-order policies. The scheduler asks the policy which waiting request goes next.

A policy owns the waiting queue(s) and the fairness accounting; it never touches pages.
Hooks, in a request's life:
  add(seq, now)           arrival; may raise RequestRejected (e.g. a rate limit)
  peek() / pop(seq, now)  the scheduler looks at the next candidate and admits it (prefill
                          is charged here, once per request, even if it is later recomputed)
  on_tokens(seqs)         each sequence in `seqs` produced exactly one output token this step
  requeue(seq)            a running request was preempted; it goes back to the front of its
                          queue without any counter lift
  remove(seq)             a waiting request was aborted; no charge
  on_finish(seq)          a running request finished (for refunds of predicted lengths)
"""
from __future__ import annotations

import abc
import collections
from typing import Iterator

from scheduler.sequence import Sequence


class RequestRejected(Exception):
    """Raised by `Policy.add` or the scheduler when a request can never or may not be served.

    `retryable` tells callers whether the same request may succeed later (a rate limit: HTTP
    429) or never will (too large for the pool or context: HTTP 400); `code` names the reason
    for API errors.
    """

    def __init__(self, message: str, *, retryable: bool = False, code: str | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.code = code


class Policy(abc.ABC):
    name: str = "base"

    @abc.abstractmethod
    def add(self, seq: Sequence, now: float) -> None: ...

    @abc.abstractmethod
    def peek(self) -> Sequence | None: ...

    @abc.abstractmethod
    def pop(self, seq: Sequence, now: float) -> None: ...

    @abc.abstractmethod
    def requeue(self, seq: Sequence) -> None: ...

    @abc.abstractmethod
    def remove(self, seq: Sequence) -> bool: ...

    def on_tokens(self, seqs: list[Sequence]) -> None:
        pass

    def on_finish(self, seq: Sequence) -> None:
        pass

    @abc.abstractmethod
    def waiting(self) -> Iterator[Sequence]: ...

    @abc.abstractmethod
    def __len__(self) -> int: ...

    def stats(self) -> dict:
        """Per-client counters and service, for metrics. Empty for policies without counters."""
        return {}


class FCFSPolicy(Policy):
    """One global queue in arrival order; preempted requests return to its front."""

    name = "fcfs"

    def __init__(self):
        self._queue: collections.deque[Sequence] = collections.deque()

    def add(self, seq, now):
        self._queue.append(seq)

    def peek(self):
        return self._queue[0] if self._queue else None

    def pop(self, seq, now):
        assert self._queue and self._queue[0] is seq, "FCFS admits only the head of the queue"
        self._queue.popleft()

    def requeue(self, seq):
        self._queue.appendleft(seq)

    def remove(self, seq):
        try:
            self._queue.remove(seq)
            return True
        except ValueError:
            return False

    def waiting(self):
        return iter(self._queue)

    def __len__(self):
        return len(self._queue)
