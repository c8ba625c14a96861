"""One check of a model family against HF transformers and PEFT, reusable for every family
(tests/test_families.py parametrizes it over tests/tiny_models.py's kinds).

For a tiny random HF checkpoint of a kind and a PEFT LoRA adapter made on it:
  logits      our model (prefill in chunks over shuffled pages, then decode-sized chunks)
              against HF's full forward, fp32;
  greedy      64 greedy tokens from the real engine (LLMEngine: scheduler, runner, step
              programs, LoRA pool) against HF's greedy decoding, for the base model and the
              adapter (against the PEFT model), in one batch;
  bfloat16    our model in bfloat16 (weights, activations, KV pool) against HF fp32;
  backends    the same logits on the CPU native backend and on Pallas (interpret mode);
  tp          tests/family_tp_check.py, in a subprocess with simulated devices: the engine at
              tp 2 or 4 (MoE kinds: both, one with ep = tp; PARALLEL_RUNS) reads the same
              checkpoint and adapter; its greedy tokens are compared to the same HF / PEFT
              references.

Tolerances (fp32): both sides compute in float32 and differ only in summation order (XLA vs
torch matmul blocking, attention over pages vs dense, a softmax over experts then top-k): ~1e-5
on logits of magnitude ~5 here. FP32_ATOL = 1e-3 leaves room for machine variation; a real bug
(a wrong RoPE base, norm offset, window, scale, cap, or expert weight) moves logits by > 1e-1.
bfloat16 keeps 8 mantissa bits (~0.4% relative per rounding): over 3 layers the logits
(magnitude ~4) drift by a few 1e-2 (measured: max 0.03-0.07 per position for qwen3 and the
MoE kinds); BF16_ATOL = 0.15 x max(1, |logits| / 5) still catches any real bug. In a mixture
of experts a router near-tie can pick another expert in bfloat16 for a token: test_families
allows a few positions past the tolerance there.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
FP32_ATOL = 1e-3
BF16_ATOL = 0.15
NUM_TOKENS = 64
PAGE = 4
# one prompt 17 tokens long, fed as chunks of 8, 1 and 8 tokens: chunked prefill across pages
# (and past Gemma's window of 5), then a decode-shaped step; two shapes, two compiles
CHUNKS = (8, 1, 8)

# HF class of each kind.
HF_ARCH = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
           "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
           "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
KINDS = tuple(HF_ARCH)
MOE = ("mixtral", "qwen3_moe")
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
DENSE_MLP = ["gate_proj", "up_proj", "down_proj"]


def lora_targets(kind: str) -> list[str]:
    """The attention projections, plus the dense MLP's where the family has one (MoE experts
    are not adapted)."""
    return ATTN if kind in MOE else ATTN + DENSE_MLP


@dataclasses.dataclass
class Tiny:
    kind: str
    path: str            # HF checkpoint dir (with a tokenizer)
    adapter_path: str    # PEFT adapter dir
    hf: torch.nn.Module
    peft: torch.nn.Module
    prompts: list         # token ids, longer than Gemma's window and than a page


def build(kind: str, root: str, seed: int = 0) -> Tiny:
    """The tiny checkpoint, its tokenizer and a PEFT LoRA adapter (A and B random: PEFT's B
    starts at zero, which would make the adapter a no-op), all on disk under `root`."""
    from peft import LoraConfig, get_peft_model

    from tests.tiny_models import make_hf_model, save_tokenizer
    path, adapter = os.path.join(root, kind), os.path.join(root, kind + "-lora")
    hf = make_hf_model(kind, path, seed=seed)
    save_tokenizer(path)
    peft = get_peft_model(copy.deepcopy(hf), LoraConfig(
        task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0,
        target_modules=lora_targets(kind)))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 / p.shape[-1] ** 0.5)
    peft.save_pretrained(adapter)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 512, n).tolist() for n in (11, 7)]
    return Tiny(kind, path, adapter, hf, peft.eval(), prompts)


# ----------------------------------------------------------------------------- references

def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model, ids, n: int = NUM_TOKENS) -> list[int]:
    """Greedy decoding with HF's KV cache, EOS not special (the engine's ignore_eos)."""
    out, past, cur = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            o = model(input_ids=cur, past_key_values=past, use_cache=True)
            past = o.past_key_values
            nxt = int(o.logits[0, -1].argmax())
            out.append(nxt)
            cur = torch.tensor([[nxt]])
    return out


# ----------------------------------------------------------------------------- our model

def paged_logits(model, ids, backend: str = "xla", dtype=None, seed: int = 0) -> np.ndarray:
    """All logits [T, V] of `ids` run through our model in CHUNKS (chunked prefill, then a
    decode-shaped chunk) over shuffled pages, on `backend` ("xla", "cpu": native kernels,
    "pallas": interpret mode here)."""
    import jax
    import jax.numpy as jnp

    from jaxserve import backends
    from jaxserve.model import llama
    from jaxserve.model.kv_cache import StepInput
    dtype = dtype or jnp.float32
    cfg = model.config
    assert len(ids) == sum(CHUNKS)
    P = -(-len(ids) // PAGE)
    table = np.random.default_rng(seed).permutation(np.arange(1, 2 * P + 1))[:P]
    be = backends.select(backend, cfg, dtype, layer_loop="scan",
                         interpret=True if backend == "pallas" else None)
    assert type(be).__name__.lower().startswith({"xla": "xla", "cpu": "cpu",
                                                 "pallas": "pallas"}[backend]), type(be)
    kv = be.init_pool(2 * P + 1, PAGE)
    params = be.prepare(jax.tree.map(lambda a: a.astype(dtype), model.weights))
    fwd = jax.jit(lambda p, s, kv: llama.forward(p, be.run_config, be, s, kv, all_logits=True))
    out, start = [], 0
    for n in CHUNKS:
        pos = np.arange(start, start + n)
        step = StepInput(tokens=jnp.array([ids[start:start + n]], jnp.int32),
                         positions=jnp.array([pos], jnp.int32),
                         block_tables=jnp.array([table], jnp.int32),
                         kv_lens=jnp.array([start + n], jnp.int32),
                         slot_pages=jnp.array(table[pos // PAGE], jnp.int32),
                         slot_offsets=jnp.array(pos % PAGE, jnp.int32),
                         logits_index=jnp.array([n - 1], jnp.int32))
        logits, kv = fwd(params, step, kv)
        out.append(np.asarray(logits[0], np.float32))
        start += n
    return np.concatenate(out)


# One prefill step for every prompt (the requests then decode in lockstep: one batch bucket),
# pages of 32 tokens: the decode programs are those of 1, 2 and 3 pages per sequence.
ENGINE_KW = dict(num_pages=24, max_num_seqs=4, max_prefill_tokens=64, max_model_len=96,
                 max_loras=1, max_lora_rank=8)


def engine_greedy(t: Tiny, *, backend: str = "xla", dtype: str = "float32", tp: int = 1,
                  ep: int = 1, n: int = NUM_TOKENS, page_size: int = 32) -> dict:
    """n greedy tokens of every prompt, with and without the adapter, in one batch through the
    real engine. Returns {"base": [...], "lora": [...]} (one token list per prompt)."""
    from jaxserve.engine import EngineConfig, LLMEngine
    from jaxserve.sampling_params import SamplingParams
    eng = LLMEngine(EngineConfig(model=t.path, dtype=dtype, backend=backend, tp=tp, ep=ep,
                                 page_size=page_size, **ENGINE_KW))
    eng.add_lora("a", t.adapter_path)
    sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    reqs = {}
    for i, p in enumerate(t.prompts):
        for which, adapter in (("base", None), ("lora", "a")):
            eng.add_request(f"{which}{i}", p, sp, adapter=adapter)
            reqs[f"{which}{i}"] = (which, i)
    done = {}
    limit = 4 * len(reqs) * (n + 2)     # engine steps: a stuck loop fails instead of hanging
    for _ in range(limit):
        if not eng.has_unfinished():
            break
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o.token_ids
    else:
        raise RuntimeError(f"{t.kind}: unfinished after {limit} steps")
    out = {"base": [None] * len(t.prompts), "lora": [None] * len(t.prompts)}
    for rid, (which, i) in reqs.items():
        out[which][i] = list(done[rid])
    return out


def references(t: Tiny, n: int = NUM_TOKENS) -> dict:
    """HF's greedy tokens of every prompt for the base model and the PEFT model."""
    return {"base": [hf_greedy(t.hf, p, n) for p in t.prompts],
            "lora": [hf_greedy(t.peft, p, n) for p in t.prompts]}


