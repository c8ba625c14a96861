"""The aiohttp application: routes, the error/auth middleware, start-up, serving and the drain.

Shutdown (`serve`): the first SIGTERM/SIGINT starts `drain`: admission stops (new requests and
/health answer 503 while the listening socket stays open, so load balancers see the instance
leave), in-flight requests may finish for `shutdown_grace_s`, then the rest are cut, each with
what it had generated (server/streaming.py). A second signal cuts at once. Then the runner
closes the listening socket and the connections, gives handlers still writing their last bytes
SHUTDOWN_MARGIN_S, stops the engine thread, and `serve` returns.
"""
from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from jaxserve.admission import AdmissionError
from jaxserve.async_engine import AsyncEngine, EngineStopped
from server import endpoints, fields, lora, native_api, openai_api, request_fields
from server.config import ServerConfig
from server.connections import ServingRunner, raise_open_files_limit
from server.context import CTX_KEY, ServerContext, ctx_of
from server.metrics import ServingMetrics
from server.protocol import ApiError, admission_error
from server.streaming import DISCONNECTED

log = logging.getLogger("jaxserve.server")

AUTH_PREFIXES = ("/v1/", "/generate", "/tokenize", "/detokenize")


@web.middleware
async def errors_and_auth(request: web.Request, handler):
    ctx = ctx_of(request)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    try:
        if request.path.startswith(AUTH_PREFIXES) or request.path == "/metrics":
            _check_auth_header(request)
        if request.path.startswith(AUTH_PREFIXES):
            ctx.authenticate(request)
        if request.body_exists and resource is not None:
            await _read_body(request, ctx.config.body_read_timeout_s)
        resp = await handler(request)
    except (ApiError, AdmissionError, EngineStopped) as e:
        err = (admission_error(e) if isinstance(e, AdmissionError) else
               ApiError(503, str(e), code="unavailable") if isinstance(e, EngineStopped) else e)
        resp = web.json_response(err.body(), status=err.status)
        if err.status == 503:
            resp.headers["Retry-After"] = "1"
    except (HttpProcessingError, RequestPayloadError) as e:   # a body aiohttp cannot decode
        why = (getattr(e, "message", None) or getattr(e.__cause__, "message", None) or e)
        resp = web.json_response(ApiError(400, f"the request body cannot be read: {why}",
                                          code="invalid_body").body(), status=400)
        resp.force_close()   # the rest of that body cannot be read either
    except _BodyTimeout:
        ctx.metrics.on_request_timeout("body")
        resp = web.json_response(ApiError(408, f"the request body was not received within "
                                               f"{ctx.config.body_read_timeout_s:g} s",
                                          code="request_timeout").body(),
                                 status=408, headers={"Connection": "close"})
        await _answer_and_close(request, resp)
    except _BodyLost:   # nobody is left to read an answer; aiohttp drops it quietly
        log.debug("client closed the connection while sending its body: %s", request.path)
        resp = web.json_response(ApiError(400, "the connection closed before the request body "
                                               "was complete", code="invalid_body").body(),
                                 status=400)
        resp.force_close()
    except web.HTTPException as e:  # 404 / 405 / 413 raised by aiohttp itself
        if e.status < 400:
            raise
        resp = web.json_response(ApiError(e.status, e.reason or "error").body(), status=e.status,
                                 headers={k: v for k, v in e.headers.items()
                                          if k.lower() == "allow"})
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        resp = web.json_response(ApiError(500, "internal server error").body(), status=500)
    ctx.metrics.on_http(route, resp.status)
    return resp


class _BodyTimeout(Exception):
    pass


class _BodyLost(Exception):
    pass


def _check_auth_header(request: web.Request) -> None:
    """aiohttp decodes header bytes that are not UTF-8 into lone surrogates; an Authorization
    header holding them can be no key (and would fail wherever the key is encoded): 401."""
    auth = request.headers.get("Authorization")
    if auth is not None:
        try:
            auth.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(401, "the Authorization header is not valid UTF-8",
                           code="invalid_api_key") from None


async def _read_body(request: web.Request, timeout_s: float) -> None:
    """Read the whole body now, within timeout_s (else _BodyTimeout); aiohttp keeps it, so the
    handlers' own `await request.read()` returns it at once. Over client_max_size: aiohttp's
    413, as before."""
    try:
        await asyncio.wait_for(request.read(), timeout_s)
    except asyncio.TimeoutError:
        raise _BodyTimeout() from None
    except ConnectionResetError:
        raise _BodyLost() from None


async def _answer_and_close(request: web.Request, resp: web.StreamResponse) -> None:
    """Send resp now and close the connection after it (the client is still sending a body we
    will not wait for); aiohttp then finds the response sent and the connection gone."""
    try:
        await resp.prepare(request)
        await resp.write_eof()
    except DISCONNECTED:
        return
    if request.transport is not None:
        request.transport.close()   # after the buffered response is flushed


