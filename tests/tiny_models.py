"""Tiny random HF checkpoints built offline (transformers configs + save_pretrained)."""
from __future__ import annotations

import torch

KINDS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "mixtral", "qwen3_moe")

# Shared by every kind: GQA (8 query heads over 2 KV heads), 3 layers.
BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-5, tie_word_embeddings=False, head_dim=8)

# What each family adds. Gemma: a sliding window (5) shorter than the test prompts on some
# layers and full attention on the others, query_pre_attn_scalar != head_dim, untied embeddings
# (a tiny random Gemma with tied ones predicts its last token again and again: its embedding,
# scaled by sqrt(hidden), dominates the residual stream; greedy checks would be weak); Gemma 2
# soft caps low enough that tanh bends the values; Gemma 3 its two
# RoPE bases (the full layers' with linear scaling). MoE: 4 experts, top-2.
FAMILY = {
    "gemma2": dict(sliding_window=5, query_pre_attn_scalar=12, tie_word_embeddings=False,
                   attn_logit_softcapping=4.0, final_logit_softcapping=15.0,
                   hidden_activation="gelu_pytorch_tanh"),   # layers: sliding, full, sliding
    "gemma3": dict(sliding_window=5, query_pre_attn_scalar=12, tie_word_embeddings=False,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                   rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                       "rope_theta": 1_000_000.0},
                                    "sliding_attention": {"rope_type": "default",
                                                          "rope_theta": 10_000.0}}),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
}


def _classes(kind: str):
    import transformers as t
    return {"llama": (t.LlamaConfig, t.LlamaForCausalLM),
            "mistral": (t.MistralConfig, t.MistralForCausalLM),
            "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM),
            "qwen3": (t.Qwen3Config, t.Qwen3ForCausalLM),
            "gemma2": (t.Gemma2Config, t.Gemma2ForCausalLM),
            "gemma3": (t.Gemma3TextConfig, t.Gemma3ForCausalLM),
            "mixtral": (t.MixtralConfig, t.MixtralForCausalLM),
            "qwen3_moe": (t.Qwen3MoeConfig, t.Qwen3MoeForCausalLM)}[kind]


def make_hf_model(kind: str, path, seed: int = 0, **overrides):
    """Create a tiny random model of `kind` (KINDS) with GQA, save it to `path` as safetensors,
    and return the torch model (fp32, eval mode)."""
    cfg_cls, model_cls = _classes(kind)
    kw = dict(BASE, **FAMILY.get(kind, {}))
    kw.update(overrides)
    torch.manual_seed(seed)
    gemma = kind.startswith("gemma")
    if gemma:   # eager attention applies Gemma 2's soft cap
        kw.setdefault("attn_implementation", "eager")
    model = model_cls(cfg_cls(**kw)).eval()
    # Random init has tiny weights; scale them so logits are peaked and differences visible.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:     # Gemma's norms scale by (1 + w): w around 0
                p.copy_((0.0 if gemma else 1.0) + (0.2 if gemma else 0.1) * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    model.save_pretrained(path, safe_serialization=True)
    return model


def save_tokenizer(path, vocab_size: int = BASE["vocab_size"]):
    """A word-level tokenizer ("w0" .. "w{V-1}") beside a checkpoint, so the engine can load it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="w0", eos_token="w1",
                            unk_token="w2").save_pretrained(str(path))
