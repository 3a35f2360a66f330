"""Prompt assembly: messages of text pieces, rendered through the model's chat template (a plain
"User: ..." layout where it has none), cut to a token length with the model's own tokenizer.

Length at 1M tokens, fast: the filler is laid out by a calibrated tokens-per-character estimate
with a small surplus, every piece (a paragraph, a tool-output line, a list item) is counted in one
batched call of the tokenizer, and whole pieces are then dropped evenly over the prompt (so each
needle keeps its depth) until it fits, the last one shortened by sentences. Pieces meet where the
tokenizer splits anyway (after a newline, before a non-space), so the counts of the pieces add up
to the count of the text; the runner records both and the tests check they agree.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class Piece:
    """A run of text. `removable` filler may be dropped to fit the length; a paragraph keeps its
    `sentences` so that it can be shortened; `marks` are (needle index, char start, char end)."""

    text: str
    removable: bool = False
    sentences: tuple[str, ...] = ()  # a paragraph's; one with marks keeps its first
    end: str = ""
    marks: tuple[tuple[int, int, int], ...] = ()


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant" | "tool"
    pieces: list[Piece]


@dataclass(frozen=True)
class Needle:
    """A fact in the prompt: `text` says `key` has `value`; `asked` if the answer needs it."""

    key: str
    value: str
    text: str
    asked: bool


@dataclass
class Layout:
    """What a task lays out for one prompt."""

    messages: list[Message]
    answer_prefix: str
    needles: list[Needle]
    expected: list[str]
    max_new_tokens: int


@dataclass
class Prompt:
    """One prompt, ready to append: `segments` (role, text), one `Session.append` each."""

    task: str
    length: int
    index: int
    depth: float | None
    segments: list[tuple[str, str]]
    needles: list[Needle]
    spans: list[tuple[int, int]]  # each needle's token span [start, end) in the stream
    tokens: int  # the stream's length, by the pieces' counts
    expected: list[str]
    max_new_tokens: int
    sha: str = field(default="")

    @property
    def depths(self) -> list[float]:
        """Each needle's start as a fraction of the prompt."""
        return [round(start / self.tokens, 4) for start, _ in self.spans]


class TokenCounter:
    """Counts tokens of many texts at once (the fast tokenizer's batch encoder where there is
    one), the way `Session.append` tokenizes: special tokens only on the first append."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        with_special = tokenizer("a", add_special_tokens=True).input_ids
        plain = tokenizer("a", add_special_tokens=False).input_ids
        self.special = len(with_special) - len(plain)  # added to the first append
        self.special_before = with_special.index(plain[0]) if plain else 0
        self._rates: dict[str, float] = {}

    def counts(self, texts: Sequence[str]) -> list[int]:
        texts = list(texts)
        if not texts:
            return []
        if self.backend is not None:
            encodings = self.backend.encode_batch(texts, add_special_tokens=False)
            return [len(e.ids) for e in encodings]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False).input_ids]

    def rate(self, kind: str, sample: Callable[[], str]) -> float:
        """Tokens per character of a kind of filler, measured once on `sample()`."""
        if kind not in self._rates:
            text = sample()
            self._rates[kind] = self.counts([text])[0] / max(len(text), 1)
        return self._rates[kind]


MARKER = "\x1eRULER-MESSAGE-{}\x1e"


def render(tokenizer, layout: Layout) -> list[tuple[str, list[Piece]]]:
    """The layout's messages as (role, pieces) segments: the chat template's text around each
    message's pieces, the generation prompt and the answer prefix at the end of the last one."""
    messages = layout.messages
    if getattr(tokenizer, "chat_template", None):
        frames = _frames(tokenizer, [m.role for m in messages])
        segments = []
        for i, (message, (before, after)) in enumerate(zip(messages, frames, strict=True)):
            tail = after + (layout.answer_prefix if i == len(messages) - 1 else "")
            segments.append((message.role, _around(before, message.pieces, tail)))
        return segments
    names = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool output"}
    segments = []
    for i, message in enumerate(messages):
        tail = "\n\n"
        if i == len(messages) - 1:
            tail += "Assistant: " + layout.answer_prefix
        segments.append((message.role, _around(f"{names[message.role]}:\n", message.pieces, tail)))
    return segments


