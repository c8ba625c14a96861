"""Adapters the engine cannot serve exactly are refused with a clear message (store level: no
device work), and the converter refuses the same ones without writing a checkpoint."""
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from lora_helpers import make_adapter, make_base  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_refuse")
    base = make_base(str(root / "base"))
    from jaxserve.loader import load_hf_dir
    from jaxserve.lora.pool import PageLayout
    from jaxserve.lora.store import LoraStore
    cfg = load_hf_dir(str(root / "base")).config
    store = LoraStore(cfg, PageLayout(cfg, 8, 64), max_pages=1000)
    return root, base, store


def _refused(env, name, match, **lora_kw):
    root, base, store = env
    make_adapter(base, str(root / name), seed=7, **lora_kw)
    from jaxserve.lora.adapter import AdapterError
    with pytest.raises(AdapterError, match=match):
        store.add(name, str(root / name))
    assert name not in store


def test_dora_refused(env):
    _refused(env, "dora", "DoRA", r=8, target_modules=["q_proj"], use_dora=True)


def test_modules_to_save_refused(env):
    _refused(env, "mts", "modules_to_save", r=8, target_modules=["q_proj"], modules_to_save=["lm_head"])


def test_embedding_lora_refused(env):
    _refused(env, "emb", "embed", r=8, target_modules=["embed_tokens", "q_proj"])


def test_lora_bias_refused(env):
    _refused(env, "bias", "bias", r=8, target_modules=["v_proj"], bias="lora_only")


def test_rank_above_max_refused(env):
    _refused(env, "big", "max_lora_rank", r=128, target_modules=["q_proj"])


def test_huge_rank_refused_before_padding(env, monkeypatch):
    """One layer's rank far above max_lora_rank (rank_pattern): refused while the tensors are
    checked, naming the tensor and the limit, before any array padded to that rank (one per
    module, layers x rank x dim) is allocated."""
    import jaxserve.lora.adapter as adapter_mod
    root, base, store = env
    make_adapter(base, str(root / "huge"), seed=3, r=4, target_modules=["q_proj", "v_proj"],
                 rank_pattern={"model.layers.0.self_attn.q_proj": 512})
    allocated = []

    class SpyNumpy:   # the loader's numpy, recording the shapes it allocates
        def __getattr__(self, attr):
            return getattr(np, attr)

        def zeros(self, shape, *args, **kwargs):
            allocated.append(shape)
            return np.zeros(shape, *args, **kwargs)

    monkeypatch.setattr(adapter_mod, "np", SpyNumpy())
    with pytest.raises(adapter_mod.AdapterError,
                       match=r"tensor 'model\.layers\.0\.self_attn\.q_proj\.lora_A' has rank 512, "
                             rf"above max_lora_rank={store.layout.max_rank}"):
        store.add("huge", str(root / "huge"))
    assert "huge" not in store
    assert store.layout.max_rank < 512
    assert not [s for s in allocated if isinstance(s, tuple) and len(s) == 3], allocated
    # without a limit (the converter's load) the same file pads to rank 512
    monkeypatch.setattr(adapter_mod, "np", np)
    adapter = adapter_mod.load_peft("huge", str(root / "huge"), store.model_cfg)
    assert adapter.max_rank == 512 and adapter.weights.a["q_proj"].shape[1] == 512


def test_orbax_rank_above_max_refused(env, tmp_path):
    """An Orbax checkpoint of a rank above max_lora_rank: refused as it is read, naming the
    module's array and the limit."""
    root, base, store = env
    from jaxserve.lora.adapter import AdapterError, load_peft
    from jaxserve.lora.orbax_io import save_orbax
    r = store.layout.max_rank * 2
    make_adapter(base, str(tmp_path / "big"), seed=4, r=r, target_modules=["v_proj"])
    save_orbax(load_peft("big", str(tmp_path / "big"), store.model_cfg), str(tmp_path / "ckpt"),
               store.model_cfg)
    with pytest.raises(AdapterError, match=rf"tensor 'a\.v_proj' has rank {r}, above "
                                           rf"max_lora_rank={store.layout.max_rank}"):
        store.add("big", str(tmp_path / "ckpt"))
    assert "big" not in store


