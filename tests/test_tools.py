"""Tool calling: the parsers on fixed model outputs (whole, and streamed in random chunkings),
the request fields, the constraint that enforces tool_choice "required" / a named tool, and
that constraint through the real server against a tiny random model with the `openai` client.
"""
from __future__ import annotations

import json
import random

import pytest

from chat_model import make_tool_model, tool_engine
from server.protocol import ApiError
from server.tools import PARSERS, get_parser, parse_tools, tool_call_constraint

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99},
        "b": {"type": "boolean"}}, "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]

# (parser, model output, expected content (None: no content), expected [(name, arguments)])
CASES = [
    ("hermes", 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
               '"Paris", "unit": "c"}}\n</tool_call>',
     "Let me look.\n", [("get_weather", '{"city": "Paris", "unit": "c"}')]),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": '
               '"f"}}\n</tool_call>\n<tool_call>\n{"arguments": {"a": 2, "b": true}, '
               '"name": "add"}\n</tool_call>\n',
     None, [("get_weather", '{"city": "Oslo", "unit": "f"}'), ("add", '{"a": 2, "b": true}')]),
    ("hermes", 'No tools needed: 1 < 2 and <tool is not a marker.', "No tools needed: 1 < 2 "
               "and <tool is not a marker.", []),
    ("hermes", '<tool_call>{"name": "noargs"}</tool_call>', None, [("noargs", "{}")]),
    ("hermes", '<tool_call>{"name": "s", "arguments": "{\\"x\\": [1, {\\"y\\": \\"}\\"}]}"}'
               '</tool_call>', None, [("s", '{"x": [1, {"y": "}"}]}')]),
    ("hermes", 'A <tool_call>{"name": "f", "arguments": {"q": "a \\"quoted\\" \\\\ </tool_call> '
               'x\\u00e9"}}</tool_call> B', "A B",
     [("f", '{"q": "a \\"quoted\\" \\\\ </tool_call> x\\u00e9"}')]),
    # malformed JSON: the call's text stays content (as vLLM)
    ("hermes", 'Hi <tool_call>{"name": get_weather}</tool_call>',
     'Hi <tool_call>{"name": get_weather}</tool_call>', []),
    ("hermes", '<tool_call>{"nam', '<tool_call>{"nam', []),
    ("hermes", '<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}'
               '</tool_call>', []),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome", '
                    '"unit": "c"}}', None, [("get_weather", '{"city": "Rome", "unit": "c"}')]),
    ("llama3_json", '{"name": "add", "parameters": {"a": 1, "b": false}}; {"name": "add", '
                    '"arguments": {"a": 3, "b": true}}',
     None, [("add", '{"a": 1, "b": false}'), ("add", '{"a": 3, "b": true}')]),
    ("llama3_json", "The answer is {not a call}", "The answer is {not a call}", []),
    ("llama3_json", '{"name": 5, "parameters": {}}', '{"name": 5, "parameters": {}}', []),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Nice", "unit": '
                '"c"}}, {"name": "add", "arguments": {"a": 7, "b": true}}]',
     None, [("get_weather", '{"city": "Nice", "unit": "c"}'), ("add", '{"a": 7, "b": true}')]),
    ("mistral", 'Sure.[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": true}}]',
     "Sure.", [("add", '{"a": 1, "b": true}')]),
    ("mistral", '[TOOL_CALLS] not json', '[TOOL_CALLS] not json', []),
    ("mistral", 'plain [TOOL text', 'plain [TOOL text', []),
]

MARKERS = ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>")


def _chunks(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 12))))
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


def streamed(parser, pieces: list[str]):
    """(content, [(name, arguments)], deltas) as a client assembles a stream."""
    stream = parser.stream()
    deltas = [stream.feed(p) for p in pieces] + [stream.finish()]
    content, calls = "", {}
    for d in deltas:
        content += d.content
        for tc in d.tool_calls:
            if tc["index"] not in calls:    # the first delta of a call: OpenAI's header shape
                assert set(tc) == {"index", "id", "type", "function"} and tc["type"] == "function"
                assert tc["function"]["arguments"] == "" and tc["function"]["name"]
                calls[tc["index"]] = [tc["function"]["name"], "", tc["id"]]
            else:
                assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
                calls[tc["index"]][1] += tc["function"]["arguments"]
    assert sorted(calls) == list(range(len(calls)))
    return content, [(n, a) for n, a, _ in (calls[i] for i in sorted(calls))], deltas


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_parser_whole_and_streamed(case):
    name, text, content, calls = case
    parser = get_parser(name)
    got_content, got_calls = parser.extract(text)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got_calls] == calls
    for c in got_calls:
        json.loads(c.arguments)
        assert c.id.startswith("call_") if name != "mistral" else (
            len(c.id) == 9 and c.id.isalnum())
    rng = random.Random(hash(text) & 0xffff)
    for chunking in [[text], list(text)] + [_chunks(text, rng) for _ in range(60)]:
        s_content, s_calls, deltas = streamed(parser, chunking)
        assert s_calls == calls, chunking
        assert s_content == (content or "") or (not calls and s_content == text), chunking
        if calls:   # no markup in the content deltas
            assert not any(m in d.content for d in deltas for m in MARKERS)


