"""agentmem's transformers `Cache`: one memory state per layer, behind the standard cache contract.

Global layers hold a `MemoryLayer` (unbounded memory, finite window), sliding-window layers a
`SlidingLayer` (their own bounded cache). `update` only hands the step's pre-RoPE keys and values to
the layer's state; the registered attention function does the rest.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from agentmem.config import MemoryConfig
from agentmem.memory.layer import MemoryLayer
from agentmem.memory.sliding import SlidingLayer


class AgentMemCacheLayer(CacheLayerMixin):
    """Adapts a `MemoryLayer` or `SlidingLayer` to transformers' per-layer cache contract."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, state: MemoryLayer | SlidingLayer) -> None:
        super().__init__()
        self.state = state
        self.is_sliding = isinstance(state, SlidingLayer)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.is_initialized = True
        self.state.store(key_states, value_states)
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.state.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.state.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("agentmem memory does not support beam search")

    def reset(self) -> None:
        """Forget everything: the layer is an empty memory of the same layout again."""
        if self.state.static_armed:
            raise RuntimeError("a memory in the middle of a captured step cannot be reset")
        self.state = self.state.empty()
        self.is_initialized = False

    # transformers' other per-layer operations assume a plain growing K/V tensor; agentmem's
    # memory is append-only and keeps its own tiers, so each is refused, saying what to do.
    def offload(self) -> None:
        raise NotImplementedError(
            "agentmem keeps its memory's tiers itself; build the cache without offloading"
        )

    def prefetch(self) -> None:
        self.offload()

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(
            "agentmem memory is append-only and cannot be cropped (assisted and speculative "
            "decoding need that); start a new cache, or a new session, for another continuation"
        )

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("agentmem memory holds one stream; it cannot be repeated")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("agentmem memory holds one stream; it cannot be re-batched")


class AgentMemCache(Cache):
    """The KV memory of one stream (a session): per-layer states plus the config they follow."""

    def __init__(self, states: list[MemoryLayer | SlidingLayer], config: MemoryConfig) -> None:
        super().__init__(layers=[AgentMemCacheLayer(state) for state in states])
        self.config = config

    @property
    def memory_layers(self) -> list[MemoryLayer]:
        """The states of the global-attention layers, in layer order."""
        return [layer.state for layer in self.layers if isinstance(layer.state, MemoryLayer)]

    @property
    def sliding_layers(self) -> list[SlidingLayer]:
        """The states of the sliding-window layers, in layer order."""
        return [layer.state for layer in self.layers if isinstance(layer.state, SlidingLayer)]

    def state(self, layer_idx: int) -> MemoryLayer | SlidingLayer:
        return self.layers[layer_idx].state

    def nbytes(self) -> int:
        """Bytes held by every layer's keys, values and representatives."""
        return sum(layer.state.nbytes() for layer in self.layers)

    def host_nbytes(self) -> int:
        """Bytes of `nbytes` in host memory: the unit pools of a tiered memory (`device_units`)."""
        return sum(layer.host_nbytes() for layer in self.memory_layers)

    def state_dict(self, units_from: list[int] | None = None) -> dict:
        """Every layer's state: {"meta": {"memory", "layers"}, "tensors": {"<layer>.<name>"}}.

        `units_from[i]`: memory layer i's units already saved (left out); see
        `MemoryLayer.state_dict`. Tensors are views, not copies.
        """
        metas, tensors = [], {}
        saved = iter(units_from or [0] * len(self.memory_layers))
        for index, layer in enumerate(self.layers):
            state = layer.state
            if isinstance(state, MemoryLayer):
                part = state.state_dict(next(saved))
            else:
                part = state.state_dict()
            metas.append(part["meta"])
            tensors.update({f"{index}.{name}": t for name, t in part["tensors"].items()})
        return {"meta": {"memory": self.config.model_dump(), "layers": metas}, "tensors": tensors}

    def load_state_dict(self, state: dict) -> None:
        """Hold exactly what `state_dict()` (with every unit) gave; tensors are taken, not
        copied, so move them to the model's device first."""
        metas = state["meta"]["layers"]
        if len(metas) != len(self.layers):
            raise ValueError(
                f"the state holds {len(metas)} layers, this model's cache {len(self.layers)}"
            )
        for index, (layer, meta) in enumerate(zip(self.layers, metas, strict=True)):
            prefix = f"{index}."
            tensors = {
                name[len(prefix) :]: t for name, t in state["tensors"].items()
                if name.startswith(prefix)
            }  # fmt: skip
            layer.state.load_state_dict({"meta": meta, "tensors": tensors})
            layer.is_initialized = meta["seen"] > 0
