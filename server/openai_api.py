"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models."""
from __future__ import annotations

import time

from aiohttp import web

from server.context import ServerContext, ctx_of
from jaxserve.sampling_params import SamplingParams
from server.protocol import (GenRequest, bad, finite_or_none, get_bool, get_int, get_str,
                             json_dumps, parse_json_object, refuse_unsupported, sampling_fields,
                             stream_fields)
from server.request_fields import response_id
from server.streaming import run_request
from server.structured import structured_fields

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


# ------------------------------------------------------------------ parsing
def _common(ctx: ServerContext, body: dict) -> dict:
    refuse_unsupported(body)
    stream, include_usage = stream_fields(body)
    return dict(model=get_str(body, "model"), stream=stream, include_usage=include_usage,
                user=get_str(body, "user"), cache_salt=get_str(body, "cache_salt"),
                fields=sampling_fields(body) | structured_fields(body))


def parse_completion(ctx: ServerContext, body: dict) -> GenRequest:
    if "prompt" not in body:
        raise bad("'prompt' is required", "prompt")
    c = _common(ctx, body)
    if get_bool(body, "echo", False):
        raise bad("'echo' is not supported", "echo")
    if get_str(body, "suffix"):
        raise bad("'suffix' is not supported", "suffix")
    logprobs = get_int(body, "logprobs", None, lo=0, hi=5)
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = ctx.tokenizer.encode(prompt)
    elif isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = prompt        # admission checks the ids
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise bad("batched prompts are not supported; send one prompt per request", "prompt")
    else:
        raise bad("'prompt' must be a string or a list of token ids", "prompt")
    params = SamplingParams(max_tokens=get_int(body, "max_tokens", 16),
                            logprobs=logprobs is not None, **c["fields"])
    return GenRequest(prompt_ids=ids, params=params,
                      model=c["model"], stream=c["stream"], include_usage=c["include_usage"],
                      logprobs=logprobs is not None, user=c["user"],
                      cache_salt=c["cache_salt"])


def _message_text(i: int, msg) -> dict:
    if not isinstance(msg, dict):
        raise bad(f"messages[{i}] must be an object", "messages")
    role = msg.get("role")
    if role not in CHAT_ROLES:
        raise bad(f"messages[{i}].role must be one of {list(CHAT_ROLES)}", "messages")
    content = msg.get("content")
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content parts must be {{'type': 'text', 'text': str}} "
                          "(this model reads text only)", "messages")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise bad(f"messages[{i}].content must be a string or a list of text parts", "messages")
    return {"role": "system" if role == "developer" else role, "content": content}


def parse_chat(ctx: ServerContext, body: dict) -> GenRequest:
    messages = body.get("messages")
    if messages is None:
        raise bad("'messages' is required", "messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    clean = [_message_text(i, m) for i, m in enumerate(messages)]
    c = _common(ctx, body)
    logprobs = get_bool(body, "logprobs", False)
    top = get_int(body, "top_logprobs", 0, lo=0, hi=20)
    if top:
        raise bad("'top_logprobs' > 0 is not supported (the chosen token's logprob is returned "
                  "with logprobs=true)", "top_logprobs")
    max_tokens = get_int(body, "max_completion_tokens", None)
    if max_tokens is None:
        max_tokens = get_int(body, "max_tokens", None)   # None: the rest of the context
    params = SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **c["fields"])
    return GenRequest(prompt_ids=ctx.tokenizer.chat(clean), params=params,
                      model=c["model"], stream=c["stream"], include_usage=c["include_usage"],
                      logprobs=logprobs, user=c["user"], cache_salt=c["cache_salt"])


# ------------------------------------------------------------------ response shapes
def _usage(num_prompt: int, num_output: int) -> dict:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_output,
            "total_tokens": num_prompt + num_output}


class _Logprobs:
    """Accumulates chosen-token logprobs in the completions and chat formats."""

    def __init__(self, ctx: ServerContext):
        self.ctx = ctx
        self.offset = 0

    def completion(self, token_ids: list[int], logprobs: list[float] | None) -> dict | None:
        if logprobs is None:
            return None
        tokens = [self.ctx.token_text(t) for t in token_ids]
        offsets = []
        for t in tokens:
            offsets.append(self.offset)
            self.offset += len(t)
        return {"tokens": tokens, "token_logprobs": [finite_or_none(x) for x in logprobs],
                "top_logprobs": None,
                "text_offset": offsets}

    def chat(self, token_ids: list[int], logprobs: list[float] | None) -> dict | None:
        if logprobs is None:
            return None
        content = []
        for t, lp in zip(token_ids, logprobs):
            text = self.ctx.token_text(t)
            content.append({"token": text, "logprob": finite_or_none(lp),
                            "bytes": list(text.encode()),
                            "top_logprobs": []})
        return {"content": content}


async def completions(request: web.Request) -> web.StreamResponse:
    ctx = ctx_of(request)
    body = parse_json_object(await request.read())
    req = parse_completion(ctx, body)
    rid = response_id(request, "cmpl-")
    created = int(time.time())
    lp = _Logprobs(ctx)

    def chunk(out, final: bool) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": req.model
                or ctx.model_name, "choices": [{
                    "index": 0, "text": out.new_text,
                    "logprobs": lp.completion(out.new_token_ids, out.new_logprobs)
                    if req.logprobs else None,
                    "finish_reason": out.finish_reason if out.finished else None}]}

    def full(out, text: str, token_ids, logprobs) -> dict:
        return {"id": rid, "object": "text_completion", "created": created,
                "model": req.model or ctx.model_name,
                "choices": [{"index": 0, "text": text,
                             "logprobs": lp.completion(token_ids, logprobs) if req.logprobs else None,
                             "finish_reason": out.finish_reason}],
                "usage": _usage(out.num_prompt_tokens, len(out.token_ids))}

    def usage_chunk(out) -> dict:
        return {"id": rid, "object": "text_completion", "created": created,
                "model": req.model or ctx.model_name, "choices": [],
                "usage": _usage(out.num_prompt_tokens, len(out.token_ids))}

    return await run_request(request, ctx, req, rid, first=None, chunk=chunk, full=full,
                             usage_chunk=usage_chunk)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    ctx = ctx_of(request)
    body = parse_json_object(await request.read())
    req = parse_chat(ctx, body)
    rid = response_id(request, "chatcmpl-")
    created = int(time.time())
    lp = _Logprobs(ctx)
    base = {"id": rid, "object": "chat.completion.chunk", "created": created,
            "model": req.model or ctx.model_name}

    def first() -> dict:
        return {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}]}

    def chunk(out, final: bool) -> dict:
        delta = {"content": out.new_text} if out.new_text else {}
        return {**base, "choices": [{
            "index": 0, "delta": delta,
            "logprobs": lp.chat(out.new_token_ids, out.new_logprobs) if req.logprobs else None,
            "finish_reason": out.finish_reason if out.finished else None}]}

    def full(out, text: str, token_ids, logprobs) -> dict:
        return {"id": rid, "object": "chat.completion", "created": created,
                "model": req.model or ctx.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": lp.chat(token_ids, logprobs) if req.logprobs else None,
                             "finish_reason": out.finish_reason}],
                "usage": _usage(out.num_prompt_tokens, len(out.token_ids))}

    def usage_chunk(out) -> dict:
        return {**base, "choices": [], "usage": _usage(out.num_prompt_tokens, len(out.token_ids))}

    return await run_request(request, ctx, req, rid, first=first, chunk=chunk, full=full,
                             usage_chunk=usage_chunk)


def dumps(obj) -> str:
    return json_dumps(obj)
