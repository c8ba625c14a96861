"""Start tests/tp_check.py subprocesses (simulated 8-device CPU) and read their JSON results.

A test module starts all its checks at once (`start_all`), so compiles overlap on the cores,
then each test waits for its own (`result`). No time limit: a check does a bounded amount of work
(tp_check bounds its step loops), so a busy machine makes it slower, never failing."""
from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(__file__)
_procs: dict[tuple[str, ...], subprocess.Popen] = {}
_done: dict[tuple[str, ...], tuple[int, str, str]] = {}


def start_all(checks) -> None:
    for args in checks:
        if tuple(args) not in _procs:
            _procs[tuple(args)] = subprocess.Popen(
                [sys.executable, os.path.join(HERE, "tp_check.py"), *args],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result(*args: str) -> dict:
    key = tuple(args)
    start_all([key])
    if key not in _done:
        out, err = _procs[key].communicate()
        _done[key] = (_procs[key].returncode, out, err)
    rc, out, err = _done[key]
    assert rc == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def stop_all() -> None:
    for p in _procs.values():
        if p.poll() is None:
            p.kill()
            p.communicate()
