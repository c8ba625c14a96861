"""What a request's output must match: a JSON schema, any JSON object, a regex, one of a list of
strings, or a grammar (Lark, or GBNF / EBNF as llama.cpp writes it).

A `Constraint` is plain, hashable data (the compile cache is keyed by it); `to_llguidance()`
turns it into the grammar text llguidance compiles (jaxserve/structured/compiler.py). The
server builds one from the request fields (server/structured.py); tool calling builds one
from the tools (server/tools.py), usually a JSON schema wrapped between literal markers:

    args = Constraint.json_schema({"type": "object", "properties": {...}})
    call = Constraint.grammar(
        'start: "<tool_call>\\n" body "\\n</tool_call>"\\n'
        f"body: {args.lark_rule()}\\n")

`lark_rule()` is the schema as a Lark expression (llguidance's `%json {...}`, with this
constraint's whitespace options), usable anywhere a rule body goes: repeated
(`start: call+`), in alternatives, after free text. `Constraint.json_schema(s).wrapped(
prefix, suffix)` is the single-call case of the above.

JSON output is compact by default (", " and ": " between items, no other whitespace): a model
is never free to emit whitespace forever. `whitespace_pattern` (a regex, vLLM's
`guided_whitespace_pattern`) allows that whitespace between JSON tokens instead.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from jaxserve.admission import AdmissionError

KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")

# llguidance's JSON options for compact output (item and key separators as Python's json.dumps)
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _refuse(message: str, param: str):
    raise AdmissionError(message, param=param, code="invalid_structured_output")


@dataclass(frozen=True)
class Constraint:
    kind: str        # one of KINDS
    # json_schema: the schema as JSON (its own key order); regex: the pattern; choice: the
    # strings as a JSON list; grammar: the grammar text; json_object: ""
    spec: str
    whitespace_pattern: str | None = None   # JSON kinds: whitespace allowed between tokens
    # the request field it came from, named in errors (not part of the identity)
    param: str = field(default="structured_outputs", compare=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown constraint kind {self.kind!r}; one of {KINDS}")
        if not isinstance(self.spec, str):
            _refuse(f"'{self.param}' must be a string", self.param)
        if self.whitespace_pattern is not None and (
                self.kind not in ("json_object", "json_schema")
                or not isinstance(self.whitespace_pattern, str) or not self.whitespace_pattern):
            _refuse("a whitespace pattern applies to JSON output only, as a non-empty regex",
                    self.param)

    # -- constructors --------------------------------------------------------------------------
    @classmethod
    def json_schema(cls, schema: dict | bool | str, *, whitespace_pattern: str | None = None,
                    param: str = "structured_outputs.json") -> "Constraint":
        """Output that is a JSON value valid under `schema` (a dict, or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                _refuse(f"'{param}' is not valid JSON: {e}", param)
        if isinstance(schema, bool):
            schema = {} if schema else {"not": {}}
        if not isinstance(schema, dict):
            _refuse(f"'{param}' must be a JSON schema (an object)", param)
        # keys in the schema's order: llguidance writes properties in that order
        return cls("json_schema", json.dumps(schema, ensure_ascii=False), whitespace_pattern,
                   param)

    @classmethod
    def json_object(cls, *, whitespace_pattern: str | None = None,
                    param: str = "response_format") -> "Constraint":
        """Output that is any JSON object."""
        return cls("json_object", "", whitespace_pattern, param)

    @classmethod
    def regex(cls, pattern: str, *, param: str = "structured_outputs.regex") -> "Constraint":
        """Output that the regex matches whole."""
        if not isinstance(pattern, str) or not pattern:
            _refuse(f"'{param}' must be a non-empty string", param)
        return cls("regex", pattern, None, param)

    @classmethod
    def choice(cls, choices, *, param: str = "structured_outputs.choice") -> "Constraint":
        """Output that is exactly one of `choices` (strings)."""
        if (not isinstance(choices, (list, tuple)) or not choices
                or not all(isinstance(c, str) and c for c in choices)):
            _refuse(f"'{param}' must be a non-empty list of non-empty strings", param)
        return cls("choice", json.dumps(list(choices), ensure_ascii=False), None, param)

    @classmethod
    def grammar(cls, text: str, *, param: str = "structured_outputs.grammar") -> "Constraint":
        """Output in the language of a grammar: Lark (llguidance's dialect, `start` the top
        rule; regexes as /.../, `%json {schema}` for a JSON schema) or GBNF / EBNF (`root ::=
        ...`, as llama.cpp's grammars; converted to Lark)."""
        if not isinstance(text, str) or not text.strip():
            _refuse(f"'{param}' must be a non-empty grammar", param)
        return cls("grammar", text, None, param)

    def schema(self) -> dict:
        """A JSON constraint's schema (json_object: any object)."""
        if self.kind == "json_object":
            return {"type": "object"}
        if self.kind != "json_schema":
            raise ValueError(f"a {self.kind} constraint has no schema")
        return json.loads(self.spec)

    # -- composition (tool calls) --------------------------------------------------------------
    def json_options(self) -> dict:
        """llguidance's JSON compile options for this constraint's whitespace."""
        if self.whitespace_pattern is None:
            return dict(COMPACT)
        return {"whitespace_flexible": True, "whitespace_pattern": self.whitespace_pattern}

    def lark_rule(self) -> str:
        """A JSON constraint as a Lark rule body (`%json {...}`), for use inside a grammar."""
        if self.kind not in ("json_schema", "json_object"):
            raise ValueError(f"lark_rule() is for JSON constraints, not {self.kind}")
        schema = dict(self.schema(), **{"x-guidance": self.json_options()})
        return "%json " + json.dumps(schema, ensure_ascii=False)

    def wrapped(self, prefix: str, suffix: str) -> "Constraint":
        """This JSON constraint between literal text: `prefix` JSON `suffix` (e.g.
        "<tool_call>\\n" ... "\\n</tool_call>"), as a grammar constraint."""
        return Constraint.grammar(
            f"start: {json.dumps(prefix)} body {json.dumps(suffix)}\nbody: {self.lark_rule()}\n",
            param=self.param)

    # -- for the engine ------------------------------------------------------------------------
    def to_llguidance(self) -> str:
        """The grammar text llguidance's LLMatcher takes. Raises AdmissionError for a grammar
        that cannot even be converted (GBNF syntax errors); other errors surface when it is
        validated (GrammarCompiler.check)."""
        import llguidance
        from llguidance import LLMatcher
        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(self.spec, overrides=self.json_options())
        if self.kind == "json_object":
            return LLMatcher.grammar_from_json_schema('{"type": "object"}',
                                                      overrides=self.json_options())
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.spec)
        if self.kind == "choice":
            return LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c) for c in json.loads(self.spec)))
        try:
            return llguidance.grammar_from("grammar", self.spec)
        except ValueError as e:
            _refuse(f"'{self.param}' is not a valid grammar: {e}", self.param)

    def describe(self) -> str:
        """A short description for logs."""
        text = self.spec if len(self.spec) <= 60 else self.spec[:57] + "..."
        return f"{self.kind} {text}".strip()


def strict_objects(schema: Any) -> Any:
    """`schema` with "additionalProperties": false on every object schema that says nothing
    about it (vLLM's disable_additional_properties)."""
    if isinstance(schema, list):
        return [strict_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_objects(v) for k, v in schema.items()}
    if ("properties" in out or out.get("type") == "object") and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out
