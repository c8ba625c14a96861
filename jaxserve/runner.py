"""The model runner: turns a scheduler's StepPlan into padded device arrays and runs one
jitted step (forward + sampling) with the KV pool donated.

Shapes are padded to buckets (powers of two; pages per sequence also 1.5x powers of two) so
only a small set of programs is ever compiled; each new bucket is logged when first compiled.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve import sharding
from jaxserve.config import ModelConfig, rope_inv_freq
from jaxserve.model import llama
from jaxserve.model.attention import resolve_impl
from jaxserve.model.kv_cache import KVPages, StepInput, init_kv_pages
from jaxserve.model.weights import Weights, fuse_projections, pack_for_amx
from jaxserve.sampling import SamplingInput, sample
from scheduler import StepPlan

log = logging.getLogger("jaxserve.runner")


def _pow2_at_least(n: int, lo: int = 1) -> int:
    return max(lo, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def bucket(n: int, cap: int, lo: int = 1) -> int:
    """Smallest power of two >= n (and >= lo), but never above cap (cap itself is a bucket)."""
    return min(_pow2_at_least(n, lo), cap)


def fine_bucket(n: int, cap: int, lo: int = 1) -> int:
    """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and 1.5x powers of two)
    >= max(n, lo), never above cap: padding stays under a third of the bucket instead of half.
    Used for pages per sequence (attention reads every bucketed page of every row) and for the
    rows and tokens of prefill calls (compute-bound, so padded tokens cost as much as real ones)."""
    n = max(n, lo)
    p = _pow2_at_least(n)
    if p >= 4 and n <= 3 * p // 4:
        p = 3 * p // 4
    return min(p, cap)


# What one extra prefill call costs beyond its tokens, in tokens: a call streams every weight
# once whatever its size. Measured on the default model (fp32, 2-core VM): a 1x16-token call
# takes 54 ms, 1x64 92 ms, 8x64 429 ms, i.e. ~40 ms per call + ~0.85 ms per token slot.
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


def _num_maps() -> int | None:
    """Memory mappings this process holds (Linux), or None where that cannot be read."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def _map_budget() -> int | None:
    """Half of vm.max_map_count: the mappings compiled programs may take us to
    (ModelRunner._program)."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read()) // 2
    except (OSError, ValueError):
        return None


def _step_fn(cfg: ModelConfig, attn_impl: str, interpret: bool, weights: Weights, kv: KVPages,
             step: StepInput, samp: SamplingInput, lora_impl: str = "xla", logits_shardings=()):
    logits, kv = llama.forward(weights, cfg, step, kv, attn_impl=attn_impl, interpret=interpret,
                               lora_impl=lora_impl)
    for s in logits_shardings:   # tp: vocab-split logits, all-gathered once before sampling
        logits = jax.lax.with_sharding_constraint(logits, s)
    tokens, logprobs = sample(logits, samp)
    return tokens, logprobs, kv


LAYER_LOOPS = ("auto", "scan", "per-layer")


def resolve_layer_loop(layer_loop: str, tp: int) -> str:
    """How a step runs its layers.

    scan: the whole step is one program, a lax.scan over the stacked layer weights (one compiled
    layer body; GPU/TPU, tensor parallel). dispatch: one device call per layer over per-layer
    weight arrays, plus an embedding call and a head+sampling call. On XLA:CPU the scan copies
    each layer's weight slice out of the stack before its matmuls (~14 MB per layer for the
    default model in float32, half of a batch-1 step) and its bfloat16 matmuls ran ~2x slower
    inside the loop; a call costs ~30-50 us of dispatch. `auto`: dispatch on CPU without tensor
    parallelism, else scan.
    """
    if layer_loop not in LAYER_LOOPS:
        raise ValueError(f"unknown layer loop {layer_loop!r}; choose from {LAYER_LOOPS}")
    if layer_loop == "auto":
        return "per-layer" if (jax.default_backend() == "cpu" and tp == 1) else "scan"
    if layer_loop == "per-layer" and tp != 1:
        raise ValueError("layer_loop='per-layer' runs unsharded; use 'scan' with tp > 1")
    return layer_loop


def _embed_fn(cfg: ModelConfig, weights: Weights, step: StepInput):
    """Token embeddings, the step's RoPE tables (once, for all the layer calls) and the step
    (given without its LoRA batch) back as device arrays for the layer calls: the call's own
    transfer of its host arguments replaces a device_put of the step (which took ~0.7 ms for a
    batch-32 decode step between steps, measured, vs ~15 us more for this call)."""
    inv_freq = jnp.asarray(rope_inv_freq(cfg), jnp.float32)
    return llama.embed(weights, step), llama.rope_tables(step.positions, inv_freq), step


def _layer_fn(cfg: ModelConfig, attn_impl: str, interpret: bool, lora_impl: str, lw, x,
              kv: KVPages, layer, step: StepInput):
    return llama.decoder_layer(cfg, lw, x, kv, layer, step, attn_impl=attn_impl,
                               interpret=interpret, lora_impl=lora_impl)


def _logits_fn(cfg: ModelConfig, weights: Weights, x, step: StepInput):
    return llama.head(weights, cfg, x, step)


class _LayerByLayer:
    """A compiled step run as separate device calls: embed, each layer, the head, sampling
    (layer_loop="per-layer"). Same call signature and results as a compiled whole step.

    Head and sampling are two calls: in one program XLA:CPU ran the vocabulary matmul ~2x
    slower (8.3 vs 4.4 ms for 64 rows x 49k in bf16, measured), more than a call costs."""

    def __init__(self, embed, layer, logits, sample_fn, layer_weights, layer_ids):
        self.embed, self.layer, self.logits, self.sample = embed, layer, logits, sample_fn
        self.layer_weights, self.layer_ids = layer_weights, layer_ids

    def __call__(self, weights, kv, step, samp):
        x, rope, meta = self.embed(weights, dataclasses.replace(step, lora=None))
        # On device once, not once per layer call.
        lora = None if step.lora is None else jax.device_put(step.lora)
        step = dataclasses.replace(meta, rope=rope, lora=lora)
        for lw, i in zip(self.layer_weights, self.layer_ids):
            x, kv = self.layer(lw, x, kv, i, step)
        tokens, logprobs = self.sample(self.logits(weights, x, step), samp)
        return tokens, logprobs, kv


class ModelRunner:
    def __init__(self, cfg: ModelConfig, weights: Weights, *, num_pages: int, page_size: int,
                 max_num_seqs: int, max_prefill_tokens: int, max_model_len: int,
                 dtype=jnp.float32, backend: str = "auto", interpret: bool | None = None,
                 tp: int = 1, lora=None, layer_loop: str = "auto"):
        self.cfg = cfg
        self.weights = weights
        self.tp = tp
        self.page_size = page_size
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.max_pages_per_seq = math.ceil(max_model_len / page_size)
        self.attn_impl = resolve_impl(backend, tp=tp)
        # Pallas on CPU can only run in interpret mode.
        self.interpret = (jax.default_backend() == "cpu") if interpret is None else interpret
        self.lora = lora   # jaxserve.lora.runtime.LoraRuntime, or None
        # XLA:CPU runs a one-row bf16 matmul as a slow matrix-vector product (0.53 ms for
        # 1x576x3072, 0.23 ms with two rows): bf16 decode on CPU pads to at least two rows,
        # unless the native small-M kernel (backends/cpu/cpu_matmul.py) takes those rows.
        from jaxserve.backends.cpu import cpu_matmul
        self.min_decode_rows = 2 if (jnp.dtype(dtype) == jnp.bfloat16
                                     and jax.default_backend() == "cpu"
                                     and not (tp == 1 and cpu_matmul.available())) else 1
        self.layer_loop = resolve_layer_loop(layer_loop, tp)
        self.amx = False   # projections packed for cpu_matmul.matmul_amx (dispatch, bf16)
        lora_impl = "pallas" if self.attn_impl == "pallas" else "xla"
        if tp == 1:
            self.mesh = None
            self.weights = fuse_projections(weights)
            self.kv = init_kv_pages(cfg, num_pages, page_size, dtype)
            self._step = jax.jit(functools.partial(
                _step_fn, cfg, self.attn_impl, self.interpret, lora_impl=lora_impl),
                donate_argnums=(1,))
            if self.layer_loop == "per-layer":   # per-layer arrays; the stacked ones are dropped
                self.layer_weights = llama.unstack_layers(self.weights.layers)
                self.weights = dataclasses.replace(self.weights, layers=None)
                # bf16 on a CPU with AMX: projections (and the tied head) in the tile layout.
                self.amx = jnp.dtype(dtype) == jnp.bfloat16 and cpu_matmul.amx_available()
                if self.amx:
                    self.weights, self.layer_weights = pack_for_amx(self.weights,
                                                                    self.layer_weights)
                self._layer_ids = [jnp.int32(i) for i in range(cfg.num_layers)]
                self._embed = jax.jit(functools.partial(_embed_fn, cfg))
                self._layer = jax.jit(functools.partial(
                    _layer_fn, cfg, self.attn_impl, self.interpret, lora_impl),
                    donate_argnums=(1, 2))
                self._logits = jax.jit(functools.partial(_logits_fn, cfg))
                self._sample = jax.jit(sample)
        else:   # tensor parallel: weights and KV pool sharded by jaxserve.sharding's table
            self.mesh = sharding.make_mesh(tp)
            layout = sharding.head_layout(cfg, tp)   # may pad/replicate heads to divide tp
            self.weights = sharding.shard_weights(weights, cfg, self.mesh, layout)
            self.kv = sharding.shard_kv(init_kv_pages(layout.config, num_pages, page_size, dtype),
                                        self.mesh)
            rep, kv_sh = sharding.replicated(self.mesh), sharding.kv_sharding(self.mesh, self.kv)
            if lora is not None:   # S-LoRA's sharded LoRA (jaxserve/lora/tp.py), XLA path only
                lora.mesh = self.mesh
            self._step = jax.jit(
                functools.partial(_step_fn, layout.config, self.attn_impl, self.interpret,
                                  logits_shardings=sharding.logits_shardings(self.mesh, cfg)),
                in_shardings=(sharding.weight_shardings(layout.config, self.mesh), kv_sh, rep, rep),
                out_shardings=(rep, rep, kv_sh), donate_argnums=(1,))
        self._rows: dict[int, int] = {}   # decode: seq_id -> its batch row (kept while it runs)
        self._programs: collections.OrderedDict = collections.OrderedDict()   # see _program
        self.num_programs_dropped = 0
        self._seen_buckets: set[tuple] = set()
        self.num_steps = 0

    def stacked_weights(self) -> Weights:
        """The full weights tree with stacked layers, for calling llama.forward directly (in
        dispatch mode a fresh stack of the per-layer arrays)."""
        if self.layer_loop == "scan":
            return self.weights
        layers = jax.tree.map(lambda *a: jnp.stack(a), *self.layer_weights)
        return dataclasses.replace(self.weights, layers=layers)

    # -- building the padded step ---------------------------------------------------------------
    def _decode_rows(self, plan: StepPlan) -> list[int]:
        """Each decoding sequence keeps its batch row from step to step (new ones take the
        lowest free rows), so per-row state cached on device -- the adapter weights of
        jaxserve.lora.runtime -- changes only where a row's occupant does. Rows are compacted
        when the holes left by finished sequences would push the batch into a larger bucket."""
        live = {seq.seq_id for seq in plan.seqs}
        self._rows = {sid: r for sid, r in self._rows.items() if sid in live}
        cap = _pow2_at_least(self.max_num_seqs)
        if self._rows and bucket(max(self._rows.values()) + 1, cap) > bucket(len(plan.seqs), cap):
            self._rows = {}
        used = set(self._rows.values())
        free = (r for r in range(len(plan.seqs) + len(used)) if r not in used)
        for seq in plan.seqs:
            if seq.seq_id not in self._rows:
                self._rows[seq.seq_id] = next(free)
        return [self._rows[seq.seq_id] for seq in plan.seqs]

    def _build(self, plan: StepPlan):
        """Padded arrays for one call, and the batch row of each plan sequence."""
        n = len(plan.seqs)
        S = self.page_size
        if plan.is_prefill:
            rows = list(range(n))
            B = fine_bucket(n, self.max_num_seqs)
            T = self._prefill_tokens_bucket(max(plan.num_new_tokens))
        else:
            rows = self._decode_rows(plan)
            B = bucket(max(rows) + 1, max(_pow2_at_least(self.max_num_seqs), self.min_decode_rows),
                       lo=self.min_decode_rows)
            T = 1
        # The block table covers the whole request (pages are allocated for the full prompt at
        # admission), which can be longer than this step's chunk.
        max_pages = max(len(seq.block_table) for seq in plan.seqs)
        P = fine_bucket(max_pages, _pow2_at_least(self.max_pages_per_seq))
        tokens = np.zeros((B, T), np.int32)
        positions = np.full((B, T), -1, np.int32)
        block_tables = np.zeros((B, P), np.int32)
        kv_lens = np.zeros((B,), np.int32)
        slot_pages = np.zeros((B, T), np.int32)
        slot_offsets = np.zeros((B, T), np.int32)
        logits_index = np.zeros((B,), np.int32)
        temperature = np.zeros((B,), np.float32)
        top_k = np.zeros((B,), np.int32)
        top_p = np.ones((B,), np.float32)
        seeds = np.zeros((B,), np.uint32)
        counters = np.zeros((B,), np.int32)
        for j, seq in enumerate(plan.seqs):
            i = rows[j]
            st, k = plan.start_positions[j], plan.num_new_tokens[j]
            ids = seq.token_ids[st:st + k]
            pos = np.arange(st, st + k)
            table = np.asarray(seq.block_table, np.int32)
            tokens[i, :k] = ids
            positions[i, :k] = pos
            block_tables[i, :len(table)] = table
            kv_lens[i] = st + k
            slot_pages[i, :k] = table[pos // S]
            slot_offsets[i, :k] = pos % S
            logits_index[i] = k - 1
            p = seq.sampling
            temperature[i] = p.temperature
            top_k[i] = p.top_k
            top_p[i] = p.top_p
            seeds[i] = p.seed
            counters[i] = seq.num_output_tokens
        step = StepInput(
            tokens=tokens, positions=positions, block_tables=block_tables, kv_lens=kv_lens,
            slot_pages=slot_pages.reshape(-1), slot_offsets=slot_offsets.reshape(-1),
            logits_index=logits_index)
        want = any(seq.sampling.logprobs for seq in plan.seqs)
        samp = SamplingInput(temperature=temperature, top_k=top_k, top_p=top_p, seeds=seeds,
                             counters=counters, logprobs=np.bool_(want))
        if self.lora is not None and plan.adapter_pages:
            step.lora_idx, step.lora = self.lora.build(plan, B, T, rows)
            return (B, T, P, step.lora.max_rank, step.lora.modules), step, samp, rows
        return (B, T, P), step, samp, rows

    def _prefill_tokens_bucket(self, n: int) -> int:
        return fine_bucket(n, _pow2_at_least(self.max_prefill_tokens), lo=16)

    # -- running -----------------------------------------------------------------------------
    def run(self, plan: StepPlan) -> tuple[list[int | None], list[float | None]]:
        """Run one step. Returns, per plan sequence, the sampled token and its log-probability
        (None for sequences whose prefill chunk does not reach their last token).

        A prefill step mixing chunk lengths runs as one device call per group of similar
        lengths (prefill_groups); adapter loads are written before the first call. Prefetches
        (adapters of waiting requests) are packed and copied after the calls are dispatched,
        while the device runs them, and their writes queue behind the step."""
        later = []
        if self.lora is not None and plan.adapter_loads:
            now = [x for x in plan.adapter_loads if x[0] in plan.adapter_pages]
            later = [x for x in plan.adapter_loads if x[0] not in plan.adapter_pages]
            if now:
                self.kv = self.lora.write(self.kv, self.lora.stage(now))
        groups = (prefill_groups(plan.num_new_tokens, self._prefill_tokens_bucket,
                                 lambda n: fine_bucket(n, self.max_num_seqs))
                  if plan.is_prefill else [])
        if len(groups) <= 1:    # one call for the whole plan, in its own order
            groups = [list(range(len(plan.seqs)))]
        calls = []
        for g in groups:
            sub = plan if len(groups) == 1 else StepPlan(
                is_prefill=True, seqs=[plan.seqs[i] for i in g],
                num_new_tokens=[plan.num_new_tokens[i] for i in g],
                start_positions=[plan.start_positions[i] for i in g],
                adapter_pages=plan.adapter_pages)
            calls.append((g, sub, self._dispatch(sub)))
        if later:
            self.kv = self.lora.write(self.kv, self.lora.stage(later))
        out_t: list[int | None] = [None] * len(plan.seqs)
        out_l: list[float | None] = [None] * len(plan.seqs)
        for g, sub, (tokens, logprobs, rows) in calls:
            tokens, logprobs = np.asarray(tokens)[rows], np.asarray(logprobs)[rows]
            for j, i in enumerate(g):
                if sub.samples(j):
                    out_t[i], out_l[i] = int(tokens[j]), float(logprobs[j])
        self.num_steps += 1
        return out_t, out_l

    def _dispatch(self, plan: StepPlan):
        """One jitted call for the plan's sequences, dispatched: (tokens, logprobs) on device
        and the plan sequences' batch rows."""
        shape, step, samp, rows = self._build(plan)
        key = ("prefill" if plan.is_prefill else "decode",) + shape
        if key not in self._seen_buckets:
            self._seen_buckets.add(key)
            log.info("compiling %s bucket batch=%d tokens=%d pages=%d%s", *key[:4],
                     f" lora rank={key[4]} modules={','.join(key[5])}" if len(key) > 4 else "")
        if self.mesh is not None and jax.process_count() > 1:
            step, samp = sharding.put_replicated((step, samp), self.mesh)
        if step.lora is not None and self.mesh is None:   # see LoraRuntime.slot_weights
            step.lora = dataclasses.replace(step.lora, weights=self.lora.slot_weights(
                self.kv, step.lora, cache=not plan.is_prefill))
        tokens, logprobs, self.kv = self._program(step, samp)(self.weights, self.kv, step, samp)
        return tokens, logprobs, rows

    def _program(self, step: StepInput, samp: SamplingInput):
        """The compiled step for these input shapes, most recently used kept last.

        Every compiled program holds its machine code in memory mappings of its own (~300-500
        for a step of the default model; ~550-1,900 when its 30 layers were unrolled), and
        Linux caps a process at vm.max_map_count (65,530 by default): past it, compiling fails
        and the process crashes (seen in the multi-LoRA benchmark with unrolled layers). When
        the process holds more than half that many mappings, the least recently used half of
        the programs is dropped; one needed again is recompiled, or read back from the
        persistent compilation cache (~0.7 s on the 2-core VM).
        """
        leaves, tree = jax.tree.flatten((step, samp))
        key = (tree, tuple((np.shape(x), x.dtype if hasattr(x, "dtype") else np.result_type(x))
                           for x in leaves))
        prog = self._programs.get(key)
        if prog is not None:
            self._programs.move_to_end(key)
            return prog
        prog = self._compile(step, samp)
        self._programs[key] = prog
        limit, n = _map_budget(), _num_maps()
        if limit is not None and n is not None and n > limit and len(self._programs) > 1:
            # Drop the least recently used half, then JAX's own caches (they also hold every
            # executable compiled through them, so dropping ours alone frees nothing; what is
            # cleared there and still needed comes back from the persistent cache).
            for _ in range(max(1, len(self._programs) // 2)):
                self._programs.popitem(last=False)
                self.num_programs_dropped += 1
            jax.clear_caches()
        return prog

    def _compile(self, step: StepInput, samp: SamplingInput):
        if self.layer_loop == "scan":
            return self._step.lower(self.weights, self.kv, step, samp).compile()
        bare = dataclasses.replace(step, lora=None)
        x, rope, _ = jax.eval_shape(self._embed, self.weights, bare)
        lstep = dataclasses.replace(step, rope=rope)   # as _LayerByLayer passes it on
        return _LayerByLayer(
            self._embed.lower(self.weights, bare).compile(),
            self._layer.lower(self.layer_weights[0], x, self.kv, self._layer_ids[0],
                              lstep).compile(),
            self._logits.lower(self.weights, x, lstep).compile(),
            self._sample.lower(jax.eval_shape(self._logits, self.weights, x, lstep),
                               samp).compile(),
            self.layer_weights, self._layer_ids)

    def warmup(self, decode_batches=None, prefill_tokens=None, max_pages=None) -> float:
        """Compile the given buckets ahead of serving (on the null page only). Returns seconds."""
        t0 = time.perf_counter()
        S = self.page_size
        decode_batches = decode_batches or [1]
        prefill_tokens = prefill_tokens or [16]
        P = fine_bucket(max_pages or 1, _pow2_at_least(self.max_pages_per_seq))
        for kind, B, T in [("decode", max(b, self.min_decode_rows), 1) for b in decode_batches] + [("prefill", 1, t) for t in prefill_tokens]:
            step = StepInput(
                tokens=np.zeros((B, T), np.int32), positions=np.full((B, T), -1, np.int32),
                block_tables=np.zeros((B, P), np.int32), kv_lens=np.zeros((B,), np.int32),
                slot_pages=np.zeros((B * T,), np.int32), slot_offsets=np.zeros((B * T,), np.int32),
                logits_index=np.zeros((B,), np.int32))
            samp = SamplingInput(np.zeros((B,), np.float32), np.zeros((B,), np.int32),
                                 np.ones((B,), np.float32), np.zeros((B,), np.uint32),
                                 np.zeros((B,), np.int32), np.bool_(False))
            self._seen_buckets.add((kind, B, T, P))
            if self.mesh is not None and jax.process_count() > 1:
                step, samp = sharding.put_replicated((step, samp), self.mesh)
            out = self._program(step, samp)(self.weights, self.kv, step, samp)
            self.kv = out[2]
        jax.block_until_ready(self.kv.k)
        return time.perf_counter() - t0
