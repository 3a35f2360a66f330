"""The CPU's attention with its lse: torch's flash kernel per segment against every logit
materialised, in one process on the same prompt.

On the CPU the reference kernels run every step. A prefill chunk's attention over its window
needs the lse (to merge the memory's placement with the local window's), which torch's fused
`scaled_dot_product_attention` does not return; `reference.segment_attention` now calls torch's
CPU flash kernel for each segment, which does, and merges them. This reads one prompt of random
tokens into a session of a built-in model twice, the flash path first and then the
materialising one (the path's switch set for the run), and once more with flash, then reports
tokens/s.

    python -m benchmarks.cpu_attention --model qwen2.5-coder-0.5b-instruct --tokens 8192
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import agentmem
from agentmem_kernels import reference


def prefill_tok_s(lm, ids: list[int], flash: bool) -> float:
    """A session's tokens/s reading `ids`, with the flash path on or off."""
    chosen = reference._cpu_flash_with_lse
    if not flash:
        reference._cpu_flash_with_lse = lambda q: False
    try:
        session = lm.session()
        started = time.perf_counter()
        session.append_tokens(ids)
        return len(ids) / (time.perf_counter() - started)
    finally:
        reference._cpu_flash_with_lse = chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=None, help="a JSON row to write")
    args = parser.parse_args(argv)
    lm = agentmem.load(args.model, device="cpu")
    torch.manual_seed(0)
    ids = torch.randint(1000, 20000, (args.tokens,)).tolist()
    row = {"model": args.model, "tokens": args.tokens, "threads": torch.get_num_threads()}
    for key, flash in (
        ("flash_tok_s", True),
        ("materialised_tok_s", False),
        ("flash_again_tok_s", True),
    ):
        row[key] = prefill_tok_s(lm, ids, flash)
        print(f"{key}: {row[key]:.0f}", file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
