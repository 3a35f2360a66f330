"""`load`: a built-in model, a local transformers model directory or a GGUF file, wrapped.

The built-in models ship on PyPI as GGUF chunks (`agentmem.builtin`). The first load of one joins
and dequantizes it (about a minute on a CPU) and saves a converted copy under the agentmem home
(`$AGENTMEM_HOME`, default `~/.cache/agentmem`); later loads read that copy in seconds.
Nothing is ever downloaded.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

from agentmem.builtin import BUILTIN, BuiltinModel, assemble
from agentmem.config import MemoryConfig
from agentmem.paths import home
from agentmem.session import LanguageModel

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma-3-270m"
BUILTIN_MODELS = tuple(BUILTIN)


def default_device() -> torch.device:
    """The machine's accelerator if it has one, else the CPU."""
    if torch.accelerator.is_available():
        return torch.accelerator.current_accelerator()
    return torch.device("cpu")


def load(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    memory: MemoryConfig | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> LanguageModel:
    """Load a model and wrap it with agentmem.

    Args:
        name_or_path: a built-in model (`BUILTIN_MODELS`: "gemma-3-270m", and with their extras
            "qwen2.5-coder-0.5b-instruct" and "qwen2.5-coder-1.5b-instruct"), a local directory
            holding a transformers causal LM and its tokenizer, or a .gguf file (converted once
            into the agentmem home).
        memory: the default memory layout of its sessions.
        device: defaults to the accelerator if there is one, else the CPU.
        dtype: defaults to bfloat16 on an accelerator and float32 on the CPU.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    path = model_dir(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if path.is_relative_to(home() / "models"):  # a copy converted by a release that lost them
        _check_merges(tokenizer, str(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return LanguageModel(model, tokenizer, memory)


def model_dir(name_or_path: str | os.PathLike) -> Path:
    """The transformers directory `load` reads for `name_or_path` (converting a built-in model
    or a GGUF file on first use)."""
    if str(name_or_path) in BUILTIN:
        model = BUILTIN[str(name_or_path)]
        return _converted(model.name, lambda out: _convert_builtin(model, out))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return _converted(path.stem, lambda out: _convert_gguf(path, out))
    if not (path / "config.json").is_file():
        raise ValueError(
            f"'{name_or_path}' is neither a built-in model ({', '.join(BUILTIN_MODELS)}), a .gguf "
            "file, nor a directory with a transformers config.json; agentmem never downloads models"
        )
    return path


def _converted(name: str, convert) -> Path:
    """`home()/models/name`, made by `convert(out_dir)` on first use and moved in atomically."""
    target = home() / "models" / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as scratch:
        staged = Path(scratch) / "model"
        convert(staged)
        try:
            os.replace(staged, target)  # a reader sees no copy or a whole one
        except OSError:
            if not (target / "config.json").is_file():
                raise
    return target


def _convert_builtin(model: BuiltinModel, out: Path) -> None:
    gguf = assemble(model, out.parent / f"{model.name}.gguf")
    try:
        _convert_gguf(gguf, out)
    finally:
        gguf.unlink()


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF model into a plain transformers directory (weights in float16)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning("agentmem: converting %s once (about a minute)...", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    _check_merges(tokenizer, gguf.name)
    _check_bos(tokenizer, gguf.name, wants_bos=_gguf_adds_bos(gguf))
    # The weights are dequantized now; drop the GGUF marker so the copy saves as plain safetensors.
    del model.config.quantization_config
    model.hf_quantizer = None
    _to_float16(model, gguf.name)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _to_float16(model, name: str) -> None:
    """Half the copy's size: float16 is the GGUF's own float type (its block scales), and the
    rounding moves Gemma-3-270M's logits by under 0.02 of ~30, far below what 4-bit quantization
    did (the accelerators compute in bfloat16 anyway). A model whose weights overflow float16
    stays in float32."""
    if all(torch.isfinite(p.to(torch.float16)).all() for p in model.parameters()):
        model.to(torch.float16)
    else:
        logger.warning("agentmem: %s has weights beyond float16; kept in float32", name)


# Plain English words, nearly one token each for any real subword tokenizer.
PROBE = "The pass key is hidden in the text and I will remember it for you"


def _check_merges(tokenizer, name: str) -> None:
    """Refuse a converted tokenizer that lost its merges (transformers 5.17 with tokenizers 0.23
    turned Gemma's into one token per character): the model would read text it never saw."""
    tokens, words = len(tokenizer.tokenize(PROBE)), len(PROBE.split())
    if tokens > 1.3 * words:
        _refuse_conversion(name, f"its merges ({tokens} tokens for {words} plain words)")


def _gguf_adds_bos(gguf: Path) -> bool:
    """Whether the GGUF's tokenizer metadata asks for a BOS token before every text."""
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get("tokenizer.ggml.add_bos_token")
    return field is not None and bool(field.parts[field.data[0]][0])


def _check_bos(tokenizer, name: str, *, wants_bos: bool) -> None:
    """Refuse a converted tokenizer that drops the BOS its GGUF asks for (transformers before
    5.23 did so for Gemma, which then answers garbage)."""
    if wants_bos and tokenizer("x").input_ids[:1] != [tokenizer.bos_token_id]:
        _refuse_conversion(name, "the BOS token its GGUF asks for")


def _refuse_conversion(name: str, lost: str) -> None:
    import transformers

    raise RuntimeError(
        f"transformers {transformers.__version__} converted the tokenizer of {name} without "
        f"{lost}; install transformers>=5.23 (the range agentmem supports) and convert again "
        "(a converted copy under the agentmem home: delete it first)"
    )
