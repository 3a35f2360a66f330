"""Write the lock (`constraints.txt`): the exact versions pip resolves today for this repository's
packages with every extra, on this machine's Python. `make lock` runs it in a fresh venv;
`make install` installs with `-c constraints.txt`, so CI tests what was locked.

torch is left out: its build is the machine's choice (`make TORCH=...`; the CPU build here).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = "dev,qwen-0.5b,qwen-1.5b,langchain,server"
OURS = {"agentmem-kv", "agentmem-kernels", "langchain-agentmem"}
UNLOCKED = {"torch"}


def normalized(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def resolve(torch: str) -> list[tuple[str, str]]:
    """(name, version) of everything a fresh install would take, from pip's dry-run report."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
             "--report", str(report), torch, "-e", str(ROOT / "kernels"), "-e",
             f"{ROOT}[{EXTRAS}]", "-e", str(ROOT / "integrations" / "langchain")],
            check=True,
        )  # fmt: skip
        items = json.loads(report.read_text())["install"]
    pins = {}
    for item in items:
        name = normalized(item["metadata"]["name"])
        if name not in OURS | UNLOCKED:
            pins[name] = item["metadata"]["version"]
    pip_version = subprocess.run(
        [sys.executable, "-m", "pip", "--version"], check=True, capture_output=True, text=True
    ).stdout.split()[1]
    pins["pip"] = pip_version
    return sorted(pins.items())


def main() -> None:
    torch = sys.argv[1] if len(sys.argv) > 1 else "torch==2.13.0"
    pins = resolve(torch)
    header = [
        "# The lock: exact versions CI tests (`make lock` rewrites it; `make install` uses it).",
        f"# Resolved {date.today()} on Python {platform.python_version()} ({sys.platform}), "
        f"with {torch} and the extras {EXTRAS}; torch itself is not locked.",
    ]
    lines = header + [f"{name}=={version}" for name, version in pins]
    (ROOT / "constraints.txt").write_text("\n".join(lines) + "\n")
    print(f"constraints.txt: {len(pins)} pins")


if __name__ == "__main__":
    main()
