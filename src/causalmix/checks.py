"""Argument checks and error types shared by every layer of causalmix: the one address of each.

Every public function of the package checks its arguments at its boundary with these and raises
``ValueError`` naming the argument and what was expected (wrong types raise
:class:`ArgumentTypeError`, both a ``TypeError`` and a ``ValueError``).

Checks of a tensor's *values* (token ranges, decay ranges, gate signs, beta ranges, the softmax
family's NaN scan) read the tensor on the host. They run in eager mode and are off where no
host read is possible (:func:`values_checked`): while ``torch.compile`` traces, inside a
``torch.func`` transform (``vmap``, ``grad``, ``jacrev``, ...), and on the meta device. Shapes,
dtypes, devices and specs are checked everywhere.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch

__all__ = [
    "MAX_POSITION",
    "ArgumentTypeError",
    "UnboundedHorizonError",
    "check_bool",
    "check_decay",
    "check_int",
    "check_log_gate",
    "check_per_position",
    "check_qkv",
    "check_scale",
    "check_state",
    "compute_dtype",
    "under_transform",
    "values_checked",
]

#: Every position (offset + length) an operation asks about must be below this: exact in fp64,
#: and far enough from int64's range that arithmetic on positions never overflows.
MAX_POSITION = 2**53


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (a ``TypeError`` that is also a ``ValueError``: every bad
    input to causalmix can be caught as ``ValueError``)."""


class UnboundedHorizonError(ValueError):
    """A query may see keys arbitrarily far ahead: ``Visibility.horizon`` has no bound."""


def check_int(name: str, value: Any, minimum: int | None = None,
              maximum: int | None = None) -> int:
    """``value`` as an ``int`` (Python, numpy or 0-d integer tensor; never ``bool`` or float) in
    ``[minimum, maximum]``; else ``ValueError`` naming ``name``. The one integer check of the
    package."""
    if type(value) is int or isinstance(value, torch.SymInt):
        value_ok = value  # no operator.index / int(): they would specialise a traced length
    elif isinstance(value, bool) or (isinstance(value, torch.Tensor) and (
            value.dim() != 0 or value.dtype.is_floating_point or value.dtype == torch.bool)):
        value_ok = None
    else:
        try:
            value_ok = operator.index(value)
        except TypeError:
            value_ok = None
    lo = "" if minimum is None else f" >= {minimum}"
    if value_ok is None:
        raise ValueError(f"{name} must be an int{lo}, got {value!r}")
    if minimum is not None and value_ok < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value_ok}")
    if maximum is not None and value_ok > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value_ok}")
    return value_ok if type(value_ok) is int or isinstance(value_ok, torch.SymInt) \
        else int(value_ok)


def values_checked(*tensors: torch.Tensor | None) -> bool:
    """Whether value checks (and value-dependent dispatch) may read these tensors on the host:
    ``False`` while ``torch.compile`` traces, when a tensor is wrapped by a ``torch.func``
    transform (``vmap``, ``grad``, ``jacrev``, ...) or lies on the meta device; else ``True``.

    Where it is ``False`` a value check is skipped (its bad input is not refused: NaN still gives
    NaN) and the ops take their traceable path (each family's ``auto`` says which).

    >>> values_checked(torch.zeros(2)), values_checked(torch.zeros(2, device="meta"))
    (True, False)
    """
    if torch.compiler.is_compiling() or under_transform(*tensors):
        return False
    return not any(t is not None and t.is_meta for t in tensors)


def under_transform(*tensors: torch.Tensor | None) -> bool:
    """Whether a tensor is wrapped by a ``torch.func`` transform (``vmap``, ``grad``,
    ``jacrev``, ...); ``False`` while ``torch.compile`` traces."""
    if torch.compiler.is_compiling():
        return False
    return any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t)
               for t in tensors)


