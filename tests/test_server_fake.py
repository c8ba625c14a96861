"""The HTTP layer over the real engine on a fake runner (hand-computable text): shapes,
adapters, auth, errors, load shedding. Admission, the scheduler, the output processor (stop
strings, lengths) and the detokenizer are the real ones; only the device step is fake.

The same suites run against the real model in test_server_real.py; here they are exact and fast.
"""
from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.request

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fake_runner import LOGPROB, Spy, expected_text, fake_engine, write_adapter
from jaxserve.async_engine import AsyncEngineConfig
from server.cli import read_api_keys
from server.config import ServerConfig
from server_harness import ServerThread, parse_sse


def http(url: str, path: str, body=None, *, raw: bytes | None = None, method: str | None = None,
         headers: dict | None = None, timeout: float | None = None):
    """(status, parsed JSON or text) for one request; never raises on HTTP errors. No timeout
    by default: every request is bounded work (max_tokens), so a loaded machine is only slower."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, text, ctype = r.status, r.read().decode(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        status, text, ctype = e.code, e.read().decode(), e.headers.get("Content-Type", "")
    return status, (json.loads(text) if "json" in ctype else text)


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for i, name in enumerate(("alpha", "beta", "nested/gamma")):
        write_adapter(root / name, seed=i)
    outside = tmp_path_factory.mktemp("outside")
    os.symlink(outside, root / "escape")
    return str(root), str(outside)


@pytest.fixture(scope="module")
def srv(lora_root):
    root, _ = lora_root
    eng = fake_engine(max_num_seqs=4, num_pages=512, max_model_len=256)
    cfg = ServerConfig(lora_root=root, lora_modules=(("sql", os.path.join(root, "alpha")),))
    with ServerThread(eng, cfg) as s:
        s.engine = eng
        yield s


def completion(srv, **kw):
    return http(srv.url, "/v1/completions", {"model": "fake-model", **kw})


# ------------------------------------------------------------------ shapes
def test_completion_text_usage_and_finish(srv):
    status, body = completion(srv, prompt="hello", max_tokens=6, temperature=0)
    assert status == 200, body
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == expected_text("hello", 6)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}


def test_streamed_completion_equals_non_streamed(srv):
    _, full = completion(srv, prompt="stream me", max_tokens=9)
    status, raw = completion(srv, prompt="stream me", max_tokens=9, stream=True,
                             stream_options={"include_usage": True})
    assert status == 200
    events = parse_sse(raw)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    assert all(c["usage"] is None for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 9


def test_chat_stream_shape(srv):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    status, raw = http(srv.url, "/v1/chat/completions",
                       {"messages": msgs, "max_tokens": 4, "stream": True})
    events = parse_sse(raw)
    assert status == 200 and events[-1] == "[DONE]"
    assert events[0]["object"] == "chat.completion.chunk"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-1])
    prompt = "<system>be brief<user>hi<assistant>"
    assert text == expected_text(prompt, 4)
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert "usage" not in events[1]
    _, full = http(srv.url, "/v1/chat/completions", {"messages": msgs, "max_tokens": 4})
    assert full["choices"][0]["message"] == {"role": "assistant", "content": text}
    assert full["usage"]["prompt_tokens"] == len(prompt)


def test_chat_default_max_tokens_is_the_remaining_context(srv):
    _, body = http(srv.url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
    assert body["usage"]["total_tokens"] == 256


def test_stop_string_and_logprobs(srv):
    text = expected_text("hello", 10)
    stop = text[4:6]
    _, body = completion(srv, prompt="hello", max_tokens=10, stop=[stop], logprobs=0)
    choice = body["choices"][0]
    assert choice["text"] == text[:4] and choice["finish_reason"] == "stop"
    assert choice["logprobs"]["token_logprobs"] == [LOGPROB] * 6
    assert choice["logprobs"]["tokens"][:4] == list(text[:4])
    _, chat = http(srv.url, "/v1/chat/completions",
                   {"messages": [{"role": "user", "content": "q"}], "max_tokens": 2, "logprobs": True})
    assert [c["logprob"] for c in chat["choices"][0]["logprobs"]["content"]] == [LOGPROB] * 2


def test_openai_client_against_fake(srv):
    import openai
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="k", max_retries=0)
    r = client.completions.create(model="fake-model", prompt="abc", max_tokens=3)
    assert r.choices[0].text == expected_text("abc", 3)
    chunks = list(client.chat.completions.create(
        model="sql", messages=[{"role": "user", "content": "a"}], max_tokens=3, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text("<user>a<assistant>", 3, adapter="sql")


# ------------------------------------------------------------------ models and adapters
def test_models_list_base_and_adapters(srv, lora_root):
    status, body = http(srv.url, "/v1/models")
    assert status == 200 and body["object"] == "list"
    by_id = {m["id"]: m for m in body["data"]}
    assert by_id["fake-model"]["parent"] is None
    assert by_id["sql"]["parent"] == "fake-model"
    assert by_id["sql"]["root"] == "alpha"   # relative to --lora-root: no server path


@pytest.mark.parametrize("model", ["sql", "fake-model:sql"])
def test_adapter_selected_by_model(srv, model):
    _, body = completion(srv, prompt="hello", max_tokens=5, model=model)
    assert body["choices"][0]["text"] == expected_text("hello", 5, adapter="sql")
    assert body["choices"][0]["text"] != expected_text("hello", 5)


def test_runtime_load_use_unload(srv):
    s, b = http(srv.url, "/v1/load_lora_adapter", {"lora_name": "b1", "lora_path": "beta"})
    assert s == 200, b
    s, b = http(srv.url, "/v1/load_lora_adapter", {"lora_name": "b1", "lora_path": "beta"})
    assert s == 400 and b["error"]["code"] == "adapter_exists"
    _, body = completion(srv, prompt="hi", max_tokens=3, model="b1")
    assert body["choices"][0]["text"] == expected_text("hi", 3, adapter="b1")
    assert "b1" in {m["id"] for m in http(srv.url, "/v1/models")[1]["data"]}
    s, _ = http(srv.url, "/v1/unload_lora_adapter", {"lora_name": "b1"})
    assert s == 200
    s, b = completion(srv, prompt="hi", max_tokens=3, model="b1")
    assert s == 404 and b["error"]["code"] == "model_not_found"
    s, _ = http(srv.url, "/v1/unload_lora_adapter", {"lora_name": "b1"})
    assert s == 404


@pytest.mark.parametrize("path,status", [
    ("../outside", 403), ("alpha/../../x", 403), ("escape", 403), ("/etc", 403),
    ("missing", 404), ("", 400), (".", 403),
])
def test_adapter_paths_outside_root_are_refused(srv, lora_root, path, status):
    s, b = http(srv.url, "/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": path})
    assert s == status, b
    assert "evil" not in srv.engine.loras


def test_absolute_path_inside_root_is_allowed(srv, lora_root):
    path = os.path.join(lora_root[0], "nested", "gamma")
    s, b = http(srv.url, "/v1/load_lora_adapter", {"lora_name": "g", "lora_path": path})
    assert s == 200, b
    assert http(srv.url, "/v1/unload_lora_adapter", {"lora_name": "g"})[0] == 200


def test_native_generate_and_lora_dir(srv, lora_root):
    s, b = http(srv.url, "/generate", {"inputs": "hey", "parameters": {"max_new_tokens": 4}})
    assert s == 200 and b["generated_text"] == [expected_text("hey", 4)]
    assert b["count_output_tokens"] == 4
    s, raw = http(srv.url, "/generate_stream",
                  {"inputs": "hey", "parameters": {"max_new_tokens": 4}, "lora_dir": "nested/gamma"})
    events = parse_sse(raw)
    name = "nested/gamma"
    assert "".join(e["token"]["text"] for e in events) == expected_text("hey", 4, adapter=name)
    assert events[-1]["finished"] and events[-1]["generated_text"] == expected_text("hey", 4, adapter=name)
    s, b = http(srv.url, "/generate", {"inputs": "hey", "lora_dir": "../etc"})
    assert s == 403


def test_runtime_loading_needs_lora_root():
    with ServerThread(fake_engine(), ServerConfig()) as s:
        st, b = http(s.url, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/tmp"})
        assert st == 403 and b["error"]["code"] == "lora_root_not_set"


# ------------------------------------------------------------------ identity
def test_api_keys_file_and_client_ids(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# tenants\nsk-a alice 2\nsk-b bob\n")
    parsed, weights = read_api_keys(str(keys))
    assert parsed == (("sk-a", "alice"), ("sk-b", "bob")) and weights == {"alice": 2.0}
    eng = fake_engine()
    with ServerThread(eng, ServerConfig(api_keys=parsed)) as s:
        body = {"prompt": "x", "max_tokens": 1}
        assert http(s.url, "/v1/completions", body)[0] == 401
        st, b = http(s.url, "/v1/completions", body, headers={"Authorization": "Bearer nope"})
        assert st == 401 and b["error"]["code"] == "invalid_api_key"
        assert http(s.url, "/v1/models")[0] == 401
        assert http(s.url, "/health")[0] == 200
        for key in ("sk-a", "sk-b", "sk-a"):
            st, _ = http(s.url, "/v1/completions", {**body, "user": "ignored"},
                         headers={"Authorization": f"Bearer {key}"})
            assert st == 200
    assert dict(eng.runner.clients_seen) == {"alice": 2, "bob": 1}


def test_client_id_without_keys_file(srv):
    before = dict(srv.engine.runner.clients_seen)
    completion(srv, prompt="x", max_tokens=1, user="carol")
    completion(srv, prompt="x", max_tokens=1)
    http(srv.url, "/v1/completions", {"prompt": "x", "max_tokens": 1},
         headers={"Authorization": "Bearer secret-key"})
    new = {k: v - before.get(k, 0) for k, v in srv.engine.runner.clients_seen.items()
           if v != before.get(k, 0)}
    assert new.pop("carol") == 1 and new.pop("anonymous") == 1
    (hashed, n), = new.items()
    assert n == 1 and hashed.startswith("key-") and "secret" not in hashed


# ------------------------------------------------------------------ load shedding, disconnects
def test_queue_full_answers_429():
    eng = fake_engine(max_num_seqs=1)
    eng.runner.gate.limit(0)   # no step runs: no request gets a first token
    with ServerThread(eng, async_config=AsyncEngineConfig(max_waiting=2)) as s:
        async def main():
            async with aiohttp.ClientSession() as sess:
                async def one():
                    async with sess.post(s.url + "/v1/completions",
                                         json={"prompt": "x", "max_tokens": 3}) as r:
                        return r.status, await r.json()
                tasks = [asyncio.create_task(one()) for _ in range(8)]
                refused = 0
                for done in asyncio.as_completed(tasks):  # the 6 over the bound answer at once
                    refused += (await done)[0] == 429
                    if refused == 6:
                        break
                eng.runner.gate.open()
                return await asyncio.gather(*tasks)
        results = asyncio.run(main())
    assert sorted(st for st, _ in results) == [200] * 2 + [429] * 6
    body = next(b for st, b in results if st == 429)
    assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "queue_full"


def test_client_disconnect_mid_stream_aborts_and_frees_pages():
    eng = fake_engine(max_num_seqs=4)
    spy = Spy(eng, "abort")
    eng.runner.gate.limit(5)   # the request cannot finish before the server sees the hang-up
    with ServerThread(eng) as s:
        async def main():
            async with aiohttp.ClientSession() as sess:
                r = await sess.post(s.url + "/v1/completions",
                                    json={"prompt": "abc", "max_tokens": 200, "stream": True})
                n = 0
                async for _ in r.content:
                    n += 1
                    if n >= 6:
                        break
                r.close()  # drop the connection
        asyncio.run(main())
        for _ in range(3000):   # bounded wait for the server to see the disconnect
            if s.async_engine.num_in_flight == 0:
                break
            s.on_loop(asyncio.sleep(0.01))
        eng.runner.gate.open()
        stats = s.stats()  # commands run in order: the abort ran before this call
    assert spy.calls["abort"] == 1
    assert stats["num_free_pages"] == stats["num_total_pages"] and stats["num_running"] == 0


def test_metrics_exposition(srv):
    completion(srv, prompt="warm", max_tokens=4, stream=True)
    status, text = http(srv.url, "/metrics")
    assert status == 200
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_sum", "vllm:request_queue_time_seconds_count",
                 "vllm:lora_requests_info", "jaxserve:token_delivery_seconds_count",
                 "jaxserve:scheduler_client_counter"):
        assert name in text, name
    gen = [l for l in text.splitlines() if l.startswith("vllm:generation_tokens_total{")][0]
    assert float(gen.split()[-1]) == srv.engine.num_generation_tokens_total
    for line in text.splitlines():  # every sample line is `name{labels} number`
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


# ------------------------------------------------------------------ prefix caching
def scrape(srv) -> dict[str, float]:
    """/metrics as {'name{labels}': value}."""
    status, text = http(srv.url, "/metrics")
    assert status == 200
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines()
                                     if line and not line.startswith("#"))}


def prefix_counts(srv) -> tuple[int, int]:
    pc = srv.stats()["prefix_cache"]
    return pc["queries"], pc["hits"]


def reusable(num_tokens: int, page_size: int = 4) -> int:
    """Prompt tokens a request can take from cache: its full pages before the one holding its
    last token (that token is computed for its logits); the fake engine's pages hold 4."""
    return (num_tokens - 1) // page_size * page_size


