"""The lab: the papers' findings as experiments on one trainer, a run database, a report.

``causalmix lab run --suite default`` then ``causalmix lab report`` (or ``make lab``);
``causalmix lab export`` writes every run as CSV or JSON lines.
"""

from causalmix.lab.db import RunDB
from causalmix.lab.experiments import Experiment, layer_visibility
from causalmix.lab.export import export_runs
from causalmix.lab.findings import FINDINGS, SUITES, Finding
from causalmix.lab.report import build_report, write_report
from causalmix.lab.runner import run_suite, suite_jobs
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
    "Lookahead",
    "RunDB",
    "SetDisjointness",
    "TaskData",
    "TrainConfig",
    "build_report",
    "export_runs",
    "fit",
    "layer_visibility",
    "run_suite",
    "suite_jobs",
    "write_report",
]
