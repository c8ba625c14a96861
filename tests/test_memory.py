"""Memory planning (jaxserve/memory.py): the arithmetic, its errors, and the engine's planned pool."""
from __future__ import annotations

import pytest

from jaxserve.memory import (GiB, MiB, DeviceMemory, MemoryPlanError, device_memory, plan_pool,
                             reserve_bytes)


class StatsDevice:
    """A device as the planner sees it: a platform and a memory_stats() dict."""

    def __init__(self, platform: str, limit: int, in_use: int):
        self.platform, self.limit, self.in_use = platform, limit, in_use

    def memory_stats(self):
        return {"bytes_limit": self.limit, "bytes_in_use": self.in_use, "peak_bytes_in_use": 0}


class NoStatsDevice:
    platform = "cpu"

    def memory_stats(self):
        return None


def test_plan_arithmetic():
    mem = DeviceMemory("tpu", total_bytes=100 * GiB, limit_bytes=100 * GiB, in_use_bytes=16 * GiB)
    plan = plan_pool(mem, utilization=0.9, step_bytes=3 * GiB, page_bytes=2 * MiB, page_size=16,
                     max_model_len=8192)
    budget = int(0.9 * 100 * GiB)
    assert plan.budget_bytes == budget
    assert plan.reserve_bytes == reserve_bytes(budget) == int(0.02 * budget)
    free = budget - 16 * GiB - 3 * GiB - plan.reserve_bytes
    assert plan.num_pages == free // (2 * MiB)
    assert plan.pool_bytes <= free < plan.pool_bytes + 2 * MiB
    assert plan.tokens == (plan.num_pages - 1) * 16
    assert plan.sequences == (plan.num_pages - 1) // 512
    line = plan.describe()
    for s in (f"{plan.num_pages:,} pages", f"{plan.tokens:,} tokens",
              f"{plan.sequences:,} sequences of max_model_len 8,192", "0.9 x 100.00 GiB"):
        assert s in line


def test_a_step_that_grows_with_the_pool_shares_what_is_left():
    mem = DeviceMemory("tpu", total_bytes=100 * GiB, limit_bytes=100 * GiB, in_use_bytes=10 * GiB)
    kw = dict(utilization=1.0, page_bytes=MiB, page_size=16, max_model_len=16, reserve=0)
    flat = plan_pool(mem, step_bytes=2 * GiB, **kw)
    copying = plan_pool(mem, step_bytes=2 * GiB, step_bytes_per_page=MiB, **kw)  # a pool copy
    assert flat.num_pages == 88 * 1024 and copying.num_pages == 44 * 1024
    assert copying.step_bytes_at_plan == 2 * GiB + 44 * GiB
    assert "grows with the pool" in copying.describe()
    assert "grows" not in flat.describe()


def test_budget_is_capped_by_the_allocator_limit():
    mem = DeviceMemory("gpu", total_bytes=100 * GiB, limit_bytes=75 * GiB, in_use_bytes=0)
    plan = plan_pool(mem, utilization=0.9, step_bytes=0, page_bytes=MiB, page_size=16,
                     max_model_len=16, reserve=0)
    assert plan.budget_bytes == 75 * GiB and plan.num_pages == 75 * 1024


def test_gpu_total_from_the_allocator_fraction():
    dev = StatsDevice("gpu", limit=int(0.9 * 140 * GiB), in_use=GiB)
    mem = device_memory([dev], environ={"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"})
    assert abs(mem.total_bytes - 140 * GiB) < 16 and mem.limit_bytes == dev.limit
    # Without the variable JAX limits itself to 0.75 of the device.
    mem = device_memory([StatsDevice("gpu", limit=75 * GiB, in_use=0)], environ={})
    assert mem.total_bytes == 100 * GiB
    # TPU: bytes_limit is the device's memory.
    mem = device_memory([StatsDevice("tpu", limit=32 * GiB, in_use=0)], environ={})
    assert mem.total_bytes == mem.limit_bytes == 32 * GiB


def test_tightest_device_of_a_mesh():
    devs = [StatsDevice("tpu", 32 * GiB, 2 * GiB), StatsDevice("tpu", 30 * GiB, 5 * GiB)]
    mem = device_memory(devs)
    assert (mem.total_bytes, mem.limit_bytes, mem.in_use_bytes) == (30 * GiB, 30 * GiB, 5 * GiB)


def test_no_stats_means_no_plan():
    assert device_memory([NoStatsDevice()]) is None
    assert device_memory([StatsDevice("tpu", 1, 0), NoStatsDevice()]) is None


def test_weights_over_the_budget_say_what_is_missing():
    mem = DeviceMemory("tpu", total_bytes=80 * GiB, limit_bytes=80 * GiB, in_use_bytes=75 * GiB)
    with pytest.raises(MemoryPlanError) as e:
        plan_pool(mem, utilization=0.9, step_bytes=0, page_bytes=MiB, page_size=16,
                  max_model_len=2048, reserve=0)
    msg = str(e.value)
    assert "3.00 GiB missing" in msg and "--gpu-memory-utilization" in msg and "--tp" in msg


