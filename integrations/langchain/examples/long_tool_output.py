"""An agent whose tool returns far more text than the model attends to at once, then answers a
question about one line deep inside it.

`ChatAgentMem` with a tool that returns a maintenance log of about 32K tokens, driven by the
plain tool-calling loop (call, run the tool, hand back its `ToolMessage`). The memory attends to
at most 2,048 tokens per step (sinks, the units retrieved for the step, the local window): the
whole log streams into the session once, and the answer is recalled from it. The agent answers
through a second tool, `answer` (the final-answer tool of LangChain's `ToolStrategy`), whose
arguments the decoder holds to its schema. `tool_choice` steers the 0.5B model: it must read
the log first, then answer the question asked after it. The same tools stay bound, so the
history renders alike and is never prefilled twice.

Asked to answer in prose, the 0.5B model writes the tool call again instead, and so does plain
transformers with full attention on a 1.9K-token version of this log (measured 2026-12-01).
The question asks for one detail of the needle's line, its serial number. Asked for the
technician too, the 0.5B model named another technician of the log, and so did full attention
over the whole 32K-token conversation ('Haddad'), while the needle's line was in the answering
step's window in 21 of 24 layers at every decoded token (one H200, bf16, 2026-12-02): that is
the model's reading at this length, not the memory's recall, so the example does not ask it.

Run: .venv/bin/python integrations/langchain/examples/long_tool_output.py
(CPU: several minutes, nearly all of it reading the log once.)
"""

from __future__ import annotations

import random
import time

from langchain_agentmem import ChatAgentMem
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_core.tools import tool

import agentmem

LINES = 780  # about 32K tokens of log (42 tokens a line)
NEEDLE_AT = 520  # the line that answers the question, two thirds of the way in
# agentmem's default layout: sinks 64 + 16 retrieved units of 64 + a local window of 960, 2,048
# tokens attended per step, each unit scored by the means of its 8-token slices. Measured on this
# example when it asked for the technician and the serial number (2026-12-01), with the same
# window and 128-token units: represented by the keys that got
# most attention, the answer was 'Novak', 'PX-123'; by the means of 32-token slices, 'Haddad',
# 'PX-4471'. On one H200 (bf16, 2026-12-02): this layout 'Haddad', 'PX-4471'; choosing with the
# step's own query alone 'Kowalski'; 32-token units 'Haddad', 'PX-444'; `stacked` 'Haddad';
# `contiguous` 'Okonkwo', 'PX-4471' (but 'Novak' on the CPU, fp32); full attention 'Haddad'.
MEMORY = agentmem.MemoryConfig()
TECHNICIANS = ["Moreno", "Larsen", "Haddad", "Silva", "Novak", "Tanaka", "Dubois", "Kowalski"]
MACHINES = [
    "conveyor belt",
    "air compressor",
    "packing robot",
    "forklift charger",
    "hydraulic press",
]
CHECKS = [
    "checked the {m}; vibration {v} mm/s, within limits",
    "cleaned the filters of the {m} and logged {v} hours of runtime",
    "recalibrated the sensors of the {m} (drift {v} percent)",
    "inspected the {m} after a restart; temperature {v} degrees, normal",
    "greased the bearings of the {m}; noise level down to {v} dB",
]
NEEDLE = (
    "2025-06-02 14:40 hall 7: technician Okonkwo replaced the coolant pump; the new pump's "
    "serial number is PX-4471."
)
QUESTION = "What is the serial number of the new coolant pump in hall 7?"


def maintenance_log(lines: int = LINES, seed: int = 0) -> str:
    """A varied, seeded log; the coolant pump appears in one line only."""
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        if i == NEEDLE_AT:
            out.append(NEEDLE)
            continue
        day, hour, minute = 1 + i // 60, rng.randrange(6, 22), rng.randrange(60)
        check = rng.choice(CHECKS).format(m=rng.choice(MACHINES), v=round(rng.uniform(1, 90), 1))
        month = 1 + (day - 1) // 28
        out.append(
            f"2025-{month:02d}-{1 + (day - 1) % 28:02d} {hour:02d}:{minute:02d} hall "
            f"{rng.randrange(1, 12)}: technician {rng.choice(TECHNICIANS)} {check}."
        )
    return "\n".join(out)


@tool
def read_maintenance_log(site: str) -> str:
    """Return the full maintenance log of a site (every line: date, hall, technician, work)."""
    return maintenance_log()


@tool
def answer(serial_number: str) -> str:
    """Give the user the final answer: the serial number asked for."""
    return serial_number


def main() -> dict:
    llm = ChatAgentMem(memory=MEMORY, session_id="site-b", max_tokens=48)  # the built-in 0.5B
    tools = [read_maintenance_log, answer]
    log_tokens = llm.get_num_tokens(maintenance_log())
    print(f"the tool returns {log_tokens:,} tokens; the model attends to {MEMORY.window:,}")
    history = [
        SystemMessage("You are a maintenance assistant. Read logs with your tools."),
        HumanMessage("Read the maintenance log of site B."),
    ]
    started = time.perf_counter()
    call = llm.bind_tools(tools, tool_choice="read_maintenance_log").invoke(history)
    print(f"{time.perf_counter() - started:5.0f} s  the model calls {call.tool_calls}")
    results = [read_maintenance_log.invoke(c) for c in call.tool_calls]  # ToolMessages
    history += [call, *results, HumanMessage(QUESTION)]  # asked once the log is in memory
    reply = llm.bind_tools(tools, tool_choice="answer").invoke(history)
    usage = reply.usage_metadata
    said = reply.tool_calls[0]["args"] if reply.tool_calls else reply.invalid_tool_calls
    print(f"{time.perf_counter() - started:5.0f} s  the answer: {said}")
    print(
        f"        {usage['input_tokens']:,} input tokens, "
        f"{usage['input_token_details']['cache_read']:,} of them already in memory"
    )
    for unit in reply.response_metadata["recalled"]:
        if "coolant pump" in unit["text"]:
            print(f"        recalled the pump's line from tokens {unit['start']}-{unit['end']}")
    return {"log_tokens": log_tokens, "call": call, "results": results, "reply": reply}


if __name__ == "__main__":
    main()
