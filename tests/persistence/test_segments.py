"""Segments: payload round trip, order, sharing through forks, freeing files on delete,
corruption detected and named, orphan files collected on open."""

from __future__ import annotations

import os
import time

import pytest
import torch

from agentmem.persistence import CorruptPayload, Segment, SegmentNotFound, SessionNotFound
from agentmem.persistence.store import Store


def payload(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "k": torch.randn(2, 3, 5, generator=g).to(torch.bfloat16),
        "v": torch.randn(2, 3, 5, generator=g),
        "idx": torch.arange(seed, seed + 4, dtype=torch.int64),
    }


def files(store: Store) -> set[str]:
    return {p.name for p in (store.root / "payloads").iterdir() if p.name != ".store-id"}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )


@pytest.fixture
def session(store):
    store.create_session("s", fingerprint={"model": "m"}, memory={}, tenant="acme")
    return "s"


def test_write_read_round_trip_in_seq_order(store, session, open_store):
    written = []
    for i in range(3):
        meta = {"layer": i, "span": [i * 128, (i + 1) * 128], "note": "ünïcode ✓", "f": 0.5}
        written.append(
            store.write_segment("s", payload(i), meta, tokens=(i + 1) * 128, tenant="acme")
        )
    assert [s.seq for s in written] == [0, 1, 2]
    listed = store.segments("s", tenant="acme")
    assert listed == written
    for i, segment in enumerate(listed):
        assert same(store.read_segment(segment), payload(i))
        assert (
            segment.meta["span"] == [i * 128, (i + 1) * 128] and segment.meta["note"] == "ünïcode ✓"
        )
        path = store.segment_path(segment)
        assert path.is_file() and path.stat().st_size == segment.bytes
        assert (
            path.parent.parent == store.root and "acme" not in segment.file and "s" not in path.stem
        )
    assert store.session_info("s", tenant="acme").tokens == 384
    again = open_store()
    assert again.segments("s", tenant="acme") == written
    assert same(again.read_segment(written[2]), payload(2))


def test_payload_is_safetensors_not_pickle(store, session):
    segment = store.write_segment("s", payload(0), {}, tokens=1, tenant="acme")
    head = store.segment_path(segment).read_bytes()[:64]
    assert not head.startswith(b"\x80")  # pickle protocol marker
    header_len = int.from_bytes(head[:8], "little")
    assert head[8:9] == b"{" and header_len > 0


def test_fork_shares_parent_segments_and_diverges(store, session):
    first = store.write_segment("s", payload(0), {"n": 0}, tokens=10, tenant="acme")
    store.fork("s", "child", tenant="acme")
    assert store.segments("child", tenant="acme") == [first]
    assert store.session_info("child", tenant="acme").tokens == 10
    before = files(store)
    mine = store.write_segment("child", payload(1), {"n": 1}, tokens=20, tenant="acme")
    theirs = store.write_segment("s", payload(2), {"n": 2}, tokens=30, tenant="acme")
    assert len(files(store)) == len(before) + 2  # the fork copied no file
    assert store.segments("child", tenant="acme") == [first, mine]
    assert store.segments("s", tenant="acme") == [first, theirs]
    assert mine.seq == theirs.seq == 1 and mine.id != theirs.id
    assert same(store.read_segment(store.segments("child", tenant="acme")[1]), payload(1))


def test_delete_frees_only_unreferenced_files(store, session):
    shared = store.write_segment("s", payload(0), {}, tokens=1, tenant="acme")
    store.fork("s", "child", tenant="acme")
    parent_only = store.write_segment("s", payload(1), {}, tokens=2, tenant="acme")
    child_only = store.write_segment("child", payload(2), {}, tokens=2, tenant="acme")
    paths = {s.file: store.segment_path(s) for s in (shared, parent_only, child_only)}
    store.delete("s", tenant="acme")
    assert not paths[parent_only.file].exists()
    assert paths[shared.file].exists() and paths[child_only.file].exists()
    assert same(store.read_segment(store.segments("child", tenant="acme")[0]), payload(0))
    with pytest.raises(SegmentNotFound):
        store.read_segment(parent_only)
    store.delete("child", tenant="acme")
    assert not paths[shared.file].exists() and not paths[child_only.file].exists()
    assert files(store) == set()


