"""The field rule, checked against the server itself: every field in server/fields.py is sent to
/v1/completions and/or /v1/chat/completions of a real engine on a tiny random model; a field
marked supported must answer 200 with its effect (EFFECTS below: a supported field without a
check fails), an accepted one 200 with the output unchanged, a refused one 400 naming it. And
docs/server.md's table must be the one server/fields.py generates.

The model: a tiny random Llama over a byte-level tokenizer (256 byte tokens, so any text and any
JSON can be written) plus 16 special tokens, with a ChatML-like template that also renders
`tools`; greedy outputs are deterministic, so each effect is compared with a greedy baseline.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from server import fields
from server_harness import ServerThread, parse_sse
from test_server_fake import http

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIAL = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"] + [f"<|x{i}|>" for i in range(12)]
TEMPLATE = ("{% if tools %}<|im_start|>tools\n{{ tools | tojson }}<|im_end|>\n{% endif %}"
            "{% if documents %}<|im_start|>documents\n{{ documents | tojson }}<|im_end|>\n"
            "{% endif %}"
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
            "{% if not (loop.last and continue_final_message) %}<|im_end|>\n{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CANDIDATES = ("ab", "ba", "abc", "hi", "yz", "cd", "ef", "gh", "ij", "kl")
MAX_TOKENS = 12
ENUM_SCHEMA = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"],
               "additionalProperties": False}
EMPTY_TOOL = {"type": "function", "function": {"name": "ping", "parameters": {
    "type": "object", "properties": {}, "additionalProperties": False}}}


SERVER_FLAGS = {"trust_request_chat_template": True, "enable_auto_tool_choice": True,
                "tool_call_parser": "hermes"}


def make_model(path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from jaxserve.tokenizer import _bytes_to_unicode
    from lora_helpers import make_base
    make_base(str(path), seed=3, vocab_size=256 + len(SPECIAL), bos_token_id=256,
              eos_token_id=257)
    alphabet = {chr(c): b for b, c in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(alphabet, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 additional_special_tokens=SPECIAL[2:])
    hf.chat_template = TEMPLATE
    hf.save_pretrained(str(path))


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    import dataclasses

    from jaxserve.engine import EngineConfig, LLMEngine
    from server.config import ServerConfig
    path = tmp_path_factory.mktemp("bytes_model")
    make_model(path)
    engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", max_num_seqs=4,
                                    max_model_len=256, num_pages=128, page_size=8,
                                    max_prefill_tokens=256))
    # every feature a flag turns on, as a vLLM server started with them
    have = {f.name for f in dataclasses.fields(ServerConfig)}
    flags = {k: v for k, v in SERVER_FLAGS.items() if k in have}
    with ServerThread(engine, ServerConfig(**flags)) as s:
        s.model = http(s.url, "/v1/models")[1]["data"][0]["id"]
        s.hf = engine.tokenizer.hf
        s.prompt = {ep: pick_prompt(s, ep) for ep in fields.BOTH}
        yield s


def pick_prompt(srv, endpoint: str) -> str:
    """A prompt whose greedy output holds special tokens and ASCII letters (the premise of the
    skip_special_tokens and stop checks); the model is fixed, so this is deterministic."""
    specials = set(srv.hf.convert_tokens_to_ids(SPECIAL))
    for prompt in CANDIDATES:
        srv.prompt = {endpoint: prompt}
        status, body = send(srv, endpoint, {"return_token_ids": True})
        ids = body["choices"][0]["token_ids"]
        if specials & set(ids) and any(chr(t).isalpha() for t in ids[1:] if t < 128):
            return prompt
    raise AssertionError(f"no candidate prompt fits for {endpoint}")


def base_body(srv, endpoint: str) -> dict:
    body = {"model": srv.model, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    if endpoint == fields.COMPLETIONS:
        return {**body, "prompt": srv.prompt[endpoint]}
    return {**body, "messages": [{"role": "user", "content": srv.prompt[endpoint]}]}


def path_of(endpoint: str) -> str:
    return "/v1/completions" if endpoint == fields.COMPLETIONS else "/v1/chat/completions"


def send(srv, endpoint: str, extra: dict):
    body = base_body(srv, endpoint)
    for k, v in extra.items():
        head, dot, key = k.partition(".")
        if dot:
            body[head] = {**(body.get(head) or {}), key: v}
        else:
            body[k] = v
    status, out = http(srv.url, path_of(endpoint), body)
    if status == 200 and body.get("stream"):
        out = parse_sse(out)
    return status, out


class Base:
    """The greedy baseline of one endpoint: text, output ids, prompt length."""

    def __init__(self, srv, endpoint):
        status, body = send(srv, endpoint, {"return_token_ids": True})
        assert status == 200, body
        self.body = body
        choice = body["choices"][0]
        self.text = text_of(body)
        self.ids = choice["token_ids"]
        self.prompt_tokens = body["usage"]["prompt_tokens"]


@pytest.fixture(scope="module")
def base(srv):
    return {ep: Base(srv, ep) for ep in fields.BOTH}


def text_of(body) -> str:
    if isinstance(body, list):   # stream events
        out = []
        for e in body:
            if e == "[DONE]" or not e.get("choices"):
                continue
            c = e["choices"][0]
            out.append(c.get("text") or (c.get("delta") or {}).get("content") or "")
        return "".join(out)
    c = body["choices"][0]
    return c["text"] if "text" in c else (c["message"].get("content") or "")


def ids_of(body) -> list[int]:
    return body["choices"][0]["token_ids"]


def ascii_char(b: Base, start: int = 1) -> str:
    """A letter of the baseline's text after its first character (a stop string to cut at)."""
    return next(c for c in b.text[start:] if c.isascii() and c.isalpha())


