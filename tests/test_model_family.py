"""The family spec's names against what the formats' own tools write.

HF: every tensor transformers' save_pretrained writes maps to exactly one spec weight (in the
spec's shape), and every spec weight the config has is written. PEFT: the modules a LoraConfig
wraps are the spec's LoRA modules, with its dims. GGUF: the spec's names are llama.cpp's (the
gguf package's own HF -> GGUF table), and a file written by llama.cpp's rules reads back, in our
loader and in transformers' GGUF reader, as the HF weights.
"""
import dataclasses
import json

import numpy as np
import pytest

from jaxserve.config import ConfigError, ModelConfig
from jaxserve.model import families
from jaxserve.model.weights import LayerWeights, Weights
from tests.tiny_models import make_hf_model

CASES = {
    "llama": ("llama", {}),
    "llama-bias": ("llama", {"attention_bias": True}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "mistral": ("mistral", {"sliding_window": 7}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "qwen3-bias": ("qwen3", {"attention_bias": True}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request, tmp_path_factory):
    kind, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    hf = make_hf_model(kind, path, **overrides)
    cfg = ModelConfig.from_hf_dict(json.loads((path / "config.json").read_text()))
    return path, hf, cfg


def spec_names(family, cfg, fmt: str) -> dict[str, tuple]:
    """Checkpoint tensor name -> (spec weight, layer) for every weight the config has."""
    out = {}
    for w in family.weights + family.layer_weights:
        if not w.is_present(cfg):
            continue
        for i in range(cfg.num_layers) if w in family.layer_weights else [None]:
            name = getattr(w, fmt).format(i=i)
            assert name not in out, f"{name} named by two spec weights"
            out[name] = (w, i)
    return out


def test_every_spec_weight_is_a_weights_field():
    for family in families.FAMILIES:
        top = {f.name for f in dataclasses.fields(Weights)} - {"layers"}
        assert {w.name for w in family.weights} <= top
        assert {w.name for w in family.layer_weights} <= {f.name for f in dataclasses.fields(LayerWeights)}


def test_safetensors_names_match_spec(tiny):
    from safetensors import safe_open
    path, _, cfg = tiny
    with safe_open(str(path / "model.safetensors"), "np") as f:
        written = {k: f.get_slice(k).get_shape() for k in f.keys()}
    family = families.for_config(cfg)
    names = spec_names(family, cfg, "hf")
    assert set(written) == set(names)
    for k, shape in written.items():
        w, _ = names[k]
        assert tuple(shape[::-1] if w.transpose else shape) == w.shape(cfg), k


def test_hf_tensors_inverts_load_hf_dir(tiny):
    from safetensors.numpy import load_file

    from jaxserve.loader import hf_tensors, load_hf_dir
    path, _, cfg = tiny
    written = load_file(str(path / "model.safetensors"))
    back = hf_tensors(cfg, load_hf_dir(str(path)).weights)
    assert set(back) == set(written)
    for k, a in written.items():
        np.testing.assert_array_equal(back[k], a, err_msg=k)


def test_config_fields(tiny):
    _, hf, cfg = tiny
    c = hf.config
    assert cfg.architecture == c.model_type
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim)
    assert cfg.qkv_bias == (c.model_type == "qwen2" or getattr(c, "attention_bias", False))
    assert cfg.o_bias == (c.model_type in ("llama", "qwen3") and c.attention_bias)
    window = c.sliding_window if c.model_type == "mistral" else None
    assert cfg.layer_windows in ((), (window,) * cfg.num_layers)
    assert cfg.sliding_window == window


def test_refused_configs():
    base = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=4)
    with pytest.raises(ConfigError, match="use_sliding_window"):
        ModelConfig.from_hf_dict({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True,
                                  **base})
    with pytest.raises(ConfigError, match="mlp_bias"):
        ModelConfig.from_hf_dict({"architectures": ["LlamaForCausalLM"], "mlp_bias": True, **base})
    with pytest.raises(ConfigError, match="unsupported architecture"):
        ModelConfig.from_hf_dict({"architectures": ["GPT2LMHeadModel"], **base})
    assert ModelConfig.from_hf_dict({"model_type": "mistral", **base}).architecture == "mistral"
    cfg = ModelConfig.from_hf_dict({"architectures": ["LlamaForCausalLM"], **base})
    with pytest.raises(ConfigError, match="different sliding windows"):
        dataclasses.replace(cfg, layer_windows=(4, None)).sliding_window


def test_peft_modules_match_spec(tiny, tmp_path):
    import copy

    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from safetensors.numpy import load_file

    from jaxserve.lora.adapter import MODULES, from_peft_arrays, module_dims
    _, hf, cfg = tiny
    family = families.for_config(cfg)
    peft = get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, target_modules="all-linear"))
    assert peft.peft_config["default"].target_modules == set(family.lora_modules)
    wrapped = {n.removeprefix("base_model.model."): m for n, m in peft.named_modules()
               if isinstance(m, LoraLayer)}
    expected = {family.lora_weight(m).module_path(i): m
                for i in range(cfg.num_layers) for m in family.lora_modules}
    assert set(wrapped) == set(expected)
    for path, module in expected.items():
        din, dout = family.lora_dims(cfg, module)
        assert (wrapped[path].in_features, wrapped[path].out_features) == (din, dout), path
        assert module_dims(cfg, module) == (din, dout)
    assert set(family.lora_modules) <= set(MODULES)
    # What save_pretrained writes is read back as every module in every layer, at rank 4.
    peft.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    adapter = from_peft_arrays("a", config, tensors, cfg, where=str(tmp_path))
    assert set(adapter.modules) == set(family.lora_modules)
    assert (adapter.weights.ranks[:, [MODULES.index(m) for m in family.lora_modules]] == 4).all()


