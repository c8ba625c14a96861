"""Helpers for the server tests: a real server on a loopback port in a background thread, and
one real engine per test process (loading and compiling it is the expensive part)."""
from __future__ import annotations

import asyncio
import functools
import json
import threading

from aiohttp import web

from jaxserve.async_engine import AsyncEngine, AsyncEngineConfig
from server.app import create_app
from server.config import ServerConfig
from server.connections import ServingRunner

# Small enough to compile quickly on 2 CPU cores; max_prefill_tokens = max_model_len so that
# no prompt in these tests needs chunked prefill.
REAL_ENGINE_KW = dict(dtype="float32", max_num_seqs=8, max_model_len=512, num_pages=320, max_prefill_tokens=512,
                      page_size=16)


@functools.lru_cache(maxsize=1)
def shared_real_engine():
    from jaxserve.engine import EngineConfig, LLMEngine
    return LLMEngine(EngineConfig(**REAL_ENGINE_KW))


class ServerThread:
    """Runs create_app(...) on 127.0.0.1:<free port> with its own event loop in a thread."""

    def __init__(self, engine, config: ServerConfig = ServerConfig(),
                 async_config: AsyncEngineConfig = AsyncEngineConfig()):
        self.async_engine = AsyncEngine(engine, async_config)
        self.config = config
        self.app = create_app(self.async_engine, config)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="test-server")
        self.port = None

    def _serve(self):
        asyncio.set_event_loop(self.loop)
        self.runner = ServingRunner(self.app, self.config)   # as `serve` runs it
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())
        self.loop.close()

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        assert self._ready.wait(60), "server did not start"
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(60)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def on_loop(self, coro):
        """Run a coroutine on the server's loop (e.g. async_engine.stats()) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stats(self) -> dict:
        return self.on_loop(self.async_engine.stats())


def parse_sse(raw: bytes | str) -> list:
    """Events of an SSE body: parsed JSON objects, and the string '[DONE]'. Raises on any
    malformed framing (so a test using it checks well-formedness)."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    assert text.endswith("\n\n"), f"stream does not end with a blank line: {text[-80:]!r}"
    events = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data:"), f"bad SSE block {block!r}"
        payload = block[5:].strip()
        events.append("[DONE]" if payload == "[DONE]" else json.loads(payload))
    return events
