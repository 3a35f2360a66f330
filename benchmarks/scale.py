"""agentmem at scale on one GPU, against full attention on the same model, in one run:

- decode: milliseconds per token with 4K .. 1M tokens of memory, the whole model step replayed from
  a CUDA graph (`StaticDecoder`; full attention: a static KV cache, the step captured the same way),
  and one layer's attention + retrieval step on its own;
- prefill: tokens per second at 32K .. 1M (agentmem in `exec_chunk` steps; full attention in one
  causal flash-attention forward);
- kernels: the attention kernel's TFLOP/s (a prefill chunk) and GB/s (a decode step) against SDPA
  over the same number of keys, and against the GPU's measured matmul and copy ceilings; the
  retrieval step's time per layer;
- peak GPU memory against context length;
- `--retrieve-every N`: decoding retrieves every N tokens (`MemoryConfig.retrieve_every`);
- with `--device-units P`, decode and prefill again with KV tiers (`MemoryConfig.device_units`):
  unit keys and values in pinned host memory, P units per layer and key head cached on the GPU;
  the tiered decode's peak is taken after the fill (which makes each layer's units on the GPU
  before they move to the host), beside the cache's hit rate and the host memory held.

Models are built from config with random weights (no download): Llama-3.2-1B and Llama-3.1-8B
shapes in bf16, and Gemma-3-270M's shape in fp32 (the dtype it is run in: it decodes digits badly
in bf16; its sliding-window layers keep their own bounded window). Speed does not depend on the
weights. Memory for decode is filled with random keys and values (its prefill is measured apart).

    python -m benchmarks.scale --shapes llama-3.2-1b --decode 4096,32768,131072,524288,1048576 \
        --prefill 32768,131072,1048576 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import MethodType

import torch
import torch.nn.functional as F
from transformers import (
    AttentionInterface,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    StaticCache,
)
from transformers.masking_utils import AttentionMaskInterface

import agentmem
from agentmem.generate import prefill
from agentmem.hf.graphs import StaticDecoder
from agentmem.memory.representatives import representatives
from agentmem_kernels import memory_attention, top_units, unit_mass
from benchmarks.timing import median_ms

SHAPES = {
    "llama-3.2-1b": dict(
        family="llama", dtype=torch.bfloat16,
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, rope_factor=32.0,
    ),
    "llama-3.1-8b": dict(
        family="llama", dtype=torch.bfloat16,
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, rope_factor=8.0,
    ),
    "gemma-3-270m": dict(  # 3 global layers (every 6th), 15 with a 512-token sliding window
        family="gemma3", dtype=torch.float32,
        hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, sliding_window=512,
    ),
}  # fmt: skip
BF16 = torch.bfloat16
FULL = "agentmem_bench_full"  # full attention over the first `_full_keys` keys of a static cache
_full_keys = 0


def dtype_of(shape: str) -> torch.dtype:
    return SHAPES[shape]["dtype"]


def build_model(shape: str) -> torch.nn.Module:
    sizes = dict(SHAPES[shape])
    family, dtype = sizes.pop("family"), sizes.pop("dtype")
    if family == "gemma3":  # Gemma3TextConfig's defaults: thetas 10K / 1M, every 6th layer global
        config = Gemma3TextConfig(**sizes, vocab_size=262144, max_position_embeddings=32768)
        model_class = Gemma3ForCausalLM
    else:
        factor = sizes.pop("rope_factor")
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": factor,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}  # fmt: skip
        config = LlamaConfig(
            **sizes, vocab_size=128256, max_position_embeddings=131072, rope_parameters=rope
        )
        model_class = LlamaForCausalLM
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"):
            model = model_class(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    return model


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """`fn` captured in a CUDA graph (after a warm-up run on a side stream)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


# -- memory filled directly ---------------------------------------------------------------------


