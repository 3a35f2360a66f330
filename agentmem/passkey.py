"""The passkey retrieval test of the SelfExtend / InfLLM papers, and the methods it compares.

A prompt is filler text with "The pass key is NNNNN. Remember it. NNNNN is the pass key." at a
depth, and the question at the end. Prompts are built from token pieces, so the needle's token span
is known exactly and `needle_recalled` can say whether retrieval brought it into the window.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from agentmem.config import MemoryConfig
from agentmem.generate import greedy, prefill
from agentmem.hf.wrap import unwrapped
from agentmem.profiling import PeakMemory
from agentmem.session import LanguageModel

HEADER = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyPrompt:
    """Token ids of one prompt and where its needle sits."""

    ids: list[int]
    length: int  # the length asked for; the prompt has at most this many tokens
    key: str
    depth: float
    needle: tuple[
        int, int
    ]  # [start, end) tokens of "The pass key is NNNNN", the key's first mention


def depths(n: int) -> list[float]:
    """n depths spread evenly over the filler: 0.1, 0.3, 0.5, 0.7, 0.9 for n = 5."""
    if n < 1:
        raise ValueError("the number of depths must be >= 1")
    return [round((i + 0.5) / n, 4) for i in range(n)]


def draw_keys(n: int, seed: int) -> list[str]:
    """n distinct 5-digit keys, reproducible from `seed`."""
    rng = random.Random(seed)
    return [str(k) for k in rng.sample(range(10000, 100000), n)]


def build_prompt(tokenizer, n_tokens: int, depth: float, key: str) -> PasskeyPrompt:
    """A prompt of about `n_tokens` tokens (never more) with the needle at `depth` of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    head = tokenizer(HEADER, add_special_tokens=True).input_ids
    filler, needle, question = encode(FILLER), encode(NEEDLE.format(key=key)), encode(QUESTION)
    room = n_tokens - len(head) - len(needle) - len(question)
    if room < len(filler):
        raise ValueError(f"a passkey prompt needs more than {n_tokens} tokens")
    repeats = room // len(filler)
    before = round(repeats * depth)
    ids = head + filler * before
    start = len(ids)
    ids += needle + filler * (repeats - before) + question
    stated = next(i for i in range(1, len(needle) + 1) if key in tokenizer.decode(needle[:i]))
    return PasskeyPrompt(
        ids=ids, length=n_tokens, key=key, depth=depth, needle=(start, start + stated)
    )


def parse_answer(text: str) -> str:
    """The first run of digits in the model's answer ('' if none)."""
    match = re.search(r"\d+", text)
    return match.group(0) if match else ""


METHODS = ("agentmem", "streaming", "truncate", "full")


@dataclass
class Row:
    """One prompt answered by one method (the JSON row of `agentmem passkey`)."""

    method: str
    length: int
    depth: float
    key: str
    answer: str
    correct: bool
    needle_recalled: bool  # the needle was in the window of the answering step (any memory layer)
    needle_layers: int  # memory layers whose answering step attended the whole needle
    tokens: int
    prefill_s: float
    peak_bytes: int
    attended_keys: int  # most keys one query attended to


def streaming_config(memory: MemoryConfig) -> MemoryConfig:
    """StreamingLLM with the same number of attended keys as `memory`'s window."""
    retrieved = memory.topk * memory.unit_size if memory.retrieves else 0
    return MemoryConfig(
        **{
            **memory.model_dump(),
            "position": "streaming",
            "topk": 0,
            "n_local": memory.n_local + retrieved,
        }
    )


def run_prompt(
    lm: LanguageModel,
    method: str,
    prompt: PasskeyPrompt,
    memory: MemoryConfig,
    *,
    max_new_tokens: int = 8,
) -> Row:
    """Answer one passkey prompt with one method."""
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}'; choose from {', '.join(METHODS)}")
    with PeakMemory(lm.device) as peak:
        if method in ("agentmem", "streaming"):
            config = memory if method == "agentmem" else streaming_config(memory)
            answer, prefill_s, layers, attended = _run_session(lm, prompt, config, max_new_tokens)
            recalled = layers > 0
        else:
            ids = prompt.ids
            attended = len(ids)
            recalled, layers = True, 0
            if method == "truncate":
                ids, recalled = _truncate(prompt, memory.window)
                attended = len(ids)
            answer, prefill_s = _run_plain(lm, ids, memory.exec_chunk, max_new_tokens)
    return Row(
        method=method,
        length=prompt.length,
        depth=prompt.depth,
        key=prompt.key,
        answer=answer,
        correct=parse_answer(answer) == prompt.key,
        needle_recalled=recalled,
        needle_layers=layers,
        tokens=len(prompt.ids),
        prefill_s=round(prefill_s, 3),
        peak_bytes=peak.bytes,
        attended_keys=attended,
    )


