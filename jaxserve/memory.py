"""KV pool sizing from the device's memory, as vLLM's `--gpu-memory-utilization` does.

jaxserve may use `utilization` x each accelerator's memory for the weights, the KV pool and the
step's activations. At engine start (jaxserve/engine.py), once the weights are on the device:

  budget     = utilization x the device's memory (never above what JAX's allocator may hand out)
  pool bytes = budget - bytes in use after the weights - the largest step's bytes - reserve
  pages      = pool bytes // bytes per page (both per device under tensor parallelism)

"The largest step's bytes" are measured, not estimated: the largest decode and prefill steps are
compiled against an abstract pool (nothing allocated) and their `memory_analysis()` read
(jaxserve/runner.py, `ModelRunner.step_memory`), at two pool sizes: a step whose bytes grow with
the pool (one that copies it) is planned with that growth, so the pool and its copy fit. The reserve covers what that does not see:
the inputs of the next step in flight while one runs, adapter staging buffers, the allocator's
fragmentation.

This module is the arithmetic and the reading of `memory_stats()`; it imports no JAX, so any
object with a `memory_stats()` dict (and a `platform`) stands in for a device.

On the CPU there are no memory statistics and the pool keeps a fixed default
(`CPU_KV_CACHE_GB`): host memory is shared with the OS, other processes and the host copies of
the checkpoint, and a pool is zero-filled (touched) when created, so "90% of the RAM" would
claim tens of GB at start for a model that serves well from 1 GB.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

GiB = 2**30
MiB = 2**20

DEFAULT_UTILIZATION = 0.9
CPU_KV_CACHE_GB = 1.0
# JAX's GPU allocator claims this fraction of the memory unless XLA_PYTHON_CLIENT_MEM_FRACTION
# says otherwise (the jaxserve command line sets it from --gpu-memory-utilization).
JAX_GPU_DEFAULT_FRACTION = 0.75
GPU_PLATFORMS = ("gpu", "cuda", "rocm")
# The reserve: 2% of the budget, at least 64 MiB.
RESERVE_FRACTION = 0.02
RESERVE_MIN_BYTES = 64 * MiB


class MemoryPlanError(ValueError):
    """The model and its largest step do not fit the memory jaxserve may use."""


@dataclass(frozen=True)
class DeviceMemory:
    """What one device (the tightest of the mesh) offers, from its memory_stats()."""
    platform: str
    total_bytes: int       # the device's memory (GPU: JAX's limit / the fraction it was set to)
    limit_bytes: int       # what JAX's allocator may hand out
    in_use_bytes: int      # live buffers now


def allocator_fraction(platform: str, environ=None) -> float | None:
    """The fraction of a device's memory JAX's allocator is limited to: on GPUs
    XLA_PYTHON_CLIENT_MEM_FRACTION (JAX's default 0.75); None where the limit is the device's
    memory (TPU)."""
    if platform not in GPU_PLATFORMS:
        return None
    env = os.environ if environ is None else environ
    text = env.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    try:
        value = float(text) if text else JAX_GPU_DEFAULT_FRACTION
    except ValueError:
        return JAX_GPU_DEFAULT_FRACTION
    return value if 0 < value <= 1 else JAX_GPU_DEFAULT_FRACTION


def device_memory(devices, environ=None) -> DeviceMemory | None:
    """The memory of the tightest of `devices` (objects with memory_stats() and platform, e.g.
    jax devices): the least total and limit, the most in use. None when any device reports no
    statistics (CPU) or lacks bytes_limit / bytes_in_use."""
    out = None
    for d in devices:
        stats = d.memory_stats()
        if not stats or "bytes_limit" not in stats or "bytes_in_use" not in stats:
            return None
        platform = str(getattr(d, "platform", "unknown")).lower()
        limit, in_use = int(stats["bytes_limit"]), int(stats["bytes_in_use"])
        frac = allocator_fraction(platform, environ)
        total = int(limit / frac) if frac else limit
        mem = DeviceMemory(platform, total, limit, in_use)
        if out is None:
            out = mem
        else:
            out = DeviceMemory(out.platform, min(out.total_bytes, total),
                               min(out.limit_bytes, limit), max(out.in_use_bytes, in_use))
    return out


def budget_bytes(mem: DeviceMemory, utilization: float) -> int:
    """utilization x the device's memory, at most what JAX's allocator may hand out."""
    return min(mem.limit_bytes, int(utilization * mem.total_bytes))


def reserve_bytes(budget: int) -> int:
    return max(RESERVE_MIN_BYTES, int(RESERVE_FRACTION * budget))


def _gib(n: int) -> str:
    """n bytes in GiB, or MiB / KiB below one of those."""
    for unit, size in (("GiB", GiB), ("MiB", MiB)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 1024:.2f} KiB"


@dataclass(frozen=True)
class PoolPlan:
    """The KV pool jaxserve plans on each device, and the numbers it came from."""
    utilization: float
    total_bytes: int        # the device's memory
    budget_bytes: int       # utilization x total_bytes (capped at JAX's allocator limit)
    in_use_bytes: int       # on the device after the weights
    step_bytes: int         # the largest step's bytes besides the pool, with no pages (0: not
    #                         profiled); it needs step_bytes + step_bytes_per_page x num_pages
    reserve_bytes: int
    page_bytes: int         # one page on one device
    page_size: int          # tokens per page
    num_pages: int          # pages in the pool, the null page 0 included
    max_model_len: int
    step_bytes_per_page: float = 0.0   # what the step's bytes grow by per pool page (a step that
    #                                    copies the pool: one page's bytes)

    @property
    def step_bytes_at_plan(self) -> int:
        """The largest step's bytes beside the planned pool."""
        return int(self.step_bytes + self.step_bytes_per_page * self.num_pages)

    @property
    def pool_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    @property
    def tokens(self) -> int:
        """Tokens the pool holds (page 0 is the null page, never allocated)."""
        return (self.num_pages - 1) * self.page_size

    @property
    def sequences(self) -> int:
        """Sequences of max_model_len tokens that fit at once."""
        return (self.num_pages - 1) // math.ceil(self.max_model_len / self.page_size)

    def describe(self) -> str:
        return (f"KV pool: {self.num_pages:,} pages of {self.page_size} tokens = "
                f"{self.tokens:,} tokens = {self.sequences:,} sequences of max_model_len "
                f"{self.max_model_len:,} ({_gib(self.pool_bytes)} per device; budget "
                f"{self.utilization:g} x {_gib(self.total_bytes)} = {_gib(self.budget_bytes)}"
                f" - in use after weights {_gib(self.in_use_bytes)} - largest step "
                f"{_gib(self.step_bytes_at_plan)}{self._growth()} - reserve "
                f"{_gib(self.reserve_bytes)}; {_gib(self.page_bytes)} per page per device)")

    def _growth(self) -> str:
        if self.step_bytes_per_page <= 0:
            return ""
        return (f" (it grows with the pool, {_gib(int(self.step_bytes_per_page))} per page: "
                f"{_gib(self.step_bytes)} + {self.step_bytes_per_page / self.page_bytes:.2f} x "
                "the pool)")


def plan_pool(mem: DeviceMemory, *, utilization: float, step_bytes: int, page_bytes: int,
              page_size: int, max_model_len: int, reserve: int | None = None,
              step_bytes_per_page: float = 0.0) -> PoolPlan:
    """The pool that fits `mem` (one device's memory after the weights) beside the largest step,
    which needs step_bytes + step_bytes_per_page x the pool's pages.

    Raises MemoryPlanError, saying how much is missing and which setting to change, when the
    weights alone exceed the budget, when nothing is left for the pool, or when the pool cannot
    hold one sequence of max_model_len tokens."""
    if not 0 < utilization <= 1:
        raise MemoryPlanError(f"--gpu-memory-utilization must be in (0, 1], got {utilization}")
    if page_bytes <= 0 or page_size <= 0 or max_model_len <= 0:
        raise MemoryPlanError("page_bytes, page_size and max_model_len must be positive")
    budget = budget_bytes(mem, utilization)
    reserve = reserve_bytes(budget) if reserve is None else reserve
    fixed = f"--gpu-memory-utilization {utilization:g} x {_gib(mem.total_bytes)}"
    if mem.in_use_bytes + reserve > budget:
        missing = mem.in_use_bytes + reserve - budget
        raise MemoryPlanError(
            f"the weights (and whatever else is on the device) use {_gib(mem.in_use_bytes)}, "
            f"with the {_gib(reserve)} reserve more than the budget {_gib(budget)} ({fixed}): "
            f"{_gib(missing)} missing; raise --gpu-memory-utilization, shard the model over "
            "more devices (--tp), or serve a smaller --dtype")
    free = budget - mem.in_use_bytes - reserve - step_bytes
    per_page = page_bytes + max(0.0, step_bytes_per_page)
    pages_per_seq = math.ceil(max_model_len / page_size)
    needed = math.ceil((pages_per_seq + 1) * per_page)     # one sequence plus the null page
    if free < needed:
        raise MemoryPlanError(
            f"the KV pool gets {_gib(max(free, 0))} ({fixed} = {_gib(budget)} - weights "
            f"{_gib(mem.in_use_bytes)} - largest step {_gib(step_bytes)} - reserve "
            f"{_gib(reserve)}), less than one sequence of max_model_len {max_model_len} needs "
            f"({_gib(needed)}): {_gib(needed - max(free, 0))} missing; lower --max-model-len, "
            "--max-num-seqs or --max-prefill-tokens (a smaller largest step), or raise "
            "--gpu-memory-utilization")
    return PoolPlan(utilization=utilization, total_bytes=mem.total_bytes, budget_bytes=budget,
                    in_use_bytes=mem.in_use_bytes, step_bytes=step_bytes, reserve_bytes=reserve,
                    page_bytes=page_bytes, page_size=page_size,
                    num_pages=int(free // per_page), max_model_len=max_model_len,
                    step_bytes_per_page=max(0.0, step_bytes_per_page))
