"""Continuous batching over a paged KV pool.

Each engine step:
  1. `schedule()` returns a `StepPlan`: either a prefill step (new or partly prefilled
     requests, each with a chunk of its tokens) or a decode step (every running request,
     one token each). Prefill has priority, as in vLLM's default scheduler; long prompts are
     chunked to `max_prefill_tokens` per step.
  2. The runner executes the plan and samples one token for every sequence whose chunk
     reaches its last token.
  3. `update(plan, token_ids)` records computed tokens and appended outputs and charges the
     policy. It decides no finish: whoever reads the tokens (the engine's output processor,
     the simulator) calls `finish(seq, reason)`, which frees the sequence's pages.

Admission (`add`) refuses what can never run: more than `max_model_len` tokens of context or
more pages than the pool holds; the policy may refuse more (rate limits).

Pages: a request gets pages for its prompt at admission and one more page whenever decode
crosses a page boundary. When none is free, the most recently admitted running request is
preempted (its pages freed, its tokens kept) and re-queued; it is recomputed later.

LoRA adapters (optional, `adapter_pages=`): adapter weights take pages of the same pool
(`AdapterCache`). Admission pins the request's adapter (loading it, evicting unpinned adapters
LRU-first, if needed) before taking its KV pages; KV growth reclaims unpinned adapters before it
preempts anyone; the head of the queue gets its adapter prefetched into free pages. The plan
lists the loads the runner must perform and the pages of every adapter the step uses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from scheduler.adapter_cache import AdapterCache
from scheduler.block_allocator import BlockAllocator
from scheduler.policy import FCFSPolicy, Policy, RequestRejected
from scheduler.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    num_pages: int                 # pages in the device pool, page 0 reserved
    page_size: int = 16            # tokens per page
    max_num_seqs: int = 64         # running requests at once (the decode batch)
    max_prefill_tokens: int = 512  # tokens per prefill step (the chunk size)
    max_model_len: int = 2048      # prompt + output tokens per request

    def __post_init__(self):
        for name in ("num_pages", "page_size", "max_num_seqs", "max_prefill_tokens", "max_model_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass
class StepPlan:
    is_prefill: bool
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)   # tokens computed this step, per seq
    start_positions: list[int] = field(default_factory=list)  # position of each seq's first new token
    preempted: list[Sequence] = field(default_factory=list)   # preempted while planning this step
    adapter_loads: list[tuple[str, list[int]]] = field(default_factory=list)  # write before the step
    adapter_pages: dict[str, list[int]] = field(default_factory=dict)  # adapters this step uses

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def samples(self, i: int) -> bool:
        """True when sequence i's chunk ends at its last token, so a new token is sampled."""
        s = self.seqs[i]
        return self.start_positions[i] + self.num_new_tokens[i] == s.num_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, policy: Policy | None = None, *,
                 adapter_pages=None, max_adapter_pages: int | None = None,
                 max_adapters_per_batch: int | None = None, num_prefetch: int = 2):
        """adapter_pages: name -> pages its weights take (enables adapter accounting; without
        it `Sequence.adapter` is ignored). max_adapters_per_batch: distinct adapters running at
        once (the runner's slot count)."""
        self.config = config
        self.policy = policy if policy is not None else FCFSPolicy()  # an empty policy is falsy
        self.allocator = BlockAllocator(config.num_pages)
        self.adapters = (AdapterCache(self.allocator, adapter_pages, max_pages=max_adapter_pages)
                         if adapter_pages is not None else None)
        self.max_adapters_per_batch = max_adapters_per_batch
        self.num_prefetch = num_prefetch
        self.running: list[Sequence] = []          # in admission order (preempt from the back)
        self._seqs: dict[int, Sequence] = {}       # waiting + running, by id

    # -- request lifecycle -------------------------------------------------------------
    def add(self, seq: Sequence, now: float = 0.0) -> None:
        cfg = self.config
        if seq.seq_id in self._seqs:
            raise ValueError(f"duplicate sequence id {seq.seq_id}")
        if seq.max_total_tokens > cfg.max_model_len:
            raise RequestRejected(
                f"this model's maximum context length is {cfg.max_model_len} tokens, but "
                f"{seq.max_total_tokens} were requested ({seq.num_prompt_tokens} in the prompt, "
                f"{seq.max_tokens} for the completion)", code="context_length_exceeded")
        if self.pages_for(seq.max_total_tokens) > self.allocator.num_usable:
            raise RequestRejected(
                f"request needs {self.pages_for(seq.max_total_tokens)} KV pages, the pool has "
                f"{self.allocator.num_usable}")
        if self._uses_adapter(seq):
            total = self.pages_for(seq.max_total_tokens) + self.adapters.pages_needed(seq.adapter)
            cap = self.adapters.max_pages
            if total > self.allocator.num_usable or (
                    cap is not None and self.adapters.pages_needed(seq.adapter) > cap):
                raise RequestRejected(
                    f"request needs {total} pages (KV + adapter {seq.adapter!r}), the pool has "
                    f"{self.allocator.num_usable}" + (f", adapters may hold {cap}" if cap else ""))
        self.policy.add(seq, now)  # may raise RequestRejected
        seq.status = SequenceStatus.WAITING
        self._seqs[seq.seq_id] = seq

    def abort(self, seq_id: int) -> Sequence | None:
        seq = self._seqs.get(seq_id)
        if seq is None:
            return None
        if seq.status is SequenceStatus.WAITING:
            self.policy.remove(seq)
            self._release(seq, FinishReason.ABORT, notify_policy=False)
        else:
            self.finish(seq, FinishReason.ABORT)
        return seq

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """A running sequence is done (decided by the caller): free its pages and adapter."""
        if seq.status is SequenceStatus.FINISHED:
            return
        self.running.remove(seq)
        self._unpin_adapter(seq)
        self._release(seq, reason, notify_policy=True)

    def _release(self, seq: Sequence, reason: FinishReason, notify_policy: bool) -> None:
        self.allocator.free(seq.block_table)
        seq.block_table = []
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        del self._seqs[seq.seq_id]
        if notify_policy:
            self.policy.on_finish(seq)

    # -- planning ------------------------------------------------------------------------
    def pages_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.config.page_size)

    @property
    def num_waiting(self) -> int:
        return len(self.policy)

    @property
    def has_work(self) -> bool:
        return bool(self.running) or len(self.policy) > 0

    def schedule(self, now: float = 0.0) -> StepPlan:
        plan = self._schedule_prefill(now)
        if not plan.seqs:
            plan = self._schedule_decode()
        if self.adapters is not None:
            self._prefetch()
            plan.adapter_loads = self.adapters.drain_loads()
            plan.adapter_pages = {s.adapter: self.adapters.pages_of(s.adapter)
                                  for s in plan.seqs if self._uses_adapter(s)}
        return plan

    # -- adapters ---------------------------------------------------------------------------
    def _uses_adapter(self, seq: Sequence) -> bool:
        return self.adapters is not None and seq.adapter is not None

    def _can_take(self, num_pages: int) -> bool:
        """Free `num_pages` KV pages, evicting unpinned cached adapters if that is what it takes."""
        if not self.allocator.can_allocate(num_pages) and self.adapters is not None:
            self.adapters.reclaim(num_pages)
        return self.allocator.can_allocate(num_pages)

    def _pin_adapter(self, seq: Sequence, kv_pages: int) -> bool:
        """Pin seq's adapter (loading it if needed) when it and `kv_pages` KV pages both fit."""
        if not self._uses_adapter(seq):
            return True
        cache, name = self.adapters, seq.adapter
        pinned = cache.num_refs(name) > 0
        if (not pinned and self.max_adapters_per_batch is not None
                and len(cache._refs) >= self.max_adapters_per_batch):
            return False
        if not cache.is_resident(name) and (
                cache.pages_needed(name) + kv_pages
                > self.allocator.num_free + cache.num_evictable_pages):
            return False
        if not cache.acquire(name):
            return False
        if not self._can_take(kv_pages):
            cache.release(name)
            return False
        return True

    def _unpin_adapter(self, seq: Sequence) -> None:
        if self._uses_adapter(seq):
            self.adapters.release(seq.adapter)

    def _prefetch(self) -> None:
        head = self.policy.peek()
        names = [head.adapter] if head is not None and head.adapter is not None else []
        for seq in self.policy.waiting():
            if len(names) >= self.num_prefetch:
                break
            if seq.adapter is not None and seq.adapter not in names:
                names.append(seq.adapter)
        for name in names[:self.num_prefetch]:
            if not self.adapters.prefetch(name):
                break

    def _schedule_prefill(self, now: float) -> StepPlan:
        cfg = self.config
        plan = StepPlan(is_prefill=True)
        budget = cfg.max_prefill_tokens
        # Unfinished chunked prefills first: they already hold pages.
        for seq in self.running:
            if budget == 0:
                break
            if seq.is_prefilling:
                n = min(seq.num_tokens - seq.num_computed_tokens, budget)
                self._add_to_plan(plan, seq, n)
                budget -= n
        # Admit new requests in the policy's order; stop at the first that does not fit
        # (no skipping ahead, so the policy's order is the service order).
        while budget > 0 and len(self.running) < cfg.max_num_seqs:
            seq = self.policy.peek()
            if seq is None:
                break
            needed = self.pages_for(seq.num_tokens)
            if not self._pin_adapter(seq, needed):
                break
            if not self._can_take(needed):
                break
            self.policy.pop(seq, now)
            seq.block_table = self.allocator.allocate(needed)
            seq.status = SequenceStatus.RUNNING
            seq.num_computed_tokens = 0
            if seq.admit_time is None:
                seq.admit_time = now
            self.running.append(seq)
            n = min(seq.num_tokens, budget)
            self._add_to_plan(plan, seq, n)
            budget -= n
        return plan

    def _schedule_decode(self) -> StepPlan:
        plan = StepPlan(is_prefill=False)
        # Every running sequence writes K/V at position num_computed; grow its table if needed.
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            need = self.pages_for(seq.num_computed_tokens + 1) - len(seq.block_table)
            if need > 0 and not self._can_take(need):
                victim = self.running[-1]
                self._preempt(victim)
                plan.preempted.append(victim)
                if victim is seq:
                    break
                continue
            if need > 0:
                seq.block_table.extend(self.allocator.allocate(need))
            i += 1
        for seq in self.running:
            self._add_to_plan(plan, seq, 1)
        return plan

    def _add_to_plan(self, plan: StepPlan, seq: Sequence, n: int) -> None:
        plan.seqs.append(seq)
        plan.num_new_tokens.append(n)
        plan.start_positions.append(seq.num_computed_tokens)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._unpin_adapter(seq)
        self.allocator.free(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.policy.requeue(seq)

    # -- results ---------------------------------------------------------------------------
    def update(self, plan: StepPlan, token_ids: list[int | None], now: float = 0.0) -> list[Sequence]:
        """Record a finished step. `token_ids[i]` is the token sampled for plan.seqs[i], or None
        when its chunk did not reach the end. Returns the sequences that got a new token."""
        produced = []
        for i, seq in enumerate(plan.seqs):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted while the step ran
            seq.num_computed_tokens += plan.num_new_tokens[i]
            tok = token_ids[i]
            if tok is None:
                continue
            seq.output_token_ids.append(int(tok))
            if seq.first_token_time is None:
                seq.first_token_time = now
            produced.append(seq)
        self.policy.on_tokens(produced)
        return produced
