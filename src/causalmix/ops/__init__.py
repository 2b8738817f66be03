"""Functional mixers, one family per folder: ``softmax/`` and ``linear/``."""

from causalmix.ops.linear import LinearOutput, linear_attention
from causalmix.ops.softmax import AttentionOutput, softmax_attention

__all__ = ["AttentionOutput", "LinearOutput", "linear_attention", "softmax_attention"]
