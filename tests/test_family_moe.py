"""Mixtral and Qwen3-MoE against HF transformers (torch, fp32) and PEFT; the MoE layer's
grouped matmul against its dense reference and in its lowered HLO.

Tiny random configs (8 experts, top-2) with weights scaled so logits are peaked: chunked
prefill over shuffled pages gives HF's logits, 64 greedy tokens equal HF's and, with a PEFT
adapter on the attention projections, PEFT's. Adapters on the router or the experts are refused.

Tolerance: both sides compute in float32; the differences are summation order (XLA vs torch,
attention over pages vs dense, the experts' sum over k slots vs index_add): ~3e-6 on logits of
magnitude ~4. 1e-3 absolute leaves room, while a routing error (a wrong top-k, renormalisation
or expert) moves logits by more than 1e-1 (checked below by flipping each routing field).
"""
import copy
import dataclasses
import json
import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxserve.config import ConfigError, ModelConfig
from jaxserve.loader import CheckpointError, hf_tensors, load_hf_dir
from jaxserve.lora.adapter import AdapterError, from_peft_arrays, load_peft
from jaxserve.model import moe
from tests.test_model_hf import hf_logits, paged_prefill_logits

ATOL = 1e-3
VOCAB = 256
EXPERTS, TOP_K = 8, 2

# tests/test_families.py compares Mixtral without a window and Qwen3-MoE with renormalised
# top-k weights with HF; these are the other settings.
CASES = {
    "mixtral-window": dict(sliding_window=7),
    "qwen3_moe": dict(norm_topk_prob=False),     # the top-k weights are not renormalised
}


def make_moe(kind: str, path, seed: int = 0, **overrides):
    """A tiny random Mixtral / Qwen3-MoE saved with a word-level tokenizer; returns the torch
    model (fp32, eager attention, eval mode)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast,
                              Qwen3MoeConfig, Qwen3MoeForCausalLM)
    kw = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
              tie_word_embeddings=False, num_experts_per_tok=TOP_K, eos_token_id=1,
              bos_token_id=0, pad_token_id=2)
    if kind == "mixtral":
        cfg_cls, model_cls = MixtralConfig, MixtralForCausalLM
        kw.update(num_local_experts=EXPERTS, intermediate_size=48)
    else:
        cfg_cls, model_cls = Qwen3MoeConfig, Qwen3MoeForCausalLM
        kw.update(num_experts=EXPERTS, moe_intermediate_size=48, intermediate_size=96)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kw, attn_implementation="eager")).eval()
    with torch.no_grad():   # peaked logits and routing (router logits of order 1 and more)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("gate.weight"):       # the router [E, H]
                p.copy_(2.0 * torch.randn_like(p) / p.shape[-1] ** 0.5)
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    model.save_pretrained(path, safe_serialization=True)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="w0", eos_token="w1",
                            unk_token="w2").save_pretrained(path)
    return model


def make_peft(base, path, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), seed=1):
    """A PEFT LoRA adapter (A and B random) on the attention projections."""
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(copy.deepcopy(base),
                           LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0,
                                      target_modules=target_modules if isinstance(
                                          target_modules, str) else list(target_modules)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 / p.shape[-1] ** 0.5)
    model.save_pretrained(path)
    return model.eval()


# -- routing and the grouped matmul ---------------------------------------------------------

def _experts(rng, E, H, Im, dtype=jnp.float32):
    def w(*shape):
        return jnp.asarray(rng.normal(size=shape) / shape[-2] ** 0.5, dtype)
    return w(E, H, Im), w(E, H, Im), w(E, Im, H)


@pytest.mark.parametrize("kind,renorm", [("mixtral", True), ("qwen3_moe", True),
                                         ("qwen3_moe", False)])
def test_route_matches_hf_router(kind, renorm):
    """route() equals transformers' router modules: weights and expert ids, per token."""
    from transformers import MixtralConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter
    E, H, k = 16, 32, 4
    if kind == "mixtral":
        router = MixtralTopKRouter(MixtralConfig(hidden_size=H, num_local_experts=E,
                                                 num_experts_per_tok=k))
    else:
        router = Qwen3MoeTopKRouter(Qwen3MoeConfig(hidden_size=H, num_experts=E,
                                                   num_experts_per_tok=k, norm_topk_prob=renorm))
    torch.manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, H) / H ** 0.5)
        x = torch.randn(50, H)
        logits, w_ref, e_ref = router(x)
    w, e = moe.route(jnp.asarray(logits.numpy()), k, renorm)
    assert w.dtype == jnp.float32 and e.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(e), e_ref.numpy())
    np.testing.assert_allclose(np.asarray(w), w_ref.float().numpy(), rtol=1e-6, atol=1e-7)
    if renorm:
        np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, rtol=1e-6)
    else:
        assert (np.asarray(w).sum(-1) < 1.0 - 1e-3).all()


