"""Adapters as models: start-up modules, runtime load/unload, and the --lora-root path rule.

The registry is the engine's (`LLMEngine.lora_sources`); this module only asks it and sends it
load / unload calls.

A request can only ever make the server read a directory below the operator's --lora-root:
absolute paths outside it, `..` components and symlinks that resolve outside are refused.
"""
from __future__ import annotations

import os

from aiohttp import web

from server.context import ServerContext, ctx_of
from server.protocol import ApiError, bad, get_str, parse_json_object

NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.@/")


def resolve_under_root(root: str | None, path: str) -> str:
    """The real directory `path` names below `root`, or ApiError (never reads outside root)."""
    if root is None:
        raise ApiError(403, "loading adapters by path is disabled; the operator must start the "
                            "server with --lora-root DIR", code="lora_root_not_set")
    if not isinstance(path, str) or not path or "\x00" in path:
        raise bad("the adapter path must be a non-empty string", "lora_path")
    if ".." in path.replace("\\", "/").split("/"):
        raise ApiError(403, "adapter paths may not contain '..'", param="lora_path",
                       code="path_not_allowed")
    real = os.path.realpath(os.path.join(root, path))
    if real == root or os.path.commonpath([real, root]) != root:
        raise ApiError(403, f"adapter paths must be directories below the server's --lora-root",
                       param="lora_path", code="path_not_allowed")
    if not os.path.isdir(real):
        raise ApiError(404, f"no adapter directory {path!r} below --lora-root", param="lora_path",
                       code="adapter_not_found")
    return real


def check_name(ctx: ServerContext, name) -> str:
    if not isinstance(name, str) or not name or len(name) > 128 or not set(name) <= NAME_CHARS:
        raise bad("'lora_name' must be 1-128 characters of letters, digits and -_.@/",
                  "lora_name")
    if name in (ctx.model_name, ctx.engine.model_name):
        raise bad("'lora_name' may not be the base model's name", "lora_name")
    return name


async def load_adapter(ctx: ServerContext, name: str, path: str) -> None:
    """Load on the engine thread; its refusals (name taken, bad format, DoRA, wrong base) are
    AdmissionErrors (400)."""
    await ctx.engine.call(lambda e: e.add_lora(name, path))


async def adapter_for_dir(ctx: ServerContext, lora_dir: str) -> str:
    """S-LoRA's `lora_dir`: the adapter already loaded from that directory, else load it (only
    below --lora-root) under its path relative to the root."""
    if "\x00" in lora_dir:
        raise bad("'lora_dir' must not contain NUL", "lora_dir")
    loaded = await ctx.adapters()
    real = os.path.realpath(lora_dir) if os.path.isabs(lora_dir) else None
    for name, path in loaded.items():
        if (path is not None and os.path.realpath(path) == real) or name == lora_dir:
            return name
    real = resolve_under_root(ctx.config.lora_root, lora_dir)
    for name, path in loaded.items():
        if path is not None and os.path.realpath(path) == real:
            return name
    name = os.path.relpath(real, ctx.config.lora_root)
    await load_adapter(ctx, name, real)
    return name


async def load_lora_handler(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    ctx.authenticate(request)
    body = parse_json_object(await request.read())
    name = check_name(ctx, body.get("lora_name"))
    path = get_str(body, "lora_path")
    if path is None:
        raise bad("'lora_path' is required", "lora_path")
    real = resolve_under_root(ctx.config.lora_root, path)
    await load_adapter(ctx, name, real)
    return web.json_response({"status": "loaded", "lora_name": name})


async def unload_lora_handler(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    ctx.authenticate(request)
    body = parse_json_object(await request.read())
    name = body.get("lora_name")
    if not isinstance(name, str) or not name:
        raise bad("'lora_name' is required", "lora_name")
    # Unknown (404) or in use (400): the engine's AdmissionError.
    await ctx.engine.call(lambda e: e.remove_lora(name))
    return web.json_response({"status": "unloaded", "lora_name": name})
