"""Attacking a round over worker processes: same results as one process, errors in place."""

from __future__ import annotations

import functools
import os
import pickle
import signal
import sys
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from threadpoolctl import threadpool_info

from fl_attack.engine import (
    ReconstructionError,
    UnsupportedLayerError,
    available_cores,
    reconstruct_many,
    shared,
    single_sample_gradients,
    workers,
)
from fl_attack.engine.shared import clear_weight_cache
from fl_attack.engine.workers import (
    Staged,
    _Board,
    _shared_blocks,
    attack_each,
    map_in_workers,
    shared_columns,
)
from fl_attack.models import build_model


def _meet(place: Path, parties: int = 2) -> None:
    """Wait until ``parties`` processes have called this: both workers then hold a client.

    Without it, a worker that starts late may find every ticket already taken.
    """
    with place.open("a") as log:  # appends this short are atomic
        log.write(f"{os.getpid()}\n")
    deadline = time.monotonic() + 60.0
    while len(set(place.read_text().split())) < parties and time.monotonic() < deadline:
        time.sleep(0.002)


def _threads(index: int) -> tuple[int, int, list[int]]:
    del index
    pools = [pool["num_threads"] for pool in threadpool_info()]
    return os.getpid(), torch.get_num_threads(), pools


def test_reconstruct_many_over_two_workers_equals_one_process() -> None:
    # Prepare: one round of five clients, one of them with a gradient that does not fit.
    model = build_model("rconv-main", activation="ReLU", in_channels=1, num_classes=10, seed=14)
    images = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    grads = [single_sample_gradients(model, x, i) for i, x in enumerate(images)]
    bad = {name: g[..., :1] for name, g in grads[0].items()}
    clients = [grads[0], grads[1], bad, grads[2], grads[3]]
    clear_weight_cache()
    serial = reconstruct_many(model, clients, (1, 32, 32))
    clear_weight_cache()  # the workers are forked from here: each builds its own
    # Execute
    spread = reconstruct_many(model, clients, (1, 32, 32), workers=2)
    # Assert: the same images and labels, the bad client's error in its place. The images
    # agree to rounding (the workers run one BLAS thread, this process may run more), far
    # below the float32 gradients' own noise (~1e-5 at 100 dB).
    assert len(spread) == len(serial) == 5
    assert isinstance(spread[2], ReconstructionError)
    assert str(spread[2]) == str(serial[2])
    for one, other in zip(serial, spread, strict=True):
        if isinstance(one, ReconstructionError):
            continue
        assert not isinstance(other, ReconstructionError)
        torch.testing.assert_close(other.image, one.image, rtol=1e-6, atol=1e-8)
        assert one.label == other.label
        assert one.warnings == other.warnings


def test_work_runs_here_and_in_a_forked_process_with_one_thread_each(tmp_path: Path) -> None:
    # Prepare: this process's torch threads as they are.
    before = torch.get_num_threads()

    def job(index: int) -> tuple[int, int, list[int]]:
        _meet(tmp_path / "met")
        return _threads(index)

    # Execute
    seen = map_in_workers(job, 8, 2)
    # Assert: this process and one forked worker, one thread in torch and every pool in
    # both; this process gets its own setting back.
    assert seen is not None
    pids = {pid for pid, _, _ in seen}
    assert os.getpid() in pids
    assert len(pids) == 2
    assert all(threads == 1 for _, threads, _ in seen)
    assert all(set(pools) <= {1} for _, _, pools in seen)
    assert torch.get_num_threads() == before


