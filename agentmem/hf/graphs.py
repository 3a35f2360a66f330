"""Model steps with fixed shapes, replayed from a CUDA graph: decoding one token at a time, and
prefill chunks once the memory is in a steady state.

Framework overhead (Python, a hundred launches per layer) costs more per step than the attention of
a small model, so decoding at 1M tokens can only be as cheap as at 4K, and a prefill chunk as cheap
as its arithmetic, once it is gone. `StaticSteps` puts every memory layer into static mode (counts
on the device, buffers that do not move), captures one model step and replays it. Between replays
the host only keeps its records (and, decoding, packs a unit every `unit_size` tokens); when the
unit pool fills, it grows and the step is captured again. Sliding-window layers (Gemma 3) keep
their window in one buffer that each step shifts in place. Nothing in a step is read back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from agentmem.hf.cache import AgentMemCache
from agentmem.hf.seam import cache_kwargs
from agentmem_kernels import capturable

logger = logging.getLogger(__name__)


class StaticSteps:
    """Steps of exactly `tokens` tokens over a filled `AgentMemCache`.

    Args:
        model: the wrapped model the cache belongs to.
        cache: its memory, in a steady state (sinks full, at least topk units in every layer; for
            several tokens a step, local windows of more than n_local - unit_size tokens and
            `tokens` a multiple of unit_size).
        tokens: tokens per step (1: decoding).
        unit_room: units each layer's pool takes before it must grow (and the step be captured
            again).
        graph: capture a CUDA graph (default: where the kernels allow it, `capturable`); off, the
            same fixed-shape step runs eagerly (how it runs on the CPU).
    """

    def __init__(
        self, model: nn.Module, cache: AgentMemCache, *, tokens: int = 1, unit_room: int = 256,
        graph: bool | None = None,
    ) -> None:  # fmt: skip
        self.model, self.cache, self.tokens = model, cache, tokens
        self.layers = cache.memory_layers
        self.sliding = cache.sliding_layers
        for layer in self._all_layers:
            if (problem := layer.static_problem(tokens)) is not None:
                raise ValueError(problem)
        first = self.layers[0].local_k
        self.input_ids = torch.zeros(first.shape[0], tokens, dtype=torch.long, device=first.device)
        self.use_graph = capturable(first.device, first.shape[-1]) if graph is None else graph
        # A step must always fit: decoding adds one unit at most, a chunk tokens / unit_size.
        self.unit_room = max(unit_room, tokens // cache.config.unit_size, 1)
        # Captured steps by whether they reuse the last retrieval's units (`retrieve_every`),
        # each with its logits buffer.
        self.graphs: dict[bool, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.reuses = tokens == 1 and cache.config.retrieve_every > 1
        self._start()

    @torch.inference_mode()
    def _start(self) -> None:
        try:
            for layer in self.layers:
                layer.start_static(layer.units.n_units + self.unit_room, self.tokens)
                layer.before_static_step()  # a full window is packed before the first capture
            for layer in self.sliding:
                layer.start_static(self.tokens)
            if self.use_graph:
                self._capture()
        except BaseException:
            # Leave the memory usable by ordinary steps, as the warm-up found it.
            for layer in self.cache.layers:
                layer.state.pending.clear()
            self.close()
            raise

    @property
    def _all_layers(self) -> tuple:
        """Memory and sliding layers: every state a static step changes."""
        return (*self.layers, *self.sliding)

    def _forward(self) -> torch.Tensor:
        out = self.model(
            input_ids=self.input_ids,
            **cache_kwargs(self.model, self.cache),
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    def _capture(self) -> None:
        self._warm_up()
        self.graphs = {}
        for reuse in (False, True) if self.reuses else (False,):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), self._armed(reuse):
                logits = self._forward()
            self.graphs[reuse] = graph, logits

    def _warm_up(self) -> None:
        """One step run and undone: compiles kernels and fills allocator pools before capturing.
        What it changed on the device (counts advanced, mass added, a chunk packed and the window
        moved) is put back; pool rows it wrote lie past the unit count and are overwritten."""
        saved = [
            [part.buffer.clone() for part in (*layer.local, layer.local_rotated)]
            + [layer.counts.clone()]
            for layer in self.layers
        ]
        # The latest queries (query_window > 1), which the step shifts in place; made by it if
        # none were kept yet (zeros then: the state before it).
        saved_queries = [
            None if layer.recent_q is None else layer.recent_q.clone() for layer in self.layers
        ]
        saved_sliding = [(layer.k.clone(), layer.v.clone()) for layer in self.sliding]
        # the last retrieval's units, which the warm-up's own retrieval overwrites
        saved_ids = [
            None if layer.static_ids is None else layer.static_ids.clone() for layer in self.layers
        ]
        stream = torch.cuda.Stream() if self.input_ids.is_cuda else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream) if stream else nullcontext(), self._armed():
                self._forward()
        finally:
            if stream is not None:
                torch.cuda.current_stream().wait_stream(stream)
            for layer, copies in zip(self.layers, saved, strict=True):
                targets = [part.buffer for part in (*layer.local, layer.local_rotated)]
                for target, copy in zip([*targets, layer.counts], copies, strict=True):
                    target.copy_(copy)
            for layer, queries in zip(self.layers, saved_queries, strict=True):
                if queries is not None:
                    layer.recent_q.copy_(queries)
                elif layer.recent_q is not None:
                    layer.recent_q.zero_()
            for layer, (k, v) in zip(self.sliding, saved_sliding, strict=True):
                layer.k.copy_(k)
                layer.v.copy_(v)
            for layer, ids in zip(self.layers, saved_ids, strict=True):
                if ids is not None:
                    layer.static_ids.copy_(ids)

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Feed `input_ids` [B, tokens]; returns the logits after the last [B, V] (with a graph, a
        buffer the next step overwrites)."""
        if tuple(input_ids.shape) != tuple(self.input_ids.shape):
            raise ValueError(f"static steps take {tuple(self.input_ids.shape)} token ids")
        stopped = any(layer.counts is None for layer in self.layers) or any(
            layer.static_tokens is None for layer in self.sliding
        )
        if stopped:
            self._start()  # closed, or ordinary steps ran in between: start (capture) again
        elif any(self._needs_room(layer) for layer in self.layers):
            self.unit_room *= 2  # the pool must move: capture again, with more room
            self._start()
        for layer in self.layers:
            layer.before_static_step()
        self.input_ids.copy_(input_ids)
        # retrieve_every > 1: every layer counts the same tokens, so all reuse or none do
        reuse = self.reuses and self.layers[0].reuses_ids(1, self.layers[0].seen + 1)
        if self.graphs:
            graph, logits = self.graphs[reuse]
            graph.replay()
        else:
            with self._armed(reuse):
                logits = self._forward()
        for layer in self._all_layers:
            layer.after_static_step()
        return logits

    @contextmanager
    def _armed(self, reuse: bool = False) -> Iterator[None]:
        """Model steps inside take the layers' static path (`reuse`: attending the units the
        last retrieval chose)."""
        for layer in self._all_layers:
            layer.static_armed = True
        for layer in self.layers:
            layer.static_reuse = reuse
        try:
            yield
        finally:
            for layer in self._all_layers:
                layer.static_armed = False
            for layer in self.layers:
                layer.static_reuse = False

    def _needs_room(self, layer) -> bool:
        adds = self.tokens > 1 or layer.n_local + 1 > layer.config.n_local
        return adds and layer.static_room < layer.static_units_per_step()

    def close(self) -> None:
        """Back to ordinary steps (the memory stays as the static steps left it)."""
        for layer in self._all_layers:
            layer.stop_static()
        self.graphs = {}