# ----------------------------------------------------------------------------- tp / ep

# (tp, ep) runs of each kind. The tiny models have 8 q / 2 KV heads: tp 2 splits the KV heads,
# tp 4 replicates each over two devices. A dense family runs one of the two (between them the
# dense families run both; tests/test_tp_base.py runs Llama at 2, 4 and 8); a mixture of experts
# runs both, its experts split inside (tp 2, ep 1) and whole (tp 4, ep 4); tests/test_tp_moe.py
# runs tp 4 with ep 1 and tp 2 with ep 2.
PARALLEL_RUNS = {"llama": [(2, 1)], "qwen3": [(4, 1)], "gemma2": [(2, 1)], "gemma3": [(4, 1)],
                 "mixtral": [(2, 1), (4, 4)], "qwen3_moe": [(2, 1), (4, 4)]}


def parallel_runs(kind: str) -> list[tuple[int, int]]:
    return PARALLEL_RUNS[kind]


def start_tp(tinies: list[Tiny]) -> subprocess.Popen:
    """tests/family_tp_check.py on these checkpoints and adapters, one process for all of them
    (simulated 8-device CPU)."""
    jobs = [dict(kind=t.kind, path=t.path, adapter=t.adapter_path, prompts=t.prompts,
                 runs=[f"{tp}x{ep}" for tp, ep in parallel_runs(t.kind)]) for t in tinies]
    return subprocess.Popen([sys.executable, os.path.join(HERE, "family_tp_check.py"),
                             json.dumps(jobs)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


_TP_OUTPUT: dict = {}   # start_tp's process -> its JSON line, read when first asked


def tp_result(proc: subprocess.Popen, kind: str) -> dict:
    """That kind's runs from the process's output."""
    if proc not in _TP_OUTPUT:
        out, err = proc.communicate()
        assert proc.returncode == 0, err[-3000:]
        _TP_OUTPUT[proc] = json.loads(out.strip().splitlines()[-1])
    res = _TP_OUTPUT[proc][kind]
    assert "error" not in res, res["error"]
    return res
