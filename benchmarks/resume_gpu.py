"""A long stored session resumed by a new process on the GPU: how soon its first tokens come.

Gemma-3-270M's shape with random weights (no download; seeded, so both processes build the same
model) in bfloat16, the dtype `agentmem.load` gives on an accelerator. The session's memory is
filled with random keys and values through `load_state_dict` (as `benchmarks.scale` fills it:
resuming reads the same bytes whatever they hold), saved to a store, and a new process builds the
model, opens the store, resumes and decodes. Reported: the save, the resume, the first token (it
comes from the saved logits), the second (the first step: retrieval reads its units from the
files), the units read, and whether the new process's tokens equal the first process's. The
baseline, in the same run: agentmem's prefill rate at `--prefill` tokens, and the time re-reading
the session at that rate would take. The payload is in the page cache, as right after a save.

    python -m benchmarks.resume_gpu --tokens 1048576 --prefill 131072
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import agentmem
from agentmem.session import LanguageModel
from benchmarks.scale import build_model, fill_memory, prefill_agentmem
from tests.helpers import char_tokenizer

SHAPE = "gemma-3-270m"
NEW_TOKENS = 8


def _lm(memory: agentmem.MemoryConfig) -> LanguageModel:
    torch.manual_seed(0)
    model = build_model(SHAPE).to(torch.bfloat16)
    return LanguageModel(model, char_tokenizer(), memory)


def _child(args: argparse.Namespace) -> None:
    lm = _lm(agentmem.MemoryConfig())
    torch.cuda.synchronize()
    started = time.perf_counter()
    store = agentmem.Store(root=args.root)
    session = lm.session("long", store=store, autosave=False, progress=False)
    torch.cuda.synchronize()
    resume_s = time.perf_counter() - started
    stamps, tokens = [], []
    for token in session.generate_tokens(NEW_TOKENS):
        torch.cuda.synchronize()
        stamps.append(time.perf_counter() - started)
        tokens.append(token)
    layers = session.cache.memory_layers
    units = sum(layer.units.n_units for layer in layers)
    unread = sum(layer.units.lazy_units for layer in layers)
    print(json.dumps({
        "resume_s": resume_s, "first_token_s": stamps[0], "second_token_s": stamps[1],
        "all_tokens_s": stamps[-1], "tokens": tokens, "units": units, "units_read": units - unread,
    }))  # fmt: skip


def _parent(args: argparse.Namespace) -> dict:
    memory = agentmem.MemoryConfig()
    lm = _lm(memory)
    config = lm.model.config
    row: dict = {"tokens": args.tokens, "memory": memory.model_dump()}
    with tempfile.TemporaryDirectory() as root:
        session = lm.session("long", store=agentmem.Store(root=root), autosave=False)
        fill_memory(
            session.cache, args.tokens, config.num_key_value_heads, config.head_dim, torch.bfloat16
        )
        state = session.cache.state_dict()
        vocab = config.vocab_size
        state["tensors"]["session.tokens"] = torch.randint(3, vocab, (args.tokens,))
        state["tensors"]["session.next_logits"] = torch.randn(1, vocab, device="cuda")
        state["meta"]["session"] = {"pending": [], "messages": [], "tokens_from": 0}
        session.load_state_dict(state)
        started = time.perf_counter()
        session.save()
        row["save_s"] = time.perf_counter() - started
        row["payload_bytes"] = sum(s.bytes for s in session.store.segments("long"))
        # The first process continues first: that also compiles the kernels a step runs (Triton
        # caches them on disk), as any earlier run on the machine would have.
        want = list(session.generate_tokens(NEW_TOKENS))
        child = subprocess.run(
            [sys.executable, "-m", "benchmarks.resume_gpu", "--child", "--root", root],
            capture_output=True, text=True,
        )  # fmt: skip
        if child.returncode != 0:
            raise RuntimeError(f"the resuming process failed:\n{child.stderr[-4000:]}")
        resumed = json.loads(child.stdout.strip().splitlines()[-1])
    row.update(resumed)
    row["same_tokens"] = resumed["tokens"] == want
    print(json.dumps(row), flush=True)
    if args.prefill:
        del session
        rate = prefill_agentmem(lm.model, memory, args.prefill)["prefill_tok_s"]
        row.update(prefill_tokens=args.prefill, prefill_tokens_per_s=rate)
        row["reread_s_at_that_rate"] = args.tokens / rate
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1 << 20)
    parser.add_argument("--prefill", type=int, default=0, help="also measure prefill at this")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args)
    row = _parent(args)
    print(json.dumps(row, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
