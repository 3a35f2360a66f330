"""Conversations in agentmem sessions: where the session id comes from, a re-sent history
prefilled only past what memory holds (counted), a diverging history answered from a branch (never
from the wrong past), stored sessions that outlive their ChatAgentMem, ToolMessages in memory."""

from __future__ import annotations

import pytest
from langchain_agentmem import ChatAgentMem, _render
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.runnables import RunnableLambda
from transformers import AutoTokenizer

import agentmem
from agentmem.chat import engine as _engine
from agentmem.chat import render as _chat_render
from agentmem.generate import Sampling

# A window that covers these short conversations: a reused prefix computes what a fresh
# prefill would (retrieval does not depend on how the tokens were chunked).
COVERING = agentmem.MemoryConfig(n_init=4, unit_size=16, topk=2, n_local=512, exec_chunk=64)
# A window smaller than the conversations: memory units are retrieved.
SMALL = agentmem.MemoryConfig(n_init=4, unit_size=16, topk=2, n_local=48, exec_chunk=16)


@pytest.fixture
def llm(tiny_model_dir) -> ChatAgentMem:
    return ChatAgentMem(model=tiny_model_dir, max_tokens=8, memory=COVERING)


def count(model_dir, messages, *, prompt=True) -> int:
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = tok.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
    return len(tok(text, add_special_tokens=False).input_ids)


def session_of(session_id: str):
    (th,) = [t for key, t in _engine._threads.items() if key[3] == session_id]
    return th.session


def test_a_resent_history_prefills_only_the_new_turn(llm, tiny_model_dir):
    turn1 = [SystemMessage("Be brief."), HumanMessage("What is the weather in Paris?")]
    first = llm.invoke(turn1, session_id="chat")
    held = first.usage_metadata["input_tokens"] + first.usage_metadata["output_tokens"]
    turn2 = [*turn1, first, HumanMessage("And in Rome?")]
    second = llm.invoke(turn2, session_id="chat")
    usage, meta = second.usage_metadata, second.response_metadata
    assert usage["input_token_details"]["cache_read"] == held  # everything memory held
    assert usage["input_tokens"] == count(tiny_model_dir, _dicts(turn2))
    # Prefilled: what the template adds after the first reply (its end, the new user turn and
    # the generation prompt), counted by the tokenizer on its own.
    assert meta["prefilled_tokens"] == usage["input_tokens"] - held
    closed = first.response_metadata["finish_reason"] == "stop"  # its <|im_end|> generated
    new_text = ("" if closed else "<|im_end|>") + "\n<|im_start|>user\nAnd in Rome?<|im_end|>\n"
    new_text += "<|im_start|>assistant\n"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert meta["prefilled_tokens"] == len(tok(new_text, add_special_tokens=False).input_ids)
    assert meta["prefilled_tokens"] < usage["input_tokens"] / 2
    assert meta["forked"] is False and meta["session_id"] == "chat"
    assert len(session_of("chat")) == usage["input_tokens"] + usage["output_tokens"]
    # The same answer as a fresh session prefilled with the whole history.
    assert second.content == llm.invoke(turn2).content


def test_a_history_edited_in_the_middle_is_answered_from_a_branch(llm):
    turn1 = [HumanMessage("What is the weather in Paris?")]
    first = llm.invoke(turn1, session_id="edit")
    second = llm.invoke([*turn1, first, HumanMessage("And Rome?")], session_id="edit")
    assert second.response_metadata["forked"] is False
    edited = [HumanMessage("What is the weather in Oslo?"), first, HumanMessage("And Rome?")]
    branch = llm.invoke(edited, session_id="edit")
    assert branch.response_metadata["forked"] is True
    assert branch.usage_metadata["input_token_details"]["cache_read"] == 0
    assert branch.content == llm.invoke(edited).content  # not from the Paris past
    # The branch is the conversation now: the next turn of the edited history reuses it.
    third = llm.invoke([*edited, branch, HumanMessage("Thanks.")], session_id="edit")
    assert third.response_metadata["forked"] is False
    assert third.usage_metadata["input_token_details"]["cache_read"] > 0