def _frames(tokenizer, roles: list[str]) -> list[tuple[str, str]]:
    """The template's text before and after each message's content, when the conversation is
    appended message by message (the last one with the generation prompt).

    A message's text is rendered from a window (the first message, the previous one and itself)
    minus the window without it, cached by roles: rendering every prefix of a conversation of
    hundreds of turns would cost quadratic time. The joined frames must equal the whole
    conversation rendered at once; a template for which they do not is rendered prefix by prefix.
    """

    def text(indices: list[int], last: bool) -> str:
        convo = [{"role": roles[i], "content": MARKER.format(j)} for j, i in enumerate(indices)]
        return tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=last)

    def frame(indices: list[int], last: bool) -> tuple[str, str]:
        whole, head = text(indices, last), text(indices[:-1], False) if len(indices) > 1 else ""
        if not whole.startswith(head):
            raise ValueError(
                "the chat template renders a conversation differently from its first messages; "
                "the prompt cannot be appended message by message"
            )
        before, marker, after = whole[len(head) :].partition(MARKER.format(len(indices) - 1))
        if not marker:
            raise ValueError("the chat template changed a message's content")
        return before, after

    n, cache, frames = len(roles), {}, []
    for i in range(n):
        window = sorted({0, max(i - 1, 0), i})
        key = (tuple(roles[j] for j in window), len(window), i == n - 1)
        if key not in cache:
            cache[key] = frame(window, i == n - 1)
        frames.append(cache[key])
    joined = "".join(b + MARKER.format(i) + a for i, (b, a) in enumerate(frames))
    if joined != text(list(range(n)), True):
        frames = [frame(list(range(i + 1)), i == n - 1) for i in range(n)]
    return frames


def _around(before: str, pieces: list[Piece], after: str) -> list[Piece]:
    return ([Piece(before)] if before else []) + list(pieces) + ([Piece(after)] if after else [])


# The first estimate's surplus over the target; a shortfall is laid out again with more.
SURPLUS = 0.03


def build(
    make: Callable[[int, int], Layout],
    tokenizer,
    counter: TokenCounter,
    *,
    task: str,
    length: int,
    index: int,
    depth: float | None,
) -> Prompt:
    """A prompt of at most `length` tokens (and within a sentence or a line of it).

    `make(target, budget)` lays out the prompt with about `budget` tokens of filler, needles
    placed as fractions of it (deterministically: the same call gives the same layout).
    """
    overhead = _total(render(tokenizer, make(0, 0)), counter)[0]
    target = length - overhead
    if target < 16:
        raise ValueError(f"{task}: {length} tokens leave no room for filler ({overhead} fixed)")
    surplus = SURPLUS
    for _ in range(4):
        layout = make(target, int(target * (1 + surplus)) + 16)
        segments = render(tokenizer, layout)
        total, counts = _total(segments, counter)
        if total >= length:
            break
        surplus += (length - total) / target + 0.01
    total = _trim(segments, counts, total - length, counter)
    spans = _spans(segments, counts, counter, len(layout.needles))
    texts = [(role, "".join(p.text for p in pieces)) for role, pieces in segments]
    sha = hashlib.sha1("\x00".join(f"{r}\x01{t}" for r, t in texts).encode()).hexdigest()[:16]
    return Prompt(
        task=task, length=length, index=index, depth=depth, segments=texts,
        needles=layout.needles, spans=spans, tokens=total, expected=layout.expected,
        max_new_tokens=layout.max_new_tokens, sha=sha,
    )  # fmt: skip


def _total(segments, counter: TokenCounter) -> tuple[int, list[list[int]]]:
    flat = counter.counts([p.text for _, pieces in segments for p in pieces])
    counts, at = [], 0
    for _, pieces in segments:
        counts.append(flat[at : at + len(pieces)])
        at += len(pieces)
    return sum(flat) + counter.special, counts


