"""Mixtures of experts on a tensor-parallel mesh (simulated CPU devices): the experts split
inside each expert (tp, `--ep 1`) or by whole experts (`--ep N`).

The checks run tests/tp_check.py in subprocesses started together (as test_tp_base.py does).
A tiny random Qwen3-MoE-shaped model (8 experts, top 2, expert width 32, 8 q / 2 KV heads):
greedy tokens at tp 4 (experts split inside) and ep 2 (whole experts split) identical to tp=1,
logits within the dense models' 3e-5 x max|logit| (observed 1.2e-6 on logits of magnitude 2.4);
each device holding its part of the expert weights and the whole router; and the decode step's
collectives: exactly one all-reduce per MoE layer beyond the dense model's, nothing gathered.
(tests/test_families.py runs Mixtral and Qwen3-MoE at tp 2 and at tp 4 with ep 4 against HF.)
"""
import pytest

from tp_procs import result, start_all, stop_all

REL_TOL = 3e-5
CHECKS = [("greedy", "--model", "moe", "--tp", "4", "--ep", "2"),
          ("hlo", "--model", "moe", "--tp", "4", "--ep", "2", "--batch", "4")]
RUNS = ("tp4", "ep2")


@pytest.fixture(scope="module")
def _checks():
    start_all(CHECKS)
    yield
    stop_all()


def test_check_parallel_refuses_what_cannot_run():
    """Pure config arithmetic (no devices): --ep is 1 or tp, needs experts it divides; tp with
    --ep 1 needs an expert width it divides. The messages name the flag and the way out."""
    from jaxserve.config import ModelConfig
    from jaxserve.sharding import check_parallel
    base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                num_kv_heads=1, head_dim=4)
    moe = ModelConfig(**base, num_experts=8, experts_per_token=2, moe_intermediate_size=12,
                      architecture="qwen3_moe")
    for tp, ep in ((1, 1), (2, 1), (4, 1), (2, 2), (4, 4), (8, 8)):
        check_parallel(moe, tp, ep)
    bad = {(4, 2): "--ep must be 1 or 4", (2, 3): "--ep must be 1 or 2", (1, 0): "must be 1",
           (8, 1): "use --ep 8",                                   # 12 % 8
           (6, 6): "8 experts do not divide into 6"}
    for (tp, ep), words in bad.items():
        with pytest.raises(ValueError, match=words):
            check_parallel(moe, tp, ep)
    with pytest.raises(ValueError, match="has no experts"):
        check_parallel(ModelConfig(**base), 2, 2)
    check_parallel(ModelConfig(**base), 2, 1)


def test_rules_split_experts_by_ep():
    """One table, a function of ep: only the expert axes move; the router stays replicated."""
    from jaxserve.sharding import RULES, TP, rules
    one, ep = rules(1), rules(4)
    assert one == RULES
    assert (one["experts"], one["moe_mlp"]) == (None, TP)
    assert (ep["experts"], ep["moe_mlp"]) == (TP, None)
    assert one["expert_logits"] is None and ep["expert_logits"] is None
    assert {k: v for k, v in one.items() if k not in ("experts", "moe_mlp")} == {
        k: v for k, v in ep.items() if k not in ("experts", "moe_mlp")}


def test_cli_refuses_bad_ep(capsys):
    from jaxserve.cli import main
    assert main(["generate", "--prompt", "hi", "--tp", "2", "--ep", "3"]) == 2
    assert "--ep must be 1 or 2" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.usefixtures("_checks")
def test_moe_greedy_matches_tp1():
    res = result(*CHECKS[0])
    assert res["devices"] == 8
    # zeroing the experts' down projections moves the logits: the experts are in the output
    assert res["experts_logit_effect"] > 0.1
    for run in RUNS:
        r = res[run]
        assert r["tokens"] == res["tp1"]["tokens"], f"{run}: greedy tokens differ"
        tol = REL_TOL * max(1.0, r["logit_scale"])
        assert r["max_logit_diff"] < tol, (run, r["max_logit_diff"], tol)
        assert r["max_logprob_diff"] < tol, (run, r["max_logprob_diff"], tol)
        assert f"ep={run[2:] if run.startswith('ep') else 1}" in r["describe"], r["describe"]


@pytest.mark.slow
@pytest.mark.usefixtures("_checks")
def test_moe_weights_placed_per_device():
    """What one device holds of the stacked [L, E, H, Im] / [L, E, Im, H] expert weights: an
    Im/N slice of all 8 experts under tp, 8/N whole experts under ep; the router [L, H, E]
    whole everywhere."""
    res = result(*CHECKS[0])
    L, H, E, Im = 2, 64, 8, 32
    for run, n in (("tp4", 4), ("ep2", 2)):
        e, im = (E, Im // n) if run.startswith("tp") else (E // n, Im)
        assert res[run]["device_shapes"] == {"router": [L, H, E], "gate": [L, e, H, im],
                                             "up": [L, e, H, im], "down": [L, e, im, H]}, run


@pytest.mark.slow
@pytest.mark.usefixtures("_checks")
def test_moe_decode_step_collectives():
    """One decode step at batch 4: the embedding's all-reduce, per layer (the scan body appears
    once) the attention's all-reduce [4, 1, H] and the experts' psum [4, H] (the tokens
    flattened), and the [4, V] logits all-gather. The same list under tp and ep: no expert
    weights or routing gathered, no all-to-all."""
    res = result(*CHECKS[1])
    for run in RUNS:
        H, V = res[run]["hidden"], res[run]["vocab"]
        assert res[run]["collectives"] == sorted(
            [["all-reduce", f"f32[4,1,{H}]"]] * 2 + [["all-reduce", f"f32[4,{H}]"]]
            + [["all-gather", f"f32[4,{V}]"]]), run
