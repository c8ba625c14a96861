"""The backend boundary itself: which backend `select` picks, that only the CPU backend reaches
the native kernels, and that the accelerator backends' whole engine step (with and without
LoRA) lowers for GPU and TPU from this CPU-only machine (jax's cross-platform lowering)."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.backends import select
from jaxserve.backends.base import XlaBackend
from jaxserve.backends.pallas import PallasBackend
from jaxserve.backends.programs import StepPrograms
from jaxserve.config import ModelConfig
from jaxserve.lora.pool import LoraBatch, PageLayout
from jaxserve.model.kv_cache import StepInput
from jaxserve.model.weights import init_random
from jaxserve.sampling import SamplingInput

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATIVE = re.compile(r"\b(cpu_matmul|cpu_attention|native_build|AmxPacked|amx_)")
CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16)


def test_native_kernels_only_in_the_cpu_backend():
    """No module outside jaxserve/backends/cpu/ names the native kernels or the AMX layout
    (the CLI's build-kernels command goes through the cpu backend package's entry point)."""
    offenders = []
    for pkg in ("jaxserve", "server", "scheduler", "pallas_kernels"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            if os.path.join("backends", "cpu") in dirpath:
                continue
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    for n, line in enumerate(open(path), 1):
                        if NATIVE.search(line) and "import" in line:
                            offenders.append(f"{os.path.relpath(path, ROOT)}:{n}: {line.strip()}")
    assert not offenders, offenders


def test_model_layer_has_no_backend_branches():
    src = open(os.path.join(ROOT, "jaxserve", "model", "llama.py")).read()
    assert not re.search(r"isinstance|default_backend|impl\b|interpret|cpu_|amx", src)


def test_select_auto_and_fallbacks(monkeypatch):
    assert select("xla", CFG, "float32").name == "xla"
    assert select("pallas", CFG, "float32").interpret        # CPU: interpret mode
    monkeypatch.setenv("JAXSERVE_CPU_KERNELS", "0")
    from jaxserve.backends.cpu import backend as cpu
    reason = cpu.unavailable_reason()
    assert reason is not None and "JAXSERVE_CPU_KERNELS" in reason
    assert select("auto", CFG, "float32").name == "xla"     # and says why in the log
    with pytest.raises(ValueError, match="unknown backend"):
        select("tensorrt", CFG, "float32")
    with pytest.raises(ValueError, match="unknown layer loop"):
        select("xla", CFG, "float32", layer_loop="unrolled")


def _inputs(B, T, P, lora: bool, page_size: int):
    z = lambda *s: np.zeros(s, np.int32)  # noqa: E731
    step = StepInput(tokens=z(B, T), positions=np.full((B, T), -1, np.int32),
                     block_tables=z(B, P), kv_lens=z(B), slot_pages=z(B * T),
                     slot_offsets=z(B * T), logits_index=z(B))
    if lora:
        L, R, modules = CFG.num_layers, 16, ("q_proj", "v_proj")
        layout = PageLayout(CFG, page_size, R)
        step.lora_idx = np.full((B * T,), -1, np.int32)
        step.lora = LoraBatch(pages=tuple(z(B, layout.pages_for_rank(m, R)) for m in modules),
                              ranks=np.zeros((L, len(modules), B), np.int32),
                              scales=np.zeros((L, len(modules), B), np.float32),
                              modules=modules, max_rank=R)
    samp = SamplingInput(np.zeros(B, np.float32), z(B), np.ones(B, np.float32),
                         np.zeros(B, np.uint32), z(B), np.bool_(True))
    return step, samp


def _lowered_step(backend, lora: bool, B=4, T=1, P=4, num_pages=16, page_size=8, platform=None):
    params = backend.prepare(init_random(CFG, dtype=jnp.bfloat16))
    kv = jax.ShapeDtypeStruct((CFG.num_layers, CFG.num_kv_heads, num_pages, page_size,
                               CFG.head_dim), backend.pool_dtype())
    kv = jax.tree.map(lambda _: kv, backend.init_pool(2, page_size))
    programs = StepPrograms(backend, CFG, params, backend.init_pool(2, page_size))   # scan
    step, samp = _inputs(B, T, P, lora, page_size)
    platform = platform or {"gpu": "cuda"}.get(backend.platform, backend.platform)
    return programs._step.trace(params, kv, step, samp).lower(
        lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("T", [1, 16])
def test_pallas_step_lowers_for_gpu(lora, T):
    text = _lowered_step(PallasBackend(CFG, jnp.bfloat16, interpret=False, platform="gpu"), lora,
                         T=T)
    # the scanned layer body holds attention and, with adapters, the LoRA kernels of both
    # adapted projections
    assert text.count("custom_call @__gpu$xla.gpu.triton") >= (1 + (2 if lora else 0))


@pytest.mark.parametrize("lora", [False, True])
def test_pallas_step_lowers_for_tpu(lora):
    backend = PallasBackend(CFG, jnp.bfloat16, interpret=False, platform="tpu")
    assert not backend.lora_kernels          # TPU: LoRA as row-batched matmuls in XLA
    text = _lowered_step(backend, lora)
    assert "tpu_custom_call" in text


def test_xla_step_lowers_for_gpu():
    """The plain-XLA backend's step has no custom call at all: it runs wherever XLA does."""
    text = _lowered_step(XlaBackend(CFG, jnp.bfloat16), lora=True, platform="cuda")
    assert "stablehlo.scatter" in text and "custom_call @" not in text
