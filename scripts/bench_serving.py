"""Serving benchmark over HTTP, S-LoRA style: Poisson arrivals, power-law adapter popularity,
uniform input/output lengths, streaming completions; prints throughput, TTFT / ITL / E2E
percentiles and the server's overhead per streamed token, and writes JSON.

  python scripts/bench_serving.py --launch fake             # zero-cost device: the stack's cost
  python scripts/bench_serving.py --launch real --rate 2    # the default model, spawned here
  python scripts/bench_serving.py --url http://127.0.0.1:8000 --adapters a,b,c

Overhead per token is reported two ways: the server's own histogram
(jaxserve:token_delivery_seconds: engine thread hands a step's output off -> SSE bytes written),
and, with --launch fake, the client-side inter-token time of the real engine on a device step
that costs nothing (everything that time contains is engine host work + server + loopback +
client parsing).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time

import aiohttp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


# ------------------------------------------------------------------ a zero-cost device
def serve_fake(port: int, num_adapters: int, step_s: float) -> None:
    """The real engine and server on tests/fake_runner.py's FakeRunner: each step costs
    `step_s` of sleep (a device step releases the GIL while it waits; so does this) and no
    compute, so whatever latency a client sees is the serving stack's (server, engine host
    work: scheduler, output processor, detokenizer)."""
    import tempfile
    from pathlib import Path

    from aiohttp import web

    from jaxserve.async_engine import AsyncEngine, AsyncEngineConfig
    from server.app import create_app
    from server.config import ServerConfig
    from tests.fake_runner import fake_engine, write_adapter
    engine = fake_engine(max_num_seqs=256, num_pages=1 << 17, page_size=16, max_model_len=4096,
                         scheduler="fcfs")
    fake_run = engine.runner.run

    def run(plan):
        out = fake_run(plan)
        time.sleep(step_s)
        return out
    engine.runner.run = run
    root = Path(tempfile.mkdtemp(prefix="zero-adapters-"))
    mods = []
    for i in range(num_adapters):
        write_adapter(root / f"adapter{i}", seed=i)
        mods.append((f"adapter{i}", str(root / f"adapter{i}")))
    app = create_app(AsyncEngine(engine, AsyncEngineConfig(max_waiting=100_000)),
                     ServerConfig(port=port, lora_modules=tuple(mods)))
    web.run_app(app, host="127.0.0.1", port=port, print=None, handler_cancellation=True)


# ------------------------------------------------------------------ workload and client
def workload(args, rng: random.Random, adapters: list[str]) -> list[dict]:
    weights = [1.0 / (i + 1) ** args.alpha for i in range(len(adapters))]
    t, reqs = 0.0, []
    words = "the of and to in is was for on that with as by at from".split()
    for i in range(args.num_requests):
        t += rng.expovariate(args.rate) if args.rate > 0 else 0.0
        n_in = rng.randint(args.input_min, args.input_max)
        reqs.append({"at": t, "model": rng.choices(adapters, weights)[0] if adapters else None,
                     "prompt": " ".join(rng.choice(words) for _ in range(n_in)),
                     "max_tokens": rng.randint(args.output_min, args.output_max)})
    return reqs


async def sse_events(response):
    """The JSON events of an OpenAI-style SSE stream, up to `data: [DONE]`."""
    async for line in response.content:
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        yield json.loads(data)


async def one_request(sess, url, req, base_model, t0):
    await asyncio.sleep(max(0.0, t0 + req["at"] - time.perf_counter()))
    body = {"model": req["model"] or base_model, "prompt": req["prompt"], "stream": True,
            "max_tokens": req["max_tokens"], "temperature": 0, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    times, usage, status = [], None, None
    async with sess.post(url + "/v1/completions", json=body) as r:
        status = r.status
        if r.status != 200:
            return {"status": r.status, "error": await r.text()}
        async for ev in sse_events(r):
            if ev.get("choices"):
                times.append(time.perf_counter())
            elif ev.get("usage"):
                usage = ev["usage"]
    return {"status": status, "sent": sent, "times": times, "usage": usage,
            "model": req["model"]}


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


async def scrape_delivery(sess, url) -> tuple[float, float]:
    async with sess.get(url + "/metrics") as r:
        text = await r.text()
    vals = {}
    for line in text.splitlines():
        if line.startswith("jaxserve:token_delivery_seconds_sum") or \
                line.startswith("jaxserve:token_delivery_seconds_count"):
            vals[line.split("{")[0].rsplit("_", 1)[1]] = float(line.rsplit(" ", 1)[1])
    return vals.get("sum", 0.0), vals.get("count", 0.0)


def cpu_seconds(pid: int | None) -> float | None:
    """user+system CPU seconds of a local process (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, TypeError, IndexError, ValueError):
        return None


