"""Session bundles (`export_session` / `import_`), on SQLite and PostgreSQL: a stored session moves
to another store and tenant and continues token for token; messages, segments and fork parents
round-trip; a malformed bundle is refused naming the bundle and member and leaves the target store
as it was; tenants stay isolated."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest
import torch
from sqlalchemy import create_engine, text

import agentmem
from agentmem.persistence import CorruptPayload, SessionExists, SessionNotFound, Store
from agentmem.persistence.errors import CorruptBundle
from agentmem.session import LanguageModel
from tests.helpers import build, char_tokenizer

SMALL = agentmem.MemoryConfig(n_init=4, unit_size=16, topk=2, n_local=48, exec_chunk=16)
FACT = "The code is 4721. "
FILLER = "The quick brown fox jumps over the lazy dog. " * 5
TABLES = ("tenants", "sessions", "messages", "segments", "session_segments")
FIRST, LAST = "segments/000000.safetensors", "segments/000001.safetensors"


@pytest.fixture
def lm() -> LanguageModel:
    return LanguageModel(build("gemma3"), char_tokenizer(), SMALL)


@pytest.fixture
def other_store(backend, tmp_path, request):
    """A second store of the same backend: its own database and root."""
    url = None
    if backend == "postgresql":
        url = request.getfixturevalue("postgres_server").new_database()
    store = Store(url=url, root=tmp_path / "other")
    yield store
    store.close()


def _conversation(session) -> None:
    session.append(FACT + FILLER, role="user")
    session.generate(max_new_tokens=4)
    session.append(FILLER + "What is the code?", role="user")


def _fill(store: Store, session_id: str = "s", tenant: str = "acme") -> None:
    """A session of two segments and three messages, written through the store's own API."""
    store.create_session(session_id, fingerprint={"model": "m"}, memory={"unit": 16}, tenant=tenant)
    store.write_segment(
        session_id, {"a": torch.arange(12.0).reshape(3, 4)}, {"n": 1}, 12,
        [("system", "Be brief. 記憶 🧠", 0, 5), ("user", "'; DROP TABLE x; --", 5, 12)],
        tenant=tenant,
    )  # fmt: skip
    store.write_segment(
        session_id, {"a": torch.ones(2, dtype=torch.bfloat16)}, {"n": 2, "nested": [1, "x"]}, 20,
        [("assistant", "line\nbreak", 12, 20)], tenant=tenant,
    )  # fmt: skip


def _state(store: Store) -> tuple[dict, list[str]]:
    """Every table's row count and the payload folder's files: what an import may change."""
    engine = create_engine(store.url)
    try:
        with engine.connect() as c:
            counts = {t: c.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in TABLES}
    finally:
        engine.dispose()
    return counts, sorted(p.name for p in (store.root / "payloads").iterdir())


def _records(store: Store, session_id: str, tenant: str) -> tuple:
    """The session as the store reports it, minus what an import renames (files, ids)."""
    messages = store.messages(session_id, tenant=tenant)
    segments = store.segments(session_id, tenant=tenant)
    return (
        [(m.role, m.text, m.start, m.end, m.created) for m in messages],
        [(s.seq, s.bytes, s.sha256, s.meta) for s in segments],
        [{k: (v.dtype, v.tolist()) for k, v in store.read_segment(s).items()} for s in segments],
    )


