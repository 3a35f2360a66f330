"""Model loading: clear errors for names that are neither built in nor on disk; a local directory
loads and is wrapped."""

from __future__ import annotations

import pytest

import agentmem
from agentmem import models
from tests.helpers import build


def test_unknown_model_says_nothing_is_downloaded():
    with pytest.raises(ValueError, match="never downloads"):
        models.load("meta-llama/Llama-3.1-8B")


def test_a_local_directory_loads_wrapped(tmp_path, tokenizer):
    build("qwen2").save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    lm = models.load(tmp_path, agentmem.MemoryConfig(topk=2), device="cpu")
    assert agentmem.is_wrapped(lm.model)
    assert lm.memory.topk == 2
    session = lm.session()
    assert session.append("hello") == 6
    assert isinstance(session.generate(max_new_tokens=3), str)


def test_home_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("AGENTMEM_HOME", str(tmp_path))
    assert models.home() == tmp_path


def test_a_built_in_model_without_its_extra_names_the_extra(monkeypatch, tmp_path):
    from importlib.metadata import PackageNotFoundError

    from agentmem import builtin

    def missing(name):
        raise PackageNotFoundError(name)

    monkeypatch.setenv("AGENTMEM_HOME", str(tmp_path))
    monkeypatch.setattr(builtin, "distribution", missing)
    with pytest.raises(RuntimeError, match=r"pip install 'agentmem-kv\[qwen-1\.5b\]'"):
        agentmem.load("qwen2.5-coder-1.5b-instruct", device="cpu")
    assert not any((tmp_path / "models").glob("qwen*"))  # nothing half-made left behind


def test_chunks_join_into_the_checked_gguf(tmp_path):
    """Gemma's chunks (installed with agentmem) join into its 253 MB GGUF, hash checked."""
    from agentmem.builtin import BUILTIN, assemble

    gemma = BUILTIN["gemma-3-270m"]
    target = assemble(gemma, tmp_path / "gemma.gguf")
    assert target.stat().st_size == gemma.size
    assert target.read_bytes()[:4] == b"GGUF"


def test_damaged_chunks_are_refused_and_leave_no_file(tmp_path):
    from dataclasses import replace

    from agentmem.builtin import BUILTIN, assemble

    damaged = replace(BUILTIN["gemma-3-270m"], sha256="0" * 64)
    with pytest.raises(RuntimeError, match="damaged"):
        assemble(damaged, tmp_path / "gemma.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_tokenizer_converted_without_its_merges_is_refused(tokenizer):
    """The character tokenizer stands in for what transformers 5.17 made of Gemma's GGUF one."""
    with pytest.raises(RuntimeError, match="without its merges"):
        models._check_merges(tokenizer, "model.gguf")
    models._check_merges(bpe_like(), "model.gguf")


def bpe_like():
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    words = models.PROBE.split()
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(dict.fromkeys(words))}}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_a_tokenizer_converted_without_the_bos_its_gguf_asks_for_is_refused(tokenizer):
    models._check_bos(tokenizer, "model.gguf", wants_bos=True)  # adds <bos>: fine
    without = bpe_like()  # adds nothing
    models._check_bos(without, "model.gguf", wants_bos=False)
    without.bos_token = "pass"  # a BOS it knows but does not add
    with pytest.raises(RuntimeError, match="without the BOS"):
        models._check_bos(without, "model.gguf", wants_bos=True)


def test_the_built_in_gguf_asks_for_bos(tmp_path):
    from agentmem.builtin import BUILTIN, assemble

    assert models._gguf_adds_bos(assemble(BUILTIN["gemma-3-270m"], tmp_path / "g.gguf"))
