"""Cross-session search (`Store.search`), on SQLite and PostgreSQL: a planted fact is found by its
question, no search reaches another tenant, the FAISS index saved with each segment round-trips
through resume and fork, and it ranks as exact scoring does where the two must agree."""

from __future__ import annotations

import os
import subprocess
import sys

import faiss
import numpy as np
import pytest
import torch

import agentmem
from agentmem.persistence import CorruptPayload, InvalidId
from agentmem.persistence.search import UNITS, id_span, session_index, span_id
from agentmem.search import QueryEncoder, exact_scores, index_contents, segment_index
from agentmem.session import LanguageModel
from tests.helpers import build, char_tokenizer

SMALL = agentmem.MemoryConfig(n_init=4, unit_size=16, topk=2, n_local=48, exec_chunk=16)
FILLER = "The quick brown fox jumps over the lazy dog. " * 3
FACTS = {
    "alpha": "The locker code is 4721 at the north gate.",
    "beta": "Our wifi password is seagull-77-orange.",
    "gamma": "The vet for the dog is Dr. Okafor on Maple Street.",
}


@pytest.fixture
def lm() -> LanguageModel:
    return LanguageModel(build("gemma3"), char_tokenizer(), SMALL)  # memory and sliding layers


def _plant(lm, store, session_id: str, fact: str, tenant: str = "acme", **kwargs):
    session = lm.session(session_id, store=store, tenant=tenant, progress=False, **kwargs)
    session.append(FILLER, role="user")
    session.append(f"{fact} {FILLER}", role="user")
    session.append("Noted, I will remember that.", role="assistant")
    return session


def _sorted_index(index) -> tuple[np.ndarray, np.ndarray]:
    ids, vectors = index_contents(index)
    order = np.argsort(ids)
    return ids[order], vectors[order]


def _live_index(session):
    """The index of the session's whole memory as it stands, built from its live state."""
    tensors, _ = segment_index(session.state_dict())
    units = faiss.deserialize_index(tensors[UNITS].numpy())
    units.merge_from(faiss.deserialize_index(tensors["search.tail"].numpy()))
    return _sorted_index(units)


def test_a_planted_fact_is_found_by_its_question(lm, store):
    for session_id, fact in FACTS.items():
        _plant(lm, store, session_id, fact)
    hits = store.search("what is the wifi password", tenant="acme", k=3)  # BM25, no model
    assert (hits[0].session_id, hits[0].message) == ("beta", ("user", f"{FACTS['beta']} {FILLER}"))
    first = store.messages("beta", tenant="acme")[1]
    assert (hits[0].start, hits[0].end, hits[0].text) == (first.start, first.end, first.text)
    assert hits[0].score > 0 and all(h.score <= hits[0].score for h in hits)
    hybrid = store.search(
        "the vet on Maple Street", tenant="acme", k=3, model=QueryEncoder(lm), method="hybrid"
    )
    assert ("gamma", ("user", f"{FACTS['gamma']} {FILLER}")) in {
        (h.session_id, h.message) for h in hybrid
    }


def test_kv_search_returns_the_unit_exact_inner_products_rank_first(lm, store):
    session = _plant(lm, store, "alpha", FACTS["alpha"])
    encoder = QueryEncoder(lm)
    query = "What is the locker code?"
    ids, vectors = _live_index(session)
    best = int(np.argmax(vectors @ encoder.vector(query, SMALL.model_dump())))
    start, end = (int(x[best]) for x in id_span(ids))
    (hit,) = store.search(query, tenant="acme", k=1, model=encoder, method="kv")
    owner = max(session.messages(), key=lambda m: min(end, m.end) - max(start, m.start))
    assert (hit.session_id, hit.start, hit.end) == ("alpha", start, end)
    assert hit.message == (owner.role, owner.text)
    assert hit.text == lm.tokenizer.decode(session.tokens[start:end])


def test_no_search_reaches_another_tenants_sessions(lm, store):
    _plant(lm, store, "alpha", FACTS["alpha"], tenant="acme")
    _plant(lm, store, "alpha", "The other tenant's secret code is 9999.", tenant="other")
    encoder = QueryEncoder(lm)
    for method in ("kv", "bm25", "hybrid"):
        for tenant, secret in (("acme", "9999"), ("other", "4721")):
            hits = store.search("secret code", tenant=tenant, k=10, model=encoder, method=method)
            assert hits and all(secret not in h.message[1] + h.text for h in hits)
        assert store.search("code", tenant="nobody", model=encoder, method=method) == []
    with pytest.raises(InvalidId):
        store.search("code", tenant="../acme", method="bm25")


