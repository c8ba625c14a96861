"""Adapters as models: start-up modules, runtime load/unload, rights and caps, and the
--lora-root path rule.

The registry is the engine's (`LLMEngine.lora_sources`); this module only asks it and sends it
load / unload calls. Who may do what (docs/server.md, "Security and multi-tenancy"):
  - admins (and every caller when no API keys are configured) load and unload shared adapters,
    which every client sees, and may unload any adapter;
  - with --allow-tenant-adapters a tenant may load adapters of its own: registered in the engine
    as "CLIENT~NAME" (server/context.py), seen, used and unloaded only by that tenant under
    NAME (to others they do not exist: 404), at most --max-adapters-per-tenant of them;
  - otherwise tenants get 403 for load / unload / loading by `lora_dir`.
--max-loaded-adapters and --max-adapter-host-bytes cap the engine's host store (start-up
modules count toward them but are always loaded); a load past a cap gets 409
adapter_limit_reached.

A request can only ever make the server read a directory below the operator's --lora-root:
absolute paths outside it, `..` components and symlinks that resolve outside are refused.
Messages sent back never hold a server path: the adapter's path relative to the root (or its
name) stands in for it.
"""
from __future__ import annotations

import logging
import os
import re

from aiohttp import web

from jaxserve.admission import AdmissionError
from server.context import (TENANT_SEP, Principal, ServerContext, adapter_owner, ctx_of,
                            tenant_adapter_name)
from server.protocol import ApiError, admission_error, bad, get_str, parse_json_object

log = logging.getLogger("jaxserve.server")

NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.@/")
LIMIT_STATUS = 409          # a cap on loaded adapters is reached: unloading makes room
UNLOAD_HINT = "unload one (POST /v1/unload_lora_adapter) to make room"


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
        raise ApiError(403, "adapter paths must be directories below the server's --lora-root",
                       param="lora_path", code="path_not_allowed")
    if not os.path.isdir(real):
        raise ApiError(404, f"no adapter directory {os.path.relpath(real, root)!r} below "
                            "--lora-root", param="lora_path", code="adapter_not_found")
    return real


def check_name(ctx: ServerContext, name) -> str:
    if not isinstance(name, str) or not name or len(name) > 128 or not set(name) <= NAME_CHARS:
        raise bad("'lora_name' must be 1-128 characters of letters, digits and -_.@/",
                  "lora_name")
    if name in (ctx.model_name, ctx.engine.model_name):
        raise bad("'lora_name' may not be the base model's name", "lora_name")
    return name


# ------------------------------------------------------------------ messages without paths
# an absolute path left in a message (not an API route such as /v1/models)
_ABS_PATH = re.compile(r"(?<![\w.~-])/(?!v1/)[^\s'\"]+")


def public_text(text: str, subs: list[tuple[str, str]], root: str | None) -> str:
    """`text` with each (server string -> public string) of `subs` replaced, longest first,
    then the --lora-root and any other absolute path left."""
    for old, new in sorted(subs, key=lambda s: -len(s[0])):
        if old:
            text = text.replace(old, new)
    if root:
        text = text.replace(root + os.sep, "").replace(root, "<lora-root>")
    return _ABS_PATH.sub("<server path>", text)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"


def _limit_message(shown: str, e: AdmissionError) -> str:
    cause = e.__cause__
    limit = getattr(cause, "limit", None)
    if limit == "count":
        return (f"cannot load adapter {shown!r}: {cause.current} adapters are loaded, the "
                f"server's cap (--max-loaded-adapters) is {cause.cap}; {UNLOAD_HINT}")
    if limit == "host_bytes":
        return (f"cannot load adapter {shown!r}: it takes {_size(cause.needed)} of host memory "
                f"and the loaded adapters {_size(cause.current)}, together above the server's "
                f"cap (--max-adapter-host-bytes) of {_size(cause.cap)}; unload adapters "
                "(POST /v1/unload_lora_adapter) to make room")
    return str(e)


