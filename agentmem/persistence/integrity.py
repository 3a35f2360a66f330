"""Checksums a payload carries in its own safetensors header, so that part of it can be verified
without reading the rest: a sha256 per small tensor, and a crc32 per block of rows (along dim 2)
of every large tensor of three or more dimensions, the unit keys and values a lazy resume reads
only when a step first retrieves them. crc32 catches the truncations and bit flips of a damaged
disk; it is no defence against someone who rewrites the file on purpose.
"""

from __future__ import annotations

import hashlib
import json
import zlib

import torch

KEY = "agentmem.integrity"
VERSION = 1
BLOCK_BYTES = 1 << 16  # a block of rows is about this size (a 128-token unit of 256 bf16 dims)
LARGE = 1 << 20  # tensors from this size on are checked by blocks


def as_bytes(tensor: torch.Tensor):
    """The tensor's bytes as a buffer (contiguous, CPU)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


def sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(as_bytes(tensor)).hexdigest()


def crc32(tensor: torch.Tensor) -> int:
    return zlib.crc32(as_bytes(tensor))


def rows_per_block(tensor: torch.Tensor) -> int:
    """Rows (along dim 2) in one checked block: a power of two near BLOCK_BYTES."""
    row = tensor[:, :, :1].numel() * tensor.element_size()
    rows = 1
    while rows * 2 * row <= BLOCK_BYTES:
        rows *= 2
    return rows


def blocked(tensor: torch.Tensor) -> bool:
    return tensor.dim() >= 3 and tensor.numel() * tensor.element_size() >= LARGE


def block_crcs(tensor: torch.Tensor, rows: int) -> list[int]:
    """crc32 of each block of `rows` rows along dim 2 (the last block may be shorter)."""
    n = tensor.shape[2]
    return [crc32(tensor[:, :, at : at + rows]) for at in range(0, n, rows)]


def record(tensors: dict[str, torch.Tensor]) -> str:
    """The integrity record of `tensors` (CPU), as the header metadata string."""
    sha, rows = {}, {}
    for name, tensor in tensors.items():
        if blocked(tensor):
            per = rows_per_block(tensor)
            rows[name] = {"per_block": per, "crc32": block_crcs(tensor, per)}
        else:
            sha[name] = sha256(tensor)
    return json.dumps({"version": VERSION, "sha256": sha, "rows": rows})
