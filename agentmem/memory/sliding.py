"""Per-layer state of a sliding-window layer (Gemma 3): its own bounded cache, no memory."""

from __future__ import annotations

import torch

from agentmem.memory.pending import PendingKV, shift_in
from agentmem.memory.policy import Rope
from agentmem_kernels import attention, rope


class SlidingLayer:
    """The bounded cache of a sliding-window layer: its last `window - 1` tokens, pre-RoPE.

    Static mode (`start_static`, for `agentmem.hf.graphs`): steps of a fixed number of tokens T
    keep keys and values in one buffer of `window - 1 + T` rows that each step shifts by T in
    place, so that every shape and address stays fixed; the window must be full to start.
    """

    def __init__(self, window: int, rotary: Rope) -> None:
        self.window = window
        self.rotary = rotary
        self.seen = 0
        self.k: torch.Tensor | None = None  # [B, Hkv, <= window - 1 + T, D]
        self.v: torch.Tensor | None = None
        self.pending = PendingKV()
        self.static_tokens: int | None = None  # static mode: tokens per step
        self.static_armed = False  # set by agentmem.hf.graphs around the static steps it runs

    def empty(self) -> SlidingLayer:
        """A new, empty window of this layer's size."""
        return SlidingLayer(self.window, self.rotary)

    def state_dict(self) -> dict:
        """{"meta": ..., "tensors": the last window - 1 keys and values (views)}."""
        if self.static_armed:
            raise RuntimeError("a layer in the middle of a captured step has no state to give")
        keep = self.window - 1
        tensors = {} if self.k is None else {"k": self.k[:, :, -keep:], "v": self.v[:, :, -keep:]}
        return {"meta": {"kind": "sliding", "window": self.window, "seen": self.seen},
                "tensors": tensors}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Hold exactly what `state_dict()` gave (tensors taken, not copied)."""
        meta, tensors = state["meta"], state["tensors"]
        if meta.get("kind") != "sliding" or meta["window"] != self.window:
            raise ValueError(
                f"not the state of a sliding layer of window {self.window} "
                f"({meta.get('kind')!r}, window {meta.get('window')})"
            )
        self.stop_static()
        self.k, self.v, self.seen = tensors.get("k"), tensors.get("v"), meta["seen"]
        self.pending.clear()

    def store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.pending.put(k, v)

    def static_problem(self, tokens: int = 1) -> str | None:
        """Why steps of `tokens` tokens of this layer cannot be captured now, or None."""
        held = 0 if self.k is None else self.k.shape[2]
        if held < self.window - 1 + tokens:
            return (
                f"static steps of {tokens} tokens start once the sliding layer holds "
                f"{self.window - 1 + tokens} tokens (its window and the last step's); "
                f"it holds {held}"
            )
        return None

    def start_static(self, tokens: int = 1) -> None:
        if (problem := self.static_problem(tokens)) is not None:
            raise ValueError(problem)
        rows = self.window - 1 + tokens
        self.k, self.v = self.k[:, :, -rows:].clone(), self.v[:, :, -rows:].clone()
        self.static_tokens = tokens

    def stop_static(self) -> None:
        self.static_tokens = None

    def after_static_step(self) -> None:
        """The host's record of what a replayed step did."""
        self.seen += self.static_tokens

    def attend(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        """Sliding-window attention of the stored step's queries: [B, Hq, T, D] in q's dtype."""
        k_new, v_new = self.pending.take(q.shape[2])
        keep = self.window - 1
        if self.static_tokens is not None and self.static_armed:
            shift_in(self.k, k_new)  # same buffer, same shape
            shift_in(self.v, v_new)
            return self._attend(q, scale)
        self.stop_static()  # an ordinary step: its owner starts static mode again if it resumes
        if self.k is None:
            self.k, self.v = k_new, v_new
        else:
            self.k = torch.cat((self.k[:, :, -keep:], k_new), dim=2)
            self.v = torch.cat((self.v[:, :, -keep:], v_new), dim=2)
        self.seen += q.shape[2]
        return self._attend(q, scale)

    def _attend(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        """The queries (the last T keys' tokens) over the held keys, at most `window` back."""
        n_keys, n_queries = self.k.shape[2], q.shape[2]
        # Keys renumbered from 0: RoPE only sees distances.
        positions = torch.arange(n_keys, device=q.device)
        cos, sin = self.rotary.cos_sin(positions, q.dtype, n_keys)
        keys = rope(self.k, cos, sin)
        queries = rope(q, cos[n_keys - n_queries :], sin[n_keys - n_queries :])
        # Query blocks see overlapping key ranges; blocking skips most of what the window masks.
        block = max(self.window // 4, 64)
        outs = []
        for first in range(0, n_queries, block):
            last = min(first + block, n_queries)
            q_first = n_keys - n_queries + first  # key index of the block's first query
            k_first = max(q_first - self.window + 1, 0)
            k_stop = n_keys - n_queries + last
            out, _, _ = attention(
                queries[:, :, first:last],
                keys[:, :, k_first:k_stop],
                self.v[:, :, k_first:k_stop],
                scale=scale,
                q_abs=positions[q_first:k_stop],
                k_abs=positions[k_first:k_stop],
                max_dist=self.window,
                return_lse=False,
            )
            outs.append(out)
        return torch.cat(outs, dim=2).to(q.dtype)

    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()
