"""The FAISS unit index against the exact scan: prefill time, the passkey, and recall@k, in one run.

One passkey prompt per depth is read into a session twice, first with `MemoryConfig(index="exact")`
(every representative scored at every step), then with `index="faiss"` (an HNSW graph per layer and
key head proposes candidates, scored exactly); each answers the passkey. Recall@k: scoring
queries sampled across the faiss run's prefill (every `--sample-every`-th retrieval of each
memory layer) choose their top-k units again over the final memory, through the index and
exactly; recall is the share of the exact choice the index found.

    python -m benchmarks.index --model gemma-3-270m --length 262144 \
        --out benchmarks/results/index_cpu_gemma3_270m.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

import agentmem
from agentmem.memory.index import indexed_top_units
from agentmem.memory.layer import MemoryLayer
from agentmem.memory.representatives import score_kind
from agentmem.passkey import build_prompt, draw_keys, parse_answer
from agentmem_kernels import score_units


def _read(lm, prompt, memory: agentmem.MemoryConfig) -> tuple[agentmem.Session, float, str]:
    session = lm.session(memory=memory, progress=True)
    started = time.perf_counter()
    session.append_tokens(prompt.ids)
    prefill_s = time.perf_counter() - started
    return session, prefill_s, session.generate(max_new_tokens=8)


class _Sampler:
    """Copies of the scoring queries of every `every`-th retrieval of each layer (scale kept)."""

    def __init__(self, every: int) -> None:
        self.every, self.calls, self.samples = every, {}, {}

    def __enter__(self):
        real = self.real = MemoryLayer._retrieve

        def spy(layer, q, scale, n_units=None):
            calls = self.calls[id(layer)] = self.calls.get(id(layer), 0) + 1
            if calls % self.every == 0:
                self.samples.setdefault(id(layer), []).append((q.clone(), scale))
            return real(layer, q, scale, n_units)

        MemoryLayer._retrieve = spy
        return self

    def __exit__(self, *exc) -> None:
        MemoryLayer._retrieve = self.real


def recall_at_k(session: agentmem.Session, samples: dict) -> dict:
    """Mean share of the exact top-k the index finds, over the sampled queries and key heads."""
    shares = []
    for memory in session.cache.memory_layers:
        cfg, reps = memory.config, memory.units.reps.data
        for q, scale in samples.get(id(memory), []):
            kind = score_kind(cfg.repr)
            exact = score_units(q, reps, kind=kind, scale=scale, k=cfg.topk)
            found = indexed_top_units(memory.index, q, reps, k=cfg.topk, kind=kind, scale=scale)
            for a, b in zip(exact.flatten(0, 1), found.flatten(0, 1), strict=True):
                shares.append(len(set(a.tolist()) & set(b.tolist())) / cfg.topk)
    return {"recall_at_k": sum(shares) / max(len(shares), 1), "query_sets": len(shares)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.index", description=__doc__.splitlines()[0]
    )
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--length", type=int, default=262144, help="tokens per prompt")
    p.add_argument("--depths", default="0.5", help="passkey depths, one prompt each")
    p.add_argument("--preset", default="default", help="the MemoryConfig both runs share")
    p.add_argument(
        "--index-min-units", type=int, default=None, help="units before the index is consulted"
    )
    p.add_argument("--sample-every", type=int, default=64, help="retrievals between recall samples")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/index.json"))
    args = p.parse_args(argv)
    base = agentmem.MemoryConfig.preset(args.preset)
    if args.index_min_units is not None:
        base = base.model_copy(update={"index_min_units": args.index_min_units})
    lm = agentmem.load(args.model, base, device=args.device)
    depths = [float(d) for d in args.depths.split(",")]
    rows = []
    for depth, key in zip(depths, draw_keys(len(depths), seed=7), strict=True):
        prompt = build_prompt(lm.tokenizer, args.length, depth, key)
        for index in ("exact", "faiss"):
            memory = base.model_copy(update={"index": index})
            # Queries are sampled in the faiss run only: the exact run's time has no copies.
            sampling = _Sampler(args.sample_every) if index == "faiss" else contextlib.nullcontext()
            with sampling as sampler:
                session, prefill_s, answer = _read(lm, prompt, memory)
            row = {
                "index": index, "length": len(prompt.ids), "depth": depth, "key": key,
                "answer": answer, "found": parse_answer(answer) == key, "prefill_s": prefill_s,
                "tok_s": len(prompt.ids) / prefill_s, "memory": memory.model_dump(),
                "threads": torch.get_num_threads(),
            }  # fmt: skip
            if index == "faiss":
                row |= recall_at_k(session, sampler.samples)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "memory"}), flush=True)
            del session
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "rows": rows}, indent=1))
    for exact, faiss in zip(rows[::2], rows[1::2], strict=True):
        print(
            f"{exact['length']:>8} tokens, depth {exact['depth']}: prefill exact "
            f"{exact['prefill_s']:.1f} s, faiss {faiss['prefill_s']:.1f} s "
            f"({exact['prefill_s'] / faiss['prefill_s']:.2f}x); passkey exact {exact['found']}, "
            f"faiss {faiss['found']}; recall@{base.topk} {faiss['recall_at_k']:.3f} over "
            f"{faiss['query_sets']} query sets"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
