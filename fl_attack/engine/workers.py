"""Spread independent per-client work over worker processes, one per core.

A round's clients are independent given the model, and the engine's work is many small
solves that hold Python's GIL between them: threads barely help (measured 1.25x on two
cores), processes do. Workers are *forked* with the job already in memory, so the model
and the gradients reach them without pickling (any model works, even one defined in a
script); only the results travel back, as plain pickles through a pipe. The calling
process is one of the workers: a fork of a server-sized process costs 13-20 ms, and the
caller would otherwise only wait.

The server forks from a thread while Flower, Ray and gRPC run threads of their own, so a
child touches nothing but the job and its pipe, and leaves with ``os._exit``: no
interpreter shutdown, no atexit hooks, no waiting for threads that the fork did not copy
(a ``ProcessPoolExecutor`` child hung exactly there, in ``threading._shutdown``).
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import multiprocessing
import os
import pickle
import select
import signal
import struct
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

from fl_attack.engine.types import EngineError

__all__ = ["Staged", "attack_each", "available_cores", "map_in_workers", "shared_columns"]

T = TypeVar("T")
C = TypeVar("C")
R = TypeVar("R")
S = TypeVar("S")

# One fork-and-collect at a time: a child forked by a second thread would inherit the
# first call's pipe write ends and hold its reads open until that child exits.
_ONE_JOB_AT_A_TIME = threading.Lock()
# An index as it travels through the ticket pipe.
_TICKET = struct.Struct("<q")
# Shared column blocks (shared_columns): columns per block, the board's address space
# (pages are only backed once written), its directory size, and how long a worker waits
# for the board's lock before it computes on its own.
_BLOCK_COLUMNS = 8
_BOARD_BYTES = 256 * 2**20
_BOARD_TABLES = 64
_LOCK_SECONDS = 5.0


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


class _Board:
    """Shared memory in which a round's workers leave column blocks for each other.

    Made before the fork (an anonymous shared mapping and a lock), so every worker of one
    :func:`map_in_workers` call sees the same one. A directory of tables, each keyed by a
    digest of the caller's key, holds one state per block (free, taken by a pid, done) and
    the matrix itself, stored column by column.
    """

    # Directory: bytes used, tables used; then one record per table.
    _HEAD = struct.Struct("<qq")
    # Record: key digest, rows, columns, blocks, offset of its states (then its data).
    _RECORD = struct.Struct("<16sqqqq")
    DONE = -1

    def __init__(self, size: int | None = None, tables: int = _BOARD_TABLES) -> None:
        self.memory = mmap.mmap(-1, size or _BOARD_BYTES)
        self.tables = tables
        # Bytes used (the directory itself), tables used.
        self._HEAD.pack_into(self.memory, 0, self._record(tables), 0)
        self.lock = multiprocessing.get_context("fork").Lock()

    def close(self) -> None:
        self.memory.close()

    @contextlib.contextmanager
    def held(self) -> Iterator[bool]:
        """The lock, if it comes within ``_LOCK_SECONDS``: False means a worker died holding it."""
        locked = self.lock.acquire(timeout=_LOCK_SECONDS)
        try:
            yield locked
        finally:
            if locked:
                self.lock.release()

    def allocate(self, nbytes: int) -> int | None:
        """Offset of ``nbytes`` fresh bytes (8-aligned); None if the board is full.

        The caller holds the lock, or no other process exists yet.
        """
        used, count = self._HEAD.unpack_from(self.memory, 0)
        need = -(-nbytes // 8) * 8
        if used + need > len(self.memory):
            return None
        self._HEAD.pack_into(self.memory, 0, used + need, count)
        return used

    def table(self, digest: bytes, rows: int, columns: int, blocks: int) -> int | None:
        """Offset of the table for ``digest`` (made if new); None if the board is full."""
        _, count = self._HEAD.unpack_from(self.memory, 0)
        for i in range(count):
            key, r, c, b, offset = self._RECORD.unpack_from(self.memory, self._record(i))
            if key == digest:
                return offset if (r, c, b) == (rows, columns, blocks) else None
        if count == self.tables:
            return None
        offset = self.allocate(8 * (blocks + rows * columns))
        if offset is None:
            return None
        self._RECORD.pack_into(
            self.memory, self._record(count), digest, rows, columns, blocks, offset
        )
        used, _ = self._HEAD.unpack_from(self.memory, 0)
        self._HEAD.pack_into(self.memory, 0, used, count + 1)
        return offset

    def states(self, offset: int, blocks: int) -> np.ndarray:
        return np.frombuffer(self.memory, np.int64, blocks, offset)

    def data(self, offset: int, blocks: int, rows: int, columns: int) -> np.ndarray:
        """The table's matrix, transposed: (columns, rows), one column per row."""
        return np.frombuffer(self.memory, np.float64, rows * columns, offset + 8 * blocks).reshape(
            columns, rows
        )

    def _record(self, index: int) -> int:
        return self._HEAD.size + index * self._RECORD.size


