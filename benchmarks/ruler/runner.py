"""The RULER runner: each prompt answered by agentmem under each position policy and, where it
fits, by full attention (transformers' own attention on the unwrapped model), through the public
API only. One JSON row per prompt and policy, written as it finishes (a killed run keeps them;
`--resume` goes on), with the answering step's retrieval for every needle.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import agentmem
from benchmarks.ruler.prompts import Prompt, TokenCounter, build
from benchmarks.ruler.report import format_table, heatmaps, summarize
from benchmarks.ruler.tasks import TASKS, Context, score


def _lengths(text: str) -> list[int]:
    out = []
    for item in filter(None, text.split(",")):
        scale = {"k": 1024, "m": 2**20}.get(item[-1].lower(), 1)
        out.append(int(item[:-1] if scale > 1 else item) * scale)
    return out


def _value(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _fields(text: str, sep: str) -> dict:
    fields = {}
    for item in filter(None, text.split(sep)):
        name, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"'{item}' is not field=value (a MemoryConfig field)")
        fields[name.strip()] = _value(value.strip())
    return fields


def policies(args) -> dict[str, agentmem.MemoryConfig]:
    """label -> config: each --position item is `policy[+field=value...]`, over --preset and
    --set."""
    common = _fields(args.set, ",")
    out = {}
    for item in filter(None, args.position.split(",")):
        name, *extra = item.split("+")
        if name not in agentmem.POSITIONS or name == "full":
            choices = ", ".join(p for p in agentmem.POSITIONS if p != "full")
            raise SystemExit(f"unknown policy '{name}' in --position; choose from {choices} "
                             "(full attention runs by --full-max)")  # fmt: skip
        fields = {**common, "position": name, **_fields("+".join(extra), "+")}
        if name == "streaming":
            fields["topk"] = 0
        out[item] = agentmem.MemoryConfig.preset(args.preset, **fields)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.ruler", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--model",
        default="qwen2.5-coder-0.5b-instruct",
        help="a built-in model, a transformers directory or a .gguf file",
    )
    p.add_argument("--tasks", default=",".join(TASKS), help=f"of {', '.join(TASKS)}")
    p.add_argument("--lengths", default="8192,32768,131072", help="tokens, e.g. 8192,128K,1M")
    p.add_argument(
        "--prompts",
        type=int,
        default=10,
        help="prompts per task and length; prompt i sits at depth i mod len(depths)",
    )
    p.add_argument(
        "--first",
        type=int,
        default=0,
        help="first prompt index to run (processes sharing a GPU split a cell's prompts by it)",
    )
    p.add_argument("--depths", default="0.1,0.5,0.9")
    p.add_argument(
        "--position",
        default="infllm,stacked,contiguous",
        help="agentmem policies, each policy[+field=value...], e.g. stacked+topk=32",
    )
    p.add_argument("--preset", default="4k", help="the MemoryConfig preset the policies start from")
    p.add_argument("--set", default="", help="field=value,... applied to every policy")
    p.add_argument(
        "--full-max",
        type=int,
        default=32768,
        help="run full attention up to this many tokens (0: never)",
    )
    p.add_argument(
        "--full-impl",
        choices=("hf", "session"),
        default="hf",
        help="hf: transformers' own attention on the unwrapped model; session: a "
        "session with MemoryConfig.preset('full')",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="e.g. bfloat16, float32 (default: load's)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/ruler.json"))
    p.add_argument("--resume", action="store_true", help="keep the rows in --out, run the rest")
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds; stop before a prompt that would not finish in time",
    )
    p.add_argument("--plots", type=Path, default=None, help="folder for per-task heatmap PNGs")
    p.add_argument(
        "--max-new",
        type=int,
        default=None,
        help="cap on the tokens each answer may have (default: the task's own)",
    )
    p.add_argument(
        "--trace",
        action="store_true",
        help="also record, at every decoded token, in how many layers each needle was",
    )
    return p


def main(argv: list[str] | None = None, lm: agentmem.LanguageModel | None = None) -> int:
    started = time.perf_counter()  # the time budget counts loading the model too
    args = parser().parse_args(argv)
    tasks = [TASKS[t] if t in TASKS else _unknown(t) for t in filter(None, args.tasks.split(","))]
    configs = policies(args)
    rows, meta = _open(args, configs, argv)
    if lm is None:
        dtype = getattr(torch, args.dtype) if args.dtype else None
        lm = agentmem.load(args.model, next(iter(configs.values()), None), device=args.device,
                           dtype=dtype)  # fmt: skip
    meta.setdefault("device", _device(lm))
    meta.setdefault("memory_layers", _memory_layers(lm))
    counter, clock = TokenCounter(lm.tokenizer), _Clock()

    def in_time(*work: tuple[str, int]) -> None:
        need = sum(clock.estimate(name, length) for name, length in work)
        if args.time_budget and time.perf_counter() - started + need > args.time_budget:
            raise _OutOfTime

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if lm.device.type == "cuda":
            _warm_up(lm, counter, configs, args, clock)
        for task, length, index, depth, todo in _plan(args, tasks, configs, rows):
            in_time(("build", length), (todo[0], length))
            t0 = time.perf_counter()
            ctx = Context(args.seed, task.name, length, index, depth, counter)
            prompt = build(task.layouts(ctx), lm.tokenizer, counter, task=task.name,
                           length=length, index=index, depth=depth)  # fmt: skip
            build_s = time.perf_counter() - t0
            clock.add("build", length, build_s)
            if args.max_new:
                prompt.max_new_tokens = min(prompt.max_new_tokens, args.max_new)
            for n, policy in enumerate(todo):
                if n:
                    in_time((policy, length))
                row = run_prompt(lm, prompt, task, policy, configs.get(policy), args, meta)
                row["build_s"] = round(build_s, 2)
                clock.add(policy, length, row["prefill_s"] + row["decode_s"])
                rows.append(row)
                _write(args.out, meta, rows)
                _progress(row, len(rows), time.perf_counter() - started)
    except _OutOfTime:
        print("ruler: time budget reached; run again with --resume to go on", flush=True)
    except KeyboardInterrupt:
        print("ruler: interrupted; the rows so far are kept (--resume goes on)", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        _finish(args, meta, rows)
    return 0


def _plan(args, tasks, configs, rows):
    """(task, length, index, depth, policies left) per prompt: lengths in order, and within a
    length prompt by prompt across the tasks, so that a run cut short covers every task."""
    done = {(r["task"], r["length"], r["index"], r["policy"]) for r in rows}
    depths = [float(d) for d in args.depths.split(",") if d]
    for length in _lengths(args.lengths):
        for index in range(args.first, args.prompts):
            for task in tasks:
                todo = [p for p in configs if (task.name, length, index, p) not in done]
                if length <= args.full_max and (task.name, length, index, "full") not in done:
                    todo.append("full")
                if todo:
                    depth = depths[index % len(depths)] if task.uses_depth else None
                    yield task, length, index, depth, todo


class _OutOfTime(Exception):
    pass


def _interrupt(signum, frame):  # SIGTERM (a time limit) ends the run like Ctrl-C: rows are kept
    raise KeyboardInterrupt


def _unknown(name: str):
    raise SystemExit(f"unknown task '{name}'; choose from {', '.join(TASKS)}")


class _Clock:
    """Seconds per token seen per policy (at the longest length so far), to predict a prompt."""

    def __init__(self) -> None:
        self.rates: dict[str, tuple[int, float]] = {}

    def add(self, policy: str, length: int, seconds: float) -> None:
        seen = self.rates.get(policy)
        if seen is None or length >= seen[0]:
            self.rates[policy] = (length, seconds / length)

    def estimate(self, policy: str, length: int) -> float:
        """Predicted seconds for `policy` at `length` (0 before any prompt of it ran)."""
        seen = self.rates.get(policy)
        if seen is None:
            return 0.0
        # Full attention's cost per token grows with the length; agentmem's stays about flat.
        growth = length / seen[0] if policy == "full" and length > seen[0] else 1.0
        return seen[1] * length * growth


def run_prompt(lm, prompt: Prompt, task, policy: str, memory, args, meta: dict) -> dict:
    """Answer one prompt with one policy ('full': full attention); returns its row."""
    device = lm.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row = {"task": prompt.task, "length": prompt.length, "index": prompt.index,
           "depth": prompt.depth, "policy": policy, "prompt_sha": prompt.sha,
           "tokens_predicted": prompt.tokens}  # fmt: skip
    if policy == "full" and args.full_impl == "hf":
        answer, tokens, prefill_s, decode_s = _full_attention(lm, prompt)
        report = None
    else:
        if policy == "full":
            memory = agentmem.MemoryConfig.preset("full")
        session = lm.session(memory=memory, progress=False)
        t0 = time.perf_counter()
        for role, text in prompt.segments:
            session.append(text, role=role)
        _sync(device)
        prefill_s, tokens = time.perf_counter() - t0, len(session)
        report = None
        if memory.retrieves or memory.position == "streaming":
            layers = meta["memory_layers"]
            report = needle_report(prompt, session.recalled(), memory, layers, tokens)
            row["spans_ok"] = all(
                n.value in lm.tokenizer.decode(session.tokens[s:e]) or n.key in
                lm.tokenizer.decode(session.tokens[s:e])
                for n, (s, e) in zip(prompt.needles, prompt.spans, strict=True)
            )  # fmt: skip
        t0 = time.perf_counter()
        if args.trace and report is not None:
            pieces, trace = [], []
            for piece in session.stream(prompt.max_new_tokens):
                pieces.append(piece)
                step = needle_report(prompt, session.recalled(), memory, layers, tokens)
                trace.append([len(n["layers"]) for n in step])
            answer = "".join(pieces)
            row["trace"] = trace
        else:
            answer = session.generate(prompt.max_new_tokens)
        _sync(device)
        decode_s = time.perf_counter() - t0
    result, miss = score(task, answer, prompt)
    asked = [n for n in (report or []) if n["asked"]]
    n_layers = len(meta["memory_layers"])
    row.update({
        "tokens": tokens, "answer": answer, "expected": prompt.expected,
        "score": round(result, 4), "correct": result == 1, "miss": miss,
        "coverage": min((len(n["layers"]) / n_layers for n in asked), default=None)
        if report is not None else None,
        "needles": report,
        "prefill_s": round(prefill_s, 3), "decode_s": round(decode_s, 3),
        "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda" else None,
    })  # fmt: skip
    return row


def needle_report(prompt: Prompt, recalls, memory, memory_layers: list[int], total: int) -> list:
    """Each needle at the step that gave `recalls`: its token span and depth, where it sat
    ('sinks'; 'local': surely in the local window; 'edge': the last n_local tokens, in the
    window or in the newest units; 'memory'), the layers in whose window all its tokens were,
    and the retrieved units that overlap it, each [start, end, layers, ranks] (its rank in each
    of those layers, 0 the unit of largest mass; None where a layer ranked nothing)."""
    n_init, n_local, unit = memory.n_init, memory.n_local, memory.unit_size
    surely_local = total - (n_local - unit + 1)  # a step packs whole units out of the window
    out = []
    for needle, (start, end) in zip(prompt.needles, prompt.spans, strict=True):
        units = [r for r in recalls if r.start < end and start < r.end]
        if end <= n_init:
            where = "sinks"
        elif start >= surely_local:
            where = "local"
        elif end > total - n_local:
            where = "edge"
        else:
            where = "memory"
        layers = []
        for layer in memory_layers:
            seen = [(r.start, r.end) for r in units if layer in r.layers]
            if all(t < n_init or t >= surely_local or any(a <= t < b for a, b in seen)
                   for t in range(start, end)):  # fmt: skip
                layers.append(layer)
        out.append({
            "key": needle.key, "value": needle.value, "asked": needle.asked,
            "span": [start, end], "depth": round(start / total, 4), "where": where,
            "layers": layers,
            "units": [[r.start, r.end, list(r.layers), list(r.ranks)] for r in units],
        })  # fmt: skip
    return out


def _full_attention(lm, prompt: Prompt) -> tuple[str, int, float, float]:
    """Full attention with transformers' own attention and cache on the unwrapped model."""
    from transformers import DynamicCache

    ids = []
    for i, (_, text) in enumerate(prompt.segments):  # tokenized as Session.append does
        ids += lm.tokenizer(text, add_special_tokens=i == 0).input_ids
    model, device = lm.model, lm.device
    eos = model.generation_config.eos_token_id
    eos = lm.tokenizer.eos_token_id if eos is None else eos
    stop = set(eos) if isinstance(eos, list) else {eos}
    with agentmem.unwrapped(model):
        cache = DynamicCache(config=model.config)
        t0 = time.perf_counter()
        chunk = 4096 if device.type == "cuda" else 512
        logits = agentmem.prefill(model, cache, torch.tensor([ids], device=device), chunk=chunk)
        _sync(device)
        prefill_s, t0 = time.perf_counter() - t0, time.perf_counter()
        out = list(agentmem.greedy(model, cache, logits, max_new_tokens=prompt.max_new_tokens,
                                   stop_ids=stop))  # fmt: skip
        _sync(device)
    answer = lm.tokenizer.decode([t for t in out if t not in stop], skip_special_tokens=True)
    return answer, len(ids), prefill_s, time.perf_counter() - t0