def test_pool_smaller_than_one_sequence_is_refused():
    mem = DeviceMemory("tpu", total_bytes=10 * GiB, limit_bytes=10 * GiB, in_use_bytes=8 * GiB)
    # 1 GiB left after the weights, the step takes 900 MiB: 124 MiB for the pool, a sequence of
    # 2048 tokens needs 129 pages of 1 MiB.
    with pytest.raises(MemoryPlanError) as e:
        plan_pool(mem, utilization=0.9, step_bytes=900 * MiB, page_bytes=MiB, page_size=16,
                  max_model_len=2048, reserve=0)
    msg = str(e.value)
    assert "less than one sequence of max_model_len 2048" in msg and "--max-model-len" in msg
    assert "missing" in msg


def test_utilization_out_of_range():
    mem = DeviceMemory("tpu", GiB, GiB, 0)
    for u in (0, 1.5):
        with pytest.raises(MemoryPlanError, match="gpu-memory-utilization"):
            plan_pool(mem, utilization=u, step_bytes=0, page_bytes=MiB, page_size=16,
                      max_model_len=16)


# -- the engine's planned pool, on CPU with stats given explicitly --------------------------------

def _engine(path, **kw):
    from jaxserve.engine import EngineConfig, LLMEngine
    cfg = dict(model=str(path), dtype="float32", page_size=8, max_num_seqs=4,
               max_prefill_tokens=32, max_model_len=64, max_lora_rank=8)
    devices = kw.pop("memory_devices", None)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg), memory_devices=devices)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from tests.lora_helpers import make_base
    path = tmp_path_factory.mktemp("base")
    make_base(path)
    return path


def test_engine_pool_is_planned_from_device_memory(base_dir):
    from jaxserve.sampling_params import SamplingParams
    dev = StatsDevice("tpu", limit=160 * MiB, in_use=20 * MiB)
    engine = _engine(base_dir, gpu_memory_utilization=0.8, memory_devices=[dev])
    plan = engine.memory_plan
    # one device: no step copies the pool (the adapter weights are gathered by a call of their own)
    assert plan is not None and plan.step_bytes > 0 and plan.step_bytes_per_page == 0
    want = plan_pool(DeviceMemory("tpu", 160 * MiB, 160 * MiB, 20 * MiB), utilization=0.8,
                     step_bytes=plan.step_bytes, page_bytes=plan.page_bytes, page_size=8,
                     max_model_len=64)
    assert plan == want
    assert engine.runner.kv.num_pages == plan.num_pages == engine.scheduler.allocator.num_usable + 1
    assert engine.loras.max_pages == plan.num_pages - 1
    # the pool is the planned size and serves
    out = engine.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=3, temperature=0.0,
                                                         ignore_eos=True))[0]
    assert len(out.token_ids) == 3


def test_explicit_pool_flags_override_the_plan(base_dir):
    dev = StatsDevice("tpu", limit=160 * MiB, in_use=20 * MiB)
    assert _engine(base_dir, num_pages=33, memory_devices=[dev]).runner.kv.num_pages == 33
    engine = _engine(base_dir, kv_cache_gb=0.001, memory_devices=[dev])
    assert engine.memory_plan is None and engine.runner.kv.num_pages > 2


def test_engine_refuses_a_device_too_small(base_dir):
    dev = StatsDevice("tpu", limit=64 * MiB, in_use=63 * MiB)
    with pytest.raises(MemoryPlanError, match="missing"):
        _engine(base_dir, memory_devices=[dev])


@pytest.mark.parametrize("layer_loop", ["per-layer", "scan"])
def test_step_memory_comes_from_the_compiled_step(base_dir, layer_loop):
    runner = _engine(base_dir, num_pages=40, layer_loop=layer_loop, max_num_seqs=8,
                     max_prefill_tokens=64).runner
    decode = [runner.step_memory(("decode", B, 1, 8), 40) for B in (1, 8)]
    prefill = [runner.step_memory(("prefill", 1, T, 8), 40) for T in (16, 64)]
    assert 0 < decode[0] < decode[1] and 0 < prefill[0] < prefill[1]
    # the pool is not part of it: an abstract pool 100x larger needs the same bytes
    assert runner.step_memory(("decode", 8, 1, 8), 4000) == decode[1]
    # with adapters: the slot weights and their gather on top
    lb = max(runner.lora.buckets(), key=lambda b: (b[0], len(b[1])))
    assert runner.step_memory(("decode", 8, 1, 8) + lb, 40) > decode[1]


def test_cli_sets_jax_memory_fraction_unless_set(monkeypatch):
    import os
    from jaxserve.cli import build_parser, set_jax_memory_fraction
    args = build_parser().parse_args(["serve", "--gpu-memory-utilization", "0.8"])
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    set_jax_memory_fraction(args)
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.8"
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    set_jax_memory_fraction(args)
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"
