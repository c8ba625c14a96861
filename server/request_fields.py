"""The request-level fields of /v1/completions and /v1/chat/completions that no parser of the
prompt or of sampling reads: the field rule, the request id, prompt truncation, and what vLLM
adds to the response (`system_fingerprint`, `stop_reason`, `prompt_token_ids` / `token_ids`).

1. `guard(handler, endpoint)` wraps the endpoint (server/app.py): it refuses the fields the
   registry refuses (server/fields.py `check_body`) and keeps this module's fields as the
   request's `RequestOptions`, before the endpoint's own parser runs.
2. The handler names its response id with `response_id(request, prefix)`: the client's
   `X-Request-Id` header or `request_id` field, else a fresh one; the same id goes back in the
   `X-Request-Id` response header (`on_prepare`).
3. `prepare(request, req)` (server/streaming.py) truncates the prompt before admission.
4. `annotate*` add the response fields to each body or chunk the handler built.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import uuid
from dataclasses import dataclass

from aiohttp import web

import jaxserve
from server import fields
from server.protocol import GenRequest, bad, get_bool, get_int, get_str

OPTIONS_KEY = web.RequestKey("jaxserve_request_options", object)
ID_KEY = web.RequestKey("jaxserve_response_id", str)
MAX_REQUEST_ID_CHARS = 256


@dataclass(frozen=True)
class RequestOptions:
    request_id: str | None = None            # the client's id (header or body)
    truncate_prompt_tokens: int | None = None  # keep k prompt tokens (-1: max_model_len)
    truncation_side: str = "left"            # left: the last k tokens; right: the first k
    return_token_ids: bool = False


NO_OPTIONS = RequestOptions()


def read_options(body: dict, headers) -> RequestOptions:
    rid = headers.get("X-Request-Id") or get_str(body, "request_id")
    if rid is not None and (not 1 <= len(rid) <= MAX_REQUEST_ID_CHARS
                            or not rid.isprintable()):
        raise bad(f"'request_id' must be 1 to {MAX_REQUEST_ID_CHARS} printable characters",
                  "request_id")
    k = get_int(body, "truncate_prompt_tokens", None, lo=-1)
    if k == 0:
        raise bad("'truncate_prompt_tokens' must be -1 or >= 1", "truncate_prompt_tokens")
    side = get_str(body, "truncation_side", "left")
    if side not in ("left", "right"):
        raise bad("'truncation_side' must be 'left' or 'right'", "truncation_side")
    return RequestOptions(rid, k, side, get_bool(body, "return_token_ids", False))


def options(request: web.Request) -> RequestOptions:
    return request.get(OPTIONS_KEY, NO_OPTIONS)


def guard(handler, endpoint: str):
    """`handler` behind the field rule of `endpoint` (fields.COMPLETIONS or fields.CHAT). A
    body that is not a JSON object is left to the handler's parser, which answers its 400."""
    async def checked(request: web.Request) -> web.StreamResponse:
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError, RecursionError):
            body = None
        if isinstance(body, dict):
            fields.check_body(body, endpoint)
            request[OPTIONS_KEY] = read_options(body, request.headers)
        return await handler(request)
    checked.__name__ = getattr(handler, "__name__", "handler")
    checked.__doc__ = handler.__doc__
    checked.endpoint = endpoint
    return checked


def response_id(request: web.Request, prefix: str) -> str:
    """The response's `id`: prefix + the client's request id, else prefix + a fresh hex id."""
    rid = f"{prefix}{options(request).request_id or uuid.uuid4().hex}"
    request[ID_KEY] = rid
    return rid


async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """app.on_response_prepare: the response id in the X-Request-Id header (as vLLM's
    --enable-request-id-headers)."""
    rid = request.get(ID_KEY)
    if rid is not None:
        response.headers["X-Request-Id"] = rid


def engine_request_id(request: web.Request, rid: str) -> str:
    """The id the engine knows a request by: unique even when clients reuse their ids."""
    return f"{rid}-{uuid.uuid4().hex[:12]}" if options(request).request_id else rid


def prepare(request: web.Request, req: GenRequest, max_model_len: int) -> GenRequest:
    """`req` with its prompt truncated as `truncate_prompt_tokens` asks (vLLM's semantics)."""
    opts = options(request)
    k = opts.truncate_prompt_tokens
    if k is None:
        return req
    if k == -1:
        k = max_model_len
    elif k > max_model_len:
        raise bad(f"'truncate_prompt_tokens' ({k}) is greater than the context length "
                  f"({max_model_len})", "truncate_prompt_tokens")
    if len(req.prompt_ids) <= k:
        return req
    ids = req.prompt_ids[-k:] if opts.truncation_side == "left" else req.prompt_ids[:k]
    return dataclasses.replace(req, prompt_ids=list(ids))


@functools.lru_cache(maxsize=8)
def fingerprint(model_name: str, config: str = "") -> str:
    """`system_fingerprint`: names the server build and the model it serves."""
    digest = hashlib.sha256(f"{jaxserve.__version__}|{model_name}|{config}".encode())
    return f"fp_{digest.hexdigest()[:12]}"


def _is_chat(body: dict) -> bool:
    return str(body.get("object", "")).startswith("chat.")


def annotate(request: web.Request, body: dict, outs: list, prompt_ids: list[int],
             fp: str) -> dict:
    """A whole (non-streamed) response: `system_fingerprint`; per choice `stop_reason` (from
    the RequestOutput at the choice's index in `outs`) and, with return_token_ids, the
    tokens (chat: `prompt_token_ids` on the response, completions: on each choice)."""
    body.setdefault("system_fingerprint", fp)
    ids = options(request).return_token_ids
    chat = _is_chat(body)
    if ids and chat:
        body["prompt_token_ids"] = list(prompt_ids)
    for choice in body.get("choices", ()):
        i = choice.get("index", 0)
        out = outs[i] if i < len(outs) else None
        choice.setdefault("stop_reason", getattr(out, "stop_reason", None))
        if ids:
            if not chat:
                choice["prompt_token_ids"] = list(prompt_ids)
            choice["token_ids"] = list(out.token_ids) if out is not None else None
    return body


def annotate_chunk(request: web.Request, chunk: dict, out, prompt_ids: list[int] | None,
                   fp: str) -> dict:
    """One streamed chunk: `system_fingerprint`; on its choices `stop_reason` once finished
    and, with return_token_ids, the new `token_ids` (and `prompt_token_ids` when `prompt_ids`
    is given: the stream's first chunk)."""
    chunk.setdefault("system_fingerprint", fp)
    ids = options(request).return_token_ids
    chat = _is_chat(chunk)
    if ids and prompt_ids is not None and chat:
        chunk["prompt_token_ids"] = list(prompt_ids)
    for choice in chunk.get("choices", ()):
        if out is not None and out.finished:
            choice.setdefault("stop_reason", out.stop_reason)
        elif "finish_reason" in choice:
            choice.setdefault("stop_reason", None)
        if ids:
            if prompt_ids is not None and not chat:
                choice["prompt_token_ids"] = list(prompt_ids)
            choice["token_ids"] = list(out.new_token_ids) if out is not None else []
    return chunk
