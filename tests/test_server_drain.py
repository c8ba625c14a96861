"""Timeouts, the connection cap, slow stream readers and the graceful drain, on the real engine
over a fake runner (tests/fake_runner.py). `runner.gate` bounds the steps the engine may run, so
which requests can finish is decided by the test, not by timing; the timeouts under test are
short (a fraction of a second) and nothing asserts how long anything took.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from fake_runner import Spy, expected_text, fake_engine
from server.app import drain
from server.config import ServerConfig
from server_harness import ServerThread, parse_sse
from test_server_fake import http

HANG_GUARD_S = 60   # socket timeouts: only there so that a broken server fails instead of hanging


def connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(HANG_GUARD_S)
    sock.connect(("127.0.0.1", port))
    return sock


def post_bytes(path: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


GET_HEALTH = b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n"


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def read_one_response(sock: socket.socket) -> tuple[int, dict]:
    """(status, JSON body) of one Content-Length response; the connection stays open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before a response"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return int(head.split()[1]), json.loads(body)


def wait_until(srv: ServerThread, cond, what: str, tries: int = 6000) -> None:
    """Poll cond() on the test thread, sleeping 10 ms on the server's loop between tries."""
    for _ in range(tries):
        if cond():
            return
        srv.on_loop(asyncio.sleep(0.01))
    raise AssertionError(f"never happened: {what}")


def counter(s: ServerThread, name: str, labels: str = "") -> float:
    """A counter's value on the server's /metrics page (the sample whose labels contain
    `labels`)."""
    status, text = http(s.url, "/metrics")
    assert status == 200, text
    found = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line.startswith(name + "{") and labels in line]
    assert len(found) == 1, (name, labels, found)
    return found[0]


# ------------------------------------------------------------------ timeouts and the cap
def test_stalled_body_gets_408_and_the_connection_is_closed():
    with ServerThread(fake_engine(), ServerConfig(body_read_timeout_s=0.3)) as s:
        assert counter(s, "jaxserve:request_timeouts_total", 'kind="body"') == 0
        sock = connect(s.port)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")
        reply = read_until_closed(sock)   # the server answers, then closes
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        body = json.loads(reply.partition(b"\r\n\r\n")[2])
        assert body["error"]["code"] == "request_timeout"
        assert s.async_engine.num_in_flight == 0
        status, _ = http(s.url, "/v1/completions", {"prompt": "ok", "max_tokens": 2})
        assert status == 200   # the server is fine
        assert counter(s, "jaxserve:request_timeouts_total", 'kind="body"') == 1
        assert counter(s, "jaxserve:request_timeouts_total", 'kind="header"') == 0


def test_a_body_cut_by_its_client_is_dropped_quietly(caplog):
    """A client that closes while sending its body leaves nobody to answer: no error is logged
    (aiohttp logs an exception escaping the application as an ERROR), the server goes on."""
    route = 'route="/v1/completions",status="400"'
    with ServerThread(fake_engine(), ServerConfig(body_read_timeout_s=600)) as s:
        sock = connect(s.port)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")
        sock.close()
        wait_until(s, lambda: counter(s, "jaxserve:http_requests_total", route) == 1,
                   "the cut body answered")
        status, _ = http(s.url, "/v1/completions", {"prompt": "ok", "max_tokens": 2})
        assert status == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_trickled_headers_are_cut_but_a_started_request_is_not():
    eng = fake_engine()
    cfg = ServerConfig(header_read_timeout_s=0.3, keep_alive_timeout_s=600)
    with ServerThread(eng, cfg) as s:
        sock = connect(s.port)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: te")   # and nothing more
        assert read_until_closed(sock) == b""   # closed without an answer
        assert counter(s, "jaxserve:request_timeouts_total", 'kind="header"') == 1
        # A request whose headers arrived in time runs past the headers deadline unharmed.
        eng.runner.gate.limit(0)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(http, s.url, "/v1/completions", {"prompt": "slow", "max_tokens": 3})
            wait_until(s, lambda: s.async_engine.num_in_flight == 1, "request admitted")
            s.on_loop(asyncio.sleep(0.6))   # past the headers deadline
            eng.runner.gate.open()
            status, body = fut.result()
        assert status == 200 and body["choices"][0]["text"] == expected_text("slow", 3)


def test_idle_keep_alive_connection_is_closed():
    with ServerThread(fake_engine(), ServerConfig(keep_alive_timeout_s=0.3)) as s:
        sock = connect(s.port)
        sock.sendall(GET_HEALTH)
        assert read_one_response(sock)[0] == 200
        assert read_until_closed(sock) == b""   # idle: the server closes it


