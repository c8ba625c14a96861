"""scripts/bench_kernels.py --quick runs end to end (on CPU: interpret mode, tiny shapes) and every
implementation it times agrees with the XLA path on the same inputs."""
import json
import runpy

import jax


def test_bench_quick_runs_and_agrees(tmp_path):
    bench = runpy.run_path("scripts/bench_kernels.py", run_name="bench_kernels")
    out = tmp_path / "bench.json"
    bench["main"](["--quick", "--iters", "1", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["backend"] == jax.default_backend() and data["bandwidth_bytes_per_s"] > 0
    ours = [r for r in data["rows"] if "ours" in r["impl"]]
    # attention decode (one layer's pool, and a stacked pool at layer 5), prefill, LoRA decode x2,
    # LoRA prefill, and the TPU LoRA path
    assert len(ours) == 7 and all(r["time_ms"] for r in ours)
    for r in data["rows"]:
        if "max_abs_diff_vs_xla" in r:     # f32 on CPU: all paths agree to float rounding
            assert r["max_abs_diff_vs_xla"] < 1e-4, r
