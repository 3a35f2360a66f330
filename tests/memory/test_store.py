"""GrowingTensor: appends into spare capacity, reserves without losing entries, pops from the
front in place (the local window's storage), and keeps one buffer until it must grow."""

from __future__ import annotations

import pytest
import torch

from agentmem.memory.store import GrowingTensor


def test_append_reserve_and_pop_front():
    grow = GrowingTensor()
    with pytest.raises(RuntimeError, match="first entries"):
        grow.reserve(8)
    data = torch.arange(2 * 3 * 20, dtype=torch.float32).view(2, 3, 20)
    grow.append(data[:, :, :5])
    grow.reserve(40)
    buffer = grow.buffer
    assert grow.capacity == 40 and torch.equal(grow.data, data[:, :, :5])
    grow.append(data[:, :, 5:20])
    assert grow.buffer is buffer  # no move within the reserved capacity
    popped = grow.pop_front(7)
    assert torch.equal(popped, data[:, :, :7])
    assert torch.equal(grow.data, data[:, :, 7:20]) and grow.length == 13
    assert grow.buffer.data_ptr() == buffer.data_ptr()
    grow.append(data[:, :, :20])
    grow.append(data[:, :, :20])  # past capacity: grows, keeps what it held
    assert grow.capacity >= 53 and grow.length == 53
    assert torch.equal(grow.data[:, :, :13], data[:, :, 7:20])


def test_host_storage_grows_by_powers_of_two_and_keeps_its_entries():
    # KV tiers' pools: the pinned allocator rounds every block to a power of two, so the pool
    # asks for one (and a StaticDecoder's reserve past the filled part costs no second block)
    grown = GrowingTensor(host=True)
    pieces = [torch.randn(1, 2, n, 4) for n in (24, 24, 40)]
    for piece in pieces:
        grown.append(piece)
        assert grown.capacity & (grown.capacity - 1) == 0 and grown.capacity >= grown.length
    assert grown.buffer.device.type == "cpu"
    assert torch.equal(grown.data, torch.cat(pieces, dim=2))
    grown.reserve(200)
    assert grown.capacity == 256 and torch.equal(grown.data, torch.cat(pieces, dim=2))
    held = GrowingTensor.holding(torch.randn(1, 2, 5, 4), host=True)
    assert held.capacity == 5  # a host tensor is taken as it is, not copied
