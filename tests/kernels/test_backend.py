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
    from agentmem_kernels import reference, triton_attention, triton_memory

    launches = []
    entries = [
        (triton_attention, "placed_attention"),
        (triton_memory, "memory_attention"),
        (triton_memory, "unit_mass"),
        (reference, "unit_mass"),
    ]
    for module, name in entries:
        real = getattr(module, name)
        label = f"{module.__name__.rsplit('.', 1)[-1]}.{name}"

        def counted(*args, _real=real, _label=label, **kwargs):
            launches.append(_label)
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
    logits, calls = {}, {}
    for name in ("reference", "triton"):
        agentmem_kernels.use_backend(name, DEVICE)
        cache = agentmem.new_cache(model)
        launches.clear()
        with torch.no_grad():
            logits[name] = torch.cat(
                [
                    model(ids[:, i : i + 16], **cache_kwargs(model, cache)).logits
                    for i in range(0, 96, 16)
                ],
                dim=1,
            )
        calls[name] = list(launches)
    # One global layer, six steps; it scores units in the last three (once it holds more than
    # topk=2 units: 4 sinks, then 2 units packed in step 3 and 2 more in each later step).
    assert not any(call.startswith("triton") for call in calls["reference"])
    assert calls["reference"].count("reference.unit_mass") == 3
    triton = calls["triton"]
    in_place = position in ("infllm", "stacked")
    window = "triton_memory.memory_attention" if in_place else "triton_attention.placed_attention"
    assert triton.count(window) == 6
    # fp32 scoring on a GPU goes to the reference (cuBLAS); the interpreter runs the kernel
    on_kernel = 0 if DEVICE == "cuda" else 3
    assert triton.count("triton_memory.unit_mass") == on_kernel
    assert triton.count("reference.unit_mass") == 3 - on_kernel
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