@torch.inference_mode()
def fill_memory(
    cache: agentmem.AgentMemCache, n_tokens: int, n_kv: int, head_dim: int, dtype: torch.dtype
) -> None:
    """Every memory layer holding `n_tokens` random tokens: sinks, units (with representatives)
    and a full local window, as a prefill of that length leaves them; sliding layers a full
    window. Handed over through `load_state_dict`, the memory's one way in."""

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=dtype)

    for layer in cache.sliding_layers:
        k = randn(1, n_kv, layer.window, head_dim)  # as a one-token step leaves it
        meta = {"kind": "sliding", "window": layer.window, "seen": n_tokens}
        layer.load_state_dict({"meta": meta, "tensors": {"k": k, "v": torch.randn_like(k)}})
    for layer in cache.memory_layers:
        cfg = layer.config
        n_units = (n_tokens - cfg.n_init - cfg.n_local) // cfg.unit_size
        unit_k = randn(1, n_kv, n_units * cfg.unit_size, head_dim)
        reps = []
        for first in range(0, n_units, 256):  # in slices: no full-size temporaries
            count = min(256, n_units - first)
            keys = unit_k[:, :, first * cfg.unit_size : (first + count) * cfg.unit_size]
            mass = torch.rand(1, n_kv, count, cfg.unit_size, device="cuda")
            reps.append(representatives(
                keys.view(1, n_kv, count, cfg.unit_size, head_dim), mass, kind=cfg.repr,
                r=cfg.repr_topk,
            ))  # fmt: skip
        sink_k, local_k = (
            randn(1, n_kv, cfg.n_init, head_dim),
            randn(1, n_kv, cfg.n_local, head_dim),
        )
        tensors = {
            "sink_k": sink_k, "sink_v": torch.randn_like(sink_k),
            "unit_k": unit_k, "unit_v": torch.randn_like(unit_k), "reps": torch.cat(reps, dim=2),
            "local_k": local_k, "local_v": torch.randn_like(local_k),
            "local_mass": torch.zeros(1, n_kv, cfg.n_local, device="cuda"),
        }  # fmt: skip
        meta = {
            "kind": "memory", "memory": cfg.model_dump(), "units_start": cfg.n_init,
            "seen": cfg.n_init + n_units * cfg.unit_size + cfg.n_local, "n_units": n_units,
            "units_from": 0, "dropped": 0,
        }  # fmt: skip
        layer.load_state_dict({"meta": meta, "tensors": tensors})


# -- decode -------------------------------------------------------------------------------------


@torch.inference_mode()
def decode_agentmem(model, memory, shape: str, n_tokens: int, steps: int) -> dict:
    n_kv, head_dim = SHAPES[shape]["num_key_value_heads"], SHAPES[shape]["head_dim"]
    torch.cuda.reset_peak_memory_stats()
    cache = agentmem.new_cache(model, memory)
    fill_memory(cache, n_tokens, n_kv, head_dim, dtype_of(shape))
    tiered = memory.device_units is not None
    if tiered:  # the fill makes each layer's units on the GPU before they go to host memory
        torch.cuda.reset_peak_memory_stats()
    decoder = StaticDecoder(model, cache, unit_room=steps // memory.unit_size + 2)
    token = torch.tensor([11], device="cuda")
    for _ in range(3):
        decoder.step(token)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):  # packing every unit_size steps included
        decoder.step(token)
    end.record()
    end.synchronize()
    row = {"decode_ms": start.elapsed_time(end) / steps}
    # One layer's attention + retrieval step, captured on its own (counts reset every replay).
    layer = cache.memory_layers[0]
    n_q = SHAPES[shape]["num_attention_heads"]
    q = torch.randn(1, n_q, 1, head_dim, device="cuda", dtype=dtype_of(shape))
    k = torch.randn(1, n_kv, 1, head_dim, device="cuda", dtype=dtype_of(shape))
    counts = layer.counts.clone()

    def layer_step():
        layer.counts.copy_(counts)
        layer.store(k, k)
        layer.attend(q, head_dim**-0.5)

    def retrieve():
        layer._retrieve(q, head_dim**-0.5, n_units=layer.counts[1:2])

    layer.static_armed = True  # an ordinary step would end static mode: time the static one
    try:
        row["layer_step_ms"] = median_ms(graphed(layer_step), 50)
        row["retrieve_ms"] = median_ms(graphed(retrieve), 50)
    finally:
        layer.static_armed = False
    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    row["memory_gib"] = cache.nbytes() / 2**30
    if tiered:
        row["host_gib"] = cache.host_nbytes() / 2**30
        rates = [layer.units.cache.hit_rate() for layer in cache.memory_layers]
        row["hit_rate"] = sum(rates) / len(rates)
    decoder.close()
    return row


