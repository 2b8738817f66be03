"""The delta-rule family: DeltaNet / Gated DeltaNet under a visibility spec
(``q: [B, T, H, D]``).

See :mod:`causalmix.ops.delta.api` for the semantics (forward and reverse recurrences, drawn),
the state convention and the head groupings.
"""

from causalmix.ops.delta.api import (
    REGISTRY,
    available_impls,
    chunk_delta_attention,
    delta_attention,
    recurrent_delta_attention,
)
from causalmix.ops.delta.call import DeltaCall
from causalmix.ops.linear import LinearOutput

__all__ = [
    "REGISTRY",
    "DeltaCall",
    "LinearOutput",
    "available_impls",
    "chunk_delta_attention",
    "delta_attention",
    "recurrent_delta_attention",
]
