"""Structured output (jaxserve/structured, server/structured.py) end to end.

A tiny random Llama with a byte-level BPE tokenizer (trained here, offline, on JSON-like
text): a random model writes valid JSON only if the token mask works, which is the point.
The engine runs every constrained row under its grammar's mask; the tests check the outputs
against the constraint itself (a small validator for the schema subset generated here; the
regex with `re.fullmatch`), and that unconstrained rows of the same batch are untouched.
"""
from __future__ import annotations

import json
import random
import re
import string

import numpy as np
import pytest

from jaxserve.admission import AdmissionError
from jaxserve.sampling_params import SamplingParams
from jaxserve.structured import Constraint

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]    # ids 0, 1, 2 (EOS: 2)
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")
WORDS = ["name", "age", "city", "tags", "red", "green", "blue", "true", "false", "null", "id",
         "value", "items", "a b", "x"]


def _corpus(n: int = 3000, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(n):
        doc = {rng.choice(WORDS): rng.choice([rng.randint(-99, 999), rng.choice(WORDS), True, None,
                                              [rng.choice(WORDS)], {"k": rng.random()}])
               for _ in range(rng.randint(1, 4))}
        yield json.dumps(doc) + " " + "".join(rng.choice(string.printable) for _ in range(20))


def make_json_model(path, vocab_size: int = 640, seed: int = 0):
    """A tiny random Llama (tests/tiny_models.py) with a byte-level BPE of vocab_size tokens
    (every byte has a token, so any JSON can be written) and a ChatML-like template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from tiny_models import make_hf_model
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
                            chat_template=CHAT_TEMPLATE).save_pretrained(str(path))
    V = tok.get_vocab_size()
    return make_hf_model("llama", path, seed=seed, vocab_size=V, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)


ENGINE_KW = dict(dtype="float32", max_num_seqs=32, max_model_len=512, num_pages=700,
                 max_prefill_tokens=256, page_size=16)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny model's directory, with a PEFT adapter of it in adapter/."""
    from lora_helpers import make_adapter
    path = tmp_path_factory.mktemp("json_model")
    base = make_json_model(path)
    make_adapter(base, path / "adapter", seed=4, r=8, lora_alpha=16,
                 target_modules=["q_proj", "v_proj", "down_proj"])
    return path


@pytest.fixture(scope="module")
def engine(model_dir):
    from jaxserve.engine import EngineConfig, LLMEngine
    e = LLMEngine(EngineConfig(model=str(model_dir), **ENGINE_KW))
    e.add_lora("ad", str(model_dir / "adapter"))
    return e


# ------------------------------------------------------------------ schemas and a validator
KEYS = ["id", "name", "age", "tags", "kind", "ok", "sub", "list"]


def rand_schema(rng: random.Random, depth: int = 0) -> dict:
    """A JSON schema with nested objects, arrays, enums, bounded strings and integers: every
    value it allows has a bounded length (max_chars), so a grammar-following output ends."""
    kinds = ["string", "integer", "boolean", "enum", "null"] + (["object", "array"] * 2
                                                                 if depth < 2 else [])
    k = rng.choice(kinds)
    if k == "string":
        s = {"type": "string", "maxLength": rng.randint(0, 5)}
        if rng.random() < 0.3:
            s["minLength"] = rng.randint(0, s["maxLength"])
        return s
    if k == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 300)}
    if k == "boolean":
        return {"type": "boolean"}
    if k == "null":
        return {"type": "null"}
    if k == "enum":
        return {"enum": rng.sample(["red", "green", "a b", 7, -1, True, None, "x\"y"],
                                   rng.randint(1, 4))}
    if k == "array":
        lo = rng.randint(0, 1)
        return {"type": "array", "items": rand_schema(rng, depth + 1), "minItems": lo,
                "maxItems": lo + rng.randint(0, 2)}
    return rand_object(rng, depth)


def rand_object(rng: random.Random, depth: int = 0) -> dict:
    keys = rng.sample(KEYS, rng.randint(1, 3))
    return {"type": "object", "properties": {k: rand_schema(rng, depth + 1) for k in keys},
            "required": [k for k in keys if rng.random() < 0.7], "additionalProperties": False}