def _trim(segments, counts, excess: int, counter: TokenCounter) -> int:
    """Drop `excess` tokens of removable pieces, evenly spread (a needle keeps its depth), then
    from the end, shortening paragraphs by sentences (one that holds a needle down to it);
    returns the new total."""
    if excess > 0:
        where = [(s, i) for s, (_, pieces) in enumerate(segments) for i, p in enumerate(pieces)
                 if p.removable or len(p.sentences) > 1]  # fmt: skip
        pool = sum(counts[s][i] for s, i in where if segments[s][1][i].removable)
        share, owed, dropped = min(excess / max(pool, 1), 1.0), 0.0, set()
        for s, i in where:  # Bresenham: drop a piece whenever the share owed reaches its size
            if not segments[s][1][i].removable:
                continue
            owed += counts[s][i] * share
            if owed >= counts[s][i] and excess >= counts[s][i]:
                owed -= counts[s][i]
                excess -= counts[s][i]
                dropped.add((s, i))
        for s, i in reversed(where):
            if excess <= 0:
                break
            if (s, i) in dropped:
                continue
            piece, size = segments[s][1][i], counts[s][i]
            if piece.removable and size <= excess:
                excess -= size
                dropped.add((s, i))
                continue
            shorter = _shorten(piece, size, excess, counter)
            if shorter is not None:
                segments[s][1][i], counts[s][i] = shorter
                excess -= size - counts[s][i]
            elif piece.removable:
                excess -= size
                dropped.add((s, i))
        for s in range(len(segments)):
            keep = [i for i in range(len(segments[s][1])) if (s, i) not in dropped]
            segments[s] = (segments[s][0], [segments[s][1][i] for i in keep])
            counts[s] = [counts[s][i] for i in keep]
    return sum(map(sum, counts)) + counter.special


def _shorten(piece: Piece, size: int, excess: int, counter: TokenCounter):
    """The paragraph cut by trailing sentences to at most `size - excess` tokens (the longest such
    cut), or for one that holds a needle and cannot get there, the shortest cut; None if none."""
    sentences = piece.sentences
    if len(sentences) < 2:
        return None
    options = [" ".join(sentences[:k]) + piece.end for k in range(1, len(sentences))]
    sizes = counter.counts(options)
    fits = [k for k, n in enumerate(sizes) if n <= size - excess]
    if fits:
        k = fits[-1]
    elif not piece.removable:
        k = 0
    else:
        return None
    return Piece(options[k], piece.removable, sentences[: k + 1], piece.end, piece.marks), sizes[k]


def _spans(segments, counts, counter: TokenCounter, n_needles: int) -> list[tuple[int, int]]:
    """Token span of each needle: tokens before its piece plus the counts of its text's prefixes."""
    spans: list[tuple[int, int] | None] = [None] * n_needles
    prefixes, owners = [], []
    offset = counter.special_before
    for s, (_, pieces) in enumerate(segments):
        for i, piece in enumerate(pieces):
            for needle, start, end in piece.marks:
                prefixes += [piece.text[:start], piece.text[:end]]
                owners.append((needle, offset))
            offset += counts[s][i]
        if s == 0:
            offset += counter.special - counter.special_before
    found = counter.counts(prefixes)
    for j, (needle, base) in enumerate(owners):
        spans[needle] = (base + found[2 * j], base + found[2 * j + 1])
    if any(span is None for span in spans):
        raise ValueError("a needle was laid out without a place in the prompt")
    return spans  # type: ignore[return-value]


def weave(
    paragraphs: list[list[str]],
    inserts: list[tuple[float, str, int]],
    rate: float,
) -> list[Piece]:
    """Paragraph pieces with each insert (token position, sentence, needle index) placed where
    the estimated token count (`rate` tokens per character) reaches it. An insert opens a
    paragraph (the sentences before it close the one it interrupts), and that paragraph may be
    shortened down to the insert alone: pieces only ever meet at a paragraph break."""
    inserts = sorted(inserts, key=lambda item: item[0])
    pieces: list[Piece] = []
    current: list[str] = []
    opener: int | None = None  # the needle that opens the current paragraph

    def close() -> None:
        nonlocal current, opener
        if current:
            text = " ".join(current) + "\n\n"
            if opener is None:
                pieces.append(Piece(text, removable=True, sentences=tuple(current), end="\n\n"))
            else:
                marks = ((opener, 0, len(current[0])),)
                pieces.append(Piece(text, sentences=tuple(current), end="\n\n", marks=marks))
        current, opener = [], None

    at, done = 0.0, 0
    for sentences in paragraphs:
        for sentence in sentences:
            while done < len(inserts) and inserts[done][0] <= at:
                close()
                current, opener = [inserts[done][1]], inserts[done][2]
                done += 1
            current.append(sentence)
            at += (len(sentence) + 1) * rate
        close()
    for _, text, needle in inserts[done:]:  # past the filler (or no filler at all)
        current, opener = [text], needle
        close()
    return pieces


def seeded(*parts: object) -> random.Random:
    """A generator seeded by the parts' text (stable across processes and Python versions)."""
    return random.Random(":".join(map(str, parts)))
