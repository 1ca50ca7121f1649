"""Spread independent per-client work over worker processes, one per core.

A round's clients are independent given the model, and the engine's work is many small
solves that hold Python's GIL between them: threads barely help (measured 1.25x on two
cores), processes do. The calling process is one of the workers, and the others are
*forked* from it.

Workers stand from one round to the next when the round's job pickles (the engine's own
rounds do): a fork per round cost a server-sized process 13-20 ms, and each new child
then faulted in some 20,000 pages of copied memory; a standing worker had paid for both
once (measured on rconv-main: 9.1-9.8 against 11.3-12.5 ms an image). The job then
travels through shared memory, its tensors as NumPy arrays (4 ms for 64 clients). A job
that does not pickle (a closure, a model class defined after the workers were forked)
runs in workers forked for that call, with the job already in memory. Either way only
the results travel back, each as soon as it is made.

The server forks from a thread while Flower, Ray and gRPC run threads of their own, so a
child touches nothing but its jobs and pipes, and leaves with ``os._exit``: no
interpreter shutdown, no atexit hooks, no waiting for threads that the fork did not copy
(a ``ProcessPoolExecutor`` child hung exactly there, in ``threading._shutdown``). A
standing worker leaves when its caller does (its command pipe closes).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import io
import mmap
import multiprocessing
import os
import pickle
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

from fl_attack.engine import shared
from fl_attack.engine.types import EngineError

__all__ = [
    "Batched",
    "Staged",
    "attack_each",
    "available_cores",
    "map_in_workers",
    "shared_columns",
]

T = TypeVar("T")
C = TypeVar("C")
R = TypeVar("R")
S = TypeVar("S")

# One fork-and-collect at a time: a child forked by a second thread would inherit the
# first call's pipe write ends and hold its reads open until that child exits.
_ONE_JOB_AT_A_TIME = threading.Lock()
# A standing worker's orders for one round: where the job lies in the board, how long it
# is, where the round's records lie, indices, workers.
_ORDERS = struct.Struct("<qqqqq")
# The length of an outcome sent back through a pipe.
_LENGTH = struct.Struct("<q")
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
    """Shared memory in which a round's workers leave work for each other.

    Made before the fork (an anonymous shared mapping and a lock), so every worker sees
    the same one: for one :func:`map_in_workers` call, or reset between the rounds of
    standing workers. It holds the rounds' hand-over records and data (:class:`_Exchange`)
    and a directory of tables for :func:`shared_columns`, each keyed by a digest of the
    caller's key, with one state per block (free, taken by a pid, done) and the matrix
    itself, stored column by column.
    """

    # Directory: bytes used, tables used; then one record per table.
    _HEAD = struct.Struct("<qq")
    # Record: key digest, rows, columns, blocks, offset of its states (then its data).
    _RECORD = struct.Struct("<16sqqqq")
    DONE = -1

    def __init__(self, size: int | None = None, tables: int = _BOARD_TABLES) -> None:
        self.memory = mmap.mmap(-1, size or _BOARD_BYTES)
        self.tables = tables
        self.reset()
        self.lock = multiprocessing.get_context("fork").Lock()

    def close(self) -> None:
        self.memory.close()

    def reset(self) -> None:
        """Forget every table and record (a standing board, between rounds)."""
        # Bytes used (the directory itself), tables used.
        self._HEAD.pack_into(self.memory, 0, self._record(self.tables), 0)

    @contextlib.contextmanager
    def held(self) -> Iterator[bool]:
        """The lock, if it comes within ``_LOCK_SECONDS``: False means a worker died holding it."""
        locked = self.lock.acquire(timeout=_LOCK_SECONDS)
        try:
            yield locked
        finally:
            if locked:
                self.lock.release()

    def allocate(self, nbytes: int, *, cleared: int = 0) -> int | None:
        """Offset of ``nbytes`` unused bytes (8-aligned); None if the board is full.

        A board reused from round to round holds earlier rounds' bytes there: the first
        ``cleared`` of them are set to 0 (states that start at 0; data is written before it
        is read). The caller holds the lock, or no other process exists yet.
        """
        used, count = self._HEAD.unpack_from(self.memory, 0)
        need = -(-nbytes // 8) * 8
        if used + need > len(self.memory):
            return None
        self._HEAD.pack_into(self.memory, 0, used + need, count)
        self.memory[used : used + cleared] = bytes(cleared)
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
        offset = self.allocate(8 * (blocks + rows * columns), cleared=8 * blocks)  # all free
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
    others died, and the next index nobody has taken (each worker takes one when free).
    """

    PENDING, READY, TAKEN, DELIVERED = 0, 1, 2, 3
    _FIELDS = 3  # state, offset, length

    def __init__(self, board: _Board, count: int, workers: int, at: int | None = None) -> None:
        """The records of a new round, or those made ``at`` an offset by the caller.

        Raises MemoryError if the board cannot hold new records.
        """
        size = self._FIELDS * count
        # New: every record pending, no pid, the first index next.
        nbytes = 8 * (size + workers + 1)
        offset = board.allocate(nbytes, cleared=nbytes) if at is None else at
        if offset is None:
            raise MemoryError("the board has no room for the hand-over's records")
        self.board, self.offset, self.count = board, offset, count
        self.records = np.frombuffer(board.memory, np.int64, size, offset).reshape(count, -1)
        # The caller's pid first, then the other workers'.
        self.pids = np.frombuffer(board.memory, np.int64, workers, offset + 8 * size)
        # The next index nobody has taken yet.
        self.tickets = np.frombuffer(board.memory, np.int64, 1, offset + 8 * (size + workers))
        if at is None:
            self.pids[0] = os.getpid()

    def next_index(self) -> int | None:
        """Take the next index; None once all are taken (or a worker died holding the lock)."""
        with self.board.held() as locked:
            if not locked or int(self.tickets[0]) >= self.count:
                return None
            index = int(self.tickets[0])
            self.tickets[0] = index + 1
        return index

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
            data = _dumps(value)
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

    def take(self, most: int = 1) -> list[tuple[int, object]]:
        """The lowest indices whose first stage is done and second stage not taken, with their
        first-stage results; waits while first stages still run elsewhere. Empty when every
        second stage is taken, or a worker has died (the round then fails as a whole).

        Takes up to ``most`` at once, fewer as the round nears its end (a quarter of the
        untaken ones per worker), so that no worker is left with a batch while the others
        have nothing.
        """
        records, board = self.records, self.board
        while True:
            taken: list[tuple[int, bytes]] = []
            with board.held() as locked:
                if not locked:
                    return []
                states = records[:, 0]
                ready = np.flatnonzero(states == self.READY)
                if ready.size:
                    untaken = ready.size + int((states == self.PENDING).sum())
                    share = max(1, min(most, untaken // (2 * self.pids.size)))
                    for index in ready[:share].tolist():
                        records[index, 0] = self.TAKEN
                        offset, length = (int(v) for v in records[index, 1:])
                        taken.append((index, board.memory[offset : offset + length]))  # copies
                elif not (states == self.PENDING).any():
                    return []
            if taken:
                return [(index, pickle.loads(data)) for index, data in taken]
            if any(pid and not _alive(int(pid)) for pid in self.pids):
                return []
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


def _work(
    job: Callable[[int], object],
    exchange: _Exchange,
    second: Second[object, object] | None = None,
    *,
    deliver: bool = False,
) -> list[tuple[int, object]]:
    """Run ``job`` on the round's indices, taking the next one whenever free, until none are left.

    With ``second``, ``job`` is the first stage: its results go to ``exchange``, and once
    every index is taken this worker takes second stages, of any worker's first stages
    (several at once if ``second`` is :class:`Batched`). With ``deliver`` (a forked
    worker), each final result goes to ``exchange`` as soon as it is made; the ones
    returned are those the board had no room for.
    """
    done: list[tuple[int, object]] = []
    batched = _as_batched(second) if second is not None else None

    def finish(indices: list[int], results: list[object]) -> None:
        for index, result in zip(indices, results, strict=True):
            if not (deliver and exchange.deliver(index, result)):
                done.append((index, result))

    while (index := exchange.next_index()) is not None:
        if batched is None:
            finish([index], [job(index)])
            continue
        state = job(index)
        if not exchange.put(index, state):  # no room to hand it over: finish it here
            finish([index], batched.run([index], [state]))
    if batched is not None:
        while taken := exchange.take(batched.most):
            indices = [index for index, _ in taken]
            finish(indices, batched.run(indices, [state for _, state in taken]))
    return done


@dataclass(frozen=True, slots=True)
class Batched(Generic[S, T]):
    """A second stage that takes several indices at once (:func:`map_in_workers`).

    For clients that share work only when they come together (e.g. one pass over a
    factorisation for all of them).

    Attributes
    ----------
    run : callable
        ``(indices, states) -> results``: one result per index, in their order.
    most : int
        The most indices a worker takes at once; fewer near the end of a round (a quarter
        of those left per worker), so that no worker is left with a batch while the
        others have nothing.

    Raises
    ------
    ValueError
        If ``most`` is below 1.
    """

    run: Callable[[list[int], list[S]], list[T]]
    most: int = 8

    def __post_init__(self) -> None:
        if self.most < 1:
            raise ValueError(f"most must be at least 1, got {self.most}")


# A second stage: one index at a time, ``(index, state) -> result``, or several (Batched).
Second = Callable[[int, S], T] | Batched[S, T]


def _as_batched(second: Second[S, T]) -> Batched[S, T]:
    if isinstance(second, Batched):
        return second
    return Batched(functools.partial(_one_by_one, second), 1)


def _one_by_one(second: Callable[[int, S], T], indices: list[int], states: list[S]) -> list[T]:
    return [second(index, state) for index, state in zip(indices, states, strict=True)]


def _one_thread() -> None:
    """A worker's own settings: one thread (the workers already fill the cores)."""
    # The BLAS pools are already at one thread (set before the fork, see map_in_workers):
    # touching them here would restart OpenBLAS's pool, whose threads spin ~0.1 s for work.
    torch.set_num_threads(1)
    _pools().limit(limits=1, user_api="openmp")


def _run(
    job: Callable[[int], object],
    exchange: _Exchange,
    second: Second[object, object] | None,
    out: int,
) -> None:
    """A forked worker's share of a round; its outcome is sent to ``out``.

    The outcome is ``("ok", [(index, result), ...], "")``, with the results not delivered
    through ``exchange``, or ``("raised", exception, traceback)``.
    """
    try:
        outcome: tuple[str, object, str] = (
            "ok",
            _work(job, exchange, second, deliver=True),
            "",
        )
    except BaseException as exc:  # sent to the caller, raised there
        outcome = ("raised", exc, traceback.format_exc())
    try:
        data = _dumps(outcome)
    except Exception as exc:  # an exception that does not pickle
        error = RuntimeError(f"a worker's outcome does not pickle: {exc}")
        data = pickle.dumps(("raised", error, traceback.format_exc()))
    _send(out, data)


def _as_worker(board: _Board, body: Callable[[], None]) -> None:
    """Run ``body`` as a forked worker of ``board``, on one thread, then leave; never returns."""
    _HERE.board = board
    code = 0
    try:
        _one_thread()
        body()
    except BaseException:
        code = 1
    finally:
        os._exit(code)


def _send(fd: int, data: bytes) -> None:
    """A message to the calling process: its length, then itself."""
    _write_all(fd, _LENGTH.pack(len(data)))
    _write_all(fd, data)


def _receive(fd: int) -> tuple[str, object, str] | None:
    """A worker's outcome from its pipe; None if the worker died before it was whole."""
    head = _read_exactly(fd, _LENGTH.size)
    data = None if head is None else _read_exactly(fd, _LENGTH.unpack(head)[0])
    try:
        return None if data is None else pickle.loads(data)
    except Exception:  # cut short, or a class this process lacks
        return None


def _work_here(
    job: Callable[[int], object],
    board: _Board,
    second: Second[object, object] | None,
    exchange: _Exchange,
) -> list[tuple[int, object]]:
    """This process's share of the round, on one thread like the other workers'."""
    threads = torch.get_num_threads()
    _HERE.board = board
    try:
        torch.set_num_threads(1)
        with _pools().limit(limits=1, user_api="openmp"):
            return _work(job, exchange, second)
    finally:
        _HERE.board = None
        torch.set_num_threads(threads)


@overload
def map_in_workers(job: Callable[[int], T], count: int, workers: int) -> list[T] | None: ...


@overload
def map_in_workers(
    job: Callable[[int], S], count: int, workers: int, second: Second[S, T]
) -> list[T] | None: ...


def map_in_workers(
    job: Callable[[int], Any],
    count: int,
    workers: int,
    second: Second[Any, Any] | None = None,
) -> list[Any] | None:
    """``[job(i) for i in range(count)]``, spread over this process and ``workers - 1`` others.

    This process works as one of the workers. The others stand from one call to the next
    when ``job`` (and ``second``) pickle, and are forked for this call otherwise (see the
    module's notes). Each worker takes the next index as soon as it is free, so a round's
    few expensive updates do not leave one worker running alone at the end. With
    ``second``, the results are ``second(i, job(i))``, and every ``job`` is taken before
    any ``second`` (see :class:`Staged`).

    Parameters
    ----------
    job : callable
        ``index -> result``; a result computed in another worker must pickle. It runs in
        the other workers too, so it should not rely on state changed after the call
        starts.
    count : int
        Number of indices.
    workers : int
        Processes to use, this one included (at most ``count``).
    second : callable or Batched, optional
        ``(index, job's result) -> result``: a second stage, run in whichever worker is
        free once every first stage has been taken; ``job``'s results must then pickle.
        A :class:`Batched` second stage takes several indices and their results at once.

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
    orders = _orders(job, second)
    # The workers inherit BLAS pools of one thread, set here before the fork and restored
    # once they are done. Limiting them in a child instead restarts OpenBLAS's pool there
    # (it shuts down at each fork), and its new threads spin for work for ~0.1 s against
    # the other worker: a worker's first update took 60-120 ms instead of ~25 ms. Left at
    # two threads, the pools spin all along (measured: 0.25 s of work took 7 s).
    with _ONE_JOB_AT_A_TIME, _pools().limit(limits=1, user_api="blas"):
        if orders is None:
            outcomes = _fork_and_collect(job, count, workers, second)
        else:
            outcomes = _on_standing(
                workers - 1, lambda pool: pool.round(orders, job, count, workers, second)
            )
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


class _Pickler(pickle.Pickler):
    """Pickles plain CPU tensors as NumPy arrays, which is far faster.

    For 64 clients' gradients, pickling takes 3.6 ms instead of 20 ms and loading takes
    1.6 ms instead of 23 ms. Results and first-stage results (32 of rconv-main) take 1.3 and
    1.3 ms, and 3.6 and 2.5 ms: no slower than NumPy reductions written for each class.
    """

    def reducer_override(self, obj: object) -> object:
        if type(obj) is torch.Tensor and obj.device.type == "cpu" and not obj.requires_grad:
            try:
                return torch.from_numpy, (obj.numpy(),)
            except (TypeError, RuntimeError):  # no NumPy twin (bfloat16, sparse, conj)
                return NotImplemented
        return NotImplemented


def _dumps(value: object) -> bytes:
    """``value`` pickled as it travels between workers (tensors as NumPy arrays)."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return buffer.getvalue()


def _orders(job: Callable[[int], Any], second: Second[Any, Any] | None) -> bytes | None:
    """``(job, second)`` pickled for a standing worker; None if they do not pickle."""
    try:
        return _dumps((job, second))
    except Exception:  # closures, lambdas, local classes: workers forked for the call
        return None


def _fork_and_collect(
    job: Callable[[int], object],
    count: int,
    workers: int,
    second: Second[object, object] | None = None,
) -> list[tuple[str, object, str]] | None:
    """This process and ``workers - 1`` children forked for this call, sharing the indices.

    Returns every worker's outcome (this process's first; only its own when its job
    raised), or None when a child is missing (it died) or the indices were not all done.
    """
    children: list[tuple[int, int]] = []  # (pid, read end of its pipe)
    outcomes: list[tuple[str, object, str] | None] = []
    checked = None
    try:
        board = _Board()
        exchange = _Exchange(board, count, workers)
    except (OSError, MemoryError):  # no shared memory for the board, or too little
        return None
    try:
        for _ in range(workers - 1):
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child
                os.close(read)
                for _, other in children:
                    os.close(other)
                _as_worker(board, functools.partial(_run, job, exchange, second, write))
            os.close(write)  # else a later child holds it open and the read never ends
            children.append((pid, read))
            exchange.pids[len(children)] = pid
        try:
            work = _work_here(job, board, second, exchange)
            mine: tuple[str, object, str] = ("ok", work, "")
        except Exception as exc:
            return [("raised", exc, traceback.format_exc())]  # the children are stopped below
        outcomes.append(mine)
        outcomes.extend(_receive(read) for _, read in children)  # read before reaping
        checked = _checked(outcomes, exchange, count)  # while the board is open
    except OSError:  # fork or pipe failed (out of processes or memory)
        return None
    finally:
        for _, read in children:
            os.close(read)
        collected = max(0, len(outcomes) - 1)  # outcomes[0] is this process's
        for pid, _ in children[collected:]:  # interrupted: stop the others
            os.kill(pid, signal.SIGKILL)
        # Reaped in the background: a child's exit frees its copy of the address space
        # (~10 ms for a server-sized process), which the results need not wait for.
        if children:
            pids = [pid for pid, _ in children]
            threading.Thread(target=_reap, args=(pids,), daemon=True).start()
        exchange = None  # type: ignore[assignment]  # views the board, which then closes
        with contextlib.suppress(BufferError):  # still viewed (a traceback keeps a frame):
            board.close()  # unmapped once the last view goes
    return checked


def _checked(
    outcomes: list[tuple[str, object, str] | None], exchange: _Exchange, count: int
) -> list[tuple[str, object, str]] | None:
    """Every outcome and the results delivered through ``exchange``; None if a worker is
    missing or an index."""
    if any(outcome is None for outcome in outcomes):
        return None
    complete = [outcome for outcome in outcomes if outcome is not None]
    complete.append(("ok", exchange.delivered(), ""))  # the other workers' results
    done = sum(len(value) for kind, value, _ in complete if kind == "ok")  # type: ignore[arg-type]
    if done != count and all(kind == "ok" for kind, _, _ in complete):
        return None  # every index must come back exactly once
    return complete


class _Standing:
    """Worker processes kept from one round to the next, with their board.

    Each waits for its orders on a pipe of its own (where the round's job lies in the
    board) and answers with its outcome on another, as a forked worker does at its end.
    """

    def __init__(self, size: int) -> None:
        """Fork ``size`` workers (raises OSError if that fails)."""
        self.board = _Board()
        self.children: list[tuple[int, int, int]] = []  # pid, orders (write), outcomes (read)
        # A worker could not load a job (its code is newer than the worker): replace them.
        self.stale = False
        try:
            for _ in range(size):
                orders, write_orders = os.pipe()
                read_outcomes, outcomes = os.pipe()
                pid = os.fork()
                if pid == 0:  # the worker
                    for fd in (write_orders, read_outcomes):
                        os.close(fd)
                    for _, other_orders, other_outcomes in self.children:
                        os.close(other_orders)
                        os.close(other_outcomes)
                    _as_worker(self.board, functools.partial(_serve, self.board, orders, outcomes))
                os.close(orders)
                os.close(outcomes)
                self.children.append((pid, write_orders, read_outcomes))
        except OSError:
            self.close()
            raise

    @property
    def size(self) -> int:
        return len(self.children)

    def alive(self) -> bool:
        return all(_alive(pid) for pid, _, _ in self.children)

    def round(
        self,
        orders: bytes,
        job: Callable[[int], object],
        count: int,
        workers: int,
        second: Second[object, object] | None,
    ) -> list[tuple[str, object, str]] | None:
        """One round over this process and ``workers - 1`` standing workers.

        None when a worker is missing (it died) or an index; raises what this process's
        job raises (the caller then closes the workers: they are mid-round).
        """
        board = self.board
        board.reset()
        try:
            exchange = _Exchange(board, count, workers)
        except MemoryError:
            return None
        at = board.allocate(len(orders))
        if at is None:
            return None
        board.memory[at : at + len(orders)] = orders
        used = self.children[: workers - 1]
        message = _ORDERS.pack(at, len(orders), exchange.offset, count, workers)
        try:
            for i, (pid, write_orders, _) in enumerate(used, start=1):
                exchange.pids[i] = pid
                os.write(write_orders, message)
        except OSError:  # a worker has gone (broken pipe)
            return None
        outcomes: list[tuple[str, object, str] | None] = [
            ("ok", _work_here(job, board, second, exchange), "")
        ]
        for _, _, read_outcomes in used:
            outcome = _receive(read_outcomes)
            if outcome is not None and outcome[0] == "unloadable":
                outcome, self.stale = ("ok", [], ""), True  # it took no index: done here
            outcomes.append(outcome)
        return _checked(outcomes, exchange, count)

    def close(self, *, kill: bool = False) -> None:
        """Let the workers go (their orders pipe closes), or kill them; reaped in the background."""
        for pid, write_orders, read_outcomes in self.children:
            if kill:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for fd in (write_orders, read_outcomes):
                with contextlib.suppress(OSError):
                    os.close(fd)
        pids = [pid for pid, _, _ in self.children]
        self.children = []
        if pids:
            threading.Thread(target=_reap, args=(pids,), daemon=True).start()


def _serve(board: _Board, orders: int, outcomes: int) -> None:
    """A standing worker's life: its share of each round it is ordered to, until the orders
    stop (the pipe closes)."""
    while (message := _read_exactly(orders, _ORDERS.size)) is not None:
        at, length, records, count, workers = _ORDERS.unpack(message)
        # Each round on an empty cache: a server's rounds bring new weights, and an
        # earlier round's entries would only hold memory (up to the cache's budget).
        shared.clear_weight_cache()
        try:
            job, second = pickle.loads(board.memory[at : at + length])
        except Exception as exc:  # e.g. a class defined after this worker was forked
            _send(outcomes, pickle.dumps(("unloadable", repr(exc), "")))
            continue
        _run(job, _Exchange(board, count, workers, at=records), second, outcomes)
        del job, second


def _read_exactly(fd: int, size: int) -> bytes | None:
    """``size`` bytes from a pipe; None if it ends first."""
    chunks, left = [], size
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# The standing workers of this process (none in the workers themselves).
_STANDING: _Standing | None = None


def _on_standing(
    size: int, run: Callable[[_Standing], list[tuple[str, object, str]] | None]
) -> list[tuple[str, object, str]] | None:
    """``run`` on this process's ``size`` standing workers, forked first if there are too
    few or one died; None if they cannot be forked.

    Workers that could not load the round's job are replaced for the next round (the
    round itself ran here), and so are workers whose round failed or raised here.
    """
    global _STANDING
    pool = _STANDING
    if pool is not None and (pool.size < size or not pool.alive()):
        pool.close(kill=True)
        pool = _STANDING = None
    if pool is None:
        try:
            pool = _STANDING = _Standing(size)
        except (OSError, MemoryError):
            return None
    try:
        outcomes = run(pool)
    except BaseException:
        pool.close(kill=True)  # mid-round: their outcomes would answer the next round
        _STANDING = None
        raise
    if outcomes is None or pool.stale:
        pool.close(kill=True)
        _STANDING = None
    return outcomes


def _forget_standing() -> None:
    """In a forked process: the standing workers are its parent's, not its own."""
    global _STANDING
    _STANDING = None


def _close_standing() -> None:
    if _STANDING is not None:
        _STANDING.close()


os.register_at_fork(after_in_child=_forget_standing)
atexit.register(_close_standing)


def _reap(pids: list[int]) -> None:
    """Wait for the children to exit, so that none is left a zombie."""
    for pid in pids:
        # ChildProcessError: already reaped elsewhere (e.g. a wait() for any child).
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


@dataclass(frozen=True, slots=True)
class Staged(Generic[C, S, R]):
    """A per-client attack in two stages: ``second(client, first(client))``.

    The second stage takes one client at a time (``second``) or several
    (``second_many``); exactly one of the two is given.

    Spread over workers (:func:`attack_each`), every client's first stage is taken before
    any second stage, and a second stage runs in whichever worker is free, on the first
    stage's result handed over through shared memory. Where the first stage's cost varies
    from client to client and the second's does not, no worker is left finishing one long
    job alone at the end of the round: while it does, the other takes second stages.

    Attributes
    ----------
    first : callable
        ``client -> state``; the state must pickle.
    second : callable, optional
        ``(client, state) -> result``.
    second_many : callable, optional
        ``(clients, states) -> results``: the second stage of several clients at once,
        for work they share when they come together (one pass over a factorisation for
        all of them); each result is the client's, or the
        :class:`~fl_attack.engine.EngineError` it raised. A worker takes up to ``most``
        clients at a time.
    most : int, optional
        The most clients ``second_many`` takes at once.

    Raises
    ------
    ValueError
        If neither or both of ``second`` and ``second_many`` are given, or ``most`` is
        below 1.
    """

    first: Callable[[C], S]
    second: Callable[[C, S], R] | None = None
    second_many: Callable[[list[C], list[S]], list[R | EngineError]] | None = None
    most: int = 8

    def __post_init__(self) -> None:
        if (self.second is None) == (self.second_many is None):
            raise ValueError("Staged takes one second stage: second or second_many")
        if self.most < 1:
            raise ValueError(f"most must be at least 1, got {self.most}")


def attack_each(
    attack_one: Callable[[C], R] | Staged[C, Any, R], clients: Sequence[C], workers: int
) -> list[R | EngineError]:
    """``attack_one`` on every client, spread over ``workers`` processes, in client order.

    A client whose attack raises an :class:`~fl_attack.engine.EngineError` gets the error
    in place of its result, so one bad update does not stop the round; any other
    exception propagates. ``attack_one`` may come in two stages (:class:`Staged`). When it
    and the clients pickle, the workers stand from one call to the next (see
    :func:`map_in_workers`).

    Raises
    ------
    ValueError
        If ``workers`` is below 1.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    each = _Each(attack_one, list(clients))
    count = len(each.clients)
    if isinstance(attack_one, Staged) and attack_one.second_many is not None:
        batched = Batched(each.second_many, attack_one.most)
        spread = map_in_workers(each.first, count, workers, batched)
        if spread is not None:
            return spread
        states = [each.first(i) for i in range(count)]
        out: list[R | EngineError] = []
        for start in range(0, count, batched.most):
            indices = list(range(start, min(start + batched.most, count)))
            out.extend(batched.run(indices, [states[i] for i in indices]))
        return out
    if isinstance(attack_one, Staged):
        spread = map_in_workers(each.first, count, workers, each.second)
        if spread is not None:
            return spread
        return [each.second(i, each.first(i)) for i in range(count)]
    spread_one = map_in_workers(each.one, count, workers)
    return spread_one if spread_one is not None else [each.one(i) for i in range(count)]


@dataclass(frozen=True, slots=True)
class _Each(Generic[C, R]):
    """:func:`attack_each`'s jobs by client index: they pickle when the attack and clients do."""

    attack: Callable[[C], R] | Staged[C, Any, R]
    clients: list[C]

    def one(self, index: int) -> R | EngineError:
        assert not isinstance(self.attack, Staged)
        return _or_error(self.attack, self.clients[index])

    def first(self, index: int) -> object:
        assert isinstance(self.attack, Staged)
        return _or_error(self.attack.first, self.clients[index])

    def second(self, index: int, state: object) -> R | EngineError:
        assert isinstance(self.attack, Staged) and self.attack.second is not None
        if isinstance(state, EngineError):
            return state
        return _or_error(self.attack.second, self.clients[index], state)

    def second_many(self, indices: list[int], states: list[object]) -> list[R | EngineError]:
        assert isinstance(self.attack, Staged) and self.attack.second_many is not None
        out: list[R | EngineError | None] = [
            state if isinstance(state, EngineError) else None for state in states
        ]
        todo = [k for k, state in enumerate(out) if state is None]
        if todo:
            done = self.attack.second_many(
                [self.clients[indices[k]] for k in todo], [states[k] for k in todo]
            )
            for k, result in zip(todo, done, strict=True):
                out[k] = result
        return out  # type: ignore[return-value]  # every None was filled


def _or_error(call: Callable[..., R], *args: object) -> R | EngineError:
    """``call(*args)``, or the :class:`EngineError` it raised, as a result."""
    try:
        return call(*args)
    except EngineError as exc:
        return exc.with_traceback(None)  # a result now: its frames need not live on
