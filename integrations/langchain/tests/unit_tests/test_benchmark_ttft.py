"""benchmarks/langchain_ttft.py end to end on the tiny model: ChatAgentMem prefills only what a
turn adds, ChatHuggingFace (same weights) the whole history, and the JSON says so."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import langchain_huggingface  # noqa: F401  (agentmem's dev extra: the benchmark's baseline)

TOKENS = 160  # per user turn (the tiny tokenizer spends ~70 on the question)
SCRIPT = Path(__file__).resolve().parents[4] / "benchmarks" / "langchain_ttft.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("langchain_ttft", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_resent_history_is_prefilled_once(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "ttft.json"
    monkeypatch.setattr(sys, "argv", [
        "langchain_ttft", "--model", tiny_model_dir, "--turns", "3",
        "--tokens-per-turn", str(TOKENS), "--max-tokens", "4", "--measure", "1", "--out", str(out),
    ])  # fmt: skip
    _benchmark().main()
    result = json.loads(out.read_text())
    ours, theirs = result["agentmem"], result["huggingface"]
    assert [r["turn"] for r in ours] == [1, 2, 3] and [r["turn"] for r in theirs] == [1, 3]
    assert ours[0]["prefilled_tokens"] == ours[0]["input_tokens"]
    for row in ours[1:]:
        assert row["cache_read"] + row["prefilled_tokens"] == row["input_tokens"]
        assert row["prefilled_tokens"] < TOKENS + 20 < row["cache_read"]  # this turn's tokens only
    assert not result["summary"]["agentmem_forked_turns"]
    for row in theirs:  # the pipeline prefills all of it, every call
        assert abs(row["prefilled_tokens"] - ours[row["turn"] - 1]["input_tokens"]) <= 2
        assert row["cache_read"] == 0
