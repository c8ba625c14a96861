"""Property-based fuzz of every endpoint: no input gets a response >= 500.

The server runs over the fake runner (tests/fake_runner.py: the real engine, admission,
scheduler and adapter store; only the device step is fake) with a tokenizer that, like HF's,
encodes its input as UTF-8 first, under the VTC scheduler, with --lora-root set. Hypothesis
generates
  - valid-ish bodies for each POST endpoint with fields mutated: wrong JSON types, lone UTF-16
    surrogates, NULs, numbers too large for a double or for 64 bits, deep nesting, strings up to
    past the body limit, random Unicode, extra fields; sometimes an Authorization header that
    is not UTF-8;
  - raw requests: byte garbage on any method, path and content type, odd Authorization headers,
    Content-Encoding gzip/deflate/br/unknown over garbage or valid compressed bodies;
  - hostile adapter directories (adapter_config.json with wrong types / NaN / huge or zero
    ranks / bad regexes or garbage bytes; safetensors with NaN, wrong shapes, integer dtypes,
    truncated or garbage bytes), loaded through /v1/load_lora_adapter and /generate's lora_dir,
    and damaged Orbax checkpoints.
Every response must be < 500; every 4xx must carry the OpenAI error body
{"error": {"message": str, "type": str, "param", "code": str}} (also the 400s aiohttp answers
before any middleware runs: a body whose Content-Encoding it cannot decode, a malformed request
line; server/connections.py); every 200 must be strict JSON (no NaN/Infinity) or well-formed SSE. Afterwards the server
answers a normal request exactly, /metrics renders, and once every adapter is unloaded the KV
pool is entirely free. The mutated bodies also run against the real default model (slow).

Bounded by example counts (derandomized), never by wall-clock time; the number of cases tried
is printed in pytest's terminal summary ("fuzz: N cases, 0 responses >= 500").
"""
from __future__ import annotations

import collections
import gzip
import http.client
import itertools
import json
import os
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fake_runner import FAKE_MODEL, CharTokenizer, FakeRunner, expected_text, write_adapter
from jaxserve.engine import EngineConfig, LLMEngine
from jaxserve.tokenizer import Tokenizer
from server.config import ServerConfig
from server_harness import ServerThread

BODY_LIMIT = 16 * 1024          # the server's --max-request-bytes here (huge strings go past it)
STATUS = collections.Counter()  # status -> responses, over the whole module
SERVER_ERRORS: list[str] = []   # descriptions of responses >= 500 (the test fails on the first)

FUZZ = settings(max_examples=500, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


# ------------------------------------------------------------------ JSON text with raw fragments
class Raw(str):
    """A JSON fragment written verbatim (numbers and nestings json.dumps cannot produce)."""


def to_json(v) -> str:
    """JSON text of v, Raw fragments verbatim; strings through json.dumps, so a lone surrogate
    goes out as a \\ud800 escape (as a hostile client would send it)."""
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, dict):
        return "{" + ",".join(json.dumps(str(k)) + ":" + to_json(x) for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(to_json(x) for x in v) + "]"
    return json.dumps(v)   # NaN / Infinity floats come out as the bare tokens


def _surrogate_text():
    return st.builds(lambda a, c, b: a + c + b, st.text(max_size=4),
                     st.integers(0xD800, 0xDFFF).map(chr), st.text(max_size=4))


def _deep(n: int, kind: str) -> Raw:
    return Raw("[" * n + "]" * n) if kind == "list" else Raw('{"a":' * n + "1" + "}" * n)


HUGE_NUMBERS = [Raw(s) for s in (
    "1e400", "-1e400", "1e-400", "1.7976931348623159e308", "9" * 30, "-" + "9" * 30, "9" * 5000,
    "18446744073709551616", "18446744073709551615", "9223372036854775808", "NaN", "Infinity",
    "-Infinity", "1e308", "-0.0", "4294967296", "2147483648", "-2147483649", "1.5")]

hostile = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(HUGE_NUMBERS),
    _surrogate_text(),
    st.sampled_from(["", "\x00", "a\x00b", "fake-model", "sql", "fake-model:sql", "alpha",
                     "../alpha", "/etc/passwd", "escape", "nested/gamma", "fake-model:",
                     ":", "\u202e", "\U0010ffff", "all-linear", "(", "*"]),
    st.text(max_size=40),
    st.sampled_from([1000, 20000]).map(lambda n: "x" * n),     # long, and past the body limit
    st.builds(_deep, st.sampled_from([2, 63, 64, 65, 500, 5000]), st.sampled_from(["list", "dict"])),
    st.lists(st.integers(-5, 0x110005), max_size=6),
    st.lists(st.text(max_size=5), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.lists(st.dictionaries(st.sampled_from(["role", "content", "type", "text"]),
                             st.one_of(st.text(max_size=8), st.integers(), st.none()),
                             max_size=3), max_size=3),
)

# ------------------------------------------------------------------ valid-ish bodies per endpoint
COMMON = ["model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos",
          "stream", "stream_options", "n", "best_of", "presence_penalty", "frequency_penalty",
          "repetition_penalty", "logit_bias", "user", "cache_salt"]
FIELDS = {
    "/v1/completions": COMMON + ["prompt", "echo", "suffix", "logprobs"],
    "/v1/chat/completions": COMMON + ["messages", "messages[0]", "messages[0].content",
                                      "messages[0].role", "messages[0].content[0]",
                                      "max_completion_tokens", "logprobs", "top_logprobs"],
    "/generate": ["inputs", "parameters", "lora_dir", "adapter", "model", "user", "cache_salt"]
    + [f"parameters.{k}" for k in ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k",
                                   "seed", "stop_sequences", "stop", "ignore_eos", "details")],
    "/v1/load_lora_adapter": ["lora_name", "lora_path"],
    "/v1/unload_lora_adapter": ["lora_name"],
}
FIELDS["/generate_stream"] = FIELDS["/generate"]

