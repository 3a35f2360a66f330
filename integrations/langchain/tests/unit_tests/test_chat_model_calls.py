"""ChatAgentMem on the tiny random model: invoke, stream, async, sampling, stop strings, max
tokens, usage and response metadata, rendering through the chat template."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from langchain_agentmem import ChatAgentMem
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage
from transformers import AutoTokenizer

from agentmem.chat import engine as _engine

HI = [SystemMessage("Be brief."), HumanMessage("What is the weather in Paris?")]


@pytest.fixture
def llm(tiny_model_dir) -> ChatAgentMem:
    return ChatAgentMem(model=tiny_model_dir, max_tokens=12)


def prompt_ids(model_dir, messages, tools=None) -> list[int]:
    """The prompt as the tokenizer renders it on its own: what ChatAgentMem must feed."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = tok.apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=False
    )
    return tok(text, add_special_tokens=False).input_ids


def test_invoke_reports_usage_and_metadata(llm, tiny_model_dir):
    reply = llm.invoke(HI)
    assert isinstance(reply, AIMessage) and isinstance(reply.content, str)
    want = prompt_ids(
        tiny_model_dir,
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "What is the weather in Paris?"}],
    )  # fmt: skip
    usage = reply.usage_metadata
    assert usage["input_tokens"] == len(want)
    assert 1 <= usage["output_tokens"] <= 12
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["input_token_details"] == {"cache_read": 0}  # an ephemeral session
    meta = reply.response_metadata
    assert meta["model_name"] == tiny_model_dir
    assert meta["finish_reason"] in ("stop", "length")
    assert meta["finish_reason"] == ("length" if usage["output_tokens"] == 12 else "stop")
    assert meta["session_id"] is None and meta["forked"] is False
    assert meta["prefilled_tokens"] == len(want)


def test_the_model_is_loaded_once_and_shared(tiny_model_dir):
    a = ChatAgentMem(model=tiny_model_dir, max_tokens=2)
    b = ChatAgentMem(model=tiny_model_dir, max_tokens=3)
    a.invoke("hello")
    b.invoke("hello")
    assert list(_engine._models).count(tiny_model_dir) == 1


def test_constructing_loads_nothing():
    ChatAgentMem(model="/nonexistent/model")  # loads on the first call, not here
    with pytest.raises(ValueError, match="neither a built-in model"):
        ChatAgentMem(model="/nonexistent/model").invoke("hi")


def test_greedy_is_deterministic_and_temperature_zero_is_greedy(llm):
    first = llm.invoke(HI).content
    assert llm.invoke(HI).content == first
    assert llm.invoke(HI, temperature=0.0).content == first
    assert first  # the random model does say something here


def test_sampling_follows_its_seed(llm):
    kwargs = {"temperature": 1.5, "top_k": 50, "top_p": 0.95}
    a = llm.invoke(HI, seed=1, **kwargs)
    assert llm.invoke(HI, seed=1, **kwargs).content == a.content
    others = {llm.invoke(HI, seed=s, **kwargs).content for s in range(2, 7)}
    assert len(others | {a.content}) > 1  # draws, not argmax
    greedy = llm.invoke(HI).content
    assert llm.invoke(HI, temperature=1.5, top_k=1, seed=3).content == greedy


def test_invalid_sampling_is_refused_where_it_enters(llm):
    with pytest.raises(ValueError, match="top_p"):
        llm.invoke(HI, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="max_tokens"):
        llm.invoke(HI, max_tokens=0)
    with pytest.raises(ValueError, match="unknown call arguments"):
        llm.invoke(HI, temprature=0.5)


def test_max_tokens_cuts_the_reply_with_finish_reason_length(llm):
    reply = llm.invoke(HI, max_tokens=3)
    assert reply.usage_metadata["output_tokens"] == 3
    assert reply.response_metadata["finish_reason"] == "length"


def test_a_stop_string_ends_the_reply_without_it(llm):
    full = llm.invoke(HI, max_tokens=12).content
    assert len(full) >= 6
    stop = full[3:5]
    reply = llm.invoke(HI, stop=[stop], max_tokens=12)
    assert reply.content == full[: full.find(stop)]
    assert reply.response_metadata["finish_reason"] == "stop"
    streamed = "".join(c.content for c in llm.stream(HI, stop=[stop], max_tokens=12))
    assert streamed == reply.content  # the held-back tail never leaks a stop string's start


