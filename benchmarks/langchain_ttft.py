"""Time to first token of a growing LangChain conversation: `ChatAgentMem`, which keeps the
conversation in agentmem's memory and prefills only what a turn adds, against `ChatHuggingFace`
on the same weights (a transformers text-generation pipeline), which re-prefills the whole
re-sent history on every call.

Each user turn is a chunk of a server log and a short question (`--tokens-per-turn` tokens), each
reply at most `--max-tokens` greedy tokens, appended to the history LangChain re-sends; at the
defaults the history is ~32K tokens at turn 50, under Qwen's 32,768 positions. Time to first
token: from calling `.stream()` to its first chunk with text, the same for both models, after one
untimed warm-up call each. ChatAgentMem runs every turn; ChatHuggingFace keeps nothing between
calls, so it is timed on the `--measure` turns only, given the same history (ChatAgentMem's
replies) as ChatAgentMem got.

    python -m benchmarks.langchain_ttft --threads 1 \
        --out benchmarks/results/langchain_ttft_cpu_qwen05b.json
    python -m benchmarks.langchain_ttft --turns 5 --tokens-per-turn 200 --measure 1,5 \
        --out /tmp/ttft.json   # a quick check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import random
import resource
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is imported: never fetch

import torch  # noqa: E402
import transformers  # noqa: E402
from langchain_agentmem import ChatAgentMem  # noqa: E402
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage  # noqa: E402
from langchain_huggingface import ChatHuggingFace, HuggingFacePipeline  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    TextIteratorStreamer,
)

import agentmem  # noqa: E402

SYSTEM = "You read server logs and answer in a few words."
QUESTION = "\n\nTurn {turn}: which request id in this chunk took the longest? Answer with the id."
SERVICES = ("api", "auth", "billing", "search", "worker")
ROUTES = ("/v1/orders", "/v1/users", "/v1/search", "/v1/invoices", "/healthz")
MEMORY = agentmem.MemoryConfig()  # the default layout


def user_turns(tokenizer, turns: int, tokens: int, seed: int = 0) -> list[str]:
    """`turns` user messages of about `tokens` tokens each: log lines (cut to fit) + a question."""
    rng = random.Random(seed)
    out, clock = [], 0
    for turn in range(1, turns + 1):
        question = QUESTION.format(turn=turn)
        budget = tokens - len(tokenizer(question).input_ids)
        if budget < 1:
            raise ValueError(f"--tokens-per-turn {tokens} leaves no room for the log chunk")
        lines, used = [], 0
        while used < budget:
            clock += rng.randint(1, 9)
            lines.append(
                f"2026-11-30T{clock // 3600 % 24:02d}:{clock // 60 % 60:02d}:{clock % 60:02d} "
                f"{rng.choice(('INFO', 'INFO', 'WARN', 'DEBUG'))} {rng.choice(SERVICES)}"
                f"[{rng.randint(100, 999)}] req={rng.randint(10000, 99999)} "
                f"{rng.choice(('GET', 'POST'))} {rng.choice(ROUTES)} "
                f"status={rng.choice((200, 200, 201, 404, 500))} {rng.randint(2, 900)}ms"
            )
            used += len(tokenizer(lines[-1] + "\n").input_ids)
        ids = tokenizer("\n".join(lines)).input_ids[:budget]
        out.append(tokenizer.decode(ids) + question)
    return out


def timed(stream_of) -> tuple[dict, BaseMessage | None, float]:
    """Run `stream_of()` (a `.stream()` call) to its end: seconds to its first chunk with text
    (to the end if none has text; wall and this process's CPU seconds, which other processes on
    the machine inflate less) and to the end, the reply, the chunk carrying usage, the
    perf_counter it started at."""
    started, cpu = time.perf_counter(), time.process_time()
    first, first_cpu, text, usage = None, None, [], None
    for chunk in stream_of():
        if chunk.content and first is None:
            first, first_cpu = time.perf_counter() - started, time.process_time() - cpu
        text.append(chunk.content)
        if chunk.usage_metadata:
            usage = chunk
    end, end_cpu = time.perf_counter() - started, time.process_time() - cpu
    row = {
        "ttft_s": end if first is None else first, "reply_s": end, "reply": "".join(text),
        "ttft_cpu_s": end_cpu if first is None else first_cpu,  # every thread of the process
    }  # fmt: skip
    return row, usage, started


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_agentmem(args, users: list[str], measured: set[int]) -> tuple[list[dict], dict]:
    """Every turn through one ChatAgentMem session; the histories sent at the measured turns."""
    llm = ChatAgentMem(
        model=args.model, memory=MEMORY, session_id="ttft", max_tokens=args.max_tokens
    )
    list(llm.stream([SystemMessage(SYSTEM), HumanMessage("Say ok.")], session_id="warm-up"))
    llm.forget_session("warm-up")
    history: list[BaseMessage] = [SystemMessage(SYSTEM)]
    rows, sent = [], {}
    for turn, user in enumerate(users, 1):
        history.append(HumanMessage(user))
        if turn in measured:
            sent[turn] = list(history)
        row, last, _ = timed(lambda: llm.stream(history))
        usage, meta = last.usage_metadata, last.response_metadata
        row.update(
            turn=turn, input_tokens=usage["input_tokens"],
            cache_read=usage["input_token_details"]["cache_read"],
            prefilled_tokens=meta["prefilled_tokens"], forked=meta["forked"],
        )  # fmt: skip
        rows.append(row)
        history.append(AIMessage(row["reply"]))
        print(f"agentmem turn {turn:>3}: ttft {row['ttft_s']:.3f} s ({row['ttft_cpu_s']:.2f} "
              f"CPU s), {row['input_tokens']:>6} tokens, {row['cache_read']:>6} from memory, "
              f"{row['prefilled_tokens']:>4} prefilled; {row['reply']!r}",
              flush=True)  # fmt: skip
    return rows, sent


class FirstToken(LogitsProcessor):
    """Notes when generation first scores a token (the prompt's prefill is done) and how many
    prompt tokens it prefilled: the streamer below holds text back until a word ends."""

    def __init__(self) -> None:
        self.at, self.prompt_tokens = None, None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor):
        if self.at is None:  # input_ids: [1, prompt + generated]
            self.at, self.prompt_tokens = time.perf_counter(), input_ids.shape[1]
        return scores


@contextlib.contextmanager
def patient_streamer(wait_s: float):
    """HuggingFacePipeline streams through a TextIteratorStreamer that gives up after 60 s without
    a token, which a long prompt's prefill on a CPU exceeds (queue.Empty): it waits `wait_s`. The
    class is patched, not the name `transformers.TextIteratorStreamer`: loading a model can
    replace the `transformers` module object that `from transformers import ...` reads."""
    init = TextIteratorStreamer.__init__

    def patient(self, *args, **kwargs) -> None:
        init(self, *args, **{**kwargs, "timeout": wait_s})

    TextIteratorStreamer.__init__ = patient
    try:
        yield
    finally:
        TextIteratorStreamer.__init__ = init


def run_huggingface(args, sent: dict, agentmem_rows: list[dict], rows: list[dict], done) -> None:
    """ChatHuggingFace on the same converted weights (float32, as agentmem computes on a CPU),
    each measured turn appended to `rows` and `done()` called after it."""
    path = agentmem.models.model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # Given the model object, a tokenizer and a model_id, nothing resolves a name on the hub.
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    chat = ChatHuggingFace(
        llm=HuggingFacePipeline(pipeline=pipe, model_id=str(path)), tokenizer=tokenizer,
        model_id=str(path),
    )  # fmt: skip
    positions = model.config.max_position_embeddings

    def stream(messages, stamp):
        kwargs = {"max_new_tokens": args.max_tokens, "do_sample": False,
                  "logits_processor": [stamp]}  # fmt: skip
        return chat.stream(messages, pipeline_kwargs=kwargs)

    with patient_streamer(args.hf_wait), torch.inference_mode():
        timed(lambda: stream([SystemMessage(SYSTEM), HumanMessage("Say ok.")], FirstToken()))
        for turn, messages in sorted(sent.items()):
            ours = agentmem_rows[turn - 1]
            if ours["input_tokens"] + args.max_tokens > positions:
                rows.append({"turn": turn, "skipped": f"{ours['input_tokens']} prompt tokens + "
                             f"{args.max_tokens} exceed {positions} positions"})  # fmt: skip
                done()
                continue
            stamp = FirstToken()
            try:
                row, _, started = timed(lambda m=messages, s=stamp: stream(m, s))
            except queue.Empty:  # the pipeline's thread failed (its traceback is on stderr)
                rows.append({"turn": turn, "failed": f"no token within {args.hf_wait} s",
                             "peak_rss_gib": peak_rss_gib()})  # fmt: skip
                done()
                continue
            row.update(
                turn=turn, first_token_s=stamp.at - started, prefilled_tokens=stamp.prompt_tokens,
                cache_read=0, same_reply=row["reply"] == ours["reply"], peak_rss_gib=peak_rss_gib(),
            )  # fmt: skip
            rows.append(row)
            done()
            print(f"huggingface turn {turn:>3}: ttft {row['ttft_s']:.3f} s "
                  f"({row['ttft_cpu_s']:.2f} CPU s; first token {row['first_token_s']:.3f} s), "
                  f"{row['prefilled_tokens']:>6} prefilled; {row['reply']!r}",
                  flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--turns", type=int, default=50)
    parser.add_argument(
        "--tokens-per-turn",
        type=int,
        default=620,
        help="tokens of each user message (its template and the reply add ~18)",
    )
    parser.add_argument("--max-tokens", type=int, default=8, help="most tokens of a reply")
    parser.add_argument(
        "--measure",
        default="1,10,50",
        help="turns to time ChatHuggingFace on (the last turn always)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/langchain_ttft_cpu.json")
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--hf-wait",
        type=float,
        default=7200.0,
        help="seconds ChatHuggingFace's stream waits for a token (its own: 60)",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.turns < 1:
        parser.error("--turns must be >= 1")
    measured = {t for t in map(int, args.measure.split(",")) if 1 <= t <= args.turns}
    measured.add(args.turns)
    load_before, started = os.getloadavg(), time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(agentmem.models.model_dir(args.model))
    users = user_turns(tokenizer, args.turns, args.tokens_per_turn)
    ours, sent = run_agentmem(args, users, measured)
    agentmem_rss, theirs = peak_rss_gib(), []

    def write() -> dict:  # after each phase and measured turn: a failure later keeps these
        timed_ = [r for r in theirs if "ttft_s" in r]
        summary = {
            "agentmem_ttft_s": {t: ours[t - 1]["ttft_s"] for t in sorted(sent)},
            "huggingface_ttft_s": {r["turn"]: r["ttft_s"] for r in timed_},
            "agentmem_last_over_first": ours[-1]["ttft_s"] / ours[0]["ttft_s"],
            "agentmem_max_prefilled_after_turn_1": max(
                (r["prefilled_tokens"] for r in ours[1:]), default=None
            ),
            "agentmem_forked_turns": [r["turn"] for r in ours if r["forked"]],
        }
        if len(timed_) > 1:
            summary["huggingface_last_over_first"] = timed_[-1]["ttft_s"] / timed_[0]["ttft_s"]
        result = {
            "model": args.model, "turns": args.turns, "tokens_per_turn": args.tokens_per_turn,
            "max_tokens": args.max_tokens, "memory": MEMORY.model_dump(),
            "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "wall_s": time.perf_counter() - started, "agentmem_peak_rss_gib": agentmem_rss,
            "summary": summary, "agentmem": ours, "huggingface": theirs,
        }  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        return summary

    write()
    run_huggingface(args, sent, ours, theirs, write)
    print(json.dumps(write(), indent=1))


if __name__ == "__main__":
    main()