def _warm_up(lm, counter, configs, args, clock: _Clock, length: int = 4096) -> None:
    """One short prompt per policy first, so that kernel compilation counts as no prompt's, then
    again, timed: the time budget then has an estimate for a policy's first long prompt, which
    would otherwise start whatever its length. The first run is not timed: with eight processes
    compiling at once it predicted 1M-token prompts ten times too slow, and none started."""
    task = TASKS["niah_single"]
    ctx = Context(args.seed, "warm-up", length, 0, 0.5, counter)
    prompt = build(task.layouts(ctx), lm.tokenizer, counter, task="warm-up", length=length,
                   index=0, depth=0.5)  # fmt: skip
    meta = {"memory_layers": _memory_layers(lm)}
    for policy in [*configs, *(["full"] if args.full_max else [])]:
        for _ in range(2):
            row = run_prompt(lm, prompt, task, policy, configs.get(policy), args, meta)
        clock.add(policy, length, row["prefill_s"] + row["decode_s"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory_layers(lm) -> list[int]:
    config = lm.model.config
    config = getattr(config, "text_config", None) or config
    types = getattr(config, "layer_types", None)
    if types:
        return [i for i, t in enumerate(types) if t == "full_attention"]
    return list(range(config.num_hidden_layers))


def _device(lm) -> str:
    if lm.device.type == "cuda":
        return torch.cuda.get_device_name(lm.device)
    return str(lm.device)


def _open(args, configs, argv) -> tuple[list[dict], dict]:
    """The rows already in --out (with --resume) and the run's meta, checked against this one;
    every invocation is added to the meta's runs."""
    mine = {"model": str(args.model), "seed": args.seed, "dtype": args.dtype,
            "full_impl": args.full_impl,
            "policies": {k: v.model_dump() for k, v in configs.items()}}  # fmt: skip
    run = {"argv": sys.argv[1:] if argv is None else list(argv), "commit": _commit(),
           "source": source_digest(),
           "started": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
    if not args.out.exists():
        return [], {**mine, "runs": [run]}
    if not args.resume:
        raise SystemExit(f"{args.out} exists: pass --resume to go on with it, or another --out")
    data = json.loads(args.out.read_text())
    meta = data["meta"]
    for field in ("model", "seed", "dtype", "full_impl"):
        if meta.get(field) != mine[field]:
            raise SystemExit(f"--resume: {args.out} was run with {field}={meta.get(field)!r}, "
                             f"not {mine[field]!r}; use another --out")  # fmt: skip
    for label, config in mine["policies"].items():
        if meta["policies"].setdefault(label, config) != config:
            raise SystemExit(
                f"--resume: policy '{label}' had another MemoryConfig in {args.out}; "
                "give it another label (e.g. a +field=value) or another --out"
            )
    meta.setdefault("runs", []).append(run)
    return data["rows"], meta


def _write(path: Path, meta: dict, rows: list[dict]) -> None:
    """The whole file, one row a line, replaced atomically (a kill leaves the old or the new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    body = ",\n".join(json.dumps(r) for r in rows)
    tmp.write_text(f'{{"meta": {json.dumps(meta)},\n"rows": [\n{body}\n]}}\n')
    os.replace(tmp, path)


def _finish(args, meta: dict, rows: list[dict]) -> None:
    if not rows:
        return
    table = format_table(summarize(rows))
    title = f"{meta['model']}, {meta['device']}"
    args.out.with_suffix(".txt").write_text(f"{title}\n{json.dumps(meta['policies'])}\n\n{table}\n")
    print(table, flush=True)
    if args.plots:
        for path in heatmaps(rows, args.plots, title):
            print(f"ruler: wrote {path}", flush=True)


def _progress(row: dict, n: int, elapsed: float) -> None:
    answer = row["answer"].strip().replace("\n", " ")
    where = ""
    if row["needles"]:
        asked = [n for n in row["needles"] if n["asked"]]
        where = " window " + ",".join(f"{len(n['layers'])}" for n in asked)
    depth = "" if row["depth"] is None else f" d={row['depth']:.2f}"
    print(
        f"[{n} {elapsed / 60:.1f}m] {row['task']} {row['length']}{depth} #{row['index']} "
        f"{row['policy']}: {answer[:48]!r} expected {' '.join(row['expected'])[:40]} "
        f"score {row['score']:.2f}{' ' + row['miss'] if row['miss'] else ''}{where} | "
        f"{row['tokens']} tok, prefill {row['prefill_s']:.1f}s, decode {row['decode_s']:.1f}s",
        flush=True,
    )


SOURCE_FOLDERS = ("agentmem", "kernels/agentmem_kernels", "benchmarks")
REPOSITORY = Path(__file__).resolve().parents[2]


def source_digest(root: Path = REPOSITORY) -> str:
    """sha256 (12 hex digits) of the Python sources that make a row: the commit alone can be
    stale (a GPU machine's copy of the tree carries an older `.git`), so a run also records what
    its code was, to be matched against a checkout's own digest."""
    digest = hashlib.sha256()
    for folder in SOURCE_FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).parent)  # fmt: skip
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
