"""The RULER-style tasks (arXiv 2404.06654), written from their definitions: needle in a haystack
(single, multi-key, multi-value, multi-query), variable tracking, common-word extraction, and a
multi-turn variant whose needles arrive in different tool outputs. Each lays out one prompt from
its seeds and scores an answer by recall of what it expects (every value, every name, the top
words), as RULER's string matching does.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.ruler.filler import INTROS, KINDS, Prose, ToolText, pseudo_words
from benchmarks.ruler.prompts import (
    Layout,
    Message,
    Needle,
    Piece,
    Prompt,
    TokenCounter,
    seeded,
    weave,
)

KEY_ADJECTIVES = (
    "amber brisk candid dapper eager fabled gilded hollow ivory jovial keen lucid mellow nimble "
    "opal placid quaint rustic silken tawny umber vivid wistful zesty azure bold crimson dusky "
    "feral frosty"
).split()
KEY_NOUNS = (
    "falcon otter quill lagoon meadow harp walrus compass thistle anchor badger cobalt ember "
    "fjord gazelle heron igloo jasper kestrel lynx marble nectar orchid pebble quartz raven "
    "saddle tundra urchin violet"
).split()

NIAH_HEADER = (
    "A long text follows. Hidden in it are special magic numbers, each one tied to a key. Read "
    "it carefully and remember them: you will be asked about them at the end.\n\n"
)
VT_HEADER = (
    "A long text follows. In it, variables are assigned values by statements of the form "
    "VAR NAME = value, and some variables are assigned other variables. Remember the "
    "assignments: you will be asked about them at the end.\n\n"
)
CWE_HEADER = (
    "Below is a list of words, one per line. A few of them occur many times; most occur only "
    "a few times.\n\n"
)
TURNS_HEADER = (
    "I'm going to run a series of diagnostic commands on our servers and paste their outputs "
    "here. Somewhere in those outputs are special magic numbers, each one tied to a key. Keep "
    "track of them: at the end I'll ask you for one."
)
NEEDLES = 4  # needles of the multi-key, multi-value, multi-query and multi-turn tasks
VT_HOPS, VT_CHAINS = 4, 2  # one chain is asked about, the other is a distractor
CWE_WORDS, CWE_RARE = 10, 3  # the common words asked for; how often each other word occurs


@dataclass(frozen=True)
class Context:
    """What a task's layout depends on; the same context lays out the same prompt."""

    seed: int
    task: str
    length: int
    index: int
    depth: float | None
    counter: TokenCounter

    def rng(self, purpose: str):
        return seeded(self.seed, self.task, self.length, self.index, purpose)


def magic(key: str, value: str) -> str:
    return f"The special magic number for {key} is {value}."


def _keys(rng, n: int) -> list[str]:
    pairs = rng.sample(range(len(KEY_ADJECTIVES) * len(KEY_NOUNS)), n)
    return [f"{KEY_ADJECTIVES[p // len(KEY_NOUNS)]}-{KEY_NOUNS[p % len(KEY_NOUNS)]}" for p in pairs]


def _values(rng, n: int, digits: int = 7) -> list[str]:
    return [str(v) for v in rng.sample(range(10 ** (digits - 1), 10**digits), n)]


class Filler:
    """Seeded prose and tool text, with the tokenizer's calibrated tokens per character."""

    def __init__(self, ctx: Context) -> None:
        rng = ctx.rng("filler")
        self.rng = rng
        self.prose = Prose(rng)
        self.tool = ToolText(rng)
        self.prose_rate = ctx.counter.rate("prose", _prose_sample)
        self.counter = ctx.counter
        self.word_rate = ctx.counter.rate("words", _word_sample)

    def tool_rate(self, kind: str) -> float:
        return self.counter.rate(f"tool-{kind}", lambda: _tool_sample(kind))

    def paragraphs(self, n_tokens: float) -> list[list[str]]:
        out, estimate = [], 0.0
        while estimate < n_tokens:
            out.append(self.prose.paragraph())
            estimate += (sum(map(len, out[-1])) + len(out[-1]) + 1) * self.prose_rate
        return out


def _prose_sample() -> str:
    prose = Prose(seeded("calibrate"))
    return "\n\n".join(" ".join(prose.paragraph()) for _ in range(300))


def _tool_sample(kind: str) -> str:
    tool = ToolText(seeded("calibrate"))
    return "\n".join(tool.line(kind) for _ in range(400))


def _word_sample() -> str:
    return "\n".join(pseudo_words(seeded("calibrate"), 3000))


def _prose_prompt(header: str, question: str, filler: Filler, budget: int, needles, positions):
    pairs = enumerate(zip(needles, positions, strict=True))
    inserts = [(pos * budget, n.text, i) for i, (n, pos) in pairs]
    body = weave(filler.paragraphs(budget), inserts, filler.prose_rate)
    return [Message("user", [Piece(header), *body, Piece(question)])]


