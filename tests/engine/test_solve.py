"""Oracle tests for the least-squares solvers: each against a dense least-squares solve."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import optimize, sparse

from fl_attack.engine import shared, solve
from fl_attack.engine.shared import clear_weight_cache, for_weights
from fl_attack.engine.solve import factor_square, solve_deflated, solve_spd, sparse_lu


def _system(n: int, rows: int, seed: int) -> tuple[sparse.csr_matrix, torch.Tensor]:
    """A sparse, well-posed square K (banded plus diagonal) and a dense A."""
    rng = np.random.default_rng(seed)
    k = sparse.random(n, n, density=0.05, random_state=rng) + sparse.eye(n) * 2.0
    a = torch.from_numpy(rng.standard_normal((rows, n)))
    return sparse.csr_matrix(k), a


def _dense_lstsq(k: np.ndarray, a: torch.Tensor, o: torch.Tensor, b: torch.Tensor, scale: float):
    stacked = torch.cat([torch.from_numpy(k) / scale, a])
    return torch.linalg.lstsq(stacked, torch.cat([o / scale, b])).solution


@pytest.mark.parametrize("free", [0, 5])
def test_deflated_solve_with_a_full_basis_is_the_exact_least_squares(free: int) -> None:
    # Prepare: inconsistent equations (noise on both families), a few free weight rows.
    n, rows, scale = 120, 40, 1.7
    k, a = _system(n, rows, seed=free)
    gen = torch.Generator().manual_seed(1)
    z = torch.rand(n, dtype=torch.float64, generator=gen)
    o = torch.from_numpy(k @ z.numpy()) + 1e-3 * torch.randn(n, dtype=torch.float64, generator=gen)
    b = a @ z + 1e-3 * torch.randn(rows, dtype=torch.float64, generator=gen)
    free_rows = torch.arange(0, n, n // max(free, 1))[:free]
    kept = torch.ones(n, dtype=torch.bool)
    kept[free_rows] = False
    factor = factor_square(k, width=n)
    assert factor is not None
    # Execute
    got = solve_deflated(
        factor, o, lambda x: a @ x, b, k_scale=scale, rank_rtol=1e-7, free_rows=free_rows
    )
    # Assert: with every direction in the basis the subspace is the whole space.
    expected = _dense_lstsq(k.toarray()[kept.numpy()], a, o[kept], b, scale)
    assert got is not None
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


def test_deflated_solve_settles_the_weakest_directions_from_the_other_equations() -> None:
    # Prepare: K with a few tiny singular values, exact data; A sees everything.
    rng = np.random.default_rng(3)
    n = 200
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    sigma = np.ones(n)
    sigma[:4] = 1e-9
    k = sparse.csr_matrix(u @ np.diag(sigma) @ v.T)
    a = torch.from_numpy(rng.standard_normal((30, n)))
    z = torch.from_numpy(rng.random(n))
    o, b = torch.from_numpy(k @ z.numpy()), a @ z
    o = o + 1e-12 * torch.from_numpy(rng.standard_normal(n))  # blown up by 1e9 alone
    factor = factor_square(k, width=16)
    assert factor is not None
    # Execute
    alone = torch.from_numpy(factor.lu.solve(o.numpy()))
    got = solve_deflated(factor, o, lambda x: a @ x, b, k_scale=1.0, rank_rtol=1e-7)
    # Assert: the weight system alone is off along its weak directions; deflated it is not.
    assert float((alone - z).abs().max()) > 1e-4
    assert got is not None
    torch.testing.assert_close(got, z, rtol=0, atol=1e-7)


def test_a_singular_weight_system_has_no_factor() -> None:
    k = sparse.csr_matrix(np.diag([1.0, 2.0, 0.0]))
    assert factor_square(k, width=2) is None
    assert factor_square(sparse.csr_matrix(np.ones((3, 2))), width=2) is None


def test_sparse_lu_solves_both_ways_and_its_order_serves_the_same_pattern_again() -> None:
    # Prepare: two matrices with one sparsity pattern and different values.
    k, _ = _system(150, 1, seed=4)
    other = k.copy()
    other.data = np.random.default_rng(5).uniform(0.5, 1.5, other.data.size) * other.data
    rhs = np.random.default_rng(6).standard_normal((150, 3))
    first = sparse_lu(k)
    # Execute: the second factorisation takes the first one's column order.
    ordered = sparse_lu(other, first.eliminated)
    fresh = sparse_lu(other)
    # Assert: K^-1 and K^-T against dense solves; the given order is the one a fresh
    # factorisation would have found, so the factors and answers are identical.
    for lu, mat in ((first, k), (ordered, other)):
        dense = mat.toarray()
        np.testing.assert_allclose(lu.solve(rhs), np.linalg.solve(dense, rhs), rtol=1e-10)
        np.testing.assert_allclose(
            lu.solve(rhs, trans="T"), np.linalg.solve(dense.T, rhs), rtol=1e-10
        )
    assert ordered.lu.L.nnz + ordered.lu.U.nnz == fresh.lu.L.nnz + fresh.lu.U.nnz
    np.testing.assert_array_equal(ordered.solve(rhs), fresh.solve(rhs))
    np.testing.assert_array_equal(ordered.solve(rhs, trans="T"), fresh.solve(rhs, trans="T"))
    np.testing.assert_array_equal(ordered.eliminated, first.eliminated)


def test_weight_cache_computes_once_per_weights_and_again_when_they_change() -> None:
    # Prepare
    clear_weight_cache()
    calls: list[int] = []
    w = torch.ones(3)

    def compute() -> int:
        calls.append(1)
        return len(calls)

    # Execute / Assert: same bytes -> cached; one changed bit -> recomputed.
    assert for_weights("k", [w], compute) == 1
    assert for_weights("k", [w.clone()], compute) == 1
    assert for_weights("other", [w], compute) == 2
    w2 = w.clone()
    w2[0] = torch.nextafter(w2[0], torch.tensor(2.0))
    assert for_weights("k", [w2], compute) == 3
    clear_weight_cache()
    assert for_weights("k", [w], compute) == 4


def test_weight_cache_drops_the_oldest_entries_past_its_memory_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: a budget of two 1 KiB values.
    clear_weight_cache()
    monkeypatch.setattr(shared, "_MAX_BYTES", 2048)
    calls: list[int] = []

    def kib() -> torch.Tensor:
        calls.append(1)
        return torch.zeros(128, dtype=torch.float64)  # 1 KiB

    # Execute: three different weights, then the first again.
    for value in (1.0, 2.0, 3.0, 1.0):
        for_weights("k", [torch.tensor([value])], kib)
    # Assert: the first entry was dropped to make room, so it was computed again.
    assert len(calls) == 4
    for_weights("k", [torch.tensor([3.0])], kib)
    assert len(calls) == 4  # the newest two are still there
    clear_weight_cache()


def _dependent_columns(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (60, 40) with column 2 = column 0 + column 1: one lost direction, (1, 1, -1)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((60, 40))
    a[:, 2] = a[:, 0] + a[:, 1]
    x = rng.uniform(0.1, 1.0, 40)
    x[0] = x[2] = 0.0  # both on the bound: the lost direction would push one below it
    return torch.from_numpy(a), torch.from_numpy(x)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_deficient_solve_is_the_minimum_norm_least_squares(seed: int) -> None:
    # Prepare: a rank-deficient system with noise (inconsistent), and the oracle pinv.
    a, x = _dependent_columns(seed)
    noise = torch.from_numpy(np.random.default_rng(seed + 10).standard_normal(60)) * 1e-3
    b = a @ x + noise
    # Execute
    solution = solve_spd(a.T @ a, a.T @ b, rank_rtol=1e-6)
    # Assert: the pseudo-inverse's answer, rank 39, and exactly unknowns 0-2 undetermined.
    torch.testing.assert_close(solution.x, torch.linalg.pinv(a) @ b, rtol=1e-8, atol=1e-10)
    assert solution.rank == 39 and not solution.bounded
    assert solution.undetermined is not None
    assert torch.nonzero(solution.undetermined).flatten().tolist() == [0, 1, 2]


def test_bounded_solve_works_on_the_unknowns_the_lost_directions_touch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: the bound pins the lost direction (x0 = x2 = 0 may not go negative).
    a, x = _dependent_columns(3)
    sizes: list[int] = []
    real = solve._bounded

    def spy(normal, *args):  # type: ignore[no-untyped-def]
        sizes.append(normal.shape[0])
        return real(normal, *args)

    monkeypatch.setattr(solve, "_bounded", spy)
    # Execute
    solution = solve_spd(a.T @ a, a.T @ (a @ x), rank_rtol=1e-6, floor=0.0)
    # Assert: the truth, found by a bounded solve of the three touched unknowns only.
    assert solution.bounded and solution.rank == 40
    torch.testing.assert_close(solution.x, x, rtol=1e-8, atol=1e-9)
    assert sizes == [3]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_block_pivoting_agrees_with_lawson_hanson(seed: int) -> None:
    # Prepare: a well-posed bounded problem whose answer has many unknowns on the bound,
    # and a poor first guess (every unknown free).
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((120, 80))
    b = a @ np.maximum(rng.standard_normal(80), 0.0) + 0.5 * rng.standard_normal(120)
    oracle, _ = optimize.nnls(a, b)
    normal, rhs = torch.from_numpy(a.T @ a), torch.from_numpy(a.T @ b)
    # Execute
    z = solve._block_pivoting(normal, rhs, torch.ones(80, dtype=torch.bool))
    # Assert: the same minimiser (the problem is strictly convex), some of it on the bound.
    assert z is not None
    torch.testing.assert_close(z, torch.from_numpy(oracle), rtol=1e-8, atol=1e-10)
    assert 10 < int((z == 0).sum()) < 70


def test_block_pivoting_gives_up_where_the_bound_leaves_a_direction_open() -> None:
    # Prepare: a lost direction (1, 1, -1) on unknowns that all stay above the bound.
    a, x = _dependent_columns(4)
    x[0] = x[2] = 0.5
    normal = a.T @ a
    # Execute
    z = solve._block_pivoting(normal, normal @ x, torch.ones(40, dtype=torch.bool))
    # Assert: no answer (the caller falls back), rather than one picked by rounding.
    assert z is None


def _same_answer_without(
    monkeypatch: pytest.MonkeyPatch, step: str, a: torch.Tensor, x: torch.Tensor
) -> None:
    """Solve ``a z = a x`` (bounded at 0) with ``solve.<step>`` working, then refusing."""
    normal, rhs = a.T @ a, a.T @ (a @ x)
    found: list[bool] = []
    real = getattr(solve, step)

    def spy(*args):  # type: ignore[no-untyped-def]
        out = real(*args)
        found.append(out is not None)
        return out

    monkeypatch.setattr(solve, step, spy)
    quick = solve_spd(normal, rhs, rank_rtol=1e-6, floor=0.0)
    assert found == [True]  # the step was taken and gave the answer
    monkeypatch.setattr(solve, step, lambda *args: None)
    slow = solve_spd(normal, rhs, rank_rtol=1e-6, floor=0.0)
    # Both paths find the truth.
    assert quick.bounded and slow.bounded
    torch.testing.assert_close(quick.x, x, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(slow.x, quick.x, rtol=1e-8, atol=1e-9)


def test_bounded_solve_falls_back_to_lawson_hanson_with_the_same_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The pinned problem, solved once normally and once with pivoting disabled.
    a, x = _dependent_columns(5)
    _same_answer_without(monkeypatch, "_block_pivoting", a, x)


def test_lost_directions_by_iteration_match_the_eigen_decomposition() -> None:
    # Prepare: 400 unknowns, 7 eigenvalues at noise level, the next ones well above.
    rng = np.random.default_rng(8)
    basis, _ = np.linalg.qr(rng.standard_normal((400, 400)))
    spectrum = np.concatenate([rng.uniform(0, 1e-12, 7), rng.uniform(1e-6, 1.0, 393)])
    normal = torch.from_numpy((basis * spectrum) @ basis.T)
    cutoff = 1e-10
    # Execute
    found = solve._lost_by_iteration(normal, cutoff, 7 + 16)
    # Assert: the same seven directions (as a subspace) and eigenvalues.
    assert found is not None
    vectors, values = found.vectors, found.values
    truth = torch.from_numpy(basis[:, :7])
    assert vectors.shape == (400, 7)
    torch.testing.assert_close(vectors @ (vectors.T @ truth), truth, rtol=0, atol=1e-8)
    torch.testing.assert_close(
        values.sort().values, torch.from_numpy(np.sort(spectrum[:7])), rtol=0, atol=1e-13
    )


def test_lost_directions_fall_back_when_the_block_is_too_small() -> None:
    # Prepare: 30 lost directions, a block sized for 4 of them.
    rng = np.random.default_rng(9)
    basis, _ = np.linalg.qr(rng.standard_normal((300, 300)))
    spectrum = np.concatenate([np.full(30, 1e-14), rng.uniform(1e-4, 1.0, 270)])
    normal = torch.from_numpy((basis * spectrum) @ basis.T)
    # Execute / Assert: the iteration declines; the whole decomposition finds all 30.
    assert solve._lost_by_iteration(normal, 1e-10, 4 + 16) is None
    found = solve._lost_directions(normal, 1e-10, 4)
    assert found is not None and found.vectors.shape == (300, 30)


def _spectrum_matrix(
    seed: int, small: np.ndarray, large: np.ndarray
) -> tuple[torch.Tensor, np.ndarray]:
    """A PSD matrix with the given eigenvalues and random eigenvectors (columns returned)."""
    n = small.size + large.size
    basis, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    values = np.concatenate([small, large])
    return torch.from_numpy((basis * values) @ basis.T), basis


def test_pivoted_lost_directions_are_complete_behind_a_clear_gap() -> None:
    # Prepare: 9 eigenvalues at noise level, the others far above the cutoff.
    rng = np.random.default_rng(11)
    normal, basis = _spectrum_matrix(11, rng.uniform(0, 1e-14, 9), rng.uniform(1e-4, 1.0, 291))
    cutoff = 1e-10
    # Execute
    revealed = solve._pivoted(normal, torch.zeros(300, dtype=torch.float64), cutoff)
    # Assert: 9 lost directions, certified complete, and Rayleigh-Ritz on them gives the
    # eigen-decomposition's lost pairs (as a subspace, and their eigenvalues).
    assert revealed is not None
    _, rank, lost, _, complete = revealed
    assert rank == 291 and complete()
    pairs = solve._ritz_pairs(normal, lost, cutoff)
    assert pairs is not None
    truth = torch.from_numpy(basis[:, :9])
    torch.testing.assert_close(pairs.vectors @ (pairs.vectors.T @ truth), truth, rtol=0, atol=1e-8)
    assert bool((pairs.values <= cutoff).all())


def test_pivoted_lost_directions_are_not_called_complete_without_a_gap() -> None:
    # Prepare: 9 eigenvalues at noise level, and 5 just above the cutoff (no clear gap).
    rng = np.random.default_rng(12)
    small = rng.uniform(0, 1e-14, 9)
    large = np.concatenate([np.full(5, 1.5e-10), rng.uniform(1e-4, 1.0, 286)])
    normal, _ = _spectrum_matrix(12, small, large)
    # Execute
    revealed = solve._pivoted(normal, torch.zeros(300, dtype=torch.float64), 1e-10)
    # Assert: the bound cannot rule out more lost directions: the caller must search.
    assert revealed is not None
    assert not revealed[4]()


def test_bounded_solve_gives_the_same_answer_with_or_without_the_known_directions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One lost direction touching 81 unknowns (column 0 is a positive mix of columns
    # 1-80), pinned by x0 = x1 = 0; solved once normally (Rayleigh-Ritz on the pivoted
    # factorisation's directions) and once with those refused (subspace iteration).
    rng = np.random.default_rng(6)
    a = rng.standard_normal((300, 200))
    a[:, 0] = a[:, 1:81] @ rng.uniform(0.1, 1.0, 80)
    x = rng.uniform(0.1, 1.0, 200)
    x[0] = x[1] = 0.0
    _same_answer_without(monkeypatch, "_ritz_pairs", torch.from_numpy(a), torch.from_numpy(x))


def _block_diagonal(
    sizes: list[int], seed: int, singular: int | None = None
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Diagonal blocks ``A_b^T A_b`` on interleaved unknowns (as pixel phases are), and the
    whole matrix; block ``singular`` loses a direction."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    order = torch.randperm(n, generator=gen)
    whole = torch.zeros(n, n, dtype=torch.float64)
    blocks, start = [], 0
    for b, size in enumerate(sizes):
        a = torch.randn(size + 3, size, dtype=torch.float64, generator=gen)
        if b == singular:
            a[:, -1] = a[:, 0]  # two equal columns
        idx = order[start : start + size].sort().values
        block = a.T @ a
        blocks.append((idx, block))
        whole[idx.unsqueeze(1), idx.unsqueeze(0)] = block
        start += size
    return blocks, whole


@pytest.mark.parametrize("seed", [0, 1])
def test_block_by_block_solve_equals_the_whole_solve(seed: int) -> None:
    # Prepare: four blocks, two right-hand sides.
    blocks, whole = _block_diagonal([16, 16, 12, 20], seed)
    rhs = torch.randn(whole.shape[0], 2, dtype=torch.float64)
    # Execute
    by_blocks = solve.solve_spd_blocks(blocks, rhs, rank_rtol=1e-6)
    at_once = solve_spd(whole, rhs, rank_rtol=1e-6)
    # Assert: the same answer and rank; the condition estimate of the same size.
    assert by_blocks is not None
    torch.testing.assert_close(by_blocks.x, at_once.x, rtol=1e-9, atol=1e-12)
    assert by_blocks.rank == at_once.rank == whole.shape[0]
    assert 0.5 < by_blocks.condition / at_once.condition < 2.0


def test_block_by_block_solve_leaves_a_rank_deficient_matrix_to_the_whole_solve() -> None:
    # Prepare: the third block is singular.
    blocks, whole = _block_diagonal([16, 16, 12, 20], 2, singular=2)
    rhs = torch.randn(whole.shape[0], dtype=torch.float64)
    # Execute / Assert: no answer block by block; the whole solve finds the lost direction.
    assert solve.solve_spd_blocks(blocks, rhs, rank_rtol=1e-6) is None
    assert solve_spd(whole, rhs, rank_rtol=1e-6).rank == whole.shape[0] - 1


def test_block_by_block_solve_judges_each_pivot_against_the_whole_matrix() -> None:
    # Prepare: every block well conditioned on its own, one of them 1e7 times smaller than
    # another: at rank_rtol 1e-3 the whole matrix is not.
    blocks, _ = _block_diagonal([8, 8], 3)
    blocks = [(blocks[0][0], blocks[0][1] * 1e-7), blocks[1]]
    rhs = torch.randn(16, dtype=torch.float64)
    # Execute / Assert
    assert solve.solve_spd_blocks(blocks, rhs, rank_rtol=1e-3) is None
    assert solve.solve_spd_blocks(blocks, rhs, rank_rtol=1e-5) is not None