HOT = {"temperature": 5.0, "seed": 1, "return_token_ids": True}   # sampling far from greedy


def _hot_differs(srv, ep, b):
    status, body = send(srv, ep, HOT)
    assert status == 200 and ids_of(body) != b.ids   # the knobs below pull it back to greedy
    return body


# ------------------------------------------------------------------ what each field is sent as
# Supported fields are sent with REQUEST[name](srv, endpoint, base) (default: {name: example});
# refused ones with NEEDS[name] + {name: example} only, so that the 400 names that field.
NEEDS = {"stream_options": {"stream": True},
         "stream_options.continuous_usage_stats": {"stream": True},
         "stream_options.include_obfuscation": {"stream": True},
         "top_logprobs": {"logprobs": True}}

REQUEST = {
    "prompt": lambda s, ep, b: {}, "messages": lambda s, ep, b: {},   # the baseline's own
    "temperature": lambda s, ep, b: dict(HOT),
    "top_p": lambda s, ep, b: {**HOT, "top_p": 1e-6},
    "top_k": lambda s, ep, b: {**HOT, "top_k": 1},
    "min_p": lambda s, ep, b: {**HOT, "min_p": 1.0},
    "seed": lambda s, ep, b: {**HOT, "seed": 7},
    "stop": lambda s, ep, b: {"stop": [ascii_char(b)]},
    "include_stop_str_in_output": lambda s, ep, b: {"stop": [ascii_char(b)],
                                                    "include_stop_str_in_output": True},
    "stop_token_ids": lambda s, ep, b: {"stop_token_ids": [b.ids[2]]},
    "min_tokens": lambda s, ep, b: {"stop_token_ids": [b.ids[0]], "min_tokens": 4,
                                    "return_token_ids": True},
    "ignore_eos": lambda s, ep, b: {"ignore_eos": True},
    "logit_bias": lambda s, ep, b: {"logit_bias": {"120": 100}, "return_token_ids": True},
    "allowed_token_ids": lambda s, ep, b: {"allowed_token_ids": [97, 98],
                                           "return_token_ids": True},
    "bad_words": lambda s, ep, b: {"bad_words": [ascii_char(b, 0)], "return_token_ids": True},
    **{p: (lambda p: lambda s, ep, b: {p: 2.0, "return_token_ids": True})(p)
       for p in ("presence_penalty", "frequency_penalty", "repetition_penalty")},
    "skip_special_tokens": lambda s, ep, b: {"skip_special_tokens": False,
                                             "return_token_ids": True},
    "truncate_prompt_tokens": lambda s, ep, b: {"truncate_prompt_tokens": 1},
    "truncation_side": lambda s, ep, b: {"truncate_prompt_tokens": 1, "truncation_side": "right"},
    "top_logprobs": lambda s, ep, b: {"logprobs": True, "top_logprobs": 2},
    "echo": lambda s, ep, b: {"echo": True} if ep == fields.COMPLETIONS else {
        "echo": True, "add_generation_prompt": False, "continue_final_message": True,
        "messages": [{"role": "user", "content": s.prompt[ep]},
                     {"role": "assistant", "content": "xy"}]},
    "continue_final_message": lambda s, ep, b: {
        "continue_final_message": True, "add_generation_prompt": False,
        "messages": [{"role": "user", "content": s.prompt[ep]},
                     {"role": "assistant", "content": "xy"}]},
    "chat_template_kwargs": lambda s, ep, b: {
        "chat_template": "{{ greeting }}{% for m in messages %}{{ m.content }}{% endfor %}",
        "chat_template_kwargs": {"greeting": "hello "}},
    "tools": lambda s, ep, b: {"tools": [EMPTY_TOOL], "tool_choice": "none"},   # rendered
    "tool_choice": lambda s, ep, b: {"tools": [EMPTY_TOOL], "tool_choice": "required",
                                     "max_tokens": 64},
    "parallel_tool_calls": lambda s, ep, b: {"tools": [EMPTY_TOOL], "tool_choice": "required",
                                             "parallel_tool_calls": False, "max_tokens": 64},
    "response_format": lambda s, ep, b: {"max_tokens": 64, "response_format": {
        "type": "json_schema", "json_schema": {"name": "e", "schema": ENUM_SCHEMA}}},
    "guided_json": lambda s, ep, b: {"max_tokens": 64, "guided_json": ENUM_SCHEMA},
    "guided_json_object": lambda s, ep, b: {"max_tokens": 64, "guided_json_object": True},
    "structured_outputs": lambda s, ep, b: {"structured_outputs": {"choice": ["w5", "w6"]}},
    "guided_choice": lambda s, ep, b: {"guided_choice": ["w5", "w6"]},
    "guided_regex": lambda s, ep, b: {"guided_regex": "w[56]"},
    "guided_grammar": lambda s, ep, b: {"guided_grammar": 'root ::= "w5"'},
    "guided_decoding_backend": lambda s, ep, b: {"guided_choice": ["w5", "w6"],
                                                 "guided_decoding_backend": "auto"},
    "guided_whitespace_pattern": lambda s, ep, b: {"guided_json": ENUM_SCHEMA, "max_tokens": 64,
                                                   "guided_whitespace_pattern": " ?"},
    "prompt_logprobs": lambda s, ep, b: {"prompt_logprobs": 1},
    "logprobs": lambda s, ep, b: {"logprobs": 0 if ep == fields.COMPLETIONS else True},
}


