"""Continuous batching over a paged KV pool.

Each engine step:
  1. `schedule()` returns a `StepPlan`. Mixed steps (`mixed_steps`, the engine's default): every
     running request that is decoding gets one token, and the rest of the step's token budget
     (`max_num_batched_tokens`, at most `max_prefill_tokens` of it for prompts) goes to prefill
     chunks -- unfinished chunked prefills first, then new requests in the policy's order -- so
     an arrival never pauses the streams already running. Without mixed steps a step is either
     a prefill step (prefill has priority, as in vLLM's V0 scheduler) or a decode step.
  2. Planning advances each planned sequence's `num_computed_tokens` and, where the chunk
     reaches its last token, counts one pending token (`num_pending_tokens`): the engine may
     plan the next step before this one's tokens are known (overlapped steps); a decode whose
     input token is pending takes it on the device.
  3. The runner executes the plan and samples one token for every sequence whose chunk
     reaches its last token.
  4. `update(plan, token_ids)` records the sampled tokens and charges the policy. It decides no
     finish: whoever reads the tokens (the engine's output processor, the simulator) calls
     `finish(seq, reason)`, which frees the sequence's pages. A sequence that finished while a
     later step was already planned has that step's token dropped.

Admission (`add`) refuses what can never run: more than `max_model_len` tokens of context or
more pages than the pool holds; the policy may refuse more (rate limits).

Pages: a request gets pages for its prompt at admission and one more page whenever decode
crosses a page boundary. When none is free, the most recently admitted running request is
preempted (its pages freed, its tokens kept) and re-queued; it is recomputed later.

Prefix caching (`enable_prefix_caching`): the full pages of every request are named by chained
hashes (scheduler/prefix_cache.py) and registered in the allocator once a step has written
them; admission reuses the longest cached chain of the request's tokens (never the page that
holds its last token: that token is computed to give logits) and prefills only the rest, so a
preempted request also resumes from its own pages if they are still cached. Pages are
reference-counted; a cached page nobody holds stays in the pool until an allocation needs it
(BlockAllocator: least recently released first, a request's tail before its head).

Samples (n / best_of): the samples of one prompt are sequences of their own, the first one
admitted as any request, each other one with `fork_parent` set to it. Such a sample starts from
its parent's full prompt pages (referenced once more, shared; never the page holding the last
prompt token, which each sample computes itself to sample its own first token), so a prompt of
P tokens is computed once plus at most `page_size` tokens per further sample. It waits at the
head of the queue while its parent is still planning those pages (a parent chunk planned in the
same step may run in a later device call than the sample's); when the parent is not running
(waiting, finished) the sample is admitted as any request (prefix cache, else computed whole).
Its shared prompt tokens count as cached ones for fairness (`num_cached_tokens`).

Prompt logprobs (`needs_prompt_scores`): such a sequence takes no cached or shared pages until
it has its first token, so every prompt position is computed (and scored) by its own steps.

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
from scheduler.prefix_cache import PrefixCacheStats, extend_hashes
from scheduler.sequence import FinishReason, Sequence, SequenceStatus


EVICTION_ORDERS = ("prefix-first", "adapters-first")


@dataclass(frozen=True)
class SchedulerConfig:
    num_pages: int                 # pages in the device pool, page 0 reserved
    page_size: int = 16            # tokens per page
    max_num_seqs: int = 64         # running requests at once (the decode batch)
    max_prefill_tokens: int = 512  # tokens per prefill step (the chunk size)
    max_model_len: int = 2048      # prompt + output tokens per request
    # Decodes and prefill chunks in one step (see the module docstring); off: prefill-first.
    mixed_steps: bool = False
    # Mixed steps: tokens per step, decodes (one each) first, prefill chunks the rest (at most
    # max_prefill_tokens). None = max_prefill_tokens + max_num_seqs: decodes never shorten the
    # prefill chunk. Lower it to shorten steps that carry a prefill (the running streams'
    # inter-token latency) at the cost of slower prefills (time to first token).
    max_num_batched_tokens: int | None = None
    # Reuse the K/V of cached prompt prefixes (see the module docstring).
    enable_prefix_caching: bool = False
    # What an allocation takes first when no page is free: "adapters-first" evicts idle
    # adapters before cached prefix pages, "prefix-first" the reverse. Per page, reloading an
    # adapter is a copy while a prefix page is page_size tokens of prefill to recompute
    # (docs/architecture.md, "Prefix caching", has the measurement).
    cache_eviction_order: str = "adapters-first"

    def __post_init__(self):
        for name in ("num_pages", "page_size", "max_num_seqs", "max_prefill_tokens", "max_model_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens <= 0:
            raise ValueError("max_num_batched_tokens must be positive, got "
                             f"{self.max_num_batched_tokens}")
        if self.cache_eviction_order not in EVICTION_ORDERS:
            raise ValueError(f"cache_eviction_order must be one of {EVICTION_ORDERS}, got "
                             f"{self.cache_eviction_order!r}")

    @property
    def step_token_budget(self) -> int:
        return (self.max_num_batched_tokens if self.max_num_batched_tokens is not None
                else self.max_prefill_tokens + self.max_num_seqs)


@dataclass
class StepPlan:
    is_prefill: bool = False   # the kind of every entry, unless `decode` says per entry
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)   # tokens computed this step, per seq
    start_positions: list[int] = field(default_factory=list)  # position of each seq's first new token
    preempted: list[Sequence] = field(default_factory=list)   # preempted while planning this step
    adapter_loads: list[tuple[str, list[int]]] = field(default_factory=list)  # write before the step
    adapter_pages: dict[str, list[int]] = field(default_factory=dict)  # adapters this step uses
    decode: list[bool] | None = None     # per entry: a decode (else a prefill chunk); mixed steps
    sampled: list[bool] | None = None    # per entry: samples a token (set when planned)
    # per entry: the sequence's preemption count when planned (a sequence preempted and
    # re-admitted since has other pages, which this step does not write)
    epochs: list[int] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def samples(self, i: int) -> bool:
        """True when sequence i's chunk ends at its last token, so a new token is sampled."""
        if self.sampled is not None:
            return self.sampled[i]
        s = self.seqs[i]
        return self.start_positions[i] + self.num_new_tokens[i] == s.num_total_tokens

    def is_decode(self, i: int) -> bool:
        return (not self.is_prefill) if self.decode is None else self.decode[i]

    def decode_indices(self) -> list[int]:
        return [i for i in range(len(self.seqs)) if self.is_decode(i)]

    def prefill_indices(self) -> list[int]:
        return [i for i in range(len(self.seqs)) if not self.is_decode(i)]

    @property
    def has_prefill(self) -> bool:
        return any(not self.is_decode(i) for i in range(len(self.seqs)))

    @property
    def num_prefill_tokens(self) -> int:
        return sum(n for i, n in enumerate(self.num_new_tokens) if not self.is_decode(i))


