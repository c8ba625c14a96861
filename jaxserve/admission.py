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


def _encode_plain(tokenizer, text: str) -> list[int]:
    """Token ids of text without special tokens (BOS) added."""
    hf = getattr(tokenizer, "hf", tokenizer)
    try:
        return list(hf(text, add_special_tokens=False)["input_ids"])
    except TypeError:    # a tokenizer without the option adds none
        return list(hf(text)["input_ids"])


def bad_words_ids(tokenizer, words) -> list[list[int]]:
    """Each bad word as token sequences, as vLLM tokenizes them: the word as written (leading
    spaces stripped) and, where that gives a different first token of the same length, with
    one leading space (a word in mid-text)."""
    out: list[list[int]] = []
    for word in words:
        plain = _encode_plain(tokenizer, word.lstrip())
        if plain:
            out.append(plain)
        spaced = _encode_plain(tokenizer, " " + word.lstrip())
        if spaced and plain and spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(spaced)
    return out


def sampling_options(params, seed: int, vocab_size: int, tokenizer=None) -> SamplingOptions:
    """What the device needs of `params`; token ids outside the vocabulary are refused."""
    def check_ids(ids, param: str) -> None:
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise AdmissionError(f"{param}: token ids must be in [0, {vocab_size}), got "
                                 f"{bad[:5]}", param=param)
    get = lambda name, default: getattr(params, name, default)   # noqa: E731
    bias = tuple(sorted((get("logit_bias", None) or {}).items()))
    check_ids([t for t, _ in bias], "logit_bias")
    allowed = get("allowed_token_ids", None)
    if allowed is not None:
        check_ids(allowed, "allowed_token_ids")
        allowed = tuple(sorted(set(allowed)))
    words = ()
    if get("bad_words", ()):
        if tokenizer is None:
            raise AdmissionError("bad_words needs the engine's tokenizer", param="bad_words")
        words = tuple(tuple(w) for w in bad_words_ids(tokenizer, params.bad_words))
        check_ids([t for w in words for t in w], "bad_words")
    min_tokens = get("min_tokens", 0)
    ban = set(params.stop_token_ids)
    if not params.ignore_eos and tokenizer is not None:
        ban |= set(tokenizer.eos_ids)
    # top_k >= the vocabulary keeps every token: the same as off (0), and it then fits the
    # step's int32 arrays whatever the client sent (SamplingParams bounds it below only)
    top_k = 0 if params.top_k >= vocab_size else params.top_k
    return SamplingOptions(
        temperature=params.temperature, top_k=top_k, top_p=params.top_p,
        seed=seed & 0xFFFFFFFF, logprobs=params.logprobs,
        top_logprobs=get("top_logprobs", 0), min_p=get("min_p", 0.0),
        presence_penalty=get("presence_penalty", 0.0),
        frequency_penalty=get("frequency_penalty", 0.0),
        repetition_penalty=get("repetition_penalty", 1.0), logit_bias=bias,
        min_tokens=min_tokens,
        min_tokens_ban=tuple(sorted(t for t in ban if 0 <= t < vocab_size)) if min_tokens else (),
        bad_words=words, allowed_token_ids=allowed)


def admit(scheduler: Scheduler, prompt_ids, params, *, request_id: str, running: Container[str],
          seq_id: int, client_id: str, adapter: str | None, adapters: Container[str],
          vocab_size: int, max_model_len: int, rng: random.Random, now: float,
          cache_salt: str | None = None, tokenizer=None) -> Sequence:
    """Check a request, and add it to the scheduler as a new Sequence; or AdmissionError.
    `running`: the request ids in flight; `params.max_tokens=None` means the rest of the
    context; `cache_salt`: None or a non-empty string (prefix caching shares pages only
    between requests with the same salt); `tokenizer`: the engine's (bad words are tokenized
    with it, min_tokens bans its EOS ids)."""
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
    seq = Sequence(seq_id=seq_id, prompt_token_ids=ids, max_tokens=max_tokens,
                   client_id=client_id, adapter=adapter, cache_salt=cache_salt,
                   arrival_time=now,
                   sampling=sampling_options(params, seed, vocab_size, tokenizer))
    try:
        scheduler.add(seq, now)
    except RequestRejected as e:
        raise AdmissionError(str(e), kind=OVERLOAD if e.retryable else INVALID,
                             code=e.code or "request_rejected") from None
    return seq
