"""Automatic prefix caching over HTTP: jaxserve with caching off and on, and vLLM's CPU build
with caching on, on workloads whose prompts share prefixes (and one where none do), in one run.
Each server in turn is launched, waited for, warmed up, measured and stopped (scripts/
bench_peers.py's machinery); then one markdown table and the off/on ratios are printed and
everything is written as JSON.

  .venv/bin/python scripts/bench_prefix.py                      # jaxserve-off, jaxserve-on, vllm
  .venv/bin/python scripts/bench_prefix.py --quick              # smoke run, jaxserve only
  .venv/bin/python scripts/bench_prefix.py --servers jaxserve-off,jaxserve-on@<commit>,vllm-off

Workloads (streaming /v1/completions, base model, temperature 0, `ignore_eos`, seeded prompts of
random words cut to exact lengths under the SmolLM2 tokenizer):
  multiturn  T tenants, each with its own system prompt (400-512 tokens), C conversations per
             tenant of K turns: turn k's prompt is the system prompt, the earlier turns (each
             user message and the text the server generated for it) and a new user message
             (40-64 tokens); 32 output tokens. A fixed number of conversations run at once (in
             tenant round-robin order), each one's turns in sequence; `user` = the tenant.
  fewshot    one 600-token few-shot prefix + a distinct 16-32-token question per request, a fixed
             number in flight; 32 output tokens.
  nohit      distinct 256-token prompts (pairwise different first token ids: no shared prefix),
             all at once; 32 output tokens: caching on must not cost throughput.
Per server and workload: TTFT p50/p90 (client side: request sent -> first token), output tok/s
(all output tokens / wall time) and the prefix-cache hit rate from the server's /metrics scraped
before and after (hits / queries, both in prompt tokens; jaxserve:
jaxserve_prefix_cache_{queries,hits}_total or its per-adapter jaxserve:prefix_cache_* samples
summed, vLLM: vllm:prefix_cache_{queries,hits}_total).

Servers: `jaxserve-off` (`--no-enable-prefix-caching`), `jaxserve-on` (jaxserve's default,
caching on), either with `@REF` (that git ref, as bench_peers' jaxserve@REF), `vllm`
(/work/peers/vllm-venv, `--enable-prefix-caching`), `vllm-off` (`--no-enable-prefix-caching`).
jaxserve gets `--kv-cache-gb` equal to vLLM's VLLM_CPU_KVCACHE_SPACE (2 GiB), so both keep the
same number of cached tokens at most.

Warm-up (each server, before measuring): every workload once with its own prompts (other system
prompts, another few-shot prefix, other distinct prompts; same lengths, same concurrency) -- the
shapes jaxserve compiles lazily on CPU, without putting the measured prefixes in the cache.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import re
import shlex
import subprocess
import sys
import time
from types import SimpleNamespace

import aiohttp

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
from bench_peers import (Server, add_server_arguments, define, load_tokenizer,  # noqa: E402
                         log, make_prompts, stream_one, tree_cpu_seconds, write_report)
from bench_peers import summarize as summarize_streams  # noqa: E402
from bench_serving import free_port, pct  # noqa: E402

DEFAULT_SERVERS = "jaxserve-off,jaxserve-on,vllm"
QUICK_SERVERS = "jaxserve-off,jaxserve-on"
WORKLOADS = ("multiturn", "fewshot", "nohit")


# ------------------------------------------------------------------ workloads (pure)
def exact_text(tok, length: int, seed) -> str:
    """One text of exactly `length` tokens under `tok` (bench_peers.make_prompts)."""
    return make_prompts(tok, 1, length, seed)[0]


def build_multiturn(tok, tenants: int, convs_per_tenant: int, turns: int,
                    system_len: tuple[int, int], user_len: tuple[int, int], seed,
                    length_seed=None) -> list[dict]:
    """Conversations in the order they start (tenant round-robin: t0c0, t1c0, ..., t0c1, ...).
    Each: {"tenant", "conv", "system", "users": [turns user messages]}. Texts come from `seed`,
    their lengths (drawn from the inclusive ranges) from `length_seed` (default: `seed`): the
    warm-up takes other texts of the same lengths, so it meets the same step shapes."""
    rng = random.Random(f"multiturn-{seed if length_seed is None else length_seed}")
    systems = [exact_text(tok, rng.randint(*system_len), f"{seed}-sys-{t}")
               for t in range(tenants)]
    out = []
    for c in range(convs_per_tenant):
        for t in range(tenants):
            users = [exact_text(tok, rng.randint(*user_len), f"{seed}-user-{t}-{c}-{k}")
                     for k in range(turns)]
            out.append({"tenant": f"tenant{t}", "conv": c, "system": systems[t], "users": users})
    return out


def turn_prompt(conv: dict, k: int, generated: list[str]) -> str:
    """Turn k's prompt: the system prompt, turns 0..k-1 (user message + the text generated for
    it) and user message k, with the answer to come after 'Assistant:'."""
    parts = [conv["system"]]
    for i in range(k):
        parts.append(f"\n\nUser: {conv['users'][i]}\nAssistant:{generated[i]}")
    parts.append(f"\n\nUser: {conv['users'][k]}\nAssistant:")
    return "".join(parts)


def build_fewshot(tok, n: int, prefix_len: int, question_len: tuple[int, int], seed,
                  length_seed=None) -> list[str]:
    """`n` prompts: one shared few-shot prefix of `prefix_len` tokens + a distinct question
    (lengths from `length_seed`, default `seed`, as in build_multiturn)."""
    rng = random.Random(f"fewshot-{seed if length_seed is None else length_seed}")
    prefix = exact_text(tok, prefix_len, f"{seed}-fewshot-prefix")
    return [f"{prefix}\n\nQ: {exact_text(tok, rng.randint(*question_len), f'{seed}-q-{i}')}\nA:"
            for i in range(n)]


def build_distinct(tok, n: int, length: int, seed, max_attempts: int = 200) -> list[str]:
    """`n` prompts of exactly `length` tokens whose first token ids differ pairwise (no two share
    any prefix)."""
    out, firsts = [], set()
    for i in range(n):
        for attempt in range(max_attempts):
            text = exact_text(tok, length, f"{seed}-distinct-{i}-{attempt}")
            first = tok(text, add_special_tokens=False)["input_ids"][0]
            if first not in firsts:
                firsts.add(first)
                out.append(text)
                break
        else:
            raise ValueError(f"no prompt with a new first token after {max_attempts} tries "
                             f"({len(firsts)} first tokens used); ask for fewer prompts")
    return out


def build_all(tok, a, seed, length_seed=None) -> dict:
    """The three workloads' prompts for arguments `a` (the measured set or, with another seed
    and the measured set's length seed, the warm-up's)."""
    return {
        "multiturn": build_multiturn(tok, a.tenants, a.convs_per_tenant, a.turns,
                                     (a.system_min, a.system_max), (a.user_min, a.user_max), seed,
                                     length_seed),
        "fewshot": build_fewshot(tok, a.fewshot_requests, a.fewshot_prefix,
                                 (a.question_min, a.question_max), seed, length_seed),
        "nohit": build_distinct(tok, a.nohit_requests, a.nohit_len, seed),
    }


# ------------------------------------------------------------------ /metrics (pure)
SAMPLE_RE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
LABEL_RE = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')

# (queries, hits) counter names per server kind, first found wins
COUNTERS = {
    "jaxserve": [("jaxserve_prefix_cache_queries_total", "jaxserve_prefix_cache_hits_total"),
                 ("jaxserve:prefix_cache_queries_total", "jaxserve:prefix_cache_hits_total"),
                 ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total")],
    "vllm": [("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"),
             ("vllm:gpu_prefix_cache_queries_total", "vllm:gpu_prefix_cache_hits_total")],
}


def parse_metrics(text: str) -> list[tuple[str, dict, float]]:
    """Prometheus text exposition -> [(name, labels, value)] (comments and bad lines skipped)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = SAMPLE_RE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        labels = {k: v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
                  for k, v in LABEL_RE.findall(m.group(2) or "")}
        out.append((m.group(1), labels, value))
    return out


