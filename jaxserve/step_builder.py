"""Plan -> padded step arrays, on the host (numpy only; imports no JAX).

A scheduler `StepPlan` becomes one or more `BuiltStep`s, each one device call: the batch rows
of its sequences, arrays padded to shape buckets (so only a small set of programs is ever
compiled), the sampling inputs and the LoRA slots. The executor (jaxserve/runner.py) turns a
BuiltStep into device inputs and runs it; nothing of a step is kept anywhere else.

Buckets (the bounded set `StepBuilder.shapes()` lists; docs/architecture.md gives its size):
  decode rows        powers of two up to max_num_seqs (at least the backend's min_decode_rows)
  prefill rows       1, 2, 3, 4, 6, 8, 12, ... (`fine_bucket`) up to max_num_seqs
  prefill tokens     16, 24, 32, 48, ... up to max_prefill_tokens, with rows x tokens at most
                     max_prefill_tokens rounded up to a power of two (`prefill_slots`)
  pages per sequence 1, 2, 3, 4, 6, 8, 12, 16, then powers of two (`pages_bucket`); one width,
                     the longest, where the backend's attention reads only up to each row's
                     kv_len (padding costs it nothing); a prefill's pages end at its chunk's end
  LoRA               the rank bucket and module set of jaxserve/lora/slots.py
A prefill mixing chunk lengths is split into calls of similar lengths (`prefill_groups`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from jaxserve.sampling_params import MAX_BANS, MAX_LOGIT_BIAS, PROMPT_BIT
from scheduler import SequenceStatus, StepPlan


def targets_for(prompt_ids, start: int, num: int) -> np.ndarray:
    """Prompt logprobs' score targets of positions start .. start+num-1 of a sequence with
    prompt `prompt_ids`: the next prompt token, or -1 past the prompt's second to last position."""
    out = np.full((num,), -1, np.int32)
    end = min(start + num, len(prompt_ids) - 1)
    if end > start:
        out[:end - start] = prompt_ids[start + 1:end + 1]
    return out


