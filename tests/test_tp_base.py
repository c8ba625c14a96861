"""Tensor parallelism on simulated CPU devices: the base model.

Each check runs tests/tp_check.py in a subprocess (the device count is fixed at JAX start-up);
the module starts them all at once so their compiles overlap. The default model runs at tp=8
in test_tp_lora.py (a base-model request mixed with three adapters' requests), which keeps the
whole TP set near the 4-minute budget on 2 cores.
Tolerances: greedy tokens identical to tp=1; logits (and the sampled tokens' log-probabilities)
within 3e-5 x the largest |logit| (f32; sharded matmuls and all-reduces only reorder sums:
observed 1.4e-6 on the tiny models' logits of magnitude 2.4, 7e-5 on the default model's 33).
"""
import pytest

from tp_procs import result, start_all, stop_all

REL_TOL = 3e-5
CHECKS = [("greedy", "--model", "tiny9", "--tp", "2", "4", "8"),
          ("greedy", "--model", "tiny8", "--tp", "4", "8"),
          ("hlo", "--model", "tiny9", "--tp", "2", "8", "--batch", "4"),
          ("greedy", "--model", "tiny8", "--tp", "2", "--backend", "pallas")]


@pytest.fixture(scope="module")
def _checks():
    start_all(CHECKS)
    yield
    stop_all()


def assert_matches_tp1(res: dict, tps):
    assert res["devices"] == 8
    for tp in tps:
        r = res[f"tp{tp}"]
        assert r["tokens"] == res["tp1"]["tokens"], f"tp={tp} greedy tokens differ"
        tol = REL_TOL * max(1.0, r["logit_scale"])
        assert r["max_logit_diff"] < tol, (tp, r["max_logit_diff"], tol)
        assert r["max_logprob_diff"] < tol, (tp, r["max_logprob_diff"], tol)


def test_head_layout_pads_and_replicates():
    """Pure layout arithmetic (no devices needed): every device gets whole GQA groups."""
    from jaxserve.config import ModelConfig
    from jaxserve.sharding import head_layout
    base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, head_dim=4)
    cases = {  # (q heads, kv heads, tp) -> (virtual q heads, virtual kv heads)
        (9, 3, 1): (9, 3), (9, 3, 2): (12, 4), (9, 3, 4): (12, 4), (9, 3, 8): (16, 8),
        (32, 8, 8): (32, 8), (64, 8, 16): (64, 16), (8, 2, 8): (8, 8), (8, 8, 4): (8, 8)}
    for (hq, hkv, tp), want in cases.items():
        lay = head_layout(ModelConfig(num_heads=hq, num_kv_heads=hkv, **base), tp)
        got = (lay.config.num_heads, lay.config.num_kv_heads)
        assert got == want, ((hq, hkv, tp), got)
        assert got[0] % tp == 0 and got[1] % tp == 0
        G = got[0] // got[1]
        # each real q head appears exactly once, next to (a replica of) its own KV head
        real = [h for h in lay.q_src if h >= 0]
        assert sorted(real) == list(range(hq))
        for i, h in enumerate(lay.q_src):
            if h >= 0:
                assert lay.kv_src[i // G] == h // (hq // hkv)
        assert lay.is_identity == (got == (hq, hkv))


@pytest.mark.slow
@pytest.mark.usefixtures("_checks")   # starts all CHECKS at the first
def test_tiny_greedy_matches_tp1_padded_heads():
    """9 q / 3 KV heads (the default model's): padded to 12/4 at tp 2 and 4, 16/8 at tp 8."""
    res = result(*CHECKS[0])
    assert_matches_tp1(res, (2, 4, 8))
    assert [(res[f"tp{t}"]["num_heads"], res[f"tp{t}"]["num_kv_heads"]) for t in (2, 4, 8)] == [
        (12, 4), (12, 4), (16, 8)]


@pytest.mark.slow
@pytest.mark.usefixtures("_checks")
def test_tiny_greedy_matches_tp1_replicated_kv_heads():
    """8 q / 2 KV heads: KV heads replicated 2x (tp 4) and 4x (tp 8), no padding."""
    res = result(*CHECKS[1])
    assert_matches_tp1(res, (4, 8))
    assert [(res[f"tp{t}"]["num_heads"], res[f"tp{t}"]["num_kv_heads"]) for t in (4, 8)] == [
        (8, 4), (8, 8)]


@pytest.mark.slow
@pytest.mark.usefixtures("_checks")
def test_pallas_attention_in_shard_map_matches_tp1():
    """The Pallas backend under tp (interpret mode here): each device's kernel reads its own KV
    heads of the pool (shard_map); tokens and logits as the unsharded XLA run."""
    assert_matches_tp1(result(*CHECKS[3]), (2,))


@pytest.mark.slow
@pytest.mark.usefixtures("_checks")
def test_decode_step_collectives():
    """One decode step: the embedding's all-reduce, then per layer (the scan body appears once in
    HLO) one all-reduce after o and one after down, all [batch, 1, hidden]; one all-gather of the
    [batch, vocab] logits. Nothing else: no weight or KV-pool gathers."""
    res = result(*CHECKS[2])
    for tp in (2, 8):
        H, V = res[f"tp{tp}"]["hidden"], res[f"tp{tp}"]["vocab"]
        assert res[f"tp{tp}"]["collectives"] == sorted(
            [["all-reduce", f"f32[4,1,{H}]"]] * 3 + [["all-gather", f"f32[4,{V}]"]]), tp
