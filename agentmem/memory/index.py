"""A FAISS index over one layer's unit representatives: candidate units, re-scored exactly.

Scoring every representative (`unit_mass`) costs a step time in proportion to the memory, so a
long prefill's cost grows with the square of its length; on the CPU it becomes most of the time.
With `MemoryConfig(index="faiss")` each (batch, key head) keeps an HNSW graph over its units'
representatives, added as units are packed. A step searches it with a sample of its scoring
queries, keeps the units of the best hits, and scores only those exactly for its top-k: the cost
of a step then grows with the logarithm of the memory. Representatives are pre-RoPE and the
queries rotated to the scoring distance, so a query's inner product with a representative is its
logit, as in the exact scan. The graphs are derived data: never saved, rebuilt when needed.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch

from agentmem_kernels import score_units

GRAPH_DEGREE = 32  # HNSW's M: links per vector
BUILD_BREADTH = 64  # efConstruction: candidates weighed when a vector is linked in
SEARCH_BREADTH = 64  # efSearch: candidates weighed per query
SEARCH_QUERIES = 128  # scoring queries per (batch, key head) a step searches with, evenly spaced
HITS_PER_QUERY = 32  # representatives each search query returns
CANDIDATES_PER_UNIT_KEPT = 8  # units scored exactly: this many times topk, at most


class UnitIndex:
    """HNSW graphs (inner product) over the representatives [B, Hkv, N, R, D] of one layer,
    one per (batch, key head); representative j of unit u is vector u * R + j."""

    def __init__(self) -> None:
        self.graphs: list[faiss.IndexHNSWFlat] = []  # batch-major: b * Hkv + h
        self.n_units = 0
        self.reps_per_unit = 0

    def sync(self, reps: torch.Tensor) -> None:
        """Index the units of `reps` not indexed yet (the memory only grows; a smaller one, or
        one of another shape, starts the graphs afresh)."""
        batch, heads, n_units, per_unit, dim = reps.shape
        if n_units < self.n_units or len(self.graphs) != batch * heads:
            self.graphs, self.n_units = [], 0
        if not self.graphs:
            self.reps_per_unit = per_unit
            for _ in range(batch * heads):
                graph = faiss.IndexHNSWFlat(dim, GRAPH_DEGREE, faiss.METRIC_INNER_PRODUCT)
                graph.hnsw.efConstruction = BUILD_BREADTH
                graph.hnsw.efSearch = SEARCH_BREADTH
                self.graphs.append(graph)
        if n_units == self.n_units:
            return
        new = reps[:, :, self.n_units :].detach().float().cpu().flatten(2, 3).numpy()
        for flat, graph in enumerate(self.graphs):
            graph.add(np.ascontiguousarray(new[flat // heads, flat % heads]))
        self.n_units = n_units

    def candidates(
        self, q: torch.Tensor, heads: int, limit: int, scale: float
    ) -> list[torch.Tensor]:
        """Up to `limit` unit ids per (batch, key head), batch-major, from the hits of up to
        SEARCH_QUERIES of the queries [B, Hq, T, D] that read that key head: ranked as
        `unit_mass` ranks units, over the hits alone (each query's softmax over its hits, a
        unit's logit its best representative's, summed over the queries)."""
        batch, n_q_heads, n_queries, dim = q.shape
        group = n_q_heads // heads
        rows = q.detach().float().cpu().reshape(batch, heads, group * n_queries, dim)
        pick = torch.linspace(0, rows.shape[2] - 1, min(SEARCH_QUERIES, rows.shape[2]))
        rows = rows[:, :, pick.round().long()].numpy()
        hits = min(HITS_PER_QUERY, self.n_units * self.reps_per_unit)
        out = []
        for flat, graph in enumerate(self.graphs):
            queries = np.ascontiguousarray(rows[flat // heads, flat % heads])
            scores, labels = graph.search(queries, hits)  # [n, hits], best first
            logits = torch.from_numpy(scores) * scale
            units = torch.from_numpy(labels // self.reps_per_unit)
            missing = torch.from_numpy(labels < 0)
            logits[missing], units[missing] = float("-inf"), self.n_units
            # One logit per (query, unit hit): its best representative's.
            found, column = torch.unique(units, return_inverse=True)
            best = torch.full((len(queries), len(found)), float("-inf"))
            best.scatter_reduce_(1, column, logits, reduce="amax")
            mass = torch.softmax(best, dim=1).nan_to_num(0.0).sum(dim=0)
            real = found < self.n_units
            found, mass = found[real], mass[real]
            out.append(found[torch.argsort(mass, descending=True, stable=True)][:limit])
        return out


def indexed_top_units(
    index: UnitIndex, q: torch.Tensor, reps: torch.Tensor, *, k: int, kind: str, scale: float
) -> torch.Tensor:
    """Ids [B, Hkv, k] of the top-k units of `reps` [B, Hkv, N, R, D] (N >= k) for the scoring
    queries `q`, ascending: the index's candidates (at most CANDIDATES_PER_UNIT_KEPT * k per key
    head, the latest units making up any shortfall below k), scored exactly by `score_units`."""
    index.sync(reps)
    batch, heads = reps.shape[:2]
    group = q.shape[1] // heads
    found = index.candidates(q, heads, CANDIDATES_PER_UNIT_KEPT * k, scale)
    ids = torch.empty(batch, heads, k, dtype=torch.long, device=q.device)
    for flat, units in enumerate(found):
        b, h = divmod(flat, heads)
        if len(units) < k:  # too few hits: the most recent units not found fill up
            latest = torch.arange(reps.shape[2] - 1, -1, -1)
            latest = latest[~torch.isin(latest, units)][: k - len(units)]
            units = torch.cat((units, latest))
        units = units.to(q.device)
        chosen = score_units(
            q[b : b + 1, h * group : (h + 1) * group], reps[b : b + 1, h : h + 1, units],
            kind=kind, scale=scale, k=k,
        )  # fmt: skip
        ids[b, h] = torch.sort(units[chosen[0, 0]]).values
    return ids
