"""Let a range venv read the heavy packages of this one instead of installing its own copies.

`make test-latest` and `make test-oldest` test other releases of transformers and the rest of the
seam. torch's build is the machine's choice (TORCH=), triton is pinned by the kernels and the
built-in models' GGUF chunks are data: none of them is what those runs test, and a copy of them
costs 2.5 GB a venv (CI ran out of disk). Run with the python of the venv that has them:

    .venv/bin/python .ci/share.py .venv-latest

It links their files into `<venv>/shared/` and adds that folder to the venv's path with a .pth
file, so pip there sees them installed and leaves them be.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from agentmem.builtin import BUILTIN

SHARED = ["torch", "triton"] + [part for model in BUILTIN.values() for part in model.parts]


def installed(name: str):
    try:
        return distribution(name)
    except PackageNotFoundError:
        return None


def top_level(dist) -> set[str]:
    """The names a distribution puts at the top of site-packages (not its scripts in ../bin)."""
    return {file.parts[0] for file in dist.files or [] if file.parts[0] != ".."}


def share(venv: Path) -> list[str]:
    shared = venv / "shared"
    shared.mkdir(exist_ok=True)
    names = []
    for name in SHARED:
        dist = installed(name)
        if dist is None:  # an extra this venv lacks (the 1.5B model)
            continue
        for entry in top_level(dist):
            link = shared / entry
            if not link.exists():
                link.symlink_to(Path(dist.locate_file(entry)).resolve())
        names.append(f"{name} {dist.version}")
    where = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = subprocess.run(
        [str(venv / "bin" / "python"), "-c", where],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "agentmem-shared.pth").write_text(f"{shared.resolve()}\n")
    return names


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print("shared from", sys.prefix, ":", ", ".join(share(Path(sys.argv[1]))))