def _tokens(srv, text: str) -> int:
    return len(srv.hf(text, add_special_tokens=False)["input_ids"])


def _same(s, ep, b, body):
    assert text_of(body) == b.text


def _json_enum(s, ep, b, body):
    assert json.loads(text_of(body))["a"] in ("x", "y")


def _choice(s, ep, b, body):
    assert text_of(body) in ("w5", "w6")


def _supported(name: str, endpoint: str) -> bool:
    return any(f.status == "supported" and endpoint in f.endpoints
               for f in fields.BY_NAME.get(name, ()))


def _ignore_eos(s, ep, body):
    assert body["choices"][0]["finish_reason"] == "length"
    if _supported("logit_bias", ep):   # EOS made the likeliest token: only ignore_eos runs on
        eos = {"logit_bias": {"257": 100}}
        assert send(s, ep, eos)[1]["usage"]["completion_tokens"] == MAX_TOKENS
        assert send(s, ep, {**eos, "ignore_eos": False})[1]["usage"]["completion_tokens"] == 1


def _logprobs(s, ep, body):
    lp = body["choices"][0]["logprobs"]
    assert len(lp["token_logprobs" if ep == fields.COMPLETIONS else "content"]) == MAX_TOKENS
    only = next(f.only for f in fields.BY_NAME["logprobs"] if ep in f.endpoints)
    if ep == fields.COMPLETIONS and only is None:   # N alternatives per token
        status, out = send(s, ep, {"logprobs": 2})
        assert status == 200, out
        tops = out["choices"][0]["logprobs"]["top_logprobs"]
        # keyed by text: byte tokens that decode alike ("\ufffd") share a key
        assert len(tops) == MAX_TOKENS and all(1 <= len(t) <= 3 for t in tops), tops
        assert sum(len(t) >= 2 for t in tops) >= MAX_TOKENS // 2, tops


