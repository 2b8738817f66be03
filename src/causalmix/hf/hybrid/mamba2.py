"""The Mamba-2 mixer of transformers (``Mamba2Mixer`` and the identical forwards of Bamba,
GraniteMoeHybrid, Nemotron-H and Zamba2; Falcon-H1's, which adds its ``ssm_in_multiplier`` and
``mup_vector`` scales and an optional norm) run through :func:`causalmix.linear_attention`.

The layer's own parameters and submodules, causalmix's scan. In causalmix's names (value
grouping: ``G`` groups of B / C, ``H`` heads of ``P`` channels, state size ``N``)::

    z, xBC, dt_raw = in_proj(hidden)                    # [I], [I + 2 G N], [H]
    xBC = act(conv(xBC))                                # restarted per document (conv.py)
    x, B, C = split(xBC)                                # [H, P], [G, N], [G, N]
    dt = clamp(softplus(dt_raw + dt_bias), *time_step_limit);  A = -exp(A_log)
    y = linear_attention(q=C, k=B, v=dt x, spec, log_gate=A dt) + D x
    out = out_proj(norm(y, z))                          # the layer's gated RMSNorm
                                                        # (Falcon-H1 without it: y silu(z))

Padding is exact: a padding position adds nothing (``v = 0``) and decays nothing (log-gate 0),
and the convolution skips it, so every token gets the numbers of its row without the padding,
wherever the padding is (transformers zeroes the padded inputs, which is exact for left padding
only). Under ``Full()``, ``Prefix(n)``, ``Chunked`` the scan adds the reverse part of the
linear family (the same recurrence over the flipped sequence, gates ``A dt`` again); the
convolution stays causal -- it is part of the layer's input map, not of the token mixing that
the spec describes -- restarted at every document start. ``dt`` is clamped by
``time_step_limit`` in every step (transformers clamps in its chunked path only, not when it
decodes one token).

The scan tiles by the layer's own ``chunk_size`` (``config.mamba_chunk_size`` / ``chunk_size``),
as transformers' chunked scan does, so its rounding stays that of the model's own path (the
gradients of ``A_log`` and ``dt_bias`` sum over every token; longer tiles round them more).

Cache: transformers' own layout -- ``conv_states [B, I + 2 G N, K]`` (the last K inputs of the
document being continued), ``recurrent_states [B, H, P, N]`` (causalmix's ``[B, H, N, P]``
transposed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from causalmix.checks import compute_dtype
from causalmix.hf.hybrid.context import LayerCall, layer_call, record_positions
from causalmix.hf.hybrid.conv import short_conv
from causalmix.ops.linear import linear_attention

__all__ = ["KIND", "mamba2_forward"]

KIND = "a Mamba-2 layer"


def _scan_inputs(self, xbc: torch.Tensor, dt_raw: torch.Tensor, call: LayerCall):
    """``(q, k, v, log_gate, x)`` of the scan from the convolved ``xBC`` and ``dt``."""
    b, t, _ = xbc.shape
    h, p, g, n = self.num_heads, self.head_dim, self.n_groups, self.ssm_state_size
    x, bm, cm = xbc.split([self.intermediate_size, g * n, g * n], dim=-1)
    cd = compute_dtype(xbc)
    x = x.reshape(b, t, h, p).to(cd)
    dt = F.softplus(dt_raw.to(cd) + self.dt_bias.to(cd))
    dt = dt.clamp(min=self.time_step_limit[0], max=self.time_step_limit[1])
    log_gate = dt * -torch.exp(self.A_log.to(cd))
    v = x * dt[..., None]
    if call.valid is not None:
        log_gate = log_gate * call.valid[..., None]
        v = v * call.valid[..., None, None]
    q = cm.reshape(b, t, g, n).to(cd)
    k = bm.reshape(b, t, g, n).to(cd)
    return q, k, v, log_gate, x


def mamba2_forward(self, hidden_states: torch.Tensor, cache=None, attention_mask=None,
                   **kwargs) -> torch.Tensor:
    """Instance ``forward`` of an attached model's Mamba-2 mixer (``self``): the layer's math
    with causalmix's scan and convolution under the call's spec (module docstring)."""
    if kwargs.get("cache_params") is not None:  # transformers' deprecated name of `cache`
        cache = kwargs.pop("cache_params") if cache is None else cache
    kwargs.pop("cache_params", None)
    call = layer_call(self, hidden_states, cache, attention_mask, kwargs, kind=KIND)
    b, t, _ = hidden_states.shape
    z, xbc, dt_raw = _projections(self, hidden_states)
    conv = short_conv(xbc, self.conv1d.weight[:, 0], self.conv1d.bias, past=call.conv_state,
                      valid=call.valid, segments=call.segments)
    xbc = ACT2FN[self.activation](conv.output).to(hidden_states.dtype)
    q, k, v, log_gate, x = _scan_inputs(self, xbc, dt_raw, call)
    state = call.recurrent_state
    if state is not None:
        state = state.transpose(-1, -2).to(v.dtype)
    out = linear_attention(q, k, v, call.spec, log_gate=log_gate, q_offset=call.offset,
                           k_offset=call.offset, initial_state=state,
                           return_final_state=cache is not None,
                           chunk_size=self.chunk_size)
    if cache is not None:
        out, final = out
        cache.update_conv_state(conv.window.to(xbc.dtype), self.layer_idx,
                                conv_kernel_size=self.conv_kernel_size)
        cache.update_recurrent_state(final.transpose(-1, -2).contiguous(), self.layer_idx)
        record_positions(self, cache, call, t)
    y = (out + self.D.to(out.dtype)[:, None] * x).reshape(b, t, -1)
    if getattr(self, "mamba_rms_norm", True):
        y = self.norm(y, z)
    else:  # Falcon-H1 without its norm: the gate alone
        y = y * F.silu(z)
    return self.out_proj(y.to(hidden_states.dtype))


def _projections(self, hidden_states: torch.Tensor):
    """``(z, xBC, dt_raw)``; Falcon-H1 scales the input by ``ssm_in_multiplier`` and the
    projections by its ``mup_vector`` (1 for the others)."""
    scale = getattr(self, "ssm_in_multiplier", None)
    proj = self.in_proj(hidden_states if scale is None else hidden_states * scale)
    mup = getattr(self, "mup_vector", None)
    if mup is not None:
        proj = proj * mup
    return proj.split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
