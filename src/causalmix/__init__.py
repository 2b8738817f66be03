"""causalmix: one visibility spec, every mixer, every execution mode."""

from causalmix.ops.softmax import AttentionOutput, softmax_attention
from causalmix.visibility import (
    And,
    Causal,
    Chunked,
    Full,
    Or,
    Prefix,
    Segments,
    Visibility,
    Window,
)

__version__ = "0.1.0"

__all__ = [
    "And",
    "AttentionOutput",
    "Causal",
    "Chunked",
    "Full",
    "Or",
    "Prefix",
    "Segments",
    "Visibility",
    "Window",
    "softmax_attention",
]
