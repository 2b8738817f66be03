"""What every finding is made of: suite sizes (:data:`SUITES`), arms, judgements, the
:class:`Finding` record, and the helpers the findings share (mean and standard error, table
cells, the arms' model configs, plots)."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable
from typing import NamedTuple

from causalmix.lab.experiments import Experiment, mixer_available
from causalmix.lab.results import Results, Run
from causalmix.lab.trainer import TrainConfig
from causalmix.nn import ModelConfig
from causalmix.nn.config import PRESETS

__all__ = ["GATED_MISSING", "GATED_MIXER", "ONE_SEED", "SUITES", "Arm", "Finding", "Judgement",
           "Results", "Run", "SuiteSize", "bars", "by_group", "conditions", "disjoint", "fmt",
           "gated_arm", "gated_model", "judged", "line_plot", "linear_model", "mean_se",
           "not_run", "softmax_model", "values"]

#: The name :mod:`causalmix.nn` gives the gated linear mixer (Mamba-2-style per-token gates;
#: with ``Full()`` its reverse scan makes it Hydra-style bidirectional). The arms that need it
#: are reported "not run" until ``causalmix.nn`` has it.
GATED_MIXER = "gated"
GATED_MISSING = "not run: gated mixer not available"


@dataclasses.dataclass(frozen=True)
class SuiteSize:
    """How big a suite is: ``seeds``; ``steps`` multiplies every finding's step count;
    ``num_train`` / ``num_test`` / ``num_val`` examples; ``evals`` validations per run."""

    seeds: int
    steps: float
    num_train: int
    num_test: int
    num_val: int
    evals: int

    def train(self, steps: int, **kw) -> TrainConfig:
        n = max(int(round(steps * self.steps)), 4)
        return TrainConfig(steps=n, num_val=self.num_val, eval_every=max(n // self.evals, 1),
                           **kw)


SUITES: dict[str, SuiteSize] = {
    # CI: every code path (every task, arm kind, the DB, the report) in seconds
    "smoke": SuiteSize(seeds=1, steps=0.004, num_train=96, num_test=16, num_val=32, evals=2),
    # `make lab`: every finding, 3 seeds, <= 15 minutes on 2 CPU cores
    "default": SuiteSize(seeds=3, steps=1.0, num_train=16384, num_test=512, num_val=256,
                         evals=8),
    # longer runs, more seeds, stronger separation
    "full": SuiteSize(seeds=5, steps=2.5, num_train=50000, num_test=1000, num_val=512,
                      evals=10),
}


class Arm(NamedTuple):
    """One arm of a finding: ``job`` (an Experiment or a study point) or ``missing`` (why it
    is not run)."""

    name: str
    job: object | None
    missing: str | None = None


class Judgement(NamedTuple):
    """What a finding's ``judge`` returns: whether the rule holds (``None``: not run), the
    measured numbers in one line, the table (header, rows of cells) and notes."""

    holds: bool | None  # None: not run (an arm the rule needs is missing)
    numbers: str  # the measured numbers the verdict rests on (for the findings table)
    table: tuple[list[str], list[list[str]]]  # header, rows
    notes: list[str]


@dataclasses.dataclass(frozen=True)
class Finding:
    """One finding: its words (``title``, ``paper``, ``claim``, ``rule``, ``knobs``: the
    settings and why; ``history``: the pilots that led to them, for the report's appendix) and
    its three functions (``arms(suite)``, ``judge(results)``, ``plot(results, ax)``; the report
    titles the plot ``"<key> <title>"``).

    ``arms(suite)`` gets a suite's name (a key of :data:`SUITES`; size the arms with
    ``SUITES[suite]``, e.g. ``SUITES[suite].train(steps)``) and returns :class:`Arm` s whose
    jobs carry ``finding=key``. ``judge`` and ``plot`` get the finished runs of the suite's
    arms as :class:`~causalmix.lab.Results` (arm -> list of :class:`~causalmix.lab.Run`, each
    the dict of one seed's metrics with ``seed`` / ``key`` / ``steps`` / ``stop_reason``
    attributes; an arm without a finished run is absent). A finding from your own module joins
    the lab with :func:`~causalmix.lab.register_finding`."""

    key: str
    title: str
    paper: str
    claim: str
    rule: str
    knobs: str
    arms: Callable[[str], list[Arm]]
    judge: Callable[[Results], Judgement]
    plot: Callable[[Results, object], None]
    history: str = ""

    def arm_names(self, suite: str) -> list[str]:
        return [a.name for a in self.arms(suite)]

    @classmethod
    def from_doc(cls, doc: str, *, arms, judge, plot) -> Finding:
        """The finding a module docstring describes: its first line ``"<key>: <title>"``,
        then paragraphs (separated by blank lines) that start ``Paper:``, ``Claim:``,
        ``Rule:``, ``Knobs:`` and ``History:`` (each field's text; lines joined by spaces)."""
        head, *paras = [" ".join(p.split()) for p in doc.strip().split("\n\n")]
        key, _, title = head.partition(": ")
        fields = {}
        for p in paras:
            label, _, text = p.partition(": ")
            if label.lower() not in DOC_FIELDS:
                raise ValueError(f"finding {key}: a docstring paragraph must start with one of "
                                 f"{[f.capitalize() + ':' for f in DOC_FIELDS]}, got {p[:40]!r}")
            fields[label.lower()] = text
        missing = [f for f in DOC_FIELDS[:-1] if f not in fields]
        if missing or not title:
            raise ValueError(f"finding {key}: its docstring lacks {missing or ['a title']}")
        return cls(key=key, title=title.rstrip("."), arms=arms, judge=judge, plot=plot,
                   **fields)


#: The paragraphs of a finding's docstring (:meth:`Finding.from_doc`); ``history`` optional.
DOC_FIELDS = ("paper", "claim", "rule", "knobs", "history")


# ------------------------------------------------------------------------------- helpers


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (``nan`` when empty; for one value the standard
    error is undefined and 0 is returned, so a rule comparing intervals compares the values:
    :func:`fmt` and the report say so; ``nan`` when a value is ``nan``)."""
    if not xs or any(math.isnan(x) for x in xs):
        return math.nan, math.nan
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0
    return statistics.fmean(xs), se


#: What :func:`fmt` writes after a single run's value (one seed: no standard error).
ONE_SEED = "(1 seed: no s.e.)"


def fmt(xs: list[float], digits: int = 3) -> str:
    """A table cell: ``mean ± standard error``; one value alone with :data:`ONE_SEED`."""
    if not xs:
        return "no runs"
    m, s = mean_se(xs)
    if len(xs) == 1:
        return f"{m:.{digits}f} {ONE_SEED}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def values(results: dict[str, list[dict]], arm: str, metric: str) -> list[float]:
    """``metric`` of every finished run of ``arm`` (none: an empty list)."""
    return [r[metric] for r in results.get(arm) or [] if metric in r]


def by_group(runs: list[dict], metric: str, group) -> list[float]:
    return [r[metric][str(group)] for r in runs if str(group) in r.get(metric, {})]


def gated_arm(finding: str, arm: str, make: Callable[[], Experiment]) -> Arm:
    if not mixer_available(GATED_MIXER):
        return Arm(arm, None, GATED_MISSING)
    return Arm(arm, make())


def not_run(results: dict[str, list[dict]], needed: list[str]) -> str | None:
    empty = [a for a in needed if not results.get(a)]
    return None if not empty else "not run: no finished runs of " + ", ".join(empty)


def conditions(checks: dict[str, bool]) -> str:
    """A note listing each condition of a rule and whether the runs meet it."""
    return "Conditions: " + "; ".join(f"{what}: {'yes' if ok else 'no'}"
                                      for what, ok in checks.items()) + "."


def judged(checks: dict[str, bool], numbers: str, table, margins: dict[str, float],
           *notes: str) -> Judgement:
    """The verdict of a rule whose ``checks`` (condition -> met) must all hold. The notes: the
    conditions; the ``margins`` (bound -> how far the measured number is past it, positive
    when met); then ``notes``."""
    past = "; ".join(f"{what} {m:+.4f}" for what, m in margins.items())
    return Judgement(all(checks.values()), numbers, table,
                     [conditions(checks), f"Margins (positive: met): {past}.", *notes])


def disjoint(a: list[float], b: list[float]) -> bool:
    """mean ± standard error intervals of ``a`` and ``b`` do not overlap."""
    (ma, sa), (mb, sb) = mean_se(a), mean_se(b)
    return ma + sa < mb - sb or mb + sb < ma - sa


def linear_model(task, feature_dim: int, d_model: int = 64) -> ModelConfig:
    # no decay: every head holds the whole context; the dense reference form trains fastest
    # at these lengths (tests/test_linear.py checks the chunked form against it)
    return ModelConfig.from_name("tiny-linear", **task.io(), d_model=d_model,
                                 feature_dim=feature_dim, decay=None, impl="reference")


def softmax_model(task, d_model: int = 64) -> ModelConfig:
    return ModelConfig.from_name("tiny-softmax", **task.io(), d_model=d_model)


def gated_model(task, d_model: int = 64) -> ModelConfig:
    """The gated mixer's own tiny preset when :mod:`causalmix.nn` names one, else the tiny
    linear preset with the mixer swapped (and no fixed decay: the gates decay)."""
    if f"tiny-{GATED_MIXER}" in PRESETS:
        return ModelConfig.from_name(f"tiny-{GATED_MIXER}", **task.io(), d_model=d_model)
    return ModelConfig.from_name("tiny-linear", **task.io(), d_model=d_model,
                                 mixer=GATED_MIXER, decay=None)


def line_plot(ax, results, arms, metric, xlabel, ylabel, *, log=False):
    """Mean ± standard error over seeds of the per-group ``metric`` of each arm."""
    for arm in arms:
        rs = results.get(arm) or []
        if not rs:
            continue
        xs = sorted(int(k) for k in rs[0][metric])
        ms = [mean_se(by_group(rs, metric, x)) for x in xs]
        ax.errorbar(xs, [m for m, _ in ms], yerr=[s for _, s in ms], marker="o", capsize=3,
                    label=arm)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=7)


def bars(ax, results, groups: list[tuple[str, Callable[[dict], float]]], arms, ylabel):
    width = 0.8 / max(len(groups), 1)
    for gi, (gname, get) in enumerate(groups):
        xs, ms, ss = [], [], []
        for i, arm in enumerate(arms):
            vals = [get(r) for r in results.get(arm) or []]
            if not vals:
                continue
            m, s = mean_se(vals)
            xs.append(i + (gi - (len(groups) - 1) / 2) * width)
            ms.append(m)
            ss.append(s)
            ax.scatter([xs[-1]] * len(vals), vals, color="k", s=8, zorder=3)
        ax.bar(xs, ms, width=width, yerr=ss, capsize=3, alpha=0.75, label=gname)
    ax.set_xticks(range(len(arms)), [a.replace(" (", "\n(") for a in arms], fontsize=7)
    ax.set_xlabel("arm (bars: mean ± standard error over seeds; dots: seeds)")
    ax.set_ylabel(ylabel)
    if len(groups) > 1:
        ax.legend(fontsize=7)
