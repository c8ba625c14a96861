"""Prometheus text exposition with the vLLM metric names dashboards already read.

Latency histograms are fed on the event loop (AsyncEngine's observer hooks and the streaming
handlers); gauges and token counters come from one `engine.stats()` snapshot per scrape.
"""
from __future__ import annotations

import bisect
import collections
import time

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                   5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
DELIVERY_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)   # last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += n
        self.sum += value * n
        self.count += n

    def quantile(self, q: float) -> float:
        """Upper bucket bound holding the q-quantile (coarse; for logs and tests)."""
        if not self.count:
            return 0.0
        target, acc = q * self.count, 0
        for i, c in enumerate(self.counts):
            acc += c
            if acc >= target:
                return self.buckets[i] if i < len(self.buckets) else float("inf")
        return float("inf")

    def render(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out, acc = [], 0
        for bound, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {acc}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        out.append(f"{name}_sum{{{labels}}} {self.sum:.9g}")
        out.append(f"{name}_count{{{labels}}} {self.count}")
        return out


def _esc_char(c: str) -> str:
    """One character of a label value: the format's escapes for backslash, quote and newline;
    other control characters and lone surrogates (not encodable as UTF-8) as the literal text
    \\xHH / \\uHHHH (an escaped backslash, then hex), so the page stays valid UTF-8 and one
    line per sample."""
    if c == "\\":
        return "\\\\"
    if c == '"':
        return '\\"'
    if c == "\n":
        return "\\n"
    o = ord(c)
    if o < 0x20 or 0x7F <= o < 0xA0:
        return f"\\\\x{o:02x}"
    if 0xD800 <= o < 0xE000 or o in (0x2028, 0x2029):
        return f"\\\\u{o:04x}"
    return c


def esc(value) -> str:
    """A Prometheus label value for any string (see _esc_char)."""
    text = str(value)
    if text.isprintable() and text.isascii() and "\\" not in text and '"' not in text:
        return text
    return "".join(map(_esc_char, text))


class ServingMetrics:
    """The AsyncEngine observer plus server-side counters."""

    def __init__(self):
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.itl = Histogram(LATENCY_BUCKETS)
        self.e2e = Histogram(LATENCY_BUCKETS)
        self.queue = Histogram(LATENCY_BUCKETS)
        self.delivery = Histogram(DELIVERY_BUCKETS)
        self.finished: collections.Counter = collections.Counter()   # finish reason -> count
        self.http: collections.Counter = collections.Counter()       # (route, status) -> count
        # The server's protections (docs/server.md "Timeouts and shutdown"): streams aborted
        # because the client read nothing, connections refused over --max-connections, and
        # requests cut by the header / body read timeouts (kind -> count).
        self.stream_stall_aborts = 0
        self.connections_refused = 0
        self.request_timeouts: collections.Counter = collections.Counter()
        self.started = time.time()
        self.max_clients = DEFAULT_MAX_CLIENTS   # per-client series shown (+ client="other")

    # AsyncEngine observer
    def on_first_token(self, ttft_s: float, queue_s: float) -> None:
        self.ttft.observe(ttft_s)
        self.queue.observe(queue_s)

    def on_token_gap(self, itl_s: float, num_tokens: int) -> None:
        self.itl.observe(itl_s / num_tokens, num_tokens)

    def on_finished(self, e2e_s: float, num_prompt: int, num_output: int, reason) -> None:
        self.e2e.observe(e2e_s)
        self.finished[reason or "unknown"] += 1

    # server side
    def on_delivery(self, seconds: float, num_tokens: int) -> None:
        """Engine thread handing a step's output off -> the SSE bytes written to the socket."""
        self.delivery.observe(seconds / num_tokens, num_tokens)

    def on_http(self, route: str, status: int) -> None:
        self.http[(route, status)] += 1

    def on_stream_stall(self) -> None:
        self.stream_stall_aborts += 1

    def on_connection_refused(self) -> None:
        self.connections_refused += 1

    def on_request_timeout(self, kind: str) -> None:
        """kind: "header" (first request's headers not complete in time) or "body"."""
        self.request_timeouts[kind] += 1

    # exposition
    def render(self, model: str, stats: dict, num_waiting_server: int) -> str:
        m = f'model_name="{esc(model)}"'
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]):
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lines.append(f"{name}{{{labels}}} {float(value):.9g}")

        def hist(name: str, help_: str, h: Histogram):
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} histogram")
            lines.extend(h.render(name, m))

        num = lambda k: float(stats.get(k, 0) or 0)  # noqa: E731
        metric("vllm:num_requests_running", "gauge", "Requests in the running batch.",
               [(m, num("num_running"))])
        metric("vllm:num_requests_waiting", "gauge", "Requests waiting to be scheduled.",
               [(m, num("num_waiting"))])
        metric("vllm:kv_cache_usage_perc", "gauge", "Fraction of KV-cache pages in use (0..1).",
               [(m, num("kv_usage"))])
        metric("vllm:prompt_tokens_total", "counter", "Prefilled prompt tokens.",
               [(m, num("prompt_tokens_total"))])
        metric("vllm:generation_tokens_total", "counter", "Generated tokens.",
               [(m, num("generation_tokens_total"))])
        metric("vllm:request_success_total", "counter", "Finished requests by finish reason.",
               [(f'{m},finished_reason="{esc(r)}"', c) for r, c in sorted(self.finished.items())])
        hist("vllm:time_to_first_token_seconds", "Time to first token.", self.ttft)
        hist("vllm:inter_token_latency_seconds", "Time between consecutive output tokens.", self.itl)
        hist("vllm:e2e_request_latency_seconds", "Arrival to last token.", self.e2e)
        hist("vllm:request_queue_time_seconds",
             "Arrival to the start of the step that produced the first token.", self.queue)

        per_adapter = _per_adapter(stats)
        running = sorted(a for a, s in per_adapter.items() if s.get("running"))
        waiting = sorted(a for a, s in per_adapter.items() if s.get("waiting"))
        max_lora = stats.get("max_loras", 0)
        metric("vllm:lora_requests_info", "gauge", "Adapters with running / waiting requests.",
               [(f'running_lora_adapters="{esc(",".join(running))}",'
                 f'waiting_lora_adapters="{esc(",".join(waiting))}",max_lora="{esc(max_lora)}"',
                 time.time())])
        metric("jaxserve:lora_requests_running", "gauge", "Running requests per adapter.",
               [(f'adapter="{esc(a)}"', s.get("running", 0)) for a, s in sorted(per_adapter.items())])
        metric("jaxserve:lora_requests_waiting", "gauge", "Waiting requests per adapter.",
               [(f'adapter="{esc(a)}"', s.get("waiting", 0)) for a, s in sorted(per_adapter.items())])
        prefix = stats.get("prefix_cache") or {}
        metric("vllm:prefix_cache_queries_total", "counter",
               "Prefix cache queries, in terms of number of queried tokens.",
               [(m, prefix.get("queries", 0))])
        metric("vllm:prefix_cache_hits_total", "counter",
               "Prefix cache hits, in terms of number of cached tokens.",
               [(m, prefix.get("hits", 0))])
        by_adapter = _prefix_by_adapter(prefix)
        metric("jaxserve:prefix_cache_queries_total", "counter",
               "Prefix cache queries (tokens looked up at admission) per adapter; "
               "adapter=\"\" is the base model.",
               [(f'adapter="{esc(a)}"', q) for a, (q, _) in sorted(by_adapter.items())])
        metric("jaxserve:prefix_cache_hits_total", "counter",
               "Prefix cache hits (prompt tokens served from cache) per adapter; "
               "adapter=\"\" is the base model.",
               [(f'adapter="{esc(a)}"', h) for a, (_, h) in sorted(by_adapter.items())])
        metric("jaxserve:num_cached_pages", "gauge",
               "KV-cache pages holding a registered (reusable) prefix, in use or not; "
               "the unused ones count as free and are evicted when an allocation needs them.",
               [(m, num("num_cached_pages"))])
        metric("jaxserve:num_free_pages", "gauge", "Free KV-cache pages.",
               [(m, num("num_free_pages"))])
        metric("jaxserve:num_total_pages", "gauge", "KV-cache pages in the pool.",
               [(m, num("num_total_pages"))])
        if stats.get("replica_steps"):
            metric("jaxserve:replica_steps_total", "counter",
                   "Steps each data-parallel replica ran (--dp).",
                   [(f'{m},replica="{r}"', n) for r, n in enumerate(stats["replica_steps"])])
        metric("jaxserve:step_programs_compiled_total", "counter",
               "Step programs compiled since start (warm-up included); on CPU they are "
               "compiled when a step shape is first met, each adding to the process memory.",
               [(m, num("num_programs_compiled"))])
        metric("jaxserve:server_waiting_requests", "gauge",
               "Admitted requests without a first token (the --max-waiting bound).",
               [(m, num_waiting_server)])
        per_client, num_clients, num_other = _per_client(stats, self.max_clients)
        if num_clients:
            metric("jaxserve:scheduler_clients", "gauge",
                   "Clients the scheduler policy holds state for.", [(m, num_clients)])
            metric("jaxserve:scheduler_clients_other", "gauge",
                   'Of them, those summed into client="other" (beyond the top '
                   f'{self.max_clients} by traffic).', [(m, num_other)])
        for field, samples in sorted(per_client.items()):
            metric(f"jaxserve:scheduler_client_{field}", "gauge",
                   f"Per-client scheduler value '{field}' (VTC counters, service); the "
                   f'clients with the most traffic, the rest as client="other" '
                   f"({OTHER_AGGREGATION.get(field, 'sum')}).", samples)
        hist("jaxserve:token_delivery_seconds",
             "Per streamed token: engine thread hands it off -> bytes written to the client.",
             self.delivery)
        metric("jaxserve:http_requests_total", "counter", "HTTP requests by route and status.",
               [(f'route="{esc(r)}",status="{s}"', c) for (r, s), c in sorted(self.http.items())])
        metric("jaxserve:stream_stall_aborts_total", "counter",
               "Streams aborted because the client took no bytes for --stream-stall-timeout-s.",
               [(m, self.stream_stall_aborts)])
        metric("jaxserve:connections_refused_total", "counter",
               "Connections answered 503 and closed because --max-connections were open.",
               [(m, self.connections_refused)])
        metric("jaxserve:request_timeouts_total", "counter",
               "Connections closed because a request's headers (--header-read-timeout-s) or "
               "body (--body-read-timeout-s, a 408) did not arrive in time.",
               [(f'{m},kind="{k}"', self.request_timeouts[k]) for k in ("header", "body")])
        return "\n".join(lines) + "\n"