def counter_total(samples, name: str) -> float | None:
    """A counter's total: the sum of its samples without an `adapter` label (the totals; summed
    over e.g. vLLM's `engine` label), else of all its per-adapter samples; None if absent."""
    found = [(labels, v) for n, labels, v in samples if n == name]
    if not found:
        return None
    plain = [v for labels, v in found if "adapter" not in labels]
    return sum(plain) if plain else sum(v for _, v in found)


def prefix_counters(samples, kind: str) -> dict | None:
    """{"queries", "hits", "names"} of a server's prefix-cache counters, None if it has none."""
    for q_name, h_name in COUNTERS.get(kind, []):
        q, h = counter_total(samples, q_name), counter_total(samples, h_name)
        if q is not None and h is not None:
            return {"queries": q, "hits": h, "names": [q_name, h_name]}
    return None


def hit_rate(before: dict | None, after: dict | None) -> dict | None:
    """Tokens queried and hit between two prefix_counters readings, and hits / queries."""
    if not before or not after:
        return None
    q, h = after["queries"] - before["queries"], after["hits"] - before["hits"]
    return {"queried_tokens": int(q), "hit_tokens": int(h),
            "rate": round(h / q, 4) if q > 0 else None}


# ------------------------------------------------------------------ client
def session(timeout_s: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                 timeout=aiohttp.ClientTimeout(total=timeout_s))


