"""Attention + retrieval time of one layer per step, against full attention (SDPA) over the same
memory, from 4K to 1M tokens: the cost that decides decode latency once framework overhead is gone.

Llama-3.2-1B and Llama-3.1-8B attention shapes, bf16, random keys (no model needed):

    python -m benchmarks.attention_step --sizes 4096,32768,131072,524288,1048576 --out results/
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import agentmem
from agentmem.hf.rope import ModelRope
from agentmem.memory.layer import MemoryLayer
from benchmarks.timing import median_ms

SHAPES = {
    # name: (query heads, key heads, head dim, layers, rope theta)
    "llama-3.2-1b": (32, 8, 64, 16, 500000.0),
    "llama-3.1-8b": (32, 8, 128, 32, 500000.0),
}


def _filled_layer(shape, memory: agentmem.MemoryConfig, n_tokens: int, device) -> MemoryLayer:
    n_q, n_kv, head_dim, _, theta = shape
    config = LlamaConfig(
        hidden_size=n_q * head_dim, num_attention_heads=n_q, num_key_value_heads=n_kv,
        head_dim=head_dim, max_position_embeddings=131072, rope_theta=theta,
    )  # fmt: skip
    rotary = LlamaRotaryEmbedding(config).to(device)
    layer = MemoryLayer(memory, ModelRope(rotary, None, 131072))
    chunk = memory.exec_chunk
    for _ in range(n_tokens // chunk):
        k = torch.randn(1, n_kv, chunk, head_dim, device=device, dtype=torch.bfloat16)
        layer.store(k, torch.randn_like(k))
        layer.attend(torch.randn(1, n_q, chunk, head_dim, device=device, dtype=torch.bfloat16), 0.1)
    return layer


def measure_size(shape_name: str, size: int, memory: agentmem.MemoryConfig, repeats: int) -> dict:
    """One layer holding `size` tokens: a decode step, its retrieval, a prefill chunk; and full
    attention (SDPA) over the same number of keys."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n_q, n_kv, head_dim, n_layers, _ = SHAPES[shape_name]
    scale = head_dim**-0.5
    layer = _filled_layer(SHAPES[shape_name], memory, size, device)
    bf16 = dict(device=device, dtype=torch.bfloat16)
    q1, k1 = torch.randn(1, n_q, 1, head_dim, **bf16), torch.randn(1, n_kv, 1, head_dim, **bf16)
    qc = torch.randn(1, n_q, memory.exec_chunk, head_dim, **bf16)
    kc = torch.randn(1, n_kv, memory.exec_chunk, head_dim, **bf16)

    def step(q, k):
        layer.store(k, k)
        layer.attend(q, scale)

    row = {
        "shape": shape_name, "tokens": size, "layers": n_layers,
        "agentmem_decode_ms": median_ms(lambda: step(q1, k1), repeats),
        "agentmem_retrieve_ms": median_ms(lambda: layer._retrieve(q1, scale), repeats),
        "agentmem_chunk_ms": median_ms(lambda: step(qc, kc), max(repeats // 5, 3)),
        "agentmem_layer_bytes": layer.nbytes(),
        "full_decode_ms": None, "full_chunk_ms": None,
    }  # fmt: skip
    layer = None  # free the memory before full attention takes its own
    try:
        keys = torch.randn(1, n_kv, size, head_dim, **bf16)
        values = torch.randn_like(keys)
        full = F.scaled_dot_product_attention
        row["full_decode_ms"] = median_ms(lambda: full(q1, keys, values, enable_gqa=True), repeats)
        # The last prefill chunk of full attention: exec_chunk queries over every key.
        row["full_chunk_ms"] = median_ms(
            lambda: full(qc, keys, values, enable_gqa=True), max(repeats // 5, 3)
        )
    except torch.OutOfMemoryError:  # full attention no longer fits
        pass
    return row


def measure(shape_name: str, sizes: list[int], memory: agentmem.MemoryConfig, repeats: int):
    rows = []
    for size in sizes:
        rows.append(measure_size(shape_name, size, memory, repeats))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,32768,131072,524288,1048576")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--preset", default="4k")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    memory = agentmem.MemoryConfig.preset(args.preset)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for shape in args.shapes.split(","):
        rows += measure(shape, sizes, memory, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention_step.json").write_text(json.dumps(rows, indent=1))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"{device}, per layer, {memory!r}")
    print(f"{'shape':<13} {'tokens':>8} {'agentmem ms':>11} {'retrieve':>9} {'full ms':>8} "
          f"{'chunk ms':>9} {'full chunk':>10}")  # fmt: skip
    for r in rows:
        full = "OOM" if r["full_decode_ms"] is None else f"{r['full_decode_ms']:.3f}"
        full_chunk = "OOM" if r["full_chunk_ms"] is None else f"{r['full_chunk_ms']:.2f}"
        print(
            f"{r['shape']:<13} {r['tokens']:>8} {r['agentmem_decode_ms']:>11.3f} "
            f"{r['agentmem_retrieve_ms']:>9.3f} {full:>8} {r['agentmem_chunk_ms']:>9.2f} "
            f"{full_chunk:>10}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