async def health(request: web.Request) -> web.Response:
    """200 while the engine thread runs and admits requests, else 503."""
    ctx = ctx_of(request)
    if ctx.engine.is_running and not ctx.engine.is_accepting:
        return web.json_response({"status": "draining", "in_flight": ctx.engine.num_in_flight},
                                 status=503, headers={"Retry-After": "1"})
    if not ctx.engine.is_running:
        return web.json_response({"status": "unavailable"}, status=503)
    return web.json_response({"status": "ok", "in_flight": ctx.engine.num_in_flight})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text (with API keys: an admin or metrics key)."""
    ctx = ctx_of(request)
    ctx.require_metrics(request)   # with API keys: admin or metrics role (401 / 403)
    try:
        stats = await asyncio.wait_for(ctx.engine.stats(), timeout=10.0)
    except Exception as e:  # engine down or busy for long: still expose the histograms
        log.warning("engine stats unavailable: %r", e)
        stats = {}
    text = ctx.metrics.render(ctx.model_name, stats, ctx.engine.num_waiting)
    return web.Response(text=text, content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


async def _on_startup(app: web.Application) -> None:
    ctx: ServerContext = app[CTX_KEY]
    ctx.engine.start()
    for name, path in ctx.config.lora_modules:  # operator-chosen: any path is allowed here
        await lora.load_adapter(ctx, name, path)
        log.info("loaded adapter %s from %s", name, path)
    await lora.set_limits(ctx)   # the caps on loaded adapters; start-up ones count toward them


async def _on_shutdown(app: web.Application) -> None:
    # After drain() (serve) nothing is in flight and this only stops the engine thread; a
    # runner cleaned up without a drain (tests) drains here, while its sites are already closed.
    ctx: ServerContext = app[CTX_KEY]
    await ctx.engine.shutdown(ctx.config.shutdown_grace_s)


async def drain(app: web.Application, grace_s: float | None = None) -> int:
    """Stop admission (new requests and /health: 503), let in-flight requests finish for
    grace_s (default: the config's shutdown_grace_s), then cut the rest: streams get a final
    chunk with finish_reason "abort", an error event and [DONE]; non-streaming requests a 200
    with the text so far, finish_reason "abort" and an "error" note. Returns how many were cut.
    The engine keeps running; the caller then cleans the runner up."""
    ctx: ServerContext = app[CTX_KEY]
    grace = ctx.config.shutdown_grace_s if grace_s is None else grace_s
    log.warning("draining: admission stopped; %d requests in flight may finish within %g s",
                ctx.engine.num_in_flight, grace)
    n_cut = await ctx.engine.drain(grace)
    if n_cut:
        log.warning("drain: grace over, %d requests cut with their partial output", n_cut)
    return n_cut


async def serve(app: web.Application, config: ServerConfig, *,
                stop: asyncio.Event | None = None, on_ready=None) -> None:
    """Serve app on config.host:port until SIGTERM/SIGINT (or `stop` is set), drain, clean up.
    on_ready(port) is called once the socket listens."""
    raise_open_files_limit(config.max_connections)
    runner = ServingRunner(app, config)
    await runner.setup()
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    signals = []

    def on_signal():
        if stop.is_set():
            log.warning("second signal: cutting in-flight requests now")
            app[CTX_KEY].engine.cut()
        stop.set()

    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, on_signal)
                signals.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                pass
        if on_ready is not None:
            on_ready(site._server.sockets[0].getsockname()[1])
        await stop.wait()
        await drain(app)
    finally:
        await runner.cleanup()
        for sig in signals:
            loop.remove_signal_handler(sig)


def create_app(async_engine: AsyncEngine, config: ServerConfig = ServerConfig(),
               metrics_: ServingMetrics | None = None) -> web.Application:
    """The application; the engine thread starts with the app and stops on its shutdown."""
    m = metrics_ or async_engine.observer or ServingMetrics()
    if async_engine.observer is None:
        async_engine.observer = m
    app = web.Application(client_max_size=config.max_request_bytes,
                          middlewares=[errors_and_auth])
    app[CTX_KEY] = ServerContext(async_engine, config, m)
    app.router.add_post("/v1/completions",
                        request_fields.guard(openai_api.completions, fields.COMPLETIONS))
    app.router.add_post("/v1/chat/completions",
                        request_fields.guard(openai_api.chat_completions, fields.CHAT))
    app.router.add_get("/v1/models", endpoints.list_models)
    app.router.add_get("/v1/models/{model_id:.+}", endpoints.retrieve_model)
    app.router.add_post("/v1/load_lora_adapter", lora.load_lora_handler)
    app.router.add_post("/v1/unload_lora_adapter", lora.unload_lora_handler)
    app.router.add_post("/generate", native_api.generate)
    app.router.add_post("/generate_stream", native_api.generate_stream)
    app.router.add_get("/health", health)
    app.router.add_get("/ping", health)
    app.router.add_post("/ping", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/tokenize", endpoints.tokenize)
    app.router.add_post("/detokenize", endpoints.detokenize)
    app.router.add_get("/version", endpoints.version)
    app.router.add_get("/openapi.json", endpoints.openapi)
    app.on_response_prepare.append(request_fields.on_prepare)
    app.on_startup.append(_on_startup)
    app.on_shutdown.append(_on_shutdown)
    return app
