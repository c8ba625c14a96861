"""Per-request generation parameters (validated once, here, never mutated)."""
from __future__ import annotations

from dataclasses import dataclass

from jaxserve.admission import AdmissionError

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
# The full sampling set's limits (the device arrays are this wide: jaxserve/sampling.py)
MAX_TOP_LOGPROBS = 20      # alternatives per token (OpenAI's cap, vLLM's default max_logprobs)
MAX_LOGIT_BIAS = 300       # logit_bias entries (OpenAI's cap)
LOGIT_BIAS_LIMIT = 100.0   # biases are clamped to [-100, 100] (OpenAI's range; vLLM clamps)
MAX_BAD_WORDS = 32         # bad_words strings (each tokenized with and without a leading space)
MAX_BANS = 2 * MAX_BAD_WORDS   # sparse bans per row and step (more spill into the token mask)
PROMPT_BIT = 1 << 30       # in the device's penalty table: the token is in the prompt


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = 16       # None: the rest of the context (resolved at admission)
    temperature: float = 1.0          # 0 means greedy
    top_k: int = 0                    # 0 disables
    top_p: float = 1.0                # 1 disables
    seed: int | None = None           # same seed + same prompt -> same tokens, in any batch
    stop: tuple[str, ...] = ()        # stop strings (not included in the output text)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False            # return the log-probability of each chosen token
    include_stop_str_in_output: bool = False
    # The full sampling set (vLLM's semantics; applied on device, jaxserve/sampling.py)
    presence_penalty: float = 0.0     # [-2, 2]: minus this for each token already in the output
    frequency_penalty: float = 0.0    # [-2, 2]: minus this x the token's count in the output
    repetition_penalty: float = 1.0   # > 0: prompt + output tokens' logits / it (x it if < 0)
    logit_bias: dict | None = None    # token id -> bias added to its logit (clamped to +-100)
    min_p: float = 0.0                # [0, 1]: drop tokens under min_p x the top probability
    min_tokens: int = 0               # EOS and stop_token_ids banned until this many tokens
    bad_words: tuple[str, ...] = ()   # never generated (as vLLM: each word's last token banned
    #                                   where the tokens before it were just generated)
    allowed_token_ids: tuple[int, ...] | None = None   # only these tokens may be sampled
    top_logprobs: int = 0             # alternatives returned per output token (0..20)
    prompt_logprobs: int | None = None   # per prompt token: None = none, N = the chosen + N
    structured: object | None = None  # jaxserve.structured.Constraint: the token mask's grammar
    skip_special_tokens: bool = True  # False: special tokens are written in the output text
    spaces_between_special_tokens: bool = True   # honoured by slow (Python) tokenizers only

    def __post_init__(self):
        def bad(msg: str, param: str):
            raise AdmissionError(msg, param=param)
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or any(
                not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_CHARS for s in stop):
            bad(f"stop strings must have 1 to {MAX_STOP_CHARS} characters", "stop")
        if len(stop) > MAX_STOP_STRINGS:
            bad(f"at most {MAX_STOP_STRINGS} stop strings", "stop")
        object.__setattr__(self, "stop", tuple(stop))
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids must be non-negative integers", "stop_token_ids")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens")
        for name, lo, hi, lo_open in (("temperature", 0.0, 100.0, False),
                                      ("top_p", 0.0, 1.0, True)):
            v = getattr(self, name)
            if (not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi
                    or (lo_open and v == lo)):
                bad(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}", name)
        if not _is_int(self.top_k) or self.top_k < 0:
            bad(f"top_k must be an integer >= 0 (or -1 in the API), got {self.top_k!r}", "top_k")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < 2**63):
            bad(f"seed must be an integer in [0, 2**63), got {self.seed!r}", "seed")
        self._check_sampling_set(bad)

    def _check_sampling_set(self, bad) -> None:
        """The full sampling set's types and ranges (vLLM's); token ids are checked against the
        vocabulary at admission."""
        def number(name: str, lo: float, hi: float, lo_open: bool = False) -> None:
            v = getattr(self, name)
            if (not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi
                    or (lo_open and v == lo)):
                bad(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}", name)
        number("presence_penalty", -2.0, 2.0)
        number("frequency_penalty", -2.0, 2.0)
        number("repetition_penalty", 0.0, float("inf"), lo_open=True)
        number("min_p", 0.0, 1.0)
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            bad(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}", "min_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})",
                "min_tokens")
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            bad(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got "
                f"{self.top_logprobs!r}", "top_logprobs")
        if self.prompt_logprobs is not None and (
                not _is_int(self.prompt_logprobs)
                or not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS):
            bad(f"prompt_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got "
                f"{self.prompt_logprobs!r}", "prompt_logprobs")
        if self.logit_bias is not None:
            lb = self.logit_bias
            if not isinstance(lb, dict) or not all(
                    _is_int(k) and k >= 0 and isinstance(v, (int, float))
                    and not isinstance(v, bool) and v == v for k, v in lb.items()):
                bad("logit_bias must map token ids (integers >= 0) to numbers", "logit_bias")
            if len(lb) > MAX_LOGIT_BIAS:
                bad(f"logit_bias has {len(lb)} entries; at most {MAX_LOGIT_BIAS}", "logit_bias")
            object.__setattr__(self, "logit_bias", {
                int(k): max(-LOGIT_BIAS_LIMIT, min(LOGIT_BIAS_LIMIT, float(v)))
                for k, v in lb.items()} or None)
        words = (self.bad_words,) if isinstance(self.bad_words, str) else self.bad_words
        if not isinstance(words, (list, tuple)) or any(
                not isinstance(w, str) or not w.strip() for w in words):
            bad("bad_words must be a list of non-empty strings", "bad_words")
        if len(words) > MAX_BAD_WORDS:
            bad(f"at most {MAX_BAD_WORDS} bad_words", "bad_words")
        object.__setattr__(self, "bad_words", tuple(words))
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if not isinstance(ids, (list, tuple)) or not ids or not all(
                    _is_int(t) and t >= 0 for t in ids):
                bad("allowed_token_ids must be a non-empty list of token ids (integers >= 0)",
                    "allowed_token_ids")
            object.__setattr__(self, "allowed_token_ids", tuple(ids))

    @property
    def uses_penalties(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)
