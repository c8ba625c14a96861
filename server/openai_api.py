"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from aiohttp import web

from server.chat import ChatTurn, parse_chat_prompt
from server.context import ServerContext, ctx_of
from jaxserve.sampling_params import MAX_TOP_LOGPROBS, SamplingParams
from server.protocol import (GenRequest, bad, finite_or_none, get_bool, get_int, get_str,
                             json_dumps, parse_json_object, refuse_unsupported, sampling_fields,
                             stream_fields)
from server import request_fields
from server.choices import MAX_SAMPLES, Choice, best, run_choices
from server.request_fields import response_id
from server.streaming import run_request
from server.structured import structured_fields


# ------------------------------------------------------------------ parsing
def _common(ctx: ServerContext, body: dict) -> dict:
    refuse_unsupported(body)
    stream, include_usage = stream_fields(body)
    return dict(model=get_str(body, "model"), stream=stream, include_usage=include_usage,
                user=get_str(body, "user"), cache_salt=get_str(body, "cache_salt"),
                fields=sampling_fields(body) | structured_fields(body))


@dataclass(frozen=True)
class CompletionRequest:
    """A parsed /v1/completions request: one GenRequest per prompt (the same fields for each),
    how many samples of each, and what the response shows of them."""
    prompts: list[GenRequest]
    texts: list[str | None]        # each prompt as sent when it was text (echo shows it)
    n: int                         # choices per prompt
    best_of: int                   # samples per prompt (>= n; the n best are returned)
    echo: bool                     # the prompt before each choice's text (and logprobs)
    score_only: bool               # echo with max_tokens 0: the prompt scored, nothing generated
    logprobs: int | None           # `logprobs`: alternatives per token; None: no logprobs
    prompt_logprobs: int | None    # vLLM's `prompt_logprobs`: each choice's prompt_logprobs


