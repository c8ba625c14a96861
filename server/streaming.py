"""Running one generation request for a handler: submit it, then answer with SSE or one JSON."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import Callable

from aiohttp import web

from jaxserve.async_engine import EngineError, EngineStopped, RequestCut, RequestStream
from jaxserve.outputs import RequestOutput
from server.context import ServerContext, ctx_of
from server import request_fields
from server.protocol import ApiError, GenRequest, json_dumps

log = logging.getLogger("jaxserve.server")

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"

try:  # aiohttp >= 3.10 raises its own subclass; older ones raise ConnectionResetError
    from aiohttp import ClientConnectionResetError as _Reset
    DISCONNECTED: tuple = (ConnectionResetError, _Reset)
except ImportError:  # pragma: no cover
    DISCONNECTED = (ConnectionResetError,)

try:
    from asyncio import timeout as _deadline          # Python >= 3.11
except ImportError:  # pragma: no cover
    from async_timeout import timeout as _deadline    # aiohttp's dependency on 3.10


class StreamStalled(ConnectionResetError):
    """The client took none of a stream's bytes for the stall timeout; its connection was
    aborted. A ConnectionResetError, so handlers treat it as the client having gone away."""


async def send(request: web.Request, resp: web.StreamResponse, data: bytes,
               stall_s: float) -> None:
    """resp.write(data), bounded. A write waits only when the socket and aiohttp's buffers are
    full, i.e. the client is not reading; if that lasts stall_s seconds the connection is
    aborted and StreamStalled raised, so the handler's `stream.close()` aborts the request in
    the engine and frees its decode slot and pages."""
    try:
        async with _deadline(stall_s):
            await resp.write(data)
    except asyncio.TimeoutError:
        log.warning("a client read nothing for %g s; aborting its stream", stall_s)
        ctx_of(request).metrics.on_stream_stall()
        if request.transport is not None:
            request.transport.abort()
        raise StreamStalled(f"the client read nothing for {stall_s:g} s") from None


def cut_output(request_id: str, last: RequestOutput | None,
               num_prompt_tokens: int) -> RequestOutput:
    """The final output of a request cut by the drain (RequestCut): everything it had been
    delivered, finished with finish_reason "abort"."""
    if last is None:
        return RequestOutput(request_id, [], "", "", [], num_prompt_tokens, finished=True,
                             finish_reason="abort")
    return dataclasses.replace(last, new_token_ids=[], new_text="", new_logprobs=None,
                               finished=True, finish_reason="abort")


def cut_error(e: RequestCut) -> dict:
    """The OpenAI-style error a cut request carries: the body's "error" field (non-streaming,
    status 200, next to the partial output) or the stream's last event before [DONE]."""
    return {"message": f"{e}; the output is what was generated until then", "type": "server_error",
            "param": None, "code": "shutdown"}


def request_error(out: RequestOutput) -> dict:
    """The OpenAI-style error of a request the engine finished with finish_reason "error" (its
    logits went non-finite, code "non_finite_logits"): status 422 without streaming, the
    stream's last event before [DONE] with it."""
    return {"message": out.error, "type": "invalid_request_error", "param": None,
            "code": out.error_code}


def sse(obj) -> bytes:
    return b"data: " + json_dumps(obj).encode() + b"\n\n"


async def admit(request: web.Request, ctx: ServerContext, req: GenRequest, rid: str) -> RequestStream:
    """Submit to the engine; its AdmissionError (400/404/429) and EngineStopped (503) reach
    the error middleware (server/app.py)."""
    return await ctx.engine.submit(request_fields.engine_request_id(request, rid),
                                   req.prompt_ids, req.params,
                                   client_id=ctx.client_id(request, req.user),
                                   adapter=ctx.adapter_of(req.model),
                                   cache_salt=req.cache_salt)


