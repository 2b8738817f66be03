"""The lab's findings: each a family of experiments (arms), a rule written down before any
number is seen, a verdict from >= 3 seeds (mean +- standard error), a table and a plot.

A finding is data (:class:`Finding`): ``arms(size)`` lists its arms (each an
:class:`~causalmix.lab.experiments.Experiment`, an adaptive-study point, or a reason it is not
run), ``judge(results)`` applies the rule to the finished runs' metrics and returns a
:class:`Judgement`, ``plot(results, ax)`` draws its figure. The rules below are the ones in
the report; they were fixed when the findings were written, before the default suite ran.

One finding a file (``f1_recall.py`` ... ``f8_text.py``), what they share in ``base.py``
(suite sizes, the records, statistics, table cells, model configs, plots); this face holds
:data:`FINDINGS`, every finding by key in report order, and :func:`register_finding`, which
adds one from your own module (``causalmix lab run --plugin my_module`` imports it).
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
           "SuiteSize", "mean_se", "register_finding", "select_findings"]

#: Every finding of the lab, by key, in report order.
FINDINGS: dict[str, Finding] = {f.key: f for f in (F1, F2, F3, F4, F5, F6, F7, F8)}


def register_finding(finding: Finding) -> Finding:
    """Add ``finding`` to :data:`FINDINGS` (after those there; the report follows that order),
    so that the runner, the report, ``lab list`` and ``lab export`` know it. Registering the
    same object again is a no-op; a key that is taken by another finding raises
    ``ValueError``, anything but a :class:`Finding` ``TypeError``. Returns ``finding``.

    Its key names it on the command line (``--finding F9``) and in the run records (every job
    of its arms must carry ``finding=<key>``), so it must be a non-empty string without
    ``/`` or ``,``."""
    if not isinstance(finding, Finding):
        raise TypeError(f"register_finding: finding must be a causalmix.lab.Finding, got "
                        f"{type(finding).__name__}")
    key = finding.key
    if not isinstance(key, str) or not key or "/" in key or "," in key or key != key.strip():
        raise ValueError(f"register_finding: a finding's key must be a non-empty str without "
                         f"'/', ',' or surrounding spaces, got {key!r}")
    if FINDINGS.get(key, finding) is not finding:
        raise ValueError(f"register_finding: the key {key!r} is taken by the finding "
                         f"{FINDINGS[key].title!r}; give yours another key")
    FINDINGS[key] = finding
    return finding


def select_findings(keys=None) -> dict[str, Finding]:
    """The findings of ``keys`` (an iterable of keys; ``None``: every one) in report order;
    an unknown key raises ``ValueError`` naming the known ones."""
    if keys is None:
        return dict(FINDINGS)
    keys = [keys] if isinstance(keys, str) else list(keys)
    unknown = [k for k in keys if k not in FINDINGS]
    if unknown:
        raise ValueError(f"unknown finding {', '.join(map(repr, unknown))}; findings: "
                         f"{', '.join(FINDINGS)} (a plugin's findings need --plugin)")
    return {k: f for k, f in FINDINGS.items() if k in keys}
