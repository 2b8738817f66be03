"""Typed configs for layers and models, with named presets, and the tagged dict form of a
visibility spec (:func:`spec_to_dict` / :func:`spec_from_dict`) that run records and saved
configs use."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch

from causalmix.checks import ArgumentTypeError, check_int
from causalmix.ops.delta import api as delta_api
from causalmix.ops.factor import factorise
from causalmix.ops.linear import api as linear_api
from causalmix.ops.softmax import api as softmax_api
from causalmix.visibility import (
    AdaptiveLookahead,
    And,
    Causal,
    Chunked,
    Full,
    Or,
    Prefix,
    Segments,
    Strided,
    ValidKeys,
    Visibility,
    Window,
)

#: The kinds of mixing layer :class:`AttentionConfig` builds: softmax attention, linear
#: attention, the gated linear layer (:mod:`causalmix.nn.gated`, the linear op with gates) and
#: the Gated DeltaNet layer (:mod:`causalmix.nn.delta`, the delta-rule op), the GLA layer
#: (:mod:`causalmix.nn.gla`, the linear op with per key dimension gates) and the Kimi Delta
#: Attention layer (:mod:`causalmix.nn.kda`, the delta-rule op with per key dimension gates).
MIXERS = ("softmax", "linear", "gated", "delta", "gla", "kda")
FEATURE_MAPS = ("taylor", "elu")


def op_of(mixer: str) -> str:
    """The op family a layer of kind ``mixer`` (:data:`MIXERS`) mixes with: ``"softmax"``,
    ``"linear"`` (a gated layer runs the linear op with its gates) or ``"delta"`` (Gated
    DeltaNet and KDA layers)."""
    if mixer not in MIXERS:
        raise ValueError(f"mixer must be one of {list(MIXERS)}, got {mixer!r}")
    return {"softmax": "softmax", "delta": "delta", "kda": "delta"}.get(mixer, "linear")


def impl_choices(mixer: str) -> tuple[str, ...]:
    """The ``impl=`` values a layer of kind ``mixer`` accepts, from its op family's registry
    (``"auto"`` first)."""
    api = {"softmax": softmax_api, "linear": linear_api, "delta": delta_api}[op_of(mixer)]
    return tuple(api.REGISTRY.choices)


def check_servable(mixer: str, spec: Visibility, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` (e.g. ``"visibility[1]"``), the spec and the mixer
    if a layer of kind ``mixer`` cannot run under ``spec`` (softmax serves every spec; the
    linear-state mixers those :func:`causalmix.ops.factor.factorise` accepts)."""
    if op_of(mixer) == "softmax":
        return
    try:
        factorise(spec, mixer=f"mixer={mixer!r}")
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


# ====================================================================== specs as dicts

#: The spec types :func:`spec_from_dict` knows by name (pass ``types=`` for your own).
SPEC_TYPES: dict[str, type[Visibility]] = {
    cls.__name__: cls for cls in (Causal, Full, Prefix, Chunked, Window, Segments, ValidKeys,
                                  AdaptiveLookahead, And, Or, Strided)}


def spec_to_dict(spec: Visibility) -> dict[str, Any]:
    """The tagged, JSON-ready form of a spec: ``{"type": <class name>, <field>: <value>, ...}``
    with nested specs tagged the same way and tensors written as (nested) lists.

    >>> spec_to_dict(Prefix(9))
    {'type': 'Prefix', 'n': 9}
    >>> spec_to_dict(Segments(torch.tensor([0, 0, 1])) & Causal())
    {'type': 'And', 'a': {'type': 'Segments', 'ids': [0, 0, 1]}, 'b': {'type': 'Causal'}}
    >>> spec_from_dict(spec_to_dict(Chunked(4, lookahead=1))) == Chunked(4, lookahead=1)
    True
    """
    if not isinstance(spec, Visibility) or not dataclasses.is_dataclass(spec):
        raise ArgumentTypeError(f"spec must be a causalmix.visibility spec (a dataclass), got "
                                f"{type(spec).__name__}")
    out: dict[str, Any] = {"type": type(spec).__name__}
    for f in dataclasses.fields(spec):
        if f.init:
            out[f.name] = _field_to_json(getattr(spec, f.name), f"{out['type']}.{f.name}")
    return out


def _field_to_json(v: Any, where: str) -> Any:
    if isinstance(v, Visibility):
        return spec_to_dict(v)
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise ValueError(f"{where}: cannot write a {type(v).__name__} field as JSON")