def decode_tiered(model, memory, shape: str, n_tokens: int, steps: int) -> dict:
    """`decode_agentmem` with KV tiers: unit keys and values in pinned host memory, a device
    cache of `memory.device_units` units per layer and key head; its keys prefixed `tiered_`."""
    row = decode_agentmem(model, memory, shape, n_tokens, steps)
    return {f"tiered_{key}": value for key, value in row.items()}


def _full_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    out = F.scaled_dot_product_attention(
        query, key[:, :, :_full_keys], value[:, :, :_full_keys], scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def _roll_window(layer, key_states, value_states, *args, **kwargs):
    """A full sliding-window layer of transformers' static cache taking one token: what its own
    update does, without the small host-to-device copy (an index tensor) that a CUDA graph cannot
    capture."""
    layer.keys.copy_(torch.cat((layer.keys[:, :, 1:], key_states), dim=-2))
    layer.values.copy_(torch.cat((layer.values[:, :, 1:], value_states), dim=-2))
    return layer.keys, layer.values


@torch.inference_mode()
def full_attention_step(model, shape: str, n_tokens: int, measure: Callable, *args):
    """`measure(replay, *args)` for full attention's decoding step over n_tokens cached keys plus
    the new one: a static cache, SDPA (flash), the whole step in a CUDA graph."""
    global _full_keys
    with agentmem.unwrapped(model):
        AttentionInterface.register(FULL, _full_attention)
        AttentionMaskInterface.register(FULL, lambda *args, **kwargs: None)
        original = model.config._attn_implementation
        model.set_attn_implementation(FULL)
        try:
            cache = StaticCache(config=model.config, max_cache_len=n_tokens + 1)
            token = torch.tensor([[11]], device="cuda")
            position = torch.tensor([n_tokens], device="cuda")
            _full_keys = n_tokens + 1

            def step():
                for layer in cache.layers:  # the same step every replay: write slot n_tokens
                    if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
                        layer.cumulative_length.fill_(n_tokens)
                    if hasattr(layer, "cumulative_length_int"):  # sliding: full, rolling
                        layer.cumulative_length_int = n_tokens
                with torch.inference_mode():
                    model(input_ids=token, past_key_values=cache, cache_position=position,
                          use_cache=True, logits_to_keep=1)  # fmt: skip

            with torch.inference_mode():  # creates the cache's tensors
                model(input_ids=token, past_key_values=cache, cache_position=position * 0,
                      use_cache=True, logits_to_keep=1)  # fmt: skip
            for layer in cache.layers:
                layer.keys.normal_()
                layer.values.normal_()
                if getattr(layer, "is_sliding", False):
                    layer.update = MethodType(_roll_window, layer)
            return measure(graphed(step), *args)  # the cache goes with this frame
        finally:
            model.set_attn_implementation(original)


def decode_full(model, shape: str, n_tokens: int) -> dict:
    """Full attention's decoding step (`full_attention_step`), and SDPA over its keys alone."""
    torch.cuda.reset_peak_memory_stats()
    ms = full_attention_step(model, shape, n_tokens, median_ms, 30)
    peak = torch.cuda.max_memory_allocated() / 2**30
    n_q, n_kv, head_dim = (SHAPES[shape][key] for key in
                           ("num_attention_heads", "num_key_value_heads", "head_dim"))  # fmt: skip
    q = torch.randn(1, n_q, 1, head_dim, device="cuda", dtype=dtype_of(shape))
    k = torch.randn(1, n_kv, n_tokens + 1, head_dim, device="cuda", dtype=dtype_of(shape))
    layer_ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, k, enable_gqa=True), 30)
    return {"full_decode_ms": ms, "full_layer_ms": layer_ms, "full_peak_gib": peak}


# -- prefill ------------------------------------------------------------------------------------


