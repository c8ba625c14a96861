"""The small endpoints vLLM serves beside generation: POST /tokenize, POST /detokenize,
GET /version, GET|POST /ping, GET /v1/models, GET /v1/models/{id}, and GET /openapi.json (an
OpenAPI 3 description made from the app's routes and server/fields.py, so it describes what is
served)."""
from __future__ import annotations

import inspect

from aiohttp import web

import jaxserve
from server import fields
from server.context import ServerContext, ctx_of
from server.protocol import (ApiError, bad, get_bool, get_str, json_dumps,
                             parse_json_object)


def _model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model '{model}' does not exist", param="model",
                    code="model_not_found", type="invalid_request_error")


async def _model_cards(ctx: ServerContext) -> list[dict]:
    """The base model and every adapter the caller may see, as OpenAI model objects."""
    base = ctx.model_name
    cards = [{"id": base, "object": "model", "created": ctx.created, "owned_by": "jaxserve",
              "root": ctx.model_root, "parent": None, "max_model_len": ctx.max_model_len}]
    for name, root in sorted((await ctx.adapters()).items()):
        cards.append({"id": name, "object": "model", "created": ctx.created,
                      "owned_by": "jaxserve", "root": root, "parent": base})
    return cards


async def list_models(request: web.Request) -> web.Response:
    """The base model and the adapters the caller may see."""
    return web.json_response({"object": "list", "data": await _model_cards(ctx_of(request))})


async def retrieve_model(request: web.Request) -> web.Response:
    """One model object, or a 404 with code model_not_found."""
    model = request.match_info["model_id"]
    for card in await _model_cards(ctx_of(request)):
        if card["id"] == model:
            return web.json_response(card)
    raise _model_not_found(model)


async def _check_model(ctx: ServerContext, body: dict) -> None:
    """A `model` that names neither the base model nor a visible adapter: 404."""
    model = get_str(body, "model")
    if model is None or ctx.adapter_of(model) is None:
        return
    if not any(card["id"] == model for card in await _model_cards(ctx)):
        base, sep, adapter = model.partition(":")
        if not (sep and adapter in await ctx.adapters()):
            raise _model_not_found(model)


# ------------------------------------------------------------------ tokenize / detokenize
def _chat_ids(ctx: ServerContext, body: dict) -> list[int]:
    """The prompt ids the chat endpoint would feed the model for this body (its messages,
    tools, documents, template and template options, read by the chat endpoint's parser)."""
    from server.chat import parse_chat_prompt
    if get_bool(body, "add_special_tokens", False):
        raise bad("'add_special_tokens' is not supported for messages: the chat template "
                  "places the special tokens", "add_special_tokens", code="unsupported_field")
    return parse_chat_prompt(ctx, body)[0]


async def tokenize(request: web.Request) -> web.Response:
    """vLLM's /tokenize: {model?, prompt, add_special_tokens?} or {model?, messages,
    add_generation_prompt?, ...}, and return_token_strs? -> {count, max_model_len, tokens,
    token_strs}."""
    ctx = ctx_of(request)
    body = parse_json_object(await request.read())
    await _check_model(ctx, body)
    if body.get("mm_processor_kwargs"):
        raise bad("'mm_processor_kwargs' is not supported: text-only models",
                  "mm_processor_kwargs", code="unsupported_field")
    if "messages" in body:
        ids = _chat_ids(ctx, body)
    elif "prompt" in body:
        prompt = body["prompt"]
        if not isinstance(prompt, str):
            raise bad("'prompt' must be a string", "prompt")
        ids = ctx.tokenizer.encode(prompt, get_bool(body, "add_special_tokens", True))
    else:
        raise bad("'prompt' or 'messages' is required", "prompt")
    out = {"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids,
           "token_strs": None}
    if get_bool(body, "return_token_strs", False):
        to_tokens = getattr(ctx.tokenizer.hf, "convert_ids_to_tokens", None)
        out["token_strs"] = (list(to_tokens(ids)) if to_tokens is not None
                             else [ctx.token_text(t) for t in ids])
    return web.json_response(out, dumps=json_dumps)