def max_chars(s: dict) -> int:
    """The most characters of JSON a value of s can take, compact (", " and ": ")."""
    if "enum" in s:
        return max(len(json.dumps(e)) for e in s["enum"])
    t = s["type"]
    if t == "string":       # an escaped character takes at most 12 (a \\u surrogate pair)
        return 2 + 12 * s["maxLength"]
    if t == "integer":
        return max(len(str(s["minimum"])), len(str(s["maximum"])))
    if t in ("boolean", "null"):
        return 5
    if t == "array":
        return 2 + s["maxItems"] * (max_chars(s["items"]) + 2)
    return 2 + sum(len(k) + 6 + max_chars(v) for k, v in s["properties"].items())


def conforms(v, s: dict) -> bool:
    """Whether v is valid under s (the subset rand_schema makes)."""
    if "enum" in s:
        return any(v == e and type(v) is type(e) for e in s["enum"])
    t = s["type"]
    if t == "string":
        return isinstance(v, str) and s.get("minLength", 0) <= len(v) <= s["maxLength"]
    if t == "integer":
        return type(v) is int and s["minimum"] <= v <= s["maximum"]
    if t == "boolean":
        return type(v) is bool
    if t == "null":
        return v is None
    if t == "array":
        return (isinstance(v, list) and s.get("minItems", 0) <= len(v) <= s["maxItems"]
                and all(conforms(x, s["items"]) for x in v))
    return (isinstance(v, dict) and set(s["required"]) <= set(v) <= set(s["properties"])
            and all(conforms(x, s["properties"][k]) for k, x in v.items()))


def test_validator_on_known_values():
    s = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                          "b": {"enum": ["x", 1]}},
         "required": ["a"], "additionalProperties": False}
    assert conforms({"a": 3}, s) and conforms({"a": 0, "b": 1}, s)
    assert not conforms({"a": 10}, s) and not conforms({"b": "x"}, s)
    assert not conforms({"a": 1, "c": 2}, s) and not conforms({"a": True}, s)


# ------------------------------------------------------------------ the engine
def _prompts(engine, n: int, seed: int):
    rng = random.Random(seed)
    V = engine.model_config.vocab_size
    return [[rng.randrange(3, V) for _ in range(rng.randint(3, 12))] for _ in range(n)]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_random_schemas_always_valid_json(engine, sampled):
    """50 random schemas (nested objects, arrays, enums), one batch: every output parses and
    is valid under its schema, and ends with "stop" (the grammar's EOS) within its bound."""
    rng = random.Random(1234)
    schemas = [rand_object(rng) for _ in range(50)]
    params = [SamplingParams(max_tokens=max_chars(s) + 1, temperature=1.0 if sampled else 0.0,
                             seed=i, structured=Constraint.json_schema(s))
              for i, s in enumerate(schemas)]
    outs = engine.generate(_prompts(engine, 50, seed=5), params)
    for s, out in zip(schemas, outs):
        assert out.finish_reason == "stop", (s, out.text, out.finish_reason, out.error)
        value = json.loads(out.text)
        assert conforms(value, s), (s, out.text)
        assert out.token_ids[-1] == 2        # EOS, allowed once the grammar is complete
    assert len(engine.structured) == 0       # every matcher released


def test_length_finish_leaves_a_valid_prefix(engine):
    """Cut by max_tokens, the output is a prefix the grammar accepts."""
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {
        "type": "string", "maxLength": 40}, "maxItems": 20}}, "required": ["a"]}
    c = Constraint.json_schema(schema)
    out = engine.generate(_prompts(engine, 1, seed=9), SamplingParams(
        max_tokens=12, temperature=1.0, seed=3, structured=c))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 12
    m = engine.structured.compiler.submit(c).result().deep_copy()
    assert m.consume_tokens(out.token_ids), m.get_error()
    assert out.text.startswith('{"a": [')


def test_regex_and_choice(engine):
    pattern = r"(ab|cd)[0-9]{2,4}-[a-z]+ ?"
    choices = ["yes", "no", "maybe so"]
    params = ([SamplingParams(max_tokens=40, temperature=t, seed=i,
                              structured=Constraint.regex(pattern)) for i, t in
               enumerate([0.0, 1.0, 1.0])]
              + [SamplingParams(max_tokens=10, temperature=t, seed=i,
                                structured=Constraint.choice(choices)) for i, t in
                 enumerate([0.0, 1.0, 1.0, 1.0])])
    outs = engine.generate(_prompts(engine, len(params), seed=2), params)
    for out in outs[:3]:
        if out.finish_reason == "stop":
            assert re.fullmatch(pattern, out.text), out.text
        else:   # [a-z]+ may run on: a prefix of a match
            assert out.finish_reason == "length" and re.fullmatch(r"(ab|cd)[0-9]{2,4}-[a-z]*",
                                                                  out.text), out.text
    for out in outs[3:]:
        assert out.finish_reason == "stop" and out.text in choices, out.text


