"""Hybrid and state-space layers of transformers models under a causalmix spec.

:func:`causalmix.hf.attach` hands every hybrid layer it knows to :func:`install` and every one
it does not serve yet is named by :func:`refusals`. Per instance only: a served layer gets an
instance ``forward`` (the class, and every other model, are untouched), which
:func:`uninstall` deletes again.

=====================================  ==============================  ======================
layer class (transformers module)      architectures                   causalmix family
=====================================  ==============================  ======================
``Mamba2Mixer`` (mamba2)               Mamba-2                         linear, value grouping
``BambaMixer`` (bamba)                 Bamba                           linear, value grouping
``GraniteMoeHybridMambaLayer``         Granite 4 hybrids               linear, value grouping
``NemotronHMamba2Mixer`` (nemotron_h)  Nemotron-H                      linear, value grouping
``Zamba2MambaMixer`` (zamba2)          Zamba2                          linear, value grouping
``FalconH1Mixer`` (falcon_h1)          Falcon-H1                       linear, value grouping
``Qwen3NextGatedDeltaNet``             Qwen3-Next                      delta, value grouping
``Qwen3_5GatedDeltaNet``               Qwen3.5 (and ``Qwen3_5Moe...``) delta, value grouping
``OlmoHybridGatedDeltaNet``            OLMo-Hybrid                     delta, value grouping
``KimiLinearDeltaAttention``           Kimi Linear (KDA)               delta, per-channel gates
=====================================  ==============================  ======================

Each Mamba-2 forward was diffed line by line against ``Mamba2Mixer.forward``, each Gated
DeltaNet forward against ``Qwen3NextGatedDeltaNet.forward`` (they differ only in the input
projections and OLMo-Hybrid's beta x 2), and every one is checked against the model's own torch
path in the tests (Falcon-H1's differs from Mamba-2's in its input scales and its optional norm
only, both mirrored); Kimi Linear's KDA forward was diffed against
``KimiLinearDeltaAttention.forward`` (Gated DeltaNet's with per-channel gates, kda.py).
``REFUSED`` names layers refused by name, with the reason (none today). Layers in neither
table (e.g. other architectures' linear layers) keep their own code, and a spec other than
``Causal()`` or packed documents are refused on their model by the layer-type check of
:mod:`causalmix.hf.attention`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from causalmix.hf.hybrid.context import (
    CONTEXT_ATTR,
    CallContext,
    carry_call,
    enter_call,
    leave_call,
)
from causalmix.hf.hybrid.gated_deltanet import gated_deltanet_forward
from causalmix.hf.hybrid.kda import kda_forward
from causalmix.hf.hybrid.mamba2 import mamba2_forward

__all__ = ["NO_MIXER_LAYER_TYPES", "REFUSED", "SERVED", "HybridForward", "enter_call",
           "hybrid_layers", "install", "leave_call", "refusals", "served_layer_types",
           "uninstall"]

#: (transformers model folder, layer class) -> the instance forward that serves it.
SERVED: dict[tuple[str, str], Callable] = {
    ("mamba2", "Mamba2Mixer"): mamba2_forward,
    ("bamba", "BambaMixer"): mamba2_forward,
    ("granitemoehybrid", "GraniteMoeHybridMambaLayer"): mamba2_forward,
    ("nemotron_h", "NemotronHMamba2Mixer"): mamba2_forward,
    ("zamba2", "Zamba2MambaMixer"): mamba2_forward,
    ("falcon_h1", "FalconH1Mixer"): mamba2_forward,
    ("qwen3_next", "Qwen3NextGatedDeltaNet"): gated_deltanet_forward,
    ("qwen3_5", "Qwen3_5GatedDeltaNet"): gated_deltanet_forward,
    ("qwen3_5_moe", "Qwen3_5MoeGatedDeltaNet"): gated_deltanet_forward,
    ("olmo_hybrid", "OlmoHybridGatedDeltaNet"): gated_deltanet_forward,
    ("kimi_linear", "KimiLinearDeltaAttention"): kda_forward,
}

#: (transformers model folder, layer class) -> why causalmix does not run it (none today).
REFUSED: dict[tuple[str, str], str] = {}

#: model_type -> layer types (``config.layer_types``) whose layers mix no tokens (MLP / MoE).
NO_MIXER_LAYER_TYPES: dict[str, frozenset[str]] = {"nemotron_h": frozenset({"mlp", "moe"})}


class HybridForward:
    """A served layer's instance ``forward``: ``fn`` bound to ``module``, and picklable
    (``torch.save`` of an attached model, ``copy.deepcopy``) by reference to ``fn``."""

    def __init__(self, fn: Callable, module: torch.nn.Module):
        self.__func__, self.__self__ = fn, module

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    def __reduce__(self):
        return (HybridForward, (self.__func__, self.__self__))


def _key(module: torch.nn.Module) -> tuple[str, str] | None:
    cls = type(module)
    parts = cls.__module__.split(".")
    if len(parts) == 4 and parts[:2] == ["transformers", "models"]:
        return parts[2], cls.__name__
    return None


def hybrid_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(path, module)`` of every layer of ``model`` in :data:`SERVED` or :data:`REFUSED`."""
    return [(path, m) for path, m in model.named_modules()
            if _key(m) in SERVED or _key(m) in REFUSED]