def test_streamed_arguments_arrive_in_fragments():
    """Arguments stream as the model writes them, not once the call is complete."""
    text = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
            '"c"}}\n</tool_call>')
    stream = get_parser("hermes").stream()
    seen = []
    for ch in text:
        for tc in stream.feed(ch).tool_calls:
            seen.append(tc["function"].get("arguments"))
    assert seen[0] == "" and len(seen) > 10
    assert "".join(seen) == '{"city": "Paris", "unit": "c"}'


def test_malformed_after_the_name_keeps_the_stream_well_formed():
    """A call whose arguments go wrong after its name was streamed: the arguments sent stay,
    the rest is content (a stream cannot take back a call); the whole-text parse makes it all
    content, as vLLM."""
    text = 'x <tool_call>{"name": "f", "arguments": {"a": oops}}</tool_call>'
    parser = get_parser("hermes")
    assert parser.extract(text) == (text, [])
    results = set()
    rng = random.Random(0)
    for chunking in [[text], list(text)] + [_chunks(text, rng) for _ in range(40)]:
        content, calls, _ = streamed(parser, chunking)
        results.add((content, tuple(calls)))
    assert results == {('x oops}}</tool_call>', (("f", '{"a": '),))}   # any chunking


def test_hermes_text_that_ends_like_a_marker_is_held_then_sent():
    stream = get_parser("hermes").stream()
    assert stream.feed("a <tool").content == "a "
    assert stream.feed("box> b").content == "<toolbox> b"
    assert stream.feed("<").content == ""
    assert stream.finish().content == "<"


# ------------------------------------------------------------------ request fields
def test_tool_fields_as_vllm_checks_them():
    def parse(body, parser="hermes", auto=True):
        return parse_tools(body, parser=parser, auto_enabled=auto)
    assert parse({}) is None
    tr = parse({"tools": TOOLS})
    assert tr.choice == "auto" and [t.name for t in tr.tools] == ["get_weather", "add"]
    assert tr.template_tools == TOOLS
    assert parse({"tools": TOOLS, "tool_choice": "none"}).parses_calls is False
    named = parse({"tools": TOOLS, "tool_choice": {"type": "function",
                                                   "function": {"name": "add"}}})
    assert (named.choice, named.name) == ("named", "add")
    assert parse({"tools": [], "tool_choice": "required"}).choice == "none"
    assert parse({"tools": TOOLS, "parallel_tool_calls": False}).parallel is False
    for body, param in [
            ({"tools": TOOLS}, "tool_choice"),                                   # auto off
            ({"tool_choice": "required"}, "tool_choice"),
            ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
            ({"tools": TOOLS, "tool_choice": {"type": "function",
                                              "function": {"name": "nope"}}}, "tool_choice"),
            ({"tools": TOOLS, "tool_choice": {"function": {}}}, "tool_choice"),
            ({"tools": [{"type": "retrieval"}]}, "tools"),
            ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools"),
            ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "tools"),
            ({"tools": "x"}, "tools"),
            ({"functions": [WEATHER["function"]]}, "functions"),
            ({"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": 1},
             "parallel_tool_calls")]:
        with pytest.raises(ApiError) as e:
            parse(body, auto=body.get("tool_choice") is not None)
        assert e.value.status == 400 and e.value.param == param, body
    with pytest.raises(ApiError) as e:
        parse({"tools": TOOLS}, parser=None, auto=False)
    assert "--enable-auto-tool-choice" in e.value.message


# ------------------------------------------------------------------ the constraint
@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tool_model")
    make_tool_model(path)
    return path


