"""Generation as small free functions: `prefill`, `decode_one_token`, `greedy` (gpt-fast style).

They take any transformers causal LM and any cache, so the same loop drives a wrapped model on an
AgentMemCache and the full-attention baselines on a DynamicCache. On an AgentMemCache on a GPU,
long prefills replay their steady-state chunks from a CUDA graph (`agentmem.hf.graphs`).
How a continuation picks its tokens is a `Sampling`: greedy by default, or temperature / top-k /
top-p draws from a seeded generator, within token constraints (`choose`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import Cache

from agentmem.hf.graphs import static_chunks, static_decoder
from agentmem.hf.seam import cache_kwargs

# Prefills with at least this many tokens left run their steady-state chunks from a CUDA graph
# (where the memory and the kernels allow it): capturing costs about as much as a few chunks.
GRAPH_MIN_TOKENS = 16384
# Continuations of at least this many tokens decode from a CUDA graph.
GRAPH_MIN_NEW_TOKENS = 32


@dataclass(frozen=True)
class Sampling:
    """How a continuation picks each token.

    Greedy at `temperature` 0 (the default). Above 0 a token is drawn from the softmax of the
    logits divided by `temperature`, kept to the `top_k` likeliest (0: no limit) and to the
    smallest set whose probability reaches `top_p`, with a generator seeded by `seed` (None:
    torch's global generator), so a seed gives the same tokens again.
    Constraints apply in both modes: `banned` ids are never chosen; given the ids this
    continuation produced so far, `allowed(generated)` returns the ids the next token may be, or
    None for any (a tool's name, a grammar), and `forbid(generated)` ids it may not be now (no end
    of sequence inside an open tool call).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    banned: frozenset[int] = frozenset()
    allowed: Callable[[list[int]], Sequence[int] | None] | None = None
    forbid: Callable[[list[int]], Iterable[int]] | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0: no limit), got {self.top_k!r}")
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        object.__setattr__(self, "banned", frozenset(int(i) for i in self.banned))

    @property
    def is_greedy(self) -> bool:
        """Plain argmax: temperature 0 and no constraint."""
        return (
            self.temperature == 0 and not self.banned and self.allowed is None
            and self.forbid is None
        )  # fmt: skip

    def generator(self, device: torch.device) -> torch.Generator | None:
        """A fresh generator on `device` seeded by `seed` (None without a seed)."""
        if self.seed is None or self.temperature == 0:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


GREEDY = Sampling()
# The sampling of continuations started in this thread or task (`sampling`); greedy by default.
_active: ContextVar[Sampling] = ContextVar("agentmem_sampling", default=GREEDY)


@contextmanager
def sampling(spec: Sampling) -> Iterator[Sampling]:
    """Continuations started inside this block, in this thread or asyncio task only, pick their
    tokens by `spec` unless given one of their own (`greedy(..., sampling=)`). This is how
    `Session.generate` / `stream` sample: they take no sampling argument themselves."""
    token = _active.set(spec)
    try:
        yield spec
    finally:
        _active.reset(token)


