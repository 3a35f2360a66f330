"""Sampling in generation: greedy stays the default (and temperature 0), draws follow their seed,
top-k / top-p narrow them, constraints hold in both modes, and sessions sample inside
`agentmem.generate.sampling`."""

from __future__ import annotations

import pytest
import torch

import agentmem
from agentmem.generate import GREEDY, Sampling, choose, greedy, sampling
from agentmem.session import LanguageModel
from tests.helpers import build

COVERING = agentmem.MemoryConfig(n_init=4, unit_size=16, topk=2, n_local=512, exec_chunk=64)
TEXT = "The quick brown fox jumps over the lazy dog. " * 3


def logits(seed: int = 0, batch: int = 2, vocab: int = 50) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed))


def test_greedy_and_temperature_zero_are_argmax():
    x = logits()
    assert torch.equal(choose(x), x.argmax(-1))
    assert torch.equal(choose(x, Sampling(temperature=0.0, top_k=3, seed=1)), x.argmax(-1))
    assert GREEDY.is_greedy and not Sampling(temperature=0.5).is_greedy


@pytest.mark.parametrize("temperature", [1e-200, 1e-30, 1e-6])
def test_a_tiny_temperature_is_greedy_not_a_failure(temperature):
    """Dividing the logits by 1e-200 made every score inf (found by fuzzing the server)."""
    x = logits()
    spec = Sampling(temperature=temperature, seed=3)
    assert torch.equal(choose(x, spec, generator=spec.generator(x.device)), x.argmax(-1))


def test_a_seed_gives_the_same_draws_and_draws_vary():
    x = logits()
    spec = Sampling(temperature=1.0, seed=7)
    a = [int(choose(x, spec, generator=spec.generator(x.device))[0]) for _ in range(3)]
    b = [int(choose(x, spec, generator=spec.generator(x.device))[0]) for _ in range(3)]
    assert a == b
    g = spec.generator(x.device)
    draws = {int(choose(x, spec, generator=g)[0]) for _ in range(200)}
    assert len(draws) > 5


def test_top_k_and_top_p_keep_only_the_likeliest():
    x = logits(vocab=50)
    g = torch.Generator().manual_seed(0)
    top3 = set(x[0].topk(3).indices.tolist())
    drawn = {int(choose(x, Sampling(temperature=2.0, top_k=3), generator=g)[0]) for _ in range(300)}
    assert drawn <= top3 and len(drawn) == 3
    assert torch.equal(choose(x, Sampling(temperature=5.0, top_k=1), generator=g), x.argmax(-1))
    # top_p: the smallest set reaching p; a tiny p leaves the likeliest token only.
    assert torch.equal(choose(x, Sampling(temperature=5.0, top_p=1e-6), generator=g), x.argmax(-1))
    probs = x[0].softmax(-1).sort(descending=True)
    n = int((probs.values.cumsum(-1) < 0.5).sum()) + 1  # tokens needed to reach 0.5
    keep = set(probs.indices[:n].tolist())
    spec = Sampling(temperature=1.0, top_p=0.5)
    drawn = {int(choose(x, spec, generator=g)[0]) for _ in range(300)}
    assert drawn <= keep


def test_constraints_hold_in_both_modes():
    x = logits()
    best = int(x[0].argmax())
    assert int(choose(x, Sampling(banned=frozenset({best})))[0]) != best
    allowed = [3, 9]
    spec = Sampling(allowed=lambda generated: allowed)
    assert int(choose(x, spec)[0]) == max(allowed, key=lambda i: float(x[0, i]))
    g = torch.Generator().manual_seed(0)
    spec = Sampling(temperature=3.0, allowed=lambda generated: allowed)
    assert {int(choose(x, spec, generator=g)[0]) for _ in range(50)} <= set(allowed)
    seen = []
    choose(x, Sampling(allowed=lambda generated: seen.append(list(generated))), [4, 5])
    assert seen == [[4, 5]]  # asked with what was generated so far


@pytest.mark.parametrize(
    "kwargs", [{"temperature": -1.0}, {"temperature": float("nan")}, {"top_p": 0.0},
               {"top_p": 1.5}, {"top_k": -1}, {"top_k": 1.5}, {"seed": "1"}],
)  # fmt: skip
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        Sampling(**kwargs)


@pytest.fixture
def lm(tokenizer) -> LanguageModel:
    return LanguageModel(build("qwen3"), tokenizer, COVERING)  # its random weights emit text


def test_greedy_function_samples_when_told_and_is_greedy_otherwise(lm, tokenizer):
    ids = torch.tensor([tokenizer(TEXT).input_ids])

    def run(spec=None):
        cache = agentmem.new_cache(lm.model, COVERING)
        start = agentmem.prefill(lm.model, cache, ids, chunk=64)
        return list(greedy(lm.model, cache, start, max_new_tokens=12, sampling=spec))

    plain = run()
    assert run(Sampling()) == plain
    hot = Sampling(temperature=2.0, seed=3)
    assert run(hot) == run(hot)
    assert len({tuple(run(Sampling(temperature=2.0, seed=s))) for s in range(4)}) > 1


def test_sessions_sample_inside_a_sampling_block(lm):
    def reply(spec=None):
        session = lm.session()
        session.append(TEXT)
        if spec is None:
            return session.generate(max_new_tokens=10)
        with sampling(spec):
            return session.generate(max_new_tokens=10)

    plain = reply()
    assert reply(Sampling()) == plain
    hot = Sampling(temperature=2.0, seed=11)
    assert reply(hot) == reply(hot)
    assert {reply(Sampling(temperature=2.0, seed=s)) for s in range(4)} != {plain}
    assert reply() == plain  # the block ended: greedy again
