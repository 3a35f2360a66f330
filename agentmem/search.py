"""The model side of cross-session search: FAISS indexes of unit representatives, and query vectors.

Each save adds `segment_index(state)` to its segment: an `IndexIDMap2(IndexFlatIP)` of the new
units' representatives, and one of the parts not packed yet (sinks, local window), which only the
newest segment's counts. `QueryEncoder(lm)` reads a query as retrieval would and gives the store
(`Store.search`, which never imports model code) one vector per memory layout to search with.
"""

from __future__ import annotations

import json

import faiss
import numpy as np
import torch

from agentmem.config import MemoryConfig
from agentmem.generate import prefill
from agentmem.hf.wrap import new_cache
from agentmem.memory.layer import MemoryLayer
from agentmem.persistence.search import TAIL, UNITS, span_id
from agentmem_kernels import rope

CACHED_QUERIES = 16  # texts whose queries a QueryEncoder keeps

# -- indexes: built from a session's state at save ------------------------------------------------


def _slots(reps: torch.Tensor, kind: str) -> torch.Tensor:
    """[..., R, D] representatives -> the vectors an inner product scores: minmax boxes (R/2
    mins then R/2 maxes) are searched by their centres, an approximation of the box bound."""
    if kind == "minmax":
        half = reps.shape[-2] // 2
        return (reps[..., :half, :].float() + reps[..., half:, :].float()) / 2
    return reps.float()


def _chunk_reps(keys: torch.Tensor, mass: torch.Tensor | None, kind: str, r: int) -> torch.Tensor:
    """Representatives [H, r', D] of a run of not yet packed keys [H, m, D] (r' = min(r, m)):
    top-r' by attention received where that is the kind and known, else means of r' slices."""
    r = min(r, keys.shape[1])
    if kind == "attention" and mass is not None:
        top = torch.sort(torch.topk(mass, r, dim=-1).indices, dim=-1).values  # [H, r]
        return torch.gather(keys, 1, top.unsqueeze(-1).expand(*top.shape, keys.shape[-1])).float()
    slices = torch.tensor_split(keys.float(), r, dim=1)
    return torch.stack([s.mean(dim=1) for s in slices], dim=1)


def _index(vectors: list[np.ndarray], ids: list[int], dim: int) -> torch.Tensor:
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if vectors:
        index.add_with_ids(np.stack(vectors).astype(np.float32), np.asarray(ids, dtype=np.int64))
    return torch.from_numpy(faiss.serialize_index(index))