async def run_multiturn(url, model, convs, out_len, concurrency, timeout_s) -> tuple[list, float]:
    """`concurrency` workers take conversations in order; each runs its turns in sequence, the
    text generated for a turn going into the next turn's prompt."""
    results, queue = [], list(enumerate(convs))
    queue.reverse()

    async def worker(sess):
        while queue:
            ci, conv = queue.pop()
            generated = []
            for k in range(len(conv["users"])):
                r = await stream_one(sess, url, model, turn_prompt(conv, k, generated),
                                     out_len, user=conv["tenant"])
                r.update(conv=ci, turn=k, tenant=conv["tenant"])
                results.append(r)
                if r["status"] != 200:
                    break
                generated.append(r["text"])

    async with session(timeout_s) as sess:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(sess) for _ in range(min(concurrency, len(convs)))))
        return results, time.perf_counter() - t0


async def run_pool(url, model, prompts, out_len, concurrency, timeout_s) -> tuple[list, float]:
    """The prompts in order, `concurrency` in flight (all at once when it is >= their number)."""
    results, queue = [None] * len(prompts), list(range(len(prompts)))[::-1]

    async def worker(sess):
        while queue:
            i = queue.pop()
            results[i] = await stream_one(sess, url, model, prompts[i], out_len)

    async with session(timeout_s) as sess:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(sess) for _ in range(min(concurrency, len(prompts)))))
        return results, time.perf_counter() - t0


def summarize(results: list, wall: float, max_tokens: int) -> dict:
    """bench_peers' summary of the streams, with the prompt sizes, the mean TTFT, the cached
    tokens a server reports in `usage`, and first turns apart from later ones."""
    ok = [r for r in results if r["status"] == 200 and r["times"]]
    ms = lambda v: None if v is None else round(v * 1e3, 1)  # noqa: E731
    ttft = [r["times"][0] - r["sent"] for r in ok]
    usage = [r["usage"] for r in ok if r.get("usage")]
    prompt_tokens = [u["prompt_tokens"] for u in usage]
    cached = [((u.get("prompt_tokens_details") or {}).get("cached_tokens")) for u in usage]
    s = summarize_streams(results, wall, max_tokens)
    s.update({
        "prompt_tokens_total": sum(prompt_tokens),
        "prompt_tokens_range": [min(prompt_tokens), max(prompt_tokens)] if prompt_tokens else None,
        "ttft_ms_mean": ms(sum(ttft) / len(ttft)) if ttft else None,
    })
    if any(c is not None for c in cached):
        s["usage_cached_tokens"] = sum(c or 0 for c in cached)
    if ok and "turn" in ok[0]:
        first = [r["times"][0] - r["sent"] for r in ok if r["turn"] == 0]
        later = [r["times"][0] - r["sent"] for r in ok if r["turn"] > 0]
        s["ttft_ms_first_turn"] = {f"p{q}": ms(pct(first, q)) for q in (50, 90)}
        s["ttft_ms_later_turns"] = {f"p{q}": ms(pct(later, q)) for q in (50, 90)}
    return s