def test_stream_yields_the_invoke_reply_in_pieces(llm):
    reply = llm.invoke(HI)
    chunks = list(llm.stream(HI))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert len([c for c in chunks if c.content]) > 1  # token by token, not one piece
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole += chunk
    assert whole.content == reply.content
    assert chunks[-1].chunk_position == "last"
    assert whole.usage_metadata["output_tokens"] == reply.usage_metadata["output_tokens"]
    assert whole.usage_metadata["input_tokens"] == reply.usage_metadata["input_tokens"]
    assert whole.response_metadata["finish_reason"] == reply.response_metadata["finish_reason"]


def test_streaming_field_routes_invoke_through_stream(tiny_model_dir):
    plain = ChatAgentMem(model=tiny_model_dir, max_tokens=8).invoke(HI)
    streamed = ChatAgentMem(model=tiny_model_dir, max_tokens=8, streaming=True).invoke(HI)
    assert streamed.content == plain.content


async def test_async_invoke_and_stream_match_sync(llm):
    reply = llm.invoke(HI)
    assert (await llm.ainvoke(HI)).content == reply.content
    pieces = [c.content async for c in llm.astream(HI)]
    assert "".join(pieces) == reply.content and len(pieces) > 2


async def test_async_calls_leave_the_event_loop_free(llm):
    ticks = 0
    done = asyncio.Event()

    async def ticker():
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    task = asyncio.create_task(ticker())
    started = time.perf_counter()
    await llm.ainvoke(HI, max_tokens=12)
    async for _ in llm.astream(HI, max_tokens=12):
        pass
    elapsed = time.perf_counter() - started
    done.set()
    await task
    # A blocking call inside the coroutine would have let the ticker run about twice.
    assert ticks > 10 and elapsed > 0.01


async def test_concurrent_async_calls_give_the_sequential_answers(tiny_model_dir):
    llm = ChatAgentMem(model=tiny_model_dir, max_tokens=8)
    prompts = [[HumanMessage(f"hello {i}")] for i in range(3)]
    want = [llm.invoke(p, session_id=f"seq-{i}").content for i, p in enumerate(prompts)]
    got = await asyncio.gather(
        *(llm.ainvoke(p, session_id=f"par-{i}") for i, p in enumerate(prompts))
    )
    assert [g.content for g in got] == want


def test_concurrent_calls_on_one_session_take_turns(tiny_model_dir):
    llm = ChatAgentMem(model=tiny_model_dir, max_tokens=6, session_id="shared")
    errors, replies = [], []

    def call(i):
        try:
            replies.append(llm.invoke([HumanMessage(f"question {i}")]))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(replies) == 4
    th = next(iter(_engine._threads.values()))
    assert len(th.session) == len(th.held)  # the bookkeeping held under contention


def test_batch_runs_every_input(llm):
    replies = llm.batch([HI, [HumanMessage("hello")]])
    assert [r.content for r in replies] == [llm.invoke(HI).content, llm.invoke("hello").content]


def test_a_model_without_a_chat_template_is_a_clear_error(tmp_path, tiny_model_dir):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    tok = AutoTokenizer.from_pretrained(bare)
    if tok.chat_template is not None:  # kept in tokenizer_config.json
        import json

        config = json.loads((bare / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (bare / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has no chat template"):
        ChatAgentMem(model=str(bare)).invoke("hi")


def test_non_text_content_is_refused_clearly(llm):
    image = {"type": "image", "url": "https://example.com/a.png"}
    with pytest.raises(ValueError, match="reads text only"):
        llm.invoke([HumanMessage(content=[{"type": "text", "text": "see"}, image])])


def test_standard_params_name_the_provider_and_model(llm, tiny_model_dir):
    params = llm._get_ls_params(stop=["x"], temperature=0.3)
    assert params["ls_provider"] == "agentmem"
    assert params["ls_model_name"] == tiny_model_dir
    assert params["ls_temperature"] == 0.3 and params["ls_max_tokens"] == 12
    assert params["ls_stop"] == ["x"]


def test_tokens_are_counted_with_the_models_own_tokenizer(llm, tiny_model_dir):
    text = "What is the weather in Paris?"
    want = AutoTokenizer.from_pretrained(tiny_model_dir)(text, add_special_tokens=False).input_ids
    assert llm.get_token_ids(text) == want  # offline: LangChain's default would fetch GPT-2's
    assert llm.get_num_tokens(text) == len(want)
