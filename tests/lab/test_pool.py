"""``run_jobs(workers=N)`` (``causalmix lab run --workers``): the same records as one process,
errors raised in the parent, nothing recorded as done that did not finish."""

from __future__ import annotations

import dataclasses

import pytest

from causalmix.lab.db import RunDB
from causalmix.lab.runner import run_jobs, suite_jobs


def _records(out):
    db = RunDB(out, create=False)
    try:
        return {r["key"]: r for r in db.runs(status=None)}
    finally:
        db.close()


def test_workers_give_the_same_runs_as_one_process(tmp_path):
    jobs = suite_jobs("smoke")[:5]
    one = run_jobs(jobs, tmp_path / "one", suite="smoke", seeds=2, progress=False,
                   log=lambda _: None)
    two = run_jobs(jobs, tmp_path / "two", suite="smoke", seeds=2, progress=False,
                   log=lambda _: None, workers=2)
    assert one["keys"] == two["keys"] and one["ran"] == two["ran"] == 10
    a, b = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert a.keys() == b.keys() == set(one["keys"])
    for key in a:
        assert b[key]["status"] == "done"
        assert b[key]["metrics"] == a[key]["metrics"], a[key]["experiment"]
        assert b[key]["curve"] == a[key]["curve"]
        assert b[key]["info"]["threads"] == 1
    again = run_jobs(jobs, tmp_path / "two", suite="smoke", seeds=2, progress=False,
                     log=lambda _: None, workers=2)
    assert again["ran"] == 0 and again["skipped"] == 10


@dataclasses.dataclass(frozen=True)
class _Broken:
    """A job whose run fails (defined at module level: a worker unpickles it)."""

    finding: str = "FX"
    arm: str = "broken"
    name: str = "FX/broken"
    task_name: str = "none"

    def to_json(self):
        return {"broken": True}

    def run(self, seed, *, progress=False, desc=""):
        raise RuntimeError(f"run {seed} failed on purpose")


def test_an_error_in_a_worker_is_raised_and_not_recorded_as_done(tmp_path):
    with pytest.raises(RuntimeError, match="failed on purpose"):
        run_jobs([_Broken()], tmp_path, suite="smoke", seeds=3, progress=False,
                 log=lambda _: None, workers=2)
    assert {r["status"] for r in _records(tmp_path).values()} == {"running"}


def test_workers_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="workers"):
        run_jobs([], tmp_path, suite="smoke", seeds=1, workers=0)
