"""Stream a long text into a session in pieces, then ask about a detail from its beginning.

Run: .venv/bin/python examples/remember.py   (CPU, about a minute after the first model load)
"""

import agentmem
from agentmem.models import load

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)

lm = load("gemma-3-270m", memory=agentmem.MemoryConfig(n_local=960, topk=8))
session = lm.session()
session.append("Remember this: the pass key is 71432. ")
for _ in range(40):  # about 5,000 tokens of filler, appended piece by piece
    session.append(FILLER * 6)
session.append("\n\nWhat is the pass key? The pass key is")

print(f"{len(session)} tokens in memory; answer:", session.generate(max_new_tokens=6))
for unit in session.recalled():
    print(f"  recalled tokens {unit.start}-{unit.end} (layers {unit.layers}): {unit.text[:60]!r}")
