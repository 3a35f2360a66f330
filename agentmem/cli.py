"""The `agentmem` command line: `agentmem passkey` runs the passkey retrieval test; `agentmem serve`
runs the OpenAI-compatible chat server (docs/server.md).

Methods run side by side in one process on the same prompts: agentmem, streaming (sinks + local),
truncation to the same window, and full attention. A table goes to stdout; `--json` keeps every row.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from agentmem.config import PRESETS, MemoryConfig

CONFIG_FLAGS = {
    "unit_size": int,
    "n_init": int,
    "n_local": int,
    "topk": int,
    "query_window": int,
    "repr_topk": int,
    "repr": str,
    "exec_chunk": int,
    "position": str,
    "selfextend_group": int,
    "selfextend_window": int,
    "index": str,
    "index_min_units": int,
    "retrieve_every": int,
    "device_units": int,
}


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part]
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas: {text}"
        ) from error
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers: {text}")
    return values


def _depth_list(text: str) -> list[float]:
    """'5' means 5 evenly spread depths; '0.1,0.5' lists them."""
    from agentmem.passkey import depths

    if "." not in text and "," not in text:
        return depths(int(text))
    values = [float(part) for part in text.split(",") if part]
    if any(not 0.0 <= d <= 1.0 for d in values):
        raise argparse.ArgumentTypeError(f"depths must lie in [0, 1]: {text}")
    return values


def _method_list(text: str) -> list[str]:
    from agentmem.passkey import METHODS

    methods = [part for part in text.split(",") if part]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown methods {unknown}; choose from {METHODS}")
    return methods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentmem", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    passkey = commands.add_parser("passkey", help="passkey retrieval at several lengths and depths")
    passkey.add_argument("--model", default="gemma-3-270m", help="built-in name or model directory")
    passkey.add_argument("--lengths", type=_int_list, default=[8192], help="e.g. 8192,16384")
    passkey.add_argument(
        "--depths", type=_depth_list, default=_depth_list("5"), help="5 or 0.1,0.5"
    )
    passkey.add_argument("--trials", type=int, default=1, help="keys drawn per depth")
    passkey.add_argument(
        "--methods", type=_method_list, default=["agentmem", "streaming", "truncate", "full"]
    )
    passkey.add_argument(
        "--full-max-length", type=int, default=None, help="skip full attention above this length"
    )
    passkey.add_argument("--seed", type=int, default=0)
    passkey.add_argument("--max-new-tokens", type=int, default=8)
    passkey.add_argument("--device", default=None, help="default: the accelerator if any, else cpu")
    passkey.add_argument("--json", type=Path, default=None, help="write every row to this file")
    passkey.add_argument("--preset", default="default", choices=sorted(PRESETS))
    for name, kind in CONFIG_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        passkey.add_argument(flag, type=kind, default=None, help=f"MemoryConfig.{name}")
    serve = commands.add_parser("serve", help="an OpenAI-compatible chat server (docs/server.md)")
    serve.add_argument(
        "--model",
        default="qwen2.5-coder-0.5b-instruct",
        help="built-in name, model directory or .gguf",
    )
    serve.add_argument(
        "--store",
        default=None,
        help="SQLAlchemy URL of the sessions' database (default: SQLite in the root)",
    )
    serve.add_argument("--root", default=None, help="the store's payload root")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--api-keys",
        default=None,
        help="a JSON file of API key -> tenant (default: no keys, one tenant)",
    )
    serve.add_argument(
        "--max-queue", type=int, default=64, help="requests that may wait; past it, 429"
    )
    return parser


def memory_config(args: argparse.Namespace) -> MemoryConfig:
    overrides = {
        name: getattr(args, name) for name in CONFIG_FLAGS if getattr(args, name) is not None
    }
    return MemoryConfig.preset(args.preset, **overrides)


def run_passkey(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from agentmem.models import load
    from agentmem.passkey import (
        build_prompt,
        draw_keys,
        format_table,
        run_prompt,
        summarize,
        warm_up,
    )

    try:
        memory = memory_config(args)
    except ValueError as error:
        parser.error(str(error))
    if args.trials < 1:
        parser.error("--trials must be >= 1")
    lm = load(args.model, memory, device=args.device)
    print(f"agentmem passkey: {args.model} on {lm.device}, memory {memory!r}", file=sys.stderr)
    warm_up(lm, memory)
    rows = []
    for length in args.lengths:
        keys = draw_keys(len(args.depths) * args.trials, seed=args.seed + length)
        for i, depth in enumerate(args.depths):
            for trial in range(args.trials):
                prompt = build_prompt(lm.tokenizer, length, depth, keys[i * args.trials + trial])
                for method in args.methods:
                    if method == "full" and args.full_max_length and length > args.full_max_length:
                        continue
                    row = run_prompt(lm, method, prompt, memory, max_new_tokens=args.max_new_tokens)
                    rows.append(row)
                    print(
                        f"{method:>10} len {length} depth {depth:.2f} key {row.key} "
                        f"answer {row.answer.strip()[:24]!r} correct {row.correct} "
                        f"recalled {row.needle_recalled} prefill {row.prefill_s:.1f}s",
                        file=sys.stderr,
                        flush=True,
                    )
                    if args.json:
                        _write_json(args.json, rows)
    print(format_table(summarize(rows)))
    return 0


def run_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        from agentmem.server import read_api_keys, serve
    except ImportError as error:
        parser.error(
            f"agentmem serve needs the server extra (pip install 'agentmem-kv[server]'): {error}"
        )
    if args.max_queue < 1:
        parser.error("--max-queue must be >= 1")
    if args.api_keys:
        try:
            read_api_keys(args.api_keys)
        except ValueError as error:
            parser.error(str(error))
    serve(
        args.model, store_url=args.store, store_root=args.root, host=args.host,
        port=args.port, api_keys=args.api_keys, max_queue=args.max_queue,
    )  # fmt: skip
    return 0


def _write_json(path: Path, rows: list) -> None:
    """Rewrite the whole file atomically after every row, so an interrupted run keeps its rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump([asdict(row) for row in rows], f, indent=1)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "passkey":
        return run_passkey(args, parser)
    if args.command == "serve":
        return run_serve(args, parser)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
