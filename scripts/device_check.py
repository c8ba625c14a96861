"""The GPU path checked end to end on one accelerator, in a bounded time (<= 8 minutes on one
H200), with no network and without the embedded model (`gguf` need not be installed).

    scripts/device_check.sh [--cpu-smoke] [OUT_DIR]        (this file does the work)

Steps, each under its own timeout, results in OUT_DIR/device_check.json and a summary table:
  1. tests    the gpu-marked tests (`pytest -m gpu`): the kernels compiled on the device, and
              a poisoned adapter's NaN/inf kept from other requests on them
  2. kernels  scripts/bench_kernels.py: paged attention and LoRA kernels against XLA, jax's own
              paged-attention kernel and the HBM roofline
  3. model    a Llama-3-8B-shape model directory written here (config.json and a byte-level BPE
              tokenizer trained in a second on this file's text: no download, nothing carried),
              weights random on the device (`--load-format dummy`)
  4. bench    `jaxserve bench` at batch 1, 64 and 256 in bfloat16, ~1k context, each with its %
              of the HBM roofline
  5. pool     the same batch-64 bench with a 4 GiB and a 60 GiB pool: the step time must not
              grow with the pool (the kernels read it in place)
  6. hlo      the compiled decode step (base, and with adapters): no copy of a layer's pool in
              its optimized HLO, and its memory does not grow with the pool
  7. overlap  scripts/bench_host_overhead.py on the device: the serving loop's step period at
              batch 64 and 256, synchronous and overlapped, against the device time of the same
              decode step run back to back
  8. families `jaxserve bench` (random weights, bfloat16) of a Qwen3-8B-shape (dense) and a
              Qwen3-30B-A3B-shape (mixture of experts: 48 layers, hidden 2048, 32 q / 4 KV
              heads, 128 experts top-8, expert width 768) model at batch 1, 64 and 256, one
              process per (model, batch); each with its % of the HBM roofline: the bytes a
              decode step must read (`decode_read_bytes`: the weights it uses, i.e. only the
              experts its tokens are routed to, and each row's K/V) over the step time, against
              the device's bandwidth
  9. distributed  scripts/check_distributed.py: a 1B-shape model (random) served by one process,
              then by `serve --distributed --dp 2 --tp 1` in 2 processes sharing the
              accelerator (replica 1 remote to process 0): the same texts for one batch, and
              both replicas ran steps
Targets (issues 17, 23) are checked and printed; a missed target is reported, not an error.
--cpu-smoke runs the same steps with a tiny model and tiny pools on CPU (CI runs it).
--steps picks steps by name (e.g. `--steps families` alone fits a short device lease).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GIB = 1 << 30
STEPS = ("tests", "kernels", "bench", "pool", "hlo", "overlap", "families", "distributed")

# HF config.json of the families step's models (Qwen/Qwen3-8B's and Qwen/Qwen3-30B-A3B's
# shapes; weights random), and the tiny stand-ins --cpu-smoke runs through the same code.
_QWEN3 = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_act="silu",
              rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
              attention_bias=False, torch_dtype="bfloat16", max_position_embeddings=40960)
_QWEN3_MOE = dict(_QWEN3, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                  decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
FAMILY_MODELS = {
    "qwen3-8b": dict(_QWEN3, vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128),
    "qwen3-30b-a3b": dict(_QWEN3_MOE, vocab_size=151936, hidden_size=2048,
                          intermediate_size=6144, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768),
}
FAMILY_MODELS_SMOKE = {
    "qwen3-tiny": dict(_QWEN3, vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16),
    "qwen3-moe-tiny": dict(_QWEN3_MOE, vocab_size=512, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, num_experts=8, num_experts_per_tok=2,
                           moe_intermediate_size=32),
}


def plan(smoke: bool) -> dict:
    """What each step runs: full shapes on the accelerator, tiny ones for --cpu-smoke."""
    if smoke:
        # float32: XLA:CPU scatters into a bfloat16 pool out of place (the cpu backend stores
        # bf16 as uint16 for that reason), which would time a CPU quirk, not the path
        return dict(preset="tiny", dtype="float32", batches=[1, 4], input_len=24,
                    output_len=8,
                    pool_batch=4, pools_gb=[0.004, 0.06], kernels=["--quick"],
                    overlap_batches=[4], overlap_steps=8,
                    families=FAMILY_MODELS_SMOKE, family_batches=[1, 4], family_input_len=24,
                    family_output_len=8,
                    dist_preset="tiny", dist=["--prompt-len", "24", "--output-len", "8",
                                              "--requests", "4"],
                    timeouts=dict(tests=300, kernels=300, bench=300, pool=300, hlo=300,
                                  overlap=300, family=300, distributed=300))
    # families: 512 tokens of context (448 + 64 / 2 on average) keeps Qwen3-30B-A3B's batch-256
    # pool (12.9 GB) beside its 61 GB of weights on one H200
    return dict(preset="llama3-8b", dtype="bfloat16", batches=[1, 64, 256], input_len=960,
                output_len=64,
                pool_batch=64, pools_gb=[4, 60], kernels=[],
                overlap_batches=[64, 256], overlap_steps=200,
                families=FAMILY_MODELS, family_batches=[1, 64, 256], family_input_len=480,
                family_output_len=64,
                dist_preset="1b", dist=["--prompt-len", "256", "--output-len", "64",
                                        "--requests", "16"],
                timeouts=dict(tests=150, kernels=60, bench=180, pool=120, hlo=60, overlap=120,
                              family=150, distributed=240))


# ----------------------------------------------------------------------------- the model

def write_tokenizer(out: str, vocab_size: int) -> None:
    """A byte-level BPE tokenizer trained offline on this repository's Python sources (any
    text will do: the benchmark feeds token ids), saved as an HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    texts = []
    for d in ("jaxserve", "scripts"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, d)):
            texts += [open(os.path.join(dirpath, f)).read() for f in files if f.endswith(".py")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                            eos_token="<|end_of_text|>").save_pretrained(out)