def test_prefix_cache_metrics_count_a_repeated_prompt(srv):
    prompt = "a long prompt shared by two requests, for the prefix metrics"
    vq, vh = 'vllm:prefix_cache_queries_total{model_name="fake-model"}', \
        'vllm:prefix_cache_hits_total{model_name="fake-model"}'
    bq, bh = 'jaxserve:prefix_cache_queries_total{adapter=""}', \
        'jaxserve:prefix_cache_hits_total{adapter=""}'
    aq, ah = 'jaxserve:prefix_cache_queries_total{adapter="sql"}', \
        'jaxserve:prefix_cache_hits_total{adapter="sql"}'
    before = scrape(srv)
    _, first = completion(srv, prompt=prompt, max_tokens=3)
    _, second = completion(srv, prompt=prompt, max_tokens=3)
    assert second["choices"][0]["text"] == first["choices"][0]["text"] == expected_text(prompt, 3)
    n = first["usage"]["prompt_tokens"]
    after = scrape(srv)
    assert after[vq] - before[vq] == after[bq] - before.get(bq, 0) == 2 * n
    assert after[vh] - before[vh] == after[bh] - before.get(bh, 0) == reusable(n) > 0
    # the K/V of the same tokens under an adapter differ: its first request finds nothing
    completion(srv, prompt=prompt, max_tokens=3, model="sql")
    completion(srv, prompt=prompt, max_tokens=3, model="sql")
    last = scrape(srv)
    assert last[aq] - before.get(aq, 0) == 2 * n and last[ah] - before.get(ah, 0) == reusable(n)
    assert last[bq] == after[bq] and last[bh] == after[bh]
    assert last[vq] == sum(v for k, v in last.items()
                           if k.startswith("jaxserve:prefix_cache_queries_total{"))
    stats = srv.stats()
    pc = stats["prefix_cache"]
    assert (last[vq], last[vh]) == (pc["queries"], pc["hits"])
    assert pc["hit_rate"] == pytest.approx(pc["hits"] / pc["queries"])
    # the prompt's pages stay cached (unused, reusable) after the requests finish
    assert last['jaxserve:num_cached_pages{model_name="fake-model"}'] == \
        stats["num_cached_pages"] >= 2 * reusable(n) // 4