def test_regenerating_the_last_reply_does_not_see_the_old_one(llm):
    turn1 = [HumanMessage("hello world")]
    first = llm.invoke(turn1, session_id="retry")
    again = llm.invoke(turn1, session_id="retry")  # the same history without the reply
    assert again.response_metadata["forked"] is True
    assert again.content == first.content  # greedy: the same reply from the same past


def test_a_reply_held_in_other_tokens_than_the_tokenizer_would_give_still_matches(
    tiny_model_dir,
):
    # A model may spell its reply with other tokens than the tokenizer makes of the same text
    # (sent back as text by the history): the match is then made on the text.
    lm = _engine.language_model(tiny_model_dir)
    tok = lm.tokenizer
    asked = [{"role": "user", "content": "hello world"}]
    prompt = "".join(p.text for p in _chat_render.pieces(tok, asked, None))
    reply = "the quick dog"
    spelled = [i for ch in reply for i in tok(ch, add_special_tokens=False).input_ids]
    assert spelled != tok(reply, add_special_tokens=False).input_ids  # one token a character
    th = _engine.Thread(key=("m", None, "default", "s"), session=lm.session(progress=False))
    th.held = tok(prompt, add_special_tokens=False).input_ids + spelled
    th.session.append_tokens(th.held)
    history = [*asked, {"role": "assistant", "content": reply}, {"role": "user", "content": "ok"}]
    pieces = _chat_render.pieces(tok, history, None)
    request = _engine.Request(pieces=pieces, forced="", max_new_tokens=2, sampling=Sampling())
    plan = _engine.Run(lm, th, request, store=None, tenant="default")._plan(pieces)
    fed = [i for _, _, ids in plan for i in ids]
    rest = "".join(p.text for p in pieces)[len(prompt) + len(reply) :]
    assert rest.startswith("<|im_end|>\n<|im_start|>user\nok")
    assert fed == tok(rest, add_special_tokens=False).input_ids  # only what memory lacks


def test_session_id_precedence_kwarg_then_field_then_thread_id(tiny_model_dir):
    llm = ChatAgentMem(model=tiny_model_dir, max_tokens=4, memory=COVERING)
    hi = [HumanMessage("hi")]
    assert llm.invoke(hi).response_metadata["session_id"] is None  # ephemeral
    node = RunnableLambda(lambda messages: llm.invoke(messages))
    config = {"configurable": {"thread_id": "t-42"}}
    assert node.invoke(hi, config=config).response_metadata["session_id"] == "t-42"
    fielded = llm.model_copy(update={"session_id": "field"})
    node = RunnableLambda(lambda messages: fielded.invoke(messages))
    assert node.invoke(hi, config=config).response_metadata["session_id"] == "field"
    node = RunnableLambda(lambda messages: fielded.invoke(messages, session_id="kw"))
    assert node.invoke(hi, config=config).response_metadata["session_id"] == "kw"
    bound = llm.bind(session_id="bound")
    assert bound.invoke(hi).response_metadata["session_id"] == "bound"
    # A call's own config, as LangGraph passes it, streamed or not.
    assert llm.invoke(hi, config=config).response_metadata["session_id"] == "t-42"
    last = list(llm.stream(hi, config={"configurable": {"thread_id": "t-s"}}))[-1]
    assert last.response_metadata["session_id"] == "t-s"
    assert fielded.invoke(hi, config=config).response_metadata["session_id"] == "field"
    assert [r.response_metadata["session_id"] for r in llm.batch([hi, hi], config=config)] == [
        "t-42", "t-42"
    ]  # fmt: skip


