"""Request parsing: JSON bodies -> typed requests, or an ApiError (always 4xx).

Here every field is checked for its JSON type, and the API's own fields (n, best_of, echo,
penalties, logit_bias, logprobs counts) for their values. What a value means to the engine is
checked once, elsewhere: sampling fields by `SamplingParams`, the prompt, the adapter and the
context length by `jaxserve.admission`; their AdmissionError becomes an ApiError through
`admission_error` (400, 404 for an unknown model, 429 for overload).
Unknown fields are ignored (clients send many optional extras); fields we cannot honour with a
non-default value (echo, suffix, best_of > 1, penalties, logit_bias, top alternatives in logprobs)
are refused with a message rather than silently dropped.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from jaxserve.admission import INVALID, OVERLOAD, UNKNOWN, AdmissionError
from jaxserve.sampling_params import SamplingParams

ADMISSION_STATUS = {INVALID: 400, UNKNOWN: 404, OVERLOAD: 429}


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


def admission_error(e: AdmissionError) -> ApiError:
    return ApiError(ADMISSION_STATUS[e.kind], str(e), param=e.param, code=e.code)


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


def get_float(body: dict, name: str, default: float | None, lo: float = -math.inf,
              hi: float = math.inf, lo_open: bool = False) -> float | None:
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
    """A parsed generation request, independent of the endpoint it came from."""
    prompt_ids: list[int]              # what the engine receives (tokenized once, here)
    params: SamplingParams
    model: str | None                  # as the client wrote it (None: the base model)
    stream: bool
    include_usage: bool
    logprobs: bool
    user: str | None
    # prefix caching: only requests with the same salt share cached pages (None: no salt;
    # admission refuses an empty one)
    cache_salt: str | None = None


def sampling_fields(body: dict, stop_name: str = "stop") -> dict:
    """SamplingParams keywords from the fields completions, chat and /generate share (their
    values are checked by SamplingParams; max_tokens is read by the caller)."""
    top_k = get_int(body, "top_k", 0)
    return dict(temperature=get_float(body, "temperature", 1.0),
                top_p=get_float(body, "top_p", 1.0),
                top_k=0 if top_k == -1 else top_k,   # -1 disables, as in vLLM
                seed=get_int(body, "seed", None), stop=get_stop(body, stop_name),
                ignore_eos=get_bool(body, "ignore_eos", False))


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