@pytest.fixture(scope="module")
def tool_hf(tool_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(tool_model))


@pytest.fixture(scope="module")
def ll_tokenizer(tool_model):
    import llguidance
    with open(tool_model / "tokenizer.json") as f:
        return llguidance.LLTokenizer(f.read())


def _accepts(ll_tokenizer, hf, constraint, text: str) -> bool:
    from llguidance import LLMatcher
    m = LLMatcher(ll_tokenizer, constraint.to_llguidance())
    assert not m.is_error(), m.get_error()
    ids = hf(text, add_special_tokens=False)["input_ids"]
    return all(m.consume_token(t) for t in ids) and m.is_accepting()


FORMATS = {   # what each format's constraint writes for one call of add(a=3, b=true)
    "hermes": '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": true}}\n</tool_call>',
    "llama3_json": '{"name": "add", "parameters": {"a": 3, "b": true}}',
    "mistral": '[TOOL_CALLS][{"name": "add", "arguments": {"a": 3, "b": true}}]',
    None: '[{"name": "add", "parameters": {"a": 3, "b": true}}]',
}


@pytest.mark.parametrize("parser", list(FORMATS), ids=str)
def test_constraint_accepts_its_format_and_parser_reads_it(parser, ll_tokenizer, tool_hf):
    from server.tools import NamedArgsParser, ToolRequest, output_parser
    tools = parse_tools({"tools": TOOLS, "tool_choice": "required"}, parser=parser,
                        auto_enabled=True).tools
    required = tool_call_constraint(tools, "required", parser)
    text = FORMATS[parser]
    assert _accepts(ll_tokenizer, tool_hf, required, text)
    two = {"hermes": text + "\n" + text, "llama3_json": text + "; " + text,
           "mistral": text[:-1] + ", " + text[len("[TOOL_CALLS]["):], None: text[:-1] + ", "
           + text[1:]}[parser]
    assert _accepts(ll_tokenizer, tool_hf, required, two)
    single = tool_call_constraint(tools, "required", parser, parallel=False)
    assert not _accepts(ll_tokenizer, tool_hf, single, two)
    bad_args = text.replace('"a": 3', '"a": 300')
    assert not _accepts(ll_tokenizer, tool_hf, required, bad_args)
    named = tool_call_constraint(tools, "get_weather", parser)
    assert not _accepts(ll_tokenizer, tool_hf, named, text)
    reader = output_parser(ToolRequest(tools, "required"), get_parser(parser))
    content, calls = reader.extract(two)
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == \
        [("add", {"a": 3, "b": True})] * 2
    if parser is None:   # named without a parser: the arguments alone (vLLM's format)
        args = '{"city": "Oslo", "unit": "c"}'
        assert _accepts(ll_tokenizer, tool_hf, named, args)
        assert NamedArgsParser("get_weather").extract(args)[1][0].arguments == args


# ------------------------------------------------------------------ through the server
@pytest.fixture(scope="module")
def srv(tool_model):
    from server.config import ServerConfig
    from server_harness import ServerThread
    cfg = ServerConfig(tool_call_parser="hermes", enable_auto_tool_choice=True)
    engine = tool_engine(tool_model)
    with ServerThread(engine, cfg) as s:
        s.model = engine.model_name
        yield s


@pytest.fixture(scope="module")
def client(srv):
    import openai
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="k", max_retries=0, timeout=None)


def _check_call(name: str, arguments: str, allowed: set[str]):
    assert name in allowed
    args = json.loads(arguments)
    if name == "get_weather":
        assert set(args) == {"city", "unit"} and args["unit"] in ("c", "f")
        assert isinstance(args["city"], str) and len(args["city"]) <= 8
    else:
        assert set(args) == {"a", "b"} and 0 <= args["a"] <= 99 and isinstance(args["b"], bool)


MSGS = [{"role": "user", "content": "What is the weather in Paris, and what is 2 + 3?"}]


