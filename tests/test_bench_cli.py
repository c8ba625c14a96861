"""`jaxserve bench --compare-hf` end to end on a tiny checkpoint: both engines run the same
prompts, and the JSON carries decode and e2e rates for each, their ratios and the MFU."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from lora_helpers import make_base  # noqa: E402

pytestmark = pytest.mark.slow   # the engine and HF transformers, each compiled/run twice


def test_bench_compare_hf_writes_rates_and_ratios(tmp_path):
    from jaxserve.cli import main
    make_base(str(tmp_path / "base"))
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tmp_path / "base"), "--batch-sizes", "1,2",
                 "--input-len", "8", "--output-len", "6", "--compare-hf", "--dtype", "float32",
                 "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["batch"] for r in res["rows"]] == [1, 2] and res["matmul_peak_gflops"] > 0
    for r in res["rows"]:
        for k in ("ours_decode_tok_s", "ours_e2e_tok_s", "hf_decode_tok_s", "hf_e2e_tok_s"):
            assert r[k] > 0, k
        assert abs(r["ratio_decode"] - r["ours_decode_tok_s"] / r["hf_decode_tok_s"]) < 1e-9
        assert abs(r["ratio_e2e"] - r["ours_e2e_tok_s"] / r["hf_e2e_tok_s"]) < 1e-9
        assert 0 < r["mfu_decode"] < 1 and r["mfu_decode_fp32_peak"] == pytest.approx(r["mfu_decode"])
        # HBM roofline: the step's least bytes over the measured bandwidth; a real step is slower
        assert 0 < r["hbm_roofline_pct"] < 100 and r["roofline_decode_tok_s"] > r["ours_decode_tok_s"]
        assert r["num_pages"] == r["batch"] * 1 + 2   # sized to the batch (14 tokens: 1 page)
    assert res["memory_bandwidth_gb_s"] > 0 and "measured" in res["memory_bandwidth_source"]


def test_bench_prompts_are_distinct_so_the_prefix_cache_finds_nothing(tmp_path, capsys):
    """The measured run's prompts are neither the warm-up's nor each other's: with prefix
    caching on (the default), repeated prompts would skip their prefill and inflate e2e tok/s.
    The hit rate is in the JSON and the printed table."""
    from jaxserve.cli import main
    make_base(str(tmp_path / "base"))
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tmp_path / "base"), "--batch-sizes", "2",
                 "--input-len", "12", "--output-len", "2", "--page-size", "4",
                 "--dtype", "float32", "--output", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["prefix_cache_queries"] == 2 * 12      # every prompt token looked up once
    assert row["prefix_cache_hits"] == 0 and row["prefix_cache_hit_rate"] == 0.0
    assert "| prefix-cache hits |" in capsys.readouterr().out
