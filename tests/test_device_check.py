"""scripts/device_check.sh --cpu-smoke: the GPU check runs end to end on CPU with tiny shapes
(every step, the bench with its roofline column, both pools, the compiled-HLO copy check, the
serving loop's step period against device time, a --distributed --dp 2 group against one
process), so
the script is known to work before an accelerator session spends its minutes on it."""
import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_device_check_cpu_smoke(tmp_path):
    out = tmp_path / "dc"
    proc = subprocess.run([os.path.join(ROOT, "scripts", "device_check.sh"), "--cpu-smoke",
                           str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "device_check.json").read_text())
    assert res["smoke"] and all(s["rc"] == 0 for s in res["steps"].values()), res["steps"]
    assert [r["batch"] for r in res["bench_json"]["rows"]] == [1, 4]
    for r in res["bench_json"]["rows"]:
        assert r["ours_decode_tok_s"] > 0 and 0 < r["hbm_roofline_pct"] < 100
    small, large = (p["rows"][0]["num_pages"] for p in res["pool_json"])
    assert large > 10 * small                       # the two pools really differ
    assert res["hlo"]["programs"] > 0 and res["hlo"]["pool_copies"] == []
    assert [(r["batch"], r["loop"]) for r in res["overlap_json"]["rows"]] == [(4, "sync"),
                                                                            (4, "overlap")]
    assert all(r["period_ms"] > 0 and r["device_ms"] > 0 for r in res["overlap_json"]["rows"])
    fams = {(r["model"], r["batch"]) for r in res["families"]}
    assert fams == {(m, b) for m in ("qwen3-tiny", "qwen3-moe-tiny") for b in (1, 4)}
    assert all(r["decode_tok_s"] > 0 and r["hbm_roofline_pct"] > 0 for r in res["families"])
    targets = {name: met for name, _, met in res["targets"]}
    assert len(targets) == 9
    assert targets["serve --distributed --dp 2 (2 processes) = one process"] is True
    assert targets["decode step memory does not grow with the pool"] is True
    assert "| target | measured | met |" in proc.stdout