models = st.sampled_from([None, "fake-model", "sql", "fake-model:sql", "nope"])
small_text = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FFF), min_size=1, max_size=12)


@st.composite
def base_body(draw, path: str) -> dict:
    if path in ("/v1/completions", "/v1/chat/completions"):
        body = {"model": draw(models), "max_tokens": draw(st.integers(1, 6)),
                "temperature": draw(st.sampled_from([0, 0.5, 1])), "stream": draw(st.booleans())}
        if path == "/v1/completions":
            body["prompt"] = draw(st.one_of(small_text, st.lists(st.integers(1, 200), min_size=1,
                                                                  max_size=5)))
            if draw(st.booleans()):
                body["logprobs"] = 0
        else:
            body["messages"] = [{"role": "user", "content": draw(small_text)}]
            body["logprobs"] = draw(st.booleans())
        return body
    if path in ("/generate", "/generate_stream"):
        body = {"inputs": draw(small_text),
                "parameters": {"max_new_tokens": draw(st.integers(1, 6)), "details": True}}
        if draw(st.booleans()):
            body["lora_dir"] = draw(st.sampled_from(["alpha", "nested/gamma", "beta"]))
        return body
    if path == "/v1/load_lora_adapter":
        return {"lora_name": draw(st.sampled_from(["fz-a", "fz-b", "sql"])),
                "lora_path": draw(st.sampled_from(["alpha", "beta", "nested/gamma", "escape"]))}
    return {"lora_name": draw(st.sampled_from(["fz-a", "fz-b", "nope"]))}


def _set(body: dict, field: str, value) -> None:
    """Set a dotted/indexed field (messages[0].content) creating what is missing."""
    parts = field.replace("[", ".[").split(".")
    cur = body
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        nxt = None if last else ([] if parts[i + 1].startswith("[") else {})
        if p.startswith("["):
            k = int(p[1:-1])
            if not isinstance(cur, list):
                return
            while len(cur) <= k:
                cur.append({} if nxt is None else nxt)
            if last:
                cur[k] = value
            elif not isinstance(cur[k], (dict, list)):
                cur[k] = nxt
            cur = cur[k] if not last else cur
        else:
            if not isinstance(cur, dict):
                return
            if last:
                cur[p] = value
            else:
                if not isinstance(cur.get(p), (dict, list)):
                    cur[p] = nxt
                cur = cur[p]


# Header bytes that are not UTF-8 reach handlers as lone surrogates (aiohttp's surrogateescape).
AUTH_HEADERS = ["Bearer", "Bearer ", "Bearer x", "Basic abc", b"Bearer \xff\xfe", b"Bearer \xc3\x28",
                b"\xff"]


