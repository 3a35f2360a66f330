"""A chatbot backend on agentmem's Python API: one memory per user, kept in a store, each turn
sending only the user's new message (the session holds the rest, so nothing is read twice), and
a conversation resumed by a backend started afresh, without re-reading it.

Run: .venv/bin/python examples/chatbot_backend.py   (CPU, about a minute with the 0.5B model)
"""

import tempfile

import agentmem
from agentmem import chat

MODEL = "qwen2.5-coder-0.5b-instruct"  # the `qwen-0.5b` extra; any chat model with a template


class Backend:
    """What a web app's handler calls: `answer(user, text)` -> the reply's text."""

    def __init__(self, store: agentmem.Store, tenant: str = "default") -> None:
        self.store, self.tenant = store, tenant

    def answer(self, user: str, text: str, max_tokens: int = 32) -> chat.Completion:
        reply = chat.Reply(
            model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=max_tokens,
            session_id=f"user-{user}", tenant=self.tenant, may_be_new=True,
        )  # fmt: skip
        return chat.complete(reply, store=self.store)


root = tempfile.mkdtemp()
backend = Backend(agentmem.Store(root=root), tenant="shop")
first = backend.answer("ada", "Hi! My order number is 8812 and it has not arrived.")
print("ada, turn 1:", first.text)
second = backend.answer("ada", "Can you repeat my order number?")
o = second.outcome
print("ada, turn 2:", second.text)
print(f"  {o.input_tokens} prompt tokens, {o.cached_tokens} of them from memory")

# A backend started afresh (as a new process would: its own store handle, nothing held in
# memory): the conversation resumes from the store, not by reading it again.
backend = Backend(agentmem.Store(root=root), tenant="shop")
third = backend.answer("ada", "Thanks. What was the number again?")
o = third.outcome
print("ada, after a restart:", third.text)
print(f"  {o.input_tokens} prompt tokens, {o.cached_tokens} of them from the stored session")
for message in o.recalled_messages:
    print("  recalled:", message)