class _Exchange:
    """Results handed over between a round's workers, through the board.

    One record per index: its state and where its pickled result lies. A first stage's
    result (see :class:`Staged`) waits there, ready, for whichever worker takes its second
    stage; a forked worker's final result waits there, delivered, for this process. Sent
    as it is made, a result costs the round nothing at its end, where one pickle of all of
    them through a pipe kept this process waiting (rconv-main: ~15 ms a round). Also the
    pids of every worker, so that a worker waiting for a first stage can tell that the
    others died.
    """

    PENDING, READY, TAKEN, DELIVERED = 0, 1, 2, 3
    _FIELDS = 3  # state, offset, length

    def __init__(self, board: _Board, count: int, workers: int) -> None:
        """Made before the fork; raises MemoryError if the board cannot hold the records."""
        offset = board.allocate(8 * (self._FIELDS * count + workers))
        if offset is None:
            raise MemoryError("the board has no room for the hand-over's records")
        self.board = board
        size = self._FIELDS * count
        self.records = np.frombuffer(board.memory, np.int64, size, offset).reshape(count, -1)
        # This process's pid first; the children's as they are forked.
        self.pids = np.frombuffer(board.memory, np.int64, workers, offset + 8 * size)
        self.pids[0] = os.getpid()

    def put(self, index: int, state: object) -> bool:
        """Leave ``index``'s first-stage result for any worker; False if the board is full.

        On False the caller runs the second stage itself (it is marked taken).
        """
        if not self._leave(index, state, self.READY):
            with self.board.held():
                self.records[index, 0] = self.TAKEN
            return False
        return True

    def deliver(self, index: int, result: object) -> bool:
        """Leave ``index``'s final result for this process; False if the board is full."""
        return self._leave(index, result, self.DELIVERED)

    def delivered(self) -> list[tuple[int, object]]:
        """Every delivered result, by index (read once the workers are done)."""
        where = np.flatnonzero(self.records[:, 0] == self.DELIVERED)
        spans = [(int(i), *(int(v) for v in self.records[i, 1:])) for i in where]
        memory = self.board.memory
        return [(i, pickle.loads(memory[start : start + n])) for i, start, n in spans]

    def _leave(self, index: int, value: object, state: int) -> bool:
        """Pickle ``value`` into the board and publish it as ``index``'s, in ``state``."""
        try:
            data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # raised where it was made, like an error of the job
            raise RuntimeError(f"a worker's result does not pickle: {exc}") from exc
        board = self.board
        with board.held() as locked:
            offset = board.allocate(len(data)) if locked else None
        if offset is None:
            return False
        board.memory[offset : offset + len(data)] = data
        # Published under the lock, after the data: a reader that sees the state sees the data.
        with board.held():
            self.records[index, 1:] = (offset, len(data))
            self.records[index, 0] = state
        return True

    def take(self) -> tuple[int, object] | None:
        """The lowest index whose first stage is done and second stage not taken, and its
        first-stage result; waits while first stages still run elsewhere. None when every
        second stage is taken, or a worker has died (the round then fails as a whole).
        """
        records, board = self.records, self.board
        while True:
            data = None
            with board.held() as locked:
                if not locked:
                    return None
                ready = np.flatnonzero(records[:, 0] == self.READY)
                if ready.size:
                    index = int(ready[0])
                    records[index, 0] = self.TAKEN
                    offset, length = (int(v) for v in records[index, 1:])
                    data = board.memory[offset : offset + length]  # a copy
                elif not (records[:, 0] == self.PENDING).any():
                    return None
            if data is not None:
                return index, pickle.loads(data)
            if any(pid and not _alive(int(pid)) for pid in self.pids):
                return None
            time.sleep(1e-4)


