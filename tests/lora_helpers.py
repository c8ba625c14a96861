"""Tiny random Llama + PEFT adapters built offline, for the LoRA tests."""
from __future__ import annotations

import copy
import os

import numpy as np
import torch

VOCAB = 256


def make_base(path, seed: int = 0, **overrides):
    """A tiny GQA Llama (8 query heads, 2 KV heads) saved with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=8, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
              rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=1, bos_token_id=0)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    with torch.no_grad():   # peaked logits, so a wrong adapter changes greedy tokens
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    model.save_pretrained(path, safe_serialization=True)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="w0", eos_token="w1",
                            unk_token="w2").save_pretrained(path)
    return model


def make_adapter(base, path, seed: int, std: float = 0.3, **lora_kw):
    """get_peft_model on a copy of `base`; A and B random (PEFT's B starts at zero, which would
    make any adapter a no-op), saved with save_pretrained. Returns the fp32 PEFT model."""
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **lora_kw)
    model = get_peft_model(copy.deepcopy(base), cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std / p.shape[-1] ** 0.5)
    model.save_pretrained(path)
    return model.eval()


# Adapters of different ranks (8..128), target sets, scaling rules and layer selections.
ADAPTERS = {
    "qv8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "all16rs": dict(r=16, lora_alpha=8, target_modules="all-linear", use_rslora=True),
    "pattern": dict(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"],
                    rank_pattern={"k_proj": 32, "down_proj": 12}, alpha_pattern={"o_proj": 3},
                    layers_to_transform=[1]),
    "mlp128": dict(r=128, lora_alpha=64, target_modules=r".*\.mlp\.(gate|down)_proj"),
}


def make_adapters(base, root, names=None, seed0: int = 1):
    out = {}
    for i, name in enumerate(names or ADAPTERS):
        out[name] = make_adapter(base, os.path.join(root, name), seed=seed0 + i, **ADAPTERS[name])
    return out


def torch_greedy(model, prompt: list[int], n: int):
    """Greedy continuation and per-step log-softmax rows (fp32) under a torch model."""
    ids = torch.tensor([prompt])
    toks, rows = [], []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=ids).logits[0, -1].float()
            lp = torch.log_softmax(logits, -1)
            t = int(torch.argmax(logits))
            toks.append(t)
            rows.append(lp.numpy())
            ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
    return toks, np.stack(rows)


def prompts(n: int, seed: int = 0, lo: int = 5, hi: int = 20):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, VOCAB, rng.integers(lo, hi))] for _ in range(n)]
