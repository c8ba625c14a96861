"""Soak test: mixed traffic with faults against one jaxserve server on loopback, for a bounded
time and a bounded number of requests; prints what came back and whether the server is whole.

  .venv/bin/python scripts/soak.py --minutes 10                 # launches `jaxserve serve`
  .venv/bin/python scripts/soak.py --minutes 1 --max-requests 300
  .venv/bin/python scripts/soak.py --url http://127.0.0.1:8000 --admin-key K --lora-root DIR

Launched, the server serves the embedded default model (VTC scheduler, body-read and
stream-stall timeouts of 3 s, below --stall-s) with --lora-root (a temporary
directory of random adapters this script writes for the model's shapes), an API-keys file with
four tenants and an admin, and the given --server-args. With --url the server must already run
on loopback (other hosts are refused) and --lora-root must be the server's, for adapter churn.

Each of --concurrency workers picks one action at a time (weights in ACTIONS):
  complete     non-streaming completion, a random tenant, the base model or an adapter
  chat_stream  streaming chat read to [DONE]
  cut_stream   streaming completion cut by the client after two events
  no_read      a raw socket sends a long streaming request and never reads (--stall-s)
  stall_body   a raw socket sends headers and part of the body, then stalls (--stall-s)
  garbage      a hostile body (surrogates, huge numbers, NULs, deep nesting, wrong types,
               raw bytes) to a random endpoint: a 4xx is expected
  churn        admin loads a fresh adapter, uses it once, unloads it
  poison       admin loads an adapter file holding NaN (refused with 4xx is expected), and an
               adapter with huge finite weights, whose request must fail alone (4xx or an
               error event), then unloads it
  tenant_admin a tenant key tries to load and to unload (403 is expected)
  metrics      GET /metrics with the admin key
  canary       greedy base-model completion of a fixed prompt: must never be empty
Every 60 s a burst of 40 short completions arrives at once.

At the end: every adapter (the start-up ones too) is unloaded, the server is given time to go idle,
and the pool is read from /metrics: free pages (cached ones count: they are evictable) must
equal the pool. Printed and written as JSON (--out): requests, status counts per action,
responses >= 500, client-side errors, canary results, server RSS (sampled every 2 s; drift from
the end of the first fifth, and over the second half), pool free after. Exit status 1 on any 5xx, a leaked page, an empty
canary, a server that stopped answering or an ERROR line in the launched server's log.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import socket
import sys
import tempfile
import time
import urllib.parse

import aiohttp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from bench_peers import Server  # noqa: E402
from bench_serving import free_port  # noqa: E402

ACTIONS = {"complete": 30, "chat_stream": 15, "cut_stream": 8, "no_read": 2, "stall_body": 2,
           "garbage": 15, "churn": 4, "poison": 2, "tenant_admin": 2, "metrics": 4, "canary": 6}
TENANTS = ("alice", "bob", "carol", "dave")
WORDS = ("the a river city quiet bright old garden reads builds stone music winter light "
         "north paper window story market bridge dog cat runs sings").split()
CANARY = "The capital of France is"
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


# ------------------------------------------------------------------ adapters on disk
def write_adapter(path: str, cfg, rank: int, seed: int, fill: float | None = None,
                  nan: bool = False) -> None:
    """A PEFT LoRA adapter (q_proj, v_proj) for `cfg`; `fill` sets every weight to one value
    (huge values make activations overflow), `nan` puts one NaN in a weight."""
    from safetensors.numpy import save_file
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for i in range(cfg.num_layers):
        for mod, out in (("q_proj", cfg.num_heads * cfg.head_dim),
                         ("v_proj", cfg.num_kv_heads * cfg.head_dim)):
            key = f"base_model.model.model.layers.{i}.self_attn.{mod}"
            a = rng.normal(0, 0.02, (rank, cfg.hidden_size)).astype(np.float32)
            b = rng.normal(0, 0.02, (out, rank)).astype(np.float32)
            if fill is not None:
                a[:], b[:] = fill, fill
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
    if nan:
        next(iter(tensors.values()))[0, 0] = np.nan
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
                   "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}, f)


def prepare_root(root: str, cfg, n_adapters: int) -> None:
    for i in range(n_adapters):
        write_adapter(os.path.join(root, f"a{i}"), cfg, rank=8, seed=i)
    write_adapter(os.path.join(root, "nan"), cfg, rank=8, seed=99, nan=True)
    write_adapter(os.path.join(root, "huge"), cfg, rank=8, seed=98, fill=1e18)


# ------------------------------------------------------------------ hostile bodies
def garbage_bodies() -> list[bytes]:
    deep = "[" * 5000 + "]" * 5000
    return [b"", b"\xff\xfe\x00garbage", b"{", b"[]", b"null", b'"x"', b"1e400",
            b'{"prompt": "\\ud800", "max_tokens": 2}',
            b'{"prompt": "hi", "user": "\\udfff", "max_tokens": 2}',
            b'{"prompt": "hi", "max_tokens": 1e400}',
            b'{"prompt": "hi", "max_tokens": ' + b"9" * 400 + b"}",
            b'{"prompt": "hi", "temperature": -1e308, "max_tokens": 2}',
            b'{"prompt": "hi", "seed": ' + b"9" * 40 + b', "max_tokens": 2}',
            b'{"prompt": [999999999999], "max_tokens": 2}',
            b'{"prompt": "a\\u0000b", "max_tokens": 2, "stop": ["\\u0000"]}',
            b'{"prompt": {"a": 1}}', b'{"prompt": "hi", "max_tokens": "2"}',
            b'{"prompt": "hi", "stream": "yes"}', b'{"messages": "hi"}',
            b'{"messages": [{"role": "root", "content": "x"}]}',
            b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
            b'{"prompt": ' + deep.encode() + b"}",
            b'{"prompt": "' + b"x" * 900_000 + b'", "max_tokens": 1}',
            b'{"lora_name": "x", "lora_path": "../../etc"}',
            b'{"lora_name": "x", "lora_path": "/etc"}',
            b'{"lora_name": "x", "lora_path": "a\\u0000b"}',
            b'{"lora_name": "\\ud800", "lora_path": "a0"}',
            b'{"inputs": "hi", "parameters": {"max_new_tokens": -5}}',
            b'{"inputs": "hi", "lora_dir": "\\ud800"}']


GARBAGE_PATHS = ("/v1/completions", "/v1/chat/completions", "/generate", "/generate_stream",
                 "/v1/load_lora_adapter", "/v1/unload_lora_adapter")


# ------------------------------------------------------------------ the soak
class Soak:
    def __init__(self, args, url: str, keys: dict[str, str], admin_key: str | None,
                 adapters: list[str], pid: int | None):
        self.args, self.url, self.keys, self.admin_key = args, url, keys, admin_key
        self.adapters = adapters            # names loaded at start (usable by every tenant)
        self.pid = pid
        self.rng = random.Random(args.seed)
        self.status: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.client_errors: collections.Counter = collections.Counter()
        self.canary_texts: collections.Counter = collections.Counter()
        self.canary_empty = 0
        self.expect_violations: list[str] = []
        self.n_requests = 0
        self.loaded: set[str] = set()
        self.churn_id = 0
        self.rss: list[tuple[float, float]] = []
        self.compiled: list[tuple[float, int | None]] = []

    # helpers
    def headers(self, tenant: str | None = None, admin: bool = False) -> dict:
        key = self.admin_key if admin else self.keys.get(tenant or "")
        return {"Authorization": f"Bearer {key}"} if key else {}

    def record(self, action: str, status: int) -> None:
        self.status[action][status] += 1
        self.n_requests += 1

    def expect(self, action: str, status: int, ok) -> None:
        self.record(action, status)
        if status not in ok:
            self.expect_violations.append(f"{action}: {status} (expected {sorted(ok)})")

    def prompt(self, n: int | None = None) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(n or self.rng.randint(3, 60)))

    def model(self) -> str | None:
        return self.rng.choice(self.adapters) if self.adapters and self.rng.random() < 0.5 else None

    async def post(self, sess, path: str, body, headers: dict, action: str) -> tuple[int, object]:
        async with sess.post(self.url + path, json=body, headers=headers) as r:
            text = await r.text()
            try:
                data = json.loads(text)
            except ValueError:
                data = text
            return r.status, data

    # actions
    async def complete(self, sess):
        tenant = self.rng.choice(TENANTS)
        body = {"prompt": self.prompt(), "max_tokens": self.rng.randint(1, 32),
                "temperature": self.rng.choice([0.0, 0.7, 1.0]), "user": tenant}
        if (m := self.model()) is not None:
            body["model"] = m
        status, _ = await self.post(sess, "/v1/completions", body, self.headers(tenant), "complete")
        self.expect("complete", status, {200, 429})

    async def chat_stream(self, sess):
        tenant = self.rng.choice(TENANTS)
        body = {"messages": [{"role": "user", "content": self.prompt()}], "stream": True,
                "max_tokens": self.rng.randint(1, 48), "user": tenant}
        if (m := self.model()) is not None:
            body["model"] = m
        async with sess.post(self.url + "/v1/chat/completions", json=body,
                             headers=self.headers(tenant)) as r:
            done = False
            async for line in r.content:
                done |= line.strip() == b"data: [DONE]"
            self.expect("chat_stream", r.status, {200, 429})
            if r.status == 200 and not done:
                self.expect_violations.append("chat_stream: no [DONE]")

    async def cut_stream(self, sess):
        tenant = self.rng.choice(TENANTS)
        body = {"prompt": self.prompt(), "stream": True, "max_tokens": 64, "ignore_eos": True,
                "user": tenant}
        async with sess.post(self.url + "/v1/completions", json=body,
                             headers=self.headers(tenant)) as r:
            self.record("cut_stream", r.status)
            n = 0
            async for _ in r.content:
                n += 1
                if n >= 2:
                    break
            r.close()

    async def raw(self, request: bytes, hold_s: float) -> str:
        """Send raw bytes, never read for hold_s, then report what the server did."""
        u = urllib.parse.urlsplit(self.url)
        reader, writer = await asyncio.open_connection(u.hostname, u.port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        writer.write(request)
        await writer.drain()
        await asyncio.sleep(hold_s)
        try:
            data = await asyncio.wait_for(reader.read(65536), timeout=1.0)
            outcome = "closed" if data == b"" else data.split(b"\r\n", 1)[0].decode(errors="replace")
        except asyncio.TimeoutError:
            outcome = "open"
        except ConnectionError:
            outcome = "reset"
        writer.close()
        return outcome

    def request_bytes(self, path: str, body: bytes, headers: dict, length: int | None = None) -> bytes:
        u = urllib.parse.urlsplit(self.url)
        lines = [f"POST {path} HTTP/1.1", f"Host: {u.netloc}", "Content-Type: application/json",
                 f"Content-Length: {len(body) if length is None else length}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    async def no_read(self, sess):
        tenant = self.rng.choice(TENANTS)
        body = json.dumps({"prompt": self.prompt(), "stream": True, "max_tokens": 512,
                           "ignore_eos": True, "user": tenant}).encode()
        outcome = await self.raw(self.request_bytes("/v1/completions", body,
                                                    self.headers(tenant)), self.args.stall_s)
        self.status["no_read"][outcome.split(" ")[1] if outcome.startswith("HTTP") else outcome] += 1
        self.n_requests += 1

    async def stall_body(self, sess):
        tenant = self.rng.choice(TENANTS)
        req = self.request_bytes("/v1/completions", b'{"prompt": "hel', self.headers(tenant),
                                 length=4096)
        outcome = await self.raw(req, self.args.stall_s)
        self.status["stall_body"][outcome.split(" ")[1] if outcome.startswith("HTTP") else outcome] += 1
        self.n_requests += 1

    async def garbage(self, sess):
        body = self.rng.choice(self.bodies)
        path = self.rng.choice(GARBAGE_PATHS)
        admin = path.startswith("/v1/load") or path.startswith("/v1/unload")
        async with sess.post(self.url + path, data=body, headers={
                **self.headers(self.rng.choice(TENANTS), admin=admin),
                "Content-Type": "application/json"}) as r:
            data = await r.read()
            self.expect("garbage", r.status, set(range(400, 500)) | {200})
            if r.status >= 400:
                try:
                    err = json.loads(data)["error"]
                    assert isinstance(err["message"], str)
                except Exception:
                    self.expect_violations.append(f"garbage: {r.status} body not an OpenAI error")

    async def churn(self, sess):
        if not self.args.lora_root:
            return
        self.churn_id += 1
        name = f"soak-churn-{self.churn_id}"
        src = f"a{self.rng.randrange(self.args.num_adapters)}"
        status, _ = await self.post(sess, "/v1/load_lora_adapter",
                                    {"lora_name": name, "lora_path": src},
                                    self.headers(admin=True), "churn")
        self.expect("churn", status, {200, 409, 429})
        if status != 200:
            return
        self.loaded.add(name)
        tenant = self.rng.choice(TENANTS)
        status, _ = await self.post(sess, "/v1/completions",
                                    {"prompt": self.prompt(), "max_tokens": 8, "model": name,
                                     "user": tenant}, self.headers(tenant), "churn")
        self.expect("churn", status, {200, 429})
        for _ in range(50):   # in use by a request cut elsewhere: retry a while
            status, _ = await self.post(sess, "/v1/unload_lora_adapter", {"lora_name": name},
                                        self.headers(admin=True), "churn")
            self.record("churn", status)
            if status != 400:
                break
            await asyncio.sleep(0.2)
        if status == 200:
            self.loaded.discard(name)

    async def poison(self, sess):
        if not self.args.lora_root:
            return
        status, _ = await self.post(sess, "/v1/load_lora_adapter",
                                    {"lora_name": f"soak-nan-{self.rng.randrange(10**6)}",
                                     "lora_path": "nan"}, self.headers(admin=True), "poison")
        self.expect("poison", status, set(range(400, 500)) - {401, 403})
        name = f"soak-huge-{self.rng.randrange(10**6)}"
        status, _ = await self.post(sess, "/v1/load_lora_adapter",
                                    {"lora_name": name, "lora_path": "huge"},
                                    self.headers(admin=True), "poison")
        self.record("poison", status)
        if status != 200:
            return
        self.loaded.add(name)
        status, data = await self.post(sess, "/v1/completions",
                                       {"prompt": self.prompt(), "max_tokens": 8, "model": name,
                                        "logprobs": 1}, self.headers("alice"), "poison")
        self.expect("poison", status, set(range(400, 500)) | {200})
        status, _ = await self.post(sess, "/v1/unload_lora_adapter", {"lora_name": name},
                                    self.headers(admin=True), "poison")
        self.record("poison", status)
        if status == 200:
            self.loaded.discard(name)

    async def tenant_admin(self, sess):
        if not self.keys or not self.admin_key:
            return
        tenant = self.rng.choice(TENANTS)
        status, _ = await self.post(sess, "/v1/load_lora_adapter",
                                    {"lora_name": "tenant-try", "lora_path": "a0"},
                                    self.headers(tenant), "tenant_admin")
        self.expect("tenant_admin", status, {403})
        if self.adapters:
            status, _ = await self.post(sess, "/v1/unload_lora_adapter",
                                        {"lora_name": self.adapters[0]}, self.headers(tenant),
                                        "tenant_admin")
            self.expect("tenant_admin", status, {403, 404})

    async def metrics(self, sess):
        async with sess.get(self.url + "/metrics", headers=self.headers(admin=True)) as r:
            await r.read()
            self.expect("metrics", r.status, {200})

    async def canary(self, sess):
        status, data = await self.post(sess, "/v1/completions",
                                       {"prompt": CANARY, "max_tokens": 8, "temperature": 0,
                                        "user": "alice"}, self.headers("alice"), "canary")
        self.expect("canary", status, {200, 429})
        if status == 200:
            text = data["choices"][0]["text"]
            self.canary_texts[text] += 1
            if not text.strip():
                self.canary_empty += 1

    async def burst(self, sess):
        tenant = self.rng.choice(TENANTS)
        tasks = [self.post(sess, "/v1/completions", {"prompt": self.prompt(8), "max_tokens": 4,
                                                     "user": tenant}, self.headers(tenant), "burst")
                 for _ in range(40)]
        for status, _ in await asyncio.gather(*tasks):
            self.expect("burst", status, {200, 429})

    # drivers
    async def worker(self, sess, deadline: float):
        names, weights = zip(*ACTIONS.items())
        while time.time() < deadline and self.n_requests < self.args.max_requests:
            action = self.rng.choices(names, weights)[0]
            try:
                await getattr(self, action)(sess)
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError, OSError) as e:
                self.client_errors[f"{action}: {type(e).__name__}"] += 1

    async def ticker(self, sess, deadline: float):
        t0 = time.time()
        next_burst = t0 + 60
        while time.time() < deadline and self.n_requests < self.args.max_requests:
            await asyncio.sleep(2.0)
            if self.pid:
                self.rss.append((time.time() - t0, rss_mb(self.pid)))
            if len(self.rss) % 15 == 1:   # every 30 s: programs compiled so far, beside the RSS
                try:
                    pool = await read_pool(sess, self.url, self.headers(admin=True))
                    self.compiled.append((time.time() - t0, pool.get("compiled")))
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass
            if time.time() >= next_burst:
                next_burst += 60
                try:
                    await self.burst(sess)
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    self.client_errors[f"burst: {type(e).__name__}"] += 1

    async def run(self) -> dict:
        self.bodies = garbage_bodies()
        timeout = aiohttp.ClientTimeout(total=self.args.request_timeout_s)
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=conn) as sess:
            t0 = time.time()
            deadline = t0 + self.args.minutes * 60
            await asyncio.gather(self.ticker(sess, deadline),
                                 *(self.worker(sess, deadline) for _ in range(self.args.concurrency)))
            wall = time.time() - t0
            return await self.finish(sess, wall)

    async def finish(self, sess, wall: float) -> dict:
        for name in sorted(self.loaded | set(self.adapters)):
            for _ in range(100):
                status, _ = await self.post(sess, "/v1/unload_lora_adapter", {"lora_name": name},
                                            self.headers(admin=True), "cleanup")
                if status != 400:
                    break
                await asyncio.sleep(0.5)
        pool = {}
        for _ in range(120):   # the cut and stalled requests are aborted; wait for idle
            pool = await read_pool(sess, self.url, self.headers(admin=True))
            if pool.get("running") == 0 and pool.get("waiting") == 0:
                break
            await asyncio.sleep(1.0)
        async with sess.get(self.url + "/health") as r:
            healthy = r.status == 200
        status, data = await self.post(sess, "/v1/completions",
                                       {"prompt": CANARY, "max_tokens": 4, "temperature": 0},
                                       self.headers("alice"), "final")
        fivexx = sum(c for counts in self.status.values() for s, c in counts.items()
                     if isinstance(s, int) and s >= 500)
        rss = self.rss
        first = next((m for t, m in rss if t >= wall / 5), rss[0][1] if rss else None)
        half = next((m for t, m in rss if t >= wall / 2), None)
        last = rss[-1][1] if rss else None
        return {
            "wall_s": round(wall, 1), "requests": self.n_requests,
            "status": {a: {str(s): c for s, c in sorted(v.items(), key=str)}
                       for a, v in sorted(self.status.items())},
            "responses_5xx": fivexx, "client_errors": dict(self.client_errors),
            "expectation_violations": self.expect_violations[:50],
            "num_expectation_violations": len(self.expect_violations),
            "canary": {"distinct_texts": len(self.canary_texts), "empty": self.canary_empty,
                       "runs": sum(self.canary_texts.values())},
            "rss_mb": {"after_first_fifth": first, "at_half": half, "end": last,
                       "drift_mb": None if first is None else round(last - first, 1),
                       "drift_second_half_mb": None if half is None else round(last - half, 1),
                       "timeline": [(round(t), m) for i, (t, m) in enumerate(rss) if i % 15 == 0]},
            # RSS grows with each step program compiled (on CPU: when a shape is first met)
            "programs_compiled": {"at_half": next((c for t, c in self.compiled if t >= wall / 2),
                                                  None),
                                  "end": pool.get("compiled"),
                                  "timeline": [(round(t), c) for t, c in self.compiled]},
            "pool_after": pool,
            "pool_free_after": pool.get("free") is not None and pool["free"] == pool["total"],
            "healthy_after": healthy and status == 200,
        }


async def read_pool(sess, url: str, headers: dict) -> dict:
    async with sess.get(url + "/metrics", headers=headers) as r:
        text = await r.text()
    want = {"jaxserve:num_free_pages": "free", "jaxserve:num_total_pages": "total",
            "jaxserve:num_cached_pages": "cached", "vllm:num_requests_running": "running",
            "vllm:num_requests_waiting": "waiting",
            "jaxserve:step_programs_compiled_total": "compiled"}
    out = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name in want:
            out[want[name]] = int(float(line.rsplit(" ", 1)[1]))
    return out


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants, MiB."""
    total = 0
    todo = [pid]
    children: dict[int, list[int]] = collections.defaultdict(list)
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    children[int(f.read().rsplit(")", 1)[1].split()[1])].append(int(d))
            except OSError:
                pass
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
        todo += children.get(p, [])
    return round(total / 1024, 1)