def _tool_calls(body):
    return body["choices"][0]["message"]["tool_calls"]


EFFECTS = {
    # the request itself
    "model": lambda s, ep, b, body: body["model"] == s.model and _same(s, ep, b, body),
    "prompt": _same, "messages": _same,
    "stream": lambda s, ep, b, body: _same(s, ep, b, body),   # SSE events, same text
    "stream_options": lambda s, ep, b, body: [e for e in body if e != "[DONE]"][-1]["usage"][
        "completion_tokens"] == MAX_TOKENS,
    "request_id": lambda s, ep, b, body: body["id"].endswith("-my-request-1"),
    # no effect on the output by definition (identity, cache isolation): the output is unchanged
    "user": _same, "cache_salt": _same,
    "max_tokens": lambda s, ep, b, body: body["usage"]["completion_tokens"] == 3,
    "max_completion_tokens": lambda s, ep, b, body: body["usage"]["completion_tokens"] == 3,
    # sampling: HOT differs from greedy (asserted); each knob below brings it back
    "temperature": lambda s, ep, b, body: ids_of(body) != b.ids,
    "top_p": lambda s, ep, b, body: _hot_differs(s, ep, b) and ids_of(body) == b.ids,
    "top_k": lambda s, ep, b, body: _hot_differs(s, ep, b) and ids_of(body) == b.ids,
    "min_p": lambda s, ep, b, body: _hot_differs(s, ep, b) and ids_of(body) == b.ids,
    "seed": lambda s, ep, b, body: (ids_of(body) == ids_of(send(s, ep, {**HOT, "seed": 7})[1])
                                    != ids_of(send(s, ep, {**HOT, "seed": 8})[1])),
    "stop": lambda s, ep, b, body: (text_of(body) == b.text[:b.text.index(ascii_char(b), 1)]
                                    and body["choices"][0]["stop_reason"] == ascii_char(b)),
    "include_stop_str_in_output": lambda s, ep, b, body: text_of(body) == b.text[
        :b.text.index(ascii_char(b), 1) + 1],
    "stop_token_ids": lambda s, ep, b, body: (body["usage"]["completion_tokens"] == 3
                                              and body["choices"][0]["stop_reason"] == b.ids[2]),
    "min_tokens": lambda s, ep, b, body: b.ids[0] not in ids_of(body)[:4],
    "ignore_eos": lambda s, ep, b, body: _ignore_eos(s, ep, body),
    "logit_bias": lambda s, ep, b, body: set(ids_of(body)) == {120},
    "allowed_token_ids": lambda s, ep, b, body: set(ids_of(body)) <= {97, 98},
    "bad_words": lambda s, ep, b, body: ord(ascii_char(b, 0)) not in ids_of(body),
    "presence_penalty": lambda s, ep, b, body: ids_of(body) != b.ids,
    "frequency_penalty": lambda s, ep, b, body: ids_of(body) != b.ids,
    "repetition_penalty": lambda s, ep, b, body: ids_of(body) != b.ids,
    "skip_special_tokens": lambda s, ep, b, body: (
        ids_of(body) == b.ids and text_of(body) != b.text
        and text_of(body) == s.hf.decode(b.ids, skip_special_tokens=False)),
    # a fast tokenizer writes no spaces around special tokens either way (as in vLLM)
    "spaces_between_special_tokens": _same,
    "truncate_prompt_tokens": lambda s, ep, b, body: body["usage"]["prompt_tokens"] == 1,
    "truncation_side": lambda s, ep, b, body: (   # the prompt's first token, not its last
        body["usage"]["prompt_tokens"] == 1
        and text_of(body) != text_of(send(s, ep, {"truncate_prompt_tokens": 1})[1])),
    # several outputs, scoring
    "n": lambda s, ep, b, body: [c["index"] for c in body["choices"]] == [0, 1],
    "best_of": lambda s, ep, b, body: len(body["choices"]) == 1,
    "echo": lambda s, ep, b, body: text_of(body).startswith(
        s.prompt[ep] if ep == fields.COMPLETIONS else "xy"),
    "logprobs": lambda s, ep, b, body: _logprobs(s, ep, body),
    "top_logprobs": lambda s, ep, b, body: all(
        len(c["top_logprobs"]) == 2 for c in body["choices"][0]["logprobs"]["content"]),
    "prompt_logprobs": lambda s, ep, b, body: len(
        (body["choices"][0] if ep == fields.COMPLETIONS else body)["prompt_logprobs"]
    ) == b.prompt_tokens,
    "return_token_ids": lambda s, ep, b, body: ids_of(body) == b.ids,
    # structured output
    "response_format": _json_enum, "guided_json": _json_enum,
    "guided_whitespace_pattern": _json_enum,
    # an open JSON object from a random model may not close within max_tokens
    "guided_json_object": lambda s, ep, b, body: (
        text_of(body).lstrip().startswith("{")
        if body["choices"][0]["finish_reason"] == "length" else json.loads(text_of(body))),
    "structured_outputs": _choice, "guided_choice": _choice, "guided_decoding_backend": _choice,
    "guided_regex": lambda s, ep, b, body: re.fullmatch("w[56]", text_of(body)),
    "guided_grammar": lambda s, ep, b, body: text_of(body) == "w5",
    # chat template and tools
    "chat_template": lambda s, ep, b, body: body["usage"]["prompt_tokens"] == _tokens(
        s, "".join(m["content"] for m in base_body(s, ep)["messages"])),
    "chat_template_kwargs": lambda s, ep, b, body: body["usage"]["prompt_tokens"] == _tokens(
        s, "hello " + s.prompt[ep]),
    "add_generation_prompt": lambda s, ep, b, body: body["usage"]["prompt_tokens"] == (
        b.prompt_tokens - 1 - _tokens(s, "assistant\n")),
    "continue_final_message": lambda s, ep, b, body: body["usage"]["prompt_tokens"] == len(
        s.hf(s.hf.apply_chat_template([{"role": "user", "content": s.prompt[ep]},
                                       {"role": "assistant", "content": "xy"}],
                                      continue_final_message=True, add_generation_prompt=False,
                                      tokenize=False))["input_ids"]),
    "documents": lambda s, ep, b, body: body["usage"]["prompt_tokens"] > b.prompt_tokens,
    "tools": lambda s, ep, b, body: body["usage"]["prompt_tokens"] > b.prompt_tokens,
    "tool_choice": lambda s, ep, b, body: _tool_calls(body)[0]["function"]["name"] == "ping",
    "parallel_tool_calls": lambda s, ep, b, body: len(_tool_calls(body)) == 1,
}
# Values outside a partly supported field's `only`: refused, naming the field.
OUTSIDE = {"logprobs": 2}


