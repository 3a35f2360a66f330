"""`agentmem serve` under load: `--clients` clients at once, each on its own session, `--turns`
turns each, every turn re-sending the whole conversation (as OpenAI clients do) and streaming
its reply. The server runs in this process (uvicorn in a thread, as the server's tests run it),
on a throwaway SQLite store; the clients are threads speaking real HTTP on loopback.

Reported, beside a baseline measured first in the same run (one client alone, the same turns):
requests/s over the whole run, time to first token (from sending the request to its
first chunk with text) and latency (to `data: [DONE]`), p50/p95 over every turn and per turn
number, and the tokens each turn read from memory; a JSON file and a printed table.

    python -m benchmarks.server_load --clients 8 --turns 4 --model tiny
    python -m benchmarks.server_load --clients 8 --turns 4 --model qwen2.5-coder-0.5b-instruct \
        --out benchmarks/results/server_load_cpu_qwen05b.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is imported: never fetch

import httpx  # noqa: E402

from agentmem.chat import engine  # noqa: E402
from agentmem.persistence import Store  # noqa: E402
from agentmem.server.app import create_app  # noqa: E402
from agentmem.testing import free_port, run_server  # noqa: E402

KEY = "bench-key"


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    at = (len(ordered) - 1) * q / 100
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def streamed_turn(http: httpx.Client, body: dict) -> dict:
    """One streamed completion: its text, usage, agentmem object, TTFT and latency."""
    started = time.perf_counter()
    first, text, usage, meta = None, [], None, None
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"the stream failed: {chunk['error']}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                content = choice.get("delta", {}).get("content")
                if content and first is None:
                    first = time.perf_counter() - started
                if content:
                    text.append(content)
            if chunk.get("agentmem"):
                meta = chunk["agentmem"]
    latency = time.perf_counter() - started
    return {
        "ttft_s": latency if first is None else first,
        "latency_s": latency,
        "text": "".join(text),
        "usage": usage,
        "agentmem": meta,
    }


def client(url: str, model: str, index: int, turns: int, max_tokens: int, start,
           prefix: str = "bench") -> list[dict]:  # fmt: skip
    session_id = f"{prefix}-{index}"
    history: list[dict] = [{"role": "system", "content": "You are a helpful assistant."}]
    rows = []
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=3600
    ) as http:
        start.wait()
        for turn in range(1, turns + 1):
            history.append(
                {"role": "user", "content": f"client{index}-turn{turn}: tell me something new."}
            )
            body = {
                "model": model, "messages": history, "max_tokens": max_tokens,
                "session_id": session_id, "stream": True,
                "stream_options": {"include_usage": True},
            }  # fmt: skip
            row = streamed_turn(http, body)
            history.append({"role": "assistant", "content": row["text"]})
            usage, meta = row.pop("usage") or {}, row.pop("agentmem") or {}
            row.update(
                client=index, turn=turn, prompt_tokens=usage.get("prompt_tokens"),
                completion_tokens=usage.get("completion_tokens"),
                cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
                prefilled_tokens=meta.get("prefilled_tokens"), forked=meta.get("forked"),
            )  # fmt: skip
            row.pop("text")
            rows.append(row)
    return rows


def load(url: str, model: str, clients: int, turns: int, max_tokens: int,
         prefix: str) -> tuple[list[dict], float]:  # fmt: skip
    """`clients` clients at once (each its own session), `turns` turns each: (rows, wall s)."""
    start = threading.Barrier(clients)
    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        futures = [
            pool.submit(client, url, model, i, turns, max_tokens, start, prefix)
            for i in range(clients)
        ]
        rows = [r for f in futures for r in f.result()]
    return rows, time.perf_counter() - began


def summary_of(rows: list[dict]) -> dict:
    ttft, latency = [r["ttft_s"] for r in rows], [r["latency_s"] for r in rows]
    return {
        "requests": len(rows),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
        "latency_p50_s": percentile(latency, 50), "latency_p95_s": percentile(latency, 95),
        "mean_prompt_tokens": statistics.fmean(r["prompt_tokens"] or 0 for r in rows),
        "mean_cached_tokens": statistics.fmean(r["cached_tokens"] or 0 for r in rows),
        "mean_prefilled_tokens": statistics.fmean(r["prefilled_tokens"] or 0 for r in rows),
    }  # fmt: skip


def table(overall: dict, per_turn: dict[int, dict], requests_per_s: float) -> str:
    head = (
        f"{'turn':>6} {'reqs':>5} {'ttft p50':>9} {'ttft p95':>9} {'lat p50':>9} {'lat p95':>9}"
        f" {'prompt':>7} {'cached':>7} {'prefill':>7}"
    )
    lines = [head, "-" * len(head)]
    for name, s in [*per_turn.items(), ("all", overall)]:
        lines.append(
            f"{name:>6} {s['requests']:>5} {s['ttft_p50_s']:>8.3f}s {s['ttft_p95_s']:>8.3f}s "
            f"{s['latency_p50_s']:>8.3f}s {s['latency_p95_s']:>8.3f}s "
            f"{s['mean_prompt_tokens']:>7.0f} {s['mean_cached_tokens']:>7.0f} "
            f"{s['mean_prefilled_tokens']:>7.0f}"
        )
    lines.append(f"requests/s: {requests_per_s:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument(
        "--model", default="tiny",
        help="'tiny' (agentmem.testing's random-weight model), a built-in name or a path",
    )  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=16, help="most tokens of a reply")
    parser.add_argument("--max-active", type=int, default=8, help="replies decoded at once")
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--out", type=Path, default=None, help="default: results/server_load_<model>.json"
    )
    args = parser.parse_args(argv)
    if args.clients < 1 or args.turns < 1:
        parser.error("--clients and --turns must be >= 1")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    model = args.model
    if model == "tiny":
        from agentmem import testing

        model = testing.model_dir()
    label = "tiny" if args.model == "tiny" else Path(args.model).name
    out = args.out or Path("benchmarks/results") / f"server_load_{label}.json"

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="agentmem-bench-") as root:
        store = Store(root=Path(root) / "store")
        app = create_app(
            model, store, api_keys={KEY: "bench"}, max_queue=args.max_queue,
            max_active=args.max_active,
        )  # fmt: skip
        loading = time.perf_counter()
        server, thread = run_server(app, free_port())
        load_s = time.perf_counter() - loading
        url = f"http://127.0.0.1:{server.config.port}"
        try:
            warm = streamed_turn(
                httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=600),
                {"model": model, "messages": [{"role": "user", "content": "warm up"}],
                 "max_tokens": 2, "stream": True},
            )  # fmt: skip
            # The baseline, in the same run: one client alone, the same turns.
            alone, alone_wall = load(url, model, 1, args.turns, args.max_tokens, "alone")
            rows, wall = load(url, model, args.clients, args.turns, args.max_tokens, "bench")
        finally:
            server.should_exit = True
            thread.join(timeout=60)
            store.close()
            engine._threads.clear()

    requests_per_s = len(rows) / wall
    overall = summary_of(rows)
    per_turn = {
        t: summary_of([r for r in rows if r["turn"] == t]) for t in range(1, args.turns + 1)
    }
    result = {
        "model": args.model, "clients": args.clients, "turns": args.turns,
        "max_tokens": args.max_tokens, "max_active": args.max_active, "cpus": os.cpu_count(),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "server_start_s": load_s, "warm_up_s": warm["latency_s"], "wall_s": wall,
        "requests_per_s": requests_per_s,
        "completion_tokens_per_s": sum(r["completion_tokens"] or 0 for r in rows) / wall,
        "summary": overall, "per_turn": per_turn, "rows": rows,
        "alone": {"requests_per_s": len(alone) / alone_wall, "summary": summary_of(alone)},
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(table(overall, per_turn, requests_per_s))
    base = result["alone"]["summary"]
    print(
        f"baseline, one client alone: ttft p50 {base['ttft_p50_s']:.3f}s, latency p50 "
        f"{base['latency_p50_s']:.3f}s, {result['alone']['requests_per_s']:.2f} requests/s"
    )
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
