"""A decoding step's retrieval kernels on their own, each launch's cost inside a CUDA graph.

`unit_mass` and `top_units` against the memory's size, torch's topk and SDPA over as many tokens
beside them. A graph of 20 launches back to back is replayed and timed, so each figure is what
the kernel adds to a captured step (a graph of one launch would time the replay's own overhead,
about 8 us). The shape is a Llama decoding step: 8 key heads of 4 query heads, 32 scoring queries
(128 rows a key head), 8 representatives a unit, top 32. `--sweep` also times each pass of
`unit_mass` and each ranking launch under other tile sizes, so that the wrappers' choices can be
checked on a new GPU.

    python -m benchmarks.retrieval_kernels --units 42,480,2016,8160,16352 --head-dims 64,128 --sweep
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from agentmem_kernels import reference, triton_memory
from agentmem_kernels.triton_attention import _alloc
from benchmarks.scale import graphed
from benchmarks.timing import median_ms

KV_HEADS, GROUP, QUERIES, REPS, TOPK = 8, 4, 32, 8, 32
LAUNCHES = 20  # a graph's launches, back to back


def per_launch_us(launch: Callable[[], object]) -> float:
    """Microseconds a launch adds to a captured step."""

    def many() -> None:
        for _ in range(LAUNCHES):
            launch()

    return median_ms(graphed(many), 20) * 1e3 / LAUNCHES


def step_row(head_dim: int, n_units: int) -> dict:
    """The wrappers as a decoding step calls them, torch's topk and SDPA beside them."""
    q = torch.randn(1, KV_HEADS * GROUP, QUERIES, head_dim, device="cuda", dtype=torch.bfloat16)
    reps = torch.randn(1, KV_HEADS, n_units, REPS, head_dim, device="cuda", dtype=torch.bfloat16)
    n_valid = torch.tensor([n_units], device="cuda", dtype=torch.int32)
    mass = triton_memory.unit_mass(q, reps, kind="dot", scale=0.125, n_valid=n_valid)
    keys = torch.randn(1, KV_HEADS, n_units * 64 + 2048, head_dim, device="cuda", dtype=q.dtype)
    one_query = q[:, :, -1:].contiguous()
    return {
        "head_dim": head_dim,
        "units": n_units,
        "unit_mass_us": per_launch_us(
            lambda: triton_memory.unit_mass(q, reps, kind="dot", scale=0.125, n_valid=n_valid)
        ),
        "top_units_us": per_launch_us(lambda: triton_memory.top_units(mass, TOPK, ascending=False)),
        "torch_topk_us": per_launch_us(lambda: reference.top_units(mass, TOPK, ascending=False)),
        "sdpa_keys": keys.shape[2],
        "sdpa_us": per_launch_us(
            lambda: F.scaled_dot_product_attention(one_query, keys, keys, enable_gqa=True)
        ),
    }


def mass_sweep(head_dim: int, n_units: int) -> list[dict]:
    """Each pass of `unit_mass` (logits kept) under other tiles: one pass where one block holds
    every unit, else pass 1, pass 2 reading the rows' lse, pass 2 combining pass 1's statistics,
    the lse launch, and the lse launch split over programs (as beyond 32 blocks)."""
    q = torch.randn(1, KV_HEADS * GROUP, QUERIES, head_dim, device="cuda", dtype=torch.bfloat16)
    reps = torch.randn(1, KV_HEADS, n_units, REPS, head_dim, device="cuda", dtype=torch.bfloat16)
    found = []
    for bm, bn, warps, stages in itertools.product([16, 32, 64, 128], [32, 64], [4, 8], [2, 3]):
        if triton.cdiv(n_units, bn) > 1 and bm < 64:
            continue
        config = {"BM": bm, "BN": bn, "num_warps": warps, "num_stages": stages}
        with contextlib.suppress(triton.runtime.errors.OutOfResources):
            found.append({"head_dim": head_dim, "units": n_units, **config,
                          **_time_passes(q, reps, config)})  # fmt: skip
    return found


