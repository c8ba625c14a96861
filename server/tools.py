"""Tool calling: the request's `tools` / `tool_choice`, the model formats of a tool call (the
parsers that find calls in generated text, whole or streamed) and the constraint that enforces
tool_choice "required" or a named tool.

Formats (`--tool-call-parser`), as vLLM's parsers of the same names read them:
- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number, with text
  around them (Qwen 2.5 / 3, Hermes 2 / 3). Content is the text outside the calls.
- llama3_json: the whole output is `{"name": ..., "parameters": {...}}` (or "arguments"),
  calls separated by ";", optionally after `<|python_tag|>` (Llama 3.1 / 3.2).
- mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` after optional text.
  Its call ids are 9 alphanumerics: Mistral's chat templates refuse others in the history.

One call's JSON object is read by `_ObjectScanner`, a char-by-char JSON validator that notes where
the top-level values start and end. A stream (`ToolStream`) sends a call's header (index, id,
name) once its name is read, then the raw text of its arguments value as it arrives; text that
may be the start of a call marker is held back, so no markup reaches the content. A call whose
JSON goes wrong before its name is read is content, as in the whole-text parse (`extract`); one
that goes wrong later keeps the arguments already sent and its rest becomes content (a stream
cannot take back what it sent). Arguments are the model's own text of the value, so the streamed
fragments concatenate to the non-streamed string.
"""
from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field

from server.protocol import bad

PARSERS = ("hermes", "llama3_json", "mistral")
CHOICES = ("none", "auto", "required")


# ------------------------------------------------------------------ request fields
@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict               # a JSON schema ({} when the request gave none)
    raw: dict                      # {"type": "function", "function": {...}} for the template


@dataclass(frozen=True)
class ToolRequest:
    """What a chat request asks of tools: the definitions, and how the model must use them."""
    tools: tuple[Tool, ...]
    choice: str                    # none | auto | required | named
    name: str | None = None        # the named tool (choice "named")
    parallel: bool = True          # parallel_tool_calls: more than one call per turn

    @property
    def template_tools(self) -> list[dict] | None:
        return [t.raw for t in self.tools] or None

    @property
    def parses_calls(self) -> bool:
        return self.choice != "none" and bool(self.tools)


def _tool(i: int, t) -> Tool:
    where = f"tools[{i}]"
    if not isinstance(t, dict) or t.get("type", "function") != "function":
        raise bad(f"{where} must be {{'type': 'function', 'function': {{...}}}} (only function "
                  "tools are supported)", "tools")
    fn = t.get("function")
    if not isinstance(fn, dict):
        raise bad(f"{where}.function must be an object", "tools")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise bad(f"{where}.function.name must be a non-empty string", "tools")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise bad(f"{where}.function.parameters must be a JSON schema object", "tools")
    desc = fn.get("description")
    if desc is not None and not isinstance(desc, str):
        raise bad(f"{where}.function.description must be a string", "tools")
    return Tool(name, params or {}, {"type": "function", "function": fn})


