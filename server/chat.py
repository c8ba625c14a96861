"""Chat requests: the messages as a chat template takes them, the chat controls, and the
assistant message of the response (its tool calls parsed from the text by server/tools.py).

Controls (vLLM's ChatCompletionRequest): `chat_template` (a Jinja string; with
--trust-request-chat-template only, as vLLM), `chat_template_kwargs` (variables for the
template, e.g. enable_thinking), `add_generation_prompt` (default true), `continue_final_message`
(the last message is left open for the model to continue; not with add_generation_prompt),
`documents` (for RAG templates), `echo` (the last message's text starts the output when its role
is the response's). The response's role is "assistant", or without a generation prompt the last
message's role (vLLM's rule).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from jaxserve.admission import AdmissionError
from server.protocol import bad, get_bool, get_str
from server.tools import (Delta, ToolParser, ToolRequest, get_parser, output_parser,
                          parse_tools, tool_call_constraint)

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# apply_chat_template's own arguments: a request sets these through its own fields, never
# through chat_template_kwargs (which only add variables for the template)
RESERVED_KWARGS = frozenset((
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
    "sanitize_control_tokens"))


# ------------------------------------------------------------------ messages
def _text(i: int, content, role: str) -> str:
    if content is None and role == "assistant":
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content parts must be {{'type': 'text', 'text': str}} "
                          "(this model reads text only)", "messages")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise bad(f"messages[{i}].content must be a string or a list of text parts", "messages")
    return content


def _tool_calls(i: int, calls) -> list[dict]:
    """An assistant message's tool_calls for the template: arguments as an object where the
    JSON string holds one (as vLLM passes them: templates write them with tojson)."""
    if not isinstance(calls, list):
        raise bad(f"messages[{i}].tool_calls must be a list", "messages")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad(f"messages[{i}].tool_calls[{j}] must be {{'id', 'type': 'function', "
                      "'function': {'name', 'arguments'}}", "messages")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                parsed = json.loads(args)
            except ValueError:
                parsed = None
            args = parsed if isinstance(parsed, dict) else args
        call = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(c.get("id"), str):
            call["id"] = c["id"]
        out.append(call)
    return out


def chat_message(i: int, msg) -> dict:
    """messages[i] as the template gets it: text content, developer as system, an assistant's
    tool_calls, a tool message's tool_call_id; other keys dropped."""
    if not isinstance(msg, dict):
        raise bad(f"messages[{i}] must be an object", "messages")
    role = msg.get("role")
    if role not in CHAT_ROLES:
        raise bad(f"messages[{i}].role must be one of {list(CHAT_ROLES)}", "messages")
    out = {"role": "system" if role == "developer" else role,
           "content": _text(i, msg.get("content"), role)}
    for key in ("name", "tool_call_id", "reasoning_content", "reasoning"):
        if msg.get(key) is not None:
            if not isinstance(msg[key], str):
                raise bad(f"messages[{i}].{key} must be a string", "messages")
            out[key] = msg[key]
    if msg.get("tool_calls") is not None:
        if role != "assistant":
            raise bad(f"messages[{i}]: only assistant messages have tool_calls", "messages")
        out["tool_calls"] = _tool_calls(i, msg["tool_calls"])
    return out


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise bad("'messages' is required", "messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    return [chat_message(i, m) for i, m in enumerate(messages)]


# ------------------------------------------------------------------ the serve-time template
def load_chat_template(value: str | None) -> str | None:
    """--chat-template: a file's path, or the template itself (as vLLM: text with Jinja's
    characters that opens as no file is the template)."""
    from jaxserve.tokenizer import check_template_syntax
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            template = f.read()
    elif any(c in value for c in "{}\n"):
        template = value
    else:
        raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")
    try:
        check_template_syntax(template)
    except AdmissionError as e:
        raise ValueError(f"--chat-template: {e}") from None
    return template


# ------------------------------------------------------------------ the request
@dataclass(frozen=True)
class ChatTurn:
    """What a chat request's response needs besides the generated text."""
    role: str                          # the response message's role
    echo: str = ""                     # text that starts the output (echo)
    tools: ToolRequest | None = None
    parser: ToolParser | None = None   # reads tool calls in the output (None: text only)
    # the parser's call markers are special tokens here: the output is decoded with them
    keep_special_tokens: bool = False

    def stream(self) -> "ChatStream":
        return ChatStream(self)

    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """(the response's message, its finish_reason) for the whole output `text`."""
        content, calls = text, []
        if self.parser is not None:
            content, calls = self.parser.extract(text)
            if calls and not self.tools.parallel:
                calls = calls[:1]
        if self.echo:
            content = self.echo + (content or "")
        msg = {"role": self.role, "content": content}
        if calls:
            msg["tool_calls"] = [c.as_dict() for c in calls]
            if finish_reason == "stop":
                finish_reason = "tool_calls"
        return msg, finish_reason


class ChatStream:
    """A streamed response's deltas: content and tool-call deltas (OpenAI's shape)."""

    def __init__(self, turn: ChatTurn):
        self.turn = turn
        self.tools = turn.parser.stream() if turn.parser is not None else None
        self.num_calls = 0

    def first(self) -> dict:
        return {"role": self.turn.role, "content": self.turn.echo}

    def delta(self, new_text: str, finished: bool, finish_reason: str | None
              ) -> tuple[dict, str | None]:
        if self.tools is None:
            return ({"content": new_text} if new_text else {}), finish_reason
        d = self.tools.feed(new_text) if new_text else Delta()
        if finished:
            d.add(self.tools.finish())
        calls = d.tool_calls
        if not self.turn.tools.parallel:
            calls = [c for c in calls if c["index"] == 0]
        out = {}
        if d.content:
            out["content"] = d.content
        if calls:
            out["tool_calls"] = calls
        if finished and finish_reason == "stop" and self.tools.calls:
            finish_reason = "tool_calls"
        return out, finish_reason


def parse_chat_prompt(ctx, body: dict) -> tuple[list[int], ChatTurn, object | None]:
    """(prompt ids, the turn, the tool-call Constraint or None) of a chat body."""
    messages = chat_messages(body)
    cfg = ctx.config
    add_generation = get_bool(body, "add_generation_prompt", True)
    continue_final = get_bool(body, "continue_final_message", False)
    if add_generation and continue_final:
        raise bad("Cannot set both `continue_final_message` and `add_generation_prompt` to "
                  "True.", "continue_final_message")
    template = get_str(body, "chat_template")
    if template is not None and not cfg.trust_request_chat_template:
        raise bad("'chat_template' in a request needs the server's "
                  "--trust-request-chat-template; the server's template is used otherwise",
                  "chat_template")
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise bad("'chat_template_kwargs' must be an object", "chat_template_kwargs")
        reserved = sorted(RESERVED_KWARGS & kwargs.keys())
        if reserved:
            raise bad(f"'chat_template_kwargs' may not set {reserved}: use the request's own "
                      "fields", "chat_template_kwargs")
    documents = body.get("documents")
    if documents is not None and (not isinstance(documents, list) or not all(
            isinstance(d, dict) for d in documents)):
        raise bad("'documents' must be a list of objects", "documents")
    parser = get_parser(cfg.tool_call_parser)
    tools = parse_tools(body, parser=cfg.tool_call_parser,
                        auto_enabled=cfg.enable_auto_tool_choice)
    if documents:
        kwargs = dict(kwargs or {}, documents=documents)
    try:
        ids = ctx.tokenizer.chat(
            messages, tools=tools.template_tools if tools else None,
            chat_template=template or cfg.chat_template, add_generation_prompt=add_generation,
            continue_final_message=continue_final, template_kwargs=kwargs)
    except AdmissionError as e:
        if template is None and e.param == "chat_template":   # the server's own template
            raise AdmissionError(str(e), param="messages", code=e.code) from None
        raise
    role = "assistant" if add_generation else body["messages"][-1]["role"]
    echo = ""
    if get_bool(body, "echo", False) and body["messages"][-1].get("role") == role:
        echo = messages[-1]["content"]
    reader = output_parser(tools, parser)
    special = special_tokens(ctx.tokenizer.hf) if reader is not None else {}
    constraint = None
    if tools is not None and tools.choice in ("required", "named"):
        constraint = tool_call_constraint(
            tools.tools, tools.name or "required", cfg.tool_call_parser,
            parallel=tools.parallel and tools.choice == "required",   # named: one call (vLLM)
            special_token_id=special.get)
    keep = reader is not None and any(m in special for m in reader.markers)
    return ids, ChatTurn(role, echo, tools, reader, keep), constraint


def special_tokens(hf) -> dict[str, int]:
    """The tokenizer's special tokens (those decode skips): text -> id."""
    try:
        added = hf.added_tokens_decoder
    except AttributeError:
        return {}
    return {tok.content: i for i, tok in added.items() if getattr(tok, "special", False)}