def write_config_dir(out: str, cfg: dict) -> dict:
    """A model directory of config.json `cfg` and a trained tokenizer (no weights: the bench
    makes them on the device with `--load-format dummy`)."""
    os.makedirs(out, exist_ok=True)
    write_tokenizer(out, min(2048, cfg["vocab_size"]))
    cfg = dict(cfg, bos_token_id=0, eos_token_id=1)     # the trained tokenizer's specials
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return cfg


def write_model_dir(out: str, preset: str) -> dict:
    """config.json of the preset (scripts/make_synthetic_checkpoint.py's shapes) and a
    tokenizer; the weights are made on the device by `--load-format dummy`."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from make_synthetic_checkpoint import hf_config
    os.makedirs(out, exist_ok=True)
    cfg = hf_config(preset, "bfloat16")
    write_tokenizer(out, min(2048, cfg["vocab_size"]))
    cfg.update(bos_token_id=0, eos_token_id=1)          # the trained tokenizer's specials
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return cfg


# ----------------------------------------------------------------------------- steps

def run(cmd: list[str], timeout: int, log: str) -> dict:
    """Run a step; its output goes to `log` and the last lines to the result."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                cwd=ROOT).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    tail = open(log).read().splitlines()[-6:]
    return dict(cmd=" ".join(cmd), rc=rc, seconds=round(time.perf_counter() - t0, 1), tail=tail)


def bench_cmd(model: str, out_json: str, batches, p: dict, smoke: bool, pool_gb=None):
    cmd = [sys.executable, "-m", "jaxserve.cli", "bench", "--model", model,
           "--load-format", "dummy", "--dtype", p["dtype"], "--batch-sizes",
           ",".join(map(str, batches)), "--input-len", str(p["input_len"]),
           "--output-len", str(p["output_len"]), "--max-prefill-tokens", "2048",
           "--output", out_json]
    if pool_gb is not None:
        cmd += ["--kv-cache-gb", str(pool_gb)]
    if smoke:   # the accelerator path's step (one scanned program), on CPU
        cmd += ["--backend", "xla", "--layer-loop", "scan"]
    return cmd


