"""Day 1 / day 2: a conversation saved in an agentmem store, the process ended, and a new process
the next day recalls a fact from day 1 without reading day 1 again.

Day 1 hands the assistant a long onboarding document (about 6K tokens, three times what the
model attends to per step) with one fact in the middle. The store keeps the session's memory;
the app keeps the LangChain messages (here a JSON file, as any chat history store would). Day 2,
in a new process, re-sends the history with a new question: the session resumes from the store
(its keys and values read lazily), the history is matched against it and not prefilled again,
and only the question is.

Run: .venv/bin/python integrations/langchain/examples/day1_day2.py   (runs both days, each in its
own process; or `--day 1` / `--day 2` with `--home DIR` to run them yourself.)
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from langchain_agentmem import ChatAgentMem
from langchain_core.messages import HumanMessage, messages_from_dict, messages_to_dict

import agentmem

SESSION = "onboarding-ada"
FACT = "The door code of the east server room is 7316."
QUESTION = "What is the door code of the east server room?"
TOPICS = ["payroll", "badges", "laptops", "parking", "the canteen", "holidays", "printing", "VPN"]
ADVICE = [
    "Questions about {t} go to the help desk on the second floor.",
    "The policy on {t} was last revised in March and applies to every team.",
    "New staff read the wiki page on {t} during their first week.",
    "Requests about {t} are answered within two working days.",
    "Exceptions to the rules on {t} need a manager's written approval.",
]


def onboarding_document(sentences: int = 420, seed: int = 1) -> str:
    rng = random.Random(seed)
    lines = [rng.choice(ADVICE).format(t=rng.choice(TOPICS)) for _ in range(sentences)]
    lines[sentences // 2] = FACT
    return " ".join(lines)


def chat(home: Path) -> ChatAgentMem:
    store = agentmem.Store(f"sqlite:///{home / 'memory.db'}", root=home / "payloads")
    # 2,048 tokens attended per step: the document is three times that.
    memory = agentmem.MemoryConfig(n_init=64, unit_size=128, topk=8, n_local=960)
    return ChatAgentMem(store=store, session_id=SESSION, memory=memory, max_tokens=24)


def day1(home: Path) -> None:
    llm = chat(home)
    history = [
        HumanMessage("Here is our onboarding document. Read it and reply 'ok'.\n\n"
                     + onboarding_document()),
    ]  # fmt: skip
    reply = llm.invoke(history)
    print(f"day 1: {reply.usage_metadata['input_tokens']:,} tokens read; reply: {reply.content!r}")
    (home / "history.json").write_text(json.dumps(messages_to_dict([*history, reply])))


def day2(home: Path) -> str:
    llm = chat(home)
    history = messages_from_dict(json.loads((home / "history.json").read_text()))
    reply = llm.invoke([*history, HumanMessage(QUESTION)])
    usage = reply.usage_metadata
    print(f"day 2: {QUESTION}\n  answer: {reply.content!r}")
    print(
        f"  {usage['input_tokens']:,} input tokens, "
        f"{usage['input_token_details']['cache_read']:,} from the stored memory, "
        f"{reply.response_metadata['prefilled_tokens']} prefilled"
    )
    return reply.content


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--day", type=int, choices=(1, 2), help="run one day (default: both)")
    parser.add_argument("--home", type=Path, help="where the store and history live")
    args = parser.parse_args()
    if args.day is not None:
        if args.home is None:
            parser.error("--day needs --home")
        (day1 if args.day == 1 else day2)(args.home)
        return
    with tempfile.TemporaryDirectory() as scratch:
        home = args.home or Path(scratch)
        for day in ("1", "2"):  # each day in a process of its own
            subprocess.run(
                [sys.executable, __file__, "--day", day, "--home", str(home)], check=True
            )


if __name__ == "__main__":
    main()
