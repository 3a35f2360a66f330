"""Passkey retrieval at scale on the GPU: Gemma-3-270M, lengths x depths, agentmem with a <= 4K
window beside full attention where it fits. Writes JSON rows, a table and a NIAH heatmap PNG.

    python -m benchmarks.passkey_scale --model path/to/gemma-3-270m.gguf \
        --lengths 131072,262144,524288,1048576 --full-lengths 16384 --out results/

`--device-units P` keeps the memory's unit keys and values in pinned host memory, P units per
layer and key head cached on the GPU (KV tiers).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

import agentmem
from agentmem.models import load
from agentmem.passkey import (
    build_prompt,
    depths,
    draw_keys,
    format_table,
    run_prompt,
    summarize,
    warm_up,
)


def heatmap(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({r["method"] for r in rows})
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 3.6), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        mine = [r for r in rows if r["method"] == method]
        lengths = sorted({r["length"] for r in mine})
        levels = sorted({r["depth"] for r in mine})
        grid = torch.full((len(levels), len(lengths)), float("nan"))
        for i, depth in enumerate(levels):
            for j, length in enumerate(lengths):
                cell = [r["correct"] for r in mine if r["depth"] == depth and r["length"] == length]
                if cell:
                    grid[i, j] = sum(cell) / len(cell)
        ax.imshow(grid.numpy(), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" for n in lengths])
        ax.set_yticks(range(len(levels)), [f"{d:.0%}" for d in levels])
        ax.set_xlabel("context length")
        ax.set_ylabel("needle depth")
        ax.set_title(method)
        for i in range(len(levels)):
            for j in range(len(lengths)):
                if not torch.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--lengths", default="131072,262144,524288,1048576")
    parser.add_argument("--full-lengths", default="16384")
    parser.add_argument(
        "--full-keys-of", default="", help="also run full attention with the keys of these lengths"
    )
    parser.add_argument("--depths", default="5", help="a count (evenly spread) or a list 0.1,0.5")
    parser.add_argument("--dtype", default="float32", help="Gemma-3 decodes digits badly in bf16")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--preset", default="4k")
    parser.add_argument(
        "--device-units",
        type=int,
        default=None,
        help="KV tiers: unit keys and values in host memory, this many per layer and key head "
        "cached on the GPU (MemoryConfig.device_units; bounds GPU memory at 10M tokens)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--prompts", default=":", help="run a slice of each length's prompts, e.g. 0:5"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default="gpu")
    args = parser.parse_args(argv)

    memory = agentmem.MemoryConfig.preset(args.preset, device_units=args.device_units)
    lm = load(args.model, memory, dtype=getattr(torch, args.dtype))
    levels = (
        depths(int(args.depths))
        if "." not in args.depths
        else [float(d) for d in args.depths.split(",")]
    )
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"{device_name}, {args.dtype}: {memory!r}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    warm_up(lm, memory)
    # (prompt length, method, the length whose keys it uses: the same depths and keys compare)
    plan = [(int(n), "agentmem", int(n)) for n in args.lengths.split(",") if n]
    for n in [n for n in args.full_lengths.split(",") if n]:
        for keys_of in [n] + [m for m in args.full_keys_of.split(",") if m]:
            plan.append((int(n), "full", int(keys_of)))
    rows = []
    for length, method, keys_of in sorted(plan):
        keys = draw_keys(len(levels) * args.trials, seed=args.seed + keys_of)
        first, _, stop = args.prompts.partition(":")
        chosen = range(len(levels) * args.trials)[int(first or 0) : int(stop) if stop else None]
        for i, depth in enumerate(levels):
            for trial in range(args.trials):
                if i * args.trials + trial not in chosen:
                    continue
                prompt = build_prompt(lm.tokenizer, length, depth, keys[i * args.trials + trial])
                start = time.perf_counter()
                row = run_prompt(lm, method, prompt, memory)
                rows.append({**asdict(row), "keys_of": keys_of})
                print(
                    f"{method} {length} keys of {keys_of} {depth:.2f} {row.key} "
                    f"{row.answer.strip()[:12]!r} {row.correct} recalled={row.needle_layers} "
                    f"prefill {row.prefill_s:.1f}s ({row.tokens / row.prefill_s:.0f} tok/s) "
                    f"peak {row.peak_bytes / 2**30:.1f} GiB, {time.perf_counter() - start:.0f}s",
                    file=sys.stderr,
                    flush=True,
                )
                (args.out / f"passkey_scale_{args.tag}.json").write_text(json.dumps(rows, indent=1))
    table = format_table(summarize([_row(r) for r in rows]))
    (args.out / f"passkey_scale_{args.tag}.txt").write_text(
        f"{device_name}, {args.dtype}\n{memory!r}\n{table}\n"
    )
    heatmap(
        rows, args.out / f"passkey_scale_{args.tag}.png", f"passkey, Gemma-3-270M, {device_name}"
    )
    print(table)
    return 0


def _row(data: dict):
    from agentmem.passkey import Row

    return Row(**{k: v for k, v in data.items() if k != "keys_of"})


if __name__ == "__main__":
    sys.exit(main())