def choose(
    logits: torch.Tensor,
    spec: Sampling = GREEDY,
    generated: list[int] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token of every sequence, [B], from `logits` [B, V] by `spec`; `generated`: the
    ids this continuation produced so far (what `spec.allowed` is asked about)."""
    if spec.is_greedy:
        return logits.argmax(dim=-1)
    scores = logits.float()
    vocab = scores.shape[-1]
    if spec.allowed is not None:
        allowed = spec.allowed(list(generated or []))
        if allowed is not None:
            ids = torch.tensor(sorted({int(i) for i in allowed}), device=scores.device)
            if ids.numel() == 0 or int(ids[0]) < 0 or int(ids[-1]) >= vocab:
                raise ValueError(f"allowed() must return token ids in [0, {vocab}), at least one")
            keep = torch.full_like(scores, -math.inf)
            keep[:, ids] = scores[:, ids]
            scores = keep
    banned = set(spec.banned)
    if spec.forbid is not None:
        banned.update(int(i) for i in spec.forbid(list(generated or [])))
    if banned:
        ids = torch.tensor(sorted(i for i in banned if 0 <= i < vocab), dtype=torch.long)
        scores = scores.index_fill(-1, ids.to(scores.device), -math.inf)
    if spec.temperature < torch.finfo(scores.dtype).tiny:  # 0, or 0 in the scores' dtype
        return scores.argmax(dim=-1)
    # Shifted so that the likeliest is 0 first: a tiny temperature then sends the others to -inf
    # (greedy, its limit) instead of every score to inf (no distribution at all).
    scores = (scores - scores.amax(dim=-1, keepdim=True)) / spec.temperature
    if 0 < spec.top_k < vocab:
        kth = scores.topk(spec.top_k, dim=-1).values[:, -1:]  # [B, 1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if spec.top_p < 1:
        ordered, order = scores.sort(dim=-1, descending=True)  # [B, V]
        probs = ordered.softmax(dim=-1)
        # Drop a token once the likelier ones already reach top_p (the likeliest always stays).
        drop = probs.cumsum(dim=-1) - probs >= spec.top_p
        scores = scores.scatter(-1, order, ordered.masked_fill(drop, -math.inf))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.inference_mode()
def prefill(
    model: torch.nn.Module,
    cache: Cache,
    input_ids: torch.Tensor,
    *,
    chunk: int,
    progress: bool = False,
) -> torch.Tensor:
    """Feed `input_ids` [B, T] in chunks of `chunk` tokens; returns the last logits [B, V]."""
    steps = prefill_steps(model, cache, input_ids, chunk=chunk, progress=progress)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


@torch.inference_mode()  # torch enters it again at each resumption of the generator
def prefill_steps(
    model: torch.nn.Module,
    cache: Cache,
    input_ids: torch.Tensor,
    *,
    chunk: int,
    progress: bool = False,
) -> Generator[None, None, torch.Tensor]:
    """`prefill`, pausing after each chunk (a scheduler runs other work there); its return
    value (StopIteration's) is the last logits."""
    if input_ids.shape[1] == 0:
        raise ValueError("prefill needs at least one token")
    total = input_ids.shape[1]
    bar = tqdm(total=total, unit="tok", desc="prefill", leave=False, disable=not progress)
    graphed = None  # captured chunk steps, once agentmem's memory is in a steady state
    try:
        with bar:
            for first in range(0, total, chunk):
                piece = input_ids[:, first : first + chunk]
                whole = piece.shape[1] == chunk
                if graphed is not None and not whole:  # a last, shorter piece: ordinary steps
                    graphed.close()
                    graphed = None
                if graphed is None and whole and total - first >= GRAPH_MIN_TOKENS:
                    graphed = static_chunks(model, cache, chunk, remaining=total - first)
                if graphed is not None and whole:
                    logits = graphed.run(piece)
                else:
                    out = model(
                        input_ids=piece,
                        **cache_kwargs(model, cache),
                        use_cache=True,
                        logits_to_keep=1,
                    )
                    logits = out.logits[:, -1]
                bar.update(piece.shape[1])
                if first + chunk < total:
                    yield
        if graphed is not None:
            logits = logits.clone()  # a graph's buffer: copied before the graph goes
    finally:
        if graphed is not None:
            graphed.close()
    return logits


@torch.inference_mode()
def decode_one_token(model: torch.nn.Module, cache: Cache, token: torch.Tensor) -> torch.Tensor:
    """Feed one token per sequence, `token` [B]; returns the next logits [B, V]."""
    out = model(
        input_ids=token[:, None], **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1
    )
    return out.logits[:, -1]


def greedy(
    model: torch.nn.Module,
    cache: Cache,
    logits: torch.Tensor,
    *,
    max_new_tokens: int,
    stop_ids: set[int] = frozenset(),
    sampling: Sampling | None = None,
) -> Iterator[int]:
    """Continuation of batch 0 from `logits` [B, V]; yields token ids. Greedy unless `sampling`
    (or, without it, the `Sampling` active where the first token is asked for) says otherwise.

    The last yielded token is not fed to the model: the caller decides whether it enters the cache.
    Stops after `max_new_tokens` or after yielding a token of `stop_ids`. On an AgentMemCache on a
    GPU, long continuations decode from a CUDA graph (`agentmem.hf.graphs.StaticDecoder`).
    """
    spec = sampling if sampling is not None else _active.get()
    generator = spec.generator(logits.device)
    generated: list[int] = []
    decoder = None
    if max_new_tokens >= GRAPH_MIN_NEW_TOKENS:
        decoder = static_decoder(model, cache, max_new_tokens)
    try:
        for step in range(max_new_tokens):
            token = choose(logits, spec, generated, generator)  # [B]
            token_id = int(token[0])  # the one read-back a step: the caller wants the token
            generated.append(token_id)
            last = token_id in stop_ids or step == max_new_tokens - 1
            if last and decoder is not None:  # before the caller may feed the memory itself
                decoder.close()
            yield token_id
            if last:
                return
            if decoder is not None:
                logits = decoder.step(token)
            else:
                logits = decode_one_token(model, cache, token)
    finally:
        if decoder is not None:
            decoder.close()
