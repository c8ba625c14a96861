"""A fake LLMEngine with hand-computable outputs, for server tests that need no model.

Tokenizer: one token per character, id = code point (0 is EOS). Output: the k-th generated
token (k = 0, 1, ...) of a request is the letter chr(ord('a') + (sum(prompt_ids) + k + shift) % 26)
where shift is len(adapter name) (0 for the base model), so adapter routing is visible in the text.
KV pages: page_size tokens each; a request holds ceil((prompt + generated) / page_size) pages
from admission until it finishes or is aborted; at most max_num_seqs run at once.
"""
from __future__ import annotations

import collections
import math
import threading
import time
from dataclasses import dataclass, field

from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams


class CharTokenizer:
    eos_token_id = 0

    def __len__(self) -> int:
        return 0x110000

    def __call__(self, text: str) -> dict:
        return {"input_ids": self.encode(text)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids if i)

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        text += "<assistant>" if add_generation_prompt else ""
        return self.encode(text) if tokenize else text


def expected_text(prompt: str, n: int, adapter: str | None = None) -> str:
    base = sum(ord(c) for c in prompt) + (len(adapter) if adapter else 0)
    return "".join(chr(ord("a") + (base + k) % 26) for k in range(n))


@dataclass
class _Req:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    client_id: str
    adapter: str | None
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    pages: int = 0


class FakeEngineNoLora:
    """The fake engine without LoRA management methods (as the engine was before multi-LoRA)."""

    def __init__(self, *, max_num_seqs: int = 4, num_pages: int = 256, page_size: int = 4,
                 max_model_len: int = 256, step_delay_s: float = 0.0):
        self.tokenizer = CharTokenizer()
        self.model_name = "fake-model"
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.num_pages = num_pages
        self.page_size = page_size
        self.step_delay_s = step_delay_s
        self.free_pages = num_pages
        self.waiting: collections.deque[_Req] = collections.deque()
        self.running: dict[str, _Req] = {}
        self.all_ids: set[str] = set()
        self.loras: dict[str, str] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.clients_seen: collections.Counter = collections.Counter()
        self.owner_thread: int | None = None   # the only thread allowed to call us
        self.num_aborted = 0
        self.num_has_unfinished_calls = 0
        self.num_failing_steps = 0   # the next N steps raise (after admitting), like a crash

    def _check_thread(self):
        me = threading.get_ident()
        if self.owner_thread is None:
            self.owner_thread = me
        assert self.owner_thread == me, "engine called from two threads"

    def apply_chat_template(self, messages):
        return self.tokenizer.apply_chat_template(messages)

    def add_request(self, request_id, prompt, params, *, client_id="anonymous", adapter=None):
        self._check_thread()
        if request_id in self.all_ids:
            raise ValueError(f"duplicate request id {request_id!r}")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("empty prompt")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError("prompt + max_tokens exceeds the context")
        if adapter is not None and adapter not in self.loras:
            raise ValueError(f"unknown adapter {adapter!r}")
        self.all_ids.add(request_id)
        self.clients_seen[client_id] += 1
        self.waiting.append(_Req(request_id, ids, params, client_id, adapter))

    def abort(self, request_id):
        self._check_thread()
        req = self.running.pop(request_id, None)
        if req is not None:
            self.free_pages += req.pages
            self.num_aborted += 1
            return
        for r in list(self.waiting):
            if r.rid == request_id:
                self.waiting.remove(r)
                self.num_aborted += 1

    def has_unfinished(self):
        self.num_has_unfinished_calls += 1
        return bool(self.waiting or self.running)

    def _pages(self, req: _Req) -> int:
        return math.ceil((len(req.prompt_ids) + len(req.out_ids) + 1) / self.page_size)

    def step(self):
        self._check_thread()
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            need = self._pages(req)
            if need > self.free_pages:
                break
            self.waiting.popleft()
            req.pages = need
            self.free_pages -= need
            self.running[req.rid] = req
            self.prompt_tokens_total += len(req.prompt_ids)
        if self.num_failing_steps:
            self.num_failing_steps -= 1
            raise RuntimeError("injected step failure")
        outputs = []
        for rid, req in list(self.running.items()):
            need = self._pages(req)
            if need > req.pages:
                self.free_pages -= need - req.pages
                req.pages = need
            shift = len(req.adapter) if req.adapter else 0
            tok = ord("a") + (sum(req.prompt_ids) + len(req.out_ids) + shift) % 26
            req.out_ids.append(tok)
            self.generation_tokens_total += 1
            new_text = chr(tok)
            full = req.text + new_text
            finish = None
            for s in req.params.stop:
                if s in full:
                    new_text = full[:full.index(s)][len(req.text):]
                    full = full[:full.index(s)]
                    finish = "stop"
            req.text = full
            if finish is None and len(req.out_ids) >= req.params.max_tokens:
                finish = "length"
            outputs.append(RequestOutput(
                request_id=rid, new_token_ids=[tok], new_text=new_text, text=req.text,
                token_ids=list(req.out_ids), num_prompt_tokens=len(req.prompt_ids),
                finished=finish is not None, finish_reason=finish,
                new_logprobs=[-0.5] if req.params.logprobs else None))
            if finish is not None:
                del self.running[rid]
                self.free_pages += req.pages
        return outputs

    def stats(self):
        self._check_thread()
        running, waiting = collections.Counter(), collections.Counter()
        for r in self.running.values():
            if r.adapter:
                running[r.adapter] += 1
        for r in self.waiting:
            if r.adapter:
                waiting[r.adapter] += 1
        return {"num_running": len(self.running), "num_waiting": len(self.waiting),
                "num_free_pages": self.free_pages, "num_total_pages": self.num_pages,
                "kv_usage": 1 - self.free_pages / self.num_pages,
                "prompt_tokens_total": self.prompt_tokens_total,
                "generation_tokens_total": self.generation_tokens_total,
                "running_adapters": dict(running), "waiting_adapters": dict(waiting),
                "scheduler": {"policy": "fake", "clients": {
                    c: {"num_requests": n} for c, n in self.clients_seen.items()}}}


class FakeEngine(FakeEngineNoLora):
    def add_lora(self, name, path):
        self._check_thread()
        if name in self.loras:
            raise ValueError(f"adapter {name!r} exists")
        self.loras[name] = path

    def remove_lora(self, name):
        self._check_thread()
        if name not in self.loras:
            raise KeyError(name)
        del self.loras[name]

    def list_loras(self):
        return dict(self.loras)