def layer_pool_copies(hlo_text: str, layer_pool_dims: tuple[int, ...]) -> list[str]:
    """Optimized-HLO copies whose shape holds a layer's pool [Hkv, N, S, D] (or the stack)."""
    want = ",".join(map(str, layer_pool_dims))
    found = []
    for line in hlo_text.splitlines():
        if re.search(r"\bcopy(-start)?\(", line) and want in line.split("=")[1].split("copy")[0]:
            found.append(line.strip()[:200])
    return found


def hlo_check(model: str, p: dict, smoke: bool, pool_gb: float) -> dict:
    """The compiled decode step (base and with adapters) looked at two ways: its optimized HLO
    has no copy of a layer's pool, and its memory (compiled temporaries and outputs, from
    memory_analysis()) does not grow with the pool (a copy hidden in a fusion shows there)."""
    from jaxserve.engine import EngineConfig, LLMEngine
    from jaxserve.sampling_params import SamplingParams
    extra = dict(backend="xla", layer_loop="scan") if smoke else {}
    engine = LLMEngine(EngineConfig(model=model, load_format="dummy", dtype=p["dtype"],
                                    kv_cache_gb=pool_gb, max_num_seqs=8, max_model_len=256,
                                    max_lora_rank=16, **extra))
    for i in range(8):
        engine.add_request(f"h{i}", list(range(3, 40)), SamplingParams(max_tokens=3,
                                                                       ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    runner = engine.runner
    kv = runner.kv.k
    dims = tuple(kv.shape[1:])
    copies, programs = [], 0
    for prog in runner._compiled.values():
        parts = [prog] if hasattr(prog, "as_text") else [
            getattr(prog, n) for n in ("embed", "layer", "logits", "sample")]
        for part in parts:
            programs += 1
            copies += layer_pool_copies(part.as_text(), dims)
    growth = {}
    small, large = 64, kv.shape[2]
    for shape in runner.largest_shapes():
        if shape[0] != "decode":
            continue
        a, b = runner.step_memory(shape, small), runner.step_memory(shape, large)
        name = "decode" + (" with adapters" if len(shape) > 4 else "")
        growth[name] = dict(pages=[small, large], bytes=[a, b],
                            per_page=(b - a) / (large - small))
    page_bytes = 2 * kv.dtype.itemsize * math.prod(dims[:1] + dims[2:]) * kv.shape[0]
    grows = [n for n, g in growth.items() if g["per_page"] > 0.05 * page_bytes]
    return dict(pool_shape=list(kv.shape), programs=programs, pool_copies=copies,
                step_bytes_vs_pool=growth, grows_with_pool=grows)


def decode_read_bytes(cfg: dict, batch: int, context: float, itemsize: int = 2) -> dict:
    """Bytes one decode step of `batch` rows must read from HBM at least, from an HF config:
    each layer's attention weights and norms, its dense MLP or its router and the experts its
    tokens use, the LM head, the batch's embedding rows, and each row's K/V for `context`
    tokens. The experts used: k per token, distinct across the batch; with random weights the
    router's picks are close to independent and uniform, so a batch of B uses
    E (1 - (1 - k/E)^B) of each layer's E experts on average (exactly k at B = 1, all but
    ~0.01% of them at B >= 256 for 128 experts top-8)."""
    H, L, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    D = cfg.get("head_dim") or H // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * D, cfg["num_key_value_heads"] * D
    attn = 2 * H * q + 2 * H * kv + 2 * H + 2 * D       # q, o, k, v; two norms; q/k norms
    E = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    if E:
        k, Im = cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]
        used = E * (1 - (1 - k / E) ** batch)
        mlp = H * E + used * 3 * H * Im
    else:
        used, mlp = 0, 3 * H * cfg["intermediate_size"]
    weights = (L * (attn + mlp) + H * V + batch * H + H) * itemsize
    kv_bytes = batch * context * 2 * L * kv * itemsize
    return dict(weights=weights, kv=kv_bytes, total=weights + kv_bytes, experts_used=used)


def family_rows(name: str, cfg: dict, results: list[dict], context: float,
                itemsize: int) -> list[dict]:
    """One row per measured batch: decode tok/s, step time, bytes read and % of roofline."""
    rows = []
    for r in results:
        for row in r.get("rows", []):
            B, step_ms = row["batch"], row["decode_step_ms"]
            need = decode_read_bytes(cfg, B, context, itemsize)
            bw = r["memory_bandwidth_gb_s"] * 1e9
            rows.append(dict(model=name, batch=B, decode_tok_s=row["ours_decode_tok_s"],
                             step_ms=step_ms, read_gb=need["total"] / 1e9,
                             experts_used=need["experts_used"],
                             hbm_roofline_pct=(100 * need["total"] / (step_ms / 1e3) / bw
                                               if step_ms else None),
                             bench_roofline_pct_all_weights=row["hbm_roofline_pct"],
                             bandwidth=r["memory_bandwidth_source"]))
    return rows


def families_step(out: str, p: dict, smoke: bool, res: dict) -> list[dict]:
    """Step 8: each family model at each batch size in its own bench process (a batch that
    does not fit fails alone; --cpu-smoke runs a family's batches in one process); rows with
    the roofline from `decode_read_bytes`."""
    rows = []
    groups = [p["family_batches"]] if smoke else [[B] for B in p["family_batches"]]
    for name, hf in p["families"].items():
        model = os.path.join(out, name)
        cfg = write_config_dir(model, hf)
        context = p["family_input_len"] + p["family_output_len"] / 2   # bench's average
        results = []
        for batches in groups:
            tag = f"{name}_b{'-'.join(map(str, batches))}"
            bj = os.path.join(out, f"{tag}.json")
            fp = dict(p, input_len=p["family_input_len"], output_len=p["family_output_len"])
            res["steps"][tag] = run(bench_cmd(model, bj, batches, fp, smoke),
                                    p["timeouts"]["family"], os.path.join(out, f"{tag}.log"))
            if os.path.exists(bj):
                results.append(json.load(open(bj)))
        rows += family_rows(name, cfg, results, context, 2 if p["dtype"] == "bfloat16" else 4)
    return rows


# ----------------------------------------------------------------------------- targets

def summarize(res: dict, smoke: bool) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) rows; met None where the step did not produce the number."""
    rows = []
    bench = res.get("bench_json", {}).get("rows", [])
    by_b = {r["batch"]: r for r in bench}
    b64 = by_b.get(64 if not smoke else 4)
    b1 = by_b.get(1)
    rows.append(("decode batch 64: >= 60% of the HBM roofline",
                 f"{b64['hbm_roofline_pct']:.1f}% ({b64['ours_decode_tok_s']:.0f} tok/s)"
                 if b64 else "-", b64["hbm_roofline_pct"] >= 60 if b64 else None))
    rows.append(("decode batch 1: >= 200 tok/s",
                 f"{b1['ours_decode_tok_s']:.0f} tok/s" if b1 else "-",
                 b1["ours_decode_tok_s"] >= 200 if b1 else None))
    pools = res.get("pool_json", [])
    if len(pools) == 2 and all(p.get("rows") for p in pools):
        small, large = (p["rows"][0]["decode_step_ms"] for p in pools)
        rows.append(("step with a 60 GiB pool within 5% of a 4 GiB pool",
                     f"{small:.2f} ms -> {large:.2f} ms ({100 * (large / small - 1):+.1f}%)",
                     large <= 1.05 * small))
    else:
        rows.append(("step with a 60 GiB pool within 5% of a 4 GiB pool", "-", None))
    kern = res.get("kernels_json", {}).get("rows", [])
    ours = next((r for r in kern if r["case"].startswith("attn decode")
                 and "ours" in r["impl"] and r.get("time_ms")), None)
    jaxs = next((r for r in kern if r["case"].startswith("attn decode")
                 and r["impl"].startswith("jax ops") and r.get("time_ms")), None)
    rows.append(("paged-attention decode kernel >= 70% of HBM bandwidth",
                 f"{ours['roofline_pct']:.1f}%" if ours else "-",
                 ours["roofline_pct"] >= 70 if ours else None))
    rows.append(("decode kernel not slower than jax's paged attention",
                 f"{ours['time_ms']:.3f} ms vs {jaxs['time_ms']:.3f} ms" if ours and jaxs
                 else "-", ours["time_ms"] <= jaxs["time_ms"] if ours and jaxs else None))
    hlo = res.get("hlo", {})
    rows.append(("no copy of a layer's pool in the compiled step",
                 f"{len(hlo.get('pool_copies', []))} copies in {hlo.get('programs', 0)} "
                 "programs" if hlo else "-",
                 (not hlo["pool_copies"] and hlo["programs"] > 0) if hlo else None))
    rows.append(("decode step memory does not grow with the pool",
                 ", ".join(f"{n}: {g['per_page']:.0f} B/page"
                           for n, g in hlo.get("step_bytes_vs_pool", {}).items()) or "-",
                 (not hlo["grows_with_pool"]) if hlo.get("step_bytes_vs_pool") else None))
    over = {(r["batch"], r["loop"]): r for r in res.get("overlap_json", {}).get("rows", [])}
    for b in (64, 256) if not smoke else (4,):
        r = over.get((b, "overlap"))
        rows.append((f"overlapped loop at batch {b}: step period within 10% of device time",
                     f"{r['period_ms']:.2f} ms vs {r['device_ms']:.2f} ms (sync "
                     f"{over[(b, 'sync')]['period_ms']:.2f} ms)" if r and (b, "sync") in over
                     else "-", r["period_over_device"] <= 1.10 if r else None))
    d = res.get("distributed_json")
    group = next((v for k, v in (d or {}).items() if k.startswith("--dp")), None)
    rows.append(("serve --distributed --dp 2 (2 processes) = one process",
                 f"same outputs: {d['same_outputs']}, replica steps {group['replica_steps']}"
                 if d and group else "-",
                 d["same_outputs"] and d["every_replica_ran"] if d else None))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default="device_check_out")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (CI)")
    ap.add_argument("--steps", default=",".join(STEPS),
                    help=f"comma-separated steps to run, of {','.join(STEPS)} (default: all)")
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    steps = args.steps.split(",")
    if set(steps) - set(STEPS):
        ap.error(f"unknown steps {sorted(set(steps) - set(STEPS))}; choose from {STEPS}")
    os.makedirs(args.out, exist_ok=True)
    out = os.path.abspath(args.out)
    p = plan(smoke)
    import jax
    device = jax.devices()[0]
    if not smoke and device.platform == "cpu":
        ap.error("no accelerator here: run with --cpu-smoke")
    res = dict(device=device.device_kind, platform=device.platform, jax=jax.__version__,
               smoke=smoke, plan=p, steps={})
    t0 = time.perf_counter()
    T = p["timeouts"]

    if "tests" in steps:
        res["steps"]["tests"] = run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p",
                                     "no:cacheprovider", "tests/test_kernels_attention.py",
                                     "tests/test_kernels_lora.py", "tests/test_engine_pallas.py",
                                     "tests/test_poison.py"],
                                    T["tests"], os.path.join(out, "tests.log"))
    kj = os.path.join(out, "bench_kernels.json")
    if "kernels" in steps:
        res["steps"]["kernels"] = run([sys.executable, "scripts/bench_kernels.py", *p["kernels"],
                                       "--json", kj], T["kernels"],
                                      os.path.join(out, "kernels.log"))
        if os.path.exists(kj):
            res["kernels_json"] = json.load(open(kj))

    model = os.path.join(out, "model")
    if {"bench", "pool", "hlo", "overlap"} & set(steps):
        write_model_dir(model, p["preset"])
    bj = os.path.join(out, "bench.json")
    if "bench" in steps:
        res["steps"]["bench"] = run(bench_cmd(model, bj, p["batches"], p, smoke), T["bench"],
                                    os.path.join(out, "bench.log"))
        if os.path.exists(bj):
            res["bench_json"] = json.load(open(bj))
    res["pool_json"] = []
    for gb in p["pools_gb"] if "pool" in steps else ():
        pj = os.path.join(out, f"pool_{gb}gb.json")
        res["steps"][f"pool_{gb}gb"] = run(bench_cmd(model, pj, [p["pool_batch"]], p, smoke,
                                                     pool_gb=gb), T["pool"],
                                           os.path.join(out, f"pool_{gb}gb.log"))
        res["pool_json"].append(json.load(open(pj)) if os.path.exists(pj) else {})
    if "hlo" in steps:
        try:
            res["hlo"] = hlo_check(model, p, smoke, p["pools_gb"][-1])
        except Exception as e:            # reported, as a step that failed
            res["hlo"] = {}
            res["steps"]["hlo"] = dict(rc=f"{type(e).__name__}: {str(e)[:300]}")
    oj = os.path.join(out, "overlap.json")
    if "overlap" in steps:
        res["steps"]["overlap"] = run(
            [sys.executable, "scripts/bench_host_overhead.py", "--model", model, "--load-format",
             "dummy", "--dtype", p["dtype"], "--prompt-len", str(p["input_len"]), "--batch",
             *map(str, p["overlap_batches"]), "--steps", str(p["overlap_steps"]), "--out", oj]
            + (["--cpu-smoke"] if smoke else []), T["overlap"], os.path.join(out, "overlap.log"))
        if os.path.exists(oj):
            res["overlap_json"] = json.load(open(oj))
    if "families" in steps:
        res["families"] = families_step(out, p, smoke, res)
    if "distributed" in steps:
        dmodel, dj = os.path.join(out, "dist_model"), os.path.join(out, "distributed.json")
        write_model_dir(dmodel, p["dist_preset"])
        res["steps"]["distributed"] = run(
            [sys.executable, "scripts/check_distributed.py", "--model", dmodel, "--load-format",
             "dummy", "--dtype", p["dtype"], "--out", dj, *p["dist"]]
            + (["--cpu-smoke"] if smoke else []), T["distributed"],
            os.path.join(out, "distributed.log"))
        if os.path.exists(dj):
            res["distributed_json"] = json.load(open(dj))
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["targets"] = summarize(res, smoke)

    print(f"\ndevice check on {res['device']} ({res['platform']}, jax {res['jax']})"
          + (" -- CPU SMOKE RUN: numbers are meaningless" if smoke else "")
          + f", {res['seconds']} s")
    print("\n| step | exit | seconds |\n|---|---|---|")
    for name, st in res["steps"].items():
        print(f"| {name} | {st['rc']} | {st.get('seconds', '-')} |")
    if res.get("bench_json"):
        print("\n| batch | decode tok/s | step ms | HBM roofline | pages |\n|---|---|---|---|---|")
        for r in res["bench_json"]["rows"]:
            print(f"| {r['batch']} | {r['ours_decode_tok_s']:.1f} | {r['decode_step_ms']:.2f} | "
                  f"{r['hbm_roofline_pct']:.1f}% | {r['num_pages']} |")
    if res.get("families"):
        print("\n| model | batch | decode tok/s | step ms | bytes read per step | experts used "
              "per layer | HBM roofline |\n|---|---|---|---|---|---|---|")
        for r in res["families"]:
            pct = "-" if r["hbm_roofline_pct"] is None else f"{r['hbm_roofline_pct']:.1f}%"
            used = f"{r['experts_used']:.1f}" if r["experts_used"] else "-"
            read = (f"{r['read_gb']:.2f} GB" if r["read_gb"] >= 0.1
                    else f"{1e3 * r['read_gb']:.3f} MB")
            print(f"| {r['model']} | {r['batch']} | {r['decode_tok_s']:.1f} | {r['step_ms']:.2f} | "
                  f"{read} | {used} | {pct} |")
    print("\n| target | measured | met |\n|---|---|---|")
    for name, measured, met in res["targets"]:
        print(f"| {name} | {measured} | {'-' if met is None else ('yes' if met else 'NO')} |")
    with open(os.path.join(out, "device_check.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    print(f"\nwrote {os.path.join(out, 'device_check.json')}")
    failed = [n for n, st in res["steps"].items() if st["rc"] != 0]
    if failed:
        print(f"steps that failed: {failed} (their logs are in {out})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