def spec_from_dict(d: Mapping[str, Any], *,
                   types: Mapping[str, type[Visibility]] | None = None) -> Visibility:
    """The spec of a :func:`spec_to_dict` form (``types``: extra spec classes by name, for
    specs of your own). Lists become int64 tensors (bool for bool values)."""
    if not isinstance(d, Mapping) or not isinstance(d.get("type"), str):
        raise ValueError(f"a spec dict must be a mapping with a 'type' name, got {d!r}")
    known = {**SPEC_TYPES, **(types or {})}
    cls = known.get(d["type"])
    if cls is None:
        raise ValueError(f"unknown spec type {d['type']!r}; known: {sorted(known)} (pass "
                         f"types={{name: class}} for specs of your own)")
    kwargs = {k: _field_from_json(v, types) for k, v in d.items() if k != "type"}
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"bad fields for spec type {d['type']!r}: {err}") from None


def _field_from_json(v: Any, types) -> Any:
    if isinstance(v, Mapping):
        return spec_from_dict(v, types=types)
    if isinstance(v, list):
        t = torch.tensor(v)
        if t.is_floating_point():
            if t.numel():
                raise ValueError(f"spec tensors hold ints or bools, got {v!r}")
            t = t.to(torch.int64)  # an empty list
        return t
    return v


def _check_decays(decay, n_heads: int) -> tuple[float, ...]:
    """``decay``: a sequence of ``n_heads`` real numbers in (0, 1]."""
    if isinstance(decay, (str, bytes)) or not isinstance(decay, (tuple, list)):
        raise ArgumentTypeError(
            f"decay must be a tuple of {n_heads} floats in (0, 1] (one per head) or None, got "
            f"{type(decay).__name__} {decay!r}")
    if not all(isinstance(d, numbers.Real) and not isinstance(d, bool) for d in decay):
        raise ValueError(f"decay must hold real numbers, got {decay!r}")
    out = tuple(float(d) for d in decay)
    if len(out) != n_heads or not all(0.0 < d <= 1.0 for d in out):
        raise ValueError(
            f"decay must be {n_heads} floats in (0, 1] (one per head), got {decay!r}")
    return out


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """One attention layer.

    ``d_model`` is split into ``n_heads`` query heads of ``head_dim = d_model // n_heads``;
    ``n_kv_heads`` (default ``n_heads``) key/value heads are shared by groups of query heads (GQA).

    softmax: rotary positions (``rope_base``) from absolute indices, scale ``1/sqrt(head_dim)``.
    linear: q and k are projected to ``feature_dim`` per head, passed through ``feature_map``
    (``"taylor"``: ``[1, x, x (x) x / sqrt 2]`` so ``phi(q).phi(k) = 1 + q.k + (q.k)^2 / 2``, the
    2nd-order Taylor expansion of ``exp(q.k)``; ``"elu"``: ``elu(x) + 1``), and normalised by the
    same visibility-and-decay-weighted sum of ``phi(q).phi(k)`` (a ones column appended to v).
    gated: per-token gates from the input (Mamba-2 style, :mod:`causalmix.nn.gated`), run by the
    linear mixer; bidirectional (Hydra style) under ``Full()`` / ``Prefix`` / ``Chunked``.
    delta: Gated DeltaNet (:mod:`causalmix.nn.delta`): short causal convolution, L2-normalised
    q / k of ``feature_dim`` per head, the delta-rule op; bidirectional under the same specs.
    Its ``n_kv_heads`` are the q / k heads and ``n_heads`` the value (output) heads: the value
    grouping of Gated DeltaNet.
    gla: gated linear attention (:mod:`causalmix.nn.gla`): per key dimension gates from a
    low-rank projection (logsigmoid / temperature), ``feature_dim`` keys per head, run by the
    linear mixer; bidirectional under the same specs.
    kda: Kimi Delta Attention (:mod:`causalmix.nn.kda`): the delta layer with a log-gate per
    key dimension (``[B, T, n_heads, feature_dim]``) from a low-rank projection.
    ``decay``: per-head decay in (0, 1] (``None``: no decay); its length must equal ``n_heads``.
    ``impl``: the mixer implementation :meth:`Block.forward` asks for (``"auto"``, or e.g.
    ``"reference"`` to run the dense definition; passed on as ``impl=``).
    """

    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int | None = None
    mixer: str = "softmax"
    feature_dim: int = 16
    feature_map: str = "taylor"
    decay: tuple[float, ...] | None = None
    rope_base: float = 10000.0
    impl: str = "auto"
    head_dim: int = dataclasses.field(init=False)

    def __post_init__(self):
        op_of(self.mixer)  # checks the mixer
        if self.impl not in impl_choices(self.mixer):
            raise ValueError(f"impl must be one of {list(impl_choices(self.mixer))} for the "
                             f"{self.mixer} mixer, got {self.impl!r}")
        if isinstance(self.rope_base, bool) or not isinstance(self.rope_base, numbers.Real) \
                or not math.isfinite(self.rope_base) or self.rope_base <= 0:
            raise ValueError(f"rope_base must be a finite number > 0, got {self.rope_base!r}")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(
                f"feature_map must be one of {list(FEATURE_MAPS)}, got {self.feature_map!r}"
            )
        for name in ("d_model", "n_heads", "feature_dim"):
            check_int(name, getattr(self, name), 1)
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})"
            )
        kv = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        check_int("n_kv_heads", kv, 1)
        if self.n_heads % kv:
            raise ValueError(
                f"n_kv_heads must be an int dividing n_heads ({self.n_heads}), got {kv!r}"
            )
        object.__setattr__(self, "n_kv_heads", kv)
        object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.mixer == "softmax" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {self.head_dim}")
        if self.decay is not None:
            decay = _check_decays(self.decay, self.n_heads)
            if self.mixer != "linear":
                raise ValueError("decay is a linear-mixer option; the softmax mixer takes none")
            object.__setattr__(self, "decay", decay)


