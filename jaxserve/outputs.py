"""What the engine hands back per request per step."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]           # tokens produced since the last output for this request
    new_text: str                      # text delta since the last output (UTF-8 safe)
    text: str                          # all output text so far (stop strings removed)
    token_ids: list[int]               # all output tokens so far
    num_prompt_tokens: int
    finished: bool = False
    finish_reason: str | None = None   # "stop" | "length" | "abort" (None while running)
    new_logprobs: list[float] | None = None  # log p of each new token, when requested

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids)