async def test_thread_id_reaches_async_calls_too(tiny_model_dir):
    llm = ChatAgentMem(model=tiny_model_dir, max_tokens=4, memory=COVERING)

    async def node(messages):
        return await llm.ainvoke(messages)

    config = {"configurable": {"thread_id": "t-async"}}
    reply = await RunnableLambda(node).ainvoke([HumanMessage("hi")], config=config)
    assert reply.response_metadata["session_id"] == "t-async"
    assert (await llm.ainvoke("hi", config=config)).response_metadata["session_id"] == "t-async"
    last = [c async for c in llm.astream("hi", config=config)][-1]
    assert last.response_metadata["session_id"] == "t-async"


def test_tool_messages_stream_into_memory(llm):
    call = {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1", "type": "tool_call"}
    history = [
        HumanMessage("What is the weather in Paris?"),
        AIMessage("", tool_calls=[call]),
        ToolMessage("sunny, 24 C", tool_call_id="call_1"),
    ]
    llm.invoke(history, session_id="tools")
    roles = [(m.role, m.text) for m in session_of("tools").messages()]
    tool_text = [text for role, text in roles if role == "tool"]
    assert tool_text and "<tool_response>\nsunny, 24 C\n</tool_response>" in tool_text[0]
    assert any(role == "assistant" and '"name": "get_weather"' in text for role, text in roles)


def test_recalled_messages_name_where_retrieved_units_came_from(tiny_model_dir):
    llm = ChatAgentMem(model=tiny_model_dir, max_tokens=4, memory=SMALL)
    long_turn = "The quick brown fox jumps over the lazy dog. " * 12
    reply = llm.invoke([HumanMessage(long_turn), AIMessage("ok"), HumanMessage("hello")],
                       session_id="recall")  # fmt: skip
    meta = reply.response_metadata
    assert meta["recalled"], "a window smaller than the prompt retrieves units"
    for unit in meta["recalled"]:
        assert unit["end"] > unit["start"] and unit["layers"]
        for i in unit["messages"]:
            assert meta["recalled_messages"][i]["role"] in ("user", "assistant")
    named = {meta["recalled_messages"][i]["text"] for u in meta["recalled"] for i in u["messages"]}
    assert any(long_turn in text for text in named)


def test_stored_sessions_outlive_their_chat_model(tiny_model_dir, tmp_path):
    store = agentmem.Store(root=tmp_path / "store")
    llm = ChatAgentMem(model=tiny_model_dir, max_tokens=6, memory=COVERING, store=store)
    turn1 = [HumanMessage("What is the weather in Paris?")]
    first = llm.invoke(turn1, session_id="day1")
    _engine._threads.clear()  # as if in a new process: nothing in this one's memory
    again = ChatAgentMem(model=tiny_model_dir, max_tokens=6, memory=COVERING, store=store)
    turn2 = [*turn1, first, HumanMessage("And Rome?")]
    second = again.invoke(turn2, session_id="day1")
    held = first.usage_metadata["input_tokens"] + first.usage_metadata["output_tokens"]
    assert second.usage_metadata["input_token_details"]["cache_read"] == held  # resumed
    assert second.content == again.invoke(turn2).content
    # An edited history: a stored branch "day1:1", the original kept.
    edited = [HumanMessage("What is the weather in Oslo?"), first, HumanMessage("And Rome?")]
    branch = again.invoke(edited, session_id="day1")
    assert branch.response_metadata["forked"] is True
    assert branch.response_metadata["session_id"] == "day1:1"
    assert {s.id for s in store.sessions(tenant="default")} >= {"day1", "day1:1"}
    _engine._threads.clear()
    resumed = again.invoke([*edited, branch, HumanMessage("ok")], session_id="day1")
    assert resumed.response_metadata["session_id"] == "day1:1"  # the branch that agrees
    assert resumed.usage_metadata["input_token_details"]["cache_read"] > 0
    more = again.invoke([*edited, branch, HumanMessage("ok"), resumed, HumanMessage("bye")],
                        session_id="day1")  # fmt: skip
    assert more.response_metadata["session_id"] == "day1:1"
    assert more.response_metadata["forked"] is False
    store.close()


def test_a_stored_history_edited_in_the_middle_is_forked_where_it_diverges(
    tiny_model_dir, tmp_path
):
    store = agentmem.Store(root=tmp_path / "store")
    llm = ChatAgentMem(model=tiny_model_dir, max_tokens=8, memory=COVERING, store=store)
    turn1 = [SystemMessage("Be brief."), HumanMessage("What is the weather in Paris?")]
    first = llm.invoke(turn1, session_id="mid")
    turn2 = [*turn1, first, HumanMessage("And in Rome?")]
    second = llm.invoke(turn2, session_id="mid")
    original = session_of("mid")
    held = original.tokens + original.state_dict()["meta"]["session"]["pending"]
    # The second question edited, the turns after it kept.
    edited = [*turn1, first, HumanMessage("And in Oslo?"), second, HumanMessage("Thanks.")]
    lm = _engine.language_model(tiny_model_dir)
    pieces = _chat_render.pieces(lm.tokenizer, _dicts(edited), None)
    flat = [i for *_, ids in _engine._feeds(lm.tokenizer, pieces) for i in ids]
    common = _engine._common(held, flat)
    assert count(tiny_model_dir, _dicts(turn1)) < common < len(held)  # inside the second turn
    branch = llm.invoke(edited, session_id="mid")
    usage, meta = branch.usage_metadata, branch.response_metadata
    assert meta["forked"] is True and meta["session_id"] == "mid:1"
    assert usage["input_tokens"] == len(flat)
    assert usage["input_token_details"]["cache_read"] == common  # the branch had them from the fork
    assert meta["prefilled_tokens"] == len(flat) - common < len(flat) / 2
    # It shares the save of the first turn (the stored tokens up to the edit fed from there).
    shared, parent = [s.file for s in store.segments("mid:1")], store.segments("mid")
    assert shared[0] == parent[0].file and parent[1].file not in shared
    assert branch.content == llm.invoke(edited).content  # a fresh session's answer: not Rome's
    assert store.session_info("mid").tokens == len(held)  # the original is kept as it was
    store.close()


def _dicts(messages):
    return _render.template_messages(messages)


def test_a_tool_call_reply_sent_back_is_not_prefilled_again(llm):
    # The model may write a call in other words than the template renders calls (a small
    # model fences bare JSON); the reply keeps its text, and the history renders it so.
    from langchain_core.tools import tool

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    bound = llm.bind_tools([add], tool_choice="add")
    asked = [HumanMessage("Add 2 and 3.")]
    first = bound.invoke(asked, session_id="calls")
    calls = first.tool_calls + first.invalid_tool_calls
    assert calls and first.additional_kwargs["agentmem"]["tool_call_ids"] == [calls[0]["id"]]
    result = ToolMessage("5", tool_call_id=calls[0]["id"])
    second = llm.bind_tools([add]).invoke([*asked, first, result], session_id="calls")
    held = first.usage_metadata["input_tokens"] + first.usage_metadata["output_tokens"]
    assert second.response_metadata["forked"] is False
    assert second.usage_metadata["input_token_details"]["cache_read"] == held
    # Streamed, the aggregate keeps the text as well.
    chunks = list(bound.stream(asked, session_id="calls-streamed"))
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole += chunk
    assert (
        whole.additional_kwargs["agentmem"]["text"] == first.additional_kwargs["agentmem"]["text"]
    )


def test_forgetting_a_session_frees_it(llm):
    asked = [HumanMessage("hello world")]
    first = llm.invoke(asked, session_id="gone")
    assert llm.forget_session("gone") is True and not _engine._threads
    assert llm.forget_session("gone") is False
    again = llm.invoke([*asked, first, HumanMessage("more")], session_id="gone")
    assert again.usage_metadata["input_token_details"]["cache_read"] == 0  # started afresh
