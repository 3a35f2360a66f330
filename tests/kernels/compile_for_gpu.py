"""Compile every Triton kernel for a Hopper GPU (sm_90) without one: `python -m
tests.kernels.compile_for_gpu` prints one line per kernel variant and exits 1 if any fails.

Run with TRITON_INTERPRET=0 (test_compiled.py does): under the interpreter the kernels are
interpreted functions, which Triton's compiler does not take.
"""

from __future__ import annotations

import inspect
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from agentmem_kernels import triton_attention, triton_memory

HOPPER = GPUTarget("cuda", 90, 32)
FLOATS = ("scale", "qk_scale")  # scalar arguments that are floats; the other scalars are ints

# (kernel, pointer types, constexpr variants): the shapes and modes the wrappers launch.
ATTENTION = dict(G=4, D=64, U=64, BM=16, BN=32, NSPLIT=8, STACKED=False, ROTATE_LOCAL=False,
                 EXACT=False, N_ON_DEVICE=True, EVEN_MEMORY=True)  # fmt: skip
MASS = dict(G=4, D=64, R=8, BM=64, BN=64, PASS=1, MINMAX=False, KEEP=True, COMBINE=False,
            EXACT=False, N_ON_DEVICE=True)  # fmt: skip
CASES = [
    (triton_attention.placed_attention_fwd_kernel,
     dict(q="bf16", k="bf16", v="bf16", q_pos="i64", k_pos="i64", q_abs="i64", k_abs="i64",
          cos="fp32", sin="fp32", parts="i64", acc_out="fp32", m_out="fp32", l_out="fp32"),
     [dict(G=4, D=64, HALF=32, BM=64, BN=64, NUM_PARTS=2, NSPLIT=1, EXACT=False),
      dict(G=4, D=256, HALF=128, BM=16, BN=32, NUM_PARTS=2, NSPLIT=4, EXACT=True)]),
    (triton_memory.memory_attention_fwd_kernel,
     dict(q="bf16", sink_k="bf16", sink_v="bf16", pool_k="bf16", pool_v="bf16", ids="i64",
          local_k="bf16", local_v="bf16", n_local="i32", cos="fp32", sin="fp32",
          acc_out="bf16", m_out="fp32", l_out="fp32"),
     [ATTENTION, {**ATTENTION, "D": 128, "BN": 64, "STACKED": True, "NSPLIT": 1, "BM": 64},
      {**ATTENTION, "ROTATE_LOCAL": True, "N_ON_DEVICE": False, "EVEN_MEMORY": False}]),
    (triton_memory.merge_splits_kernel,
     dict(acc="fp32", maxes="fp32", sums="fp32", out="bf16", lse="fp32"),
     [dict(D=64, NSPLIT=32, BR=16), dict(D=128, NSPLIT=8, BR=16)]),
    (triton_memory.unit_mass_kernel,
     dict(q="bf16", reps="bf16", n_valid="i32", stats_m="fp32", stats_l="fp32", lse="fp32",
          logits="fp32", mass="fp32"),
     [{**MASS, "PASS": 0}, MASS, {**MASS, "PASS": 2, "COMBINE": True},
      {**MASS, "BM": 128, "BN": 32, "PASS": 2, "COMBINE": True},
      {**MASS, "PASS": 2, "KEEP": False, "D": 128}, {**MASS, "PASS": 2, "MINMAX": True}]),
    (triton_memory.unit_lse_kernel,
     dict(stats_m="fp32", stats_l="fp32", out_m="fp32", out_l="fp32"),
     [dict(BR=32, PARTIAL=False), dict(BR=32, PARTIAL=True)]),
    (triton_memory.local_key_mass_kernel,
     dict(q="bf16", local_k="bf16", n_local="i32", lse="fp32", cos="fp32", sin="fp32",
          mass="fp32"),
     [dict(G=4, D=64, BM=16, BN=64, EXACT=False, N_ON_DEVICE=True)]),
    (triton_memory.copy_units_kernel,
     dict(src_k="bf16", src_v="bf16", ids="i64", dst_k="bf16", dst_v="bf16", slots="i64"),
     [dict(UNIT_NUMEL=4096, BLOCK=2048)]),
    (triton_memory.fetch_units_kernel,
     dict(ids="i64", slot_of="i64", unit_of="i64", last_used="i64", counters="i64",
          out_slots="i64", out_copy="i64"),
     [dict(BK=32, BP=128)]),
    (triton_memory.append_token_kernel,
     dict(k="bf16", v="bf16", q="bf16", local_k="bf16", local_v="bf16", local_mass="fp32",
          local_rot="bf16", queries="bf16", counts="i32", cos="fp32", sin="fp32"),
     [dict(HALF=32, BKV=8, BQ=32), dict(HALF=128, BKV=1, BQ=4)]),
    (triton_memory.top_units_kernel,
     dict(mass="fp32", ids="i64", out_ids="i64", out_mass="fp32"),
     [dict(BI=32, BJ=256, GATHER=False, KEEP_MASS=False),
      dict(BI=32, BJ=256, GATHER=False, KEEP_MASS=True),
      dict(BI=32, BJ=256, GATHER=True, KEEP_MASS=False)]),
]  # fmt: skip


def compile_case(kernel, pointers: dict, constexprs: dict) -> int:
    """Compile one variant for sm_90; returns the size of its PTX."""
    if constexprs.get("N_ON_DEVICE") is False:  # the count is passed as a plain int
        pointers = {k: v for k, v in pointers.items() if k not in ("n_local", "n_valid")}
    signature = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = f"*{pointers[name]}"
        else:
            signature[name] = "fp32" if name in FLOATS else "i32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return len(triton.compile(source, target=HOPPER).asm["ptx"])


def main() -> int:
    failed = 0
    for kernel, pointers, variants in CASES:
        for constexprs in variants:
            try:
                size = compile_case(kernel, pointers, constexprs)
                sys.stdout.write(f"ok {kernel.fn.__name__} {constexprs} ({size} bytes of PTX)\n")
            except Exception as error:  # noqa: BLE001 - report every failure, then fail
                failed += 1
                sys.stdout.write(
                    f"FAILED {kernel.fn.__name__} {constexprs}: {error!r}"[:2000] + "\n"
                )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
