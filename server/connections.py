"""Connection-level guards under aiohttp: a cap on open connections and a headers-read timeout.

`ServingRunner` is an aiohttp AppRunner whose protocol factory (`GuardedServer`) is aiohttp's
own `web.Server` with three additions:
  - at most `max_connections` connections are served at once. A connection accepted beyond the
    cap gets `_Refusal` instead of aiohttp's protocol: a complete `503` response with
    `Connection: close`, sent at once without waiting for the request, after which the
    connection is closed (on the client's EOF, or after REFUSAL_LINGER_S, reading and dropping
    whatever the client sends so that the close is a FIN, not a reset that could destroy the
    503 before the client reads it).
  - requests aiohttp answers itself, before any middleware runs (a body its HTTP parser cannot
    decode, a malformed request line), get the OpenAI error body in JSON (`handle_error`).
  - a connection that has not completed the headers of its first request within
    `header_read_timeout_s` of being accepted is closed. The timer is disarmed when aiohttp
    builds that first request (its request factory runs once the headers are parsed). Later
    requests on a kept-alive connection are bounded by aiohttp's keep-alive timer, which closes
    a connection waiting for its next request's headers `keep_alive_timeout_s` after the last
    response (aiohttp >= 3.10 also arms it when the connection opens).
The keep-alive timeout itself is aiohttp's `keepalive_timeout`. Bodies are bounded in the
application (server/app.py, `--body-read-timeout-s`), slow readers of streams in
server/streaming.py (`--stream-stall-timeout-s`).
"""
from __future__ import annotations

import asyncio
import json
import logging
import resource
import weakref

from aiohttp import web
from aiohttp.http_exceptions import PayloadEncodingError
from aiohttp.web_protocol import RequestHandler

from server.config import ServerConfig
from server.context import CTX_KEY
from server.protocol import ApiError

log = logging.getLogger("jaxserve.server")

REFUSAL_LINGER_S = 2.0