@st.composite
def mutated_request(draw):
    path = draw(st.sampled_from(sorted(FIELDS)))
    body = draw(base_body(path))
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):   # mostly one: the rest stays valid
        kind = draw(st.sampled_from(["set", "set", "set", "delete", "extra"]))
        if kind == "set":
            _set(body, draw(st.sampled_from(FIELDS[path])), draw(hostile))
        elif kind == "delete" and body:
            body.pop(draw(st.sampled_from(sorted(body))))
        else:
            body[draw(st.one_of(st.text(max_size=6), _surrogate_text()))] = draw(hostile)
    headers = {"Content-Type": "application/json"}
    auth = draw(st.sampled_from([None] * 8 + AUTH_HEADERS))
    if auth is not None:
        headers["Authorization"] = auth
    return "POST", path, to_json(body).encode(), headers


ROUTES = ["/v1/completions", "/v1/chat/completions", "/generate", "/generate_stream",
          "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/models", "/health", "/metrics",
          "/", "/v1", "/v1/completions/", "/nope", "/v1/%ff%fe", "/generate?x=%00", "/%00",
          "/v1/models?limit=1e400", "//v1//completions"]


@st.composite
def raw_request(draw):
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]))
    path = draw(st.sampled_from(ROUTES))
    body = draw(st.one_of(
        st.binary(max_size=300),
        st.sampled_from([b"", b"{", b"null", b"[]", b"1", b'"x"', b"{}", b"\xff\xfe{}",
                         b"\xef\xbb\xbf{}", b'{"prompt": "\xed\xa0\x80"}', b'{"a":1}' * 3,
                         b"\x00" * 64, "{}".encode("utf-16"), b'{"prompt":"a"' + b" " * 20000 + b"}"]),
        st.text(max_size=200).map(lambda s: s.encode("utf-8"))))
    ctype = draw(st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                  "multipart/form-data; boundary=x", "", "application/json; charset=latin-1"]))
    headers = {"Content-Type": ctype} if ctype else {}
    auth = draw(st.sampled_from([None] + AUTH_HEADERS))
    if auth is not None:
        headers["Authorization"] = auth
    encoding = draw(st.sampled_from([None, None, "gzip", "deflate", "identity", "zzz", "br"]))
    if encoding is not None:
        headers["Content-Encoding"] = encoding
        if encoding in ("gzip", "deflate") and draw(st.booleans()):   # a valid compressed body
            body = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    return method, path, body, headers


# ------------------------------------------------------------------ hostile adapter directories
GOOD_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"],
               "bias": "none", "task_type": "CAUSAL_LM"}
CONFIG_FIELDS = ["r", "lora_alpha", "target_modules", "use_rslora", "rank_pattern", "alpha_pattern",
                 "layers_to_transform", "peft_type", "bias", "use_dora", "exclude_modules",
                 "modules_to_save", "fan_in_fan_out", "layers_pattern"]
config_values = st.one_of(hostile, st.sampled_from([
    0, -1, 1, 3, 2**31, 10**9, Raw("NaN"), Raw("Infinity"), Raw("1e400"), 1e300, -4.0, 2.5, "2",
    ["q_proj"], ["q_proj", "v_proj", "k_proj"], "q_proj|v_proj", ".*", "(", "[", "all-linear",
    {"q_proj": 0}, {"q_proj": Raw("NaN")}, {"(": 2}, {"v_proj": "x"}, {".*": 10**9}, [0], [5],
    [-1], ["0"], [[0]], {"0": 1}]))


def _good_tensors(rank: int = 2) -> dict[str, np.ndarray]:
    cfg, rng, out = FAKE_MODEL, np.random.default_rng(0), {}
    for mod, dout in (("q_proj", cfg.q_size), ("v_proj", cfg.kv_size)):
        key = f"base_model.model.model.layers.0.self_attn.{mod}"
        out[f"{key}.lora_A.weight"] = rng.normal(size=(rank, cfg.hidden_size)).astype(np.float32)
        out[f"{key}.lora_B.weight"] = rng.normal(size=(dout, rank)).astype(np.float32)
    return out


def _safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save
    return save(tensors)


