"""Lower the real engine step for GPU and TPU from this CPU (jax's cross-platform lowering) and
report every place where the KV pool would be copied to feed a kernel.

Run as a subprocess (tests/test_lowering.py): tensor parallelism needs 8 simulated devices,
which must be set before JAX starts. Prints one JSON object on its last line:
    python tests/lowering_check.py [--backends pallas xla] [--platforms cuda tpu] [--tp 1 8]
    python tests/lowering_check.py --families qwen3 gemma2 ...   (FAMILY_CASES, tp 1, no LoRA)
    -> {"cases": [{"family", "backend", "platform", "tp", "kind", "lora", "problems": [...],
                   "kernel_pool_operands": n, "donated": bool}, ...]}

What counts as a problem, read from the lowered StableHLO:
  * a slice, dynamic slice or gather whose operand is the pool (its global or per-device
    shape) and whose result keeps all of its pages and is at least one layer's pool: a layer's
    pool materialized, the copy a kernel operand needs (2x the pool's bytes per step);
  * a kernel (custom call) operand shaped like one layer's pool: the kernel reads a copy;
  * under tensor parallelism, a kernel operand with the pool's *global* shape: the kernel is
    not in shard_map, so the partitioner would gather the whole pool onto every device;
  * the pool not donated to the step (its write would not be in place).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxserve import sharding  # noqa: E402
from jaxserve.backends.base import XlaBackend  # noqa: E402
from jaxserve.backends.pallas import PallasBackend  # noqa: E402
from jaxserve.backends.programs import StepPrograms  # noqa: E402
from jaxserve.config import ModelConfig  # noqa: E402
from jaxserve.lora.pool import LoraBatch, PageLayout  # noqa: E402
from jaxserve.model.weights import init_random  # noqa: E402
from jaxserve.step_builder import BuiltStep  # noqa: E402

# Llama-shaped (GQA group of 4), small; pool sizes chosen so that no other array of the step
# shares a layer pool's shape.
CFG = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=3,
                  num_heads=32, num_kv_heads=8, head_dim=16)
NUM_PAGES, PAGE_SIZE = 96, 8
# Each family's step, lowered at CFG's sizes with the family's own fields (windows shorter than a
# sequence's pages, soft caps, local RoPE, 4 experts top-2): (backend, platform, kind) cases.
# XLA lowers the same attention on both platforms; it runs on one.
FAMILY_CASES = [("pallas", p, k) for p in ("cuda", "tpu") for k in ("decode", "prefill")] + [
    ("xla", "tpu", k) for k in ("decode", "prefill")]


def family_config(kind: str) -> ModelConfig:
    """CFG's sizes with a family's fields, read through its HF config (transformers' own config
    class, tests/tiny_models.py's family settings) as a checkpoint's config.json would be."""
    from tests.family_check import HF_ARCH
    from tests.tiny_models import FAMILY, _classes
    cfg_cls, _ = _classes(kind)
    hf = cfg_cls(**dict(FAMILY.get(kind, {}), vocab_size=CFG.vocab_size,
                        hidden_size=CFG.hidden_size, intermediate_size=CFG.intermediate_size,
                        num_hidden_layers=CFG.num_layers, num_attention_heads=CFG.num_heads,
                        num_key_value_heads=CFG.num_kv_heads, head_dim=CFG.head_dim,
                        architectures=[HF_ARCH[kind]]))
    return ModelConfig.from_hf_dict(hf.to_dict())
KERNEL = re.compile(r"stablehlo\.custom_call @(__gpu\$xla\.gpu\.triton|tpu_custom_call)\(")
SLICING = re.compile(r"stablehlo\.(dynamic_slice|slice|gather)\b")
TENSOR = re.compile(r"tensor<([0-9x]+)x(?:bf16|f32|f16|u16|i8|f8\w*)>")


def _shape(t: str) -> tuple[int, ...]:
    return tuple(int(d) for d in t.split("x"))


def _numel(s) -> int:
    return int(np.prod(s))


def analyse(text: str, pool: tuple[int, ...], tp: int) -> tuple[list[str], int]:
    """Problems found in a lowered module, and how many kernel operands are the whole pool."""
    L, H, N = pool[0], pool[1], pool[2]
    local = (L, H // tp) + pool[2:]
    pools = {pool, local}
    layer_shapes = {p[1:] for p in pools} | {(1,) + p[1:] for p in pools}
    problems, in_place = [], 0
    for line in text.splitlines():
        types = [_shape(t) for t in TENSOR.findall(line)]
        if not types:
            continue
        if SLICING.search(line) and " -> " in line:
            # Gathering a step's pages (block tables, adapter slots) drops the pages axis; a
            # result that keeps all N pages and holds a layer's worth is the pool copied.
            operand, result = types[0], types[-1]
            if (operand in pools and N in result
                    and _numel(result) >= _numel(operand) // L):
                problems.append(f"a layer-sized slice of the pool {operand} -> {result}: "
                                f"{line.strip()[:160]}")
        if KERNEL.search(line):
            sig = line[line.rfind(" : ("):]
            operands = [_shape(t) for t in TENSOR.findall(sig.split(" -> ")[0])]
            for op in operands:
                if op in layer_shapes:
                    problems.append(f"a kernel reads a layer's pool {op} (a copy)")
                if tp > 1 and op == pool:
                    problems.append(f"a kernel reads the global pool {op} under tp={tp} "
                                    "(not in shard_map: gathered onto every device)")
                if op == (local if tp > 1 else pool):
                    in_place += 1
    return problems, in_place


def _donated(text: str, pool: tuple[int, ...], tp: int) -> bool:
    """Both pool arguments of @main are donated (aliased to an output or buffer donors)."""
    main = next((ln for ln in text.splitlines() if "func.func public @main" in ln), "")
    shapes = {pool}
    main = main.split(" -> ")[0]
    donated = []
    for arg in main.split("%arg")[1:]:          # one argument's type and attributes each
        m = re.match(r"\d+: tensor<([0-9x]+)x\w+>", arg)
        if m and _shape(m.group(1)) in shapes and ("tf.aliasing_output" in arg
                                                     or "jax.buffer_donor" in arg):
            donated.append(arg)
    return len(donated) >= 2


def _step_inputs(backend, kind: str, lora: bool, B: int, T: int, P: int):
    """The step's inputs; LoRA only for CFG (the Llama cases)."""
    built = BuiltStep.empty(kind == "prefill", B, T, P)
    from jaxserve.model.kv_cache import StepInput
    from jaxserve.sampling import SamplingInput
    step = StepInput(tokens=built.tokens, positions=built.positions,
                     block_tables=built.block_tables, kv_lens=built.kv_lens,
                     slot_pages=built.slot_pages, slot_offsets=built.slot_offsets,
                     logits_index=built.logits_index)
    if lora:
        R, modules = 16, ("q_proj", "v_proj", "down_proj")
        layout = PageLayout(CFG, PAGE_SIZE, R)
        if backend.mesh is not None:
            from jaxserve.lora.tp import sharded_layout
            layout = sharded_layout(layout, sharding.head_layout(CFG, backend.tp), backend.tp)
        z = lambda *s: np.zeros(s, np.int32)  # noqa: E731
        step.lora_idx = np.full((B * T,), -1, np.int32)
        step.lora = LoraBatch(
            pages=tuple(z(B, layout.pages_for_rank(m, R)) for m in modules),
            ranks=np.zeros((CFG.num_layers, len(modules), B), np.int32),
            scales=np.zeros((CFG.num_layers, len(modules), B), np.float32),
            modules=modules, max_rank=R, mesh=backend.mesh)
    samp = SamplingInput(built.temperature, built.top_k, built.top_p, built.seeds,
                         built.counters, np.bool_(built.want_logprobs))
    return step, samp


def lower_case(name: str, platform: str, tp: int, kind: str, lora: bool,
               cfg: ModelConfig = CFG) -> dict:
    mesh = sharding.make_mesh(tp) if tp > 1 else None
    if name == "pallas":
        backend = PallasBackend(cfg, jnp.bfloat16, mesh=mesh, interpret=False,
                                platform={"cuda": "gpu"}.get(platform, platform))
    else:
        backend = XlaBackend(cfg, jnp.bfloat16, mesh=mesh)
    params = backend.prepare(init_random(cfg, dtype=jnp.bfloat16))
    kv = backend.init_pool(NUM_PAGES, PAGE_SIZE)
    programs = StepPrograms(backend, cfg, params, kv)
    B, T, P = (16, 1, 4) if kind == "decode" else (2, 64, 9)
    step, samp = _step_inputs(backend, kind, lora, B, T, P)
    text = programs._step.trace(params, kv, step, samp).lower(
        lowering_platforms=(platform,)).as_text()
    pool = tuple(kv.k.shape)
    problems, in_place = analyse(text, pool, tp)
    donated = _donated(text, pool, tp)
    if not donated:
        problems.append("the pool is not donated to the step")
    if name == "pallas" and in_place == 0:
        problems.append("no kernel reads the whole pool")
    return dict(backend=name, platform=platform, tp=tp, kind=kind, lora=lora,
                problems=problems, kernel_pool_operands=in_place, donated=donated)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", nargs="+", default=["pallas", "xla"])
    ap.add_argument("--platforms", nargs="+", default=["cuda", "tpu"])
    ap.add_argument("--tp", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--kinds", nargs="+", default=["decode", "prefill"])
    ap.add_argument("--lora", nargs="+", default=["no", "yes"])
    ap.add_argument("--families", nargs="+", default=None,
                    help="lower FAMILY_CASES for these tests/tiny_models.py kinds instead")
    args = ap.parse_args(argv)
    cases = []
    if args.families:
        for family in args.families:
            cfg = family_config(family)
            for name, platform, kind in FAMILY_CASES:
                try:
                    c = lower_case(name, platform, 1, kind, False, cfg)
                except Exception as e:  # a case that cannot lower is a finding too
                    c = dict(backend=name, platform=platform, tp=1, kind=kind, lora=False,
                             problems=[f"lowering failed: {type(e).__name__}: {str(e)[:300]}"])
                cases.append(dict(c, family=family, architecture=cfg.architecture,
                                  layer_windows=list(cfg.layer_windows),
                                  num_experts=cfg.num_experts))
        print(json.dumps({"cases": cases}))
        return
    for name in args.backends:
        for platform in args.platforms:
            for tp in args.tp:
                for kind in args.kinds:
                    for lora in args.lora:
                        try:
                            cases.append(lower_case(name, platform, tp, kind, lora == "yes"))
                        except Exception as e:  # a case that cannot lower is a finding too
                            cases.append(dict(backend=name, platform=platform, tp=tp, kind=kind,
                                              lora=lora == "yes",
                                              problems=[f"lowering failed: {type(e).__name__}: "
                                                        f"{str(e)[:300]}"]))
    print(json.dumps({"cases": cases}))


if __name__ == "__main__":
    main()
