"""Loading: streamed from memory-mapped safetensors into the backend's placement, weights held
once, random (dummy) weights made on the devices, clear errors for broken checkpoints.

Under tensor parallelism (simulated devices) the checks run in tests/loading_check.py, started
in a subprocess when this module is imported so it overlaps the in-process tests."""
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from lora_helpers import make_base  # noqa: E402
from tiny_models import make_hf_model  # noqa: E402

from jaxserve.loader import CheckpointError, load_model  # noqa: E402
from jaxserve.model import families  # noqa: E402
from jaxserve.model import params as params_lib  # noqa: E402
from jaxserve.model.weights import describe  # noqa: E402

HERE = os.path.dirname(__file__)
SCRIPT = os.path.join(HERE, "..", "scripts", "make_synthetic_checkpoint.py")
_tp_root = tempfile.mkdtemp(prefix="loading-check-")
_tp_proc = subprocess.Popen([sys.executable, os.path.join(HERE, "loading_check.py"), _tp_root],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def eager_reference(path, cfg, dtype=np.float32) -> dict:
    """Every weight read whole with safetensors (torch), transposed and stacked: what the
    eager loader built."""
    import torch
    from safetensors.torch import load_file
    tensors = {}
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            tensors.update({k: v.to(torch.float32).numpy() for k, v in load_file(
                os.path.join(path, f)).items()})
    family = families.for_config(cfg)
    out = {}
    for w in family.weights + family.layer_weights:
        if not w.is_present(cfg):
            continue
        def get(i=None, w=w):
            a = tensors[w.hf.format(i=i)]
            return a.T if w.transpose else a
        out[w.name] = (np.stack([get(i) for i in range(cfg.num_layers)])
                       if w in family.layer_weights else get())
    return out


def as_dict(weights) -> dict:
    top = {k: getattr(weights, k) for k in ("embed", "final_norm", "lm_head")}
    layers = {k: v for k, v in vars(weights.layers).items()}
    return {k: v for k, v in {**top, **layers}.items() if v is not None}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_streamed_load_equals_eager_values(tmp_path, kind):
    make_hf_model(kind, tmp_path, num_hidden_layers=2)
    m = load_model(str(tmp_path), jnp.float32)
    ref = eager_reference(str(tmp_path), m.config)
    got = as_dict(m.weights)
    assert set(got) == set(ref)
    for k, a in got.items():
        assert a.dtype == jnp.float32 and np.array_equal(np.asarray(a), ref[k]), k


def test_bf16_checkpoint_cast_per_tensor(tmp_path):
    """A bf16 checkpoint (written by the synthetic-checkpoint script, in two shards with an
    index) read as bf16 and as f32: the same values as the eager read."""
    subprocess.run([sys.executable, SCRIPT, str(tmp_path), "--preset", "tiny", "--shard-gb",
                    "0.0002"], check=True, capture_output=True)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    m16 = load_model(str(tmp_path), jnp.bfloat16)
    m32 = load_model(str(tmp_path), jnp.float32)
    ref = eager_reference(str(tmp_path), m16.config)
    for k, a in as_dict(m16.weights).items():
        assert a.dtype == jnp.bfloat16, k
        assert np.array_equal(np.asarray(a, np.float32), ref[k]), k
        assert np.array_equal(np.asarray(as_dict(m32.weights)[k]), ref[k]), k


def test_per_layer_prepare_equals_stacked_fused_and_consumes(tmp_path):
    make_hf_model("qwen2", tmp_path, num_hidden_layers=2)       # q/k/v biases too
    w = load_model(str(tmp_path), jnp.float32).weights
    ref = params_lib.unstack(params_lib.from_weights(w, fuse=True))
    keep = weakref.ref(w.layers.w_gate)
    got = params_lib.from_weights_per_layer(w, consume=True)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        assert a.shape == b.shape and np.array_equal(np.asarray(a), np.asarray(b))
    del ref
    gc.collect()
    assert w.layers.wq is None and w.layers.w_gate is None and keep() is None


def test_engine_holds_the_weights_once(tmp_path, monkeypatch):
    """After start the engine keeps no canonical weights: each canonical array is freed or is
    itself a prepared array (the embedding, norms, unfused parts)."""
    import jaxserve.engine as engine_mod
    from jaxserve.engine import EngineConfig, LLMEngine
    make_base(str(tmp_path))
    refs = []
    real = engine_mod.load_for_backend

    def spy(config):
        model, backend = real(config)
        refs.extend(weakref.ref(a) for a in jax.tree.leaves(model.weights))
        return model, backend
    monkeypatch.setattr(engine_mod, "load_for_backend", spy)
    eng = LLMEngine(EngineConfig(model=str(tmp_path), num_pages=8, page_size=8, max_num_seqs=2,
                                 max_model_len=64, max_prefill_tokens=32))
    gc.collect()
    assert eng.model.weights is None and refs
    prepared = {id(a) for a in jax.tree.leaves(eng.runner.params)}
    alive = [r() for r in refs if r() is not None]
    assert all(id(a) in prepared for a in alive), [a.shape for a in alive]
    assert len(alive) < len(refs)          # the fused parts went


def test_dummy_load_shapes_dtypes_and_seed(tmp_path):
    subprocess.run([sys.executable, SCRIPT, str(tmp_path), "--preset", "tiny", "--config-only"],
                   check=True, capture_output=True)
    assert os.listdir(tmp_path) == ["config.json"]
    m = load_model(str(tmp_path), jnp.bfloat16, load_format="dummy")
    again = load_model(str(tmp_path), jnp.bfloat16, load_format="dummy")
    other = load_model(str(tmp_path), jnp.bfloat16, load_format="dummy", seed=1)
    spec = describe(m.config)
    spec = {**spec.pop("layers"), **spec}
    got = as_dict(m.weights)
    assert set(got) == set(spec)
    for k, a in got.items():
        assert a.shape == spec[k].shape and a.dtype == jnp.bfloat16, k
        assert np.array_equal(np.asarray(a), np.asarray(as_dict(again.weights)[k])), k
    assert np.all(np.asarray(got["final_norm"]) == 1)
    wq = np.asarray(got["wq"], np.float32)
    assert 0.01 < wq.std() < 0.03 and not np.array_equal(wq, np.asarray(other.weights.layers.wq,
                                                                         np.float32))


def test_engine_and_cli_on_a_config_only_directory(tmp_path, capsys):
    """config.json + tokenizer: `--load-format dummy` serves random weights; without it the
    error says what is missing and how to get random weights."""
    from jaxserve.cli import build_parser, main
    from jaxserve.engine import EngineConfig, LLMEngine
    make_base(str(tmp_path / "full"))
    d = tmp_path / "cfg"
    d.mkdir()
    for f in os.listdir(tmp_path / "full"):
        if not f.endswith(".safetensors"):
            shutil.copy(tmp_path / "full" / f, d)
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files in .*--load-format dummy"):
        LLMEngine(EngineConfig(model=str(d), num_pages=8, page_size=8, max_num_seqs=2,
                               max_model_len=64, max_prefill_tokens=32))
    assert main(["generate", "--model", str(d), "--load-format", "dummy", "--prompt", "w3 w4",
                 "--max-tokens", "3", "--ignore-eos", "--num-pages", "8", "--page-size", "8",
                 "--max-model-len", "64", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"]) == 3
    args = build_parser().parse_args(["bench", "--model", str(d), "--load-format", "dummy"])
    assert args.load_format == "dummy"
    with pytest.raises(ValueError, match="load_format"):
        EngineConfig(load_format="random")


def test_broken_checkpoints_name_the_problem(tmp_path):
    subprocess.run([sys.executable, SCRIPT, str(tmp_path / "ok"), "--preset", "tiny",
                    "--shard-gb", "0.0002", "--dtype", "float32"], check=True, capture_output=True)
    shards = sorted(f for f in os.listdir(tmp_path / "ok") if f.endswith(".safetensors"))

    def variant(name):
        shutil.copytree(tmp_path / "ok", tmp_path / name)
        return tmp_path / name

    d = variant("missing")
    os.remove(d / shards[-1])
    with pytest.raises(CheckpointError, match=f"missing: .*{shards[-1]}"):
        load_model(str(d))

    d = variant("wrong_shape")
    from safetensors.numpy import load_file, save_file
    t = load_file(d / shards[0])
    t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"][:, :32].copy()
    save_file(t, d / shards[0])
    with pytest.raises(CheckpointError, match=r"embed has shape \[512, 32\] in the checkpoint "
                                              r"\(tensor model\.embed_tokens\.weight in "
                                              r".*\), the config implies \[512, 64\]"):
        load_model(str(d))

    d = variant("truncated")
    with open(d / shards[0], "r+b") as f:
        f.truncate(os.path.getsize(d / shards[0]) - 100)
    with pytest.raises(CheckpointError, match=f"{shards[0]}: tensor .* does not fit"):
        load_model(str(d))

    d = variant("no_tensor")
    t = load_file(d / shards[0])
    t.pop("model.layers.0.self_attn.q_proj.weight")
    save_file(t, d / shards[0])
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.* "
                                              "missing"):
        load_model(str(d))
    with pytest.raises(CheckpointError, match="unknown load format"):
        load_model(str(tmp_path / "ok"), load_format="random")


def test_tensor_parallel_placement_in_a_subprocess():
    """tests/loading_check.py: placed arrays equal the old path's and have the backend's
    shardings, each device holding only its part (tp 2 and 4, padded and replicated heads);
    dummy weights alike; the pool created sharded; a dummy engine runs at tp 2."""
    out, err = _tp_proc.communicate()
    shutil.rmtree(_tp_root, ignore_errors=True)
    assert _tp_proc.returncode == 0, err[-3000:]
    checked = json.loads(out.strip().splitlines()[-1])["checked"]
    assert checked == ["pad tp=2", "pad tp=4", "replicate tp=2", "replicate tp=4",
                       "dummy engine tp=2"]
