"""A fake runner under the real LLMEngine: hand-computable tokens, no model, nothing compiled.

`fake_engine()` is the real engine (admission, scheduler, output processor, detokenizer,
adapter registry) on a FakeRunner and a CharTokenizer:
  - tokenizer: one token per character, id = code point (0 is EOS);
  - the k-th generated token (k = 0, 1, ...) of a sequence is the letter
    chr(ord('a') + (sum(prompt_ids) + k + shift) % 26), shift = len(adapter name) (0 for the
    base model), so adapter routing is visible in the text; its log-probability is LOGPROB.
Tests pace the engine thread with `runner.gate` (steps it may run) instead of sleeping.
"""
from __future__ import annotations

import collections
import json
import threading

import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.engine import EngineConfig, LLMEngine
from jaxserve.tokenizer import Tokenizer
from scheduler import StepPlan

LOGPROB = -0.5
FAKE_MODEL = ModelConfig(vocab_size=0x110000, hidden_size=8, intermediate_size=16, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=4, max_position_embeddings=4096)


class CharTokenizer:
    eos_token_id = 0
    chat_template = "<{role}>{content} ... <assistant>"

    def __len__(self) -> int:
        return 0x110000

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens: bool = False, **kw) -> str:
        return "".join(chr(i) for i in ids if i)

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        text += "<assistant>" if add_generation_prompt else ""
        return self(text)["input_ids"] if tokenize else text


def char_tokenizer() -> Tokenizer:
    return Tokenizer(CharTokenizer(), eos_ids=frozenset({0}))


def expected_text(prompt: str, n: int, adapter: str | None = None) -> str:
    base = sum(ord(c) for c in prompt) + (len(adapter) if adapter else 0)
    return "".join(chr(ord("a") + (base + k) % 26) for k in range(n))


class StepGate:
    """How many more steps the runner may run (None: any number); run() waits for a permit."""

    def __init__(self):
        self._cv = threading.Condition()
        self._left: int | None = None

    def limit(self, n: int) -> None:
        with self._cv:
            self._left = n

    def allow(self, n: int) -> None:
        with self._cv:
            self._left = (self._left or 0) + n
            self._cv.notify_all()

    def open(self) -> None:
        with self._cv:
            self._left = None
            self._cv.notify_all()

    def take(self) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self._left is None or self._left > 0)
            if self._left is not None:
                self._left -= 1


class FakeRunner:
    def __init__(self):
        self.gate = StepGate()
        self.num_steps = 0
        self.num_failing_steps = 0   # the next N steps raise, like a device failure
        self.client_of: dict[int, str] = {}     # seq_id -> client id, as the runner saw it
        self.threads: set[int] = set()

    @property
    def clients_seen(self) -> collections.Counter:
        """Sequences per client id that reached the runner."""
        return collections.Counter(self.client_of.values())

    def warmup(self) -> float:
        return 0.0

    def run(self, plan: StepPlan) -> tuple[list[int | None], list[float | None]]:
        self.gate.take()
        self.threads.add(threading.get_ident())
        self.num_steps += 1
        if self.num_failing_steps:
            self.num_failing_steps -= 1
            raise RuntimeError("injected step failure")
        tokens: list[int | None] = []
        for i, seq in enumerate(plan.seqs):
            self.client_of[seq.seq_id] = seq.client_id
            if not plan.samples(i):
                tokens.append(None)
                continue
            shift = len(seq.adapter) if seq.adapter else 0
            k = seq.num_total_tokens - seq.num_prompt_tokens - 1   # this token's index
            tokens.append(ord("a") + (sum(seq.prompt_token_ids) + k + shift) % 26)
        return tokens, [None if t is None else LOGPROB for t in tokens]


class OverlapFakeRunner(FakeRunner):
    """A FakeRunner the engine overlaps steps on: `launch` computes a step's tokens (they
    depend only on the sequences' counts, never on the previous step's tokens) and `collect`
    hands them over, so the engine processes step N after launching N+1."""

    def launch(self, plan: StepPlan, prev=None, feed=True):
        return self.run(plan)

    def collect(self, launched):
        return launched


def fake_engine(*, max_num_seqs: int = 4, num_pages: int = 512, page_size: int = 4,
                max_model_len: int = 256, scheduler: str = "vtc", overlap: bool = False,
                **kw) -> LLMEngine:
    """The real engine on a FakeRunner (`engine.runner`; an OverlapFakeRunner with `overlap`)
    and a CharTokenizer."""
    cfg = EngineConfig(max_num_seqs=max_num_seqs, num_pages=num_pages, page_size=page_size,
                       max_model_len=max_model_len, max_prefill_tokens=max_model_len,
                       scheduler=scheduler, max_lora_rank=8, **kw)
    runner = OverlapFakeRunner() if overlap else FakeRunner()
    return LLMEngine(cfg, runner=runner, tokenizer=char_tokenizer(),
                     model_config=FAKE_MODEL, model_name="fake-model")


def write_adapter(path, cfg: ModelConfig = FAKE_MODEL, rank: int = 2, seed: int = 0) -> None:
    """A PEFT LoRA adapter (q_proj, v_proj) for `cfg`, in PEFT's file layout."""
    from safetensors.numpy import save_file
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i in range(cfg.num_layers):
        for mod, out in (("q_proj", cfg.q_size), ("v_proj", cfg.kv_size)):
            key = f"base_model.model.model.layers.{i}.self_attn.{mod}"
            tensors[f"{key}.lora_A.weight"] = rng.normal(size=(rank, cfg.hidden_size)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = rng.normal(size=(out, rank)).astype(np.float32)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"], "bias": "none", "task_type": "CAUSAL_LM"}))


class Spy:
    """Counts calls of some engine methods and the threads they came from."""

    def __init__(self, engine, *names: str):
        self.calls: collections.Counter = collections.Counter()
        self.threads: set[int] = set()
        for name in names:
            setattr(engine, name, self._wrap(name, getattr(engine, name)))

    def _wrap(self, name, fn):
        def wrapped(*args, **kw):
            self.calls[name] += 1
            self.threads.add(threading.get_ident())
            return fn(*args, **kw)
        return wrapped