def niah(variant: str) -> Callable[[Context], Callable[[int, int], Layout]]:
    """single: one needle. multikey: four keys, one asked. multivalue: one key with four values,
    all asked. multiquery: four keys, all asked. The first needle sits at the depth."""

    def layouts(ctx: Context):
        def make(target: int, budget: int) -> Layout:
            rng = ctx.rng("facts")
            n = 1 if variant == "single" else NEEDLES
            keys = _keys(rng, 1 if variant == "multivalue" else n)
            values = _values(rng, n)
            positions = [ctx.depth] + [rng.random() for _ in range(n - 1)]
            if variant == "multivalue":
                keys = keys * n
            asked = [variant != "multikey" or i == 0 for i in range(n)]
            facts = zip(keys, values, asked, strict=True)
            needles = [Needle(k, v, magic(k, v), a) for k, v, a in facts]
            if variant in ("single", "multikey"):
                question = f"What is the special magic number for {keys[0]} in the text above?"
                prefix, max_new = f"The special magic number for {keys[0]} is", 16
            elif variant == "multivalue":
                question = (
                    f"What are all the special magic numbers for {keys[0]} in the text above? "
                    "List every one of them."
                )
                prefix, max_new = f"The special magic numbers for {keys[0]} are:", 48
            else:
                names = ", ".join(keys[:-1]) + f" and {keys[-1]}"
                question = f"What are the special magic numbers for {names} in the text above?"
                prefix, max_new = "The special magic numbers are:", 48
            messages = _prose_prompt(NIAH_HEADER, question, Filler(ctx), budget, needles, positions)
            expected = [n.value for n in needles if n.asked]
            return Layout(messages, prefix, needles, expected, max_new)

        return make

    return layouts


def _names(rng, n: int) -> list[str]:
    taken = {"DEBUG", "ERROR", "VALUE"}
    out: list[str] = []
    while len(out) < n:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def variable_tracking(ctx: Context):
    """Chains VAR A = 12345, VAR B = VAR A, ... (VT_HOPS hops); the asked chain starts at the
    depth and its hops follow at random later places, a distractor chain lies anywhere."""

    def make(target: int, budget: int) -> Layout:
        rng = ctx.rng("facts")
        names = _names(rng, VT_CHAINS * (VT_HOPS + 1))
        values = _values(rng, VT_CHAINS, digits=5)
        needles, positions = [], []
        for c in range(VT_CHAINS):
            chain = names[c * (VT_HOPS + 1) : (c + 1) * (VT_HOPS + 1)]
            if c == 0:
                places = [ctx.depth] + sorted(rng.uniform(ctx.depth, 1) for _ in range(VT_HOPS))
            else:
                places = sorted(rng.random() for _ in range(VT_HOPS + 1))
            for j, name in enumerate(chain):
                text = f"VAR {name} = {values[c] if j == 0 else 'VAR ' + chain[j - 1]}."
                needles.append(Needle(name, values[c], text, c == 0))
                positions.append(places[j])
        question = (
            f"Which variables are assigned the value {values[0]}, either directly or through a "
            "chain of other variables? Name all of them."
        )
        messages = _prose_prompt(VT_HEADER, question, Filler(ctx), budget, needles, positions)
        prefix = f"The variables that hold the value {values[0]} are:"
        return Layout(messages, prefix, needles, [n.key for n in needles if n.asked], 40)

    return make


def common_words(ctx: Context):
    """A list of pseudo-words, one per line: CWE_WORDS of them occur often (up to 30 times
    each, fewer in short prompts so that they stay a minority), every other word CWE_RARE times."""

    def make(target: int, budget: int) -> Layout:
        rng, filler = ctx.rng("facts"), Filler(ctx)
        item = 7 * filler.word_rate  # a six-letter word and its newline
        frequent = int(min(30, max(CWE_RARE + 2, ctx.length / item / (2 * CWE_WORDS))))
        common = pseudo_words(rng, CWE_WORDS)
        n_rare = int(budget / item / CWE_RARE)  # the common words are fixed, not filler
        rare = [w for w in pseudo_words(filler.rng, n_rare + CWE_WORDS) if w not in common]
        items = common * frequent + rare[:n_rare] * CWE_RARE
        filler.rng.shuffle(items)
        common_set = set(common)
        body = [Piece(w + "\n", removable=w not in common_set) for w in items]
        question = f"Which {CWE_WORDS} words occur most often in the list above? Only the words."
        messages = [Message("user", [Piece(CWE_HEADER), *body, Piece(question)])]
        prefix = f"The {CWE_WORDS} most frequent words are:"
        return Layout(messages, prefix, [], list(common), 64)

    return make


