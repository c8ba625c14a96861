"""Workloads for the simulator: synthetic clients from a JSON spec, or a recorded trace.

Workload JSON:
  {"duration_s": 600,
   "clients": [{"id": "A", "rate": 1.5, "arrival": "uniform", "input_len": 256,
                "output_len": 256, "weight": 1}, ...]}
Per client: `arrival` is uniform (evenly spaced), poisson, on-off (`on_s`, `off_s`,
`start_on`; `rate` while on) or ramp (`rate_start` -> `rate_end` over the run); `process`
(uniform|poisson) spaces the requests of on-off, ramp and phases. `phases` instead of `rate`:
[{"duration_s": 300, "rate": 1.0}, ...] piecewise-constant rates. `input_len`/`output_len`:
an int, or [lo, hi] drawn uniformly. `start_s`: first possible arrival (default 0).

Shared prefixes (for prefix caching): `"shared_prefix": 512` makes the first 512 tokens of
every prompt of the client the same (a system prompt); `input_len` is still the whole prompt,
so it must exceed the prefix (each request keeps at least one token of its own). Several
clients share one prefix by naming the same `"prefix_group": "g"` (all with the same
`shared_prefix`); without a group the prefix is the client's own. The simulator makes the rest
of every prompt unique, so only the prefix can hit the cache.

Trace CSV: client,arrival_s,prompt_tokens,output_tokens and optionally prefix_id,prefix_tokens
(an empty prefix_id: no shared prefix; rows with the same prefix_id share the prefix's tokens).
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass

ARRIVALS = ("uniform", "poisson", "on-off", "ramp")


@dataclass(frozen=True)
class Request:
    client: str
    arrival_s: float
    prompt_tokens: int                 # the whole prompt, prefix included
    output_tokens: int
    prefix_id: str | None = None       # requests with the same id share their first tokens
    prefix_tokens: int = 0             # how many (< prompt_tokens); 0 without a prefix_id


class WorkloadError(ValueError):
    """A workload file or spec is malformed; the message names the problem."""


def load_workload(path: str) -> tuple[dict, dict[str, float]]:
    """Read and validate a workload JSON; returns (spec, weights from the spec)."""
    try:
        with open(path) as f:
            spec = json.load(f)
    except FileNotFoundError:
        raise WorkloadError(f"workload file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise WorkloadError(f"workload {path} is not valid JSON: {e}") from None
    validate(spec, path)
    return spec, {c["id"]: float(c.get("weight", 1.0)) for c in spec["clients"]}


def validate(spec: dict, where: str = "workload") -> None:
    if not isinstance(spec, dict) or not isinstance(spec.get("clients"), list) or not spec["clients"]:
        raise WorkloadError(f"{where}: needs a non-empty list 'clients'")
    seen = set()
    groups: dict[str, tuple[str, int]] = {}  # prefix_group -> (first client, its shared_prefix)
    for i, c in enumerate(spec["clients"]):
        if not isinstance(c, dict) or "id" not in c:
            raise WorkloadError(f"{where}: client #{i} needs an 'id'")
        if c["id"] in seen:
            raise WorkloadError(f"{where}: duplicate client id {c['id']!r}")
        seen.add(c["id"])
        arrival = c.get("arrival", "uniform")
        if arrival not in ARRIVALS:
            raise WorkloadError(f"{where}: client {c['id']!r}: arrival {arrival!r} not one of {ARRIVALS}")
        if arrival == "ramp":
            _need_numbers(c, ("rate_start", "rate_end"), where)
        elif "phases" not in c:
            _need_numbers(c, ("rate",), where)
        for key in ("input_len", "output_len"):
            v = c.get(key)
            ok = (isinstance(v, int) and v > 0) or (
                isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and x > 0 for x in v)
                and v[0] <= v[1])
            if not ok:
                raise WorkloadError(f"{where}: client {c['id']!r}: {key} must be a positive int "
                                    f"or [lo, hi], got {v!r}")
        if float(c.get("weight", 1.0)) <= 0:
            raise WorkloadError(f"{where}: client {c['id']!r}: weight must be positive")
        _validate_prefix(c, where, groups)


def _validate_prefix(c: dict, where: str, groups: dict[str, tuple[str, int]]) -> None:
    name = f"{where}: client {c['id']!r}"
    if "shared_prefix" not in c:
        if "prefix_group" in c:
            raise WorkloadError(f"{name}: prefix_group needs shared_prefix (the prefix's length "
                                "in tokens)")
        return
    n = c["shared_prefix"]
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise WorkloadError(f"{name}: shared_prefix must be a positive int (tokens), got {n!r}")
    shortest = c["input_len"] if isinstance(c["input_len"], int) else c["input_len"][0]
    if n >= shortest:
        raise WorkloadError(f"{name}: shared_prefix ({n}) must be shorter than every prompt "
                            f"(input_len includes the prefix; shortest {shortest})")
    group = c.get("prefix_group")
    if group is None:
        return
    if not isinstance(group, str) or not group:
        raise WorkloadError(f"{name}: prefix_group must be a non-empty string, got {group!r}")
    first = groups.setdefault(group, (c["id"], n))
    if first[1] != n:
        raise WorkloadError(f"{name}: prefix_group {group!r} has shared_prefix {first[1]} "
                            f"(client {first[0]!r}), not {n}: one group, one prefix")


def prefix_of(c: dict) -> tuple[str | None, int]:
    """A client spec's (prefix_id, prefix_tokens): a group's id is shared by its clients,
    otherwise the prefix is the client's own (the two kinds of id never collide)."""
    if "shared_prefix" not in c:
        return None, 0
    group = c.get("prefix_group")
    return (f"group:{group}" if group is not None else f"client:{c['id']}"), c["shared_prefix"]


