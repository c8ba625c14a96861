"""Several outputs per request: `n` samples sharing the prompt's pages, `best_of`, prompt lists.

The scheduler's fork (scheduler/scheduler.py, "Samples") is checked on the engine over the fake
runner (pool usage, the wait for the parent's pages, fallbacks) and over a tiny random Llama
(a forked sample samples exactly what it samples alone: the shared pages hold the right K/V);
the HTTP side (server/choices.py) over the fake engine (shapes, indices, aborts, fairness) and
the tiny model (seeds, best_of's ranking).
"""
from __future__ import annotations

import asyncio
import json

import aiohttp
import numpy as np
import pytest

from fake_runner import LOGPROB, Spy, expected_text, fake_engine
from jaxserve.sampling_params import SamplingParams
from server_harness import ServerThread, parse_sse
from test_server_fake import http


def run_to_end(eng, ids) -> tuple[dict, int]:
    """Step until every request in ids finished: (request id -> final output, the most pool
    pages held at once)."""
    final, peak = {}, 0
    while any(r not in final for r in ids):
        for out in eng.step():
            if out.finished:
                final[out.request_id] = out
        peak = max(peak, eng.scheduler.allocator.num_used)
    return final, peak


# ------------------------------------------------------------------ the fork, on the fake runner
@pytest.mark.parametrize("overlap", [False, True])
def test_n_samples_share_the_prompt_pages(overlap):
    page = 4
    eng = fake_engine(page_size=page, scheduler="fcfs", overlap=overlap)
    prompt = "abcdefghijklmnopqr"            # 18 tokens: 4 full pages and 2 tokens
    p = SamplingParams(max_tokens=4)
    eng.add_request("s0", prompt, p)
    for i in range(1, 4):
        eng.add_request(f"s{i}", prompt, p, fork_of="s0")
    final, peak = run_to_end(eng, [f"s{i}" for i in range(4)])
    assert all(final[f"s{i}"].text == expected_text(prompt, 4) for i in range(4))
    # the parent: 22 tokens in 6 pages; each other sample: the page with prompt tokens 16, 17
    # and its own outputs (16 .. 21: 2 pages), the 4 full prompt pages shared
    full = len(prompt) // page
    assert peak <= 6 + 3 * 2 < 4 * 6
    assert eng.stats()["forked_prompt_tokens"] == 3 * full * page
    eng.scheduler.allocator.check()
    assert eng.scheduler.allocator.num_used == 0


def test_a_sample_waits_for_its_parents_chunked_prompt():
    # the parent's prompt takes three prefill chunks; its samples are admitted once the parent
    # has planned all its full pages (in an earlier step), and never compute those pages
    from fake_runner import FAKE_MODEL, FakeRunner, char_tokenizer
    from jaxserve.engine import EngineConfig, LLMEngine
    eng = LLMEngine(EngineConfig(page_size=4, num_pages=128, max_model_len=64,
                                 max_prefill_tokens=8), runner=FakeRunner(),
                    tokenizer=char_tokenizer(), model_config=FAKE_MODEL)
    prompt = "abcdefghijklmnopqrstu"         # 21 tokens
    p = SamplingParams(max_tokens=3)
    eng.add_request("s0", prompt, p)
    eng.add_request("s1", prompt, p, fork_of="s0")
    computed: dict[int, int] = {}
    plans = []
    real = eng.scheduler.schedule

    def spy(now=0.0):
        plan = real(now)
        plans.append([(s.seq_id, n) for s, n in zip(plan.seqs, plan.num_new_tokens)])
        for s, n in zip(plan.seqs, plan.num_new_tokens):
            computed[s.seq_id] = computed.get(s.seq_id, 0) + n
        return plan
    eng.scheduler.schedule = spy
    final, _ = run_to_end(eng, ["s0", "s1"])
    assert final["s1"].text == final["s0"].text == expected_text(prompt, 3)
    parent, child = sorted(computed)
    # the child computed the last prompt page (tokens 20 .. 20) and its decodes only
    assert computed[child] == len(prompt) - 20 + 2
    first_child_step = next(i for i, pl in enumerate(plans) if any(s == child for s, _ in pl))
    assert sum(n for pl in plans[:first_child_step] for s, n in pl if s == parent) >= 20


def test_a_sample_whose_parent_is_gone_runs_alone():
    eng = fake_engine(page_size=4, scheduler="fcfs", enable_prefix_caching=False)
    prompt = "abcdefghij"
    eng.add_request("s0", prompt, SamplingParams(max_tokens=1))
    final, _ = run_to_end(eng, ["s0"])
    eng.add_request("s1", prompt, SamplingParams(max_tokens=2), fork_of="s0")  # s0 finished
    eng.add_request("s2", prompt, SamplingParams(max_tokens=2), fork_of="s1")
    eng.abort("s1")                                                            # s1 aborted
    final, _ = run_to_end(eng, ["s2"])
    assert final["s2"].text == expected_text(prompt, 2)
    assert eng.stats()["forked_prompt_tokens"] == 0
    eng.scheduler.allocator.check()


