"""Data parallelism: one scheduler planning R replicas' pools (`--dp R`).

Each replica (a group of `tp` devices, jaxserve/replicas.py) has its own KV pool and batch
rows; here each is a `Scheduler` (its allocator, adapter cache, running set, prefix cache),
and all of them share ONE policy (one waiting queue, one set of VTC counters) and one table
of live sequences. A step:
  1. every replica plans its decodes and its unfinished prefill chunks, as alone;
  2. admission runs once, globally: the policy's head (the VTC order decides WHO is next) is
     placed on a replica with room (locality decides only WHERE: its sibling sample's replica,
     then one where its adapter is resident, then the least loaded); if no replica can take
     it, admission stops (no skipping ahead, as alone);
  3. the result is a `ReplicaPlan`: one StepPlan per replica, seen by the engine as one plan
     (its sequences concatenated in replica order).
`update`, `finish` and `abort` go to the replica holding the sequence (`Sequence.replica`);
charges reach the one policy whichever replica served the token, so a client's counter
counts its service on every replica.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from scheduler.policy import FCFSPolicy, Policy
from scheduler.scheduler import Scheduler, SchedulerConfig, StepPlan
from scheduler.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class ReplicaPlan:
    """One StepPlan per replica; index i of `seqs` is plan r's entry i - offsets[r]."""
    plans: list[StepPlan]

    def __post_init__(self):
        self.seqs: list[Sequence] = [s for p in self.plans for s in p.seqs]
        self.preempted: list[Sequence] = [s for p in self.plans for s in p.preempted]
        self.offsets = [0]
        for p in self.plans:
            self.offsets.append(self.offsets[-1] + len(p.seqs))

    def _at(self, i: int) -> tuple[StepPlan, int]:
        r = next(r for r in range(len(self.plans)) if i < self.offsets[r + 1])
        return self.plans[r], i - self.offsets[r]

    def split(self, values: list) -> list[list]:
        """Per-plan values (plan order) -> one list per replica."""
        return [values[self.offsets[r]:self.offsets[r + 1]] for r in range(len(self.plans))]

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def num_tokens(self) -> int:
        return sum(p.num_tokens for p in self.plans)

    @property
    def has_prefill(self) -> bool:
        return any(p.has_prefill for p in self.plans)

    def samples(self, i: int) -> bool:
        plan, j = self._at(i)
        return plan.samples(j)

    def is_decode(self, i: int) -> bool:
        plan, j = self._at(i)
        return plan.is_decode(j)


class _Pools:
    """The replicas' allocators seen as one (the engine's stats)."""

    def __init__(self, replicas: list[Scheduler]):
        self._allocators = [r.allocator for r in replicas]

    def __getattr__(self, name: str):   # num_free, num_cached, num_usable, num_used
        return sum(getattr(a, name) for a in self._allocators)


