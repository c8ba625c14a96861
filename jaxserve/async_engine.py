"""AsyncEngine: the bridge between asyncio handlers and the engine's own thread.

A request's life through this module:
  1. A handler calls `await submit(...)` on the event loop with token ids (the server
     tokenized them). Over `max_waiting` requests that have no token yet -> an AdmissionError
     of kind OVERLOAD at once. Otherwise a RequestStream (an asyncio.Queue plus timestamps) is
     registered and an "add" command goes into a thread-safe command queue.
  2. The engine thread sleeps in a blocking `get()` on that queue whenever the engine has no
     unfinished work, so an idle server burns no CPU. It wakes, calls `engine.add_request`, and
     answers the handler's admission future through `loop.call_soon_threadsafe`: either accepted
     or the engine's AdmissionError, which the server turns into a 4xx.
  3. While work remains the thread loops: drain commands (add, abort, calls), `engine.step()`,
     then one `loop.call_soon_threadsafe(self._deliver, outputs, t)` per step hands every
     RequestOutput of that step to the event loop, where each goes into its stream's queue with
     `put_nowait`. Nothing on either side polls.
  4. The handler iterates the stream (`async for out in stream`) until an output is finished.
  5. If the handler stops early (client disconnect cancels it, or it breaks out), its `finally`
     calls the stream's `close()`, which sends an "abort" command; the engine thread calls `engine.abort`, which frees the
     request's KV pages. Abort of an already finished or unknown id is harmless.
  6. If `engine.step()` raises, every request in flight is aborted in the engine and its handler
     gets an EngineError (a 500 or an SSE error event); the thread keeps serving new requests
     unless steps fail MAX_STEP_FAILURES times in a row, when it stops and /health turns 503.
  7. `drain()` refuses new requests (EngineStopped), lets in-flight ones finish for a grace
     period (`cut()` ends it early), then cuts the rest: each gets a RequestCut after the outputs
     already delivered to it, and is aborted in the engine. `shutdown()` drains, then sends
     "stop" and joins the thread.
Engine methods are only ever called on the engine thread: stats and LoRA management go through
`call()`, which runs a function there between steps and returns its result to the loop.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Protocol

from jaxserve.admission import OVERLOAD, AdmissionError
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams
from jaxserve.tokenizer import Tokenizer

log = logging.getLogger("jaxserve.async_engine")

MAX_STEP_FAILURES = 3  # consecutive failed steps before the engine thread gives up


class EngineStopped(Exception):
    """The engine is shutting down (or its thread died) and takes no new requests."""


class RequestCut(EngineStopped):
    """The server shut down before this request finished: the grace period ran out. Its
    consumer has already received every output the engine delivered for it."""


class EngineError(Exception):
    """The engine failed while running a request (not the request's fault)."""


class EngineLike(Protocol):
    tokenizer: Tokenizer        # copied for the handlers (the engine thread keeps its own)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, *,
                    client_id: str = ..., adapter: str | None = ...,
                    cache_salt: str | None = ..., fork_of: str | None = ...) -> None: ...
    def abort(self, request_id: str) -> None: ...
    def step(self) -> list[RequestOutput]: ...
    def has_unfinished(self) -> bool: ...
    def stats(self) -> dict: ...


class Observer(Protocol):
    """Receives per-request latencies (the server's metrics implement it)."""
    def on_first_token(self, ttft_s: float, queue_s: float) -> None: ...
    def on_token_gap(self, itl_s: float, num_tokens: int) -> None: ...
    def on_finished(self, e2e_s: float, num_prompt: int, num_output: int, reason: str | None) -> None: ...


@dataclass(frozen=True)
class AsyncEngineConfig:
    max_waiting: int = 512          # requests admitted but without a first token; more -> 429
    shutdown_grace_s: float = 10.0  # in-flight requests may finish for this long on shutdown

    def __post_init__(self):
        if not isinstance(self.max_waiting, int) or self.max_waiting < 1:
            raise ValueError(f"max_waiting must be an integer >= 1, got {self.max_waiting!r}")
        if self.shutdown_grace_s < 0:
            raise ValueError("shutdown_grace_s must be >= 0")


class RequestStream:
    """One request's outputs on the event loop, as an async iterator. Whoever stops reading
    before the last output must `close()` it (or use `async with`): that aborts the request."""

    def __init__(self, owner: "AsyncEngine", request_id: str):
        self.request_id = request_id
        self._owner = owner
        self._queue: asyncio.Queue = asyncio.Queue()
        self.arrival = time.perf_counter()
        self.first_token_at: float | None = None   # engine-thread time of the first output
        self.last_token_at: float | None = None
        self.last_emit_at: float = 0.0             # engine-thread time the latest output left the step
        self.finished = False       # the consumer has seen the last output
        self.engine_done = False    # the engine finished it (nothing to abort)
        self.closed = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            self.close()
            raise item
        out, self.last_emit_at = item
        if out.finished:
            self.finished = True
            self.close()
        return out

    async def __aenter__(self) -> "RequestStream":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._owner._release(self)