def cases():
    for f in fields.FIELDS:
        for ep in f.endpoints:
            yield pytest.param(f, ep, id=f"{ep}:{f.name}")


@pytest.mark.parametrize("field,endpoint", list(cases()))
def test_field_does_what_the_registry_says(srv, base, field, endpoint):
    b = base[endpoint]
    if field.status == "refused":
        status, body = send(srv, endpoint, {**NEEDS.get(field.name, {}),
                                            field.name: field.example})
        assert status == 400, f"{field.name} is marked refused but answered {status}"
        assert body["error"]["param"] == field.name and body["error"]["code"] == \
            "unsupported_field", body
        return
    make = REQUEST.get(field.name)
    extra = make(srv, endpoint, b) if make else {**NEEDS.get(field.name, {}),
                                                field.name: field.example}
    if field.name == "model":
        extra = {"model": srv.model}
    status, body = send(srv, endpoint, extra)
    assert status == 200, f"{field.name} is marked {field.status} but answered {status}: {body}"
    if field.status == "accepted":
        _same(srv, endpoint, b, body)
    else:
        assert field.name in EFFECTS, f"no effect check for the supported field {field.name}"
        assert EFFECTS[field.name](srv, endpoint, b, body) is not False, body
    if field.only is not None:
        status, body = send(srv, endpoint, {field.name: OUTSIDE[field.name]})
        assert status == 400 and body["error"]["param"] == field.name, body


