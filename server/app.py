"""The aiohttp application: routes, the error/auth middleware, start-up and graceful shutdown."""
from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from jaxserve.admission import AdmissionError
from jaxserve.async_engine import AsyncEngine, EngineStopped
from server import lora, native_api, openai_api
from server.config import ServerConfig
from server.context import CTX_KEY, ServerContext, ctx_of
from server.metrics import ServingMetrics
from server.protocol import ApiError, admission_error

log = logging.getLogger("jaxserve.server")

AUTH_PREFIXES = ("/v1/", "/generate")


@web.middleware
async def errors_and_auth(request: web.Request, handler):
    ctx = ctx_of(request)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    try:
        if request.path.startswith(AUTH_PREFIXES):
            ctx.authenticate(request)
        resp = await handler(request)
    except (ApiError, AdmissionError, EngineStopped) as e:
        err = (admission_error(e) if isinstance(e, AdmissionError) else
               ApiError(503, str(e), code="unavailable") if isinstance(e, EngineStopped) else e)
        resp = web.json_response(err.body(), status=err.status)
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


async def health(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    if not ctx.engine.is_running:
        return web.json_response({"status": "unavailable"}, status=503)
    return web.json_response({"status": "ok", "in_flight": ctx.engine.num_in_flight})


async def metrics(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
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


async def _on_shutdown(app: web.Application) -> None:
    ctx: ServerContext = app[CTX_KEY]
    await ctx.engine.shutdown(ctx.config.shutdown_grace_s)


def create_app(async_engine: AsyncEngine, config: ServerConfig = ServerConfig(),
               metrics_: ServingMetrics | None = None) -> web.Application:
    """The application; the engine thread starts with the app and stops on its shutdown."""
    m = metrics_ or async_engine.observer or ServingMetrics()
    if async_engine.observer is None:
        async_engine.observer = m
    app = web.Application(client_max_size=config.max_request_bytes,
                          middlewares=[errors_and_auth])
    app[CTX_KEY] = ServerContext(async_engine, config, m)
    app.router.add_post("/v1/completions", openai_api.completions)
    app.router.add_post("/v1/chat/completions", openai_api.chat_completions)
    app.router.add_get("/v1/models", openai_api.list_models)
    app.router.add_post("/v1/load_lora_adapter", lora.load_lora_handler)
    app.router.add_post("/v1/unload_lora_adapter", lora.unload_lora_handler)
    app.router.add_post("/generate", native_api.generate)
    app.router.add_post("/generate_stream", native_api.generate_stream)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.on_startup.append(_on_startup)
    app.on_shutdown.append(_on_shutdown)
    return app
