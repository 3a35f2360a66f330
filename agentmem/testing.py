"""For tests of chat on agentmem (its own, the LangChain integration's, the server's): a tiny
random-weight Qwen2 with a byte-level BPE tokenizer and Qwen2.5's chat template (with tools),
saved once per process as a model directory that `agentmem.load(path)` (and `ChatAgentMem(model=
path)`, `agentmem serve --model path`) loads; nothing touches the network."""

from __future__ import annotations

import atexit
import functools
import shutil
import socket
import tempfile
import threading
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

# Qwen2.5-Instruct's template (as the built-in qwen2.5-coder models ship it), shortened defaults.
CHATML = """{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}\
{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}\
{{- "\\n\\n# Tools\\n\\n<tools>" }}{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}\
{%- endfor %}{{- "\\n</tools>\\n\\nFor each function call, return a json object within \
<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": \
<args-json-object>}\\n</tool_call><|im_end|>\\n" }}{%- else %}{%- if messages[0]['role'] == \
'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}\
{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- endif %}\
{%- for message in messages %}{%- if (message.role == "user") or (message.role == "system" and \
not loop.first) or (message.role == "assistant" and not message.tool_calls) %}\
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\
{%- elif message.role == "assistant" %}{{- '<|im_start|>' + message.role }}\
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}\
{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}\
{%- set tool_call = tool_call.function %}{%- endif %}{{- '\\n<tool_call>\\n{"name": "' }}\
{{- tool_call.name }}{{- '", "arguments": ' }}{{- tool_call.arguments | tojson }}\
{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}{%- elif message.role == "tool" %}\
{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\
{{- '<|im_start|>user' }}{%- endif %}{{- '\\n<tool_response>\\n' }}{{- message.content }}\
{{- '\\n</tool_response>' }}{%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\
{{- '<|im_end|>\\n' }}{%- endif %}{%- endif %}{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

TEXT = (
    "You are a helpful assistant. What is the weather in Paris? It is sunny and warm. "
    'Call {"name": "get_weather", "arguments": {"city": "Paris"}} and tell me. '
    "The quick brown fox jumps over the lazy dog; hello world, the answer is 42.\n"
) * 20


def chatml_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with Qwen's special tokens and template, over the bytes of its ASCII
    training text only: any reply of the random model decodes to valid text, losslessly."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.add_tokens(["<tool_call>", "</tool_call>"])  # not special: they stay in decoded text
    fast.chat_template = CHATML
    return fast


def tiny_qwen(tokenizer) -> Qwen2ForCausalLM:
    torch.manual_seed(1)  # a seed whose greedy replies vary (seed 0 repeats one word)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # sharper than the random init, so that greedy output varies
        for name, param in model.named_parameters():
            if "proj" in name:
                param.mul_(4.0)
    model.generation_config.eos_token_id = config.eos_token_id
    return model


@functools.cache
def model_dir() -> str:
    """The tiny model saved in a temporary directory (once per process, removed at its exit)."""
    out = tempfile.mkdtemp(prefix="agentmem-tiny-qwen-")
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    tokenizer = chatml_tokenizer()
    tiny_qwen(tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_server(app, port: int, timeout_s: float = 600):
    """Serve an ASGI `app` (`agentmem.server.app.create_app`) with uvicorn on loopback in a
    thread of this process; returns (server, thread) once it listens (its model is loaded).
    Stop it with `server.should_exit = True` and `thread.join()`."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    return server, thread
