"""Every rank must call a sharded mixer with the same spec, layout, shapes, dtype, scale...,
and with arguments each rank's own checks accept: both are settled before any exchange, and a
call that fails fails on every rank with the same error.

Each rank first runs its own argument checks, catching what they raise (its *verdict*), and
reduces each argument that must agree to a 64-bit digest of its canonical form (specs by type
and fields, tensor fields by content; tensors by dtype, shape and device type). One
``all_gather`` of the digests and verdicts tells every rank whether all agree and all accept; if
not, one more gather of short descriptions and of the refusals lets every rank raise the same
``ValueError``, naming each argument that differs with what each rank passed, and each rank that
refused its arguments with its reason. The canonical form never raises, whatever the argument,
so a rank with a bad argument still joins the exchange (and the others do not hang on it).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from causalmix.caching import LRUCache
from causalmix.checks import ArgumentTypeError
from causalmix.distributed._ring import Ring
from causalmix.visibility import Visibility

__all__ = ["agreed_fields", "checked_on_every_rank", "signature"]

T = TypeVar("T")

_SPEC_DIGESTS: LRUCache[str] = LRUCache(64)
_MAX_DESCRIPTION = 200


def _tensor_content(t: torch.Tensor) -> str:
    data = t.detach().cpu().contiguous()
    h = hashlib.sha256(str(data.dtype).encode())
    h.update(repr(tuple(data.shape)).encode())
    h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


def _spec_canonical(spec: Visibility) -> str:
    """Type and fields (recursively; tensors by content), or type and ``repr`` for a spec that
    is not a dataclass."""
    name = f"{type(spec).__module__}.{type(spec).__qualname__}"
    if not dataclasses.is_dataclass(spec):
        return f"{name}({_repr(spec)})"
    parts = [f"{f.name}={_canonical(getattr(spec, f.name))}" for f in dataclasses.fields(spec)
             if f.init]
    return f"{name}({', '.join(parts)})"


def _canonical(value) -> str:
    if isinstance(value, Visibility):
        try:
            cached = _SPEC_DIGESTS.get(value)
        except (TypeError, ValueError):  # unhashable or refusing (modified in place)
            cached = None
        if cached is None:
            cached = _spec_canonical(value)
            try:
                _SPEC_DIGESTS.put(value, cached)
            except (TypeError, ValueError):
                pass
        return cached
    if isinstance(value, torch.Tensor):
        return f"tensor({value.dtype}, {list(value.shape)}, {value.device.type}, " \
               f"{_tensor_content(value)})"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"number:{float(value)!r}"  # scale=1 and scale=1.0 agree
    if isinstance(value, (torch.dtype, torch.device, str, bool, type(None))):
        return f"{type(value).__name__}:{_repr(value)}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__}[{', '.join(_canonical(v) for v in value)}]"
    return f"{type(value).__qualname__}:{_repr(value)}"


def signature(x: Any) -> str:
    """What of a tensor argument ``[B, n, H, D]`` must agree across ranks: dtype, shape and
    device type (not the device index: each rank has its own GPU); the type for anything
    else."""
    if not isinstance(x, torch.Tensor):
        return f"not a tensor: {type(x).__name__}"
    dims = ("batch", "positions", "heads", "dim")
    shape = ", ".join(f"{n} {s}" for n, s in zip(dims, x.shape, strict=True)) \
        if x.dim() == 4 else f"shape {list(x.shape)}"
    return f"{x.dtype} [{shape}] on {x.device.type}"


def agreed_fields(args: tuple, *, by_content: tuple[str, ...] = ()) -> dict[str, object]:
    """What of a sharded op's arguments (a NamedTuple ``args``) must be equal on every rank:
    every field, tensors by :func:`signature` (those named in ``by_content`` by value), ``None``
    as ``None``; and ``requires_grad``: whether autograd records the call on this rank (every
    rank must take part in the backward's exchanges, or none)."""
    out: dict[str, object] = {}
    for name, x in zip(args._fields, args, strict=True):
        out[name] = x if x is None or not isinstance(x, torch.Tensor) or name in by_content \
            else signature(x)
    out["requires_grad"] = torch.is_grad_enabled() and any(
        getattr(x, "requires_grad", False) for x in args if isinstance(x, torch.Tensor))
    return out


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        shown = f", values {value.detach().cpu().tolist()}" if value.numel() <= 16 else ""
        return f"tensor({value.dtype}, {list(value.shape)}{shown})"
    text = _repr(value)
    if len(text) > _MAX_DESCRIPTION:
        text = text[: _MAX_DESCRIPTION - 3] + "..."
    if isinstance(value, Visibility):  # the repr may hide a tensor's content
        text += f" (content digest {_digest(_canonical(value)) & 0xFFFFFFFF:08x})"
    return text


def _repr(value) -> str:
    try:
        return repr(value)
    except Exception:  # a user's spec with a broken repr must not stop the check on one rank
        return f"<{type(value).__qualname__} whose repr raises>"


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)


