"""Payload files: safetensors under `<root>/payloads/`, written atomically (temp file, fsync,
rename, directory fsync), verified by sha256 before they are read; never pickle. Each also carries
checksums of its parts in its header (`integrity`), so `mapped.MappedPayload` can read and verify
a part without the rest."""

from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from agentmem.persistence import integrity
from agentmem.persistence.errors import CorruptPayload, StoreError

DIR = "payloads"
SUFFIX = ".safetensors"
TEMP_SUFFIX = ".tmp"
STORE_ID_FILE = ".store-id"
# A payload is renamed into place a moment before its row commits: a file younger than this may
# belong to another process's write in flight, so orphan collection leaves it for a later open.
ORPHAN_GRACE_S = 3600.0
FIX = "delete the session or restore the file from a backup"  # what a damage error advises
_NAME = re.compile(rf"{DIR}/[0-9a-f]{{32}}{re.escape(SUFFIX)}")


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (POSIX; Windows has no directory handles to sync)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def resolve(root: Path, name: str) -> Path:
    """The path of a payload named as the store names them (never a path from elsewhere)."""
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise StoreError(f"{name!r} is not a payload file name of this store")
    return root / name


def write(root: Path, tensors: dict[str, torch.Tensor]) -> tuple[str, int, str]:
    """Write one payload durably; returns (name relative to root, bytes, sha256)."""
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise TypeError("tensors must be a dict of str -> torch.Tensor")
    folder = root / DIR
    folder.mkdir(parents=True, exist_ok=True)
    stem = uuid.uuid4().hex
    temp = folder / f"{stem}{TEMP_SUFFIX}"
    final = folder / f"{stem}{SUFFIX}"
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    try:
        save_file(cpu, str(temp), metadata={integrity.KEY: integrity.record(cpu)})
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        digest, size = sha256_of(temp), temp.stat().st_size
        os.replace(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(folder)
    return f"{DIR}/{final.name}", size, digest


def copy_in(root: Path, source: BinaryIO, size: int, sha256: str, what: str) -> str:
    """Copy a payload from `source` (a bundle's member, named `what`) durably into the store, as
    `write` does, once its size, sha256 and safetensors header check out; returns its name."""
    folder = root / DIR
    folder.mkdir(parents=True, exist_ok=True)
    stem = uuid.uuid4().hex
    temp = folder / f"{stem}{TEMP_SUFFIX}"
    final = folder / f"{stem}{SUFFIX}"
    digest, copied = hashlib.sha256(), 0
    try:
        with open(temp, "xb") as f:
            while chunk := source.read(1 << 20):
                digest.update(chunk)
                copied += len(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if copied != size:
            raise CorruptPayload(f"{what} is {copied} bytes, the manifest says {size}")
        if digest.hexdigest() != sha256:
            raise CorruptPayload(f"{what} does not match the sha256 in the manifest")
        try:  # the hash only says the manifest agrees; the header must parse too
            with safe_open(str(temp), framework="pt") as opened:
                opened.keys()
        except Exception as e:
            raise CorruptPayload(f"{what} is not a readable safetensors file: {e}") from e
        os.replace(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(folder)
    return f"{DIR}/{final.name}"


def discard(root: Path, names: list[str]) -> None:
    """Remove payloads whose rows never committed; one that can't be removed now is an orphan,
    which a later open collects."""
    for name in names:
        try:
            resolve(root, name).unlink(missing_ok=True)
        except OSError:
            pass
    if names:
        fsync_dir(root / DIR)


def check_size(path: Path, size: int) -> None:
    """CorruptPayload unless the payload exists with the size its record gives."""
    try:
        actual = path.stat().st_size
    except OSError as e:
        raise CorruptPayload(f"payload {path} cannot be read ({e}); {FIX}") from e
    if actual != size:
        raise CorruptPayload(f"payload {path} is {actual} bytes, its record says {size}; {FIX}")


def read(path: Path, size: int, sha256: str) -> dict[str, torch.Tensor]:
    """The tensors of a payload whose size and sha256 match its record, else CorruptPayload."""
    check_size(path, size)
    if sha256_of(path) != sha256:
        raise CorruptPayload(f"payload {path} does not match its recorded sha256; {FIX}")
    try:
        return load_file(str(path))
    except Exception as e:  # the hash matched, so the file was written unreadable
        raise CorruptPayload(f"payload {path} is not a readable safetensors file: {e}") from e


def claim(root: Path, store_id: str) -> None:
    """Mark `root` as holding this database's payloads; refuse a root another database holds
    (its orphan collection would delete the other's files)."""
    folder = root / DIR
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / STORE_ID_FILE
    try:
        found = marker.read_text().strip()
    except FileNotFoundError:
        temp = folder / f"{STORE_ID_FILE}.{uuid.uuid4().hex}{TEMP_SUFFIX}"
        temp.write_text(store_id + "\n")
        os.replace(temp, marker)
        fsync_dir(folder)
        found = marker.read_text().strip()
    if found != store_id:
        raise StoreError(
            f"store root {root} holds the payloads of another database ({marker} says {found}, "
            f"this database is {store_id}); give each database its own root"
        )


def orphans(root: Path, known: set[str], grace_s: float = ORPHAN_GRACE_S) -> list[Path]:
    """Files under `<root>/payloads/` that no segment row names (crash leftovers: temp files,
    payloads whose row never committed, or whose row was deleted before the file), older than
    `grace_s`."""
    folder = root / DIR
    if not folder.is_dir():
        return []
    cutoff = time.time() - grace_s
    found = []
    for path in folder.iterdir():
        if path.name == STORE_ID_FILE or not path.is_file():
            continue
        if f"{DIR}/{path.name}" in known:
            continue
        if path.name.endswith(SUFFIX) or path.name.endswith(TEMP_SUFFIX):
            if path.stat().st_mtime < cutoff:
                found.append(path)
    return found
