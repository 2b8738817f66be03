"""Run a suite: every (experiment, seed) not yet done, recorded in the run database."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from causalmix.lab.adaptive import SUITE_STUDY, run_adaptive_study
from causalmix.lab.db import RunDB, git_revision
from causalmix.lab.experiments import suite
from causalmix.lab.train import train_one

__all__ = ["run_suite"]


def run_suite(name: str, out: str | Path, *, seeds: int | None = None,
              threads: int | None = None, progress: bool = True, log=print) -> dict:
    """Train every experiment of suite ``name`` for seeds ``0 .. seeds-1`` (default: the
    suite's own count), skipping the runs already done in ``out/runs.sqlite``.

    ``threads``: torch intra-op threads (default 1: the models are so small that a step is
    dominated by per-op overhead; on a loaded 2-core machine two threads made the smoke suite
    20x slower, 66 s against 3 s). Returns ``{"ran", "skipped", "wall_time_s"}``.
    """
    exps, default_seeds = suite(name)
    seeds = default_seeds if seeds is None else seeds
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an int >= 1, got {seeds!r}")
    threads = 1 if threads is None else threads
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    torch.set_num_threads(threads)
    db = RunDB(out)
    rev = git_revision()
    todo = [(e, s) for e in exps for s in range(seeds)]
    ran = skipped = 0
    t0 = time.perf_counter()
    try:
        for i, (exp, seed) in enumerate(todo, 1):
            key = exp.run_key(seed)
            if db.status(key) == "done":
                skipped += 1
                continue
            db.start(key, experiment=exp.name, task=exp.task_name, seed=seed, suite=name,
                     config=exp.to_json(), git_rev=rev)
            t = time.perf_counter()
            res = train_one(exp, seed, progress=progress, desc=f"[{i}/{len(todo)}] {exp.name} "
                                                                f"seed={seed}")
            wall = time.perf_counter() - t
            db.finish(key, metrics=res["metrics"], curve=res["curve"],
                      info={k: res[k] for k in ("steps", "stop_reason", "params")}
                      | {"threads": threads}, wall_time_s=wall)
            ran += 1
            score = res["metrics"]["score"]
            log(f"[{i}/{len(todo)}] {exp.name} seed={seed}: score {score:.4f} "
                f"({res['steps']} steps, {res['stop_reason']}, {wall:.1f}s)")
    finally:
        db.close()
    # The adaptive-lookahead study (accuracy vs latency) belongs to every suite, at its size.
    adaptive_seeds = None if seeds == default_seeds else seeds
    run_adaptive_study(SUITE_STUDY[name], out, seeds=adaptive_seeds, log=log)
    total = time.perf_counter() - t0
    log(f"suite {name}: {ran} runs trained, {skipped} already done, {total:.1f}s")
    return {"ran": ran, "skipped": skipped, "wall_time_s": total}