def test_the_index_round_trips_through_save_resume_and_fork(lm, store, open_store):
    session = _plant(lm, store, "p", FACTS["alpha"], tenant="default")
    assert len(store.segments("p")) == 3  # one save per message: the index is merged
    for got, want in zip(_sorted_index(session_index(store, "p", tenant="default")),
                         _live_index(session), strict=True):  # fmt: skip
        np.testing.assert_array_equal(got, want)
    resumed = lm.session("p", store=open_store(), progress=False)
    resumed.append("Another turn after the resume. " * 3)
    child = resumed.fork("c")
    child.append("Only the child hears this. " * 3)
    for session_id, live in (("p", resumed), ("c", child)):
        got = _sorted_index(session_index(store, session_id, tenant="default"))
        for a, b in zip(got, _live_index(live), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    store.delete("p")
    assert session_index(store, "c", tenant="default").ntotal == len(_live_index(child)[0])


def test_faiss_ranks_as_exact_scoring_where_the_two_must_agree():
    # One layer, one key head, one query head, one query token, one slot per unit: retrieval's
    # softmax is monotone in the inner product, so the orders are the same; FAISS's scores are
    # the inner products themselves.
    gen = torch.Generator().manual_seed(0)
    vectors = torch.randn(40, 8, generator=gen).numpy()
    query = torch.randn(1, 1, 8, generator=gen)  # [Hq, T, D]
    ids = np.array([span_id(16 * u, 16, 0) for u in range(40)], dtype=np.int64)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(8))
    index.add_with_ids(vectors, ids)
    scores, found = index.search(query[0, 0].numpy()[None] * 0.5, 40)
    exact = exact_scores([query], 0.5, vectors, np.arange(40), heads=1)
    np.testing.assert_array_equal(id_span(found[0])[0] // 16, np.argsort(-exact, kind="stable"))
    np.testing.assert_allclose(scores[0], np.sort(vectors @ query[0, 0].numpy() * 0.5)[::-1],
                               rtol=1e-5)  # fmt: skip


def test_a_corrupted_index_is_refused_naming_its_file(lm, store):
    _plant(lm, store, "alpha", FACTS["alpha"])
    segment = store.segments("alpha", tenant="acme")[-1]
    path = store.segment_path(segment)
    data = bytearray(path.read_bytes())
    index = store.read_segment(segment)[UNITS].numpy().tobytes()
    at = data.find(index) + len(index) // 2
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptPayload, match=str(path)):
        store.search("code", tenant="acme", model=QueryEncoder(lm), method="kv")
    assert store.search("locker code", tenant="acme", method="bm25")  # the texts still answer


def test_search_refuses_bad_input(lm, store):
    _plant(lm, store, "alpha", FACTS["alpha"])
    with pytest.raises(ValueError, match="model="):
        store.search("code", tenant="acme", method="kv")
    with pytest.raises(ValueError, match="method"):
        store.search("code", tenant="acme", method="magic")
    with pytest.raises(ValueError, match="non-empty"):
        store.search("  ", tenant="acme", method="bm25")
    with pytest.raises(ValueError, match="k must"):
        store.search("code", tenant="acme", k=0, method="bm25")


def test_bm25_search_keeps_jax_out_of_the_process(tmp_path):
    """bm25s probes JAX at import, and JAX takes 75% of a GPU's memory: searching must not load
    it. A stand-in `jax` package that leaves a mark when imported shows whether anything did."""
    fake = tmp_path / "jax"
    fake.mkdir()
    mark = tmp_path / "imported"
    (fake / "__init__.py").write_text(f"open({str(mark)!r}, 'w').close()\n")
    script = (
        "from datetime import datetime\n"
        "import agentmem\n"
        "from agentmem.persistence.records import Message\n"
        "from agentmem.persistence.search import _bm25\n"
        "fox = Message('user', 'the quick brown fox', 0, 4, datetime.now())\n"
        "dog = Message('user', 'a lazy dog sleeps', 4, 8, datetime.now())\n"
        "found = _bm25('fox', {'s': [fox], 't': [dog]}, 5)\n"
        "assert [f.session for f in found] == ['s'], found\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    subprocess.run([sys.executable, "-c", script], check=True, env=env)
    assert not mark.exists()


def test_a_one_word_query_finds_its_message():
    """bm25s numbers a query's own words from 0: a one-word query's only id is 0, and must still
    be searched (only stopwords and words no message has find nothing)."""
    from datetime import datetime

    from agentmem.persistence.records import Message
    from agentmem.persistence.search import _bm25

    fox = Message("user", "the quick brown fox", 0, 4, datetime.now())
    dog = Message("user", "a lazy dog sleeps", 4, 8, datetime.now())
    messages = {"s": [fox], "t": [dog]}
    assert [f.session for f in _bm25("fox", messages, 5)] == ["s"]
    assert [f.session for f in _bm25("dog", messages, 5)] == ["t"]
    assert _bm25("the", messages, 5) == [] == _bm25("zebra", messages, 5)
