"""A `jaxserve serve` group on localhost: N processes of jax.distributed, one CPU device each
(or one process with N simulated devices, the reference), for tests/test_distributed.py.
No time limits: `wait` and `wait_ready` guard against hangs only."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

GUARD_S = 240   # a hang guard, never a measure: a busy machine makes a run slower, not failing
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Group:
    """`num_processes` serve processes (one device each) with --distributed, or with
    num_processes 1 a plain server on `devices` simulated devices. Logs under `log_dir`."""

    def __init__(self, log_dir, args: list[str], num_processes: int, devices: int = 1,
                 env: dict | None = None, args_of: dict[int, list[str]] | None = None):
        """args_of: other arguments for some processes (by process id)."""
        self.port = free_port()
        coord, step = free_port(), free_port()
        self.procs, self.logs = [], []
        for i in range(num_processes):
            e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
                     XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
            if num_processes > 1:
                e.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{coord}",
                         JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(i),
                         JAXSERVE_STEP_PORT=str(step))
            e.update(env or {})
            path = os.path.join(str(log_dir), f"proc{self.port}-{i}.log")
            self.logs.append(path)
            with open(path, "w") as log:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "jaxserve.cli", "serve", "--port", str(self.port),
                     *(args_of or {}).get(i, args), *(["--distributed"] if num_processes > 1 else [])],
                    stdout=log, stderr=subprocess.STDOUT, env=e, cwd=ROOT))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self, i: int) -> str:
        with open(self.logs[i]) as f:
            return f.read()

    def wait_ready(self) -> None:
        """Until the leader answers /health (raises if any process exits first)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < GUARD_S:
            for i, p in enumerate(self.procs):
                if p.poll() is not None:
                    raise AssertionError(f"process {i} exited ({p.returncode}):\n"
                                         f"{self.log(i)[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        raise AssertionError("the server did not start (hang guard)")

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=GUARD_S) as r:
            return json.loads(r.read())

    def get_text(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=GUARD_S) as r:
            return r.read().decode()

    def signal(self, i: int, sig=signal.SIGKILL) -> None:
        self.procs[i].send_signal(sig)

    def wait(self, i: int) -> int:
        """Process i's exit status (hang guard: GUARD_S)."""
        return self.procs[i].wait(GUARD_S)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