class StaticDecoder(StaticSteps):
    """One-token steps: `step(token [B])` -> logits [B, V]."""

    def __init__(self, model: nn.Module, cache: AgentMemCache, **kwargs) -> None:
        super().__init__(model, cache, tokens=1, **kwargs)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        return self.run(token.view(-1, 1))


def _graphable(cache, tokens: int) -> bool:
    """Whether steps of `tokens` tokens over this cache can be captured now (and no capture
    has failed in this process)."""
    if _capture_failures or not isinstance(cache, AgentMemCache) or not cache.memory_layers:
        return False
    first = cache.memory_layers[0].local_k
    if first is None or not capturable(first.device, first.shape[-1]):
        return False
    return all(layer.state.static_problem(tokens) is None for layer in cache.layers)


def static_chunks(model: nn.Module, cache, tokens: int, remaining: int) -> StaticSteps | None:
    """Captured prefill steps of `tokens` tokens for the `remaining` tokens of a prefill, if this
    cache and device allow them now (else None: the caller steps eagerly)."""
    if not _graphable(cache, tokens):
        return None
    room = remaining // cache.config.unit_size + 2
    return _or_none(lambda: StaticSteps(model, cache, tokens=tokens, unit_room=room))


def static_decoder(model: nn.Module, cache, new_tokens: int) -> StaticDecoder | None:
    """A captured decoder for about `new_tokens` tokens, if this cache and device allow one now
    (else None: the caller decodes eagerly)."""
    if not _graphable(cache, 1):
        return None
    room = new_tokens // cache.config.unit_size + 2
    return _or_none(lambda: StaticDecoder(model, cache, unit_room=room))


def _or_none(build):
    """`build()`, or None (ordinary steps, said once in the log) if capturing failed."""
    try:
        return build()
    except (RuntimeError, torch.OutOfMemoryError) as error:
        if not _capture_failures:
            logger.warning("agentmem: steps run eagerly, capturing a CUDA graph failed: %s", error)
        _capture_failures.append(repr(error))
        return None


_capture_failures: list[str] = []
