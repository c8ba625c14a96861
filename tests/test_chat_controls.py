"""Chat controls: chat_template (per request, and --chat-template at serve time),
chat_template_kwargs, add_generation_prompt, continue_final_message, documents and echo.
Each changes the prompt ids exactly as transformers' apply_chat_template does with the same
arguments (the reference, called directly); errors are 400s naming the field.
"""
from __future__ import annotations

import types

import pytest

from chat_model import QWEN_TEMPLATE, make_tool_model, tool_engine
from jaxserve.admission import AdmissionError
from jaxserve.tokenizer import Tokenizer
from server.chat import load_chat_template, parse_chat_prompt
from server.config import ServerConfig
from server.protocol import ApiError
from test_server_fake import http

MSGS = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a color."}]
PREFILL = MSGS + [{"role": "assistant", "content": "The color is"}]
PLAIN = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
         "{% if add_generation_prompt %}[assistant] {% endif %}{{ suffix | default('') }}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat_model")
    make_tool_model(path)
    return path


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_dir))


def reference(hf, messages, **kw) -> list[int]:
    return list(hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kw))


def prompt(hf, body: dict, **config) -> tuple[list[int], object]:
    """What the chat endpoint's parser makes of `body`: (prompt ids, the turn)."""
    ctx = types.SimpleNamespace(config=ServerConfig(**config), tokenizer=Tokenizer(hf, {2}))
    ids, turn, _ = parse_chat_prompt(ctx, body)
    return ids, turn


# ------------------------------------------------------------------ the prompt ids
def test_default_is_the_models_template_with_a_generation_prompt(hf):
    ids, turn = prompt(hf, {"messages": MSGS})
    assert ids == reference(hf, MSGS, add_generation_prompt=True)
    assert turn.role == "assistant" and turn.echo == ""


def test_add_generation_prompt_false(hf):
    ids, turn = prompt(hf, {"messages": MSGS, "add_generation_prompt": False})
    assert ids == reference(hf, MSGS, add_generation_prompt=False)
    assert ids != prompt(hf, {"messages": MSGS})[0]
    assert turn.role == "user"          # vLLM: without a generation prompt, the last role


def test_continue_final_message(hf):
    body = {"messages": PREFILL, "add_generation_prompt": False, "continue_final_message": True}
    ids, turn = prompt(hf, body)
    ref = reference(hf, PREFILL, continue_final_message=True)
    assert ids == ref and hf.decode(ids).endswith("The color is")
    assert ids != reference(hf, PREFILL, add_generation_prompt=False)   # not closed
    assert turn.role == "assistant"


def test_chat_template_kwargs_reach_the_template(hf):
    plain = prompt(hf, {"messages": MSGS})[0]
    ids, _ = prompt(hf, {"messages": MSGS, "chat_template_kwargs": {"enable_thinking": False}})
    assert ids == reference(hf, MSGS, add_generation_prompt=True, enable_thinking=False)
    assert ids != plain and hf.decode(ids).endswith("<think>\n\n</think>\n\n")


def test_request_chat_template_with_the_trust_flag(hf):
    body = {"messages": MSGS, "chat_template": PLAIN, "chat_template_kwargs": {"suffix": "ok"}}
    ids, _ = prompt(hf, body, trust_request_chat_template=True)
    assert ids == reference(hf, MSGS, chat_template=PLAIN, add_generation_prompt=True,
                            suffix="ok")
    assert hf.decode(ids) == "[system] Be brief.\n[user] Name a color.\n[assistant] ok"
    with pytest.raises(ApiError) as e:   # as vLLM: refused without the flag
        prompt(hf, body)
    assert e.value.param == "chat_template" and "--trust-request-chat-template" in str(e.value)


def test_serve_time_chat_template(hf, tmp_path):
    ids, _ = prompt(hf, {"messages": MSGS}, chat_template=PLAIN)
    assert ids == reference(hf, MSGS, chat_template=PLAIN, add_generation_prompt=True)
    path = tmp_path / "t.jinja"
    path.write_text(PLAIN)
    assert load_chat_template(str(path)) == PLAIN == load_chat_template(PLAIN)
    for bad_value in ("no/such/file.jinja", "{% if %}"):
        with pytest.raises(ValueError):
            load_chat_template(bad_value)
    from server.cli import add_arguments, build_configs
    import argparse
    from jaxserve.cli import add_engine_arguments
    p = argparse.ArgumentParser()
    add_engine_arguments(p)
    add_arguments(p)
    args = p.parse_args(["--chat-template", str(path), "--tool-call-parser", "hermes",
                         "--enable-auto-tool-choice"])
    cfg = build_configs(args)[2]
    assert (cfg.chat_template, cfg.tool_call_parser, cfg.enable_auto_tool_choice) == \
        (PLAIN, "hermes", True)