def refusals(model: torch.nn.Module) -> list[str]:
    """One line per layer class of ``model`` that causalmix does not run, with the reason."""
    out: dict[str, str] = {}
    types_ = list(getattr(getattr(model, "config", None), "layer_types", None) or ())
    for path, m in hybrid_layers(model):
        key = _key(m)
        if key in REFUSED:
            i = getattr(m, "layer_idx", None)
            kind = types_[i] if isinstance(i, int) and i < len(types_) else "?"
            out.setdefault(key[1], f"{key[1]} (layer type {kind!r}, e.g. {path}): {REFUSED[key]}")
    return list(out.values())


def install(model: torch.nn.Module, context: CallContext) -> list[torch.nn.Module]:
    """Give every served hybrid layer of ``model`` its causalmix forward (and ``context``).
    Raises ``ValueError`` for a layer whose ``forward`` something else already replaced (e.g.
    accelerate's offloading hooks). Returns the layers served."""
    served = []
    for path, m in hybrid_layers(model):
        fn = SERVED.get(_key(m))
        if fn is None:
            continue
        current = m.__dict__.get("forward")
        if current is not None and getattr(current, "__func__", None) is not fn:
            raise ValueError(
                f"causalmix.hf.attach: {path} ({type(m).__name__}) already has its forward "
                f"replaced on the instance (accelerate device-map hooks?); causalmix would "
                f"bypass it. Load the model without a device map")
        m.forward = HybridForward(fn, m)
        served.append(m)
    if served:
        _carry_through(model)
    for m in model.modules():
        m.__dict__[CONTEXT_ATTR] = context
    return served


#: Marks a layer whose :func:`carry_call` pre-hook is installed (it stays: a no-op once detached).
CARRY_ATTR = "causalmix_carries_call"


def _carry_through(model: torch.nn.Module) -> None:
    """Install :func:`carry_call` on the gradient-checkpointing layers of ``model`` whose
    ``forward`` takes extra keywords (transformers' decoder layers pass them on)."""
    for layer in model.modules():
        if (isinstance(layer, GradientCheckpointingLayer) and not layer.__dict__.get(CARRY_ATTR)
                and _takes_keywords(layer)):
            layer.register_forward_pre_hook(carry_call, with_kwargs=True)
            layer.__dict__[CARRY_ATTR] = True


def _takes_keywords(layer: torch.nn.Module) -> bool:
    params = inspect.signature(layer.forward).parameters.values()
    return any(p.kind is p.VAR_KEYWORD for p in params)


def uninstall(model: torch.nn.Module) -> None:
    """Undo :func:`install`: every layer gets its class's forward back."""
    for _, m in hybrid_layers(model):
        fn = SERVED.get(_key(m))
        current = m.__dict__.get("forward")
        if fn is not None and getattr(current, "__func__", None) is fn:
            del m.__dict__["forward"]
    for m in model.modules():
        m.__dict__.pop(CONTEXT_ATTR, None)


def served_layer_types(model: torch.nn.Module, config) -> frozenset[str]:
    """The layer types of ``config`` (outside the attention kinds) whose every layer has its
    token mixer served by causalmix in ``model`` (or mixes no tokens)."""
    types_ = list(getattr(config, "layer_types", None) or ())
    served_idx = {getattr(m, "layer_idx", None) for _, m in hybrid_layers(model)
                  if SERVED.get(_key(m)) is not None
                  and getattr(m.__dict__.get("forward"), "__func__", None) is SERVED[_key(m)]}
    refused_idx = {getattr(m, "layer_idx", None) for _, m in hybrid_layers(model)
                   if _key(m) in REFUSED}
    out = set(NO_MIXER_LAYER_TYPES.get(getattr(config, "model_type", ""), ()))
    for kind in set(types_):
        idx = [i for i, k in enumerate(types_) if k == kind]
        if all(i in served_idx and i not in refused_idx for i in idx):
            out.add(kind)
    return frozenset(out & set(types_))
