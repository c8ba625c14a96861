"""The engine's side of structured output: each constrained request's matcher, its token mask
before every sampled token, and its advance after.

A constrained request's life (jaxserve/engine.py calls each step):
  1. `add_request`: `check` refuses an invalid constraint (AdmissionError naming the field),
     then, once the request is admitted, `add` starts its compilation (compiler.py).
  2. Each step that samples its next token: the engine has `prepare` make the step's masks
     at once (in parallel), then the step builder asks `mask(seq)` (the engine's
     `mask_provider`) for each row's bitmask, uint32 [ceil(V/32)], bit t % 32 of word t // 32
     set where token t is allowed: what the grammar accepts next, and the EOS tokens once it
     may end. The first call copies the compiled template (waiting for it if it is still
     compiling). The device applies the mask inside sampling (jaxserve/sampling.py).
  3. When the step's tokens are processed, `advance(seq, token)` feeds the matcher. A grammar
     that is complete allows only EOS, so the request ends with finish_reason "stop".
  4. `release` when the request ends (finished, aborted or failed).
A constrained row's next mask needs the token sampled before it, so a step holding a
constrained sequence is run synchronously (LLMEngine.step); steps of
unconstrained requests only stay overlapped.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from jaxserve.structured.compiler import GrammarCompiler
from jaxserve.structured.constraint import Constraint

log = logging.getLogger("jaxserve.structured")


class _State:
    """One request's matcher: a Future of the template until the first mask, then its copy."""
    __slots__ = ("future", "matcher", "error", "constraint")

    def __init__(self, future, constraint: Constraint):
        self.future, self.matcher, self.error, self.constraint = future, None, None, constraint


class StructuredOutputs:
    """Constrained sequences (by seq_id) for one engine. `vocab_size`: the logits' width."""

    def __init__(self, tokenizer, vocab_size: int, *, compiler: GrammarCompiler | None = None):
        self.vocab_size = vocab_size
        self.num_words = -(-vocab_size // 32)
        self.compiler = compiler or GrammarCompiler(tokenizer, vocab_size, tokenizer.eos_ids)
        self._states: dict[int, _State] = {}
        self._words = 0              # llguidance's mask width in words (>= num_words)
        self._ready: dict[int, np.ndarray] = {}   # seq_id -> its mask made by `prepare`
        self._pool = None            # llguidance's LLExecutor (its own threads), made on need
        self.wait_s = 0.0            # time steps spent waiting for compilations

    def check(self, c: Constraint) -> None:
        self.compiler.check(c)

    def add(self, seq, c: Constraint) -> None:
        self._states[seq.seq_id] = _State(self.compiler.submit(c), c)

    def release(self, seq_id: int) -> None:
        self._states.pop(seq_id, None)
        self._ready.pop(seq_id, None)

    def __len__(self) -> int:
        return len(self._states)

    def is_constrained(self, seq) -> bool:
        return seq.seq_id in self._states

    def any_constrained(self, seqs) -> bool:
        states = self._states
        return bool(states) and any(s.seq_id in states for s in seqs)

    def error(self, seq) -> str | None:
        """Why seq's grammar failed (its compilation, or a token it could not take), if it did."""
        st = self._states.get(seq.seq_id)
        return None if st is None else st.error

    def _matcher(self, st: _State):
        if st.matcher is None and st.error is None:
            t = time.perf_counter()
            try:
                st.matcher = st.future.result().deep_copy()
                if not self._words:
                    tok_words = -(-self.compiler.tokenizer().vocab_size // 32)
                    self._words = max(self.num_words, tok_words)
            except Exception as e:     # noqa: BLE001 - the request fails, not the engine
                st.error = f"the grammar of {st.constraint.param!r} did not compile: {e}"
                log.warning("%s", st.error)
            self.wait_s += time.perf_counter() - t
        return st.matcher

    def prepare(self, seqs) -> None:
        """Compute the masks of the constrained sequences among `seqs` (a step's) in one call,
        on llguidance's thread pool, for `mask` to hand out: one row's mask costs from ~10 µs
        to a few 100 µs (bounded strings make more lexer states), so a batch's masks are made
        in parallel rather than one by one as the step builder asks."""
        self._ready = {}
        todo = []
        for s in seqs:
            st = self._states.get(s.seq_id)
            m = None if st is None else self._matcher(st)
            if m is not None and not m.is_error():
                todo.append((s.seq_id, m))
        if len(todo) < 2:
            return
        if self._pool is None:
            import llguidance
            self._pool = llguidance.LLExecutor()
        buf = np.zeros((len(todo), self._words), np.uint32)
        self._pool.unsafe_compute_mask_ptr([(m, i) for i, (_, m) in enumerate(todo)],
                                           buf.ctypes.data, self._words * 4, len(todo))
        self._ready = {seq_id: buf[i] for i, (seq_id, _) in enumerate(todo)}

    def mask(self, seq) -> np.ndarray | None:
        """seq's allowed-token bitmask for its next token (uint32 [num_words]), or None when it
        is not constrained. A failed grammar allows nothing (the request is then failed)."""
        st = self._states.get(seq.seq_id)
        if st is None:
            return None
        m = self._matcher(st)
        out = self._ready.pop(seq.seq_id, None)
        if out is None:
            out = np.zeros((self._words if m is not None else self.num_words,), np.uint32)
            if m is not None and not m.is_error():
                m.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)
        row = out[:self.num_words]
        if m is not None and st.error is None and (m.is_error() or not row.any()):
            st.error = (f"structured output ({st.constraint.param}): "
                        f"{m.get_error() or 'no token of the vocabulary can continue the output'}")
        return row

    def advance(self, seq, token: int) -> bool:
        """Feed seq's sampled token to its matcher; False if the grammar did not accept it
        (the request must fail: the mask should have made that impossible)."""
        self._ready.pop(seq.seq_id, None)
        st = self._states.get(seq.seq_id)
        if st is None or st.matcher is None:
            return st is None
        if st.matcher.consume_token(token):
            return True
        st.error = (f"structured output ({st.constraint.param}): token {token} was not "
                    f"accepted: {st.matcher.get_error()}")
        return False

    def close(self) -> None:
        self.compiler.close()