def _blas_threads(index: int) -> tuple[int, int]:
    """This process's id and threads after a BLAS product large enough to go parallel."""
    del index
    a = np.random.default_rng(0).standard_normal((400, 400))
    _ = a @ a  # numpy's OpenBLAS
    _ = scipy.linalg.blas.dgemm(1.0, a, a)  # scipy's own OpenBLAS
    return os.getpid(), len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_workers_start_no_blas_threads_and_this_process_keeps_its_pools(tmp_path: Path) -> None:
    # Prepare: this process's pools as they are (possibly several threads).
    before = [pool["num_threads"] for pool in threadpool_info()]

    def job(index: int) -> tuple[int, int]:
        _meet(tmp_path / "met")
        return _blas_threads(index)

    # Execute
    seen = map_in_workers(job, 4, 2)
    # Assert: the forked worker runs its BLAS on its own thread (a restarted OpenBLAS pool
    # would add threads that spin against the other worker), and the pools here are
    # restored. (This process's own thread count says nothing: it may run other threads.)
    assert seen is not None
    forked = [threads for pid, threads in seen if pid != os.getpid()]
    assert forked and set(forked) == {1}
    assert [pool["num_threads"] for pool in threadpool_info()] == before


def _met_then(place: Path, index: int) -> tuple[int, int, int, list[int]]:
    """A job that pickles: meet the other worker, then report who and how many threads."""
    _meet(place)
    return (index, *_threads(index))


def _met_then_blas(place: Path, index: int) -> tuple[int, int]:
    _meet(place)
    return _blas_threads(index)


def _rounds_apart(
    tmp_path: Path, rounds: int, job: Callable[..., object], tag: str = "met"
) -> list[list[object]]:
    """``rounds`` calls of a pickling ``job`` over two workers, each meeting in its own file."""
    out = []
    for r in range(rounds):
        seen = map_in_workers(functools.partial(job, tmp_path / f"{tag}{r}"), 6, 2)
        assert seen is not None
        out.append(seen)
    return out


def test_workers_stand_from_one_round_to_the_next(tmp_path: Path) -> None:
    # Execute: two rounds of a job that pickles.
    first, second = _rounds_apart(tmp_path, 2, _met_then)
    # Assert: results in order; the same other worker both times, on one thread.
    assert [index for index, *_ in first] == list(range(6))
    others = [{pid for _, pid, _, _ in seen} - {os.getpid()} for seen in (first, second)]
    assert len(others[0]) == 1 and others[0] == others[1]
    assert all(threads == 1 and set(pools) <= {1} for _, _, threads, pools in first + second)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_a_standing_worker_starts_no_blas_threads(tmp_path: Path) -> None:
    before = [pool["num_threads"] for pool in threadpool_info()]
    seen = map_in_workers(functools.partial(_met_then_blas, tmp_path / "met"), 4, 2)
    assert seen is not None
    standing = [threads for pid, threads in seen if pid != os.getpid()]
    assert standing and set(standing) == {1}
    assert [pool["num_threads"] for pool in threadpool_info()] == before


def test_a_job_that_does_not_pickle_gets_workers_forked_for_the_call(tmp_path: Path) -> None:
    # Prepare: the standing worker, as a pickling job finds it.
    (standing,) = _rounds_apart(tmp_path, 1, _met_then)

    def job(index: int) -> int:  # a closure: it does not pickle
        _meet(tmp_path / f"closure{index // 3}")
        return os.getpid()

    # Execute: two calls of a closure
    calls = [map_in_workers(job, 3, 2), map_in_workers(job, 6, 2)]
    # Assert: each had a worker of its own, none of them the standing one.
    assert calls[0] is not None and calls[1] is not None
    forked = [set(pids) - {os.getpid()} for pids in calls]
    assert all(len(pids) == 1 for pids in forked) and forked[0] != forked[1]
    assert not (forked[0] | forked[1]) & ({pid for _, pid, _, _ in standing})


