"""ServerContext: what every handler needs (engine bridge, config, tokenizer, metrics, identity).

Identity and roles (docs/server.md, "Security and multi-tenancy"): with API keys configured,
every /v1/* and /generate* request carries a key, which names a client (its fairness identity)
and a role: "tenant" (generate; with --allow-tenant-adapters also load adapters of its own),
"metrics" (a tenant that may also read /metrics) or "admin" (everything: adapters for all,
/metrics). Without keys the server is for local use: every caller is an admin (runtime loading
by path still needs --lora-root).

The error middleware authenticates each such request before its handler runs and records the
caller as the request's `Principal`, in the request and in a context variable, so code that is
handed no request (`adapter_of`, `adapters`) still answers for the right caller.
"""
from __future__ import annotations

import contextvars
import hashlib
import os
import time
from dataclasses import dataclass

from aiohttp import web

from jaxserve.async_engine import AsyncEngine
from server.config import ServerConfig
from server.metrics import ServingMetrics
from server.protocol import ApiError

CTX_KEY = web.AppKey("jaxserve_ctx", object)
PRINCIPAL_KEY = web.RequestKey("jaxserve_principal", object)

# Tenants' own adapters are registered in the engine as f"{client}{TENANT_SEP}{name}": names a
# request may choose never hold TENANT_SEP (server/lora.py NAME_CHARS, ServerConfig), so these
# cannot collide with shared adapters, and split at the last TENANT_SEP they give back the owner.
TENANT_SEP = "~"


@dataclass(frozen=True)
class Principal:
    client: str | None     # the key's client name; None without keys
    role: str              # "admin" | "metrics" | "tenant"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def can_read_metrics(self) -> bool:
        return self.role in ("admin", "metrics")


LOCAL = Principal(None, "admin")              # no keys configured: local use, full rights
NOBODY = Principal(None, "tenant")            # keys configured, caller not (yet) known
_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "jaxserve_principal", default=None)


def tenant_adapter_name(client: str, name: str) -> str:
    """The engine's name for tenant `client`'s own adapter `name`."""
    return f"{client}{TENANT_SEP}{name}"


def adapter_owner(engine_name: str) -> tuple[str | None, str]:
    """(owner client, the name its owner uses) of an engine adapter name; (None, name) for a
    shared adapter."""
    client, sep, name = engine_name.rpartition(TENANT_SEP)
    return (client, name) if sep else (None, engine_name)