def test_fork_of_another_prompt_is_refused():
    from jaxserve.admission import AdmissionError
    eng = fake_engine(page_size=4)
    eng.add_request("s0", "abcdefgh", SamplingParams(max_tokens=2))
    with pytest.raises(AdmissionError, match="not a sample"):
        eng.add_request("s1", "abcdefgX", SamplingParams(max_tokens=2), fork_of="s0")


# ------------------------------------------------------------------ the HTTP side, fake engine
@pytest.fixture(scope="module")
def srv():
    eng = fake_engine(max_num_seqs=8, num_pages=512, max_model_len=256, scheduler="vtc")
    with ServerThread(eng) as s:
        s.engine = eng
        yield s


def completion(srv, **kw):
    status, body = http(srv.url, "/v1/completions", kw)
    assert status == 200, body
    return body


def test_n_choices_and_usage(srv):
    before = srv.stats()["forked_prompt_tokens"]
    body = completion(srv, prompt="abcdefghij", max_tokens=3, n=4, logprobs=0)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["text"] == expected_text("abcdefghij", 3) for c in body["choices"])
    assert all(c["logprobs"]["token_logprobs"] == [LOGPROB] * 3 for c in body["choices"])
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 12, "total_tokens": 22}
    # page size 4: each other sample took the prompt's 2 full pages
    assert srv.stats()["forked_prompt_tokens"] - before == 3 * 8