def warm_up(lm: LanguageModel, memory: MemoryConfig) -> None:
    """One short prompt per code path, so first-call allocations do not count as a method's."""
    prompt = build_prompt(lm.tokenizer, 512, 0.5, "12345")
    for method in ("agentmem", "full"):
        run_prompt(lm, method, prompt, memory, max_new_tokens=2)


def _run_session(
    lm: LanguageModel, prompt: PasskeyPrompt, config: MemoryConfig, max_new_tokens: int
) -> tuple[str, float, int, int]:
    session = lm.session(memory=config)
    start = time.perf_counter()
    session.append_tokens(prompt.ids)
    _synchronize(lm.device)
    prefill_s = time.perf_counter() - start
    # The answering step is the last prompt token's: check its window before decoding moves on.
    needle = set(range(*prompt.needle))
    layers = sum(needle <= _attended(state) for state in session.cache.memory_layers)
    attended = max(_window_size(state) for state in session.cache.memory_layers)
    return session.generate(max_new_tokens), prefill_s, layers, attended


def _attended(state) -> set[int]:
    return {i for start, end in state.attended_spans() for i in range(start, end)}


def _window_size(state) -> int:
    retrieved = 0 if state.last_ids is None else state.last_ids.shape[-1] * state.units.unit_size
    return state.n_sinks + retrieved + state.n_local


def _truncate(prompt: PasskeyPrompt, window: int) -> tuple[list[int], bool]:
    """Keep the first 64 tokens and the most recent ones, `window` in all (needle kept?)."""
    ids = prompt.ids
    if len(ids) <= window:
        return ids, True
    head = min(64, window // 2)
    tail_start = len(ids) - (window - head)
    start, end = prompt.needle
    kept = end <= head or start >= tail_start
    return ids[:head] + ids[tail_start:], kept


def _run_plain(
    lm: LanguageModel, ids: list[int], chunk: int, max_new_tokens: int
) -> tuple[str, float]:
    """Full attention with the unwrapped model (transformers' own cache and attention)."""
    model = lm.model
    with unwrapped(model):
        cache = DynamicCache(config=model.config)
        start = time.perf_counter()
        logits = prefill(model, cache, torch.tensor([ids], device=lm.device), chunk=chunk)
        _synchronize(lm.device)
        prefill_s = time.perf_counter() - start
        stop = {lm.tokenizer.eos_token_id}
        out = list(greedy(model, cache, logits, max_new_tokens=max_new_tokens, stop_ids=stop))
    text = lm.tokenizer.decode([t for t in out if t not in stop], skip_special_tokens=True)
    return text, prefill_s


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(rows: list[Row]) -> list[dict]:
    """Per (method, length): accuracy, needle recall, prefill tokens/s, peak memory."""
    groups: dict[tuple[str, int], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.method, row.length), []).append(row)
    table = []
    for (method, length), group in sorted(
        groups.items(), key=lambda item: (item[0][1], item[0][0])
    ):
        table.append(
            {
                "method": method,
                "length": length,
                "correct": sum(r.correct for r in group),
                "total": len(group),
                "recalled": sum(r.needle_recalled for r in group),
                "tok_s": sum(r.tokens for r in group) / max(sum(r.prefill_s for r in group), 1e-9),
                "peak_mib": max(r.peak_bytes for r in group) / 2**20,
                "keys": max(r.attended_keys for r in group),
            }
        )
    return table


def format_table(table: list[dict]) -> str:
    header = f"{'length':>7} {'method':<10} {'correct':>8} {'recalled':>9} {'keys/query':>10} "
    header += f"{'prefill tok/s':>13} {'peak MiB':>9}"
    lines = [header, "-" * len(header)]
    for entry in table:
        lines.append(
            f"{entry['length']:>7} {entry['method']:<10} "
            f"{entry['correct']:>4}/{entry['total']:<3} {entry['recalled']:>5}/{entry['total']:<3} "
            f"{entry['keys']:>10} {entry['tok_s']:>13.0f} {entry['peak_mib']:>9.0f}"
        )
    return "\n".join(lines)
