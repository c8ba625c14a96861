"""The two ways a step runs its layers give the same results: one program scanning the stacked
layers (GPU/TPU, tensor parallel) and one device call per layer (CPU; jaxserve.runner).

Both compute the same float32 ops on the same inputs; only program boundaries differ, which can
change XLA's fusion and summation order (~1e-6 relative). Log-probs are compared at 1e-4 absolute
and greedy tokens exactly; a wrong layer index, weight or KV layer moves them by far more.
"""
import os
import sys
import types

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from lora_helpers import make_adapter, make_base, prompts  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxserve import backends, sharding  # noqa: E402
from jaxserve.backends.cpu import cpu_matmul  # noqa: E402
from jaxserve.config import ModelConfig  # noqa: E402
from jaxserve.engine import EngineConfig, LLMEngine  # noqa: E402
from jaxserve.sampling_params import SamplingParams  # noqa: E402

ATOL = 1e-4


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    base = make_base(str(root / "base"), num_hidden_layers=3)
    make_adapter(base, str(root / "qv"), seed=1, r=8, lora_alpha=16,
                 target_modules=["q_proj", "v_proj", "down_proj"])
    make_adapter(base, str(root / "gu"), seed=2, r=8, lora_alpha=16,
                 target_modules=["gate_proj", "up_proj"])
    return root


def _run(root, layer_loop, adapters, dtype="float32"):
    engine = LLMEngine(EngineConfig(model=str(root / "base"), page_size=8, num_pages=200,
                                    max_num_seqs=4, max_prefill_tokens=64, max_model_len=96,
                                    max_lora_rank=16, layer_loop=layer_loop, dtype=dtype))
    assert engine.runner.backend.layer_loop == layer_loop
    engine.add_lora("qv", str(root / "qv"))
    engine.add_lora("gu", str(root / "gu"))
    ps = prompts(len(adapters), seed=5)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=True)
    outs = []
    for i, (p, a) in enumerate(zip(ps, adapters)):   # joined one per step: mixed steps
        engine.add_request(f"r{i}", p, params, adapter=a)
        outs.extend(engine.step())
    while engine.has_unfinished():
        outs.extend(engine.step())
    final = {o.request_id: o for o in outs if o.finished}
    lps = {}
    for o in outs:
        lps.setdefault(o.request_id, []).extend(o.new_logprobs or [])
    engine.remove_lora("qv")   # its pages go back to the pool with the sequences' pages
    engine.remove_lora("gu")
    assert engine.stats()["num_free_pages"] == engine.stats()["num_total_pages"]
    return ([final[f"r{i}"].token_ids for i in range(len(adapters))],
            [lps[f"r{i}"] for i in range(len(adapters))])


def test_scan_and_dispatch_agree_with_and_without_adapters(base_dir):
    mix = ["qv", None, "qv", None]
    tok_s, lp_s = _run(base_dir, "scan", mix)
    tok_d, lp_d = _run(base_dir, "per-layer", mix)
    assert tok_s == tok_d
    for a, b in zip(lp_s, lp_d):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_layer_loop_choices(monkeypatch):
    """backends.select resolves layer_loop 'auto': per-layer on CPU without tensor parallelism,
    else scan; per-layer with tp > 1 and unknown loops are errors."""
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8)
    on_cpu = jax.default_backend() == "cpu"
    assert backends.select("xla", cfg, jnp.float32).layer_loop == ("per-layer" if on_cpu
                                                                   else "scan")
    assert backends.select("xla", cfg, jnp.float32, layer_loop="scan").layer_loop == "scan"
    # tp > 1 on this one-device process: the mesh select makes is stood in for (only its size
    # is read when nothing is sharded).
    monkeypatch.setattr(sharding, "make_mesh", lambda tp: types.SimpleNamespace(
        shape={sharding.TP: tp}))
    assert backends.select("xla", cfg, jnp.float32, tp=2).layer_loop == "scan"
    with pytest.raises(ValueError, match="per-layer"):
        backends.select("xla", cfg, jnp.float32, tp=2, layer_loop="per-layer")
    with pytest.raises(ValueError, match="unknown layer loop"):
        backends.select("xla", cfg, jnp.float32, layer_loop="unrolled")


@pytest.mark.skipif(not cpu_matmul.amx_available(), reason="no AMX on this CPU")
def test_bf16_amx_dispatch_agrees_with_scan(base_dir, monkeypatch):
    """bf16 on a CPU with AMX: dispatch packs the projections (cpu_matmul.matmul_amx) and runs
    gate|up + SwiGLU as one call (swiglu_amx), except in steps whose adapters touch gate/up
    (their deltas must be added to g and u before the activation). Against the scan program on
    XLA's dot: log-probs of the chosen tokens within bf16 drift (both round activations to bf16
    after every op, in different summation orders: ~1e-2 here; a skipped LoRA delta or a wrong
    weight moves them by far more)."""
    calls = []
    real = cpu_matmul.swiglu_amx
    monkeypatch.setattr(cpu_matmul, "swiglu_amx", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    mix = [None, None, "gu", "qv"]   # the first two steps carry no adapter
    tok_s, lp_s = _run(base_dir, "scan", mix, dtype="bfloat16")
    assert not calls                      # scan keeps XLA's dot (no packed weights)
    tok_d, lp_d = _run(base_dir, "per-layer", mix, dtype="bfloat16")
    assert calls                          # traced for the steps without gate/up adapters
    for ts, td, a, b in zip(tok_s, tok_d, lp_s, lp_d):
        # The tiny random model's next-token distribution is nearly flat, so bf16 noise can
        # swap a near-tied greedy choice; compare up to and including the first such swap
        # (where both chose a maximum: their log-probs still agree).
        n = next((i for i, (x, y) in enumerate(zip(ts, td)) if x != y), len(ts) - 1) + 1
        np.testing.assert_allclose(a[:n], b[:n], atol=0.05, rtol=0)
    calls.clear()
    _run(base_dir, "per-layer", ["gu"], dtype="bfloat16")   # every step has gate/up LoRA
    assert not calls