def test_connections_beyond_the_cap_get_503_and_are_closed():
    with ServerThread(fake_engine(), ServerConfig(max_connections=2)) as s:
        held = [connect(s.port) for _ in range(2)]
        for sock in held:   # served, and kept alive
            sock.sendall(GET_HEALTH)
            assert read_one_response(sock)[0] == 200
        extras = [connect(s.port) for _ in range(3)]   # a burst beyond the cap
        for extra in extras:
            extra.sendall(GET_HEALTH)
        for extra in extras:
            reply = read_until_closed(extra)
            assert reply.startswith(b"HTTP/1.1 503"), reply[:200]
            body = json.loads(reply.partition(b"\r\n\r\n")[2])
            assert body["error"]["code"] == "too_many_connections"
            extra.close()
        assert s.runner.server.num_refused == 3
        held.pop().close()   # one slot frees up
        wait_until(s, lambda: s.runner.server.num_open < 2, "a connection released")
        status, _ = http(s.url, "/health")
        assert status == 200
        assert counter(s, "jaxserve:connections_refused_total") == 3
        for sock in held:
            sock.close()


def test_a_stream_whose_client_does_not_read_is_aborted_and_frees_its_slot():
    # The engine never waits for a client (outputs queue up on the event loop), so a stream is
    # only still running in the engine when the stall is found if its steps are held back:
    # 3500 steps of its 4000 tokens, far more than the ~150 KB of buffers hold.
    eng = fake_engine(max_num_seqs=2, num_pages=1100, max_model_len=4096)
    spy = Spy(eng, "abort")
    eng.runner.gate.limit(0)
    with ServerThread(eng, ServerConfig(stream_stall_timeout_s=0.5)) as s, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        stalled = connect(s.port, rcvbuf=4096)
        stalled.sendall(post_bytes("/v1/completions",
                                   {"prompt": "abc", "max_tokens": 4000, "stream": True}))
        wait_until(s, lambda: s.async_engine.num_in_flight == 1, "stream admitted")
        # Loopback send buffers grow to megabytes, more than this whole stream; a small one on
        # the server's side of this connection makes its writes wait after ~150 KB.
        peer = stalled.getsockname()
        conn = next(c for c in s.runner.server.connections
                    if c.transport.get_extra_info("peername") == peer)
        conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                                           4096)
        other = pool.submit(http, s.url, "/v1/completions", {"prompt": "next", "max_tokens": 4})
        wait_until(s, lambda: s.async_engine.num_in_flight == 2, "other request admitted")
        eng.runner.gate.allow(3500)
        status, body = other.result()   # served next to the stream that nobody reads
        assert status == 200 and body["choices"][0]["text"] == expected_text("next", 4)
        wait_until(s, lambda: s.async_engine.num_in_flight == 0, "stalled stream released")
        eng.runner.gate.open()   # the engine thread leaves its held-back step, takes the abort
        stats = s.stats()
        stalled.close()
        assert counter(s, "jaxserve:stream_stall_aborts_total") == 1
    assert spy.calls["abort"] == 1   # aborted in the engine, not finished
    assert stats["num_free_pages"] == stats["num_total_pages"] and stats["num_running"] == 0


# ------------------------------------------------------------------ drain
def start_drain(s: ServerThread, grace_s: float) -> concurrent.futures.Future:
    """The drain SIGTERM starts (server/app.py serve), on the server's loop."""
    return asyncio.run_coroutine_threadsafe(drain(s.app, grace_s), s.loop)


def test_drain_lets_in_flight_requests_finish_and_refuses_new_ones():
    eng = fake_engine()
    eng.runner.gate.limit(0)   # nothing can finish until the drain has begun
    with ServerThread(eng) as s, concurrent.futures.ThreadPoolExecutor(4) as pool:
        plain = pool.submit(http, s.url, "/v1/completions", {"prompt": "one", "max_tokens": 5})
        streamed = pool.submit(http, s.url, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "two"}], "max_tokens": 5, "stream": True})
        wait_until(s, lambda: s.async_engine.num_in_flight == 2, "both admitted")
        drained = start_drain(s, grace_s=600)   # a grace it will not need
        wait_until(s, lambda: not s.async_engine.is_accepting, "admission stopped")
        status, body = http(s.url, "/health")
        assert status == 503 and body["status"] == "draining"
        req = urllib.request.Request(s.url + "/v1/completions", method="POST",
                                     data=json.dumps({"prompt": "late"}).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=HANG_GUARD_S)
        assert refused.value.code == 503 and refused.value.headers["Retry-After"]
        assert json.loads(refused.value.read())["error"]["code"] == "unavailable"
        eng.runner.gate.open()
        assert drained.result(HANG_GUARD_S) == 0   # none cut
        status, body = plain.result()
        assert status == 200 and body["choices"][0]["finish_reason"] == "length"
        assert body["choices"][0]["text"] == expected_text("one", 5) and "error" not in body
        status, raw = streamed.result()
        events = parse_sse(raw)
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
        assert not any("error" in e for e in events[:-1])