def test_a_standing_worker_that_died_between_rounds_is_replaced(tmp_path: Path) -> None:
    # Prepare: the standing worker, killed between two rounds.
    (first,) = _rounds_apart(tmp_path, 1, _met_then)
    (dead,) = {pid for _, pid, _, _ in first} - {os.getpid()}
    os.kill(dead, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while workers._alive(dead) and time.monotonic() < deadline:
        time.sleep(0.01)
    # Execute / Assert: the next round runs on a new worker, without a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seen = map_in_workers(functools.partial(_met_then, tmp_path / "again"), 6, 2)
    assert seen is not None
    others = {pid for _, pid, _, _ in seen} - {os.getpid()}
    assert len(others) == 1 and dead not in others


def _dies_elsewhere(parent: int, place: Path, index: int) -> int:
    _meet(place)
    if os.getpid() != parent:
        os._exit(3)
    return index


def test_a_standing_worker_dying_in_a_round_sends_it_back_to_this_process(tmp_path: Path) -> None:
    # Execute: a round whose other worker dies in it, then a healthy round.
    job = functools.partial(_dies_elsewhere, os.getpid(), tmp_path / "met")
    with pytest.warns(RuntimeWarning, match="running in this process instead"):
        assert map_in_workers(job, 4, 2) is None
    (after,) = _rounds_apart(tmp_path, 1, _met_then)
    # Assert: the next round has a worker again.
    assert len({pid for _, pid, _, _ in after}) == 2


def _cache_probe(place: Path, index: int) -> tuple[int, bool]:
    """Meet, then whether this worker had to compute a weights-cache entry."""
    _meet(place)
    ran: list[int] = []
    shared.cached(("probe", "same weights"), lambda: ran.append(1) or 1)
    return os.getpid(), bool(ran)


def test_a_standing_worker_starts_each_round_on_an_empty_weight_cache(tmp_path: Path) -> None:
    # Prepare: one round that fills both workers' caches.
    shared.clear_weight_cache()
    _rounds_apart(tmp_path, 1, _cache_probe, "fill")
    # Execute: a round on the same weights
    (again,) = _rounds_apart(tmp_path, 1, _cache_probe, "again")
    # Assert: this process reused its entry; the other worker computed its own once more.
    here = [ran for pid, ran in again if pid == os.getpid()]
    there = [ran for pid, ran in again if pid != os.getpid()]
    assert here and not any(here)
    assert there.count(True) == 1
    shared.clear_weight_cache()


def test_a_job_the_standing_worker_cannot_load_runs_here_then_gets_new_workers(
    tmp_path: Path,
) -> None:
    # Prepare: a standing worker, then a module it has never seen (made after its fork).
    _rounds_apart(tmp_path, 1, _met_then)
    late = types.ModuleType("late_module_for_workers_test")
    exec("def job(index):\n    import os\n    return index, os.getpid()", late.__dict__)
    sys.modules[late.__name__] = late
    try:
        # Execute: the job twice
        first = map_in_workers(late.job, 5, 2)
        second = map_in_workers(functools.partial(_late_pair, late.__name__, tmp_path), 4, 2)
    finally:
        del sys.modules[late.__name__]
    # Assert: every result; the first round all here, the second on new workers that know
    # the module.
    assert first == [(i, os.getpid()) for i in range(5)]
    assert second is not None and [i for i, _ in second] == list(range(4))
    assert len({pid for _, pid in second}) == 2


def _late_pair(module: str, place: Path, index: int) -> tuple[int, int]:
    """Meet, then run the late module's job (importable only where the module exists)."""
    _meet(place / "late")
    return sys.modules[module].job(index)


def test_one_worker_or_one_item_runs_in_this_process() -> None:
    assert map_in_workers(_threads, 8, 1) is None
    assert map_in_workers(_threads, 1, 4) is None
    assert attack_each(lambda x: x * 2, [1, 2, 3], 1) == [2, 4, 6]


def test_an_unexpected_error_in_a_worker_propagates() -> None:
    def job(index: int) -> int:
        if index == 3:
            raise RuntimeError("a bug in the attack")
        return index

    with pytest.raises(RuntimeError, match="a bug in the attack"):
        map_in_workers(job, 6, 2)


def test_an_engine_error_takes_its_clients_place() -> None:
    def attack(value: int) -> int:
        if value < 0:
            raise ReconstructionError(f"client {value} carries nothing")
        return value + 1

    results = attack_each(attack, [1, -2, 3, -4], 2)
    assert results[0] == 2 and results[2] == 4
    assert isinstance(results[1], ReconstructionError) and "client -2" in str(results[1])
    assert isinstance(results[3], ReconstructionError) and "client -4" in str(results[3])


def test_a_worker_that_dies_sends_the_round_back_to_this_process(tmp_path: Path) -> None:
    parent = os.getpid()

    def job(index: int) -> int:
        _meet(tmp_path / "met")
        if os.getpid() != parent:
            os._exit(3)  # as if killed (out of memory, a signal) mid-round
        return index

    with pytest.warns(RuntimeWarning, match="running in this process instead"):
        assert map_in_workers(job, 4, 2) is None
    # and the round still gets every answer, computed here
    assert attack_each(lambda x: x * 10, [0, 1, 2, 3], 1) == [0, 10, 20, 30]


def test_an_error_here_stops_the_forked_workers_and_propagates() -> None:
    # Prepare: this process fails at its first client; the forked worker would run on.
    parent = os.getpid()

    def job(index: int) -> int:
        if os.getpid() == parent:
            raise RuntimeError(f"a bug at {index}")
        time.sleep(0.01)
        return index

    # Execute / Assert: raised at once, not after the other worker's 20000 clients.
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="a bug at"):
        map_in_workers(job, 20000, 2)
    assert time.perf_counter() - start < 60.0


