"""Gemma 2 and Gemma 3 (text) against HF transformers (torch, fp32) and PEFT.

Tiny random configs that exercise every Gemma difference: a sliding window (5) shorter than the
prompt on some layers and full attention on others, the (1 + w) norms with random w, the four
norms per layer, GeGLU, query_pre_attn_scalar != head_dim, Gemma 2's attention and final
soft-capping (caps low enough that tanh bends the values), Gemma 3's q/k norms and its two RoPE
bases (the full layers' with linear scaling).

Tolerance: both sides compute in float32; the differences are summation order (XLA vs torch,
attention over shuffled pages vs dense) and the order of the attention scale (q * s, then q.k,
vs (q.k) * s): ~1e-5 on logits of magnitude ~10. 1e-3 absolute leaves room, while a real error
(a norm without its + 1, a window off by one, a wrong RoPE base or scale, a missing cap) moves
logits by more than 1e-1.
"""
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from jaxserve.loader import load_hf_dir
from jaxserve.model.families.gemma import config_fields, layer_types
from tests.test_model_hf import hf_greedy, hf_logits, paged_prefill_logits

ATOL = 1e-3
VOCAB = 256
WINDOW = 5

CASES = {
    # layers: sliding, full, sliding, full (Gemma 2's rule)
    "gemma2": dict(attn_logit_softcapping=4.0, final_logit_softcapping=6.0),
    # sliding, sliding, full, sliding; RoPE: full 1e6 with linear x4, sliding 1e4
    "gemma3": dict(layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                "sliding_attention"],
                   rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                       "rope_theta": 1_000_000.0},
                                    "sliding_attention": {"rope_type": "default",
                                                          "rope_theta": 10_000.0}}),
}


def make_gemma(kind: str, path, seed: int = 0, **overrides):
    """A tiny random Gemma 2 / Gemma 3 (text) saved with a word-level tokenizer; returns the
    torch model (fp32, eager attention, eval mode)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM,
                              Gemma3TextConfig, PreTrainedTokenizerFast)
    cfg_cls, model_cls = {"gemma2": (Gemma2Config, Gemma2ForCausalLM),
                          "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM)}[kind]
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              query_pre_attn_scalar=24, sliding_window=WINDOW, max_position_embeddings=256,
              rms_norm_eps=1e-6, eos_token_id=1, bos_token_id=0, pad_token_id=2)
    kw.update(CASES[kind], **overrides)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kw, attn_implementation="eager")).eval()
    with torch.no_grad():   # peaked logits; norm weights w around 0 (the scale is 1 + w)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:   # times sqrt(hidden) in the model
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    model.save_pretrained(path, safe_serialization=True)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="w0", eos_token="w1",
                            unk_token="w2").save_pretrained(path)
    return model


def make_peft(base, path, seed: int = 1):
    """A PEFT LoRA adapter on every projection (target_modules all-linear), A and B random."""
    import copy

    from peft import LoraConfig, get_peft_model
    model = get_peft_model(copy.deepcopy(base),
                           LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0,
                                      target_modules="all-linear"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 / p.shape[-1] ** 0.5)
    model.save_pretrained(path)
    return model.eval()


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    hf = make_gemma(kind, root / "base", seed=7)
    return kind, root, hf, make_peft(hf, str(root / "lora"))


def test_config_fields(tiny):
    kind, root, hf, peft_model = tiny
    cfg = load_hf_dir(str(root / "base")).config
    windows = [WINDOW if t == "sliding_attention" else None for t in hf.config.layer_types]
    assert list(cfg.layer_windows) == windows and None in windows and WINDOW in windows
    assert cfg.norm_unit_offset and cfg.embed_scale and cfg.sandwich_norms
    assert cfg.mlp_activation == "gelu_tanh" and cfg.attn_scale == 24 ** -0.5
    assert cfg.tie_word_embeddings and cfg.head_dim == 16
    if kind == "gemma2":
        assert (cfg.attn_softcap, cfg.final_softcap) == (4.0, 6.0)
        assert not cfg.layer_rope_local
    else:
        assert cfg.attn_softcap is None and cfg.final_softcap is None
        assert cfg.layer_rope_local == tuple(w is not None for w in windows)
        assert (cfg.rope_theta, cfg.rope_type, cfg.rope_factor) == (1e6, "linear", 4.0)
        assert cfg.rope_local_theta == 1e4


def test_older_config_spellings():
    """Configs written before transformers v5: no layer_types (the architecture's rule),
    Gemma 3's rope_theta + rope_scaling + rope_local_base_freq."""
    base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_attention_heads=2,
                num_key_value_heads=1, head_dim=4, sliding_window=3)
    g2 = config_fields(dict(base, num_hidden_layers=3), "gemma2")
    assert g2["layer_windows"] == (3, None, 3)
    assert (g2["attn_softcap"], g2["final_softcap"]) == (50.0, 30.0)   # transformers' defaults
    g3 = config_fields(dict(base, num_hidden_layers=7, sliding_window_pattern=3,
                            rope_theta=5e5, rope_local_base_freq=2e3,
                            rope_scaling={"rope_type": "linear", "factor": 8.0}), "gemma3_text")
    assert g3["layer_windows"] == (3, 3, None, 3, 3, None, 3)
    assert g3["layer_rope_local"] == (True, True, False, True, True, False, True)
    assert (g3["rope_theta"], g3["rope_type"], g3["rope_factor"]) == (5e5, "linear", 8.0)
    assert g3["rope_local_theta"] == 2e3
    assert layer_types({}, "gemma3_text", 6) == ["sliding_attention"] * 5 + ["full_attention"]


