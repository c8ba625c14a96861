"""ServerContext: what every handler needs (engine bridge, config, tokenizer, adapters, metrics)."""
from __future__ import annotations

import hashlib
import time

from aiohttp import web

from jaxserve.async_engine import AsyncEngine
from server.config import ServerConfig
from server.metrics import ServingMetrics
from server.protocol import ApiError, bad

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
        self.vocab_size = len(self.tokenizer)
        self.created = int(time.time())
        self.adapters: dict[str, str] = {}          # adapter name -> its directory
        self.api_keys = dict(config.api_keys)       # key -> client name

    # ---------------------------------------------------------------- tokens
    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])  # exactly as LLMEngine.encode does

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=True)
        except Exception as e:  # the template raises on shapes it does not accept
            raise bad(f"the chat template rejected these messages: {e}", "messages") from None
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # ---------------------------------------------------------------- routing and identity
    def resolve_model(self, model: str | None) -> str | None:
        """The adapter a `model` field names (None: the base model); 404 when unknown."""
        if model is None or model == self.model_name or model == self.engine.model_name:
            return None
        if model in self.adapters:
            return model
        base, sep, adapter = model.partition(":")
        if sep and base in (self.model_name, self.engine.model_name):
            if adapter in self.adapters:
                return adapter
            if not adapter:
                return None
        raise ApiError(404, f"the model {model!r} does not exist; GET /v1/models lists "
                            f"{[self.model_name, *sorted(self.adapters)]}", param="model",
                       code="model_not_found")

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
