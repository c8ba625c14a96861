"""The server over the REAL default model (SmolLM2-135M), on a loopback port.

One small engine for the whole module (tests/server_harness.py): short prompts and 8-token
outputs keep the number of compiled shapes, and so the run time, small.
"""
from __future__ import annotations

import asyncio
import json
import random
import time

import aiohttp
import openai
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from jaxserve.sampling_params import SamplingParams
from server_harness import ServerThread, parse_sse, shared_real_engine
from test_server_fake import http

pytestmark = pytest.mark.slow   # the real default model behind the server

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def srv():
    engine = shared_real_engine()
    with ServerThread(engine) as s:
        s.engine = engine
        s.model = engine.model_name
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="test-key", max_retries=0, timeout=None)


def engine_generate(srv, prompt, params: SamplingParams):
    """`jaxserve generate`'s path (LLMEngine.generate), run on the engine thread while idle."""
    return srv.on_loop(srv.async_engine.call(lambda e: e.generate([prompt], params)[0]))


def test_completion_stream_equals_non_stream_equals_generate(srv, client):
    kw = dict(model=srv.model, prompt=PROMPT, max_tokens=8, temperature=0)
    full = client.completions.create(**kw)
    streamed = list(client.completions.create(**kw, stream=True))
    text = "".join(c.choices[0].text for c in streamed)
    ref = engine_generate(srv, PROMPT, SamplingParams(max_tokens=8, temperature=0.0))
    assert full.choices[0].text == text == ref.text
    assert text.strip()
    assert full.usage.completion_tokens == len(ref.token_ids)
    assert full.usage.prompt_tokens == ref.num_prompt_tokens
    assert streamed[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_chat_stream_equals_non_stream_equals_generate(srv, client):
    msgs = [{"role": "user", "content": "Name a color."}]
    kw = dict(model=srv.model, messages=msgs, max_tokens=8, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens
    ids = srv.on_loop(srv.async_engine.call(lambda e: e.tokenizer.chat(msgs)))
    ref = engine_generate(srv, ids, SamplingParams(max_tokens=8, temperature=0.0))
    assert full.choices[0].message.content == text == ref.text and text.strip()


def test_seeded_sampling_is_reproducible_over_http(srv, client):
    kw = dict(model=srv.model, prompt=PROMPT, max_tokens=6, temperature=1.0, top_p=0.9, seed=7)
    a = client.completions.create(**kw).choices[0].text
    b = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    assert a == b


def test_logprobs_and_stop_with_real_model(srv, client):
    r = client.completions.create(model=srv.model, prompt=PROMPT, max_tokens=5, temperature=0,
                                  logprobs=0)
    lps = r.choices[0].logprobs.token_logprobs
    assert len(lps) == r.usage.completion_tokens and all(lp <= 0 for lp in lps)
    full = r.choices[0].text
    stop = full.strip()[:2]
    r2 = client.completions.create(model=srv.model, prompt=PROMPT, max_tokens=5, temperature=0,
                                   stop=[stop])
    assert r2.choices[0].finish_reason == "stop" and stop not in r2.choices[0].text
    assert full.startswith(r2.choices[0].text)


def test_models_and_unknown_adapter(srv, client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == srv.model
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=f"{srv.model}:nope", prompt="x", max_tokens=2)


def test_runtime_adapter_loading_needs_lora_root(srv):
    st_, body = http(srv.url, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "x"})
    assert st_ == 403 and body["error"]["code"] == "lora_root_not_set"


def test_real_bad_inputs(srv, client):
    long_prompt = "hello " * 600
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=srv.model, prompt=long_prompt, max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=srv.model, prompt=PROMPT, max_tokens=10**6)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=srv.model, messages=[{"role": "user", "content": long_prompt}])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=srv.model, prompt=[10**9], max_tokens=2)
    st_, body = http(srv.url, "/v1/completions", raw=b'{"prompt": ')
    assert st_ == 400 and "JSON" in body["error"]["message"]


