"""The lab's findings: each a family of experiments (arms), a rule written down before any
number is seen, a verdict from >= 3 seeds (mean +- standard error), a table and a plot.

A finding is data (:class:`Finding`): ``arms(size)`` lists its arms (each an
:class:`~causalmix.lab.experiments.Experiment`, an adaptive-study point, or a reason it is not
run), ``judge(results)`` applies the rule to the finished runs' metrics and returns a
:class:`Judgement`, ``plot(results, ax)`` draws its figure. The rules below are the ones in
the report; they were fixed when the findings were written, before the default suite ran.

One finding a file (``f1_recall.py`` ... ``f8_text.py``), what they share in ``base.py``
(suite sizes, the records, statistics, table cells, model configs, plots); this face holds
:data:`FINDINGS`, every finding by key in report order.
"""

from causalmix.lab.findings.base import (
    GATED_MISSING,
    GATED_MIXER,
    SUITES,
    Arm,
    Finding,
    Judgement,
    SuiteSize,
    mean_se,
)
from causalmix.lab.findings.f1_recall import F1
from causalmix.lab.findings.f2_disjointness import F2
from causalmix.lab.findings.f3_icl import F3
from causalmix.lab.findings.f4_positions import F4
from causalmix.lab.findings.f5_lookahead import F5
from causalmix.lab.findings.f6_hydra import F6
from causalmix.lab.findings.f7_delta import F7
from causalmix.lab.findings.f8_text import F8

__all__ = ["FINDINGS", "GATED_MISSING", "GATED_MIXER", "SUITES", "Arm", "Finding", "Judgement",
           "SuiteSize", "mean_se"]

#: Every finding of the lab, by key, in report order.
FINDINGS: dict[str, Finding] = {f.key: f for f in (F1, F2, F3, F4, F5, F6, F7, F8)}
