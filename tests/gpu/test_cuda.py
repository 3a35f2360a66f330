"""On a CUDA GPU, in bf16: the wrapped model still equals the unwrapped one when the window covers
everything, and memory attention with every unit retrieved equals full attention.

Run there with `python -m pytest -m gpu tests/gpu`; deselected elsewhere (see pyproject.toml)."""

from __future__ import annotations

import pytest
import torch

import agentmem
from agentmem.hf.seam import cache_kwargs
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
        steps = [
            model(ids[:, i : i + 64], **cache_kwargs(model, cache)).logits
            for i in range(0, 600, 64)
        ]
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
    model = build(family, head_dim=64).to("cuda")  # a head size the Triton kernels take
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (1, 600), device="cuda")
    exact = _logits(model, ids)
    model.to(torch.bfloat16)
    plain_error = _relative_error(_logits(model, ids), exact)
    ours_error = _relative_error(_logits(model, ids, config), exact)
    assert ours_error <= 2 * plain_error + 1e-3, (ours_error, plain_error)


def test_memory_kernels_in_bf16():
    """The Triton window attention and unit scoring in bf16 against the fp32 reference on the same
    bf16 inputs, at a decode step's and a prefill chunk's shapes."""
    from agentmem_kernels import reference, triton_memory

    torch.manual_seed(0)
    head_dim, unit = 128, 64

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)

    positions = torch.arange(4096, device="cuda")[:, None]
    angles = positions / 10000 ** (torch.arange(0, head_dim, 2, device="cuda") / head_dim)
    angles = torch.cat((angles, angles), dim=-1)
    ids = torch.sort(torch.randperm(50, device="cuda")[:8]).values.expand(1, 8, -1)
    window = dict(
        sink_k=randn(1, 8, 64, head_dim), sink_v=randn(1, 8, 64, head_dim),
        pool_k=randn(1, 8, 50 * unit, head_dim), pool_v=randn(1, 8, 50 * unit, head_dim),
        ids=ids.contiguous(), unit_size=unit, local_k=randn(1, 8, 1000, head_dim),
        local_v=randn(1, 8, 1000, head_dim), cos=angles.cos(), sin=angles.sin(),
        scale=head_dim**-0.5, memory_q_pos=1000,
    )  # fmt: skip
    for n_queries, n_local in ((1, 777), (512, 1000)):
        q = randn(1, 32, n_queries, head_dim)
        n = torch.tensor([n_local], device="cuda", dtype=torch.int32)
        got, _, _ = triton_memory.memory_attention(q, **window, n_local=n)
        want, _, _ = reference.memory_attention(q, **window, n_local=n_local)
        assert _relative_error(got, want) < 1e-2
        reps = randn(1, 8, 300, 4, head_dim)
        got = triton_memory.unit_mass(q, reps, kind="dot", scale=head_dim**-0.5)
        want = reference.unit_mass(q, reps, kind="dot", scale=head_dim**-0.5)
        assert _relative_error(got, want) < 1e-2


def test_graph_decoding_in_bf16_follows_ordinary_steps():
    from transformers import LlamaConfig, LlamaForCausalLM

    from agentmem.generate import decode_one_token, prefill
    from agentmem.hf.graphs import StaticDecoder
    from tests.helpers import COMMON

    torch.manual_seed(0)  # head_dim 32: the Triton kernels' smallest, so the step is captured
    model = LlamaForCausalLM(LlamaConfig(**COMMON, head_dim=32)).to("cuda", torch.bfloat16)
    config = agentmem.MemoryConfig(n_init=4, unit_size=16, topk=2, n_local=48, exec_chunk=32)
    agentmem.wrap(model, config)
    torch.manual_seed(0)
    prompt = torch.randint(3, VOCAB, (1, 300), device="cuda")
    ordinary, static = agentmem.new_cache(model), agentmem.new_cache(model)
    prefill(model, ordinary, prompt, chunk=32)
    prefill(model, static, prompt, chunk=32)
    decoder = StaticDecoder(model, static)
    assert decoder.graphs
    token = prompt[:, -1]
    for _ in range(40):  # across two packings
        want = decode_one_token(model, ordinary, token)
        got = decoder.step(token)
        assert _relative_error(got, want) < 2e-2
        token = want.argmax(-1)


def test_prefill_replays_captured_chunks_exactly(monkeypatch):
    """Long prefills run their steady-state chunks from a CUDA graph: same logits and memory as
    eager chunks (fp32, so that the comparison is tight)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import agentmem.generate as generate
    from tests.helpers import COMMON

    torch.manual_seed(0)
    model_config = LlamaConfig(**{**COMMON, "vocab_size": 1024, "head_dim": 32})
    model = LlamaForCausalLM(model_config).to("cuda")
    config = agentmem.MemoryConfig(n_init=4, unit_size=16, topk=2, n_local=48, exec_chunk=32)
    agentmem.wrap(model, config)
    # No token twice: equal first-layer keys make exact score ties, which top-k breaks by layout.
    ids = (torch.randperm(1021)[:1000] + 3).view(1, -1).to("cuda")
    monkeypatch.setattr(generate, "GRAPH_MIN_TOKENS", 0)
    graphed = agentmem.new_cache(model)
    captured = []
    real = generate.static_chunks

    def spy(*args, **kwargs):
        captured.append(real(*args, **kwargs))
        return captured[-1]

    monkeypatch.setattr(generate, "static_chunks", spy)
    got = generate.prefill(model, graphed, ids, chunk=32)
    monkeypatch.setattr(generate, "static_chunks", lambda *args, **kwargs: None)
    eager = agentmem.new_cache(model)
    want = generate.prefill(model, eager, ids, chunk=32)
    assert any(steps is not None for steps in captured)  # a graph really ran
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for a, b in zip(graphed.memory_layers, eager.memory_layers, strict=True):
        assert a.units.n_units == b.units.n_units and a.seen == b.seen == 1000
        torch.testing.assert_close(a.units.reps.data, b.units.reps.data)


def test_a_session_on_the_gpu_saves_and_resumes_token_for_token(tmp_path):
    """Saving copies a CUDA session's tensors to the host (the payload, its checksums, its search
    index); a resumed one reads its units back onto the GPU and continues as the uninterrupted."""
    from agentmem.session import LanguageModel
    from tests.helpers import char_tokenizer

    config = agentmem.MemoryConfig(n_init=4, unit_size=16, topk=2, n_local=64, exec_chunk=16)
    torch.manual_seed(0)
    lm = LanguageModel(
        build("gemma3", head_dim=64).to("cuda", torch.bfloat16), char_tokenizer(), config
    )
    text = "The code is 4721. " + "The quick brown fox jumps over the lazy dog. " * 12
    store = agentmem.Store(root=tmp_path)
    saved = lm.session("s", store=store)
    saved.append(text)
    want = lm.session()
    want.append(text)
    resumed = lm.session("s", store=agentmem.Store(root=tmp_path))
    assert resumed.generate(max_new_tokens=8) == want.generate(max_new_tokens=8)
    assert (
        resumed.cache.memory_layers[0].units.lazy_units
        < resumed.cache.memory_layers[0].units.n_units
    )