class Scheduler:
    def __init__(self, config: SchedulerConfig, policy: Policy | None = None, *,
                 adapter_pages=None, max_adapter_pages: int | None = None,
                 max_adapters_per_batch: int | None = None, num_prefetch: int = 2,
                 replica: int = 0):
        """adapter_pages: name -> pages its weights take (enables adapter accounting; without
        it `Sequence.adapter` is ignored). max_adapters_per_batch: distinct adapters running at
        once (the runner's slot count). replica: this pool's index among data-parallel
        replicas planned together (scheduler/replicas.py); 0 alone."""
        self.config, self.replica = config, replica
        self.policy = policy if policy is not None else FCFSPolicy()  # an empty policy is falsy
        self.allocator = BlockAllocator(config.num_pages)
        self.adapters = (AdapterCache(self.allocator, adapter_pages, max_pages=max_adapter_pages,
                                      adapters_first=config.cache_eviction_order == "adapters-first")
                         if adapter_pages is not None else None)
        self.prefix_stats = PrefixCacheStats()
        self.num_forked_tokens = 0    # prompt tokens samples took from a sibling's pages
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
        if seq.status is SequenceStatus.WAITING:
            # preempted after a step that sampled its last token was planned
            self.policy.remove(seq)
            self._release(seq, reason, notify_policy=True)
            return
        self.running.remove(seq)
        self._unpin_adapter(seq)
        self._release(seq, reason, notify_policy=True)

    def _release(self, seq: Sequence, reason: FinishReason, notify_policy: bool) -> None:
        self._free_pages(seq)
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
        cfg = self.config
        if cfg.mixed_steps:
            plan = StepPlan(decode=[], sampled=[])
            self._schedule_decode(plan)
            budget = min(cfg.max_prefill_tokens, cfg.step_token_budget - len(plan.seqs))
            self._schedule_prefill(plan, now, budget)
            plan.is_prefill = not plan.decode_indices() and bool(plan.seqs)
        else:
            plan = StepPlan(is_prefill=True, decode=[], sampled=[])
            self._schedule_prefill(plan, now, cfg.max_prefill_tokens)
            if not plan.seqs:
                preempted = plan.preempted
                plan = StepPlan(is_prefill=False, decode=[], sampled=[], preempted=preempted)
                self._schedule_decode(plan)
        if self.adapters is not None:
            self._prefetch()
            self._add_adapters(plan)
        return plan

    def _add_adapters(self, plan: StepPlan) -> None:
        """The adapter loads the step must write first, and the pages of those it uses."""
        plan.adapter_loads = self.adapters.drain_loads()
        plan.adapter_pages = {s.adapter: self.adapters.pages_of(s.adapter)
                              for s in plan.seqs if self._uses_adapter(s)}

    # -- adapters ---------------------------------------------------------------------------
    def _uses_adapter(self, seq: Sequence) -> bool:
        return self.adapters is not None and seq.adapter is not None

    def _can_take(self, num_pages: int) -> bool:
        """Free `num_pages` KV pages, evicting unpinned cached adapters if that is what it takes
        (adapters first: before any cached prefix page is taken)."""
        if self.adapters is not None:
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

    def evict_adapter(self, name: str) -> None:
        """Drop an (unpinned) adapter from the pool: it is being removed."""
        if self.adapters is not None:
            self.adapters.evict(name)

    def allocator_of(self, seq: Sequence) -> BlockAllocator:
        """The allocator holding seq's pages (one pool here; per replica in ReplicaScheduler)."""
        return self.allocator

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

    def _schedule_prefill(self, plan: StepPlan, now: float, budget: int) -> None:
        budget = self._continue_prefills(plan, budget)
        # Admit new requests in the policy's order; stop at the first that does not fit
        # (no skipping ahead, so the policy's order is the service order).
        while budget > 0 and self.has_room:
            seq = self.policy.peek()
            if seq is None or seq.num_pending_tokens:
                # (a preempted sequence whose last token is still being sampled resumes once
                # the host knows it: at most one step later)
                break
            n = self._admit(seq, plan, now, budget)
            if n is None:
                break
            budget -= n

    @property
    def has_room(self) -> bool:
        """Another request may run (the batch is not full)."""
        return len(self.running) < self.config.max_num_seqs

    def _continue_prefills(self, plan: StepPlan, budget: int) -> int:
        """Plan unfinished chunked prefills (they already hold pages); returns the budget left."""
        for seq in self.running:
            if budget <= 0:
                break
            if seq.is_prefilling:
                n = min(seq.num_total_tokens - seq.num_computed_tokens, budget)
                self._add_to_plan(plan, seq, n, decode=False)
                budget -= n
        return budget

    def _admit(self, seq: Sequence, plan: StepPlan, now: float, budget: int) -> int | None:
        """Admit the policy's head `seq` into this pool and plan its first chunk (at most
        `budget` tokens); returns the tokens planned, or None when it does not fit (nothing
        taken)."""
        cfg = self.config
        # cached (or a sibling's) pages are taken (referenced) first, so nothing below
        # evicts them
        hit, forked = self._reused_pages(seq, plan)
        if hit is None:     # a sample waits for its sibling's prompt pages
            return None
        needed = self.pages_for(seq.num_tokens) - len(hit)
        # (_pin_adapter checks the KV pages fit with the adapter, and unpins on failure)
        if not (self._pin_adapter(seq, needed) and self._can_take(needed)):
            self.allocator.free(hit[::-1])
            return None
        num_hit = len(hit) * cfg.page_size
        if forked:
            self.num_forked_tokens += num_hit
        elif cfg.enable_prefix_caching and not seq.needs_prompt_scores:
            self.prefix_stats.record(seq.adapter, seq.num_tokens, num_hit)
        if not seq.is_prefill_charged:
            seq.num_cached_tokens = min(num_hit, seq.num_prompt_tokens)
        self.policy.pop(seq, now)
        seq.block_table = hit + self.allocator.allocate(needed)
        # (a sibling's pages are registered by it, or by this sample: register() keeps
        # the first)
        seq.num_registered_pages = 0 if forked else len(hit)
        seq.status = SequenceStatus.RUNNING
        seq.replica = self.replica
        seq.num_computed_tokens = num_hit
        if seq.admit_time is None:
            seq.admit_time = now
        self.running.append(seq)
        n = min(seq.num_tokens - num_hit, budget)
        self._add_to_plan(plan, seq, n, decode=False)
        return n

    @staticmethod
    def _decodes(seq: Sequence) -> bool:
        """A running sequence takes a decode this step: its prompt is in the pool and it may
        still produce a token (one whose pending tokens reach max_tokens will finish with them)."""
        return (not seq.is_prefilling
                and seq.num_output_tokens + seq.num_pending_tokens < seq.max_tokens)

    def _schedule_decode(self, plan: StepPlan) -> None:
        # Every decoding sequence writes K/V at position num_computed; grow its table if needed.
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if not self._decodes(seq):
                i += 1
                continue
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
            if self._decodes(seq):
                self._add_to_plan(plan, seq, 1, decode=True)

    def _add_to_plan(self, plan: StepPlan, seq: Sequence, n: int, decode: bool) -> None:
        start = seq.num_computed_tokens
        samples = start + n == seq.num_total_tokens
        plan.seqs.append(seq)
        plan.num_new_tokens.append(n)
        plan.start_positions.append(start)
        plan.decode.append(decode)
        plan.sampled.append(samples)
        plan.epochs.append(seq.num_preemptions)
        seq.num_computed_tokens += n
        if samples:
            seq.num_pending_tokens += 1

    # -- prefix caching and samples ---------------------------------------------------------
    def _reused_pages(self, seq: Sequence, plan: StepPlan) -> tuple[list[int] | None, bool]:
        """(pages seq starts from, referenced for it; whether they are its parent sample's),
        or (None, False) when seq is a sample that must wait for its parent's prompt pages."""
        if seq.needs_prompt_scores and not seq.output_token_ids:
            return [], False
        parent = seq.fork_parent
        if (parent is not None and parent.status is SequenceStatus.RUNNING
                and parent.replica == self.replica):
            S = self.config.page_size
            k = min(seq.num_prompt_tokens, seq.num_tokens - 1) // S
            if k > 0:
                # the parent's chunks writing those pages must have been planned in an earlier
                # step: a later device call of this step could run before the sample's
                pending = parent.num_computed_tokens < k * S or any(
                    s is parent and not plan.is_decode(i) and plan.start_positions[i] < k * S
                    for i, s in enumerate(plan.seqs))
                if pending:
                    return None, False
                pages = parent.block_table[:k]
                self.allocator.share(pages)
                return pages, True
        return self._take_cached_prefix(seq), False

    def _take_cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached pages of seq's longest cached prefix, referenced for it; at most up to the
        page before the one holding its last token (which must be computed)."""
        if not self.config.enable_prefix_caching:
            return []
        limit = (seq.num_tokens - 1) // self.config.page_size
        hit = self.allocator.lookup(extend_hashes(seq, self.config.page_size, limit)[:limit])
        self.allocator.acquire(hit)
        return hit

    def _register_pages(self, seq: Sequence, written: int) -> None:
        """Register seq's full pages whose K/V the device has written (positions < `written`,
        by the step being recorded; later planned steps may not have run) and whose tokens the
        host knows, so later requests can reuse them."""
        S = self.config.page_size
        n = min(written, seq.num_tokens) // S
        if n <= seq.num_registered_pages:
            return
        hashes = extend_hashes(seq, S, n)
        for i in range(seq.num_registered_pages, n):
            self.allocator.register(seq.block_table[i], hashes[i], seq.adapter)
        seq.num_registered_pages = n

    def _free_pages(self, seq: Sequence) -> None:
        # tail first: with equal recency a chain's leaves are evicted before its head
        self.allocator.free(seq.block_table[::-1])
        seq.block_table = []
        seq.num_registered_pages = 0

    def forget_cached(self, adapter: str | None = None, *, everything: bool = False) -> int:
        """Drop the cached prefixes computed under `adapter` (it is being removed; a new adapter
        of that name has other weights), or every cached prefix. Pages in use stay with
        their requests. Returns the pages forgotten."""
        return self.allocator.uncache(adapter, everything=everything)

    def prefix_cache_stats(self) -> dict:
        return self.prefix_stats.as_dict()

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._unpin_adapter(seq)
        self._free_pages(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.policy.requeue(seq)

    # -- results ---------------------------------------------------------------------------
    def update(self, plan: StepPlan, token_ids: list[int | None], now: float = 0.0) -> list[Sequence]:
        """Record a finished step. `token_ids[i]` is the token sampled for plan.seqs[i], or None
        when its chunk did not reach the end. Returns the sequences that got a new token: those
        still running, and those preempted after this step was planned (their token stands;
        they recompute from it). A finished or aborted sequence's token is dropped."""
        produced = []
        # prefix caching: pages this step filled (a decode fills one every page_size steps)
        page = self.config.page_size if self.config.enable_prefix_caching else 0
        for i, seq in enumerate(plan.seqs):
            written = plan.start_positions[i] + plan.num_new_tokens[i]
            if (page and written >= (seq.num_registered_pages + 1) * page
                    and seq.status is SequenceStatus.RUNNING and i < len(plan.epochs)
                    and plan.epochs[i] == seq.num_preemptions):
                self._register_pages(seq, written)
            if not plan.samples(i):
                continue
            seq.num_pending_tokens -= 1
            tok = token_ids[i]
            if seq.status is SequenceStatus.FINISHED or tok is None:
                continue
            seq.output_token_ids.append(int(tok))
            if seq.first_token_time is None:
                seq.first_token_time = now
            produced.append(seq)
        self.policy.on_tokens(produced)
        return produced
