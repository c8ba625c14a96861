"""Multi-host serving (jaxserve/distributed.py) on localhost: `jaxserve serve --distributed` in
2 and 4 processes of one CPU device each, against one process holding as many simulated
devices (the same tp program); data-parallel replicas across processes (`--dp 2 --tp 2`: a
replica per process of 2 devices, and replicas spanning 2 processes of one device each), the
leader holding one replica and driving the other over the step channel; a lost process stops
the group; the startup check.

The 2-process group serves one batch of requests (greedy and seeded sampling, base and
adapter, penalties and log-probs) at once; the 4-process group, to bound its compiles, one
adapter request with seeded sampling and log-probs, checked against the same request in the
one-process batch. Each group is then stopped by a signal: every wait is a hang guard only."""
from __future__ import annotations

import concurrent.futures
import signal
import pytest

from tests.dist_procs import Group, free_port

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PROMPTS = ["w3 w4 w5", "w10 w11 w12 w13 w14 w15", "w40 w7", "w99 w98 w97 w96", "w5"]
REQUESTS = [   # sent at once, so that they share steps
    dict(model="base", prompt=PROMPTS[0], max_tokens=12, temperature=0),
    dict(model="ad", prompt=PROMPTS[1], max_tokens=12, temperature=0),
    dict(model="base", prompt=PROMPTS[2], max_tokens=12, temperature=1.0, top_p=0.9, seed=7),
    dict(model="ad", prompt=PROMPTS[3], max_tokens=12, temperature=0.8, seed=11, logprobs=2),
    dict(model="base", prompt=PROMPTS[4], max_tokens=12, temperature=0.7, seed=3,
         frequency_penalty=0.5, repetition_penalty=1.2),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tests.lora_helpers import make_adapter, make_base
    root = tmp_path_factory.mktemp("dist")
    base = make_base(root / "base")
    make_adapter(base, root / "ad", seed=3, r=8, lora_alpha=16,
                 target_modules=["q_proj", "v_proj"])
    other = root / "other"   # same architecture, other weights: the startup check refuses it
    make_base(other, seed=1)
    return root


def args(root, tp: int) -> list[str]:
    return ["--model", str(root / "base"), "--tp", str(tp), "--dtype", "float32",
            "--num-pages", "64", "--max-num-seqs", "8", "--max-model-len", "128",
            "--max-prefill-tokens", "64", "--lora-modules", f"ad={root / 'ad'}"]


@pytest.fixture(scope="module")
def groups(models, tmp_path_factory):
    """Started together, so that their start-ups and compiles overlap on the cores."""
    logs = tmp_path_factory.mktemp("logs")
    dp = args(models, 2) + ["--dp", "2"]
    g = {"ref": Group(logs, args(models, 2), 1, devices=2),
         "dist2": Group(logs, args(models, 2), 2),
         "dist4": Group(logs, args(models, 4), 4),
         "dp2": Group(logs, dp, 2, devices=2),
         "dp4": Group(logs, dp, 4)}
    yield g
    for group in g.values():
        group.stop()


@pytest.fixture(scope="module")
def reference(groups) -> list[dict]:
    return serve_batch(groups["ref"])


def serve_batch(group: Group, requests=REQUESTS) -> list[dict]:
    group.wait_ready()
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        out = list(pool.map(lambda r: group.post("/v1/completions", r), requests))
    return [o["choices"][0] for o in out]


def assert_same(got: list[dict], want: list[dict], requests=REQUESTS) -> None:
    for g, w, req in zip(got, want, requests, strict=True):
        assert g["text"] == w["text"], req
        assert g["finish_reason"] == w["finish_reason"], req
        if req.get("logprobs"):
            assert g["logprobs"]["tokens"] == w["logprobs"]["tokens"]
            assert g["logprobs"]["token_logprobs"] == pytest.approx(
                w["logprobs"]["token_logprobs"], abs=1e-4)


@pytest.mark.slow
def test_two_processes_serve_as_one_then_stop_cleanly(groups, reference):
    """Same outputs as one process; SIGTERM on the leader drains it and stops the follower."""
    assert len({c["text"] for c in reference}) == len(reference)   # the requests do differ
    assert_same(serve_batch(groups["dist2"]), reference)
    g = groups["dist2"]
    assert "follows the leader" in g.log(1) and "serving base" not in g.log(1)
    assert "distributed: process 0 of 2" in g.log(0)
    g.signal(0, signal.SIGTERM)
    assert g.wait(0) == 0, g.log(0)[-3000:]
    assert g.wait(1) == 0, g.log(1)[-3000:]


@pytest.mark.slow
def test_four_processes_serve_as_one_and_a_lost_follower_stops_them(groups, reference):
    """Same output as one process; SIGKILL on process 3: the leader exits non-zero naming it,
    and the other followers exit on the leader's loss."""
    assert_same(serve_batch(groups["dist4"], [REQUESTS[3]]), [reference[3]], [REQUESTS[3]])
    g = groups["dist4"]
    g.signal(3, signal.SIGKILL)
    assert g.wait(0) not in (0, -signal.SIGKILL)
    assert "process 3 (a follower) stopped" in g.log(0)
    for i in (1, 2):
        assert g.wait(i) != 0
        assert f"process {i}: the leader (process 0) closed the step channel" in g.log(i)


def replica_steps(group: Group) -> list[float]:
    """jaxserve:replica_steps_total of each replica, from the leader's /metrics."""
    import re
    text = group.get_text("/metrics")
    found = re.findall(r'^jaxserve:replica_steps_total\{[^}]*replica="(\d+)"\} (\S+)$', text, re.M)
    return [float(v) for _, v in sorted(found, key=lambda x: int(x[0]))]


@pytest.mark.slow
def test_dp_replicas_across_processes_serve_as_one(groups, reference):
    """--dp 2 --tp 2 over 2 processes of 2 devices (replica 1 is process 1's) and over 4
    processes of one device (replica 1 spans processes 2 and 3): the batch's outputs equal one
    process's at tp 2, both replicas ran steps, and the remote replica's first process is the
    one returning its outputs. Killing that process stops the leader, naming it."""
    for name, head in (("dp2", 1), ("dp4", 2)):
        g = groups[name]
        assert_same(serve_batch(g), reference)
        steps = replica_steps(g)
        assert len(steps) == 2 and min(steps) > 0, steps
        assert "returns the outputs of replicas [1]" in g.log(head)
        assert all("returns the outputs" not in g.log(i)
                   for i in range(1, len(g.procs)) if i != head)
    g = groups["dp4"]
    g.signal(2, signal.SIGKILL)
    assert g.wait(0) not in (0, -signal.SIGKILL)
    assert "process 2 (a follower) stopped" in g.log(0)


@pytest.mark.slow
def test_startup_refuses_another_checkpoint(models, tmp_path):
    """A follower that loaded other weights (same architecture and files' names): both exit,
    naming what differs, before serving."""
    other = args(models, 2)
    other[1] = str(models / "other")
    g = Group(tmp_path, args(models, 2), 2, args_of={1: other})
    try:
        assert g.wait(0) == 2 and g.wait(1) == 2
        why = ("process 1 differs from process 0 in checkpoint files (model.safetensors), "
               "replicated weights' checksum")
        assert why in g.log(0) and why in g.log(1)
    finally:
        g.stop()


@pytest.mark.slow
def test_a_process_failing_to_load_stops_the_group_while_it_forms(models, tmp_path):
    """Process 1 cannot load its checkpoint (a path missing on its host): it exits with its
    own error, and process 0, still loading, stops at once naming it (the step channel is
    joined before loading), not after JAX's or the channel's start-up timeouts."""
    broken = args(models, 2)
    broken[1] = str(tmp_path / "missing")
    g = Group(tmp_path, args(models, 2), 2, args_of={1: broken},
              env={"JAXSERVE_STEP_CONNECT_TIMEOUT_S": "3000"})
    try:
        assert g.wait(1) == 2, g.log(1)[-3000:]
        assert "missing" in g.log(1)
        assert g.wait(0) == 3, g.log(0)[-3000:]
        assert "process 1 (a follower) stopped while the serving group was forming" in g.log(0)
    finally:
        g.stop()


@pytest.mark.slow
def test_a_mesh_short_of_the_devices_is_refused(models, tmp_path):
    g = Group(tmp_path, args(models, 1), 2)
    try:
        for i in (0, 1):
            assert g.wait(i) == 2
            assert ("--dp 1 x --tp 1 must span every device of the 2 processes (2 devices)"
                    in g.log(i))
    finally:
        g.stop()


def test_one_process_is_refused(models, tmp_path):
    g = Group(tmp_path, args(models, 1), 1, env={
        "JAXSERVE_DISTRIBUTED": "1", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0",
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}"})
    assert g.wait(0) == 2, g.log(0)
    assert "this is the only process" in g.log(0)


def test_messages_round_trip_with_arrays_raw():
    """encode/decode over a socket: a step's call (numpy arrays, LoRA slots) arrives equal,
    heartbeats between messages read as None; numpy data travels out of band (not pickled)."""
    import socket

    import numpy as np

    from jaxserve.distributed import _PING, decode, encode
    from jaxserve.step_builder import BuiltStep, LoraSlots
    built = BuiltStep.empty(False, 8, 1, 4)
    built.tokens[:] = np.arange(8)[:, None]
    built.lora = LoraSlots(idx=np.arange(8, dtype=np.int32), pages=(np.ones((8, 2), np.int32),),
                           ranks=np.ones((2, 1, 8), np.int32),
                           scales=np.full((2, 1, 8), 0.5, np.float32), modules=("q",),
                           max_rank=8, row_keys=[("ad", 1)] * 8)
    frames = encode(("call", (built,)))
    assert len(frames) > 10 and len(frames[1]) < 4000   # the pickle holds no array data
    a, b = socket.socketpair()
    with a, b:
        a.sendall(_PING + b"".join(frames) + _PING + b"".join(encode(("stop", ()))))
        assert decode(b) is None
        name, (got,) = decode(b)
        assert decode(b) is None and decode(b) == ("stop", ())
    assert name == "call" and got.shape == built.shape
    for f in ("tokens", "positions", "block_tables", "seeds", "pen_slots"):
        np.testing.assert_array_equal(getattr(got, f), getattr(built, f))
    np.testing.assert_array_equal(got.lora.scales, built.lora.scales)
    assert got.lora.row_keys == built.lora.row_keys


def test_fingerprint_differences_are_named():
    from jaxserve.fingerprint import differences
    mine = {"engine config": '{"seed": 0, "tp": 2}', "model config": "A",
            "checkpoint files": {"config.json": "1:aa", "model.safetensors": "9:bb"}}
    assert differences(mine, dict(mine)) == []
    theirs = {"engine config": '{"seed": 1, "tp": 2}', "model config": "A",
              "checkpoint files": {"config.json": "1:aa", "model.safetensors": "9:cc"}}
    assert differences(mine, theirs, 2) == [
        "engine config (seed: 0 on process 0, 1 on process 2)",
        "checkpoint files (model.safetensors)"]


def test_bench_broadcast_runs(tmp_path):
    """scripts/bench_broadcast.py end to end at 2 repetitions: its table's rows and sizes."""
    import json
    import os
    import subprocess
    import sys
    out = tmp_path / "b.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, os.path.join(root, "scripts", "bench_broadcast.py"),
                    "--reps", "2", "--out", str(out)], check=True, capture_output=True)
    rows = {r["message"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["decode 256"]["bytes"] > 256 * 128 * 4 > rows["decode 64"]["bytes"]
    assert all(r["send_replay_receive_ms"] > 0 for r in rows.values())


def test_replaying_the_log_rebuilds_the_device_state(models):
    """Everything a runner does on the device is in its recorder's log: a second runner that
    replays the log (through the channel's codec) ends with the same KV pool (adapter pages
    included) and penalty counts, bit for bit. One process, no collectives: what a follower
    does, without the network."""
    import socket
    import threading

    import numpy as np

    from jaxserve.distributed import decode, encode, replay
    from jaxserve.engine import EngineConfig, LLMEngine
    from jaxserve.sampling_params import SamplingParams
    cfg = EngineConfig(model=str(models / "base"), dtype="float32", num_pages=32,
                       max_num_seqs=4, max_model_len=128, max_prefill_tokens=32,
                       async_scheduling=False)
    leader, follower = LLMEngine(cfg), LLMEngine(cfg)
    log = []
    leader.runner.recorder = lambda name, args: log.append(b"".join(encode((name, args))))
    leader.runner.init_pool(32)
    leader.runner.warmup(shapes=leader.runner.builder.shapes(lora=False)[:1])
    leader.add_lora("ad", str(models / "ad"))
    params = [SamplingParams(max_tokens=6, temperature=0),
              SamplingParams(max_tokens=6, temperature=0.8, seed=5, frequency_penalty=0.5)]
    leader.generate(PROMPTS[:2], params)
    leader.generate(PROMPTS[2:4], params, adapter="ad")
    names = []
    a, b = socket.socketpair()
    with a, b:
        threading.Thread(target=a.sendall, args=(b"".join(log),), daemon=True).start()
        for _ in log:
            name, args = decode(b)
            names.append(name)
            replay(follower.runner, name, args)
    assert set(names) == {"init_pool", "warmup", "call", "write_slot", "write_adapters"}
    for x, y in ((leader.runner.kv.k, follower.runner.kv.k),
                 (leader.runner.kv.v, follower.runner.kv.v),
                 (leader.runner._pen_counts, follower.runner._pen_counts)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert np.asarray(leader.runner.kv.k).any()


@pytest.mark.slow
def test_generate_with_replicas_across_processes_is_refused(models):
    """`generate` runs the engine in every process: with a replica on another process it is
    refused before loading, naming `serve --distributed` (which drives such replicas)."""
    import os
    import subprocess
    import sys

    from tests.dist_procs import ROOT
    coord = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "jaxserve.cli", "generate", "--model", str(models / "base"),
         "--dp", "2", "--distributed", "--prompt", "w3", "--max-tokens", "2"],
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
                 XLA_FLAGS="--xla_force_host_platform_device_count=1",
                 JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{coord}", JAX_NUM_PROCESSES="2",
                 JAX_PROCESS_ID=str(i)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=240)   # a hang guard
        assert p.returncode == 2, out[-2000:]
        assert "`generate` runs the engine in every process" in out
        assert "jaxserve serve --distributed" in out
