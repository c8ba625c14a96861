"""Baselines the paper compares VTC against: LCF and RPM (FCFS lives in scheduler.policy)."""
from __future__ import annotations

import collections

from scheduler.policy import FCFSPolicy, RequestRejected
from scheduler.vtc import VTCPolicy


class LCFPolicy(VTCPolicy):
    """Least counter first: VTC without the lift, so a client that was idle or light comes
    back with a low counter and is served exclusively until it catches up (banked credit)."""

    name = "lcf"

    def __init__(self, **kw):
        super().__init__(is_lift=False, **kw)


class RPMPolicy(FCFSPolicy):
    """Requests-per-minute limit: a request is rejected when its client already had
    `max_requests_per_window` requests accepted in the last `window_s` seconds; FCFS among
    the accepted ones. Not work-conserving: rejected work is lost even when the server idles."""

    name = "rpm"

    def __init__(self, max_requests_per_window: int = 20, window_s: float = 60.0):
        super().__init__()
        if max_requests_per_window <= 0:
            raise ValueError(f"max_requests_per_window must be positive, got "
                             f"{max_requests_per_window}")
        self.max_requests_per_window = max_requests_per_window
        self.window_s = window_s
        self._accepted: dict[str, collections.deque[float]] = {}
        self.num_rejected: collections.Counter[str] = collections.Counter()

    def add(self, seq, now):
        times = self._accepted.setdefault(seq.client_id, collections.deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if len(times) >= self.max_requests_per_window:
            self.num_rejected[seq.client_id] += 1
            raise RequestRejected(
                f"client {seq.client_id!r} exceeded {self.max_requests_per_window} requests "
                f"per {self.window_s:g} s", retryable=True)
        times.append(now)
        if len(self._accepted) > 4 * (len(self._queue) + 256):
            self._forget_idle(now)
        super().add(seq, now)

    def _forget_idle(self, now):
        for cid in [c for c, t in self._accepted.items() if not t or t[-1] <= now - self.window_s]:
            del self._accepted[cid]

    def stats(self):
        return {"policy": self.name, "clients": {
            cid: {"accepted_in_window": len(t), "rejected": self.num_rejected[cid]}
            for cid, t in self._accepted.items()}}
