"""causalmix: one visibility spec, every mixer, every execution mode.

The spec and the functional mixers live here; execution modes and models are subpackages:
``causalmix.stream`` (streaming and decode), ``causalmix.distributed`` (sequence parallel),
``causalmix.nn`` (layers and models), ``causalmix.lab`` (experiments).
"""

from causalmix.checks import ArgumentTypeError, UnboundedHorizonError
from causalmix.ops.delta import (
    chunk_delta_attention,
    delta_attention,
    recurrent_delta_attention,
)
from causalmix.ops.linear import (
    LinearOutput,
    chunk_linear_attention,
    linear_attention,
    recurrent_linear_attention,
)
from causalmix.ops.softmax import AttentionOutput, softmax_attention
from causalmix.visibility import (
    AdaptiveLookahead,
    And,
    Causal,
    Chunked,
    Full,
    KeyRange,
    Or,
    Prefix,
    Segments,
    ValidKeys,
    Visibility,
    Window,
)

__version__ = "0.1.0"

__all__ = [
    "AdaptiveLookahead",
    "And",
    "ArgumentTypeError",
    "AttentionOutput",
    "Causal",
    "Chunked",
    "Full",
    "KeyRange",
    "LinearOutput",
    "Or",
    "Prefix",
    "Segments",
    "UnboundedHorizonError",
    "ValidKeys",
    "Visibility",
    "Window",
    "chunk_delta_attention",
    "chunk_linear_attention",
    "delta_attention",
    "linear_attention",
    "recurrent_delta_attention",
    "recurrent_linear_attention",
    "softmax_attention",
]