@pytest.mark.parametrize("damage", ["bitflip", "truncate", "missing"])
def test_corrupt_payload_is_named_and_others_still_read(store, session, damage):
    bad = store.write_segment("s", payload(0), {}, tokens=1, tenant="acme")
    store.create_session("other", fingerprint={}, memory={}, tenant="acme")
    good = store.write_segment("other", payload(1), {}, tokens=1, tenant="acme")
    path = store.segment_path(bad)
    data = bytearray(path.read_bytes())
    if damage == "bitflip":
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) - 7]))
    else:
        path.unlink()
    with pytest.raises(CorruptPayload) as caught:
        store.read_segment(bad)
    assert str(path) in str(caught.value)
    assert same(store.read_segment(good), payload(1))


def test_unreadable_payload_with_matching_hash_is_corrupt(store, session):
    segment = store.write_segment("s", payload(0), {}, tokens=1, tenant="acme")
    path = store.segment_path(segment)
    path.write_bytes(b"not a safetensors file")  # and make its record agree
    from sqlalchemy import update

    from agentmem.persistence.payloads import sha256_of
    from agentmem.persistence.schema import SegmentRow

    with store._write.begin() as s:
        s.execute(
            update(SegmentRow)
            .where(SegmentRow.id == segment.id)
            .values(bytes=path.stat().st_size, sha256=sha256_of(path))
        )
    with pytest.raises(CorruptPayload, match=str(path)):
        store.read_segment(segment)


def test_forged_segment_is_refused(store, session):
    real = store.write_segment("s", payload(0), {}, tokens=1, tenant="acme")
    forged = Segment(real.id, 0, "../../etc/passwd", 1, "0" * 64, {})
    with pytest.raises(SegmentNotFound):
        store.read_segment(forged)
    with pytest.raises(Exception, match="not a payload file name"):
        store.segment_path(forged)
    with pytest.raises(SegmentNotFound):
        store.read_segment(Segment(real.id + 100, 0, real.file, real.bytes, real.sha256, {}))


def test_orphans_are_removed_on_open(store, session, open_store):
    kept = store.write_segment("s", payload(0), {}, tokens=1, tenant="acme")
    folder = store.root / "payloads"
    old = time.time() - 2 * 3600
    crashed_temp = folder / ("a" * 32 + ".tmp")
    crashed_payload = folder / ("b" * 32 + ".safetensors")  # its row never committed
    fresh = folder / ("c" * 32 + ".safetensors")  # maybe another process's write in flight
    unrelated = folder / "README"
    for path in (crashed_temp, crashed_payload, fresh, unrelated):
        path.write_bytes(b"junk")
    for path in (crashed_temp, crashed_payload, unrelated):
        os.utime(path, (old, old))
    os.utime(store.segment_path(kept), (old, old))
    store.close()
    again = open_store()
    assert not crashed_temp.exists() and not crashed_payload.exists()
    assert fresh.exists() and unrelated.exists()
    assert same(again.read_segment(kept), payload(0))
    assert again.collect_orphans(grace_s=0) == [fresh]


def test_write_segment_checks_input_before_writing(store, session):
    with pytest.raises(SessionNotFound):
        store.write_segment("missing", payload(0), {}, tokens=1, tenant="acme")
    with pytest.raises(ValueError, match="JSON"):
        store.write_segment("s", payload(0), {"x": float("nan")}, tokens=1, tenant="acme")
    with pytest.raises(ValueError, match="tokens"):
        store.write_segment("s", payload(0), {}, tokens=-1, tenant="acme")
    with pytest.raises(TypeError, match="tensors"):
        store.write_segment("s", {"k": [1, 2]}, {}, tokens=1, tenant="acme")
    assert files(store) == set() and store.segments("s", tenant="acme") == []
    assert store.session_info("s", tenant="acme").tokens == 0
