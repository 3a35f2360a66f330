"""Passkey prompts, answers and the `agentmem passkey` command on a tiny local model."""

from __future__ import annotations

import json

import pytest

from agentmem.cli import main
from agentmem.passkey import (
    PasskeyPrompt,
    Row,
    build_prompt,
    depths,
    draw_keys,
    format_table,
    parse_answer,
    summarize,
)
from tests.helpers import build


def test_prompt_has_the_needle_where_asked(tokenizer):
    prompt = build_prompt(tokenizer, 1200, 0.25, "48213")
    assert isinstance(prompt, PasskeyPrompt)
    assert 1100 < len(prompt.ids) <= 1200
    start, end = prompt.needle
    assert tokenizer.decode(prompt.ids[start:end]) == "The pass key is 48213"
    assert 0.2 < start / len(prompt.ids) < 0.3
    text = tokenizer.decode(prompt.ids, skip_special_tokens=True)
    assert text.endswith("What is the pass key? The pass key is")
    assert text.count("48213") == 2


def test_prompt_errors():
    with pytest.raises(ValueError, match="depth"):
        build_prompt(None, 100, 1.5, "1")


def test_depths_keys_and_answers():
    assert depths(5) == [0.1, 0.3, 0.5, 0.7, 0.9]
    keys = draw_keys(6, seed=3)
    assert len(set(keys)) == 6 and all(len(k) == 5 for k in keys)
    assert keys == draw_keys(6, seed=3)
    assert parse_answer(" 48213. Remember") == "48213"
    assert parse_answer(" the pass key.") == ""


def test_summary_counts_per_method_and_length():
    rows = [
        Row("agentmem", 8192, 0.1, "1", "1", True, True, 3, 8190, 2.0, 100, 2048),
        Row("agentmem", 8192, 0.5, "2", "x", False, True, 2, 8190, 2.0, 300, 2048),
        Row("full", 8192, 0.1, "1", "1", True, True, 0, 8190, 4.0, 900, 8190),
    ]
    table = summarize(rows)
    assert [(e["method"], e["correct"], e["total"]) for e in table] == [
        ("agentmem", 1, 2),
        ("full", 1, 1),
    ]
    assert table[0]["tok_s"] == pytest.approx(8190 * 2 / 4.0)
    text = format_table(table)
    assert "agentmem" in text and "1/2" in text


def test_passkey_command_on_a_local_model(tmp_path, tokenizer, capsys):
    model_dir = tmp_path / "tiny"
    build("gemma3").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "rows.json"
    code = main(
        [
            "passkey", "--model", str(model_dir), "--lengths", "700,900", "--depths", "0.2,0.8",
            "--trials", "2", "--json", str(out), "--n-init", "4", "--n-local", "128",
            "--unit-size", "16", "--topk", "2", "--exec-chunk", "64", "--max-new-tokens", "3",
        ]
    )  # fmt: skip
    assert code == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 2 * 2 * 2 * 4
    expected = {
        "method", "length", "depth", "key", "answer", "correct", "needle_recalled", "tokens",
        "prefill_s", "peak_bytes",
    }  # fmt: skip
    assert expected <= set(rows[0])
    assert {r["method"] for r in rows} == {"agentmem", "streaming", "truncate", "full"}
    by_method = {r["method"]: r for r in rows if r["length"] == 900 and r["depth"] == 0.2}
    assert by_method["full"]["needle_recalled"] is True
    assert by_method["agentmem"]["attended_keys"] <= 4 + 2 * 16 + 128
    assert by_method["streaming"]["attended_keys"] <= 4 + 2 * 16 + 128
    assert by_method["truncate"]["tokens"] == by_method["full"]["tokens"]
    table = capsys.readouterr().out
    assert "prefill tok/s" in table and "agentmem" in table


def test_passkey_command_rejects_impossible_configs(capsys):
    with pytest.raises(SystemExit):
        main(["passkey", "--n-local", "100"])
    assert "lower exec_chunk" in capsys.readouterr().err
