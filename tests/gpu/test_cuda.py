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


def _logits(model, ids, config=None):
    """Logits of `ids`, through agentmem in 64-token steps when `config` is given."""
    with torch.no_grad():
        if config is None:
            return model(ids).logits
        agentmem.wrap(model, config)
        cache = agentmem.new_cache(model)
        steps = [model(ids[:, i : i + 64], past_key_values=cache).logits for i in range(0, 600, 64)]
        agentmem.unwrap(model)
        return torch.cat(steps, dim=1)


@pytest.mark.parametrize(
    "config",
    [
        agentmem.MemoryConfig(n_init=4, unit_size=16, topk=2, n_local=1024, exec_chunk=64),
        agentmem.MemoryConfig(
            n_init=4, unit_size=16, topk=40, n_local=80, exec_chunk=64, position="contiguous"
        ),
    ],
    ids=["covering-window", "every-unit"],
)
def test_bf16_is_as_close_to_fp32_as_transformers_is(family, config):
    """Judged as flash-attention is: agentmem's bf16 error against the fp32 model is at most twice
    transformers' own bf16 error (plus a little), not an absolute bound."""
    model = build(family).to("cuda")
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (1, 600), device="cuda")
    exact = _logits(model, ids)
    model.to(torch.bfloat16)
    plain_error = _relative_error(_logits(model, ids), exact)
    ours_error = _relative_error(_logits(model, ids, config), exact)
    assert ours_error <= 2 * plain_error + 1e-3, (ours_error, plain_error)
