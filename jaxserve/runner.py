"""The executor: runs a scheduler's StepPlan on the device.

  1. the step builder (jaxserve/step_builder.py, host only) turns the plan into BuiltSteps,
     one per device call, with padded arrays and the LoRA slots;
  2. adapter loads the step needs are written into the pool first;
  3. each BuiltStep becomes device inputs and runs through the compiled program for its
     shape bucket (compiled once, by the backend's StepPrograms);
  4. prefetched adapters (of requests still waiting) are copied while the device runs, their
     pool writes queued behind the step;
  5. the sampled tokens and log-probs come back per plan sequence.
The executor owns the pool, the prepared params and the programs; the backend
(jaxserve/backends) owns how any of them is stored or computed.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import time

import jax
import numpy as np

from jaxserve import backends as backends_lib
from jaxserve import sharding
from jaxserve.backends.programs import StepPrograms
from jaxserve.config import ModelConfig
from jaxserve.lora.pool import LoraBatch
from jaxserve.model.kv_cache import StepInput
from jaxserve.model.weights import Weights
from jaxserve.sampling import SamplingInput
from jaxserve.step_builder import BuiltStep, StepBuilder
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


class ModelRunner:
    def __init__(self, cfg: ModelConfig, weights: Weights, *, num_pages: int, page_size: int,
                 max_num_seqs: int, max_prefill_tokens: int, max_model_len: int,
                 dtype="float32", backend="auto", tp: int = 1, lora=None,
                 layer_loop: str = "auto", interpret: bool | None = None):
        """backend: a backend object (jaxserve.backends) or its name, resolved here."""
        if isinstance(backend, str):
            backend = backends_lib.select(backend, cfg, dtype, tp=tp, layer_loop=layer_loop,
                                          interpret=interpret)
        self.cfg, self.backend, self.lora = cfg, backend, lora   # lora: LoraRuntime or None
        self.params = backend.prepare(weights)
        self.kv = backend.init_pool(num_pages, page_size)
        self.builder = StepBuilder(
            page_size=page_size, max_num_seqs=max_num_seqs, max_prefill_tokens=max_prefill_tokens,
            max_model_len=max_model_len, min_decode_rows=backend.min_decode_rows(), lora=lora)
        self.programs = StepPrograms(backend, cfg, self.params, self.kv)
        self._compiled: collections.OrderedDict = collections.OrderedDict()   # see _program
        self.num_programs_dropped = 0
        self.num_steps = 0

    # -- running -----------------------------------------------------------------------------
    def run(self, plan: StepPlan) -> tuple[list[int | None], list[float | None]]:
        """Run one step. Returns, per plan sequence, the sampled token and its log-probability
        (None for sequences whose prefill chunk does not reach their last token)."""
        later = []
        if self.lora is not None and plan.adapter_loads:
            now = [x for x in plan.adapter_loads if x[0] in plan.adapter_pages]
            later = [x for x in plan.adapter_loads if x[0] not in plan.adapter_pages]
            if now:
                self.kv = self.lora.write(self.kv, self.lora.stage(now))
        calls = [(built, self._launch(built)) for built in self.builder.build(plan)]
        if later:
            self.kv = self.lora.write(self.kv, self.lora.stage(later))
        out_t: list[int | None] = [None] * len(plan.seqs)
        out_l: list[float | None] = [None] * len(plan.seqs)
        for built, (tokens, logprobs) in calls:
            tokens, logprobs = np.asarray(tokens)[built.rows], np.asarray(logprobs)[built.rows]
            for j, i in enumerate(built.seqs):
                if built.samples[j]:
                    out_t[i], out_l[i] = int(tokens[j]), float(logprobs[j])
        self.num_steps += 1
        return out_t, out_l

    def _inputs(self, built: BuiltStep) -> tuple[StepInput, SamplingInput]:
        """A BuiltStep as the program's inputs (host arrays; the call transfers them)."""
        step = StepInput(tokens=built.tokens, positions=built.positions,
                         block_tables=built.block_tables, kv_lens=built.kv_lens,
                         slot_pages=built.slot_pages, slot_offsets=built.slot_offsets,
                         logits_index=built.logits_index)
        if built.lora is not None:
            step.lora_idx = built.lora.idx
            step.lora = LoraBatch.from_slots(built.lora, self.backend.mesh)
        samp = SamplingInput(temperature=built.temperature, top_k=built.top_k, top_p=built.top_p,
                             seeds=built.seeds, counters=built.counters,
                             logprobs=np.bool_(built.want_logprobs))
        return step, samp

    def _launch(self, built: BuiltStep):
        """Start one device call; returns its (tokens, logprobs) on device."""
        step, samp = self._inputs(built)
        if self.backend.mesh is not None and jax.process_count() > 1:
            step, samp = sharding.put_replicated((step, samp), self.backend.mesh)
        if step.lora is not None and self.backend.mesh is None:   # see LoraRuntime.slot_weights
            step.lora = dataclasses.replace(step.lora, weights=self.lora.slot_weights(
                self.kv, step.lora, built.lora.row_keys, cache=not built.is_prefill))
        tokens, logprobs, self.kv = self._program(built.shape, step, samp)(
            self.params, self.kv, step, samp)
        return tokens, logprobs

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
        log.info("compiling %s bucket batch=%d tokens=%d pages=%d%s", *bucket[:4],
                 f" lora rank={bucket[4]} modules={','.join(bucket[5])}" if len(bucket) > 4 else "")
        prog = self.programs.compile(self.params, self.kv, step, samp)
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

    def warmup(self, decode_batches=(1,), prefill_tokens=(16,), max_pages: int = 1) -> float:
        """Compile the given buckets ahead of serving (their steps write only the null page).
        Returns seconds."""
        t0 = time.perf_counter()
        b = self.builder
        P = b.pages_bucket(max_pages)
        shapes = ([(False, b.decode_rows_bucket(n), 1) for n in decode_batches]
                  + [(True, 1, b.prefill_tokens_bucket(t)) for t in prefill_tokens])
        for is_prefill, B, T in shapes:
            self._launch(BuiltStep.empty(is_prefill, B, T, P))
        jax.block_until_ready(self.kv.k)
        return time.perf_counter() - t0
