"""Comparison helpers used by the test suites: tolerances from a baseline's own error.

A fast path may err against the fp32 reference at most ``factor`` (2) times what a same-precision
eager baseline errs, plus a floor of a few units in the last place of the dtype (so that a
baseline that happens to be exact does not demand bit-exactness)::

    assert_close(fast, ref, baseline, name="dq")
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["assert_all_close", "assert_close", "max_error"]


def _floor(ref: torch.Tensor, dtype: torch.dtype, ulps: float) -> float:
    finite = ref[torch.isfinite(ref)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    return ulps * torch.finfo(dtype).eps * max(1.0, scale)


def max_error(actual: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference over positions finite in ``ref``; ``inf`` if the non-finite positions
    (e.g. lse = -inf of empty rows) differ, or if ``actual`` has a NaN."""
    actual, ref = actual.detach().float(), ref.detach().float()
    if actual.shape != ref.shape:
        raise AssertionError(f"shape {list(actual.shape)} != reference {list(ref.shape)}")
    if torch.isnan(actual).any():
        return float("inf")
    fin = torch.isfinite(ref)
    if not torch.equal(fin, torch.isfinite(actual)) or not torch.equal(actual[~fin], ref[~fin]):
        return float("inf")
    if not fin.any():
        return 0.0
    return float((actual[fin] - ref[fin]).abs().max())


def assert_close(
    actual: torch.Tensor,
    ref: torch.Tensor,
    baseline: torch.Tensor,
    *,
    name: str = "tensor",
    factor: float = 2.0,
    ulps: float = 8.0,
    dtype: torch.dtype | None = None,
) -> None:
    """Assert ``max|actual - ref| <= factor * max|baseline - ref| + ulps * eps(dtype) * max|ref|``.

    ``dtype`` (default: ``actual``'s) sets the floor's eps. NaN anywhere, or a mismatch in where
    ``ref`` is infinite, fails.
    """
    dtype = dtype or actual.dtype
    err = max_error(actual, ref)
    base = max_error(baseline, ref)
    if base == float("inf"):
        raise AssertionError(f"{name}: the baseline itself disagrees with the reference on inf/NaN")
    tol = factor * base + _floor(ref.detach().float(), dtype, ulps)
    if not err <= tol:
        raise AssertionError(
            f"{name}: max error {err:.3g} exceeds {factor} x baseline error {base:.3g} + floor "
            f"({tol:.3g} in all)"
        )


def assert_all_close(
    names: list[str],
    actual: Sequence[torch.Tensor],
    ref: Sequence[torch.Tensor],
    baseline: Sequence[torch.Tensor],
    *,
    label: str = "",
) -> None:
    """:func:`assert_close` for each named output (outputs, states, gradients) of a fast path,
    against the reference and a same-precision baseline; fp64 results get fp32's floor (the
    reference computes them in fp64 too)."""
    if not (len(names) == len(actual) == len(ref) == len(baseline)):
        raise AssertionError(f"{label}: {len(names)} names for {len(actual)} results, "
                             f"{len(ref)} references, {len(baseline)} baselines")
    for name, a, r, bl in zip(names, actual, ref, baseline, strict=True):
        assert_close(a, r, bl, name=f"{label} {name}",
                     dtype=a.dtype if a.dtype != torch.float64 else torch.float32)
