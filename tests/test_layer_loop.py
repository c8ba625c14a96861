"""The two ways a step runs its layers give the same results: one program scanning the stacked
layers (GPU/TPU, tensor parallel) and one device call per layer (CPU; jaxserve.runner).

Both compute the same float32 ops on the same inputs; only program boundaries differ, which can
change XLA's fusion and summation order (~1e-6 relative). Log-probs are compared at 1e-4 absolute
and greedy tokens exactly; a wrong layer index, weight or KV layer moves them by far more.
"""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from lora_helpers import make_adapter, make_base, prompts  # noqa: E402

from jaxserve.engine import EngineConfig, LLMEngine  # noqa: E402
from jaxserve.runner import resolve_layer_loop  # noqa: E402
from jaxserve.sampling_params import SamplingParams  # noqa: E402

ATOL = 1e-4


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    base = make_base(str(root / "base"), num_hidden_layers=3)
    make_adapter(base, str(root / "qv"), seed=1, r=8, lora_alpha=16,
                 target_modules=["q_proj", "v_proj", "down_proj"])
    return root


def _run(root, layer_loop, adapters):
    engine = LLMEngine(EngineConfig(model=str(root / "base"), page_size=8, num_pages=200,
                                    max_num_seqs=4, max_prefill_tokens=64, max_model_len=96,
                                    max_lora_rank=16, layer_loop=layer_loop))
    assert engine.runner.layer_loop == layer_loop
    engine.add_lora("qv", str(root / "qv"))
    ps = prompts(len(adapters), seed=5)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=True)
    outs = []
    for p, a in zip(ps, adapters):   # joined one per step: mixed prefill and decode steps
        engine.add_request(f"r{len(outs)}", p, params, adapter=a)
        outs.extend(engine.step())
    while engine.has_unfinished():
        outs.extend(engine.step())
    final = {o.request_id: o for o in outs if o.finished}
    lps = {}
    for o in outs:
        lps.setdefault(o.request_id, []).extend(o.new_logprobs or [])
    engine.remove_lora("qv")   # its pages go back to the pool with the sequences' pages
    assert engine.stats()["num_free_pages"] == engine.stats()["num_total_pages"]
    return ([final[f"r{i}"].token_ids for i in range(len(adapters))],
            [lps[f"r{i}"] for i in range(len(adapters))])


def test_scan_and_dispatch_agree_with_and_without_adapters(base_dir):
    mix = ["qv", None, "qv", None]
    tok_s, lp_s = _run(base_dir, "scan", mix)
    tok_d, lp_d = _run(base_dir, "dispatch", mix)
    assert tok_s == tok_d
    for a, b in zip(lp_s, lp_d):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_layer_loop_choices():
    assert resolve_layer_loop("auto", 1) in ("scan", "dispatch")
    assert resolve_layer_loop("auto", 2) == "scan"
    with pytest.raises(ValueError, match="dispatch"):
        resolve_layer_loop("dispatch", 2)
    with pytest.raises(ValueError, match="unknown layer loop"):
        resolve_layer_loop("unrolled", 1)
