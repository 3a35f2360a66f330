"""Stream a long text into a session piece by piece, then ask about a detail from far back.

Run: .venv/bin/python examples/remember.py   (CPU, about half a minute after the first model load)
"""

import agentmem
from agentmem.passkey import FILLER, HEADER, NEEDLE, QUESTION

# The default layout: 16 units of 64 tokens retrieved into a 2K window, each unit scored by the
# means of its 8-token slices. (With InfLLM's representatives, the keys that got most attention in
# 128-token units, one of the three global layers missed this prompt's needle unit and the model
# answered wrongly.)
lm = agentmem.load("gemma-3-270m")
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
