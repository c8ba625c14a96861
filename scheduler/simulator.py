"""Discrete-event simulator: the real `Scheduler` and policy, with a step-time model instead
of a GPU.

Loop: add every request whose arrival time the clock has passed; ask the scheduler for a
plan; advance the clock by the cost model's time for that plan; report one (fake) token for
every sequence whose chunk reached its end. When nothing runs or waits, jump to the next
arrival. Each request ignores EOS and generates exactly its output length (max_tokens).
Service is recorded as it is delivered: w_p per prompt token when first prefilled (a
recomputed prefill is not service) and w_q per output token, into `bin_s`-wide time bins.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from scheduler.cost_model import CostModel
from scheduler.policy import Policy, RequestRejected
from scheduler.predict import TRUE_OUTPUT_LEN
from scheduler.reserve import OutputReservation
from scheduler.scheduler import Scheduler, SchedulerConfig, StepPlan
from scheduler.sequence import FinishReason, Sequence
from scheduler.workload import Request


@dataclass(frozen=True)
class SimConfig:
    duration_s: float = 600.0          # the clock stops here (requests still queued are unserved)
    kv_capacity_tokens: int = 10000    # M in the paper
    page_size: int = 16
    max_num_seqs: int = 256
    max_prefill_tokens: int = 4096
    is_reserve_output: bool = True     # admit only if prompt + max output fit (the artifact's rule)
    w_p: float = 1.0                   # service weights for the measurements
    w_q: float = 2.0
    bin_s: float = 1.0                 # resolution of the recorded service curves

    def __post_init__(self):
        if self.duration_s <= 0 or self.bin_s <= 0:
            raise ValueError("duration_s and bin_s must be positive")
        if self.kv_capacity_tokens < self.page_size:
            raise ValueError("kv_capacity_tokens must hold at least one page")

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(num_pages=self.kv_capacity_tokens // self.page_size + 1,
                               page_size=self.page_size, max_num_seqs=self.max_num_seqs,
                               max_prefill_tokens=self.max_prefill_tokens,
                               max_model_len=self.kv_capacity_tokens)


@dataclass
class SimResult:
    config: SimConfig
    clients: list[str]                          # in first-arrival order
    service: dict[str, list[float]]             # per client, service delivered per bin
    backlogged_s: dict[str, list[float]]        # per client, seconds with a waiting request per bin
    seqs: list[Sequence]                        # every accepted request
    finish_time: dict[int, float]               # seq_id -> time it finished
    rejected: dict[str, int]                    # per client, requests refused at arrival
    num_steps: int = 0
    busy_s: float = 0.0                         # clock time spent in steps
    end_s: float = 0.0
    policy_stats: dict = field(default_factory=dict)


StepHook = Callable[[float, StepPlan, Scheduler], None]


def simulate(requests: list[Request], policy: Policy, config: SimConfig = SimConfig(),
             cost_model: CostModel = CostModel(), on_step: StepHook | None = None,
             on_plan: StepHook | None = None) -> SimResult:
    """Run `requests` (sorted by arrival) through a Scheduler driven by `policy`.
    `on_plan(now, plan, scheduler)` sees each plan before it runs; `on_step(now, plan,
    scheduler)` is called after the step's results are recorded (both for tests)."""
    sc = config.scheduler_config()
    if config.is_reserve_output:
        policy = OutputReservation(policy, sc.page_size, sc.num_pages - 1)
    sched = Scheduler(sc, policy)
    num_bins = math.ceil(config.duration_s / config.bin_s)
    clients: list[str] = []
    service: dict[str, list[float]] = {}
    backlogged: dict[str, list[float]] = {}
    num_waiting: dict[str, int] = {}
    res = SimResult(config, clients, service, backlogged, [], {}, {})
    waiting_ids: set[int] = set()
    prompt_done: dict[int, int] = {}    # seq_id -> prompt tokens already counted as service
    now, i, n = 0.0, 0, len(requests)

    def bin_of(t: float) -> int:
        return min(int(t / config.bin_s), num_bins - 1)

    while now < config.duration_s:
        while i < n and requests[i].arrival_s <= now:
            r = requests[i]
            if r.client not in service:
                clients.append(r.client)
                service[r.client] = [0.0] * num_bins
                backlogged[r.client] = [0.0] * num_bins
                num_waiting[r.client] = 0
            seq = Sequence(seq_id=i, prompt_token_ids=[0] * r.prompt_tokens,
                           max_tokens=r.output_tokens, client_id=r.client, arrival_time=r.arrival_s)
            seq.extra[TRUE_OUTPUT_LEN] = r.output_tokens
            try:
                sched.add(seq, r.arrival_s)
                res.seqs.append(seq)
                waiting_ids.add(seq.seq_id)
                num_waiting[r.client] += 1
            except RequestRejected:
                res.rejected[r.client] = res.rejected.get(r.client, 0) + 1
            i += 1
        if not sched.has_work:
            if i >= n:
                break
            now = requests[i].arrival_s
            continue
        plan = sched.schedule(now)
        if plan.is_empty:
            raise RuntimeError("scheduler produced an empty plan while work remains (a request "
                               "that can never fit was accepted)")
        if on_plan is not None:
            on_plan(now, plan, sched)
        for seq in plan.preempted:
            waiting_ids.add(seq.seq_id)
            num_waiting[seq.client_id] += 1
        for j, seq in enumerate(plan.seqs):
            if not plan.is_decode(j):
                if seq.seq_id in waiting_ids:
                    waiting_ids.discard(seq.seq_id)
                    num_waiting[seq.client_id] -= 1
        dt = cost_model.step_time(plan)
        b0 = bin_of(now)
        for c, k in num_waiting.items():
            if k:
                backlogged[c][b0] += dt
        now += dt
        res.busy_s += dt
        res.num_steps += 1
        b = bin_of(now)
        tokens: list[int | None] = []
        for j, seq in enumerate(plan.seqs):
            if not plan.is_decode(j):
                hi = min(plan.start_positions[j] + plan.num_new_tokens[j], seq.num_prompt_tokens)
                done = prompt_done.get(seq.seq_id, 0)
                if hi > done:
                    service[seq.client_id][b] += config.w_p * (hi - done)
                    prompt_done[seq.seq_id] = hi
            tokens.append(1 if plan.samples(j) else None)
        for seq in sched.update(plan, tokens, now):
            service[seq.client_id][b] += config.w_q
            if seq.num_output_tokens >= seq.max_tokens:  # no text here: length is the only stop
                sched.finish(seq, FinishReason.LENGTH)
                res.finish_time[seq.seq_id] = now
        if on_step is not None:
            on_step(now, plan, sched)
    res.end_s = min(now, config.duration_s)
    res.policy_stats = policy.stats()
    return res
