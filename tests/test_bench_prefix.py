"""scripts/bench_prefix.py's pure parts: the workload builders (on a word-level stand-in
tokenizer), the /metrics parser and the report. No server is started."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
bench_prefix = pytest.importorskip("bench_prefix")


class WordTokenizer:
    """One id per whitespace-separated word (ids handed out as words are first seen)."""

    def __init__(self):
        self.ids: dict[str, int] = {}
        self.words: list[str] = []

    def __call__(self, text, add_special_tokens=False):
        out = []
        for w in text.split():
            if w not in self.ids:
                self.ids[w] = len(self.words)
                self.words.append(w)
            out.append(self.ids[w])
        return {"input_ids": out}

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids)


def n_tokens(tok, text):
    return len(tok(text)["input_ids"])


def test_multiturn_conversations():
    tok = WordTokenizer()
    convs = bench_prefix.build_multiturn(tok, tenants=3, convs_per_tenant=2, turns=3,
                                         system_len=(40, 50), user_len=(5, 8), seed=0)
    assert len(convs) == 6
    # tenant round-robin: every tenant's first conversation before any second one
    assert [c["tenant"] for c in convs] == ["tenant0", "tenant1", "tenant2"] * 2
    systems = {c["tenant"]: c["system"] for c in convs[:3]}
    assert len(set(systems.values())) == 3                       # one system prompt per tenant
    for c in convs:
        assert c["system"] == systems[c["tenant"]]               # shared by its conversations
        assert 40 <= n_tokens(tok, c["system"]) <= 50
        assert len(c["users"]) == 3
        assert all(5 <= n_tokens(tok, u) <= 8 for u in c["users"])
    users = [u for c in convs for u in c["users"]]
    assert len(set(users)) == len(users)

    again = bench_prefix.build_multiturn(tok, 3, 2, 3, (40, 50), (5, 8), seed=0)
    assert again == convs                                        # seeded
    warm = bench_prefix.build_multiturn(tok, 3, 2, 3, (40, 50), (5, 8), seed="warmup-0",
                                        length_seed=0)
    # the warm-up: other texts (nothing of the measured prompts cached), the same lengths
    assert {c["system"] for c in warm}.isdisjoint(systems.values())
    for a, b in zip(warm, convs):
        assert n_tokens(tok, a["system"]) == n_tokens(tok, b["system"])
        assert [n_tokens(tok, u) for u in a["users"]] == [n_tokens(tok, u) for u in b["users"]]


def test_turn_prompt_extends_the_previous_turn():
    conv = {"tenant": "t", "system": "SYS words", "users": ["u zero", "u one", "u two"]}
    generated = [" answer zero", " answer one"]
    p0 = bench_prefix.turn_prompt(conv, 0, [])
    p1 = bench_prefix.turn_prompt(conv, 1, generated[:1])
    p2 = bench_prefix.turn_prompt(conv, 2, generated)
    assert p0.startswith("SYS words") and p0.endswith("u zero\nAssistant:")
    # the next turn's prompt is this turn's prompt + the text generated for it + a new message
    assert p1.startswith(p0 + generated[0])
    assert p2.startswith(p1 + generated[1])
    assert p2.endswith("\n\nUser: u two\nAssistant:")


def test_fewshot_and_distinct_prompts():
    tok = WordTokenizer()
    fs = bench_prefix.build_fewshot(tok, n=5, prefix_len=60, question_len=(4, 6), seed=1)
    prefix = fs[0].split("\n\nQ: ")[0]
    assert n_tokens(tok, prefix) == 60
    assert all(p.startswith(prefix + "\n\nQ: ") and p.endswith("\nA:") for p in fs)
    assert len(set(fs)) == 5
    assert bench_prefix.build_fewshot(tok, 5, 60, (4, 6), seed="w")[0].split("\n\nQ: ")[0] != prefix

    ds = bench_prefix.build_distinct(tok, n=12, length=30, seed=2)
    ids = [tok(p)["input_ids"] for p in ds]
    assert all(len(i) == 30 for i in ids)
    assert len({i[0] for i in ids}) == 12                       # no two share a first token
    with pytest.raises(ValueError):
        bench_prefix.build_distinct(tok, n=5, length=3, seed=2, max_attempts=0)


JAXSERVE_METRICS = """\
# HELP jaxserve_prefix_cache_queries_total Prompt tokens looked up in the prefix cache.
# TYPE jaxserve_prefix_cache_queries_total counter
jaxserve_prefix_cache_queries_total{model_name="m"} 1000
jaxserve_prefix_cache_queries_total{model_name="m",adapter="a"} 600
jaxserve_prefix_cache_queries_total{model_name="m",adapter=""} 400
# TYPE jaxserve_prefix_cache_hits_total counter
jaxserve_prefix_cache_hits_total{model_name="m"} 750
jaxserve_prefix_cache_hits_total{model_name="m",adapter="a"} 500
jaxserve_prefix_cache_hits_total{model_name="m",adapter=""} 250
vllm:num_requests_running{model_name="m"} 3
jaxserve:http_requests_total{route="/v1/completions",status="200"} 7
garbage line without value
"""

VLLM_METRICS = """\
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="smollm2"} 2048.0
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="smollm2"} 1536.0
vllm:prefix_cache_hits_created{engine="0",model_name="smollm2"} 1.7e+09
"""


def test_metrics_parser_and_hit_rate():
    samples = bench_prefix.parse_metrics(JAXSERVE_METRICS)
    assert ("vllm:num_requests_running", {"model_name": "m"}, 3.0) in samples
    assert ("jaxserve:http_requests_total", {"route": "/v1/completions", "status": "200"},
            7.0) in samples
    # the totals (no adapter label), not totals + per-adapter samples
    c = bench_prefix.prefix_counters(samples, "jaxserve")
    assert (c["queries"], c["hits"]) == (1000, 750)
    # only per-adapter samples: their sum; the colon-named variant is read too
    per_adapter = "\n".join(ln.replace("jaxserve_prefix", "jaxserve:prefix")
                            for ln in JAXSERVE_METRICS.splitlines() if "adapter=" in ln)
    c2 = bench_prefix.prefix_counters(bench_prefix.parse_metrics(per_adapter), "jaxserve")
    assert (c2["queries"], c2["hits"]) == (1000, 750)
    assert bench_prefix.prefix_counters(bench_prefix.parse_metrics("x 1\n"), "jaxserve") is None

    v = bench_prefix.prefix_counters(bench_prefix.parse_metrics(VLLM_METRICS), "vllm")
    assert (v["queries"], v["hits"]) == (2048, 1536)
    # a jaxserve exposing only vLLM's names
    v = bench_prefix.prefix_counters(bench_prefix.parse_metrics(VLLM_METRICS), "jaxserve")
    assert (v["queries"], v["hits"]) == (2048, 1536)
    assert bench_prefix.hit_rate(c, {"queries": 1400, "hits": 1050, "names": []}) == {
        "queried_tokens": 400, "hit_tokens": 300, "rate": 0.75}
    assert bench_prefix.hit_rate(c, c)["rate"] is None           # nothing queried
    assert bench_prefix.hit_rate(None, c) is None                # server without counters


def _row(name, ttft_p50, tok_s, rate):
    s = {"num_requests": 8, "num_failed": 0, "prompt_tokens_range": [100, 200],
         "ttft_ms": {"p50": ttft_p50, "p90": ttft_p50 * 2}, "output_tok_s": tok_s, "wall_s": 3.0,
         "prefix_cache": None if rate is None else {"queried_tokens": 10, "hit_tokens": 5,
                                                    "rate": rate},
         "programs_compiled": 0}
    return {"name": name, "kind": name.split("-")[0], "startup_s": 1.0,
            "warmup": {"seconds": 2.0}, **{w: dict(s) for w in bench_prefix.WORKLOADS}}


def test_table_and_ratios():
    rows = [_row("jaxserve-off", 900.0, 100.0, 0.0), _row("jaxserve-on", 200.0, 104.0, 0.8),
            _row("vllm", 100.0, 208.0, None), {"name": "vllm-off", "kind": "vllm", "error": "boom"}]
    md = bench_prefix.table(rows)
    assert "| multiturn | jaxserve-on | 8 (0) | 100-200 | 200 / 400 | 104.0 | 80.0% | 3.0 |" in md
    assert "| nohit | vllm | 8 (0) | 100-200 | 100 / 200 | 208.0 | n/a | 3.0 |" in md
    assert "failed: boom" in md
    lines = bench_prefix.ratios(rows)
    assert "multiturn: TTFT p50 jaxserve off/on = 4.50x (target >= 3x)" in lines
    assert any(ln.startswith("nohit: output tok/s jaxserve on/off = 1.040") for ln in lines)
    assert any("jaxserve-on vs vLLM" in ln and "2.00x vLLM's" in ln and "0.50x" in ln
               for ln in lines)
    assert "jaxserve-off" in bench_prefix.server_table(rows)


def test_arguments():
    a = bench_prefix.parse_args(["--quick"])
    assert a.servers == bench_prefix.QUICK_SERVERS and a.output_len == 8
    a = bench_prefix.parse_args(["--quick", "--output-len", "16", "--servers", "vllm",
                                 "--workloads", "nohit"])
    assert (a.output_len, a.servers, a.workloads) == (16, "vllm", ["nohit"])
    assert bench_prefix.parse_args([]).servers == bench_prefix.DEFAULT_SERVERS


def test_server_command_lines():
    a = bench_prefix.parse_args(["--jaxserve-args=--kv-cache-gb 3 --seed 1"])
    off = bench_prefix.server_for("jaxserve-off", a, [])
    on = bench_prefix.server_for("jaxserve-on", a, [])
    assert "--no-enable-prefix-caching" in off.cmd and "--no-enable-prefix-caching" not in on.cmd
    for s in (off, on):
        assert "--num-pages" not in s.cmd
        assert s.cmd[-4:] == ["--kv-cache-gb", "3", "--seed", "1"]   # passthrough last: it wins
        assert s.cmd[s.cmd.index("--max-model-len") + 1] == "1024"
    with pytest.raises(SystemExit):
        bench_prefix.server_for("jaxserve", a, [])
    v = bench_prefix.server_for("vllm", a, [])
    if not isinstance(v, str):                       # vLLM installed under /work/peers
        assert "--enable-prefix-caching" in v.cmd
        assert v.env["VLLM_CPU_KVCACHE_SPACE"] == "2"
