"""An experiment: a task, a composed model config, a visibility scheme and a train config.

:class:`Experiment` is a plain typed config: it holds a :class:`~causalmix.nn.ModelConfig`
(built once by the finding that defines it, from a preset and the task's input/output sizes)
and a :class:`~causalmix.lab.trainer.TrainConfig`; :meth:`Experiment.run` fits it with the
lab's one trainer (:func:`~causalmix.lab.trainer.fit`) and the task's own metrics.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from causalmix.lab.tasks import IGNORE, TASKS, TaskData
from causalmix.lab.trainer import FitResult, TrainConfig, fit, take
from causalmix.nn import MIXERS, ModelConfig, SequenceModel, mix, spec_to_dict
from causalmix.nn.config import check_servable
from causalmix.visibility import Causal, Full, Prefix, Visibility, Window

__all__ = ["POSITIONS", "SCHEMES", "Experiment", "TrainConfig", "latency_frames",
           "mixer_available", "plain", "scheme_visibility"]

#: Visibility schemes an experiment can name (applied per batch, per layer):
#:   "causal"        every layer Causal()
#:   "prefix"        every layer Prefix(prefix_len) (prefix-LM: the prompt is read bidirectionally)
#:   "full"          every layer Full() (a bidirectional encoder)
#:   "lookahead-L"   the first layer Causal() | Window(0, L) (L frames ahead), causal above
SCHEMES = ("causal", "prefix", "full", "lookahead-L")

#: Positional encodings: "rope" (the model's rotary positions) or "none" (every token at
#: rotary angle 0, i.e. no positional encoding at all; the softmax mixer then sees order only
#: through its visibility).
POSITIONS = ("rope", "none")


def mixer_available(name: str) -> bool:
    """Whether :mod:`causalmix.nn` has a mixer called ``name`` (e.g. the gated linear one)."""
    return name in MIXERS


def scheme_visibility(scheme: str, n_layers: int,
                      prefix_len: torch.Tensor | None = None) -> tuple[Visibility, ...]:
    """Per-layer specs for ``scheme`` (see :data:`SCHEMES`); ``prefix_len: [B]`` for "prefix"."""
    causal = (Causal(),) * n_layers
    if scheme == "causal":
        return causal
    if scheme == "prefix":
        if prefix_len is None:
            raise ValueError("scheme 'prefix' needs prefix_len: [B] int64")
        n = int(prefix_len[0]) if bool((prefix_len == prefix_len[0]).all()) else prefix_len
        return (Prefix(n),) * n_layers
    if scheme == "full":
        return (Full(),) * n_layers
    if scheme.startswith("lookahead-"):
        tail = scheme[len("lookahead-"):]
        if not tail.isdigit():
            raise ValueError(f"scheme lookahead-L needs an integer L, got {scheme!r}")
        ahead = int(tail)
        first = Causal() if ahead == 0 else Causal() | Window(0, ahead)
        return (first,) + causal[1:]
    raise ValueError(f"unknown visibility scheme {scheme!r}; schemes: {list(SCHEMES)}")


def latency_frames(scheme: str, n_layers: int) -> int | None:
    """Frames a stream waits per output (the per-layer lookaheads add up); None if unbounded."""
    if scheme in ("prefix", "full"):
        return None
    total = 0
    for spec in scheme_visibility(scheme, n_layers):
        if spec.lookahead_frames is None:
            return None
        total += spec.lookahead_frames
    return total


def plain(x: Any) -> Any:
    """``x`` as JSON-ready values (dicts, lists, numbers, strings; a visibility spec in its
    tagged form, :func:`~causalmix.nn.spec_to_dict`; anything else its repr)."""
    if isinstance(x, Visibility):
        return spec_to_dict(x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x) if f.init}
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    return repr(x)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One trainable setting: ``task`` (a config of :data:`~causalmix.lab.tasks.TASKS`),
    ``model`` (its :class:`~causalmix.nn.ModelConfig`, input/output sizes those of the task;
    its ``visibility`` fixes the number of layers, ``scheme`` replaces the specs per batch),
    ``scheme`` (:data:`SCHEMES`), ``positions`` (:data:`POSITIONS`) and ``train``.
    ``finding`` and ``arm`` name what the report groups it under."""

    finding: str
    arm: str
    task: object
    model: ModelConfig
    scheme: str = "causal"
    positions: str = "rope"
    train: TrainConfig = TrainConfig()

    def __post_init__(self):
        if type(self.task) not in TASKS.values():
            raise TypeError(f"Experiment.task must be a lab task config ({sorted(TASKS)}), got "
                            f"{type(self.task).__name__}")
        if not isinstance(self.model, ModelConfig):
            raise TypeError(f"Experiment.model must be a ModelConfig, got "
                            f"{type(self.model).__name__}")
        n_layers = len(self.model.blocks)
        specs = scheme_visibility(self.scheme, n_layers, torch.zeros(1, dtype=torch.int64))
        for n, spec in enumerate(specs):  # refused here, not at the first forward
            check_servable(self.model.mixer, spec, f"Experiment {self.name}: scheme "
                                                   f"{self.scheme!r}, layer {n}")
        if self.positions not in POSITIONS:
            raise ValueError(f"Experiment.positions must be one of {list(POSITIONS)}, got "
                             f"{self.positions!r}")
        if self.positions == "none" and self.model.mixer != "softmax":
            raise ValueError("positions='none' applies to the softmax mixer (the others have "
                             "no positional encoding to remove)")

    @property
    def name(self) -> str:
        return f"{self.finding}/{self.arm}"

    @property
    def task_name(self) -> str:
        return next(k for k, v in TASKS.items() if type(self.task) is v)

    def to_json(self) -> dict:
        return {"finding": self.finding, "arm": self.arm, "task": self.task_name,
                "task_config": plain(self.task), "model": plain(self.model),
                "scheme": self.scheme, "positions": self.positions, "train": plain(self.train)}

    def forward(self, model: SequenceModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's outputs on ``batch["inputs"]`` under the scheme's per-layer specs."""
        vis = scheme_visibility(self.scheme, len(model.blocks), batch["prefix_len"])
        if self.positions == "rope":
            return model(batch["inputs"], visibility=vis)
        # No positional encoding: run each block through its streaming protocol with every
        # token at position 0 (rotary angle 0 = the identity), the spec on true positions.
        x = model.embed(batch["inputs"])
        zero = torch.zeros(x.shape[1], dtype=torch.int64)
        for block, spec in zip(model.blocks, vis, strict=True):
            mixed = mix(block.mixer, visibility=spec, impl=block.cfg.attention.impl,
                        **block.mixer_kwargs(), **block.stream_qkv(x, zero))
            x = block.stream_out(x, mixed, zero)
        return model.head(model.norm(x))

    def loss(self, model: SequenceModel, batch: dict[str, torch.Tensor], step: int,
             steps: int) -> torch.Tensor:
        out = self.forward(model, batch)
        if self.task.kind == "classification":
            return F.cross_entropy(out.flatten(0, 1), batch["targets"].flatten(),
                                   ignore_index=IGNORE)
        return ((out[..., 0] - batch["targets"]) ** 2)[batch["mask"]].mean()

    def evaluate(self, model: SequenceModel, data: dict[str, torch.Tensor],
                 batch_size: int = 256) -> dict:
        n = data["inputs"].shape[0]
        out = torch.cat([self.forward(model, take(data, slice(s, s + batch_size)))
                         for s in range(0, n, batch_size)])
        return self.task.metrics(out, data)

    def run(self, seed: int, *, data: TaskData | None = None, progress: bool = False,
            desc: str = "") -> FitResult:
        """Fit with ``seed`` (it fixes the task data ``task.build(seed)``, the initialisation
        and the batch order); test metrics of the best validation checkpoint, with the task's
        reference numbers (``extra``) and the scheme's streaming latency."""
        data = self.task.build(seed) if data is None else data
        torch.manual_seed(seed)
        model = SequenceModel(self.model)
        res = fit(model, self, data.train, data.test, self.train, seed=seed,
                  name=desc or self.name, progress=progress)
        res.metrics.update(data.extra)
        res.metrics["latency_frames"] = latency_frames(self.scheme, len(model.blocks))
        if self.task_name == "lookahead":
            lat = res.metrics["latency_frames"]
            ahead = self.task.seq_len - 1 if lat is None else lat
            res.metrics["best_possible_accuracy"] = self.task.best_accuracy(ahead)
        return res