SALTED = [  # (path, body without the salt) for each endpoint that takes cache_salt
    ("/v1/completions", {"prompt": "salted completions prompt, long enough for pages",
                         "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a salted chat prompt"}],
                              "max_tokens": 2}),
    ("/generate", {"inputs": "a salted native prompt, long enough for a few pages",
                   "parameters": {"max_new_tokens": 2}}),
]


@pytest.mark.parametrize("path,body", SALTED, ids=[p for p, _ in SALTED])
def test_cache_salt_separates_cached_prefixes(srv, path, body):
    def hits_of(**salt) -> int:
        _, hits0 = prefix_counts(srv)
        status, b = http(srv.url, path, {**body, **salt})
        assert status == 200, b
        return prefix_counts(srv)[1] - hits0

    assert hits_of(cache_salt="tenant-a") == 0
    assert hits_of(cache_salt="tenant-b") == 0     # same prompt, other salt: nothing shared
    # No salt is a salt of its own. (An unsalted chat prompt may share its first page, the
    # template's "<use", with other tests' unsalted chats: compared with the full reuse.)
    unsalted = hits_of()
    full = hits_of()                               # the whole reusable prefix
    assert full > unsalted
    assert hits_of(cache_salt="tenant-a") == full  # same salt: the cached prefix is reused
    assert hits_of(cache_salt=None) == full        # null = no salt (as in vLLM)


