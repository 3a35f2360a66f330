"""On a CUDA GPU, in bf16: the wrapped model still equals the unwrapped one when the window covers
everything, and memory attention with every unit retrieved equals full attention.

Run there with `python -m pytest -m gpu tests/gpu`; deselected elsewhere (see pyproject.toml)."""

from __future__ import annotations

import pytest
import torch

import agentmem
from tests.helpers import VOCAB, build

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


@pytest.mark.parametrize(
    "config",
    [
        agentmem.MemoryConfig(n_init=4, unit_size=16, topk=2, n_local=512, exec_chunk=64),
        agentmem.MemoryConfig(
            n_init=4, unit_size=16, topk=40, n_local=24, exec_chunk=8, position="contiguous"
        ),
    ],
    ids=["covering-window", "every-unit"],
)
def test_bf16_matches_the_unwrapped_model(family, config):
    model = build(family).to("cuda", torch.bfloat16)
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (1, 600), device="cuda")
    with torch.no_grad():
        want = model(ids).logits
        agentmem.wrap(model, config)
        cache = agentmem.new_cache(model)
        got = torch.cat(
            [model(ids[:, i : i + 64], past_key_values=cache).logits for i in range(0, 600, 64)],
            dim=1,
        )
    # bf16 operands: a relative error around 1e-2 is rounding, not a bug.
    assert _relative_error(got, want) < 3e-2