def prefill_agentmem(model, memory, n_tokens: int) -> dict:
    ids = torch.randint(10, 128000, (1, n_tokens), device="cuda")
    # Warm-up: compiles the kernels of both paths (eager first chunks, captured later ones),
    # long enough for more than 8 blocks of units (unit_mass's statistics then take a launch).
    prefill(model, agentmem.new_cache(model, memory), ids[:, :40960], chunk=memory.exec_chunk)
    torch.cuda.reset_peak_memory_stats()
    cache = agentmem.new_cache(model, memory)
    torch.cuda.synchronize()
    begin = time.perf_counter()
    prefill(model, cache, ids, chunk=memory.exec_chunk, progress=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - begin
    return {"prefill_tok_s": n_tokens / seconds, "prefill_peak_gib":
            torch.cuda.max_memory_allocated() / 2**30}  # fmt: skip


def prefill_full(model, n_tokens: int) -> dict:
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(10, 128000, (1, n_tokens), device="cuda")
    with agentmem.unwrapped(model), torch.inference_mode():
        original = model.config._attn_implementation
        model.set_attn_implementation("sdpa")  # causal, no mask: the flash kernel
        try:
            model(input_ids=ids[:, :1024], use_cache=False, logits_to_keep=1)  # warm-up
            torch.cuda.synchronize()
            begin = time.perf_counter()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - begin
        finally:
            model.set_attn_implementation(original)
    return {"full_prefill_tok_s": n_tokens / seconds, "full_prefill_peak_gib":
            torch.cuda.max_memory_allocated() / 2**30}  # fmt: skip


# -- kernels ------------------------------------------------------------------------------------


def ceilings() -> dict:
    a = torch.randn(8192, 8192, device="cuda", dtype=BF16)
    matmul_ms = median_ms(lambda: a @ a, 20)
    x = torch.empty(2**30 // 2, device="cuda", dtype=BF16)  # 1 GiB
    y = torch.empty_like(x)
    copy_ms = median_ms(lambda: y.copy_(x), 20)
    return {"matmul_tflops": 2 * 8192**3 / matmul_ms / 1e9, "copy_gbs": 2 * 2**30 / copy_ms / 1e6}


@torch.inference_mode()
def kernel_efficiency(shape: str, memory: agentmem.MemoryConfig, rope_table) -> dict:
    """memory_attention against SDPA on the same number of keys: a prefill chunk (TFLOP/s) and a
    decode step (GB/s of keys and values read)."""
    n_q, n_kv, head_dim = (SHAPES[shape][key] for key in
                           ("num_attention_heads", "num_key_value_heads", "head_dim"))  # fmt: skip
    cos, sin = rope_table
    n_units = 1024

    def randn(*size):
        return torch.randn(*size, device="cuda", dtype=dtype_of(shape))

    pool_k = randn(1, n_kv, n_units * memory.unit_size, head_dim)
    pool_v = torch.randn_like(pool_k)
    ids = torch.sort(torch.randperm(n_units, device="cuda")[: memory.topk]).values
    ids = ids.expand(1, n_kv, -1).contiguous()
    sinks = randn(1, n_kv, memory.n_init, head_dim)
    local = randn(1, n_kv, memory.n_local, head_dim)
    n_keys = memory.n_init + memory.topk * memory.unit_size + memory.n_local
    n_local = torch.tensor([memory.n_local], device="cuda", dtype=torch.int32)
    row = {}
    for name, n_queries in (("prefill", memory.exec_chunk), ("decode", 1)):
        q = randn(1, n_q, n_queries, head_dim)
        k = randn(1, n_kv, n_keys, head_dim)
        ours = median_ms(graphed(lambda q=q: memory_attention(
            q, sink_k=sinks, sink_v=sinks, pool_k=pool_k, pool_v=pool_v, ids=ids,
            unit_size=memory.unit_size, local_k=local, local_v=local, n_local=n_local,
            cos=cos, sin=sin, scale=head_dim**-0.5, memory_q_pos=memory.n_local,
            local_rotated=True,
        )), 50)  # fmt: skip

        def sdpa_step(q=q, k=k):
            return F.scaled_dot_product_attention(q, k, k, enable_gqa=True)

        sdpa = median_ms(graphed(sdpa_step), 50)
        flops = 4 * n_q * n_queries * n_keys * head_dim
        read = 2 * n_kv * n_keys * head_dim * q.element_size()  # keys and values
        row[f"{name}_ms"], row[f"{name}_sdpa_ms"] = ours, sdpa
        row[f"{name}_tflops"], row[f"{name}_sdpa_tflops"] = flops / ours / 1e9, flops / sdpa / 1e9
        row[f"{name}_gbs"], row[f"{name}_sdpa_gbs"] = read / ours / 1e6, read / sdpa / 1e6
    row["keys"] = n_keys
    return row


@torch.inference_mode()
def retrieval(shape: str, memory: agentmem.MemoryConfig, n_tokens: int) -> dict:
    """unit_mass + exact top-k for one layer over n_tokens of memory, decode and prefill chunk."""
    n_q, n_kv, head_dim = (SHAPES[shape][key] for key in
                           ("num_attention_heads", "num_key_value_heads", "head_dim"))  # fmt: skip
    n_units = (n_tokens - memory.n_init - memory.n_local) // memory.unit_size
    reps = torch.randn(
        1, n_kv, n_units, memory.repr_topk, head_dim, device="cuda", dtype=dtype_of(shape)
    )
    n_valid = torch.tensor([n_units], device="cuda", dtype=torch.int32)
    row = {}
    for name, n_queries in (("decode", 1), ("prefill", memory.exec_chunk)):
        q = torch.randn(1, n_q, n_queries, head_dim, device="cuda", dtype=dtype_of(shape))
        row[f"retrieve_{name}_ms"] = median_ms(graphed(lambda q=q: top_units(
            unit_mass(q, reps, kind="dot", scale=head_dim**-0.5, n_valid=n_valid), memory.topk
        )), 30)  # fmt: skip
    return row


# -- report -------------------------------------------------------------------------------------


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for shape in sorted({r["shape"] for r in rows if "tokens" in r}):
        decode = [r for r in rows if r.get("shape") == shape and r.get("kind") == "decode"]
        for key, label in (("decode_ms", "agentmem"), ("full_decode_ms", "full attention"),
                           ("tiered_decode_ms", "agentmem, KV tiers")):  # fmt: skip
            points = [(r["tokens"], r[key]) for r in decode if r.get(key) is not None]
            if points:
                axes[0].plot(*zip(*points, strict=True), marker="o", label=f"{shape} {label}")
            mem_key = key.replace("decode_ms", "peak_gib")
            points = [(r["tokens"], r[mem_key]) for r in decode if r.get(mem_key) is not None]
            if points:
                axes[2].plot(*zip(*points, strict=True), marker="o", label=f"{shape} {label}")
        fill = [r for r in rows if r.get("shape") == shape and r.get("kind") == "prefill"]
        for key, label in (("prefill_tok_s", "agentmem"), ("full_prefill_tok_s", "full (flash)")):
            points = [(r["tokens"], r[key]) for r in fill if r.get(key) is not None]
            if points:
                axes[1].plot(*zip(*points, strict=True), marker="o", label=f"{shape} {label}")
    titles = ("decode, ms per token (CUDA graph)", "prefill, tokens/s", "peak GPU memory, GiB")
    for ax, name in zip(axes, titles, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens of context")
        ax.set_title(name)
        ax.legend(fontsize=7)
    axes[2].set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--decode", default="4096,32768,131072,524288,1048576")
    parser.add_argument("--prefill", default="32768,131072,1048576")
    parser.add_argument(
        "--full-max-prefill",
        type=int,
        default=131072,
        help="longest full-attention prefill (its time grows quadratically)",
    )
    parser.add_argument("--preset", default="4k")
    parser.add_argument("--steps", type=int, default=256, help="decode steps timed per size")
    parser.add_argument(
        "--device-units",
        type=int,
        default=None,
        help="also decode with KV tiers: this many units per layer and key head on the GPU",
    )
    parser.add_argument(
        "--retrieve-every",
        type=int,
        default=1,
        help="MemoryConfig.retrieve_every: decoded tokens per retrieval",
    )
    parser.add_argument("--tag", default="h100")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)  # fmt: skip
    if not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU")
    memory = agentmem.MemoryConfig.preset(args.preset, retrieve_every=args.retrieve_every)
    tiered = args.device_units and agentmem.MemoryConfig.preset(
        args.preset, retrieve_every=args.retrieve_every, device_units=args.device_units
    )
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"scale_{args.tag}.json"
    rows: list[dict] = [{"kind": "gpu", "name": torch.cuda.get_device_name(), **ceilings()}]

    def record(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        json_path.write_text(json.dumps(rows, indent=1))

    record(rows.pop())
    sizes = [int(s) for s in args.decode.split(",") if s]
    lengths = [int(s) for s in args.prefill.split(",") if s]
    for shape in args.shapes.split(","):
        model = agentmem.wrap(build_model(shape), memory)
        # the global layers' fp32 rope table, as MemoryLayer passes it
        rope = agentmem.new_cache(model, memory).memory_layers[0].rotary
        table = rope.table(8192, torch.float32, torch.device("cuda"))
        record({"kind": "kernel", "shape": shape,
                **kernel_efficiency(shape, memory, table)})  # fmt: skip
        for n_tokens in sizes:
            row = {"kind": "decode", "shape": shape, "tokens": n_tokens}
            for measure, *arguments in (
                (decode_agentmem, model, memory, shape, n_tokens, args.steps),
                (decode_full, model, shape, n_tokens),
                (retrieval, shape, memory, n_tokens),
                *([(decode_tiered, model, tiered, shape, n_tokens, args.steps)] if tiered else []),
            ):
                try:
                    row.update(measure(*arguments))
                except torch.OutOfMemoryError as error:
                    row.setdefault("oom", []).append(f"{measure.__name__}: {error}"[:200])
                except Exception as error:  # noqa: BLE001 - keep measuring the rest, say why
                    row.setdefault("errors", []).append(f"{measure.__name__}: {error!r}"[:300])
                torch.cuda.empty_cache()
            record(row)
        for n_tokens in lengths:
            row = {"kind": "prefill", "shape": shape, "tokens": n_tokens}
            try:
                row.update(prefill_agentmem(model, memory, n_tokens))
                if tiered:
                    measured = prefill_agentmem(model, tiered, n_tokens)
                    row.update({f"tiered_{key}": value for key, value in measured.items()})
                if n_tokens <= args.full_max_prefill:
                    row.update(prefill_full(model, n_tokens))
            except torch.OutOfMemoryError as error:
                row["oom"] = str(error)[:200]
            except Exception as error:  # noqa: BLE001 - keep measuring the rest, say why
                row["errors"] = repr(error)[:300]
            torch.cuda.empty_cache()
            record(row)
        model = None
        torch.cuda.empty_cache()
    plot(rows, args.out / f"scale_{args.tag}.png", f"{rows[0]['name']}, preset {args.preset}")
    print_table(rows)
    return 0


def print_table(rows: list[dict]) -> None:
    def fmt(value, spec=".3f"):
        return "-" if value is None else format(value, spec)

    gpu = rows[0]
    print(
        f"{gpu['name']}: matmul {gpu['matmul_tflops']:.0f} TFLOP/s, copy {gpu['copy_gbs']:.0f} GB/s"
    )
    print(f"{'shape':<13} {'tokens':>8} {'ms/token':>9} {'full':>8} {'layer ms':>9} "
          f"{'full layer':>10} {'retrieve':>9} {'peak GiB':>9} {'full GiB':>9} "
          f"{'tiered ms':>9} {'GiB':>6} {'host GiB':>8} {'hits':>5}")  # fmt: skip
    for r in rows:
        if r["kind"] == "decode":
            print(f"{r['shape']:<13} {r['tokens']:>8} {fmt(r.get('decode_ms')):>9} "
                  f"{fmt(r.get('full_decode_ms')):>8} {fmt(r.get('layer_step_ms')):>9} "
                  f"{fmt(r.get('full_layer_ms')):>10} {fmt(r.get('retrieve_decode_ms')):>9} "
                  f"{fmt(r.get('peak_gib'), '.1f'):>9} "
                  f"{fmt(r.get('full_peak_gib'), '.1f'):>9} "
                  f"{fmt(r.get('tiered_decode_ms')):>9} {fmt(r.get('tiered_peak_gib'), '.1f'):>6} "
                  f"{fmt(r.get('tiered_host_gib'), '.1f'):>8} "
                  f"{fmt(r.get('tiered_hit_rate'), '.2f'):>5}")  # fmt: skip
    for r in rows:
        if r["kind"] == "prefill":
            print(f"prefill {r['shape']:<13} {r['tokens']:>8}: agentmem "
                  f"{fmt(r.get('prefill_tok_s'), '.0f')} tok/s, tiered "
                  f"{fmt(r.get('tiered_prefill_tok_s'), '.0f')} tok/s, full "
                  f"{fmt(r.get('full_prefill_tok_s'), '.0f')} tok/s")  # fmt: skip
        if r["kind"] == "kernel":
            print(f"kernel {r['shape']} ({r['keys']} keys): prefill {r['prefill_tflops']:.0f} "
                  f"TFLOP/s vs SDPA {r['prefill_sdpa_tflops']:.0f}; decode {r['decode_gbs']:.0f} "
                  f"GB/s vs SDPA {r['decode_sdpa_gbs']:.0f}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
