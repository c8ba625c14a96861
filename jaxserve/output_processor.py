"""The output processor: each step's new tokens -> RequestOutputs, and every finish decision.

For each sequence that got a token this step:
  1. EOS (unless ignore_eos) or a stop token -> STOP, and that token's text is not shown; else
     max_tokens reached -> LENGTH (admission made prompt + max_tokens fit the context, so this
     is also the context limit);
  2. the token is detokenized incrementally; a stop string in the text -> STOP, the text is cut
     there (after the string with include_stop_str_in_output);
  3. a tail that may still grow into a stop string is held back; the rest is the text delta.
The engine then calls `Scheduler.finish(seq, reason)` for each finished sequence (the scheduler
decides no finish itself). A sequence whose logits went non-finite is finished by `fail`
(finish_reason "error"), before its step's tokens are processed.
"""
from __future__ import annotations

from dataclasses import dataclass

from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams
from jaxserve.tokenizer import IncrementalDetokenizer, Tokenizer
from scheduler import FinishReason, Sequence


class _AllIds:
    """A sequence's prompt + output ids as one read-only list for the detokenizers, without
    building prompt + output each step (O(context) per token; they read only the tail)."""
    __slots__ = ("prompt", "output")

    def __init__(self, seq: Sequence):
        self.prompt, self.output = seq.prompt_token_ids, seq.output_token_ids

    def __len__(self) -> int:
        return len(self.prompt) + len(self.output)

    def __getitem__(self, i):
        n = len(self.prompt)
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return (self.prompt + self.output)[i]
            if stop <= start:
                return []
            if start >= n:
                return self.output[start - n:stop - n]
            return self.prompt[start:stop] + self.output[:max(0, stop - n)]
        if i < 0:
            i += len(self)
        return self.prompt[i] if i < n else self.output[i - n]


@dataclass
class _Request:
    request_id: str
    seq: Sequence
    params: SamplingParams
    detok: IncrementalDetokenizer
    text: str = ""
    emitted_chars: int = 0     # chars of `text` already returned (stop-string hold-back)
    longest_stop: int = 0      # chars of the longest stop string (0: none)
    stop_ids: frozenset = frozenset()   # the token ids that finish it: stop tokens (+ EOS)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._by_id: dict[str, _Request] = {}
        self._by_seq: dict[int, _Request] = {}

    def add(self, request_id: str, seq: Sequence, params: SamplingParams) -> None:
        stop_ids = frozenset(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.tokenizer.eos_ids
        detok = self.tokenizer.detokenizer(seq.prompt_token_ids, params.skip_special_tokens,
                                           params.spaces_between_special_tokens)
        req = _Request(request_id, seq, params, detok,
                       longest_stop=max((len(x) for x in params.stop), default=0),
                       stop_ids=stop_ids)
        self._by_id[request_id] = req
        self._by_seq[seq.seq_id] = req

    def pop(self, request_id: str) -> Sequence | None:
        """Forget a request (finished or aborted); its sequence, if it was known."""
        req = self._by_id.pop(request_id, None)
        if req is None:
            return None
        del self._by_seq[req.seq.seq_id]
        return req.seq

    def sequence(self, request_id: str) -> Sequence | None:
        """The sequence of an unfinished request (None if it is not known)."""
        req = self._by_id.get(request_id)
        return None if req is None else req.seq

    def __contains__(self, request_id) -> bool:
        return request_id in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)

    def sequences(self) -> list[Sequence]:
        return [r.seq for r in self._by_id.values()]

    def process(self, produced: list[Sequence], logprobs: dict[int, float | None]
                ) -> tuple[list[RequestOutput], list[tuple[Sequence, FinishReason]]]:
        """Outputs for the sequences that got a token (logprobs by seq_id), and the sequences
        that finished with their reasons."""
        outputs, finished = [], []
        for seq in produced:
            req = self._by_seq.get(seq.seq_id)
            if req is None:
                continue
            out, reason = self._step(req, logprobs.get(seq.seq_id))
            outputs.append(out)
            if reason is not None:
                finished.append((seq, reason))
                self.pop(req.request_id)
        return outputs, finished

    def _step(self, req: _Request, logprob: float | None
              ) -> tuple[RequestOutput, FinishReason | None]:
        seq, p = req.seq, req.params
        top = None
        if isinstance(logprob, tuple):    # runner.TokenLogprobs: with top alternatives
            logprob, top = logprob
        tok = seq.output_token_ids[-1]
        reason, shown, stop_reason = None, True, None
        # As vLLM: an EOS or stop token wins over the length limit it also reaches.
        if tok in req.stop_ids:
            reason, shown = FinishReason.STOP, False
            stop_reason = tok if tok in p.stop_token_ids else None
        elif seq.num_output_tokens >= seq.max_tokens:
            reason = FinishReason.LENGTH
        if shown:
            req.text += req.detok.step(_AllIds(seq))
        # (as vLLM: no stop string before min_tokens; the device bans EOS and stop tokens)
        cut, stop = (self._find_stop(req) if req.longest_stop
                     and seq.num_output_tokens > getattr(p, "min_tokens", 0) else (None, None))
        if cut is not None:
            req.text, reason, stop_reason = req.text[:cut], FinishReason.STOP, stop
        elif reason is not None and shown:
            req.text += req.detok.flush(_AllIds(seq))
        # Hold back a tail that might still become a stop string.
        hold = 0 if reason is not None else max(req.longest_stop, 1) - 1
        upto = max(req.emitted_chars, len(req.text) - hold)
        new_text = req.text[req.emitted_chars:upto]
        req.emitted_chars = upto
        out = RequestOutput(
            request_id=req.request_id, new_token_ids=[tok], new_text=new_text,
            text=req.text[:upto], token_ids=list(seq.output_token_ids),
            num_prompt_tokens=seq.num_prompt_tokens, finished=reason is not None,
            finish_reason=reason.value if reason is not None else None,
            new_logprobs=[logprob] if p.logprobs else None, stop_reason=stop_reason,
            new_top_logprobs=[top or []] if getattr(p, "top_logprobs", 0) else None)
        return out, reason

    def fail(self, seq: Sequence, message: str, code: str) -> RequestOutput | None:
        """Finish seq's request with finish_reason "error" (nothing of this step's token is
        shown); its final output carries the text already returned. None when the request is
        not known (already finished or aborted)."""
        req = self._by_seq.get(seq.seq_id)
        if req is None:
            return None
        self.pop(req.request_id)
        text = req.text[:req.emitted_chars]
        return RequestOutput(
            request_id=req.request_id, new_token_ids=[], new_text="", text=text,
            token_ids=list(seq.output_token_ids), num_prompt_tokens=seq.num_prompt_tokens,
            finished=True, finish_reason="error", new_logprobs=[] if req.params.logprobs else None,
            error=message, error_code=code)

    @staticmethod
    def _find_stop(req: _Request) -> tuple[int | None, str | None]:
        """(index where the output text must be cut, the stop string found there), or
        (None, None) when no stop string appeared."""
        p = req.params
        start = max(0, req.emitted_chars - req.longest_stop)
        best, found = None, None
        for s in p.stop:
            i = req.text.find(s, start)
            if i >= 0:
                cut = i + len(s) if p.include_stop_str_in_output else i
                if best is None or cut < best:
                    best, found = cut, s
        return best, found
