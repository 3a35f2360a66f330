"""Stored sessions (`lm.session(id, store=...)`), on SQLite and PostgreSQL: resumed by another store
object or another process, they continue token for token; saves append only what changed; forks
share payloads; messages and provenance are recorded; another model or layout is refused."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import agentmem
from agentmem.session import LanguageModel
from tests.helpers import build, char_tokenizer

SMALL = agentmem.MemoryConfig(n_init=4, unit_size=16, topk=2, n_local=48, exec_chunk=16)
FACT = "The code is 4721. "
FILLER = "The quick brown fox jumps over the lazy dog. " * 5


@pytest.fixture
def lm() -> LanguageModel:
    return LanguageModel(build("gemma3"), char_tokenizer(), SMALL)  # memory and sliding layers


def _conversation(session) -> None:
    session.append(FACT + FILLER, role="user")
    session.generate(max_new_tokens=4)
    session.append(FILLER + "What is the code?", role="user")


def test_a_resumed_session_continues_token_for_token(lm, store, open_store):
    uninterrupted = lm.session()
    _conversation(uninterrupted)
    want = uninterrupted.generate(max_new_tokens=12)
    saved = lm.session("support-42", store=store, tenant="acme")
    _conversation(saved)  # autosaved after every message
    resumed = lm.session("support-42", store=open_store(), tenant="acme")
    assert resumed.tokens == saved.tokens and len(resumed) == len(saved)
    assert resumed.generate(max_new_tokens=12) == want
    assert [(m.role, m.start, m.end) for m in resumed.messages()] == [
        (m.role, m.start, m.end) for m in saved.messages()
    ] + [("assistant", len(saved), len(resumed))]


def test_a_save_writes_what_changed_not_the_whole_memory(lm, store):
    session = lm.session("s", store=store)
    session.append(FACT + FILLER * 4)
    session.append("One more short turn.")
    first, second = store.segments("s", tenant="default")
    whole = sum(t.numel() * t.element_size() for t in session.state_dict()["tensors"].values())
    new_units = [m["n_units"] - m["units_from"] for m in second.meta["layers"]
                 if m["kind"] == "memory"]  # fmt: skip
    assert second.meta["session"]["tokens_from"] == first.meta["session"]["tokens_from"] + len(
        lm.tokenizer(FACT + FILLER * 4).input_ids
    )
    assert all(n <= 2 for n in new_units) and second.bytes < whole / 2 < first.bytes
    assert session.save() is False  # nothing changed since


def test_a_fork_shares_the_parents_payloads_and_goes_its_own_way(lm, store):
    parent = lm.session("p", store=store)
    _conversation(parent)
    child = parent.fork("c")
    shared = {s.file for s in store.segments("p", tenant="default")}
    assert shared <= {s.file for s in store.segments("c", tenant="default")}
    assert store.session_info("c", tenant="default").parent == "p"
    assert child.generate(max_new_tokens=6) == parent.generate(max_new_tokens=6)
    child.append("Only the child hears this.")
    assert {s.file for s in store.segments("p", tenant="default")} >= shared
    assert "Only the child" not in " ".join(m.text for m in parent.messages())
    store.delete("p", tenant="default")
    assert all(store.segment_path(s).is_file() for s in store.segments("c", tenant="default"))


def test_recalled_units_name_the_messages_they_came_from(lm, store):
    session = lm.session("r", store=store)
    session.append(FACT, role="system")
    session.append(FILLER * 3, role="tool")
    session.append("What is the code?", role="user")
    roles = {role for unit in session.recalled() for role, _ in unit.messages}
    assert roles and roles <= {"system", "tool", "user"}
    for unit in session.recalled():
        assert unit.messages  # every retrieved unit came from some message


def test_another_model_or_layout_is_refused_naming_both(lm, store):
    lm.session("m", store=store).append(FACT)
    other = LanguageModel(build("llama"), char_tokenizer(), SMALL)
    with pytest.raises(ValueError, match="gemma3_text.*llama|another model"):
        other.session("m", store=store)
    with pytest.raises(ValueError, match="memory layout"):
        lm.session("m", store=store, memory=SMALL.model_copy(update={"topk": 3}))


def test_a_session_saved_under_the_exact_scan_resumes_under_the_faiss_index(lm, store):
    # The index says how units are found, not what is stored: the same session, either way.
    _conversation(lm.session("i", store=store))

    def resumed(memory=None):
        session = lm.session("i", store=store, memory=memory, autosave=False)
        session.append(FILLER + "And the code?", role="user")  # steps that retrieve
        return session, session.generate(max_new_tokens=8)

    exact, want = resumed()
    indexed = SMALL.model_copy(update={"index": "faiss", "index_min_units": 2})
    session, got = resumed(indexed)
    assert session.memory == indexed and got == want
    assert len(session) == len(exact)
    for layer in session.cache.memory_layers:
        assert layer.index.n_units == layer.units.n_units > 2  # the graphs were searched


def test_a_new_process_resumes_the_session(lm, store, store_args, tmp_path):
    _conversation(lm.session("proc", store=store))
    uninterrupted = lm.session()
    _conversation(uninterrupted)
    want = uninterrupted.generate(max_new_tokens=10)
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        import agentmem
        from agentmem.session import LanguageModel
        from tests.helpers import build, char_tokenizer
        lm = LanguageModel(build("gemma3"), char_tokenizer(), agentmem.MemoryConfig(
            n_init=4, unit_size=16, topk=2, n_local=48, exec_chunk=16))
        store = agentmem.Store(**json.loads(sys.argv[1]))
        print(json.dumps(lm.session("proc", store=store).generate(max_new_tokens=10)))
    """)
    args = json.dumps({"url": store_args["url"], "root": str(store_args["root"])})
    done = subprocess.run(
        [sys.executable, "-c", script, args], capture_output=True, text=True, check=True
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == want
