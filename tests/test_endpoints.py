"""The endpoints beside generation (/tokenize, /detokenize, /version, /ping, /v1/models/{id},
/openapi.json) and the request-level fields (request_id, truncate_prompt_tokens, priority,
return_token_ids, stop_reason, system_fingerprint), over the real engine on the fake runner
(tests/fake_runner.py: one token per character; the k-th output letter follows from the
prompt's ids, so truncation is visible in the text)."""
from __future__ import annotations

import os
import threading

import openai
import pytest

from fake_runner import expected_text, fake_engine, write_adapter
from server import fields
from server.config import ServerConfig
from server_harness import ServerThread, parse_sse
from test_server_fake import http

MAX_LEN = 256


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    write_adapter(root / "alpha", seed=0)
    eng = fake_engine(max_num_seqs=4, num_pages=512, max_model_len=MAX_LEN)
    cfg = ServerConfig(lora_root=str(root), lora_modules=(("sql", str(root / "alpha")),))
    with ServerThread(eng, cfg) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="k", max_retries=0)


def completion(srv, headers=None, **kw):
    return http(srv.url, "/v1/completions", {"model": "fake-model", **kw}, headers=headers)


def chat(srv, **kw):
    return http(srv.url, "/v1/chat/completions",
                {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], **kw})


