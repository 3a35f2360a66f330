"""The one configuration object of agentmem: how the KV memory is cut, retrieved and positioned.

`MemoryConfig` is frozen and validated on construction; impossible combinations raise a `ValueError`
that names the field to change. `PRESETS` holds named configurations (`MemoryConfig.preset(name)`).
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

Position = Literal["infllm", "stacked", "contiguous", "selfextend", "streaming", "full"]
Representative = Literal["attention", "mean", "minmax"]
Index = Literal["exact", "faiss"]

POSITIONS: tuple[str, ...] = get_args(Position)
RETRIEVING_POSITIONS = ("infllm", "stacked", "contiguous", "selfextend")


class MemoryConfig(BaseModel):
    """How every global-attention layer turns an unbounded stream into a finite attention window.

    Each query attends to `[n_init sinks | topk units of unit_size tokens | n_local recent tokens]`,
    so at most `window` keys, however long the memory grows.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    unit_size: int = Field(64, gt=0, description="tokens per memory unit")
    n_init: int = Field(64, ge=0, description="first tokens of the stream, always attended (sinks)")
    n_local: int = Field(
        960, gt=0, description="most recent tokens, always attended (local window)"
    )
    topk: int = Field(
        16, ge=0, description="memory units retrieved per step (prefill chunk or token)"
    )
    query_window: int = Field(
        32,
        gt=0,
        description="queries that choose a step's units: a step of fewer tokens (decoding, the "
        "last token of an append) scores the units with its own queries and those of the tokens "
        "just before it, up to this many; 1: its own only",
    )
    repr_topk: int = Field(8, gt=0, description="representative keys per unit")
    repr: Representative = Field(
        "mean",
        description="attention: the repr_topk keys that received most attention; mean: means of "
        "repr_topk equal slices; minmax: per-slice min/max bounding boxes (Quest)",
    )
    exec_chunk: int = Field(512, gt=0, description="tokens per prefill step")
    position: Position = Field("infllm", description="how the window's keys are positioned")
    selfextend_group: int = Field(8, gt=0, description="SelfExtend group size G")
    selfextend_window: int = Field(512, gt=0, description="SelfExtend neighbour window W")
    index: Index = Field(
        "exact",
        description="how a step finds its units: exact scores every representative; faiss "
        "scores exactly only the candidates an HNSW index of the representatives proposes "
        "(agentmem.memory.index), once a layer holds index_min_units units",
    )
    index_min_units: int = Field(
        1024, gt=0, description="units a layer holds before index='faiss' is consulted"
    )
    retrieve_every: int = Field(
        1,
        gt=0,
        description="decoding retrieves its units every this many tokens; the tokens between "
        "attend the units the last retrieval chose (their queries still join the query window); "
        "1: every token. Prefill chunks always retrieve",
    )
    device_units: int | None = Field(
        None,
        gt=0,
        description="KV tiers: unit keys and values live in host memory (pinned on CUDA) and "
        "a device cache of this many units per layer and KV head holds the recently retrieved "
        "ones (least recently used out first; agentmem.memory.tiers); None: every unit on the "
        "memory's device",
    )

    @model_validator(mode="after")
    def _check(self) -> MemoryConfig:
        if self.repr_topk > self.unit_size:
            raise ValueError(
                f"repr_topk={self.repr_topk} exceeds unit_size={self.unit_size}: "
                "a unit cannot have more representatives than tokens; lower repr_topk"
            )
        if self.repr in ("mean", "minmax") and self.unit_size % self.repr_topk:
            raise ValueError(
                f"repr='{self.repr}' cuts each unit into repr_topk={self.repr_topk} equal slices, "
                f"which needs unit_size ({self.unit_size}) divisible by repr_topk"
            )
        if self.position in RETRIEVING_POSITIONS and self.topk == 0:
            raise ValueError(
                f"position='{self.position}' with topk=0 retrieves nothing; "
                "set topk >= 1, or use position='streaming' for sinks + local only"
            )
        if self.position != "full" and self.exec_chunk + self.unit_size > self.n_local + 1:
            raise ValueError(
                f"exec_chunk={self.exec_chunk} does not fit the local window: a prefill step must "
                f"leave room for whole units to be packed, so exec_chunk + unit_size "
                f"({self.unit_size}) "
                f"must be <= n_local + 1 ({self.n_local + 1}); lower exec_chunk or raise n_local"
            )
        if self.index == "faiss" and self.repr == "minmax":
            raise ValueError(
                "index='faiss' searches representatives by inner product, which bounding "
                "boxes (repr='minmax') are not scored by; use repr='mean' or 'attention', or "
                "index='exact'"
            )
        if self.device_units is not None:
            if self.position not in ("infllm", "stacked"):
                raise ValueError(
                    f"device_units (KV tiers) needs position 'infllm' or 'stacked', whose steps "
                    f"read the units from the device cache; position='{self.position}' gathers "
                    "them itself; drop device_units or change position"
                )
            if self.device_units < self.topk:
                raise ValueError(
                    f"device_units={self.device_units} cannot hold the topk={self.topk} units "
                    "one step attends; raise device_units to at least topk"
                )
        if self.position == "selfextend" and self.selfextend_window % self.selfextend_group:
            raise ValueError(
                f"selfextend_window={self.selfextend_window} must be a multiple of "
                f"selfextend_group={self.selfextend_group} so grouped distances continue the "
                "neighbour distances without a gap"
            )
        return self

    def same_layout(self, other: MemoryConfig) -> bool:
        """Whether a memory made under `other` is one this layout holds: every field alike but
        those that only say how units are found, how often, or where they are kept (`index`,
        `index_min_units`, `retrieve_every`, `device_units`)."""
        ignored = {"index", "index_min_units", "retrieve_every", "device_units"}
        return self.model_dump(exclude=ignored) == other.model_dump(exclude=ignored)

    @property
    def retrieves(self) -> bool:
        """Whether units are retrieved into the window (False for streaming and full)."""
        return self.position in RETRIEVING_POSITIONS

    @property
    def window(self) -> int | None:
        """Most keys one query attends to, or None for `full` (unbounded)."""
        if self.position == "full":
            return None
        retrieved = self.topk * self.unit_size if self.retrieves else 0
        return self.n_init + retrieved + self.n_local

    @classmethod
    def preset(cls, name: str, **overrides: object) -> MemoryConfig:
        """A named preset, optionally with some fields changed."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset '{name}'; choose one of {sorted(PRESETS)}")
        # Rebuilt rather than copied, so the overrides are validated too.
        return cls(**{**PRESETS[name].model_dump(), **overrides})


PRESETS: dict[str, MemoryConfig] = {
    # 2048 keys per query: 64 sinks + 16 x 64 retrieved + 960 local; each unit scored by the
    # means of its eight 8-token slices, with the latest 32 queries (benchmarks/RESULTS.md).
    "default": MemoryConfig(),
    # A 4K window for long contexts on GPU: 128 sinks + 32 x 64 retrieved + 1920 local.
    "4k": MemoryConfig(n_init=128, topk=32, n_local=1920, exec_chunk=1024),
    # The InfLLM paper's layout (its Mistral config): 128-token units, each represented by the 4
    # keys that received most attention, chosen by the step's own queries.
    "infllm-paper": MemoryConfig(
        n_init=128,
        unit_size=128,
        topk=16,
        n_local=4096,
        repr="attention",
        repr_topk=4,
        query_window=1,
        exec_chunk=512,
    ),
    # ReAttention's rule: the window renumbered 0..W-1, retrieved units in stream order.
    "contiguous": MemoryConfig(position="contiguous"),
    # StreamingLLM baseline: sinks + local, the middle is dropped.
    "streaming": MemoryConfig(position="streaming", topk=0, n_init=64, n_local=1984),
    # Plain attention over everything (a reference, grows without bound).
    "full": MemoryConfig(position="full", topk=0),
}
