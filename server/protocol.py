"""Request parsing: JSON bodies -> typed requests, or an ApiError (always 4xx).

Here every field is checked for its JSON type, and the API's own fields (n, best_of, echo,
penalties, logit_bias, logprobs counts) for their values. What a value means to the engine is
checked once, elsewhere: sampling fields by `SamplingParams`, the prompt, the adapter and the
context length by `jaxserve.admission`; their AdmissionError becomes an ApiError through
`admission_error` (400, 404 for an unknown model, 429 for overload).
Unknown fields are ignored (clients send many optional extras); fields we cannot honour with a
non-default value (echo, suffix, best_of > 1) are refused with a message rather than silently
dropped.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from jaxserve.admission import INVALID, OVERLOAD, UNKNOWN, AdmissionError
from jaxserve.sampling_params import SamplingParams

ADMISSION_STATUS = {INVALID: 400, UNKNOWN: 404, OVERLOAD: 429}
# An error's `code` is always a string: the specific one where the raiser names it
# (invalid_json, context_length_exceeded, ...), else this default for its status.
DEFAULT_CODES = {400: "invalid_request", 401: "invalid_api_key", 403: "forbidden",
                 404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
                 409: "conflict", 413: "request_too_large", 422: "unprocessable",
                 429: "rate_limited", 500: "internal_error", 501: "not_implemented",
                 503: "unavailable"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code if code is not None else DEFAULT_CODES.get(status, f"http_{status}")
        self.type = type or {401: "authentication_error", 403: "permission_error",
                             404: "not_found_error", 429: "rate_limit_error",
                             501: "not_implemented_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def admission_error(e: AdmissionError) -> ApiError:
    return ApiError(ADMISSION_STATUS[e.kind], str(e), param=e.param, code=e.code)


def _reject_constant(name: str):
    raise bad(f"invalid JSON number {name}", code="invalid_json")


# What any body may hold, whatever the endpoint: the handlers below read fields knowing that
# every string is valid Unicode (encodable as UTF-8), every number finite and every integer
# within MAX_JSON_INT, and the nesting at most MAX_JSON_DEPTH deep.
MAX_JSON_DEPTH = 64
MAX_JSON_INT = 2**64


def _path_text(node) -> str:
    """The field path of a walk node, as in `messages[2].content` (lone surrogates in keys as
    backslash escapes; cut to 160 characters)."""
    parts = []
    while node is not None:
        node, key = node
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key}")
    path = "".join(reversed(parts)).lstrip(".")
    path = path.encode("utf-8", "backslashreplace").decode("utf-8")
    return path if len(path) <= 160 else path[:157] + "..."


def check_json_value(value: Any) -> None:
    """Refuse (400, naming the field as in `messages[2].content`) a string that is not valid
    Unicode (a lone UTF-16 surrogate, which json.loads accepts from a \\ud800 escape), a
    non-finite number (1e400 parses to inf), an integer beyond MAX_JSON_INT, or nesting deeper
    than MAX_JSON_DEPTH. Iterative, so any depth json.loads returns is walked safely; a node is
    (parent node, key or index), its path text made only for the error."""
    stack: list[tuple[Any, Any, int]] = [(value, None, 0)]
    while stack:
        v, node, depth = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                path = _path_text(node)
                raise bad(f"{path or 'the body'} is not valid Unicode text: a lone UTF-16 "
                          f"surrogate (\\u{ord(v[e.start]):04x}) at character {e.start}",
                          path or None, code="invalid_unicode") from None
        elif isinstance(v, bool) or v is None:
            continue
        elif isinstance(v, int):
            if not -MAX_JSON_INT < v < MAX_JSON_INT:
                path = _path_text(node)
                raise bad(f"{path} is an integer out of range (|n| must be < 2**64)", path,
                          code="number_out_of_range")
        elif isinstance(v, float):
            if not math.isfinite(v):
                path = _path_text(node)
                raise bad(f"{path} is a number out of the range of a double (it would be "
                          "infinite)", path, code="number_out_of_range")
        elif depth >= MAX_JSON_DEPTH:
            path = _path_text(node)
            raise bad(f"the body is nested more than {MAX_JSON_DEPTH} levels deep (at {path})",
                      path, code="too_deep")
        elif isinstance(v, dict):
            for k, x in v.items():
                child = (node, k)
                stack.append((k, child, depth + 1))   # keys are strings too
                stack.append((x, child, depth + 1))
        elif v and all(type(x) is int for x in v):  # token ids: checked at once
            if not (-MAX_JSON_INT < min(v) and max(v) < MAX_JSON_INT):
                i = next(i for i, x in enumerate(v) if not -MAX_JSON_INT < x < MAX_JSON_INT)
                stack.append((v[i], (node, i), depth + 1))
        else:  # a list: json.loads makes nothing else
            stack.extend((x, (node, i), depth + 1) for i, x in enumerate(v))


def parse_json_object(raw: bytes) -> dict:
    """The body as a JSON object whose every value passed `check_json_value`; or a 400."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except ApiError:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", code="invalid_json")
    check_json_value(body)
    return body


