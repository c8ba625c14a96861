"""Data parallelism (`--dp R --tp T`): R model replicas, each on its own T devices, run the
per-replica plans of one scheduler (scheduler/replicas.py).

  1. the engine gets one `ReplicaPlan` per step (one StepPlan per replica);
  2. `launch` hands each replica's plan to that replica's ModelRunner: its step builder,
     its pool, its compiled programs on its own device group; JAX dispatch is asynchronous,
     so the replicas' device work runs concurrently (disjoint devices, no collective between
     replicas);
  3. `collect` waits for each and returns the tokens in the ReplicaPlan's order.
A replica's decode takes its pending input token from the same replica's previous step
(a sequence never changes replica while it runs: re-admitted after a preemption it
recomputes its pages, wherever it lands).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax

from jaxserve.runner import ModelRunner
from scheduler import ReplicaPlan


def replica_devices(dp: int, tp: int, devices=None) -> list[list]:
    """The devices of each of dp replicas: consecutive groups of tp (on a GPU host or a TPU
    slice, neighbours share the fastest links, which the tp collectives use). dp * tp must be
    the device count: a device left out would hold nothing (ValueError naming the flags)."""
    if jax.process_count() > 1:
        raise ValueError(f"--dp {dp} with {jax.process_count()} processes (--distributed): "
                         "data-parallel replicas run in one process only; use --tp across hosts")
    devices = list(jax.devices() if devices is None else devices)
    if dp * tp != len(devices):
        raise ValueError(
            f"--dp {dp} --tp {tp} needs dp * tp = {dp * tp} devices, but {len(devices)} are "
            f"visible ({devices[0].platform}); choose --dp and --tp whose product is "
            f"{len(devices)} (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    return [devices[r * tp:(r + 1) * tp] for r in range(dp)]


@dataclass
class ReplicaLaunched:
    """A step on its way on every replica (None where a replica's plan is empty)."""
    plan: ReplicaPlan
    parts: list

    @property
    def scores(self) -> bool:
        return any(p is not None and p.scores for p in self.parts)


class _Builders:
    """The replicas' step builders; setting `mask_provider` sets it on each."""

    def __init__(self, runners: list[ModelRunner]):
        object.__setattr__(self, "_runners", runners)

    def __setattr__(self, name, value):
        for r in self._runners:
            setattr(r.builder, name, value)

    def __getattr__(self, name):
        return getattr(self._runners[0].builder, name)


class ReplicaRunner:
    def __init__(self, runners: list[ModelRunner]):
        self.runners = runners
        self.builder = _Builders(runners)

    # what is the same on every replica: read from the first
    @property
    def backend(self):
        return self.runners[0].backend

    @property
    def params(self):
        return self.runners[0].params

    @property
    def kv(self):
        return self.runners[0].kv

    @property
    def num_programs_compiled(self) -> int:
        return sum(r.num_programs_compiled for r in self.runners)

    @property
    def num_programs_dropped(self) -> int:
        return sum(r.num_programs_dropped for r in self.runners)

    @property
    def num_steps(self) -> int:
        return self.runners[0].num_steps

    def init_pool(self, num_pages: int) -> None:
        for r in self.runners:
            r.init_pool(num_pages)

    def largest_shapes(self) -> list[tuple]:
        return self.runners[0].largest_shapes()

    def step_memory(self, shape: tuple, num_pages: int) -> int:
        return self.runners[0].step_memory(shape, num_pages)

    def warmup(self, lora: bool = True, shapes=None, on_progress=None) -> tuple[int, float]:
        done = [r.warmup(lora, shapes, on_progress) for r in self.runners]
        return sum(n for n, _ in done), sum(t for _, t in done)

    # -- running ---------------------------------------------------------------------------------
    def run(self, plan: ReplicaPlan):
        return self.collect(self.launch(plan, feed=False))

    def launch(self, plan: ReplicaPlan, prev: ReplicaLaunched | None = None,
               feed: bool = True) -> ReplicaLaunched:
        parts = []
        for r, (runner, p) in enumerate(zip(self.runners, plan.plans)):
            before = prev.parts[r] if prev is not None else None
            parts.append(runner.launch(p, before, feed=feed)
                         if p.seqs or p.adapter_loads else None)
        return ReplicaLaunched(plan, parts)

    def collect(self, launched: ReplicaLaunched) -> tuple[list, list]:
        tokens, logprobs = [], []
        for runner, p, part in zip(self.runners, launched.plan.plans, launched.parts):
            t, lp = runner.collect(part) if part is not None else ([], [])
            tokens += t
            logprobs += lp
        return tokens, logprobs

    def prompt_scores(self, launched: ReplicaLaunched) -> dict:
        out = {}
        for runner, part in zip(self.runners, launched.parts):
            if part is not None and part.scores:
                out.update(runner.prompt_scores(part))
        return out
