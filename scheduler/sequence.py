"""Host-side state of one request as it moves through the scheduler."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class SequenceStatus(enum.Enum):
    WAITING = "waiting"      # in the policy's queue (new, or preempted and re-queued)
    RUNNING = "running"      # holds pages; prefilling (num_computed < len(token_ids)) or decoding
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"            # EOS, stop token or stop string
    LENGTH = "length"        # max_tokens or the context limit
    ABORT = "abort"          # client went away or request cancelled
    REJECTED = "rejected"    # never admitted (policy refused it)


@dataclass(frozen=True)
class SamplingOptions:
    """What the device needs to sample a sequence's next token (the engine resolves the seed)."""
    temperature: float = 0.0      # 0 means greedy
    top_k: int = 0                # 0 disables
    top_p: float = 1.0            # 1 disables
    seed: int = 0                 # with the output position: the sampling key of each token
    logprobs: bool = False        # return the chosen token's log-probability
    # The full sampling set (jaxserve/sampling.py applies it; token ids checked at admission)
    top_logprobs: int = 0         # alternatives returned per token (0..20)
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, bias), clamped
    min_tokens: int = 0
    min_tokens_ban: tuple[int, ...] = ()   # banned while fewer than min_tokens: EOS + stop ids
    bad_words: tuple[tuple[int, ...], ...] = ()    # token sequences never to complete
    allowed_token_ids: tuple[int, ...] | None = None
    # derived once (the step builder reads them per row and step)
    uses_penalties: bool = field(init=False, repr=False, compare=False)
    has_bans: bool = field(init=False, repr=False, compare=False)   # min_tokens, bad words,
    #                                                                 allowed ids

    def __post_init__(self):
        object.__setattr__(self, "uses_penalties", self.presence_penalty != 0
                           or self.frequency_penalty != 0 or self.repetition_penalty != 1)
        object.__setattr__(self, "has_bans", bool((self.min_tokens and self.min_tokens_ban)
                                                  or self.bad_words
                                                  or self.allowed_token_ids is not None))


@dataclass(eq=False)
class Sequence:
    seq_id: int
    prompt_token_ids: list[int]
    max_tokens: int
    client_id: str = "anonymous"
    adapter: str | None = None           # LoRA adapter name; None = base model
    cache_salt: str | None = None        # prefix caching: only requests with the same salt share
    arrival_time: float = 0.0
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    block_table: list[int] = field(default_factory=list)  # page ids, in position order
    # tokens whose K/V are in the pool or being written by a planned step (advanced when a
    # step is planned, so the next step can be planned before this one's tokens are known)
    num_computed_tokens: int = 0
    # tokens sampled by planned steps whose ids the host does not know yet (the engine plans
    # step N+1 while step N runs: N's token is the input of N+1's decode, taken on the device)
    num_pending_tokens: int = 0
    num_preemptions: int = 0
    # the data-parallel replica whose pool holds block_table (scheduler/replicas.py; 0 alone)
    replica: int = 0
    # prefix caching: prompt tokens served from cache at first admission (what fairness charges
    # at the cached-token weight), the chained hash of each full page of token_ids known so far,
    # and how many leading pages of block_table are registered in (or taken from) the cache
    num_cached_tokens: int = 0
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_pages: int = 0
    is_prefill_charged: bool = False     # fairness: prefill is charged once, even if recomputed
    # Several samples of one prompt (n / best_of): a sample admitted after its sibling
    # `fork_parent` starts from the sibling's full prompt pages (Scheduler, "Samples").
    fork_parent: "Sequence | None" = None
    # Prompt logprobs: every prompt position is computed by this sequence (no cached or shared
    # pages) until its first token, so the step program can score each one.
    needs_prompt_scores: bool = False
    admit_time: float | None = None
    first_token_time: float | None = None
    extra: dict = field(default_factory=dict)  # per-policy bookkeeping (e.g. predicted length)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_total_tokens(self) -> int:
        """Known tokens plus those sampled on the device and not yet seen by the host."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_prefilling(self) -> bool:
        # One token is always left uncomputed: the last one is the next step's input.
        return self.num_computed_tokens < self.num_total_tokens - 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def max_total_tokens(self) -> int:
        return len(self.prompt_token_ids) + self.max_tokens