async def run_bench(args, url: str, server_pid: int | None = None) -> dict:
    rng = random.Random(args.seed)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as sess:
        async with sess.get(url + "/v1/models") as r:
            models = (await r.json())["data"]
        base = models[0]["id"]
        adapters = [m["id"] for m in models if m.get("parent")]
        if args.adapters:
            adapters = args.adapters.split(",")
        reqs = workload(args, rng, adapters)
        warm = {**reqs[0], "at": 0.0}
        await one_request(sess, url, warm, base, time.perf_counter())  # compile / connect
        s0, c0 = await scrape_delivery(sess, url)
        cpu0 = cpu_seconds(server_pid)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_request(sess, url, q, base, t0) for q in reqs))
        wall = time.perf_counter() - t0
        cpu1 = cpu_seconds(server_pid)
        s1, c1 = await scrape_delivery(sess, url)
    ok = [r for r in results if r["status"] == 200 and r["times"]]
    ttft = [r["times"][0] - r["sent"] for r in ok]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    e2e = [r["times"][-1] - r["sent"] for r in ok]
    out_tokens = sum(r["usage"]["completion_tokens"] for r in ok if r["usage"])
    ms = lambda v: None if v is None else round(v * 1e3, 3)  # noqa: E731
    report = {
        "config": {k: v for k, v in vars(args).items() if k not in ("serve_fake",)},
        "num_requests": len(reqs), "num_ok": len(ok),
        "num_failed": len(results) - len(ok),
        "adapters": adapters, "wall_s": round(wall, 3),
        "throughput_req_s": round(len(ok) / wall, 3),
        "throughput_output_tok_s": round(out_tokens / wall, 2),
        "ttft_ms": {f"p{q}": ms(pct(ttft, q)) for q in (50, 90, 99)},
        "itl_ms": {f"p{q}": ms(pct(itl, q)) for q in (50, 90, 99)},
        "e2e_ms": {f"p{q}": ms(pct(e2e, q)) for q in (50, 90, 99)},
        "server_delivery_ms_per_token": ms((s1 - s0) / (c1 - c0)) if c1 > c0 else None,
    }
    if cpu0 is not None and cpu1 is not None and out_tokens:
        # All of the server process's CPU (engine thread included) per streamed token.
        report["server_cpu_ms_per_token"] = ms((cpu1 - cpu0) / out_tokens)
    if args.launch == "fake":
        # Each inter-token gap is one fake step (fake_step_ms) plus what the stack adds.
        report["itl_minus_step_ms_p50"] = ms(pct(itl, 50) - args.fake_step_ms / 1e3) if itl else None
    return report


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_ready(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    async with aiohttp.ClientSession() as sess:
        while time.time() < deadline:
            try:
                async with sess.get(url + "/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise SystemExit(f"server at {url} did not become ready in {timeout:.0f}s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="benchmark a running server")
    p.add_argument("--launch", choices=["fake", "real"], default=None,
                   help="spawn a server: 'fake' (zero-cost engine) or 'real' (the default model)")
    p.add_argument("--server-args", default="--max-num-seqs 16 --max-model-len 512 "
                   "--max-prefill-tokens 512 --num-pages 512", help="extra args for --launch real")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--rate", type=float, default=20.0, help="Poisson arrival rate (req/s); 0 = all at once")
    p.add_argument("--alpha", type=float, default=1.0, help="adapter popularity power law exponent")
    p.add_argument("--num-adapters", type=int, default=4, help="adapters of the fake server")
    p.add_argument("--fake-step-ms", type=float, default=10.0,
                   help="simulated step time of the fake engine (0: as fast as the stack goes)")
    p.add_argument("--adapters", default=None, help="comma-separated adapter names to use")
    p.add_argument("--input-min", type=int, default=8)
    p.add_argument("--input-max", type=int, default=64)
    p.add_argument("--output-min", type=int, default=8)
    p.add_argument("--output-max", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_serving.json")
    p.add_argument("--serve-fake", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_fake is not None:
        serve_fake(args.serve_fake, args.num_adapters, args.fake_step_ms / 1e3)
        return 0
    proc = None
    url = args.url
    if args.launch:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        if args.launch == "fake":
            cmd = [sys.executable, os.path.abspath(__file__), "--serve-fake", str(port),
                   "--num-adapters", str(args.num_adapters), "--fake-step-ms", str(args.fake_step_ms)]
        else:
            cmd = [sys.executable, "-m", "server", "--port", str(port), *args.server_args.split()]
        proc = subprocess.Popen(cmd, cwd=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    if url is None:
        p.error("give --url or --launch")
    try:
        asyncio.run(wait_ready(url, 300))
        report = asyncio.run(run_bench(args, url, proc.pid if proc else None))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=1))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    return 0 if report["num_failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
