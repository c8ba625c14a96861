"""Running one generation request for a handler: submit it, then answer with SSE or one JSON."""
from __future__ import annotations

import json
import logging
import time
from typing import Callable

from aiohttp import web

from jaxserve.async_engine import EngineError, EngineStopped, RequestStream
from server.context import ServerContext
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


def sse(obj) -> bytes:
    return b"data: " + json_dumps(obj).encode() + b"\n\n"


async def admit(request: web.Request, ctx: ServerContext, req: GenRequest, rid: str) -> RequestStream:
    """Submit to the engine; its AdmissionError (400/404/429) and EngineStopped (503) reach
    the error middleware (server/app.py)."""
    return await ctx.engine.submit(rid, req.prompt_ids, req.params,
                                   client_id=ctx.client_id(request, req.user),
                                   adapter=ctx.adapter_of(req.model),
                                   cache_salt=req.cache_salt)


async def run_request(request: web.Request, ctx: ServerContext, req: GenRequest, rid: str, *,
                      first: Callable[[], dict] | None, chunk: Callable, full: Callable,
                      usage_chunk: Callable) -> web.StreamResponse:
    stream = await admit(request, ctx, req, rid)
    try:
        if req.stream:
            return await _stream(request, ctx, req, stream, first, chunk, usage_chunk)
        last, logprobs = None, [] if req.logprobs else None
        try:
            async for out in stream:
                last = out
                if logprobs is not None and out.new_logprobs:
                    logprobs.extend(out.new_logprobs)
        except EngineError as e:
            raise ApiError(500, str(e), code="engine_error") from None
        except EngineStopped as e:
            raise ApiError(503, str(e), code="unavailable") from None
        return web.json_response(full(last, last.text, last.token_ids, logprobs),
                                 dumps=json_dumps)
    finally:
        stream.close()  # aborts in the engine (frees KV pages) if it did not finish


async def _stream(request, ctx, req, stream, first, chunk, usage_chunk) -> web.StreamResponse:
    resp = web.StreamResponse(headers=SSE_HEADERS)
    await resp.prepare(request)
    observe = ctx.metrics.on_delivery
    try:
        if first is not None:
            await resp.write(sse(_with_usage(first(), req)))
        async for out in stream:
            if out.new_text or out.finished or (req.logprobs and out.new_token_ids):
                await resp.write(sse(_with_usage(chunk(out, out.finished), req)))
                if out.new_token_ids:
                    observe(time.perf_counter() - stream.last_emit_at, len(out.new_token_ids))
            if out.finished and req.include_usage:
                await resp.write(sse(usage_chunk(out)))
        await resp.write(DONE)
    except DISCONNECTED:
        log.debug("client went away during %s", stream.request_id)
        return resp
    except (EngineError, EngineStopped) as e:
        code = "unavailable" if isinstance(e, EngineStopped) else "engine_error"
        try:
            await resp.write(sse({"error": {"message": str(e), "type": "server_error",
                                            "param": None, "code": code}}))
            await resp.write(DONE)
        except DISCONNECTED:
            pass
    return resp


def _with_usage(obj: dict, req: GenRequest) -> dict:
    if req.include_usage:
        obj["usage"] = None
    return obj
