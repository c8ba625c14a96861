"""The real engine step, lowered for GPU and TPU from this CPU, never copies the KV pool to
feed a kernel (tests/lowering_check.py says exactly what it looks for): decode and prefill, with
and without adapters, tp 1 and tp 8 (simulated devices), the Pallas and the XLA backends.

A kernel (a custom call) needs a materialized operand, so a pool slice pool[layer] passed to it
is a copy of that layer's pool on every layer of every step: 2x the pool's bytes per step
whatever the batch (~25 ms per step for a 60 GB pool on an H200)."""
import json
import os
import subprocess
import sys

import pytest

from family_check import HF_ARCH, MOE
from lowering_check import FAMILY_CASES, analyse

HERE = os.path.dirname(os.path.abspath(__file__))
FAMILIES = [k for k in HF_ARCH if k != "llama"]     # llama: the cases above


def _start(*args):
    return subprocess.Popen([sys.executable, os.path.join(HERE, "lowering_check.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc):
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])["cases"]


@pytest.fixture(scope="module")
def _procs():
    """Both subprocesses start at once, so their lowerings overlap."""
    procs = {"llama": _start(), "families": _start("--families", *FAMILIES)}
    yield procs
    for p in procs.values():
        if p is not None and p.poll() is None:
            p.kill()
            p.communicate()


@pytest.fixture(scope="module")
def cases(_procs):
    return _result(_procs["llama"])


@pytest.fixture(scope="module")
def family_cases(_procs):
    return _result(_procs["families"])


def test_every_step_reads_the_pool_in_place(cases):
    assert len(cases) == 2 * 2 * 2 * 2 * 2            # backends x platforms x tp x kinds x lora
    bad = [c for c in cases if c["problems"]]
    assert not bad, json.dumps(bad, indent=1)
    for c in cases:
        assert c["donated"], c
        if c["backend"] == "pallas":                  # k and v pools, whole, into the kernel
            assert c["kernel_pool_operands"] >= 2, c


@pytest.mark.parametrize("family", FAMILIES)
def test_family_steps_read_the_pool_in_place(family, family_cases):
    """Each family's decode and prefill step (its windows, soft caps, q/k norms, experts), lowered
    for GPU and TPU with the Pallas kernels and with XLA: the pool in place as for Llama."""
    mine = [c for c in family_cases if c["family"] == family]
    assert [(c["backend"], c["platform"], c["kind"]) for c in mine] == FAMILY_CASES
    bad = [c for c in mine if c["problems"]]
    assert not bad, json.dumps(bad, indent=1)
    for c in mine:
        assert c["donated"] and c["architecture"] != "llama", c
        assert (c["num_experts"] > 0) == (family in MOE), c
        if family.startswith("gemma"):       # both layer types present
            assert None in c["layer_windows"] and 5 in c["layer_windows"], c
        if c["backend"] == "pallas":
            assert c["kernel_pool_operands"] >= 2, c


POOL = (3, 8, 96, 8, 16)


def test_analyse_flags_a_layer_slice_feeding_a_kernel():
    """The checker itself: a module shaped like the one today's fix removed is caught."""
    text = "\n".join([
        "%5 = stablehlo.dynamic_slice %arg9, %1, %c, %c, %c, %c, sizes = [1, 8, 96, 8, 16] : "
        "(tensor<3x8x96x8x16xbf16>, tensor<i32>, tensor<i32>, tensor<i32>, tensor<i32>, "
        "tensor<i32>) -> tensor<1x8x96x8x16xbf16>",
        "%7 = stablehlo.custom_call @__gpu$xla.gpu.triton(%2, %6) {backend_config = \"\"} : "
        "(tensor<16x4xi32>, tensor<8x96x8x16xbf16>) -> tensor<16x1x32x16xbf16>",
    ])
    problems, in_place = analyse(text, POOL, tp=1)
    assert in_place == 0
    assert any("layer-sized slice" in p for p in problems)
    assert any("reads a layer's pool" in p for p in problems)


def test_analyse_accepts_page_gathers_and_flags_a_global_pool_under_tp():
    gather = ('%3 = "stablehlo.gather"(%arg9, %2) <{...}> : (tensor<3x8x96x8x16xbf16>, '
              'tensor<16x4x2xi32>) -> tensor<16x4x8x8x16xbf16>')
    assert analyse(gather, POOL, tp=1) == ([], 0)
    kernel = ("%9 = stablehlo.custom_call @tpu_custom_call(%1, %arg9) {x} : "
              "(tensor<1xi32>, tensor<3x8x96x8x16xbf16>) -> tensor<2x64x32x16xbf16>")
    assert analyse(kernel, POOL, tp=1) == ([], 1)
    problems, _ = analyse(kernel, POOL, tp=8)
    assert problems and "not in shard_map" in problems[0]
