"""Lab runs in worker processes (``causalmix lab run --workers N``; :func:`run_parallel`).

The models are tiny, so one run keeps one core busy on one torch thread; ``N`` runs side by
side keep ``N`` cores busy. Each worker is a fresh interpreter (the ``spawn`` start method: a
forked child of a process whose OpenMP team has started can hang in libgomp) that trains one
(job, seed) at a time and sends back its result; only the parent writes the run database, so
a run killed at any moment is still either ``running`` (re-run next time) or ``done``. A worker
dies with its parent (Linux: ``PR_SET_PDEATHSIG``), so a killed lab leaves no run behind.

Results do not depend on ``N``: a run is seeded, and the same (job, seed) trains the same
numbers in any worker (``tests/lab/test_pool.py``).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

import torch

__all__ = ["run_parallel"]


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:  # no libc by that name: the worker outlives a killed parent
            pass


def _start_worker(threads: int, plugins: tuple[str, ...]) -> None:
    from causalmix.lab.plugins import load_plugin

    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which stops us
    torch.set_num_threads(threads)
    for plugin in plugins:  # the module of a plugin's task classes, for unpickling its jobs
        load_plugin(plugin)


def _train(job: Any, seed: int) -> tuple[Any, float, int]:
    t = time.perf_counter()
    res = job.run(seed, progress=False)
    return res, time.perf_counter() - t, torch.get_num_threads()


def run_parallel(todo: Iterable[tuple[Any, int]], workers: int, *,
                 started: Callable[[Any, int], None],
                 finished: Callable[[Any, int, Any, float, int], None],
                 plugins: tuple[str, ...] = ()) -> None:
    """Train every ``(job, seed)`` of ``todo`` in ``workers`` processes, at most ``workers`` at
    a time, in order of submission: ``started(job, seed)`` just before one is handed to a
    worker, ``finished(job, seed, result, wall_time_s, threads)`` when it is back (both in this
    process). The workers run on this process's torch thread count and load ``plugins`` first
    (:func:`~causalmix.lab.load_plugin`: a plugin's task classes, which a fresh interpreter
    does not know otherwise). An error in a run cancels what has not started and is
    raised here; ``KeyboardInterrupt`` stops the workers."""
    before = set(multiprocessing.active_children())
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker,
                               initargs=(torch.get_num_threads(), tuple(plugins)))
    try:
        _feed(pool, iter(todo), workers, started, finished)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in set(multiprocessing.active_children()) - before:
            proc.terminate()  # a run in flight would otherwise hold the exit for minutes
        raise
    pool.shutdown()


def _feed(pool: ProcessPoolExecutor, pending: Iterator[tuple[Any, int]], workers: int,
          started: Callable, finished: Callable) -> None:
    running: dict[Future, tuple[Any, int]] = {}
    while True:
        while len(running) < workers:
            nxt = next(pending, None)
            if nxt is None:
                break
            started(*nxt)
            running[pool.submit(_train, *nxt)] = nxt
        if not running:
            return
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for fut in done:
            job, seed = running.pop(fut)
            finished(job, seed, *fut.result())
