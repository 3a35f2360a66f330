"""PeakMemory sees memory a block allocates and frees before it ends."""

from __future__ import annotations

import time

import torch

from agentmem.profiling import PeakMemory


def test_peak_counts_a_transient_allocation():
    with PeakMemory(torch.device("cpu"), interval_s=0.001) as peak:
        block = torch.ones(64, 1024, 1024)  # 256 MiB, touched
        time.sleep(0.05)
        del block
    assert peak.bytes >= 200 * 2**20


def test_an_idle_block_adds_little():
    with PeakMemory(torch.device("cpu")) as peak:
        time.sleep(0.02)
    assert peak.bytes < 50 * 2**20