def test_results_come_back_in_client_order() -> None:
    for count, processes in ((2, 2), (5, 2), (7, 3), (64, 2)):
        assert map_in_workers(lambda i: i * i, count, processes) == [i * i for i in range(count)]


def test_workers_below_one_are_refused() -> None:
    with pytest.raises(ValueError, match="workers must be at least 1, got 0"):
        attack_each(lambda x: x, [1, 2], 0)


def test_unsupported_layer_error_survives_pickling() -> None:
    error = UnsupportedLayerError(["features.1 (MaxPool2d): no inverter", "x (Y): why"])
    copy = pickle.loads(pickle.dumps(error))
    assert copy.problems == error.problems
    assert str(copy) == str(error)


def test_available_cores_is_at_least_one() -> None:
    assert 1 <= available_cores() <= (os.cpu_count() or 1)


def test_a_free_worker_takes_the_next_client() -> None:
    # Prepare: client 0 is slow. With fixed shares its worker would also get 2, 4, ...
    def job(index: int) -> int:
        time.sleep(0.6 if index == 0 else 0.02)
        return os.getpid()

    # Execute
    pids = map_in_workers(job, 10, 2)
    # Assert: the slow client's worker did nothing else; the other took the rest.
    assert pids is not None
    assert pids.count(pids[0]) == 1
    assert len(set(pids)) == 2


def test_more_clients_than_the_ticket_pipe_holds_all_come_back() -> None:
    # 20000 tickets of 8 bytes overflow a 64 KiB pipe: a thread writes while workers read.
    assert map_in_workers(lambda i: i, 20000, 2) == list(range(20000))


def test_an_error_in_every_worker_propagates_while_tickets_remain() -> None:
    # Both workers stop taking tickets at once: the ticket writer then finds no reader.
    def job(index: int) -> int:
        raise RuntimeError(f"bug at {index}")

    with pytest.raises(RuntimeError, match="bug at"):
        map_in_workers(job, 20000, 2)


def _block_values(rows: int) -> Callable[[slice], np.ndarray]:
    """A column block whose entries say which columns they are: ``value = 1000 row + col``."""

    def compute(block: slice) -> np.ndarray:
        cols = np.arange(block.start, block.stop)
        return 1000.0 * np.arange(rows)[:, None] + cols[None, :]

    return compute


def test_shared_columns_outside_workers_are_computed_here() -> None:
    # Execute
    out = shared_columns("here", _block_values(5), 5, 21)
    # Assert: the whole matrix, blocks of 8 columns put side by side.
    expected = _block_values(5)(slice(0, 21))
    np.testing.assert_array_equal(out, expected)


