"""Output reservation: admit a request only if its prompt plus max output fit in the pool.

The paper's artifact (S-LoRA/LightLLM router) admits this way, so it never preempts. Our
`Scheduler` allocates pages as tokens arrive and preempts when the pool runs dry (vLLM style).
Wrapping a policy in `OutputReservation` gives the artifact's admission rule without changing
the scheduler: `peek()` reports nothing to admit while the head request's reservation does not
fit, which ends the admission round exactly like a request that does not fit in memory.
"""
from __future__ import annotations

import math

from scheduler.policy import Policy
from scheduler.sequence import Sequence


class OutputReservation(Policy):
    def __init__(self, inner: Policy, page_size: int, num_usable_pages: int):
        self.inner = inner
        self.name = inner.name
        self.page_size = page_size
        self.num_usable_pages = num_usable_pages
        self.num_reserved_pages = 0
        self._reserved: dict[int, int] = {}   # seq_id -> pages reserved

    def pages_for(self, seq: Sequence) -> int:
        return math.ceil(seq.max_total_tokens / self.page_size)

    def can_reserve(self, seq: Sequence) -> bool:
        return self.num_reserved_pages + self.pages_for(seq) <= self.num_usable_pages

    def add(self, seq, now):
        self.inner.add(seq, now)

    def peek(self):
        seq = self.inner.peek()
        return seq if seq is not None and self.can_reserve(seq) else None

    def pop(self, seq, now):
        self.inner.pop(seq, now)
        n = self.pages_for(seq)
        self._reserved[seq.seq_id] = n
        self.num_reserved_pages += n

    def _release(self, seq):
        self.num_reserved_pages -= self._reserved.pop(seq.seq_id, 0)

    def requeue(self, seq):
        self._release(seq)
        self.inner.requeue(seq)

    def remove(self, seq):
        return self.inner.remove(seq)

    def on_tokens(self, seqs):
        self.inner.on_tokens(seqs)

    def on_finish(self, seq):
        self._release(seq)
        self.inner.on_finish(seq)

    def waiting(self):
        return self.inner.waiting()

    def __len__(self):
        return len(self.inner)

    def stats(self):
        return self.inner.stats()