@pytest.mark.parametrize("n,e,k", [(1, 8, 2), (37, 8, 2), (64, 16, 8), (33, 6, 1)])
def test_expert_mlp_matches_dense_reference(n, e, k):
    """The grouped matmul over tokens sorted by expert equals every expert on every token,
    weighted densely; a device's slice (first_expert) computes only its experts' part, and the
    slices sum to the whole (the expert-parallel psum)."""
    rng = np.random.default_rng(n * 100 + e)
    H, Im = 32, 24
    gate, up, down = _experts(rng, e, H, Im)
    x = jnp.asarray(rng.normal(size=(n, H)), jnp.float32)
    weights, experts = moe.route(jnp.asarray(rng.normal(size=(n, e)) * 2, jnp.float32), k, True)
    mlp = jax.jit(moe.expert_mlp, static_argnums=6)
    ref = moe.dense_reference(x, weights, experts, gate, up, down, "silu")
    out = mlp(x, weights, experts, gate, up, down, "silu")
    assert out.shape == (n, H) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # a plain per-token loop over the chosen experts (no shared code with either)
    xs, ws, es = np.asarray(x, np.float64), np.asarray(weights), np.asarray(experts)
    g, u, d = (np.asarray(a, np.float64) for a in (gate, up, down))
    loop = np.zeros((n, H))
    for t in range(n):
        for j in range(k):
            a, b = xs[t] @ g[es[t, j]], xs[t] @ u[es[t, j]]
            loop[t] += ws[t, j] * ((a / (1 + np.exp(-a)) * b) @ d[es[t, j]])
    np.testing.assert_allclose(np.asarray(out), loop, rtol=1e-4, atol=1e-5)
    # slices of the experts: each only its experts' part; together the whole
    step = max(1, e // 3)
    parts = []
    for first in range(0, e, step):
        sl = slice(first, first + step)
        part = mlp(x, weights, experts, gate[sl], up[sl], down[sl], "silu",
                   first_expert=jnp.int32(first))
        mine = (experts >= first) & (experts < first + step)
        only = moe.dense_reference(x, jnp.where(mine, weights, 0.0), experts, gate, up, down,
                                   "silu")
        np.testing.assert_allclose(np.asarray(part), np.asarray(only), rtol=1e-5, atol=1e-5)
        parts.append(part)
    np.testing.assert_allclose(np.asarray(sum(parts)), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_expert_mlp_all_tokens_one_expert_and_bfloat16():
    """Every token routed to the same experts (one full group, the others empty); bfloat16
    weights and activations stay within bfloat16's rounding of the float32 result."""
    rng = np.random.default_rng(3)
    n, e, H, Im = 20, 8, 32, 16
    gate, up, down = _experts(rng, e, H, Im)
    x = jnp.asarray(rng.normal(size=(n, H)), jnp.float32)
    experts = jnp.tile(jnp.asarray([[5, 2]], jnp.int32), (n, 1))
    weights = jnp.tile(jnp.asarray([[0.75, 0.25]], jnp.float32), (n, 1))
    ref = moe.dense_reference(x, weights, experts, gate, up, down, "silu")
    out = moe.expert_mlp(x, weights, experts, gate, up, down, "silu")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    bf = [a.astype(jnp.bfloat16) for a in (x, gate, up, down)]
    out16 = moe.expert_mlp(bf[0], weights, experts, *bf[1:], "silu")
    assert out16.dtype == jnp.float32
    assert np.abs(np.asarray(out16) - np.asarray(ref)).max() < 0.03 * np.abs(np.asarray(ref)).max()


# -- configs and checkpoints -----------------------------------------------------------------

def _hf_config(kind, **over):
    d = dict(architectures=["MixtralForCausalLM" if kind == "mixtral" else "Qwen3MoeForCausalLM"],
             vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1, num_experts_per_tok=2)
    d.update(num_local_experts=4) if kind == "mixtral" else d.update(num_experts=4,
                                                                    moe_intermediate_size=8)
    d.update(over)
    return d


def test_config_fields_and_refusals():
    mix = ModelConfig.from_hf_dict(_hf_config("mixtral", sliding_window=5))
    assert (mix.num_experts, mix.experts_per_token, mix.moe_intermediate_size) == (4, 2, 24)
    assert mix.moe_renormalize and mix.layer_windows == (5, 5)
    q = ModelConfig.from_hf_dict(_hf_config("qwen3_moe"))
    assert (q.num_experts, q.moe_intermediate_size, q.moe_renormalize) == (4, 8, False)
    assert ModelConfig.from_hf_dict(_hf_config("qwen3_moe", norm_topk_prob=True)).moe_renormalize
    v5 = _hf_config("qwen3_moe")       # transformers v5's save_pretrained spelling
    v5["num_local_experts"] = v5.pop("num_experts")
    assert ModelConfig.from_hf_dict(v5).num_experts == 4
    for kind, over, field in [("qwen3_moe", dict(decoder_sparse_step=2), "decoder_sparse_step"),
                              ("qwen3_moe", dict(mlp_only_layers=[0]), "mlp_only_layers"),
                              ("mixtral", dict(hidden_act="gelu"), "hidden_act"),
                              ("mixtral", dict(num_experts_per_tok=5), "num_experts_per_tok")]:
        with pytest.raises(ConfigError, match=field):
            ModelConfig.from_hf_dict(_hf_config(kind, **over))


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def tiny(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    hf = make_moe(kind, root / "base", seed=7)
    return kind, root, hf, make_peft(hf, str(root / "lora"))


def test_checkpoint_names_round_trip(tiny, tmp_path):
    """Every tensor save_pretrained wrote (one per expert) is read, and hf_tensors writes them
    back under the same names and values; a missing expert is refused by name."""
    from safetensors.numpy import load_file, save_file
    kind, root, hf, _ = tiny
    saved = load_file(str(root / "base" / "model.safetensors"))
    model = load_hf_dir(str(root / "base"))
    assert model.weights.layers.we_gate.shape == (3, EXPERTS, 64, 48)
    assert model.weights.layers.w_gate is None
    back = hf_tensors(model.config, model.weights)
    assert sorted(back) == sorted(saved)
    for name, a in saved.items():
        np.testing.assert_array_equal(back[name], a, err_msg=name)
    missing = next(n for n in saved if ".experts.5." in n and ".1." in n)
    os.makedirs(tmp_path / "m")
    save_file({k: v for k, v in saved.items() if k != missing}, str(tmp_path / "m" / "model.safetensors"))
    (tmp_path / "m" / "config.json").write_text((root / "base" / "config.json").read_text())
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
        load_hf_dir(str(tmp_path / "m"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_hf(case, tmp_path):
    kind = case.split("-")[0]
    hf = make_moe(kind, tmp_path, seed=11, **CASES[case])
    model = load_hf_dir(str(tmp_path))
    ids = np.random.default_rng(0).integers(3, VOCAB, size=23).tolist()
    ref = hf_logits(hf, ids)
    # chunked prefill over shuffled pages: 9, 1 and 13 tokens
    ours = paged_prefill_logits(model, [ids[:9], ids[9:10], ids[10:]])
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
    # Each routing field moves these logits far beyond ATOL (so the check above tests it):
    cfg = model.config
    variants = {"experts_per_token": TOP_K + 1}
    if kind == "qwen3_moe":
        variants["moe_renormalize"] = not cfg.moe_renormalize
    if cfg.layer_windows:
        variants["layer_windows"] = ()
    for field, value in variants.items():
        other = SimpleNamespace(config=dataclasses.replace(cfg, **{field: value}),
                                weights=model.weights)
        off = paged_prefill_logits(other, [ids[:9], ids[9:10], ids[10:]])
        assert np.abs(off - ref).max() > 50 * ATOL, field


# -- the engine: greedy decoding, adapters, backends -----------------------------------------

def test_adapters_on_router_or_experts_refused(tiny, tmp_path):
    """PEFT adapters that touch the router or the experts are refused at load, naming the
    module: PEFT's all-linear (it wraps the router and the experts' stacked parameters), a
    target_modules list naming the router, and an adapter in the per-expert layout older
    transformers had (experts.{e}.gate_proj / w1 modules)."""
    kind, root, hf, _ = tiny
    cfg = load_hf_dir(str(root / "base")).config
    mlp = "block_sparse_moe" if kind == "mixtral" else "mlp"
    make_peft(hf, str(tmp_path / "all"), target_modules="all-linear")
    with pytest.raises(AdapterError, match=r"experts|gate"):
        load_peft("all", str(tmp_path / "all"), cfg)
    make_peft(hf, str(tmp_path / "router"), target_modules=("q_proj", "gate"))
    with pytest.raises(AdapterError, match=rf"model\.layers\.0\.{mlp}\.gate \(a mixture"):
        load_peft("router", str(tmp_path / "router"), cfg)
    # the same refusal from the tensors alone (target_modules a regex the router escapes)
    with open(tmp_path / "router" / "adapter_config.json") as f:
        conf = json.load(f)
    conf.update(target_modules=r".*q_proj", target_parameters=None)
    expert = "w1" if kind == "mixtral" else "gate_proj"
    old = f"model.layers.1.{mlp}.experts.3.{expert}"
    tensors = {f"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((8, 64)),
               f"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((64, 8)),
               f"base_model.model.{old}.lora_A.weight": np.zeros((8, 64)),
               f"base_model.model.{old}.lora_B.weight": np.zeros((48, 8))}
    with pytest.raises(AdapterError, match=rf"model\.layers\.1\.{mlp}\.experts \(a mixture"):
        from_peft_arrays("old", conf, tensors, cfg, "old")
    conf["target_modules"] = ["q_proj", expert]
    with pytest.raises(AdapterError, match=rf"{mlp}\.experts\.0\.{expert} \(a mixture"):
        from_peft_arrays("old", conf, tensors, cfg, "old")
    conf.update(target_modules=["q_proj"], target_parameters=[f"{mlp}.experts.gate_up_proj"])
    with pytest.raises(AdapterError, match=rf"gate_up_proj'?: LoRA on model\.layers\.0\.{mlp}\.experts \(a"):
        from_peft_arrays("tp", conf, tensors, cfg, "tp")


# -- the lowered step -------------------------------------------------------------------------

@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowered_moe_step_is_a_grouped_matmul(platform):
    """The MoE model's prefill step lowered for GPU / TPU computes the experts with ragged dots
    (three per layer: gate, up, down) over tokens x top-k rows, and holds no array of every
    expert over every token (what a dense loop over all experts per token would make, and
    what the dense reference, lowered the same way, does make)."""
    import re

    from jaxserve.backends.base import XlaBackend
    from jaxserve.model import llama, weights as weights_lib
    from jaxserve.model.kv_cache import StepInput
    B, T, E, Im = 2, 20, 8, 24
    N = B * T
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=Im, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=16, num_experts=E, experts_per_token=2,
                      moe_intermediate_size=Im, architecture="qwen3_moe")
    backend = XlaBackend(cfg)
    params = jax.eval_shape(lambda: backend.prepare(weights_lib.init_random(cfg)))
    kv = jax.eval_shape(lambda: backend.init_pool(16, 4))
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)   # noqa: E731
    step = StepInput(tokens=i32(B, T), positions=i32(B, T), block_tables=i32(B, 8),
                     kv_lens=i32(B), slot_pages=i32(N), slot_offsets=i32(N), logits_index=i32(B))
    fwd = jax.jit(llama.forward, static_argnames=("cfg", "backend"))
    text = fwd.trace(params, cfg, backend, step, kv).lower(lowering_platforms=(platform,)).as_text()
    ragged = re.findall(r'"chlo\.ragged_dot"\(.*', text)
    assert len(ragged) == 3, ragged       # the scan's body: one layer
    for line in ragged:                    # the rows are the N * top-k (token, slot) pairs
        assert f"tensor<{N * 2}x" in line, line

    def dense_over_all(hlo):   # an array with a token axis, an expert axis and the expert width
        shapes = {tuple(int(d) for d in s.split("x")) for s in re.findall(r"tensor<([\dx]+)x\w+>", hlo)}
        return [s for s in shapes if N in s and E in s and Im in s]
    assert dense_over_all(text) == []
    h = jax.ShapeDtypeStruct((N, cfg.hidden_size), jnp.float32)
    w = (jax.ShapeDtypeStruct((N, 2), jnp.float32), i32(N, 2))
    ex = [jax.ShapeDtypeStruct(s, jnp.float32) for s in [(E, 32, Im), (E, 32, Im), (E, Im, 32)]]
    dense = jax.jit(moe.dense_reference, static_argnums=6).trace(h, *w, *ex, "silu").lower(
        lowering_platforms=(platform,)).as_text()
    assert dense_over_all(dense) != []