@pytest.mark.parametrize("path,body", SALTED, ids=[p for p, _ in SALTED])
@pytest.mark.parametrize("salt", ["", 7, ["a"], {"s": "a"}, True])
def test_bad_cache_salt_is_a_400_naming_the_field(srv, path, body, salt):
    status, b = http(srv.url, path, {**body, "cache_salt": salt})
    assert status == 400, b
    assert set(b["error"]) == {"message", "type", "param", "code"}
    assert b["error"]["param"] == "cache_salt" and b["error"]["type"] == "invalid_request_error"
    assert "cache_salt" in b["error"]["message"]


# ------------------------------------------------------------------ malformed requests
BAD = [
    ("/v1/completions", b"{not json", 400),
    ("/v1/completions", b"[1, 2]", 400),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": NaN}', 400),
    ("/v1/completions", {}, 400),
    ("/v1/completions", {"prompt": 5}, 400),
    ("/v1/completions", {"prompt": ""}, 400),
    ("/v1/completions", {"prompt": []}, 400),
    ("/v1/completions", {"prompt": ["a", [98]]}, 400),
    ("/v1/completions", {"prompt": [1, -3]}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": "8"}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**30}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": 256}, 400),
    ("/v1/completions", {"prompt": "x" * 300}, 400),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400),
    ("/v1/completions", {"prompt": "x", "top_k": 1.5}, 400),
    ("/v1/completions", {"prompt": "x", "seed": -4}, 400),
    ("/v1/completions", {"prompt": "x", "stop": 7}, 400),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400),
    ("/v1/completions", {"prompt": "x", "n": 2, "best_of": 1}, 400),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, 400),
    ("/v1/completions", {"prompt": "x", "model": "no-such-model"}, 404),
    ("/v1/completions", {"prompt": "x", "model": 3}, 400),
    ("/v1/completions", {"prompt": "x", "user": ["u"]}, 400),
    ("/v1/chat/completions", {}, 400),
    ("/v1/chat/completions", {"messages": []}, 400),
    ("/v1/chat/completions", {"messages": "hi"}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 21,
                              "logprobs": True}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 300}]}, 400),
    ("/v1/load_lora_adapter", {"lora_name": "a"}, 400),
    ("/v1/load_lora_adapter", {"lora_path": "alpha"}, 400),
    ("/v1/load_lora_adapter", {"lora_name": "bad name!", "lora_path": "alpha"}, 400),
    ("/v1/unload_lora_adapter", {}, 400),
    ("/generate", {"parameters": {}}, 400),
    ("/generate", {"inputs": "x", "parameters": []}, 400),
    ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": -2}}, 400),
    ("/generate_stream", {"inputs": "x", "parameters": {"temperature": "x", "do_sample": True}}, 400),
    ("/generate", {"inputs": "x", "lora_dir": "/a\x00b"}, 400),
    ("/generate", {"inputs": "", "parameters": {"max_new_tokens": 2}}, 400),
    ("/v1/completions", {"prompt": "x", "stop": ["s"] * 17}, 400),
    ("/v1/completions", {"prompt": "x", "model": "fake-model:nope"}, 404),
]


