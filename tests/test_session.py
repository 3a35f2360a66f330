"""The Python API: sessions append, generate, stream and report what they recalled."""

from __future__ import annotations

import pytest
import torch

import agentmem
import agentmem.memory.layer as memory_layer
from agentmem.session import LanguageModel
from tests.helpers import bpe_tokenizer, build

TEXT = "The quick brown fox jumps over the lazy dog. " * 6
COVERING = agentmem.MemoryConfig(n_init=4, unit_size=16, topk=2, n_local=512, exec_chunk=64)
SMALL = agentmem.MemoryConfig(n_init=4, unit_size=16, topk=2, n_local=48, exec_chunk=16)


@pytest.fixture
def lm(tokenizer) -> LanguageModel:
    return LanguageModel(build("gemma3"), tokenizer, COVERING)


def test_append_returns_the_tokens_added(lm):
    session = lm.session()
    added = session.append("Hello")
    assert added == 6  # <bos> + 5 characters
    assert session.append(" world") == 6
    assert len(session) == 12
    assert session.tokens[:2] == [
        lm.tokenizer.bos_token_id,
        lm.tokenizer.convert_tokens_to_ids("H"),
    ]


def test_generate_matches_transformers_greedy_when_the_window_covers_everything(lm, tokenizer):
    # A prompt after which the random Gemma emits printable tokens (after TEXT alone, only <bos>).
    prompt = TEXT + "A dog"
    session = lm.session()
    session.append(prompt)
    text = session.generate(max_new_tokens=10)
    again = lm.session()
    again.append(prompt)
    got = list(again.generate_tokens(max_new_tokens=10))
    ids = torch.tensor([tokenizer(prompt).input_ids])
    with agentmem.hf.wrap.unwrapped(lm.model), torch.no_grad():
        want = lm.model.generate(ids, max_new_tokens=10, do_sample=False)
    assert got == want[0, ids.shape[1] :].tolist()
    want_text = tokenizer.decode(want[0, ids.shape[1] :], skip_special_tokens=True)
    assert text == want_text.split("<eos>")[0]
    assert text  # some text came out, not only special tokens


def test_stream_yields_the_same_text_in_pieces(tokenizer):
    lm = LanguageModel(build("qwen3"), tokenizer, COVERING)  # its random weights emit text
    first, second = lm.session(), lm.session()
    first.append(TEXT)
    second.append(TEXT)
    pieces = list(second.stream(max_new_tokens=8))
    text = first.generate(max_new_tokens=8)
    assert "".join(pieces) == text
    assert len(text) >= 1 and len(pieces) >= 1


def test_appending_in_pieces_equals_appending_at_once(tokenizer):
    lm = LanguageModel(build("llama"), tokenizer, SMALL)
    whole, pieces = lm.session(), lm.session()
    whole.append(TEXT)
    for part in (TEXT[:50], TEXT[50:51], TEXT[51:]):
        pieces.append(part)
    assert pieces.tokens == whole.tokens
    # Different step boundaries change which units each step retrieves, never what is stored.
    layer_whole, layer_pieces = whole.cache.memory_layers[0], pieces.cache.memory_layers[0]
    assert layer_whole.seen == layer_pieces.seen == len(whole.tokens)
    torch.testing.assert_close(layer_whole.units.keys.data, layer_pieces.units.keys.data)


def test_each_append_is_tokenized_on_its_own():
    """With BPE, text appended in pieces is not re-tokenized across the pieces' boundary: the
    stream holds each piece's own tokens, which can differ from the whole text's."""
    bpe = bpe_tokenizer()
    assert bpe.tokenize("hello") == ["hello"]  # one merge spans "hel" | "lo"
    lm = LanguageModel(build("llama"), bpe, SMALL)
    whole, pieces = lm.session(), lm.session()
    whole.append("hello world")
    assert pieces.append("hel") + pieces.append("lo world") == len(pieces)
    own = bpe("hel").input_ids + bpe("lo world", add_special_tokens=False).input_ids
    assert pieces.tokens == own
    assert whole.tokens == bpe("hello world").input_ids
    assert pieces.tokens != whole.tokens
    assert len(pieces.tokens) > len(whole.tokens)
    assert bpe.decode(pieces.tokens, skip_special_tokens=True) == "hello world"
    assert pieces.cache.memory_layers[0].seen == len(own)


def test_generated_tokens_enter_memory(lm):
    session = lm.session()
    session.append(TEXT)
    generated = list(session.generate_tokens(max_new_tokens=5))
    session.append("!")
    assert session.tokens[-6:-1] == generated
    assert session.cache.memory_layers[0].seen == len(session.tokens)


@pytest.mark.parametrize("query_window", [1, 32])
def test_the_answering_token_retrieves_for_itself(tokenizer, monkeypatch, query_window):
    """The last token of an append is a step of its own; it chooses units with its own query
    and (query_window > 1) those of the tokens before it."""
    memory = SMALL.model_copy(update={"query_window": query_window})
    lm = LanguageModel(build("gemma3"), tokenizer, memory)
    steps, scored = [], []
    real_scoring, real_retrieve = (
        memory_layer.MemoryLayer._scoring_queries, memory_layer.MemoryLayer._retrieve
    )  # fmt: skip

    def spy_scoring(self, q):
        steps.append(q.shape[2])
        return real_scoring(self, q)

    def spy_retrieve(self, q, scale):
        scored.append(q.shape[2])
        return real_retrieve(self, q, scale)

    monkeypatch.setattr(memory_layer.MemoryLayer, "_scoring_queries", spy_scoring)
    monkeypatch.setattr(memory_layer.MemoryLayer, "_retrieve", spy_retrieve)
    lm.session().append(TEXT)
    assert steps[-1] == 1
    assert max(steps) == memory.exec_chunk
    assert scored[-1] == query_window


def test_recalled_reports_retrieved_spans_and_text(tokenizer):
    lm = LanguageModel(build("gemma3"), tokenizer, SMALL)
    session = lm.session()
    session.append(TEXT)
    recalled = session.recalled()
    assert len(recalled) >= 2  # topk units of the global layer, per head
    for unit in recalled:
        assert unit.end - unit.start == SMALL.unit_size
        assert unit.text == tokenizer.decode(session.tokens[unit.start : unit.end])
        assert unit.layers == (2,)
        assert unit.end <= len(session) - SMALL.n_local + SMALL.unit_size
        assert len(unit.ranks) == 1 and 0 <= unit.ranks[0] < SMALL.topk
    # each KV head ranks its own topk, the best of them first
    state = session.cache.layers[2].state
    assert state.units.n_units > SMALL.topk and state.last_ranked
    assert min(unit.ranks[0] for unit in recalled) == 0


def test_bad_input_is_refused_where_it_enters(lm):
    session = lm.session()
    with pytest.raises(ValueError, match="non-empty"):
        session.append("")
    with pytest.raises(ValueError, match="append text before"):
        session.generate()
    with pytest.raises(ValueError, match=r"token ids must lie"):
        session.append_tokens([10_000])
    session.append("abc")
    with pytest.raises(ValueError, match="max_new_tokens"):
        session.generate(max_new_tokens=0)
