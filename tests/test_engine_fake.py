"""The engine on the fake runner: admission (one error type), the output processor (every
finish reason, stop-string hold-back, detokenization) and the scheduler taking finishes from it."""
from __future__ import annotations

import pytest

from fake_runner import LOGPROB, expected_text, fake_engine
from jaxserve.admission import INVALID, OVERLOAD, UNKNOWN, AdmissionError
from jaxserve.sampling_params import SamplingParams
from scheduler import FinishReason, RequestRejected


def run(engine, rid, prompt, params, **kw):
    """All outputs of one request, stepping the engine until it finishes."""
    engine.add_request(rid, prompt, params, **kw)
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == rid]
    return outs


def test_length_finish_at_max_tokens_and_deltas_add_up():
    e = fake_engine()
    outs = run(e, "r", "hello", SamplingParams(max_tokens=7, logprobs=True))
    assert "".join(o.new_text for o in outs) == outs[-1].text == expected_text("hello", 7)
    assert [o.finish_reason for o in outs] == [None] * 6 + ["length"]
    assert all(o.new_logprobs == [LOGPROB] for o in outs)
    assert e.stats()["num_free_pages"] == e.stats()["num_total_pages"]


def test_default_max_tokens_fills_the_context_exactly():
    e = fake_engine(max_model_len=64)
    outs = run(e, "r", "x" * 10, SamplingParams(max_tokens=None))
    assert len(outs[-1].token_ids) == 64 - 10 and outs[-1].finish_reason == "length"


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_tokens_is_held_back_and_cut(include):
    text = expected_text("hello", 12)
    stop = text[5:8]     # three tokens long: it only shows up after three steps
    outs = run(fake_engine(), "r", "hello", SamplingParams(
        max_tokens=12, stop=(stop,), include_stop_str_in_output=include))
    want = text[:8] if include else text[:5]
    assert outs[-1].finish_reason == "stop" and outs[-1].text == want
    assert "".join(o.new_text for o in outs) == want
    assert all(stop not in o.text for o in outs[:-1])
    assert len(outs[-1].token_ids) == 8


def test_stop_token_and_eos_stop_without_their_text():
    text = expected_text("hello", 10)
    stop_tok = ord(text[3])
    outs = run(fake_engine(), "r", "hello", SamplingParams(max_tokens=10, stop_token_ids=(stop_tok,)))
    assert outs[-1].finish_reason == "stop" and outs[-1].token_ids[-1] == stop_tok
    assert outs[-1].text == text[:3]
    e = fake_engine()   # the CharTokenizer's EOS is id 0: make the runner emit it as token 2
    e.runner.run = _emit_at(e.runner.run, k=2, token=0)
    outs = run(e, "eos", "hello", SamplingParams(max_tokens=10))
    assert outs[-1].finish_reason == "stop" and outs[-1].token_ids[-1] == 0
    outs = run(e, "ign", "hello", SamplingParams(max_tokens=4, ignore_eos=True))
    assert outs[-1].finish_reason == "length" and 0 in outs[-1].token_ids
    # EOS as the last allowed token: "stop", as vLLM reports it, and its text is not shown
    outs = run(e, "last", "hello", SamplingParams(max_tokens=3))
    assert outs[-1].finish_reason == "stop" and outs[-1].token_ids[-1] == 0
    assert len(outs[-1].token_ids) == 3 and outs[-1].text == expected_text("hello", 2)


def _emit_at(run_fn, k: int, token: int):
    def run(plan):
        tokens, lps = run_fn(plan)
        return [token if t is not None and s.num_output_tokens == k else t
                for s, t in zip(plan.seqs, tokens)], lps
    return run


def test_scheduler_records_but_never_finishes():
    e = fake_engine()
    e.add_request("r", "hi", SamplingParams(max_tokens=1))
    plan = e.scheduler.schedule()
    tokens, _ = e.runner.run(plan)
    (seq,) = e.scheduler.update(plan, tokens)
    assert seq.num_output_tokens == seq.max_tokens and not seq.is_finished   # told, not decided
    e.scheduler.finish(seq, FinishReason.LENGTH)
    assert seq.finish_reason is FinishReason.LENGTH and not seq.block_table


def test_admission_refuses_with_one_error_type():
    e = fake_engine(max_model_len=64)
    cases = [
        (dict(prompt=[]), INVALID, "empty"),
        (dict(prompt="hi!"), None, None),
        (dict(prompt="hi!"), INVALID, "already running"),         # same request id
        (dict(prompt=[1, -3]), INVALID, "must be in"),
        (dict(prompt=["a"]), INVALID, "list of token ids"),
        (dict(prompt="x" * 60, max_tokens=10), INVALID, "context length"),
        (dict(prompt="x" * 64, max_tokens=None), INVALID, "context length"),
        (dict(prompt="hi", adapter="nope"), UNKNOWN, "unknown adapter"),
    ]
    for i, (kw, kind, match) in enumerate(cases):
        rid = "dup" if i in (1, 2) else f"r{i}"
        params = SamplingParams(max_tokens=kw.pop("max_tokens", 4))
        if kind is None:
            e.add_request(rid, kw.pop("prompt"), params, **kw)
            continue
        with pytest.raises(AdmissionError, match=match) as err:
            e.add_request(rid, kw.pop("prompt"), params, **kw)
        assert err.value.kind == kind
    assert len(e.output) == 1 and e.scheduler.num_waiting == 1


def test_policy_refusals_become_overload():
    e = fake_engine()

    def refuse(seq, now):
        raise RequestRejected("rate limit", retryable=True)
    e.scheduler.policy.add = refuse
    with pytest.raises(AdmissionError) as err:
        e.add_request("r", "hi", SamplingParams())
    assert err.value.kind == OVERLOAD and err.value.code == "request_rejected"
    assert not e.has_unfinished()


@pytest.mark.parametrize("kw,param", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"), (dict(seed=-1), "seed"),
    (dict(stop=("",)), "stop"), (dict(stop=("x",) * 17), "stop"),
    (dict(stop_token_ids=(-1,)), "stop_token_ids"),
])
def test_sampling_params_refuse_with_the_field_named(kw, param):
    with pytest.raises(AdmissionError) as err:
        SamplingParams(**kw)
    assert err.value.kind == INVALID and err.value.param == param


def test_abort_forgets_the_request_and_frees_its_pages():
    e = fake_engine()
    e.add_request("a", "abc", SamplingParams(max_tokens=50))
    e.step()
    e.abort("a")
    e.abort("never-existed")
    assert not e.has_unfinished() and e.step() == []
    assert e.stats()["num_free_pages"] == e.stats()["num_total_pages"]
