"""Request parsing and validation: JSON bodies -> typed requests, or an ApiError (always 4xx).

Every field is checked for type and range here, so the handlers only see well-formed requests.
Unknown fields are ignored (clients send many optional extras); fields we cannot honour with a
non-default value (echo, suffix, best_of > 1, penalties, logit_bias, top alternatives in logprobs)
are refused with a message rather than silently dropped.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from jaxserve.sampling_params import SamplingParams

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_SEED = 2**63


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or {401: "authentication_error", 403: "permission_error",
                             404: "not_found_error", 429: "rate_limit_error",
                             501: "not_implemented_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code if self.code is not None else self.status}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _reject_constant(name: str):
    raise bad(f"invalid JSON number {name}")


def parse_json_object(raw: bytes) -> dict:
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except ApiError:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise bad(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    return body


# ------------------------------------------------------------------ typed field readers
def get_bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be a boolean", name)
    return v


def get_int(body: dict, name: str, default: int | None, lo: int | None = None,
            hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**63:
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise bad(f"'{name}' must be an integer", name)
    if lo is not None and v < lo:
        raise bad(f"'{name}' must be >= {lo}, got {v}", name)
    if hi is not None and v > hi:
        raise bad(f"'{name}' must be <= {hi}, got {v}", name)
    return v


def get_float(body: dict, name: str, default: float, lo: float, hi: float,
              lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise bad(f"'{name}' must be a number", name)
    v = float(v)
    if v < lo or v > hi or (lo_open and v == lo):
        raise bad(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name)
    return v


def get_str(body: dict, name: str, default: str | None = None) -> str | None:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, str):
        raise bad(f"'{name}' must be a string", name)
    return v


def get_stop(body: dict, name: str = "stop") -> tuple[str, ...]:
    v = body.get(name)
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad(f"'{name}' must be a string or a list of strings", name)
    if len(stops) > MAX_STOP_STRINGS:
        raise bad(f"'{name}' may hold at most {MAX_STOP_STRINGS} strings", name)
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise bad(f"each '{name}' string must have 1 to {MAX_STOP_CHARS} characters", name)
    return tuple(stops)


def refuse_unsupported(body: dict) -> None:
    """Fields whose non-default values we cannot honour: refuse them instead of ignoring them."""
    n = get_int(body, "n", 1, lo=1, hi=128)
    if n != 1:
        raise bad("n > 1 is not supported; send n separate requests", "n")
    best_of = get_int(body, "best_of", 1, lo=1, hi=128)
    if best_of != 1:
        raise bad("best_of > 1 is not supported", "best_of")
    for pen in ("presence_penalty", "frequency_penalty"):
        if get_float(body, pen, 0.0, -2.0, 2.0) != 0.0:
            raise bad(f"'{pen}' is not supported (only 0)", pen)
    if get_float(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True) != 1.0:
        raise bad("'repetition_penalty' is not supported (only 1)", "repetition_penalty")
    lb = body.get("logit_bias")
    if lb is not None and not isinstance(lb, dict):
        raise bad("'logit_bias' must be an object", "logit_bias")
    if lb:
        raise bad("'logit_bias' is not supported", "logit_bias")


# ------------------------------------------------------------------ common request shape
@dataclass(frozen=True)
class GenRequest:
    """A validated generation request, independent of the endpoint it came from."""
    prompt: str | list[int]            # what the engine receives
    prompt_ids: tuple[int, ...]        # the server's own tokenization (for length checks, usage)
    params: SamplingParams
    model: str | None                  # as the client wrote it (None: the base model)
    stream: bool
    include_usage: bool
    logprobs: bool
    user: str | None


def sampling_fields(body: dict) -> dict:
    """The sampling fields shared by completions and chat (max_tokens handled by the caller)."""
    temperature = get_float(body, "temperature", 1.0, 0.0, 2.0)
    top_p = get_float(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = get_int(body, "top_k", 0, lo=-1, hi=1_000_000)
    seed = get_int(body, "seed", None, lo=0, hi=MAX_SEED - 1)
    return dict(temperature=temperature, top_p=top_p, top_k=max(top_k, 0), seed=seed,
                stop=get_stop(body), ignore_eos=get_bool(body, "ignore_eos", False))


def stream_fields(body: dict) -> tuple[bool, bool]:
    stream = get_bool(body, "stream", False)
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not isinstance(opts, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    if not stream:
        raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
    return stream, get_bool(opts, "include_usage", False)


def resolve_max_tokens(requested: int | None, default: int | None, num_prompt: int,
                       max_model_len: int, param: str = "max_tokens") -> int:
    if num_prompt >= max_model_len:
        raise bad(f"the prompt has {num_prompt} tokens but the model's context is "
                  f"{max_model_len} tokens; shorten the prompt", "prompt",
                  code="context_length_exceeded")
    room = max_model_len - num_prompt
    max_tokens = requested if requested is not None else min(default or room, room)
    if max_tokens > room:
        raise bad(f"max_tokens={max_tokens} plus the prompt's {num_prompt} tokens exceeds the "
                  f"model's context of {max_model_len} tokens (at most {room} here)", param,
                  code="context_length_exceeded")
    return max_tokens


def make_params(max_tokens: int, fields: dict, logprobs: bool) -> SamplingParams:
    try:
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **fields)
    except (ValueError, TypeError) as e:
        raise bad(str(e)) from None
