"""The engine end to end on the Pallas attention path (interpret mode on CPU, tiny model):
the same greedy tokens as the XLA path and as HF, for a batch that prefills in chunks and
decodes across several pages."""
import pytest

from jaxserve.engine import EngineConfig, LLMEngine
from jaxserve.sampling_params import SamplingParams
from tests.lora_helpers import make_base, prompts, torch_greedy


@pytest.mark.slow   # the Pallas kernels in interpret mode
def test_pallas_attention_engine_matches_xla_and_hf(tmp_path):
    hf = make_base(tmp_path)
    batch = prompts(3, seed=7, lo=6, hi=20)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    tokens = {}
    for impl in ("xla", "pallas"):
        engine = LLMEngine(EngineConfig(model=str(tmp_path), dtype="float32", backend=impl, page_size=4,
                                        num_pages=40, max_num_seqs=4, max_prefill_tokens=16,
                                        max_model_len=64))
        assert engine.runner.backend.name == impl
        tokens[impl] = [o.token_ids for o in engine.generate(batch, params)]
        assert engine.stats()["num_free_pages"] == engine.stats()["num_total_pages"]
    assert tokens["pallas"] == tokens["xla"]
    assert tokens["xla"] == [torch_greedy(hf, p, 12)[0] for p in batch]
