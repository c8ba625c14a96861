"""Plan -> padded step arrays, on the host (numpy only; imports no JAX).

A scheduler `StepPlan` becomes one or more `BuiltStep`s, each one device call: the batch rows
of its sequences, arrays padded to shape buckets (so only a small set of programs is ever
compiled), the sampling inputs and the LoRA slots. The executor (jaxserve/runner.py) turns a
BuiltStep into device inputs and runs it; nothing of a step is kept anywhere else.

Buckets: batch rows and prefill tokens are powers of two, or 1.5x powers of two where padding
costs compute (`fine_bucket`); pages per sequence likewise. A prefill mixing chunk lengths is
split into calls of similar lengths (`prefill_groups`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from scheduler import StepPlan


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
                   call_cost: int = PREFILL_CALL_COST_TOKENS) -> list[list[int]]:
    """Split one prefill step's sequences into device calls that cost the least in total.

    A call pads every row to its bucketed longest chunk (mixing a 36-token chunk with a
    133-token one computes 2 x 256 token slots for 169 tokens), and each call also costs
    `call_cost` token slots of its own. With the sequences sorted by chunk length, the best
    split into runs of neighbours is found exactly by dynamic programming over
    cost(run) = call_cost + row_bucket(rows) x token_bucket(longest chunk).
    Returns index lists, longest chunks first.
    """
    order = sorted(range(len(chunks)), key=lambda i: -chunks[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n      # best[j]: cheapest split of the first j sequences
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            c = best[i] + call_cost + row_bucket(j - i) * token_bucket(chunks[order[i]])
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
            want_logprobs=False)

    @property
    def shape(self) -> tuple:
        """The bucket: (kind, B, T, P[, LoRA rank bucket, modules])."""
        B, T = self.tokens.shape
        key = ("prefill" if self.is_prefill else "decode", B, T, self.block_tables.shape[1])
        return key if self.lora is None else key + (self.lora.max_rank, self.lora.modules)


class StepBuilder:
    """Turns plans into BuiltSteps. Keeps one piece of state: each decoding sequence's batch
    row, so per-row state cached on device (the LoRA slot weights) changes only where a row's
    occupant does. `lora`: an object with slots(plan, B, T, rows) -> LoraSlots | None
    (jaxserve.lora.runtime.LoraRuntime), or None without adapters."""

    def __init__(self, *, page_size: int, max_num_seqs: int, max_prefill_tokens: int,
                 max_model_len: int, min_decode_rows: int = 1, lora=None):
        self.page_size = page_size
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.max_pages_per_seq = math.ceil(max_model_len / page_size)
        self.min_decode_rows = min_decode_rows
        self.lora = lora
        self._rows: dict[int, int] = {}   # decode: seq_id -> its batch row (kept while it runs)

    def build(self, plan: StepPlan) -> list[BuiltStep]:
        """The device calls of one plan: one, or for a prefill mixing chunk lengths one per
        group of similar lengths (prefill_groups)."""
        n = len(plan.seqs)
        if not plan.is_prefill:
            return [self.build_call(plan, list(range(n)), self._decode_rows(plan))]
        groups = prefill_groups(plan.num_new_tokens, self.prefill_tokens_bucket,
                                lambda k: fine_bucket(k, self.max_num_seqs))
        if len(groups) <= 1:    # one call for the whole plan, in its own order
            groups = [list(range(n))]
        return [self.build_call(plan, g, list(range(len(g)))) for g in groups]

    def prefill_tokens_bucket(self, n: int) -> int:
        return fine_bucket(n, pow2_at_least(self.max_prefill_tokens), lo=16)

    def pages_bucket(self, n: int) -> int:
        return fine_bucket(n, pow2_at_least(self.max_pages_per_seq))

    def decode_rows_bucket(self, n: int) -> int:
        cap = max(pow2_at_least(self.max_num_seqs), self.min_decode_rows)
        return bucket(n, cap, lo=self.min_decode_rows)

    def _decode_rows(self, plan: StepPlan) -> list[int]:
        """Each decoding sequence keeps its batch row from step to step (new ones take the
        lowest free rows). Rows are compacted when the holes left by finished sequences would
        push the batch into a larger bucket."""
        live = {seq.seq_id for seq in plan.seqs}
        self._rows = {sid: r for sid, r in self._rows.items() if sid in live}
        cap = pow2_at_least(self.max_num_seqs)
        if self._rows and bucket(max(self._rows.values()) + 1, cap) > bucket(len(plan.seqs), cap):
            self._rows = {}
        used = set(self._rows.values())
        free = (r for r in range(len(plan.seqs) + len(used)) if r not in used)
        for seq in plan.seqs:
            if seq.seq_id not in self._rows:
                self._rows[seq.seq_id] = next(free)
        return [self._rows[seq.seq_id] for seq in plan.seqs]

    def build_call(self, plan: StepPlan, idx: list[int], rows: list[int]) -> BuiltStep:
        """One device call for the plan sequences `idx` in batch rows `rows`."""
        S = self.page_size
        seqs = [plan.seqs[i] for i in idx]
        chunks = [plan.num_new_tokens[i] for i in idx]
        starts = [plan.start_positions[i] for i in idx]
        if plan.is_prefill:
            B = fine_bucket(len(seqs), self.max_num_seqs)
            T = self.prefill_tokens_bucket(max(chunks))
        else:
            B, T = self.decode_rows_bucket(max(rows) + 1), 1
        # The block table covers the whole request (pages are allocated for the full prompt at
        # admission), which can be longer than this step's chunk.
        P = self.pages_bucket(max(len(seq.block_table) for seq in seqs))
        out = BuiltStep.empty(plan.is_prefill, B, T, P)
        out.seqs, out.rows, out.samples = idx, rows, [plan.samples(i) for i in idx]
        out.want_logprobs = any(seq.sampling.logprobs for seq in seqs)
        slot_pages, slot_offsets = out.slot_pages.reshape(B, T), out.slot_offsets.reshape(B, T)
        for seq, i, st, k in zip(seqs, rows, starts, chunks):
            pos = np.arange(st, st + k)
            table = np.asarray(seq.block_table, np.int32)
            out.tokens[i, :k] = seq.token_ids[st:st + k]
            out.positions[i, :k] = pos
            out.block_tables[i, :len(table)] = table
            out.kv_lens[i] = st + k
            slot_pages[i, :k] = table[pos // S]      # views of the flat [B*T] arrays
            slot_offsets[i, :k] = pos % S
            out.logits_index[i] = k - 1
            p = seq.sampling
            out.temperature[i], out.top_k[i], out.top_p[i] = p.temperature, p.top_k, p.top_p
            out.seeds[i] = p.seed
            out.counters[i] = seq.num_output_tokens
        if self.lora is not None and plan.adapter_pages:
            sub = plan if len(idx) == len(plan.seqs) else StepPlan(
                is_prefill=plan.is_prefill, seqs=seqs, num_new_tokens=chunks,
                start_positions=starts, adapter_pages=plan.adapter_pages)
            out.lora = self.lora.slots(sub, B, T, rows)
        return out
