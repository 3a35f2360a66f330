"""A conversation in the model's own chat template: OpenAI-shaped message dicts rendered, and cut
into pieces at message boundaries (each piece the text one message adds), so that a session can
be matched against a re-sent history piece by piece."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    """The text one message (or a run of messages the template joins) adds to the prompt."""

    role: str
    text: str


def render(tokenizer, messages: list[dict], tools: list[dict] | None, *, prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')!r} has no chat "
            "template, and agentmem renders conversations only through the model's own "
            "template: use an instruct model (e.g. qwen2.5-coder-0.5b-instruct) or set "
            "tokenizer.chat_template"
        )
    return tokenizer.apply_chat_template(
        messages, tools=tools or None, add_generation_prompt=prompt, tokenize=False
    )


def pieces(tokenizer, messages: list[dict], tools: list[dict] | None) -> list[Piece]:
    """The rendered conversation with its generation prompt, cut where a prefix of the messages
    renders as a prefix of the whole (templates that join messages, e.g. Qwen's consecutive tool
    results, give one piece for the run); the last piece is the generation prompt, role
    "assistant"."""
    whole = render(tokenizer, messages, tools, prompt=True)
    out: list[Piece] = []
    done = 0
    for k in range(1, len(messages) + 1):
        head = render(tokenizer, messages[:k], tools, prompt=False)
        if len(head) > done and whole.startswith(head):
            out.append(Piece(messages[k - 1]["role"], whole[done : len(head)]))
            done = len(head)
    if done < len(whole):
        out.append(Piece("assistant", whole[done:]))
    return out


# Stand-ins for what a session already holds, rendered ahead of new messages and cut off again.
_REPLY = "(an earlier reply)"
_BEFORE = [{"role": "user", "content": "."}, {"role": "assistant", "content": _REPLY}]


def continuation(tokenizer, messages: list[dict], tools: list[dict] | None) -> list[Piece]:
    """`messages` rendered as new ones that follow a conversation (no system header, no first-
    message text of the template's own), with the generation prompt: the pieces after those of
    a stand-in conversation rendered ahead of them."""
    ahead = render(tokenizer, _BEFORE, tools, prompt=False)
    whole = pieces(tokenizer, [*_BEFORE, *messages], tools)
    out, done = [], 0
    for piece in whole:
        if done >= len(ahead):
            out.append(piece)
        done += len(piece.text)
    if done - sum(len(p.text) for p in out) != len(ahead):
        raise ValueError("the chat template renders these messages only as a whole conversation")
    return out


def reply_end(tokenizer) -> str:
    """What the template writes after a reply's text, before the next message (ChatML's
    `<|im_end|>` and newline): a reply held in memory ends at its end-of-turn token, or, cut
    short (max_tokens, a stop string), before it."""
    ahead = render(tokenizer, _BEFORE, None, prompt=False)
    return ahead[ahead.rfind(_REPLY) + len(_REPLY) :]
