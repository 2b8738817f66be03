"""Functional mixers, one family per folder."""

from causalmix.ops.softmax import AttentionOutput, softmax_attention

__all__ = ["AttentionOutput", "softmax_attention"]
