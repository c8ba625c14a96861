"""Scoring: prompt logprobs computed on device (jaxserve/scoring.py), and on /v1/completions
`echo`, vLLM's `prompt_logprobs`, `logprobs=N` alternatives and `max_tokens=0`, each checked
against HF transformers' log-softmax on the same tiny random Llama; then lm-evaluation-harness's
`local-completions` model running a local JSONL loglikelihood task (tests/data/lmeval) against
the server, batched (prompt lists), giving the loglikelihoods HF computes.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from jaxserve.engine import EngineConfig, LLMEngine
from jaxserve.sampling_params import SamplingParams
from lora_helpers import make_base
from server_harness import ServerThread, parse_sse
from test_server_fake import http

ATOL = 2e-4       # float32 engine vs float32 torch
DATA = os.path.join(os.path.dirname(__file__), "data", "lmeval")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    model = make_base(path)
    return model, str(path)


def engine_for(path, **kw) -> LLMEngine:
    # max_prefill_tokens 32: a 40-token prompt is scored over two chunks
    cfg = dict(model=path, dtype="float32", max_num_seqs=8, max_model_len=128, num_pages=96,
               max_prefill_tokens=32, page_size=8)
    return LLMEngine(EngineConfig(**{**cfg, **kw}))


@pytest.fixture(scope="module")
def engine(hf):
    return engine_for(hf[1])


def hf_logprobs(model, ids) -> torch.Tensor:
    """[len(ids), V]: log p(next token | ids[:t+1]) at each position t."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)


def check_prompt_logprobs(model, ids, got, num_top: int) -> None:
    """RequestOutput.prompt_logprobs `got` against HF: each token's logprob and rank, the top
    num_top ids and logprobs."""
    lp = hf_logprobs(model, ids)
    assert got[0] is None and len(got) == len(ids)
    for t in range(1, len(ids)):
        value, rank, top = got[t]
        row = lp[t - 1]
        assert value == pytest.approx(row[ids[t]].item(), abs=ATOL)
        assert rank == int((row > row[ids[t]]).sum()) + 1
        want = torch.topk(row, num_top)
        assert [i for i, _ in top] == want.indices.tolist()
        np.testing.assert_allclose([x for _, x in top], want.values.numpy(), atol=ATOL)


def prompts(seed: int, lengths) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 256, size=n).tolist() for n in lengths]


# ------------------------------------------------------------------ the engine
@pytest.mark.parametrize("backend", ["auto", "xla-scan"])
def test_prompt_logprobs_match_hf(hf, engine, backend):
    model, path = hf
    eng = engine if backend == "auto" else engine_for(path, backend="xla", layer_loop="scan")
    ps = prompts(0, (40, 9, 17, 2))
    params = [SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3),
              SamplingParams(max_tokens=2, temperature=0),        # beside them, unscored
              SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0),
              SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=5)]
    outs = eng.generate(ps, params)
    check_prompt_logprobs(model, ps[0], outs[0].prompt_logprobs, 3)
    assert outs[1].prompt_logprobs is None
    check_prompt_logprobs(model, ps[2], outs[2].prompt_logprobs, 0)
    check_prompt_logprobs(model, ps[3], outs[3].prompt_logprobs, 5)
    # scoring changes no token: each request generates what it generates alone, unscored
    alone = eng.generate(ps, SamplingParams(max_tokens=2, temperature=0))
    assert [o.token_ids for o in outs[:2]] == [o.token_ids for o in alone[:2]]


def test_a_cached_prompt_is_still_scored_whole(hf, engine):
    model, _ = hf
    (p,) = prompts(1, (30,))
    engine.generate([p], SamplingParams(max_tokens=1))          # its pages are now cached
    hits = engine.stats()["prefix_cache"]["hits"]
    out = engine.generate([p], SamplingParams(max_tokens=1, prompt_logprobs=1))[0]
    check_prompt_logprobs(model, p, out.prompt_logprobs, 1)
    assert engine.stats()["prefix_cache"]["hits"] == hits        # it took none of them
    # without prompt logprobs the cache serves it as before
    engine.generate([p], SamplingParams(max_tokens=1))
    assert engine.stats()["prefix_cache"]["hits"] > hits


# ------------------------------------------------------------------ /v1/completions
@pytest.fixture(scope="module")
def srv(engine):
    with ServerThread(engine) as s:
        yield s


def completion(srv, **body) -> dict:
    status, out = http(srv.url, "/v1/completions", body)
    assert status == 200, out
    return out


def test_echo_with_max_tokens_zero_scores_the_prompt(hf, srv):
    model, _ = hf
    (ids,) = prompts(2, (12,))
    body = completion(srv, prompt=ids, max_tokens=0, echo=True, logprobs=2)
    (choice,) = body["choices"]
    lp = hf_logprobs(model, ids)
    text = srv.async_engine.tokenizer.decode(ids)
    assert choice["text"] == text
    got = choice["logprobs"]
    assert got["tokens"] == text.split() and got["text_offset"][0] == 0
    assert got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
    for t in range(1, len(ids)):
        want = lp[t - 1]
        assert got["token_logprobs"][t] == pytest.approx(want[ids[t]].item(), abs=ATOL)
        top2 = [f"w{i}" for i in torch.topk(want, 2).indices.tolist()]
        # the token itself and the 2 most likely (2 or 3 entries), as vLLM
        assert set(got["top_logprobs"][t]) == {f"w{ids[t]}", *top2}
    assert body["usage"] == {"prompt_tokens": 12, "completion_tokens": 0, "total_tokens": 12}