class ServerContext:
    def __init__(self, engine: AsyncEngine, config: ServerConfig, metrics: ServingMetrics):
        self.engine = engine
        self.config = config
        self.metrics = metrics
        metrics.max_clients = config.metrics_max_clients
        self.model_name = config.served_model_name or engine.model_name
        self.model_root = self._public_model_root(config.model_path or engine.model_name)
        self.max_model_len = engine.max_model_len
        self.tokenizer = engine.tokenizer          # the server's own copy (event-loop thread only)
        self.created = int(time.time())
        self.api_keys = dict(config.api_keys)       # key -> client name
        self.key_roles = dict(config.key_roles)     # key -> role (absent: tenant)
        # Tenants' own adapters (client -> engine names), kept here as they are loaded and
        # unloaded (only the server does either), so requests resolve names without asking the
        # engine thread; loads under way count toward the per-tenant cap while the engine reads
        # their files.
        self.tenant_adapters: dict[str, set[str]] = {}
        self.tenant_loads_pending: dict[str, int] = {}

    def _public_model_root(self, root: str) -> str:
        """The base model's `root` in /v1/models: a Hugging Face repo id as given, never a
        server path (a local checkpoint shows the served model name)."""
        if os.path.isabs(root) or root.startswith(("~", ".")) or os.path.exists(root):
            return self.model_name
        return root

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    # ---------------------------------------------------------------- identity and roles
    def bearer(self, request: web.Request) -> str | None:
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None

    def principal(self, request: web.Request) -> Principal:
        """Who sent the request; raises 401 when keys are configured and its key is missing or
        unknown. Records the answer for the rest of the request (see the module docstring)."""
        if not self.api_keys:
            found = LOCAL
        else:
            key = self.bearer(request)
            if key is None:
                raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY'",
                               code="invalid_api_key")
            if key not in self.api_keys:
                raise ApiError(401, "invalid API key", code="invalid_api_key")
            found = Principal(self.api_keys[key], self.key_roles.get(key, "tenant"))
        request[PRINCIPAL_KEY] = found
        _current.set(found)
        return found

    def authenticate(self, request: web.Request) -> str | None:
        """The client name of a configured key; raises 401 when keys are configured and the
        request's is missing or unknown; None when no keys are configured."""
        return self.principal(request).client

    def current(self) -> Principal:
        """The principal of the request being handled (recorded by `principal`)."""
        found = _current.get()
        if found is None:
            return LOCAL if not self.api_keys else NOBODY
        return found

    def require_admin(self, request: web.Request, action: str) -> Principal:
        who = self.principal(request)
        if not who.is_admin:
            raise ApiError(403, f"{action} needs an admin API key (--admin-api-keys, or "
                                "role=admin in the --api-keys file)", code="admin_required")
        return who

    def require_metrics(self, request: web.Request) -> None:
        """/metrics: open without keys; with keys, admin or metrics role (401 / 403)."""
        if not self.api_keys:
            return
        if not self.principal(request).can_read_metrics:
            raise ApiError(403, "/metrics needs an admin key or a key with role=metrics",
                           code="metrics_forbidden")

    def client_id(self, request: web.Request, user: str | None) -> str:
        """Fairness identity: the API key's client, else the `user` field, else 'anonymous'.
        A key without a configured name is hashed so that no secret reaches /metrics; its
        lone surrogates (aiohttp's decoding of header bytes that are not UTF-8) are hashed as
        their code points ("surrogatepass"), so any string hashes, distinct keys apart."""
        if self.api_keys:
            return self.authenticate(request)
        key = self.bearer(request)
        if key is not None:
            return "key-" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        if user:
            return user[:128]
        return "anonymous"

    # ---------------------------------------------------------------- adapters and visibility
    def visible_name(self, engine_name: str, who: Principal | None = None) -> str | None:
        """The name `who` knows an engine adapter by, or None when it may not see it: shared
        adapters are seen by all, a tenant's own only by that tenant (and by admins, under the
        engine's name)."""
        who = who or self.current()
        owner, name = adapter_owner(engine_name)
        if owner is None or who.is_admin:
            return engine_name
        return name if owner == who.client else None

    def resolve_adapter(self, name: str, who: Principal | None = None) -> str:
        """The engine name for an adapter name a caller used: a tenant's own adapter of that
        name first, else the shared one. A tenant naming another's adapter by its engine name
        gets the 404 an unknown adapter gets."""
        who = who or self.current()
        if who.is_admin:
            return name
        if TENANT_SEP in name:
            raise ApiError(404, f"unknown adapter {name!r}: the model does not exist (GET "
                                "/v1/models lists the base model and the loaded adapters)",
                           param="model", code="model_not_found")
        if who.client is not None:
            own = tenant_adapter_name(who.client, name)
            if own in self.tenant_adapters.get(who.client, ()):
                return own
        return name

    def adapter_of(self, model: str | None) -> str | None:
        """The adapter a `model` field names (None: the base model), as the engine knows it.
        Whether it is loaded is the engine's to say (admission answers 404 for an unknown one)."""
        if model is None or model in (self.model_name, self.engine.model_name):
            return None
        base, sep, adapter = model.partition(":")
        if sep and base in (self.model_name, self.engine.model_name):
            return self.resolve_adapter(adapter) if adapter else None
        return self.resolve_adapter(model)

    async def adapter_paths(self) -> dict[str, str | None]:
        """The engine's adapter registry: engine name -> the path it was loaded from."""
        return await self.engine.call(lambda e: e.lora_sources())

    async def adapters(self) -> dict[str, str | None]:
        """The adapters the current caller may see: its name for each -> `public_root`."""
        out = {}
        for engine_name, path in (await self.adapter_paths()).items():
            name = self.visible_name(engine_name)
            if name is not None:
                out[name] = self.public_root(engine_name, path)
        return out

    def public_root(self, engine_name: str, path: str | None) -> str:
        """What /v1/models shows as an adapter's `root`: its directory relative to --lora-root,
        or its name (start-up modules outside the root, adapters given as objects)."""
        root = self.config.lora_root
        if path is not None and root is not None:
            real = os.path.realpath(path)
            if real != root and os.path.commonpath([real, root]) == root:
                return os.path.relpath(real, root)
        return adapter_owner(engine_name)[1]


def ctx_of(request: web.Request) -> ServerContext:
    return request.app[CTX_KEY]