class ReplicaScheduler:
    def __init__(self, config: SchedulerConfig, policy: Policy | None = None, *,
                 num_replicas: int, adapter_pages=None, max_adapter_pages: int | None = None,
                 max_adapters_per_batch: int | None = None, num_prefetch: int = 2):
        """`num_replicas` Schedulers of `config` each (num_pages: one replica's pool) sharing
        `policy`; the adapter arguments as Scheduler's, per replica."""
        if num_replicas < 2:
            raise ValueError("a ReplicaScheduler plans 2 or more replicas; use Scheduler for 1")
        self.config = config
        self.policy = policy if policy is not None else FCFSPolicy()
        self.num_prefetch = num_prefetch
        self.replicas = [Scheduler(config, self.policy, adapter_pages=adapter_pages,
                                   max_adapter_pages=max_adapter_pages,
                                   max_adapters_per_batch=max_adapters_per_batch,
                                   num_prefetch=num_prefetch, replica=r)
                         for r in range(num_replicas)]
        first = self.replicas[0]
        for rep in self.replicas[1:]:   # one table of live sequences, one set of cache stats
            rep._seqs, rep.prefix_stats = first._seqs, first.prefix_stats
        self.prefix_stats = first.prefix_stats
        self.allocator = _Pools(self.replicas)

    # -- request lifecycle (routed to the replica holding the sequence) -----------------------
    def add(self, seq: Sequence, now: float = 0.0) -> None:
        self.replicas[0].add(seq, now)   # the checks are the same for every replica

    def abort(self, seq_id: int) -> Sequence | None:
        seq = self.replicas[0]._seqs.get(seq_id)
        return None if seq is None else self.replicas[seq.replica].abort(seq_id)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.replicas[seq.replica].finish(seq, reason)

    def allocator_of(self, seq: Sequence):
        return self.replicas[seq.replica].allocator

    def evict_adapter(self, name: str) -> None:
        for rep in self.replicas:
            rep.evict_adapter(name)

    def forget_cached(self, adapter: str | None = None, *, everything: bool = False) -> int:
        return sum(rep.forget_cached(adapter, everything=everything) for rep in self.replicas)

    def prefix_cache_stats(self) -> dict:
        return self.prefix_stats.as_dict()

    @property
    def running(self) -> list[Sequence]:
        return [s for rep in self.replicas for s in rep.running]

    @property
    def num_forked_tokens(self) -> int:
        return sum(rep.num_forked_tokens for rep in self.replicas)

    @property
    def num_waiting(self) -> int:
        return len(self.policy)

    @property
    def has_work(self) -> bool:
        return any(rep.running for rep in self.replicas) or len(self.policy) > 0

    # -- planning -------------------------------------------------------------------------------
    def schedule(self, now: float = 0.0) -> ReplicaPlan:
        cfg = self.config
        plans = [StepPlan(is_prefill=not cfg.mixed_steps, decode=[], sampled=[])
                 for _ in self.replicas]
        budgets = []
        for rep, plan in zip(self.replicas, plans):
            budget = cfg.max_prefill_tokens
            if cfg.mixed_steps:
                rep._schedule_decode(plan)
                budget = min(budget, cfg.step_token_budget - len(plan.seqs))
            budgets.append(rep._continue_prefills(plan, budget))
        self._admit(plans, budgets, now)
        for r, (rep, plan) in enumerate(zip(self.replicas, plans)):
            if cfg.mixed_steps:
                plan.is_prefill = not plan.decode_indices() and bool(plan.seqs)
            elif not plan.seqs:    # prefill first, replica by replica, as alone
                plans[r] = plan = StepPlan(is_prefill=False, decode=[], sampled=[],
                                           preempted=plan.preempted)
                rep._schedule_decode(plan)
        if self.replicas[0].adapters is not None:
            self._prefetch()
            for rep, plan in zip(self.replicas, plans):
                rep._add_adapters(plan)
        return ReplicaPlan(plans)

    def _admit(self, plans: list[StepPlan], budgets: list[int], now: float) -> None:
        """Admit in the policy's order, each request on the first replica of `_placement`
        that takes it; stop at the first no replica takes (no skipping ahead)."""
        while True:
            seq = self.policy.peek()
            if seq is None or seq.num_pending_tokens:
                return
            order = self._placement(seq, budgets)
            parent = seq.fork_parent
            if order and parent is not None and parent.status is SequenceStatus.RUNNING \
                    and order[0] == parent.replica:
                order = order[:1]    # a sample waits for its sibling's pages, as alone
            for r in order:
                n = self.replicas[r]._admit(seq, plans[r], now, budgets[r])
                if n is not None:
                    budgets[r] -= n
                    break
            else:
                return

    def _placement(self, seq: Sequence, budgets: list[int]) -> list[int]:
        """The replicas with room this step, best first: the one running seq's sibling sample
        (its prompt pages are there), then those where its adapter is resident (no load, no
        second copy), then the least loaded (fewest running, most free pages)."""
        parent = seq.fork_parent
        sibling = (parent.replica if parent is not None
                   and parent.status is SequenceStatus.RUNNING else None)

        def rank(r: int):
            rep = self.replicas[r]
            resident = (seq.adapter is not None and rep.adapters is not None
                        and rep.adapters.is_resident(seq.adapter))
            return (r != sibling, not resident, len(rep.running), -rep.allocator.num_free, r)
        return sorted((r for r, rep in enumerate(self.replicas) if budgets[r] > 0 and rep.has_room),
                      key=rank)

    def _prefetch(self) -> None:
        """The waiting head's adapters, each prefetched into the free pages of the one replica
        it would be placed on (not into every replica)."""
        seen: list[str] = []
        head = self.policy.peek()
        for seq in itertools.chain([head] if head is not None else [], self.policy.waiting()):
            if len(seen) >= self.num_prefetch:
                break
            if seq.adapter is None or seq.adapter in seen:
                continue
            seen.append(seq.adapter)
            where = self._placement(seq, [1] * len(self.replicas)) or [0]
            if not self.replicas[where[0]].adapters.prefetch(seq.adapter):
                break

    # -- results --------------------------------------------------------------------------------
    def update(self, plan: ReplicaPlan, token_ids: list[int | None],
               now: float = 0.0) -> list[Sequence]:
        produced = []
        for rep, p, toks in zip(self.replicas, plan.plans, plan.split(token_ids)):
            produced += rep.update(p, toks, now)
        return produced
