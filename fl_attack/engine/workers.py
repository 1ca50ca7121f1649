"""Spread independent per-client work over worker processes, one per core.

A round's clients are independent given the model, and the engine's work is many small
solves that hold Python's GIL between them: threads barely help (measured 1.25x on two
cores), processes do. Workers are *forked* with the job already in memory, so the model
and the gradients reach them without pickling (any model works, even one defined in a
script); only the results travel back, as plain pickles through a pipe.

The server forks from a thread while Flower, Ray and gRPC run threads of their own, so a
child touches nothing but the job and its pipe, and leaves with ``os._exit``: no
interpreter shutdown, no atexit hooks, no waiting for threads that the fork did not copy
(a ``ProcessPoolExecutor`` child hung exactly there, in ``threading._shutdown``).
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from threadpoolctl import threadpool_limits

from fl_attack.engine.types import EngineError

__all__ = ["attack_each", "available_cores", "map_in_workers"]

T = TypeVar("T")
C = TypeVar("C")
R = TypeVar("R")

# One fork-and-collect at a time: a child forked by a second thread would inherit the
# first call's pipe write ends and hold its reads open until that child exits.
_ONE_JOB_AT_A_TIME = threading.Lock()
# An index as it travels through the ticket pipe.
_TICKET = struct.Struct("<q")


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _next_index(tickets: int) -> int | None:
    """Take the next index from the shared ticket pipe; None once it is empty and closed."""
    data = os.read(tickets, _TICKET.size)
    return _TICKET.unpack(data)[0] if data else None


def _child(job: Callable[[int], object], tickets: int, out: int) -> None:
    """Run ``job`` on indices taken from ``tickets``, write the pickled outcome to ``out``.

    Never returns. The outcome is ``("ok", [(index, result), ...], "")`` or
    ``("raised", exception, traceback)``.
    """
    code = 0
    try:
        # One thread per worker: the workers already fill the cores. The BLAS pools are
        # already at one thread (set before the fork, see map_in_workers); touching them
        # here would restart OpenBLAS's pool, whose threads spin ~0.1 s for work.
        torch.set_num_threads(1)
        threadpool_limits(1, user_api="openmp")
        try:
            done: list[tuple[int, object]] = []
            while (index := _next_index(tickets)) is not None:
                done.append((index, job(index)))
            outcome: tuple[str, object, str] = ("ok", done, "")
        except BaseException as exc:  # sent to the parent, raised there
            outcome = ("raised", exc, traceback.format_exc())
        try:
            data = pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # an unpicklable result or exception
            error = RuntimeError(f"a worker's outcome does not pickle: {exc}")
            data = pickle.dumps(("raised", error, traceback.format_exc()))
        with os.fdopen(out, "wb") as pipe:
            pipe.write(data)
    except BaseException:
        code = 1
    finally:
        os._exit(code)


def map_in_workers(job: Callable[[int], T], count: int, workers: int) -> list[T] | None:
    """``[job(i) for i in range(count)]``, spread over ``workers`` forked processes.

    Each worker takes the next index as soon as it is free (a shared pipe of tickets), so
    a round's few expensive updates do not leave one worker running alone at the end.

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
        available (one worker or index, no ``fork`` on this platform, or a worker died):
        the caller then runs the job itself. An exception raised by ``job`` propagates.
    """
    workers = min(workers, count)
    if workers < 2 or not hasattr(os, "fork") or sys.platform == "darwin":
        return None  # macOS: forking a process that has used Apple's frameworks can crash
    # The children inherit BLAS pools of one thread, set here before the fork and restored
    # once they are done. Limiting them in a child instead restarts OpenBLAS's pool there
    # (it shuts down at each fork), and its new threads spin for work for ~0.1 s against
    # the other worker: a worker's first update took 60-120 ms instead of ~25 ms. Left at
    # two threads, the pools spin all along (measured: 0.25 s of work took 7 s).
    with _ONE_JOB_AT_A_TIME, threadpool_limits(1, user_api="blas"):
        outcomes = _fork_and_collect(job, count, workers)
    if outcomes is None:
        warnings.warn(
            "a worker process could not start or died before returning its results; "
            "running in this process instead",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    results: list[T] = [None] * count  # type: ignore[list-item]
    for kind, value, where in outcomes:
        if kind == "raised":
            assert isinstance(value, BaseException)
            value.add_note(f"raised in a worker process:\n{where}")
            raise value
    for _, value, _ in outcomes:
        for index, result in value:  # type: ignore[attr-defined]
            results[index] = result
    return results


def _fork_and_collect(
    job: Callable[[int], object], count: int, workers: int
) -> list[tuple[str, object, str]] | None:
    """``workers`` forked children sharing ``count`` tickets; every child's outcome, or None.

    None when a child is missing (it died) or the indices were not all done.
    """
    children: list[tuple[int, int]] = []  # (pid, read end of its pipe)
    outcomes: list[tuple[str, object, str] | None] = []
    tickets, issue = os.pipe()
    try:
        for _ in range(workers):
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child
                os.close(read)
                os.close(issue)  # else the ticket pipe never reports its end
                _child(job, tickets, write)
            os.close(write)  # else a later child holds it open and the read never ends
            children.append((pid, read))
        os.close(tickets)
        tickets = -1
        # One write per ticket: each is atomic (far below PIPE_BUF), so a read of one
        # ticket's size always takes exactly one whole ticket.
        try:
            for index in range(count):
                os.write(issue, _TICKET.pack(index))
        except BrokenPipeError:
            pass  # every child has stopped taking tickets; each reports why below
        os.close(issue)
        issue = -1
        for _, read in children:  # read every pipe to its end before reaping
            with os.fdopen(read, "rb", closefd=False) as pipe:
                data = pipe.read()
            try:
                outcomes.append(pickle.loads(data))
            except Exception:  # empty or cut short: the child died
                outcomes.append(None)
    except OSError:  # fork or pipe failed (out of processes or memory), or all children died
        return None
    finally:
        for fd in (tickets, issue):
            if fd >= 0:
                os.close(fd)
        for _, read in children:
            os.close(read)
        for pid, _ in children[len(outcomes) :]:  # interrupted: stop the others
            os.kill(pid, signal.SIGKILL)
        for pid, _ in children:
            os.waitpid(pid, 0)
    if any(outcome is None for outcome in outcomes):
        return None
    complete = [outcome for outcome in outcomes if outcome is not None]
    done = sum(len(value) for kind, value, _ in complete if kind == "ok")  # type: ignore[arg-type]
    if done != count and all(kind == "ok" for kind, _, _ in complete):
        return None  # every index must come back exactly once
    return complete


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
