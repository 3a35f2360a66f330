"""`ChatAgentMem`: a LangChain chat model on a local transformers LM with agentmem's unbounded KV
memory. Conversations render through the model's own chat template; tools are rendered by it and
parsed from the generated text; a conversation's session (from `session_id`, or LangGraph's
`thread_id`) keeps its tokens in memory, so a re-sent history is not prefilled again."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, Literal

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import ensure_config
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from agentmem import MemoryConfig, chat
from agentmem.chat import engine as _engine
from agentmem.chat import tools as _tools
from langchain_agentmem import _render, _structured

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
DEFAULT_MAX_TOKENS = 512
# What a call (or `bind`) may pass besides messages and stop.
CALL_KWARGS = frozenset(
    {"tools", "tool_choice", "session_id", "tenant", "model", "temperature", "top_p", "top_k",
     "seed", "max_tokens", "response_format", "config_thread_id"}
)  # fmt: skip


class ChatAgentMem(BaseChatModel):
    """A local chat model whose conversations live in agentmem's KV memory.

    Setup:
        `pip install langchain-agentmem` (with `agentmem-kv[qwen-0.5b]` for the default model).
        Nothing is downloaded: the model is a built-in one or a local directory.

    Key init args — model:
        model: a built-in model name (default `"qwen2.5-coder-0.5b-instruct"`) or the path of a
            transformers model directory with a chat template. Loaded on first use, once per
            process, and shared by every `ChatAgentMem` naming it.
        memory: the memory layout of new sessions (`agentmem.MemoryConfig`; default the model's).
        store: an `agentmem.Store`: sessions then outlive the process.
        tenant: the store's tenant of the sessions.
        session_id: the conversation; a call's `session_id=` wins, and without either the
            `thread_id` of LangGraph's config is used; no id at all: a fresh, discarded session.

    Key init args — generation:
        temperature: 0 or None: greedy (the default); above 0: sampled, with `top_p`, `top_k`
            and `seed`.
        max_tokens: the most tokens a reply may have (default 512).
        stop: strings that end a reply (not part of it).

    Accepted for LangChain's standard parameters, without effect on a local model:
    `timeout`, `max_retries`, `api_key`.

    Instantiate:
        ```python
        from langchain_agentmem import ChatAgentMem

        llm = ChatAgentMem(session_id="support-42", max_tokens=128)
        ```

    Invoke (a history re-sent on the next call is matched against the session, and only what
    is new is prefilled):
        ```python
        reply = llm.invoke([("system", "Be brief."), ("human", "Name a prime number.")])
        reply.usage_metadata  # input_tokens, output_tokens, input_token_details.cache_read
        reply.response_metadata  # model_name, finish_reason, session_id, forked, recalled...
        ```

    Stream:
        ```python
        for chunk in llm.stream("Count to five."):
            print(chunk.text, end="")
        ```

    Tool calling (rendered through the chat template, parsed from the reply; `tool_choice` "auto",
    "none", "any" or a tool's name, forced by the decoded prefix):
        ```python
        def get_weather(city: str) -> str:
            "The weather in a city."

        reply = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("Paris?")
        reply.tool_calls  # [{"name": "get_weather", "args": {"city": "Paris"}, ...}]
        ```

    Structured output (`method` "function_calling", the default: a forced tool call;
    "json_schema": a JSON object with the schema's keys; "json_mode": any JSON object; each
    enforced while the reply decodes):
        ```python
        class Person(BaseModel):
            name: str
            age: int

        llm.with_structured_output(Person, method="json_schema").invoke("Alice is 30.")
        ```

    JSON replies without a schema: `llm.bind(response_format={"type": "json_object"})`, or
    `{"type": "json_schema", "json_schema": {"schema": {...}}}` (OpenAI's shapes).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    model: str = Field(default=DEFAULT_MODEL, alias="model_name")
    memory: MemoryConfig | None = None
    store: Any = None
    tenant: str = "default"
    session_id: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    max_tokens: int | None = None
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    streaming: bool = False
    timeout: float | None = None
    max_retries: int | None = None
    api_key: SecretStr | None = None

    @property
    def _llm_type(self) -> str:
        return "agentmem-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "memory": self.memory.model_dump() if self.memory else None,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "max_tokens": self.max_tokens,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="agentmem",
            ls_model_name=kwargs.get("model") or self.model,
            ls_model_type="chat",
        )
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    def forget_session(self, session_id: str, *, tenant: str | None = None) -> bool:
        """Free this process's memory of the conversation `session_id` (of this model, store and
        tenant); False if it held none. With a store it stays stored and resumes on its next
        call; without one it is gone, and its next call starts afresh."""
        return _engine.forget(self.model, session_id, self.store, tenant or self.tenant)

    def get_token_ids(self, text: str) -> list[int]:
        """The ids of `text` in the model's own tokenizer (LangChain's default would fetch
        GPT-2's from the hub); `get_num_tokens` counts them."""
        tokenizer = _engine.language_model(self.model).tokenizer
        return tokenizer(text, add_special_tokens=False).input_ids

    # -- entry points: a call's own config names its LangGraph thread ------------------------------

    def invoke(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
               stop: list[str] | None = None, **kwargs: Any) -> AIMessage:  # fmt: skip
        return super().invoke(input, config, stop=stop, **_thread_of(config, kwargs))

    async def ainvoke(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
                      stop: list[str] | None = None, **kwargs: Any) -> AIMessage:  # fmt: skip
        return await super().ainvoke(input, config, stop=stop, **_thread_of(config, kwargs))

    def stream(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
               stop: list[str] | None = None, **kwargs: Any,
               ) -> Iterator[AIMessageChunk]:  # fmt: skip
        yield from super().stream(input, config, stop=stop, **_thread_of(config, kwargs))

    async def astream(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
                      stop: list[str] | None = None, **kwargs: Any,
                      ) -> AsyncIterator[AIMessageChunk]:  # fmt: skip
        async for chunk in super().astream(input, config, stop=stop, **_thread_of(config, kwargs)):
            yield chunk

    # -- tools -----------------------------------------------------------------------------------

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: str | dict | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Tools rendered through the chat template on every call of the returned runnable.

        `tool_choice`: "auto" (default: the model decides), "none" (no call: the call tag is
        never decoded), "any" / "required" / True (some call: the reply starts with a call and
        the tool's name is constrained to the bound ones), or a tool's name (that tool: the reply
        starts with its call)."""
        formatted = [convert_to_openai_tool(tool) for tool in tools]
        _tools.chosen_tool(tool_choice, [t["function"]["name"] for t in formatted])
        return super().bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: Literal["function_calling", "json_schema", "json_mode"] = "function_calling",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """A runnable whose replies are parsed into `schema`.

        Args:
            schema: A pydantic class (replies become its instances, validated by it), a
                `TypedDict` class, a JSON schema or an OpenAI tool schema (replies become dicts,
                checked for the schema's required keys and the JSON types of its top-level
                properties). Only `method="json_mode"` may leave it None (any JSON object).
            method: How the reply is made to fit, each enforced while it decodes:

                - `"function_calling"`: the schema is bound as the one tool and its call is
                  forced (`bind_tools(..., tool_choice="any")`); the call's arguments are
                  parsed.
                - `"json_schema"`: the reply is one JSON object (it starts with `{` and ends
                  where the object closes) whose top-level keys are the schema's properties,
                  and whose enum, const and boolean properties take their listed values; the
                  schema is given to the model in a system instruction after the history.
                - `"json_mode"`: the reply is one JSON object, its keys free; the prompt
                  says which (the schema, if any, only parses the reply).
            include_raw: If False, the parsed reply is returned and a parsing failure raises
                (`OutputParserException` for the JSON methods; pydantic's `ValidationError`
                for function calling, as LangChain's default does). If True, a dict with keys
                `raw` (the `AIMessage`), `parsed` (None on failure) and `parsing_error`.
            strict: Accepted for LangChain's interface; the constraints above apply whatever
                its value.
            kwargs: None are taken.

        Returns:
            A runnable taking what the chat model takes and returning the parsed reply (a
            pydantic instance or a dict), or the `include_raw` dict. Streamed, the JSON methods
            yield the object as far as decoded (a pydantic one once it validates).

        Example:
            ```python
            from pydantic import BaseModel


            class Person(BaseModel):
                name: str
                age: int


            structured = ChatAgentMem().with_structured_output(Person, method="json_schema")
            structured.invoke("Alice is 30 years old.")  # Person(name='Alice', age=30)
            ```
        """
        if kwargs:
            raise ValueError(f"with_structured_output got unsupported arguments {sorted(kwargs)}")
        if method not in _structured.METHODS:
            raise ValueError(
                f"method must be one of {', '.join(_structured.METHODS)}, got {method!r}"
            )
        if strict is not None and not isinstance(strict, bool):
            raise ValueError(f"strict must be True, False or None, got {strict!r}")
        if method == "function_calling":
            if schema is None:
                raise ValueError('method="function_calling" needs a schema to bind as a tool')
            return super().with_structured_output(schema, include_raw=include_raw)
        return _structured.json_output(self, schema, method=method, include_raw=include_raw)

    # -- calls -----------------------------------------------------------------------------------

    def _call(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict,
              run_manager: Any) -> chat.Reply:  # fmt: skip
        unknown = set(kwargs) - CALL_KWARGS
        if unknown:
            raise ValueError(
                f"ChatAgentMem got unknown call arguments {sorted(unknown)}; it takes "
                f"{', '.join(sorted(CALL_KWARGS))}"
            )
        session_id = kwargs.get("session_id") or self.session_id or kwargs.get("config_thread_id")
        if session_id is None:  # inside a LangGraph node: its thread
            session_id = ensure_config().get("configurable", {}).get("thread_id")
        if session_id is None and run_manager is not None:
            session_id = (run_manager.metadata or {}).get("thread_id")
        tools = list(kwargs.get("tools") or [])
        choice = kwargs.get("tool_choice")
        if not tools and choice not in (None, "auto", "none"):
            raise ValueError(f"tool_choice {choice!r} needs tools: use bind_tools(tools, ...)")
        json_format = chat.json_format(kwargs.get("response_format"))
        if json_format is not None and tools:
            raise ValueError(
                "ChatAgentMem replies in JSON (response_format) or with tool calls, not both: "
                "bind only one of them"
            )
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        sampling = {
            name: kwargs.get(name, getattr(self, name))
            for name in ("temperature", "top_p", "top_k", "seed")
        }
        return chat.Reply(
            model=kwargs.get("model") or self.model,
            messages=_render.template_messages(messages),
            stop=tuple(stop if stop is not None else self.stop or ()), tools=tools,
            tool_choice=choice, session_id=None if session_id is None else str(session_id),
            tenant=kwargs.get("tenant") or self.tenant, max_tokens=max_tokens, sampling=sampling,
            json=json_format, memory=self.memory,
        )  # fmt: skip

    def _events(self, call: chat.Reply, cancel: threading.Event | None = None):
        """The reply as `agentmem.chat.Event`s while it decodes, then the `Outcome`."""
        return chat.events(call, store=self.store, cancel=cancel)

    def _finish(self, call: chat.Reply, outcome: _engine.Outcome, called: bool) -> dict:
        usage = UsageMetadata(
            input_tokens=outcome.input_tokens, output_tokens=outcome.output_tokens,
            total_tokens=outcome.input_tokens + outcome.output_tokens,
            input_token_details={"cache_read": outcome.cached_tokens},
        )  # fmt: skip
        finish = outcome.finish_reason
        if called and finish == "stop":
            finish = "tool_calls"
        metadata = {
            "model_name": call.model, "model_provider": "agentmem", "finish_reason": finish,
            "session_id": outcome.session_id, "forked": outcome.forked,
            "prefilled_tokens": outcome.input_tokens - outcome.cached_tokens,
            "recalled": outcome.recalled, "recalled_messages": outcome.recalled_messages,
        }  # fmt: skip
        return {"usage_metadata": usage, "response_metadata": metadata}

    def _result(self, call: chat.Reply, cancel: threading.Event | None = None) -> ChatResult:
        done = chat.complete(call, store=self.store, cancel=cancel)
        calls = [c for c in done.tool_calls if c["type"] == "tool_call"]
        invalid = [c for c in done.tool_calls if c["type"] != "tool_call"]
        message = AIMessage(
            content=done.text, tool_calls=calls, invalid_tool_calls=invalid,
            additional_kwargs=_as_written(done.outcome, [c["id"] for c in calls + invalid]),
            **self._finish(call, done.outcome, bool(calls)),
        )  # fmt: skip
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _chunks(self, call: chat.Reply, cancel: threading.Event | None = None):
        called, ids = False, []
        for item in self._events(call, cancel):
            if isinstance(item, _engine.Outcome):
                last = AIMessageChunk(
                    content="", chunk_position="last", additional_kwargs=_as_written(item, ids),
                    **self._finish(call, item, called),
                )  # fmt: skip
                yield ChatGenerationChunk(message=last)
            elif item.call is None and item.name is None and item.args is None:
                yield ChatGenerationChunk(message=AIMessageChunk(content=item.text))
            else:  # a call begun, a piece of its arguments, or its end
                if item.call is not None:
                    called = called or item.call["type"] == "tool_call"
                    ids.append(item.call["id"])
                for piece in _tools.call_chunks(item):
                    chunk = AIMessageChunk(content="", tool_call_chunks=[piece])
                    yield ChatGenerationChunk(message=chunk)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self._result(self._call(messages, stop, kwargs, run_manager))

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for chunk in self._chunks(self._call(messages, stop, kwargs, run_manager)):
            if run_manager and chunk.message.content:
                run_manager.on_llm_new_token(chunk.message.content, chunk=chunk)
            yield chunk

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        """Runs in a worker thread (the event loop stays free); cancelling stops generation."""
        call = self._call(messages, stop, kwargs, run_manager)
        cancel = threading.Event()
        try:
            return await asyncio.to_thread(self._result, call, cancel)
        except asyncio.CancelledError:
            cancel.set()
            raise

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        """Decodes in a worker thread that hands chunks to the event loop as they come."""
        call = self._call(messages, stop, kwargs, run_manager)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def work() -> None:
            try:
                with contextlib.closing(self._chunks(call, cancel)) as chunks:
                    for chunk in chunks:
                        loop.call_soon_threadsafe(queue.put_nowait, ("chunk", chunk))
                        if cancel.is_set():
                            break
            except BaseException as e:  # handed to the awaiting side
                loop.call_soon_threadsafe(queue.put_nowait, ("error", e))
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, ("done", None))

        worker = loop.run_in_executor(None, contextvars.copy_context().run, work)
        try:
            while True:
                kind, item = await queue.get()
                if kind == "done":
                    break
                if kind == "error":
                    raise item
                if run_manager and item.message.content:
                    await run_manager.on_llm_new_token(item.message.content, chunk=item)
                yield item
        finally:
            cancel.set()
            await asyncio.shield(worker)


def _thread_of(config: RunnableConfig | None, kwargs: dict) -> dict:
    """The call's kwargs with the `thread_id` of its own config (LangChain passes a chat model
    only the config's callbacks, tags and metadata), below `session_id` and the field."""
    thread = ((config or {}).get("configurable") or {}).get("thread_id")
    if thread is None or "config_thread_id" in kwargs:
        return kwargs
    return {**kwargs, "config_thread_id": str(thread)}


def _as_written(outcome: _engine.Outcome, call_ids: list[str]) -> dict:
    """A reply with calls in the template's tags keeps the text they were parsed from, so that
    the history it goes back in renders the way the session's memory holds it (`_render`), not
    in the template's own spacing. Bare JSON calls are not kept: rendered as the template's
    calls, the next turn branches (a new prefill), but the model reads proper calls (the 0.5B
    model, shown its fenced JSON again, repeated the call instead of answering)."""
    if not call_ids or _tools.OPEN not in outcome.text:
        return {}
    return {"agentmem": {"text": outcome.text, "tool_call_ids": call_ids}}


__all__ = ["ChatAgentMem"]