# The board of the map_in_workers call this thread works for: set in the children, and in
# the calling thread while it works its own share (other threads of the server see none).
_HERE = threading.local()
# The thread pools of the loaded libraries, found once (a search of them takes 2-7 ms).
_POOLS: ThreadpoolController | None = None


def _pools() -> ThreadpoolController:
    global _POOLS
    if _POOLS is None:
        _POOLS = ThreadpoolController()
    return _POOLS


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs: a zombie (exited, not yet reaped) does not.

    A worker that died stays a zombie until the process that forked it reaps it, and that
    process may be the very one waiting for it here.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # "pid (name) state ...": the name may hold spaces and parentheses.
            return stat.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):  # no /proc (not Linux): trust the signal test
        return True


def shared_columns(
    key: Hashable, compute: Callable[[slice], np.ndarray], rows: int, columns: int
) -> np.ndarray:
    """The (rows, columns) matrix whose column block ``b`` is ``compute(b)``.

    Run by the workers of one round (:func:`map_in_workers`), each block is computed once,
    by the first worker that asks for it, and read by the others: two workers that each
    need a weights' factorisation build it in about half the time. Anywhere else, and
    whenever sharing is not possible, every block is computed here. A worker never waits
    for another that does not work on the same key; it waits only for blocks another live
    worker is computing, and computes a dead worker's blocks itself.

    Parameters
    ----------
    key : hashable
        Names the matrix: equal keys (by ``repr``) in two workers must mean equal
        matrices.
    compute : callable
        ``slice of columns -> (rows, width) float64 array``; a pure function of the
        columns, so the answer does not depend on which worker computed a block.
    rows, columns : int
        The matrix's shape.

    Returns
    -------
    numpy.ndarray
        (rows, columns) float64, this process's own copy.
    """
    blocks = [
        slice(start, min(start + _BLOCK_COLUMNS, columns))
        for start in range(0, columns, _BLOCK_COLUMNS)
    ]
    board: _Board | None = getattr(_HERE, "board", None)
    if board is not None and rows * columns:
        digest = hashlib.blake2b(repr(key).encode(), digest_size=16).digest()
        shared = _shared_blocks(board, digest, compute, blocks, rows, columns)
        if shared is not None:
            return shared
    out = np.empty((rows, columns))
    for block in blocks:
        out[:, block] = compute(block)
    return out


def _shared_blocks(
    board: _Board,
    digest: bytes,
    compute: Callable[[slice], np.ndarray],
    blocks: list[slice],
    rows: int,
    columns: int,
) -> np.ndarray | None:
    """:func:`shared_columns` through ``board``; None if the board cannot take the table."""
    with board.held() as locked:
        offset = board.table(digest, rows, columns, len(blocks)) if locked else None
    if offset is None:
        return None  # the board is full, or a worker died holding it: share nothing more
    states = board.states(offset, len(blocks))
    data = board.data(offset, len(blocks), rows, columns)
    me = os.getpid()

    def take(index: int, owner: int) -> bool:
        """Mark block ``index`` as this worker's if it is still held by ``owner``."""
        with board.held() as locked:
            if not locked or int(states[index]) != owner:
                return False
            states[index] = me
            return True

    def run(index: int) -> None:
        try:
            data[blocks[index]] = compute(blocks[index]).T
        except BaseException:
            states[index] = 0  # free again: another worker must not wait for it
            raise
        # The lock's release publishes the data before the state; a lock held by a dead
        # worker cannot stop the state from being set.
        with board.held():
            states[index] = board.DONE

    for index in range(len(blocks)):  # every block nobody has taken yet
        if int(states[index]) == 0 and take(index, 0):
            run(index)
    for index in range(len(blocks)):  # then wait for the others' blocks
        while (owner := int(states[index])) != board.DONE:
            if owner == 0 or not _alive(owner):
                if take(index, owner):
                    run(index)
            else:
                time.sleep(1e-4)
    return np.ascontiguousarray(data.T)