def test_refused_value_names_the_field_and_neutral_values_pass(srv):
    status, body = send(srv, fields.COMPLETIONS, {"priority": 0, "use_beam_search": False,
                                                  "length_penalty": 1.0, "vllm_xargs": {}})
    assert status == 200, body
    status, body = send(srv, fields.CHAT, {"service_tier": "default", "store": False,
                                           "modalities": ["text"]})
    assert status == 200, body
    status, body = send(srv, fields.CHAT, {"service_tier": "priority"})
    assert status == 400 and body["error"]["param"] == "service_tier"
    assert "priority" in body["error"]["message"]
    # fields nobody defines are ignored
    assert send(srv, fields.COMPLETIONS, {"x_custom_field": [1, 2]})[0] == 200


def test_every_vllm_field_is_in_the_registry():
    """vLLM's request fields (the version this registry was read from) all have a row."""
    vllm = {"model", "prompt", "echo", "frequency_penalty", "logit_bias", "logprobs",
            "max_tokens", "n", "presence_penalty", "seed", "stop", "stream", "stream_options",
            "suffix", "temperature", "top_p", "user", "use_beam_search", "top_k", "min_p",
            "repetition_penalty", "watermarking", "length_penalty", "stop_token_ids",
            "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens",
            "spaces_between_special_tokens", "truncate_prompt_tokens", "truncation_side",
            "allowed_token_ids", "prompt_logprobs", "logprob_token_ids", "bad_words",
            "prompt_embeds", "add_special_tokens", "response_format", "structured_outputs",
            "priority", "request_id", "session_id", "return_tokens_as_token_ids",
            "return_token_ids", "routed_experts_prompt_start", "return_token_offsets",
            "return_mm_kwargs", "cache_salt", "kv_transfer_params", "ec_transfer_params",
            "vllm_xargs", "repetition_detection", "thinking_token_budget", "stream_interval",
            "best_of", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
            "guided_decoding_backend", "guided_whitespace_pattern", "logits_processors"}
    chat = {"messages", "top_logprobs", "max_completion_tokens", "tools", "tool_choice",
            "reasoning_effort", "include_reasoning", "parallel_tool_calls", "documents",
            "chat_template", "chat_template_kwargs", "media_io_kwargs", "mm_processor_kwargs",
            "add_generation_prompt", "continue_final_message", "return_prompt_text"}
    openai_chat = {"audio", "function_call", "functions", "metadata", "modalities",
                   "prediction", "prompt_cache_key", "safety_identifier", "service_tier", "store",
                   "verbosity", "web_search_options", "prompt_cache_retention"}
    have = {ep: {f.name for f in fields.fields_for(ep)} for ep in fields.BOTH}
    assert vllm - {"messages"} - have[fields.COMPLETIONS] == set()
    assert ((vllm - {"prompt", "suffix", "best_of", "prompt_embeds"}) | chat | openai_chat) \
        - have[fields.CHAT] == set()


