"""Generation as small free functions: `prefill`, `decode_one_token`, `greedy` (gpt-fast style).

They take any transformers causal LM and any cache, so the same loop drives a wrapped model on an
AgentMemCache and the full-attention baselines on a DynamicCache. On an AgentMemCache on a GPU,
long prefills replay their steady-state chunks from a CUDA graph (`agentmem.hf.graphs`).
"""

from __future__ import annotations

from collections.abc import Iterator

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
) -> Iterator[int]:
    """Greedy continuation of batch 0 from `logits` [B, V]; yields token ids.

    The last yielded token is not fed to the model: the caller decides whether it enters the cache.
    Stops after `max_new_tokens` or after yielding a token of `stop_ids`. On an AgentMemCache on a
    GPU, long continuations decode from a CUDA graph (`agentmem.hf.graphs.StaticDecoder`).
    """
    decoder = None
    if max_new_tokens >= GRAPH_MIN_NEW_TOKENS:
        decoder = static_decoder(model, cache, max_new_tokens)
    try:
        for step in range(max_new_tokens):
            token = logits.argmax(dim=-1)  # [B]
            token_id = int(token[0])  # the one read-back a step: the caller wants the token
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
