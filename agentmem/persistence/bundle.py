"""Session bundles: one tar file holding `manifest.json` (format version, the session's record, its
messages, its segments in order) and the segments' safetensors payloads, so a session can move
between stores. Reading trusts nothing in the file: every member and manifest field is checked,
and payloads are copied into the store under names the store picks; nothing is extracted."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import time
import uuid
from datetime import timezone
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from agentmem.persistence import payloads
from agentmem.persistence.errors import CorruptBundle, CorruptPayload
from agentmem.persistence.ids import check_id
from agentmem.persistence.records import Message, Segment, SessionInfo

FORMAT = "agentmem-session-bundle"
VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST = 256 << 20  # bytes: the messages' text; refuse to read more into memory
MAX_ROLE = 64  # the store's limit (MessageRow.role)
_MEMBER = re.compile(r"segments/[0-9]{6}\.safetensors")

Count = Annotated[StrictInt, Field(ge=0)]
NoNul = Annotated[StrictStr, Field(pattern=r"^[^\x00]*$")]
Time = Annotated[AwareDatetime, AfterValidator(lambda t: t.astimezone(timezone.utc))]  # as stored


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BundleMessage(_Strict):
    role: Annotated[NoNul, Field(min_length=1, max_length=MAX_ROLE)]
    text: NoNul
    start: Count
    end: Count
    created: Time

    @model_validator(mode="after")
    def _span(self) -> BundleMessage:
        if self.end < self.start:
            raise ValueError(f"end ({self.end}) must be >= start ({self.start})")
        return self


class BundleSegment(_Strict):
    member: Annotated[StrictStr, Field(pattern=_MEMBER.pattern)]
    bytes: Count
    sha256: Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")]
    meta: dict[str, Any]


class BundleSession(_Strict):
    id: StrictStr
    fingerprint: dict[str, Any]
    memory: dict[str, Any]
    tokens: Count
    parent: StrictStr | None
    created: Time

    @model_validator(mode="after")
    def _ids(self) -> BundleSession:
        check_id(self.id, "session id")  # InvalidId is a ValueError: reported as one here
        if self.parent is not None:
            check_id(self.parent, "parent session id")
        return self


class Manifest(_Strict):
    format: Literal["agentmem-session-bundle"]
    version: Literal[1]
    session: BundleSession
    messages: list[BundleMessage]
    segments: list[BundleSegment]

    @model_validator(mode="after")
    def _unique_members(self) -> Manifest:
        members = [s.member for s in self.segments]
        if len(set(members)) != len(members):
            raise ValueError("two segments name the same member")
        return self


# -- writing --------------------------------------------------------------------------------------


class _Hashing:
    """A file read through once by tarfile, hashing what it hands on."""

    def __init__(self, f: io.BufferedReader) -> None:
        self.f, self.digest = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.digest.update(data)
        return data


def _member(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, int(mtime), 0o644
    return info


def write(
    path: str | os.PathLike,
    info: SessionInfo,
    messages: list[Message],
    segments: list[tuple[Segment, Path]],
) -> Path:
    """Write the bundle of a session (`segments`: each with its payload file) to `path`, through a
    temp file beside it renamed into place, so a reader never sees half a bundle. A payload that
    doesn't match its record is CorruptPayload naming the file (and no bundle is left)."""
    target = Path(path).absolute()
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "session": {
            "id": info.id, "fingerprint": info.fingerprint, "memory": info.memory,
            "tokens": info.tokens, "parent": info.parent, "created": info.created.isoformat(),
        },
        "messages": [
            {"role": m.role, "text": m.text, "start": m.start, "end": m.end,
             "created": m.created.isoformat()}
            for m in messages
        ],
        "segments": [
            {"member": f"segments/{i:06d}.safetensors", "bytes": s.bytes, "sha256": s.sha256,
             "meta": s.meta}
            for i, (s, _) in enumerate(segments)
        ],
    }  # fmt: skip
    raw = json.dumps(manifest, ensure_ascii=False, allow_nan=False).encode()
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    when = time.time()
    try:
        with open(temp, "xb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                tar.addfile(_member(MANIFEST, len(raw), when), io.BytesIO(raw))
                for entry, (segment, file) in zip(manifest["segments"], segments, strict=True):
                    _add_payload(tar, entry["member"], segment, file, when)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    payloads.fsync_dir(target.parent)
    return target


def _add_payload(tar: tarfile.TarFile, member: str, segment: Segment, file: Path, when: float):
    what = "delete the session or restore the file from a backup"
    try:
        f = open(file, "rb")
    except OSError as e:
        raise CorruptPayload(f"payload {file} cannot be read ({e}); {what}") from e
    with f:
        size = os.fstat(f.fileno()).st_size
        if size != segment.bytes:
            raise CorruptPayload(
                f"payload {file} is {size} bytes, its record says {segment.bytes}; {what}"
            )
        reader = _Hashing(f)
        tar.addfile(_member(member, size, when), reader)
    if reader.digest.hexdigest() != segment.sha256:
        raise CorruptPayload(f"payload {file} does not match its recorded sha256; {what}")


# -- reading --------------------------------------------------------------------------------------


class Reader:
    """An open bundle whose members and manifest have been checked (`manifest`); its payloads
    are checked as `copy_payloads` copies them. Use as a context manager."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:  # a missing or unreadable file raises its own OSError
            self._tar = tarfile.open(self.path, mode="r:")
        except tarfile.TarError as e:
            raise CorruptBundle(f"bundle {self.path} is not a readable tar file: {e}") from e
        try:
            self._members = self._check_members()
            self.manifest = self._read_manifest()
            self._check_listed()
        except BaseException:
            self._tar.close()
            raise

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._tar.close()

    def _bad(self, member: str, why: str) -> CorruptBundle:
        return CorruptBundle(f"bundle {self.path}: member {member!r} {why}")

    def _check_members(self) -> dict[str, tarfile.TarInfo]:
        try:
            members = self._tar.getmembers()
        except (OSError, tarfile.TarError) as e:
            raise CorruptBundle(f"bundle {self.path} is not a readable tar file: {e}") from e
        found: dict[str, tarfile.TarInfo] = {}
        for m in members:
            name = PurePosixPath(m.name)
            if name.is_absolute() or ".." in name.parts or "\\" in m.name:
                raise self._bad(m.name, "has an unsafe path (absolute, '..' or '\\')")
            if not m.isreg() or m.issparse():
                raise self._bad(m.name, "is not a regular file (link, folder or device)")
            if m.name in found:
                raise self._bad(m.name, "appears twice")
            found[m.name] = m
        return found

    def _read_manifest(self) -> Manifest:
        member = self._members.get(MANIFEST)
        if member is None:
            raise CorruptBundle(f"bundle {self.path} has no {MANIFEST}: not a session bundle")
        if member.size > MAX_MANIFEST:
            raise self._bad(MANIFEST, f"is {member.size} bytes, over the {MAX_MANIFEST} allowed")
        raw = self._tar.extractfile(member).read()
        try:
            data = json.loads(raw, parse_constant=_no_constant)
        except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise self._bad(MANIFEST, f"is not JSON: {e}") from e
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise self._bad(MANIFEST, f"does not say format {FORMAT!r}: not a session bundle")
        version = data.get("version")
        if type(version) is not int or version != VERSION:  # 1.0 and true are not 1
            raise self._bad(
                MANIFEST,
                f"has format version {version!r}; this agentmem reads version "
                f"{VERSION} (a newer agentmem wrote it? upgrade to import it)",
            )
        try:
            return Manifest.model_validate(data)
        except ValidationError as e:
            raise self._bad(MANIFEST, f"fails validation: {e}") from e

    def _check_listed(self) -> None:
        listed = {s.member: s for s in self.manifest.segments}
        for name in self._members:
            if name != MANIFEST and name not in listed:
                raise self._bad(name, "is not listed in the manifest")
        for name, segment in listed.items():
            member = self._members.get(name)
            if member is None:
                raise CorruptPayload(f"bundle {self.path}: payload member {name!r} is missing")
            if member.size != segment.bytes:
                raise CorruptPayload(
                    f"bundle {self.path}: payload member {name!r} is {member.size} bytes, "
                    f"the manifest says {segment.bytes}"
                )

    def copy_payloads(self, root: Path) -> list[str]:
        """Copy each segment's payload durably into the store under `root` (in the manifest's
        order), checking size, sha256 and header; returns the store's names for them. On any
        failure, those already copied are removed."""
        names: list[str] = []
        try:
            for segment in self.manifest.segments:
                source = self._tar.extractfile(self._members[segment.member])
                what = f"bundle {self.path}: payload member {segment.member!r}"
                names.append(payloads.copy_in(root, source, segment.bytes, segment.sha256, what))
        except BaseException:
            payloads.discard(root, names)
            raise
        return names


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")
