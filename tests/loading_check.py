"""Loading under tensor parallelism, run in a fresh process with 4 simulated CPU devices (the
device count is fixed at JAX start-up; tests/test_loading.py runs this file and expects exit 0):

    python tests/loading_check.py ROOT

For tiny checkpoints whose heads are padded (9 q / 3 KV heads, with q/k/v biases) and
replicated (8 q / 2 KV heads) at tp 2 and 4: the streamed, placed arrays equal the old path's
(load on one device, then re-lay on the host and shard), have the backend's shardings, and no
device holds a whole copy of a sharded array; prepare uses them as they are; dummy weights have
the same shapes, dtypes and shardings and the same values at every tp; the pool is created
sharded; an engine on a config-only directory (--load-format dummy) runs at tp 2.
Prints one JSON line of what it checked.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxserve import sharding  # noqa: E402
from jaxserve.backends.base import XlaBackend  # noqa: E402
from jaxserve.loader import load_config, load_model  # noqa: E402


def check_placed(a: jax.Array, want_sharding) -> None:
    assert a.sharding.is_equivalent_to(want_sharding, a.ndim), (a.sharding, want_sharding)
    spec = tuple(want_sharding.spec) + (None,) * (a.ndim - len(want_sharding.spec))
    tp = want_sharding.mesh.shape[sharding.TP]
    for s in a.addressable_shards:
        want = tuple(n // tp if m == sharding.TP else n for n, m in zip(a.shape, spec))
        assert s.data.shape == want, (a.shape, spec, s.data.shape)   # a device's part only


def leaves(w):
    return jax.tree_util.tree_leaves_with_path(w)


def main(root: str) -> int:
    from tiny_models import make_hf_model
    checked = []
    cases = {"pad": ("qwen2", dict(num_attention_heads=9, num_key_value_heads=3, hidden_size=72)),
             "replicate": ("llama", dict(num_attention_heads=8, num_key_value_heads=2))}
    for case, (kind, kw) in cases.items():
        path = os.path.join(root, case)
        make_hf_model(kind, path, num_hidden_layers=2, **kw)
        cfg = load_config(path)
        one = load_model(path, jnp.float32)                       # one device
        dummy1 = load_model(path, jnp.float32, load_format="dummy")
        for tp in (2, 4):
            mesh = sharding.make_mesh(tp)
            backend = XlaBackend(cfg, jnp.float32, mesh=mesh)
            pl = backend.placement()
            placed = load_model(path, jnp.float32, placement=pl).weights
            old = sharding.shard_weights(one.weights, cfg, mesh, pl.layout)   # the old path
            dummy = load_model(path, jnp.float32, placement=pl, load_format="dummy").weights
            dummy_old = sharding.shard_weights(dummy1.weights, cfg, mesh, pl.layout)
            for (p, a), (_, b), (_, d), (_, e) in zip(leaves(placed), leaves(old), leaves(dummy),
                                                       leaves(dummy_old)):
                name = jax.tree_util.keystr(p)
                assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape)
                assert np.array_equal(np.asarray(a), np.asarray(b)), name
                check_placed(a, b.sharding)
                assert d.shape == a.shape and d.dtype == a.dtype, name
                check_placed(d, b.sharding)
                assert np.array_equal(np.asarray(d), np.asarray(e)), f"dummy {name} at tp={tp}"
            # prepare keeps the placed arrays (no copy), and consume empties the tree
            wq = placed.layers.wq
            params = backend.prepare(placed, consume=True)
            assert params.layers.qkv.w[0] is wq and placed.layers.wq is None
            kv = backend.init_pool(8, 4)
            check_placed(kv.k, sharding.NamedSharding(mesh, sharding.spec(
                ("layers", "kv_heads", "pages", "page_size", "head_dim"), kv.k.shape, mesh)))
            assert kv.k.shape[1] == pl.run_config.num_kv_heads
            checked.append(f"{case} tp={tp}")

    # an engine on config.json + tokenizer only, dummy weights, tp 2
    from lora_helpers import make_base
    from jaxserve.engine import EngineConfig, LLMEngine
    from jaxserve.sampling_params import SamplingParams
    make_base(os.path.join(root, "base"))
    cfg_only = os.path.join(root, "config_only")
    os.makedirs(cfg_only)
    for f in os.listdir(os.path.join(root, "base")):
        if not f.endswith(".safetensors"):
            shutil.copy(os.path.join(root, "base", f), cfg_only)
    eng = LLMEngine(EngineConfig(model=cfg_only, load_format="dummy", tp=2, backend="xla",
                                 num_pages=16, page_size=8, max_num_seqs=2, max_model_len=64,
                                 max_prefill_tokens=32))
    out = eng.generate(["w3 w4 w5"], SamplingParams(max_tokens=3, temperature=0.0,
                                                    ignore_eos=True))[0]
    assert len(out.token_ids) == 3 and eng.model.weights is None
    check_placed(eng.runner.params.layers.gate_up.w[0],
                 sharding.NamedSharding(eng.runner.backend.mesh, sharding.P(None, None, "tp")))
    checked.append("dummy engine tp=2")
    print(json.dumps({"checked": checked}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
