"""A payload opened for reading in parts: the file stays memory-mapped and a part is verified
against the checksums in its header (`integrity`) when it is first read, so opening a large
payload costs what is read of it, not its size."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from agentmem.persistence import integrity, payloads
from agentmem.persistence.errors import CorruptPayload

FIX = payloads.FIX


class MappedPayload:
    """The tensors of one payload file, read on demand: `tensor(name)` whole, `rows(name, start,
    end)` a range along dim 2 of a large one. Damage found on any read raises CorruptPayload
    naming the file. A file written before payloads carried checksums is verified whole, once,
    when it is opened."""

    def __init__(self, path: Path, size: int, sha256: str) -> None:
        self.path = path
        payloads.check_size(path, size)
        try:
            self._file = safe_open(str(path), framework="pt")
            self._names = frozenset(self._file.keys())  # asked for at every read: once
            found = (self._file.metadata() or {}).get(integrity.KEY)
            self._record = None if found is None else json.loads(found)
        except Exception as e:
            raise CorruptPayload(f"payload {path} has an unreadable header ({e}); {FIX}") from e
        if self._record is None:
            if payloads.sha256_of(path) != sha256:
                raise CorruptPayload(f"payload {path} does not match its recorded sha256; {FIX}")
        elif self._record.get("version") != integrity.VERSION:
            raise CorruptPayload(f"payload {path} has an integrity record of another version")
        self._checked: dict[str, set[int]] = {}  # blocks verified so far, per tensor

    def names(self) -> frozenset[str]:
        return self._names

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return self._slice(name)[tuple(slice(0, 0) for _ in self.shape(name))].dtype

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor, verified."""
        if self._record is not None and name in self._record["rows"]:
            return self.rows(name, 0, self.shape(name)[2])
        tensor = self._read(lambda: self._file.get_tensor(name), name)
        if self._record is not None:
            expected = self._record["sha256"].get(name)
            if expected is None or integrity.sha256(tensor) != expected:
                self._damaged(name)
        return tensor

    def rows(self, name: str, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) along dim 2 of a tensor of three or more dimensions, verified by
        the blocks they lie in (only those are read)."""
        n = self.shape(name)[2]
        if not 0 <= start <= end <= n:
            raise ValueError(f"rows [{start}, {end}) outside the {n} rows of {name}")
        blocks = None if self._record is None else self._record["rows"].get(name)
        if blocks is None and self._record is None:  # a file verified whole when opened
            return self._span(name, start, end)
        if blocks is None:  # a small tensor: checked whole
            return self.tensor(name)[:, :, start:end]
        per, crcs = blocks["per_block"], blocks["crc32"]
        first, last = start // per, -(-end // per)
        data = self._span(name, first * per, min(last * per, n))
        checked = self._checked.setdefault(name, set())
        for block in range(first, last):
            if block in checked:
                continue
            piece = data[:, :, (block - first) * per : (block - first + 1) * per]
            if block >= len(crcs) or integrity.crc32(piece) != crcs[block]:
                self._damaged(f"{name} (rows {block * per} on)")
            checked.add(block)
        return data[:, :, start - first * per : end - first * per]

    def _slice(self, name: str):
        if name not in self._names:
            raise KeyError(f"payload {self.path} holds no tensor {name!r}")
        return self._file.get_slice(name)

    def _span(self, name: str, start: int, end: int) -> torch.Tensor:
        index = (slice(None), slice(None), slice(start, end))
        return self._read(lambda: self._slice(name)[index], name)

    def _read(self, read, name: str) -> torch.Tensor:
        try:
            return read()
        except KeyError:
            raise
        except Exception as e:
            raise CorruptPayload(f"payload {self.path}: {name} cannot be read ({e}); {FIX}") from e

    def _damaged(self, what: str) -> None:
        raise CorruptPayload(f"payload {self.path}: {what} does not match its checksum; {FIX}")
