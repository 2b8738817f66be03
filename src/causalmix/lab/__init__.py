"""The lab: tasks, experiments, a CPU trainer, a run database and an HTML/Markdown report.

``causalmix lab run --suite default`` then ``causalmix lab report`` (or ``make lab``).
"""

from causalmix.lab.db import RunDB
from causalmix.lab.experiments import SUITES, Experiment, TrainConfig, layer_visibility, suite
from causalmix.lab.report import write_report
from causalmix.lab.runner import run_suite
from causalmix.lab.tasks import MQAR, TASKS, ICLRegression, Lookahead, TaskData
from causalmix.lab.train import evaluate, train_one

__all__ = [
    "MQAR",
    "SUITES",
    "TASKS",
    "Experiment",
    "ICLRegression",
    "Lookahead",
    "RunDB",
    "TaskData",
    "TrainConfig",
    "evaluate",
    "layer_visibility",
    "run_suite",
    "suite",
    "train_one",
    "write_report",
]
