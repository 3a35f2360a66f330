"""benchmarks/ruler: prompts of the asked token length with needles at their depths, filler that
never repeats a sentence, seeded prompts, the scorers, and the runner end to end on a tiny model
(rows written as they finish, resumed, stopped by a time budget)."""

from __future__ import annotations

import functools
import json
import re

import pytest

import benchmarks.ruler.report as report
import benchmarks.ruler.runner as runner
from agentmem.session import LanguageModel
from benchmarks.ruler.prompts import Prompt, TokenCounter, build, render
from benchmarks.ruler.tasks import TASKS, Context, score
from tests.helpers import bpe_tokenizer, char_tokenizer
from tests.helpers import build as build_model

# A ChatML template (Qwen's layout, without its default system prompt), rendered by jinja.
CHATML = (
    "{% for m in messages %}{% if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n"
    "{{ m.content }}\n</tool_response><|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n"
    "{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY = "n_init=8,unit_size=16,n_local=64,exec_chunk=32,topk=2"


def chatml_tokenizer():
    tokenizer = char_tokenizer()
    tokenizer.chat_template = CHATML
    return tokenizer


# One of each, with its counter: a counter calibrates its rates once.
TOKENIZERS = {
    "bpe": functools.cache(bpe_tokenizer),
    "chatml": functools.cache(chatml_tokenizer),
    "char": functools.cache(char_tokenizer),
}
COUNTERS: dict[int, TokenCounter] = {}


def make(task: str, tokenizer, length: int, depth: float | None = 0.5, index: int = 0, seed=0):
    counter = COUNTERS.setdefault(id(tokenizer), TokenCounter(tokenizer))
    depth = depth if TASKS[task].uses_depth else None
    ctx = Context(seed, task, length, index, depth, counter)
    return build(TASKS[task].layouts(ctx), tokenizer, counter, task=task, length=length,
                 index=index, depth=depth)  # fmt: skip


def stream(tokenizer, prompt: Prompt) -> list[int]:
    """The prompt's tokens as Session.append makes them: one tokenization per segment."""
    ids = []
    for i, (_, text) in enumerate(prompt.segments):
        ids += tokenizer(text, add_special_tokens=i == 0).input_ids
    return ids


@pytest.mark.parametrize("kind", ["bpe", "chatml"])
@pytest.mark.parametrize("task", sorted(TASKS))
def test_a_prompt_has_the_asked_length_and_its_needles_where_it_says(task, kind):
    tokenizer = TOKENIZERS[kind]()
    length = 6000 if task == "niah_multiturn" else 2500
    prompt = make(task, tokenizer, length)
    ids = stream(tokenizer, prompt)
    assert len(ids) == prompt.tokens  # the pieces' counts add up to the text's
    # never more than asked, and short of it by less than a sentence or a line (~100 chars)
    assert length - 120 <= prompt.tokens <= length
    for needle, (start, end) in zip(prompt.needles, prompt.spans, strict=True):
        alone = tokenizer.decode(tokenizer(needle.text, add_special_tokens=False).input_ids)
        assert tokenizer.decode(ids[start:end]).strip() == alone.strip()  # the needle, no more


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_the_needle_sits_at_the_asked_depth(depth):
    prompt = make("niah_single", TOKENIZERS["char"](), 16000, depth)
    assert abs(prompt.depths[0] - depth) < 0.03
    first = make("niah_multikey", TOKENIZERS["char"](), 16000, depth)
    assert abs(first.depths[0] - depth) < 0.03 and first.needles[0].asked
    assert not any(n.asked for n in first.needles[1:])


def test_a_long_prompt_is_cut_evenly_and_keeps_its_depths():
    tokenizer = TOKENIZERS["bpe"]()
    prompt = make("niah_multiquery", tokenizer, 60000, 0.9)
    assert 60000 - 100 <= prompt.tokens <= 60000  # short by less than a sentence
    assert abs(prompt.depths[0] - 0.9) < 0.02


def sentences(prompt: Prompt) -> list[str]:
    text = "\n".join(t for _, t in prompt.segments)
    parts = re.split(r"(?<=[.!?])\s+|\n", text)
    return [p.strip() for p in parts if len(p.strip()) > 12]


@pytest.mark.parametrize("task", sorted(set(TASKS) - {"cwe"}))
def test_filler_repeats_no_sentence_or_line(task):
    prompt = make(task, TOKENIZERS["bpe"](), 20000)
    seen = sentences(prompt)
    assert len(seen) > 300
    assert len(seen) == len(set(seen))


def test_common_words_are_the_most_frequent_and_the_others_rare():
    prompt = make("cwe", TOKENIZERS["char"](), 6000)
    words = prompt.segments[0][1].split("\n\n", 2)[1].split("\n")[:-1]  # the list's lines
    counts = {w: words.count(w) for w in set(words)}
    assert sorted(counts, key=counts.get)[-10:] != [] and len(prompt.expected) == 10
    assert min(counts[w] for w in prompt.expected) > max(
        n for w, n in counts.items() if w not in prompt.expected
    )
    assert max(n for w, n in counts.items() if w not in prompt.expected) <= 3


def test_multi_turn_needles_arrive_in_different_appends_among_tool_output():
    tokenizer = TOKENIZERS["chatml"]()
    prompt = make("niah_multiturn", tokenizer, 8000, 0.5)
    starts, at = [], 0
    for i, (_, text) in enumerate(prompt.segments):
        starts.append(at)
        at += len(tokenizer(text, add_special_tokens=i == 0).input_ids)
    holders = [max(i for i, s in enumerate(starts) if s <= start) for start, _ in prompt.spans]
    assert len(set(holders)) == len(prompt.needles) == 4
    assert all(prompt.segments[h][0] == "tool" for h in holders)
    assert [r for r, _ in prompt.segments[:3]] == ["user", "assistant", "tool"]
    assert prompt.segments[-1][0] == "user"
    assert prompt.segments[-1][1].endswith(f"<|im_start|>assistant\nThe special magic number for "
                                           f"{prompt.needles[0].key} is")  # fmt: skip


def test_segments_are_the_chat_template_rendering_of_the_conversation():
    tokenizer = chatml_tokenizer()
    counter = TokenCounter(tokenizer)
    ctx = Context(0, "niah_multiturn", 8000, 0, 0.5, counter)
    layout = TASKS["niah_multiturn"].layouts(ctx)(4000, 4000)
    joined = "".join(p.text for _, pieces in render(tokenizer, layout) for p in pieces)
    convo = [{"role": m.role, "content": "".join(p.text for p in m.pieces)}
             for m in layout.messages]  # fmt: skip
    whole = tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
    assert joined == whole + layout.answer_prefix


def test_prompts_are_seeded():
    tokenizer = TOKENIZERS["bpe"]()
    for task in TASKS:
        length = 5000 if task == "niah_multiturn" else 2000
        a, b = make(task, tokenizer, length), make(task, tokenizer, length)
        assert a.segments == b.segments and a.sha == b.sha and a.expected == b.expected
        assert make(task, tokenizer, length, index=1).sha != a.sha
        assert make(task, tokenizer, length, seed=1).sha != a.sha


def prompt_for(task: str) -> Prompt:
    length = 6000 if task == "niah_multiturn" else 2500
    return make(task, TOKENIZERS["char"](), length)


def test_the_number_tasks_score_by_recall_of_every_value():
    single = prompt_for("niah_single")
    value = single.expected[0]
    assert score(TASKS["niah_single"], f" {value}.", single) == (1.0, None)
    assert score(TASKS["niah_single"], f" **{value}**", single) == (1.0, None)
    assert score(TASKS["niah_single"], f" {value}1.", single)[0] == 0  # whole numbers only
    assert score(TASKS["niah_single"], " none", single) == (0.0, "none")
    assert score(TASKS["niah_single"], f" {value[::-1]}", single) == (0.0, "reordered")
    assert score(TASKS["niah_single"], f" {value[:-2]}", single) == (0.0, "near")
    assert score(TASKS["niah_single"], " 12", single) == (0.0, "other")
    multikey = prompt_for("niah_multikey")
    other = multikey.needles[1].value
    assert score(TASKS["niah_multikey"], f" {other}.", multikey) == (0.0, "other_needle")
    for task in ("niah_multivalue", "niah_multiquery"):
        prompt = prompt_for(task)
        values = prompt.expected
        assert len(values) == 4 and len(set(values)) == 4
        assert score(TASKS[task], ", ".join(values), prompt) == (1.0, None)
        assert score(TASKS[task], f"{values[2]} and {values[0]}", prompt) == (0.5, None)


def test_the_word_tasks_score_by_recall_of_every_word():
    vt = prompt_for("vt")
    names = vt.expected
    assert len(names) == 5 and all(n.isupper() for n in names)
    assert score(TASKS["vt"], " " + ", ".join(names), vt) == (1.0, None)
    assert score(TASKS["vt"], f" {names[0]}, {names[1].lower()}", vt) == (0.4, None)
    distractors = [n.key for n in vt.needles if not n.asked]
    assert score(TASKS["vt"], " " + " ".join(distractors), vt) == (0.0, None)
    cwe = prompt_for("cwe")
    top = cwe.expected
    assert score(TASKS["cwe"], " " + ", ".join(top), cwe) == (1.0, None)
    assert score(TASKS["cwe"], " " + ", ".join(top[:7]) + ", foo", cwe) == (0.7, None)


def test_cli_arguments_parse():
    assert runner._lengths("8192,32K,1M") == [8192, 32768, 2**20]
    args = runner.parser().parse_args(["--position", "infllm,stacked+topk=32", "--set", TINY,
                                       "--preset", "default"])  # fmt: skip
    configs = runner.policies(args)
    assert list(configs) == ["infllm", "stacked+topk=32"]
    assert configs["stacked+topk=32"].topk == 32 and configs["stacked+topk=32"].unit_size == 16
    assert configs["infllm"].position == "infllm" and configs["infllm"].topk == 2
    with pytest.raises(SystemExit):
        runner.policies(runner.parser().parse_args(["--position", "nope"]))


def test_first_leaves_a_cells_earlier_prompts_to_another_process():
    argv = ["--tasks", "niah_single", "--lengths", "900", "--prompts", "5", "--first", "3"]
    args = runner.parser().parse_args([*argv, "--full-max", "0"])
    plan = runner._plan(args, [TASKS["niah_single"]], runner.policies(args), [])
    assert [(length, index) for _, length, index, _, _ in plan] == [(900, 3), (900, 4)]


def test_a_run_records_a_digest_of_its_sources_that_any_change_alters(tmp_path):
    for folder in runner.SOURCE_FOLDERS:
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "a.py").write_text("x = 1\n")
    before = runner.source_digest(tmp_path)
    assert before == runner.source_digest(tmp_path) and len(before) == 12
    (tmp_path / "benchmarks" / "a.py").write_text("x = 2\n")
    assert runner.source_digest(tmp_path) != before
    assert len(runner.source_digest()) == 12  # this checkout's


