"""The lab: the papers' findings as experiments on one trainer and one runner, a run database,
a report.

``causalmix lab run --suite default`` then ``causalmix lab report`` (or ``make lab``);
``causalmix lab export`` writes every run as CSV or JSON lines. Every job -- an
:class:`Experiment` or a point of the adaptive-lookahead study -- is trained by one trainer
(:func:`fit`), run by one runner (:func:`run_jobs`, :func:`run_suite`) and recorded under one
run key (:func:`run_key`) in the folder's :class:`RunDB`.

The lab is open: a task is any config object that follows :class:`Task` (``kind``, ``io()``,
``build(seed)``, ``metrics(out, data)``; :func:`register_task` names it), an
:class:`Experiment` takes any visibility spec per layer, and :func:`register_finding` adds a
:class:`Finding` whose ``judge`` and ``plot`` receive its arms' finished runs as
:class:`Results`. ``causalmix lab run --plugin my_module --finding F9`` imports such a module
(:func:`load_plugin`) and trains only that finding; ``examples/lab_plugin.py`` is one.
"""

from causalmix.lab.db import RunDB, run_key
from causalmix.lab.experiments import Experiment, scheme_visibility
from causalmix.lab.export import export_runs
from causalmix.lab.findings import FINDINGS, SUITES, Arm, Finding, Judgement, register_finding
from causalmix.lab.plugins import PluginError, load_plugin
from causalmix.lab.protocol import Task, check_task, register_task
from causalmix.lab.report import build_report, write_report
from causalmix.lab.results import Results, Run
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
    "Arm",
    "Experiment",
    "Finding",
    "FirstToken",
    "FitResult",
    "ICLRegression",
    "Job",
    "Judgement",
    "Lookahead",
    "PluginError",
    "Results",
    "Run",
    "RunDB",
    "SetDisjointness",
    "Task",
    "TaskData",
    "TrainConfig",
    "build_report",
    "check_task",
    "export_runs",
    "fit",
    "load_plugin",
    "register_finding",
    "register_task",
    "run_jobs",
    "run_key",
    "run_suite",
    "scheme_visibility",
    "suite_jobs",
    "write_report",
]
