"""Prompt logprobs: the log-probability of every prompt token given the tokens before it.

A request asking for them (SamplingParams.prompt_logprobs = N) has each of its prompt positions
computed by its own prefill steps (the scheduler gives it no cached or shared pages before its
first token), and the prefill calls holding such a row carry `StepInput.score_targets`: per
position, the next prompt token (-1 where there is none; jaxserve/step_builder.py targets_for).
Only then does the step program take the logits of every position ([B, T, V] float32, against
[B, V] for sampling alone) and return `PromptScores` beside the sampled tokens; a step without
score targets is the program it always was (the field is None, so it is not part of the
program's inputs). Such a program is compiled when a bucket first needs it (warm-up does not
compile it), and the memory plan (jaxserve/memory.py) does not count its [B, T, V] logits: with
a 512-token prefill bucket and a 128k vocabulary they are 256 MiB beside the planned step. The
scores are computed on the raw model's distribution (no temperature or other sampling setting),
as vLLM's.

On the host, `PromptScoreBuffer` (engine) gathers a request's scores by position across its
chunks (a position computed again after a preemption overwrites its entry) and turns them into
RequestOutput.prompt_logprobs on its first output.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

# Alternatives per prompt position the program returns (vLLM's default max_logprobs); a request
# gets the first N of them.
MAX_PROMPT_LOGPROBS = 20


@jax.tree_util.register_dataclass
@dataclass
class PromptScores:
    logprob: jax.Array        # [B, T] float32: log p(target) at each position, NaN without one
    rank: jax.Array           # [B, T] int32: 1 + how many tokens are more likely than the target
    top_ids: jax.Array        # [B, T, K] int32: the K most likely next tokens, most likely first
    top_logprobs: jax.Array   # [B, T, K] float32: their log-probabilities


def prompt_scores(logits, targets, k: int = MAX_PROMPT_LOGPROBS) -> PromptScores:
    """logits [B, T, V] (every position of the step), targets [B, T] int32 (-1: none)."""
    with jax.named_scope("prompt_scores"):
        # on the logits themselves (no [B, T, V] array of log-probabilities is made): each
        # value below is shifted by the position's log-sum-exp at the end
        logits = logits.astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        chosen = jnp.take_along_axis(logits, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
        rank = jnp.sum(logits > chosen[..., None], axis=-1, dtype=jnp.int32) + 1
        top, top_ids = jax.lax.top_k(logits, min(k, logits.shape[-1]))
        valid = targets >= 0
        return PromptScores(logprob=jnp.where(valid, chosen - lse, jnp.nan),
                            rank=jnp.where(valid, rank, 0),
                            top_ids=top_ids.astype(jnp.int32), top_logprobs=top - lse[..., None])


def at_index(logits, index):
    """logits [B, T, V] -> [B, V] at each row's index [B]."""
    return jnp.take_along_axis(logits, index[:, None, None], axis=1)[:, 0]


class PromptScoreBuffer:
    """One request's prompt scores as its chunks deliver them, by position."""

    def __init__(self, num_prompt_tokens: int, num_top: int):
        self.num_top = num_top
        n = num_prompt_tokens
        self.logprob = np.full((n,), np.nan, np.float32)   # [n]: entry p scores token p
        self.rank = np.zeros((n,), np.int32)
        self.top_ids = np.zeros((n, num_top), np.int32)
        self.top_logprobs = np.zeros((n, num_top), np.float32)

    def add(self, positions, logprob, rank, top_ids, top_logprobs) -> None:
        """Scores of these positions (each scores the token after it)."""
        p = np.asarray(positions) + 1
        self.logprob[p], self.rank[p] = logprob, rank
        k = self.num_top
        self.top_ids[p], self.top_logprobs[p] = top_ids[:, :k], top_logprobs[:, :k]

    def result(self) -> list:
        """RequestOutput.prompt_logprobs: None for the first token, then per token (its
        log-probability, its rank, [(token id, log-probability)] of the top alternatives)."""
        out: list = [None]
        for p in range(1, len(self.logprob)):
            out.append((float(self.logprob[p]), int(self.rank[p]),
                        list(zip(self.top_ids[p].tolist(), self.top_logprobs[p].tolist()))))
        return out