def head_decays(n_heads: int, fastest: float = 0.5) -> tuple[float, ...]:
    """Per-head decays from ``fastest`` (a local, previous-token-like head) up to 1.0 (no decay,
    long-range recall), spaced geometrically in ``1 - decay``. ``n_heads >= 1``,
    ``0 < fastest < 1``."""
    check_int("n_heads", n_heads, 1)
    if isinstance(fastest, bool) or not isinstance(fastest, numbers.Real) \
            or not 0.0 < fastest < 1.0:
        raise ValueError(f"fastest must be a float in (0, 1), got {fastest!r}")
    if n_heads == 1:
        return (1.0,)
    # 1 - decay runs geometrically from (1 - fastest) down to 1/64 over the first n - 1 heads.
    first, last, m = 1.0 - fastest, 1.0 / 64, n_heads - 1
    gaps = [first * (last / first) ** (h / max(m - 1, 1)) for h in range(m)]
    return (*(round(1.0 - g, 6) for g in gaps), 1.0)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))`` (GELU, ``mlp_ratio``)."""

    attention: AttentionConfig
    visibility: Visibility = Causal()
    mlp_ratio: int = 2

    def __post_init__(self):
        if not isinstance(self.visibility, Visibility):
            raise ArgumentTypeError(
                f"visibility must be a causalmix.visibility spec, got "
                f"{type(self.visibility).__name__}"
            )
        check_servable(self.attention.mixer, self.visibility, "visibility")
        check_int("mlp_ratio", self.mlp_ratio, 1)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A small sequence model: input (token embedding when ``vocab_size`` is set, else a linear
    map from ``input_dim`` features), ``len(visibility)`` blocks where block ``l`` uses
    ``visibility[l]`` (per-layer visibility), a final norm and a linear head to ``output_dim``
    (default ``vocab_size``)."""

    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int | None = None
    mixer: str = "softmax"
    visibility: tuple[Visibility, ...] = (Causal(), Causal())
    vocab_size: int | None = None
    input_dim: int | None = None
    output_dim: int | None = None
    mlp_ratio: int = 2
    feature_dim: int = 16
    feature_map: str = "taylor"
    decay: tuple[float, ...] | None = None
    impl: str = "auto"
    rope_base: float = 10000.0
    blocks: tuple[BlockConfig, ...] = dataclasses.field(init=False)

    def __post_init__(self):
        vis = self.visibility
        if isinstance(vis, Visibility) or not isinstance(vis, (tuple, list)):
            raise ArgumentTypeError("visibility must be a tuple with one spec per layer, e.g. "
                                    f"(Prefix(8), Causal()); got {type(vis).__name__}")
        vis = tuple(vis)
        for n, v in enumerate(vis):
            if not isinstance(v, Visibility):
                raise ArgumentTypeError(f"visibility[{n}] must be a causalmix.visibility spec, "
                                        f"got {type(v).__name__}")
        if not vis:
            raise ValueError("visibility must name at least one layer")
        object.__setattr__(self, "visibility", vis)
        if (self.vocab_size is None) == (self.input_dim is None):
            raise ValueError("set exactly one of vocab_size (token inputs) and input_dim "
                             f"(feature inputs), got {self.vocab_size!r} and {self.input_dim!r}")
        for name in ("vocab_size", "input_dim", "output_dim"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        if self.output_dim is None:
            if self.vocab_size is None:
                raise ValueError("output_dim is required when the inputs are features")
            object.__setattr__(self, "output_dim", self.vocab_size)
        attn = AttentionConfig(
            d_model=self.d_model, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
            mixer=self.mixer, feature_dim=self.feature_dim, feature_map=self.feature_map,
            decay=self.decay, impl=self.impl, rope_base=self.rope_base,
        )
        for n, v in enumerate(vis):  # refused here, not at the first forward
            check_servable(self.mixer, v, f"visibility[{n}] (layer {n})")
        object.__setattr__(self, "blocks", tuple(
            BlockConfig(attn, v, self.mlp_ratio) for v in vis
        ))

    @classmethod
    def from_name(cls, name: str, **overrides) -> ModelConfig:
        """A named preset (see :data:`PRESETS`), with fields overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; presets: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form: every constructor field, ``visibility`` as a list of tagged
        specs (:func:`spec_to_dict`), ``decay`` as a list; :meth:`from_dict` reads it back
        (``ModelConfig.from_dict(cfg.to_dict()) == cfg``).

        >>> d = ModelConfig(vocab_size=8, visibility=(Prefix(3), Causal())).to_dict()
        >>> d["visibility"]
        [{'type': 'Prefix', 'n': 3}, {'type': 'Causal'}]
        >>> ModelConfig.from_dict(d) == ModelConfig(vocab_size=8, visibility=(Prefix(3), Causal()))
        True
        """
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.init:
                out[f.name] = getattr(self, f.name)
        out["visibility"] = [spec_to_dict(v) for v in self.visibility]
        out["decay"] = None if self.decay is None else list(self.decay)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *,
                  types: Mapping[str, type[Visibility]] | None = None) -> ModelConfig:
        """The config of a :meth:`to_dict` form (``types``: spec classes of your own, by name,
        as :func:`spec_from_dict` takes them). Unknown keys raise ``ValueError``."""
        if not isinstance(d, Mapping):
            raise ArgumentTypeError(f"ModelConfig.from_dict: d must be a mapping, got "
                                    f"{type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ModelConfig.from_dict: unknown keys {unknown}; known: "
                             f"{sorted(known)}")
        kwargs = dict(d)
        if "visibility" in kwargs:
            vis = kwargs["visibility"]
            if not isinstance(vis, (list, tuple)):
                raise ValueError(f"ModelConfig.from_dict: visibility must be a list of tagged "
                                 f"specs, got {type(vis).__name__}")
            kwargs["visibility"] = tuple(spec_from_dict(v, types=types) for v in vis)
        if isinstance(kwargs.get("decay"), list):
            kwargs["decay"] = tuple(kwargs["decay"])
        return cls(**kwargs)