def test_docs_table_is_generated_from_the_registry():
    with open(os.path.join(ROOT, "docs", "server.md")) as f:
        doc = f.read()
    assert fields.field_table() in doc, "docs/server.md's field table is out of date: run " \
                                        "scripts/gen_field_table.py"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gen_field_table.py"),
                           "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_tokenize_gives_the_chat_endpoints_prompt(srv):
    """/tokenize with messages (and tools, documents, template options) counts what the chat
    endpoint feeds the model; with a prompt, what completions feeds it."""
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo"}]
    for extra in ({}, {"tools": [EMPTY_TOOL], "tool_choice": "none"},
                  {"documents": [{"title": "t", "text": "d"}]},
                  {"add_generation_prompt": False},
                  {"messages": msgs + [{"role": "assistant", "content": "ok"}],
                   "add_generation_prompt": False, "continue_final_message": True}):
        body = {"model": srv.model, "messages": msgs, **extra}
        status, tok = http(srv.url, "/tokenize", body)
        assert status == 200, tok
        status, out = http(srv.url, "/v1/chat/completions", {**body, "max_tokens": 1})
        assert status == 200, out
        assert tok["count"] == len(tok["tokens"]) == out["usage"]["prompt_tokens"], extra
    _, tok = http(srv.url, "/tokenize", {"prompt": "héllo", "return_token_strs": True})
    _, out = http(srv.url, "/v1/completions", {"prompt": "héllo", "max_tokens": 1,
                                               "return_token_ids": True})
    assert tok["tokens"] == out["choices"][0]["prompt_token_ids"] == list("héllo".encode())
    assert tok["token_strs"] == srv.hf.convert_ids_to_tokens(tok["tokens"])
    _, det = http(srv.url, "/detokenize", {"tokens": tok["tokens"] + [258]})
    assert det == {"prompt": "héllo<|im_start|>"}


def test_detokenizer_options(srv):
    """skip_special_tokens=False: the incremental text is the whole decode with the special
    tokens; spaces_between_special_tokens reaches the tokenizer's decode (slow tokenizers read
    it; a fast one has no such option)."""
    import random

    from jaxserve.tokenizer import Tokenizer
    tok = Tokenizer(srv.hf, frozenset({257}))
    rng = random.Random(0)
    ids = list(range(32, 127)) + list(range(256, 272))   # ASCII (no char split by the prompt)
    for _ in range(20):
        prompt = [rng.choice(ids) for _ in range(rng.randrange(1, 8))]
        out = [rng.choice(ids) for _ in range(rng.randrange(1, 30))]
        for skip in (True, False):
            det = tok.detokenizer(prompt, skip_special_tokens=skip)
            text = "".join(det.step(prompt + out[:i + 1]) for i in range(len(out)))
            text += det.flush(prompt + out)
            assert text == srv.hf.decode(out, skip_special_tokens=skip), (prompt, out, skip)

    class Recorder:
        def decode(self, ids, **kw):
            self.kw = kw
            return ""
    rec = Recorder()
    Tokenizer(rec, frozenset()).decode([1], spaces_between_special_tokens=False)
    assert rec.kw["spaces_between_special_tokens"] is False