def test_weights_beyond_the_serving_dtype_refused(env, tmp_path):
    """A weight finite in float32 but beyond bfloat16's range (it would be inf in the pool):
    refused, naming the tensor, by a store serving bfloat16 (make_lora_store takes the
    engine's dtype); a float32 store accepts it."""
    from types import SimpleNamespace
    from safetensors.numpy import load_file, save_file
    from jaxserve.lora.adapter import AdapterError
    from jaxserve.lora.runtime import make_lora_store
    root, base, store = env
    make_adapter(base, str(tmp_path / "wide"), seed=5, r=4, target_modules=["q_proj"])
    st = str(tmp_path / "wide" / "adapter_model.safetensors")
    tensors = load_file(st)
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key][0, 0] = np.float32(3.4e38)   # float32's max is ~3.403e38, bfloat16's ~3.390e38
    save_file(tensors, st)

    def engine_store(dtype):
        cfg = SimpleNamespace(dtype=dtype, page_size=store.layout.page_size,
                              max_lora_rank=store.layout.max_rank, lora_max_pages=None)
        return make_lora_store(store.model_cfg, cfg, num_pages=1000)

    with pytest.raises(AdapterError, match=rf"tensor '{key}' holds 1 value\(s\) beyond the range "
                                           r"of bfloat16"):
        engine_store("bfloat16").add("wide", str(tmp_path / "wide"))
    assert engine_store("float32").add("wide", str(tmp_path / "wide")).max_rank == 4


def test_shape_mismatch_refused(env, tmp_path):
    """An adapter trained on a model with another hidden size."""
    root, _, store = env
    other = make_base(str(tmp_path / "other"), hidden_size=32, head_dim=4)
    make_adapter(other, str(tmp_path / "wrong"), seed=1, r=8, target_modules=["q_proj", "down_proj"])
    from jaxserve.lora.adapter import AdapterError
    with pytest.raises(AdapterError, match=r"has shape \(\d+, \d+\), expected .*different base model"):
        store.add("wrong", str(tmp_path / "wrong"))


def test_config_lies_tensor_still_refused(env, tmp_path):
    """A DoRA file whose config says use_dora=false: the magnitude tensor gives it away."""
    root, base, store = env
    make_adapter(base, str(tmp_path / "sneaky"), seed=2, r=8, target_modules=["q_proj"], use_dora=True)
    cpath = tmp_path / "sneaky" / "adapter_config.json"
    cfg = json.loads(cpath.read_text())
    cfg["use_dora"] = False
    cpath.write_text(json.dumps(cfg))
    from jaxserve.lora.adapter import AdapterError
    with pytest.raises(AdapterError, match="magnitude"):
        store.add("sneaky", str(tmp_path / "sneaky"))


def test_missing_and_unknown_dirs(env, tmp_path):
    _, _, store = env
    from jaxserve.lora.adapter import AdapterError
    with pytest.raises(AdapterError, match="does not exist"):
        store.add("x", str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="adapter_config.json"):
        store.add("x", str(tmp_path / "empty"))


def test_scaling_rules_parsed(env):
    """rank_pattern / alpha_pattern / rsLoRA / layers_to_transform become per-layer numbers."""
    root, base, store = env
    make_adapter(base, str(root / "pat"), seed=3, r=4, lora_alpha=8, use_rslora=True,
                 target_modules=["q_proj", "k_proj"], rank_pattern={"k_proj": 16},
                 alpha_pattern={"q_proj": 2}, layers_to_transform=[1])
    ad = store.add("pat", str(root / "pat"))
    w = ad.weights
    assert w.ranks[0].sum() == 0                       # layer 0 not transformed
    assert list(w.ranks[1, :2]) == [4, 16]
    np.testing.assert_allclose(w.scales[1, :2], [2 / 2.0, 8 / 4.0])   # alpha / sqrt(r)
    assert w.a["k_proj"].shape == (2, 16, 64) and w.b["k_proj"].shape == (2, 16, 16)


def test_converter_refuses_without_writing(env, tmp_path):
    root, base, _ = env
    make_adapter(base, str(tmp_path / "src" / "good"), seed=4, r=8, target_modules=["q_proj"])
    make_adapter(base, str(tmp_path / "src" / "dora"), seed=5, r=8, target_modules=["q_proj"],
                 use_dora=True)
    from jaxserve.lora.convert import main
    rc = main([str(tmp_path / "src"), str(tmp_path / "dst"), "--model", str(root / "base"), "--quiet"])
    assert rc == 1
    assert os.path.isdir(tmp_path / "dst" / "good") and not os.path.exists(tmp_path / "dst" / "dora")