def _time_passes(q: torch.Tensor, reps: torch.Tensor, config: dict) -> dict:
    n_units, head_dim, rows = reps.shape[2], q.shape[-1], GROUP * QUERIES
    n_blocks = triton.cdiv(n_units, config["BN"])
    n_valid = torch.tensor([n_units], device="cuda", dtype=torch.int32)
    stats_m, stats_l = (_alloc((KV_HEADS, n_blocks, rows), q.device) for _ in range(2))
    logits = _alloc((KV_HEADS, rows, n_units), q.device)
    mass, lse = _alloc((KV_HEADS, n_units), q.device), _alloc((KV_HEADS, rows), q.device)

    def launch(pass_: int, combine: bool) -> None:
        triton_memory.unit_mass_kernel[(KV_HEADS, n_blocks)](
            q, reps, n_valid, stats_m, stats_l, lse, logits, mass, 0.125,
            q.stride(0), q.stride(1), q.stride(2), reps.stride(0), reps.stride(1), reps.stride(2),
            QUERIES, KV_HEADS, rows, n_units, n_blocks,
            G=GROUP, D=head_dim, R=REPS, BM=config["BM"], BN=config["BN"], PASS=pass_,
            MINMAX=False, KEEP=True, COMBINE=combine, EXACT=False, N_ON_DEVICE=True,
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )  # fmt: skip

    def combine_lse() -> None:
        triton_memory.unit_lse_kernel[(KV_HEADS, triton.cdiv(rows, 32), 1)](
            stats_m, stats_l, lse, lse, rows, n_blocks, n_blocks, BR=32, PARTIAL=False,
            num_warps=2,
        )  # fmt: skip

    n_splits = min(
        triton_memory.LSE_MAX_SPLITS, triton.cdiv(n_blocks, triton_memory.LSE_BLOCKS_PER_SPLIT)
    )
    parts = [_alloc((KV_HEADS, n_splits, rows), q.device) for _ in "ml"]

    def combine_lse_split() -> None:  # the blocks spread over n_splits programs a row
        triton_memory.unit_lse_kernel[(KV_HEADS, triton.cdiv(rows, 32), n_splits)](
            stats_m, stats_l, *parts, rows, n_blocks, triton.cdiv(n_blocks, n_splits), BR=32,
            PARTIAL=True, num_warps=2,
        )  # fmt: skip

    if n_blocks == 1:
        return {"pass0_us": per_launch_us(lambda: launch(0, False))}
    return {
        "pass1_us": per_launch_us(lambda: launch(1, False)),
        "pass2_us": per_launch_us(lambda: launch(2, False)),
        "pass2_combining_us": per_launch_us(lambda: launch(2, True)),
        "lse_us": per_launch_us(combine_lse),
        "lse_splits": n_splits,
        "lse_split_us": per_launch_us(combine_lse_split),
    }


def rank_sweep(n_units: int, segment: int) -> list[dict]:
    """One ranking launch over rows of `n_units` in segments of `segment` under other tiles."""
    mass = torch.rand(KV_HEADS, n_units, device="cuda")
    n_segments = triton.cdiv(n_units, segment)
    out_ids = torch.empty(KV_HEADS, n_segments * TOPK, dtype=torch.int64, device="cuda")
    out_mass = torch.empty(KV_HEADS, n_segments * TOPK, device="cuda")
    found = []
    for block, against, warps in itertools.product((32, 64, 128), (64, 128, 256), (2, 4, 8)):

        def launch(block=block, against=against, warps=warps):
            triton_memory.top_units_kernel[(KV_HEADS, n_segments * triton.cdiv(segment, block))](
                mass, None, out_ids, out_mass, n_units, segment, TOPK, BI=block, BJ=against,
                GATHER=False, KEEP_MASS=n_segments > 1, num_warps=warps,
            )  # fmt: skip

        found.append({"units": n_units, "segment": segment, "BI": block, "BJ": against,
                      "num_warps": warps, "us": per_launch_us(launch)})  # fmt: skip
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", default="42,480,2016,8160,16352")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--sweep", action="store_true", help="time other tiles too")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/retrieval.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU")
    rows = []
    for head_dim in (int(s) for s in args.head_dims.split(",")):
        for n_units in (int(s) for s in args.units.split(",")):
            row = step_row(head_dim, n_units)
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
            if args.sweep:
                rows.extend(mass_sweep(head_dim, n_units))
    if args.sweep:
        for n_units, segment in ((480, 480), (2048, 2048), (2048, 256), (16352, 256)):
            rows.extend(rank_sweep(n_units, segment))
    args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
