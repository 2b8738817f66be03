"""The lab: the papers' findings as experiments on one trainer and one runner, a run database,
a report.

``causalmix lab run --suite default`` then ``causalmix lab report`` (or ``make lab``);
``causalmix lab export`` writes every run as CSV or JSON lines. Every job -- an
:class:`Experiment` or a point of the adaptive-lookahead study -- is trained by one trainer
(:func:`fit`), run by one runner (:func:`run_jobs`, :func:`run_suite`) and recorded under one
run key (:func:`run_key`) in the folder's :class:`RunDB`.
"""

from causalmix.lab.db import RunDB, run_key
from causalmix.lab.experiments import Experiment, scheme_visibility
from causalmix.lab.export import export_runs
from causalmix.lab.findings import FINDINGS, SUITES, Finding
from causalmix.lab.report import build_report, write_report
from causalmix.lab.runner import Job, run_jobs, run_suite, suite_jobs
from causalmix.lab.tasks import (
    MQAR,
    TASKS,
    FirstToken,
    ICLRegression,
    Lookahead,
    SetDisjointness,
    TaskData,
)
from causalmix.lab.trainer import FitResult, TrainConfig, fit

__all__ = [
    "FINDINGS",
    "MQAR",
    "SUITES",
    "TASKS",
    "Experiment",
    "Finding",
    "FirstToken",
    "FitResult",
    "ICLRegression",
    "Job",
    "Lookahead",
    "RunDB",
    "SetDisjointness",
    "TaskData",
    "TrainConfig",
    "build_report",
    "export_runs",
    "fit",
    "run_jobs",
    "run_key",
    "run_suite",
    "scheme_visibility",
    "suite_jobs",
    "write_report",
]