def segment_index(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """The search part of a save of `state` (`Session.state_dict(units_from=...)`): tensors
    {UNITS, TAIL} and meta (the layout); nothing for a layout
    without units to retrieve (no memory layer, `full`, `streaming`).

    A vector is one representative slot of one unit, its (memory layer, key head) blocks
    concatenated, so that one inner product sums the blocks' dot products (`QueryEncoder`)."""
    metas, tensors = state["meta"]["layers"], state["tensors"]
    layers = [i for i, m in enumerate(metas) if m["kind"] == "memory"]
    if not layers:
        return {}, {}
    memory = MemoryConfig(**metas[layers[0]]["memory"])
    if not memory.retrieves:  # full / streaming: no units (and a window that may be everything)
        return {}, {}
    first = metas[layers[0]]
    heads, dim = next(
        (t.shape[1], t.shape[-1]) for i in layers for name in ("reps", "local_k", "sink_k")
        if (t := tensors.get(f"{i}.{name}")) is not None
    )  # fmt: skip
    width = len(layers) * heads * dim
    unit_vectors, unit_ids = [], []
    if f"{layers[0]}.reps" in tensors:
        reps = torch.stack([_slots(tensors[f"{i}.reps"][0], memory.repr) for i in layers])
        n_units, slots = reps.shape[2], reps.shape[3]  # [L, H, N, R, D]
        flat = reps.permute(2, 3, 0, 1, 4).reshape(n_units, slots, width).numpy()
        start = first["units_start"] + first["units_from"] * memory.unit_size
        for u in range(n_units):
            for r in range(slots):
                unit_vectors.append(flat[u, r])
                unit_ids.append(span_id(start + u * memory.unit_size, memory.unit_size, r))
    tail_vectors, tail_ids = [], []
    seen = first["seen"]
    runs = []  # (first token, keys [L, H, m, D], mass [L, H, m] or None)
    if f"{layers[0]}.sink_k" in tensors:  # not the first token: every query attends to it
        runs.append((1, [tensors[f"{i}.sink_k"][0, :, 1:] for i in layers], None))
    if f"{layers[0]}.local_k" in tensors:
        local = [tensors[f"{i}.local_k"][0] for i in layers]
        mass = [tensors[f"{i}.local_mass"][0] for i in layers]
        runs.append((seen - local[0].shape[1], local, mass))
    for begin, keys, mass in runs:
        for lo in range(0, keys[0].shape[1], memory.unit_size):
            hi = min(lo + memory.unit_size, keys[0].shape[1])
            per_layer = [
                _chunk_reps(k[:, lo:hi], None if mass is None else m[:, lo:hi], memory.repr,
                            memory.repr_topk)
                for k, m in zip(keys, mass or [None] * len(keys), strict=True)
            ]  # fmt: skip
            block = torch.stack(per_layer).permute(2, 0, 1, 3).reshape(-1, width).numpy()
            for r, vector in enumerate(block):
                tail_vectors.append(vector)
                tail_ids.append(span_id(begin + lo, hi - lo, r))
    out = {
        UNITS: _index(unit_vectors, unit_ids, width),
        TAIL: _index(tail_vectors, tail_ids, width),
    }
    return out, {"layers": layers, "heads": heads, "head_dim": dim}


# -- queries -------------------------------------------------------------------------------------


class _Recorder(MemoryLayer):
    """A memory layer that keeps the queries of each step it attends (pre-RoPE [B, Hq, T, D])."""

    def __init__(self, config: MemoryConfig, rotary) -> None:
        super().__init__(config, rotary)
        self.queries: list[torch.Tensor] = []
        self.scale = 1.0

    def attend(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        self.queries.append(q.detach().float())
        self.scale = scale
        return super().attend(q, scale)


class QueryEncoder:
    """What `Store.search` reads a query with: a `LanguageModel`'s view of the query text.

    `queries(text, memory)` reads the text in a throwaway memory of the session's layout (no
    session changes) and returns, per memory layer, its queries rotated as `_retrieve` scores
    them (as if each unit sat at distance n_local) and the attention scale. `vector(text,
    memory)` is the one vector the index is searched with: per (memory layer, key head) block,
    the scaled queries summed over the heads that read that key head and averaged over the query
    tokens (BOS left out). Inner products are linear, so one search scores every unit by the sum
    over layers, heads and tokens of its dot products, and the best of its representatives.
    Retrieval takes a softmax per query first; `exact_scores` does that, for comparison.
    """

    def __init__(self, lm) -> None:
        from agentmem.persistent import fingerprint

        self.lm = lm
        self.fingerprint = fingerprint(lm)
        self._queries: dict[tuple[str, str], tuple[list[torch.Tensor], float]] = {}

    def decode(self, ids: list[int]) -> str:
        return self.lm.tokenizer.decode(ids, skip_special_tokens=True)

    def queries(self, text: str, memory: dict) -> tuple[list[torch.Tensor], float]:
        """[Hq, T, D] fp32 rotated queries per memory layer, and the scale (the last few
        texts' kept, so that a search and its comparisons read a query once)."""
        key = (text, json.dumps(memory, sort_keys=True))
        if key not in self._queries:
            if len(self._queries) >= CACHED_QUERIES:
                self._queries.pop(next(iter(self._queries)))
            self._queries[key] = self._read(text, memory)
        return self._queries[key]

    @torch.inference_mode()
    def _read(self, text: str, memory: dict) -> tuple[list[torch.Tensor], float]:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("a search needs a non-empty query string")
        config = MemoryConfig(**memory)
        cache = new_cache(self.lm.model, config)
        recorders = []
        for layer in cache.layers:
            if isinstance(layer.state, MemoryLayer):
                layer.state = _Recorder(layer.state.config, layer.state.rotary)
                recorders.append(layer.state)
        if not recorders:
            raise ValueError("this model has no global-attention layer to search with")
        tokenizer = self.lm.tokenizer
        ids = tokenizer(text, add_special_tokens=True).input_ids
        prefill(self.lm.model, cache, torch.tensor([ids], device=self.lm.device),
                chunk=config.exec_chunk)  # fmt: skip
        skip = 1 if len(ids) > 1 and ids[0] == tokenizer.bos_token_id else 0
        out = []
        for rec in recorders:
            q = torch.cat(rec.queries, dim=2)[0, :, skip:]  # [Hq, T, D]
            distance = min(config.n_local, rec.rotary.max_positions - 1)
            cos, sin = rec.rotary.table(distance + 1, torch.float32, q.device)
            out.append(rope(q, cos[distance], sin[distance]).cpu())
        return out, recorders[0].scale

    def vector(self, text: str, memory: dict) -> np.ndarray:
        """[L * Hkv * D] float32: the query vector for sessions of layout `memory`."""
        queries, scale = self.queries(text, memory)
        heads = self.lm.model.config.num_key_value_heads
        blocks = [scale * q.unflatten(0, (heads, -1)).sum(dim=1).mean(dim=1) for q in queries]
        return torch.cat([b.flatten() for b in blocks]).numpy()


def index_contents(index) -> tuple[np.ndarray, np.ndarray]:
    """(ids [N], vectors [N, d]) held by an `IndexIDMap2(IndexFlatIP)`."""
    ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    return ids, index.index.reconstruct_n(0, index.ntotal)


def exact_scores(
    queries: list[torch.Tensor], scale: float, vectors: np.ndarray, units: np.ndarray, heads: int
) -> np.ndarray:
    """Retrieval's own scoring, as `_retrieve` (`unit_mass`) does per (layer, key head): each
    query spreads a softmax over all the units, a unit's logit its best representative's; a
    unit's score is its mass summed over queries, heads and layers.

    `vectors` [N, d]: index rows (one per representative slot) of the units scored together;
    `units` [N]: which unit each row belongs to, 0..U-1. Returns [U] scores."""
    which = torch.from_numpy(units.astype(np.int64))
    n_units = int(which.max()) + 1
    reps = torch.from_numpy(vectors).view(len(units), len(queries), heads, -1)  # [N, L, H, D]
    total = torch.zeros(n_units)
    for layer, q in enumerate(queries):
        qg = q.unflatten(0, (heads, -1))  # [H, G, T, D]
        logits = torch.einsum("hgtd,nhd->hgtn", qg, reps[:, layer]) * scale  # per slot
        best = torch.full((*logits.shape[:3], n_units), float("-inf"))
        best = best.scatter_reduce(-1, which.expand_as(logits), logits, reduce="amax")
        total += torch.softmax(best, dim=-1).sum(dim=(0, 1, 2))
    return total.numpy()
