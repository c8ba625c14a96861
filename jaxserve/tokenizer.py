"""Text <-> token ids: the one owner of encoding, the chat template, EOS ids and decoding.

The server tokenizes once (its own copy, `Tokenizer.copy`, on the event loop) and hands token
ids to the engine; the engine's output processor detokenizes with `Tokenizer.detokenizer`.

Two incremental detokenizers, one interface (`step(all_ids) -> delta`, `flush(all_ids)`):
- `ByteDetokenizer`, the fast path, for tokenizers whose decode concatenates per-token bytes
  (byte-level BPE; SentencePiece-style Replace/ByteFallback/Fuse/Strip or Metaspace decoders).
  A table token id -> bytes (one per Tokenizer and its copies, each entry made the first time
  its id is seen) turns each new token into bytes; an incremental UTF-8 decoder emits every
  complete character and holds an incomplete one back.
  The work per step is the new tokens only.
- `IncrementalDetokenizer`, the general method, for any other tokenizer: decodes a short
  window of tokens (a few tokens of context before the new ones) so leading spaces come out
  right, and holds back text while the window ends in U+FFFD (an incomplete UTF-8 sequence)
  until the next token completes it. Two `decode` calls per step.
"""
from __future__ import annotations

import codecs
import copy
import json
import os
import re
import threading

from jaxserve.admission import AdmissionError

CONTEXT_TOKENS = 5


def load_tokenizer(model):
    """The HF tokenizer of a LoadedModel (its directory, or its GGUF file)."""
    from transformers import AutoTokenizer
    try:
        if model.gguf_file:
            return AutoTokenizer.from_pretrained(model.tokenizer_dir, gguf_file=model.gguf_file)
        return AutoTokenizer.from_pretrained(model.tokenizer_dir)
    except Exception as e:
        raise ValueError(f"cannot load a tokenizer from {model.tokenizer_dir}: {e}") from None


def eos_token_ids(hf, model_dir: str | None = None) -> frozenset[int]:
    """The tokenizer's EOS id plus generation_config.json's eos_token_id(s)."""
    ids = set()
    if hf.eos_token_id is not None:
        ids.add(int(hf.eos_token_id))
    gen_cfg = os.path.join(model_dir, "generation_config.json") if model_dir else None
    if gen_cfg and os.path.exists(gen_cfg):
        with open(gen_cfg) as f:
            eos = json.load(f).get("eos_token_id")
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(e) for e in eos)
    return frozenset(ids)


