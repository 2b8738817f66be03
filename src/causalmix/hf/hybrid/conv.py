"""The short causal convolution of the hybrid layers, restarted at every document start and
blind to padding.

transformers' layers run a depthwise ``Conv1d(C, C, K, groups=C, padding=K - 1)`` over the
whole row, so the first ``K - 1`` outputs of a packed document read the end of the previous
one, and padding in a row sits in the window of the tokens after it. Here output ``t`` reads
the ``K`` most recent *tokens* of its own document up to ``t`` (zeros where there are fewer)::

    weights w[0..K-1] (w[K-1] on the newest), documents a | b, padding _ :

    inputs    a0 a1 a2 _  a3 | b0 b1
    output a3 = w3 a3 + w2 a2 + w1 a1 + w0 a0        (the padding skipped)
    output b1 = w3 b1 + w2 b0                         (restarted at b0)

With a cache, ``past: [B, C, K]`` holds the last ``K`` inputs before the call (transformers'
``conv_states`` layout, oldest first); it continues the document of the position before the
call. The returned ``window: [B, C, K]`` is the same for the position after the call: the last
``K`` tokens of the document holding the last position (what the next step reads), so a
document boundary or padding inside the call never leaks into the next step either.

Without padding and restarts this is exactly ``F.conv1d`` over ``cat(past, x)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["ConvOutput", "short_conv"]


class ConvOutput(NamedTuple):
    output: torch.Tensor  # [B, T, C], before the activation
    window: torch.Tensor  # [B, C, K], the inputs the next position's window reads


def short_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
               past: torch.Tensor | None = None, valid: torch.Tensor | None = None,
               segments: torch.Tensor | None = None) -> ConvOutput:
    """Depthwise causal convolution of ``x: [B, T, C]`` with ``weight: [C, K]`` (``w[:, K-1]``
    multiplies the newest input) and ``bias: [C]`` or None, in ``weight``'s dtype.

    ``past``: ``[B, C, K]`` inputs before the call (None: zeros). ``valid``: ``[B, T]`` bool,
    False at padding (None: every position is a token). ``segments``: ``[B or 1, 1 + T]`` int
    document ids of the position before the call (column 0, the one ``past`` belongs to) and
    of each position (None: one document). Returns :class:`ConvOutput`; outputs at padding
    positions are finite but meaningless."""
    b, t, c = x.shape
    k = weight.shape[-1]
    x = x.to(weight.dtype)
    before = (x.new_zeros(b, k, c) if past is None
              else past.to(weight.dtype).transpose(1, 2))
    ext = torch.cat([before, x], dim=1)  # [B, K + T, C]
    restarts = segments is not None and bool((segments != segments[:, :1]).any())
    if valid is None and not restarts:
        out = F.conv1d(ext.transpose(1, 2), weight[:, None], bias, groups=c)[..., 1:]
        return ConvOutput(out.transpose(1, 2), ext[:, -k:].transpose(1, 2))
    taps = _taps(ext, k, valid, segments)
    out = sum(weight[:, k - 1 - j] * tap for j, tap in enumerate(taps))
    if bias is not None:
        out = out + bias
    window = torch.stack([tap[:, -1] for tap in reversed(taps)], dim=-1)  # oldest first
    return ConvOutput(out, window)


def _taps(ext: torch.Tensor, k: int, valid: torch.Tensor | None,
          segments: torch.Tensor | None) -> list[torch.Tensor]:
    """``[tap_0, ..., tap_{K-1}]``, each ``[B, T, C]``: for each position of the call, the
    ``j``-th most recent token up to it (``tap_0`` itself), zero when it is in another
    document. The ``K`` entries of ``ext`` before the call count as tokens of the document of
    column 0 of ``segments``."""
    b, n, c = ext.shape
    t = n - k
    dev = ext.device
    tokens = torch.ones(b, n, dtype=torch.bool, device=dev)
    if valid is not None:
        tokens[:, k:] = valid.to(device=dev, dtype=torch.bool)
    ids = torch.zeros(b, n, dtype=torch.int64, device=dev)
    if segments is not None:
        seg = segments.to(dev).expand(b, -1)
        ids = torch.cat([seg[:, :1].expand(b, k), seg[:, 1:]], dim=1)
    if valid is None:  # documents only: the j-th most recent token is j positions back
        src = [torch.arange(k - j, n - j, device=dev).expand(b, t) for j in range(k)]
        taps = [ext[:, k - j:n - j] for j in range(k)]
    else:
        rank = tokens.long().cumsum(1) - 1  # [B, n]: tokens up to each position, minus one
        where = torch.arange(n, device=dev).expand(b, n)
        # position of the token of each rank (ranks of padding write to a spare last column)
        at_rank = torch.full((b, n + 1), n, dtype=torch.int64, device=dev)
        at_rank.scatter_(1, torch.where(tokens, rank, n), where)
        # rank >= K - 1 at every position of the call: the K entries before it are tokens
        src = [at_rank.gather(1, rank[:, k:] - j) for j in range(k)]
        taps = [ext.gather(1, s[..., None].expand(b, t, c)) for s in src]
    out = []
    for s, tap in zip(src, taps, strict=True):
        same = ids.gather(1, s) == ids[:, k:]
        out.append(tap * same[..., None].to(ext.dtype))
    return out
