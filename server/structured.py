"""Structured-output request fields -> one jaxserve.structured.Constraint (or None).

Read on /v1/completions and /v1/chat/completions alike:
- OpenAI's `response_format`: {"type": "text"} (none), {"type": "json_object"}, or
  {"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}};
- vLLM's `structured_outputs`: {"json" | "regex" | "choice" | "grammar" | "json_object": ...}
  with `whitespace_pattern`, `disable_any_whitespace`, `disable_additional_properties` and
  `disable_fallback` (there is no fallback engine: accepted as it is);
- vLLM's older names: `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`,
  `guided_json_object`, `guided_whitespace_pattern`, `guided_decoding_backend`.
One constraint per request: two fields (or two keys of `structured_outputs`) that each ask for
one are a 400 naming both. A backend other than llguidance's ("auto", "guidance",
"llguidance") is a 400, as is vLLM's `structural_tag` (not implemented). Whether a schema,
regex or grammar is valid is checked when the engine admits the request (an AdmissionError
naming the field, so a 400 as well).
"""
from __future__ import annotations

from jaxserve.structured import Constraint, strict_objects
from server.protocol import bad

BACKENDS = ("auto", "guidance", "llguidance")
SO_KEYS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag",
           "whitespace_pattern", "disable_any_whitespace", "disable_additional_properties",
           "disable_fallback")


def _str(v, name: str) -> str:
    if not isinstance(v, str):
        raise bad(f"'{name}' must be a string", name)
    return v


def _bool(v, name: str) -> bool:
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be a boolean", name)
    return v


def _schema(v, name: str):
    if not isinstance(v, (dict, str, bool)):
        raise bad(f"'{name}' must be a JSON schema (an object, or its JSON text)", name)
    return v


def _response_format(rf) -> list[tuple[str, tuple]]:
    """(param, (kind, value)) asked for by response_format."""
    if not isinstance(rf, dict):
        raise bad("'response_format' must be an object", "response_format")
    kind = rf.get("type")
    if kind == "text":
        return []
    if kind == "json_object":
        return [("response_format", ("json_object", True))]
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise bad("'response_format.json_schema' must be an object",
                      "response_format.json_schema")
        if js.get("strict") is not None:
            _bool(js["strict"], "response_format.json_schema.strict")
        schema = js.get("schema", js.get("json_schema"))
        if schema is None:      # OpenAI lets the schema out: any JSON object
            return [("response_format.json_schema", ("json_object", True))]
        return [("response_format.json_schema.schema",
                 ("json", _schema(schema, "response_format.json_schema.schema")))]
    if kind == "structural_tag":
        raise bad("response_format type 'structural_tag' is not supported (use "
                  "'json_schema', or tools with tool_choice)", "response_format.type")
    raise bad("'response_format.type' must be 'text', 'json_object' or 'json_schema'",
              "response_format.type")


def parse_structured(body: dict) -> Constraint | None:
    """The request's constraint, or None; a 400 (ApiError) for a malformed or conflicting one."""
    asked: list[tuple[str, tuple]] = []     # (param, (kind, value))
    ws: list[tuple[str, str]] = []          # (param, whitespace pattern)
    compact = strict = False
    if body.get("response_format") is not None:
        asked += _response_format(body["response_format"])
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise bad("'structured_outputs' must be an object", "structured_outputs")
        unknown = sorted(set(so) - set(SO_KEYS))
        if unknown:
            raise bad(f"'structured_outputs.{unknown[0]}' is not a structured output option "
                      f"(known: {', '.join(SO_KEYS)})", f"structured_outputs.{unknown[0]}")
        for key in ("json", "regex", "choice", "grammar", "json_object"):
            v = so.get(key)
            if v is None or (key == "json_object" and v is False):
                continue
            p = f"structured_outputs.{key}"
            if key == "json_object":
                _bool(v, p)
            asked.append((p, (key, v)))
        if so.get("structural_tag") is not None:
            raise bad("'structured_outputs.structural_tag' is not supported",
                      "structured_outputs.structural_tag")
        if so.get("whitespace_pattern") is not None:
            ws.append(("structured_outputs.whitespace_pattern",
                       _str(so["whitespace_pattern"], "structured_outputs.whitespace_pattern")))
        for key in ("disable_any_whitespace", "disable_additional_properties", "disable_fallback"):
            if so.get(key) is not None:
                _bool(so[key], f"structured_outputs.{key}")
        compact = so.get("disable_any_whitespace") is True
        strict = so.get("disable_additional_properties") is True
    for name, kind in (("guided_json", "json"), ("guided_regex", "regex"),
                       ("guided_choice", "choice"), ("guided_grammar", "grammar"),
                       ("guided_json_object", "json_object")):
        v = body.get(name)
        if v is None or (kind == "json_object" and v is False):
            continue
        if kind == "json_object":
            _bool(v, name)
        asked.append((name, (kind, v)))
    if body.get("structural_tag") is not None:
        raise bad("'structural_tag' is not supported", "structural_tag")
    backend = body.get("guided_decoding_backend")
    if backend is not None:
        name = _str(backend, "guided_decoding_backend").split(":", 1)[0]
        if name not in BACKENDS:
            raise bad(f"guided_decoding_backend {backend!r} is not available: structured output "
                      f"here runs on llguidance ({', '.join(map(repr, BACKENDS))})",
                      "guided_decoding_backend")
    if body.get("guided_whitespace_pattern") is not None:
        ws.append(("guided_whitespace_pattern",
                   _str(body["guided_whitespace_pattern"], "guided_whitespace_pattern")))
    if len(asked) > 1:
        raise bad(f"one structured output constraint per request: got "
                  f"{' and '.join(repr(p) for p, _ in asked)}", asked[1][0])
    if len(ws) > 1 or (ws and compact):
        names = [p for p, _ in ws] + (["structured_outputs.disable_any_whitespace"] if compact else [])
        raise bad(f"conflicting whitespace options: {', '.join(names)}", names[-1])
    if not asked:
        if ws:
            raise bad(f"'{ws[0][0]}' applies to JSON output; the request asks for none", ws[0][0])
        return None
    param, (kind, value) = asked[0]
    pattern = ws[0][1] if ws else None
    if pattern is not None and kind not in ("json", "json_object"):
        raise bad(f"'{ws[0][0]}' applies to JSON output, not to {kind}", ws[0][0])
    if kind == "json":
        value = _schema(value, param)
        if strict:
            value = strict_objects(Constraint.json_schema(value, param=param).schema())
        return Constraint.json_schema(value, whitespace_pattern=pattern, param=param)
    if kind == "json_object":
        return Constraint.json_object(whitespace_pattern=pattern, param=param)
    if kind == "regex":
        return Constraint.regex(_str(value, param), param=param)
    if kind == "choice":
        return Constraint.choice(value, param=param)
    return Constraint.grammar(_str(value, param), param=param)


def structured_fields(body: dict) -> dict:
    """SamplingParams keywords for the request's constraint: {"structured": Constraint} or {}."""
    c = parse_structured(body)
    return {} if c is None else {"structured": c}
