"""agentmem's attention and retrieval kernels.

`reference` holds the exact pure-torch implementation of every entry point; it runs on any device
and is what faster kernels are tested against.
"""

from agentmem_kernels import reference
from agentmem_kernels.reference import (
    KeySegment,
    attention,
    gather_units,
    merge,
    rope,
    score_units,
    segment_attention,
    unit_logits,
)

__all__ = [
    "KeySegment",
    "attention",
    "gather_units",
    "merge",
    "reference",
    "rope",
    "score_units",
    "segment_attention",
    "unit_logits",
]