def test_two_workers_share_the_blocks_of_one_key(tmp_path: Path) -> None:
    # Prepare: each worker needs the same 40-column matrix and logs the blocks it computes.
    def job(index: int) -> tuple[int, list[int], np.ndarray]:
        _meet(tmp_path / "met")
        mine: list[int] = []

        def compute(block: slice) -> np.ndarray:
            mine.append(block.start)
            time.sleep(0.02)  # long enough that the other worker asks meanwhile
            return _block_values(6)(block)

        out = shared_columns(("weights", 7), compute, 6, 40)
        return os.getpid(), mine, out

    # Execute
    seen = map_in_workers(job, 2, 2)
    # Assert: both got the whole matrix; each of the 5 blocks was computed exactly once,
    # and both workers computed some.
    assert seen is not None
    for _, _, out in seen:
        np.testing.assert_array_equal(out, _block_values(6)(slice(0, 40)))
    starts = sorted(start for _, mine, _ in seen for start in mine)
    assert starts == [0, 8, 16, 24, 32]
    assert all(mine for _, mine, _ in seen)


def test_a_worker_does_not_wait_for_one_that_never_asks() -> None:
    # Prepare: only client 0 needs the matrix; the other worker sleeps through it.
    def job(index: int) -> int:
        if index == 0:
            out = shared_columns("alone", _block_values(3), 3, 24)
            return int(out.sum())
        time.sleep(0.5)
        return -1

    # Execute
    start = time.perf_counter()
    seen = map_in_workers(job, 2, 2)
    # Assert: the answer is whole, and nobody waited on the sleeper beyond its own sleep.
    assert seen is not None
    assert seen[0] == int(_block_values(3)(slice(0, 24)).sum())
    assert time.perf_counter() - start < 5.0


def test_a_block_left_by_a_dead_worker_is_computed_again() -> None:
    # Prepare: a board whose first block is held by a process that no longer exists.
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    board = _Board(size=2**20)
    offset = board.table(b"k" * 16, 4, 16, 2)
    assert offset is not None
    board.states(offset, 2)[0] = pid
    # Execute: as a worker of that board would
    try:
        out = _shared_blocks(board, b"k" * 16, _block_values(4), [slice(0, 8), slice(8, 16)], 4, 16)
    finally:
        board.close()
    # Assert
    assert out is not None
    np.testing.assert_array_equal(out, _block_values(4)(slice(0, 16)))


def test_a_full_board_falls_back_to_computing_here() -> None:
    board = _Board(size=4096, tables=1)
    try:
        assert board.table(b"a" * 16, 100, 100, 13) is None  # 80 kB do not fit in 4 kB
        assert _shared_blocks(board, b"a" * 16, _block_values(100), [], 100, 100) is None
    finally:
        board.close()


def test_a_forked_workers_results_come_back_on_the_board_as_they_are_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: record what this process reads off the board at the end of the round.
    parent, read = os.getpid(), []
    delivered = workers._Exchange.delivered

    def spy(self: workers._Exchange) -> list[tuple[int, object]]:
        out = delivered(self)
        read.extend(index for index, _ in out)
        return out

    monkeypatch.setattr(workers._Exchange, "delivered", spy)

    def job(index: int) -> tuple[int, int]:
        _meet(tmp_path / "met")
        return index * 3, os.getpid()

    # Execute
    seen = map_in_workers(job, 10, 2)
    # Assert: all there in order; exactly the forked worker's came through the board.
    assert seen is not None and [value for value, _ in seen] == [i * 3 for i in range(10)]
    assert sorted(read) == [i for i, (_, pid) in enumerate(seen) if pid != parent]
    assert read


def test_results_the_board_has_no_room_for_come_back_through_the_pipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: room for the records, none for a result (8 KiB each).
    monkeypatch.setattr(workers, "_BOARD_BYTES", 8192)

    def job(index: int) -> tuple[bytes, int]:
        _meet(tmp_path / "met")
        return bytes(8192), os.getpid()

    # Execute
    seen = map_in_workers(job, 6, 2)
    # Assert: every result back, from both workers.
    assert seen is not None and len(seen) == 6
    assert all(len(data) == 8192 for data, _ in seen)
    assert len({pid for _, pid in seen}) == 2


