"""The integration's examples run as written, on the real qwen2.5-coder-0.5b-instruct (slow), and
do what their docstrings say."""

from __future__ import annotations

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_an_agent_answers_from_a_tool_output_16_times_its_window(capsys):
    found = runpy.run_path(str(EXAMPLES / "long_tool_output.py"), run_name="example")["main"]()
    assert found["log_tokens"] >= 32_000
    assert [c["name"] for c in found["call"].tool_calls] == ["read_maintenance_log"]
    reply, call = found["reply"], found["call"]
    (said,) = reply.tool_calls  # the answer tool, forced; its arguments held to its schema
    assert said["name"] == "answer"
    # The call's turn is not prefilled again: only the log (and what follows it) is.
    read = reply.usage_metadata["input_token_details"]["cache_read"]
    assert read == call.usage_metadata["input_tokens"] + call.usage_metadata["output_tokens"]
    assert "recalled the pump" in capsys.readouterr().out
    assert said["args"]["serial_number"].strip(" .") == "PX-4471", said  # recalled, not guessed


def test_day_two_recalls_day_one_in_a_new_process(tmp_path):
    script = str(EXAMPLES / "day1_day2.py")
    for day in ("1", "2"):
        done = subprocess.run(
            [sys.executable, script, "--day", day, "--home", str(tmp_path)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    out = done.stdout
    assert "7316" in out.split("answer:")[1].splitlines()[0], out
    prefilled = int(re.search(r"(\d+) prefilled", out).group(1))
    read = int(re.search(r"([\d,]+) from the stored memory", out).group(1).replace(",", ""))
    assert read > 5000 and prefilled < 40, out