async def scrape(url: str, kind: str) -> tuple[dict | None, str]:
    """(prefix_counters, the raw /metrics text) of a server now."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as sess:
            async with sess.get(url + "/metrics") as r:
                text = await r.text()
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return None, f"error: {e!r}"
    return prefix_counters(parse_metrics(text), kind), text


# ------------------------------------------------------------------ servers
def server_for(name: str, args, created: list[str]) -> Server | str:
    """bench_peers.define's Server for a --servers entry with the prefix-caching flag added, or
    a string saying why it is skipped."""
    m = re.fullmatch(r"(jaxserve|vllm)-?(on|off)?(@.+)?", name)
    if not m or (m.group(1) == "vllm" and m.group(3)) or (m.group(1) == "jaxserve"
                                                          and not m.group(2)):
        raise SystemExit(f"unknown server {name!r} (jaxserve-off, jaxserve-on, jaxserve-on@REF, "
                         "vllm, vllm-off)")
    kind, on = m.group(1), m.group(2) != "off"
    # define() sizes jaxserve's pool from these; its --num-pages is replaced below
    peer_args = SimpleNamespace(
        input_len=args.max_model_len, output_len=0, ctx_per_seq=args.max_model_len,
        concurrency=args.max_num_seqs, jaxserve_args=args.jaxserve_args,
        vllm_args=args.vllm_args, vllm_venv=args.vllm_venv, vllm_model=args.vllm_model,
        ready_timeout=args.ready_timeout)
    server = define(kind + (m.group(3) or ""), peer_args, created)
    if isinstance(server, str):
        return server
    server.name = name
    server.info["prefix_caching_flag"] = "on" if on else "off"
    if kind == "jaxserve":
        i = server.cmd.index("--num-pages")
        del server.cmd[i:i + 2]
        extra = len(shlex.split(args.jaxserve_args))
        at = len(server.cmd) - extra           # before the passthrough, so it can override
        server.cmd[at:at] = ["--kv-cache-gb", str(args.kv_cache_gb)]
        if not on:
            server.cmd.insert(at, "--no-enable-prefix-caching")
    else:
        extra = len(shlex.split(args.vllm_args))
        at = len(server.cmd) - extra
        server.cmd.insert(at, "--enable-prefix-caching" if on else "--no-enable-prefix-caching")
        server.env["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gb)   # whole GiB (an int)
        server.info["env"]["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gb)
    return server


def log_findings(server: Server) -> dict:
    """What a server's log says about prefix caching: the setting in vLLM's engine config line,
    its last periodic 'Prefix cache hit rate', a few other short lines that mention it."""
    try:
        with open(server.log_path, errors="replace") as f:
            text = f.read()
    except (OSError, TypeError):
        return {}
    out = {}
    m = re.findall(r"enable_prefix_caching'?[=:]\s*'?(\w+)", text)
    if m:
        out["enable_prefix_caching"] = m[-1]
    m = re.findall(r"Prefix cache hit rate: ([\d.]+%)", text)
    if m:
        out["last_logged_hit_rate"] = m[-1]
    lines = [ln.strip() for ln in text.splitlines() if re.search(r"prefix.cach", ln, re.I)
             and len(ln) < 300 and "hit rate:" not in ln]
    if lines:
        out["lines"] = lines[:5]
    return out


async def measure(server: Server, url: str, model: str, args, warm: dict, meas: dict) -> dict:
    out_len, tmo = args.output_len, args.request_timeout

    async def one(wl: str, prompts, warmup: bool) -> dict:
        before, _ = await scrape(url, server.kind)
        cpu0, comp0 = tree_cpu_seconds(server.proc.pid), server.num_compiles()
        if wl == "multiturn":
            results, wall = await run_multiturn(url, model, prompts, out_len, args.concurrency,
                                                tmo)
        elif wl == "fewshot":
            results, wall = await run_pool(url, model, prompts, out_len,
                                           args.fewshot_concurrency, tmo)
        else:
            results, wall = await run_pool(url, model, prompts, out_len, len(prompts), tmo)
        cpu = tree_cpu_seconds(server.proc.pid) - cpu0
        after, _ = await scrape(url, server.kind)
        s = summarize(results, wall, out_len)
        s["prefix_cache"] = hit_rate(before, after)
        if comp0 is not None:
            # compiled during the run (each ~1-3 s on CPU); 0 when the warm-up met every shape
            s["programs_compiled"] = server.num_compiles() - comp0
        if s["output_tokens"]:
            s["server_cpu_s"] = round(cpu, 1)
        if not warmup:
            s["first_text"] = next((r["text"][:100] for r in results if r.get("text")), None)
        return s

    res: dict = {}
    _, text = await scrape(url, server.kind)
    res["metrics_names"] = sorted({n for n, _, _ in parse_metrics(text) if "prefix" in n})
    t = time.perf_counter()
    res["warmup"] = {}
    for wl in args.workloads:
        log(f"{server.name}: warm-up {wl}")
        w = await one(wl, warm[wl], warmup=True)
        res["warmup"][wl] = {k: w[k] for k in ("num_failed", "errors", "wall_s", "prefix_cache",
                                               "programs_compiled") if k in w}
    res["warmup"]["seconds"] = round(time.perf_counter() - t, 1)
    for wl in args.workloads:
        log(f"{server.name}: {wl}")
        res[wl] = await one(wl, meas[wl], warmup=False)
        log(f"{server.name}: {wl}: " + json.dumps({k: res[wl].get(k) for k in (
            "ttft_ms", "output_tok_s", "prefix_cache", "num_failed", "programs_compiled")}))
    return res


def run_server(server: Server, args, warm: dict, meas: dict) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server.cmd = [c.replace("{port}", str(port)) for c in server.cmd]
    row = {"name": server.name, "kind": server.kind, "cmd": shlex.join(server.cmd),
           "cwd": server.cwd, **server.info}
    t = time.perf_counter()
    # other work on the machine slows every server: the 1-minute load average, for the record
    row["loadavg_1m"] = [round(os.getloadavg()[0], 2)]
    server.start(args.log_dir)
    try:
        model = asyncio.run(server.wait_ready(url))
        row["startup_s"] = round(time.perf_counter() - t, 1)
        log(f"{server.name}: ready after {row['startup_s']} s (model id {model!r})")
        row.update(asyncio.run(measure(server, url, model, args, warm, meas)))
    except Exception as e:  # noqa: BLE001 - one server's failure must not end the others' runs
        row["error"] = f"{type(e).__name__}: {e}"
        log(f"{server.name}: FAILED: {row['error']}")
    finally:
        server.stop()
        row["log"] = server.log_path
        row["log_prefix_caching"] = log_findings(server)
        row["loadavg_1m"].append(round(os.getloadavg()[0], 2))
        row["total_s"] = round(time.perf_counter() - t, 1)
    return row


# ------------------------------------------------------------------ report (pure)
def fmt(v, f="{:.1f}"):
    return "-" if v is None else f.format(v)


def _rate(s: dict) -> str:
    pc = s.get("prefix_cache")
    if not pc:
        return "n/a"
    return "-" if pc["rate"] is None else f"{100 * pc['rate']:.1f}%"


def table(rows: list, workloads=WORKLOADS) -> str:
    lines = ["| workload | server | requests (failed) | prompt tokens | TTFT p50 / p90 ms | "
             "output tok/s | prefix-cache hit rate | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for wl in workloads:
        for r in rows:
            if wl not in r:
                if "error" in r:
                    lines.append(f"| {wl} | {r['name']} | failed: "
                                 f"{r['error'].splitlines()[0][:80]} | | | | | |")
                continue
            s = r[wl]
            pr = s["prompt_tokens_range"]
            lines.append(
                f"| {wl} | {r['name']} | {s['num_requests']} ({s['num_failed']}) | "
                f"{'-' if not pr else f'{pr[0]}-{pr[1]}'} | "
                f"{fmt(s['ttft_ms']['p50'], '{:.0f}')} / {fmt(s['ttft_ms']['p90'], '{:.0f}')} | "
                f"{fmt(s['output_tok_s'])} | {_rate(s)} | {fmt(s['wall_s'])} |")
    return "\n".join(lines)


def _ratio(a, b):
    return a / b if a and b else None


def ratios(rows: list, workloads=WORKLOADS) -> list[str]:
    """The comparisons the issue asks for, as text lines: TTFT p50 off/on per workload (target
    >= 3x on multiturn), output tok/s on/off on nohit (target >= 1.0), and jaxserve-on against
    vLLM with caching on."""
    def pick(prefix: str):
        return next((r for r in rows if r["name"].split("@")[0] == prefix
                     and any(w in r for w in workloads)), None)

    off, on, vl = pick("jaxserve-off"), pick("jaxserve-on"), pick("vllm")
    vl_off = pick("vllm-off")
    out = []
    if off and on:
        for wl in workloads:
            if wl in off and wl in on:
                r = _ratio(off[wl]["ttft_ms"]["p50"], on[wl]["ttft_ms"]["p50"])
                target = " (target >= 3x)" if wl == "multiturn" else ""
                out.append(f"{wl}: TTFT p50 jaxserve off/on = {fmt(r, '{:.2f}')}x{target}")
                if "ttft_ms_later_turns" in off[wl] and "ttft_ms_later_turns" in on[wl]:
                    r = _ratio(off[wl]["ttft_ms_later_turns"]["p50"],
                               on[wl]["ttft_ms_later_turns"]["p50"])
                    out.append(f"{wl} (turns after the first): TTFT p50 jaxserve off/on = "
                               f"{fmt(r, '{:.2f}')}x")
        if "nohit" in off and "nohit" in on:
            r = _ratio(on["nohit"]["output_tok_s"], off["nohit"]["output_tok_s"])
            out.append(f"nohit: output tok/s jaxserve on/off = {fmt(r, '{:.3f}')} "
                       "(target: not lower, >= 1.0 within noise)")
    if vl_off and vl:
        for wl in workloads:
            if wl in vl_off and wl in vl:
                r = _ratio(vl_off[wl]["ttft_ms"]["p50"], vl[wl]["ttft_ms"]["p50"])
                out.append(f"{wl}: TTFT p50 vLLM off/on = {fmt(r, '{:.2f}')}x")
    if on and vl:
        for wl in workloads:
            if wl in on and wl in vl:
                t = _ratio(on[wl]["ttft_ms"]["p50"], vl[wl]["ttft_ms"]["p50"])
                x = _ratio(on[wl]["output_tok_s"], vl[wl]["output_tok_s"])
                out.append(f"{wl}: jaxserve-on vs vLLM (caching on): TTFT p50 "
                           f"{fmt(t, '{:.2f}')}x vLLM's, output tok/s {fmt(x, '{:.2f}')}x")
    return out


def server_table(rows: list, workloads=WORKLOADS) -> str:
    lines = ["| server | start s | warm-up s | programs compiled while measured | load average "
             "before / after | prefix caching per its log |", "|---|---|---|---|---|---|"]
    for r in rows:
        comp = [r[w].get("programs_compiled") for w in workloads if w in r]
        lp = r.get("log_prefix_caching") or {}
        lines.append(f"| {r['name']} | {fmt(r.get('startup_s'))} | "
                     f"{fmt((r.get('warmup') or {}).get('seconds'))} | "
                     f"{'-' if not comp or comp[0] is None else ', '.join(map(str, comp))} | "
                     f"{' / '.join(map(str, r.get('loadavg_1m') or [])) or '-'} | "
                     f"{lp.get('enable_prefix_caching', '-')}"
                     + (f" (last logged hit rate {lp['last_logged_hit_rate']})"
                        if "last_logged_hit_rate" in lp else "") + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", default=None,
                   help=f"comma-separated, run in this order: jaxserve-off, jaxserve-on, "
                        f"jaxserve-on@REF / jaxserve-off@REF (a git ref), vllm (caching on), "
                        f"vllm-off; default {DEFAULT_SERVERS} ({QUICK_SERVERS} with --quick); "
                        "vLLM is skipped when not installed")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help="comma-separated subset of " + ",".join(WORKLOADS))
    p.add_argument("--quick", action="store_true",
                   help="smoke run (~2 min): 2 tenants x 1 conversation x 2 turns, 4 few-shot "
                        "requests, 8 distinct prompts of 128 tokens, 8 output tokens")
    p.add_argument("--tenants", type=int, default=4)
    p.add_argument("--convs-per-tenant", type=int, default=3)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=4, help="conversations in flight")
    p.add_argument("--system-min", type=int, default=400)
    p.add_argument("--system-max", type=int, default=512)
    p.add_argument("--user-min", type=int, default=40)
    p.add_argument("--user-max", type=int, default=64)
    p.add_argument("--fewshot-requests", type=int, default=32)
    p.add_argument("--fewshot-concurrency", type=int, default=4)
    p.add_argument("--fewshot-prefix", type=int, default=600, help="tokens")
    p.add_argument("--question-min", type=int, default=16)
    p.add_argument("--question-max", type=int, default=32)
    p.add_argument("--nohit-requests", type=int, default=64, help="sent all at once")
    p.add_argument("--nohit-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--kv-cache-gb", type=int, default=2,
                   help="KV pool GiB: jaxserve's --kv-cache-gb and vLLM's VLLM_CPU_KVCACHE_SPACE "
                        "(whole GiB)")
    p.add_argument("--seed", type=int, default=0)
    add_server_arguments(p, "bench_prefix.json")
    if p.parse_known_args(argv)[0].quick:   # smaller defaults; flags given still win
        p.set_defaults(tenants=2, convs_per_tenant=1, turns=2, concurrency=2,
                       fewshot_requests=4, fewshot_concurrency=2, nohit_requests=8,
                       nohit_len=128, output_len=8)
    args = p.parse_args(argv)
    args.servers = args.servers or (QUICK_SERVERS if args.quick else DEFAULT_SERVERS)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in args.workloads if w not in WORKLOADS]
    if bad:
        p.error(f"unknown workloads {bad}; choose from {WORKLOADS}")
    args.log_dir = args.log_dir or os.path.join(os.path.dirname(os.path.abspath(args.out)),
                                                "bench_prefix_logs")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.log_dir, exist_ok=True)
    started = time.perf_counter()
    tok = load_tokenizer()
    meas = build_all(tok, args, args.seed)
    warm = build_all(tok, args, f"warmup-{args.seed}", length_seed=args.seed)
    log("prompts built: " + ", ".join(f"{k} {len(v)}" for k, v in meas.items()))

    created: list[str] = []
    rows, skipped = [], {}
    try:
        for name in [s.strip() for s in args.servers.split(",") if s.strip()]:
            server = server_for(name, args, created)
            if isinstance(server, str):
                log(f"{name}: skipped: {server}")
                skipped[name] = server
                continue
            rows.append(run_server(server, args, warm, meas))
    finally:
        if not args.keep_worktrees:
            for path in created:
                subprocess.run(["git", "worktree", "remove", "--force", path], cwd=ROOT)
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor()},
        "workload": {k: v for k, v in vars(args).items()
                     if k not in ("servers", "out", "log_dir", "vllm_venv", "vllm_model")},
        "servers": rows, "skipped": skipped,
        "total_s": round(time.perf_counter() - started, 1),
    }
    md = "\n\n".join([table(rows, args.workloads), "\n".join(ratios(rows, args.workloads)),
                      server_table(rows, args.workloads)])
    write_report(report, md, args.out)
    bad = any("error" in r or any(r[w]["num_failed"] for w in args.workloads if w in r)
              for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
