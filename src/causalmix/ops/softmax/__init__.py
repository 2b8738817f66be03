"""Softmax attention under any visibility spec (``q: [B, Tq, Hq, D]``)."""

from causalmix.ops.softmax.api import AttentionOutput, available_impls, softmax_attention
from causalmix.ops.softmax.merge import MergedSoftmax, merge_softmax

__all__ = ["AttentionOutput", "available_impls", "softmax_attention"]
__all__ += ["MergedSoftmax", "merge_softmax"]