def parse_tools(body: dict, *, parser: str | None, auto_enabled: bool) -> ToolRequest | None:
    """`tools`, `tool_choice` and `parallel_tool_calls` of a chat body, checked as vLLM checks
    them (tools without tool_choice: "auto"; "auto" needs --enable-auto-tool-choice and a
    parser; a named tool must be among the tools); None when the request uses no tools."""
    for old in ("functions", "function_call"):
        if body.get(old) is not None:
            raise bad(f"'{old}' is deprecated and not supported; use 'tools' and 'tool_choice'",
                      old)
    raw_tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise bad("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    if raw_tools is None:
        if choice not in (None, "none"):
            raise bad("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(raw_tools, list):
        raise bad("'tools' must be a list of function tools", "tools")
    tools = tuple(_tool(i, t) for i, t in enumerate(raw_tools))
    if len({t.name for t in tools}) != len(tools):
        raise bad("tool names must be unique", "tools")
    name = None
    if choice is None:
        choice = "auto" if tools else "none"
    elif isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad("a named 'tool_choice' is {\"type\": \"function\", \"function\": "
                      "{\"name\": \"my_function\"}}", "tool_choice")
        name = fn["name"]
        if name not in {t.name for t in tools}:
            raise bad(f"'tool_choice' names {name!r}, which is not among 'tools'", "tool_choice")
        choice = "named"
    elif choice not in CHOICES:
        raise bad(f"'tool_choice' must be one of {list(CHOICES)} or a named function",
                  "tool_choice")
    if choice == "required" and not tools:   # OpenAI: required over no tools acts as none
        choice = "none"
    if choice == "auto" and not (auto_enabled and parser):
        raise bad('"auto" tool choice requires --enable-auto-tool-choice and '
                  "--tool-call-parser to be set", "tool_choice")
    return ToolRequest(tools, choice, name, parallel is not False)


# ------------------------------------------------------------------ the calls found
@dataclass
class ToolCall:
    name: str
    arguments: str                 # a JSON text (the model's own)
    id: str = ""

    def as_dict(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def call_id(parser: str | None) -> str:
    if parser == "mistral":
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    return "call_" + secrets.token_hex(12)


# ------------------------------------------------------------------ incremental JSON
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?\Z")
_WS = " \t\n\r"


class _ObjectScanner:
    """Checks, one character at a time, that the text is a prefix of one JSON object, and notes
    for each top-level key where its value starts and ends (indices into the text fed)."""

    def __init__(self):
        self.text = ""
        self.stack: list[str] = []      # open containers: "{" or "["
        self.state = "start"            # start|key_or_end|key|colon|value|value_or_end|after|
        self.error = False              #   string|number|literal
        self.done = False
        self.values: dict[str, list] = {}   # key -> [start, end or None]
        self._str_is_key = False
        self._str_start = 0
        self._escape = 0                # 0, or chars left in an escape (1: after "\", 2..5: \uXXXX)
        self._token_start = 0
        self._literal = ""
        self._key: str | None = None

    def feed(self, text: str) -> None:
        """Scan `text`; the text kept ends at the character that failed or closed the object."""
        base = len(self.text)
        self.text += text
        for k, ch in enumerate(text):
            if self.error or self.done:
                self.text = self.text[:base + k]
                return
            self._char(ch, base + k)

    def _fail(self):
        self.error = True

    def _begin_value(self, ch: str, i: int) -> None:
        if len(self.stack) == 1 and self.stack[0] == "{" and self._key is not None:
            self.values[self._key] = [i, None]
        if ch == "{":
            self.stack.append("{")
            self.state = "key_or_end"
        elif ch == "[":
            self.stack.append("[")
            self.state = "value_or_end"
        elif ch == '"':
            self.state, self._str_is_key, self._str_start = "string", False, i
        elif ch == "-" or ch.isdigit():
            self.state, self._token_start = "number", i
        elif ch in "tfn":
            self.state = "literal"
            self._literal = {"t": "rue", "f": "alse", "n": "ull"}[ch]
        else:
            self._fail()

    def _end_value(self, end: int) -> None:
        """A value ended just before index `end`."""
        if len(self.stack) == 1 and self.stack[0] == "{" and self._key in self.values:
            self.values[self._key][1] = end
        self.state = "after"

    def _char(self, ch: str, i: int) -> None:
        s = self.state
        if s == "string":
            if self._escape:
                if self._escape == 1:
                    if ch == "u":
                        self._escape = 5
                        return
                    if ch not in '"\\/bfnrt':
                        self._fail()
                    self._escape = 0
                elif ch in string.hexdigits:
                    self._escape = 0 if self._escape == 2 else self._escape - 1
                else:
                    self._fail()
            elif ch == "\\":
                self._escape = 1
            elif ch == '"':
                if self._str_is_key:
                    if len(self.stack) == 1:
                        self._key = json.loads(self.text[self._str_start:i + 1])
                    self.state = "colon"
                else:
                    self._end_value(i + 1)
            elif ord(ch) < 0x20:
                self._fail()
            return
        if s == "number":
            if ch in "0123456789+-.eE":
                return
            if not _NUMBER.match(self.text[self._token_start:i]):
                return self._fail()
            self._end_value(i)
            s = "after"   # the delimiter is read below
        if s == "literal":
            if ch != self._literal[0]:
                return self._fail()
            self._literal = self._literal[1:]
            if not self._literal:
                self._end_value(i + 1)
            return
        if ch in _WS:
            return
        if s == "start":
            if ch != "{":
                return self._fail()
            self.stack.append("{")
            self.state = "key_or_end"
        elif s in ("key_or_end", "key"):
            if ch == '"':
                self.state, self._str_is_key, self._str_start = "string", True, i
            elif ch == "}" and s == "key_or_end":
                self._close(i)
            else:
                self._fail()
        elif s == "colon":
            if ch != ":":
                return self._fail()
            self.state = "value"
        elif s == "value":
            self._begin_value(ch, i)
        elif s == "value_or_end":
            if ch == "]":
                self._close(i)
            else:
                self._begin_value(ch, i)
        elif s == "after":
            top = self.stack[-1]
            if ch == ",":
                self.state = "key" if top == "{" else "value"
            elif ch == ("}" if top == "{" else "]"):
                self._close(i)
            else:
                self._fail()

    def _close(self, i: int) -> None:
        self.stack.pop()
        if not self.stack:
            self.done = True
            return
        self._end_value(i + 1)


# ------------------------------------------------------------------ one call, streamed
@dataclass
class Delta:
    """What one feed produced: content text and tool-call deltas in OpenAI's shape."""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)

    def add(self, other: "Delta") -> None:
        self.content += other.content
        self.tool_calls.extend(other.tool_calls)


class _CallStream:
    """One call's JSON object: a header delta once the name is read, then argument fragments."""

    def __init__(self, index: int, id: str, args_keys: tuple[str, ...]):
        self.index, self.id, self.args_keys = index, id, args_keys
        self.scan = _ObjectScanner()
        self.name: str | None = None
        self.sent_header = False
        self.sent_args = 0              # chars of the arguments value sent

    def _args_span(self) -> tuple[int, int | None] | None:
        for key in self.args_keys:
            if key in self.scan.values:
                return tuple(self.scan.values[key])
        return None

    def feed(self, text: str, out: Delta) -> None:
        """Scan `text`; send what the valid part of the object allows (so what is sent does
        not depend on how the text was cut into deltas, even when the object goes wrong)."""
        self.scan.feed(text)
        valid = len(self.scan.text) - self.scan.error      # the failing char is not valid
        if self.name is None:
            span = self.scan.values.get("name")
            if span is None or span[1] is None:
                return
            value = json.loads(self.scan.text[span[0]:span[1]])
            if not isinstance(value, str):
                self.scan.error = True
                return
            self.name = value
        if not self.sent_header:
            self.sent_header = True
            out.tool_calls.append({"index": self.index, "id": self.id, "type": "function",
                                   "function": {"name": self.name, "arguments": ""}})
        span = self._args_span()
        if span is None:
            return
        start, end = span
        text = self.scan.text
        if text[start] == '"':     # arguments written as a JSON string: sent once complete
            if end is None or self.sent_args:
                return
            value = json.loads(text[start:end])
            frag, self.sent_args = (value if isinstance(value, str) else text[start:end]), 1
        else:
            stop = min(valid, valid if end is None else end)
            frag = text[start + self.sent_args:stop]
            self.sent_args = stop - start
        if frag:
            out.tool_calls.append({"index": self.index, "function": {"arguments": frag}})

    def unsent(self) -> str:
        """After a failure: the scanned text not sent as arguments (after the header)."""
        span = self._args_span()
        if span is not None and self.sent_args:
            return self.scan.text[span[0] + self.sent_args:]
        return self.scan.text[self.scan.values["name"][1]:]

    def close(self, out: Delta) -> None:
        """The call is over: one that sent no arguments gets "{}"."""
        if self.sent_header and not self.sent_args:
            out.tool_calls.append({"index": self.index, "function": {"arguments": "{}"}})


def _held_prefix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


# ------------------------------------------------------------------ parsers
def _call_from(obj, name_key: str, args_keys: tuple[str, ...], text: str) -> ToolCall | None:
    """A ToolCall from a decoded object (None when it is not one); `text` is the object's own
    JSON text, whose arguments value (as the model wrote it) becomes the arguments string."""
    if not isinstance(obj, dict) or not isinstance(obj.get(name_key), str):
        return None
    for key in args_keys:
        if key in obj:
            value = obj[key]
            if isinstance(value, str):
                return ToolCall(obj[name_key], value)
            scan = _ObjectScanner()
            scan.feed(text)
            span = scan.values.get(key)
            if scan.done and span is not None and span[1] is not None:
                return ToolCall(obj[name_key], text[span[0]:span[1]])
            return ToolCall(obj[name_key], json.dumps(value, ensure_ascii=False))
    return ToolCall(obj[name_key], "{}")


_DECODER = json.JSONDecoder()


def _decode_at(text: str, i: int) -> tuple[object, int] | None:
    """(value, end) of the JSON value at text[i:] (leading whitespace skipped), or None."""
    while i < len(text) and text[i] in _WS:
        i += 1
    try:
        return _DECODER.raw_decode(text, i)
    except ValueError:
        return None


def _lstrip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


class ToolParser:
    """A model's tool-call format: `extract` reads a whole output, `stream()` a streamed one."""
    name = ""
    start = ""                     # the marker before a call (or the calls)
    name_key = "name"
    args_keys: tuple[str, ...] = ("arguments",)
    markers: tuple[str, ...] = ()  # what decode must keep where the tokenizer makes it special

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        raise NotImplementedError

    def stream(self) -> "ToolStream":
        raise NotImplementedError

    def _ids(self, calls: list[ToolCall]) -> list[ToolCall]:
        for c in calls:
            c.id = call_id(self.name)
        return calls


class HermesParser(ToolParser):
    name = "hermes"
    start, end = "<tool_call>", "</tool_call>"
    markers = (start, end)

    def extract(self, text):
        content, calls, i = [], [], 0
        while True:
            j = text.find(self.start, i)
            if j < 0:
                content.append(text[i:])
                break
            content.append(text[i:j])
            k = j + len(self.start)
            got = _decode_at(text, k)
            call = got and _call_from(got[0], self.name_key, self.args_keys,
                                      text[_lstrip_ws(text, k):got[1]])
            if call is None:   # malformed: the call's text, to its end marker, is content
                e = text.find(self.end, k)
                e = len(text) if e < 0 else e + len(self.end)
                content.append(text[j:e])
                i = e
                continue
            calls.append(call)
            i = _lstrip_ws(text, got[1])
            if text.startswith(self.end, i):
                i = _lstrip_ws(text, i + len(self.end))
        body = "".join(content)
        if calls and not body.strip():
            body = None
        return body, self._ids(calls)

    def stream(self):
        return HermesStream(self)


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    start = "<|python_tag|>"
    args_keys = ("parameters", "arguments")
    markers = (start,)

    def extract(self, text):
        i = _lstrip_ws(text, 0)
        if text.startswith(self.start, i):
            i += len(self.start)
        elif not text.startswith("{", i):
            return text, []
        calls = []
        while True:
            i = _lstrip_ws(text, i)
            got = _decode_at(text, i)
            call = got and _call_from(got[0], self.name_key, self.args_keys, text[i:got[1]])
            if call is None:
                return text, []     # as vLLM: the whole output, as content
            calls.append(call)
            i = _lstrip_ws(text, got[1])
            if i == len(text):
                return None, self._ids(calls)
            if text[i] != ";":
                return text, []
            i += 1

    def stream(self):
        return Llama3Stream(self)


class MistralParser(ToolParser):
    name = "mistral"
    start = "[TOOL_CALLS]"
    markers = (start,)

    def extract(self, text):
        j = text.find(self.start)
        if j < 0:
            return text, []
        i = _lstrip_ws(text, j + len(self.start))
        got = _decode_at(text, i)
        if got is None or not isinstance(got[0], list) or not got[0]:
            return text, []
        # each element's own text: the array re-read one object at a time
        calls, k = [], i + 1
        for obj in got[0]:
            k = _lstrip_ws(text, k)
            one = _decode_at(text, k)
            call = _call_from(obj, self.name_key, self.args_keys, text[k:one[1]])
            if call is None:
                return text, []
            calls.append(call)
            k = _lstrip_ws(text, one[1]) + 1        # past the "," (or the "]")
        content = text[:j] + text[_lstrip_ws(text, got[1]):]
        return (content if content.strip() else None), self._ids(calls)

    def stream(self):
        return MistralStream(self)


PARSER_CLASSES = {"hermes": HermesParser, "llama3_json": Llama3JsonParser,
                  "mistral": MistralParser}


def get_parser(name: str | None) -> ToolParser | None:
    if name is None:
        return None
    if name not in PARSER_CLASSES:
        raise ValueError(f"unknown tool-call parser {name!r}; one of {', '.join(PARSERS)}")
    return PARSER_CLASSES[name]()


# ------------------------------------------------------------------ streams
class ToolStream:
    """Feed it text deltas; get `Delta`s (content, tool-call deltas). `finish()` at the end.
    `calls` lists the calls sent (name and arguments as streamed) for the final message."""

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.pending = ""               # text not yet decided
        self.call: _CallStream | None = None
        self.call_raw = ""              # the current call's text from its marker (for fallback)
        self.calls: list[ToolCall] = []
        self.args: list[str] = []       # streamed arguments of each call

    def feed(self, text: str) -> Delta:
        out = Delta()
        self.pending += text
        self._run(out, final=False)
        return out

    def finish(self) -> Delta:
        out = Delta()
        self._run(out, final=True)
        if self.call is not None:      # the output ended inside a call
            self._fallback(out, "")
        if self.pending:
            out.content += self.pending
            self.pending = ""
        return out

    # -- shared pieces
    def _open_call(self, raw: str) -> None:
        self.call = _CallStream(len(self.calls), call_id(self.parser.name), self.parser.args_keys)
        self.call_raw = raw

    def _feed_call(self, out: Delta) -> bool:
        """Feed pending text to the open call; True once its object is complete (the text
        after it left in pending), False while it needs more. A malformed call falls back."""
        call = self.call
        before = len(call.scan.text)
        sub = Delta()
        call.feed(self.pending, sub)
        used = len(call.scan.text) - before
        self.call_raw += self.pending[:used]
        self.pending = self.pending[used:]
        self._record(sub)
        out.add(sub)
        if call.scan.error or (call.scan.done and not call.sent_header):   # no call after all
            self._fallback(out, self.pending)
            return False
        if call.scan.done:
            call.close(sub2 := Delta())
            self._record(sub2)
            out.add(sub2)
            self.call = None
            return True
        return False

    def _record(self, d: Delta) -> None:
        for tc in d.tool_calls:
            if "id" in tc:
                self.calls.append(ToolCall(tc["function"]["name"], "", tc["id"]))
            self.calls[tc["index"]].arguments += tc["function"]["arguments"]

    def _fallback(self, out: Delta, rest: str) -> None:
        """The open call is malformed: before its header, all its text is content; after, its
        unsent text is (its arguments stay as sent)."""
        call = self.call
        self.call = None
        if not call.sent_header:
            out.content += self.call_raw
        else:
            call.close(sub := Delta())
            self._record(sub)
            out.add(sub)
            out.content += call.unsent()
        self.pending = rest
        self._after_fallback(out)

    def _after_fallback(self, out: Delta) -> None:
        pass

    def _run(self, out: Delta, final: bool) -> None:
        raise NotImplementedError


class HermesStream(ToolStream):
    """text <tool_call>{...}</tool_call> text ...; whitespace after a call is dropped."""

    def __init__(self, parser):
        super().__init__(parser)
        self.state = "text"             # text | call | after_object | after_call | skip_to_end

    def _run(self, out, final):
        p = self.parser
        while self.pending:
            if self.state == "after_call":
                i = _lstrip_ws(self.pending, 0)
                self.pending = self.pending[i:]
                if not self.pending:
                    return
                self.state = "text"
            if self.state == "text":
                j = self.pending.find(p.start)
                if j < 0:
                    keep = 0 if final else _held_prefix(self.pending, p.start)
                    out.content += self.pending[:len(self.pending) - keep]
                    self.pending = self.pending[len(self.pending) - keep:]
                    return
                out.content += self.pending[:j]
                self.pending = self.pending[j + len(p.start):]
                self._open_call(p.start)
                self.state = "call"
            elif self.state == "call":
                if not self._feed_call(out):
                    if self.call is not None:
                        return                  # needs more text
                    continue                    # fell back: state set by _after_fallback
                self.state = "after_object"
            elif self.state == "after_object":   # optional whitespace, then the end marker
                i = _lstrip_ws(self.pending, 0)
                rest = self.pending[i:]
                if rest.startswith(p.end):
                    self.pending = rest[len(p.end):]
                    self.state = "after_call"
                elif p.end.startswith(rest) and not final:
                    return                      # maybe the marker: wait
                else:
                    self.pending = rest
                    self.state = "after_call"
            elif self.state == "skip_to_end":   # a malformed call's text, to its end marker
                j = self.pending.find(p.end)
                if j < 0:
                    keep = 0 if final else _held_prefix(self.pending, p.end)
                    out.content += self.pending[:len(self.pending) - keep]
                    self.pending = self.pending[len(self.pending) - keep:]
                    return
                out.content += self.pending[:j + len(p.end)]
                self.pending = self.pending[j + len(p.end):]
                self.state = "text"

    def _after_fallback(self, out):
        self.state = "skip_to_end"


class Llama3Stream(ToolStream):
    """Calls only when the output opens with <|python_tag|> or "{"; then `{...}; {...}`."""

    def __init__(self, parser):
        super().__init__(parser)
        self.state = "start"            # start | text | call | between | broken
        self.lead = ""                  # text before the first call (whitespace, the tag)

    def _run(self, out, final):
        p = self.parser
        while self.pending:
            if self.state == "start":
                i = _lstrip_ws(self.pending, 0)
                rest = self.pending[i:]
                if rest.startswith(p.start) or rest.startswith("{"):
                    tag = len(p.start) if rest.startswith(p.start) else 0
                    self.lead += self.pending[:i + tag]
                    self.pending = rest[tag:]
                    self.state = "between"
                elif not final and (not rest or p.start.startswith(rest)):
                    return
                else:
                    self.state = "text"
            elif self.state in ("text", "broken"):
                out.content += self.pending
                self.pending = ""
            elif self.state == "between":        # before a call: whitespace, then "{"
                i = _lstrip_ws(self.pending, 0)
                if i == len(self.pending):
                    if final:
                        self.pending = ""
                    return
                if self.pending[i] != "{":
                    self.state = "broken"
                    continue
                self._open_call(self.lead + self.pending[:i])
                self.lead = ""
                self.pending = self.pending[i:]
                self.state = "call"
            elif self.state == "call":
                if not self._feed_call(out):
                    if self.call is not None:
                        return
                    continue
                self.state = "separator"
            elif self.state == "separator":      # whitespace, then ";" (or the end)
                i = _lstrip_ws(self.pending, 0)
                if i == len(self.pending):
                    self.pending = ""
                    return
                if self.pending[i] == ";":
                    self.pending = self.pending[i + 1:]
                    self.state = "between"
                else:
                    self.pending = self.pending[i:]
                    self.state = "broken"

    def _after_fallback(self, out):
        self.state = "broken"


class MistralStream(ToolStream):
    """text [TOOL_CALLS] [ {...}, {...} ] text"""

    def __init__(self, parser):
        super().__init__(parser)
        self.state = "text"             # text | open | element | call | comma | after | rest
        self.raw = ""                   # the marker and the array's text before a call

    def _run(self, out, final):
        p = self.parser
        while self.pending:
            s = self.state
            if s == "text":
                j = self.pending.find(p.start)
                if j < 0:
                    keep = 0 if final else _held_prefix(self.pending, p.start)
                    out.content += self.pending[:len(self.pending) - keep]
                    self.pending = self.pending[len(self.pending) - keep:]
                    return
                out.content += self.pending[:j]
                self.raw = p.start
                self.pending = self.pending[j + len(p.start):]
                self.state = "open"
            elif s in ("open", "element", "comma"):
                i = _lstrip_ws(self.pending, 0)
                self.raw += self.pending[:i]
                self.pending = self.pending[i:]
                if not self.pending:
                    return
                ch = self.pending[0]
                if s == "open" and ch == "[" or s == "comma" and ch == ",":
                    self.raw += ch
                    self.pending = self.pending[1:]
                    self.state = "element"
                elif s == "element" and ch == "{":
                    self._open_call(self.raw)
                    self.raw = ""
                    self.state = "call"
                elif s == "comma" and ch == "]":
                    self.pending = self.pending[1:]
                    self.state = "after"
                else:                            # not the array format: text from the marker
                    out.content += self.raw
                    self.raw = ""
                    self.state = "rest"
            elif s == "call":
                if not self._feed_call(out):
                    if self.call is not None:
                        return
                    continue
                self.state = "comma"
            elif s == "after":
                i = _lstrip_ws(self.pending, 0)
                self.pending = self.pending[i:]
                if self.pending:
                    self.state = "rest"
            else:                                # rest: content
                out.content += self.pending
                self.pending = ""

    def _after_fallback(self, out):
        self.state = "rest"


# ------------------------------------------------------------------ without a parser
class JsonArrayParser(MistralParser):
    """tool_choice "required" without --tool-call-parser, as vLLM: the output is a JSON array
    of {"name": ..., "parameters": {...}} (the constraint makes it so)."""
    name = "json"
    start = ""
    args_keys = ("parameters",)
    markers = ()


class NamedArgsParser(ToolParser):
    """A named tool_choice without --tool-call-parser, as vLLM: the whole output is the named
    tool's arguments (the constraint makes it a JSON value of its parameters schema)."""
    name = "named"

    def __init__(self, tool_name: str):
        self.tool_name = tool_name

    def extract(self, text):
        if _decode_at(text, 0) is None:
            return text, []
        return None, self._ids([ToolCall(self.tool_name, text)])

    def stream(self):
        return NamedArgsStream(self)


class NamedArgsStream(ToolStream):
    def _run(self, out, final):
        if not self.calls:
            tc = {"index": 0, "id": call_id(None), "type": "function",
                  "function": {"name": self.parser.tool_name, "arguments": ""}}
            out.tool_calls.append(tc)
            self._record(Delta(tool_calls=[tc]))
        if self.pending:
            tc = {"index": 0, "function": {"arguments": self.pending}}
            out.tool_calls.append(tc)
            self._record(Delta(tool_calls=[tc]))
            self.pending = ""


def output_parser(tools: ToolRequest | None, parser: ToolParser | None) -> ToolParser | None:
    """What reads a request's output for calls: the server's parser, or for "required" / a
    named tool without one the JSON formats their constraints impose (as vLLM)."""
    if tools is None or not tools.parses_calls:
        return None
    if parser is not None:
        return parser
    if tools.choice == "named":
        return NamedArgsParser(tools.name)
    if tools.choice == "required":
        return JsonArrayParser()
    return None


# ------------------------------------------------------------------ the constraint
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _lark(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _args_schema(tool: Tool) -> dict:
    schema = dict(tool.parameters) if tool.parameters else {"type": "object"}
    schema["x-guidance"] = _JSON_OPTIONS
    return schema


def tool_call_constraint(tools, tool_choice, parser: str | None, *, parallel: bool = True,
                         special_token_id=None):
    """The jaxserve.structured Constraint that makes the output a tool call (several with
    `parallel`) in `parser`'s format, or None where nothing is enforced (tool_choice none /
    auto). `tools`: Tool tuples; `tool_choice`: "required", or a tool's name. The JSON is
    written compactly (", " and ": " between items), "name" before the arguments.
    `special_token_id(text) -> int | None`: the id of a marker that is one special token of
    the tokenizer (Mistral's [TOOL_CALLS], Hermes 3's <tool_call>), so the grammar asks for
    that token, not its spelling.
    Without a parser, vLLM's formats: a named tool's arguments alone, or for "required" a
    JSON array of {"name", "parameters"}."""
    from jaxserve.structured import Constraint
    if tool_choice in (None, "none", "auto"):
        return None
    chosen = [t for t in tools if tool_choice == "required" or t.name == tool_choice]
    if not chosen:
        raise bad(f"'tool_choice' names {tool_choice!r}, which is not among 'tools'",
                  "tool_choice")
    if parser is None:
        if tool_choice != "required":
            schema = chosen[0].parameters or {"type": "object"}
        else:
            item = {"anyOf": [{"type": "object", "properties": {
                "name": {"type": "string", "enum": [t.name]},
                "parameters": t.parameters or {"type": "object"}},
                "required": ["name", "parameters"], "additionalProperties": False}
                for t in chosen]}
            schema = {"type": "array", "minItems": 1, "items": item}
            if not parallel:
                schema["maxItems"] = 1
        return Constraint.json_schema(schema, param="tools")
    if parser not in PARSER_CLASSES:
        raise ValueError(f"unknown tool-call parser {parser!r}")
    args_key = "parameters" if parser == "llama3_json" else "arguments"
    rules = [f"body: {' | '.join(f'b{i}' for i in range(len(chosen)))}"]
    for i, t in enumerate(chosen):
        head = f'{{"name": {json.dumps(t.name, ensure_ascii=False)}, "{args_key}": '
        rules.append(f"b{i}: {_lark(head)} a{i} \"}}\"")
        rules.append(f"a{i}: %json {json.dumps(_args_schema(t), ensure_ascii=False)}")
    def repeated(item: str, sep: str) -> str:   # one item, or several with `parallel`
        return f"{item} ({_lark(sep)} {item})*" if parallel else item

    def marker(text: str) -> str:
        tid = special_token_id(text) if special_token_id else None
        return f"<[{tid}]>" if tid is not None else _lark(text)
    if parser == "hermes":
        top = [f"start: {repeated('call', chr(10))}",
               f"call: {marker(HermesParser.start)} {_lark(chr(10))} body {_lark(chr(10))} "
               f"{marker(HermesParser.end)}"]
    elif parser == "llama3_json":
        top = [f"start: {repeated('body', '; ')}"]
    else:   # mistral
        top = [f"start: {marker(MistralParser.start)} \"[\" {repeated('body', ', ')} \"]\""]
    return Constraint.grammar("\n".join(top + rules) + "\n", param="tools")
