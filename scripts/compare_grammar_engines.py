"""Grammar engines for structured output compared: llguidance, xgrammar, outlines-core.

For each engine and tokenizer: the time to compile a JSON schema for the vocabulary, and the
time to compute one token mask (the host work a constrained row adds to every decode step),
walking valid JSON documents of the schema token by token and timing the mask before each
token; with --walks, also random walks (each token drawn from the mask, as a random model
would) under scripts/bench_sampling.py's schema, whose strings are length-bounded.
docs/structured_output.md has the results and the commands.

Runs in a scratch virtual environment holding the three engines (xgrammar pulls in torch,
which the server must not need), e.g.:

  python -m venv /work/peers/grammar-venv
  /work/peers/grammar-venv/bin/pip install llguidance xgrammar outlines-core tokenizers numpy
  /work/peers/grammar-venv/bin/python scripts/compare_grammar_engines.py \
      --tokenizer /work/peers/smollm2-hf/tokenizer.json --build-128k /work/peers/tok128k

--build-128k DIR trains a byte-level BPE of 128,256 tokens (Llama 3's size) on the Python
sources of the running environment, once (offline; kept in DIR), and measures it as well.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import statistics
import sys
import time

import numpy as np

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "address": {"type": "object", "properties": {
            "street": {"type": "string"}, "city": {"type": "string"},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "zip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "scores": {"type": "array", "items": {"type": "number"}},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "role", "address", "tags", "scores", "active"],
    "additionalProperties": False,
}

WORDS = ("alpha beta gamma delta river stone cloud maple harbor silver quiet north garden "
         "engine paper window bright orange simple pattern").split()


def documents(n: int, seed: int = 0) -> list[str]:
    """n compact JSON documents valid under SCHEMA (keys in the schema's order)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        w = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))
        doc = {"name": w(2).title(), "age": rng.randint(0, 99),
               "email": f"{rng.choice(WORDS)}.{rng.choice(WORDS)}@example.com",
               "role": rng.choice(["admin", "editor", "viewer"]),
               "address": {"street": f"{rng.randint(1, 999)} {w(1).title()} Street",
                           "city": w(1).title(), "zip": f"{rng.randint(0, 99999):05d}"},
               "tags": [rng.choice(WORDS) for _ in range(rng.randint(0, 4))],
               "scores": [round(rng.uniform(0, 100), 2) for _ in range(rng.randint(0, 3))],
               "active": rng.random() < 0.5}
        docs.append(json.dumps(doc, separators=(",", ":")))
    return docs


def build_128k(out_dir: str, vocab_size: int = 128256) -> str:
    """A byte-level BPE tokenizer of vocab_size tokens trained on this environment's Python
    sources (its tokenizer.json in out_dir; reused when present)."""
    path = os.path.join(out_dir, "tokenizer.json")
    if os.path.exists(path):
        return path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    files = sorted(glob.glob(os.path.join(sys.prefix, "lib", "python3*", "site-packages", "**",
                                          "*.py"), recursive=True))

    def corpus(limit=120 << 20):
        total = 0
        for f in files:
            try:
                text = open(f, encoding="utf-8").read()
            except (OSError, UnicodeDecodeError):
                continue
            total += len(text)
            yield text
            if total > limit:
                return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, min_frequency=2,
                                  special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t = time.perf_counter()
    tok.train_from_iterator(corpus(), trainer)
    # Few corpora fill 128k merges; pad with added tokens so the vocabulary (and mask) is full.
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:
        tok.add_tokens([f"<pad_{i}>" for i in range(missing)])
    os.makedirs(out_dir, exist_ok=True)
    tok.save(path)
    print(f"trained {tok.get_vocab_size()}-token BPE in {time.perf_counter() - t:.0f}s "
          f"({missing} padding tokens added)", file=sys.stderr)
    return path


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the unicode character standing for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tok_json: dict) -> dict[int, bytes]:
    """id -> the bytes a byte-level BPE token stands for (added tokens as their text)."""
    dec = _byte_decoder()
    out = {i: bytes(dec[c] for c in s) for s, i in tok_json["model"]["vocab"].items()}
    for t in tok_json.get("added_tokens", []):
        out[t["id"]] = t["content"].encode()
    return out


class Engine:
    name = ""

    def compile(self, schema: str): ...
    def matcher(self, compiled): ...
    def mask(self, m) -> None: ...
    def accept(self, m, token: int) -> bool: ...


