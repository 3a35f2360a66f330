"""Test helpers: tiny random-weight models of every supported family, built from config, a
character-level tokenizer, a small BPE tokenizer trained here, and a plain RoPE. Nothing here
touches the network."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=8192,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_llama(head_dim: int = 16) -> LlamaForCausalLM:
    """Llama with Llama-3.1 rope scaling, so the model's own rotary module is exercised."""
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    return LlamaForCausalLM(LlamaConfig(**COMMON, head_dim=head_dim, rope_parameters=rope))


def tiny_mistral(head_dim: int = 16) -> MistralForCausalLM:
    return MistralForCausalLM(MistralConfig(**COMMON, head_dim=head_dim, sliding_window=None))


def tiny_qwen2(head_dim: int = 16) -> Qwen2ForCausalLM:
    return Qwen2ForCausalLM(Qwen2Config(**COMMON, head_dim=head_dim))


def tiny_qwen3(head_dim: int = 16) -> Qwen3ForCausalLM:
    return Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=head_dim))


def tiny_gemma3(head_dim: int = 16) -> Gemma3ForCausalLM:
    """Gemma 3 layout: sliding-window layers around a global one, one KV head, two thetas."""
    config = Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 4, "num_key_value_heads": 1},
        head_dim=head_dim,
        sliding_window=24,
        layer_types=[
            "sliding_attention",
            "sliding_attention",
            "full_attention",
            "sliding_attention",
        ],
    )
    return Gemma3ForCausalLM(config)


FAMILIES = {
    "llama": tiny_llama,
    "mistral": tiny_mistral,
    "qwen2": tiny_qwen2,
    "qwen3": tiny_qwen3,
    "gemma3": tiny_gemma3,
}


def build(family: str, head_dim: int = 16) -> torch.nn.Module:
    """A tiny random model of `family` (head size 16: fast on the CPU; the Triton kernels take
    powers of two from 32)."""
    torch.manual_seed(0)
    model = FAMILIES[family](head_dim=head_dim).eval()
    # Random init is tiny; larger weights make attention sharp enough that errors would show.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "proj" in name:
                param.mul_(4.0)
    return model


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character; ids 0-2 are pad, bos, eos."""
    chars = [chr(c) for c in range(32, 32 + VOCAB - 3)]
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


# A few hundred words of lower-case text; "hello" is frequent enough to become one token.
BPE_TEXT = (
    "hello world. the quick brown fox jumps over the lazy dog, and the dog says hello back. "
    "a fox and a dog walk to the river; the river is cold, the sun is warm, the grass is green. "
    "hello again, says the fox. the dog jumps, the fox runs, and both of them rest by the water. "
) * 10


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A BPE tokenizer of VOCAB tokens trained on BPE_TEXT (deterministic); ids 0-3 are pad,
    bos, eos, unk. Spaces become "▁" at the start of the next word, as in SentencePiece."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.decoder = decoders.Metaspace(prepend_scheme="never")
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
        show_progress=False,
    )
    tok.train_from_iterator([BPE_TEXT], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


class PlainRope:
    def __init__(self, head_dim: int, max_positions: int = 4096, theta: float = 10000.0) -> None:
        self.max_positions = max_positions
        self.inv_freq = 1.0 / theta ** (
            torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
        )

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype, limit: int | None = None):
        assert limit is None or int(positions.max()) < limit
        angles = positions.to(torch.float64)[..., None] * self.inv_freq.to(positions.device)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def table(self, limit: int, dtype: torch.dtype, device: torch.device):
        return self.cos_sin(torch.arange(limit, device=device), dtype)