def test_gguf_names_are_llama_cpp_names(tiny):
    import gguf
    _, _, cfg = tiny
    family = families.for_config(cfg)
    for arch in family.gguf_architectures:
        table = gguf.TensorNameMap(gguf.MODEL_ARCH[arch.upper()], cfg.num_layers)
        hf_to_gguf = {n: w.gguf.format(i=i) for n, (w, i) in spec_names(family, cfg, "hf").items()}
        for hf_name, gguf_name in hf_to_gguf.items():
            assert table.get_name(hf_name, try_suffixes=(".weight", ".bias")) == gguf_name


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: q/k rows interleaved per rotary pair."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_gguf(path, hf, cfg):
    """A GGUF file as llama.cpp's converter writes one (fp32 tensors, llama metadata)."""
    import gguf
    family = families.for_config(cfg)
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    rope_rows = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}
    for hf_name, (spec, i) in spec_names(family, cfg, "hf").items():
        a = state[hf_name]
        module = hf_name.rsplit(".", 2)[-2]
        if module in rope_rows:
            a = _llama_cpp_permute(a, rope_rows[module])
        w.add_tensor(spec.gguf.format(i=i), np.ascontiguousarray(a, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_round_trip(tied, tmp_path):
    import jax
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from jaxserve.loader import load_gguf, load_hf_dir
    hf = make_hf_model("llama", tmp_path / "hf", tie_word_embeddings=tied)
    ours_hf = load_hf_dir(str(tmp_path / "hf"))
    write_gguf(tmp_path / "tiny.gguf", hf, ours_hf.config)
    # transformers' reader (its own names and inverse permutation) gets the HF weights back...
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    back = load_gguf_checkpoint(str(tmp_path / "tiny.gguf"), return_tensors=True,
                                model_to_load=hf)["tensors"]
    for k in spec_names(families.for_config(ours_hf.config), ours_hf.config, "hf"):
        np.testing.assert_array_equal(back[k].numpy(), state[k], err_msg=k)
    # ...and so does ours.
    ours_gguf = load_gguf(str(tmp_path / "tiny.gguf"))
    assert ours_gguf.config.tie_word_embeddings == tied
    assert dataclasses.replace(ours_gguf.config, rms_norm_eps=1e-5) == ours_hf.config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 ours_gguf.weights, ours_hf.weights)