def test_the_report_tables_the_rows_of_several_runs(tmp_path, capsys):
    row = {"task": "niah_single", "length": 131072, "policy": "infllm", "coverage": 1.0}
    for i, correct in enumerate((True, False)):
        (tmp_path / f"{i}.json").write_text(json.dumps(
            {"meta": {}, "rows": [{**row, "index": i, "correct": correct, "score": float(correct)}]}
        ))  # fmt: skip
    assert report.main([str(tmp_path / "0.json"), str(tmp_path / "1.json")]) == 0
    assert "1/2 (0.50) 1/0/0" in capsys.readouterr().out


def test_the_report_gives_the_ranks_the_asked_needles_were_retrieved_at():
    def needle(asked, units):
        return {"asked": asked, "units": units}

    # layers 3 and 5 retrieved the asked needle's two units at ranks (4, 1) and (2, None); the
    # other needle's ranks and a row from before ranks were recorded count for nothing
    miss = {"task": "niah_multikey", "length": 524288, "policy": "infllm", "coverage": 0.5,
            "correct": False, "score": 0.0, "needles": [
                needle(True, [[0, 64, [3, 5], [4, 2]], [64, 128, [3, 5], [1, None]]]),
                needle(False, [[500, 564, [3], [0]]])]}  # fmt: skip
    old = {**miss, "needles": [needle(True, [[0, 64, [3]]])]}
    assert report.asked_ranks(miss) == [1, 2] and report.asked_ranks(old) == []
    hit = {**miss, "correct": True, "needles": [needle(True, [[0, 64, [3], [0]]])]}
    (cell,) = report.summarize([miss, hit, old])
    assert cell["rank_misses"] == 1.5 and cell["rank_hits"] == 0
    assert "r1.5" in report.format_table([cell])


