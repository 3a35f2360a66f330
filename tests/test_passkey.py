"""Passkey prompts, answers and the `agentmem passkey` command on a tiny local model."""

from __future__ import annotations

import json

import pytest
import torch

from agentmem.cli import main
from agentmem.config import MemoryConfig
from agentmem.memory.layer import MemoryLayer
from agentmem.passkey import (
    PasskeyPrompt,
    Row,
    build_prompt,
    depths,
    draw_keys,
    format_table,
    parse_answer,
    run_prompt,
    summarize,
)
from agentmem.session import LanguageModel
from tests.helpers import build

SMALL = MemoryConfig(n_init=4, unit_size=16, topk=3, n_local=128, exec_chunk=64)


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


def _retrieving(monkeypatch, units):
    """Every step that can retrieve `units` (unit ids) gets them, padded with units 0, 1, ..."""
    real = MemoryLayer._retrieve

    def retrieve(self, q, scale, n_units=None):
        ids = real(self, q, scale, n_units)
        if self.units.n_units > max(units):
            padding = [i for i in range(ids.shape[-1]) if i not in units]
            chosen = sorted([*units, *padding][: ids.shape[-1]])
            ids = torch.tensor(chosen, device=ids.device).expand_as(ids)
        return ids

    monkeypatch.setattr(MemoryLayer, "_retrieve", retrieve)


def test_needle_recalled_says_whether_retrieval_brought_the_whole_needle_back(
    tokenizer, monkeypatch
):
    lm = LanguageModel(build("gemma3"), tokenizer, SMALL)
    prompt = build_prompt(tokenizer, 700, 0.5, "48213")
    start, end = prompt.needle
    assert end <= len(prompt.ids) - SMALL.n_local  # far behind the local window: units only
    unit = SMALL.unit_size
    first, last = (start - SMALL.n_init) // unit, (end - 1 - SMALL.n_init) // unit
    needle_units = list(range(first, last + 1))
    assert 2 <= len(needle_units) <= SMALL.topk
    cases = [(needle_units, True), (needle_units[:1], False), ([0, 1, 2], False)]
    for units, recalled in cases:
        with monkeypatch.context() as patch:
            _retrieving(patch, units)
            row = run_prompt(lm, "agentmem", prompt, SMALL, max_new_tokens=1)
        assert row.needle_recalled is recalled, units
        assert row.needle_layers == int(recalled)  # gemma3's one global layer


def test_full_reports_the_needle_recalled_by_design_and_truncate_measures_it(tokenizer):
    """`full` attends every token: its needle_recalled is True by construction, and no layer was
    inspected (needle_layers 0). `truncate` says whether the needle survived the cut."""
    lm = LanguageModel(build("gemma3"), tokenizer, SMALL)
    middle, last = (build_prompt(tokenizer, 700, depth, "48213") for depth in (0.5, 1.0))
    full = run_prompt(lm, "full", middle, SMALL, max_new_tokens=1)
    assert (full.needle_recalled, full.needle_layers) == (True, 0)
    assert full.attended_keys == len(middle.ids)
    for prompt, kept in ((middle, False), (last, True)):
        row = run_prompt(lm, "truncate", prompt, SMALL, max_new_tokens=1)
        assert (row.needle_recalled, row.needle_layers) == (kept, 0)
        assert row.attended_keys == SMALL.window < len(prompt.ids)


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
    for row in rows:  # full's recall is by design (see above); the memory methods measure it
        if row["method"] == "full":
            assert (row["needle_recalled"], row["needle_layers"]) == (True, 0)
        elif row["method"] != "truncate":
            assert row["needle_recalled"] == (row["needle_layers"] > 0)
    assert by_method["agentmem"]["attended_keys"] <= 4 + 2 * 16 + 128
    assert by_method["streaming"]["attended_keys"] <= 4 + 2 * 16 + 128
    assert by_method["truncate"]["tokens"] == by_method["full"]["tokens"]
    table = capsys.readouterr().out
    assert "prefill tok/s" in table and "agentmem" in table


def test_passkey_command_rejects_impossible_configs(capsys):
    with pytest.raises(SystemExit):
        main(["passkey", "--n-local", "100"])
    assert "lower exec_chunk" in capsys.readouterr().err
