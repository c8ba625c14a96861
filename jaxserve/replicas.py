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

Across processes (`serve --distributed --dp R`, jaxserve/distributed.py) a replica's devices
are one process's, or every device of several processes (tp across hosts). The leader
(process 0) keeps the one scheduler and a runner per replica: a ModelRunner for a replica
holding its devices, a `RemoteRunner` for one on other processes. Both build their steps on
the leader; a replica's device calls go over the step channel to the processes holding its
devices, and a remote replica's first process sends each call's outputs back.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax

from jaxserve.runner import ModelRunner, step_builder_for
from scheduler import ReplicaPlan


def replica_devices(dp: int, tp: int, devices=None) -> list[list]:
    """The devices of each of dp replicas: consecutive groups of tp (on a GPU host or a TPU
    slice, neighbours share the fastest links, which the tp collectives use). dp * tp must be
    the device count: a device left out would hold nothing (ValueError naming the flags).
    Across processes a replica takes devices of one process, or all devices of each process
    it spans (ValueError otherwise): a process's replicas then copy their weights between its
    own devices, and a replica spanning hosts is all of theirs."""
    devices = list(jax.devices() if devices is None else devices)
    if dp * tp != len(devices):
        raise ValueError(
            f"--dp {dp} --tp {tp} needs dp * tp = {dp * tp} devices, but {len(devices)} are "
            f"visible ({devices[0].platform}); choose --dp and --tp whose product is "
            f"{len(devices)} (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    groups = [devices[r * tp:(r + 1) * tp] for r in range(dp)]
    per_process: dict[int, int] = {}
    for d in devices:
        per_process[d.process_index] = per_process.get(d.process_index, 0) + 1
    for r, g in enumerate(groups):
        procs = {d.process_index for d in g}
        if len(procs) > 1 and any(sum(d.process_index == p for d in g) != per_process[p]
                                  for p in procs):
            raise ValueError(
                f"--dp {dp} --tp {tp}: replica {r} would take part of the devices of processes "
                f"{sorted(procs)} ({len(per_process)} processes of "
                f"{sorted(set(per_process.values()))} devices); choose a --tp that divides a "
                "process's devices or is a multiple of them")
    return groups


def refuse_remote(dp: int, tp: int, command: str) -> None:
    """`generate` and `bench` run the whole engine in every process: a replica without a device
    in this process could not run (ValueError naming `serve --distributed`, which can)."""
    if dp > 1 and jax.process_count() > 1 and not all(
            is_local(g) for g in replica_devices(dp, tp)):
        raise ValueError(f"--dp {dp} --tp {tp} over {jax.process_count()} processes: `{command}` "
                         "runs the engine in every process, and some replicas have no device "
                         "in this one; serve it with `jaxserve serve --distributed` (process 0 "
                         "drives the replicas of the others)")


def processes(group: list) -> list[int]:
    """The processes holding a replica's devices, lowest first."""
    return sorted({d.process_index for d in group})


def is_local(group: list) -> bool:
    """Whether this process holds devices of the replica (and so runs its programs)."""
    return jax.process_index() in processes(group)


class RemoteRunner(ModelRunner):
    """A replica whose devices are all on other processes, as process 0 (the leader) sees it:
    its steps are built here (the step builder and the LoRA slots are host state, the same
    as a local replica's) and every device call goes to the replica's processes through
    `send(name, args)`; the first of them replays it and puts each call's outputs, as host
    arrays, in `results` (a queue, filled by the step channel's reader). Holds no weights,
    pool or programs. `send` and `results` are set by the leader (jaxserve/distributed.py);
    before that (building the engine) calls are not sent: the followers build their pools
    from the leader's size."""

    def __init__(self, cfg, backend, *, page_size: int, max_num_seqs: int,
                 max_prefill_tokens: int, max_model_len: int, lora, replica: int):
        self.cfg, self.backend, self.lora, self.replica = cfg, backend, lora, replica
        self.page_size, self.kv, self.recorder = page_size, None, None
        self.builder = step_builder_for(backend, cfg, page_size=page_size,
                                        max_num_seqs=max_num_seqs,
                                        max_prefill_tokens=max_prefill_tokens,
                                        max_model_len=max_model_len, lora=lora)
        self.send, self.results = None, None
        self.num_programs_dropped = self.num_programs_compiled = self.num_steps = 0
        self.num_pages = None

    def _send(self, name: str, args: tuple) -> None:
        if self.send is not None:
            self.send(name, args)

    def init_pool(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self._send("init_pool", (num_pages,))

    def warmup(self, lora: bool = True, shapes=None, on_progress=None) -> tuple[int, float]:
        """Sent to the replica's processes (they compile while the leader goes on); counted
        there, not here."""
        if shapes is None:
            shapes = self.builder.shapes(lora=lora and self.lora is not None)
        self._send("warmup", (lora, list(shapes)))
        return 0, 0.0

    def call(self, built, tokens=None):
        if tokens is not None:
            raise RuntimeError("a remote replica's step cannot take its tokens from the device")
        if self.send is None:
            raise RuntimeError(f"replica {self.replica} is on other processes: it runs only "
                               "under `serve --distributed`, from process 0")
        self.send("call", (built,))
        return _PENDING, _PENDING, (_PENDING if built.score_targets is not None else None)

    def write_slot(self, slot: int, row) -> None:
        self._send("write_slot", (slot, row))

    def write_adapters(self, staged: list) -> None:
        self._send("write_adapters", (staged,))

    def _resolve(self, launched) -> None:
        """Each call's outputs in place of the pending ones, in the order the calls were sent
        (the replica's first process returns them in that order)."""
        scores = {}
        for i, (built, tokens, logprobs) in enumerate(launched.calls):
            if tokens is _PENDING:
                tokens, logprobs, sc = self.results.get()
                launched.calls[i] = (built, tokens, logprobs)
                scores[id(built)] = sc
        launched.scores = [(b, scores.get(id(b), sc)) for b, sc in launched.scores]

    def collect(self, launched):
        self._resolve(launched)
        return super().collect(launched)

    def prompt_scores(self, launched):
        self._resolve(launched)
        return super().prompt_scores(launched)


_PENDING = object()   # a remote call's output, until its result arrives


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
    def __init__(self, runners: list[ModelRunner], processes: list[list[int]] | None = None):
        """runners: one per replica (a RemoteRunner where its devices are on other
        processes); processes: each replica's processes (default: this one)."""
        self.runners = runners
        self.processes = processes or [[jax.process_index()]] * len(runners)
        self.local = [r for r in runners if not isinstance(r, RemoteRunner)]
        self.builder = _Builders(runners)

    # what is the same on every replica: read from the first this process holds
    @property
    def backend(self):
        return self.local[0].backend

    @property
    def params(self):
        return self.local[0].params

    @property
    def kv(self):
        return self.local[0].kv

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
        return self.local[0].largest_shapes()

    def step_memory(self, shape: tuple, num_pages: int) -> int:
        return self.local[0].step_memory(shape, num_pages)

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