class LLGuidance(Engine):
    name = "llguidance"

    def __init__(self, tok_path: str, vocab: int, eos: int):
        import llguidance
        self.ll = llguidance
        self.tok = llguidance.LLTokenizer(open(tok_path).read(), n_vocab=vocab, eos_token=eos)
        self.buf = np.zeros(((vocab + 31) // 32,), np.int32)

    def compile(self, schema):
        m = self.ll.LLMatcher(self.tok, self.ll.LLMatcher.grammar_from_json_schema(schema))
        assert not m.is_error(), m.get_error()
        return m

    def matcher(self, compiled):
        return compiled.deep_copy()

    def mask(self, m):
        m.unsafe_compute_mask_ptr(self.buf.ctypes.data, self.buf.nbytes)

    def accept(self, m, token):
        return m.consume_token(token)


class XGrammar(Engine):
    name = "xgrammar"

    def __init__(self, tok_path: str, vocab: int, eos: int):
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast
        self.xgr = xgr
        hf = PreTrainedTokenizerFast(tokenizer_file=tok_path)
        self.info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[eos])
        self.compiler = xgr.GrammarCompiler(self.info, cache_enabled=False)
        self.buf = xgr.allocate_token_bitmask(1, vocab)

    def compile(self, schema):
        return self.compiler.compile_json_schema(schema)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def mask(self, m):
        m.fill_next_token_bitmask(self.buf)

    def accept(self, m, token):
        return m.accept_token(token)


class OutlinesCore(Engine):
    name = "outlines-core"

    def __init__(self, tok_path: str, vocab: int, eos: int):
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema
        self.Guide, self.Index, self.regex = Guide, Index, build_regex_from_schema
        by_bytes: dict[bytes, list[int]] = {}
        for i, b in token_bytes(json.load(open(tok_path))).items():
            if i != eos and i < vocab:
                by_bytes.setdefault(b, []).append(i)
        self.vocab, self.eos = Vocabulary(eos, by_bytes), eos
        self.buf = np.zeros(((vocab + 31) // 32,), np.int32)

    def compile(self, schema):
        return self.Index(self.regex(schema), self.vocab)

    def matcher(self, compiled):
        return self.Guide(compiled)

    def mask(self, m):
        m.write_mask_into(self.buf.ctypes.data, self.buf.size, 4)

    def accept(self, m, token):
        if token == self.eos:       # the guide has no transition for EOS: it is done or not
            return m.is_finished()
        m.advance(token, return_tokens=False)
        return True


def measure(engine: Engine, hf_tok, docs: list[str], eos: int, repeats: int) -> dict:
    schema = json.dumps(SCHEMA)
    t = time.perf_counter()
    compiled = engine.compile(schema)
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        for doc in docs:
            m = engine.matcher(compiled)
            for token in hf_tok.encode(doc).ids + [eos]:
                t = time.perf_counter()
                engine.mask(m)
                times.append(time.perf_counter() - t)
                if not engine.accept(m, token):
                    raise RuntimeError(f"{engine.name} refused token {token} in {doc!r}")
    times.sort()
    return {"compile_ms": compile_s * 1e3, "tokens": len(times),
            "mask_us_mean": statistics.fmean(times) * 1e6,
            "mask_us_p50": times[len(times) // 2] * 1e6,
            "mask_us_p99": times[int(len(times) * 0.99)] * 1e6}


def allowed_ids(buf) -> np.ndarray:
    """Token ids whose bit is set in a bitmask (numpy, or a torch tensor: xgrammar's)."""
    words = np.ascontiguousarray(buf.numpy() if hasattr(buf, "numpy") else buf).reshape(-1)
    return np.nonzero(np.unpackbits(words.view(np.uint8), bitorder="little"))[0]


def walk(engine: Engine, schema: dict, walks: int, length: int, seed: int = 0) -> dict:
    """What a random model costs: `walks` walks of `length` tokens, each token drawn uniformly
    from the mask (so strings fill with arbitrary characters up to their bounds)."""
    rng = random.Random(seed)
    t = time.perf_counter()
    compiled = engine.compile(json.dumps(schema))
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(walks):
        m = engine.matcher(compiled)
        for _ in range(length):
            t = time.perf_counter()
            engine.mask(m)
            times.append(time.perf_counter() - t)
            ids = allowed_ids(engine.buf)
            if not len(ids) or not engine.accept(m, int(rng.choice(ids))):
                break
    times.sort()
    return {"compile_ms": compile_s * 1e3, "tokens": len(times),
            "mask_us_mean": statistics.fmean(times) * 1e6,
            "mask_us_p50": times[len(times) // 2] * 1e6,
            "mask_us_p99": times[int(len(times) * 0.99)] * 1e6}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", action="append", default=[],
                    help="a tokenizer.json (repeatable)")
    ap.add_argument("--build-128k", metavar="DIR", help="train (once) and add a 128k BPE")
    ap.add_argument("--engines", default="llguidance,xgrammar,outlines-core")
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--walks", type=int, default=0,
                    help="also: this many random walks of 128 tokens under scripts/"
                         "bench_sampling.py's schema (bounded strings)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    from tokenizers import Tokenizer
    paths = list(args.tokenizer) + ([build_128k(args.build_128k)] if args.build_128k else [])
    classes = {c.name: c for c in (LLGuidance, XGrammar, OutlinesCore)}
    rows = []
    for path in paths:
        hf = Tokenizer.from_file(path)
        vocab = hf.get_vocab_size()
        eos = next((hf.token_to_id(t) for t in ("<|endoftext|>", "<|im_end|>", "</s>")
                    if hf.token_to_id(t) is not None), 0)
        for name in args.engines.split(","):
            t = time.perf_counter()
            engine = classes[name](path, vocab, eos)
            setup = time.perf_counter() - t
            r = measure(engine, hf, documents(args.docs), eos, args.repeats)
            r.update(engine=name, vocab=vocab, tokenizer_setup_ms=setup * 1e3)
            rows.append(r)
            runs = [("documents", r)]
            if args.walks:
                from bench_sampling import SCHEMA as BENCH_SCHEMA
                w = walk(engine, BENCH_SCHEMA, args.walks, 128)
                w.update(engine=name, vocab=vocab, mode="walk")
                rows.append(w)
                runs.append(("random walk", w))
            for what, x in runs:
                print(f"{name:14s} vocab {vocab:6d} {what:11s} tokenizer setup "
                      f"{setup * 1e3:7.1f} ms  compile {x['compile_ms']:8.1f} ms  mask mean "
                      f"{x['mask_us_mean']:7.1f} us  p50 {x['mask_us_p50']:7.1f} us  p99 "
                      f"{x['mask_us_p99']:7.1f} us  ({x['tokens']} masks)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
