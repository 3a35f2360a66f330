"""What a reply is made to be while it decodes: the text it is forced to start with and the
`Sampling` constraints after it (a JSON object, or the calls `tool_choice` forces), with the
call's sampling settings."""

from __future__ import annotations

from typing import Any

from agentmem.chat import engine, formats
from agentmem.chat import tools as tool_calls
from agentmem.chat.formats import JsonFormat
from agentmem.chat.json_grammar import JsonGrammar
from agentmem.generate import Sampling


def constraints(lm, tools: list[dict], tool_choice: Any, choice: str,
                json_format: JsonFormat | None, *, model: str,
                answering: bool = False) -> tuple[str, dict]:  # fmt: skip
    """The forced head of a call's reply and its `Sampling` constraints (`allowed`, `banned`,
    `forbid`): a JSON object (`json_format`, from `response_format`), or what `tool_choice`
    (`choice` as `tool_calls.chosen_tool` reads it) forces of calls to `tools`. `answering`: the
    reply follows a tool's result, and may not open with a bare JSON call (another call is
    written in its tags): the 0.5B model, shown its call, repeats it bare instead of answering."""
    tok = lm.tokenizer
    if json_format is not None:
        grammar = formats.grammar(tok, engine.eos_ids(lm), json_format)
        return "", {"allowed": grammar, "forbid": grammar.forbid}
    names = [t["function"]["name"] for t in tools]
    forced, allowed, banned, forbid = "", None, frozenset(), None
    if tools and choice not in ("auto", "none"):
        if not tool_calls.hermes_template(tok):
            raise ValueError(
                f"tool_choice {tool_choice!r} is enforced for chat templates that call "
                f"tools in {tool_calls.OPEN} tags (Qwen, Hermes); {model!r}'s does not"
            )
        if choice != "any" or len(names) == 1:
            name = names[0] if choice == "any" else choice
            forced = tool_calls.CALL_HEAD + name + tool_calls.NAME_TAIL
            if not _parameters(tools[names.index(name)]):  # nothing to write but {}
                forced += " {}}\n" + tool_calls.CLOSE
        else:
            forced, allowed = tool_calls.CALL_HEAD, tool_calls.NameTrie(tok, names)
    if tools and tool_calls.hermes_template(tok):
        tag = tok(tool_calls.OPEN, add_special_tokens=False).input_ids
        close = tok(tool_calls.CLOSE, add_special_tokens=False).input_ids
        if choice == "none" and len(tag) == 1:
            banned = frozenset(tag)  # nor a bare call: the tag never opens, only openers apply
            forbid = tool_calls.CallCloser(
                tag[0], tag[0], (), open=False, openers=tool_calls.bare_call_openers(tok)
            )
        elif len(tag) == len(close) == 1:  # a call the reply opens is closed before it ends
            eos = engine.eos_ids(lm)
            openers = tool_calls.bare_call_openers(tok) if answering else frozenset()
            forbid = tool_calls.CallCloser(
                tag[0], close[0], eos, open=tool_calls.is_open(forced), openers=openers
            )
            args = {
                t["function"]["name"]: JsonGrammar(tok, schema=t["function"].get("parameters"))
                for t in tools
            }
            allowed = tool_calls.CallGrammar(
                tok, tag[0], close[0], eos, head=forced, names=allowed, single=bool(forced),
                args=args,
            )  # fmt: skip
    return forced, {"allowed": allowed, "banned": banned, "forbid": forbid}


def sampling(settings: dict, constraints: dict) -> Sampling:
    """A call's temperature, top_p, top_k and seed (absent or None: the defaults, greedy) with
    its constraints."""
    top_p = settings.get("top_p")
    return Sampling(
        temperature=float(settings.get("temperature") or 0.0), top_p=1.0 if top_p is None else
        float(top_p), top_k=int(settings.get("top_k") or 0), seed=settings.get("seed"),
        **constraints,
    )  # fmt: skip


def _parameters(tool: dict) -> dict:
    """The properties an OpenAI-format tool's arguments have."""
    return (tool.get("function", {}).get("parameters") or {}).get("properties") or {}
