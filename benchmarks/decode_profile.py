"""Where one decoding step's GPU time goes: agentmem's captured step against full attention's.

The same random-weight shapes and memory fill as `benchmarks.scale`; each step replayed from its
CUDA graph under the torch profiler. Per step: the kernels launched, their summed GPU time, and
the wall time (which also counts the host's work between replays and any gap it leaves). The
kernels are listed by time, with their launches per step, so that fusing work can be aimed.

    python -m benchmarks.decode_profile --shape llama-3.2-1b --tokens 4096,131072
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import agentmem
from agentmem.hf.graphs import StaticDecoder
from benchmarks.scale import SHAPES, build_model, dtype_of, fill_memory, full_attention_step


def profiled(step: Callable[[], object], steps: int) -> dict:
    """Kernels per step, their GPU time per step and the wall time per step of `steps` calls."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        begin = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - begin
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = [e for e in kernels if e.count and "Memcpy" not in e.key and "Memset" not in e.key]
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return {
        "wall_ms": wall / steps * 1e3,
        "gpu_ms": sum(e.self_device_time_total for e in kernels) / steps / 1e3,
        "launches": sum(e.count for e in kernels) / steps,
        "kernels": [
            {
                "name": e.key[:90],
                "per_step": e.count / steps,
                "us_per_step": e.self_device_time_total / steps,
            }
            for e in kernels
        ],
    }


@torch.inference_mode()
def agentmem_step(model, memory, shape: str, n_tokens: int, steps: int) -> dict:
    n_kv, head_dim = SHAPES[shape]["num_key_value_heads"], SHAPES[shape]["head_dim"]
    cache = agentmem.new_cache(model, memory)
    fill_memory(cache, n_tokens, n_kv, head_dim, dtype_of(shape))
    decoder = StaticDecoder(model, cache, unit_room=steps // memory.unit_size + 8)
    token = torch.tensor([11], device="cuda")
    try:
        return profiled(lambda: decoder.step(token), steps)
    finally:
        decoder.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--tokens", default="4096,131072")
    parser.add_argument("--preset", default="4k")
    parser.add_argument("--retrieve-every", type=int, default=1, help="MemoryConfig.retrieve_every")
    parser.add_argument("--steps", type=int, default=128, help="decode steps profiled per size")
    parser.add_argument("--top", type=int, default=25, help="kernels listed per step")
    parser.add_argument("--out", type=Path, default=None, help="JSON rows to write")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU")
    memory = agentmem.MemoryConfig.preset(args.preset, retrieve_every=args.retrieve_every)
    model = agentmem.wrap(build_model(args.shape), memory)
    rows = []
    for n_tokens in (int(s) for s in args.tokens.split(",") if s):
        measures = {
            "agentmem": lambda n=n_tokens: agentmem_step(model, memory, args.shape, n, args.steps),
            "full": lambda n=n_tokens: full_attention_step(
                model, args.shape, n, profiled, args.steps
            ),
        }
        for name, measure in measures.items():
            row = {"shape": args.shape, "tokens": n_tokens, "kind": name, **measure()}
            rows.append(row)
            torch.cuda.empty_cache()
            print(f"\n{name} at {n_tokens} tokens: wall {row['wall_ms']:.3f} ms/step, GPU "
                  f"{row['gpu_ms']:.3f} ms in {row['launches']:.0f} launches",
                  file=sys.stderr)  # fmt: skip
            for kernel in row["kernels"][: args.top]:
                print(f"  {kernel['us_per_step']:9.1f} us  x{kernel['per_step']:6.2f}  "
                      f"{kernel['name']}", file=sys.stderr)  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
