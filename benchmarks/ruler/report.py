"""Summaries of RULER rows: accuracy per task x length x policy (with misses split by whether
the asked needles were in the answering step's window), as text, and length x depth heatmaps."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _key(length: int) -> str:
    return f"{length // 2**20}M" if length % 2**20 == 0 else f"{length // 1024}K"


def asked_ranks(row: dict) -> list[int]:
    """The ranks at which the layers retrieved the asked needles' units at the answering step:
    for each asked needle and each layer that ranked one of its units, the best of them."""
    ranks = []
    for needle in row.get("needles") or []:
        if not needle.get("asked"):
            continue
        best: dict[int, int] = {}
        for unit in needle["units"]:
            if len(unit) < 4:  # a row from before ranks were recorded
                continue
            for layer, rank in zip(unit[2], unit[3], strict=True):
                if rank is not None:
                    best[layer] = min(rank, best.get(layer, rank))
        ranks.extend(best.values())
    return ranks


def _median(values: list[int]) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per (task, length, policy): prompts, correct, mean score, and for agentmem's
    misses how many had every asked needle in the window of all memory layers ('read': the
    model saw it and still missed), of some ('part') or of none ('lost': a retrieval miss);
    the median rank at which layers retrieved the asked needles, over the hits and over the
    misses (rows that record ranks)."""
    groups: dict[tuple[str, int, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["length"], row["policy"]), []).append(row)
    table = []
    for (task, length, policy), group in sorted(groups.items()):
        misses = [r for r in group if not r["correct"] and r.get("coverage") is not None]
        table.append({
            "task": task, "length": length, "policy": policy, "prompts": len(group),
            "correct": sum(r["correct"] for r in group),
            "score": sum(r["score"] for r in group) / len(group),
            "read": sum(r["coverage"] == 1 for r in misses),
            "part": sum(0 < r["coverage"] < 1 for r in misses),
            "lost": sum(r["coverage"] == 0 for r in misses),
            "rank_hits": _median([x for r in group if r["correct"] for x in asked_ranks(r)]),
            "rank_misses": _median([x for r in group if not r["correct"] for x in asked_ranks(r)]),
        })  # fmt: skip
    return table


def format_table(table: list[dict]) -> str:
    """Per task, lengths down and policies across: correct/prompts (mean score); then each
    agentmem cell's misses as read/part/lost."""
    lines = []
    for task in sorted({e["task"] for e in table}):
        mine = [e for e in table if e["task"] == task]
        policies = sorted({e["policy"] for e in mine}, key=lambda p: (p != "full", p))
        cells = {(e["length"], e["policy"]): e for e in mine}
        header = f"{task:<16}" + "".join(f"{p:>22}" for p in policies)
        lines += [header, "-" * len(header)]
        for length in sorted({e["length"] for e in mine}):
            text = f"{_key(length):<16}"
            for policy in policies:
                e = cells.get((length, policy))
                cell = "" if e is None else f"{e['correct']}/{e['prompts']} ({e['score']:.2f})"
                if e is not None and e["read"] + e["part"] + e["lost"]:
                    cell += f" {e['read']}/{e['part']}/{e['lost']}"
                if e is not None and e.get("rank_misses") is not None:
                    cell += f" r{e['rank_misses']:g}"
                text += f"{cell:>22}"
            lines.append(text)
        lines.append("")
    lines.append(
        "cells: correct/prompts (mean score); agentmem misses as read/part/lost: every asked "
        "needle in the answering step's window in all memory layers / in some / in none; "
        "rN: the median rank at which layers retrieved the asked needles in the misses (0: first)"
    )
    return "\n".join(lines)


def heatmaps(rows: list[dict], folder: Path, title: str) -> list[Path]:
    """One PNG per task: a length x depth grid of mean score per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for task in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == task]
        policies = sorted({r["policy"] for r in mine}, key=lambda p: (p != "full", p))
        lengths = sorted({r["length"] for r in mine})
        depths = sorted({r["depth"] for r in mine}, key=lambda d: -1 if d is None else d)
        fig, axes = plt.subplots(
            1, len(policies), figsize=(1.2 + 1.1 * len(lengths) * len(policies), 3.6),
            squeeze=False,
        )  # fmt: skip
        for ax, policy in zip(axes[0], policies, strict=True):
            grid = np.full((len(depths), len(lengths)), np.nan)
            for i, depth in enumerate(depths):
                for j, length in enumerate(lengths):
                    cell = [r["score"] for r in mine if r["policy"] == policy
                            and r["depth"] == depth and r["length"] == length]  # fmt: skip
                    if cell:
                        grid[i, j] = sum(cell) / len(cell)
                        ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", fontsize=8)
            ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
            ax.set_xticks(range(len(lengths)), [_key(n) for n in lengths])
            ax.set_yticks(range(len(depths)), ["all" if d is None else f"{d:.0%}" for d in depths])
            ax.set_xlabel("context length")
            ax.set_ylabel("depth")
            ax.set_title(policy)
        fig.suptitle(f"{task}: {title}")
        fig.tight_layout()
        path = folder / f"{task}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.ruler.report ROWS.json...`: one table over the rows of several runs
    (processes that split a cell's prompts by `--first`, say)."""
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        raise SystemExit("usage: python -m benchmarks.ruler.report ROWS.json [ROWS.json ...]")
    rows = [row for path in paths for row in json.loads(Path(path).read_text())["rows"]]
    print(format_table(summarize(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
