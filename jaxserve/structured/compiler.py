"""Grammar compilation for structured output, off the engine's step.

  1. `check(constraint)` runs on the engine thread at admission: the constraint's grammar is
     built and validated without the vocabulary (well under a millisecond for common
     schemas); an invalid schema, regex or grammar is an AdmissionError naming the request
     field. Results are remembered with the compiled grammars.
  2. `submit(constraint)` starts the compilation for this model's vocabulary on the
     compiler's own thread and returns a Future of a template matcher; requests with the same
     constraint share it (an LRU of `max_cached` constraints). The first submit also builds
     llguidance's view of the tokenizer there (~0.4 s at 49k tokens).
  3. Each request's matcher is a `deep_copy()` of its template (microseconds), made the first
     time the request needs a mask (jaxserve/structured/outputs.py): its prompt's prefill has
     run meanwhile, so the engine rarely waits for a compilation.
llguidance drops the GIL while it compiles, so the engine thread runs steps meanwhile.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading

from jaxserve.admission import AdmissionError
from jaxserve.structured.constraint import Constraint

log = logging.getLogger("jaxserve.structured")

MAX_CACHED = 256      # compiled constraints kept (template matchers, a few kB to MBs each)


def tokenizer_json(hf) -> str:
    """The tokenizer.json text of an HF fast tokenizer (what llguidance reads)."""
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"structured output needs a fast (Rust) tokenizer; "
                         f"{type(hf).__name__} is not one")
    return backend.to_str()


class GrammarCompiler:
    """Compiles Constraints for one tokenizer and vocabulary. `tokenizer`: a jaxserve Tokenizer
    or an HF fast tokenizer (read at the first compilation); `vocab_size`: the model's logits
    width (tokens the tokenizer does not have are never allowed); `eos_ids`: the tokens a
    finished grammar allows."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids, *, max_cached: int = MAX_CACHED):
        self._hf = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = sorted(int(t) for t in eos_ids)
        self.max_cached = max_cached
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar")
        self._tokenizer = None          # llguidance's LLTokenizer, made on first need
        self._tokenizer_lock = threading.Lock()
        self._compiled: collections.OrderedDict = collections.OrderedDict()  # -> Future
        self._checked: collections.OrderedDict = collections.OrderedDict()   # -> error or ""
        self.num_compiled = 0

    def tokenizer(self):
        """llguidance's LLTokenizer, built once (~0.4 s at 49k tokens, ~1 s at 128k) by the
        first constrained request's check; ValueError if llguidance cannot read the tokenizer
        (one without a byte-level or SentencePiece decoder, as a word-level one)."""
        with self._tokenizer_lock:
            if self._tokenizer is None:
                try:
                    import llguidance
                    hf = getattr(self._hf, "hf", self._hf)
                    self._tokenizer = llguidance.LLTokenizer(
                        tokenizer_json(hf), n_vocab=max(self.vocab_size, len(hf)),
                        eos_token=self.eos_ids or None)
                except Exception as e:   # noqa: BLE001 - any failure means: not available
                    self._tokenizer = ValueError(f"llguidance cannot use this model's "
                                                 f"tokenizer: {e}")
            if isinstance(self._tokenizer, Exception):
                raise self._tokenizer
            return self._tokenizer

    def check(self, c: Constraint) -> None:
        """Raise AdmissionError (naming c.param) if c's grammar is invalid, or if llguidance
        cannot read this model's tokenizer."""
        try:
            self.tokenizer()
        except ValueError as e:
            raise AdmissionError(f"structured output ('{c.param}') is not available for this "
                                 f"model: {e}", param=c.param,
                                 code="structured_output_unavailable") from None
        with self._lock:
            err = self._checked.get(c)
            if err is not None:
                self._checked.move_to_end(c)
        if err is None:
            from llguidance import LLMatcher
            grammar = c.to_llguidance()
            err = LLMatcher.validate_grammar(grammar)
            with self._lock:
                self._checked[c] = err
                while len(self._checked) > self.max_cached:
                    self._checked.popitem(last=False)
        if err:
            raise AdmissionError(f"invalid {c.kind.replace('_', ' ')} in '{c.param}': {err}",
                                 param=c.param, code="invalid_structured_output")

    def submit(self, c: Constraint) -> concurrent.futures.Future:
        """A Future of c's template matcher (an LLMatcher at the grammar's start; copy it per
        request). Compiled once per constraint while it stays in the cache."""
        with self._lock:
            fut = self._compiled.get(c)
            if fut is not None:
                self._compiled.move_to_end(c)
                return fut
            fut = self._pool.submit(self._compile, c)
            self._compiled[c] = fut
            while len(self._compiled) > self.max_cached:
                self._compiled.popitem(last=False)
        return fut

    def _compile(self, c: Constraint):
        from llguidance import LLMatcher
        tok = self.tokenizer()
        m = LLMatcher(tok, c.to_llguidance(), log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        self.num_compiled += 1
        log.debug("compiled %s", c.describe())
        return m

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
