"""Engine input/output: stop conditions, logprobs, chat template, bad input, CLI errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxserve.admission import AdmissionError
from jaxserve.config import ConfigError
from jaxserve.loader import CheckpointError, load_model
from jaxserve.sampling_params import SamplingParams


@pytest.mark.slow
def test_stop_string_cuts_text_and_stop_token_stops(default_engine):
    greedy = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    full = default_engine.generate(["Once upon a time"], greedy)[0]
    words = full.text.split()
    stop = words[len(words) // 2]
    cut = default_engine.generate(["Once upon a time"], SamplingParams(max_tokens=30, temperature=0.0,
                                                                      ignore_eos=True, stop=(stop,)))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(stop)]
    tok = full.token_ids[5]
    by_tok = default_engine.generate(["Once upon a time"], SamplingParams(
        max_tokens=30, temperature=0.0, ignore_eos=True, stop_token_ids=(tok,)))[0]
    assert by_tok.finish_reason == "stop"
    assert by_tok.token_ids == full.token_ids[:full.token_ids.index(tok) + 1]


@pytest.mark.slow
def test_eos_stops_unless_ignored(default_engine):
    prompt = default_engine.tokenizer.chat([{"role": "user", "content": "Say hi."}])
    out = default_engine.generate([prompt], SamplingParams(max_tokens=100, temperature=0.0))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] in default_engine.tokenizer.eos_ids
    assert "<|im_end|>" not in out.text
    ign = default_engine.generate([prompt], SamplingParams(max_tokens=len(out.token_ids) + 3,
                                                           temperature=0.0, ignore_eos=True))[0]
    assert ign.finish_reason == "length" and ign.token_ids[:len(out.token_ids)] == out.token_ids


@pytest.mark.slow
def test_logprobs_are_log_probabilities_of_greedy_choice(default_engine):
    out = default_engine.generate(["The sky is"], SamplingParams(max_tokens=5, temperature=0.0,
                                                                logprobs=True))[0]
    lps = np.array(out.new_logprobs)
    assert lps.shape == (len(out.token_ids),)
    assert np.all(lps <= 0) and np.all(lps > -20)


@pytest.mark.slow
def test_streamed_deltas_concatenate_to_text(default_engine):
    params = SamplingParams(max_tokens=20, temperature=0.0)
    default_engine.add_request("delta", "Translate to Japanese: good morning ->", params)
    pieces, final = [], None
    while default_engine.has_unfinished():
        for out in default_engine.step():
            pieces.append(out.new_text)
            final = out
    assert "".join(pieces) == final.text
    assert final.text == default_engine.tokenizer.decode(final.token_ids, skip_special_tokens=True)


@pytest.mark.slow
def test_bad_requests_are_rejected_with_clear_errors(default_engine):
    e = default_engine
    with pytest.raises(AdmissionError, match="maximum context length") as long:
        e.add_request("long", "word " * 600, SamplingParams(max_tokens=10))
    assert long.value.code == "context_length_exceeded"
    with pytest.raises(AdmissionError, match="maximum context length"):
        e.add_request("long2", "hi", SamplingParams(max_tokens=10_000))
    with pytest.raises(AdmissionError, match=r"must be in \[0, "):
        e.add_request("ids", [1, 2, 10**9], SamplingParams(max_tokens=2))
    with pytest.raises(AdmissionError, match="empty"):
        e.add_request("empty", [], SamplingParams(max_tokens=2))
    with pytest.raises(AdmissionError, match="unknown adapter"):
        e.add_request("ad", "hi", SamplingParams(max_tokens=2), adapter="nope")
    with pytest.raises(AdmissionError):
        SamplingParams(max_tokens=-1)
    with pytest.raises(AdmissionError):
        SamplingParams(top_p=0.0)
    assert not e.has_unfinished()
    assert e.stats()["num_free_pages"] == e.stats()["num_total_pages"]


@pytest.mark.slow
def test_abort_frees_pages(default_engine):
    e = default_engine
    e.add_request("a1", "Tell me a long story about dragons.", SamplingParams(max_tokens=50))
    e.add_request("a2", "And another one.", SamplingParams(max_tokens=50))
    e.step()
    e.step()
    e.abort("a1")
    e.abort("a2")
    e.abort("never-existed")
    assert not e.has_unfinished()
    assert e.stats()["num_free_pages"] == e.stats()["num_total_pages"]


def test_bad_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_model(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(str(bad))
    arch = tmp_path / "arch"
    arch.mkdir()
    (arch / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="unsupported architecture"):
        load_model(str(arch))
    nost = tmp_path / "nost"
    nost.mkdir()
    (nost / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2}))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_model(str(nost))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="cannot read GGUF"):
        load_model(str(junk))


def test_wrong_shape_in_checkpoint_is_named(tmp_path):
    from tests.tiny_models import make_hf_model
    make_hf_model("llama", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="w_gate has shape"):
        load_model(str(tmp_path))


def test_cli_errors_name_the_problem(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "jaxserve.cli", "generate", "--model", str(tmp_path / "nope"),
                        "--prompt", "hi"], capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_cli_generate_json(tmp_path):
    from tests.tiny_models import make_hf_model
    make_hf_model("llama", tmp_path)
    # A tokenizer for the tiny model: reuse the default model's (vocab ids < 512 are valid text).
    r = subprocess.run([sys.executable, "-m", "jaxserve.cli", "generate", "--prompt", "Hello",
                        "--max-tokens", "4", "--json", "--max-model-len", "128", "--num-pages", "16",
                        "--max-num-seqs", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    obj = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(obj["token_ids"]) == 4 and isinstance(obj["text"], str)
