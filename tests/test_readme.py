"""The README's Python snippets and the examples run as written (on the real Gemma-3-270M), so the
docs cannot drift from the code."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

import agentmem

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_has_its_snippets():
    assert len(snippets()) >= 3


def test_the_readme_snippets_run(capsys):
    namespace: dict = {}
    for code in snippets():
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102
    session, lm = namespace["s"], namespace["lm"]
    assert isinstance(lm, agentmem.LanguageModel) and isinstance(session, agentmem.Session)
    assert len(session) > lm.memory.window  # the memory outgrew the window
    assert namespace["answer"].strip() and capsys.readouterr().out.strip()
    assert namespace["recalled"] and all(
        isinstance(r, agentmem.Recall) for r in namespace["recalled"]
    )
    assert namespace["cache"].get_seq_length() == namespace["input_ids"].shape[1]
    assert namespace["logits"].shape[:2] == namespace["input_ids"].shape
    assert not agentmem.is_wrapped(namespace["model"])
    roles = [m.role for m in namespace["history"]]
    assert roles == ["user", "assistant"] and namespace["reply"] == namespace["history"][1].text
    assert [info.id for info in namespace["listed"]] == ["support-42", "support-42-b"]
    assert [info.id for info in namespace["store"].sessions(tenant="acme")] == ["support-42"]
    first, again = namespace["first"], namespace["again"]  # the LangChain section
    held = first.usage_metadata["input_tokens"] + first.usage_metadata["output_tokens"]
    assert namespace["served"] == held and again.response_metadata["prefilled_tokens"] < 30
    done = namespace["done"]  # the chatbot backends section
    assert done.text and done.outcome.output_tokens > 0 and done.outcome.session_id == "user-ada"
    assert [info.id for info in namespace["store"].sessions(tenant="shop")] == ["user-ada"]


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_the_examples_run(example, capsys):
    runpy.run_path(str(ROOT / "examples" / example), run_name="__main__")
    assert capsys.readouterr().out.strip()
