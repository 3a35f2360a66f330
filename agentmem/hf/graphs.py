"""Decoding one token per step with fixed shapes, the whole model step replayed from a CUDA graph.

Framework overhead (Python, launches) costs more per token than the attention of a small model, so
decoding at 1M tokens can only be as cheap as at 4K once it is gone. `StaticDecoder` puts every
memory layer into static mode (counts on the device, buffers that do not move), captures one model
step, and replays it; between replays the host packs a unit every `unit_size` tokens and grows the
pool (capturing again) when it fills. Nothing in a step is read back to the host.
"""

from __future__ import annotations

import torch
from torch import nn

from agentmem.hf.cache import AgentMemCache
from agentmem.memory.layer import SlidingLayer
from agentmem_kernels import capturable


class StaticDecoder:
    """Greedy-ready one-token steps over a filled `AgentMemCache`.

    Args:
        model: the wrapped model the cache belongs to.
        cache: its memory, in a steady state (sinks full, at least topk units in every layer).
        unit_room: units each layer's pool takes before it must grow (and the step be captured
            again).
        graph: capture a CUDA graph (default: where the kernels allow it, `capturable`); off, the
            same fixed-shape step runs eagerly (how it runs on the CPU).
    """

    def __init__(
        self, model: nn.Module, cache: AgentMemCache, *, unit_room: int = 256,
        graph: bool | None = None,
    ) -> None:  # fmt: skip
        if any(isinstance(layer.state, SlidingLayer) for layer in cache.layers):
            raise ValueError("static decoding does not support sliding-window layers yet")
        self.model, self.cache = model, cache
        self.layers = cache.memory_layers
        for layer in self.layers:
            if (problem := layer.static_problem()) is not None:
                raise ValueError(problem)
        first = self.layers[0].local_k
        self.token = torch.zeros(first.shape[0], 1, dtype=torch.long, device=first.device)
        self.use_graph = capturable(first.device, first.shape[-1]) if graph is None else graph
        self.unit_room = unit_room
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self._start()

    @torch.inference_mode()
    def _start(self) -> None:
        for layer in self.layers:
            layer.start_static(layer.units.n_units + self.unit_room)
            layer.before_static_step()  # a full local window is packed before the first capture
        if self.use_graph:
            self._capture()

    def _forward(self) -> torch.Tensor:
        out = self.model(
            input_ids=self.token, past_key_values=self.cache, use_cache=True, logits_to_keep=1
        )
        return out.logits[:, -1]

    def _capture(self) -> None:
        # A warm-up run compiles kernels and fills allocator pools; it changes device state (a
        # slot written, counts advanced, mass added), which is put back before capturing.
        saved = [(layer.counts.clone(), layer.local[2].buffer.clone()) for layer in self.layers]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        for layer, (counts, mass) in zip(self.layers, saved, strict=True):
            layer.counts.copy_(counts)
            layer.local[2].buffer.copy_(mass)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence, `token` [B]; returns the next logits [B, V] (with a graph,
        a buffer the next step overwrites)."""
        if any(layer.n_local + 1 > layer.config.n_local and layer.static_room < 1
               for layer in self.layers):  # fmt: skip
            self.unit_room *= 2  # the pool must move: capture again, with more room
            self._start()
        for layer in self.layers:
            layer.before_static_step()
        self.token.copy_(token.view(-1, 1))
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._forward()
        for layer in self.layers:
            layer.after_static_step()
        return logits

    def close(self) -> None:
        """Back to ordinary steps (the memory stays as decoding left it)."""
        for layer in self.layers:
            layer.stop_static()
        self.graph = None
