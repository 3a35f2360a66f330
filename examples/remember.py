"""Stream a long text into a session piece by piece, then ask about a detail from far back.

Run: .venv/bin/python examples/remember.py   (CPU, about half a minute after the first model load)
"""

import agentmem
from agentmem.passkey import FILLER, HEADER, NEEDLE, QUESTION

# Units are represented by the means of their keys here: with the default (the keys that got most
# attention, as InfLLM) one of the three global layers misses this prompt's needle unit and the
# model answers wrongly; "mean" also scored 10/10 at 8K, 16K and 32K in our CPU passkey runs.
lm = agentmem.load("gemma-3-270m", memory=agentmem.MemoryConfig(n_local=960, topk=8, repr="mean"))
session = lm.session()
session.append(HEADER)
for step in range(40):  # about 5,000 tokens of filler, appended piece by piece
    if step == 30:
        session.append(NEEDLE.format(key="71432"))
    session.append(FILLER * 6)
session.append(QUESTION)

print(f"{len(session)} tokens in memory, at most {lm.memory.window} attended per step")
print("answer:", session.generate(max_new_tokens=6))
for unit in session.recalled():
    mark = "  <- the pass key" if "71432" in unit.text else ""
    print(f"  recalled tokens {unit.start}-{unit.end} (layers {unit.layers}){mark}")
