"""S-LoRA's native endpoints: POST /generate and POST /generate_stream.

Request: {"inputs": str, "parameters": {max_new_tokens, do_sample, temperature, top_p, top_k,
seed, stop_sequences, ignore_eos}, "lora_dir": DIR | "adapter": NAME | "model": NAME,
"cache_salt": str (as on the OpenAI endpoints)}.
/generate answers {"generated_text": [text], "count_output_tokens": n, "finish_reason": r};
/generate_stream sends `data:{"token": {...}, "generated_text": null|text, "finished": bool}`.
A request the engine finished with finish_reason "error" (its logits went non-finite) gets a 422
with the OpenAI-style error body from /generate, and a last event
`{"error": message, "code": code, "finished": true, "finish_reason": "error"}` from
/generate_stream; its engine or shutdown errors end a stream with `{"error": message,
"finished": true}`.
"""
from __future__ import annotations

import time
import uuid

from aiohttp import web

from jaxserve.async_engine import EngineError, EngineStopped, RequestCut
from server.context import ctx_of
from server.lora import adapter_for_dir
from jaxserve.sampling_params import SamplingParams
from server.protocol import (ApiError, GenRequest, bad, finite_or_none, get_bool, get_int,
                             get_stop, get_str, json_dumps, parse_json_object, sampling_fields)
from server.streaming import DISCONNECTED, SSE_HEADERS, admit, cut_output, send


async def _parse(request: web.Request) -> GenRequest:
    ctx = ctx_of(request)
    body = parse_json_object(await request.read())
    inputs = body.get("inputs")
    if not isinstance(inputs, str):
        raise bad("'inputs' must be a string", "inputs")
    p = body.get("parameters", {})
    if p is None:
        p = {}
    if not isinstance(p, dict):
        raise bad("'parameters' must be an object", "parameters")
    fields = sampling_fields(p, "stop_sequences")
    fields["stop"] = fields["stop"] or get_stop(p, "stop")
    if not get_bool(p, "do_sample", False):
        fields["temperature"] = 0.0
    params = SamplingParams(max_tokens=get_int(p, "max_new_tokens", 16),
                            logprobs=get_bool(p, "details", False), **fields)
    lora_dir = get_str(body, "lora_dir")
    if lora_dir:
        model = await adapter_for_dir(ctx, lora_dir)
    else:
        model = get_str(body, "adapter") or get_str(body, "model")
    return GenRequest(prompt_ids=ctx.tokenizer.encode(inputs), params=params, model=model,
                      stream=False, include_usage=False, logprobs=False,
                      user=get_str(body, "user"), cache_salt=get_str(body, "cache_salt"))


async def generate(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    req = await _parse(request)
    stream = await admit(request, ctx, req, f"gen-{uuid.uuid4().hex}")
    note = None
    try:
        last = None
        async for out in stream:
            last = out
    except EngineError as e:
        raise ApiError(500, str(e), code="engine_error") from None
    except RequestCut as e:   # the drain's grace ran out: what there is, finish_reason "abort"
        last, note = cut_output(stream.request_id, last, len(req.prompt_ids)), str(e)
    except EngineStopped as e:
        raise ApiError(503, str(e), code="unavailable") from None
    finally:
        stream.close()
    if last.finish_reason == "error":   # this request alone failed (its logits went non-finite)
        raise ApiError(422, last.error, code=last.error_code)
    body = {"generated_text": [last.text], "count_output_tokens": len(last.token_ids),
            "finish_reason": last.finish_reason}
    if note is not None:
        body["error"] = note
    return web.json_response(body)


async def generate_stream(request: web.Request) -> web.StreamResponse:
    ctx = ctx_of(request)
    req = await _parse(request)
    stream = await admit(request, ctx, req, f"gen-{uuid.uuid4().hex}")
    resp = web.StreamResponse(headers=SSE_HEADERS)
    try:
        await resp.prepare(request)
        async for out in stream:
            if out.finish_reason == "error":   # this request alone failed: a last error event
                await send(request, resp, b"data:" + json_dumps(
                    {"error": out.error, "code": out.error_code, "finished": True,
                     "finish_reason": "error"}).encode() + b"\n\n",
                    ctx.config.stream_stall_timeout_s)
                break
            if not out.new_token_ids and not out.finished:
                continue
            lps = out.new_logprobs or []
            event = {"token": {"id": out.new_token_ids[-1] if out.new_token_ids else None,
                               "text": out.new_text,
                               "logprob": finite_or_none(lps[-1]) if lps else None,
                               "special": False},
                     "token_ids": out.new_token_ids,
                     "generated_text": out.text if out.finished else None,
                     "finished": out.finished,
                     "finish_reason": out.finish_reason if out.finished else None}
            await send(request, resp, b"data:" + json_dumps(event).encode() + b"\n\n",
                       ctx.config.stream_stall_timeout_s)
            if out.new_token_ids:
                ctx.metrics.on_delivery(time.perf_counter() - stream.last_emit_at,
                                        len(out.new_token_ids))
    except DISCONNECTED:
        pass
    except (EngineError, EngineStopped) as e:
        try:
            await send(request, resp, b"data:" + json_dumps({"error": str(e), "finished": True})
                       .encode() + b"\n\n", ctx.config.stream_stall_timeout_s)
        except DISCONNECTED:
            pass
    finally:
        stream.close()
    return resp
