"""ServerContext: what every handler needs (engine bridge, config, tokenizer, metrics, identity)."""
from __future__ import annotations

import hashlib
import time

from aiohttp import web

from jaxserve.async_engine import AsyncEngine
from server.config import ServerConfig
from server.metrics import ServingMetrics
from server.protocol import ApiError

CTX_KEY = web.AppKey("jaxserve_ctx", object)


class ServerContext:
    def __init__(self, engine: AsyncEngine, config: ServerConfig, metrics: ServingMetrics):
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.model_name = config.served_model_name or engine.model_name
        self.model_root = config.model_path or engine.model_name
        self.max_model_len = engine.max_model_len
        self.tokenizer = engine.tokenizer          # the server's own copy (event-loop thread only)
        self.created = int(time.time())
        self.api_keys = dict(config.api_keys)       # key -> client name

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    # ---------------------------------------------------------------- routing and identity
    def adapter_of(self, model: str | None) -> str | None:
        """The adapter a `model` field names (None: the base model). Whether it is loaded is
        the engine's to say (admission answers 404 for an unknown one)."""
        if model is None or model in (self.model_name, self.engine.model_name):
            return None
        base, sep, adapter = model.partition(":")
        if sep and base in (self.model_name, self.engine.model_name):
            return adapter or None
        return model

    async def adapters(self) -> dict[str, str | None]:
        """The engine's adapter registry: name -> the path it was loaded from."""
        return await self.engine.call(lambda e: e.lora_sources())

    def bearer(self, request: web.Request) -> str | None:
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None

    def authenticate(self, request: web.Request) -> str | None:
        """The client name of a configured key; raises 401 when keys are configured and the
        request's is missing or unknown; None when no keys are configured."""
        if not self.api_keys:
            return None
        key = self.bearer(request)
        if key is None:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
        if key not in self.api_keys:
            raise ApiError(401, "invalid API key", code="invalid_api_key")
        return self.api_keys[key]

    def client_id(self, request: web.Request, user: str | None) -> str:
        """Fairness identity: the API key's client, else the `user` field, else 'anonymous'.
        A key without a configured name is hashed so that no secret reaches /metrics."""
        if self.api_keys:
            return self.authenticate(request)
        key = self.bearer(request)
        if key is not None:
            return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]
        if user:
            return user[:128]
        return "anonymous"


def ctx_of(request: web.Request) -> ServerContext:
    return request.app[CTX_KEY]
