"""A min-heap of backlogged clients keyed by (counter, first-seen order), with lazy deletion.

Counters change on every decode step, far more often than admission looks at the minimum, so
instead of re-sifting we push a fresh entry whenever a backlogged client's counter changes
and drop stale entries when they surface (their version no longer matches the client's).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from collections import deque


@dataclass(eq=False)
class ClientState:
    """Mutable per-client state of a counter-based policy."""

    client_id: str
    order: int                  # first-seen order: breaks counter ties deterministically
    weight: float
    counter: float = 0.0        # virtual token counter (rebased, divided by weight)
    queue: deque = field(default_factory=deque)
    num_running: int = 0
    last_active: float = 0.0
    version: int = 0            # matches the client's one live heap entry
    num_input_tokens: int = 0   # prefilled prompt tokens (each prompt once)
    num_cached_tokens: int = 0  # of those, served from the prefix cache at first admission
    num_output_tokens: int = 0
    charged: float = 0.0        # sum of charges minus refunds, weighted, never rebased
    lifted: float = 0.0         # sum of lift increments, never rebased
    rebased: float = 0.0        # sum subtracted by rebasing: counter = lifted + charged - rebased


class CounterHeap:
    def __init__(self):
        self._heap: list[tuple[float, int, int, str]] = []

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, st: ClientState) -> None:
        """(Re)insert a backlogged client after its counter changed or it became backlogged."""
        st.version += 1
        heapq.heappush(self._heap, (st.counter, st.order, st.version, st.client_id))

    def top(self, clients: dict[str, ClientState]) -> ClientState | None:
        """The backlogged client with the least counter, or None if no client is backlogged."""
        heap = self._heap
        while heap:
            _, _, version, cid = heap[0]
            st = clients.get(cid)
            if st is not None and st.version == version and st.queue:
                return st
            heapq.heappop(heap)
        return None

    def rebuild(self, clients: dict[str, ClientState]) -> None:
        """Drop every stale entry (after a rebase, or when stale entries pile up)."""
        self._heap = []
        for st in clients.values():
            if st.queue:
                st.version += 1
                self._heap.append((st.counter, st.order, st.version, st.client_id))
        heapq.heapify(self._heap)
