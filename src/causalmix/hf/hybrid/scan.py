"""The delta-rule scan of the hybrid layers (Gated DeltaNet, KDA) and its cache update: one
place for what both layers do after their projections and short convolution."""

from __future__ import annotations

import torch

from causalmix.hf.hybrid.context import LayerCall, record_positions
from causalmix.hf.hybrid.conv import ConvOutput
from causalmix.ops.delta import delta_attention

__all__ = ["CHUNK", "delta_scan"]

#: Tile length of the delta scans (transformers' torch path tiles by 64 too).
CHUNK = 64


def delta_scan(module: torch.nn.Module, call: LayerCall, cache, conv: ConvOutput,
               inputs: tuple[torch.Tensor, ...], *, t: int, dtype: torch.dtype) -> torch.Tensor:
    """Run ``inputs = (q, k, v, beta, log_gate)`` (``[B, t, H, D]`` layout; gates scalar
    ``[B, t, H]`` or per key dimension ``[B, t, H, Dk]``) through :func:`delta_attention`
    under ``call``'s spec and offsets, from the cached recurrent state; with a ``cache``, store
    the final state, the convolution's window (``conv.window``, stored in ``dtype``: the
    layer's activations') and the positions seen.
    Returns the output ``[B, t, H, Dv]`` in ``v``'s dtype."""
    q, k, v, beta, log_gate = inputs
    state = call.recurrent_state
    out = delta_attention(q, k, v, call.spec, beta=beta, log_gate=log_gate,
                          q_offset=call.offset, k_offset=call.offset,
                          initial_state=None if state is None else state.to(v.dtype),
                          return_final_state=cache is not None, chunk_size=CHUNK)
    if cache is None:
        return out
    out, final = out
    cache.update_conv_state(conv.window.to(dtype), module.layer_idx,
                            conv_kernel_size=module.conv_kernel_size)
    cache.update_recurrent_state(final, module.layer_idx)
    record_positions(module, cache, call, t)
    return out