def test_drain_cuts_what_cannot_finish_with_partial_output():
    eng = fake_engine()
    eng.runner.gate.limit(0)
    with ServerThread(eng) as s, concurrent.futures.ThreadPoolExecutor(4) as pool:
        plain = pool.submit(http, s.url, "/v1/completions",
                            {"prompt": "one", "max_tokens": 50, "logprobs": 0})
        streamed = pool.submit(http, s.url, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "two"}], "max_tokens": 50, "stream": True,
            "stream_options": {"include_usage": True}})
        native = pool.submit(http, s.url, "/generate",
                             {"inputs": "three", "parameters": {"max_new_tokens": 50}})
        wait_until(s, lambda: s.async_engine.num_in_flight == 3, "all admitted")
        eng.runner.gate.allow(4)   # a few tokens each, far from 50
        wait_until(s, lambda: s.async_engine.num_waiting == 0, "every request has output")
        assert start_drain(s, grace_s=0.2).result(HANG_GUARD_S) == 3   # all cut
        status, body = plain.result()
        choice = body["choices"][0]
        assert status == 200 and choice["finish_reason"] == "abort"
        assert 1 <= len(choice["text"]) < 50 and choice["text"] == expected_text("one", len(choice["text"]))
        assert body["usage"]["completion_tokens"] == len(choice["text"])
        assert len(choice["logprobs"]["token_logprobs"]) == len(choice["text"])
        assert body["error"]["code"] == "shutdown"
        status, raw = streamed.result()
        events = parse_sse(raw)
        assert status == 200 and events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "shutdown"
        final, usage = events[-4], events[-3]
        assert final["choices"][0]["finish_reason"] == "abort"
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-3]
                       if e.get("choices"))
        assert 1 <= len(text) < 50 and text == expected_text("<user>two<assistant>", len(text))
        assert usage["usage"]["completion_tokens"] == len(text)
        status, body = native.result()
        assert status == 200 and body["finish_reason"] == "abort" and body["error"]
        assert 1 <= body["count_output_tokens"] < 50
        assert body["generated_text"][0] == expected_text("three", body["count_output_tokens"])
        eng.runner.gate.open()   # the engine thread finishes its step and takes the aborts
        stats = s.stats()
        assert stats["num_free_pages"] == stats["num_total_pages"] and stats["num_running"] == 0
        assert http(s.url, "/health")[0] == 503


SERVE_SCRIPT = r"""
import asyncio, sys, threading
sys.path[:0] = sys.argv[1:3]
from fake_runner import fake_engine
from jaxserve.async_engine import AsyncEngine
from server.app import create_app, serve
from server.config import ServerConfig

eng = fake_engine()
eng.runner.gate.limit(0)

def control():   # the test paces the engine through stdin: "allow N" or "open"
    for line in sys.stdin:
        cmd, *n = line.split()
        eng.runner.gate.allow(int(n[0])) if cmd == "allow" else eng.runner.gate.open()
threading.Thread(target=control, daemon=True).start()
cfg = ServerConfig(port=0, shutdown_grace_s=600)
asyncio.run(serve(create_app(AsyncEngine(eng), cfg), cfg,
                  on_ready=lambda port: print("PORT", port, flush=True)))
print("EXITED", flush=True)
"""


def test_sigterm_drains_the_real_process():
    """`serve` in a subprocess: SIGTERM stops admission, the request that can finish does, a
    second SIGTERM cuts the one that cannot, then the process exits by itself."""
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.Popen([sys.executable, "-c", SERVE_SCRIPT, here, os.path.dirname(here)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("PORT"), line
        url = f"http://127.0.0.1:{int(line.split()[1])}"

        def control(cmd):
            proc.stdin.write(cmd + "\n")
            proc.stdin.flush()

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            short = pool.submit(http, url, "/v1/completions",
                                {"prompt": "short", "max_tokens": 3, "stream": True})
            long = pool.submit(http, url, "/v1/completions", {"prompt": "long", "max_tokens": 200})
            while http(url, "/health")[1].get("in_flight") != 2:
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            while http(url, "/health")[0] != 503:
                time.sleep(0.01)
            assert http(url, "/v1/completions", {"prompt": "late"})[0] == 503
            control("allow 8")   # enough for the short one, not the long one
            status, raw = short.result(HANG_GUARD_S)
            events = parse_sse(raw)
            assert status == 200 and events[-2]["choices"][0]["finish_reason"] == "length"
            assert "".join(e["choices"][0]["text"] for e in events[:-1]) == expected_text("short", 3)
            proc.send_signal(signal.SIGTERM)   # the second one cuts the grace short
            status, body = long.result(HANG_GUARD_S)
            assert status == 200 and body["choices"][0]["finish_reason"] == "abort"
            assert body["error"]["code"] == "shutdown"
            text = body["choices"][0]["text"]
            assert 1 <= len(text) < 200 and text == expected_text("long", len(text))
        control("open")   # the engine thread leaves its step and stops
        out, _ = proc.communicate(timeout=HANG_GUARD_S)
        assert proc.returncode == 0 and "EXITED" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
