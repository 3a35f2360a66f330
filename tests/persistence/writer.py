"""A child process for the crash and concurrency tests: resumes (or creates) one stored session of
the tiny Gemma and appends numbered turns, printing "saved N" once each save has returned.

    python -m tests.persistence.writer '{"url": ..., "root": ...}' SESSION_ID TURNS
"""

from __future__ import annotations

import json
import sys

import agentmem
from agentmem.session import LanguageModel
from tests.helpers import build, char_tokenizer

MEMORY = agentmem.MemoryConfig(n_init=4, unit_size=16, topk=2, n_local=48, exec_chunk=16)


def turn(number: int) -> str:
    return f"Turn {number}: the quick brown fox jumps over the lazy dog. "


def model() -> LanguageModel:
    return LanguageModel(build("gemma3"), char_tokenizer(), MEMORY)


def main() -> None:
    store_args, session_id, turns = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    session = model().session(session_id, store=agentmem.Store(**store_args), progress=False)
    first = len(session.messages())
    for number in range(first, first + turns):
        session.append(turn(number))  # autosaved: its message and memory in one transaction
        print(f"saved {number}", flush=True)


if __name__ == "__main__":
    main()