def test_echo_then_generation_and_vllm_prompt_logprobs(hf, srv):
    model, _ = hf
    prompt = "w40 w41 w42 w43 w44 w45 w46"
    ids = [int(w[1:]) for w in prompt.split()]
    body = completion(srv, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=1,
                      prompt_logprobs=2)
    (choice,) = body["choices"]
    assert choice["text"].startswith(prompt) and len(choice["text"].split()) == 10
    whole = ids + [int(w[1:]) for w in choice["text"].split()[7:]]
    lp = hf_logprobs(model, whole)
    got = choice["logprobs"]["token_logprobs"]
    assert got[0] is None and len(got) == 10
    np.testing.assert_allclose(got[1:], [lp[t - 1, whole[t]].item() for t in range(1, 10)],
                               atol=ATOL)
    # greedy: each generated token is the most likely one
    assert whole[7:] == [int(lp[t - 1].argmax()) for t in range(7, 10)]
    pl = choice["prompt_logprobs"]
    assert pl[0] is None and len(pl) == 7
    for t in range(1, 7):
        row = lp[t - 1]
        entry = pl[t][str(ids[t])]
        assert entry["logprob"] == pytest.approx(row[ids[t]].item(), abs=ATOL)
        assert entry["rank"] == int((row > row[ids[t]]).sum()) + 1
        assert entry["decoded_token"] == f"w{ids[t]}"
        assert {str(i) for i in torch.topk(row, 2).indices.tolist()} <= set(pl[t])


def test_streamed_echo_and_n(hf, srv):
    prompt = "w60 w61 w62 w63 w64"
    status, text = http(srv.url, "/v1/completions", {
        "prompt": [prompt, "w7 w8"], "max_tokens": 2, "echo": True, "logprobs": 0, "n": 2,
        "stream": True})
    events = parse_sse(text)[:-1]
    by_index: dict[int, list] = {}
    for e in events:
        by_index.setdefault(e["choices"][0]["index"], []).append(e["choices"][0])
    assert sorted(by_index) == [0, 1, 2, 3]
    for i, chunks in by_index.items():
        p = prompt if i < 2 else "w7 w8"
        assert "".join(c["text"] for c in chunks).startswith(p)
        lps = [x for c in chunks for x in c["logprobs"]["token_logprobs"]]
        assert lps[0] is None and len(lps) == len(p.split()) + 2
    # the echoed prompts' logprobs are the same for the two samples of a prompt
    first = {i: by_index[i][0]["logprobs"]["token_logprobs"][:5] for i in (0, 1)}
    assert first[0] == first[1]


def test_max_tokens_zero_needs_echo(srv):
    status, out = http(srv.url, "/v1/completions", {"prompt": "w3 w4", "max_tokens": 0})
    assert status == 400 and out["error"]["param"] == "max_tokens"


# ------------------------------------------------------------------ lm-evaluation-harness
def test_lm_eval_loglikelihood_matches_hf(hf, srv, tmp_path):
    """lm_eval --model local-completions on tests/data/lmeval (batch_size 3: prompt lists)."""
    pytest.importorskip("lm_eval")
    model, path = hf
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "datasets"), TOKENIZERS_PARALLELISM="false")
    args = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
            f"model={srv.async_engine.model_name},base_url={srv.url}/v1/completions,"
            f"tokenizer={path},tokenizer_backend=huggingface,max_length=128,max_retries=1",
            "--tasks", "jaxserve_tiny_loglikelihood", "--include_path", ".",
            "--batch_size", "3", "--output_path", str(tmp_path / "out"), "--log_samples"]
    run = subprocess.run(args, cwd=DATA, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    (samples,) = glob.glob(str(tmp_path / "out" / "**" / "samples_*.jsonl"), recursive=True)
    docs = [json.loads(line) for line in open(samples)]
    with open(os.path.join(DATA, "tiny_loglikelihood.jsonl")) as f:
        assert len(docs) == sum(1 for _ in f)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    num_greedy = 0
    for d in docs:   # the token ids lm-eval sends (its _encode_pair)
        context, continuation = d["doc"]["context"], d["doc"]["continuation"]
        ctx = tok(context, add_special_tokens=False).input_ids
        cont = tok(context + " " + continuation, add_special_tokens=False).input_ids[len(ctx):]
        lp = hf_logprobs(model, ctx + cont)
        want = sum(lp[len(ctx) + k - 1, t].item() for k, t in enumerate(cont))
        greedy = all(int(lp[len(ctx) + k - 1].argmax()) == t for k, t in enumerate(cont))
        got, is_greedy = d["resps"][0][0]
        assert float(got) == pytest.approx(want, abs=1e-3), d["doc"]
        assert (is_greedy in (True, "True")) == greedy, d["doc"]
        num_greedy += greedy
    assert num_greedy >= 1     # the task holds continuations the model predicts