def test_a_result_that_does_not_pickle_is_an_error_of_its_worker(tmp_path: Path) -> None:
    parent = os.getpid()

    def job(index: int) -> object:
        _meet(tmp_path / "met")
        return index if os.getpid() == parent else (lambda: index)

    with pytest.raises(RuntimeError, match="a worker's result does not pickle"):
        map_in_workers(job, 4, 2)


def _first(index: int) -> tuple[int, int, float]:
    time.sleep(0.3 if index == 3 else 0.005)  # client 3's first stage is slow
    return index * index, os.getpid(), time.perf_counter()


def _second(index: int, state: tuple[int, int, float]) -> tuple[int, int, float, int, float]:
    started = time.perf_counter()
    time.sleep(0.01)
    square, first_pid, first_start = state
    return square + index, first_pid, first_start, os.getpid(), started


def test_two_stages_give_second_of_first_in_client_order() -> None:
    # Execute
    seen = map_in_workers(_first, 30, 2, _second)
    # Assert: every client's second stage got its own first stage's result.
    assert seen is not None
    assert [value for value, *_ in seen] == [i * i + i for i in range(30)]


def test_second_stages_start_after_every_first_stage_has_started() -> None:
    seen = map_in_workers(_first, 30, 2, _second)
    assert seen is not None
    last_first = max(first_start for _, _, first_start, _, _ in seen)
    # (a first stage's start is stamped when it ends: the bound holds a fortiori)
    assert last_first <= min(second_start for *_, second_start in seen) + 0.3


def test_a_slow_first_stage_leaves_the_second_stages_to_the_other_worker() -> None:
    # Execute: client 3's first stage takes 0.3 s, every other stage 5-10 ms.
    seen = map_in_workers(_first, 30, 2, _second)
    # Assert: the other worker took most second stages meanwhile, including others'
    # first stages' results (handed over), so neither finished far behind the other.
    assert seen is not None
    slow = seen[3][1]
    by_slow = sum(1 for *_, second_pid, _ in seen if second_pid == slow)
    assert by_slow < 30 - by_slow
    assert any(first_pid != second_pid for _, first_pid, _, second_pid, _ in seen)


def _second_many(
    indices: list[int], states: list[tuple[int, int, float]]
) -> list[tuple[int, int, int]]:
    time.sleep(0.004 * len(indices))
    return [
        (square + index, len(indices), os.getpid())
        for index, (square, *_) in zip(indices, states, strict=True)
    ]


def test_a_batched_second_stage_takes_several_clients_fewer_near_the_end() -> None:
    # Execute: at most 4 second stages at once.
    seen = map_in_workers(_first, 40, 2, workers.Batched(_second_many, most=4))
    # Assert: every client's own result, in order; batches of up to 4, and single ones at
    # the end of the round, where a batch would leave the other worker idle.
    assert seen is not None
    assert [value for value, _, _ in seen] == [i * i + i for i in range(40)]
    sizes = [size for _, size, _ in seen]
    assert max(sizes) == 4 and min(sizes) == 1
    assert sizes[-1] == 1
    assert len({pid for *_, pid in seen}) == 2


