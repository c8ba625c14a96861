"""simulate CLI: JSON output and plot on a short run; bad input -> one clear line, exit 2."""
import argparse
import json
import subprocess
import sys

import pytest

from scheduler import simulate_cli
from scheduler.cost_model import CostModel
from scheduler.workload import WorkloadError, generate, load_trace

SMALL = {"duration_s": 30, "clients": [
    {"id": "a", "rate": 2.0, "input_len": 64, "output_len": 64},
    {"id": "b", "arrival": "poisson", "rate": 1.0, "input_len": [16, 64], "output_len": [16, 64]}]}


def cli(argv, capsys):
    p = argparse.ArgumentParser()
    simulate_cli.add_arguments(p)
    rc = simulate_cli.run(p.parse_args(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def workload(tmp_path):
    path = tmp_path / "w.json"
    path.write_text(json.dumps(SMALL))
    return str(path)


def test_json_output_and_plot(workload, tmp_path, capsys):
    png = tmp_path / "p.png"
    rc, out, err = cli(["--workload", workload, "--scheduler", "vtc,fcfs", "--json",
                        "--plot", str(png), "--duration", "20"], capsys)
    assert rc == 0, err
    data = json.loads(out)
    assert set(data["schedulers"]) == {"vtc", "fcfs"}
    v = data["schedulers"]["vtc"]
    assert set(v["clients"]) == {"a", "b"}
    assert v["throughput"]["output_tokens_per_s"] > 0
    assert v["clients"]["a"]["first_token_latency_s"]["mean"] is not None
    assert png.stat().st_size > 1000


def test_text_output_and_cost_model_file(workload, tmp_path, capsys):
    cm = tmp_path / "cm.json"
    cm.write_text(json.dumps({"decode_step_s": {"a": 0.02, "b": 0.0005}, "prefill_per_token_s": 1e-4}))
    rc, out, _ = cli(["--workload", workload, "--cost-model", str(cm), "--fair-weights", "a=2"], capsys)
    assert rc == 0 and "== vtc" in out
    assert CostModel.from_json(str(cm)) == CostModel(decode_base_s=0.02, decode_per_seq_s=0.0005,
                                                     prefill_per_token_s=1e-4)


@pytest.mark.parametrize("argv_fn, needle", [
    (lambda w, t: ["--workload", str(t / "missing.json")], "not found"),
    (lambda w, t: ["--workload", str(t / "bad.json")], "not valid JSON"),
    (lambda w, t: ["--workload", str(t / "nocl.json")], "clients"),
    (lambda w, t: ["--workload", w, "--scheduler", "sjf"], "unknown scheduler 'sjf'"),
    (lambda w, t: ["--workload", w, "--fair-weights", "a:2"], "--fair-weights"),
    (lambda w, t: ["--trace", str(t / "missing.csv")], "trace file not found"),
    (lambda w, t: ["--trace", str(t / "bad.csv")], "trace"),
    (lambda w, t: ["--workload", w, "--cost-model", str(t / "bad_cm.json")], "unknown cost model key"),
])
def test_bad_input_is_one_clear_line_and_exit_2(argv_fn, needle, workload, tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "nocl.json").write_text(json.dumps({"duration_s": 10}))
    (tmp_path / "bad.csv").write_text("x,y\n1,2\n")
    (tmp_path / "bad_cm.json").write_text(json.dumps({"decode_sec": 1}))
    rc, out, err = cli(argv_fn(workload, tmp_path), capsys)
    assert rc == 2
    assert needle in err and "Traceback" not in err and err.count("\n") == 1


def test_module_entry_point_runs_standalone(workload):
    ok = subprocess.run([sys.executable, "-m", "scheduler.simulate_cli", "--workload", workload,
                         "--duration", "5", "--json"], capture_output=True, text=True)
    assert ok.returncode == 0 and json.loads(ok.stdout)["num_requests"] > 0
    bad = subprocess.run([sys.executable, "-m", "scheduler.simulate_cli", "--workload", "/nonexistent.json"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "not found" in bad.stderr


def test_workload_generation_rates_and_validation():
    reqs = generate(SMALL, 30, seed=1)
    n_a = sum(r.client == "a" for r in reqs)
    assert abs(n_a - 60) <= 1, "uniform 2 req/s over 30 s"
    assert all(16 <= r.prompt_tokens <= 64 for r in reqs if r.client == "b")
    assert reqs == generate(SMALL, 30, seed=1) and reqs != generate(SMALL, 30, seed=2)
    ramp = {"clients": [{"id": "r", "arrival": "ramp", "rate_start": 0.0, "rate_end": 2.0,
                         "input_len": 1, "output_len": 1}]}
    times = [r.arrival_s for r in generate(ramp, 100)]
    assert abs(len(times) - 100) <= 2 and sum(t > 50 for t in times) > 2.5 * sum(t <= 50 for t in times)
    with pytest.raises(WorkloadError, match="arrival"):
        generate({"clients": [{"id": "x", "arrival": "bursty", "rate": 1, "input_len": 1, "output_len": 1}]})


def test_trace_loads(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("client,arrival_s,prompt_tokens,output_tokens\nb,2.0,5,6\na,1.0,3,4\n")
    assert [r.client for r in load_trace(str(p))] == ["a", "b"]