def multi_turn(ctx: Context):
    """A conversation: the user's request, then turns of an assistant running a command and the
    tool's output, NEEDLES needles each in a different output (the asked one at the depth), and
    the question as the last user turn. Every message is one append."""

    def make(target: int, budget: int) -> Layout:
        rng, filler = ctx.rng("facts"), Filler(ctx)
        commands = ToolText(ctx.rng("commands"))
        n_turns = max(NEEDLES + 2, min(256, round(ctx.length / 4096)))
        kinds = [rng.choice(KINDS) for _ in range(n_turns)]
        weights = [rng.uniform(0.5, 1.5) for _ in range(n_turns)]
        keys, values = _keys(rng, NEEDLES), _values(rng, NEEDLES)
        # The asked needle's turn and place in it follow the depth over the turns' shares.
        where = ctx.depth * sum(weights)
        turn = 0
        while turn < n_turns - 1 and where > weights[turn]:
            where -= weights[turn]
            turn += 1
        others = rng.sample([t for t in range(n_turns) if t != turn], NEEDLES - 1)
        placed = {turn: (0, min(where / weights[turn], 1.0))}
        placed.update({t: (i + 1, rng.random()) for i, t in enumerate(others)})
        needles = [Needle(k, v, magic(k, v), i == 0)
                   for i, (k, v) in enumerate(zip(keys, values, strict=True))]  # fmt: skip
        messages = [Message("user", [Piece(TURNS_HEADER)])]
        for t in range(n_turns):
            command = commands.command(kinds[t])
            intro = rng.choice(INTROS)
            messages.append(Message("assistant", [Piece(f"{intro} `{command}`.")]))
            share = budget * weights[t] / sum(weights)
            lines, estimate, rate = [], 0.0, filler.tool_rate(kinds[t])
            while estimate < share or not lines:
                lines.append(filler.tool.line(kinds[t]))
                estimate += (len(lines[-1]) + 1) * rate
            pieces = [Piece(line + "\n", removable=0 < i) for i, line in enumerate(lines)]
            if t in placed:
                needle, fraction = placed[t]
                fact = needles[needle].text
                text = filler.tool.log_line(fact)
                at = text.index(fact)
                piece = Piece(text + "\n", marks=((needle, at - 1, at + len(fact)),))
                pieces.insert(1 + int(fraction * (len(pieces) - 1)), piece)
            pieces.append(Piece(filler.tool.footer()))  # ends in a letter: see ToolText.footer
            messages.append(Message("tool", pieces))
        question = (
            "Thanks, that was the last output. What is the special magic number for "
            f"{keys[0]} in the tool outputs above?"
        )
        messages.append(Message("user", [Piece(question)]))
        prefix = f"The special magic number for {keys[0]} is"
        return Layout(messages, prefix, needles, [values[0]], 16)

    return make


@dataclass(frozen=True)
class Task:
    name: str
    layouts: Callable[[Context], Callable[[int, int], Layout]]
    words: bool = False  # expected items are words, not numbers
    uses_depth: bool = True


TASKS = {
    t.name: t
    for t in (
        Task("niah_single", niah("single")),
        Task("niah_multikey", niah("multikey")),
        Task("niah_multivalue", niah("multivalue")),
        Task("niah_multiquery", niah("multiquery")),
        Task("vt", variable_tracking, words=True),
        Task("cwe", common_words, words=True, uses_depth=False),
        Task("niah_multiturn", multi_turn),
    )
}


def score(task: Task, answer: str, prompt: Prompt) -> tuple[float, str | None]:
    """The fraction of expected items found in the answer (whole numbers, or words matched
    case-insensitively), and for a missed single number what went wrong: 'none' (no number),
    'other_needle' (another needle's value), 'reordered' (the right digits in another order),
    'near' (at most two digits dropped, added or changed) or 'other'."""
    if task.words:
        found = {w.lower() for w in re.findall(r"[A-Za-z]+", answer)}
        hits = sum(e.lower() in found for e in prompt.expected)
        return hits / len(prompt.expected), None
    numbers = re.findall(r"\d+", answer)
    hits = sum(e in numbers for e in prompt.expected)
    result = hits / len(prompt.expected)
    if result == 1 or len(prompt.expected) != 1:
        return result, None
    if not numbers:
        return result, "none"
    got, want = numbers[0], prompt.expected[0]
    if any(got == n.value for n in prompt.needles if not n.asked):
        return result, "other_needle"
    if sorted(got) == sorted(want):
        return result, "reordered"
    return result, "near" if _edits(got, want) <= 2 else "other"


def _edits(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]
