"""Tiles that do not fit the device step down (`agentmem_kernels.fit`): on a stand-in device with
little shared memory both window kernels still give the reference's result, say so once, and go
straight to the fitting tiles the next time."""

from __future__ import annotations

import pytest
import torch
from triton.runtime.errors import OutOfResources

from agentmem_kernels import fit, reference
from tests.kernels import test_triton_attention as placed
from tests.kernels import test_triton_memory as memory

triton_attention = pytest.importorskip("agentmem_kernels.triton_attention")
triton_memory = pytest.importorskip("agentmem_kernels.triton_memory")

pytestmark = pytest.mark.usefixtures("poisoned_scratch")
TILE_LIMIT = 16 * 32  # BM x BN this stand-in device takes, at one pipeline stage


class _SmallDevice:
    """Stands in for a kernel on a GPU with little shared memory: refuses larger tiles the way
    Triton does (before anything runs), launches the real kernel otherwise."""

    def __init__(self, kernel) -> None:
        self.kernel, self.tried = kernel, []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            blocks = (kwargs["BM"], kwargs["BN"], kwargs["num_stages"])
            self.tried.append(blocks)
            if kwargs["BM"] * kwargs["BN"] > TILE_LIMIT or kwargs["num_stages"] > 1:
                raise OutOfResources(kwargs["BM"] * kwargs["BN"] * 512, 227 * 1024, "shared memory")
            return self.kernel[grid](*args, **kwargs)

        return run


@pytest.fixture(autouse=True)
def _forget_fits(monkeypatch):
    monkeypatch.setattr(fit, "_fitted", {})


def _placed_case():
    q, k, v = placed._case(40, 70, head_dim=64)
    cos, sin = placed._table(128, 64)
    return (q, k, v), dict(
        q_pos=torch.arange(30, 70, device=placed.DEVICE)[None],
        k_pos=placed._positions(torch.arange(70)),
        q_abs=torch.arange(130, 170, device=placed.DEVICE),
        k_abs=placed._positions(torch.arange(100, 170)),
        parts=[(0, 70, 0, None)], cos=cos, sin=sin, scale=0.3,
    )  # fmt: skip


def test_placed_attention_steps_down_to_tiles_that_fit(monkeypatch, caplog):
    device = _SmallDevice(triton_attention.placed_attention_fwd_kernel)
    monkeypatch.setattr(triton_attention, "placed_attention_fwd_kernel", device)
    tensors, case = _placed_case()
    got, got_lse, _ = triton_attention.placed_attention(*tensors, **case)
    want, want_lse, _ = reference.placed_attention(*tensors, **case)
    assert float((got - want).norm() / want.norm()) < 1e-5
    torch.testing.assert_close(got_lse, want_lse, atol=1e-3, rtol=1e-4)
    assert device.tried[0] == (64, 64, 3) and device.tried[-1] == (16, 32, 1)
    assert caplog.text.count("does not fit this GPU") == len(device.tried) - 1
    device.tried.clear()
    triton_attention.placed_attention(*tensors, **case)
    assert device.tried == [(16, 32, 1)]  # remembered: straight to the fit


def test_memory_attention_steps_down_to_tiles_that_fit(monkeypatch):
    device = _SmallDevice(triton_memory.memory_attention_fwd_kernel)
    monkeypatch.setattr(triton_memory, "memory_attention_fwd_kernel", device)
    case = memory._memory_case(80, n_local=85, capacity=90, head_dim=64)
    memory._compare_memory(case, stacked=True)
    assert len(device.tried) > 1
    last = device.tried[-1]
    assert last[0] * last[1] <= TILE_LIMIT and last[2] == 1


def test_a_device_too_small_for_any_tile_says_what_to_do(monkeypatch):
    monkeypatch.setattr(fit, "SMALLEST_BLOCK", 64)  # nothing below 64 x 64 to try
    device = _SmallDevice(triton_attention.placed_attention_fwd_kernel)
    monkeypatch.setattr(triton_attention, "placed_attention_fwd_kernel", device)
    tensors, case = _placed_case()
    with pytest.raises(RuntimeError, match="AGENTMEM_KERNELS=reference"):
        triton_attention.placed_attention(*tensors, **case)


@pytest.mark.parametrize("n_queries", [1, 40])  # logits kept between the passes, or recomputed
def test_unit_mass_steps_down_to_tiles_that_fit(monkeypatch, n_queries):
    """Scoring many representatives a unit: both passes run with the tiles that fit (their
    statistics sized by that BN), and the mass is the reference's."""
    device = _SmallDevice(triton_memory.unit_mass_kernel)
    monkeypatch.setattr(triton_memory, "unit_mass_kernel", device)
    torch.manual_seed(5)
    q = torch.randn(1, 4, n_queries, 64, device=memory.DEVICE)
    reps = torch.randn(1, 2, 150, 16, 64, device=memory.DEVICE)  # 16 representatives a unit
    n_valid = torch.tensor([140], dtype=torch.int32, device=memory.DEVICE)
    got = triton_memory.unit_mass(q, reps, kind="dot", scale=0.125, n_valid=n_valid)
    want = reference.unit_mass(q, reps, kind="dot", scale=0.125, n_valid=n_valid)
    torch.testing.assert_close(got, want, atol=1e-5 * n_queries, rtol=1e-5)
    assert len(device.tried) > 2  # refused at least once, then both passes
    last = device.tried[-1]
    assert last[0] * last[1] <= TILE_LIMIT and last[2] == 1
    device.tried.clear()
    triton_memory.unit_mass(q, reps, kind="dot", scale=0.125, n_valid=n_valid)
    assert device.tried == [last, last]  # remembered: straight to the fit, for both passes