@pytest.mark.parametrize("path,body,status", BAD, ids=[f"{i}:{b[0]}" for i, b in enumerate(BAD)])
def test_malformed_requests_get_openai_errors(srv, path, body, status):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    st, b = http(srv.url, path, raw=raw)
    assert st == status, b
    assert set(b["error"]) == {"message", "type", "param", "code"} and b["error"]["message"]


def test_wrong_method_unknown_route_and_oversized_body(srv):
    assert http(srv.url, "/v1/completions", method="GET")[0] == 405
    st, b = http(srv.url, "/v1/nothing", {})
    assert st == 404 and "error" in b
    st, b = http(srv.url, "/v1/completions", raw=b'{"prompt": "' + b"x" * (2 << 20) + b'"}')
    assert st == 413 and "error" in b


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=20),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=12)
FIELDS = st.sampled_from(["prompt", "messages", "max_tokens", "temperature", "top_p", "top_k",
                          "seed", "stop", "n", "stream", "stream_options", "logprobs", "model",
                          "user", "inputs", "parameters", "lora_dir", "echo", "top_logprobs",
                          "max_completion_tokens", "logit_bias", "ignore_eos", "cache_salt"])
BODIES = st.dictionaries(FIELDS, JSON, max_size=6) | JSON


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/generate",
                             "/generate_stream", "/v1/load_lora_adapter"]), body=BODIES)
def test_fuzz_no_5xx(srv, path, body):
    st_, b = http(srv.url, path, body)
    assert st_ < 500, (path, body, b)
