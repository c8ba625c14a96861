"""Discrete-event simulator: the real `Scheduler` and policy, with a step-time model instead
of a GPU.

Loop: add every request whose arrival time the clock has passed; ask the scheduler for a
plan; advance the clock by the cost model's time for that plan; report one (fake) token for
every sequence whose chunk reached its end. When nothing runs or waits, jump to the next
arrival. Each request ignores EOS and generates exactly its output length (max_tokens).
Service is recorded as it is delivered: w_p per prompt token when first prefilled (a
recomputed prefill is not service) and w_q per output token, into `bin_s`-wide time bins.

Prefix caching (`enable_prefix_caching`): prompts get token ids in which a request's shared
prefix (`Request.prefix_id`) is the same in every request that names it and every other token
is unique, so only shared prefixes hit. The scheduler prefills only what is not cached (the cost
model sees the computed tokens only); a prompt token served from cache counts as
`w_p * cached_token_weight` of service when its request is first admitted, what VTC charges
for it (build the policy with the same `cached_token_weight`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from scheduler.cost import DEFAULT_CACHED_TOKEN_WEIGHT
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
    enable_prefix_caching: bool = False
    cached_token_weight: float = DEFAULT_CACHED_TOKEN_WEIGHT  # service of a cached prompt token / w_p

    def __post_init__(self):
        if self.duration_s <= 0 or self.bin_s <= 0:
            raise ValueError("duration_s and bin_s must be positive")
        if not 0.0 <= self.cached_token_weight <= 1.0:
            raise ValueError(f"cached_token_weight must be in [0, 1], got {self.cached_token_weight}")
        if self.kv_capacity_tokens < self.page_size:
            raise ValueError("kv_capacity_tokens must hold at least one page")

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(num_pages=self.kv_capacity_tokens // self.page_size + 1,
                               page_size=self.page_size, max_num_seqs=self.max_num_seqs,
                               max_prefill_tokens=self.max_prefill_tokens,
                               max_model_len=self.kv_capacity_tokens,
                               enable_prefix_caching=self.enable_prefix_caching)


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
    prefill_tokens: dict[str, int] = field(default_factory=dict)  # per client, prefill computed
    cached_tokens: dict[int, int] = field(default_factory=dict)   # seq_id -> prompt tokens from
    #                                                  cache at its first admission (admitted only)
    prefix_cache: dict = field(default_factory=dict)   # the scheduler's prefix_cache_stats()

    def prompt_tokens_admitted(self, client: str | None = None) -> tuple[int, int]:
        """(prompt tokens, of which served from cache) over the requests admitted so far."""
        total = cached = 0
        for s in self.seqs:
            if s.seq_id in self.cached_tokens and (client is None or s.client_id == client):
                total += s.num_prompt_tokens
                cached += self.cached_tokens[s.seq_id]
        return total, cached

    def hit_rate(self, client: str | None = None) -> float:
        """Prompt tokens served from cache / prompt tokens of admitted requests."""
        total, cached = self.prompt_tokens_admitted(client)
        return cached / total if total else 0.0


class PromptTokens:
    """Token ids for simulated prompts; they matter only to the prefix cache's hashes. The
    first `prefix_tokens` ids of a request with a `prefix_id` are that prefix's (the same in
    every request naming it; a longer request of the same id extends it), every other id is
    fresh, so no two requests share anything else."""

    def __init__(self):
        self._next = 1
        self._prefixes: dict[str, list[int]] = {}

    def _fresh(self, n: int) -> list[int]:
        ids = list(range(self._next, self._next + n))
        self._next += n
        return ids

    def build(self, r: Request) -> list[int]:
        ids: list[int] = []
        if r.prefix_id is not None and r.prefix_tokens > 0:
            p = self._prefixes.setdefault(r.prefix_id, [])
            if len(p) < r.prefix_tokens:
                p.extend(self._fresh(r.prefix_tokens - len(p)))
            ids = p[:r.prefix_tokens]
        return ids + self._fresh(r.prompt_tokens - len(ids))


StepHook = Callable[[float, StepPlan, Scheduler], None]


def simulate(requests: list[Request], policy: Policy, config: SimConfig = SimConfig(),
             cost_model: CostModel = CostModel(), on_step: StepHook | None = None,
             on_plan: StepHook | None = None) -> SimResult:
    """Run `requests` (sorted by arrival) through a Scheduler driven by `policy`.
    `on_plan(now, plan, scheduler)` sees each plan before it runs; `on_step(now, plan,
    scheduler)` is called after the step's results are recorded (both for tests)."""
    sc = config.scheduler_config()
    _check_cached_weight(policy, config)
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
    prompt_ids = PromptTokens()
    cached_w = config.w_p * config.cached_token_weight
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
            # (without caching the ids are never read: skip building unique ones)
            ids = (prompt_ids.build(r) if config.enable_prefix_caching or r.prefix_id is not None
                   else [0] * r.prompt_tokens)
            seq = Sequence(seq_id=i, prompt_token_ids=ids,
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
                c = seq.client_id
                res.prefill_tokens[c] = res.prefill_tokens.get(c, 0) + plan.num_new_tokens[j]
                if seq.seq_id not in res.cached_tokens:  # its first admission
                    hit = seq.num_cached_tokens if config.enable_prefix_caching else 0
                    res.cached_tokens[seq.seq_id] = hit
                    prompt_done[seq.seq_id] = hit
                    service[c][b] += cached_w * hit
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
    if config.enable_prefix_caching:
        res.prefix_cache = sched.prefix_cache_stats()
    return res


def _check_cached_weight(policy: Policy, config: SimConfig) -> None:
    """A VTC policy charging cached tokens at another weight than the service recorded would
    make the measured fairness disagree with the counters."""
    w = getattr(getattr(policy, "inner", policy), "cached_token_weight", None)
    if config.enable_prefix_caching and w is not None and w != config.cached_token_weight:
        raise ValueError(f"the policy charges cached tokens at weight {w}, the simulator's "
                         f"cached_token_weight is {config.cached_token_weight}: make them equal")
