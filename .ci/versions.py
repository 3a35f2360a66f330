"""Print the versions of what agentmem's seam depends on, in one line (for CI's logs)."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("torch", "transformers", "tokenizers", "triton", "gguf", "accelerate", "pydantic")


def installed(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


if __name__ == "__main__":
    found = ", ".join(f"{name} {installed(name)}" for name in PACKAGES)
    print(f"python {platform.python_version()}, {found}")