class AsyncEngine:
    def __init__(self, engine: EngineLike, config: AsyncEngineConfig = AsyncEngineConfig(),
                 observer: Observer | None = None):
        self.engine = engine
        self.config = config
        self.observer = observer
        # Read-only facts, copied before the thread starts so handlers never touch the engine.
        self.model_name: str = getattr(engine, "model_name", "model")
        self.max_model_len: int = int(getattr(engine, "max_model_len", 2048))
        # The handlers' own tokenizer: HF tokenizers are not safe to share with a busy thread.
        self.tokenizer = engine.tokenizer.copy()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._num_waiting = 0            # streams without a first output (event-loop side count)
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._dead: BaseException | None = None
        self._drained: asyncio.Event | None = None
        self._cut_now: asyncio.Event | None = None
        self.num_steps = 0
        self._engine_ids: set[str] = set()   # engine thread only: ids the engine holds
        self._num_step_failures = 0

    # ---------------------------------------------------------------- lifecycle (event loop)
    def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="jaxserve-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    @property
    def is_accepting(self) -> bool:
        """Running and not draining: submit() would take a request."""
        return self._accepting and self.is_running

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    async def drain(self, grace_s: float | None = None) -> int:
        """Stop taking requests (submit raises EngineStopped from now on), let in-flight ones
        finish for up to grace_s seconds (or until cut()), then cut the rest: each stream gets
        a RequestCut after its delivered outputs and is aborted in the engine (its pages are
        freed). Returns the number of requests cut. The engine thread keeps running."""
        self._accepting = False
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        if self._streams and self.is_running:
            self._drained = asyncio.Event()  # set by _release when the last stream goes
            if self._cut_now is None:
                self._cut_now = asyncio.Event()
            waits = [asyncio.ensure_future(self._drained.wait()),
                     asyncio.ensure_future(self._cut_now.wait())]
            try:
                await asyncio.wait(waits, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
        streams = list(self._streams.values())
        for stream in streams:
            stream._queue.put_nowait(RequestCut(
                f"the server shut down before this request finished (grace {grace:g} s)"))
            stream.close()
        return len(streams)

    def cut(self) -> None:
        """End a running drain's grace period now (a second SIGTERM does this)."""
        if self._cut_now is None:
            self._cut_now = asyncio.Event()
        self._cut_now.set()

    async def shutdown(self, grace_s: float | None = None) -> None:
        """drain(grace_s), then stop the engine thread and wait for it."""
        if self._thread is None:
            return
        await self.drain(grace_s)
        self._commands.put(("stop",))
        thread, self._thread = self._thread, None
        await asyncio.get_running_loop().run_in_executor(None, thread.join, 30.0)

    # ---------------------------------------------------------------- requests (event loop)
    async def submit(self, request_id: str | None, prompt_ids: list[int], params: SamplingParams,
                     client_id: str = "anonymous", adapter: str | None = None,
                     cache_salt: str | None = None, fork_of: str | None = None) -> RequestStream:
        """Admit a request; raises EngineStopped or AdmissionError (the queue bound here, the
        engine's checks). The returned stream yields RequestOutputs until one is finished.
        fork_of: another sample of the same prompt, submitted before (LLMEngine.add_request)."""
        if not self._accepting or not self.is_running:
            raise EngineStopped(
                f"the engine thread died: {self._dead!r}" if self._dead is not None else
                "the server is shutting down and takes no new requests" if self.is_running else
                "the engine is not running")
        if self._num_waiting >= self.config.max_waiting:
            raise AdmissionError(f"{self._num_waiting} requests are already waiting "
                                 f"(max_waiting={self.config.max_waiting}); retry later",
                                 kind=OVERLOAD, code="queue_full")
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self._streams:  # this bridge's own table (the server makes unique ids)
            raise ValueError(f"request id {rid!r} is already in flight")
        stream = RequestStream(self, rid)
        self._streams[rid] = stream
        self._num_waiting += 1
        admitted = self._loop.create_future()
        self._commands.put(("add", rid, prompt_ids, params, client_id, adapter, cache_salt,
                            fork_of, admitted))
        try:
            await admitted
        except BaseException:
            stream.close()  # cancelled while queued, or refused: abort is harmless either way
            raise
        return stream

    async def generate(self, request_id: str | None, prompt_ids: list[int], params: SamplingParams,
                       client_id: str = "anonymous", adapter: str | None = None,
                       cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Async iterator of RequestOutput; errors of admission surface on the first item."""
        stream = await self.submit(request_id, prompt_ids, params, client_id, adapter,
                                   cache_salt)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    async def call(self, fn: Callable[[EngineLike], Any]) -> Any:
        """Run fn(engine) on the engine thread between steps; return (or raise) its result."""
        if not self.is_running:
            raise EngineStopped("the engine is not running")
        fut = self._loop.create_future()
        self._commands.put(("call", fn, fut))
        return await fut

    async def stats(self) -> dict:
        return await self.call(lambda e: e.stats())

    def _release(self, stream: RequestStream) -> None:
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]
            if not self._streams and self._drained is not None:
                self._drained.set()
            if stream.first_token_at is None:
                self._num_waiting -= 1
            if not stream.engine_done:
                self._commands.put(("abort", stream.request_id))

    def _deliver(self, outputs: list[RequestOutput], t_step: float, t_emit: float) -> None:
        """On the event loop: route one step's outputs to their streams."""
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted by its handler; the engine already got the abort
            n_new = len(out.new_token_ids)
            if stream.first_token_at is None and (n_new or out.finished):
                stream.first_token_at = t_emit
                self._num_waiting -= 1
                if self.observer:
                    # Queue time ends when the step that produced the first token began (so it
                    # includes earlier chunks of a chunked prefill).
                    self.observer.on_first_token(t_emit - stream.arrival,
                                                 max(0.0, t_step - stream.arrival))
            elif n_new and stream.last_token_at is not None and self.observer:
                self.observer.on_token_gap(t_emit - stream.last_token_at, n_new)
            if n_new:
                stream.last_token_at = t_emit
            if out.finished:
                stream.engine_done = True  # the engine freed it; release() must not abort
                self._observe_end(stream, out, t_emit)
            stream._queue.put_nowait((out, t_emit))

    def _observe_end(self, stream: RequestStream, out: RequestOutput, t: float) -> None:
        if self.observer:
            self.observer.on_finished(t - stream.arrival, out.num_prompt_tokens,
                                      len(out.token_ids), out.finish_reason)

    def _fail_requests(self, request_ids: list[str], message: str) -> None:
        """On the event loop: these requests were aborted in the engine after a failed step."""
        for rid in request_ids:
            stream = self._streams.get(rid)
            if stream is not None:
                stream.engine_done = True
                stream._queue.put_nowait(EngineError(message))

    def _fail_all(self, exc: BaseException) -> None:
        """On the event loop: the engine thread died; fail every stream."""
        for stream in list(self._streams.values()):
            stream._queue.put_nowait(EngineError(f"the engine failed: {exc!r}"))

    # ---------------------------------------------------------------- engine thread
    def _reply(self, fut: asyncio.Future, result: Any = None, exc: BaseException | None = None) -> None:
        def settle():
            if fut.done():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)
        self._loop.call_soon_threadsafe(settle)

    def _handle(self, cmd: tuple) -> bool:
        """Run one command on the engine thread; False means stop."""
        kind = cmd[0]
        if kind == "add":
            _, rid, prompt_ids, params, client_id, adapter, cache_salt, fork_of, fut = cmd
            try:
                kw = {} if fork_of is None else {"fork_of": fork_of}
                self.engine.add_request(rid, prompt_ids, params, client_id=client_id,
                                        adapter=adapter, cache_salt=cache_salt, **kw)
            except Exception as e:  # AdmissionError: the request's fault
                self._reply(fut, exc=e)
            else:
                self._engine_ids.add(rid)
                self._reply(fut, True)
        elif kind == "abort":
            self._engine_ids.discard(cmd[1])
            self.engine.abort(cmd[1])
        elif kind == "call":
            _, fn, fut = cmd
            try:
                self._reply(fut, fn(self.engine))
            except Exception as e:
                self._reply(fut, exc=e)
        elif kind == "stop":
            return False
        return True

    def _step_failed(self, exc: Exception) -> None:
        """A step raised: fail and abort everything in flight (their state may be half-updated)
        and keep serving; several failures in a row mean the engine is broken -> re-raise."""
        self._num_step_failures += 1
        log.exception("engine step failed; aborting %d requests", len(self._engine_ids))
        if self._num_step_failures >= MAX_STEP_FAILURES:
            raise exc
        failed = list(self._engine_ids)
        self._engine_ids.clear()
        for rid in failed:
            try:
                self.engine.abort(rid)
            except Exception:
                log.exception("abort of %s after a failed step raised", rid)
        self._loop.call_soon_threadsafe(self._fail_requests, failed, f"the engine step failed: {exc!r}")

    def _run(self) -> None:
        try:
            while True:
                # Block (no timeout, no spinning) until a command arrives when there is no work.
                if not self.engine.has_unfinished():
                    if not self._handle(self._commands.get()):
                        return
                while True:  # drain whatever else arrived
                    try:
                        cmd = self._commands.get_nowait()
                    except queue.Empty:
                        break
                    if not self._handle(cmd):
                        return
                if not self.engine.has_unfinished():
                    continue
                t_step = time.perf_counter()
                try:
                    outputs = self.engine.step()
                except Exception as e:
                    self._step_failed(e)
                    continue
                self._num_step_failures = 0
                self.num_steps += 1
                for out in outputs:
                    if out.finished:
                        self._engine_ids.discard(out.request_id)
                if outputs:
                    self._loop.call_soon_threadsafe(self._deliver, outputs, t_step,
                                                    time.perf_counter())
        except BaseException as e:  # a bug in the engine: fail loudly, never hang clients
            log.exception("engine thread died")
            self._dead = e
            try:
                self._loop.call_soon_threadsafe(self._fail_all, e)
            except RuntimeError:
                pass
