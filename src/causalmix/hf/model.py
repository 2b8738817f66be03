"""Per model: :func:`attach` / :func:`detach`, the default spec, and the checks that keep a
``visibility=`` from being ignored.

transformers hands every keyword it does not know through ``**kwargs`` to the attention
function of the model's backend; ``sdpa``, ``eager`` and the flash kernels ignore the ones they
do not read, so ``model(ids, visibility=Full())`` on a model that does not run causalmix would
run causal without a word. Catching that for every model would mean replacing transformers'
built-in attention functions process-wide (and ``eager`` is each model's own function, out of
reach), which this bridge never does. Instead:

* ``generate(..., visibility=)`` is refused by transformers' own keyword check on every model
  that is not attached (the bridge does not declare ``visibility`` a keyword of all models);
* an attached model (and every model given a default spec) checks at each forward that every
  one of its configs still runs ``attn_implementation="causalmix"`` when a spec is in effect,
  and raises otherwise (e.g. after ``model.set_attn_implementation("sdpa")``, or for a sub-model
  switched to another backend).

Everything is per instance (a forward pre-hook and an instance attribute), survives
``copy.deepcopy``, and :func:`detach` undoes it.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from causalmix.hf import hybrid
from causalmix.hf.attention import (
    DEFAULT_ATTR,
    NAME,
    SERVED_ATTR,
    causalmix_attention,
    check_spec_reaches_every_layer,
)
from causalmix.hf.hybrid.context import CallContext
from causalmix.hf.mask import causalmix_mask
from causalmix.visibility import Causal, Visibility

if TYPE_CHECKING:
    import torch

__all__ = ["attach", "backends", "detach", "register", "set_visibility"]

#: Marks a module whose forward pre-hook (:func:`_check_backends`) is installed.
HOOKED_ATTR = "causalmix_checked"
#: The attention implementation an attached model had before :func:`attach` (for `detach`).
BEFORE_ATTR = "causalmix_attn_before"
#: On each module of an attached model: one line per hybrid layer class causalmix does not run.
REFUSED_ATTR = "causalmix_hybrid_refused"


def register() -> str:
    """Register ``"causalmix"`` as both an attention and a mask implementation (idempotent).
    Returns the name to pass as ``attn_implementation``. Nothing else in transformers changes:
    ``visibility`` is not made a keyword of every model (see :func:`attach`)."""
    AttentionInterface.register(NAME, causalmix_attention)
    AttentionMaskInterface.register(NAME, causalmix_mask)
    return NAME


def backends(model: torch.nn.Module) -> dict[str, str | None]:
    """The attention implementation of each config in ``model`` (``{"": "causalmix"}`` for a
    plain model; sub-models by their module path). Reads transformers' per-config
    ``_attn_implementation``, the attribute its attention layers dispatch on (5.x has no public
    getter)."""
    out: dict[str, str | None] = {}
    seen: set[int] = set()
    for path, sub in model.named_modules():
        config = getattr(sub, "config", None)
        if isinstance(config, PretrainedConfig) and id(config) not in seen:
            seen.add(id(config))
            out[path] = getattr(config, "_attn_implementation", None)
    return out


def _foreign(model: torch.nn.Module) -> dict[str, str | None]:
    return {path: impl for path, impl in backends(model).items() if impl != NAME}


def _configs(model: torch.nn.Module) -> list[PretrainedConfig]:
    out, seen = [], set()
    for sub in model.modules():
        config = getattr(sub, "config", None)
        if isinstance(config, PretrainedConfig) and id(config) not in seen:
            seen.add(id(config))
            out.append(config)
    return out


def _check_backends(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: with a spec in effect, every config of ``module`` must run causalmix,
    and every layer must be one the spec reaches."""
    spec = kwargs.get("visibility")
    spec = getattr(module, DEFAULT_ATTR, None) if spec is None else spec
    if spec is None:
        return
    refused = getattr(module, REFUSED_ATTR, ())
    if refused and isinstance(spec, Visibility) and spec != Causal():
        raise ValueError(
            f"visibility {spec!r}: this model has hybrid layers that causalmix does not run, "
            f"which would stay causal: {'; '.join(refused)}. Only Causal() (or no visibility) "
            f"is accepted on it")
    served = getattr(module, SERVED_ATTR, frozenset())
    for config in _configs(module):
        check_spec_reaches_every_layer(config, spec if isinstance(spec, Visibility) else None,
                                       served)
    foreign = _foreign(module)
    if foreign:
        where = ", ".join(f"{path or type(module).__name__}: {impl!r}"
                          for path, impl in foreign.items())
        raise ValueError(
            f"a visibility spec is in effect but not every layer runs "
            f"attn_implementation='causalmix' ({where}); those layers would ignore it. Call "
            f"causalmix.hf.attach(model) again, or causalmix.hf.detach(model) and pass no spec"
        )


