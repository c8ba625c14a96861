"""Tensor parallelism with several LoRA adapters in one batch (S-LoRA's sharding), on simulated
CPU devices: tokens identical to tp=1, logits within tolerance, and exactly the rank-sized
collectives of the design in one decode step's HLO. Tolerances as in test_tp_base.py."""
import pytest

from test_tp_base import assert_matches_tp1
from tp_procs import result, start_all, stop_all

pytestmark = pytest.mark.slow   # 8-device subprocesses, one on the real default model

CHECKS = [("lora", "--heads", "9", "3", "--tp", "2", "4", "8"),   # padded heads
          ("lora", "--heads", "8", "2", "--tp", "8", "--cached-rerun"),   # KV heads replicated 4x
          ("lora", "--model", "default", "--tp", "8", "--max-tokens", "4"),
          ("lora-hlo", "--heads", "9", "3", "--tp", "2", "8")]


@pytest.fixture(scope="module", autouse=True)
def _checks():
    start_all(CHECKS)
    yield
    stop_all()


def _assert_adapters_matter(res):
    # Without this, tp=N matching tp=1 could mean LoRA was silently dropped on both.
    assert res["adapters_change_tokens"], "adapters did not change any greedy continuation"
    assert res["adapter_logit_effect"] > 0.5


@pytest.mark.parametrize("i,tps", [(0, (2, 4, 8)), (1, (8,))])
def test_tiny_mixed_adapters_match_tp1(i, tps):
    res = result(*CHECKS[i])
    _assert_adapters_matter(res)
    assert_matches_tp1(res, tps)


def test_prefix_cache_under_tp_matches_recompute_and_tp1():
    """tp=8 with prefixes served from the sharded pool's cached pages: the rerun's greedy tokens
    equal the first (recomputed) run's and tp=1's, for the base model and every adapter."""
    res = result(*CHECKS[1])
    for key in ("cached_tp1", "cached_tp8"):
        c = res[key]
        assert c["hits"] >= 3 * 8 * len(c["first"]) - 8, c["hits"]    # 3 pages of 8 per prompt
        assert c["second"] == c["first"], key
    assert res["cached_tp8"]["second"] == res["cached_tp1"]["second"]


def test_default_model_mixed_adapters_match_tp1():
    res = result(*CHECKS[2])
    _assert_adapters_matter(res)
    assert_matches_tp1(res, (8,))


def test_lora_adds_only_rank_sized_collectives():
    """A decode step with all 7 projections adapted (T tokens, N devices, R = max rank):
    base: all-reduce [B,1,H] (embedding), all-reduce [T,H] after o and after down, all-gather
    [B,V] of the logits; LoRA: all-gather [T,N,R/N] per column-parallel projection (q k v gate
    up), all-reduce [T,R] per row-parallel one (o down). The row-parallel LoRA output rides the
    base all-reduce: no [T,H] collective is added."""
    res = result(*CHECKS[3])
    for tp in (2, 8):
        r = res[f"tp{tp}"]
        B, T, H, V, R = r["batch"], r["tokens"], r["hidden"], r["vocab"], r["max_rank"]
        assert len(r["modules"]) == 7
        want = ([["all-reduce", f"f32[{B},1,{H}]"], ["all-gather", f"f32[{B},{V}]"]]
                + [["all-reduce", f"f32[{T},{H}]"]] * 2
                + [["all-gather", f"f32[{T},{tp},{R // tp}]"]] * 5
                + [["all-reduce", f"f32[{T},{R}]"]] * 2)
        assert r["collectives"] == sorted(want), tp