def test_documents_reach_the_template(hf):
    docs = [{"title": "Colors", "text": "Red is a color."}]
    template = ("{% for d in documents %}<doc {{ d.title }}>{{ d.text }}{% endfor %}"
                "{% for m in messages %}{{ m.content }}{% endfor %}")
    ids, _ = prompt(hf, {"messages": MSGS, "documents": docs, "chat_template": template},
                    trust_request_chat_template=True)
    assert ids == reference(hf, MSGS, documents=docs, chat_template=template,
                            add_generation_prompt=True)
    assert "<doc Colors>Red is a color." in hf.decode(ids)


def test_echo_follows_vllms_role_rule(hf):
    assert prompt(hf, {"messages": MSGS, "echo": True})[1].echo == ""   # user != assistant
    body = {"messages": PREFILL, "add_generation_prompt": False, "continue_final_message": True,
            "echo": True}
    assert prompt(hf, body)[1].echo == "The color is"
    body = {"messages": MSGS, "add_generation_prompt": False, "echo": True}
    assert prompt(hf, body)[1].echo == "Name a color."


@pytest.mark.parametrize("body, param", [
    ({"add_generation_prompt": True, "continue_final_message": True}, "continue_final_message"),
    ({"continue_final_message": True}, "continue_final_message"),
    ({"chat_template": "{% for m in messages %}"}, "chat_template"),              # syntax
    ({"chat_template": "{{ raise_exception('no system messages') }}"}, "chat_template"),
    ({"chat_template": "{{ messages[0].content | no_such_filter }}"}, "chat_template"),
    ({"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"tokenize": False}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
    ({"add_generation_prompt": "yes"}, "add_generation_prompt"),
    ({"echo": 1}, "echo"),
    ({"documents": "text"}, "documents"),
])
def test_errors_name_the_field(hf, body, param):
    with pytest.raises((ApiError, AdmissionError)) as e:
        prompt(hf, {"messages": MSGS, **body}, trust_request_chat_template=True)
    assert e.value.param == param, e.value


def test_template_errors_without_a_request_template_blame_the_messages(hf):
    ids = prompt(hf, {"messages": [{"role": "tool", "content": "x"}]})[0]   # accepted
    assert ids
    strict = "{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    with pytest.raises(AdmissionError) as e:
        prompt(hf, {"messages": MSGS}, chat_template=strict)
    assert e.value.param == "messages" and "user first" in str(e.value)


# ------------------------------------------------------------------ through the server
@pytest.fixture(scope="module")
def srv(model_dir):
    from server_harness import ServerThread
    engine = tool_engine(model_dir)
    with ServerThread(engine, ServerConfig(trust_request_chat_template=True)) as s:
        s.model = engine.model_name
        yield s


def chat(srv, **body):
    return http(srv.url, "/v1/chat/completions", {"model": srv.model, "max_tokens": 5,
                                                  "temperature": 0, **body})


def test_controls_over_http_use_the_same_prompt(srv, hf):
    for body, ref in [
            ({"messages": MSGS}, reference(hf, MSGS, add_generation_prompt=True)),
            ({"messages": MSGS, "add_generation_prompt": False},
             reference(hf, MSGS, add_generation_prompt=False)),
            ({"messages": PREFILL, "add_generation_prompt": False,
              "continue_final_message": True},
             reference(hf, PREFILL, continue_final_message=True)),
            ({"messages": MSGS, "chat_template_kwargs": {"enable_thinking": False}},
             reference(hf, MSGS, add_generation_prompt=True, enable_thinking=False)),
            ({"messages": MSGS, "chat_template": PLAIN},
             reference(hf, MSGS, chat_template=PLAIN, add_generation_prompt=True))]:
        status, out = chat(srv, **body)
        assert status == 200, out
        assert out["usage"]["prompt_tokens"] == len(ref), body


def test_echo_over_http_streamed_and_not(srv):
    body = dict(messages=PREFILL, add_generation_prompt=False, continue_final_message=True,
                echo=True)
    status, out = chat(srv, **body)
    assert status == 200, out
    message = out["choices"][0]["message"]
    status, plain = chat(srv, **{**body, "echo": False})
    assert message["role"] == "assistant"
    assert message["content"] == "The color is" + plain["choices"][0]["message"]["content"]
    from server_harness import parse_sse
    status, raw = chat(srv, **body, stream=True)
    events = [e for e in parse_sse(raw) if e != "[DONE]"]
    first = events[0]["choices"][0]["delta"]
    assert first == {"role": "assistant", "content": "The color is"}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == message["content"]
    # add_generation_prompt false: the response's role is the last message's
    status, out = chat(srv, messages=MSGS, add_generation_prompt=False, echo=True)
    assert out["choices"][0]["message"]["role"] == "user"
    assert out["choices"][0]["message"]["content"].startswith("Name a color.")


def test_bad_template_is_a_400_naming_it(srv):
    for body, param in [({"chat_template": "{% for %}"}, "chat_template"),
                        ({"chat_template": "{{ raise_exception('nope') }}"}, "chat_template"),
                        ({"add_generation_prompt": True, "continue_final_message": True},
                         "continue_final_message"),
                        ({"chat_template_kwargs": {"tokenize": False}}, "chat_template_kwargs")]:
        status, out = chat(srv, messages=MSGS, **body)
        assert status == 400 and out["error"]["param"] == param, (body, out)
