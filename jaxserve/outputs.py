"""What the engine hands back per request per step."""
from __future__ import annotations

from dataclasses import dataclass

# error_code of a request whose logits went NaN or infinite (an adapter or an input driving
# the model out of float range); its request alone is finished
NON_FINITE_LOGITS = "non_finite_logits"


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]           # tokens produced since the last output for this request
    new_text: str                      # text delta since the last output (UTF-8 safe)
    text: str                          # all output text so far (stop strings removed)
    token_ids: list[int]               # all output tokens so far
    num_prompt_tokens: int
    finished: bool = False
    # "stop" | "length" | "abort" | "error" (None while running)
    finish_reason: str | None = None
    new_logprobs: list[float] | None = None  # log p of each new token, when requested
    # per new token, its top_logprobs most likely alternatives as (token id, log p), most
    # likely first, when requested (SamplingParams.top_logprobs > 0)
    new_top_logprobs: list[list[tuple[int, float]]] | None = None
    # With SamplingParams.prompt_logprobs, on the request's first output only: per prompt token
    # None for the first, then (log p of the token, its rank (1: most likely), [(token id, log
    # p)] of the prompt_logprobs most likely tokens at that position) (jaxserve/scoring.py)
    prompt_logprobs: list | None = None
    # With finish_reason "stop": the stop string or stop token id that ended it (None for EOS)
    stop_reason: int | str | None = None
    # With finish_reason "error": what went wrong for this request alone, and a code for it
    # (NON_FINITE_LOGITS); the text and tokens are what it had produced until then.
    error: str | None = None
    error_code: str | None = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids)
