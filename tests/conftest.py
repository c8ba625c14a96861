"""Shared fixtures. Expensive objects (the real default model, its HF twin) load once per session."""
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Many tests build engines on the same model; XLA's persistent cache lets them (and the CLI
# and TP subprocesses) reuse compiled step programs instead of recompiling each bucket.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxserve-test-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest
from hypothesis import HealthCheck, settings

# No wall-clock limits in tests: a busy machine makes them slower, never failing. Hypothesis's
# per-example deadline and its too-slow health check are both time limits.
settings.register_profile("jaxserve", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("jaxserve")


@pytest.fixture(scope="session")
def default_model():
    """The embedded SmolLM2-135M-Instruct (GGUF, dequantized to fp32)."""
    from jaxserve.loader import load_model
    return load_model()


@pytest.fixture(scope="session")
def hf_default_model():
    """HF transformers' own load of the same GGUF file: the reference nobody here wrote."""
    import torch
    from transformers import AutoModelForCausalLM
    from jaxserve.loader import default_model_path
    p = default_model_path()
    m = AutoModelForCausalLM.from_pretrained(os.path.dirname(p), gguf_file=os.path.basename(p),
                                             dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="session")
def default_engine(default_model):
    """A small-pool engine on the real default model, shared by engine tests."""
    from jaxserve.engine import EngineConfig, LLMEngine
    return LLMEngine(EngineConfig(dtype="float32", max_num_seqs=8, max_model_len=512, num_pages=160,
                                  max_prefill_tokens=256), model=default_model)