#: Named presets (keyword arguments of :class:`ModelConfig`; give vocab_size or input_dim).
PRESETS: dict[str, dict] = {
    # Two layers, d_model 64: what the lab trains on a 2-core CPU in seconds.
    "tiny-softmax": dict(d_model=64, n_heads=4, mixer="softmax"),
    "tiny-linear": dict(d_model=64, n_heads=4, mixer="linear", feature_dim=16,
                        feature_map="taylor", decay=head_decays(4)),
    "tiny-gqa": dict(d_model=64, n_heads=4, n_kv_heads=2, mixer="softmax"),
    "tiny-gated": dict(d_model=64, n_heads=4, mixer="gated", feature_dim=16),
    "tiny-delta": dict(d_model=64, n_heads=4, mixer="delta", feature_dim=16),
    "tiny-gla": dict(d_model=64, n_heads=4, mixer="gla", feature_dim=16),
    "tiny-kda": dict(d_model=64, n_heads=4, mixer="kda", feature_dim=16),
    "small-softmax": dict(d_model=128, n_heads=4, mixer="softmax",
                          visibility=(Causal(),) * 4),
    "small-linear": dict(d_model=128, n_heads=4, mixer="linear", feature_dim=16,
                         decay=head_decays(4), visibility=(Causal(),) * 4),
}
