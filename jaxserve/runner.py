"""The executor: runs a scheduler's StepPlan on the device.

  1. the step builder (jaxserve/step_builder.py, host only) turns the plan into BuiltSteps,
     one per device call, with padded arrays and the LoRA slots;
  2. adapter loads the step needs are written into the pool first;
  3. each BuiltStep becomes device inputs and runs through the compiled program for its
     shape bucket (compiled once, by the backend's StepPrograms);
  4. prefetched adapters (of requests still waiting) are copied while the device runs, their
     pool writes queued behind the step;
  5. the sampled tokens and log-probs come back per plan sequence.
`launch` does 1-4 and returns at once (device work is asynchronous); `collect` waits for 5.
The engine launches step N+1 before collecting step N: a decode of N+1 whose input token N
samples (not known on the host yet) takes it on the device, from a small buffer each call
writes its sampled tokens into (`_feed_put` / `_feed_take`, one tiny program per batch bucket).
The executor owns the pool, the prepared params and the programs; the backend
(jaxserve/backends) owns how any of them is stored or computed.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve import backends as backends_lib
from jaxserve import sharding
from jaxserve.backends.programs import StepPrograms, _LayerByLayer
from jaxserve.config import ModelConfig
from jaxserve.lora.pool import LoraBatch
from jaxserve.model.kv_cache import KVPages, StepInput
from jaxserve.model.weights import Weights
from jaxserve.sampling import MAX_BANS, MAX_LOGIT_BIAS, SamplingInput
from jaxserve.step_builder import BuiltStep, StepBuilder, pow2_at_least
from scheduler import StepPlan

log = logging.getLogger("jaxserve.runner")


def _num_maps() -> int | None:
    """Memory mappings this process holds (Linux), or None where that cannot be read."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def _map_budget() -> int | None:
    """Half of vm.max_map_count: the mappings compiled programs may take us to."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read()) // 2
    except (OSError, ValueError):
        return None


def _temp_bytes(compiled) -> int:
    ma = compiled.memory_analysis()
    return 0 if ma is None else int(ma.temp_size_in_bytes)


def _out_bytes(compiled) -> int:
    """Output bytes not aliased to a donated input (the pool's are)."""
    ma = compiled.memory_analysis()
    return 0 if ma is None else max(0, int(ma.output_size_in_bytes - ma.alias_size_in_bytes))


def _program_bytes(prog) -> int:
    """Peak bytes a compiled step adds beside its inputs: temporaries and new outputs. A step
    run layer by layer (backends/programs.py) holds the embedding call's outputs through the
    layer calls, and one call's temporaries at a time."""
    if not isinstance(prog, _LayerByLayer):
        return _temp_bytes(prog) + _out_bytes(prog)
    calls = (prog.layer, prog.logits, prog.sample)
    return _out_bytes(prog.embed) + max(_temp_bytes(c) + _out_bytes(c) for c in calls)


def _nbytes(x) -> int:
    return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


@jax.jit
def _feed_put(buf, idx, tokens):
    """buf [N] with tokens[r] written at idx[r] (idx N = a padding row: dropped)."""
    return buf.at[idx].set(tokens, mode="drop")


@jax.jit
def _feed_take(tokens, buf, src):
    """A decode call's input tokens [B, 1]: buf[src[r]] where src[r] >= 0, else tokens[r]."""
    return jnp.where((src >= 0)[:, None], buf[jnp.maximum(src, 0)][:, None], tokens)


@functools.partial(jax.jit, donate_argnums=(0,))
def _count_put(counts, slots, tokens):
    """The penalty table counts [S, V] with 1 added at (slots[r], tokens[r]) for each row r
    with a slot (>= 0) that sampled a token (not NON_FINITE)."""
    slots = jnp.where((slots >= 0) & (tokens >= 0), slots, counts.shape[0])   # S: dropped
    return counts.at[slots, jnp.maximum(tokens, 0)].add(1, mode="drop")


@functools.partial(jax.jit, donate_argnums=(0,))
def _slot_write(counts, slot, row):
    """A penalty slot written whole: its output-token counts, PROMPT_BIT on its prompt's."""
    return counts.at[slot].set(row)


class TokenLogprobs(tuple):
    """A chosen token's log-probability with its top alternatives: (logprob, [(token id,
    logprob), ...] most likely first); what `collect` gives in place of the plain float for a
    request that asks for top_logprobs."""
    __slots__ = ()

    def __new__(cls, logprob: float, top: list):
        return super().__new__(cls, (logprob, top))


@dataclasses.dataclass
class Launched:
    """A step on its way: its calls' device outputs, and where each sequence's sampled token
    sits in `feed` (a device buffer the next step's decodes read their input tokens from)."""
    plan: StepPlan
    calls: list            # (BuiltStep, tokens [B], logprobs [B]) on device
    feed: jax.Array | None = None
    # (BuiltStep, PromptScores on device) of the calls that scored prompt positions
    scores: list = dataclasses.field(default_factory=list)
    feed_index: dict = dataclasses.field(default_factory=dict)   # seq_id -> index in feed


def step_builder_for(backend, cfg: ModelConfig, *, page_size: int, max_num_seqs: int,
                     max_prefill_tokens: int, max_model_len: int, lora) -> StepBuilder:
    """The step builder of a runner on `backend` (host only: it needs no device)."""
    # Where attention reads only up to each row's kv_len, block tables are one width (pages
    # drop out of the program shapes).
    reads_padding = backend.attention_reads_padded_pages
    return StepBuilder(
        page_size=page_size, max_num_seqs=max_num_seqs, max_prefill_tokens=max_prefill_tokens,
        max_model_len=max_model_len, min_decode_rows=backend.min_decode_rows(), lora=lora,
        bucket_pages=(reads_padding(False), reads_padding(True)), vocab_size=cfg.vocab_size)


class ModelRunner:
    def __init__(self, cfg: ModelConfig, weights: Weights, *, num_pages: int | None, page_size: int,
                 max_num_seqs: int, max_prefill_tokens: int, max_model_len: int,
                 dtype="float32", backend="auto", tp: int = 1, lora=None,
                 layer_loop: str = "auto", interpret: bool | None = None,
                 consume_weights: bool = False, ep: int = 1):
        """backend: a backend object (jaxserve.backends) or its name, resolved here.
        num_pages None: no pool yet; `init_pool` makes it once its size is known (the engine
        plans it from the memory left after the weights and the largest step, `step_memory`).
        consume_weights: `weights` is given up to the backend's `prepare`, which drops each
        canonical array from it once prepared (the engine's case: weights held once).
        ep: a mixture of experts' experts split by whole experts over the tp devices (ep = tp)
        or each expert split inside (1); for a backend given by name."""
        if isinstance(backend, str):
            backend = backends_lib.select(backend, cfg, dtype, tp=tp, layer_loop=layer_loop,
                                          interpret=interpret, ep=ep)
        self.cfg, self.backend, self.lora = cfg, backend, lora   # lora: LoraRuntime or None
        self.params = backend.prepare(weights, consume=consume_weights)
        self.page_size, self.kv = page_size, None
        self.recorder = None   # multi-host leader: (name, args) -> None, see `call`
        self.builder = step_builder_for(backend, cfg, page_size=page_size,
                                        max_num_seqs=max_num_seqs,
                                        max_prefill_tokens=max_prefill_tokens,
                                        max_model_len=max_model_len, lora=lora)
        # The programs need only the pool's sharding, the same for any number of pages.
        self.programs = StepPrograms(backend, cfg, self.params, self.pool_spec(2))
        if num_pages is not None:
            self.init_pool(num_pages)
        self._compiled: collections.OrderedDict = collections.OrderedDict()   # see _program
        self.num_programs_dropped = 0
        self.num_programs_compiled = 0   # step programs compiled since start (warm-up included)
        self.num_steps = 0
        self._feed_zeros = None   # see _empty_feed
        # The penalty table (jaxserve/sampling.py): output-token counts and prompt tokens of
        # max_num_seqs slots, on the device for the runner's life; and the device-held arrays
        # a call passes for the sampling set's inputs no row of it uses (`_absent`).
        self._pen_counts = self._device(np.zeros((max_num_seqs, cfg.vocab_size), np.int32))
        self._absent_cache: dict = {}

    # -- the pool ----------------------------------------------------------------------------
    def init_pool(self, num_pages: int) -> None:
        """Create the (empty) KV pool of num_pages pages."""
        if self.recorder is not None:
            self.recorder("init_pool", (num_pages,))
        self.kv = None   # a pool made again: the old one freed first
        self.kv = self.backend.init_pool(num_pages, self.page_size)

    def pool_spec(self, num_pages: int) -> KVPages:
        """The pool of num_pages pages as shapes, dtypes and shardings only (nothing allocated)."""
        kv = jax.eval_shape(lambda: self.backend.init_pool(num_pages, self.page_size))
        if self.backend.mesh is None:
            return KVPages(k=jax.ShapeDtypeStruct(kv.k.shape, kv.k.dtype),
                           v=jax.ShapeDtypeStruct(kv.v.shape, kv.v.dtype))
        sh = sharding.kv_sharding(self.backend.mesh, kv)
        return KVPages(k=jax.ShapeDtypeStruct(kv.k.shape, kv.k.dtype, sharding=sh.k),
                       v=jax.ShapeDtypeStruct(kv.v.shape, kv.v.dtype, sharding=sh.v))

    # -- memory planning (jaxserve/memory.py) -------------------------------------------------
    def largest_shapes(self) -> list[tuple]:
        """The steps that need the most memory besides the pool: the largest decode bucket
        (most rows, widest block table), the largest prefill bucket (most token slots; of
        those, most rows, then widest table), and with adapters each of them at the largest
        LoRA bucket (the highest rank bucket, every module)."""
        shapes = self.builder.shapes(lora=False)
        dec = max((s for s in shapes if s[0] == "decode"), key=lambda s: (s[1], s[3]))
        pre = max((s for s in shapes if s[0] == "prefill"),
                  key=lambda s: (s[1] * s[2], s[1], s[3]))
        out = [dec, pre]
        if self.lora is not None:
            lb = max(self.lora.buckets(), key=lambda b: (b[0], len(b[1])))
            out += [dec + lb, pre + lb]
        return out

    def step_memory(self, shape: tuple, num_pages: int) -> int:
        """Bytes one step of bucket `shape` needs on a device besides the weights and the pool:
        its inputs, its outputs other than the (donated) pool, and its compiled temporaries;
        with adapters on one device also the slot weights it is passed, gathered by a program
        of their own (LoraRuntime.slot_weights). Read from the compiled programs'
        memory_analysis(), compiled against an abstract pool of num_pages pages: nothing is
        allocated and nothing runs."""
        kv = self.pool_spec(num_pages)
        kind, B, T, P = shape[:4]
        built = BuiltStep.empty(kind == "prefill", B, T, P)
        if len(shape) > 4:
            built.lora = self.lora.empty_slots(B, T, *shape[4:])
        step, samp = self._inputs(built)
        gather_temp = 0
        if step.lora is not None and self.backend.mesh is None:
            gather = self.lora._gather.lower(kv, step.lora).compile()
            gather_temp = _temp_bytes(gather)
            step.lora = dataclasses.replace(
                step.lora, weights=jax.eval_shape(self.lora._gather, kv, step.lora))
        prog = self.programs.compile(self.params, kv, step, samp)
        inputs = sum(_nbytes(x) for x in jax.tree.leaves((step, samp)))
        return inputs + max(gather_temp, _program_bytes(prog))

    # -- running -----------------------------------------------------------------------------
    def run(self, plan: StepPlan) -> tuple[list[int | None], list[float | None]]:
        """Run one step and wait for it. Returns, per plan sequence, the sampled token and its
        log-probability (None for sequences whose prefill chunk does not reach their last
        token)."""
        return self.collect(self.launch(plan, feed=False))

    def launch(self, plan: StepPlan, prev: Launched | None = None, feed: bool = True) -> Launched:
        """Start one step on the device and return without waiting for it. `prev`: the step
        launched before this one, when its tokens are not collected yet (its decodes' next
        input tokens are taken from it on the device). `feed`: write this step's sampled
        tokens into the feed buffer for the next step (not needed when this step is collected
        before the next is planned)."""
        later = []
        if self.lora is not None and plan.adapter_loads:
            now = [x for x in plan.adapter_loads if x[0] in plan.adapter_pages]
            later = [x for x in plan.adapter_loads if x[0] not in plan.adapter_pages]
            if now:
                self.write_adapters(self.lora.stage_host(now))
        out = Launched(plan, [])
        calls = self.builder.build(plan)
        for slot, row in self.builder.slot_writes:    # slots taken by this plan
            self.write_slot(slot, row)
        self.builder.slot_writes.clear()
        for built in calls:
            tokens_in = None
            if built.from_device:
                if prev is None or prev.feed is None:
                    raise RuntimeError("a decode's input token is pending but the step that "
                                       "samples it was not given")
                src = np.full((built.tokens.shape[0],), -1, np.int32)
                for row, seq_id in built.from_device:
                    src[row] = prev.feed_index[seq_id]
                tokens_in = _feed_take(built.tokens, prev.feed, src)
            tokens, logprobs, scores = self.call(built, tokens_in)
            out.calls.append((built, tokens, logprobs))
            if scores is not None:
                out.scores.append((built, scores))
            if feed:
                self._feed(out, built, tokens)
        if later:
            self.write_adapters(self.lora.stage_host(later))
        self.num_steps += 1
        return out

    # -- the device calls a step makes with host inputs: what a multi-host leader records ------
    # (jaxserve/distributed.py: `recorder(name, args)` is called before each, and the other
    # processes replay the same call on their shards, so the programs' collectives pair up)
    def call(self, built: BuiltStep, tokens=None):
        """One device call of a step, and its penalty counts; returns its (tokens, logprobs,
        PromptScores or None) on device. `tokens`: input tokens already on the device."""
        if self.recorder is not None:
            if tokens is not None:
                raise RuntimeError("a recorded step cannot take its tokens from the device")
            self.recorder("call", (built,))
        tokens, logprobs, scores = self._launch(built, tokens)
        if (built.pen_slots >= 0).any():   # count the tokens for the next steps' penalties
            self._pen_counts = _count_put(self._pen_counts, built.pen_slots, tokens)
        return tokens, logprobs, scores

    def write_slot(self, slot: int, row: np.ndarray) -> None:
        """A penalty slot written whole (jaxserve/sampling.py)."""
        if self.recorder is not None:
            self.recorder("write_slot", (slot, row))
        self._pen_counts = _slot_write(self._pen_counts, np.int32(slot), row)

    def write_adapters(self, staged: list) -> None:
        """Adapter loads (LoraRuntime.stage_host's host arrays) written into the pool."""
        if self.recorder is not None:
            self.recorder("write_adapters", (staged,))
        if jax.process_count() > 1:   # every process passes the same arrays: no equality check
            put = functools.partial(sharding.put_replicated, mesh=self.backend.mesh)
        else:
            put = jax.device_put
        self.kv = self.lora.write(self.kv, [(n, put(i), put(b)) for n, i, b in staged])

    def _feed(self, out: Launched, built: BuiltStep, tokens) -> None:
        """Write the call's sampled tokens into out.feed, for the next step's decodes."""
        cap = self.feed_size
        idx = np.full((built.tokens.shape[0],), cap, np.int32)
        for j, (row, i) in enumerate(zip(built.rows, built.seqs)):
            if built.samples[j]:
                idx[row] = out.feed_index[out.plan.seqs[i].seq_id] = len(out.feed_index)
        out.feed = _feed_put(self._empty_feed() if out.feed is None else out.feed, idx, tokens)

    @property
    def feed_size(self) -> int:
        """Sampled tokens one step can feed forward: one per running sequence at most."""
        return pow2_at_least(self.builder.max_num_seqs)

    def _empty_feed(self):
        """The feed buffer a step starts from: made on the device once (steps never write it
        in place; each write is a new array)."""
        if self._feed_zeros is None:
            zeros = np.zeros((self.feed_size,), np.int32)
            self._feed_zeros = jax.device_put(zeros) if self.backend.mesh is None else \
                jax.device_put(zeros, sharding.replicated(self.backend.mesh))
        return self._feed_zeros

    def collect(self, launched: Launched) -> tuple[list[int | None], list]:
        """Wait for a launched step: per plan sequence, its sampled token and log-probability
        (None where its chunk does not reach its last token); for a request that asks for
        top_logprobs, a TokenLogprobs (the log-probability and its alternatives)."""
        plan = launched.plan
        out_t: list[int | None] = [None] * len(plan.seqs)
        out_l: list = [None] * len(plan.seqs)
        for built, tokens, logprobs in launched.calls:
            top = None
            if isinstance(logprobs, tuple):   # (chosen, top ids [B, K], top logprobs [B, K])
                logprobs, top_ids, top_lps = logprobs
                if built.want_top:
                    top = np.asarray(top_ids)[built.rows], np.asarray(top_lps)[built.rows]
            tokens, logprobs = np.asarray(tokens)[built.rows], np.asarray(logprobs)[built.rows]
            for j, i in enumerate(built.seqs):
                if built.samples[j]:
                    out_t[i], out_l[i] = int(tokens[j]), float(logprobs[j])
                    n = plan.seqs[i].sampling.top_logprobs
                    if n and top is not None:
                        out_l[i] = TokenLogprobs(out_l[i], list(zip(
                            top[0][j, :n].tolist(), top[1][j, :n].tolist())))
        return out_t, out_l

    def prompt_scores(self, launched: Launched) -> dict[int, tuple]:
        """Wait for a launched step's prompt scores (jaxserve/scoring.py): seq_id -> (positions
        [n], logprob [n], rank [n], top ids [n, K], top logprobs [n, K]) of the positions it
        scored; empty when no call of the step scored any."""
        out: dict[int, tuple] = {}
        for built, sc in launched.scores:
            lp, rank, ids, tlp = (np.asarray(a) for a in (sc.logprob, sc.rank, sc.top_ids,
                                                          sc.top_logprobs))
            for row, i in zip(built.rows, built.seqs):
                at = np.nonzero(built.score_targets[row] >= 0)[0]
                if at.size:
                    out[launched.plan.seqs[i].seq_id] = (
                        built.positions[row, at], lp[row, at], rank[row, at], ids[row, at],
                        tlp[row, at])
        return out

    def _inputs(self, built: BuiltStep, tokens=None) -> tuple[StepInput, SamplingInput]:
        """A BuiltStep as the program's inputs (host arrays, the call transfers them; `tokens`:
        the input tokens already on the device, in place of built.tokens)."""
        step = StepInput(tokens=built.tokens if tokens is None else tokens,
                         positions=built.positions,
                         block_tables=built.block_tables, kv_lens=built.kv_lens,
                         slot_pages=built.slot_pages, slot_offsets=built.slot_offsets,
                         logits_index=built.logits_index, score_targets=built.score_targets)
        if built.lora is not None:
            step.lora_idx = built.lora.idx
            step.lora = LoraBatch.from_slots(built.lora, self.backend.mesh)
        samp = SamplingInput(temperature=built.temperature, top_k=built.top_k, top_p=built.top_p,
                             seeds=built.seeds, counters=built.counters,
                             logprobs=np.bool_(built.want_logprobs), **self._sampling_set(built, tokens))
        return step, samp

    def _sampling_set(self, built: BuiltStep, tokens=None) -> dict:
        """SamplingInput's fields of the full sampling set: the call's own arrays, the penalty
        table, and device-held defaults for what no row of the call uses (no transfer)."""
        B = built.tokens.shape[0]
        last = None
        if built.ban_ids is not None:    # bans after a given token: each row's last token
            if built.is_prefill:
                last = built.tokens[np.arange(B), built.logits_index][:, None]
            else:
                last = built.tokens if tokens is None else tokens
        absent = self._absent
        return dict(
            top_logprobs=np.bool_(built.want_top), min_p=built.min_p, presence=built.presence,
            frequency=built.frequency, repetition=built.repetition, pen_slots=built.pen_slots,
            counts=self._pen_counts,
            bias_ids=absent("bias_ids", B) if built.bias_ids is None else built.bias_ids,
            bias_vals=absent("bias_vals", B) if built.bias_vals is None else built.bias_vals,
            ban_ids=absent("ban", B) if built.ban_ids is None else built.ban_ids,
            ban_if=absent("ban", B) if built.ban_if is None else built.ban_if,
            last_tokens=absent("last", B) if last is None else last,
            allowed=absent("allowed", B) if built.allowed is None else built.allowed,
            use_allowed=np.bool_(built.allowed is not None))

    def _absent(self, name: str, B: int):
        """The device-held value of a sampling-set input no row uses, for B rows."""
        key = (name, B)
        if key not in self._absent_cache:
            V = self.cfg.vocab_size
            host = {"bias_ids": lambda: np.full((B, MAX_LOGIT_BIAS), -1, np.int32),
                    "bias_vals": lambda: np.zeros((B, MAX_LOGIT_BIAS), np.float32),
                    "ban": lambda: np.full((B, MAX_BANS), -1, np.int32),
                    "last": lambda: np.zeros((B, 1), np.int32),
                    "allowed": lambda: np.full((B, -(-V // 32)), 0xFFFFFFFF, np.uint32)}[name]()
            self._absent_cache[key] = self._device(host)
        return self._absent_cache[key]

    def _device(self, x: np.ndarray):
        """x on the device (replicated over the mesh under tp)."""
        if self.backend.mesh is None:
            return jax.device_put(x)
        return jax.device_put(x, sharding.replicated(self.backend.mesh))

    def _launch(self, built: BuiltStep, tokens=None):
        """Start one device call; returns its (tokens, logprobs, PromptScores or None) on
        device."""
        step, samp = self._inputs(built, tokens)
        if self.backend.mesh is not None and jax.process_count() > 1:
            step, samp = sharding.put_replicated((step, samp), self.backend.mesh)
        if step.lora is not None and self.backend.mesh is None:   # see LoraRuntime.slot_weights
            step.lora = dataclasses.replace(step.lora, weights=self.lora.slot_weights(
                self.kv, step.lora, built.lora.row_keys, cache=not built.is_prefill))
        scores = None
        if built.score_targets is None:
            tokens, logprobs, self.kv = self._program(built.shape, step, samp)(
                self.params, self.kv, step, samp)
        else:   # a program of its own (backends/programs.py), compiled when first needed
            tokens, logprobs, self.kv, scores = self._program(
                built.shape + ("scores",), step, samp)(self.params, self.kv, step, samp)
        return tokens, logprobs, scores

    def _program(self, bucket: tuple, step: StepInput, samp: SamplingInput):
        """The compiled step for this bucket, most recently used kept last.

        Every compiled program holds its machine code in memory mappings of its own (hundreds
        per program), and Linux caps a process at vm.max_map_count (65,530 by default): past
        it, compiling fails and the process crashes. When the process holds more than half
        that many mappings, the least recently used half of the programs is dropped; one needed
        again is recompiled, or read back from the persistent compilation cache.
        """
        prog = self._compiled.get(bucket)
        if prog is not None:
            self._compiled.move_to_end(bucket)
            return prog
        lora = [b for b in bucket[4:] if b != "scores"]
        log.info("compiling %s bucket batch=%d tokens=%d pages=%d%s%s", *bucket[:4],
                 f" lora rank={lora[0]} modules={','.join(lora[1])}" if lora else "",
                 " scoring prompt positions" if bucket[-1] == "scores" else "")
        prog = self.programs.compile(self.params, self.kv, step, samp)
        self.num_programs_compiled += 1
        self._compiled[bucket] = prog
        limit, n = _map_budget(), _num_maps()
        if limit is not None and n is not None and n > limit and len(self._compiled) > 1:
            # Drop the least recently used half, then JAX's own caches (they also hold every
            # executable compiled through them, so dropping ours alone frees nothing).
            for _ in range(max(1, len(self._compiled) // 2)):
                self._compiled.popitem(last=False)
                self.num_programs_dropped += 1
            jax.clear_caches()
        return prog

    def warmup(self, lora: bool = True, shapes=None, on_progress=None) -> tuple[int, float]:
        """Compile ahead of serving every program a step can need: each bucket of `shapes`
        (default: self.builder.shapes(), with the LoRA buckets when `lora` and the runner has
        adapters), and with LoRA the adapter writes and slot-weight updates. Warm-up steps hold
        only padding, so they write only the null page. on_progress(done, total, seconds) is
        called after each bucket. Returns (step programs compiled, seconds)."""
        t0 = time.perf_counter()
        if shapes is None:
            shapes = self.builder.shapes(lora=lora and self.lora is not None)
        if self.recorder is not None:
            self.recorder("warmup", (lora, list(shapes)))
        before = len(self._compiled) + self.num_programs_dropped
        for i, shape in enumerate(shapes):
            kind, B, T, P = shape[:4]
            built = BuiltStep.empty(kind == "prefill", B, T, P)
            if len(shape) > 4:
                built.lora = self.lora.empty_slots(B, T, *shape[4:])
            tokens, _, _ = self._launch(built)
            self._pen_counts = _count_put(self._pen_counts, built.pen_slots, tokens)
            feed = _feed_put(self._empty_feed(), np.full((B,), self.feed_size, np.int32), tokens)
            if kind == "decode":
                _feed_take(built.tokens, feed, np.full((B,), -1, np.int32))
            if built.lora is not None and kind == "decode" and self.backend.mesh is None:
                self.lora.warm_update(self.kv, LoraBatch.from_slots(built.lora))
            if on_progress is not None:
                jax.block_until_ready(self.kv.k)
                on_progress(i + 1, len(shapes), time.perf_counter() - t0)
        # a penalty slot's write (runs before any request takes one: slot 0 stays zeros)
        self._pen_counts = _slot_write(self._pen_counts, np.int32(0),
                                       np.zeros(self._pen_counts.shape[1:], np.int32))
        if self.lora is not None and any(len(s) > 4 for s in shapes):
            # after a step: the pool as a step leaves it is what loads are written into
            self.kv = self.lora.warm_loads(self.kv)
        jax.block_until_ready(self.kv.k)
        return len(self._compiled) + self.num_programs_dropped - before, time.perf_counter() - t0
