"""Public entry point of the softmax family: validation and explicit dispatch.

``softmax_attention`` checks its arguments once, builds one checked ``Call`` and runs the
implementation that ``impl`` names (the family's ``REGISTRY``):

* ``"reference"``: dense, the definition of correctness;
* ``"sdpa"``: torch's SDPA without a mask, for ``Causal()`` (aligned offsets, or every query after
  every key) and ``Full()``; scale > 0, no lse;
* ``"blocks"``: block-sparse over the spec's block map, any spec, differentiable, CPU and GPU;
* ``"flex"``: FlexAttention, compiled per shape; on CPU inference only, without lse;
* ``"auto"``: ``sdpa`` where it is exact (scale > 0, scores that cannot overflow) and no lse is
  asked, else ``blocks``.

Every implementation computes in fp32 (fp64 for fp64 inputs) and returns q's dtype. A query that
sees no key gets output 0 and lse ``-inf`` (never NaN, forward or backward). NaN in, NaN out,
identically for every impl: a NaN or infinity in ``q[b, i, h]`` or in the k/v of a key visible to
it makes that output row NaN (and its lse, unless only v was bad); a score that overflows to
``+inf`` gives NaN too.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from causalmix.checks import (
    ArgumentTypeError,
    check_qkv,
    check_scale,
    compute_dtype,
    under_transform,
    values_checked,
)
from causalmix.ops.registry import Registry, call_tensors
from causalmix.ops.softmax import _nonfinite
from causalmix.ops.softmax._call import Call
from causalmix.ops.softmax.impl import blocks, flex, reference, sdpa
from causalmix.visibility import Visibility, check_visibility


def _auto(call: Call) -> str:
    """sdpa where it serves the call exactly (scale > 0, no possible overflow, no lse), else
    blocks; where values cannot be read (``torch.compile``, meta tensors) the traceable
    reference instead of blocks, and inside ``torch.func`` transforms the reference (SDPA has no
    batching rule: vmap would loop over it)."""
    tensors = call_tensors(call)
    if under_transform(*tensors):
        return "reference"
    if sdpa.can_serve(call) is None:
        return "sdpa"
    return "blocks" if values_checked(*tensors) else "reference"


#: The softmax family's implementations (:mod:`causalmix.ops.registry`).
REGISTRY = Registry("softmax", {"reference": reference, "sdpa": sdpa, "blocks": blocks,
                                "flex": flex}, auto=_auto, traceable=("reference",))


class AttentionOutput(NamedTuple):
    """What :func:`softmax_attention` returns with ``return_lse=True``."""

    output: torch.Tensor  # [B, Tq, Hq, Dv], q's dtype
    lse: torch.Tensor  # [B, Tq, Hq], fp32 (fp64 for fp64 inputs), natural log; -inf: no key


def _absmax(x: torch.Tensor) -> torch.Tensor:
    """``max |x|`` (NaN if x holds one); two vectorised reductions, far cheaper than a norm."""
    x = x.detach()
    if x.numel() == 0:
        return torch.zeros((), device=x.device)
    return torch.maximum(x.amax(), -x.amin()).float()


def _prepare(q, k, v, visibility, *, q_offset: int, k_offset: int, scale: float,
             needs_lse: bool):
    """The checked :class:`Call` (non-finite entries replaced) and its :class:`Poison` or None.
    Meta tensors hold no values: their score bound is taken as 0 (shapes only). Where values
    cannot be read on the host (:func:`~causalmix.checks.values_checked`: compile, torch.func)
    the NaN rule runs on device whatever the inputs hold, and the score bound is not measured
    (taken as 0)."""
    if q.device.type == "meta":
        return Call(q, k, v, visibility, q_offset, k_offset, scale, needs_lse, 0.0), None
    if not values_checked(q, k, v):
        poisoned = _nonfinite.poison_dense(q, k, v, visibility, q_offset, k_offset)
        q, k, v = _nonfinite.clean(q), _nonfinite.clean(k), _nonfinite.clean(v)
        return Call(q, k, v, visibility, q_offset, k_offset, scale, needs_lse, 0.0), poisoned
    m = torch.stack([_absmax(q), _absmax(k), _absmax(v)]).tolist()
    poisoned = None
    if not all(math.isfinite(x) for x in m):
        poisoned = _nonfinite.poison(q, k, v, visibility, q_offset, k_offset)
        q, k, v = _nonfinite.clean(q), _nonfinite.clean(k), _nonfinite.clean(v)
        m = torch.stack([_absmax(q), _absmax(k)]).tolist()
    bound = abs(scale) * m[0] * m[1] * q.shape[-1]
    return Call(q, k, v, visibility, q_offset, k_offset, scale, needs_lse, bound), poisoned


def available_impls(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visibility: Visibility, *,
    q_offset: int = 0, k_offset: int = 0,
    scale: float | None = None, return_lse: bool = False,
) -> dict[str, str | None]:
    """For each implementation: ``None`` if it can serve this call, else the reason it cannot.

    A probe: the tensors' shapes, dtype, device and values matter, the spec's batch size and
    covered positions are not checked against them (``softmax_attention`` checks those)."""
    fn = "available_impls"
    _, _, _, _, _, d, _ = check_qkv(fn, q, k, v)
    if not isinstance(visibility, Visibility):
        raise ArgumentTypeError(f"{fn}: visibility must be a causalmix.visibility spec, got "
                                f"{type(visibility).__name__}")
    scale = _default_scale(check_scale(fn, scale), d)
    call, _ = _prepare(q, k, v, visibility, q_offset=q_offset, k_offset=k_offset, scale=scale,
                       needs_lse=return_lse)
    return REGISTRY.reasons(call)


def _default_scale(scale: float | None, d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d) if d > 0 else 1.0
    return scale


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visibility: Visibility,
    *,
    q_offset: int = 0,
    k_offset: int = 0,
    scale: float | None = None,
    impl: str = "auto",
    return_lse: bool = False,
) -> torch.Tensor | AttentionOutput:
    """Softmax attention under any visibility spec (the module docstring has the details).

    Args:
        q: ``[B, Tq, Hq, D]`` queries at absolute positions ``q_offset + [0, Tq)``.
        k: ``[B, Tk, Hkv, D]`` keys at absolute positions ``k_offset + [0, Tk)``.
        v: ``[B, Tk, Hkv, Dv]`` values. ``Hq % Hkv == 0``: query head ``h`` reads key/value head
            ``h // (Hq // Hkv)`` (GQA; ``Hkv == 1`` is MQA). q, k, v share dtype and device.
        visibility: who may see whom, e.g. ``Causal()``, ``Chunked(64, lookahead=1)``,
            ``Segments(doc_ids) & Causal()``.
        scale: score scale (any finite float), default ``1 / sqrt(D)``.
        impl: ``"auto"``, ``"reference"``, ``"sdpa"``, ``"blocks"`` or ``"flex"`` (see the
            module docstring); an explicit impl that cannot serve the call raises
            ``ValueError`` listing those that can.
        return_lse: also return the log-sum-exp of the scores.

    Returns:
        ``[B, Tq, Hq, Dv]`` in q's dtype, or ``AttentionOutput(output, lse)`` with
        ``lse: [B, Tq, Hq]`` fp32 (fp64 for fp64 inputs) when ``return_lse``. A query that sees
        no key gets output 0 and lse ``-inf``; NaN in, NaN out (module docstring).

    Decode with a cache (one query after 99 cached keys, ``Causal()``)::

        keys  0 1 2 ... 98 99
        q=99  x x x ... x  x        softmax_attention(q1, k100, v100, Causal(), q_offset=99)
    """
    fn = "softmax_attention"
    b, tq, tk, _, _, d, _ = check_qkv(fn, q, k, v)
    check_visibility(fn, visibility, b, tq, tk, q_offset=q_offset, k_offset=k_offset)
    scale = _default_scale(check_scale(fn, scale), d)
    call, poisoned = _prepare(q, k, v, visibility, q_offset=q_offset, k_offset=k_offset,
                              scale=scale, needs_lse=return_lse)
    name = REGISTRY.resolve(fn, impl, call)  # an explicit impl that cannot serve raises
    if b == 0 or tq == 0 or tk == 0 or q.device.type == "meta":
        out, lse = _without_scores(q, k, v)
    else:
        out, lse = REGISTRY[name].run(call)
    if poisoned is not None:
        out, lse = _nonfinite.apply(poisoned, out, lse)
    return AttentionOutput(out, lse) if return_lse else out


def _without_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """The result of a call with no score to compute -- no example, query or key (every output
    0, every lse -inf) -- or none to read (meta tensors: the right shapes and dtypes). The graph
    stays connected, so that backward gives (zero) gradients of the right shapes."""
    b, tq, hq, _ = q.shape
    zero = (q.sum() + k.sum() + v.sum()) * 0
    out = q.new_zeros(b, tq, hq, v.shape[-1]) + zero
    lse = torch.full((b, tq, hq), float("-inf"), device=q.device, dtype=compute_dtype(q))
    return out, lse