def test_a_full_board_runs_each_second_stage_where_its_first_ran(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: room for the records, none for the first stages' results (8 KiB each).
    monkeypatch.setattr(workers, "_BOARD_BYTES", 8192)

    def first(index: int) -> tuple[bytes, int]:
        return bytes(8192), os.getpid()

    def second(index: int, state: tuple[bytes, int]) -> tuple[int, int]:
        return state[1], os.getpid()

    # Execute
    seen = map_in_workers(first, 12, 2, second)
    # Assert: all there, each finished by the worker that began it.
    assert seen is not None and len(seen) == 12
    assert all(first_pid == second_pid for first_pid, second_pid in seen)


def test_a_worker_dying_in_a_first_stage_sends_the_round_back(tmp_path: Path) -> None:
    parent = os.getpid()

    def first(index: int) -> int:
        _meet(tmp_path / "met")
        if os.getpid() != parent:
            os._exit(3)
        return index

    with pytest.warns(RuntimeWarning, match="running in this process instead"):
        assert map_in_workers(first, 6, 2, lambda i, s: s) is None


def test_an_error_in_a_second_stage_propagates() -> None:
    def second(index: int, state: int) -> int:
        if index == 5:
            raise RuntimeError("a bug in the second stage")
        return state

    with pytest.raises(RuntimeError, match="a bug in the second stage"):
        map_in_workers(lambda i: i, 8, 2, second)


@pytest.mark.parametrize("workers", [1, 2])
def test_staged_engine_errors_take_their_clients_place(workers: int) -> None:
    def first(value: int) -> int:
        if value == -1:
            raise ReconstructionError("no first stage for -1")
        return value * 10

    def second(value: int, state: int) -> int:
        if value == -2:
            raise ReconstructionError("no second stage for -2")
        return state + 1

    results = attack_each(Staged(first, second), [1, -1, 2, -2], workers)
    assert results[0] == 11 and results[2] == 21
    assert isinstance(results[1], ReconstructionError) and "-1" in str(results[1])
    assert isinstance(results[3], ReconstructionError) and "-2" in str(results[3])


def _tenfold(value: int) -> int:
    if value == -1:
        raise ReconstructionError("no first stage for -1")
    return value * 10


def _plus_one_each(values: list[int], states: list[int]) -> list[int | ReconstructionError]:
    # Never given a client whose first stage failed; reports its own errors in place.
    assert -1 not in values
    return [
        ReconstructionError("no second stage for -2") if value == -2 else state + len(values)
        for value, state in zip(values, states, strict=True)
    ]


@pytest.mark.parametrize("workers_", [1, 2])
def test_staged_in_batches_keeps_each_clients_error_in_its_place(workers_: int) -> None:
    # Prepare: 11 clients, two of which fail (one in each stage); batches of up to 3.
    clients = [1, -1, 2, -2, 3, 4, 5, 6, 7, 8, 9]
    stages = Staged(_tenfold, second_many=_plus_one_each, most=3)
    # Execute
    results = attack_each(stages, clients, workers_)
    # Assert: each client's result (10 x, plus its batch's size) or its error, in order.
    assert len(results) == 11
    assert isinstance(results[1], ReconstructionError) and "-1" in str(results[1])
    assert isinstance(results[3], ReconstructionError) and "-2" in str(results[3])
    for value, result in zip(clients, results, strict=True):
        if value > 0:
            assert isinstance(result, int) and 10 * value + 1 <= result <= 10 * value + 3


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_a_worker_that_exited_but_was_not_reaped_counts_as_dead() -> None:
    # Prepare: a child that exits at once and stays a zombie until reaped.
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        deadline = time.monotonic() + 30.0
        while workers._alive(pid) and time.monotonic() < deadline:
            time.sleep(0.001)
        # Assert: dead, although a signal test still finds it (not yet reaped).
        assert not workers._alive(pid)
        os.kill(pid, 0)
    finally:
        os.waitpid(pid, 0)
    assert workers._alive(os.getpid())


def test_a_staged_attack_takes_exactly_one_second_stage() -> None:
    with pytest.raises(ValueError, match="one second stage"):
        Staged(_tenfold)
    with pytest.raises(ValueError, match="one second stage"):
        Staged(_tenfold, lambda value, state: state, second_many=_plus_one_each)
    with pytest.raises(ValueError, match="at least 1"):
        Staged(_tenfold, second_many=_plus_one_each, most=0)
    with pytest.raises(ValueError, match="at least 1"):
        workers.Batched(_second_many, most=0)