def _install_checks(model: torch.nn.Module) -> None:
    """Per instance, once: the backend check and the hybrid layers' call context (no-ops on a
    module that is not attached)."""
    for sub in model.modules():
        if isinstance(sub, PreTrainedModel) and not sub.__dict__.get(HOOKED_ATTR):
            sub.register_forward_pre_hook(_check_backends, with_kwargs=True)
            sub.register_forward_pre_hook(hybrid.enter_call, with_kwargs=True)
            sub.register_forward_hook(hybrid.leave_call, with_kwargs=True, always_call=True)
            sub.__dict__[HOOKED_ATTR] = True


def _install_hybrid(model: torch.nn.Module) -> None:
    """Run the model's served hybrid layers through causalmix; record on every module which
    layer types that serves and which layer classes it refuses."""
    hybrid.install(model, CallContext())
    served = frozenset().union(*[hybrid.served_layer_types(model, c) for c in _configs(model)])
    refused = tuple(hybrid.refusals(model))
    for m in model.modules():
        m.__dict__[SERVED_ATTR] = served
        m.__dict__[REFUSED_ATTR] = refused


def _uninstall_hybrid(model: torch.nn.Module) -> None:
    hybrid.uninstall(model)
    for m in model.modules():
        m.__dict__.pop(SERVED_ATTR, None)
        m.__dict__.pop(REFUSED_ATTR, None)


def set_visibility(model: torch.nn.Module, visibility: Visibility | None) -> None:
    """Make ``visibility`` the model's default spec (used when a call passes no
    ``visibility=``); ``None`` restores the model's own rule. The model must run causalmix
    (:func:`attach`); from now on every forward checks that it still does."""
    if visibility is not None and not isinstance(visibility, Visibility):
        raise ValueError(
            f"visibility must be a causalmix spec or None, got {type(visibility).__name__}"
        )
    if visibility is not None:
        foreign = _foreign(model)
        if foreign:
            raise ValueError(
                f"set_visibility: the model does not run attn_implementation='causalmix' "
                f"({foreign}); call causalmix.hf.attach(model, visibility) instead"
            )
        _install_checks(model)
    for m in model.modules():
        if visibility is None:
            m.__dict__.pop(DEFAULT_ATTR, None)
        else:
            m.__dict__[DEFAULT_ATTR] = visibility


class GenerationInputs:
    """An attached model's ``prepare_inputs_for_generation``: the model's own, plus the
    ``visibility`` keyword passed on to every forward. transformers' ``generate`` refuses
    keywords this signature does not name, so naming it here (one instance, not the class)
    lets ``model.generate(..., visibility=spec)`` through. ``copy.deepcopy`` of the model
    rebinds ``prepare`` to the copy."""

    def __init__(self, prepare):
        self.prepare = prepare
        params = list(inspect.signature(prepare).parameters.values())
        extra = inspect.Parameter("visibility", inspect.Parameter.KEYWORD_ONLY, default=None)
        at = next((n for n, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
        self.__signature__ = inspect.Signature(params[:at] + [extra] + params[at:])

    def __call__(self, *args: Any, visibility: Visibility | None = None, **kwargs: Any) -> dict:
        inputs = self.prepare(*args, **kwargs)
        if visibility is not None:
            inputs["visibility"] = visibility
        return inputs


def attach(model: PreTrainedModel, visibility: Visibility | None = None) -> PreTrainedModel:
    """Switch ``model`` (and its sub-models) to ``attn_implementation="causalmix"``, set its
    default spec (see :func:`set_visibility`), let ``model.generate(..., visibility=spec)``
    accept the keyword (:class:`GenerationInputs`), run its hybrid layers through causalmix
    (:mod:`causalmix.hf.hybrid`: an instance ``forward`` on each served layer, the call's
    keywords carried to them) and check at every forward that a spec in effect reaches
    causalmix layers only. Raises ``ValueError`` if a part of the model cannot switch.
    Returns ``model``."""
    register()
    if BEFORE_ATTR not in model.__dict__:
        model.__dict__[BEFORE_ATTR] = backends(model).get("")
    model.set_attn_implementation(NAME)
    foreign = _foreign(model)
    if foreign:
        raise ValueError(
            f"attach: these parts of the model did not switch to attn_implementation="
            f"'causalmix' ({foreign}): their attention code does not go through transformers' "
            f"AttentionInterface, so a visibility spec could not reach them"
        )
    _install_checks(model)
    _install_hybrid(model)
    set_visibility(model, visibility)
    prepare = getattr(model, "prepare_inputs_for_generation", None)  # base models have none
    if prepare is not None and not isinstance(prepare, GenerationInputs):
        model.prepare_inputs_for_generation = GenerationInputs(model.prepare_inputs_for_generation)
    return model


def detach(model: PreTrainedModel) -> PreTrainedModel:
    """Undo :func:`attach`: no default spec, ``generate`` without the ``visibility`` keyword,
    the hybrid layers' own forwards, and the attention implementation the model had before
    (the forward check stays: a spec passed later to a model that no longer runs causalmix
    raises). Returns ``model``."""
    set_visibility(model, None)
    _uninstall_hybrid(model)
    if isinstance(model.__dict__.get("prepare_inputs_for_generation"), GenerationInputs):
        del model.__dict__["prepare_inputs_for_generation"]
    before = model.__dict__.pop(BEFORE_ATTR, None)
    if before is not None and before != NAME:
        model.set_attn_implementation(before)
    return model
