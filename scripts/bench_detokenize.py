"""Incremental detokenization cost per decode step: the windowed method vs the fast path.

The default model's tokenizer (SmolLM2, byte-level BPE). A batch of sequences, each a prompt
of real text followed by real text as output (English with accents, CJK, dashes), is
detokenized one token per sequence per step, as the output processor does: append the token,
call `step(all_ids)`, and `flush` at the end. Both methods run on the same ids in one run, and
their texts are checked equal; "loop only" is the same loop with a step that does nothing (the
harness's own share of each number). Prints, per batch and method, the time per decode step
(all sequences) and per token ("fast (cold table)": on a fresh table, whose entries are made as
token ids are first seen), and the byte table's cost on a fresh Tokenizer: its build, and
making every entry, for this tokenizer and for a synthetic byte-level BPE vocabulary of
--synthetic-vocab tokens (Qwen2's size by default); writes JSON (--out).

  python scripts/bench_detokenize.py                        # batch 64 and 256, 128 steps
  python scripts/bench_detokenize.py --batch 256 --steps 256 --out /tmp/detok.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

TEXT = ("The old lighthouse keeper climbed the spiral stairs every evening, counting the steps "
        "aloud: ninety-one, ninety-two. Outside, gulls wheeled over the harbour while fishing "
        "boats — red, blue, and one startling yellow — rocked at their moorings. Café owners "
        "stacked chairs; a radio played 1960s jazz. «Bonsoir», said someone. 東京 and 北京 are "
        "far away, he thought, lighting the lamp as the fog rolled in. 🌊 ")


def run_batch(make_detok, prompts, outputs) -> tuple[list[float], list[str]]:
    """Per-step wall times (s) of detokenizing one token for every sequence; the texts."""
    ids = [list(p) for p in prompts]
    dets = [make_detok(p) for p in prompts]
    texts = [[] for _ in prompts]
    step_times = []
    for step in range(len(outputs[0])):
        t0 = time.perf_counter()
        for i, det in enumerate(dets):
            seq = ids[i]
            seq.append(outputs[i][step])
            texts[i].append(det.step(seq))
        step_times.append(time.perf_counter() - t0)
    for i, det in enumerate(dets):
        texts[i].append(det.flush(ids[i]))
    return step_times, ["".join(t) for t in texts]


class NoopDetokenizer:
    def step(self, all_ids):
        return ""

    def flush(self, all_ids):
        return ""


def synthetic_byte_level(n: int, seed: int = 0):
    """A fast tokenizer with a ByteLevel decoder and `n` distinct tokens of 1-12 mapped bytes."""
    import random
    from tokenizers import Tokenizer as RustTokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    from jaxserve.tokenizer import _bytes_to_unicode
    alphabet = [chr(c) for c in _bytes_to_unicode().values()]
    rng = random.Random(seed)
    vocab = {c: i for i, c in enumerate(alphabet)}
    while len(vocab) < n:
        vocab.setdefault("".join(rng.choices(alphabet, k=rng.randint(2, 12))), len(vocab))
    rust = RustTokenizer(models.BPE(vocab=vocab, merges=[]))
    rust.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=rust)


def build_times(hf, repeats: int = 3) -> dict:
    """Cold builds of the byte table on fresh Tokenizers over `hf` (ms): the build itself, and
    making every entry (what looking up each token id once costs in all)."""
    from jaxserve.tokenizer import Tokenizer
    build, fill = [], []
    for _ in range(repeats):
        fresh = Tokenizer(hf, frozenset())
        t0 = time.perf_counter()
        table = fresh.byte_table()
        t1 = time.perf_counter()
        assert table is not None, "the fast path does not apply to this tokenizer"
        for i in range(len(hf)):
            table.piece(i)
        build.append(round((t1 - t0) * 1e3, 2))
        fill.append(round((time.perf_counter() - t1) * 1e3, 2))
    return {"vocab": len(hf), "build_ms": build, "all_entries_ms": fill}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    p.add_argument("--steps", type=int, default=128, help="output tokens per sequence")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--synthetic-vocab", type=int, default=151936, help="0: skip")
    p.add_argument("--out", default="bench_detokenize.json")
    args = p.parse_args(argv)
    from jaxserve.loader import default_model_path
    from jaxserve.tokenizer import (ByteDetokenizer, IncrementalDetokenizer, Tokenizer,
                                    eos_token_ids, load_tokenizer)
    path = default_model_path()
    hf = load_tokenizer(types.SimpleNamespace(tokenizer_dir=os.path.dirname(path),
                                              gguf_file=os.path.basename(path)))
    builds = [build_times(hf)]
    if args.synthetic_vocab:
        builds.append(build_times(synthetic_byte_level(args.synthetic_vocab)))
    tokenizer = Tokenizer(hf, eos_token_ids(hf))
    text_ids = tokenizer.encode(TEXT * (1 + (args.steps + args.prompt_len) // 40))
    n = len(text_ids)
    need = args.prompt_len + args.steps

    def seq(i):  # each sequence its own stretch of the text (wrapping round)
        s = (i * 37) % n
        return (text_ids * (2 + need // n))[s:s + need]

    methods = {"loop only": lambda p: NoopDetokenizer(),
               "windowed": lambda p: IncrementalDetokenizer(tokenizer, p),
               # A fresh table: entries are made as token ids are first seen.
               "fast (cold table)": None,
               "fast": tokenizer.detokenizer}
    rows = []
    for b in args.batch:
        seqs = [seq(i) for i in range(b)]
        prompts = [s[:args.prompt_len] for s in seqs]
        outputs = [s[args.prompt_len:] for s in seqs]
        assert isinstance(tokenizer.detokenizer(prompts[0]), ByteDetokenizer)
        texts = {}
        cold = Tokenizer(hf, frozenset())
        for name, make in methods.items():
            times, texts[name] = run_batch(make or cold.detokenizer, prompts, outputs)
            step_ms = statistics.median(times) * 1e3
            rows.append({"batch": b, "method": name, "steps": len(times),
                         "step_ms_median": round(step_ms, 4),
                         "step_ms_mean": round(statistics.fmean(times) * 1e3, 4),
                         "us_per_token": round(step_ms * 1e3 / b, 3)})
        assert texts["windowed"] == texts["fast"] == texts["fast (cold table)"], \
            "the methods' texts differ"
        old = rows[-3]
        for new in rows[-2:]:
            new["speedup"] = round(old["step_ms_median"] / new["step_ms_median"], 1)
    for b, name in zip(builds, [os.path.basename(path), "synthetic byte-level"]):
        print(f"byte table ({name}, vocab {b['vocab']}): build "
              f"{', '.join(map(str, b['build_ms']))} ms; every entry made "
              f"{', '.join(map(str, b['all_entries_ms']))} ms")
    print()
    print("| batch | method | ms per decode step (median) | mean | us per token | speedup |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['method']} | {r['step_ms_median']:.3f} | "
              f"{r['step_ms_mean']:.3f} | {r['us_per_token']:.2f} | "
              f"{r.get('speedup', '')} |")
    with open(args.out, "w") as f:
        json.dump({"tokenizer": os.path.basename(path), "vocab": len(hf),
                   "prompt_len": args.prompt_len, "table": builds,
                   "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