@pytest.mark.parametrize("choice", ["required", "add", "get_weather"])
def test_required_and_named_always_yield_a_parseable_call(client, srv, choice):
    """Sampled at temperature 1 (several seeds) and greedy: every response is a call to an
    allowed tool whose arguments are valid JSON matching its schema; streamed calls are the
    same as the non-streamed ones."""
    tool_choice = choice if choice == "required" else {"type": "function",
                                                       "function": {"name": choice}}
    allowed = {"get_weather", "add"} if choice == "required" else {choice}
    for seed, temperature in [(None, 0.0)] + [(s, 1.0) for s in range(4)]:
        kw = dict(model=srv.model, messages=MSGS, tools=TOOLS, tool_choice=tool_choice,
                  max_tokens=96, temperature=temperature, seed=seed)
        if choice == "required":   # a named tool is called once whatever parallel_tool_calls
            kw["parallel_tool_calls"] = False
        r = client.chat.completions.create(**kw)
        choice0 = r.choices[0]
        assert choice0.finish_reason == "tool_calls", choice0
        calls = choice0.message.tool_calls
        assert len(calls) == 1 and calls[0].type == "function" and calls[0].id.startswith("call_")
        _check_call(calls[0].function.name, calls[0].function.arguments, allowed)
        assert not choice0.message.content
        chunks = list(client.chat.completions.create(**kw, stream=True))
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        assert deltas[0].id.startswith("call_") and deltas[0].function.arguments == ""
        assert deltas[0].function.name == calls[0].function.name
        assert "".join(d.function.arguments or "" for d in deltas) == calls[0].function.arguments
        assert not "".join(c.choices[0].delta.content or "" for c in chunks)


def test_required_with_parallel_calls(client, srv):
    """Parallel calls allowed: every complete call parses (the output may end on length)."""
    r = client.chat.completions.create(model=srv.model, messages=MSGS, tools=TOOLS,
                                       tool_choice="required", max_tokens=160, temperature=0)
    calls = r.choices[0].message.tool_calls
    assert calls and len({c.id for c in calls}) == len(calls)
    for c in calls:
        _check_call(c.function.name, c.function.arguments, {"get_weather", "add"})


