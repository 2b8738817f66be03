"""Run a suite: every (finding arm, seed) not yet done, recorded in the run database."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from causalmix.checks import check_int
from causalmix.lab.db import RunDB, git_revision

__all__ = ["run_suite", "suite_jobs"]


def suite_jobs(suite: str) -> list[tuple[str, str, object]]:
    """``(finding key, arm name, job)`` of every arm of suite ``suite`` that can run (arms
    whose mixer is missing are left out; the report says why)."""
    from causalmix.lab.findings import FINDINGS, SUITES

    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; suites: {sorted(SUITES)}")
    return [(fk, arm.name, arm.job) for fk, f in FINDINGS.items() for arm in f.arms(suite)
            if arm.job is not None]


def _check_int(name: str, v: object) -> None:
    check_int(name, v, 1)


def run_suite(name: str, out: str | Path, *, seeds: int | None = None,
              threads: int | None = None, progress: bool = True,
              log: Callable[[str], None] = print) -> dict:
    """Train every arm of suite ``name`` for seeds ``0 .. seeds-1`` (default: the suite's
    own count), skipping the runs already done in ``out/runs.sqlite``; writes
    ``out/suite_<name>.json`` (this invocation's wall time and load, and the wall time of
    every invocation so far) for the report's closing note.

    ``threads``: torch intra-op threads (default 1: the models are so small that a step is
    dominated by per-op overhead; on a loaded 2-core machine two threads made the smoke suite
    20x slower, 66 s against 3 s). Returns ``{"ran", "skipped", "wall_time_s"}``.
    """
    from causalmix.lab.findings import SUITES

    jobs = suite_jobs(name)
    seeds = SUITES[name].seeds if seeds is None else seeds
    _check_int("seeds", seeds)
    threads = 1 if threads is None else threads
    _check_int("threads", threads)
    torch.set_num_threads(threads)
    load_start = os.getloadavg()[0]
    db = RunDB(out)
    rev = git_revision()
    todo = [(fk, arm, job, s) for fk, arm, job in jobs for s in range(seeds)]
    ran = skipped = 0
    t0 = time.perf_counter()
    try:
        for i, (_, arm, job, seed) in enumerate(todo, 1):
            key = job.run_key(seed)
            if db.status(key) == "done":
                skipped += 1
                continue
            db.start(key, experiment=job.name, task=job.task_name, seed=seed, suite=name,
                     config=job.to_json(), git_rev=rev)
            t = time.perf_counter()
            res = job.run(seed, progress=progress, desc=f"[{i}/{len(todo)}] {job.name} "
                                                        f"seed={seed}")
            wall = time.perf_counter() - t
            db.finish(key, metrics=res.metrics, curve=res.curve,
                      info={"steps": res.steps, "stop_reason": res.stop_reason,
                            "params": res.params, "threads": threads, "point": arm},
                      wall_time_s=wall)
            ran += 1
            log(f"[{i}/{len(todo)}] {job.name} seed={seed}: score {res.metrics['score']:.4f} "
                f"({res.steps} steps, {res.stop_reason}, {wall:.1f}s)")
    finally:
        db.close()
    total = time.perf_counter() - t0
    meta = {"suite": name, "wall_time_s": total, "ran": ran, "skipped": skipped,
            "seeds": seeds, "threads": threads, "cpus": os.cpu_count(),
            "load_start": load_start, "load_end": os.getloadavg()[0]}
    path = Path(out, f"suite_{name}.json")
    history = json.loads(path.read_text()).get("history", []) if path.exists() else []
    meta["history"] = [*history, {k: meta[k] for k in ("wall_time_s", "ran", "skipped")}]
    path.write_text(json.dumps(meta, indent=1))
    log(f"suite {name}: {ran} runs trained, {skipped} already done, {total:.1f}s")
    return {"ran": ran, "skipped": skipped, "wall_time_s": total}
