"""Backend selection, and a wrapped model running its memory layers on the Triton kernel (in the
interpreter on the CPU) giving the same logits as on the reference."""

from __future__ import annotations

import pytest
import torch

import agentmem
import agentmem_kernels
from agentmem.hf.seam import cache_kwargs
from tests.helpers import VOCAB, build

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs Triton's interpreter


@pytest.fixture
def restore_backends():
    yield
    agentmem_kernels.use_backend(None, "cpu")
    agentmem_kernels.use_backend(None, "cuda")


def test_backend_is_chosen_once_and_can_be_forced(restore_backends, monkeypatch):
    agentmem_kernels.use_backend(None, "cpu")
    assert agentmem_kernels.backend(torch.device("cpu")) == "reference"
    agentmem_kernels.use_backend("triton", "cpu")
    assert agentmem_kernels.backend(torch.device("cpu")) == "triton"
    agentmem_kernels.use_backend(None, "cpu")
    monkeypatch.setenv("AGENTMEM_KERNELS", "fast")
    with pytest.raises(ValueError, match="AGENTMEM_KERNELS"):
        agentmem_kernels.backend(torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown backend"):
        agentmem_kernels.use_backend("cuda-graphs")


@pytest.mark.parametrize("position", ["infllm", "stacked", "contiguous", "selfextend"])
def test_triton_backend_matches_the_reference_in_a_model(restore_backends, position, monkeypatch):
    from agentmem_kernels import triton_attention, triton_memory

    launches = []
    entries = [
        (triton_attention, "placed_attention"),
        (triton_memory, "memory_attention"),
        (triton_memory, "unit_mass"),
    ]
    for module, name in entries:
        real = getattr(module, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            launches.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    model = build("gemma3", head_dim=32).to(DEVICE)  # the kernel needs head_dim >= 32
    torch.manual_seed(3)
    ids = torch.randint(3, VOCAB, (1, 96), device=DEVICE)
    config = agentmem.MemoryConfig(
        n_init=4, unit_size=8, topk=2, n_local=32, exec_chunk=16, position=position,
        selfextend_window=8, selfextend_group=2,
    )  # fmt: skip
    agentmem.wrap(model, config)
    logits = {}
    for name in ("reference", "triton"):
        agentmem_kernels.use_backend(name, DEVICE)
        cache = agentmem.new_cache(model)
        with torch.no_grad():
            logits[name] = torch.cat(
                [
                    model(ids[:, i : i + 16], **cache_kwargs(model, cache)).logits
                    for i in range(0, 96, 16)
                ],
                dim=1,
            )
    # one global layer, six steps, each retrieving once there are more than topk units
    window = "memory_attention" if position in ("infllm", "stacked") else "placed_attention"
    assert launches.count(window) == 6
    # fp32 scoring on a GPU goes to the reference (cuBLAS); the interpreter runs the kernel
    assert launches.count("unit_mass") >= (0 if DEVICE == "cuda" else 3)
    torch.testing.assert_close(logits["triton"], logits["reference"], atol=1e-4, rtol=1e-4)


def test_capturable_needs_cuda_and_triton(restore_backends):
    agentmem_kernels.use_backend("triton", "cpu")
    assert not agentmem_kernels.capturable(torch.device("cpu"), 64)  # no CUDA graphs on a CPU
    if torch.cuda.is_available():
        agentmem_kernels.use_backend("triton", "cuda")
        assert agentmem_kernels.capturable(torch.device("cuda"), 64)
        assert not agentmem_kernels.capturable(torch.device("cuda"), 16)  # head too small
        agentmem_kernels.use_backend("reference", "cuda")
        assert not agentmem_kernels.capturable(torch.device("cuda"), 64)
