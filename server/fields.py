"""The rule for request fields: every field OpenAI or vLLM defines for /v1/completions and
/v1/chat/completions is either honoured or refused with a 400 that names it.

`FIELDS` lists each one (OpenAI's API reference; vLLM's CompletionRequest / ChatCompletionRequest,
the current ones and the older `guided_*` names) with its status here:
- "supported": read by the parser named in `hook`, with the effect the API defines;
- "accepted": taken and without effect, because the API itself gives it none on the output
  (OpenAI's `metadata`, `safety_identifier`, ...; vLLM's render-only flags);
- "refused": a value other than the neutral ones in `neutral` is a 400 naming the field
  (`check_body`, run before the endpoint's parser by `guard`).
Fields that neither defines are ignored (clients send many optional extras).

docs/server.md's field table is generated from FIELDS (`field_table`, scripts/gen_field_table.py)
and tests/test_fields.py sends every field to a server, so neither the table nor the statuses
can drift from what the server does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from server.protocol import bad

COMPLETIONS = "completions"
CHAT = "chat"
BOTH = (COMPLETIONS, CHAT)
STATUSES = ("supported", "accepted", "refused")

_NONE = (None,)


@dataclass(frozen=True)
class Field:
    name: str                       # as in the JSON body; "a.b" is key b of object a
    endpoints: tuple[str, ...]      # COMPLETIONS and/or CHAT
    source: str                     # "openai", "vllm", or "openai+vllm"
    status: str                     # one of STATUSES
    hook: str                       # the code that reads it (module.function)
    note: str = ""                  # what it does here / why it is refused
    # Refused: the values that mean "not used" (None is always one of them).
    neutral: tuple = _NONE
    # Supported in part: the values honoured (None: all); check_body refuses the others.
    only: tuple | None = None
    # A value that uses the field, for the test that sends every field (tests/test_fields.py).
    example: object = None

    def __post_init__(self):
        assert self.status in STATUSES, self.status
        assert self.example is not None, f"{self.name}: needs an example value"


def _f(name, endpoints, source, status, hook, note="", neutral=(), example=None,
       only=None) -> Field:
    return Field(name, tuple(endpoints), source, status, hook, note,
                 tuple(neutral) + _NONE, None if only is None else tuple(only) + _NONE,
                 example)


S, R, A = "supported", "refused", "accepted"
O, V, OV = "openai", "vllm", "openai+vllm"
C, H = (COMPLETIONS,), (CHAT,)
REFUSE = "fields.check_body"
_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
_SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}

FIELDS: tuple[Field, ...] = (
    # ---------------------------------------------------------------- the request itself
    _f("model", BOTH, OV, S, "context.adapter_of", "the base model, an adapter, or base:adapter",
       example="base"),
    _f("prompt", C, OV, S, "openai_api.parse_completion",
       "a string, token ids, or a list of either (n choices per prompt)", example="w3 w4 w5"),
    _f("messages", H, OV, S, "openai_api.parse_chat", "text content (string or text parts)",
       example=[{"role": "user", "content": "w3 w4"}]),
    _f("stream", BOTH, OV, S, "protocol.stream_fields", "server-sent events", example=True),
    _f("stream_options", BOTH, OV, S, "protocol.stream_fields", "`include_usage`",
       example={"include_usage": True}),
    _f("stream_options.continuous_usage_stats", BOTH, V, R, REFUSE,
       "usage on every chunk is not sent", neutral=(False,), example=True),
    _f("stream_options.include_obfuscation", BOTH, O, A, "-",
       "OpenAI's padding against side channels; it has no effect on the content",
       example=False),
    _f("user", BOTH, OV, S, "context.client_id", "the fairness identity without an API key",
       example="alice"),
    _f("request_id", BOTH, V, S, "fields.request_options",
       "the response `id` (`cmpl-<id>` / `chatcmpl-<id>`); also the `X-Request-Id` header",
       example="my-request-1"),
    _f("session_id", BOTH, V, A, "-", "an identity for routing; it has no effect on the output",
       example="session-1"),
    _f("cache_salt", BOTH, V, S, "admission", "prefix-cache isolation", example="salt-1"),
    _f("priority", BOTH, V, R, REFUSE,
       "the scheduler has no priority policy (vLLM also refuses a non-zero priority then)",
       neutral=(0,), example=1),
    # ---------------------------------------------------------------- sampling
    _f("max_tokens", BOTH, OV, S, "openai_api.parse_*", "completions default 16 (0 with echo: "
       "the prompt scored only), chat: the rest of the context", example=3),
    _f("max_completion_tokens", H, O, S, "openai_api.parse_chat", "wins over max_tokens",
       example=3),
    _f("temperature", BOTH, OV, S, "protocol.sampling_fields", example=0.5),
    _f("top_p", BOTH, OV, S, "protocol.sampling_fields", example=0.5),
    _f("top_k", BOTH, V, S, "protocol.sampling_fields", "-1 or 0 disable", example=2),
    _f("seed", BOTH, OV, S, "protocol.sampling_fields", "per-request generator", example=7),
    _f("stop", BOTH, OV, S, "protocol.sampling_fields", example=["w7"]),
    _f("stop_token_ids", BOTH, V, S, "protocol.sampling_fields",
       "finish (stop) on any of these tokens, not shown", example=[7]),
    _f("include_stop_str_in_output", BOTH, V, S, "protocol.sampling_fields",
       "the stop string stays in the text", example=True),
    _f("ignore_eos", BOTH, V, S, "protocol.sampling_fields", example=True),
    _f("min_p", BOTH, V, S, "protocol.sampling_fields",
       "on device: tokens under min_p x the top probability dropped", example=0.2),
    _f("min_tokens", BOTH, V, S, "protocol.sampling_fields",
       "on device: EOS and stop_token_ids banned until this many tokens", example=2),
    _f("presence_penalty", BOTH, OV, S, "protocol.sampling_fields",
       "on device, over the output tokens (counts kept on the device)", example=1.0),
    _f("frequency_penalty", BOTH, OV, S, "protocol.sampling_fields",
       "on device, over the output tokens (counts kept on the device)", example=1.0),
    _f("repetition_penalty", BOTH, V, S, "protocol.sampling_fields",
       "on device, over the prompt and output tokens (vLLM / HF)", example=1.5),
    _f("logit_bias", BOTH, OV, S, "protocol.sampling_fields",
       "on device; up to 300 token ids, biases in [-100, 100]", example={"5": 100}),
    _f("bad_words", BOTH, V, S, "protocol.sampling_fields",
       "on device, as vLLM (up to 32 words)", example=["w5"]),
    _f("allowed_token_ids", BOTH, V, S, "protocol.sampling_fields",
       "on device, through the token mask", example=[5, 6]),
    _f("skip_special_tokens", BOTH, V, S, "protocol.sampling_fields",
       "false: special tokens are written in the text", example=False),
    _f("spaces_between_special_tokens", BOTH, V, S, "protocol.sampling_fields",
       "passed to the tokenizer's decode: slow (Python) tokenizers honour it; fast ones write "
       "no spaces around special tokens either way (as in vLLM)", example=False),
    _f("truncate_prompt_tokens", BOTH, V, S, "fields.request_options",
       "keep the last k prompt tokens (-1: the context length)", example=2),
    _f("truncation_side", BOTH, V, S, "fields.request_options",
       "`left` (default) keeps the last k tokens, `right` the first k", example="right"),
    _f("use_beam_search", BOTH, V, R, REFUSE, "no beam search", neutral=(False,), example=True),
    _f("length_penalty", BOTH, V, R, REFUSE, "beam search only; no beam search",
       neutral=(1, 1.0), example=0.5),
    _f("watermarking", BOTH, V, R, REFUSE, "no watermarking", neutral=(False,), example=True),
    _f("repetition_detection", BOTH, V, R, REFUSE, "no n-gram repetition detection",
       example={"max_pattern_size": 4}),
    _f("logits_processors", BOTH, V, R, REFUSE, "no custom logits processors (older vLLM)",
       neutral=([],), example=["x.y"]),
    _f("vllm_xargs", BOTH, V, R, REFUSE, "no extensions read them", neutral=({},),
       example={"k": 1}),
    # ---------------------------------------------------------------- several outputs, scoring
    _f("n", BOTH, OV, S, "choices.run_choices",
       "n choices (index prompt * n + j), the prompt's pages shared, seed + j each", example=2),
    _f("best_of", C, OV, S, "openai_api.parse_completion",
       "the n of highest cumulative log-probability out of best_of samples; best_of > n is "
       "not streamable (400)", example=2),
    _f("echo", C, OV, S, "openai_api.parse_completion",
       "the prompt before each choice's text, with its logprobs when `logprobs` is set; "
       "max_tokens 0 with echo: the prompt scored only", example=True),
    _f("echo", H, V, S, "chat.parse_chat_prompt",
       "the last message's text starts the output when its role is the response's (vLLM)",
       example=True),
    _f("logprobs", C, OV, S, "openai_api.parse_completion",
       "the chosen token's log-probability and the N (up to 20) most likely alternatives",
       example=2),
    _f("logprobs", H, OV, S, "openai_api.parse_chat", "the chosen token's log-probability",
       example=True),
    _f("top_logprobs", H, O, S, "openai_api.parse_chat",
       "the N (up to 20) most likely alternatives of each token; needs logprobs", example=2),
    _f("prompt_logprobs", C, V, S, "openai_api.parse_completion",
       "each choice's `prompt_logprobs`: per prompt token its logprob, rank and the N most "
       "likely (the prompt is computed whole, no cached pages)", example=1),
    _f("prompt_logprobs", H, V, R, REFUSE, "served on /v1/completions only", example=1),
    _f("logprob_token_ids", BOTH, V, R, REFUSE, "no log-probabilities of chosen ids",
       neutral=([],), example=[5]),
    _f("return_tokens_as_token_ids", BOTH, V, R, REFUSE, "logprob tokens are always their text",
       neutral=(False,), example=True),
    _f("return_token_ids", BOTH, V, S, "fields.annotate",
       "`prompt_token_ids` and `token_ids` in the response", example=True),
    _f("suffix", C, OV, R, REFUSE, "no fill-in-the-middle", neutral=("",), example="w9"),
    _f("prompt_embeds", C, V, R, REFUSE, "token ids or text only", example="AAAA"),
    _f("add_special_tokens", C, V, R, REFUSE, "the tokenizer adds its special tokens (BOS)",
       neutral=(True,), example=False),
    _f("add_special_tokens", H, V, R, REFUSE, "the chat template alone places special tokens",
       neutral=(False,), example=True),
    # ---------------------------------------------------------------- structured output
    _f("response_format", BOTH, OV, S, "structured.parse_structured",
       "text, json_object, json_schema (llguidance masks; docs/structured_output.md)",
       example={"type": "json_object"}),
    _f("structured_outputs", BOTH, V, S, "structured.parse_structured",
       "json, regex, choice, grammar (Lark or GBNF), json_object, whitespace_pattern, "
       "disable_any_whitespace, disable_additional_properties; structural_tag refused",
       example={"choice": ["w5", "w6"]}),
    _f("guided_json", BOTH, V, S, "structured.parse_structured", "older name of "
       "structured_outputs.json", example=_SCHEMA),
    _f("guided_regex", BOTH, V, S, "structured.parse_structured", "older name of "
       "structured_outputs.regex", example="w[56]"),
    _f("guided_choice", BOTH, V, S, "structured.parse_structured", "older name of "
       "structured_outputs.choice", example=["w5", "w6"]),
    _f("guided_grammar", BOTH, V, S, "structured.parse_structured", "older name of "
       "structured_outputs.grammar (Lark or GBNF)", example='root ::= "w5"'),
    _f("guided_json_object", BOTH, V, S, "structured.parse_structured", "older name of "
       "structured_outputs.json_object", example=True),
    _f("guided_decoding_backend", BOTH, V, S, "structured.parse_structured",
       "auto, guidance or llguidance (the engine used); others refused", example="auto"),
    _f("guided_whitespace_pattern", BOTH, V, S, "structured.parse_structured",
       "whitespace allowed between JSON tokens (default: none beyond ', ' and ': ')",
       example=" ?"),
    _f("structural_tag", BOTH, V, R, REFUSE, "structural tags are not compiled (older vLLM name)",
       example="{}"),
    # ---------------------------------------------------------------- chat: tools and template
    _f("tools", H, OV, S, "tools.parse_tools",
       "function tools, rendered by the chat template; calls parsed by --tool-call-parser",
       example=[_TOOL]),
    _f("tool_choice", H, OV, S, "tools.parse_tools",
       "none / auto (needs --enable-auto-tool-choice) / required / named; required and named "
       "are enforced by a grammar", example="required"),
    _f("parallel_tool_calls", H, OV, S, "tools.parse_tools", "false: at most one call",
       example=False),
    _f("functions", H, O, R, REFUSE, "deprecated by OpenAI for `tools`",
       neutral=([],), example=[_TOOL["function"]]),
    _f("function_call", H, O, R, REFUSE, "deprecated by OpenAI for `tool_choice`",
       neutral=("none",), example="auto"),
    _f("chat_template", H, V, S, "chat.parse_chat_prompt",
       "with --trust-request-chat-template (as vLLM); refused without it",
       example="{% for m in messages %}{{ m.content }}{% endfor %}"),
    _f("chat_template_kwargs", H, V, S, "chat.parse_chat_prompt",
       "variables for the chat template (e.g. enable_thinking)", example={"x": 1}),
    _f("add_generation_prompt", H, V, S, "chat.parse_chat_prompt",
       "false: no assistant header; the response's role is the last message's",
       example=False),
    _f("continue_final_message", H, V, S, "chat.parse_chat_prompt",
       "the last message left open for the model to continue (needs "
       "add_generation_prompt=false)", example=True),
    _f("documents", H, V, S, "chat.parse_chat_prompt", "passed to the chat template (RAG)",
       example=[{"title": "t", "text": "w5"}]),
    _f("return_prompt_text", H, V, R, REFUSE, "the rendered prompt is not returned",
       neutral=(False,), example=True),
    _f("media_io_kwargs", H, V, R, REFUSE, "text-only models", neutral=({},),
       example={"image": {}}),
    _f("mm_processor_kwargs", H, V, R, REFUSE, "text-only models", neutral=({},),
       example={"x": 1}),
    _f("reasoning_effort", H, OV, R, REFUSE, "no reasoning models or parsers",
       example="low"),
    _f("include_reasoning", H, V, R, REFUSE, "no reasoning parser", neutral=(True,),
       example=False),
    _f("thinking_token_budget", BOTH, V, R, REFUSE, "no reasoning budget", neutral=(-1,),
       example=10),
    _f("audio", H, O, R, REFUSE, "text output only", example={"voice": "alloy",
                                                                "format": "wav"}),
    _f("modalities", H, O, R, REFUSE, "text output only", neutral=(["text"],),
       example=["text", "audio"]),
    _f("prediction", H, O, R, REFUSE, "no predicted outputs",
       example={"type": "content", "content": "w5"}),
    _f("web_search_options", H, O, R, REFUSE, "no web search", example={}),
    _f("verbosity", H, O, R, REFUSE, "no verbosity control", neutral=("medium",),
       example="low"),
    # ---------------------------------------------------------------- platform fields
    _f("store", H, O, R, REFUSE, "outputs are not stored", neutral=(False,), example=True),
    _f("metadata", H, O, A, "-", "OpenAI: tags for stored completions; no effect on output",
       example={"k": "v"}),
    _f("service_tier", H, O, R, REFUSE, "one tier: `auto` and `default` are accepted",
       neutral=("auto", "default"), example="flex"),
    _f("prompt_cache_key", H, O, A, "-", "OpenAI: a cache-routing hint; no effect on output",
       example="key-1"),
    _f("prompt_cache_retention", H, O, A, "-",
       "OpenAI: how long a cached prefix lives; no effect on output", example="24h"),
    _f("safety_identifier", H, O, A, "-", "OpenAI: an abuse-monitoring id; no effect on output",
       example="u-1"),
    _f("kv_transfer_params", BOTH, V, R, REFUSE, "no disaggregated prefill", neutral=({},),
       example={"do_remote_prefill": True}),
    _f("ec_transfer_params", BOTH, V, R, REFUSE, "no encoder-cache transfer", neutral=({},),
       example={"x": 1}),
    _f("routed_experts_prompt_start", BOTH, V, R, REFUSE, "routed experts are not returned",
       neutral=(0,), example=1),
    _f("return_token_offsets", BOTH, V, A, "-",
       "vLLM reads it on its render endpoints only; no effect on generation", example=True),
    _f("return_mm_kwargs", BOTH, V, A, "-",
       "vLLM reads it on its render endpoints only; no effect on generation", example=False),
    _f("stream_interval", BOTH, V, R, REFUSE, "every token is streamed", neutral=(1,),
       example=4),
)

BY_NAME: dict[str, tuple[Field, ...]] = {}
for _field in FIELDS:
    BY_NAME[_field.name] = BY_NAME.get(_field.name, ()) + (_field,)


def fields_for(endpoint: str) -> list[Field]:
    return [f for f in FIELDS if endpoint in f.endpoints]


def _value(body: dict, name: str):
    head, dot, key = name.partition(".")
    v = body.get(head)
    if not dot:
        return v
    return v.get(key) if isinstance(v, dict) else None


def _is_neutral(v, neutral: tuple) -> bool:
    """`v` is one of the neutral values (numbers compared as numbers, never a bool as 0/1)."""
    for n in neutral:
        if type(v) is bool or type(n) is bool:
            if v is n:
                return True
        elif v == n:
            return True
    return False


_CHECKED = {ep: [(f, f.neutral if f.status == "refused" else f.only) for f in fields_for(ep)
                 if f.status == "refused" or f.only is not None] for ep in BOTH}


def check_body(body: dict, endpoint: str) -> None:
    """400 naming the first field of `endpoint` that `body` uses with a value refused here: a
    refused field's non-neutral value, or a value outside a partly supported field's `only`."""
    for f, allowed in _CHECKED[endpoint]:
        v = _value(body, f.name)
        if v is not None and not _is_neutral(v, allowed):
            shown = json.dumps(v)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise bad(f"'{f.name}': {shown} is not supported by this server: {f.note}",
                      f.name, code="unsupported_field")


# ---------------------------------------------------------------------------- the docs table
TABLE_BEGIN = "<!-- field table: generated by scripts/gen_field_table.py from server/fields.py -->"
TABLE_END = "<!-- end of field table -->"
_STATUS_TEXT = {"supported": "supported", "accepted": "accepted (no effect on output)",
                "refused": "refused (400)"}


def field_table() -> str:
    """The markdown table of every field (docs/server.md holds it between TABLE_BEGIN and
    TABLE_END), one row per field and endpoint set, sorted by name."""
    rows = ["| field | endpoints | defined by | status | here |", "| --- | --- | --- | --- | --- |"]
    for f in sorted(FIELDS, key=lambda f: (f.name, f.endpoints)):
        eps = ", ".join({COMPLETIONS: "completions", CHAT: "chat"}[e] for e in f.endpoints)
        note = f.note
        allowed = f.neutral if f.status == "refused" else f.only or _NONE
        if len(allowed) > 1:
            ok = ", ".join(f"`{json.dumps(v)}`" for v in allowed if v is not None)
            note = f"{note}; accepted: {ok}"
        rows.append(f"| `{f.name}` | {eps} | {f.source} | {_STATUS_TEXT[f.status]} | "
                    f"{note.replace('|', '/')} |")
    return "\n".join([TABLE_BEGIN, *rows, TABLE_END])


def replace_table(doc: str) -> str:
    """`doc` with its field table replaced by the current one."""
    start, end = doc.index(TABLE_BEGIN), doc.index(TABLE_END) + len(TABLE_END)
    return doc[:start] + field_table() + doc[end:]