def test_logits_match_hf(tiny):
    kind, root, hf, peft_model = tiny
    model = load_hf_dir(str(root / "base"))
    ids = np.random.default_rng(0).integers(3, VOCAB, size=23).tolist()
    ref = hf_logits(hf, ids)
    # chunked prefill over shuffled pages: 9, 1 and 13 tokens, the prompt longer than the window
    ours = paged_prefill_logits(model, [ids[:9], ids[9:10], ids[10:]])
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
    # Each Gemma feature moves these logits far beyond ATOL (so the check above tests it):
    variants = {"norm_unit_offset": False, "embed_scale": False, "attn_scale": None,
                "layer_windows": tuple(w and w + 1 for w in model.config.layer_windows)}
    if kind == "gemma2":
        variants.update(attn_softcap=None, final_softcap=None)
    else:
        variants.update(rope_local_theta=model.config.rope_theta)
    for field, value in variants.items():
        other = SimpleNamespace(config=dataclasses.replace(model.config, **{field: value}),
                                weights=model.weights)
        off = paged_prefill_logits(other, [ids[:9], ids[9:10], ids[10:]])
        assert np.abs(off - ref).max() > 50 * ATOL, field


def _engine(root, backend="xla", **kw):
    from jaxserve.engine import EngineConfig, LLMEngine
    return LLMEngine(EngineConfig(model=str(root / "base"), dtype="float32", page_size=4,
                                  num_pages=200, max_num_seqs=4, max_prefill_tokens=16,
                                  max_model_len=128, max_loras=2, max_lora_rank=8,
                                  backend=backend, **kw))


def _greedy(engine, prompt, n, adapter=None):
    from jaxserve.sampling_params import SamplingParams
    engine.add_request("r", prompt, SamplingParams(max_tokens=n, temperature=0.0,
                                                   ignore_eos=True), adapter=adapter)
    out = None
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                out = o.token_ids
    return out


