"""The lab's one runner: every job (an experiment, an adaptive-study point) for every seed not
yet done, recorded in the run database under the one run key (:func:`~causalmix.lab.db.run_key`).

A job is anything with ``finding`` and ``arm`` (what the report groups it under), ``name``,
``task_name``, ``to_json()`` (its whole config, the run key's input) and
``run(seed, *, progress, desc) -> FitResult`` (:class:`Job`); :func:`run_jobs` runs a list of
them, :func:`run_suite` the jobs of a suite.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch

from causalmix.checks import check_int
from causalmix.lab.db import RunDB, git_revision, run_key
from causalmix.lab.pool import run_parallel
from causalmix.lab.trainer import STOP_REASONS, FitResult

__all__ = ["Job", "run_jobs", "run_suite", "suite_jobs"]


class Job(Protocol):
    """What the runner asks of a job."""

    finding: str
    arm: str

    @property
    def name(self) -> str:
        """``"<finding>/<arm>"``."""

    @property
    def task_name(self) -> str:
        """The task's name (a key of :data:`~causalmix.lab.tasks.TASKS`)."""

    def to_json(self) -> dict:
        """The job's whole config as JSON values (what its run key hashes)."""

    def run(self, seed: int, *, progress: bool = False, desc: str = "") -> FitResult:
        """Train with ``seed``; test metrics (with ``"score"``) of the best checkpoint."""


def suite_jobs(suite: str, findings: Sequence[str] | None = None) -> list[Job]:
    """The jobs of every arm of suite ``suite`` that can run (arms whose mixer is missing are
    left out; the report says why), finding by finding: of every registered finding, or of
    those whose keys ``findings`` lists. A job whose ``finding`` is not the key of the finding
    that lists it raises ``ValueError`` (its runs would be filed under another finding)."""
    from causalmix.lab.findings import SUITES, select_findings

    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; suites: {sorted(SUITES)}")
    jobs = []
    for key, f in select_findings(findings).items():
        for arm in f.arms(suite):
            if arm.job is None:
                continue
            if arm.job.finding != key:
                raise ValueError(f"finding {key}: arm {arm.name!r} has a job of finding "
                                 f"{arm.job.finding!r}; give its jobs finding={key!r}")
            jobs.append(arm.job)
    return jobs


def run_jobs(jobs: Sequence[Job], out: str | Path, *, suite: str, seeds: int,
             progress: bool = True, log: Callable[[str], None] = print, workers: int = 1,
             plugins: tuple[str, ...] = ()) -> dict:
    """Train every job for seeds ``0 .. seeds-1``, skipping the runs already done in
    ``out/runs.sqlite``; each run is recorded under ``suite``. ``workers > 1`` trains that many
    runs at a time in worker processes (:func:`causalmix.lab.pool.run_parallel`, which loads
    ``plugins`` in each worker first: :func:`~causalmix.lab.load_plugin`; no progress bars
    there), with the same results. Returns
    ``{"ran", "skipped", "keys", "wall_time_s"}`` (``keys``: the run key of every (job, seed),
    in order)."""
    check_int("seeds", seeds, 1)
    check_int("workers", workers, 1)
    db = RunDB(out)
    rev = git_revision()
    todo = [(job, s) for job in jobs for s in range(seeds)]
    keys = [run_key(job, s) for job, s in todo]
    left = [(i, job, s) for i, ((job, s), key) in enumerate(zip(todo, keys, strict=True), 1)
            if db.status(key) != "done"]
    number = {(id(job), s): i for i, job, s in left}
    ran = 0
    t0 = time.perf_counter()

    def head(job, seed) -> str:
        return f"[{number[id(job), seed]}/{len(todo)}] {job.name} seed={seed}"

    def started(job, seed) -> None:
        db.start(run_key(job, seed), experiment=job.name, task=job.task_name, seed=seed,
                 suite=suite, config=job.to_json(), git_rev=rev)

    def finished(job, seed, res: FitResult, wall: float, threads: int) -> None:
        nonlocal ran
        db.finish(run_key(job, seed), metrics=res.metrics, curve=res.curve,
                  info={"steps": res.steps, "stop_reason": res.stop_reason,
                        "params": res.params, "threads": threads, "arm": job.arm,
                        "finding": job.finding},
                  wall_time_s=wall)
        ran += 1
        log(f"{head(job, seed)}: score {res.metrics['score']:.4f} after {res.steps} steps "
            f"({STOP_REASONS[res.stop_reason]}), {wall:.1f}s")

    try:
        if workers == 1 or len(left) <= 1:
            for _, job, seed in left:
                started(job, seed)
                t = time.perf_counter()
                res = job.run(seed, progress=progress, desc=head(job, seed))
                finished(job, seed, res, time.perf_counter() - t, torch.get_num_threads())
        else:
            run_parallel([(job, s) for _, job, s in left], workers, started=started,
                         finished=finished, plugins=plugins)
    finally:
        db.close()
    return {"ran": ran, "skipped": len(todo) - len(left), "keys": keys,
            "wall_time_s": time.perf_counter() - t0}


def run_suite(name: str, out: str | Path, *, seeds: int | None = None, progress: bool = True,
              log: Callable[[str], None] = print, findings: Sequence[str] | None = None,
              workers: int = 1, plugins: tuple[str, ...] = ()) -> dict:
    """:func:`run_jobs` of suite ``name``'s jobs (of the findings ``findings`` lists, default
    every registered one: :func:`suite_jobs`) for seeds ``0 .. seeds-1`` (default: the
    suite's own count); writes ``out/suite_<name>.json`` (this invocation's wall time and load,
    and the wall time of every invocation so far) for the report's closing note. Runs on the
    torch threads the process has (``causalmix lab run --threads`` sets them; this call changes
    no process-wide setting), ``workers`` runs at a time (:func:`run_jobs`; ``plugins``: what
    the workers load first, the ``--plugin`` values). Returns
    ``{"ran", "skipped", "wall_time_s"}``."""
    from causalmix.lab.findings import SUITES

    findings = [findings] if isinstance(findings, str) else findings
    jobs = suite_jobs(name, findings)
    seeds = SUITES[name].seeds if seeds is None else seeds
    check_int("seeds", seeds, 1)
    load_start = os.getloadavg()[0]
    res = run_jobs(jobs, out, suite=name, seeds=seeds, progress=progress, log=log,
                   workers=workers, plugins=plugins)
    meta = {"suite": name, "wall_time_s": res["wall_time_s"], "ran": res["ran"],
            "skipped": res["skipped"], "seeds": seeds, "threads": torch.get_num_threads(),
            "workers": workers, "cpus": os.cpu_count(), "load_start": load_start,
            "load_end": os.getloadavg()[0]}
    path = Path(out, f"suite_{name}.json")
    history = json.loads(path.read_text()).get("history", []) if path.exists() else []
    meta["findings"] = None if findings is None else list(findings)  # None: every one
    meta["history"] = [*history, {k: meta[k] for k in ("wall_time_s", "ran", "skipped",
                                                       "findings")}]
    path.write_text(json.dumps(meta, indent=1))
    log(f"suite {name}: {res['ran']} runs trained, {res['skipped']} already done, "
        f"{res['wall_time_s']:.1f}s")
    return {k: res[k] for k in ("ran", "skipped", "wall_time_s")}
