"""Write a random-weight HF Llama checkpoint (safetensors), one tensor at a time.

    python scripts/make_synthetic_checkpoint.py OUT_DIR [--preset 1b|llama3-8b|tiny]
        [--dtype bfloat16|float16|float32] [--shard-gb 2] [--seed 0] [--std 0.02]
        [--config-only] [--tokenizer DIR]

Writes config.json, model-0000i-of-0000n.safetensors shards of at most --shard-gb each and
model.safetensors.index.json, the layout `save_pretrained` writes. Each tensor is generated,
written and dropped before the next, so host memory holds one tensor (the largest: the
embedding), never the model. --config-only writes config.json alone (what
`--load-format dummy` needs); --tokenizer copies a tokenizer's files (tokenizer.json,
tokenizer_config.json, special_tokens_map.json, ...) from DIR so the engine can start on it.

Presets (Llama shapes):
  tiny       hidden 64, 2 layers, 4 q / 2 KV heads, vocab 512 (tests)
  1b         hidden 2048, 16 layers, MLP 8192, 32 q / 8 KV heads, vocab 32000 (~1.1B params,
             2.2 GB in bf16): the loading benchmark's checkpoint
  llama3-8b  Llama-3-8B exactly: hidden 4096, 32 layers, MLP 14336, 32 q / 8 KV heads,
             vocab 128256, RoPE theta 500000 with llama3 scaling
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys

import numpy as np

PRESETS = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                 max_position_embeddings=512),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
               max_position_embeddings=4096),
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=8192, rope_theta=500000.0,
                      rope_scaling={"factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192,
                                    "rope_type": "llama3"},
                      bos_token_id=128000, eos_token_id=128001),
}

# safetensors dtype names; bfloat16 through ml_dtypes (a JAX dependency)
DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json", "vocab.json", "merges.txt")


def hf_config(preset: str, dtype: str) -> dict:
    c = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
             rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
             attention_bias=False, mlp_bias=False, torch_dtype=dtype, bos_token_id=1,
             eos_token_id=2)
    c.update(PRESETS[preset])
    c["head_dim"] = c["hidden_size"] // c["num_attention_heads"]
    return c


def tensor_specs(c: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape in the checkpoint's [out, in] layout, init) in save_pretrained's order."""
    H, I, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    D = c["head_dim"]
    q, kv = c["num_attention_heads"] * D, c["num_key_value_heads"] * D
    out = [("model.embed_tokens.weight", (V, H), "normal")]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [(f"{p}.input_layernorm.weight", (H,), "ones"),
                (f"{p}.self_attn.q_proj.weight", (q, H), "normal"),
                (f"{p}.self_attn.k_proj.weight", (kv, H), "normal"),
                (f"{p}.self_attn.v_proj.weight", (kv, H), "normal"),
                (f"{p}.self_attn.o_proj.weight", (H, q), "normal"),
                (f"{p}.post_attention_layernorm.weight", (H,), "ones"),
                (f"{p}.mlp.gate_proj.weight", (I, H), "normal"),
                (f"{p}.mlp.up_proj.weight", (I, H), "normal"),
                (f"{p}.mlp.down_proj.weight", (H, I), "normal")]
    out += [("model.norm.weight", (H,), "ones")]
    if not c.get("tie_word_embeddings"):
        out += [("lm_head.weight", (V, H), "normal")]
    return out


def _np_dtype(dtype: str):
    if dtype == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def plan_shards(specs, itemsize: int, shard_bytes: int) -> list[list]:
    """Consecutive tensors grouped into files of at most shard_bytes (a bigger tensor alone)."""
    shards, cur, size = [], [], 0
    for name, shape, init in specs:
        n = int(np.prod(shape)) * itemsize
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape, init))
        size += n
    if cur:
        shards.append(cur)
    return shards


def write_shard(path: str, tensors, dtype: str, rng, std: float) -> int:
    """One safetensors file written header first, then each tensor as it is generated."""
    npd = _np_dtype(dtype)
    header, offset = {}, 0
    for name, shape, _ in tensors:
        n = int(np.prod(shape)) * npd.itemsize
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)                      # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, shape, init in tensors:
            if init == "ones":
                a = np.ones(shape, npd)
            else:
                a = rng.standard_normal(shape, dtype=np.float32)
                a *= std
                a = a.astype(npd)
            f.write(a.tobytes())
            del a
    return offset


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--preset", default="1b", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--std", type=float, default=0.02)
    ap.add_argument("--config-only", action="store_true",
                    help="write config.json only (for --load-format dummy)")
    ap.add_argument("--tokenizer", default=None, help="copy tokenizer files from this directory")
    args = ap.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    c = hf_config(args.preset, args.dtype)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    if args.tokenizer:
        copied = [n for n in TOKENIZER_FILES if os.path.exists(os.path.join(args.tokenizer, n))]
        if not copied:
            print(f"error: no tokenizer files in {args.tokenizer}", file=sys.stderr)
            return 2
        for n in copied:
            shutil.copy(os.path.join(args.tokenizer, n), os.path.join(args.out, n))
    if args.config_only:
        print(f"wrote {args.out}/config.json ({args.preset})")
        return 0

    specs = tensor_specs(c)
    itemsize = _np_dtype(args.dtype).itemsize
    shards = plan_shards(specs, itemsize, int(args.shard_gb * 2**30))
    rng = np.random.default_rng(args.seed)
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_shard(os.path.join(args.out, fname), tensors, args.dtype, rng, args.std)
        weight_map.update((name, fname) for name, _, _ in tensors)
        print(f"wrote {fname} ({len(tensors)} tensors)", flush=True)
    with open(os.path.join(args.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    n_params = sum(int(np.prod(s)) for _, s, _ in specs)
    print(f"{args.out}: {args.preset}, {n_params / 1e9:.2f}B params, {total / 2**30:.2f} GiB "
          f"{args.dtype} in {len(shards)} shard(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