@st.composite
def hostile_adapter(draw):
    """(adapter_config.json bytes or None, adapter_model.safetensors bytes or None, what)."""
    cfg = dict(GOOD_CONFIG)
    for _ in range(draw(st.integers(0, 3))):
        cfg[draw(st.sampled_from(CONFIG_FIELDS))] = draw(config_values)
    config = draw(st.one_of(
        st.just(to_json(cfg).encode()),
        st.just(to_json(cfg).encode()),
        st.binary(max_size=40), st.sampled_from([b"", b"[]", b"null", b"{", b'"x"', b"\xff"]),
        st.just(None)))
    tensors = _good_tensors()
    keys = sorted(tensors)
    t_kind = draw(st.sampled_from(["good", "nan", "inf", "huge", "shape", "int", "bool", "f16",
                                   "f64", "empty", "scalar", "extra", "drop", "truncate",
                                   "garbage", "header", "none", "rank"]))
    k = draw(st.sampled_from(keys))
    if t_kind in ("nan", "inf", "huge"):
        tensors[k] = tensors[k].copy()
        tensors[k].flat[draw(st.integers(0, tensors[k].size - 1))] = \
            {"nan": np.nan, "inf": -np.inf, "huge": 3e38}[t_kind]
    elif t_kind == "shape":
        tensors[k] = np.zeros(draw(st.sampled_from([(3, 8), (2, 8, 1), (8,), (2, 9)])), np.float32)
    elif t_kind in ("int", "bool", "f16", "f64"):
        dt = {"int": np.int32, "bool": np.bool_, "f16": np.float16, "f64": np.float64}[t_kind]
        tensors[k] = tensors[k].astype(dt)
    elif t_kind == "empty":
        tensors[k] = np.zeros((0, 8), np.float32)
    elif t_kind == "scalar":
        tensors[k] = np.ones((), np.float32)
    elif t_kind == "extra":
        tensors[draw(st.sampled_from(["x", "base_model.model.lm_head.lora_A.weight",
                                      "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight",
                                      "model.layers.0.self_attn.q_proj.lora_magnitude_vector"]))] = \
            np.zeros((2, 8), np.float32)
    elif t_kind == "drop":
        del tensors[k]
    elif t_kind == "rank":
        tensors = _good_tensors(rank=draw(st.sampled_from([1, 3, 16])))
    st_bytes = _safetensors_bytes(tensors) if t_kind not in ("none",) else None
    if t_kind == "truncate":
        st_bytes = st_bytes[:draw(st.integers(0, len(st_bytes) - 1))]
    elif t_kind == "garbage":
        st_bytes = draw(st.binary(max_size=64))
    elif t_kind == "header":   # a header length far past the file, or a header that is not JSON
        st_bytes = draw(st.sampled_from([struct.pack("<Q", 2**63) + b"{}",
                                         struct.pack("<Q", 5) + b"nope!",
                                         struct.pack("<Q", 2) + b"{}"]))
    return config, st_bytes, f"{t_kind}/{cfg}"


# ------------------------------------------------------------------ the server and the checks
class StrictCharTokenizer(CharTokenizer):
    """The fake tokenizer (one token per character) that, like HF's, must encode its input as
    UTF-8 first, so text that is not valid Unicode fails here as it would on a real model."""

    def __call__(self, text: str) -> dict:
        text.encode("utf-8")
        return super().__call__(text)


def strict_fake_engine() -> LLMEngine:
    """tests/fake_runner.fake_engine with StrictCharTokenizer, under the VTC scheduler."""
    cfg = EngineConfig(max_num_seqs=4, num_pages=256, page_size=4, max_model_len=128,
                       max_prefill_tokens=128, scheduler="vtc", max_lora_rank=8)
    return LLMEngine(cfg, runner=FakeRunner(), tokenizer=Tokenizer(StrictCharTokenizer(),
                                                                   eos_ids=frozenset({0})),
                     model_config=FAKE_MODEL, model_name="fake-model")


