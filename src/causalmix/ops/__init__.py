"""Functional mixers, one family per folder: ``softmax/``, ``linear/`` and ``delta/``."""

from causalmix.ops.delta import (
    chunk_delta_attention,
    delta_attention,
    recurrent_delta_attention,
)
from causalmix.ops.linear import LinearOutput, linear_attention
from causalmix.ops.softmax import AttentionOutput, softmax_attention

__all__ = ["AttentionOutput", "LinearOutput", "chunk_delta_attention", "delta_attention",
           "linear_attention", "recurrent_delta_attention", "softmax_attention"]
