"""Worker threads whose own torch ops run single-threaded, for the ``blocks`` implementation
(imported by ``impl/blocks.py`` only).

Why: ``blocks`` issues many small ops per call. Run from one thread, each op forks and joins
torch's intra-op threads; on a loaded machine a thread descheduled at every barrier makes the
call several times slower (measured 3-8x at load 3.4 on 2 cores). Splitting the (batch, head)
axis over worker threads whose ops run single-threaded gives one fork and join per call, as a
fused kernel has.

How, without touching any process-wide setting: under torch's OpenMP backend the intra-op
thread count torch uses for an op is the *calling thread's* OpenMP ``nthreads`` setting
(``omp_get_max_threads()``, a per-thread value of the OpenMP runtime; MKL and oneDNN follow it
too). Each worker sets its own to 1 through the standard OpenMP C API
(``omp_set_num_threads``) of the runtime torch already loaded; no other thread sees it:
``torch.get_num_threads()`` in every other thread, new ones included, is unchanged, and so is
MKL's process-wide setting. ``torch.set_num_threads`` is never called (it is process-wide).
Each worker checks that ``torch.get_num_threads()`` reads 1 inside it; where that cannot be
arranged (another parallel backend, no OpenMP runtime found, no ``RTLD_NOLOAD``), no pool is
made and ``blocks`` runs its units in the calling thread with torch's usual threads.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import torch

_OPENMP_NAMES = ("libgomp.so.1", "libiomp5.so", "libomp.so", "libomp.dylib", "libiomp5.dylib")
_LOCK = threading.Lock()
_POOLS: dict = {}  # (pid, threads) -> _Pool, or None where one cannot be made


def _after_fork_in_child() -> None:
    global _LOCK
    _LOCK = threading.Lock()  # another thread may have held it at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _openmp_set_num_threads() -> Callable[[int], None] | None:
    """``omp_set_num_threads`` of an OpenMP runtime already loaded in this process, or None
    (never loads a new runtime)."""
    noload = getattr(os, "RTLD_NOLOAD", None)
    if noload is None:
        return None
    for name in _OPENMP_NAMES:
        try:
            lib = ctypes.CDLL(name, mode=noload | os.RTLD_LAZY)
        except OSError:
            continue
        fn = getattr(lib, "omp_set_num_threads", None)
        if fn is not None:
            fn.argtypes, fn.restype = [ctypes.c_int], None
            return fn
    return None


class _Pool:
    """``n`` daemon threads, each single-threaded in torch, taking ``(fn, args, future)``."""

    def __init__(self, n: int, set_threads: Callable[[int], None]):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._set_threads = set_threads
        self._ready = [threading.Event() for _ in range(n)]
        self._ok = [False] * n
        for i in range(n):
            threading.Thread(target=self._serve, args=(i,), daemon=True,
                             name=f"causalmix-blocks-{i}").start()
        for e in self._ready:
            e.wait()
        self.ok = all(self._ok)
        if not self.ok:  # unusable: let its threads end
            for _ in range(n):
                self._tasks.put(None)

    def _serve(self, i: int) -> None:
        try:
            torch.get_num_threads()  # torch's own per-thread setup first (it sets the count)
            self._set_threads(1)
            self._ok[i] = torch.get_num_threads() == 1
        finally:
            self._ready[i].set()
        while (task := self._tasks.get()) is not None:
            fn, args, fut = task
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as e:  # handed to the caller, who raises it
                    fut.set_exception(e)

    def map(self, fn: Callable, arg_lists: Sequence[tuple]) -> None:
        """``fn(*args)`` for each, in the workers; waits for all, then raises the first error."""
        futures = []
        for args in arg_lists:
            fut: Future = Future()
            self._tasks.put((fn, args, fut))
            futures.append(fut)
        errors = [f.exception() for f in futures]  # waits for every one
        for e in errors:
            if e is not None:
                raise e


def pool(threads: int) -> _Pool | None:
    """The process's pool of ``threads`` single-threaded workers, or None where it cannot be
    made (see the module docstring). Made once per process and thread count."""
    key = (os.getpid(), threads)  # a forked child has none of its parent's threads
    with _LOCK:
        if key not in _POOLS:
            set_threads = _openmp_set_num_threads()
            p = _Pool(threads, set_threads) if set_threads is not None else None
            _POOLS[key] = p if p is not None and p.ok else None
        return _POOLS[key]
