"""Every position policy runs on the GPU's kernels at the head sizes of real models, in fp32 and
bf16, and gives the logits of the exact reference kernels on the same model.

`full` on Gemma-3-270M in fp32 (head size 256) once ran out of shared memory in the first prefill
chunk: whatever the validator accepts must run here. Run with `python -m pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

import pytest
import torch

import agentmem
import agentmem_kernels
from agentmem.config import POSITIONS, RETRIEVING_POSITIONS
from agentmem.generate import decode_one_token, prefill
from tests.helpers import VOCAB, build

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2}  # relative, on the logits


def _logits(model, config: agentmem.MemoryConfig, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the last prompt token and of three decoded ones, [4, V]."""
    cache = agentmem.new_cache(model, config)
    steps = [prefill(model, cache, ids, chunk=config.exec_chunk)]
    for _ in range(3):
        steps.append(decode_one_token(model, cache, steps[-1].argmax(-1)))
    return torch.cat(steps).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("position", POSITIONS)
def test_every_policy_runs_on_the_kernels(position, head_dim, dtype):
    # Gemma 3's layout: sliding layers around a global one, four query heads on one key head.
    model = build("gemma3", head_dim=head_dim).to("cuda", dtype)
    retrieves = position in RETRIEVING_POSITIONS
    config = agentmem.MemoryConfig(
        n_init=4, unit_size=16, topk=3 if retrieves else 0, n_local=96, exec_chunk=64,
        repr_topk=2, position=position, selfextend_group=4, selfextend_window=32,
    )  # fmt: skip
    agentmem.wrap(model, config)
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (1, 500), device="cuda")  # sinks, units and a full window
    assert agentmem_kernels.backend(ids.device) == "triton"
    got = _logits(model, config, ids)
    agentmem_kernels.use_backend("reference")
    try:
        want = _logits(model, config, ids)
    finally:
        agentmem_kernels.use_backend(None)
    assert torch.isfinite(got).all()
    error = float((got - want).norm() / want.norm())
    assert error < TOLERANCE[dtype], error
