"""An experiment: a task, a composed model config, a visibility scheme and a train config.

The visibility of each layer is either a named scheme (:data:`SCHEMES`) or any visibility
spec: one for every layer (``scheme=Chunked(4, lookahead=1)``) or one per layer
(``scheme=(Chunked(1, lookahead=2), Causal())``), as long as the model's mixer serves it.

:class:`Experiment` is a plain typed config: it holds a :class:`~causalmix.nn.ModelConfig`
(built once by the finding that defines it, from a preset and the task's input/output sizes)
and a :class:`~causalmix.lab.trainer.TrainConfig`; :meth:`Experiment.run` fits it with the
lab's one trainer (:func:`~causalmix.lab.trainer.fit`) and the task's own metrics.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from causalmix.checks import ArgumentTypeError
from causalmix.lab.protocol import IGNORE, TaskData, check_task, plain, task_config, task_name
from causalmix.lab.trainer import FitResult, TrainConfig, fit, take
from causalmix.nn import MIXERS, ModelConfig, SequenceModel, mix
from causalmix.nn.config import check_servable
from causalmix.visibility import Causal, Full, Prefix, Visibility, Window

__all__ = ["POSITIONS", "SCHEMES", "Experiment", "Scheme", "TrainConfig", "latency_frames",
           "mixer_available", "plain", "scheme_visibility"]

#: Visibility schemes an experiment can name (applied per batch, per layer):
#:   "causal"        every layer Causal()
#:   "prefix"        every layer Prefix(prefix_len) (prefix-LM: the prompt is read bidirectionally)
#:   "full"          every layer Full() (a bidirectional encoder)
#:   "lookahead-L"   the first layer Causal() | Window(0, L) (L frames ahead), causal above
SCHEMES = ("causal", "prefix", "full", "lookahead-L")

#: What :attr:`Experiment.scheme` takes: a name of :data:`SCHEMES`, a spec for every layer, or
#: one spec per layer.
Scheme = str | Visibility | tuple[Visibility, ...]

#: Positional encodings: "rope" (the model's rotary positions) or "none" (every token at
#: rotary angle 0, i.e. no positional encoding at all; the softmax mixer then sees order only
#: through its visibility).
POSITIONS = ("rope", "none")


def mixer_available(name: str) -> bool:
    """Whether :mod:`causalmix.nn` has a mixer called ``name`` (e.g. the gated linear one)."""
    return name in MIXERS


def scheme_visibility(scheme: Scheme, n_layers: int,
                      prefix_len: torch.Tensor | None = None) -> tuple[Visibility, ...]:
    """Per-layer specs for ``scheme`` (a name of :data:`SCHEMES`, a spec for every layer, or
    ``n_layers`` specs); ``prefix_len: [B]`` for "prefix"."""
    if isinstance(scheme, Visibility):
        return (scheme,) * n_layers
    if isinstance(scheme, (tuple, list)):
        if len(scheme) != n_layers or not all(isinstance(v, Visibility) for v in scheme):
            raise ValueError(f"a per-layer scheme must hold {n_layers} visibility specs (one "
                             f"per layer), got {scheme!r}")
        return tuple(scheme)
    if not isinstance(scheme, str):
        raise ArgumentTypeError(f"scheme must be a scheme name ({list(SCHEMES)}), a visibility "
                                f"spec or a tuple of specs, got {type(scheme).__name__}")
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


def latency_frames(scheme: Scheme, n_layers: int) -> int | None:
    """Frames a stream waits per output at most (the per-layer lookaheads add up); None if
    unbounded."""
    if isinstance(scheme, str) and scheme in ("prefix", "full"):
        return None
    total = 0
    for spec in scheme_visibility(scheme, n_layers):
        if spec.lookahead_frames is None:
            return None
        total += spec.lookahead_frames
    return total


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One trainable setting: ``task`` (any object following the task protocol,
    :class:`~causalmix.lab.Task`), ``model`` (its :class:`~causalmix.nn.ModelConfig`,
    input/output sizes those of the task's ``io()``; its ``visibility`` fixes the number of
    layers, ``scheme`` replaces the specs per batch), ``scheme`` (:data:`Scheme`: a name of
    :data:`SCHEMES`, a spec for every layer, or one spec per layer; a list is kept as a
    tuple), ``positions`` (:data:`POSITIONS`) and ``train``. ``finding`` and ``arm`` name
    what the report groups it under.

    The run key hashes :meth:`to_json`: a named scheme is written as its name (as before
    specs were accepted, so existing keys hold), specs in their tagged form."""

    finding: str
    arm: str
    task: object
    model: ModelConfig
    scheme: Scheme = "causal"
    positions: str = "rope"
    train: TrainConfig = TrainConfig()

    def __post_init__(self):
        check_task(self.task, "Experiment.task")
        if isinstance(self.scheme, list):
            object.__setattr__(self, "scheme", tuple(self.scheme))
        if not isinstance(self.model, ModelConfig):
            raise TypeError(f"Experiment.model must be a ModelConfig, got "
                            f"{type(self.model).__name__}")
        n_layers = len(self.model.blocks)
        specs = scheme_visibility(self.scheme, n_layers, torch.zeros(1, dtype=torch.int64))
        for n, spec in enumerate(specs):  # refused here, not at the first forward
            what = self.scheme if isinstance(self.scheme, str) else spec
            check_servable(self.model.mixer, spec, f"Experiment {self.name}: scheme "
                                                   f"{what!r}, layer {n}")
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
        """The task's registered name (:func:`~causalmix.lab.register_task`), else its class
        name."""
        return task_name(self.task)

    def to_json(self) -> dict:
        return {"finding": self.finding, "arm": self.arm, "task": self.task_name,
                "task_config": task_config(self.task), "model": plain(self.model),
                "scheme": plain(self.scheme), "positions": self.positions,
                "train": plain(self.train)}

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
        if self.task_name == "lookahead" and isinstance(self.scheme, str):
            lat = res.metrics["latency_frames"]
            ahead = self.task.seq_len - 1 if lat is None else lat
            res.metrics["best_possible_accuracy"] = self.task.best_accuracy(ahead)
        return res
