"""What the lab's tasks share (:mod:`causalmix.lab.tasks` is their face): the train / test
sizes every task starts with (:class:`Split`), the classification metrics, argument checks."""

from __future__ import annotations

import dataclasses

import torch

from causalmix.checks import check_int
from causalmix.lab.protocol import IGNORE, TASKS, TaskData, register_task

__all__ = ["IGNORE", "Split", "TaskData", "classification_metrics", "register_task", "TASKS"]


def _check_pos(obj, *names):
    for n in names:
        check_int(f"{type(obj).__name__}.{n}", getattr(obj, n), 1)


def classification_metrics(out: torch.Tensor, data: dict[str, torch.Tensor],
                           group_key: str | None = None) -> dict:
    """``out: [N, T, C]`` logits -> ``accuracy`` (and ``score``) over the labelled positions,
    and ``accuracy_by_<group_key>`` per value of ``data[group_key]: [N]`` (or ``[N, T]``)."""
    tgt = data["targets"]
    lab = tgt != IGNORE
    hit = (out.argmax(-1) == tgt) & lab
    acc = float(hit.sum() / lab.sum())
    res = {"accuracy": acc, "score": acc}
    if group_key is not None:
        grp = data[group_key]
        if grp.dim() == 1:
            grp = grp[:, None].expand_as(tgt)
        res[f"accuracy_by_{group_key}"] = {
            int(g): float(hit[(grp == g) & lab].sum() / ((grp == g) & lab).sum())
            for g in grp[lab].unique().tolist()}
    return res


def _sizes(obj, name: str) -> tuple[int, ...]:
    v = getattr(obj, name)
    v = (v,) if isinstance(v, int) and not isinstance(v, bool) else tuple(v)
    if not v or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v):
        raise ValueError(f"{type(obj).__name__}.{name} must be ints >= 1, got {v!r}")
    object.__setattr__(obj, name, tuple(sorted(set(v))))
    return v


@dataclasses.dataclass(frozen=True)
class Split:
    """How many examples a task draws: ``num_train`` for training (the trainer holds out its
    last ``TrainConfig.num_val`` for validation) and ``num_test`` per test set (every task's
    first two fields; the lab's suites set both)."""

    num_train: int = 20000
    num_test: int = 512
