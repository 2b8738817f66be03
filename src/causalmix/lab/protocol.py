"""What the lab asks of a task, and the registry of task names.

A **task** is a config object (best a frozen dataclass: its fields are its config, and the run
key hashes them) that provides:

* ``kind``: ``"classification"`` (the model's outputs are logits ``[N, T, C]``, the targets
  class ids ``[N, T]`` with :data:`IGNORE` where nothing is scored; the loss is cross-entropy)
  or ``"regression"`` (outputs ``[N, T, 1]``, float targets ``[N, T]`` and a bool ``mask``
  ``[N, T]`` of the scored positions; the loss is the squared error);
* ``group_key``: the name of a per-example (``[N]``) or per-position (``[N, T]``) tensor of
  the test split that the metrics are reported by (``None``: no groups);
* ``io()``: the model's input and output sizes as :class:`~causalmix.nn.ModelConfig` fields:
  ``{"vocab_size": V}`` (int64 token inputs ``[N, T]``) or ``{"input_dim": F}`` (float
  features ``[N, T, F]``), and ``"output_dim"`` when it differs from the vocabulary;
* ``build(seed) -> TaskData``: the train and test tensors (:class:`TaskData`), deterministic
  in ``seed``; every split holds ``inputs``, ``targets`` and ``prefix_len: [N]`` int64 (the
  part a prefix model reads bidirectionally);
* ``metrics(out, data) -> dict``: the metrics of the model's outputs ``out`` on a split
  ``data``, as JSON values, with ``"score"`` (a float, higher is better: it selects the
  checkpoint and stops early).

Optionally ``to_json()`` (the task's config as JSON values, when it is not a dataclass).
:func:`check_task` checks the protocol (an :class:`~causalmix.lab.Experiment` calls it);
:func:`register_task` names a task class (the built-in ones are in :data:`TASKS`; a task that
is not registered goes by its class name).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

import torch

from causalmix.checks import ArgumentTypeError
from causalmix.nn import spec_to_dict
from causalmix.visibility import Visibility

__all__ = ["IGNORE", "KINDS", "TASKS", "Task", "TaskData", "check_task", "plain",
           "register_task", "task_config", "task_name"]

IGNORE = -100  # target of an unscored position (torch cross_entropy's ignore_index)

#: The kinds of task the lab trains (see the module docstring).
KINDS = ("classification", "regression")


@dataclasses.dataclass
class TaskData:
    """``train`` / ``test`` dicts of tensors with equal dim 0: ``inputs``, ``targets``,
    ``prefix_len`` and, for regression, ``mask``; ``extra`` holds per-task test metadata (JSON
    values, added to every run's metrics)."""

    train: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]
    extra: dict = dataclasses.field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    """The lab's task protocol (see the module docstring)."""

    kind: str
    group_key: str | None

    def io(self) -> dict[str, int]:
        """``vocab_size`` or ``input_dim``, and ``output_dim`` (ModelConfig fields)."""

    def build(self, seed: int) -> TaskData:
        """Train and test tensors, deterministic in ``seed``."""

    def metrics(self, out: torch.Tensor, data: dict[str, torch.Tensor]) -> dict:
        """Metrics of ``out`` on ``data`` (JSON values) with ``"score"``."""


#: Task names -> task classes (the built-in tasks register themselves in
#: :mod:`causalmix.lab.tasks`; add yours with :func:`register_task`).
TASKS: dict[str, type] = {}


def register_task(name: str, cls: type) -> type:
    """Name the task class ``cls`` ``name`` (what run records and exports call it). Registering
    the same class under the same name again is a no-op; another class under a taken name, or
    one class under two names, raises ``ValueError``. Returns ``cls``."""
    if not isinstance(name, str) or not name:
        raise ArgumentTypeError(f"register_task: name must be a non-empty str, got {name!r}")
    if not isinstance(cls, type):
        raise ArgumentTypeError(f"register_task: cls must be a class, got {type(cls).__name__}")
    if TASKS.get(name, cls) is not cls:
        raise ValueError(f"register_task: the name {name!r} is taken by {TASKS[name].__name__}")
    other = [n for n, c in TASKS.items() if c is cls and n != name]
    if other:
        raise ValueError(f"register_task: {cls.__name__} is registered as {other[0]!r} already")
    TASKS[name] = cls
    return cls


def task_name(task: object) -> str:
    """The registered name of ``task``'s class, else its class name."""
    return next((n for n, c in TASKS.items() if type(task) is c), type(task).__name__)


def check_task(task: object, owner: str = "task") -> None:
    """Raise ``TypeError`` / ``ValueError`` naming ``owner`` when ``task`` does not follow
    the protocol: a missing member, an unknown ``kind``, ``io()`` without an input size."""
    missing = [m for m in ("kind", "group_key", "io", "build", "metrics")
               if not hasattr(task, m)]
    if missing:
        raise ArgumentTypeError(f"{owner} must follow the lab's task protocol "
                                f"(causalmix.lab.Task: kind, group_key, io(), build(seed), "
                                f"metrics(out, data)); {type(task).__name__} has no "
                                f"{', '.join(missing)}")
    if task.kind not in KINDS:
        raise ValueError(f"{owner}.kind must be one of {list(KINDS)}, got {task.kind!r}")
    io = task.io()
    if not isinstance(io, dict) or not ({"vocab_size", "input_dim"} & set(io)):
        raise ValueError(f"{owner}.io() must return a dict with vocab_size or input_dim "
                         f"(and output_dim), got {io!r}")
    if not (dataclasses.is_dataclass(task) or callable(getattr(task, "to_json", None))):
        raise ArgumentTypeError(f"{owner}: {type(task).__name__} must be a dataclass (its "
                                f"fields are its config) or define to_json()")


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


def task_config(task: object) -> Any:
    """``task``'s config as JSON values: its ``to_json()``, else ``plain(task)``."""
    to_json = getattr(task, "to_json", None)
    return to_json() if callable(to_json) else plain(task)