def test_an_exported_session_resumes_in_another_store_and_tenant(lm, store, other_store, tmp_path):
    uninterrupted = lm.session()
    _conversation(uninterrupted)
    want = uninterrupted.generate(max_new_tokens=12)
    saved = lm.session("support-42", store=store, tenant="acme")
    _conversation(saved)
    path = saved.export(tmp_path / "bundle.tar")
    assert path == tmp_path / "bundle.tar" and tarfile.is_tarfile(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.tar", "other", "store"]

    info = other_store.import_(path, tenant="globex")
    original = store.session_info("support-42", tenant="acme")
    assert (info.id, info.tenant, info.tokens) == ("support-42", "globex", len(saved))
    assert (info.fingerprint, info.memory, info.created) == (
        original.fingerprint, original.memory, original.created,
    )  # fmt: skip
    assert other_store.sessions(tenant="acme") == []
    assert _records(other_store, "support-42", "globex") == _records(store, "support-42", "acme")
    mine = {s.file for s in other_store.segments("support-42", tenant="globex")}
    assert mine.isdisjoint(s.file for s in store.segments("support-42", tenant="acme"))

    resumed = lm.session("support-42", store=other_store, tenant="globex")
    assert resumed.tokens == saved.tokens
    assert [(m.role, m.text, m.start, m.end) for m in resumed.messages()] == [
        (m.role, m.text, m.start, m.end) for m in saved.messages()
    ]
    assert resumed.generate(max_new_tokens=12) == want


def test_messages_segments_and_fork_parents_round_trip(store, other_store, tmp_path):
    _fill(store, "p")
    store.fork("p", "c", tenant="acme")
    store.write_segment("c", {"b": torch.zeros(3)}, {"n": 3}, 24, [("user", "hi", 20, 24)],
                        tenant="acme")  # fmt: skip
    bundle = store.export_session("c", tmp_path / "c.tar", tenant="acme")
    info = other_store.import_(bundle, tenant="beta")
    assert info.parent == "p" and info.tokens == 24
    assert info.created == store.session_info("c", tenant="acme").created < info.updated
    assert other_store.session_info("c", tenant="beta").parent == "p"
    assert _records(other_store, "c", "beta") == _records(store, "c", "acme")
    assert [m.text for m in other_store.messages("c", tenant="beta")][-1] == "hi"
    assert [s.seq for s in other_store.segments("c", tenant="beta")] == [0, 1, 2]
    again = other_store.import_(bundle, tenant="beta", session_id="c-copy")  # another id
    assert again.id == "c-copy" and _records(other_store, "c-copy", "beta") == _records(
        store, "c", "acme"
    )
    other_store.delete("c", tenant="beta")  # each import owns its copies of the payloads
    assert _records(other_store, "c-copy", "beta") == _records(store, "c", "acme")


def test_another_tenant_cannot_export(store, tmp_path):
    _fill(store, "s", tenant="acme")
    with pytest.raises(SessionNotFound) as lookup:
        store.segments("s", tenant="other")
    with pytest.raises(SessionNotFound) as export:
        store.export_session("s", tmp_path / "x.tar", tenant="other")
    assert str(export.value) == str(lookup.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # no bundle, no temp file


def test_importing_twice_raises_session_exists_and_changes_nothing(store, other_store, tmp_path):
    _fill(store)
    bundle = store.export_session("s", tmp_path / "s.tar", tenant="acme")
    other_store.import_(bundle, tenant="acme")
    before = _state(other_store)
    with pytest.raises(SessionExists, match="'s'.*'acme'"):
        other_store.import_(bundle, tenant="acme")
    assert _state(other_store) == before
    other_store.import_(bundle, tenant="zeta")  # ids are per tenant
    assert [i.id for i in other_store.sessions(tenant="zeta")] == ["s"]


def test_a_failed_export_leaves_no_bundle_and_keeps_an_old_one(store, tmp_path):
    _fill(store)
    path = tmp_path / "s.tar"
    path.write_bytes(b"an older bundle")
    last = store.segments("s", tenant="acme")[-1]
    payload = store.segment_path(last)
    data = bytearray(payload.read_bytes())
    data[-1] ^= 0x01  # same size, another sha256
    payload.write_bytes(bytes(data))
    with pytest.raises(CorruptPayload, match=str(payload)):
        store.export_session("s", path, tenant="acme")
    assert path.read_bytes() == b"an older bundle"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tar", "store"]


def test_a_database_failure_during_import_leaves_neither_rows_nor_files(
    store, other_store, tmp_path, monkeypatch
):
    _fill(store)
    bundle = store.export_session("s", tmp_path / "s.tar", tenant="acme")
    before = _state(other_store)

    def fail(*args, **kwargs):
        raise RuntimeError("the database went away")

    monkeypatch.setattr(Store, "_add_messages", fail)  # after the payloads were copied in
    with pytest.raises(RuntimeError, match="went away"):
        other_store.import_(bundle, tenant="acme")
    assert _state(other_store) == before


# -- malformed bundles ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[dict, dict[str, bytes]]:
    """A valid bundle's manifest and members (made once, on SQLite: the target store is tested)."""
    folder = tmp_path_factory.mktemp("good")
    with Store(root=folder / "store") as source:
        _fill(source)
        path = source.export_session("s", folder / "s.tar", tenant="acme")
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert sorted(members) == ["manifest.json", FIRST, LAST]
    return json.loads(members.pop("manifest.json")), members


def _regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, kind: bytes, link: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info, None


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


def _edit(change):
    """A mutation of the manifest only."""

    def mutate(manifest, members):
        change(manifest)
        return manifest, members, []

    return mutate


def _set_payload(member: str, data: bytes, *, manifest_too: bool):
    def mutate(manifest, members):
        members[member] = data
        if manifest_too:  # the manifest agrees, so only the content check can catch it
            entry = next(s for s in manifest["segments"] if s["member"] == member)
            entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
        return manifest, members, []

    return mutate


def _extra(*entries):
    return lambda manifest, members: (manifest, members, list(entries))


def _drop(member: str):
    return lambda manifest, members: (manifest, {k: v for k, v in members.items() if k != member},
                                      [])  # fmt: skip


def _nan(manifest, members):
    return json.dumps(manifest).replace('"nested"', '"nan": NaN, "nested"'), members, []


MALFORMED = {
    "symlink": (_extra(_special("segments/x", tarfile.SYMTYPE, "/etc/passwd")), CorruptBundle,
                "'segments/x' is not a regular file"),
    "hardlink": (_extra(_special("hard", tarfile.LNKTYPE, FIRST)), CorruptBundle,
                 "'hard' is not a regular file"),
    "folder": (_extra(_special("segments", tarfile.DIRTYPE)), CorruptBundle,
               "'segments' is not a regular file"),
    "fifo": (_extra(_special("pipe", tarfile.FIFOTYPE)), CorruptBundle, "'pipe' is not a regular"),
    "absolute path": (_extra(_regular("/tmp/evil", b"x")), CorruptBundle,
                      "'/tmp/evil' has an unsafe path"),
    "dot-dot path": (_extra(_regular("segments/../../evil", b"x")), CorruptBundle,
                     "'segments/../../evil' has an unsafe path"),
    "unlisted member": (_extra(_regular("notes.txt", b"hi")), CorruptBundle,
                        "'notes.txt' is not listed in the manifest"),
    "member twice": (_extra(_regular(FIRST, b"again")), CorruptBundle, f"'{FIRST}' appears twice"),
    "missing payload": (_drop(LAST), CorruptPayload, f"'{LAST}' is missing"),
    "no manifest": (_drop("manifest.json"), CorruptBundle, "has no manifest.json"),
    "size mismatch": (_edit(lambda m: m["segments"][1].update(bytes=m["segments"][1]["bytes"] + 1)),
                      CorruptPayload, f"'{LAST}' is .* bytes, the manifest says"),
    "sha256 mismatch": (lambda m, p: (m, {**p, LAST: _flip_last_byte(p[LAST])}, []),
                        CorruptPayload, f"'{LAST}' does not match the sha256"),
    "not safetensors": (_set_payload(LAST, b"\xff" * 64, manifest_too=True), CorruptPayload,
                        f"'{LAST}' is not a readable safetensors file"),
    "unknown version": (_edit(lambda m: m.update(version=2)), CorruptBundle,
                        "'manifest.json' has format version 2"),
    "version true": (_edit(lambda m: m.update(version=True)), CorruptBundle,
                     "format version True"),
    "other format": (_edit(lambda m: m.update(format="zip")), CorruptBundle,
                     "not a session bundle"),
    "not json": (lambda m, p: ("{", p, []), CorruptBundle, "'manifest.json' is not JSON"),
    "NaN in meta": (_nan, CorruptBundle, "'manifest.json' is not JSON.*NaN"),
    "negative end": (_edit(lambda m: m["messages"][0].update(end=-1)), CorruptBundle,
                     "'manifest.json' fails validation"),
    "end before start": (_edit(lambda m: m["messages"][1].update(start=13)), CorruptBundle,
                         "fails validation.*must be >= start"),
    "NUL in text": (_edit(lambda m: m["messages"][0].update(text="a\0b")), CorruptBundle,
                    "fails validation"),
    "empty role": (_edit(lambda m: m["messages"][0].update(role="")), CorruptBundle,
                   "fails validation"),
    "naive time": (_edit(lambda m: m["messages"][0].update(created="2026-01-01T00:00:00")),
                   CorruptBundle, "fails validation"),
    "tokens as text": (_edit(lambda m: m["session"].update(tokens="20")), CorruptBundle,
                       "fails validation"),
    "bad session id": (_edit(lambda m: m["session"].update(id="../../etc")), CorruptBundle,
                       "fails validation.*session id"),
    "unsafe member in manifest": (_edit(lambda m: m["segments"][0].update(member="/etc/passwd")),
                                  CorruptBundle, "fails validation"),
    "unknown field": (_edit(lambda m: m["session"].update(owner="root")), CorruptBundle,
                      "fails validation"),
    "meta not a dict": (_edit(lambda m: m["segments"][0].update(meta=[1])), CorruptBundle,
                        "fails validation"),
    "one member for two segments": (_edit(lambda m: m["segments"][1].update(member=FIRST)),
                                    CorruptBundle, "two segments name the same member"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_bundle_is_refused_and_changes_nothing(case, good, store, tmp_path):
    mutate, error, match = MALFORMED[case]
    manifest, members = json.loads(json.dumps(good[0])), dict(good[1])
    manifest, members, extra = mutate(manifest, members)
    raw = manifest if isinstance(manifest, str) else json.dumps(manifest)
    entries = [] if case == "no manifest" else [_regular("manifest.json", raw.encode())]
    entries += [_regular(name, data) for name, data in members.items()] + extra
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, None if data is None else io.BytesIO(data))
    before = _state(store)
    with pytest.raises(error, match=f"(?s){match}") as raised:  # pydantic's errors span lines
        store.import_(path, tenant="acme")
    assert str(path) in str(raised.value)
    assert _state(store) == before and before[0]["sessions"] == 0
    assert before[1] == [".store-id"]  # no payload, no temp file


def test_a_file_that_is_not_a_tar_is_refused(store, tmp_path):
    path = tmp_path / "bundle.tar"
    path.write_bytes(b"\x00\x01 not a tar file " * 100)
    before = _state(store)
    with pytest.raises(CorruptBundle, match="not a readable tar file"):
        store.import_(path, tenant="acme")
    assert _state(store) == before