def _is_token(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def _prompt_list(ctx: ServerContext, prompt) -> tuple[list[str | None], list[list[int]]]:
    """(texts, token ids) of the prompts: a string, token ids, or a non-empty list of strings
    or of token-id lists (a batch: as many choices per prompt)."""
    if isinstance(prompt, str):
        return [prompt], [ctx.tokenizer.encode(prompt)]
    if isinstance(prompt, list) and prompt:
        if all(_is_token(t) for t in prompt):
            return [None], [prompt]        # admission checks the ids
        if all(isinstance(p, str) for p in prompt):
            return list(prompt), [ctx.tokenizer.encode(p) for p in prompt]
        if all(isinstance(p, list) and all(_is_token(t) for t in p) for p in prompt):
            return [None] * len(prompt), [list(p) for p in prompt]
    raise bad("'prompt' must be a string, a list of token ids, or a non-empty list of strings "
              "or of token-id lists", "prompt")


def parse_completion(ctx: ServerContext, body: dict) -> CompletionRequest:
    if "prompt" not in body:
        raise bad("'prompt' is required", "prompt")
    c = _common(ctx, body)
    if get_str(body, "suffix"):
        raise bad("'suffix' is not supported (no fill-in-the-middle; vLLM refuses it too)",
                  "suffix")
    echo = get_bool(body, "echo", False)
    logprobs = get_int(body, "logprobs", None, lo=0, hi=MAX_TOP_LOGPROBS)
    prompt_logprobs = get_int(body, "prompt_logprobs", None, lo=0, hi=MAX_TOP_LOGPROBS)
    n = get_int(body, "n", 1, lo=1, hi=MAX_SAMPLES)
    best_of = get_int(body, "best_of", None, lo=1, hi=MAX_SAMPLES)
    best_of = n if best_of is None else best_of
    if best_of < n:
        raise bad(f"'best_of' ({best_of}) must be greater than or equal to 'n' ({n})", "best_of")
    if c["stream"] and best_of > n:
        raise bad("'best_of' > 'n' cannot be streamed: the best samples are known only when "
                  "all have finished", "best_of")
    max_tokens = get_int(body, "max_tokens", 16, lo=0)
    score_only = max_tokens == 0
    if score_only and not echo:
        raise bad("'max_tokens' 0 generates nothing; it is allowed only with 'echo': true (the "
                  "prompt is scored)", "max_tokens")
    texts, prompts = _prompt_list(ctx, body["prompt"])
    if len(prompts) * best_of > MAX_SAMPLES:
        raise bad(f"{len(prompts)} prompts x {best_of} samples each is more than "
                  f"{MAX_SAMPLES} samples in one request", "prompt")
    # echo with logprobs shows the prompt's logprobs too (vLLM's rule)
    scored = [x for x in (logprobs if echo else None, prompt_logprobs) if x is not None]
    params = SamplingParams(
        # score_only: one token is generated and dropped (as vLLM does)
        max_tokens=1 if score_only else max_tokens,
        # best_of ranks samples by their tokens' log-probabilities
        logprobs=logprobs is not None or best_of > n, top_logprobs=logprobs or 0,
        prompt_logprobs=max(scored) if scored else None, **c["fields"])
    reqs = [GenRequest(prompt_ids=ids, params=params, model=c["model"], stream=c["stream"],
                       include_usage=c["include_usage"], logprobs=logprobs is not None,
                       user=c["user"], cache_salt=c["cache_salt"]) for ids in prompts]
    return CompletionRequest(prompts=reqs, texts=texts, n=n, best_of=best_of, echo=echo,
                             score_only=score_only, logprobs=logprobs,
                             prompt_logprobs=prompt_logprobs)


def parse_chat(ctx: ServerContext, body: dict) -> tuple[GenRequest, ChatTurn]:
    """The request and what its response needs besides the text (role, echo, tool calls)."""
    if "messages" not in body:
        raise bad("'messages' is required", "messages")
    c = _common(ctx, body)
    prompt_ids, turn, tool_constraint = parse_chat_prompt(ctx, body)
    logprobs = get_bool(body, "logprobs", False)
    top = get_int(body, "top_logprobs", 0, lo=0, hi=MAX_TOP_LOGPROBS)
    if top and not logprobs:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    max_tokens = get_int(body, "max_completion_tokens", None)
    if max_tokens is None:
        max_tokens = get_int(body, "max_tokens", None)   # None: the rest of the context
    fields = c["fields"]
    if tool_constraint is not None:
        if fields.get("structured") is not None:
            raise bad("tool_choice \"required\" or a named tool cannot be combined with "
                      "another output constraint (response_format, structured_outputs)",
                      "tool_choice")
        fields = dict(fields, structured=tool_constraint)
    if turn.keep_special_tokens:
        fields = dict(fields, skip_special_tokens=False)   # the call markers are special tokens
    params = SamplingParams(max_tokens=max_tokens, logprobs=logprobs, top_logprobs=top,
                            **fields)
    return GenRequest(prompt_ids=prompt_ids, params=params,
                      model=c["model"], stream=c["stream"], include_usage=c["include_usage"],
                      logprobs=logprobs, user=c["user"], cache_salt=c["cache_salt"]), turn


# ------------------------------------------------------------------ response shapes
def _usage(num_prompt: int, num_output: int) -> dict:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_output,
            "total_tokens": num_prompt + num_output}