def pow2_at_least(n: int, lo: int = 1) -> int:
    """The smallest power of two >= max(n, lo, 1)."""
    return max(lo, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def bucket(n: int, cap: int, lo: int = 1) -> int:
    """Smallest power of two >= n (and >= lo), but never above cap (cap itself is a bucket)."""
    return min(pow2_at_least(n, lo), cap)


def fine_bucket(n: int, cap: int, lo: int = 1) -> int:
    """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and 1.5x powers of two)
    >= max(n, lo), never above cap: padding stays under a third of the bucket instead of half.
    Used for pages per sequence (attention reads every bucketed page of every row) and for the
    rows and tokens of prefill calls (compute-bound, so padded tokens cost as much as real ones)."""
    n = max(n, lo)
    p = pow2_at_least(n)
    if p >= 4 and n <= 3 * p // 4:
        p = 3 * p // 4
    return min(p, cap)


# What one extra prefill call costs beyond its tokens, in tokens: a call streams every weight
# once whatever its size (docs/benchmarks.md has the measurement behind it).
PREFILL_CALL_COST_TOKENS = 48


def prefill_groups(chunks: list[int], token_bucket, row_bucket,
                   call_cost: int = PREFILL_CALL_COST_TOKENS,
                   max_slots: int | None = None) -> list[list[int]]:
    """Split one prefill step's sequences into device calls that cost the least in total.

    A call pads every row to its bucketed longest chunk (mixing a 36-token chunk with a
    133-token one computes 2 x 256 token slots for 169 tokens), and each call also costs
    `call_cost` token slots of its own. With the sequences sorted by chunk length, the best
    split into runs of neighbours is found exactly by dynamic programming over
    cost(run) = call_cost + row_bucket(rows) x token_bucket(longest chunk).
    A run whose rows x tokens bucket exceeds `max_slots` is not a call (one sequence alone
    always is: the callers' token buckets stay within it). Returns index lists, longest chunks
    first.
    """
    order = sorted(range(len(chunks)), key=lambda i: -chunks[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n      # best[j]: cheapest split of the first j sequences
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            slots = row_bucket(j - i) * token_bucket(chunks[order[i]])
            if max_slots is not None and slots > max_slots and j - i > 1:
                continue
            c = best[i] + call_cost + slots
            if c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


@dataclass
class LoraSlots:
    """A step's adapter slots: one per batch row (S = B), jaxserve/lora/slots.py."""
    idx: np.ndarray          # [B*T] int32: each token's slot, -1 = base model
    pages: tuple             # per module: [B, pages of a rank-max_rank projection] int32
    ranks: np.ndarray        # [L, len(modules), B] int32 (0 for base-model rows)
    scales: np.ndarray       # [L, len(modules), B] float32
    modules: tuple           # projections some adapter of the step adapts
    max_rank: int            # rows gathered per slot (the step's rank bucket)
    row_keys: list           # per row: (adapter, load generation) or None: what the row holds


@dataclass
class BuiltStep:
    """One device call: padded arrays for `seqs` (indices into the plan) in batch rows `rows`."""
    is_prefill: bool
    seqs: list[int]          # plan indices of this call's sequences
    rows: list[int]          # batch row of each
    samples: list[bool]      # whether each samples a token (its chunk reaches its last token)
    tokens: np.ndarray       # [B, T] int32
    positions: np.ndarray    # [B, T] int32, -1 for padding
    block_tables: np.ndarray  # [B, P] int32, 0 (the null page) for unused entries
    kv_lens: np.ndarray      # [B] int32
    slot_pages: np.ndarray   # [B*T] int32
    slot_offsets: np.ndarray  # [B*T] int32
    logits_index: np.ndarray  # [B] int32
    temperature: np.ndarray  # [B] float32
    top_k: np.ndarray        # [B] int32
    top_p: np.ndarray        # [B] float32
    seeds: np.ndarray        # [B] uint32
    counters: np.ndarray     # [B] int32: output tokens so far (the sampling key's counter)
    want_logprobs: bool
    lora: LoraSlots | None = None
    # (row, seq_id) of decodes whose input token was sampled by the previous step and is not
    # known on the host yet (tokens[row] is 0): the executor takes it on the device
    from_device: list = field(default_factory=list)
    # The full sampling set (jaxserve/sampling.py has what each means on the device)
    min_p: np.ndarray | None = None        # [B] float32
    presence: np.ndarray | None = None     # [B] float32
    frequency: np.ndarray | None = None    # [B] float32
    repetition: np.ndarray | None = None   # [B] float32
    pen_slots: np.ndarray | None = None    # [B] int32: the row's penalty slot, -1 = none
    want_top: bool = False                 # some row wants top logprobs
    # None where no row of the call needs them (the executor passes a device-held default):
    bias_ids: np.ndarray | None = None     # [B, MAX_LOGIT_BIAS] int32, -1 = unused
    bias_vals: np.ndarray | None = None    # [B, MAX_LOGIT_BIAS] float32
    ban_ids: np.ndarray | None = None      # [B, MAX_BANS] int32, -1 = unused
    ban_if: np.ndarray | None = None       # [B, MAX_BANS] int32: the token it follows, -1 = any
    allowed: np.ndarray | None = None      # [B, ceil(V/32)] uint32 token bitmask, all bits = free
    # [B, T] int32 when a row's prompt positions are scored (prompt logprobs, jaxserve/scoring.py):
    # the next prompt token of each position, -1 where none; None otherwise
    score_targets: np.ndarray | None = None

    @classmethod
    def empty(cls, is_prefill: bool, B: int, T: int, P: int) -> "BuiltStep":
        """A call of shape (B, T, P) holding only padding: every row greedy, every token written
        to the null page; build_call fills in its sequences (warm-up runs it as it is)."""
        return cls(
            is_prefill=is_prefill, seqs=[], rows=[], samples=[],
            tokens=np.zeros((B, T), np.int32), positions=np.full((B, T), -1, np.int32),
            block_tables=np.zeros((B, P), np.int32), kv_lens=np.zeros((B,), np.int32),
            slot_pages=np.zeros((B * T,), np.int32), slot_offsets=np.zeros((B * T,), np.int32),
            logits_index=np.zeros((B,), np.int32), temperature=np.zeros((B,), np.float32),
            top_k=np.zeros((B,), np.int32), top_p=np.ones((B,), np.float32),
            seeds=np.zeros((B,), np.uint32), counters=np.zeros((B,), np.int32),
            want_logprobs=False, min_p=np.zeros((B,), np.float32),
            presence=np.zeros((B,), np.float32), frequency=np.zeros((B,), np.float32),
            repetition=np.ones((B,), np.float32), pen_slots=np.full((B,), -1, np.int32))

    @property
    def shape(self) -> tuple:
        """The bucket: (kind, B, T, P[, LoRA rank bucket, modules])."""
        B, T = self.tokens.shape
        key = ("prefill" if self.is_prefill else "decode", B, T, self.block_tables.shape[1])
        return key if self.lora is None else key + (self.lora.max_rank, self.lora.modules)


# Pages per sequence up to this many take the fine buckets (padding under a third); longer
# block tables take powers of two (padding under a half): fewer programs for long contexts, where
# attention that reads padded pages (XLA's gather) is a smaller part of the step.
FINE_PAGES = 16


class StepBuilder:
    """Turns plans into BuiltSteps. Keeps one piece of state: each decoding sequence's batch
    row, so per-row state cached on device (the LoRA slot weights) changes only where a row's
    occupant does. `lora`: an object with slots(plan, B, T, rows) -> LoraSlots | None and
    buckets() -> [(rank bucket, modules), ...] (jaxserve.lora.runtime.LoraRuntime), or None
    without adapters. `bucket_pages`: (decode, prefill) whether block tables are bucketed to
    the step's longest row (the backend's attention reads every page of the table) or always
    the longest width (it reads only up to each row's kv_len, so padding costs nothing and
    the pages drop out of the program shapes)."""

    def __init__(self, *, page_size: int, max_num_seqs: int, max_prefill_tokens: int,
                 max_model_len: int, min_decode_rows: int = 1, lora=None,
                 bucket_pages: tuple[bool, bool] = (True, True), vocab_size: int | None = None):
        self.page_size = page_size
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.max_pages_per_seq = math.ceil(max_model_len / page_size)
        self.min_decode_rows = min_decode_rows
        self.lora = lora
        self.bucket_pages = tuple(bucket_pages)
        # rows x tokens of one prefill call at most (prefill_groups splits a plan to fit)
        self.prefill_slots = pow2_at_least(max_prefill_tokens)
        self._rows: dict[int, int] = {}   # decode: seq_id -> its batch row (kept while it runs)
        # Decode arrays kept from step to step and updated in place where a row changed
        # (_build_decode). Two sets, used in turn: a step's arrays may still be read by its
        # device call (an asynchronous host-to-device copy) until the engine collects it, which
        # happens before the step after next is built.
        self._decode_bufs: tuple[dict, dict] = ({}, {})
        self._parity = 0
        # The full sampling set (jaxserve/sampling.py). vocab_size: the token masks' width
        # (None: a builder for plans without penalties, masks or bans). Each penalised sequence
        # has a slot of the device's count table while it runs; `slot_writes` lists the slots
        # (re)written from the host, for the executor to write before the step's calls.
        self.vocab_size = vocab_size
        self.num_pen_slots = max_num_seqs
        self._slots: dict[int, tuple[int, object]] = {}   # seq_id -> (slot, Sequence)
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))
        self.slot_writes: list[tuple[int, np.ndarray]] = []   # (slot, its [V] int32 entries)
        self._fixed_masks: dict[int, tuple[object, np.ndarray]] = {}   # allowed_token_ids
        # Structured output's hook (LLMEngine.mask_provider): seq -> a [ceil(V/32)] uint32
        # bitmask of the tokens its next token may be, or None (unconstrained); asked for every
        # row that samples, each step.
        self.mask_provider = None

    def build(self, plan: StepPlan) -> list[BuiltStep]:
        """The device calls of one plan: the decode call (its decodes, if any), then the
        prefill call, or for prefill chunks of mixed lengths one call per group of similar
        lengths (prefill_groups)."""
        calls = []
        dec = plan.decode_indices()
        if dec:
            calls.append(self._build_decode(plan, dec,
                                            self._decode_rows([plan.seqs[i] for i in dec])))
        pre = plan.prefill_indices()
        if pre:
            groups = prefill_groups([plan.num_new_tokens[i] for i in pre],
                                    self.prefill_tokens_bucket, self.prefill_rows_bucket,
                                    max_slots=self.prefill_slots)
            if len(groups) <= 1:    # one call for all of them, in the plan's order
                groups = [list(range(len(pre)))]
            calls += [self.build_call(plan, [pre[j] for j in g], list(range(len(g))),
                                      is_prefill=True) for g in groups]
        return calls

    # -- buckets -----------------------------------------------------------------------------
    def prefill_tokens_bucket(self, n: int) -> int:
        return fine_bucket(n, pow2_at_least(self.max_prefill_tokens), lo=16)

    def prefill_rows_bucket(self, n: int) -> int:
        return fine_bucket(n, self.max_num_seqs)

    def pages_bucket(self, n: int) -> int:
        cap = pow2_at_least(self.max_pages_per_seq)
        return fine_bucket(n, cap) if n <= FINE_PAGES else bucket(n, cap)

    def decode_rows_bucket(self, n: int) -> int:
        cap = max(pow2_at_least(self.max_num_seqs), self.min_decode_rows)
        return bucket(n, cap, lo=self.min_decode_rows)

    def _pages(self, is_prefill: bool, n: int) -> int:
        """The block-table width of a call whose rows need at most n pages."""
        bucketed = self.bucket_pages[1 if is_prefill else 0]
        return self.pages_bucket(n if bucketed else self.max_pages_per_seq)

    def shapes(self, lora: bool = True) -> list[tuple]:
        """Every bucket (BuiltStep.shape) this builder can produce, decode first, smaller first;
        with `lora`, also each one's LoRA variants (self.lora.buckets()). The set depends only
        on the limits; docs/architecture.md gives its size."""
        page_buckets = sorted({self.pages_bucket(n) for n in range(1, self.max_pages_per_seq + 1)})
        rows_cap = max(pow2_at_least(self.max_num_seqs), self.min_decode_rows)
        base = []
        dec_pages = page_buckets if self.bucket_pages[0] else [self._pages(False, 1)]
        for B in sorted({self.decode_rows_bucket(n) for n in range(1, rows_cap + 1)}):
            base += [("decode", B, 1, P) for P in dec_pages]
        least = _least_inputs(self.prefill_rows_bucket, range(1, self.max_num_seqs + 1))
        for T, c in _least_inputs(self.prefill_tokens_bucket,
                                  range(1, self.max_prefill_tokens + 1)).items():
            # a call's longest chunk is >= c tokens and sits in pages [0, c / page_size)
            pages = ([P for P in page_buckets if P >= self.pages_bucket(-(-c // self.page_size))]
                     if self.bucket_pages[1] else [self._pages(True, 1)])
            for B, k in least.items():
                # k rows, one of >= c tokens and each other of >= 1, within the step's tokens
                if c + k - 1 <= self.max_prefill_tokens and (B * T <= self.prefill_slots or B == 1):
                    base += [("prefill", B, T, P) for P in pages]
        if not lora or self.lora is None:
            return base
        return base + [key + lb for key in base for lb in self.lora.buckets()]

    def _decode_rows(self, seqs: list) -> list[int]:
        """Each decoding sequence keeps its batch row from step to step (new ones take the
        lowest free rows). Rows are compacted when the holes left by finished sequences would
        push the batch into a larger bucket."""
        live = {seq.seq_id for seq in seqs}
        self._rows = {sid: r for sid, r in self._rows.items() if sid in live}
        cap = pow2_at_least(self.max_num_seqs)
        if self._rows and bucket(max(self._rows.values()) + 1, cap) > bucket(len(seqs), cap):
            self._rows = {}
        used = set(self._rows.values())
        free = (r for r in range(len(seqs) + len(used)) if r not in used)
        for seq in seqs:
            if seq.seq_id not in self._rows:
                self._rows[seq.seq_id] = next(free)
        return [self._rows[seq.seq_id] for seq in seqs]

    def _build_decode(self, plan: StepPlan, idx: list[int], rows: list[int]) -> BuiltStep:
        """The decode call, as build_call makes it, written into arrays kept from the last
        time this bucket was built: a row whose sequence is the same gets its new position,
        token and counter (vectorised) and only the block-table entries it added; a row with a
        new occupant is written whole; a row left empty is reset to padding."""
        S = self.page_size
        seqs = [plan.seqs[i] for i in idx]
        starts = [plan.start_positions[i] for i in idx]
        B = self.decode_rows_bucket(max(rows) + 1)
        P = self._pages(False, max(len(seq.block_table) for seq in seqs))
        self._parity ^= 1
        bufs = self._decode_bufs[self._parity]
        buf = bufs.get((B, P))
        if buf is None:
            buf = bufs[(B, P)] = _DecodeRows(BuiltStep.empty(False, B, 1, P))
        out = buf.step
        for r in buf.active.difference(rows):
            buf.clear(r)
        counted = plan.sampled is not None
        samples = [plan.samples(i) for i in idx]
        from_device, counters, constrained = [], [], []
        bt, tokens = out.block_tables, out.tokens
        for seq, r, st, smp in zip(seqs, rows, starts, samples):
            key = (seq.seq_id, seq.num_preemptions)   # a resumed sequence has new pages
            table = seq.block_table
            if buf.key[r] != key:
                buf.key[r] = key
                bt[r] = 0
                bt[r, :len(table)] = table[:P]
                buf.table_len[r] = len(table)
                p = seq.sampling
                out.temperature[r], out.top_k[r], out.top_p[r] = p.temperature, p.top_k, p.top_p
                out.seeds[r] = p.seed
                buf.logprobs[r] = p.logprobs
                buf.top[r] = p.top_logprobs > 0
                if r in buf.bias_rows:     # the row's last occupant's biases
                    buf.clear_bias(r)
                self._set_params(out, r, seq, buf)
            elif len(table) != buf.table_len[r]:
                bt[r, buf.table_len[r]:len(table)] = table[buf.table_len[r]:P]
                buf.table_len[r] = len(table)
            n_prompt = seq.num_prompt_tokens
            if st < n_prompt:
                tokens[r, 0] = seq.prompt_token_ids[st]
            elif st - n_prompt < len(seq.output_token_ids):
                tokens[r, 0] = seq.output_token_ids[st - n_prompt]
            else:                               # the input token is still being sampled
                tokens[r, 0] = 0
                from_device.append((r, seq.seq_id))
            counters.append(seq.num_total_tokens - n_prompt - (smp and counted))
            if seq.sampling.has_bans or self.mask_provider is not None:
                constrained.append((r, seq, st, None if from_device and from_device[-1][0] == r
                                    else int(tokens[r, 0]), counters[-1]))
        ra, sa = np.asarray(rows, np.intp), np.asarray(starts, np.int32)
        out.positions[ra, 0] = sa
        out.kv_lens[ra] = sa + 1
        out.slot_pages[ra] = bt[ra, sa // S]
        out.slot_offsets[ra] = sa % S
        out.counters[ra] = counters
        buf.active = set(rows)
        out.seqs, out.rows, out.samples, out.from_device = idx, rows, samples, from_device
        out.want_logprobs = bool(buf.logprobs[ra].any())
        out.want_top = bool(buf.top[ra].any())
        out.bias_ids, out.bias_vals = (buf.bias_ids, buf.bias_vals) if buf.bias_rows else (None, None)
        out.allowed, out.ban_ids, out.ban_if = None, None, None
        masked = set()
        for r, seq, st, last, counter in constrained:
            if self._set_constraints(out, r, seq, st, last, counter, buf):
                masked.add(r)
        for r in buf.masked - masked:      # rows that held a mask and hold none now
            buf.allowed[r] = ALL_ALLOWED
        buf.masked = masked
        out.lora = None
        if self.lora is not None and plan.adapter_pages:
            sub = StepPlan(is_prefill=False, seqs=seqs, num_new_tokens=[1] * len(seqs),
                           start_positions=starts, adapter_pages=plan.adapter_pages)
            out.lora = self.lora.slots(sub, B, 1, rows)
        return out

    def build_call(self, plan: StepPlan, idx: list[int], rows: list[int],
                   is_prefill: bool | None = None) -> BuiltStep:
        """One device call for the plan sequences `idx` in batch rows `rows` (a prefill call,
        or a decode call; default: the kind of the plan's first of them). A decode whose input
        token the host does not know yet (sampled by the step before, still running) gets
        token 0 and is listed in `from_device`: the executor fills it in on the device."""
        S = self.page_size
        if is_prefill is None:
            is_prefill = not plan.is_decode(idx[0]) if idx else plan.is_prefill
        seqs = [plan.seqs[i] for i in idx]
        chunks = [plan.num_new_tokens[i] for i in idx]
        starts = [plan.start_positions[i] for i in idx]
        if is_prefill:
            B = self.prefill_rows_bucket(len(seqs))
            T = self.prefill_tokens_bucket(max(chunks))
            # Attention reads keys up to each chunk's end; the block table (pages for the whole
            # prompt, allocated at admission) may go further and is cut there.
            need = max(-(-(st + k) // S) for st, k in zip(starts, chunks))
        else:
            B, T = self.decode_rows_bucket(max(rows) + 1), 1
            need = max(len(seq.block_table) for seq in seqs)
        P = self._pages(is_prefill, need)
        out = BuiltStep.empty(is_prefill, B, T, P)
        out.seqs, out.rows, out.samples = idx, rows, [plan.samples(i) for i in idx]
        out.want_logprobs = any(seq.sampling.logprobs for seq in seqs)
        out.want_top = any(seq.sampling.top_logprobs for seq in seqs)
        slot_pages, slot_offsets = out.slot_pages.reshape(B, T), out.slot_offsets.reshape(B, T)
        counted = plan.sampled is not None
        for seq, i, st, k, samples in zip(seqs, rows, starts, chunks, out.samples):
            pos = np.arange(st, st + k)
            table = np.asarray(seq.block_table, np.int32)
            if st + k > seq.num_tokens:      # the input token is still being sampled
                assert not is_prefill and k == 1, "a prefill chunk past the known tokens"
                out.from_device.append((i, seq.seq_id))
            else:
                out.tokens[i, :k] = seq.token_ids[st:st + k]
            out.positions[i, :k] = pos
            out.block_tables[i, :min(len(table), P)] = table[:P]
            out.kv_lens[i] = st + k
            slot_pages[i, :k] = table[pos // S]      # views of the flat [B*T] arrays
            slot_offsets[i, :k] = pos % S
            out.logits_index[i] = k - 1
            p = seq.sampling
            out.temperature[i], out.top_k[i], out.top_p[i] = p.temperature, p.top_k, p.top_p
            out.seeds[i] = p.seed
            # The sampling key's counter: the index of the output token sampled here. A plan
            # from the scheduler (`sampled` set) already counts it as pending in
            # num_total_tokens, with any earlier token still pending.
            out.counters[i] = seq.num_total_tokens - seq.num_prompt_tokens - (samples and counted)
            if samples:
                self._set_params(out, i, seq)
                last = None if out.from_device and out.from_device[-1][0] == i else \
                    int(out.tokens[i, k - 1])
                self._set_constraints(out, i, seq, st + k - 1, last, int(out.counters[i]))
            if (is_prefill and seq.needs_prompt_scores and not seq.output_token_ids
                    and st < seq.num_prompt_tokens - 1):
                if out.score_targets is None:
                    out.score_targets = np.full((B, T), -1, np.int32)
                out.score_targets[i, :k] = targets_for(seq.prompt_token_ids, st, k)
        if self.lora is not None and plan.adapter_pages:
            sub = plan if len(idx) == len(plan.seqs) and plan.decode is None else StepPlan(
                is_prefill=is_prefill, seqs=seqs, num_new_tokens=chunks,
                start_positions=starts, adapter_pages=plan.adapter_pages)
            out.lora = self.lora.slots(sub, B, T, rows)
        return out


    # -- the full sampling set ------------------------------------------------------------------
    def _set_params(self, out: BuiltStep, r: int, seq, buf: "_DecodeRows | None" = None) -> None:
        """Row r's per-request sampling parameters (a row that samples): min_p, penalties
        and their slot, logit biases."""
        p = seq.sampling
        out.min_p[r] = p.min_p
        out.presence[r], out.frequency[r] = p.presence_penalty, p.frequency_penalty
        out.repetition[r] = p.repetition_penalty
        out.pen_slots[r] = self._pen_slot(seq) if p.uses_penalties else -1
        if p.logit_bias:
            if buf is not None:
                if buf.bias_ids is None:
                    buf.bias_ids, buf.bias_vals = _bias_arrays(out.tokens.shape[0])
                out.bias_ids, out.bias_vals = buf.bias_ids, buf.bias_vals
                buf.bias_rows.add(r)
            elif out.bias_ids is None:
                out.bias_ids, out.bias_vals = _bias_arrays(out.tokens.shape[0])
            ids, vals = zip(*p.logit_bias)
            out.bias_ids[r, :len(ids)] = ids
            out.bias_vals[r, :len(ids)] = vals

    def _pen_slot(self, seq) -> int:
        """seq's slot in the device's penalty table, kept while it runs (through preemption:
        its tokens stand). A slot taken is written whole from the host: the prompt, and the
        output tokens so far, all known then (a sequence takes one when it first samples, or
        when it resumes after a preemption, which waits for its pending token)."""
        hit = self._slots.get(seq.seq_id)
        if hit is not None and hit[1] is seq:
            return hit[0]
        if not self._free_slots:      # reclaim the slots of sequences not running
            for sid, (slot, s) in list(self._slots.items()):
                if s.status is not SequenceStatus.RUNNING:
                    del self._slots[sid]
                    self._free_slots.append(slot)
        slot = self._free_slots.pop()
        self._slots[seq.seq_id] = (slot, seq)
        V = self.vocab_size
        row = np.bincount(np.asarray(seq.output_token_ids, np.int64), minlength=V)[:V]
        row = row.astype(np.int32)
        row[np.asarray(seq.prompt_token_ids, np.int64)] |= PROMPT_BIT
        self.slot_writes.append((slot, row))
        return slot

    def _fixed_mask(self, seq) -> np.ndarray:
        """The token mask of seq's allowed_token_ids (made once per sequence)."""
        hit = self._fixed_masks.get(seq.seq_id)
        if hit is not None and hit[0] is seq:
            return hit[1]
        if len(self._fixed_masks) >= 4 * self.max_num_seqs:
            self._fixed_masks = {k: v for k, v in self._fixed_masks.items()
                                 if v[0].status is SequenceStatus.RUNNING}
        mask = pack_mask(seq.sampling.allowed_token_ids, self.vocab_size)
        self._fixed_masks[seq.seq_id] = (seq, mask)
        return mask

    def _set_constraints(self, out: BuiltStep, r: int, seq, last_pos: int, last: int | None,
                         counter: int, buf: "_DecodeRows | None" = None) -> bool:
        """Row r's token mask and bans for the token after position last_pos (the row's last
        token: `last`, None while it is on the device); `counter`: output tokens before it.
        Returns whether the row got a mask."""
        p = seq.sampling
        bans: list[tuple[int, int]] = []     # (trigger: the last token it needs, -1 = any; token)
        if p.min_tokens and counter < p.min_tokens:
            bans += [(-1, t) for t in p.min_tokens_ban]
        n_prompt = seq.num_prompt_tokens
        for w in p.bad_words:    # vLLM: the word's tokens before its last, at the output's end
            k = len(w)
            if k == 1:
                bans.append((-1, w[0]))
                continue
            start = last_pos - (k - 2)     # the word's first token would sit here
            if start < n_prompt or any(_token_at(seq, start + j) != w[j] for j in range(k - 2)):
                continue
            if last is None:
                bans.append((w[k - 2], w[k - 1]))
            elif last == w[k - 2]:
                bans.append((-1, w[k - 1]))
        mask = self._fixed_mask(seq) if p.allowed_token_ids is not None else None
        if self.mask_provider is not None:
            m = self.mask_provider(seq)
            if m is not None:
                mask = m if mask is None else mask & m
        if len(bans) > MAX_BANS:     # unconditional bans beyond the sparse list: into the mask
            cond = [b for b in bans if b[0] >= 0]
            free = [t for c, t in bans if c < 0]
            room = MAX_BANS - len(cond)
            bans = cond + [(-1, t) for t in free[:room]]
            mask = np.full(-(-self.vocab_size // 32), ALL_ALLOWED) if mask is None else mask.copy()
            spill = np.asarray(free[room:], np.int64)
            np.bitwise_and.at(mask, spill >> 5, ~(np.uint32(1) << (spill & 31).astype(np.uint32)))
        if bans:
            if out.ban_ids is None:
                B = out.tokens.shape[0]
                out.ban_ids = np.full((B, MAX_BANS), -1, np.int32)
                out.ban_if = np.full((B, MAX_BANS), -1, np.int32)
            out.ban_if[r, :len(bans)], out.ban_ids[r, :len(bans)] = zip(*bans)
        if mask is None:
            return False
        if out.allowed is None:
            if buf is not None and buf.allowed is not None:
                out.allowed = buf.allowed
            else:
                out.allowed = np.full((out.tokens.shape[0], mask.shape[0]), ALL_ALLOWED)
                if buf is not None:
                    buf.allowed = out.allowed
        out.allowed[r] = mask
        return True


ALL_ALLOWED = np.uint32(0xFFFFFFFF)   # a token mask word allowing all of its 32 tokens


def pack_mask(token_ids, vocab_size: int) -> np.ndarray:
    """[ceil(V/32)] uint32 bitmask with bit t % 32 of word t // 32 set for each token t."""
    W = -(-vocab_size // 32)
    bits = np.zeros(W * 32, bool)
    bits[np.asarray(token_ids, np.int64)] = True
    return np.packbits(bits, bitorder="little").view("<u4").astype(np.uint32)


def _bias_arrays(B: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((B, MAX_LOGIT_BIAS), -1, np.int32), np.zeros((B, MAX_LOGIT_BIAS), np.float32)


def _token_at(seq, pos: int) -> int:
    """seq's token at a position the host knows (without building prompt + output)."""
    n = seq.num_prompt_tokens
    return seq.prompt_token_ids[pos] if pos < n else seq.output_token_ids[pos - n]


class _DecodeRows:
    """A decode bucket's arrays kept between steps, and what each row holds."""

    # the per-row arrays of a decode BuiltStep (T = 1: the flat [B*T] ones are per row too)
    ROW_ARRAYS = ("tokens", "positions", "block_tables", "kv_lens", "slot_pages",
                  "slot_offsets", "logits_index", "temperature", "top_k", "top_p", "seeds",
                  "counters", "min_p", "presence", "frequency", "repetition", "pen_slots")

    def __init__(self, step: BuiltStep):
        B, P = step.block_tables.shape
        self.step = step
        self.pad = BuiltStep.empty(False, 1, 1, P)   # one padding row, as `empty` makes it
        self.key: list = [None] * B          # (seq_id, preemptions) of each row's sequence
        self.table_len = [0] * B             # block-table entries written for it
        self.logprobs = np.zeros((B,), bool)
        self.top = np.zeros((B,), bool)
        self.active: set[int] = set()
        # the sampling set's wide arrays, made when a row first needs them, and their rows in use
        self.bias_ids = self.bias_vals = self.allowed = None
        self.bias_rows: set[int] = set()
        self.masked: set[int] = set()

    def clear(self, r: int) -> None:
        """Row r back to padding."""
        self.key[r], self.table_len[r], self.logprobs[r], self.top[r] = None, 0, False, False
        for name in self.ROW_ARRAYS:
            getattr(self.step, name)[r] = getattr(self.pad, name)[0]
        if r in self.bias_rows:
            self.clear_bias(r)
        if r in self.masked:
            self.allowed[r] = ALL_ALLOWED
            self.masked.discard(r)

    def clear_bias(self, r: int) -> None:
        self.bias_ids[r], self.bias_vals[r] = -1, 0.0
        self.bias_rows.discard(r)


def _least_inputs(bucket_fn, ns) -> dict[int, int]:
    """bucket -> the least n (of ns, increasing) that the bucket function maps to it."""
    out: dict[int, int] = {}
    for n in ns:
        out.setdefault(bucket_fn(n), n)
    return out