@pytest.fixture(scope="module")
def srv(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("fuzz-adapters")
    for i, name in enumerate(("alpha", "beta", "nested/gamma")):
        write_adapter(root / name, seed=i)
    os.symlink(tmp_path_factory.mktemp("outside"), root / "escape")
    (root / "hostile").mkdir()
    eng = strict_fake_engine()
    cfg = ServerConfig(lora_root=str(root), max_request_bytes=BODY_LIMIT,
                       lora_modules=(("sql", str(root / "alpha")),))
    _register_report(request.config)
    with ServerThread(eng, cfg) as s:
        s.root = root
        s.conn = None
        yield s


def _register_report(config) -> None:
    if not config.pluginmanager.has_plugin("jaxserve-fuzz-report"):
        config.pluginmanager.register(_Report(), "jaxserve-fuzz-report")


class _Report:
    """Prints the case count in pytest's terminal summary (shown under -q too)."""

    def pytest_terminal_summary(self, terminalreporter):
        total = sum(STATUS.values())
        if total:
            bad = sum(n for s, n in STATUS.items() if s >= 500)
            terminalreporter.write_line(
                f"fuzz: {total} cases, {bad} responses >= 500 "
                f"(statuses: {dict(sorted(STATUS.items()))})")


def send(srv, method: str, path: str, body: bytes | None, headers: dict) -> tuple[int, dict, bytes]:
    """One request on a fresh connection (a 4xx may close it): (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=120)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body if body else None)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def _strict_json(raw: bytes):
    def no_constant(name):
        raise AssertionError(f"response JSON holds {name}")
    return json.loads(raw, parse_constant=no_constant)


PER_TEST = collections.Counter()   # test -> requests it sent (-k may select some tests)


def check(srv, method: str, path: str, body: bytes | None, headers: dict, what: str = ""):
    """Send, and assert the response is well-formed and < 500; returns (status, parsed body)."""
    PER_TEST[os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0].split("::")[-1]] += 1
    status, rh, raw = send(srv, method, path, body, headers)
    STATUS[status] += 1
    desc = (f"{method} {path} {headers} {(body or b'')[:300]!r}{' ' + what if what else ''} "
            f"-> {status} {raw[:300]!r}")
    if status >= 500:
        SERVER_ERRORS.append(desc)
    assert status < 500, desc
    ctype = rh.get("Content-Type", "")
    if method == "HEAD":
        return status, None
    if status >= 400:
        err = _strict_json(raw)
        assert isinstance(err, dict) and set(err) == {"error"}, desc
        e = err["error"]
        assert isinstance(e, dict) and isinstance(e.get("message"), str) and e["message"], desc
        assert isinstance(e.get("type"), str) and "param" in e, desc
        assert isinstance(e.get("code"), str) and e["code"], desc
        return status, err
    if "text/event-stream" in ctype:
        text = raw.decode("utf-8")
        assert text.endswith("\n\n"), desc
        events = []
        for block in text[:-2].split("\n\n"):
            assert block.startswith("data:"), desc
            payload = block[5:].strip()
            events.append(payload if payload == "[DONE]" else _strict_json(payload.encode()))
        return status, events
    if "json" in ctype:
        return status, _strict_json(raw)
    raw.decode("utf-8")
    return status, raw


# ------------------------------------------------------------------ the properties
_cases = itertools.count()


@FUZZ
@given(req=mutated_request())
def test_fuzz_mutated_bodies(srv, req):
    check(srv, *req)
    if next(_cases) % 20 == 0:   # what was admitted (a client name, say) must not break these
        check(srv, "GET", "/metrics", None, {})
        check(srv, "GET", "/v1/models", None, {})


@settings(FUZZ, max_examples=300)
@given(req=raw_request())
def test_fuzz_raw_requests(srv, req):
    check(srv, *req)


@pytest.mark.parametrize("encoding,body", [
    ("gzip", b"not gzip at all"), ("deflate", b"\x00\x01garbage"), ("br", b"\x8b\x00garbage")])
def test_undecodable_body_is_an_openai_error(srv, encoding, body):
    """A body aiohttp's HTTP parser cannot decode (garbage that arrived with the headers; br
    without Brotli) is answered before any middleware runs: still 400 with
    the OpenAI error body, code "invalid_body" (and the connection closed)."""
    for path in ("/v1/completions", "/generate", "/v1/load_lora_adapter"):
        status, err = check(srv, "POST", path, body, {"Content-Type": "application/json",
                                                      "Content-Encoding": encoding})
        assert status == 400 and err["error"]["code"] == "invalid_body", (path, err)


def test_malformed_http_is_an_openai_error(srv):
    """A request line or header aiohttp cannot parse: 400 with the OpenAI error body."""
    import socket
    for raw in (b"GARBAGE\r\n\r\n", b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as sock:
            sock.sendall(raw)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == b"400" and b"application/json" in head, data
        err = _strict_json(body)["error"]
        assert err["code"] == "invalid_request" and err["message"].startswith("malformed"), err


_adapter_ids = itertools.count()


@settings(FUZZ, max_examples=250)
@given(adapter=hostile_adapter(), via=st.sampled_from(["load", "load", "lora_dir"]))
def test_fuzz_hostile_adapters(srv, adapter, via):
    config, st_bytes, what = adapter
    rel = f"hostile/a{next(_adapter_ids)}"
    d = srv.root / rel
    d.mkdir(parents=True)
    if config is not None:
        (d / "adapter_config.json").write_bytes(config)
    if st_bytes is not None:
        (d / "adapter_model.safetensors").write_bytes(st_bytes)
    what = f"{what} config={config[:200] if config else None!r}"
    if via == "lora_dir":
        check(srv, "POST", "/generate", json.dumps(
            {"inputs": "hi", "parameters": {"max_new_tokens": 2}, "lora_dir": rel}).encode(),
            {"Content-Type": "application/json"}, what)
        name = rel
    else:
        name = f"fz{rel.replace('/', '-')}"
        status, _ = check(srv, "POST", "/v1/load_lora_adapter", json.dumps(
            {"lora_name": name, "lora_path": rel}).encode(), {"Content-Type": "application/json"},
            what)
        if status != 200:
            return
        status, body = check(srv, "POST", "/v1/completions", json.dumps(
            {"model": name, "prompt": "hi", "max_tokens": 2, "logprobs": 0}).encode(),
            {"Content-Type": "application/json"}, what)
        assert status == 200, (what, body)
    check(srv, "POST", "/v1/unload_lora_adapter", json.dumps({"lora_name": name}).encode(),
          {"Content-Type": "application/json"}, what)


@pytest.fixture(scope="module")
def orbax_adapter(srv):
    """A good Orbax checkpoint of the alpha adapter (the fuzz copies and damages it)."""
    from jaxserve.lora.adapter import load_peft
    from jaxserve.lora.orbax_io import save_orbax
    path = srv.root / "orbax-good"
    save_orbax(load_peft("alpha", str(srv.root / "alpha"), FAKE_MODEL), str(path), FAKE_MODEL)
    return path


@st.composite
def orbax_damage(draw):
    """(file kind to damage, how): the checkpoint's config JSON or one of its array files."""
    where, how = draw(st.sampled_from(
        [("config", "json")] * 12 + [(w, h) for w in ("config", "params", "meta")
                                     for h in ("garbage", "truncate", "delete", "empty")]))
    value = draw(st.one_of(config_values, st.sampled_from(["jaxserve-lora-orbax-v1", {}])))
    field = draw(st.sampled_from(["format", "base", "peft_config", "peft_config.lora_alpha",
                                  "peft_config.r", "peft_config.target_modules", "name"]))
    return where, how, value, field, draw(st.binary(max_size=32)), draw(st.integers(0, 10**6))


