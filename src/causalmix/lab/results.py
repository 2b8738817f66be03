"""What a finding's ``judge`` and ``plot`` receive: the finished runs of its arms
(:class:`Results`).

``Results`` is a read-only mapping from each arm's name to its finished runs in seed order
(``list[Run]``); an arm with no finished run is absent, so ``results.get(arm) or []`` is the
idiom for "this arm's runs, maybe none". A :class:`Run` *is* the dict of the run's metrics --
what its task's ``metrics(out, data)`` returned for the test split, plus the trainer's
``"val_score"``, the task's ``extra`` and the experiment's ``"latency_frames"`` -- read back
from the run database as JSON values, so the groups of a per-group metric are **strings**
(``run["accuracy_by_pairs"]["16"]``). What is not a metric is an attribute, never a key (a
judge that walks a run's keys sees metrics only): ``run.seed``, ``run.key`` (the run key),
``run.steps`` (optimizer steps taken), ``run.stop_reason`` (see
:data:`~causalmix.lab.trainer.STOP_REASONS`).

The helpers read across seeds::

    results.metric("softmax", "accuracy")                 # [one value per seed]
    results.grouped("softmax", "accuracy_by_pairs", 16)   # [one value per seed]
    results.groups("accuracy_by_pairs")                   # [4, 8, 16] (ints where they are)
    results.missing(["softmax", "causal linear"])         # arms without a finished run

Build one from plain metrics dicts (a test, a notebook) with ``Results({arm: [m0, m1]})``:
a plain dict becomes a :class:`Run` whose seed is its position.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

__all__ = ["Results", "Run"]


class Run(dict):
    """One finished run: the dict of its metrics (JSON values, with ``"score"``), and as
    attributes its ``seed``, run ``key``, ``steps`` and ``stop_reason``."""

    __slots__ = ("key", "seed", "steps", "stop_reason")

    def __init__(self, metrics: Mapping, *, seed: int, key: str = "", steps: int = 0,
                 stop_reason: str = "steps"):
        super().__init__(metrics)
        self.seed, self.key, self.steps, self.stop_reason = seed, key, steps, stop_reason

    def __repr__(self) -> str:
        return f"Run(seed={self.seed}, {dict.__repr__(self)})"

    @classmethod
    def from_row(cls, row: Mapping) -> Run:
        """The run of a finished row of :meth:`~causalmix.lab.RunDB.runs`."""
        info = row.get("info") or {}
        return cls(row["metrics"], seed=row["seed"], key=row["key"],
                   steps=info.get("steps", 0), stop_reason=info.get("stop_reason", "steps"))


def _group(key: str) -> int | float | str:
    for cast in (int, float):
        try:
            return cast(key)
        except ValueError:
            pass
    return key


class Results(Mapping[str, list[Run]]):
    """Arm name -> its finished runs in seed order (see the module docstring). ``runs``: arm
    -> runs (:class:`Run`, or plain metrics dicts, which get their position as seed); arms
    without a run are left out."""

    def __init__(self, runs: Mapping[str, Iterable[Mapping]] | None = None):
        data = {}
        for arm, rs in (runs or {}).items():
            rs = [r if isinstance(r, Run) else Run(r, seed=i) for i, r in enumerate(rs)]
            if rs:
                data[arm] = sorted(rs, key=lambda r: r.seed)
        self._data = data

    def __getitem__(self, arm: str) -> list[Run]:
        return self._data[arm]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return "Results(" + ", ".join(f"{a!r}: {len(r)} runs" for a, r in self._data.items()) \
            + ")"

    def runs(self, arm: str) -> list[Run]:
        """The runs of ``arm`` (empty when it has none)."""
        return list(self._data.get(arm, ()))

    def seeds(self, arm: str) -> list[int]:
        """The seeds of ``arm``'s runs."""
        return [r.seed for r in self.runs(arm)]

    def metric(self, arm: str, name: str) -> list:
        """Metric ``name`` of every run of ``arm`` (runs without it are left out)."""
        return [r[name] for r in self.runs(arm) if name in r]

    def grouped(self, arm: str, metric: str, group) -> list:
        """Group ``group`` of the per-group ``metric`` of every run of ``arm``."""
        g = str(group)
        return [r[metric][g] for r in self.runs(arm)
                if isinstance(r.get(metric), dict) and g in r[metric]]

    def groups(self, metric: str) -> list:
        """Every group of the per-group ``metric`` in any run, sorted (numbers as numbers)."""
        keys = {_group(k) for rs in self._data.values() for r in rs
                for k in (r.get(metric) or {})}
        return sorted(keys, key=lambda k: (isinstance(k, str), k))

    def missing(self, arms: Iterable[str]) -> list[str]:
        """Those of ``arms`` that have no finished run."""
        return [a for a in arms if a not in self._data]
