"""The OpenAI chat-completions dialect `agentmem serve` speaks: the request body (pydantic, so that
the OpenAPI schema describes it and a bad one gets a 400 that says what is wrong), and the body
as the `agentmem.chat.Reply` it asks for."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from agentmem.chat import Reply, formats, tools

MAX_TOKENS = 32768  # the most a reply may ask for
DEFAULT_MAX_TOKENS = 512


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI's other fields (logprobs...) are ignored


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str = Field(min_length=1)
    arguments: str  # JSON, as OpenAI sends it


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Body):
    include_usage: bool = False


class ChatCompletionRequest(_Body):
    """POST /v1/chat/completions. Beside OpenAI's fields: `session_id` (or the X-Session-ID
    header) names the conversation's memory, and `top_k`."""

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    stop: str | list[str] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    seed: int | None = None
    n: int | None = Field(default=None, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    response_format: dict[str, Any] | None = None
    session_id: str | None = Field(default=None, min_length=1, max_length=200)


def reply(body: ChatCompletionRequest, *, model: str, session_id: str | None, tenant: str) -> Reply:
    """The reply a request asks for; raises `ApiError` (400) for what no reply can be."""
    _check_text(body.model_dump(exclude_none=True), "")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise ApiError(400, "stop takes at most 4 non-empty strings", param="stop")
    offered = [t.model_dump(exclude_none=True) for t in body.tools or []]
    names = [t["function"]["name"] for t in offered]
    if len(set(names)) != len(names):
        raise ApiError(400, "two tools have the same name", param="tools")
    choice: Any = body.tool_choice
    sent = choice.function.name if isinstance(choice, NamedToolChoice) else choice
    if isinstance(choice, NamedToolChoice):
        choice = choice.function.name
    elif choice == "required":
        choice = "any"
    if offered:
        try:
            tools.chosen_tool(choice, names)
        except ValueError as e:
            raise ApiError(400, str(e), param="tool_choice") from None
    elif choice not in (None, "auto", "none"):
        raise ApiError(400, f"tool_choice {sent!r} needs tools", param="tool_choice")
    try:
        json_format = formats.json_format(body.response_format)
    except ValueError as e:
        raise ApiError(400, str(e), param="response_format") from None
    if json_format is not None and offered:
        raise ApiError(400, "a reply is JSON (response_format) or calls tools, not both")
    max_tokens = body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS
    return Reply(
        model=model,
        messages=template_messages(body.messages),
        max_tokens=max_tokens,
        tools=offered,
        tool_choice=choice,
        json=json_format,
        stop=tuple(stop),
        sampling={
            "temperature": body.temperature,
            "top_p": body.top_p,
            "top_k": body.top_k,
            "seed": body.seed,
        },
        session_id=session_id,
        tenant=tenant,
        may_be_new=session_id is not None,
    )


def template_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """OpenAI's messages as the chat template's dicts: text content, calls' arguments as
    objects, each tool result named after the call it answers."""
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # call id -> tool name
    for i, m in enumerate(messages):
        text = (
            m.content
            if isinstance(m.content, str)
            else "".join(part.text for part in m.content or [])
        )
        role = "system" if m.role == "developer" else m.role
        entry: dict[str, Any] = {"role": role, "content": text}
        if m.role == "assistant" and m.tool_calls:
            entry["tool_calls"] = []
            for call in m.tool_calls:
                names[call.id] = call.function.name
                entry["tool_calls"].append(
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {
                            "name": call.function.name,
                            "arguments": _arguments(call.function.arguments),
                        },
                    }
                )
        elif m.role == "tool":
            if not m.tool_call_id:
                raise ApiError(
                    400,
                    f"messages[{i}]: a tool message needs tool_call_id",
                    param=f"messages[{i}].tool_call_id",
                )
            entry["tool_call_id"] = m.tool_call_id
            entry["name"] = m.name or names.get(m.tool_call_id, "")
        elif m.content is None:
            raise ApiError(
                400, f"messages[{i}] ({m.role}) has no content", param=f"messages[{i}].content"
            )
        out.append(entry)
    return out


def _check_text(value: Any, where: str) -> None:
    """No string of the body holds a NUL or a lone surrogate (JSON lets `\\u0000` and
    `\\ud800` through): the store keeps text as UTF-8, without NULs."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ApiError(400, f"{where or 'body'}: text may not hold NUL characters", param=where)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(
                400, f"{where or 'body'}: text is not valid Unicode (a lone surrogate)", param=where
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, where)
            _check_text(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_text(item, f"{where}[{i}]")


def _arguments(text: str) -> Any:
    """A call's arguments as the template renders them: the object, or the text as sent when
    it is not one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, dict) else text