def _per_adapter(stats: dict) -> dict[str, dict]:
    """{adapter: {"running": n, "waiting": n}} from the engine's running_adapters and
    waiting_adapters maps ({name: count})."""
    out: dict[str, dict] = collections.defaultdict(lambda: {"running": 0, "waiting": 0})
    for key, field in (("running_adapters", "running"), ("waiting_adapters", "waiting")):
        raw = stats.get(key) or {}
        if isinstance(raw, dict):
            for name, n in raw.items():
                if isinstance(n, (int, float)):
                    out[str(name)][field] = n
    return dict(out)


def _prefix_by_adapter(prefix: dict) -> dict[str, tuple[float, float]]:
    """{adapter: (queries, hits)} from the engine's prefix_cache.by_adapter map (keyed by
    adapter name, None for the base model, which is labelled "")."""
    out: dict[str, tuple[float, float]] = {}
    raw = prefix.get("by_adapter") or {}
    if isinstance(raw, dict):
        for name, qh in raw.items():
            if isinstance(qh, dict):
                out["" if name is None else str(name)] = (qh.get("queries") or 0,
                                                          qh.get("hits") or 0)
    return out


DEFAULT_MAX_CLIENTS = 20
OTHER = "other"
# A client's traffic (what ranks the clients shown): the sum of these of its fields.
TRAFFIC_FIELDS = ("input_tokens", "output_tokens", "accepted_in_window", "rejected")
# How client="other" combines a field over the clients it stands for (default: sum).
OTHER_AGGREGATION = {"counter": "min", "weight": "sum"}


