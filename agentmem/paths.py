"""Where agentmem keeps what it makes: converted models, and the default session store."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The agentmem home: `$AGENTMEM_HOME`, default `~/.cache/agentmem`."""
    return Path(os.environ.get("AGENTMEM_HOME", Path.home() / ".cache" / "agentmem"))