def _device(ring: Ring) -> torch.device:
    if dist.get_backend(ring.group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_strings(ring: Ring, text: str, device) -> list[str]:
    data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=device)
    n = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(n) for _ in range(ring.world)]
    dist.all_gather(sizes, n, group=ring.group)
    width = max(int(s) for s in sizes)
    padded = torch.zeros(width, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    parts = [torch.empty_like(padded) for _ in range(ring.world)]
    dist.all_gather(parts, padded, group=ring.group)
    return [bytes(p[: int(s)].cpu().tolist()).decode() for p, s in zip(parts, sizes, strict=True)]


def checked_on_every_rank(fn: str, group: dist.ProcessGroup | None,
                          arguments: dict[str, object],
                          check: Callable[[int | None], T]) -> tuple[Ring, T]:
    """Run this rank's argument checks and agree with every rank of ``group``, before any
    exchange; returns the ring and what ``check`` returned.

    ``check(world)`` runs the local checks (``world``: the group's size, ``None`` where
    ``torch.distributed`` is not initialised) and raises ``ValueError`` / ``TypeError`` for a
    bad argument. ``arguments`` (name -> value: specs, layouts, tensor signatures, scales,
    tensors compared by content...) must be equal on every rank. Collective: every rank must
    call it with the same argument names (the same code path). If some rank's check raised, or
    some argument differs, every rank raises the same ``ValueError`` naming the arguments that
    differ (each rank's value) and the ranks that refused their arguments (each one's reason);
    :class:`ArgumentTypeError` when every refusal was a wrong type and all agree. In a group of
    one rank the check's own error is raised. Where ``torch.distributed`` is not initialised the
    local checks run first, then ``Ring.of`` says it is not.
    """
    if not (dist.is_available() and dist.is_initialized()):
        check(None)
    ring = Ring.of(fn, group)
    try:
        result, verdict = check(ring.world), None
    except (TypeError, ValueError) as e:
        result, verdict = None, e
    if ring.world > 1:
        _agree(fn, ring, arguments, verdict)
    if verdict is not None:
        raise verdict
    return ring, result


def _refusal(fn: str, error: BaseException | None) -> str:
    if error is None:
        return ""
    text = str(error)
    if text.startswith(f"{fn}: "):
        text = text[len(fn) + 2:]
    return ("T" if isinstance(error, TypeError) else "V") + text


def _agree(fn: str, ring: Ring, arguments: dict[str, object],
           verdict: BaseException | None) -> None:
    """Raise the same error on every rank unless every rank accepted equal ``arguments``."""
    device = _device(ring)
    names = list(arguments)
    mine = torch.tensor([_digest(_canonical(arguments[n])) for n in names]
                        + [int(verdict is not None)], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(ring.world)]
    dist.all_gather(everyone, mine, group=ring.group)
    differ = [i for i, _ in enumerate(names)
              if any(int(e[i]) != int(everyone[0][i]) for e in everyone)]
    if not differ and not any(int(e[-1]) for e in everyone):
        return
    # every rank saw the same digests, so every rank takes this branch: the gather is collective
    text = "\x00".join([_describe(arguments[names[i]]) for i in differ]
                       + [_refusal(fn, verdict)])
    values = [t.split("\x00") for t in _gather_strings(ring, text, device)]
    parts = []
    if differ:
        lines = []
        for n, i in enumerate(differ):
            per_rank = ", ".join(f"rank {r}: {values[r][n]}" for r in range(ring.world))
            lines.append(f"{names[i]} ({per_rank})")
        parts.append(f"ranks disagree on arguments that must be equal on every rank: "
                     f"{'; '.join(lines)}")
    refusals = [(r, v[-1]) for r, v in enumerate(values) if v[-1]]
    by_reason: dict[str, list[int]] = {}
    for r, why in refusals:
        by_reason.setdefault(why[1:], []).append(r)
    for why, ranks in by_reason.items():
        who = f"rank {ranks[0]} refused its" if len(ranks) == 1 else f"ranks {ranks} refused their"
        parts.append(f"{who} arguments: {why}")
    message = f"{fn}: {'; '.join(parts)} (raised on every rank)"
    if not differ and all(why[0] == "T" for _, why in refusals):
        raise ArgumentTypeError(message)
    raise ValueError(message)