@settings(FUZZ, max_examples=40)
@given(damage=orbax_damage())
def test_fuzz_hostile_orbax_checkpoints(srv, orbax_adapter, damage):
    """Damaged Orbax checkpoints (config JSON with hostile fields or garbage; array files
    garbage, truncated or missing) are refused with a 4xx, never a 500."""
    import shutil
    where, how, value, field, junk, cut = damage
    rel = f"hostile/o{next(_adapter_ids)}"
    d = srv.root / rel
    shutil.copytree(orbax_adapter, d)
    files = sorted(p for p in (d / ("config" if where == "config" else "params")).rglob("*")
                   if p.is_file() and p.name != "commit_success.txt") if where != "meta" \
        else sorted(p for p in d.iterdir() if p.is_file())
    target = files[cut % len(files)]
    if where == "config" and how == "json":
        target = d / "config" / "metadata"
        cfg = json.loads(target.read_text())
        _set(cfg, field, value)
        target.write_text(to_json(cfg))
    elif how == "garbage":
        target.write_bytes(junk)
    elif how == "truncate":
        data = target.read_bytes()
        target.write_bytes(data[:cut % max(len(data), 1)])
    elif how == "delete":
        target.unlink()
    else:
        target.write_bytes(b"")
    name = f"fz{rel.replace('/', '-')}"
    status, _ = check(srv, "POST", "/v1/load_lora_adapter", json.dumps(
        {"lora_name": name, "lora_path": rel}).encode(), {"Content-Type": "application/json"},
        f"{damage[:2]} {target.name}")
    if status == 200:
        check(srv, "POST", "/v1/unload_lora_adapter", json.dumps({"lora_name": name}).encode(),
              {"Content-Type": "application/json"})