class Tokenizer:
    """Wraps an HF-style tokenizer (`__call__(text)["input_ids"]`, `apply_chat_template`,
    `decode`). Not thread-safe: each thread that tokenizes uses its own `copy()`."""

    def __init__(self, hf, eos_ids: frozenset[int]):
        self.hf = hf
        self.eos_ids = frozenset(eos_ids)
        # The fast path's byte table: built on first use, shared with every copy().
        self._bytes_table = _LazyByteTable(hf)

    @classmethod
    def from_model(cls, model) -> "Tokenizer":
        hf = load_tokenizer(model)
        return cls(hf, eos_token_ids(hf, None if model.gguf_file else model.tokenizer_dir))

    def copy(self) -> "Tokenizer":
        twin = Tokenizer(copy.deepcopy(self.hf), self.eos_ids)
        twin._bytes_table = self._bytes_table
        return twin

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (without the tokenizer's BOS/EOS with add_special_tokens=False);
        text that is not valid Unicode (a lone surrogate, which the server's parser already
        refuses) is an AdmissionError, not an encoder crash."""
        try:
            if not add_special_tokens:
                return list(self.hf(text, add_special_tokens=False)["input_ids"])
            return list(self.hf(text)["input_ids"])
        except UnicodeError as e:
            raise AdmissionError(f"the prompt is not valid Unicode text: {e}",
                                 param="prompt", code="invalid_unicode") from None

    def chat(self, messages: list[dict], *, tools: list[dict] | None = None,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False,
             template_kwargs: dict | None = None) -> list[int]:
        """Token ids of `messages` under the chat template (`chat_template`, else the model's),
        as transformers' apply_chat_template writes them: with the generation prompt, or with
        the last message left open (`continue_final_message`); `tools` and `template_kwargs`
        (e.g. enable_thinking) reach the template. Errors are AdmissionErrors naming the
        request field at fault (chat_template, chat_template_kwargs, continue_final_message,
        else messages)."""
        template = chat_template or getattr(self.hf, "chat_template", None)
        if not template:
            raise AdmissionError("this model has no chat template; use /v1/completions or "
                                 "send 'chat_template'", param="messages")
        if chat_template is not None:
            check_template_syntax(chat_template)
        # only what differs from the defaults: tokenizers that are not transformers' (the
        # tests' fakes) take just the messages and add_generation_prompt
        kw = dict(template_kwargs or {})
        if tools:
            kw["tools"] = tools
        if chat_template is not None:
            kw["chat_template"] = chat_template
        if continue_final_message:
            kw["continue_final_message"] = True
        try:
            ids = self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                              tokenize=True, **kw)
        except Exception as e:  # the template raises on shapes it does not accept
            raise AdmissionError(f"the chat template rejected these messages: "
                                 f"{type(e).__name__}: {e}",
                                 param=_template_error_param(e, chat_template, template_kwargs,
                                                             continue_final_message)) from None
        if hasattr(ids, "keys"):  # transformers may return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True,
               spaces_between_special_tokens: bool = True) -> str:
        # spaces_between_special_tokens reaches slow (Python) tokenizers; fast ones take no
        # such option and write special tokens without added spaces (as vLLM does with them).
        if spaces_between_special_tokens:
            return self.hf.decode(ids, skip_special_tokens=skip_special_tokens,
                                  clean_up_tokenization_spaces=False)
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens,
                              clean_up_tokenization_spaces=False,
                              spaces_between_special_tokens=False)

    def byte_table(self) -> "ByteTable | None":
        """The fast path's table (built on the first call), or None where it does not apply."""
        return self._bytes_table.get()

    def detokenizer(self, prompt_ids: list[int], skip_special_tokens: bool = True,
                    spaces_between_special_tokens: bool = True) -> "IncrementalDetokenizer":
        """The fast path where the byte table applies (special tokens skipped) and the prompt's
        context window ends on a character boundary; otherwise the windowed method."""
        if not skip_special_tokens or not spaces_between_special_tokens:
            return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens,
                                          spaces_between_special_tokens)
        table = self.byte_table()
        if table is not None:
            det = ByteDetokenizer.start(table, prompt_ids)
            if det is not None:
                return det
        return IncrementalDetokenizer(self, prompt_ids)


def check_template_syntax(template: str) -> None:
    """A Jinja syntax error in a chat template: an AdmissionError naming `chat_template`."""
    import jinja2
    try:   # transformers' own environment (its extensions: loop controls, {% generation %})
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        _compile_jinja_template = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse
    try:
        _compile_jinja_template(template)
    except jinja2.TemplateSyntaxError as e:
        raise AdmissionError(f"'chat_template' is not a valid Jinja template: {e} (line "
                             f"{e.lineno})", param="chat_template") from None


def _template_error_param(e: Exception, chat_template, template_kwargs,
                          continue_final_message) -> str:
    """The request field a failed render is blamed on."""
    text = str(e)
    if continue_final_message and "continue_final_message" in text:
        return "continue_final_message"
    if template_kwargs and (isinstance(e, TypeError)
                            or any(repr(k) in text or k in text for k in template_kwargs)):
        return "chat_template_kwargs"
    return "chat_template" if chat_template is not None else "messages"


class IncrementalDetokenizer:
    """Feed it the full token list (prompt + output) after each new token; get text deltas.
    This class is the general (windowed) method; `ByteDetokenizer` is the fast path."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int],
                 skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.prefix_offset = max(0, len(prompt_ids) - CONTEXT_TOKENS)
        self.read_offset = len(prompt_ids)
        self._options = dict(skip_special_tokens=skip_special_tokens,
                             spaces_between_special_tokens=spaces_between_special_tokens)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, **self._options)

    def step(self, all_ids: list[int]) -> str:
        decode = self.decode
        prefix_text = decode(all_ids[self.prefix_offset:self.read_offset])
        new_text = decode(all_ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(all_ids)
            return delta
        return ""

    def flush(self, all_ids: list[int]) -> str:
        """At the end of a request: whatever is still held back (even an incomplete char)."""
        decode = self.decode
        prefix_text = decode(all_ids[self.prefix_offset:self.read_offset])
        new_text = decode(all_ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(all_ids)
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""


# ---------------------------------------------------------------------------------------------
# The fast path: a table token id -> bytes for decoders that concatenate per-token bytes.

# tokenizers' ByteFallback decoder: a token of exactly 6 bytes "<0x..>" whose middle parses as
# a u8 in base 16 (Rust's from_str_radix, which also takes a leading "+").
_BYTE_TOKEN = re.compile(r"<0x(?:[0-9A-Fa-f]{2}|\+[0-9A-Fa-f])>\Z")


def _bytes_to_unicode() -> dict[int, int]:
    """GPT-2's byte -> printable code point map, which the ByteLevel decoder inverts."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
          + list(range(ord("\xae"), ord("\xff") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, cs))


def _bytewise_replace(err: UnicodeDecodeError):
    """One U+FFFD per invalid byte, as tokenizers' ByteFallback decoder writes a run of byte
    tokens that is not valid UTF-8."""
    return "\ufffd" * (err.end - err.start), err.end


codecs.register_error("jaxserve.bytewise_replace", _bytewise_replace)


def _decoder_spec(hf) -> dict | None:
    """What the fast path needs to know about `hf`'s decoder, or None where it does not apply:
    not a stock fast tokenizer, or a decoder other than those below.
    - ByteLevel (alone or alone in a Sequence): each token's chars map back to bytes (a token
      with a char outside the map, e.g. an added token, stands for its UTF-8).
    - Sequence[Replace("▁" -> " "), ByteFallback?, Fuse?, Strip(" ", 1, 0)?] (Llama 2, Mistral,
      Gemma): "▁" -> " ", "<0xHH>" -> that byte, and the decoded text loses one leading space.
    - Metaspace: replacement char -> " ", except in the first token, which loses them all
      (prepend_scheme other than "never")."""
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    except ImportError:
        return None
    cls = type(hf)
    # Our decode is hf.decode -> hf._decode -> the backend's decode; any override may differ.
    if not (isinstance(hf, PreTrainedTokenizerFast)
            and cls.decode is PreTrainedTokenizerBase.decode
            and cls._decode is PreTrainedTokenizerFast._decode):
        return None
    decoder = hf.backend_tokenizer.decoder
    if decoder is None:
        return None
    try:
        d = json.loads(decoder.__getstate__())
    except Exception:
        d = json.loads(hf.backend_tokenizer.to_str()).get("decoder")
    if not isinstance(d, dict):
        return None
    if d.get("type") == "Sequence" and len(d.get("decoders") or []) == 1:
        d = d["decoders"][0]
    if d.get("type") == "ByteLevel":
        return {"kind": "byte_level"}
    if d.get("type") == "Metaspace":
        scheme = d.get("prepend_scheme")
        if scheme is None:  # older serialisations
            scheme = "always" if d.get("add_prefix_space", True) else "never"
        repl = d.get("replacement")
        if not isinstance(repl, str) or len(repl) != 1:
            return None
        return {"kind": "metaspace", "replacement": repl, "strip_first": scheme != "never"}
    if d.get("type") != "Sequence":
        return None
    steps = [x.get("type") for x in d.get("decoders") or []]
    first = (d.get("decoders") or [{}])[0]
    if not steps or steps[0] != "Replace" or first.get("pattern") != {"String": "\u2581"} \
            or first.get("content") != " ":
        return None
    rest = steps[1:]
    byte_fallback = rest[:1] == ["ByteFallback"]
    rest = rest[1:] if byte_fallback else rest
    fused = rest[:1] == ["Fuse"]
    rest = rest[1:] if fused else rest
    strip = False
    if rest == ["Strip"] and fused:  # without Fuse, Strip would apply to every token
        st = d["decoders"][-1]
        if (st.get("content"), st.get("start"), st.get("stop")) != (" ", 1, 0):
            return None
        strip, rest = True, []
    if rest:
        return None
    return {"kind": "sentencepiece", "byte_fallback": byte_fallback, "strip_first": strip}


class ByteTable:
    """Token id -> the bytes `decode(..., skip_special_tokens=True)` writes for it (b"" for a
    special token or an id the vocabulary lacks). One per Tokenizer, shared by its copies and
    detokenizers. An entry is made the first time its token id is looked up, so the table
    costs nothing up front, however large the vocabulary.

    `strip` says what decode does at the start of the decoded text: None (nothing), "space"
    (one leading space dropped), "first_token" (every replacement char dropped from the first
    token it does not skip). `errors` is how invalid UTF-8 comes out (a codecs error handler)."""

    def __init__(self, hf, spec: dict):
        backend = hf.backend_tokenizer
        self._id_to_token = backend.id_to_token
        added = backend.get_added_tokens_decoder()
        # decode skips a token whose string is a special token's (and an id it does not know).
        special = {tok.content for tok in added.values() if tok.special}
        ids = {i for i, tok in added.items() if tok.special}
        for content in special:  # the model's own id for a special token's string
            i = backend.model.token_to_id(content)
            if i is not None and i not in added:
                ids.add(i)
        self.special_ids = frozenset(ids)
        self.kind = spec["kind"]
        if self.kind == "byte_level":
            inverse = {c: b for b, c in _bytes_to_unicode().items()}
            for o in range(256):  # a char below 256 outside the map must not pass as latin-1
                inverse.setdefault(o, 0x100)
            self._inverse = inverse
            self.errors, self.strip = "replace", None
        elif self.kind == "sentencepiece":
            self._byte_fallback = spec["byte_fallback"]
            # ByteFallback writes an invalid run of byte tokens as one U+FFFD per byte.
            self.errors = "jaxserve.bytewise_replace" if self._byte_fallback else "replace"
            self.strip = "space" if spec["strip_first"] else None
        else:  # metaspace
            self._replacement = spec["replacement"]
            self.errors = "replace"
            self.strip = "first_token" if spec["strip_first"] else None
        self.pieces: dict[int, bytes] = {}
        self.texts: dict[int, str] = {}  # the pieces that are complete UTF-8 on their own

    @classmethod
    def build(cls, hf) -> "ByteTable | None":
        spec = _decoder_spec(hf)
        return None if spec is None else cls(hf, spec)

    def token(self, tok: int) -> str | None:
        """The token's string as decode sees it, None where decode skips it."""
        if tok in self.special_ids or not 0 <= tok < 1 << 32:
            return None
        return self._id_to_token(tok)

    def piece(self, tok: int) -> bytes:
        p = self.pieces.get(tok)
        if p is None:
            s = self.token(tok)
            p = b"" if s is None else self._to_bytes(s)
            self.pieces[tok] = p
            try:
                self.texts[tok] = p.decode("utf-8")
            except UnicodeDecodeError:
                pass
        return p

    def first_piece(self, tok: int) -> bytes:
        """The piece of the first token decode does not skip (strip "first_token")."""
        return self.token(tok).replace(self._replacement, "").encode("utf-8")

    def _to_bytes(self, s: str) -> bytes:
        if self.kind == "byte_level":
            try:
                return s.translate(self._inverse).encode("latin-1")
            except UnicodeEncodeError:  # a char outside the map: the token's own UTF-8
                return s.encode("utf-8")
        if self.kind == "sentencepiece":
            s = s.replace("\u2581", " ")
            if self._byte_fallback and len(s) == 6 and _BYTE_TOKEN.match(s):
                return bytes((int(s[3:5], 16),))
            return s.encode("utf-8")
        return s.replace(self._replacement, " ").encode("utf-8")


class _LazyByteTable:
    """Builds a Tokenizer's ByteTable once, on first use, for it and all its copies."""

    def __init__(self, hf):
        self._hf = hf
        self._lock = threading.Lock()
        self._built = False
        self._table: ByteTable | None = None

    def get(self) -> ByteTable | None:
        if not self._built:
            with self._lock:
                if not self._built:
                    self._table = ByteTable.build(self._hf)
                    self._hf = None
                    self._built = True
        return self._table


class ByteDetokenizer(IncrementalDetokenizer):
    """The fast path: each new token's bytes go to an incremental UTF-8 decoder, which emits
    every complete character and holds back a trailing incomplete one (flush writes it as
    U+FFFD). A token that is complete UTF-8 on its own, when nothing is held, is its table text.
    It produces what the windowed method does, including where the output starts: the
    windowed method decodes the output after the prompt's last CONTEXT_TOKENS tokens, so a
    decoder that drops a leading space (or "▁"s in its first token) does so in the output only
    when those prompt tokens decode to nothing."""

    def __init__(self, table: ByteTable, consumed: int, at_start: bool):
        self.table = table
        self.consumed = consumed        # all_ids[:consumed] have been turned into bytes
        self.at_start = at_start        # the decoded text's start (see ByteTable.strip) is ahead
        self._held = False              # the decoder holds an incomplete character
        self._decoder = codecs.getincrementaldecoder("utf-8")(table.errors)

    @classmethod
    def start(cls, table: ByteTable, prompt_ids: list[int]) -> "ByteDetokenizer | None":
        """A detokenizer for the output after `prompt_ids`, or None where the prompt's context
        window ends inside a UTF-8 character (a character the prompt and the output share:
        the windowed method handles that case)."""
        window = prompt_ids[max(0, len(prompt_ids) - CONTEXT_TOKENS):]
        data = b"".join(table.piece(t) for t in window)
        probe = codecs.getincrementaldecoder("utf-8")(table.errors)
        probe.decode(data)
        if probe.getstate()[0]:
            return None
        if table.strip == "space":
            at_start = not data
        elif table.strip == "first_token":
            at_start = all(table.token(t) is None for t in window)
        else:
            at_start = False
        return cls(table, len(prompt_ids), at_start)

    def step(self, all_ids: list[int]) -> str:
        i = self.consumed
        if len(all_ids) == i + 1 and not (self.at_start or self._held):  # the common case
            self.consumed = i + 1
            t = all_ids[i]
            text = self.table.texts.get(t)
            return text if text is not None else self._feed(self.table.piece(t), False)
        return self._advance(all_ids, False)

    def flush(self, all_ids: list[int]) -> str:
        """At the end of a request: the rest, an incomplete character written as U+FFFD."""
        return self._advance(all_ids, True)

    def _advance(self, all_ids: list[int], final: bool) -> str:
        new_ids = all_ids[self.consumed:]
        self.consumed += len(new_ids)
        if len(new_ids) == 1 and not self.at_start:
            return self._feed(self.table.piece(new_ids[0]), final)
        return self._feed(self._bytes(new_ids), final)

    def _feed(self, data: bytes, final: bool) -> str:
        text = self._decoder.decode(data, final)
        self._held = bool(self._decoder.getstate()[0])
        return text

    def _bytes(self, new_ids: list[int]) -> bytes:
        table = self.table
        if not self.at_start:
            return b"".join(table.piece(t) for t in new_ids)
        out = []
        for t in new_ids:
            if not self.at_start:
                out.append(table.piece(t))
            elif table.strip == "space":
                p = table.piece(t)
                if p:
                    out.append(p[1:] if p[:1] == b" " else p)
                    self.at_start = False
            elif table.token(t) is not None:  # "first_token"
                out.append(table.first_piece(t))
                self.at_start = False
        return b"".join(out)
