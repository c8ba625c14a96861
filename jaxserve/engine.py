"""The engine: owns the runner, the scheduler, the adapter registry and the request table.

A request's life:
  1. add_request(request_id, prompt_ids, params): `admission.admit` checks it, builds its
     scheduler Sequence (resolved max_tokens and seed, client id, adapter) and adds it to the
     scheduler; the output processor starts its text state.
  2. step: plan = scheduler.schedule(); runner.launch(plan) starts it on the device; the
     step launched before it is collected (its tokens), scheduler.update(plan, tokens) records
     them; the output processor detokenizes, decides every finish (length, EOS, stop tokens,
     stop strings) and returns RequestOutput deltas; the engine hands each finished sequence
     to `scheduler.finish`, which frees its pages.
Overlapped steps (`async_scheduling`, the default): step N+1 is planned, built and launched
while step N runs, and N's tokens are processed while N+1 runs, so the device never waits for
the host's scheduling, array building, detokenization or stop checks. The host learns step N's
tokens one step later: a request that stopped at N has one more token computed at N+1, which
is dropped (its pages are freed when N's tokens are processed; device work runs in launch
order, so no later step sees them reused early). Without it (or on a runner without
`launch`), each step is collected before the next is planned.
Single-threaded by design; `jaxserve.async_engine` runs it in its own thread. Built on a given
runner and tokenizer (tests/fake_runner.py) it loads and compiles nothing.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
import random
import time
from dataclasses import dataclass

import jax

from jaxserve.admission import AdmissionError, OVERLOAD, UNKNOWN, admit
from jaxserve.config import ModelConfig
from jaxserve import backends, memory
from jaxserve.dtypes import DTYPES, CHOICES as DTYPE_CHOICES, checkpoint_dtype
from jaxserve.dtypes import resolve as resolve_dtype
from jaxserve.loader import LOAD_FORMATS, LoadedModel, load_config, load_model
from jaxserve.lora.runtime import LoraRuntime, make_lora_store
from jaxserve.lora.store import AdapterLimitError
from jaxserve.model.kv_cache import bytes_per_page
from jaxserve.model.weights import cast
from jaxserve.output_processor import OutputProcessor
from jaxserve.replicas import RemoteRunner, ReplicaRunner, is_local, processes, replica_devices
from jaxserve.outputs import NON_FINITE_LOGITS, RequestOutput
from jaxserve.runner import ModelRunner
from jaxserve.sampling import NON_FINITE
from jaxserve.sampling_params import SamplingParams
from jaxserve.scoring import MAX_PROMPT_LOGPROBS, PromptScoreBuffer
from jaxserve.sharding import head_layout
from jaxserve.structured import StructuredOutputs
from jaxserve.tokenizer import Tokenizer
from scheduler import FinishReason, ReplicaScheduler, Scheduler, SchedulerConfig
from scheduler.factory import make_policy

log = logging.getLogger("jaxserve.engine")


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None          # HF checkpoint dir or .gguf; None = embedded SmolLM2-135M
    # weights, activations and KV pool: auto | float32 | bfloat16; auto resolved at engine
    # start (jaxserve/dtypes.py: bfloat16 on GPU/TPU and AMX CPUs, else float32)
    dtype: str = "auto"
    load_format: str = "auto"         # auto: the checkpoint's weights; dummy: random weights made
    #                                   on the devices (only config.json and a tokenizer needed)
    page_size: int = 16
    num_pages: int | None = None      # KV pool pages; None = from kv_cache_gb
    kv_cache_gb: float | None = None  # KV pool GiB per device; None = planned (below)
    # Fraction of each accelerator's memory for weights + KV pool + activations: the pool gets
    # what is left after the weights and the largest step (jaxserve/memory.py). On a CPU
    # (no memory statistics) the pool is memory.CPU_KV_CACHE_GB.
    gpu_memory_utilization: float = memory.DEFAULT_UTILIZATION
    max_num_seqs: int = 64
    max_prefill_tokens: int = 512     # prompt tokens per step (the prefill chunk)
    # Steps carry the running decodes and prefill chunks together (scheduler/scheduler.py);
    # off: a step is all prefill (prefill first) or all decode.
    mixed_steps: bool = True
    # Mixed steps: tokens per step, decodes first; None = max_prefill_tokens + max_num_seqs
    max_num_batched_tokens: int | None = None
    async_scheduling: bool = True     # overlap planning the next step with the running one
    # Reuse cached prompt prefixes' KV pages (scheduler/scheduler.py, "Prefix caching")
    enable_prefix_caching: bool = True
    cache_eviction_order: str = "adapters-first"   # or "prefix-first" (scheduler.EVICTION_ORDERS)
    # VTC charge of a prompt token served from cache, as a fraction of a computed one's;
    # None = scheduler.cost.DEFAULT_CACHED_TOKEN_WEIGHT (refused for fcfs/rpm when given)
    cached_token_weight: float | None = None
    max_model_len: int = 2048
    backend: str = "auto"             # auto | xla | pallas | cpu (jaxserve.backends.select)
    layer_loop: str = "auto"          # auto | scan | per-layer (the backend's choice for auto)
    scheduler: str = "fcfs"
    fair_weights: tuple[tuple[str, float], ...] = ()
    seed: int = 0
    tp: int = 1                       # tensor-parallel degree (devices per replica)
    # data-parallel replicas, each on its own tp devices with its own KV pool and batch rows,
    # all planned by one scheduler (jaxserve/replicas.py, scheduler/replicas.py)
    dp: int = 1
    # expert parallelism: 1 (each expert split over the tp devices) or tp (whole experts per
    # device); mixture-of-experts models only (jaxserve/sharding.py check_parallel)
    ep: int = 1
    # LoRA: adapters share the KV pool's pages (jaxserve/lora/pool.py)
    # distinct adapters in one batch; None = no cap (a step's cost does not depend on it: each
    # batch row has its own adapter slot, jaxserve/lora/runtime.py)
    max_loras: int | None = None
    max_lora_rank: int = 64           # largest adapter rank accepted (rows gathered per slot)
    lora_max_pages: int | None = None  # cap on pool pages adapters may hold; None = any free page

    def __post_init__(self):
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {list(DTYPE_CHOICES)}, got {self.dtype!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1], got "
                             f"{self.gpu_memory_utilization}")
        if self.kv_cache_gb is not None and self.kv_cache_gb <= 0:
            raise ValueError("kv_cache_gb must be positive")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if isinstance(self.fair_weights, dict):
            object.__setattr__(self, "fair_weights", tuple(sorted(self.fair_weights.items())))
        if self.cached_token_weight is not None and not 0 <= self.cached_token_weight <= 1:
            raise ValueError(f"cached_token_weight must be in [0, 1], got {self.cached_token_weight}")
        for f in ("page_size", "max_num_seqs", "max_prefill_tokens", "max_model_len", "tp", "dp",
                  "max_loras", "max_lora_rank", "max_num_batched_tokens"):
            if getattr(self, f) is not None and getattr(self, f) <= 0:
                raise ValueError(f"{f} must be positive")
        if self.ep not in (1, self.tp):
            raise ValueError(f"--ep {self.ep} with --tp {self.tp}: expert parallelism splits the "
                             f"experts over all tensor-parallel devices, so --ep must be 1 or "
                             f"{self.tp}")


def resolve_config_dtype(config: EngineConfig, model: LoadedModel | None = None, *,
                         read_checkpoint: bool = True) -> EngineConfig:
    """config with its dtype resolved (auto: jaxserve/dtypes.py, from the platform, the CPU and
    the checkpoint at config.model, or `model`'s), the choice and why logged."""
    path = config.model
    if model is not None:
        path = (os.path.join(model.tokenizer_dir, model.gguf_file) if model.gguf_file
                else model.tokenizer_dir)
    ckpt = checkpoint_dtype(path) if read_checkpoint else None
    name, why = resolve_dtype(config.dtype, platform=jax.default_backend(), checkpoint=ckpt)
    log.info("dtype %s [%s]", name, why)
    return dataclasses.replace(config, dtype=name)


def load_for_backend(config: EngineConfig):
    """(LoadedModel, backend): the backend that will run config.model, and the model's weights
    loaded straight into that backend's placement (sharded under tp, nothing staged whole on
    one device; random on the devices for load_format "dummy")."""
    dtype = DTYPES[config.dtype]
    backend = _select_backend(config, load_config(config.model),
                              _first_local(config) if config.dp > 1 else None)
    model = load_model(config.model, dtype, placement=backend.placement(),
                       load_format=config.load_format, seed=config.seed)
    return model, backend


def _first_local(config: EngineConfig) -> list:
    """The devices of the first replica this process holds devices of (its weights are
    loaded there; its other replicas copy them)."""
    return next(g for g in replica_devices(config.dp, config.tp) if is_local(g))


def _select_backend(config: EngineConfig, model_config: ModelConfig, devices=None):
    """config's backend for the model, on `devices` (one replica's, under dp) or the default."""
    return backends.select(config.backend, model_config, DTYPES[config.dtype], tp=config.tp,
                           layer_loop=config.layer_loop, ep=config.ep, devices=devices)


def _shape_words(shape: tuple) -> str:
    """A step bucket as 'BxTxP' (rows x tokens x pages), with its LoRA rank bucket."""
    return "x".join(map(str, shape[1:4])) + (f" lora r{shape[4]}" if len(shape) > 4 else "")


class LLMEngine:
    def __init__(self, config: EngineConfig = EngineConfig(), model: LoadedModel | None = None,
                 *, runner=None, tokenizer: Tokenizer | None = None,
                 model_config: ModelConfig | None = None, model_name: str = "model",
                 memory_devices=None):
        """Load `model` (default: config.model) and build its ModelRunner; or, given a `runner`
        (`run(plan) -> (tokens, logprobs)`), its `tokenizer` and `model_config`, load nothing.
        memory_devices: the devices whose memory_stats() size the pool (default: the runner's;
        any objects with memory_stats() and platform). self.config is `config` with its dtype
        resolved."""
        t0 = time.perf_counter()
        self.config = config = resolve_config_dtype(config, model, read_checkpoint=runner is None)
        self.model = None     # the LoadedModel without its weights (they go to the runner)
        weights, backend = None, config.backend
        if runner is None:
            if model is None:
                model, backend = load_for_backend(config)
            elif model.weights is None:
                raise ValueError(f"model {model.name!r} holds no weights (an engine took them); "
                                 "pass model=None to load config.model")
            model_config, model_name = model.config, model.name
            tokenizer = Tokenizer.from_model(model)
            # a tree of our own (the caller's arrays stay theirs): the runner's backend empties
            # it as it prepares, so the canonical weights are not held beside the prepared ones
            weights = cast(model.weights, DTYPES[config.dtype])
            self.model = model.without_weights()
            del model
        elif tokenizer is None or model_config is None:
            raise ValueError("an engine on a given runner needs its tokenizer and model_config")
        self.model_config, self.model_name, self.tokenizer = model_config, model_name, tokenizer
        self.max_model_len = min(config.max_model_len, model_config.max_position_embeddings)
        # With tp > 1, kv_cache_gb is per device: each holds 1/tp of the (head-padded) pool.
        page_bytes = (bytes_per_page(head_layout(model_config, config.tp).config,
                                     config.page_size, DTYPES[config.dtype]) // config.tp)
        num_pages = config.num_pages or (None if config.kv_cache_gb is None else
                                         max(2, int(config.kv_cache_gb * memory.GiB // page_bytes)))
        if num_pages is None and runner is not None:   # nothing of ours to measure
            num_pages = max(2, int(memory.CPU_KV_CACHE_GB * memory.GiB // page_bytes))
        # (the per-adapter page cap is set again once a planned pool's size is known)
        self.loras = make_lora_store(model_config, config, num_pages or 2)
        self._lora_sources: dict[str, str | None] = {}   # adapter -> the path it came from
        self.runner = runner or self._make_runner(weights, num_pages, backend)
        del weights
        self.memory_plan: memory.PoolPlan | None = None   # set when the pool is planned
        if num_pages is None:   # weights on the device -> profile the largest step -> the pool
            num_pages = self._plan_pool(page_bytes, memory_devices)
            self.runner.init_pool(num_pages)
            self.loras.max_pages = make_lora_store(model_config, config, num_pages).max_pages
        # dp > 1: one scheduler plans every replica's pool (num_pages: each replica's)
        make_scheduler = (Scheduler if config.dp == 1 else
                          functools.partial(ReplicaScheduler, num_replicas=config.dp))
        self.scheduler = make_scheduler(
            SchedulerConfig(num_pages=num_pages, page_size=config.page_size,
                            max_num_seqs=config.max_num_seqs,
                            max_prefill_tokens=config.max_prefill_tokens,
                            max_model_len=self.max_model_len, mixed_steps=config.mixed_steps,
                            max_num_batched_tokens=config.max_num_batched_tokens,
                            enable_prefix_caching=config.enable_prefix_caching,
                            cache_eviction_order=config.cache_eviction_order),
            policy=make_policy(config.scheduler, fair_weights=dict(config.fair_weights) or None,
                               cached_token_weight=config.cached_token_weight),
            adapter_pages=self.loras.pages_needed,
            max_adapter_pages=config.lora_max_pages, max_adapters_per_batch=config.max_loras)
        self.output = OutputProcessor(tokenizer)
        # Structured output (jaxserve/structured/outputs.py): each constrained row's token mask,
        # asked for by the step builder through mask_provider(seq) -> uint32 bitmask | None.
        self.structured = StructuredOutputs(tokenizer, model_config.vocab_size)
        self.mask_provider = self.structured.mask
        # Overlap needs a runner that can launch without waiting, and one process (a pending
        # token is a device array; across processes the plan's inputs are host data).
        self.overlap = (config.async_scheduling and hasattr(self.runner, "launch")
                        and jax.process_count() == 1)
        self._inflight = None     # (plan, launched step) whose tokens are not processed yet
        # prompt logprobs being gathered: seq_id -> (request id, PromptScoreBuffer)
        self._score_bufs: dict[int, tuple[str, PromptScoreBuffer]] = {}
        self._ids = itertools.count()
        self._rng = random.Random(config.seed)
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0
        self.num_preemptions_total = 0
        log.info("engine ready: %s, %d KV pages of %d tokens (%.1fs)",
                 self.model_name, num_pages, config.page_size, time.perf_counter() - t0)

    def _plan_pool(self, page_bytes: int, devices) -> int:
        """KV pool pages: planned from the devices' memory after the weights, beside the largest
        step (jaxserve/memory.py); where the devices report no memory statistics (CPU), the CPU
        default of memory.CPU_KV_CACHE_GB."""
        config, runner = self.config, self.runner
        if devices is None:
            mesh = runner.backend.mesh
            devices = ([jax.local_devices()[0]] if mesh is None else
                       [d for d in mesh.devices.flat if d.process_index == jax.process_index()])
        mem = memory.device_memory(devices)
        if mem is None:
            pages = max(2, int(memory.CPU_KV_CACHE_GB * memory.GiB // page_bytes))
            if jax.default_backend() != "cpu":
                log.warning("%s reports no memory statistics: KV pool of %g GiB (%d pages); "
                            "size it with --kv-cache-gb or --num-pages", jax.default_backend(),
                            memory.CPU_KV_CACHE_GB, pages)
            return pages
        t = time.perf_counter()
        kw = dict(utilization=config.gpu_memory_utilization, page_bytes=page_bytes,
                  page_size=config.page_size, max_model_len=self.max_model_len)
        # The weights fit, and the most pages the pool could get. Each largest step is compiled
        # against abstract pools of the fewest (one sequence) and the most pages: its bytes at
        # the two give what it needs beside any pool, and what it adds per page (a step that
        # copies the pool); the pool is sized for the step that leaves it the fewest pages.
        upper = memory.plan_pool(mem, step_bytes=0, **kw)
        shapes = runner.largest_shapes()
        lo, hi = -(-self.max_model_len // config.page_size) + 1, upper.num_pages
        plans = []
        for s in shapes:
            m_hi = runner.step_memory(s, hi)
            m_lo = runner.step_memory(s, lo) if hi > lo else m_hi
            per_page = max(0.0, (m_hi - m_lo) / (hi - lo)) if hi > lo else 0.0
            if per_page > 0:
                log.warning("the %s step %s needs %.0f more bytes per KV pool page (it copies "
                            "the pool): the pool is sized so that it and the copy fit",
                            s[0], _shape_words(s), per_page)
            plans.append(memory.plan_pool(mem, step_bytes=max(0, int(m_lo - per_page * lo)),
                                          step_bytes_per_page=per_page, **kw))
        self.memory_plan = min(plans, key=lambda p: p.num_pages)
        log.info("%s [--gpu-memory-utilization %g; largest steps %s profiled in %.1fs]",
                 self.memory_plan.describe(), config.gpu_memory_utilization,
                 ", ".join(map(_shape_words, shapes)), time.perf_counter() - t)
        return self.memory_plan.num_pages

    def _make_runner(self, weights, num_pages: int | None, backend) -> ModelRunner:
        if self.config.dp > 1:
            return self._make_replicas(weights, num_pages, backend)
        return self._runner(weights, num_pages, backend, consume_weights=True)

    def _runner(self, weights, num_pages: int | None, backend, *,
                consume_weights: bool) -> ModelRunner:
        """One ModelRunner on `backend` (an object, or a name resolved with the config's tp,
        layer loop and ep)."""
        config = self.config
        return ModelRunner(
            self.model_config, weights, num_pages=num_pages, page_size=config.page_size,
            max_num_seqs=config.max_num_seqs, max_prefill_tokens=config.max_prefill_tokens,
            max_model_len=self.max_model_len, dtype=DTYPES[config.dtype], backend=backend,
            tp=config.tp, layer_loop=config.layer_loop, ep=config.ep,
            lora=LoraRuntime(self.loras), consume_weights=consume_weights)

    def _make_replicas(self, weights, num_pages: int | None, backend) -> ReplicaRunner:
        """One ModelRunner per replica, each on its own tp devices (a mesh even at tp 1), each
        with its own copy of the weights, pool, step builder and LoRA slots; the adapters'
        host store is shared. The first replica this process holds devices of may have the
        backend the weights were loaded for; its other replicas copy them from there, and
        that first one (made last) consumes them. A replica on other processes only (under
        --distributed) is a RemoteRunner: host state here, devices there."""
        config, groups = self.config, replica_devices(self.config.dp, self.config.tp)
        local = [r for r, g in enumerate(groups) if is_local(g)]
        runners = {}
        for r in reversed(range(config.dp)):
            b = (backend if r == local[0] and not isinstance(backend, str) else
                 _select_backend(config, self.model_config, groups[r]))
            if r not in local:
                runners[r] = RemoteRunner(
                    self.model_config, b, page_size=config.page_size,
                    max_num_seqs=config.max_num_seqs, max_prefill_tokens=config.max_prefill_tokens,
                    max_model_len=self.max_model_len, lora=LoraRuntime(self.loras), replica=r)
            else:
                runners[r] = self._runner(weights, num_pages, b, consume_weights=r == local[0])
        return ReplicaRunner([runners[r] for r in range(config.dp)],
                             [processes(g) for g in groups])

    # -- requests ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: list[int] | str, params: SamplingParams, *,
                    client_id: str = "anonymous", adapter: str | None = None,
                    cache_salt: str | None = None, fork_of: str | None = None) -> None:
        """Admit a request (token ids; text is encoded here, for offline use); raises
        AdmissionError (a ValueError) when it is refused. Requests share cached prefix pages
        only with requests of the same `cache_salt`. `fork_of`: the id of another sample of
        the same prompt (n / best_of, same adapter and salt): this one starts from its prompt
        pages while it runs (scheduler/scheduler.py, "Samples")."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        parent = self.output.sequence(fork_of) if fork_of is not None else None
        if parent is not None and (parent.prompt_token_ids != list(ids)
                                   or (parent.adapter, parent.cache_salt) != (adapter, cache_salt)):
            raise AdmissionError(f"request {request_id!r} is not a sample of {fork_of!r}: its "
                                 "prompt, adapter or cache salt differ")
        constraint = getattr(params, "structured", None)
        if constraint is not None:
            self.structured.check(constraint)     # an invalid grammar: AdmissionError here
        seq = admit(self.scheduler, ids, params, request_id=request_id, running=self.output,
                    seq_id=next(self._ids), client_id=client_id, adapter=adapter,
                    cache_salt=cache_salt, adapters=self.loras,
                    vocab_size=self.model_config.vocab_size,
                    max_model_len=self.max_model_len, rng=self._rng, now=time.monotonic(),
                    tokenizer=self.tokenizer)
        # (read by the scheduler when it admits seq, never before the next schedule())
        seq.fork_parent = parent
        num_top = getattr(params, "prompt_logprobs", None)
        if num_top is not None:
            seq.needs_prompt_scores = True
            self._score_bufs[seq.seq_id] = (request_id, PromptScoreBuffer(
                seq.num_prompt_tokens, min(num_top, MAX_PROMPT_LOGPROBS)))
        if constraint is not None:
            self.structured.add(seq, constraint)  # compiled on the grammar thread meanwhile
        self.output.add(request_id, seq, params)
        self.num_prompt_tokens_total += seq.num_prompt_tokens

    def abort(self, request_id: str) -> None:
        seq = self.output.pop(request_id)
        if seq is not None:
            self.structured.release(seq.seq_id)
            self.scheduler.abort(seq.seq_id)
            self._score_bufs.pop(seq.seq_id, None)
        if not self.output:        # nobody reads the launched step's tokens
            self._inflight = None

    def has_unfinished(self) -> bool:
        return len(self.output) > 0

    # -- adapters: the one registry (the server asks it) ---------------------------------------
    def add_lora(self, name: str, source) -> None:
        """Register an adapter (PEFT or Orbax directory, or a LoraAdapter), validated against the
        base model; refusals are AdmissionErrors. Safe while requests run: it only enters the
        host store."""
        if name in self.loras:
            raise AdmissionError(f"an adapter named {name!r} is already loaded",
                                 param="lora_name", code="adapter_exists")
        try:
            self.loras.add(name, source)
        except AdapterLimitError as e:   # a cap on the host store (LoraStore.max_adapters, ...)
            raise AdmissionError(f"cannot load adapter {name!r}: {e}", kind=OVERLOAD,
                                 param="lora_name", code="adapter_limit_reached") from e
        except (ValueError, OSError) as e:
            raise AdmissionError(f"cannot load adapter {name!r}: {e}", param="lora_path",
                                 code="adapter_invalid") from None
        self._lora_sources[name] = source if isinstance(source, str) else None

    def remove_lora(self, name: str) -> None:
        """Unregister an adapter. Refused while any unfinished request uses it."""
        if name not in self.loras:
            raise AdmissionError(f"unknown adapter {name!r}", kind=UNKNOWN, param="lora_name",
                                 code="adapter_not_found")
        users = sum(1 for s in self.output.sequences() if s.adapter == name)
        if users:
            raise AdmissionError(f"adapter {name!r} is in use by {users} unfinished request(s); "
                                 "remove it after they finish or abort them", param="lora_name")
        self.scheduler.evict_adapter(name)
        # its cached prefixes' K/V were computed with its weights; a new adapter may take the name
        self.scheduler.forget_cached(name)
        self.loras.remove(name)
        del self._lora_sources[name]

    def list_loras(self) -> list[str]:
        return self.loras.names()

    def lora_sources(self) -> dict[str, str | None]:
        """Adapter name -> the path it was loaded from (None: given as a LoraAdapter)."""
        return {name: self._lora_sources.get(name) for name in self.loras.names()}

    # -- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Plan and launch a step; process the step before it (overlapped) or this one."""
        plan = self.scheduler.schedule(time.monotonic())
        self.num_preemptions_total += len(plan.preempted)
        prev, self._inflight = self._inflight, None
        try:
            now = None     # (plan, result, scores) of this step when processed now (synchronous)
            if not plan.is_empty:
                if not hasattr(self.runner, "launch"):
                    now = (plan, self.runner.run(plan), {})
                else:
                    # a constrained row's next mask needs this step's token: run it now
                    constrained = self.structured.any_constrained(plan.seqs)
                    if constrained:
                        self.structured.prepare(   # the step's masks, in parallel
                            [s for i, s in enumerate(plan.seqs) if plan.samples(i)])
                    overlap = self.overlap and not constrained
                    builder = getattr(self.runner, "builder", None)
                    if builder is not None:   # asked per sampling row only while any is constrained
                        builder.mask_provider = self.mask_provider if len(self.structured) else None
                    launched = self.runner.launch(plan, prev[1] if prev is not None else None,
                                                  feed=overlap)
                    if overlap:
                        self._inflight = (plan, launched)
                    else:
                        now = (plan, self.runner.collect(launched), self._prompt_scores(launched))
            outputs = []
            if prev is not None:
                outputs = self._process(prev[0], self.runner.collect(prev[1]),
                                        self._prompt_scores(prev[1]))
            if now is not None:
                outputs += self._process(*now)
            if not self.output:    # every request is done: the launched step has no reader
                self._inflight = None
            return outputs
        except BaseException:
            self._inflight = None    # its tokens are lost with the failure
            raise

    def _prompt_scores(self, launched) -> dict:
        """The prompt scores a launched step computed (seq_id -> runner.prompt_scores' tuple)."""
        return self.runner.prompt_scores(launched) if getattr(launched, "scores", None) else {}

    def _process(self, plan, result, scores=None) -> list[RequestOutput]:
        """A step's tokens -> the scheduler, the output processor, finishes. A sequence whose
        logits were not finite (its token is NON_FINITE) is finished with an error first.
        `scores`: prompt scores by seq_id (jaxserve/scoring.py), handed to a request with its
        first output."""
        for seq_id, sc in (scores or {}).items():
            if seq_id in self._score_bufs:
                self._score_bufs[seq_id][1].add(*sc)
        tokens, logprobs = result
        failed = []
        if NON_FINITE in tokens:
            tokens = list(tokens)
            for i, t in enumerate(tokens):
                if t == NON_FINITE:
                    tokens[i] = None
                    out = self._fail(plan.seqs[i])
                    if out is not None:
                        failed.append(out)
        produced = self.scheduler.update(plan, tokens, time.monotonic())
        if len(self.structured):
            produced = self._advance_grammars(produced, failed)
        self.num_generation_tokens_total += len(produced)
        lp = {s.seq_id: logprobs[i] for i, s in enumerate(plan.seqs) if tokens[i] is not None}
        outputs, finished = self.output.process(produced, lp)
        if self._score_bufs:
            self._attach_prompt_logprobs(outputs)
        for seq, reason in finished:
            self.structured.release(seq.seq_id)
            self.scheduler.finish(seq, reason)
        return failed + outputs

    def _advance_grammars(self, produced: list, failed: list) -> list:
        """Feed each constrained sequence's new token to its grammar; one the grammar refuses
        (it broke the mask) fails its request. Returns the sequences still produced."""
        kept = []
        for seq in produced:
            if self.structured.advance(seq, seq.output_token_ids[-1]):
                kept.append(seq)
            else:
                out = self._fail(seq)
                if out is not None:
                    failed.append(out)
        return kept

    def _attach_prompt_logprobs(self, outputs: list[RequestOutput]) -> None:
        """A request's first output carries its prompt logprobs (every prompt position was
        scored by the time its first token is sampled: the same step scores its last chunk)."""
        by_request = {rid: seq_id for seq_id, (rid, _) in self._score_bufs.items()}
        for out in outputs:
            seq_id = by_request.get(out.request_id)
            if seq_id is not None:
                out.prompt_logprobs = self._score_bufs.pop(seq_id)[1].result()

    def _fail(self, seq) -> RequestOutput | None:
        """Finish seq's request alone, with finish_reason "error": its logits went NaN or
        infinite. Its pages are released as an abort's, and none it registered stays in the
        prefix cache (its K/V may be non-finite as well). None if the request is already gone."""
        under = f" under adapter {seq.adapter!r}" if seq.adapter else ""
        why = self.structured.error(seq)    # its grammar failed: the mask allowed nothing
        self.structured.release(seq.seq_id)
        out = self.output.fail(
            seq, why or f"the model's output became non-finite (NaN or infinity){under}; the "
            "request was stopped", "structured_output_failed" if why else NON_FINITE_LOGITS)
        if out is None:
            return None
        log.warning("request %s: non-finite logits%s after %d tokens; finished with an error",
                    out.request_id, under, len(out.token_ids))
        self.scheduler.allocator_of(seq).forget(seq.block_table[:seq.num_registered_pages])
        self.scheduler.finish(seq, FinishReason.ABORT)
        self._score_bufs.pop(seq.seq_id, None)
        return out

    # -- convenience ---------------------------------------------------------------------------
    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams],
                 **kw) -> list[RequestOutput]:
        """Run prompts to completion (offline use and tests). Returns final outputs in order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{next(self._ids)}" for _ in prompts]
        for rid, prompt, p in zip(ids, prompts, plist):
            self.add_request(rid, prompt, p, **kw)
        final: dict[str, RequestOutput] = {}
        logprobs: dict[str, list[float]] = {rid: [] for rid in ids}
        prompt_lps: dict[str, list] = {}
        tops: dict[str, list] = {}
        while any(rid not in final for rid in ids):
            for out in self.step():
                if out.new_logprobs:
                    logprobs[out.request_id].extend(out.new_logprobs)
                if out.new_top_logprobs:
                    tops.setdefault(out.request_id, []).extend(out.new_top_logprobs)
                if out.prompt_logprobs is not None:
                    prompt_lps[out.request_id] = out.prompt_logprobs
                if out.finished:
                    final[out.request_id] = out
        for rid in ids:
            if logprobs[rid]:
                final[rid].new_logprobs = logprobs[rid]
            final[rid].prompt_logprobs = prompt_lps.get(rid)
            if rid in tops:
                final[rid].new_top_logprobs = tops[rid]
        return [final[rid] for rid in ids]

    def stats(self) -> dict:
        alloc = self.scheduler.allocator
        running = self.scheduler.running
        per_adapter_running: dict[str, int] = {}
        for s in running:
            if s.adapter:
                per_adapter_running[s.adapter] = per_adapter_running.get(s.adapter, 0) + 1
        per_adapter_waiting: dict[str, int] = {}
        for s in self.scheduler.policy.waiting():
            if s.adapter:
                per_adapter_waiting[s.adapter] = per_adapter_waiting.get(s.adapter, 0) + 1
        return {
            "num_running": len(running),
            "num_waiting": self.scheduler.num_waiting,
            "num_free_pages": alloc.num_free,
            "num_cached_pages": alloc.num_cached,
            "prefix_cache": self.scheduler.prefix_cache_stats(),
            # prompt tokens samples of one prompt (n / best_of) took from a sibling's pages
            "forked_prompt_tokens": self.scheduler.num_forked_tokens,
            "num_total_pages": alloc.num_usable,
            "kv_usage": alloc.num_used / alloc.num_usable,
            "prompt_tokens_total": self.num_prompt_tokens_total,
            "generation_tokens_total": self.num_generation_tokens_total,
            "num_preemptions_total": self.num_preemptions_total,
            "num_programs_compiled": getattr(self.runner, "num_programs_compiled", 0),
            "running_adapters": per_adapter_running,
            "waiting_adapters": per_adapter_waiting,
            "max_loras": self.config.max_loras if self.config.max_loras is not None
            else len(self.loras),
            "scheduler": self.scheduler.policy.stats(),
            # --dp: the steps each replica ran (a replica on other processes counted here)
            "replica_steps": [r.num_steps for r in getattr(self.runner, "runners", ())],
        }