async def detokenize(request: web.Request) -> web.Response:
    """vLLM's /detokenize: {model?, tokens} -> {prompt} (special tokens written)."""
    ctx = ctx_of(request)
    body = parse_json_object(await request.read())
    await _check_model(ctx, body)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise bad("'tokens' must be a list of token ids", "tokens")
    vocab = len(ctx.tokenizer.hf)
    wrong = [t for t in tokens if not 0 <= t < vocab]
    if wrong:
        raise bad(f"token id {wrong[0]} is out of the vocabulary [0, {vocab})", "tokens")
    return web.json_response({"prompt": ctx.tokenizer.decode(tokens, skip_special_tokens=False)},
                             dumps=json_dumps)


async def version(request: web.Request) -> web.Response:
    """The server's version."""
    return web.json_response({"version": jaxserve.__version__})


# ------------------------------------------------------------------ OpenAPI
def _json_type(example) -> dict:
    if isinstance(example, bool):
        return {"type": "boolean"}
    if isinstance(example, int):
        return {"type": "integer"}
    if isinstance(example, float):
        return {"type": "number"}
    if isinstance(example, str):
        return {"type": "string"}
    if isinstance(example, list):
        return {"type": "array"}
    return {"type": "object"}


def _request_schema(endpoint: str) -> dict:
    """The body of a generation endpoint from the field registry: what is read (supported),
    taken without effect (accepted), and refused (`x-refused`, with the values still taken)."""
    props, refused = {}, {}
    for f in fields.fields_for(endpoint):
        if "." in f.name:
            continue
        if f.status == "refused":
            refused[f.name] = {"description": f.note,
                               "accepted_values": [v for v in f.neutral if v is not None]}
            continue
        desc = f.note if f.status == "supported" else f"accepted, no effect: {f.note}"
        if f.only is not None:
            desc += f" (values: {[v for v in f.only if v is not None]})"
        props[f.name] = {**_json_type(f.example), "description": desc}
    required = ["prompt"] if endpoint == fields.COMPLETIONS else ["messages"]
    return {"type": "object", "properties": props, "required": required,
            "additionalProperties": True, "x-refused": refused}


TOKENIZE_SCHEMA = {"type": "object", "properties": {
    "model": {"type": "string"}, "prompt": {"type": "string"}, "messages": {"type": "array"},
    "add_special_tokens": {"type": "boolean"}, "add_generation_prompt": {"type": "boolean"},
    "return_token_strs": {"type": "boolean"}}}
DETOKENIZE_SCHEMA = {"type": "object", "required": ["tokens"], "properties": {
    "model": {"type": "string"}, "tokens": {"type": "array", "items": {"type": "integer"}}}}
tokenize.request_schema = TOKENIZE_SCHEMA
detokenize.request_schema = DETOKENIZE_SCHEMA


def openapi_spec(app: web.Application) -> dict:
    """OpenAPI 3.1 for the app's routes: each path and method, its summary (the handler's
    docstring), path parameters, and the request body schema a handler declares (generation
    endpoints: from the field registry)."""
    paths: dict[str, dict] = {}
    for route in app.router.routes():
        if route.method == "HEAD" or route.resource is None:
            continue
        path = route.resource.canonical
        handler = route.handler
        doc = inspect.getdoc(handler) or ""
        op = {"summary": doc.split("\n\n")[0].replace("\n", " ") or path,
              "responses": {"200": {"description": "OK"},
                            "default": {"description": "an error: {error: {message, type, "
                                                       "param, code}}"}}}
        params = [p.strip("{}").split(":")[0] for p in path.split("/") if p.startswith("{")]
        if params:
            op["parameters"] = [{"name": p, "in": "path", "required": True,
                                 "schema": {"type": "string"}} for p in params]
        endpoint = getattr(handler, "endpoint", None)
        schema = (_request_schema(endpoint) if endpoint is not None
                  else getattr(handler, "request_schema", None))
        if schema is not None and route.method == "POST":
            op["requestBody"] = {"required": True,
                                 "content": {"application/json": {"schema": schema}}}
        paths.setdefault(path, {})[route.method.lower()] = op
    return {"openapi": "3.1.0",
            "info": {"title": "jaxserve", "version": jaxserve.__version__},
            "paths": dict(sorted(paths.items()))}


async def openapi(request: web.Request) -> web.Response:
    """This description."""
    return web.json_response(openapi_spec(request.app), dumps=json_dumps)
