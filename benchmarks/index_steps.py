"""One retrieval step against the memory's size: the exact scan against the FAISS index (CPU).

`benchmarks/index.py` measures a whole prefill on a real model; this isolates the step that the
index replaces, at memory sizes no CPU prefill reaches. Per size, one layer's representatives
(Gemma-3-270M's shape by default: 4 query heads on 1 key head of 256, 8 representatives a unit)
are indexed once (the build time is reported per unit), then a decoding step's scoring queries
(`query_window` of them) and a prefill chunk's (`exec_chunk`) choose their top-k units both
ways. Representatives and queries are random, with one planted unit per step that the queries
favour: random vectors are the hard case for a graph index (no clusters to follow), so the
times are for the index's worst data, and recall@k against the exact choice is that of noise
(near ties everywhere) except for the planted unit, which both must find.

    python -m benchmarks.index_steps --units 1024,4096,16384,32768 \
        --out benchmarks/results/index_steps_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import agentmem
from agentmem.memory.index import UnitIndex, indexed_top_units
from agentmem_kernels import score_units
from benchmarks.timing import median_ms


def _step_queries(n_queries: int, n_q_heads: int, dim: int, toward: torch.Tensor):
    """Random scoring queries [1, Hq, T, D], each leaning towards the planted representative."""
    q = torch.randn(1, n_q_heads, n_queries, dim)
    return q + 0.5 * toward.reshape(1, 1, 1, dim)


def measure(n_units: int, *, heads=(4, 1), dim=256, per_unit=8, memory, repeats=3, seed=0):
    """One size's row: index build seconds per unit; per step kind, both ways' median seconds,
    recall@k of the index against the exact choice, and whether each found the planted unit."""
    torch.manual_seed(seed)
    reps = torch.randn(1, heads[1], n_units, per_unit, dim)
    planted = int(torch.randint(n_units, ()))
    toward = torch.randn(dim)
    reps[:, :, planted, 0] = 4 * toward  # one representative the step's queries lean towards
    index = UnitIndex()
    started = time.perf_counter()
    index.sync(reps)
    row = {"units": n_units, "build_s_per_unit": (time.perf_counter() - started) / n_units}
    scale, k = dim**-0.5, memory.topk
    for kind, n_queries in (("decode", memory.query_window), ("prefill", memory.exec_chunk)):
        q = _step_queries(n_queries, heads[0], dim, toward)

        def exact_step(q=q):
            return score_units(q, reps, kind="dot", scale=scale, k=k)

        def faiss_step(q=q):
            return indexed_top_units(index, q, reps, k=k, kind="dot", scale=scale)

        exact, found = set(exact_step().flatten().tolist()), set(faiss_step().flatten().tolist())
        exact_s = median_ms(exact_step, repeats, warmup=0) / 1e3
        faiss_s = median_ms(faiss_step, repeats, warmup=0) / 1e3
        row[kind] = {
            "queries": n_queries, "exact_s": exact_s, "faiss_s": faiss_s,
            "speedup": exact_s / faiss_s, "recall_at_k": len(exact & found) / k,
            "planted_exact": planted in exact, "planted_faiss": planted in found,
        }  # fmt: skip
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.index_steps", description=__doc__.splitlines()[0]
    )
    p.add_argument("--units", default="1024,4096,16384,32768", help="memory sizes, in units")
    p.add_argument("--preset", default="default", help="topk, query_window and exec_chunk")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/index_steps.json"))
    args = p.parse_args(argv)
    memory = agentmem.MemoryConfig.preset(args.preset)
    rows = []
    for n_units in (int(u) for u in args.units.split(",")):
        row = measure(n_units, per_unit=memory.repr_topk, memory=memory, repeats=args.repeats)
        rows.append(row)
        for kind in ("decode", "prefill"):
            r = row[kind]
            print(
                f"{n_units:>7} units ({n_units * memory.unit_size:>9,} tokens), {kind:<7} "
                f"({r['queries']} queries): exact {r['exact_s'] * 1e3:8.2f} ms, faiss "
                f"{r['faiss_s'] * 1e3:8.2f} ms ({r['speedup']:.2f}x), recall@{memory.topk} "
                f"{r['recall_at_k']:.2f}, planted unit found {r['planted_exact']}/"
                f"{r['planted_faiss']}; index build {row['build_s_per_unit'] * 1e3:.2f} ms/unit",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"preset": args.preset, "threads": torch.get_num_threads()}
    meta["memory"] = memory.model_dump()
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
