"""Admission: the one place a request is checked before the engine takes it.

`admit` checks what the request itself says (the token ids, the adapter it names), resolves
`max_tokens` and the seed, builds the scheduler `Sequence` and hands it to `Scheduler.add`,
which owns the capacity facts (context length, KV and adapter pages, the policy's rate
limits). Sampling fields are checked where they are declared (`SamplingParams`), the chat
template where it is applied (`Tokenizer.chat`), the waiting-queue bound in the AsyncEngine.
All of them refuse with one error type, `AdmissionError`, whose `kind` the server turns into
an HTTP status (400 / 404 / 429).
"""
from __future__ import annotations

import random
from collections.abc import Container

from scheduler import RequestRejected, SamplingOptions, Scheduler, Sequence

INVALID = "invalid"      # the request is malformed or can never run (HTTP 400)
UNKNOWN = "unknown"      # it names an adapter that is not loaded (HTTP 404)
OVERLOAD = "overload"    # the same request may succeed later (HTTP 429)


class AdmissionError(ValueError):
    """A request (or adapter operation) the engine refuses; `param` and `code` are for API errors."""

    def __init__(self, message: str, *, kind: str = INVALID, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.param = param
        self.code = code


def check_prompt(prompt_ids, vocab_size: int) -> list[int]:
    """The prompt as a list of token ids in [0, vocab_size)."""
    if not isinstance(prompt_ids, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt_ids):
        raise AdmissionError("the prompt must be a list of token ids", param="prompt")
    if not prompt_ids:
        raise AdmissionError("the prompt is empty", param="prompt")
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise AdmissionError(f"token ids must be in [0, {vocab_size}), got {bad[:5]}",
                             param="prompt")
    return list(prompt_ids)


def admit(scheduler: Scheduler, prompt_ids, params, *, request_id: str, running: Container[str],
          seq_id: int, client_id: str, adapter: str | None, adapters: Container[str],
          vocab_size: int, max_model_len: int, rng: random.Random, now: float,
          cache_salt: str | None = None) -> Sequence:
    """Check a request, and add it to the scheduler as a new Sequence; or AdmissionError.
    `running`: the request ids in flight; `params.max_tokens=None` means the rest of the
    context; `cache_salt`: None or a non-empty string (prefix caching shares pages only
    between requests with the same salt)."""
    if request_id in running:
        raise AdmissionError(f"request id {request_id!r} is already running")
    ids = check_prompt(prompt_ids, vocab_size)
    if adapter is not None and adapter not in adapters:
        raise AdmissionError(f"unknown adapter {adapter!r}: the model does not exist (GET "
                             "/v1/models lists the base model and the loaded adapters)",
                             kind=UNKNOWN, param="model", code="model_not_found")
    if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
        raise AdmissionError("'cache_salt' must be a non-empty string if provided",
                             param="cache_salt")
    max_tokens = params.max_tokens
    if max_tokens is None:  # at least 1, so that a prompt filling the context is refused
        max_tokens = max(1, max_model_len - len(ids))
    seed = params.seed if params.seed is not None else rng.getrandbits(32)
    # top_k >= the vocabulary keeps every token: the same as off (0), and it then fits the
    # step's int32 arrays whatever the client sent (SamplingParams bounds it below only)
    top_k = 0 if params.top_k >= vocab_size else params.top_k
    seq = Sequence(seq_id=seq_id, prompt_token_ids=ids, max_tokens=max_tokens,
                   client_id=client_id, adapter=adapter, cache_salt=cache_salt,
                   arrival_time=now,
                   sampling=SamplingOptions(temperature=params.temperature, top_k=top_k,
                                            top_p=params.top_p, seed=seed & 0xFFFFFFFF,
                                            logprobs=params.logprobs))
    try:
        scheduler.add(seq, now)
    except RequestRejected as e:
        raise AdmissionError(str(e), kind=OVERLOAD if e.retryable else INVALID,
                             code=e.code or "request_rejected") from None
    return seq
