"""The engine: owns the model runner, the scheduler and per-request text state.

A request's life:
  1. add_request: tokenize, validate against the context and the pool, wrap in a scheduler
     Sequence (client id, adapter, sampling params, a seed), hand it to the scheduler.
  2. step: plan = scheduler.schedule(); tokens = runner.run(plan); scheduler.update(plan, tokens).
  3. postprocess: detokenize each new token incrementally, check EOS / stop tokens / stop
     strings, finish sequences that stopped, and return RequestOutput deltas.
Single-threaded by design; `jaxserve.async_engine` runs it in its own thread.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import random
import time
from dataclasses import dataclass

import jax.numpy as jnp

from jaxserve.loader import LoadedModel, load_model
from jaxserve.lora.runtime import LoraRuntime, make_lora_store
from jaxserve.model.kv_cache import bytes_per_page
from jaxserve.model.weights import cast
from jaxserve.outputs import RequestOutput
from jaxserve.runner import ModelRunner
from jaxserve.sharding import head_layout
from jaxserve.sampling_params import SamplingParams
from jaxserve.tokenizer import IncrementalDetokenizer, eos_token_ids, load_tokenizer
from scheduler import (FinishReason, RequestRejected, SamplingOptions, Scheduler,
                       SchedulerConfig, Sequence)
from scheduler.factory import make_policy

log = logging.getLogger("jaxserve.engine")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None          # HF checkpoint dir or .gguf; None = embedded SmolLM2-135M
    dtype: str = "float32"            # weights, activations and KV pool
    page_size: int = 16
    num_pages: int | None = None      # KV pool pages; None = from kv_cache_gb
    kv_cache_gb: float = 1.0
    max_num_seqs: int = 64
    max_prefill_tokens: int = 512
    max_model_len: int = 2048
    backend: str = "auto"             # auto | xla | pallas | cpu (jaxserve.backends.select)
    layer_loop: str = "auto"          # auto | scan | per-layer (the backend's choice for auto)
    scheduler: str = "fcfs"
    fair_weights: tuple[tuple[str, float], ...] = ()
    seed: int = 0
    tp: int = 1                       # tensor-parallel degree (devices in the mesh)
    # LoRA: adapters share the KV pool's pages (jaxserve/lora/pool.py)
    # distinct adapters in one batch; None = no cap (a step's cost does not depend on it: each
    # batch row has its own adapter slot, jaxserve/lora/runtime.py)
    max_loras: int | None = None
    max_lora_rank: int = 64           # largest adapter rank accepted (rows gathered per slot)
    lora_max_pages: int | None = None  # cap on pool pages adapters may hold; None = any free page

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if isinstance(self.fair_weights, dict):
            object.__setattr__(self, "fair_weights", tuple(sorted(self.fair_weights.items())))
        for f in ("page_size", "max_num_seqs", "max_prefill_tokens", "max_model_len", "tp",
                  "max_loras", "max_lora_rank"):
            if getattr(self, f) is not None and getattr(self, f) <= 0:
                raise ValueError(f"{f} must be positive")


@dataclass
class _Request:
    request_id: str
    seq: Sequence
    params: SamplingParams
    detok: IncrementalDetokenizer
    text: str = ""
    emitted_chars: int = 0     # chars of `text` already returned (stop-string hold-back)


class LLMEngine:
    def __init__(self, config: EngineConfig = EngineConfig(), model: LoadedModel | None = None):
        self.config = config
        dtype = DTYPES[config.dtype]
        t0 = time.perf_counter()
        self.model = model or load_model(config.model, dtype)
        weights = cast(self.model.weights, dtype)
        self.model_config = self.model.config
        self.model_name = self.model.name
        self.tokenizer = load_tokenizer(self.model)
        self.eos_ids = eos_token_ids(self.tokenizer, None if self.model.gguf_file else self.model.tokenizer_dir)
        self.max_model_len = min(config.max_model_len, self.model_config.max_position_embeddings)
        # With tp > 1, kv_cache_gb is per device: each holds 1/tp of the (head-padded) pool.
        page_bytes = (bytes_per_page(head_layout(self.model_config, config.tp).config,
                                     config.page_size, dtype) // config.tp)
        num_pages = config.num_pages or max(2, int(config.kv_cache_gb * 2**30 // page_bytes))
        self.loras = make_lora_store(self.model_config, config, num_pages)
        self.runner = ModelRunner(
            self.model_config, weights, num_pages=num_pages, page_size=config.page_size,
            max_num_seqs=config.max_num_seqs, max_prefill_tokens=config.max_prefill_tokens,
            max_model_len=self.max_model_len, dtype=dtype, backend=config.backend,
            tp=config.tp, layer_loop=config.layer_loop,
            lora=(LoraRuntime(self.loras)
                  if self.loras is not None else None))
        self.scheduler = Scheduler(
            SchedulerConfig(num_pages=num_pages, page_size=config.page_size,
                            max_num_seqs=config.max_num_seqs,
                            max_prefill_tokens=config.max_prefill_tokens,
                            max_model_len=self.max_model_len),
            policy=make_policy(config.scheduler, fair_weights=dict(config.fair_weights) or None),
            adapter_pages=self.loras.pages_needed if self.loras is not None else None,
            max_adapter_pages=config.lora_max_pages, max_adapters_per_batch=config.max_loras)
        self._requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self._rng = random.Random(config.seed)
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0
        self.num_preemptions_total = 0
        log.info("engine ready: %s, %d KV pages of %d tokens, attention=%s, layers=%s (%.1fs)",
                 self.model_name, num_pages, config.page_size, self.runner.attn_impl,
                 self.runner.layer_loop, time.perf_counter() - t0)

    # -- requests ------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"model {self.model_name} has no chat template")
        try:
            out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as e:
            raise ValueError(f"cannot apply the chat template: {e}") from None
        if hasattr(out, "keys"):  # transformers may return a BatchEncoding
            out = out["input_ids"]
        return list(out)

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt)["input_ids"])
        if not isinstance(prompt, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError("prompt must be a string or a list of token ids")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids out of range [0, {vocab}): {bad[:5]}")
        return list(prompt)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams, *,
                    client_id: str = "anonymous", adapter: str | None = None) -> None:
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already running")
        if adapter is not None and (self.loras is None or adapter not in self.loras):
            raise ValueError(f"unknown adapter {adapter!r} (loaded: {self.list_loras() or 'none'})")
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"this model's maximum context length is {self.max_model_len} tokens, but "
                f"{len(ids) + params.max_tokens} were requested ({len(ids)} in the prompt, "
                f"{params.max_tokens} for the completion)")
        seq = Sequence(seq_id=next(self._ids), prompt_token_ids=ids, max_tokens=params.max_tokens,
                       client_id=client_id, adapter=adapter, arrival_time=time.monotonic(),
                       sampling=SamplingOptions(
                           temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                           seed=(params.seed if params.seed is not None
                                 else self._rng.getrandbits(32)) & 0xFFFFFFFF,
                           logprobs=params.logprobs))
        self.scheduler.add(seq, time.monotonic())  # may raise RequestRejected
        self._requests[request_id] = _Request(request_id, seq, params,
                                              IncrementalDetokenizer(self.tokenizer, ids))
        self.num_prompt_tokens_total += len(ids)

    # -- adapters ------------------------------------------------------------------------------
    def add_lora(self, name: str, path) -> None:
        """Register an adapter (PEFT or Orbax directory, or a LoraAdapter); validated against the
        base model. Safe while requests run: it only enters the host store."""
        if self.loras is None:
            raise ValueError("LoRA adapters are not supported with tensor parallelism (tp > 1) yet")
        self.loras.add(name, path)

    def remove_lora(self, name: str) -> None:
        """Unregister an adapter. Refused while any unfinished request uses it."""
        if self.loras is None or name not in self.loras:
            raise KeyError(f"unknown adapter {name!r}")
        users = sum(1 for r in self._requests.values() if r.seq.adapter == name)
        if users:
            raise ValueError(f"adapter {name!r} is in use by {users} unfinished request(s); "
                             "remove it after they finish or abort them")
        self.scheduler.adapters.evict(name)
        self.loras.remove(name)

    def list_loras(self) -> list[str]:
        return self.loras.names() if self.loras is not None else []

    def abort(self, request_id: str) -> None:
        req = self._requests.pop(request_id, None)
        if req is not None and not req.seq.is_finished:
            self.scheduler.abort(req.seq.seq_id)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    # -- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        now = time.monotonic()
        plan = self.scheduler.schedule(now)
        self.num_preemptions_total += len(plan.preempted)
        if plan.is_empty:
            return []
        tokens, logprobs = self.runner.run(plan)
        produced = self.scheduler.update(plan, tokens, time.monotonic())
        lp = {plan.seqs[i].seq_id: logprobs[i] for i in range(len(plan.seqs)) if tokens[i] is not None}
        self.num_generation_tokens_total += len(produced)
        by_seq = {r.seq.seq_id: r for r in self._requests.values()}
        return [self._postprocess(by_seq[s.seq_id], lp[s.seq_id]) for s in produced
                if s.seq_id in by_seq]

    def _postprocess(self, req: _Request, logprob: float) -> RequestOutput:
        seq, p = req.seq, req.params
        tok = seq.output_token_ids[-1]
        stopped_by_token = (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids
        if not stopped_by_token or seq.is_finished:
            req.text += req.detok.step(seq.token_ids)
        hit = self._find_stop(req) if p.stop else None
        if hit is not None:
            req.text = req.text[:hit]
            self.scheduler.finish(seq, FinishReason.STOP)
        elif stopped_by_token and not seq.is_finished:
            self.scheduler.finish(seq, FinishReason.STOP)
        if seq.is_finished and hit is None:
            req.text += req.detok.flush(seq.token_ids) if not stopped_by_token else ""
        # Hold back a tail that might still become a stop string.
        hold = 0 if seq.is_finished else max((len(s) for s in p.stop), default=1) - 1
        upto = max(req.emitted_chars, len(req.text) - hold)
        new_text = req.text[req.emitted_chars:upto]
        req.emitted_chars = upto
        out = RequestOutput(
            request_id=req.request_id, new_token_ids=[tok], new_text=new_text, text=req.text[:upto],
            token_ids=list(seq.output_token_ids), num_prompt_tokens=seq.num_prompt_tokens,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason.value if seq.is_finished else None,
            new_logprobs=[logprob] if p.logprobs else None)
        if seq.is_finished:
            del self._requests[req.request_id]
        return out

    @staticmethod
    def _find_stop(req: _Request) -> int | None:
        """Index where the output text must be cut, if a stop string appeared."""
        p = req.params
        start = max(0, req.emitted_chars - max(len(s) for s in p.stop))
        best = None
        for s in p.stop:
            i = req.text.find(s, start)
            if i >= 0:
                cut = i + len(s) if p.include_stop_str_in_output else i
                best = cut if best is None else min(best, cut)
        return best

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
        while any(rid not in final for rid in ids):
            for out in self.step():
                if out.new_logprobs:
                    logprobs[out.request_id].extend(out.new_logprobs)
                if out.finished:
                    final[out.request_id] = out
        for rid in ids:
            if logprobs[rid]:
                final[rid].new_logprobs = logprobs[rid]
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
            "num_total_pages": alloc.num_usable,
            "kv_usage": alloc.num_used / alloc.num_usable,
            "prompt_tokens_total": self.num_prompt_tokens_total,
            "generation_tokens_total": self.num_generation_tokens_total,
            "num_preemptions_total": self.num_preemptions_total,
            "running_adapters": per_adapter_running,
            "waiting_adapters": per_adapter_waiting,
            "scheduler": self.scheduler.policy.stats(),
        }
