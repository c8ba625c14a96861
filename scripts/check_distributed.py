"""`serve --distributed` on one host, checked against one process: the multi-host code path
(the step channel, the fingerprint check, a data-parallel replica driven remotely) run where
only one machine is at hand.

    python scripts/check_distributed.py --model DIR [--load-format dummy] [--dtype D]
        [--processes 2] [--out check_distributed.json] [--cpu-smoke]

1. one process serves the model (`serve --tp 1`) and answers a batch of requests sent at
   once (greedy, and seeded sampling, token-id prompts, fixed lengths);
2. `--processes N` processes of one `jax.distributed` group serve it as `--dp N --tp 1
   --distributed` (every process on the same accelerator, each with 1/N+ of its memory, or
   one CPU device each with --cpu-smoke): process 0 schedules, replicas 1..N-1 are remote to
   it and their processes send back their outputs;
3. the same batch again: the texts must be the same, and every replica must have run steps
   (`jaxserve:replica_steps_total` on process 0's /metrics).
Prints a table and writes JSON (each server's start-up seconds, batch seconds and tokens/s);
exits 1 when the outputs differ or a replica ran nothing. Waits are hang guards only.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUARD_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`jaxserve serve` in `processes` processes (one: a plain server; more: a --distributed
    group of --dp processes, tp 1), logs under log_dir."""

    def __init__(self, args: list[str], processes: int, log_dir: str, smoke: bool):
        self.port, coord, step = free_port(), free_port(), free_port()
        self.procs, self.logs = [], []
        extra = ["--dp", str(processes), "--tp", "1", "--distributed"] if processes > 1 else []
        for i in range(processes):
            env = dict(os.environ, PYTHONPATH=ROOT)
            if smoke:
                env.update(JAX_PLATFORMS="cpu",
                           XLA_FLAGS="--xla_force_host_platform_device_count=1")
            else:   # the processes share the accelerator: each takes its part up front
                env.update(XLA_PYTHON_CLIENT_MEM_FRACTION=f"{0.85 / processes:.2f}")
            if processes > 1:
                env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{coord}",
                           JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i),
                           JAXSERVE_STEP_PORT=str(step))
            path = os.path.join(log_dir, f"serve{processes}-{i}.log")
            self.logs.append(path)
            with open(path, "w") as log:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "jaxserve.cli", "serve", "--port", str(self.port),
                     *args, *extra], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT))
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < GUARD_S:
            for i, p in enumerate(self.procs):
                if p.poll() is not None:
                    raise RuntimeError(f"process {i} exited ({p.returncode}):\n"
                                       + open(self.logs[i]).read()[-3000:])
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError("the server did not start (hang guard)")

    def post(self, body: dict) -> dict:
        req = urllib.request.Request(self.url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=GUARD_S) as r:
            return json.loads(r.read())

    def replica_steps(self) -> list[float]:
        with urllib.request.urlopen(self.url + "/metrics", timeout=GUARD_S) as r:
            text = r.read().decode()
        found = re.findall(r'^jaxserve:replica_steps_total\{[^}]*replica="(\d+)"\} (\S+)$',
                           text, re.M)
        return [float(v) for _, v in sorted(found, key=lambda x: int(x[0]))]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def requests(vocab: int, n: int, prompt_len: int, output_len: int) -> list[dict]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        body = dict(model="m", prompt=[rng.randrange(3, vocab) for _ in range(prompt_len)],
                    max_tokens=output_len, ignore_eos=True, temperature=0)
        if i % 4 == 3:
            body.update(temperature=0.8, top_p=0.9, seed=i)
        out.append(body)
    return out


def serve_batch(server: Server, batch: list[dict]) -> tuple[list[str], float]:
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(len(batch)) as pool:
        out = list(pool.map(server.post, batch))
    return [o["choices"][0]["text"] for o in out], time.monotonic() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--out", default="check_distributed.json")
    ap.add_argument("--cpu-smoke", action="store_true", help="one CPU device per process")
    args = ap.parse_args(argv)
    if args.processes < 2:
        ap.error("--processes must be 2 or more")
    with open(os.path.join(args.model, "config.json")) as f:
        vocab = min(json.load(f)["vocab_size"], 2048)   # ids the trained tokenizers decode
    log_dir = os.path.dirname(os.path.abspath(args.out))
    serve_args = ["--model", args.model, "--load-format", args.load_format, "--dtype", args.dtype,
                  "--served-model-name", "m", "--max-num-seqs", str(args.requests),
                  "--max-model-len", str(args.prompt_len + args.output_len + 16),
                  "--max-prefill-tokens", str(max(64, args.prompt_len * 2)),
                  "--num-pages", str(4 * args.requests * (args.prompt_len + args.output_len) // 16)]
    batch = requests(vocab, args.requests, args.prompt_len, args.output_len)
    res = dict(processes=args.processes, requests=args.requests, prompt_len=args.prompt_len,
               output_len=args.output_len)
    texts = {}
    for name, n in (("one process", 1), (f"--dp {args.processes} in {args.processes} "
                                         "processes", args.processes)):
        server = Server(serve_args, n, log_dir, args.cpu_smoke)
        try:
            ready = server.wait_ready()
            texts[name], seconds = serve_batch(server, batch)
            res[name] = dict(startup_s=round(ready, 1), batch_s=round(seconds, 2),
                             tok_s=round(args.requests * args.output_len / seconds, 1))
            if n > 1:
                res[name]["replica_steps"] = server.replica_steps()
        finally:
            server.stop()
    one, group = texts.values()
    res["same_outputs"] = one == group
    res["differing_requests"] = [i for i, (a, b) in enumerate(zip(one, group)) if a != b]
    steps = res[list(texts)[1]]["replica_steps"]
    res["every_replica_ran"] = len(steps) == args.processes and min(steps) > 0
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print("| server | start-up s | batch s | tok/s |\n|---|---|---|---|")
    for name in texts:
        r = res[name]
        print(f"| {name} | {r['startup_s']} | {r['batch_s']} | {r['tok_s']} |")
    print(f"same outputs: {res['same_outputs']} (differing: {res['differing_requests']}); "
          f"replica steps: {steps}")
    return 0 if res["same_outputs"] and res["every_replica_ran"] else 1


if __name__ == "__main__":
    sys.exit(main())
