"""Text <-> token ids: the one owner of encoding, the chat template, EOS ids and decoding.

The server tokenizes once (its own copy, `Tokenizer.copy`, on the event loop) and hands token
ids to the engine; the engine's output processor detokenizes with `IncrementalDetokenizer`.

Incremental detokenization decodes a short window of tokens (a few tokens of context before
the new ones) so leading spaces come out right, and holds back text while the window ends in
an incomplete UTF-8 sequence (decoded as U+FFFD) until the next token completes it.
"""
from __future__ import annotations

import copy
import json
import os

from jaxserve.admission import AdmissionError

CONTEXT_TOKENS = 5


def load_tokenizer(model):
    """The HF tokenizer of a LoadedModel (its directory, or its GGUF file)."""
    from transformers import AutoTokenizer
    try:
        if model.gguf_file:
            return AutoTokenizer.from_pretrained(model.tokenizer_dir, gguf_file=model.gguf_file)
        return AutoTokenizer.from_pretrained(model.tokenizer_dir)
    except Exception as e:
        raise ValueError(f"cannot load a tokenizer from {model.tokenizer_dir}: {e}") from None


def eos_token_ids(hf, model_dir: str | None = None) -> frozenset[int]:
    """The tokenizer's EOS id plus generation_config.json's eos_token_id(s)."""
    ids = set()
    if hf.eos_token_id is not None:
        ids.add(int(hf.eos_token_id))
    gen_cfg = os.path.join(model_dir, "generation_config.json") if model_dir else None
    if gen_cfg and os.path.exists(gen_cfg):
        with open(gen_cfg) as f:
            eos = json.load(f).get("eos_token_id")
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(e) for e in eos)
    return frozenset(ids)


class Tokenizer:
    """Wraps an HF-style tokenizer (`__call__(text)["input_ids"]`, `apply_chat_template`,
    `decode`). Not thread-safe: each thread that tokenizes uses its own `copy()`."""

    def __init__(self, hf, eos_ids: frozenset[int]):
        self.hf = hf
        self.eos_ids = frozenset(eos_ids)

    @classmethod
    def from_model(cls, model) -> "Tokenizer":
        hf = load_tokenizer(model)
        return cls(hf, eos_token_ids(hf, None if model.gguf_file else model.tokenizer_dir))

    def copy(self) -> "Tokenizer":
        return Tokenizer(copy.deepcopy(self.hf), self.eos_ids)

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text)["input_ids"])

    def chat(self, messages: list[dict]) -> list[int]:
        """Token ids of `messages` under the model's chat template, with the generation prompt."""
        if not getattr(self.hf, "chat_template", None):
            raise AdmissionError("this model has no chat template; use /v1/completions",
                                 param="messages")
        try:
            ids = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # the template raises on shapes it does not accept
            raise AdmissionError(f"the chat template rejected these messages: {e}",
                                 param="messages") from None
        if hasattr(ids, "keys"):  # transformers may return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens,
                              clean_up_tokenization_spaces=False)

    def detokenizer(self, prompt_ids: list[int]) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, prompt_ids)


class IncrementalDetokenizer:
    """Feed it the full token list (prompt + output) after each new token; get text deltas."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.prefix_offset = max(0, len(prompt_ids) - CONTEXT_TOKENS)
        self.read_offset = len(prompt_ids)

    def step(self, all_ids: list[int]) -> str:
        decode = self.tokenizer.decode
        prefix_text = decode(all_ids[self.prefix_offset:self.read_offset])
        new_text = decode(all_ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(all_ids)
            return delta
        return ""

    def flush(self, all_ids: list[int]) -> str:
        """At the end of a request: whatever is still held back (even an incomplete char)."""
        decode = self.tokenizer.decode
        prefix_text = decode(all_ids[self.prefix_offset:self.read_offset])
        new_text = decode(all_ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(all_ids)
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""