def test_prompt_lists_give_a_choice_per_prompt_and_sample(srv):
    prompts = ["ab", "xyz", "hello"]
    body = completion(srv, prompt=prompts, max_tokens=2, n=2)
    assert [c["index"] for c in body["choices"]] == list(range(6))
    for c in body["choices"]:
        assert c["text"] == expected_text(prompts[c["index"] // 2], 2)
    assert body["usage"]["prompt_tokens"] == 2 + 3 + 5
    ids = [[ord(ch) for ch in p] for p in prompts]
    body2 = completion(srv, prompt=ids, max_tokens=2, n=2)
    assert [c["text"] for c in body2["choices"]] == [c["text"] for c in body["choices"]]
    # echo: each choice starts with its own prompt
    body3 = completion(srv, prompt=ids, max_tokens=2, echo=True)
    assert [c["text"] for c in body3["choices"]] == [p + expected_text(p, 2) for p in prompts]


def test_streamed_choices_interleave_by_index(srv):
    prompts = ["ab", "cd"]
    status, text = http(srv.url, "/v1/completions", {
        "prompt": prompts, "max_tokens": 3, "n": 2, "stream": True,
        "stream_options": {"include_usage": True}})
    events = parse_sse(text)
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    order = [e["choices"][0]["index"] for e in chunks]
    assert sorted(set(order)) == [0, 1, 2, 3]
    assert order[:4] != [0, 0, 0, 1]         # not one choice after the other
    texts = {i: "".join(e["choices"][0]["text"] for e in chunks if e["choices"][0]["index"] == i)
             for i in range(4)}
    assert texts == {i: expected_text(prompts[i // 2], 3) for i in range(4)}
    finished = [e["choices"][0]["index"] for e in chunks if e["choices"][0]["finish_reason"]]
    assert sorted(finished) == [0, 1, 2, 3]
    usage = events[-2]["usage"]
    assert usage == {"prompt_tokens": 4, "completion_tokens": 12, "total_tokens": 16}


def test_chat_n_choices(srv):
    msgs = [{"role": "user", "content": "hi"}]
    status, body = http(srv.url, "/v1/chat/completions",
                        {"messages": msgs, "max_tokens": 3, "n": 3})
    assert status == 200
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert len({c["message"]["content"] for c in body["choices"]}) == 1
    assert body["usage"]["completion_tokens"] == 9
    status, text = http(srv.url, "/v1/chat/completions",
                        {"messages": msgs, "max_tokens": 2, "n": 2, "stream": True})
    events = parse_sse(text)[:-1]
    roles = [e["choices"][0]["index"] for e in events if "role" in e["choices"][0]["delta"]]
    assert roles == [0, 1]


@pytest.mark.parametrize("body, param", [
    ({"n": 2, "best_of": 1}, "best_of"),
    ({"n": 1, "best_of": 2, "stream": True}, "best_of"),
    ({"n": 0}, "n"),
    ({"n": 300}, "n"),
    ({"prompt": ["a"] * 20, "n": 20}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["a", [1, 2]]}, "prompt"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"suffix": "x"}, "suffix"),
])
def test_refusals(srv, body, param):
    status, out = http(srv.url, "/v1/completions", {"prompt": "abc", "max_tokens": 2, **body})
    assert status == 400 and out["error"]["param"] == param, out


def test_a_refused_sample_refuses_the_request_and_aborts_the_others(srv):
    # the third prompt's ids are out of the vocabulary: admission refuses it after the first
    # two were admitted; they are aborted (no page stays held)
    status, out = http(srv.url, "/v1/completions",
                       {"prompt": [[97, 98], [99], [0x110000 + 5]], "max_tokens": 50})
    assert status == 400 and out["error"]["param"] == "prompt"
    for _ in range(300):
        stats = srv.stats()
        if stats["num_running"] == 0 and stats["num_waiting"] == 0:
            break
        srv.on_loop(asyncio.sleep(0.01))
    assert stats["num_free_pages"] == stats["num_total_pages"]


def test_disconnect_aborts_every_sample():
    eng = fake_engine(max_num_seqs=8)
    spy = Spy(eng, "abort")
    eng.runner.gate.limit(4)   # the samples cannot finish before the server sees the hang-up
    with ServerThread(eng) as s:
        async def main():
            async with aiohttp.ClientSession() as sess:
                r = await sess.post(s.url + "/v1/completions", json={
                    "prompt": ["abc", "defg"], "n": 3, "max_tokens": 200, "stream": True})
                n = 0
                async for _ in r.content:
                    n += 1
                    if n >= 4:
                        break
                r.close()
        asyncio.run(main())
        for _ in range(3000):
            if s.async_engine.num_in_flight == 0:
                break
            s.on_loop(asyncio.sleep(0.01))
        eng.runner.gate.open()
        stats = s.stats()
    assert spy.calls["abort"] == 6
    assert stats["num_free_pages"] == stats["num_total_pages"] and stats["num_running"] == 0


def test_fairness_charges_every_sample(srv):
    user = "tenant-n"
    status, body = http(srv.url, "/v1/completions",   # a prompt no other test sends
                        {"prompt": "ABCDEFGHIJKL", "max_tokens": 5, "n": 3, "user": user})
    assert status == 200
    client = srv.stats()["scheduler"]["clients"][user]
    assert client["output_tokens"] == 15
    assert client["input_tokens"] == 3 * 12
    # the two other samples' shared prompt pages (2 pages of 4 tokens each), at the cached
    # weight
    assert client["cached_tokens"] == 2 * 8


# ------------------------------------------------------------------ a tiny random Llama
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from jaxserve.engine import EngineConfig, LLMEngine
    from lora_helpers import make_base
    path = tmp_path_factory.mktemp("tiny")
    make_base(path)
    return LLMEngine(EngineConfig(model=str(path), dtype="float32", max_num_seqs=8,
                                  max_model_len=128, num_pages=96, max_prefill_tokens=64,
                                  page_size=8, enable_prefix_caching=False))


def test_forked_samples_sample_what_they_sample_alone(tiny):
    rng = np.random.default_rng(1)
    prompt = rng.integers(3, 256, size=29).tolist()
    params = [SamplingParams(max_tokens=6, temperature=1.0, seed=100 + i) for i in range(4)]
    alone = [tiny.generate([prompt], p)[0].token_ids for p in params]
    assert len({tuple(t) for t in alone}) > 1
    tiny.add_request("t0", prompt, params[0])
    for i in range(1, 4):
        tiny.add_request(f"t{i}", prompt, params[i], fork_of="t0")
    final, peak = run_to_end(tiny, [f"t{i}" for i in range(4)])
    assert [final[f"t{i}"].token_ids for i in range(4)] == alone
    # 35 tokens in 5 pages for the parent; the others share 3 prompt pages and hold 2 each
    assert peak == 5 + 3 * 2


@pytest.fixture(scope="module")
def tiny_srv(tiny):
    with ServerThread(tiny) as s:
        yield s


def test_seeds_make_each_choice_reproducible(tiny_srv):
    body = {"prompt": "w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 w16 w17 w18 w19 w20 w21",
            "max_tokens": 5, "temperature": 1.0}
    a = http(tiny_srv.url, "/v1/completions", {**body, "n": 3, "seed": 7})[1]
    b = http(tiny_srv.url, "/v1/completions", {**body, "n": 3, "seed": 7})[1]
    texts = [c["text"] for c in a["choices"]]
    assert texts == [c["text"] for c in b["choices"]] and len(set(texts)) > 1
    # choice j is the request with seed 7 + j
    for j in range(3):
        alone = http(tiny_srv.url, "/v1/completions", {**body, "seed": 7 + j})[1]
        assert alone["choices"][0]["text"] == texts[j]


def test_best_of_returns_the_highest_cumulative_logprob(tiny_srv):
    body = {"prompt": "w40 w41 w42 w43 w44", "max_tokens": 6, "temperature": 1.5, "seed": 3}
    every = http(tiny_srv.url, "/v1/completions", {**body, "n": 5, "logprobs": 0})[1]
    score = {c["text"]: sum(c["logprobs"]["token_logprobs"]) for c in every["choices"]}
    assert len(score) == 5
    best = http(tiny_srv.url, "/v1/completions", {**body, "n": 2, "best_of": 5})[1]
    assert [c["index"] for c in best["choices"]] == [0, 1]
    assert all(c["logprobs"] is None for c in best["choices"])   # not asked for
    want = sorted(score, key=score.get, reverse=True)[:2]
    assert [c["text"] for c in best["choices"]] == want
    assert best["usage"]["completion_tokens"] == 12