async def run_request(request: web.Request, ctx: ServerContext, req: GenRequest, rid: str, *,
                      first: Callable[[], dict] | None, chunk: Callable, full: Callable,
                      usage_chunk: Callable) -> web.StreamResponse:
    req = request_fields.prepare(request, req, ctx.max_model_len)
    stream = await admit(request, ctx, req, rid)
    fp = request_fields.fingerprint(ctx.model_name)

    tops: list = []    # each output token's top alternatives, when the request asks for them

    def whole(last, logprobs) -> dict:
        if tops:
            last = dataclasses.replace(last, new_top_logprobs=tops)
        return request_fields.annotate(request, full(last, last.text, last.token_ids, logprobs),
                                       [last], req.prompt_ids, fp)
    try:
        if req.stream:
            return await _stream(request, ctx, req, stream, first, chunk, usage_chunk, fp)
        last, logprobs = None, [] if req.logprobs else None
        try:
            async for out in stream:
                last = out
                if logprobs is not None and out.new_logprobs:
                    logprobs.extend(out.new_logprobs)
                if out.new_top_logprobs:
                    tops.extend(out.new_top_logprobs)
        except EngineError as e:
            raise ApiError(500, str(e), code="engine_error") from None
        except RequestCut as e:   # the drain's grace ran out: answer with what there is
            last = cut_output(rid, last, len(req.prompt_ids))
            body = whole(last, logprobs)
            body["error"] = cut_error(e)
            return web.json_response(body, dumps=json_dumps)
        except EngineStopped as e:
            raise ApiError(503, str(e), code="unavailable") from None
        if last.finish_reason == "error":   # this request alone failed (engine's RequestOutput)
            raise ApiError(422, last.error, code=last.error_code)
        return web.json_response(whole(last, logprobs), dumps=json_dumps)
    finally:
        stream.close()  # aborts in the engine (frees KV pages) if it did not finish


async def _stream(request, ctx, req, stream, first, chunk, usage_chunk, fp
                  ) -> web.StreamResponse:
    resp = web.StreamResponse(headers=SSE_HEADERS)
    await resp.prepare(request)
    observe = ctx.metrics.on_delivery
    stall_s = ctx.config.stream_stall_timeout_s
    last = None
    prompt_ids = req.prompt_ids   # vLLM's return_token_ids: the prompt's ids go in one chunk
    every_token = req.logprobs or request_fields.options(request).return_token_ids

    def annotated(obj, out):
        nonlocal prompt_ids
        obj = request_fields.annotate_chunk(request, obj, out, prompt_ids, fp)
        prompt_ids = None
        return obj
    try:
        if first is not None:
            await send(request, resp, sse(_with_usage(annotated(first(), None), req)), stall_s)
        async for out in stream:
            last = out
            if out.finish_reason == "error":   # this request alone failed: a last error event
                await send(request, resp, sse({"error": request_error(out)}), stall_s)
                await send(request, resp, DONE, stall_s)
                return resp
            if out.new_text or out.finished or (every_token and out.new_token_ids):
                await send(request, resp,
                           sse(_with_usage(annotated(chunk(out, out.finished), out), req)),
                           stall_s)
                if out.new_token_ids:
                    observe(time.perf_counter() - stream.last_emit_at, len(out.new_token_ids))
            if out.finished and req.include_usage:
                await send(request, resp, sse(annotated(usage_chunk(out), None)), stall_s)
        await send(request, resp, DONE, stall_s)
    except DISCONNECTED:
        log.debug("client went away during %s", stream.request_id)
        return resp
    except RequestCut as e:   # the drain's grace ran out: finish the stream with "abort"
        out = cut_output(stream.request_id, last, len(req.prompt_ids))
        try:
            await send(request, resp, sse(_with_usage(annotated(chunk(out, True), out), req)),
                       stall_s)
            if req.include_usage:
                await send(request, resp, sse(usage_chunk(out)), stall_s)
            await send(request, resp, sse({"error": cut_error(e)}), stall_s)
            await send(request, resp, DONE, stall_s)
        except DISCONNECTED:
            pass
    except (EngineError, EngineStopped) as e:
        code = "unavailable" if isinstance(e, EngineStopped) else "engine_error"
        try:
            await send(request, resp, sse({"error": {"message": str(e), "type": "server_error",
                                                     "param": None, "code": code}}), stall_s)
            await send(request, resp, DONE, stall_s)
        except DISCONNECTED:
            pass
    return resp


def _with_usage(obj: dict, req: GenRequest) -> dict:
    if req.include_usage:
        obj["usage"] = None
    return obj