def finite_or_none(x: float | None) -> float | None:
    """A log-probability as JSON can carry it: a non-finite value (NaN, +-inf) becomes null."""
    return x if x is not None and math.isfinite(x) else None


def json_dumps(obj: Any, **kw) -> str:
    """Every JSON the server writes: compact, UTF-8, and never NaN/Infinity (allow_nan=False
    raises instead: values that may not be finite are passed through `finite_or_none` first)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False, **kw)


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
    """Fields whose non-default values we cannot honour: refuse them instead of ignoring them.
    (None left here: n / best_of are read by the endpoints, server/choices.py; the registry,
    server/fields.py, refuses what is not served.)"""


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


def get_token_ids(body: dict, name: str) -> tuple[int, ...] | None:
    """A list of token ids (integers >= 0; the vocabulary bound is admission's)."""
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, list) or not all(type(t) is int and t >= 0 for t in v):
        raise bad(f"'{name}' must be a list of token ids (integers >= 0)", name)
    return tuple(v)


def get_logit_bias(body: dict) -> dict[int, float] | None:
    """OpenAI's logit_bias: an object of token ids (as strings) to biases in [-100, 100]."""
    v = body.get("logit_bias")
    if v is None:
        return None
    if not isinstance(v, dict):
        raise bad("'logit_bias' must be an object mapping token ids to biases", "logit_bias")
    out = {}
    for k, b in v.items():
        if not (k.isascii() and k.isdigit()):
            raise bad(f"'logit_bias' keys must be token ids, got {k[:40]!r}", "logit_bias")
        if not isinstance(b, (int, float)) or isinstance(b, bool):
            raise bad(f"'logit_bias' values must be numbers, got {b!r} for {k!r}", "logit_bias")
        if not -100 <= b <= 100:
            raise bad(f"'logit_bias' values must be in [-100, 100], got {b!r} for {k!r}",
                      "logit_bias")
        out[int(k)] = float(b)
    return out or None


def sampling_fields(body: dict, stop_name: str = "stop") -> dict:
    """SamplingParams keywords from the fields completions, chat and /generate share (their
    values are checked by SamplingParams; max_tokens and the logprobs counts are read by the
    caller)."""
    top_k = get_int(body, "top_k", 0)
    bad_words = body.get("bad_words")
    if bad_words is not None and (not isinstance(bad_words, list)
                                  or not all(isinstance(w, str) for w in bad_words)):
        raise bad("'bad_words' must be a list of strings", "bad_words")
    return dict(stop_token_ids=get_token_ids(body, "stop_token_ids") or (),
                include_stop_str_in_output=get_bool(body, "include_stop_str_in_output", False),
                presence_penalty=get_float(body, "presence_penalty", 0.0, -2.0, 2.0),
                frequency_penalty=get_float(body, "frequency_penalty", 0.0, -2.0, 2.0),
                repetition_penalty=get_float(body, "repetition_penalty", 1.0, 0.0, lo_open=True),
                logit_bias=get_logit_bias(body),
                min_p=get_float(body, "min_p", 0.0, 0.0, 1.0),
                min_tokens=get_int(body, "min_tokens", 0, lo=0),
                bad_words=tuple(bad_words or ()),
                allowed_token_ids=get_token_ids(body, "allowed_token_ids"),
                temperature=get_float(body, "temperature", 1.0),
                top_p=get_float(body, "top_p", 1.0),
                top_k=0 if top_k == -1 else top_k,   # -1 disables, as in vLLM
                seed=get_int(body, "seed", None), stop=get_stop(body, stop_name),
                ignore_eos=get_bool(body, "ignore_eos", False),
                skip_special_tokens=get_bool(body, "skip_special_tokens", True),
                spaces_between_special_tokens=get_bool(body, "spaces_between_special_tokens",
                                                       True))


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