class _Logprobs:
    """Accumulates chosen-token logprobs, and their top alternatives (RequestOutput's
    new_top_logprobs: (token id, logprob) pairs, most likely first), in the completions and
    chat formats."""

    def __init__(self, ctx: ServerContext):
        self.ctx = ctx
        self.offset = 0

    def completion(self, token_ids: list[int], logprobs: list[float] | None,
                   tops: list | None = None) -> dict | None:
        """OpenAI's legacy shape, as vLLM fills it: per token a {text: logprob} object of the
        chosen token and the `logprobs` (N) most likely ones (so N or N + 1 entries)."""
        if logprobs is None:
            return None
        text = self.ctx.token_text
        tokens = [text(t) for t in token_ids]
        offsets = []
        for t in tokens:
            offsets.append(self.offset)
            self.offset += len(t)
        top = []
        for j, (tok, lp) in enumerate(zip(tokens, logprobs)):
            d = {tok: finite_or_none(lp)}
            for t, x in (tops[j] if tops and j < len(tops) else ()):
                d.setdefault(text(t), finite_or_none(x))
            top.append(d)
        return {"tokens": tokens, "token_logprobs": [finite_or_none(x) for x in logprobs],
                "top_logprobs": top, "text_offset": offsets}

    def chat(self, token_ids: list[int], logprobs: list[float] | None,
             tops: list | None = None) -> dict | None:
        """OpenAI's shape: per token its logprob and the `top_logprobs` most likely tokens."""
        if logprobs is None:
            return None

        def entry(t: int, lp: float) -> dict:
            text = self.ctx.token_text(t)
            return {"token": text, "logprob": finite_or_none(lp), "bytes": list(text.encode())}
        content = []
        for j, (t, lp) in enumerate(zip(token_ids, logprobs)):
            alts = tops[j] if tops and j < len(tops) else ()
            content.append({**entry(t, lp), "top_logprobs": [entry(a, x) for a, x in alts]})
        return {"content": content}


def _samples(creq: CompletionRequest) -> list[Choice]:
    """best_of samples of each prompt: sample j's seed is the client's + j, and it starts from
    sample 0's prompt pages unless it scores its prompt (server/choices.py)."""
    out: list[Choice] = []
    for p, req in enumerate(creq.prompts):
        first = len(out)
        for j in range(creq.best_of):
            params = req.params
            if j and params.seed is not None:
                params = dataclasses.replace(params, seed=(params.seed + j) % 2**63)
            fork = None if j == 0 or params.prompt_logprobs is not None else first
            out.append(Choice(index=len(out), prompt_index=p,
                              req=dataclasses.replace(req, params=params), fork_of=fork))
    return out


def _prompt_logprobs_part(ctx: ServerContext, ids: list[int], scores: list | None,
                          num_top: int) -> dict:
    """The echoed prompt in the completions logprobs shape: the first token has no logprob
    (null), each other its logprob and {text: logprob} of itself and the num_top most likely
    tokens at its position."""
    text = ctx.token_text
    tokens = [text(t) for t in ids]
    token_lps, tops = [None], [None]
    for t, entry in zip(ids[1:], (scores or [])[1:]):
        lp, _, alts = entry
        token_lps.append(finite_or_none(lp))
        d = {text(t): finite_or_none(lp)}
        for a, x in alts[:num_top]:
            d.setdefault(text(a), finite_or_none(x))
        tops.append(d)
    offsets, at = [], 0
    for tok in tokens:
        offsets.append(at)
        at += len(tok)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


def _vllm_prompt_logprobs(ctx: ServerContext, ids: list[int], scores: list | None,
                          num_top: int) -> list | None:
    """vLLM's `prompt_logprobs` of a choice: null for the first token, then per token
    {token id: {logprob, rank, decoded_token}} of itself and the num_top most likely."""
    if scores is None:
        return None
    text = ctx.token_text
    out: list = [None]
    for t, (lp, rank, alts) in zip(ids[1:], scores[1:]):
        d = {str(t): {"logprob": finite_or_none(lp), "rank": rank, "decoded_token": text(t)}}
        for r, (a, x) in enumerate(alts[:num_top], 1):
            d.setdefault(str(a), {"logprob": finite_or_none(x), "rank": r,
                                  "decoded_token": text(a)})
        out.append(d)
    return out