def test_load_64_streams_with_disconnects(srv):
    """64 concurrent streaming clients, a quarter hang up mid-stream; /health polled meanwhile."""
    rng = random.Random(0)
    prompts = ["Once upon a time", "The best fruit is", "Water boils at", "My favourite city"]
    num_clients, dropped_every = 64, 4
    health: list[int] = []

    async def one(sess, i):
        body = {"model": srv.model, "prompt": prompts[i % 4], "max_tokens": rng.randint(4, 8),
                "temperature": 0 if i % 2 else 0.8, "seed": i, "stream": True,
                "stream_options": {"include_usage": True}}
        async with sess.post(srv.url + "/v1/completions", json=body) as r:
            assert r.status == 200, await r.text()
            if i % dropped_every == 0:
                got = 0
                async for line in r.content:
                    got += line.startswith(b"data:")
                    if got >= 2:
                        break
                r.close()
                return i, None
            return i, await r.read()

    async def poll_health(sess, stop: asyncio.Event):
        while not stop.is_set():
            async with sess.get(srv.url + "/health") as r:
                health.append(r.status)
            await asyncio.sleep(0.1)

    async def main():
        stop = asyncio.Event()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as sess:
            poller = asyncio.create_task(poll_health(sess, stop))
            t0 = time.perf_counter()
            results = await asyncio.gather(*(one(sess, i) for i in range(num_clients)))
            elapsed = time.perf_counter() - t0
            stop.set()
            await poller
        return results, elapsed

    results, elapsed = asyncio.run(main())
    completed = 0
    for i, raw in results:
        if raw is None:
            continue
        events = parse_sse(raw)
        assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
        chunks, usage = events[:-2], events[-2]
        assert len({c["id"] for c in chunks}) == 1
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
        assert 1 <= usage["usage"]["completion_tokens"] <= 8
        completed += 1
    assert completed == num_clients - num_clients // dropped_every   # no request lost
    assert health and set(health) == {200}
    # Aborts are asynchronous; a dropped request the server has not noticed yet still ends by
    # itself within its max_tokens, so this loop ends after bounded engine work.
    while True:
        stats = srv.stats()
        if stats["num_free_pages"] == stats["num_total_pages"]:
            break
        time.sleep(0.1)
    assert stats["num_free_pages"] == stats["num_total_pages"], stats
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert srv.async_engine.num_in_flight == 0 and srv.async_engine.num_waiting == 0
    print(f"\nload: {num_clients} clients in {elapsed:.1f}s, {len(health)} health checks")


def test_metrics_after_load(srv):
    status, text = http(srv.url, "/metrics")
    assert status == 200
    samples = {l.split("{")[0]: float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
               if l and not l.startswith("#") and "_bucket" not in l}
    assert samples["vllm:num_requests_running"] == 0
    assert samples["vllm:kv_cache_usage_perc"] == 0
    assert samples["vllm:generation_tokens_total"] > 100
    assert samples["vllm:time_to_first_token_seconds_count"] > 50
    assert samples["jaxserve:token_delivery_seconds_count"] > 100
    assert samples["jaxserve:step_programs_compiled_total"] >= 2   # a prefill and a decode


TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=0, max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(["completion", "chat", "native"]), text=TEXT,
       role=st.sampled_from(["user", "system", "assistant", "tool", "bogus"]),
       extra=st.dictionaries(st.sampled_from(["stop", "seed", "top_k", "logprobs", "user"]),
                             st.none() | st.integers(-3, 5) | TEXT, max_size=2))
def test_fuzz_real_tokenizer_and_template_no_5xx(srv, kind, text, role, extra):
    if kind == "completion":
        path, body = "/v1/completions", {"prompt": text, "max_tokens": 1, **extra}
    elif kind == "chat":
        path, body = "/v1/chat/completions", {"messages": [{"role": role, "content": text}],
                                              "max_tokens": 1, **extra}
    else:
        path, body = "/generate", {"inputs": text, "parameters": {"max_new_tokens": 1, **extra}}
    st_, b = http(srv.url, path, body)
    assert st_ < 500, (body, b)


def _write_peft_adapter(path, cfg, rank=8, seed=0):
    """A PEFT-format LoRA adapter (q_proj, v_proj) for the default model, written directly in
    PEFT's file layout (adapter_config.json + adapter_model.safetensors)."""
    import numpy as np
    from safetensors.numpy import save_file
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    tensors = {}
    for i in range(cfg.num_layers):
        for mod, out in (("q_proj", cfg.q_size), ("v_proj", cfg.kv_size)):
            key = f"base_model.model.model.layers.{i}.self_attn.{mod}"
            tensors[f"{key}.lora_A.weight"] = (rng.normal(size=(rank, cfg.hidden_size)) / 24).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (rng.normal(size=(out, rank)) * 0.5).astype(np.float32)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"],
        "bias": "none", "task_type": "CAUSAL_LM"}))


def test_adapter_selected_by_model_name(srv, client, tmp_path):
    path = tmp_path / "sql"
    _write_peft_adapter(path, srv.engine.model_config)
    from server.context import CTX_KEY
    from server.lora import load_adapter
    # What --lora-modules does at start-up (the HTTP load endpoint needs --lora-root, tested
    # with the fake engine).
    srv.on_loop(load_adapter(srv.app[CTX_KEY], "sql", str(path)))
    try:
        listed = {m.id: m for m in client.models.list().data}
        assert "sql" in listed and listed["sql"].parent == srv.model
        kw = dict(prompt=PROMPT, max_tokens=8, temperature=0)
        base = client.completions.create(model=srv.model, **kw).choices[0].text
        by_name = client.completions.create(model="sql", **kw).choices[0].text
        by_pair = client.completions.create(model=f"{srv.model}:sql", **kw).choices[0].text
        streamed = "".join(c.choices[0].text for c in client.completions.create(model="sql", stream=True, **kw))
        ref = srv.on_loop(srv.async_engine.call(
            lambda e: e.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0), adapter="sql")[0]))
        assert by_name == by_pair == streamed == ref.text
        assert by_name != base      # the adapter really changes the output
    finally:
        st_, body = http(srv.url, "/v1/unload_lora_adapter", {"lora_name": "sql"})
        assert st_ == 200, body
    assert "sql" not in {m.id for m in client.models.list().data}
    stats = srv.stats()
    assert stats["num_free_pages"] == stats["num_total_pages"]