def test_tool_history_round_trip(client, srv, tool_hf):
    """An assistant message with tool_calls and a tool message in the history: the prompt is
    transformers' apply_chat_template of the same messages (arguments as objects, as vLLM
    passes them), and the request succeeds."""
    history = MSGS + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "add", "arguments": '{"a": 2, "b": true}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    r = client.chat.completions.create(model=srv.model, messages=history, tools=TOOLS,
                                       tool_choice="none", max_tokens=4, temperature=0)
    ref = tool_hf.apply_chat_template(
        MSGS + [{"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "add", "arguments": {"a": 2, "b": True}}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "5"}],
        tools=TOOLS, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert r.usage.prompt_tokens == len(ref)
    text = tool_hf.decode(ref)
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": true}}' in text
    assert "<tool_response>\n5\n</tool_response>" in text
    assert r.choices[0].message.tool_calls is None   # tool_choice none: no parsing


def test_tools_reach_the_template(srv, tool_hf):
    from server_harness import ServerThread  # noqa: F401  (srv's module)
    from test_server_fake import http
    status, body = http(srv.url, "/v1/chat/completions", {
        "messages": MSGS, "tools": TOOLS, "tool_choice": "none", "max_tokens": 1})
    assert status == 200, body
    ref = tool_hf.apply_chat_template(MSGS, tools=TOOLS, add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
    assert body["usage"]["prompt_tokens"] == len(ref)
    assert "get_weather" in tool_hf.decode(ref)


def test_tool_request_errors_over_http(srv):
    from test_server_fake import http
    for extra, param in [({"tool_choice": "required"}, "tool_choice"),
                         ({"tools": TOOLS, "tool_choice": {"type": "function",
                                                           "function": {"name": "x"}}},
                          "tool_choice"),
                         ({"tools": [{"type": "code_interpreter"}]}, "tools"),
                         ({"tools": TOOLS, "tool_choice": "required",
                           "response_format": {"type": "json_object"}}, "tool_choice")]:
        status, body = http(srv.url, "/v1/chat/completions",
                            {"messages": MSGS, "max_tokens": 2, **extra})
        assert status == 400 and body["error"]["param"] == param, (extra, body)


FORCED = ('Checking.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": true}}\n'
          '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", '
          '"unit": "c"}}\n</tool_call>')


def test_auto_parses_calls_streamed_and_not(client, srv):
    """tool_choice auto with the hermes parser, on an output forced to hold text and two calls
    (structured_outputs choice): the message has the text as content and both calls; the
    stream's content deltas carry no markup and its call deltas assemble to the same calls."""
    kw = dict(model=srv.model, messages=MSGS, tools=TOOLS, max_tokens=96, temperature=0,
              extra_body={"structured_outputs": {"choice": [FORCED]}})
    r = client.chat.completions.create(**kw)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content == "Checking.\n"
    assert [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls] \
        == [("add", {"a": 2, "b": True}), ("get_weather", {"city": "Oslo", "unit": "c"})]
    chunks = list(client.chat.completions.create(**kw, stream=True))
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert content == "Checking.\n"
    calls = {}
    for ch in chunks:
        for d in ch.choices[0].delta.tool_calls or []:
            if d.id:
                calls[d.index] = [d.function.name, d.function.arguments, d.id]
            else:
                calls[d.index][1] += d.function.arguments
    assert [(n, a) for n, a, _ in calls.values()] == \
        [(t.function.name, t.function.arguments) for t in c.message.tool_calls]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # parallel_tool_calls false: the first call only
    one = client.chat.completions.create(**kw, parallel_tool_calls=False).choices[0]
    assert [t.function.name for t in one.message.tool_calls] == ["add"]
    # tool_choice none: the same text is content
    none = client.chat.completions.create(**kw, tool_choice="none").choices[0]
    assert none.message.content == FORCED and not none.message.tool_calls
    assert none.finish_reason == "stop"


@pytest.mark.parametrize("parser", PARSERS)
def test_parse_chat_sets_what_the_parser_needs(tool_hf, parser):
    """Parsers whose marker is a special token decode with special tokens kept; required
    carries the parser's constraint."""
    import types
    from jaxserve.tokenizer import Tokenizer
    from server.config import ServerConfig
    from server.openai_api import parse_chat
    ctx = types.SimpleNamespace(config=ServerConfig(tool_call_parser=parser),
                                tokenizer=Tokenizer(tool_hf, {2}))
    req, turn = parse_chat(ctx, {"messages": MSGS, "tools": TOOLS, "tool_choice": "required"})
    assert req.params.skip_special_tokens   # no marker is a special token of this tokenizer
    assert req.params.structured == tool_call_constraint(turn.tools.tools, "required", parser)
    assert turn.parser.name == parser
    req, turn = parse_chat(ctx, {"messages": MSGS, "tools": TOOLS, "tool_choice": "none"})
    assert req.params.structured is None and turn.parser is None
    assert req.params.skip_special_tokens


def test_auto_needs_the_flag(tool_model):
    """tool_choice auto (tools without tool_choice, too) without --enable-auto-tool-choice:
    400, as vLLM."""
    from server.config import ServerConfig
    from server_harness import ServerThread
    from test_server_fake import http
    with ServerThread(tool_engine(tool_model), ServerConfig()) as s:
        for extra in ({"tools": TOOLS}, {"tools": TOOLS, "tool_choice": "auto"}):
            status, body = http(s.url, "/v1/chat/completions",
                                {"messages": MSGS, "max_tokens": 2, **extra})
            assert status == 400 and "--enable-auto-tool-choice" in body["error"]["message"]


def test_markers_that_are_special_tokens(tool_hf):
    """Where the tokenizer makes a call marker one special token (Mistral's [TOOL_CALLS],
    Llama's <|python_tag|>, Hermes 3's <tool_call>): the output is decoded with special tokens
    kept, and the constraint asks for that token, so the model writes it as it was trained."""
    import copy
    import types

    import llguidance
    from jaxserve.tokenizer import Tokenizer
    from server.config import ServerConfig
    from server.openai_api import parse_chat
    hf = copy.deepcopy(tool_hf)
    markers = ["<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>"]
    hf.add_tokens(markers, special_tokens=True)
    special = {m: hf.convert_tokens_to_ids(m) for m in markers}
    ll = llguidance.LLTokenizer(hf.backend_tokenizer.to_str())
    for parser in PARSERS:
        ctx = types.SimpleNamespace(config=ServerConfig(tool_call_parser=parser),
                                    tokenizer=Tokenizer(hf, {2}))
        req, turn = parse_chat(ctx, {"messages": MSGS, "tools": TOOLS,
                                     "tool_choice": "required"})
        assert req.params.skip_special_tokens is False and turn.keep_special_tokens
        text = FORMATS[parser]
        ids = hf(text, add_special_tokens=False)["input_ids"]
        if parser != "llama3_json":
            assert set(ids) & set(special.values())
        assert _accepts(ll, hf, req.params.structured, text)
        decoded = hf.decode(ids, skip_special_tokens=False)
        assert decoded == text
        assert [c.name for c in turn.parser.extract(decoded)[1]] == ["add"]