def check_bool(fn: str, name: str, value: Any) -> bool:
    """``value`` must be a Python ``bool``; else :class:`ArgumentTypeError`."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{fn}: {name} must be a bool, got {value!r}")
    return value


def compute_dtype(x: torch.Tensor | torch.dtype) -> torch.dtype:
    """The dtype every mixer computes in: fp64 for fp64 inputs, fp32 otherwise."""
    dt = x if isinstance(x, torch.dtype) else x.dtype
    return torch.float64 if dt == torch.float64 else torch.float32


def check_scale(fn: str, scale: Any) -> float | None:
    """``scale``: ``None`` (the default ``1 / sqrt(D)``) or a finite real number."""
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ArgumentTypeError(f"{fn}: scale must be a float or None, got {scale!r}")
    if not math.isfinite(scale):
        raise ValueError(f"{fn}: scale must be finite, got {scale!r}")
    return float(scale)


def check_decay(fn: str, decay: Any, heads: int, device: torch.device) -> torch.Tensor | None:
    """``decay``: ``None`` or a floating ``[H]`` tensor on ``device`` with values in (0, 1]."""
    if decay is None:
        return None
    if not isinstance(decay, torch.Tensor):
        raise ArgumentTypeError(
            f"{fn}: decay must be a [H] float tensor or None, got {type(decay).__name__}")
    if not decay.dtype.is_floating_point:
        raise ValueError(f"{fn}: decay must be a floating tensor, got dtype {decay.dtype}")
    if tuple(decay.shape) != (heads,):
        raise ValueError(f"{fn}: decay must have shape [H] = [{heads}], got {list(decay.shape)}")
    if decay.device != device:
        raise ValueError(f"{fn}: decay must be on q's device {device}, got {decay.device}")
    dd = decay.detach()
    if values_checked(dd) and not bool(((dd > 0) & (dd <= 1)).all()):
        raise ValueError(f"{fn}: decay values must lie in (0, 1], got min "
                         f"{float(dd.min()):.6g}, max {float(dd.max()):.6g}")
    return decay


def _check_tensor(fn: str, name: str, t: Any) -> None:
    if not isinstance(t, torch.Tensor):
        raise ArgumentTypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(
            f"{fn}: {name} must be 4-D [batch, seq, heads, dim], got shape {list(t.shape)}")
    if not t.dtype.is_floating_point:
        raise ValueError(f"{fn}: {name} must be a floating tensor, got dtype {t.dtype}")


def check_qkv(fn: str, q: Any, k: Any, v: Any, *, same_head_count: bool = False,
              heads: bool = True) -> tuple[int, ...]:
    """Check ``q: [B, Tq, Hq, D]``, ``k: [B, Tk, Hkv, D]``, ``v: [B, Tk, Hkv, Dv]``.
    ``heads=False`` leaves the head counts to the caller (the linear-state families serve two
    groupings: :func:`causalmix.ops.heads.head_layout`).

    Returns ``(B, Tq, Tk, Hq, Hkv, D, Dv)``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(fn, name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"{fn}: q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"{fn}: q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    b, tq, hq, d = q.shape
    bk, tk, hkv, dk = k.shape
    bv, tv, hv, dv = v.shape
    if not (b == bk == bv):
        raise ValueError(f"{fn}: batch sizes differ: q {b}, k {bk}, v {bv}")
    if tk != tv:
        raise ValueError(f"{fn}: k and v must have the same length, got k {tk}, v {tv}")
    if d != dk:
        raise ValueError(f"{fn}: q and k head dims differ: q {d}, k {dk}")
    if not heads:
        return b, tq, tk, hq, hkv, d, dv
    if hkv != hv:
        raise ValueError(f"{fn}: k and v must have the same heads, got k {hkv}, v {hv}")
    if same_head_count and hq != hkv:
        raise ValueError(f"{fn}: q, k, v must have the same heads, got q {hq}, k {hkv}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"{fn}: q heads ({hq}) must be a multiple of k/v heads ({hkv}) (GQA/MQA)")
    return b, tq, tk, hq, hkv, d, dv


def check_per_position(fn: str, name: str, x: Any, shape: tuple, q: torch.Tensor,
                       *, per_dim: int | None = None) -> None:
    """``x``: a floating tensor of ``shape`` (``[B, Tk, H]``: one value per key position and
    output head; with ``per_dim``, ``[B, Tk, H, per_dim]`` too) on q's device, of q's dtype or
    the compute dtype."""
    want = "[B, Tk, H]" if per_dim is None else "[B, Tk, H] or [B, Tk, H, D]"
    if not isinstance(x, torch.Tensor):
        raise ArgumentTypeError(f"{fn}: {name} must be a {want} float tensor, got "
                                f"{type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{fn}: {name} must be a floating tensor, got dtype {x.dtype}")
    shapes = [tuple(shape)] + ([] if per_dim is None else [(*shape, per_dim)])
    if tuple(x.shape) not in shapes:
        got = " or ".join(str(list(s)) for s in shapes)
        per = "" if per_dim is None else " (and key dimension)"
        raise ValueError(f"{fn}: {name} must have shape {want} = {got} (one value per key "
                         f"position and output head{per}), got {list(x.shape)}")
    if x.device != q.device:
        raise ValueError(f"{fn}: {name} must be on q's device {q.device}, got {x.device}")
    ok = {q.dtype, compute_dtype(q)}
    if x.dtype not in ok:
        raise ValueError(f"{fn}: {name} must have dtype {sorted(map(str, ok))} (q's or the "
                         f"compute dtype), got {x.dtype}")


def check_log_gate(fn: str, name: str, gate: Any, shape: tuple, q: torch.Tensor,
                   *, per_dim: int | None = None) -> None:
    """``gate``: a log-space gate, :func:`check_per_position` of ``shape`` (``per_dim``: a
    per-key-dimension gate ``[B, Tk, H, per_dim]`` is served too) with values ``<= 0`` and not
    ``-inf`` (NaN passes: NaN in, NaN out)."""
    check_per_position(fn, name, gate, shape, q, per_dim=per_dim)
    gd = gate.detach()
    if not values_checked(gd):
        return
    if bool((gd > 0).any()) or bool((gd == float("-inf")).any()):
        raise ValueError(f"{fn}: {name} values must be <= 0 and finite (a log-space gate, "
                         f"e.g. dt * A with A < 0), got max {float(gd.max()):.6g}, min "
                         f"{float(gd.min()):.6g}")


def check_state(fn: str, initial_state: Any, shape: list, q: torch.Tensor) -> None:
    """``initial_state``: None or a ``[B, H, D, Dv]`` tensor of ``shape`` in the compute dtype
    of q, on q's device."""
    if initial_state is None:
        return
    if not isinstance(initial_state, torch.Tensor):
        raise ArgumentTypeError(f"{fn}: initial_state must be a [B, H, D, Dv] tensor or None, "
                                f"got {type(initial_state).__name__}")
    if list(initial_state.shape) != list(shape):
        raise ValueError(f"{fn}: initial_state must have shape [B, H, D, Dv] = {list(shape)}, "
                         f"got {list(initial_state.shape)}")
    sd = compute_dtype(q)
    if initial_state.dtype != sd:
        raise ValueError(f"{fn}: initial_state must be {sd} (the state dtype for q of dtype "
                         f"{q.dtype}), got {initial_state.dtype}")
    if initial_state.device != q.device:
        raise ValueError(f"{fn}: initial_state must be on q's device {q.device}, got "
                         f"{initial_state.device}")