def public_error(ctx: ServerContext, e: AdmissionError, subs: list[tuple[str, str]],
                 shown: str) -> ApiError:
    """The API error for an engine refusal of an adapter operation, without server paths or
    tenant-adapter engine names."""
    if e.code == "adapter_limit_reached":
        return ApiError(LIMIT_STATUS, _limit_message(shown, e), param=e.param, code=e.code)
    err = admission_error(e)
    return ApiError(err.status, public_text(err.message, subs, ctx.config.lora_root),
                    param=err.param, code=err.code)


# ------------------------------------------------------------------ engine calls
async def load_adapter(ctx: ServerContext, name: str, path: str, *,
                       shown_name: str | None = None, shown_path: str | None = None) -> None:
    """Load on the engine thread; its refusals (name taken, bad format, DoRA, wrong base, a cap)
    are AdmissionErrors. With `shown_path` (runtime loads) they become ApiErrors whose message
    shows `shown_path` for the real path and `shown_name` for the engine's name; start-up
    loads (the operator's) keep them as they are."""
    try:
        await ctx.engine.call(lambda e: e.add_lora(name, path))
    except AdmissionError as e:
        if shown_path is None:
            raise
        shown = shown_name or name
        raise public_error(ctx, e, [(path, shown_path), (repr(name), repr(shown))],
                           shown) from None


async def set_limits(ctx: ServerContext) -> None:
    """Apply --max-loaded-adapters / --max-adapter-host-bytes to the engine's adapter store
    (after the start-up modules are loaded: they count toward the caps but are never refused)."""
    cfg = ctx.config

    def apply(e):
        store = getattr(e, "loras", None)
        if store is not None:
            store.max_adapters = cfg.max_loaded_adapters
            store.max_host_bytes = cfg.max_adapter_host_bytes
        return (len(store), store.num_bytes) if store is not None else (0, 0)

    count, num_bytes = await ctx.engine.call(apply)
    if cfg.max_loaded_adapters is not None and count > cfg.max_loaded_adapters:
        log.warning(
            "%d start-up adapters already pass --max-loaded-adapters %d: runtime loads will be "
            "refused", count, cfg.max_loaded_adapters)
    if cfg.max_adapter_host_bytes is not None and num_bytes > cfg.max_adapter_host_bytes:
        log.warning(
            "start-up adapters take %d bytes, above --max-adapter-host-bytes %d: runtime loads "
            "will be refused", num_bytes, cfg.max_adapter_host_bytes)


async def load_shared(ctx: ServerContext, name: str, real: str) -> None:
    await load_adapter(ctx, name, real, shown_path=ctx.public_root(name, real))


async def load_own(ctx: ServerContext, who: Principal, name: str, real: str) -> str:
    """Load `real` as tenant `who`'s own adapter `name` (its per-tenant cap counts loads under
    way); the engine's name for it."""
    client = who.client
    assert client is not None
    held = len(ctx.tenant_adapters.get(client, ())) + ctx.tenant_loads_pending.get(client, 0)
    cap = ctx.config.max_adapters_per_tenant
    if held >= cap:
        raise ApiError(LIMIT_STATUS, f"cannot load adapter {name!r}: you have {held} adapters "
                                     "loaded, the cap per tenant (--max-adapters-per-tenant) "
                                     f"is {cap}; {UNLOAD_HINT}",
                       param="lora_name", code="adapter_limit_reached")
    engine_name = tenant_adapter_name(client, name)
    ctx.tenant_loads_pending[client] = ctx.tenant_loads_pending.get(client, 0) + 1
    try:
        if name in await ctx.adapter_paths():   # a shared one has the name: the tenant sees it
            raise bad(f"an adapter named {name!r} is already loaded", "lora_name",
                      "adapter_exists")
        await load_adapter(ctx, engine_name, real, shown_name=name,
                           shown_path=ctx.public_root(engine_name, real))
        ctx.tenant_adapters.setdefault(client, set()).add(engine_name)
    finally:
        ctx.tenant_loads_pending[client] -= 1
        if not ctx.tenant_loads_pending[client]:
            del ctx.tenant_loads_pending[client]
    return engine_name