def _next_index(tickets: int) -> int | None:
    """Take the next index from the shared ticket pipe; None once it is empty and closed."""
    data = os.read(tickets, _TICKET.size)
    return _TICKET.unpack(data)[0] if data else None


def _work(
    job: Callable[[int], object],
    tickets: int,
    exchange: _Exchange,
    second: Callable[[int, object], object] | None = None,
    *,
    deliver: bool = False,
) -> list[tuple[int, object]]:
    """Run ``job`` on indices taken from ``tickets`` until none are left.

    With ``second``, ``job`` is the first stage: its results go to ``exchange``, and once
    the tickets are gone this worker takes second stages, of any worker's first stages.
    With ``deliver`` (a forked worker), each final result goes to ``exchange`` as soon as
    it is made; the ones returned are those the board had no room for.
    """
    done: list[tuple[int, object]] = []

    def finish(index: int, result: object) -> None:
        if not (deliver and exchange.deliver(index, result)):
            done.append((index, result))

    while (index := _next_index(tickets)) is not None:
        if second is None:
            finish(index, job(index))
            continue
        state = job(index)
        if not exchange.put(index, state):  # no room to hand it over: finish it here
            finish(index, second(index, state))
    if second is not None:
        while (taken := exchange.take()) is not None:
            finish(taken[0], second(*taken))
    return done


def _child(
    job: Callable[[int], object],
    tickets: int,
    out: int,
    board: _Board,
    second: Callable[[int, object], object] | None,
    exchange: _Exchange,
) -> None:
    """Run ``job`` on indices taken from ``tickets``, write the pickled outcome to ``out``.

    Never returns. The outcome is ``("ok", [(index, result), ...], "")``, with the results
    not delivered through ``exchange``, or ``("raised", exception, traceback)``.
    """
    _HERE.board = board
    code = 0
    try:
        # One thread per worker: the workers already fill the cores. The BLAS pools are
        # already at one thread (set before the fork, see map_in_workers); touching them
        # here would restart OpenBLAS's pool, whose threads spin ~0.1 s for work.
        torch.set_num_threads(1)
        _pools().limit(limits=1, user_api="openmp")
        try:
            work = _work(job, tickets, exchange, second, deliver=True)
            outcome: tuple[str, object, str] = ("ok", work, "")
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


def _work_here(
    job: Callable[[int], object],
    tickets: int,
    board: _Board,
    second: Callable[[int, object], object] | None,
    exchange: _Exchange,
) -> list[tuple[int, object]]:
    """This process's share of the tickets, on one thread like the children's."""
    threads = torch.get_num_threads()
    _HERE.board = board
    try:
        torch.set_num_threads(1)
        with _pools().limit(limits=1, user_api="openmp"):
            return _work(job, tickets, exchange, second)
    finally:
        _HERE.board = None
        torch.set_num_threads(threads)


@overload
def map_in_workers(job: Callable[[int], T], count: int, workers: int) -> list[T] | None: ...


@overload
def map_in_workers(
    job: Callable[[int], S], count: int, workers: int, second: Callable[[int, S], T]
) -> list[T] | None: ...