def test_the_runner_writes_rows_as_it_goes_and_resumes(tmp_path, monkeypatch):
    lm = LanguageModel(build_model("qwen2"), chatml_tokenizer())
    out = tmp_path / "ruler.json"
    argv = ["--tasks", "niah_multikey", "--lengths", "900", "--prompts", "1",
            "--depths", "0.3,0.7", "--preset", "default", "--position", "infllm",
            "--set", "n_init=8,unit_size=16,n_local=128,exec_chunk=112,topk=2",
            "--full-max", "900", "--max-new", "4", "--out", str(out),
            "--plots", str(tmp_path / "plots")]  # fmt: skip
    assert runner.main(argv, lm=lm) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [r["policy"] for r in rows] == ["infllm", "full"]
    assert data["meta"]["runs"][0]["source"] == runner.source_digest()
    assert len({r["prompt_sha"] for r in rows}) == 1  # the same prompt for every policy
    for row in rows:
        assert row["tokens"] == row["tokens_predicted"] <= 900 and row["depth"] == 0.3
        assert {"answer", "expected", "score", "correct", "miss", "prefill_s"} <= set(row)
    for row in rows[:1]:
        assert row["spans_ok"] and len(row["needles"]) == 4 and 0 <= row["coverage"] <= 1
        for needle in row["needles"]:
            assert {"span", "depth", "where", "layers", "units"} <= set(needle)
            assert set(needle["layers"]) <= set(data["meta"]["memory_layers"])
            for _, _, layers, ranks in needle["units"]:  # each retrieved unit's rank per layer
                assert len(ranks) == len(layers)
                assert all(rank is None or 0 <= rank < 2 for rank in ranks)  # topk=2
    assert "niah_multikey" in out.with_suffix(".txt").read_text()
    assert (tmp_path / "plots" / "niah_multikey.png").is_file()

    with pytest.raises(SystemExit):  # an existing file is kept unless resumed
        runner.main(argv, lm=lm)
    calls = []
    real = runner.run_prompt
    monkeypatch.setattr(runner, "run_prompt", lambda *a: calls.append(a) or real(*a))
    assert runner.main([*argv, "--resume"], lm=lm) == 0
    assert calls == [] and json.loads(out.read_text())["rows"] == rows
    # More prompts: only the new one runs. An exhausted time budget stops cleanly, rows kept.
    assert runner.main([*argv, "--resume", "--prompts", "2"], lm=lm) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(calls) == 2 and len(rows) == 4 and {r["index"] for r in rows[2:]} == {1}
    assert rows[2]["depth"] == 0.7
    assert runner.main([*argv, "--resume", "--prompts", "3", "--time-budget", "1e-6"], lm=lm) == 0
    assert len(calls) == 2 and json.loads(out.read_text())["rows"] == rows
    assert len(json.loads(out.read_text())["meta"]["runs"]) == 2  # each run that wrote rows