def test_grammar_and_wrapped_schema(engine):
    """A Lark grammar, a GBNF one, and a JSON schema between tool-call markers."""
    lark = Constraint.grammar('start: "(" num ("+" num)* ")"\nnum: /[1-9][0-9]?/\n')
    gbnf = Constraint.grammar('root ::= "<" [a-c] [a-c] ">"')
    args = Constraint.json_schema({"type": "object", "properties": {
        "city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"], "additionalProperties": False})
    call = args.wrapped("<tool_call>\n", "\n</tool_call>")
    outs = engine.generate(_prompts(engine, 3, seed=3), [
        SamplingParams(max_tokens=60, temperature=1.0, seed=1, structured=c)
        for c in (lark, gbnf, call)])
    assert outs[0].finish_reason in ("stop", "length")
    if outs[0].finish_reason == "stop":
        assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", outs[0].text), outs[0].text
    assert re.fullmatch(r"<[a-c]{2}>", outs[1].text) and outs[1].finish_reason == "stop"
    text = outs[2].text
    assert text.startswith("<tool_call>\n") and text.endswith("\n</tool_call>"), text
    assert json.loads(text[len("<tool_call>\n"):-len("\n</tool_call>")])["city"] in ("Paris", "Oslo")


def test_invalid_constraints_refused_at_admission(engine):
    bad = [(Constraint.json_schema({"type": "objekt"}, param="response_format.json_schema.schema"),
            "response_format.json_schema.schema"),
           (Constraint.regex("a(b", param="guided_regex"), "guided_regex"),
           (Constraint.grammar("start: foo", param="guided_grammar"), "guided_grammar"),
           (Constraint.json_schema({"$ref": "#/nowhere"}), "structured_outputs.json")]
    for c, param in bad:
        with pytest.raises(AdmissionError) as e:
            engine.add_request("bad", [5, 6, 7], SamplingParams(structured=c))
        assert e.value.param == param, e.value
    assert not engine.has_unfinished() and len(engine.structured) == 0


def _run(engine, requests):
    """Run (prompt, params, adapter) requests together to completion; their final outputs."""
    ids = []
    for i, (prompt, params, adapter) in enumerate(requests):
        ids.append(f"mix-{id(requests)}-{i}")
        engine.add_request(ids[-1], prompt, params, adapter=adapter)
    final = {}
    while len(final) < len(ids):
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return [final[i] for i in ids]