def _forget_own(ctx: ServerContext, engine_name: str) -> None:
    owner, _ = adapter_owner(engine_name)
    if owner is not None and owner in ctx.tenant_adapters:
        ctx.tenant_adapters[owner].discard(engine_name)
        if not ctx.tenant_adapters[owner]:
            del ctx.tenant_adapters[owner]


def _unknown(name: str) -> ApiError:
    return ApiError(404, f"unknown adapter {name!r}", param="lora_name", code="adapter_not_found")


def _admin_required(action: str) -> ApiError:
    return ApiError(403, f"{action} needs an admin API key (--admin-api-keys, or role=admin in "
                         "the --api-keys file)", code="admin_required")


# ------------------------------------------------------------------ lora_dir and handlers
async def adapter_for_dir(ctx: ServerContext, lora_dir: str) -> str:
    """S-LoRA's `lora_dir`: the adapter (one the caller may see) already loaded from that
    directory or named so, else load it (only below --lora-root, under its path relative to
    the root: shared for admins, the caller's own for tenants with --allow-tenant-adapters).
    The name the caller knows it by."""
    if "\x00" in lora_dir:
        raise bad("'lora_dir' must not contain NUL", "lora_dir")
    who = ctx.current()
    visible = {}
    for engine_name, path in (await ctx.adapter_paths()).items():
        shown = ctx.visible_name(engine_name, who)
        if shown is not None:
            visible[engine_name] = (shown, None if path is None else os.path.realpath(path))
    real = os.path.realpath(lora_dir) if os.path.isabs(lora_dir) else None
    for shown, path in visible.values():
        if (real is not None and path == real) or shown == lora_dir:
            return shown
    real = resolve_under_root(ctx.config.lora_root, lora_dir)
    for shown, path in visible.values():
        if path == real:
            return shown
    name = os.path.relpath(real, ctx.config.lora_root)
    if who.is_admin:
        await load_shared(ctx, name, real)
        return name
    if not ctx.config.allow_tenant_adapters:
        raise _admin_required("loading an adapter by 'lora_dir'")
    await load_own(ctx, who, check_name(ctx, name), real)
    return name


async def load_lora_handler(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    who = ctx.principal(request)
    if not who.is_admin and not ctx.config.allow_tenant_adapters:
        raise _admin_required("loading adapters")
    body = parse_json_object(await request.read())
    name = check_name(ctx, body.get("lora_name"))
    path = get_str(body, "lora_path")
    if path is None:
        raise bad("'lora_path' is required", "lora_path")
    real = resolve_under_root(ctx.config.lora_root, path)
    if who.is_admin:
        await load_shared(ctx, name, real)
    else:
        await load_own(ctx, who, name, real)
    return web.json_response({"status": "loaded", "lora_name": name})


async def unload_lora_handler(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    who = ctx.principal(request)
    if not who.is_admin and not ctx.config.allow_tenant_adapters:
        raise _admin_required("unloading adapters")
    body = parse_json_object(await request.read())
    name = body.get("lora_name")
    if not isinstance(name, str) or not name:
        raise bad("'lora_name' is required", "lora_name")
    engine_name = name
    if not who.is_admin:   # a tenant: only its own; another's does not exist for it
        own = tenant_adapter_name(who.client, name) if TENANT_SEP not in name else None
        if own is not None and own in ctx.tenant_adapters.get(who.client, ()):
            engine_name = own
        elif TENANT_SEP not in name and name in await ctx.adapter_paths():
            raise _admin_required(f"unloading the shared adapter {name!r}")
        else:
            raise _unknown(name)
    # Unknown (404) or in use (400): the engine's AdmissionError.
    try:
        await ctx.engine.call(lambda e: e.remove_lora(engine_name))
    except AdmissionError as e:
        raise public_error(ctx, e, [(repr(engine_name), repr(name))], name) from None
    _forget_own(ctx, engine_name)
    return web.json_response({"status": "unloaded", "lora_name": name})