def _joined(parts: list[dict]) -> dict | None:
    """Completions logprobs objects one after the other (the echoed prompt, then the output)."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    out = {k: [] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    for p in parts:
        for k in out:
            v = p.get(k)
            if k == "top_logprobs" and v is None:   # the chosen token alone
                v = [{t: x} for t, x in zip(p["tokens"], p["token_logprobs"])]
            out[k].extend(v)
    return out


async def completions(request: web.Request) -> web.StreamResponse:
    ctx = ctx_of(request)
    body = parse_json_object(await request.read())
    creq = parse_completion(ctx, body)
    rid = response_id(request, "cmpl-")
    created = int(time.time())
    model = creq.prompts[0].model or ctx.model_name
    head = {"id": rid, "object": "text_completion", "created": created, "model": model}
    texts = list(creq.texts)
    for p, req in enumerate(creq.prompts):   # truncate_prompt_tokens (server/request_fields.py)
        creq.prompts[p] = request_fields.prepare(request, req, ctx.max_model_len)
        if texts[p] is None or creq.prompts[p].prompt_ids is not req.prompt_ids:
            texts[p] = ctx.tokenizer.decode(creq.prompts[p].prompt_ids) if creq.echo else None
    samples = _samples(creq)
    lps: dict[int, _Logprobs] = {}    # per sample: its text offsets run on

    def logprobs_of(c: Choice, token_ids, logprobs, tops, with_prompt: bool) -> dict | None:
        if creq.logprobs is None:
            return None
        lp = lps.setdefault(c.index, _Logprobs(ctx))
        parts = []
        if with_prompt:
            part = _prompt_logprobs_part(ctx, c.req.prompt_ids, c.prompt_logprobs, creq.logprobs)
            lp.offset = sum(len(t) for t in part["tokens"])
            parts.append(part)
        if not creq.score_only:
            parts.append(lp.completion(token_ids, logprobs, tops))
        return _joined(parts)

    def choice(k: int, c: Choice, text: str, logprobs: dict | None, finish: str | None,
               opening: bool) -> dict:
        d = {"index": k, "text": text, "logprobs": logprobs, "finish_reason": finish}
        if creq.prompt_logprobs is not None and opening:
            d["prompt_logprobs"] = _vllm_prompt_logprobs(ctx, c.req.prompt_ids,
                                                         c.prompt_logprobs, creq.prompt_logprobs)
        return d

    def chunk(c: Choice, out) -> dict:
        opening = c.num_outputs <= 1
        text = "" if creq.score_only else out.new_text
        if creq.echo and opening:
            text = texts[c.prompt_index] + text
        return {**head, "choices": [choice(
            c.index, c, text, logprobs_of(c, out.new_token_ids, out.new_logprobs,
                                          out.new_top_logprobs, creq.echo and opening),
            out.finish_reason if out.finished else None, opening)]}

    def usage(picked: list[Choice]) -> dict:
        return {**head, "choices": [], "usage": _usage(
            sum(len(r.prompt_ids) for r in creq.prompts),
            0 if creq.score_only else sum(len(c.last.token_ids) for c in picked))}

    def full(all_samples: list[Choice]) -> tuple[dict, list[Choice]]:
        picked = []
        for p in range(len(creq.prompts)):
            group = all_samples[p * creq.best_of:(p + 1) * creq.best_of]
            picked += best(group, creq.n) if creq.best_of > creq.n else group
        choices = []
        for k, c in enumerate(picked):
            out = c.last
            text = ("" if creq.score_only else out.text)
            if creq.echo:
                text = texts[c.prompt_index] + text
            choices.append(choice(k, c, text, logprobs_of(c, out.token_ids, c.logprobs,
                                                          c.top_logprobs, creq.echo),
                                  out.finish_reason, True))
        return {**head, "choices": choices, "usage": usage(picked)["usage"]}, picked

    every_token = (creq.logprobs is not None or creq.echo
                   or request_fields.options(request).return_token_ids)
    return await run_choices(request, ctx, samples, rid, stream=creq.prompts[0].stream,
                             include_usage=creq.prompts[0].include_usage,
                             every_token=every_token, first=None, chunk=chunk, full=full,
                             usage=usage)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    ctx = ctx_of(request)
    body = parse_json_object(await request.read())
    req, turn = parse_chat(ctx, body)
    rid = response_id(request, "chatcmpl-")
    n = get_int(body, "n", 1, lo=1, hi=MAX_SAMPLES)
    if n > 1:   # several choices: server/choices.py
        return await _chat_samples(request, ctx, req, turn, n, rid)
    created = int(time.time())
    lp = _Logprobs(ctx)
    base = {"id": rid, "object": "chat.completion.chunk", "created": created,
            "model": req.model or ctx.model_name}
    deltas = turn.stream()   # content and tool-call deltas from the streamed text

    def first() -> dict:
        return {**base, "choices": [{"index": 0, "delta": deltas.first(),
                                     "logprobs": None, "finish_reason": None}]}

    def chunk(out, final: bool) -> dict:
        delta, finish_reason = deltas.delta(out.new_text, out.finished, out.finish_reason)
        return {**base, "choices": [{
            "index": 0, "delta": delta,
            "logprobs": lp.chat(out.new_token_ids, out.new_logprobs, out.new_top_logprobs)
            if req.logprobs else None,
            "finish_reason": finish_reason if out.finished else None}]}

    def full(out, text: str, token_ids, logprobs) -> dict:
        message, finish_reason = turn.message(text, out.finish_reason)
        return {"id": rid, "object": "chat.completion", "created": created,
                "model": req.model or ctx.model_name,
                "choices": [{"index": 0, "message": message,
                             "logprobs": lp.chat(token_ids, logprobs, out.new_top_logprobs)
                             if req.logprobs else None,
                             "finish_reason": finish_reason}],
                "usage": _usage(out.num_prompt_tokens, len(out.token_ids))}

    def usage_chunk(out) -> dict:
        return {**base, "choices": [], "usage": _usage(out.num_prompt_tokens, len(out.token_ids))}

    return await run_request(request, ctx, req, rid, first=first, chunk=chunk, full=full,
                             usage_chunk=usage_chunk)


async def _chat_samples(request: web.Request, ctx: ServerContext, req: GenRequest,
                        turn: ChatTurn, n: int, rid: str) -> web.StreamResponse:
    """A chat request's n choices (server/choices.py): sample j's seed is the client's + j,
    samples 1.. start from sample 0's prompt pages; each has its own deltas (tool calls)."""
    req = request_fields.prepare(request, req, ctx.max_model_len)
    created = int(time.time())
    model = req.model or ctx.model_name
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    samples = []
    for j in range(n):
        params = req.params
        if j and params.seed is not None:
            params = dataclasses.replace(params, seed=(params.seed + j) % 2**63)
        samples.append(Choice(index=j, prompt_index=0, fork_of=None if j == 0 else 0,
                              req=dataclasses.replace(req, params=params)))
    deltas = [turn.stream() for _ in range(n)]
    lps = [_Logprobs(ctx) for _ in range(n)]

    def first(c: Choice) -> dict:
        return {**base, "choices": [{"index": c.index, "delta": deltas[c.index].first(),
                                     "logprobs": None, "finish_reason": None}]}

    def chunk(c: Choice, out) -> dict:
        delta, finish = deltas[c.index].delta(out.new_text, out.finished, out.finish_reason)
        return {**base, "choices": [{
            "index": c.index, "delta": delta,
            "logprobs": lps[c.index].chat(out.new_token_ids, out.new_logprobs,
                                          out.new_top_logprobs) if req.logprobs else None,
            "finish_reason": finish if out.finished else None}]}

    def usage(cs: list[Choice]) -> dict:
        return {**base, "choices": [], "usage": _usage(
            len(req.prompt_ids), sum(len(c.last.token_ids) for c in cs))}

    def full(cs: list[Choice]) -> tuple[dict, list[Choice]]:
        choices = []
        for c in cs:
            message, finish = turn.message(c.last.text, c.last.finish_reason)
            choices.append({"index": c.index, "message": message,
                            "logprobs": lps[c.index].chat(c.last.token_ids, c.logprobs,
                                                          c.top_logprobs)
                            if req.logprobs else None, "finish_reason": finish})
        return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": choices, "usage": usage(cs)["usage"]}, cs

    every_token = req.logprobs or request_fields.options(request).return_token_ids
    return await run_choices(request, ctx, samples, rid, stream=req.stream,
                             include_usage=req.include_usage, every_token=every_token,
                             first=first, chunk=chunk, full=full, usage=usage)


def dumps(obj) -> str:
    return json_dumps(obj)