def test_mixed_batch_unconstrained_rows_unchanged(engine):
    """Unconstrained requests (greedy and seeded sampling, base model and adapter) produce the
    same tokens alone as beside constrained ones (with and without the adapter) in one batch,
    which also turns the overlapped loop off while a constrained row runs."""
    prompts = _prompts(engine, 8, seed=11)
    free = [(prompts[0], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True), None),
            (prompts[1], SamplingParams(max_tokens=16, temperature=1.0, seed=7, ignore_eos=True),
             None),
            (prompts[2], SamplingParams(max_tokens=16, temperature=0.8, top_k=20, seed=8,
                                        ignore_eos=True), "ad"),
            (prompts[3], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True), "ad")]
    alone = _run(engine, free)
    schema = {"type": "object", "properties": {"k": {"type": "array", "items": {
        "type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 3}},
        "required": ["k"], "additionalProperties": False}
    c = Constraint.json_schema(schema)
    constrained = [(prompts[4], SamplingParams(max_tokens=30, temperature=0.0, structured=c), None),
                   (prompts[5], SamplingParams(max_tokens=30, temperature=1.0, seed=2,
                                               structured=c), "ad"),
                   (prompts[6], SamplingParams(max_tokens=8, structured=Constraint.choice(
                       ["on", "off"])), "ad"),
                   (prompts[7], SamplingParams(max_tokens=30, temperature=0.0, structured=c), "ad")]
    mixed = _run(engine, free + constrained)
    for a, b in zip(alone, mixed[:4]):
        assert a.token_ids == b.token_ids
    for out in mixed[4:6] + mixed[7:]:
        assert out.finish_reason == "stop" and conforms(json.loads(out.text), schema), out.text
    assert mixed[6].text in ("on", "off")


# ------------------------------------------------------------------ the server, real clients
@pytest.fixture(scope="module")
def srv(engine):
    from server_harness import ServerThread
    with ServerThread(engine) as s:
        s.model = engine.model_name
        yield s


@pytest.fixture(scope="module")
def client(srv):
    import openai
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="test-key", max_retries=0,
                         timeout=None)


def test_openai_parse_returns_a_valid_object(srv, client):
    """`client.chat.completions.parse(response_format=PydanticModel)`: the json_schema the
    client derives (strict) constrains the tiny random model into a valid object."""
    from typing import Literal
    from pydantic import BaseModel, Field

    class Address(BaseModel):
        city: Literal["Paris", "Oslo", "Lima"]
        zip: str = Field(max_length=5)

    class Person(BaseModel):
        name: str = Field(max_length=8)
        age: int = Field(ge=0, le=120)
        role: Literal["admin", "user"]
        tags: list[Literal["a", "b", "c"]] = Field(max_length=3)
        active: bool
        address: Address

    for temperature in (0.0, 1.0):
        done = client.chat.completions.parse(
            model=srv.model, messages=[{"role": "user", "content": "Describe a person."}],
            response_format=Person, max_completion_tokens=300, temperature=temperature, seed=3)
        choice = done.choices[0]
        assert choice.finish_reason == "stop"
        person = choice.message.parsed
        assert isinstance(person, Person) and person.address.city in ("Paris", "Oslo", "Lima")
        assert Person.model_validate_json(choice.message.content) == person
        # written in the model's field order (the schema's property order is kept)
        assert list(json.loads(choice.message.content)) == list(Person.model_fields)


def test_server_fields_constrain_the_output(srv, client):
    """vLLM's fields through the openai client's extra_body, on both endpoints, streamed and
    not: choice, regex, JSON schema (guided_json), json_object."""
    msgs = [{"role": "user", "content": "Pick one."}]
    out = client.chat.completions.create(model=srv.model, messages=msgs, max_tokens=10,
                                         extra_body={"structured_outputs": {
                                             "choice": ["alpha", "beta gamma"]}})
    assert out.choices[0].message.content in ("alpha", "beta gamma")
    kw = dict(model=srv.model, prompt="id:", max_tokens=20, temperature=1.0, seed=5,
              extra_body={"guided_regex": r"[A-F]{3}-[0-9]{4}"})
    full = client.completions.create(**kw)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    assert re.fullmatch(r"[A-F]{3}-[0-9]{4}", full.choices[0].text)
    assert streamed == full.choices[0].text and full.choices[0].finish_reason == "stop"
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1,
                                                     "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    out = client.completions.create(model=srv.model, prompt="x", max_tokens=30,
                                    extra_body={"guided_json": schema,
                                                "guided_decoding_backend": "guidance"})
    assert 1 <= json.loads(out.choices[0].text)["n"] <= 9
    out = client.chat.completions.create(
        model=srv.model, messages=msgs, max_tokens=40, temperature=1.0, seed=2,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
        extra_body={"guided_whitespace_pattern": "[ ]?"})
    assert 1 <= json.loads(out.choices[0].message.content)["n"] <= 9


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objekt"}}}}, "response_format.json_schema.schema"),
    ({"guided_json": {"type": "object", "properties": {"a": {"$ref": "#/missing"}}}},
     "guided_json"),
    ({"guided_regex": "a(b"}, "guided_regex"),
    ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "structured_outputs.regex"),
    ({"guided_choice": ["a"], "guided_decoding_backend": "xgrammar"}, "guided_decoding_backend"),
    ({"guided_regex": "a", "guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
    ({"structured_outputs": {"json": {}, "bogus": 1}}, "structured_outputs.bogus"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
])
def test_invalid_constraints_are_400_naming_the_field(srv, body, param):
    from test_server_fake import http
    for path, base in (("/v1/completions", {"prompt": "x"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        status, resp = http(srv.url, path, {"model": srv.model, "max_tokens": 4, **base, **body})
        assert status == 400, resp
        assert resp["error"]["param"] == param, resp
