"""A tiny random Llama with a real BPE tokenizer (the embedded SmolLM2's, read from its GGUF)
and a Qwen 2.5-style chat template with tools (Hermes <tool_call> format), for the chat and
tool tests: its outputs can spell JSON, so tool-call constraints can be checked end to end."""
from __future__ import annotations

import functools
import os

# Qwen 2.5's chat template (tools in the system prompt, <tool_call> / <tool_response>), with
# Qwen 3's empty think block when the template variable enable_thinking is false.
QWEN_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
"""


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    """The embedded model's tokenizer (from its GGUF file, as the engine reads it)."""
    from transformers import AutoTokenizer
    from jaxserve.loader import default_model_path
    p = default_model_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(p), gguf_file=os.path.basename(p))


def make_tool_model(path, seed: int = 0):
    """Save a tiny random Llama (SmolLM2's 49152-token vocabulary) and the tokenizer with
    QWEN_TEMPLATE as its chat template to `path`; return the HF tokenizer."""
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = copy.deepcopy(smollm2_tokenizer())
    tok.chat_template = QWEN_TEMPLATE
    tok.save_pretrained(str(path))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name
                    else torch.randn_like(p) / p.shape[-1] ** 0.5)
    model.save_pretrained(str(path), safe_serialization=True)
    return tok


def tool_engine(path):
    """A small engine on the model at `path`."""
    from jaxserve.engine import EngineConfig, LLMEngine
    return LLMEngine(EngineConfig(model=str(path), dtype="float32", max_num_seqs=4,
                                  max_model_len=1024, num_pages=256, max_prefill_tokens=1024,
                                  page_size=16))
