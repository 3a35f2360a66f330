"""Payloads read in parts (`MappedPayload`): what is read equals what was written, damage is found
in the part that is read (and only there), and a file without checksums is verified whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from agentmem.persistence import CorruptPayload, integrity, payloads
from agentmem.persistence.mapped import MappedPayload

TENSORS = {
    "unit_k": torch.randn(1, 2, 3000, 64),  # 1.5 MB: checked by blocks of rows
    "reps": torch.randn(1, 2, 20, 4, 64),  # small: one sha256
    "tokens": torch.arange(100),
    "bf16": torch.randn(1, 1, 4100, 256).to(torch.bfloat16),
}


def _write(tmp_path: Path) -> MappedPayload:
    name, size, sha = payloads.write(tmp_path, TENSORS)
    return MappedPayload(tmp_path / name, size, sha)


def _flip(path: Path, name: str, row: int) -> None:
    """Flip a bit in row `row` (dim 2, head 0; a 1-d tensor: element) of tensor `name`."""
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little") + 8
    begin, _ = json.loads(bytes(data[8:header]))[name]["data_offsets"]
    tensor = TENSORS[name]
    row_bytes = tensor[0, 0, 0].numel() * tensor.element_size() if tensor.dim() >= 3 else 8
    data[header + begin + row * row_bytes] ^= 0x04
    path.write_bytes(bytes(data))


def test_parts_read_back_exactly(tmp_path):
    payload = _write(tmp_path)
    assert payload.names() == set(TENSORS)
    assert payload.shape("unit_k") == (1, 2, 3000, 64) and payload.dtype("bf16") == torch.bfloat16
    for name, tensor in TENSORS.items():
        assert torch.equal(payload.tensor(name), tensor)
    assert torch.equal(payload.rows("unit_k", 130, 777), TENSORS["unit_k"][:, :, 130:777])
    assert torch.equal(payload.rows("bf16", 4000, 4100), TENSORS["bf16"][:, :, 4000:4100])
    assert torch.equal(payload.rows("reps", 3, 9), TENSORS["reps"][:, :, 3:9])
    with pytest.raises(ValueError, match="outside"):
        payload.rows("unit_k", 10, 3001)


def test_damage_is_found_in_the_block_read_and_only_there(tmp_path):
    payload = _write(tmp_path)
    per = integrity.rows_per_block(TENSORS["unit_k"])
    _flip(payload.path, "unit_k", 5 * per + 3)
    damaged = MappedPayload(payload.path, payload.path.stat().st_size, "")
    assert torch.equal(damaged.rows("unit_k", 0, 5 * per), TENSORS["unit_k"][:, :, : 5 * per])
    with pytest.raises(CorruptPayload, match=str(payload.path)):
        damaged.rows("unit_k", 5 * per + 10, 5 * per + 11)
    with pytest.raises(CorruptPayload, match="unit_k"):
        damaged.tensor("unit_k")


def test_damage_in_a_small_tensor_is_found_when_it_is_read(tmp_path):
    payload = _write(tmp_path)
    _flip(payload.path, "reps", 1)
    damaged = MappedPayload(payload.path, payload.path.stat().st_size, "")
    with pytest.raises(CorruptPayload, match="reps"):
        damaged.tensor("reps")


def test_a_truncated_file_is_refused_on_open(tmp_path):
    name, size, sha = payloads.write(tmp_path, TENSORS)
    path = tmp_path / name
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptPayload, match="bytes, its record says"):
        MappedPayload(path, size, sha)


def test_a_file_without_checksums_is_verified_whole_on_open(tmp_path):
    path = tmp_path / "old.safetensors"
    save_file(TENSORS, str(path))  # as payloads were written before they carried checksums
    size, sha = path.stat().st_size, payloads.sha256_of(path)
    assert torch.equal(
        MappedPayload(path, size, sha).rows("unit_k", 5, 9), TENSORS["unit_k"][:, :, 5:9]
    )
    _flip(path, "tokens", 0)
    with pytest.raises(CorruptPayload, match="sha256"):
        MappedPayload(path, size, sha)