def test_fuzz_server_still_correct_and_pool_free(srv):
    """After the storm: a normal request is answered exactly, /metrics renders, and with every
    adapter unloaded no KV or adapter page is left held."""
    assert not SERVER_ERRORS, SERVER_ERRORS[:5]
    status, body = check(srv, "POST", "/v1/completions", json.dumps(
        {"model": "fake-model", "prompt": "hello", "max_tokens": 6, "temperature": 0}).encode(),
        {"Content-Type": "application/json"})
    assert status == 200 and body["choices"][0]["text"] == expected_text("hello", 6), body
    status, _ = check(srv, "GET", "/metrics", None, {})
    assert status == 200
    _, models = check(srv, "GET", "/v1/models", None, {})
    for m in models["data"][1:]:
        status, body = check(srv, "POST", "/v1/unload_lora_adapter",
                             json.dumps({"lora_name": m["id"]}).encode(), {})
        assert status == 200, body
    stats = srv.stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0, stats
    assert stats["num_free_pages"] == stats["num_total_pages"], stats
    print(f"fuzz: {sum(STATUS.values())} cases, 0 responses >= 500")
    ran = {name: n for name, n in PER_TEST.items() if name.startswith("test_fuzz_")
           and name.endswith(("_bodies", "_requests", "_adapters", "_checkpoints"))}
    assert all(n >= 40 for n in ran.values()), ran   # each fuzz test that ran: its examples

# ------------------------------------------------------------------ the same, on the real model
@pytest.fixture(scope="module")
def real_srv(request):
    from server_harness import shared_real_engine
    _register_report(request.config)
    with ServerThread(shared_real_engine()) as s:
        yield s


@pytest.mark.slow   # the real default model behind the server (compiles its step programs)
@settings(FUZZ, max_examples=60)
@given(req=mutated_request())
def test_fuzz_real_engine(real_srv, req):
    """Mutated bodies against the real engine and tokenizer (no --lora-root: adapter loads are
    403): what reaches the real step builder and sampler (top_k beyond int32, say) is < 500."""
    check(real_srv, *req)


@pytest.mark.slow
def test_fuzz_real_engine_still_correct(real_srv):
    for body in ({"prompt": "Hi", "max_tokens": 2, "top_k": 2**40},
                 {"prompt": "Hi", "max_tokens": 2, "temperature": 100, "logprobs": 0},
                 {"prompt": "Hi", "max_tokens": 2, "seed": 2**63 - 1, "top_p": 1e-300}):
        status, out = check(real_srv, "POST", "/v1/completions", json.dumps(body).encode(), {})
        assert status == 200, out
    stats = real_srv.stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0, stats
    assert stats["num_free_pages"] == stats["num_total_pages"], stats


# ------------------------------------------------------------------ non-finite log-probs
class NonFiniteLogprobRunner(FakeRunner):
    """The fake runner whose chosen-token log-probabilities are NaN, -inf and +inf in turn."""

    def run(self, plan):
        tokens, _ = super().run(plan)
        bad = [float("nan"), float("-inf"), float("inf")]
        return tokens, [None if t is None else bad[(self.num_steps + i) % 3]
                        for i, t in enumerate(tokens)]