def _need_numbers(c: dict, keys, where) -> None:
    for k in keys:
        if not isinstance(c.get(k), (int, float)) or c[k] < 0:
            raise WorkloadError(f"{where}: client {c['id']!r} needs a non-negative number {k!r}")


def generate(spec: dict, duration_s: float | None = None, seed: int = 0) -> list[Request]:
    """Arrivals of every client in [0, duration), sorted by time (ties: client order)."""
    validate(spec)
    duration = float(duration_s if duration_s is not None else spec.get("duration_s", 600))
    out = []
    for i, c in enumerate(spec["clients"]):
        rng = random.Random(seed * 1_000_003 + i)
        prefix_id, prefix_tokens = prefix_of(c)
        for t in _arrival_times(c, duration, rng):
            out.append((t, i, Request(c["id"], t, _length(c["input_len"], rng),
                                      _length(c["output_len"], rng), prefix_id, prefix_tokens)))
    out.sort(key=lambda x: (x[0], x[1]))
    return [r for _, _, r in out]


def _length(v, rng) -> int:
    return v if isinstance(v, int) else rng.randint(v[0], v[1])


def _rate_at(c: dict, t: float, duration: float) -> float:
    arrival = c.get("arrival", "uniform")
    if arrival == "ramp":
        return c["rate_start"] + (c["rate_end"] - c["rate_start"]) * min(t / duration, 1.0)
    if arrival == "on-off":
        period = c["on_s"] + c["off_s"]
        phase = t % period
        is_on = phase < c["on_s"] if c.get("start_on", True) else phase >= c["off_s"]
        return c["rate"] if is_on else 0.0
    if "phases" in c:
        end = 0.0
        for ph in c["phases"]:
            end += ph["duration_s"]
            if t < end:
                return ph["rate"]
        return 0.0
    return c["rate"]


def _arrival_times(c: dict, duration: float, rng: random.Random) -> list[float]:
    """Uniform: the next arrival comes once the integrated rate reaches one more request.
    Poisson: thinning of a homogeneous process at the peak rate."""
    process = c.get("process", "poisson" if c.get("arrival") == "poisson" else "uniform")
    step = 0.01  # integration step for time-varying rates (s)
    t = float(c.get("start_s", 0.0))
    times = []
    if process == "poisson":
        peak = max(_rate_at(c, x * step, duration) for x in range(int(duration / step) + 1))
        if peak <= 0:
            return times
        while True:
            t += rng.expovariate(peak)
            if t >= duration:
                return times
            if rng.random() * peak < _rate_at(c, t, duration):
                times.append(t)
    mass = 1.0  # the first request arrives at the start of the first non-zero-rate time
    while t < duration:
        r = _rate_at(c, t, duration)
        if mass >= 1.0 and r > 0:
            times.append(t)
            mass -= 1.0
        mass += r * step
        t += step
    return times


def load_trace(path: str) -> list[Request]:
    """A CSV with columns client,arrival_s,prompt_tokens,output_tokens (and optionally
    prefix_id,prefix_tokens), sorted by arrival."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise WorkloadError(f"trace file not found: {path}") from None
    need = {"client", "arrival_s", "prompt_tokens", "output_tokens"}
    if not rows or not need <= set(rows[0]):
        raise WorkloadError(f"trace {path}: needs a header with columns {sorted(need)} and rows")
    out = []
    for n, row in enumerate(rows, start=2):
        try:
            prefix_id = row.get("prefix_id") or None
            prefix_tokens = int(row["prefix_tokens"]) if prefix_id is not None else 0
            r = Request(row["client"], float(row["arrival_s"]), int(row["prompt_tokens"]),
                        int(row["output_tokens"]), prefix_id, prefix_tokens)
        except (TypeError, ValueError, KeyError):
            raise WorkloadError(f"trace {path}, line {n}: malformed row {row}") from None
        if prefix_id is not None and not 0 < r.prefix_tokens < r.prompt_tokens:
            raise WorkloadError(f"trace {path}, line {n}: prefix_tokens must be in "
                                f"[1, prompt_tokens) when prefix_id is set, got {r.prefix_tokens}")
        out.append(r)
    out.sort(key=lambda r: r.arrival_s)
    return out
