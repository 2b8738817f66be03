"""Linear attention with per-head decay under a visibility spec (``q: [B, T, H, D]``).

See :mod:`causalmix.ops.linear.api` for the semantics and the state convention.
"""

from causalmix.ops.factor import factorise
from causalmix.ops.linear.api import (
    LinearOutput,
    available_impls,
    chunk_linear_attention,
    linear_attention,
    recurrent_linear_attention,
)

__all__ = [
    "LinearOutput",
    "available_impls",
    "chunk_linear_attention",
    "factorise",
    "linear_attention",
    "recurrent_linear_attention",
]
