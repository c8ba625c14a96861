"""scripts/bench_sampling.py end to end on a tiny model with a byte-level tokenizer: every mode
runs, the constrained outputs are grammar prefixes (the script checks them), and the JSON holds
each mode's rate and its ratio to the unconstrained one."""
import json
import os
import sys

import pytest

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "scripts"))

pytestmark = pytest.mark.slow   # six modes compiled on a tiny model


def test_bench_sampling_every_mode(tmp_path, capsys):
    import bench_sampling
    from test_structured import make_json_model
    make_json_model(tmp_path / "m")
    out = tmp_path / "r.json"
    bench_sampling.main(["--model", str(tmp_path / "m"), "--batch", "3", "--input-len", "5",
                         "--output-len", "6", "--repeats", "1", "--json", str(out)])
    res = json.loads(out.read_text())
    modes = bench_sampling.MODES.split(",")
    assert [r["mode"] for r in res["runs"]] == modes
    for r in res["runs"]:
        assert 0 < r["tokens"] <= 15 and r["tok_s"] > 0, r   # (6 - 1) x 3 at most
    assert res["ratios"]["none"] == 1.0 and set(res["ratios"]) == set(modes)
    assert res["best"]["json"]["host_mask_ms_per_step"] > 0
    assert res["best"]["none"]["host_mask_ms_per_step"] == 0
    table = capsys.readouterr().out
    assert "| json |" in table and "| penalties |" in table


def test_bench_sampling_refuses_an_unknown_mode(capsys):
    import bench_sampling
    with pytest.raises(SystemExit):
        bench_sampling.main(["--modes", "none,jsn"])
    assert "unknown mode(s) jsn" in capsys.readouterr().err
