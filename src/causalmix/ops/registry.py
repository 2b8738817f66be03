"""The mixer-family contract, the same for every family (softmax, linear, delta, ...).

1. The family's public op validates its arguments **once** and builds one checked ``Call`` (a
   NamedTuple of the family: tensors, spec, offsets, options, and whatever is derived from them
   once -- the spec's factorisation, head layout, gates).
2. Each implementation is a module in ``ops/<family>/impl/`` exposing exactly two functions::

       def can_serve(call) -> str | None   # None: can serve; else the reason it cannot
       def run(call)                        # the result the op returns (before wrapping)

   Implementations never import each other; ``reference`` defines correctness.
3. The family holds **one** :class:`Registry` (its ``REGISTRY``), mapping each name to its
   module. ``impl="auto"`` asks the family's ``auto`` rule for a name; an explicit ``impl`` that
   cannot serve the call raises ``ValueError`` listing every implementation's reason.
4. ``traceable`` names the implementations that run inside ``torch.func`` transforms (``vmap``,
   ``grad``, ``jacrev``): plain tensor code, no host read of a value. Inside a transform every
   other implementation refuses (its plan reads values on the host, and its autograd Function
   has no vmap rule), and ``auto`` picks a traceable one -- as it does under ``torch.compile``
   (:func:`causalmix.checks.values_checked`).

Example (a family of two implementations)::

    REGISTRY = Registry("linear", {"reference": reference, "chunk": chunk},
                        auto=lambda call: "chunk")
    result = REGISTRY.run("linear_attention", impl, call)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from types import ModuleType
from typing import Any

import torch

from causalmix.checks import under_transform, values_checked

__all__ = ["AUTO_REFERENCE_MAX_T", "Registry", "by_cost", "call_tensors"]

#: ``impl="auto"`` of a recurrent family (:func:`by_cost`) runs the dense reference up to this
#: many keys: below it the reference's O(T^2) work costs less than chunk's per-tile overhead
#: (fwd+bwd, B=2, H=4, D=32: reference 1.6-1.9x faster than chunk at T = 8..64, even at 128,
#: chunk ahead from 256; ``benchmarks/auto.py``).
AUTO_REFERENCE_MAX_T = 128


def call_tensors(call: Any) -> list[torch.Tensor]:
    """The tensors a ``Call`` (a NamedTuple) holds, in field order."""
    return [x for x in call if isinstance(x, torch.Tensor)]


def by_cost(fast: ModuleType) -> Callable[[Any], str]:
    """The ``auto`` rule of a family with ``reference``, ``recurrent`` and a chunked ``fast``
    implementation (linear, delta), by cost: ``recurrent`` for one query and one key; for a
    call ``fast`` serves, the reference up to :data:`AUTO_REFERENCE_MAX_T` keys, else ``fast``;
    where values cannot be read on the host (``torch.compile``, ``torch.func``:
    :func:`~causalmix.checks.values_checked`) the traceable reference at every length. A call
    ``fast`` cannot serve goes to ``fast``, which raises with every impl's reason: ``auto``
    serves exactly the specs ``fast`` serves."""
    name = fast.__name__.rpartition(".")[2]

    def auto(call: Any) -> str:
        if call.q.shape[1] == call.k.shape[1] == 1:
            return "recurrent"
        if fast.can_serve(call) is None and (call.k.shape[1] <= AUTO_REFERENCE_MAX_T
                                             or not values_checked(*call_tensors(call))):
            return "reference"
        return name

    return auto


class Registry(Mapping[str, ModuleType]):
    """The implementations of one mixer family, by name (a read-only mapping).

    Args:
        family: the family's name, for messages (``"softmax"``, ``"linear"``, ...).
        impls: name -> module with ``can_serve(call)`` and ``run(call)``.
        auto: ``auto(call) -> name`` picks the implementation for ``impl="auto"``; it may raise
            ``ValueError`` when no implementation it would pick can serve the call.
        traceable: the names that run inside ``torch.func`` transforms (contract item 4).
    """

    def __init__(self, family: str, impls: Mapping[str, ModuleType], *,
                 auto: Callable[[Any], str], traceable: tuple[str, ...] = ()) -> None:
        for name, mod in impls.items():
            missing = [f for f in ("can_serve", "run") if not callable(getattr(mod, f, None))]
            if missing:
                raise TypeError(f"{family} impl {name!r} ({mod.__name__}) lacks {missing}")
        self.family = family
        unknown = sorted(set(traceable) - set(impls))
        if unknown:
            raise TypeError(f"{family}: traceable names {unknown} are not implementations")
        self._impls = dict(impls)
        self._auto = auto
        self.traceable = tuple(traceable)

    def __getitem__(self, name: str) -> ModuleType:
        return self._impls[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._impls)

    def __len__(self) -> int:
        return len(self._impls)

    def __repr__(self) -> str:
        return f"Registry({self.family!r}, {list(self._impls)})"

    @property
    def choices(self) -> list[str]:
        """Every accepted ``impl`` value: ``"auto"`` and the implementation names."""
        return ["auto", *self._impls]

    def check_name(self, fn: str, impl: Any) -> str:
        """``impl`` must be ``"auto"`` or an implementation's name; else ``ValueError``."""
        if not isinstance(impl, str) or (impl != "auto" and impl not in self._impls):
            raise ValueError(f"{fn}: impl must be one of {self.choices}, got {impl!r}")
        return impl

    def reasons(self, call: Any) -> dict[str, str | None]:
        """For each implementation: ``None`` if it can serve ``call``, else why not."""
        return {name: self._reason(name, call) for name in self._impls}

    def _reason(self, name: str, call: Any) -> str | None:
        if name not in self.traceable and under_transform(*call_tensors(call)):
            return (f"{name} plans its work from values read on the host, which a torch.func "
                    f"transform (vmap, grad, jacrev) cannot trace; traceable: "
                    f"{list(self.traceable)} (impl='auto' picks one)")
        return self._impls[name].can_serve(call)

    def resolve(self, fn: str, impl: str, call: Any) -> str:
        """The name of the implementation that runs ``call`` for this ``impl`` argument."""
        self.check_name(fn, impl)
        name = self._auto(call) if impl == "auto" else impl
        reason = self._reason(name, call)
        if reason is None:
            return name
        reasons = self.reasons(call)
        ok = [n for n, why in reasons.items() if why is None]
        others = "; ".join(f"{n}: {why}" for n, why in reasons.items() if why is not None)
        what = f"impl={impl!r}" if impl != "auto" else f"impl='auto' (picked {name!r})"
        raise ValueError(f"{fn}: {what} cannot serve this call: {reason}; implementations that "
                         f"can: {ok} (reasons of the others -- {others})")

    def run(self, fn: str, impl: str, call: Any) -> Any:
        """Resolve ``impl`` for ``call`` and run it."""
        return self._impls[self.resolve(fn, impl, call)].run(call)
