"""Several choices in one response: `n` samples of a prompt, `best_of`, prompt lists.

A request with P prompts and best_of (>= n) samples each becomes P x best_of engine requests
("samples"), sample s = prompt p * best_of + j, each with its own engine request id and stream:
  1. the samples are submitted together (their "add" commands reach the engine thread in order,
     between two steps); sample j > 0 of a prompt names sample 0 in `fork_of`, so it starts
     from sample 0's prompt pages (scheduler/scheduler.py, "Samples"): the prompt is computed
     once, plus its last partial page per further sample. Samples that score their prompt
     (prompt logprobs) compute it each, as no shared page was computed by them;
  2. the handler gives each sample its own seed (the client's seed + j, so each choice is
     reproducible; without a seed each gets the engine's own random one);
  3. outputs are read as they come from every stream (`Merged`); streamed, each chunk carries
     its choice's `index` (prompt * n + j), choices interleaved in arrival order;
  4. best_of > n: the handler's `full` ranks each prompt's samples by cumulative log-probability
     (`Choice.cumulative_logprob`, the engine's chosen-token log-probabilities, asked for on
     every sample) and returns the n best, as vLLM; not streamable (the parser refuses it);
  5. the handler's exit (a client disconnect, an error, the end) closes every stream, which
     aborts what is still running of every sample in the engine. Fairness (VTC) sees each
     sample as a request of the client: its tokens are all charged, shared prompt pages at the
     cached-token weight.
Refused admission of any sample refuses the whole request (the samples admitted are aborted).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable

from aiohttp import web

from jaxserve.async_engine import EngineError, EngineStopped, RequestCut, RequestStream
from jaxserve.outputs import RequestOutput
from server import request_fields
from server.context import ServerContext
from server.protocol import ApiError, GenRequest, json_dumps
from server.streaming import (DISCONNECTED, DONE, SSE_HEADERS, cut_error, cut_output,
                              request_error, send, sse)

MAX_SAMPLES = 256   # engine requests one HTTP request may fan out to (prompts x best_of)


@dataclass
class Choice:
    """One sample: its request, and what its stream has delivered so far."""
    index: int                        # the sample's place in the request: prompt * best_of + j
    prompt_index: int
    req: GenRequest
    fork_of: int | None = None        # the sample whose prompt pages it starts from
    last: RequestOutput | None = None
    logprobs: list = field(default_factory=list)    # each token's entry of new_logprobs
    top_logprobs: list = field(default_factory=list)   # each token's new_top_logprobs entry
    prompt_logprobs: list | None = None             # RequestOutput.prompt_logprobs
    num_outputs: int = 0                            # outputs delivered (0: none yet)

    def add(self, out: RequestOutput) -> None:
        self.last = out
        self.num_outputs += 1
        if out.new_logprobs:
            self.logprobs.extend(out.new_logprobs)
            tops = getattr(out, "new_top_logprobs", None)
            self.top_logprobs.extend(tops or [()] * len(out.new_logprobs))
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs

    @property
    def cumulative_logprob(self) -> float:
        """The sum of its tokens' log-probabilities (best_of's ranking; -inf for a sample
        with a non-finite one)."""
        total = 0.0
        for x in self.logprobs:
            x = x[0] if isinstance(x, tuple) else x
            if x is None or x != x:
                return float("-inf")
            total += x
        return total


def best(choices: list[Choice], n: int) -> list[Choice]:
    """The n samples of highest cumulative log-probability, best first (stable for ties)."""
    return sorted(choices, key=lambda c: -c.cumulative_logprob)[:n]


class Merged:
    """(sample, output) from several streams as each comes, until every stream has finished;
    a stream's exception (EngineError, RequestCut, ...) is raised at once. `close()` stops the
    readers (the caller closes the streams)."""

    def __init__(self, streams: list[RequestStream]):
        self.streams = streams
        self._queue: asyncio.Queue = asyncio.Queue()
        self._left = len(streams)
        self._tasks = [asyncio.ensure_future(self._pump(i, s)) for i, s in enumerate(streams)] \
            if len(streams) > 1 else []

    async def _pump(self, i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                self._queue.put_nowait((i, out, None))
                # let the other readers take theirs: one step's outputs of every sample come
                # before the next step's, whatever has piled up in the streams meanwhile
                await asyncio.sleep(0)
            self._queue.put_nowait((i, None, None))
        except asyncio.CancelledError:
            raise
        except Exception as e:   # noqa: BLE001 -- handed to the reader
            self._queue.put_nowait((i, None, e))

    def __aiter__(self) -> "Merged":
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if len(self.streams) == 1:   # one stream: read it directly
            return 0, await self.streams[0].__anext__()
        while self._left:
            i, out, err = await self._queue.get()
            if err is not None:
                raise err
            if out is not None:
                return i, out
            self._left -= 1
        raise StopAsyncIteration

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()


async def submit(request: web.Request, ctx: ServerContext, choices: list[Choice],
                 rid: str) -> list[RequestStream]:
    """Admit every sample (a sample's `fork_of` names an earlier one); if any is refused, the
    others are closed (aborted) and its error raised."""
    ids = [request_fields.engine_request_id(request, rid if len(choices) == 1 else f"{rid}-{i}")
           for i in range(len(choices))]
    client = ctx.client_id(request, choices[0].req.user)

    def one(c: Choice):
        kw = {} if c.fork_of is None else {"fork_of": ids[c.fork_of]}
        return ctx.engine.submit(ids[c.index], c.req.prompt_ids, c.req.params, client_id=client,
                                 adapter=ctx.adapter_of(c.req.model),
                                 cache_salt=c.req.cache_salt, **kw)
    results = await asyncio.gather(*(one(c) for c in choices), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        for r in results:
            if isinstance(r, RequestStream):
                r.close()
        raise errors[0]
    return results


def _with_usage(obj: dict, include_usage: bool) -> dict:
    if include_usage:
        obj["usage"] = None
    return obj


def annotate(request: web.Request, body: dict, picked: list[Choice], fp: str) -> dict:
    """request_fields.annotate for a body whose choices are `picked` (in order): each choice's
    RequestOutput and prompt ids (prompt lists: several)."""
    outs = [c.last for c in picked]
    prompts = {tuple(c.req.prompt_ids) for c in picked}
    if len(prompts) <= 1:
        return request_fields.annotate(request, body, outs, picked[0].req.prompt_ids, fp)
    for d, c in zip(body["choices"], picked):
        request_fields.annotate(request, {"object": body["object"], "choices": [d]}, outs,
                                c.req.prompt_ids, fp)
    body.setdefault("system_fingerprint", fp)
    return body


async def run_choices(request: web.Request, ctx: ServerContext, choices: list[Choice], rid: str,
                      *, stream: bool, include_usage: bool, every_token: bool,
                      first: Callable[[Choice], dict] | None,
                      chunk: Callable[[Choice, RequestOutput], dict],
                      full: Callable[[list[Choice]], tuple[dict, list[Choice]]],
                      usage: Callable[[list[Choice]], dict]) -> web.StreamResponse:
    """Run the samples and answer: `full(choices)` -> (the whole body, the choices it holds in
    order); streamed, `first(choice)` (a choice's opening chunk, or None), `chunk(choice, out)`
    per output (the choice has taken `out` already), `usage(choices)` for the usage chunk."""
    streams = await submit(request, ctx, choices, rid)
    fp = request_fields.fingerprint(ctx.model_name)
    merged = Merged(streams)
    try:
        if stream:
            return await _stream(request, ctx, choices, streams, merged, fp, include_usage,
                                 every_token, first, chunk, usage)
        try:
            async for i, out in merged:
                choices[i].add(out)
        except EngineError as e:
            raise ApiError(500, str(e), code="engine_error") from None
        except RequestCut as e:   # the drain's grace ran out: answer with what there is
            for c, s in zip(choices, streams):
                if c.last is None or not c.last.finished:
                    c.last = cut_output(s.request_id, c.last, len(c.req.prompt_ids))
            body, picked = full(choices)
            body = annotate(request, body, picked, fp)
            body["error"] = cut_error(e)
            return web.json_response(body, dumps=json_dumps)
        except EngineStopped as e:
            raise ApiError(503, str(e), code="unavailable") from None
        for c in choices:   # a sample alone failed (its logits went non-finite)
            if c.last.finish_reason == "error":
                raise ApiError(422, c.last.error, code=c.last.error_code)
        body, picked = full(choices)
        return web.json_response(annotate(request, body, picked, fp), dumps=json_dumps)
    finally:
        merged.close()
        for s in streams:
            s.close()   # aborts in the engine (frees KV pages) what did not finish


async def _stream(request, ctx, choices, streams, merged, fp, include_usage, every_token, first,
                  chunk, usage) -> web.StreamResponse:
    resp = web.StreamResponse(headers=SSE_HEADERS)
    await resp.prepare(request)
    observe = ctx.metrics.on_delivery
    stall_s = ctx.config.stream_stall_timeout_s
    opened = [False] * len(choices)   # the choice's prompt ids went out (return_token_ids)

    def annotated(c: Choice, obj: dict, out) -> dict:
        prompt = None if opened[c.index] else c.req.prompt_ids
        opened[c.index] = True
        return _with_usage(request_fields.annotate_chunk(request, obj, out, prompt, fp),
                           include_usage)
    try:
        if first is not None:
            for c in choices:
                await send(request, resp, sse(annotated(c, first(c), None)), stall_s)
        async for i, out in merged:
            c = choices[i]
            c.add(out)
            if out.finish_reason == "error":   # this sample alone failed: a last error event
                await send(request, resp, sse({"error": request_error(out)}), stall_s)
                await send(request, resp, DONE, stall_s)
                return resp
            if out.new_text or out.finished or (every_token and out.new_token_ids):
                await send(request, resp, sse(annotated(c, chunk(c, out), out)), stall_s)
                if out.new_token_ids:
                    observe(time.perf_counter() - streams[i].last_emit_at,
                            len(out.new_token_ids))
        if include_usage:
            body = request_fields.annotate_chunk(request, usage(choices), None, None, fp)
            await send(request, resp, sse(body), stall_s)
        await send(request, resp, DONE, stall_s)
    except DISCONNECTED:
        return resp
    except RequestCut as e:   # the drain's grace ran out: finish every open choice with "abort"
        try:
            for c, s in zip(choices, streams):
                if c.last is not None and c.last.finished:
                    continue
                out = cut_output(s.request_id, c.last, len(c.req.prompt_ids))
                c.last = out
                await send(request, resp, sse(annotated(c, chunk(c, out), out)), stall_s)
            if include_usage:
                await send(request, resp, sse(usage(choices)), stall_s)
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