def assert_error(status, body, want_status, param=None):
    assert status == want_status, body
    err = body["error"]
    assert isinstance(err["code"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err


# ------------------------------------------------------------------ tokenize / detokenize
def test_tokenize_prompt(srv):
    status, body = http(srv.url, "/tokenize", {"model": "fake-model", "prompt": "héllo"})
    assert status == 200, body
    assert body == {"count": 5, "max_model_len": MAX_LEN, "tokens": [ord(c) for c in "héllo"],
                    "token_strs": None}
    _, body = http(srv.url, "/tokenize", {"prompt": "ab", "return_token_strs": True,
                                          "add_special_tokens": False})
    assert body["tokens"] == [97, 98] and body["token_strs"] == ["a", "b"]


def test_tokenize_messages_matches_chat_prompt(srv):
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    status, body = http(srv.url, "/tokenize", {"messages": msgs})
    assert status == 200, body
    assert body["tokens"] == [ord(c) for c in "<system>s<user>q<assistant>"]
    # the chat endpoint reports the same prompt length
    _, out = http(srv.url, "/v1/chat/completions", {"messages": msgs, "max_tokens": 1})
    assert out["usage"]["prompt_tokens"] == body["count"]
    # without the generation prompt: honoured, or refused naming the field
    status, body = http(srv.url, "/tokenize", {"messages": msgs, "add_generation_prompt": False})
    if status == 200:
        assert body["tokens"] == [ord(c) for c in "<system>s<user>q"]
    else:
        assert_error(status, body, 400, "add_generation_prompt")


def test_tokenize_errors(srv):
    assert_error(*http(srv.url, "/tokenize", {"model": "fake-model"}), 400, "prompt")
    assert_error(*http(srv.url, "/tokenize", {"prompt": 3}), 400, "prompt")
    assert_error(*http(srv.url, "/tokenize", {"messages": []}), 400, "messages")
    assert_error(*http(srv.url, "/tokenize", {"prompt": "a", "model": "nope"}), 404, "model")
    assert_error(*http(srv.url, "/tokenize", raw=b"{not json"), 400)
    assert_error(*http(srv.url, "/tokenize", {"prompt": "a", "mm_processor_kwargs": {"x": 1}}),
                 400, "mm_processor_kwargs")
    status, body = http(srv.url, "/tokenize", {"prompt": "a", "model": "sql"})   # an adapter
    assert status == 200 and body["tokens"] == [97]


def test_detokenize_round_trip_and_errors(srv):
    _, tok = http(srv.url, "/tokenize", {"prompt": "round trip ✓"})
    status, body = http(srv.url, "/detokenize", {"model": "fake-model", "tokens": tok["tokens"]})
    assert status == 200 and body == {"prompt": "round trip ✓"}
    assert_error(*http(srv.url, "/detokenize", {}), 400, "tokens")
    assert_error(*http(srv.url, "/detokenize", {"tokens": ["a"]}), 400, "tokens")
    assert_error(*http(srv.url, "/detokenize", {"tokens": [True]}), 400, "tokens")
    assert_error(*http(srv.url, "/detokenize", {"tokens": [-1]}), 400, "tokens")
    assert_error(*http(srv.url, "/detokenize", {"tokens": [1], "model": "nope"}), 404, "model")


# ------------------------------------------------------------------ version, ping, models
def test_version_and_ping(srv):
    import jaxserve
    assert http(srv.url, "/version") == (200, {"version": jaxserve.__version__})
    for method in ("GET", "POST"):
        status, body = http(srv.url, "/ping", method=method)
        assert status == 200 and body["status"] == "ok"
    assert_error(*http(srv.url, "/ping", method="PUT"), 405)


def test_models_retrieve_with_openai_client(srv, client):
    base = client.models.retrieve("fake-model")
    assert base.id == "fake-model" and base.object == "model"
    assert base.model_extra["max_model_len"] == MAX_LEN
    adapter = client.models.retrieve("sql")
    assert adapter.id == "sql" and adapter.model_extra["parent"] == "fake-model"
    listed = {m.id: m.model_dump() for m in client.models.list()}
    assert listed["sql"] == adapter.model_dump() and listed["fake-model"] == base.model_dump()
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no/such-model")   # a slash in the id is part of the id
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


# ------------------------------------------------------------------ OpenAPI
def test_openapi_describes_the_served_routes(srv):
    status, spec = http(srv.url, "/openapi.json")
    assert status == 200 and spec["openapi"].startswith("3.")
    served = {(r.resource.canonical, r.method.lower()) for r in srv.app.router.routes()
              if r.method != "HEAD"}
    described = {(p, m) for p, ops in spec["paths"].items() for m in ops}
    assert described == served
    for endpoint, path in ((fields.COMPLETIONS, "/v1/completions"),
                           (fields.CHAT, "/v1/chat/completions")):
        schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"][
            "schema"]
        top = [f for f in fields.fields_for(endpoint) if "." not in f.name]
        assert set(schema["properties"]) == {f.name for f in top if f.status != "refused"}
        assert set(schema["x-refused"]) == {f.name for f in top if f.status == "refused"}
    assert spec["paths"]["/v1/models/{model_id}"]["get"]["parameters"][0]["name"] == "model_id"
    assert "tokens" in spec["paths"]["/detokenize"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]["properties"]


# ------------------------------------------------------------------ auth, metrics, errors
def test_new_routes_behind_auth_and_counted(tmp_path):
    eng = fake_engine(max_num_seqs=2, num_pages=64, max_model_len=64)
    with ServerThread(eng, ServerConfig(api_keys=(("secret", "alice"),),
                                        key_roles=(("secret", "admin"),))) as s:
        auth = {"Authorization": "Bearer secret"}
        for path, body in (("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [97]}),
                           ("/v1/models/fake-model", None)):
            assert_error(*http(s.url, path, body), 401)
            assert http(s.url, path, body, headers=auth)[0] == 200
        for path in ("/version", "/ping", "/openapi.json", "/health"):   # open, as /health
            assert http(s.url, path)[0] == 200
        _, text = http(s.url, "/metrics", headers=auth)
        for route in ("/tokenize", "/detokenize", "/v1/models/{model_id}", "/version"):
            assert f'route="{route}"' in text, route


def test_error_code_is_always_a_string(srv):
    cases = [http(srv.url, "/nope"), http(srv.url, "/version", method="POST"),
             http(srv.url, "/v1/completions", raw=b"[1]"),
             completion(srv, prompt="a", max_tokens=-1), completion(srv, prompt="a", priority=3),
             completion(srv, prompt="a", temperature="hot"),
             completion(srv, prompt="a", model="missing"),
             http(srv.url, "/v1/models/missing")]
    for status, body in cases:
        assert status >= 400 and isinstance(body["error"]["code"], str), (status, body)


# ------------------------------------------------------------------ request-level fields
def test_request_id_in_response_and_header(srv):
    status, body = completion(srv, prompt="a", max_tokens=2, request_id="abc-1")
    assert status == 200 and body["id"] == "cmpl-abc-1"
    _, body = chat(srv, max_tokens=2, request_id="abc-1")
    assert body["id"] == "chatcmpl-abc-1"
    # the header wins over the field, and comes back
    import urllib.request
    req = urllib.request.Request(srv.url + "/v1/completions", method="POST",
                                 data=b'{"prompt": "a", "max_tokens": 1, "request_id": "x"}',
                                 headers={"Content-Type": "application/json",
                                          "X-Request-Id": "from-header"})
    with urllib.request.urlopen(req) as r:
        assert r.headers["X-Request-Id"] == "cmpl-from-header"
    # without one, a fresh id, also in the header
    with urllib.request.urlopen(urllib.request.Request(
            srv.url + "/v1/completions", data=b'{"prompt": "a", "max_tokens": 1}',
            headers={"Content-Type": "application/json"})) as r:
        import json
        assert r.headers["X-Request-Id"] == json.loads(r.read())["id"]
    assert_error(*completion(srv, prompt="a", request_id=""), 400, "request_id")
    assert_error(*completion(srv, prompt="a", request_id="a\nb"), 400, "request_id")


def test_same_request_id_twice_at_once(srv):
    results = []

    def go():
        results.append(completion(srv, prompt="abc", max_tokens=20, request_id="same"))
    threads = [threading.Thread(target=go) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [(s, b["id"], b["choices"][0]["text"]) for s, b in results] == \
        [(200, "cmpl-same", expected_text("abc", 20))] * 3


def test_truncate_prompt_tokens(srv):
    prompt = "hello world"
    status, body = completion(srv, prompt=prompt, max_tokens=4, truncate_prompt_tokens=5)
    assert status == 200, body
    assert body["choices"][0]["text"] == expected_text("world", 4)
    assert body["usage"]["prompt_tokens"] == 5
    _, body = completion(srv, prompt=prompt, max_tokens=4, truncate_prompt_tokens=5,
                         truncation_side="right")
    assert body["choices"][0]["text"] == expected_text("hello", 4)
    for k in (-1, 100):   # -1: the context length; longer than the prompt: nothing cut
        _, body = completion(srv, prompt=prompt, max_tokens=4, truncate_prompt_tokens=k)
        assert body["choices"][0]["text"] == expected_text(prompt, 4)
    _, body = chat(srv, max_tokens=3, truncate_prompt_tokens=3)   # "<user>hi<assistant>"
    assert body["usage"]["prompt_tokens"] == 3
    assert body["choices"][0]["message"]["content"] == expected_text("nt>", 3)
    for bad in (0, -2, MAX_LEN + 1, "3"):
        assert_error(*completion(srv, prompt=prompt, truncate_prompt_tokens=bad), 400,
                     "truncate_prompt_tokens")
    assert_error(*completion(srv, prompt=prompt, truncate_prompt_tokens=2,
                             truncation_side="middle"), 400, "truncation_side")


def test_priority_refused_unless_zero(srv):
    assert completion(srv, prompt="a", max_tokens=1, priority=0)[0] == 200
    assert_error(*completion(srv, prompt="a", max_tokens=1, priority=5), 400, "priority")
    assert_error(*chat(srv, max_tokens=1, priority=-1), 400, "priority")


def test_return_token_ids(srv):
    _, body = completion(srv, prompt="abc", max_tokens=5, return_token_ids=True)
    choice = body["choices"][0]
    assert choice["prompt_token_ids"] == [97, 98, 99]
    assert choice["token_ids"] == [ord(c) for c in choice["text"]]
    _, body = completion(srv, prompt="abc", max_tokens=5)
    assert "token_ids" not in body["choices"][0]
    status, raw = completion(srv, prompt="abc", max_tokens=5, return_token_ids=True, stream=True)
    events = parse_sse(raw)[:-1]
    assert events[0]["choices"][0]["prompt_token_ids"] == [97, 98, 99]
    assert all("prompt_token_ids" not in e["choices"][0] for e in events[1:])
    assert sum((e["choices"][0]["token_ids"] for e in events), []) == choice["token_ids"]
    _, body = chat(srv, max_tokens=3, return_token_ids=True)
    assert body["prompt_token_ids"] == [ord(c) for c in "<user>hi<assistant>"]
    msg = body["choices"][0]
    assert msg["token_ids"] == [ord(c) for c in msg["message"]["content"]]
    _, raw = chat(srv, max_tokens=3, return_token_ids=True, stream=True)
    events = parse_sse(raw)[:-1]
    assert events[0]["prompt_token_ids"] == body["prompt_token_ids"]
    assert sum((e["choices"][0]["token_ids"] for e in events), []) == msg["token_ids"]


def test_stop_reason_and_system_fingerprint(srv):
    text = expected_text("hello", 10)
    _, body = completion(srv, prompt="hello", max_tokens=10, stop=["zz", text[4:6]])
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == text[4:6]
    assert body["system_fingerprint"].startswith("fp_")
    _, body = completion(srv, prompt="hello", max_tokens=3)
    assert body["choices"][0]["stop_reason"] is None
    fp = body["system_fingerprint"]
    _, raw = chat(srv, max_tokens=10, stop=[expected_text("<user>hi<assistant>", 10)[5:7]],
                  stream=True, stream_options={"include_usage": True})
    events = parse_sse(raw)[:-1]
    assert all(e["system_fingerprint"] == fp for e in events)
    finals = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["stop_reason"] == \
        expected_text("<user>hi<assistant>", 10)[5:7]
    _, body = chat(srv, max_tokens=2)
    assert body["choices"][0]["stop_reason"] is None and body["system_fingerprint"] == fp