@pytest.mark.parametrize("tiny", ["gemma3"], indirect=True)
@pytest.mark.parametrize("layer_loop", ["per-layer"])
def test_greedy_64_tokens_match_hf_and_peft(tiny, layer_loop):
    """64 greedy tokens (prompt 11 tokens, longer than the window; prefill chunks of 16) equal
    HF's greedy decoding with its cache, and with a PEFT adapter on every projection PEFT's, with
    one program per layer (the layer index a traced argument, so the layer's window and RoPE
    base are looked up from it). Gemma 3 only: its layers differ in both (Gemma 2's only in the
    window); tests/test_families.py runs the scan, the bfloat16 check and the CPU / Pallas
    backends for every family."""
    kind, root, hf, peft_model = tiny
    prompt = np.random.default_rng(1).integers(3, VOCAB, size=11).tolist()
    ref = hf_greedy(hf, prompt, 64)
    ref_lora = hf_greedy(peft_model, prompt, 64)
    assert ref_lora != ref      # the adapter matters
    engine = _engine(root, layer_loop=layer_loop)
    engine.add_lora("a", str(root / "lora"))
    assert _greedy(engine, prompt, 64) == ref
    assert _greedy(engine, prompt, 64, adapter="a") == ref_lora


def write_gemma_gguf(path, hf, cfg, arch: str):
    """A GGUF file as llama.cpp's convert_hf_to_gguf.py (Gemma2Model / Gemma3Model) writes one:
    fp32 tensors under llama.cpp's names, 1 added to every `norm.weight`, q/k not permuted,
    the metadata it stores (the layer pattern, local RoPE base and attention scale it does not)."""
    import gguf

    from jaxserve.model import families
    from tests.test_model_family import spec_names
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_sliding_window(next(x for x in cfg.layer_windows if x))
    if cfg.final_softcap is not None:
        w.add_final_logit_softcapping(cfg.final_softcap)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_softcap)
    else:
        w.add_rope_freq_base(cfg.rope_theta)
        if cfg.rope_type == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(cfg.rope_factor)
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    for hf_name, (spec, i) in spec_names(families.for_config(cfg), cfg, "hf").items():
        a = state[hf_name] + (1.0 if hf_name.endswith("norm.weight") else 0.0)
        w.add_tensor(spec.gguf.format(i=i), np.ascontiguousarray(a, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("kind", sorted(CASES))
def test_gguf_round_trip(kind, tmp_path):
    """A GGUF written by llama.cpp's rules reads back (in transformers' reader and ours) as the
    HF weights, and our model from it gives HF's logits. The HF model follows what llama.cpp
    fixes: Gemma 3's 5-sliding-1-full pattern, the attention scale head_dim ** -0.5."""
    import jax
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from jaxserve.loader import load_gguf
    from tests.test_model_family import spec_names
    over = dict(query_pre_attn_scalar=16)
    if kind == "gemma3":
        over.update(num_hidden_layers=6, layer_types=None)
    hf = make_gemma(kind, tmp_path / "hf", seed=3, **over)
    ours_hf = load_hf_dir(str(tmp_path / "hf"))
    arch = {"gemma2": "gemma2", "gemma3": "gemma3"}[kind]
    write_gemma_gguf(tmp_path / "tiny.gguf", hf, ours_hf.config, arch)
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    back = load_gguf_checkpoint(str(tmp_path / "tiny.gguf"), return_tensors=True,
                                model_to_load=hf)["tensors"]
    from jaxserve.model import families
    for k in spec_names(families.for_config(ours_hf.config), ours_hf.config, "hf"):
        # (w + 1) - 1 in float32: exact to an ulp of 1
        np.testing.assert_allclose(back[k].numpy(), state[k], atol=2e-7, rtol=0, err_msg=k)
    ours = load_gguf(str(tmp_path / "tiny.gguf"))
    same = dict(max_position_embeddings=256, rms_norm_eps=1e-6)   # eps: float32 in GGUF
    assert dataclasses.replace(ours.config, **same) == dataclasses.replace(ours_hf.config, **same)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         atol=2e-7, rtol=0),
                 ours.weights, ours_hf.weights)
    ids = np.random.default_rng(4).integers(3, VOCAB, size=17).tolist()
    np.testing.assert_allclose(paged_prefill_logits(ours, [ids[:8], ids[8:]]),
                               hf_logits(hf, ids), atol=ATOL, rtol=0)
