"""Whole-model logits against HF transformers (torch, fp32).

Tolerance: fp32 everywhere, the only differences are summation order (XLA vs torch matmul
blocking, attention over pages vs dense). Measured max |diff| is ~1e-5 on tiny models and
~1.5e-4 on the 30-layer default model whose logits reach ~30, so 1e-3 (tiny) and 2e-3
(default) leave room for machine variation while a real bug (a wrong RoPE, mask or scale)
gives differences of order 1.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxserve.loader import load_hf_dir
from jaxserve.model import llama
from jaxserve.backends.base import XlaBackend
from jaxserve.model.kv_cache import StepInput
from tests.tiny_models import make_hf_model

_forward = jax.jit(llama.forward, static_argnames=("cfg", "backend", "all_logits"))


def paged_prefill_logits(model, ids_chunks, page_size=4, dtype=jnp.float32, seed=0):
    """Run the prompt through our model in chunks (chunked prefill) over shuffled pages;
    return all logits [T, V]."""
    cfg = model.config
    T = sum(len(c) for c in ids_chunks)
    P = -(-T // page_size)
    rng = np.random.default_rng(seed)
    table = rng.permutation(np.arange(1, 2 * P + 1))[:P]     # non-contiguous pages
    backend = XlaBackend(cfg, dtype)
    kv = backend.init_pool(2 * P + 1, page_size)
    params = backend.prepare(jax.tree.map(lambda a: a.astype(dtype), model.weights))
    out = []
    start = 0
    for chunk in ids_chunks:
        n = len(chunk)
        pos = np.arange(start, start + n)
        step = StepInput(tokens=jnp.array([chunk], jnp.int32), positions=jnp.array([pos], jnp.int32),
                         block_tables=jnp.array([table], jnp.int32),
                         kv_lens=jnp.array([start + n], jnp.int32),
                         slot_pages=jnp.array(table[pos // page_size], jnp.int32),
                         slot_offsets=jnp.array(pos % page_size, jnp.int32),
                         logits_index=jnp.array([n - 1], jnp.int32))
        logits, kv = _forward(params, cfg, backend, step, kv, all_logits=True)
        out.append(np.asarray(logits[0], np.float32))
        start += n
    return np.concatenate(out)


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().numpy()


CASES = {
    "llama": {},
    "llama-llama3-rope": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    "llama-linear-rope": {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    "llama-tied": {"tie_word_embeddings": True},
    "mistral-window": {"sliding_window": 7},
    "qwen2": {},
    "qwen3": {},                  # per-head q/k RMSNorm before RoPE
    "qwen3-bias": {"attention_bias": True},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_model_logits_match_hf(case, tmp_path):
    kind = case.split("-")[0]
    seed = int(np.random.SeedSequence().entropy % 2**31)   # fresh random weights and inputs
    hf = make_hf_model(kind, tmp_path, seed=seed, **CASES[case])
    model = load_hf_dir(str(tmp_path))
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 512, size=23).tolist()
    ref = hf_logits(hf, ids)
    # One prompt in three chunks (chunked prefill), then check against HF's full forward.
    ours = paged_prefill_logits(model, [ids[:9], ids[9:10], ids[10:]])
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)


def test_tiny_model_bfloat16_close_to_hf(tmp_path):
    # bf16 keeps 8 mantissa bits: ~0.4% relative error per op; over 3 layers logits of
    # magnitude ~5 drift by a few 1e-2. 0.15 absolute still catches any real bug (order 1).
    hf = make_hf_model("llama", tmp_path, seed=1)
    model = load_hf_dir(str(tmp_path))
    ids = np.random.default_rng().integers(0, 512, size=17).tolist()
    ours = paged_prefill_logits(model, [ids], dtype=jnp.bfloat16)
    ref = hf_logits(hf, ids)
    assert np.abs(ours - ref).max() < 0.15 * max(1.0, np.abs(ref).max() / 5)


@pytest.mark.slow
def test_default_model_logits_match_hf(default_model, hf_default_model, default_engine):
    tok = default_engine.tokenizer
    words = ["river", "quantum", "bread", "seven", "mountain", "violin", "orbit", "garden"]
    rng = np.random.default_rng()
    text = "The " + " ".join(rng.choice(words, size=12)) + " is"
    ids = tok.encode(text)
    ref = hf_logits(hf_default_model, ids)
    ours = paged_prefill_logits(default_model, [ids[:5], ids[5:]], page_size=16)
    np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=0)


@pytest.mark.slow
def test_default_model_greedy_64_tokens_match_hf(default_engine, hf_default_model):
    from jaxserve.sampling_params import SamplingParams
    tok = default_engine.tokenizer
    prompts = ["The capital of France is",
               "def fibonacci(n):",
               tok.chat([{"role": "user", "content": "Name three colors."}])]
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    outs = default_engine.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        ids = tok.encode(prompt) if isinstance(prompt, str) else prompt
        ref = hf_greedy(hf_default_model, ids, 64)
        assert out.token_ids == ref, (prompt, out.text)


def hf_greedy(hf, ids, n):
    """Plain greedy decoding with HF's KV cache, EOS not special (like ignore_eos)."""
    out, past, cur = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            o = hf(input_ids=cur, past_key_values=past, use_cache=True)
            past = o.past_key_values
            nxt = int(o.logits[0, -1].argmax())
            out.append(nxt)
            cur = torch.tensor([[nxt]])
    return out