def _numbers(fields: dict) -> dict[str, float]:
    """The numeric fields of one client's stats, under metric-name-safe names."""
    out = {}
    for field, value in fields.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out["".join(c if c.isascii() and c.isalnum() else "_" for c in str(field))] = value
    return out


def _per_client(stats: dict, max_clients: int = DEFAULT_MAX_CLIENTS
                ) -> tuple[dict[str, list[tuple[str, float]]], int, int]:
    """({field: [(labels, value)]}, clients, clients summed into "other") from the policy's
    per-client stats ({client: {field: num}}), found under stats['scheduler'] (optionally nested
    under a 'clients' key). The `max_clients` clients with the most traffic (TRAFFIC_FIELDS;
    ties: by name) get their own series; the rest, and a client really named "other", are
    combined into client="other" (OTHER_AGGREGATION), so the page stays bounded however many
    distinct clients (`user` values) the server sees."""
    sched = stats.get("scheduler") or {}
    clients = sched.get("clients", sched) if isinstance(sched, dict) else {}
    if not isinstance(clients, dict):
        return {}, 0, 0
    rows = [(str(c), _numbers(f)) for c, f in clients.items() if isinstance(f, dict)]
    rows.sort(key=lambda r: (-sum(r[1].get(f, 0) for f in TRAFFIC_FIELDS), r[0]))
    shown = [r for r in rows if r[0] != OTHER][:max(0, max_clients)]
    shown_names = {c for c, _ in shown}
    rest = [r for r in rows if r[0] not in shown_names]
    out: dict[str, list] = collections.defaultdict(list)
    for client, fields in sorted(shown, key=lambda r: r[0]):
        for field, value in fields.items():
            out[field].append((f'client="{esc(client)}"', value))
    if rest:
        combined: dict[str, float] = {}
        for _, fields in rest:
            for field, value in fields.items():
                how = OTHER_AGGREGATION.get(field, "sum")
                prev = combined.get(field)
                combined[field] = (value if prev is None else
                                   min(prev, value) if how == "min" else prev + value)
        for field, value in combined.items():
            out[field].append((f'client="{OTHER}"', value))
    return out, len(rows), len(rest)
