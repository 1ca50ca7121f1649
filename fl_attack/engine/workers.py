"""Spread independent per-client work over worker processes, one per core.

A round's clients are independent given the model, and the engine's work is many small
solves that hold Python's GIL between them: threads barely help (measured 1.25x on two
cores), processes do. Workers are *forked* with the job already in memory, so the model
and the gradients reach them without pickling (any model works, even one defined in a
script); only the results travel back, as plain pickles.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import pickle
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

import torch
from threadpoolctl import threadpool_limits

from fl_attack.engine.types import EngineError

__all__ = ["attack_each", "available_cores", "map_in_workers"]

T = TypeVar("T")
C = TypeVar("C")
R = TypeVar("R")

# Tasks per worker: small enough to balance an expensive client against cheap ones, large
# enough that a task's round trip (~1 ms) stays small against its clients (~15 ms each).
_TASKS_PER_WORKER = 4

_JOB: Callable[[int], object] | None = None  # read by the forked workers
_ONE_JOB_AT_A_TIME = threading.Lock()


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _init_worker() -> None:
    # One thread per worker, in torch and in the BLAS/OpenMP pools numpy and scipy use: the
    # workers already fill the cores, and a forked OpenBLAS pool left at two threads
    # spins against the other worker (measured: a 0.25 s factorisation took 7 s).
    torch.set_num_threads(1)
    threadpool_limits(1)


def _run(indices: list[int]) -> bytes:
    assert _JOB is not None, "a worker was started without a job"
    return pickle.dumps([_JOB(i) for i in indices], protocol=pickle.HIGHEST_PROTOCOL)


def _chunks(count: int, workers: int) -> list[list[int]]:
    """``range(count)`` cut into contiguous tasks, about ``_TASKS_PER_WORKER`` per worker."""
    tasks = min(count, workers * _TASKS_PER_WORKER)
    bounds = [round(k * count / tasks) for k in range(tasks + 1)]
    return [list(range(a, b)) for a, b in itertools.pairwise(bounds) if b > a]


def map_in_workers(job: Callable[[int], T], count: int, workers: int) -> list[T] | None:
    """``[job(i) for i in range(count)]``, spread over ``workers`` forked processes.

    Parameters
    ----------
    job : callable
        ``index -> result``; its result must pickle. It runs in the children, so it should
        not rely on state changed after the call starts.
    count : int
        Number of indices.
    workers : int
        Processes to use (at most ``count``).

    Returns
    -------
    list or None
        The results in index order; None when worker processes are not worth it or not
        available (one worker or index, no ``fork`` on this platform, inside a daemonic
        process, or the workers died): the caller then runs the job itself. An exception
        raised by ``job`` propagates.
    """
    global _JOB
    workers = min(workers, count)
    if workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return None
    if multiprocessing.current_process().daemon:  # daemons may not have children
        return None
    chunks = _chunks(count, workers)
    with _ONE_JOB_AT_A_TIME:  # the children read _JOB when they are forked
        _JOB = job
        try:
            with ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("fork"), initializer=_init_worker
            ) as pool:
                parts = [pickle.loads(part) for part in pool.map(_run, chunks)]
        except (BrokenProcessPool, OSError) as exc:
            warnings.warn(
                f"worker processes failed ({type(exc).__name__}: {exc}); running in this "
                "process instead",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        finally:
            _JOB = None
    results: list[T] = [None] * count  # type: ignore[list-item]
    for chunk, part in zip(chunks, parts, strict=True):
        for index, result in zip(chunk, part, strict=True):
            results[index] = result
    return results


def attack_each(
    attack_one: Callable[[C], R], clients: Sequence[C], workers: int
) -> list[R | EngineError]:
    """``attack_one`` on every client, spread over ``workers`` processes, in client order.

    A client whose attack raises an :class:`~fl_attack.engine.EngineError` gets the error
    in place of its result, so one bad update does not stop the round; any other
    exception propagates.

    Raises
    ------
    ValueError
        If ``workers`` is below 1.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    items = list(clients)

    def one(index: int) -> R | EngineError:
        try:
            return attack_one(items[index])
        except EngineError as exc:
            return exc

    spread = map_in_workers(one, len(items), workers)
    return spread if spread is not None else [one(i) for i in range(len(items))]
