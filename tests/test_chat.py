"""agentmem.chat on the tiny chat model: a reply is recorded as a message of its own, a turn of
new messages follows what the session holds, and they render as the whole conversation would."""

from __future__ import annotations

import pytest

from agentmem import chat, testing
from agentmem.chat import engine, render


@pytest.fixture(scope="module")
def model() -> str:
    return testing.model_dir()


@pytest.fixture(autouse=True)
def _no_conversations():
    engine._threads.clear()
    yield
    engine._threads.clear()


def turn(model: str, text: str, **kwargs) -> chat.Reply:
    return chat.Reply(
        model=model, messages=[{"role": "user", "content": text}], max_tokens=6, **kwargs
    )


def test_a_reply_is_recorded_as_an_assistant_message(model):
    done = chat.complete(turn(model, "hello", session_id="s"))
    (th,) = engine._threads.values()
    *_, prompt, reply = th.session.messages()
    assert prompt.text == "<|im_start|>assistant\n" and reply.role == "assistant"
    assert reply.text == done.text and reply.end - reply.start == done.outcome.output_tokens


def test_new_messages_follow_what_the_session_holds(model):
    first = chat.complete(turn(model, "hello", session_id="s"))
    second = chat.complete(turn(model, "and then?", session_id="s", may_be_new=True))
    o = second.outcome
    assert o.appended and not o.forked
    assert o.cached_tokens == first.outcome.input_tokens + first.outcome.output_tokens
    # The same tokens as the whole conversation sent in one go, in a session of its own.
    whole = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "and then?"},
    ]
    alone = chat.complete(chat.Reply(model=model, messages=whole, max_tokens=6, session_id="w"))
    held = {th.key[3]: th.held for th in engine._threads.values()}
    assert held["s"][: o.input_tokens] == held["w"][: alone.outcome.input_tokens]
    assert second.text == alone.text


def test_the_whole_conversation_is_matched_not_appended(model):
    first = chat.complete(turn(model, "hello", session_id="s"))
    history = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "more"},
    ]
    again = chat.Reply(model=model, messages=history, max_tokens=4, session_id="s", may_be_new=True)
    o = chat.complete(again).outcome
    assert not o.appended and not o.forked
    assert o.cached_tokens == first.outcome.input_tokens + first.outcome.output_tokens


def test_a_continuation_renders_as_the_tail_of_the_whole(model):
    tok = chat.language_model(model).tokenizer
    before = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    new = [{"role": "user", "content": "c"}]
    whole = render.render(tok, before + new, None, prompt=True)
    tail = "".join(p.text for p in render.continuation(tok, new, None))
    assert whole.endswith(tail) and tail.startswith("<|im_start|>user\nc")
    assert render.reply_end(tok) == "<|im_end|>\n"  # ChatML's, after a reply's text
