"""VTC in the real engine (default model): two saturating clients, B sending twice A's rate.

Service is equal under VTC (within 15%) and about 1:2 under FCFS; VTC costs no throughput
(tokens per engine step within 5% of FCFS — counted in steps, not seconds, so the check is
deterministic and not a timing assertion).
"""
import importlib.util
import os

import pytest

from jaxserve.engine import EngineConfig, LLMEngine

pytestmark = pytest.mark.slow   # the real default model

_spec = importlib.util.spec_from_file_location(
    "bench_fairness_engine", os.path.join(os.path.dirname(__file__), "..", "scripts", "bench_fairness_engine.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def results(default_model):
    out = {}
    for policy in ("fcfs", "vtc"):
        engine = LLMEngine(EngineConfig(dtype="float32", max_num_seqs=8, max_model_len=256, num_pages=256,
                                        scheduler=policy), model=default_model)
        out[policy] = bench.run_two_clients(engine, steps=160, period=4, prompt_len=32, output_len=32,
                                            warmup_steps=40)
        assert out[policy]["stats"]["num_free_pages"] == out[policy]["stats"]["num_total_pages"]
    return out


def test_vtc_gives_equal_service(results):
    assert abs(results["vtc"]["ratio_b_over_a"] - 1.0) <= 0.15


def test_fcfs_gives_service_in_proportion_to_demand(results):
    assert 1.6 <= results["fcfs"]["ratio_b_over_a"] <= 2.4


def test_vtc_throughput_matches_fcfs(results):
    ratio = results["vtc"]["tokens_per_step"] / results["fcfs"]["tokens_per_step"]
    assert ratio >= 0.95
