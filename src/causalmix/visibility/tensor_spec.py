"""Value semantics for specs that hold a tensor (``Prefix([B])``, ``Segments``, ``ValidKeys``,
``AdaptiveLookahead``).

Such a spec takes its own copy of the tensor at construction (refilling the caller's buffer later
changes nothing), compares and hashes by the copy's content, and refuses to be used once that
copy has been modified in place (a version check), instead of serving stale caches. A copy made by
``copy.deepcopy``, ``pickle`` or ``torch.save`` / ``torch.load`` is a new valid spec.
"""

from __future__ import annotations

from typing import Any

import torch

from causalmix.checks import check_int
from causalmix.visibility.base import Visibility


def tensor_key(t: torch.Tensor) -> tuple:
    """A hashable key of a tensor's shape and values."""
    return (tuple(t.shape), tuple(t.reshape(-1).tolist()))


def snapshot(name: str, t: Any, dims: tuple[int, ...], shape_doc: str) -> torch.Tensor:
    """A private int64 copy of a spec's tensor argument (checked)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be an integer {shape_doc} tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer {shape_doc} tensor, got dtype {t.dtype}")
    if t.dim() not in dims:
        raise ValueError(f"{name} must be {shape_doc}, got shape {list(t.shape)}")
    if t.device.type == "meta":
        raise ValueError(f"{name} must hold values (a cpu or accelerator tensor), got a meta "
                         f"tensor")
    return t.detach().to(torch.int64, copy=True)


def int_vector(name: str, x: Any, shape_doc: str) -> torch.Tensor:
    """A 1-D integer tensor, or a list / tuple of ints >= 0, as a private int64 copy."""
    if not isinstance(x, torch.Tensor):
        if not isinstance(x, (list, tuple)):
            raise ValueError(f"{name} must be a {shape_doc} integer tensor or a list of ints, "
                             f"got {type(x).__name__}")
        x = torch.tensor([check_int(f"{name}[{k}]", v, 0) for k, v in enumerate(x)],
                         dtype=torch.int64)
    return snapshot(name, x, (1,), shape_doc)


class TensorSpec(Visibility):
    """Base of the tensor-holding specs: equal and hashed by the content of :meth:`_content`
    (shape and values), computed once per instance; any use after the spec's own copy was
    modified in place raises ``ValueError``. Subclasses call :meth:`_seal` at the end of
    ``__post_init__``."""

    __slots__ = ()

    def _tensor(self) -> torch.Tensor:
        raise NotImplementedError

    def _content(self):
        raise NotImplementedError

    def _seal(self) -> None:
        object.__setattr__(self, "_version_at_init", self._tensor()._version)

    def _modified(self) -> bool:
        v0 = self.__dict__.get("_version_at_init")
        return v0 is not None and self._tensor()._version != v0

    def _check_unmodified(self) -> None:
        if self._modified():
            raise ValueError(
                f"the tensor of this {type(self).__name__} spec was modified in place after "
                f"construction; specs are immutable values: build a new spec instead"
            )

    def check_unmodified(self) -> None:
        """Raise ``ValueError`` if the spec's own tensor was modified in place (every mixer
        calls this through :func:`causalmix.visibility.check_visibility`)."""
        self._check_unmodified()

    def _cached(self, name: str, make):
        """``make()`` computed once per instance (refused after an in-place modification)."""
        self._check_unmodified()
        cached = self.__dict__.get(name)
        if cached is None:
            cached = make()
            object.__setattr__(self, name, cached)
        return cached

    def _key(self):
        """The content key; a spec modified in place equals nothing but itself (so a cache that
        holds it never serves it to an equal fresh spec, and comparing never raises)."""
        if self._modified():
            return ("modified in place", id(self))
        return self._cached("_cached_key", self._content)

    def __eq__(self, other):
        return type(other) is type(self) and self._key() == other._key()

    def __hash__(self):
        self._check_unmodified()  # hashing a modified spec (a cache lookup) is refused
        return hash((type(self).__name__, self._key()))

    def __getstate__(self):
        """Pickle / deepcopy / ``torch.save``: the fields only (no caches, no version stamp)."""
        return {f: self.__dict__[f] for f in self.__dataclass_fields__}

    def __setstate__(self, state):
        for name, value in state.items():
            object.__setattr__(self, name, value)
        self._seal()

    def mask(self, *args, **kwargs) -> torch.Tensor:
        self._check_unmodified()
        return super().mask(*args, **kwargs)


class PositionTensorSpec(TensorSpec):
    """A tensor-holding spec whose tensor is indexed by absolute position, ``[T]`` or ``[B, T]``
    (``Segments``, ``ValidKeys``, ``AdaptiveLookahead``): it defines positions ``[0, T)``, and a
    ``[B, T]`` tensor ties it to batch size ``B``."""

    __slots__ = ()

    @property
    def covered_length(self) -> int:
        return self._tensor().shape[-1]

    @property
    def batch_size(self) -> int | None:
        t = self._tensor()
        return t.shape[0] if t.dim() == 2 else None