def _refusal_bytes(max_connections: int) -> bytes:
    body = json.dumps(ApiError(503, f"too many open connections (max_connections="
                                    f"{max_connections}); retry later",
                               code="too_many_connections").body()).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class _Refusal(asyncio.Protocol):
    """A connection over the cap: answer 503, half-close, drop what arrives, close."""

    def __init__(self, loop: asyncio.AbstractEventLoop, response: bytes):
        self._loop = loop
        self._response = response
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        self._transport = transport
        transport.write(self._response)
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = self._loop.call_later(REFUSAL_LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the transport closes itself

    def connection_lost(self, exc) -> None:
        if self._timer is not None:
            self._timer.cancel()


class _GuardedHandler(RequestHandler):
    """aiohttp's protocol with a deadline for the first request's headers."""

    header_read_timeout_s: float | None = None

    def connection_made(self, transport) -> None:
        self._first_request_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        if self.header_read_timeout_s:
            self._first_request_timer = self._loop.call_later(
                self.header_read_timeout_s, self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        self._first_request_timer = None
        log.info("closing a connection that sent no complete request headers in %g s",
                 self.header_read_timeout_s)
        metrics = getattr(self._manager, "metrics", None)
        if metrics is not None:
            metrics.on_request_timeout("header")
        self.force_close()

    def request_started(self) -> None:
        if self._first_request_timer is not None:
            self._first_request_timer.cancel()
            self._first_request_timer = None

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's answer to a request it could not hand to the application (a body its HTTP
        parser cannot decode: garbage under gzip/deflate that arrived with the headers, br or
        zstd without their libraries; malformed request lines or headers), or to an error
        that escaped the error middleware (server/app.py): the OpenAI error body in JSON
        instead of aiohttp's plain text; an undecodable body is code "invalid_body". aiohttp's
        own handling (logging; ConnectionError when a response is already under way) runs
        first, and the connection is closed after the answer, as aiohttp does."""
        super().handle_error(request, status, exc, message)
        if status >= 500:
            err = ApiError(status, "internal server error" if status == 500 else
                           "the request could not be completed in time")
        elif isinstance(exc, PayloadEncodingError):
            err = ApiError(status, f"the request body cannot be read: {message or exc.message}",
                           code="invalid_body")
        else:
            err = ApiError(status, f"malformed HTTP request: {message or status}")
        resp = web.Response(status=status, text=json.dumps(err.body()),
                            content_type="application/json")
        resp.force_close()
        return resp

    def connection_lost(self, exc) -> None:
        self.request_started()   # disarm
        if isinstance(self._manager, GuardedServer):
            self._manager.release(self)
        super().connection_lost(exc)


class GuardedServer(web.Server):
    """aiohttp's protocol factory with the connection cap and the headers deadline."""

    def __init__(self, handler, *, max_connections: int, header_read_timeout_s: float | None,
                 request_factory=None, metrics=None, **kwargs):
        super().__init__(handler, request_factory=request_factory, **kwargs)
        self.metrics = metrics   # ServingMetrics: refusals and header timeouts counted (or None)
        inner_factory = self.request_factory

        def request_factory_(message, payload, protocol, writer, task):
            if isinstance(protocol, _GuardedHandler):
                protocol.request_started()
            return inner_factory(message, payload, protocol, writer, task)

        self.request_factory = request_factory_
        self.max_connections = max_connections
        self.num_refused = 0
        # Counted when created, not when aiohttp registers them (connection_made comes a loop
        # iteration later, and one wake-up may accept many connections); a protocol asyncio
        # dropped without connecting it leaves the weak set by itself.
        self._open: weakref.WeakSet = weakref.WeakSet()
        self._refusal = _refusal_bytes(max_connections)
        self._handler_cls = type("GuardedHandler", (_GuardedHandler,),
                                 {"header_read_timeout_s": header_read_timeout_s})

    @property
    def num_open(self) -> int:
        """Connections being served (the ones the cap counts)."""
        return len(self._open)

    def release(self, handler: RequestHandler) -> None:
        self._open.discard(handler)

    def __call__(self):
        if len(self._open) >= self.max_connections:
            self.num_refused += 1
            if self.metrics is not None:
                self.metrics.on_connection_refused()
            return _Refusal(self._loop, self._refusal)
        handler = self._handler_cls(self, loop=self._loop, **self._kwargs)
        self._open.add(handler)
        return handler


class ServingRunner(web.AppRunner):
    """AppRunner serving through GuardedServer, configured from a ServerConfig."""

    def __init__(self, app: web.Application, config: ServerConfig, **kwargs):
        kwargs.setdefault("handler_cancellation", True)
        kwargs.setdefault("keepalive_timeout", config.keep_alive_timeout_s)
        kwargs.setdefault("shutdown_timeout", SHUTDOWN_MARGIN_S)
        super().__init__(app, **kwargs)
        self._config = config
        ctx = app.get(CTX_KEY)   # the app's ServingMetrics count refusals and header timeouts
        self._metrics = ctx.metrics if ctx is not None else None

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()   # runs the app's start-up; aiohttp's own Server
        # The same arguments again (aiohttp's Server keeps them in _loop and _kwargs):
        return GuardedServer(plain.request_handler, request_factory=plain.request_factory,
                             handler_cancellation=plain.handler_cancellation,
                             loop=plain._loop, max_connections=self._config.max_connections,
                             header_read_timeout_s=self._config.header_read_timeout_s,
                             metrics=self._metrics, **plain._kwargs)


# After the drain, handlers that are still writing their last bytes get this long before
# aiohttp cancels them (the runner's shutdown_timeout).
SHUTDOWN_MARGIN_S = 5.0


def raise_open_files_limit(max_connections: int, spare: int = 256) -> None:
    """Raise the soft RLIMIT_NOFILE towards max_connections + spare (up to the hard limit), so
    that the connection cap, not accept() failing with EMFILE, is what turns clients away."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + spare
    if soft >= want:
        return
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if new > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft < want:
        log.warning("the open-files limit (%d) is below --max-connections %d + %d spare; "
                    "accept() may fail before the cap is reached", soft, max_connections, spare)
