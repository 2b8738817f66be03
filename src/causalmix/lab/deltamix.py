"""A lab-local delta-rule mixer (DeltaNet / Gated DeltaNet) for finding F7, until
:mod:`causalmix.nn` has its own.

:class:`DeltaRuleMixer` is the gated linear layer of :mod:`causalmix.nn.gated`
(:class:`~causalmix.nn.GatedMixer`: L2-normalised ``q`` and ``k`` of ``feature_dim`` per head,
``v`` of ``head_dim``, the same log-gates, per-head RMS norm and ``silu(z)`` output gate) with
the linear op replaced by :func:`causalmix.ops.delta.delta_attention` and a write strength
``beta = sigmoid(W_beta x + b)`` per head and token; ``gated=False`` drops the gates (DeltaNet).
The three recurrent arms of F7 thus differ only in the state update, and hold the same state
(``feature_dim x head_dim`` per head). :class:`DeltaExperiment` is a lab
:class:`~causalmix.lab.experiments.Experiment` whose model is the config's gated model with
every block's mixer swapped for a :class:`DeltaRuleMixer`.

It serves the parallel forward only (no streams, no sequence parallel): what F7 trains.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from causalmix.lab.experiments import Experiment, latency_frames
from causalmix.lab.protocol import TaskData
from causalmix.lab.trainer import FitResult, fit
from causalmix.nn import AttentionConfig, DeltaMixer, GatedMixer, SequenceModel
from causalmix.ops.delta import delta_attention
from causalmix.visibility import Visibility

__all__ = ["DELTA_RULES", "MODEL_RULES", "DeltaExperiment", "DeltaRuleMixer", "delta_model"]

#: The update rules :class:`DeltaRuleMixer` runs: ``"delta"`` (DeltaNet) and
#: ``"gated-delta"`` (Gated DeltaNet).
DELTA_RULES = ("delta", "gated-delta")
#: What :class:`DeltaExperiment` runs: the :data:`DELTA_RULES` of :class:`DeltaRuleMixer`, and
#: ``"nn-gated-delta"``: causalmix.nn's Gated DeltaNet layer (:class:`~causalmix.nn.DeltaMixer`)
#: with plain L2-normalised keys and an identity-initialised short convolution (its
#: ``qk_activation="identity"``, ``conv_init="identity"``), at the config's heads and state.
MODEL_RULES = (*DELTA_RULES, "nn-gated-delta")


class DeltaRuleMixer(GatedMixer):
    """``forward(x: [B, T, C], *, visibility, offset=0) -> [B, T, C]``: the
    :class:`~causalmix.nn.GatedMixer` layer (``cfg.mixer == "gated"``) mixing with the delta
    rule; ``rule`` one of :data:`DELTA_RULES`. ``qkv`` adds ``"beta": [B, n, H]`` in (0, 1)
    (and drops the gates for ``"delta"``). ``cfg.impl == "reference"`` runs the delta op's
    dense reference (the fastest form at a few dozen tokens), anything else its ``"auto"``."""

    def __init__(self, cfg: AttentionConfig, rule: str):
        if rule not in DELTA_RULES:
            raise ValueError(f"DeltaRuleMixer: rule must be one of {list(DELTA_RULES)}, got "
                             f"{rule!r}")
        super().__init__(cfg)
        self.rule, self.op = rule, "delta"
        self.beta_proj = nn.Linear(cfg.d_model, cfg.n_heads)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = super().qkv(x, positions)
        if self.rule == "delta":
            del parts["log_gate"], parts["reverse_log_gate"]
        parts["beta"] = torch.sigmoid(self.beta_proj(x))
        return parts

    def forward(self, x: torch.Tensor, *, visibility: Visibility, offset: int = 0,
                sharding=None) -> torch.Tensor:
        if sharding is not None:
            raise ValueError("DeltaRuleMixer: no sequence-parallel form (lab-local mixer)")
        positions = torch.arange(offset, offset + x.shape[1], device=x.device)
        impl = "reference" if self.cfg.impl == "reference" else "auto"
        mixed = delta_attention(visibility=visibility, q_offset=offset, k_offset=offset,
                                impl=impl, **self.qkv(x, positions))
        return self.out(mixed, x)


def delta_model(exp: Experiment, rule: str) -> SequenceModel:
    """The model of ``exp`` (a gated-mixer config) with every block's mixer a
    :class:`DeltaRuleMixer` of ``rule``, or for ``"nn-gated-delta"`` the nn layer
    (:data:`MODEL_RULES`)."""
    model = SequenceModel(exp.model)
    for block in model.blocks:
        cfg = block.cfg.attention
        if rule == "nn-gated-delta":
            block.attn = DeltaMixer(dataclasses.replace(cfg, mixer="delta"),
                                    qk_activation="identity", conv_init="identity")
        else:
            block.attn = DeltaRuleMixer(cfg, rule)
        block.mixer = "delta"
    return model


@dataclasses.dataclass(frozen=True)
class DeltaExperiment(Experiment):
    """An :class:`~causalmix.lab.experiments.Experiment` of a ``mixer="gated"`` model config
    whose mixers run the delta rule ``rule`` (:data:`DELTA_RULES`): everything else (task,
    scheme, trainer, metrics) as the experiment's. Rotary positions only."""

    rule: str = "delta"

    def __post_init__(self):
        super().__post_init__()
        if self.rule not in MODEL_RULES:
            raise ValueError(f"DeltaExperiment.rule must be one of {list(MODEL_RULES)}, got "
                             f"{self.rule!r}")
        if self.model.mixer != "gated" or self.positions != "rope":
            raise ValueError("DeltaExperiment: the model config must be a gated one "
                             "(mixer='gated'), with positions='rope'")

    def to_json(self) -> dict:
        return {**super().to_json(), "rule": self.rule}

    def run(self, seed: int, *, data: TaskData | None = None, progress: bool = False,
            desc: str = "") -> FitResult:
        """As :meth:`Experiment.run`, on :func:`delta_model`."""
        data = self.task.build(seed) if data is None else data
        torch.manual_seed(seed)
        model = delta_model(self, self.rule)
        res = fit(model, self, data.train, data.test, self.train, seed=seed,
                  name=desc or self.name, progress=progress)
        res.metrics.update(data.extra)
        res.metrics["latency_frames"] = latency_frames(self.scheme, len(model.blocks))
        return res