def test_the_warm_up_gives_the_time_budget_an_estimate_for_every_policy():
    """A policy's first long prompt is predicted from its warm-up (before, it started whatever
    the budget left, and a 512K prompt ran past a device call's limit)."""
    lm = LanguageModel(build_model("qwen2"), chatml_tokenizer())
    args = runner.parser().parse_args(
        ["--position", "infllm,stacked", "--set", "n_init=8,unit_size=16,n_local=128,"
         "exec_chunk=112,topk=2", "--full-max", "900", "--max-new", "2"]
    )  # fmt: skip
    clock = runner._Clock()
    assert clock.estimate("infllm", 1 << 19) == 0  # nothing known: no estimate
    runner._warm_up(lm, TokenCounter(lm.tokenizer), runner.policies(args), args, clock, 600)
    for policy in ("infllm", "stacked", "full"):
        assert clock.estimate(policy, 1 << 19) > 0
    # Full attention's cost per token grows with the length, agentmem's does not.
    ratio = clock.estimate("full", 1 << 19) / clock.estimate("full", 600)
    assert ratio == pytest.approx(((1 << 19) / 600) ** 2)
    assert clock.estimate("infllm", 1 << 19) / clock.estimate("infllm", 600) == pytest.approx(
        (1 << 19) / 600
    )


def test_the_warm_up_times_a_second_run_not_the_one_that_compiles(monkeypatch):
    args = runner.parser().parse_args(["--position", "infllm", "--full-max", "0"])
    seconds = iter([50.0, 1.0])  # the first run compiles the kernels
    monkeypatch.setattr(runner, "run_prompt",
                        lambda *a: {"prefill_s": next(seconds), "decode_s": 0.0})  # fmt: skip
    clock = runner._Clock()
    lm = LanguageModel(build_model("qwen2"), chatml_tokenizer())
    runner._warm_up(lm, TokenCounter(lm.tokenizer), runner.policies(args), args, clock, 600)
    assert clock.estimate("infllm", 6000) == pytest.approx(10.0)


@pytest.mark.slow
def test_qwen_prompts_have_the_asked_length_through_its_chat_template():
    from transformers import AutoTokenizer

    from agentmem import models

    tokenizer = AutoTokenizer.from_pretrained(models.model_dir("qwen2.5-coder-0.5b-instruct"))
    for task in TASKS:
        prompt = make(task, tokenizer, 32768, 0.5)
        ids = stream(tokenizer, prompt)
        assert len(ids) == prompt.tokens and 32768 - 64 <= prompt.tokens <= 32768
        assert prompt.segments[0][1].startswith("<|im_start|>system\n")
        # the generation prompt, then the answer's first words
        assert prompt.segments[-1][1].split("<|im_end|>\n<|im_start|>assistant\n")[1][:4] == "The "
        for needle, (start, end) in zip(prompt.needles, prompt.spans, strict=True):
            assert tokenizer.decode(ids[start:end]).strip() == needle.text
        if TASKS[task].uses_depth:
            assert abs(prompt.depths[0] - 0.5) < 0.01