def test_non_finite_logprobs_are_null_in_every_response():
    """Log-probs that are not finite are written as null, never as NaN/Infinity, in every
    response shape that carries them (completions and chat, whole and streamed, and
    /generate_stream); the text is unaffected."""
    cfg = EngineConfig(max_num_seqs=4, num_pages=64, page_size=4, max_model_len=64,
                       max_prefill_tokens=64, max_lora_rank=8)
    eng = LLMEngine(cfg, runner=NonFiniteLogprobRunner(),
                    tokenizer=Tokenizer(StrictCharTokenizer(), eos_ids=frozenset({0})),
                    model_config=FAKE_MODEL, model_name="fake-model")
    with ServerThread(eng) as s:
        cases = [("/v1/completions", {"prompt": "hey", "max_tokens": 4, "logprobs": 0}),
                 ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hey"}],
                                           "max_tokens": 4, "logprobs": True})]
        for path, body in cases:
            for stream in (False, True):
                status, out = check(s, "POST", path, json.dumps({**body, "stream": stream}).encode(), {})
                assert status == 200, out
                if stream:
                    lps = [c["logprobs"] for e in out if e != "[DONE]" for c in e["choices"]
                           if c.get("logprobs")]
                else:
                    lps = [out["choices"][0]["logprobs"]]
                values = [v for lp in lps for v in (lp["token_logprobs"] if "token_logprobs" in lp
                                                    else [c["logprob"] for c in lp["content"]])]
                assert values and all(v is None for v in values), (path, stream, out)
        status, events = check(s, "POST", "/generate_stream", json.dumps(
            {"inputs": "hey", "parameters": {"max_new_tokens": 4, "details": True}}).encode(), {})
        assert status == 200 and all(e["token"]["logprob"] is None for e in events), events
        status, out = check(s, "POST", "/v1/completions", json.dumps(
            {"prompt": "hey", "max_tokens": 4, "temperature": 0}).encode(), {})
        assert out["choices"][0]["text"] == expected_text("hey", 4), out


# ------------------------------------------------------------------ adapter refusals name their cause
def _nan_weight():
    t = _good_tensors()
    k = sorted(t)[0]
    t[k] = t[k].copy()
    t[k][1, 3] = np.nan
    return t


@pytest.mark.parametrize("cfg,tensors,says", [
    ({"r": "2"}, None, "r must be an integer"),
    ({"r": 0}, None, "r must be an integer"),
    ({"r": -2}, None, "r must be an integer"),
    ({"r": 10**9}, None, "r must be an integer"),
    ({"r": 2.0}, None, "r must be an integer"),
    ({"lora_alpha": float("nan")}, None, "lora_alpha must be a finite number"),
    ({"lora_alpha": float("inf")}, None, "lora_alpha must be a finite number"),
    ({"lora_alpha": "16"}, None, "lora_alpha must be a finite number"),
    ({"lora_alpha": 1e6}, None, "scale 500000"),
    ({"lora_alpha": 1e5, "use_rslora": True}, None, "rsLoRA"),
    ({"use_rslora": "false"}, None, "use_rslora must be true or false"),
    ({"target_modules": 7}, None, "target_modules must be"),
    ({"target_modules": "("}, None, "not a valid regex"),
    ({"target_modules": ["q_proj", 1]}, None, "target_modules must be"),
    ({"rank_pattern": [2]}, None, "rank_pattern must be an object"),
    ({"rank_pattern": {"q_proj": 0}}, None, "rank_pattern['q_proj']"),
    ({"alpha_pattern": {"q_proj": float("nan")}}, None, "alpha_pattern['q_proj']"),
    ({"layers_to_transform": ["0"]}, None, "layers_to_transform must be"),
    ({"peft_type": ["LORA"]}, None, "peft_type must be a string"),
    ({}, "nan", "lora_A.weight' holds 1 non-finite"),
])
def test_adapter_refusals_name_the_field_or_tensor(cfg, tensors, says):
    from jaxserve.lora.adapter import AdapterError, check_config_types, from_peft_arrays
    full = {**GOOD_CONFIG, **cfg}
    with pytest.raises(AdapterError) as e:
        if tensors == "nan":
            from jaxserve.lora.adapter import check_tensor
            for k, v in _nan_weight().items():
                check_tensor(k, v, "where")
        else:
            check_config_types(full, "where")
            from_peft_arrays("x", full, _good_tensors(), FAKE_MODEL, "where")
    assert says in str(e.value), str(e.value)


def test_adapter_regex_budget(monkeypatch):
    """A config's regexes share a time budget per adapter; once spent, the load is refused."""
    from jaxserve.lora import adapter as ad
    monkeypatch.setattr(ad, "REGEX_BUDGET_S", 0.0)
    with pytest.raises(ad.AdapterError, match="takes too long"):
        ad.from_peft_arrays("x", {**GOOD_CONFIG, "target_modules": r".*\.(q_proj|v_proj)"},
                            _good_tensors(), FAKE_MODEL, "where")
    monkeypatch.setattr(ad, "REGEX_BUDGET_S", 10.0)
    assert ad.from_peft_arrays("x", {**GOOD_CONFIG, "target_modules": r".*\.(q_proj|v_proj)"},
                               _good_tensors(), FAKE_MODEL, "where").modules == ("q_proj", "v_proj")
