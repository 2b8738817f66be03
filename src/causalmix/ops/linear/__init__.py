"""Linear attention with per-head decay under a visibility spec (``q: [B, T, H, D]``).

See :mod:`causalmix.ops.linear.api` for the semantics and the state convention.
"""

from causalmix.ops.factor import factorise
from causalmix.ops.linear.api import (
    REGISTRY,
    LinearOutput,
    available_impls,
    chunk_linear_attention,
    linear_attention,
    recurrent_linear_attention,
)
from causalmix.ops.linear.call import LinearCall, check_gate

__all__ = [
    "REGISTRY",
    "LinearCall",
    "LinearOutput",
    "available_impls",
    "check_gate",
    "chunk_linear_attention",
    "factorise",
    "linear_attention",
    "recurrent_linear_attention",
]