def print_report(r: dict) -> None:
    print(f"\nsoak: {r['requests']} requests in {r['wall_s']:.0f} s")
    print("| action | status counts |\n|---|---|")
    for action, counts in r["status"].items():
        print(f"| {action} | " + ", ".join(f"{s}: {c}" for s, c in counts.items()) + " |")
    print(f"responses >= 500: {r['responses_5xx']}")
    print(f"client-side errors: {r['client_errors'] or 'none'}")
    print(f"expectation violations: {r['num_expectation_violations']} "
          f"{r['expectation_violations'][:5]}")
    print(f"canary: {r['canary']}")
    print("server RSS MiB: " + ", ".join(f"{k} {v}" for k, v in r["rss_mb"].items()
                                         if k != "timeline"))
    pc = r["programs_compiled"]
    print(f"step programs compiled: at half {pc['at_half']}, at the end {pc['end']}")
    print(f"pool after: {r['pool_after']}  free after: {r['pool_free_after']}")
    print(f"healthy after: {r['healthy_after']}")
    if "server_log_errors" in r:
        print(f"server log ERROR lines: {r['server_log_errors']} {r['server_log_error_lines'][:3]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--max-requests", type=int, default=100_000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--stall-s", type=float, default=5.0,
                   help="how long no_read / stall_body clients hold their connection")
    p.add_argument("--request-timeout-s", type=float, default=600.0)
    p.add_argument("--num-adapters", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--url", default=None, help="an already-running server on loopback")
    p.add_argument("--admin-key", default=None)
    p.add_argument("--tenant-keys", default=None, metavar="T=KEY,...")
    p.add_argument("--lora-root", default=None, help="with --url: the server's --lora-root")
    p.add_argument("--server-args", default="", help="extra `jaxserve serve` arguments")
    p.add_argument("--log-level", default="WARNING", help="the launched server's log level "
                   "(INFO logs each step program compiled)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench_results", "soak.json"))
    p.add_argument("--log-dir", default=os.path.join(ROOT, "bench_results", "logs"))
    args = p.parse_args(argv)

    server, tmp = None, None
    keys: dict[str, str] = {}
    adapters: list[str] = []
    if args.url:
        host = urllib.parse.urlsplit(args.url).hostname
        if host not in LOOPBACK:
            p.error(f"--url must be a loopback address (got host {host!r}): a soak is a fault "
                    "storm, not something to point at another machine")
        url, admin_key = args.url.rstrip("/"), args.admin_key
        for item in filter(None, (args.tenant_keys or "").split(",")):
            t, _, k = item.partition("=")
            keys[t] = k
    else:
        from jaxserve.loader import default_model_path, load_config
        cfg = load_config(default_model_path())
        tmp = tempfile.mkdtemp(prefix="jaxserve-soak-")
        args.lora_root = os.path.join(tmp, "adapters")
        prepare_root(args.lora_root, cfg, args.num_adapters)
        keys = {t: f"sk-{t}-{random.Random(t).randrange(10**12)}" for t in TENANTS}
        admin_key = "sk-admin-soak"
        keyfile = os.path.join(tmp, "keys.txt")
        with open(keyfile, "w") as f:
            f.writelines(f"{k} {t}\n" for t, k in keys.items())
            f.write(f"{admin_key} operator 1 role=admin\n")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        modules = [f"m{i}={os.path.join(args.lora_root, f'a{i}')}" for i in range(2)]
        adapters = ["m0", "m1"]
        cmd = [os.path.join(ROOT, ".venv", "bin", "jaxserve"), "--log-level", args.log_level,
               "serve", "--port", str(port),
               "--lora-root", args.lora_root, "--api-keys", keyfile,
               "--lora-modules", *modules, "--scheduler", "vtc",
               # shorter than --stall-s, so the faults meet the protections
               "--body-read-timeout-s", "3", "--stream-stall-timeout-s", "3",
               *args.server_args.split()]
        server = Server("jaxserve-soak", "jaxserve", cmd, ROOT)
        server.start(args.log_dir)
    try:
        if server is not None:
            asyncio.run(server.wait_ready(url, {"Authorization": f"Bearer {admin_key}"}))
        pid = server.proc.pid if server is not None else None
        report = asyncio.run(Soak(args, url, keys, admin_key, adapters, pid).run())
    finally:
        if server is not None:
            server.stop()
    if server is not None:   # a server-side error logged is a finding even without a 5xx
        with open(server.log_path, errors="replace") as f:
            errors = [line.rstrip() for line in f if " ERROR " in line or " CRITICAL " in line]
        report["server_log_errors"] = len(errors)
        report["server_log_error_lines"] = errors[:20]
    report["args"] = {k: v for k, v in vars(args).items()}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print_report(report)
    print(f"wrote {args.out}")
    bad = (report["responses_5xx"] or not report["pool_free_after"] or report["canary"]["empty"]
           or not report["healthy_after"] or report.get("server_log_errors"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
