"""Resuming a stored session against re-reading it: a session of N tokens is prefilled and saved,
then a new process opens it from the store and answers; the baseline is the prefill itself.

Reports per length: prefill (re-reading) seconds, resume seconds in a new process (store open +
session resume, model load excluded on both sides), their ratio, the new process's time to its
first answer token and to the whole answer, how many memory units its answer read from the files
(the rest stay unread: a lazy resume), whether that answer equals the original's, and the bytes
one more ~100-token turn writes against the whole payload.

    python -m benchmarks.resume --lengths 4096,32768 --n-local 1024 --topk 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import agentmem
from agentmem.passkey import build_prompt

ANSWER_TOKENS = 8


def _child(args: argparse.Namespace) -> None:
    """In a new process: open the store, resume the session, answer; print one JSON line."""
    lm = agentmem.load(args.model, _memory(args))
    started = time.perf_counter()
    store = agentmem.Store(root=args.root)
    session = lm.session(args.child, store=store, autosave=False, progress=False)
    resume_s = time.perf_counter() - started
    pieces = session.stream(max_new_tokens=ANSWER_TOKENS)
    answer = next(pieces)
    first_token_s = time.perf_counter() - started
    answer += "".join(pieces)
    answer_s = time.perf_counter() - started
    layers = session.cache.memory_layers
    units = sum(layer.units.n_units for layer in layers)
    unread = sum(layer.units.lazy_units for layer in layers)
    print(json.dumps({
        "resume_s": resume_s, "first_token_s": first_token_s, "answer_s": answer_s,
        "answer": answer, "tokens": len(session), "units": units, "units_read": units - unread,
    }))  # fmt: skip


def _memory(args: argparse.Namespace) -> agentmem.MemoryConfig:
    return agentmem.MemoryConfig(n_local=args.n_local, topk=args.topk)


def _one(lm, args: argparse.Namespace, root: Path, n_tokens: int) -> dict:
    store = agentmem.Store(root=root)
    name = f"s{n_tokens}"
    session = lm.session(name, store=store, autosave=False, progress=False)
    prompt = build_prompt(lm.tokenizer, n_tokens, 0.5, "71432")
    started = time.perf_counter()
    session.append_tokens(prompt.ids)
    prefill_s = time.perf_counter() - started
    session.save()
    child = subprocess.run(
        [sys.executable, "-m", "benchmarks.resume", "--child", name, "--root", str(root),
         "--model", args.model, "--n-local", str(args.n_local), "--topk", str(args.topk)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    resumed = json.loads(child.stdout.strip().splitlines()[-1])
    answer = session.generate(max_new_tokens=ANSWER_TOKENS)
    session.append(" And one more turn of about a hundred tokens. " * 10, role="user")
    session.save()
    segments = store.segments(name, tenant="default")
    store.close()
    return {
        "tokens": len(prompt.ids),
        "prefill_s": prefill_s,
        "resume_s": resumed["resume_s"],
        "first_token_s": resumed["first_token_s"],
        "answer_s": resumed["answer_s"],
        "units_read": f"{resumed['units_read']} of {resumed['units']}",
        "speedup": prefill_s / resumed["resume_s"],
        "same_answer": resumed["answer"] == answer,
        "answer": answer,
        "turn_bytes": segments[-1].bytes,
        "payload_bytes": sum(segment.bytes for segment in segments),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--lengths", default="4096,32768")
    parser.add_argument("--n-local", type=int, default=1024)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/resume_cpu.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args)
    lm = agentmem.load(args.model, _memory(args))
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for n_tokens in (int(n) for n in args.lengths.split(",")):
            rows.append(_one(lm, args, Path(scratch) / str(n_tokens), n_tokens))
            row = rows[-1]
            print(f"{row['tokens']:>8} tokens: prefill {row['prefill_s']:.2f} s, resume in a new "
                  f"process {row['resume_s']:.3f} s ({row['speedup']:.0f}x), answered in "
                  f"{row['answer_s']:.3f} s reading {row['units_read']} units, same answer "
                  f"{row['same_answer']}; one more turn wrote {row['turn_bytes']:,} of "
                  f"{row['payload_bytes']:,} bytes")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
