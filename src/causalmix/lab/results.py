"""What a finding's ``judge`` and ``plot`` receive: the finished runs of its arms
(:class:`Results`).

``Results`` maps each arm's name to its finished runs (:class:`Run`, in seed order); an arm
with no finished run is absent. A run's ``metrics`` are what its task's ``metrics`` returned
(plus the trainer's ``val_score`` and the task's ``extra``), read back from the run database:
JSON values, so the groups of a per-group metric are **strings**
(``run.metrics["accuracy_by_pairs"]["16"]``). The helpers read across seeds::

    results.values("softmax", "accuracy")                 # [one float per seed]
    results.grouped("softmax", "accuracy_by_pairs", 16)   # [one float per seed]
    results.groups("accuracy_by_pairs")                   # [4, 8, 16] (ints where they are)
    results.missing(["softmax", "causal linear"])         # arms without a finished run

Build one from plain metrics dicts (a test, a notebook) with :meth:`Results.of`.
"""

from __future__ import annotations

from collections import UserDict
from collections.abc import Iterable, Mapping
from typing import NamedTuple

__all__ = ["Results", "Run"]


class Run(NamedTuple):
    """One finished run of an arm."""

    seed: int
    metrics: dict  # the task's metrics (JSON values), with "score"
    steps: int = 0  # optimizer steps taken
    stop_reason: str = "steps"  # see causalmix.lab.trainer.STOP_REASONS


def _group(key: str) -> int | float | str:
    for cast in (int, float):
        try:
            return cast(key)
        except ValueError:
            pass
    return key


class Results(UserDict[str, tuple[Run, ...]]):
    """Arm name -> its finished runs in seed order (see the module docstring)."""

    def __init__(self, runs: Mapping[str, Iterable[Run]] | None = None):
        by_seed = {arm: tuple(sorted(rs, key=lambda r: r.seed)) for arm, rs in
                   (runs or {}).items()}
        super().__init__({arm: rs for arm, rs in by_seed.items() if rs})
        self._runs = self.data

    @classmethod
    def of(cls, metrics: Mapping[str, Iterable[dict]]) -> Results:
        """From ``{arm: [metrics of seed 0, seed 1, ...]}`` (groups as str or int keys)."""
        def js(m: dict) -> dict:
            return {k: ({str(g): v for g, v in x.items()} if isinstance(x, dict) else x)
                    for k, x in m.items()}

        return cls({arm: [Run(i, js(m)) for i, m in enumerate(ms)]
                    for arm, ms in metrics.items()})

    def __repr__(self) -> str:
        return "Results(" + ", ".join(f"{a!r}: {len(r)} runs" for a, r in self._runs.items()) \
            + ")"

    def runs(self, arm: str) -> tuple[Run, ...]:
        """The runs of ``arm`` (empty when it has none)."""
        return self._runs.get(arm, ())

    def values(self, arm: str, metric: str) -> list:
        """``metric`` of every run of ``arm`` (runs without it are left out)."""
        return [r.metrics[metric] for r in self.runs(arm) if metric in r.metrics]

    def grouped(self, arm: str, metric: str, group) -> list:
        """Group ``group`` of the per-group ``metric`` of every run of ``arm``."""
        g = str(group)
        return [r.metrics[metric][g] for r in self.runs(arm)
                if isinstance(r.metrics.get(metric), dict) and g in r.metrics[metric]]

    def groups(self, metric: str) -> list:
        """Every group of the per-group ``metric`` in any run, sorted (numbers as numbers)."""
        keys = {_group(k) for rs in self._runs.values() for r in rs
                for k in (r.metrics.get(metric) or {})}
        return sorted(keys, key=lambda k: (isinstance(k, str), k))

    def missing(self, arms: Iterable[str]) -> list[str]:
        """Those of ``arms`` that have no finished run."""
        return [a for a in arms if a not in self._runs]

    def first(self) -> Run | None:
        """Any one run (the first arm's first), for metrics every run shares."""
        return next((rs[0] for rs in self._runs.values()), None)