def map_in_workers(
    job: Callable[[int], Any],
    count: int,
    workers: int,
    second: Callable[[int, Any], Any] | None = None,
) -> list[Any] | None:
    """``[job(i) for i in range(count)]``, spread over this process and forked ones.

    ``workers - 1`` processes are forked; this one works as the last worker (one fork less,
    and it starts at once). Each worker takes the next index as soon as it is free (a
    shared pipe of tickets), so a round's few expensive updates do not leave one worker
    running alone at the end. With ``second``, the results are ``second(i, job(i))``, and
    every ``job`` is taken before any ``second`` (see :class:`Staged`).

    Parameters
    ----------
    job : callable
        ``index -> result``; a result computed in a forked worker must pickle. It runs in
        the children, so it should not rely on state changed after the call starts.
    count : int
        Number of indices.
    workers : int
        Processes to use, this one included (at most ``count``).
    second : callable, optional
        ``(index, job's result) -> result``: a second stage, run in whichever worker is
        free once every first stage has been taken; ``job``'s results must then pickle.

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
    with _ONE_JOB_AT_A_TIME, _pools().limit(limits=1, user_api="blas"):
        outcomes = _fork_and_collect(job, count, workers, second)
    if outcomes is None:
        warnings.warn(
            "a worker process could not start or died before returning its results; "
            "running in this process instead",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    results: list[Any] = [None] * count
    for kind, value, where in outcomes:
        if kind == "raised":
            assert isinstance(value, BaseException)
            value.add_note(f"raised in a worker process:\n{where}")
            raise value
    for _, value, _ in outcomes:
        for index, result in value:  # type: ignore[attr-defined]
            results[index] = result
    return results


def _issue(issue: int, start: int, count: int) -> int:
    """Write tickets ``start, start + 1, ...`` until the pipe is full; the next one left."""
    # Whole pages of tickets: a pipe write of at most PIPE_BUF bytes is atomic, so a
    # reader taking one ticket's size always gets exactly one whole ticket.
    per_write = select.PIPE_BUF // _TICKET.size
    while start < count:
        stop = min(start + per_write, count)
        try:
            os.write(issue, b"".join(_TICKET.pack(i) for i in range(start, stop)))
        except (BlockingIOError, BrokenPipeError):
            break  # full (the rest later), or every worker has stopped taking tickets
        start = stop
    return start


def _issue_rest(issue: int, start: int, count: int) -> None:
    """The tickets the pipe could not take at first, as the workers take the others."""
    try:
        os.set_blocking(issue, True)
        _issue(issue, start, count)
    finally:
        os.close(issue)


def _fork_and_collect(
    job: Callable[[int], object],
    count: int,
    workers: int,
    second: Callable[[int, object], object] | None = None,
) -> list[tuple[str, object, str]] | None:
    """This process and ``workers - 1`` forked children sharing ``count`` tickets.

    Returns every worker's outcome (this process's first; only its own when its job
    raised), or None when a child is missing (it died) or the indices were not all done.
    """
    children: list[tuple[int, int]] = []  # (pid, read end of its pipe)
    outcomes: list[tuple[str, object, str] | None] = []
    handed: list[tuple[int, object]] = []
    try:
        board = _Board()
        exchange = _Exchange(board, count, workers)
    except (OSError, MemoryError):  # no shared memory for the board, or too little
        return None
    tickets, issue = os.pipe()
    writer: threading.Thread | None = None
    try:
        # Tickets first, as many as the pipe takes: each child starts on one at once.
        os.set_blocking(issue, False)
        issued = _issue(issue, 0, count)
        for _ in range(workers - 1):
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child
                os.close(read)
                os.close(issue)  # else the ticket pipe never reports its end
                _child(job, tickets, write, board, second, exchange)
            os.close(write)  # else a later child holds it open and the read never ends
            children.append((pid, read))
            exchange.pids[len(children)] = pid
        if issued < count:  # the rest from a thread: a blocked write must not stop this one
            writer = threading.Thread(target=_issue_rest, args=(issue, issued, count), daemon=True)
            writer.start()
        else:
            os.close(issue)
        issue = -1
        try:
            work = _work_here(job, tickets, board, second, exchange)
            mine: tuple[str, object, str] = ("ok", work, "")
        except Exception as exc:
            return [("raised", exc, traceback.format_exc())]  # the children are stopped below
        outcomes.append(mine)
        for _, read in children:  # read every pipe to its end before reaping
            with os.fdopen(read, "rb", closefd=False) as pipe:
                data = pipe.read()
            try:
                outcomes.append(pickle.loads(data))
            except Exception:  # empty or cut short: the child died
                outcomes.append(None)
        if None not in outcomes:
            handed = exchange.delivered()
    except OSError:  # fork or pipe failed (out of processes or memory)
        return None
    finally:
        for fd in (tickets, issue):
            if fd >= 0:
                os.close(fd)
        for _, read in children:
            os.close(read)
        collected = max(0, len(outcomes) - 1)  # outcomes[0] is this process's
        for pid, _ in children[collected:]:  # interrupted: stop the others
            os.kill(pid, signal.SIGKILL)
        if writer is not None:
            writer.join()  # done, or its pipe has lost every reader: it stops
        # Reaped in the background: a child's exit frees its copy of the address space
        # (~10 ms for a server-sized process), which the results need not wait for.
        if children:
            pids = [pid for pid, _ in children]
            threading.Thread(target=_reap, args=(pids,), daemon=True).start()
        exchange = None  # its arrays view the board's memory, which cannot close under them
        with contextlib.suppress(BufferError):  # still viewed (a traceback keeps a frame):
            board.close()  # unmapped once the last view goes
    if any(outcome is None for outcome in outcomes):
        return None
    complete = [outcome for outcome in outcomes if outcome is not None]
    complete.append(("ok", handed, ""))  # the children's results delivered on the board
    done = sum(len(value) for kind, value, _ in complete if kind == "ok")  # type: ignore[arg-type]
    if done != count and all(kind == "ok" for kind, _, _ in complete):
        return None  # every index must come back exactly once
    return complete


def _reap(pids: list[int]) -> None:
    """Wait for the children to exit, so that none is left a zombie."""
    for pid in pids:
        # ChildProcessError: already reaped elsewhere (e.g. a wait() for any child).
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


@dataclass(frozen=True, slots=True)
class Staged(Generic[C, S, R]):
    """A per-client attack in two stages: ``second(client, first(client))``.

    Spread over workers (:func:`attack_each`), every client's first stage is taken before
    any second stage, and a second stage runs in whichever worker is free, on the first
    stage's result handed over through shared memory. Where the first stage's cost varies
    from client to client and the second's does not, no worker is left finishing one long
    job alone at the end of the round: while it does, the other takes second stages.

    Attributes
    ----------
    first : callable
        ``client -> state``; the state must pickle.
    second : callable
        ``(client, state) -> result``.
    """

    first: Callable[[C], S]
    second: Callable[[C, S], R]


def attack_each(
    attack_one: Callable[[C], R] | Staged[C, Any, R], clients: Sequence[C], workers: int
) -> list[R | EngineError]:
    """``attack_one`` on every client, spread over ``workers`` processes, in client order.

    A client whose attack raises an :class:`~fl_attack.engine.EngineError` gets the error
    in place of its result, so one bad update does not stop the round; any other
    exception propagates. ``attack_one`` may come in two stages (:class:`Staged`).

    Raises
    ------
    ValueError
        If ``workers`` is below 1.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    items = list(clients)
    if isinstance(attack_one, Staged):
        staged = attack_one

        def first(index: int) -> object:
            return _or_error(staged.first, items[index])

        def second(index: int, state: object) -> R | EngineError:
            if isinstance(state, EngineError):
                return state
            return _or_error(staged.second, items[index], state)

        spread = map_in_workers(first, len(items), workers, second)
        return spread if spread is not None else [second(i, first(i)) for i in range(len(items))]

    def one(index: int) -> R | EngineError:
        return _or_error(attack_one, items[index])

    spread_one = map_in_workers(one, len(items), workers)
    return spread_one if spread_one is not None else [one(i) for i in range(len(items))]


def _or_error(call: Callable[..., R], *args: object) -> R | EngineError:
    """``call(*args)``, or the :class:`EngineError` it raised, as a result."""
    try:
        return call(*args)
    except EngineError as exc:
        return exc.with_traceback(None)  # a result now: its frames need not live on
