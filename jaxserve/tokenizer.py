"""Tokenizer loading and incremental detokenization.

Incremental detokenization decodes a short window of tokens (a few tokens of context before
the new ones) so leading spaces come out right, and holds back text while the window ends in
an incomplete UTF-8 sequence (decoded as U+FFFD) until the next token completes it.
"""
from __future__ import annotations

import os

from jaxserve.loader import LoadedModel

CONTEXT_TOKENS = 5


def load_tokenizer(model: LoadedModel):
    from transformers import AutoTokenizer
    try:
        if model.gguf_file:
            return AutoTokenizer.from_pretrained(model.tokenizer_dir, gguf_file=model.gguf_file)
        return AutoTokenizer.from_pretrained(model.tokenizer_dir)
    except Exception as e:
        raise ValueError(f"cannot load a tokenizer from {model.tokenizer_dir}: {e}") from None


def eos_token_ids(tokenizer, model_dir: str | None = None) -> set[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = os.path.join(model_dir, "generation_config.json") if model_dir else None
    if gen_cfg and os.path.exists(gen_cfg):
        import json
        with open(gen_cfg) as f:
            eos = json.load(f).get("eos_token_id")
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(e) for e in eos)
    return ids


class IncrementalDetokenizer:
    """Feed it the full token list (prompt + output) after each new token; get text deltas."""

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.prefix_offset = max(0, len(prompt_ids) - CONTEXT_TOKENS)
        self.read_offset = len(prompt_ids)

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)

    def step(self, all_ids: list[int]) -> str:
        prefix_text = self._decode(all_ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(all_ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(all_ids)
            return delta
        return ""

    def flush(self, all_ids: list[int]) -> str:
        """At the end of a request: whatever is still held back (even an incomplete char)."""
        prefix_text = self._decode(all_ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(all_ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(all_ids)
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""
