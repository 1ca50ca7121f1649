"""Least squares in float64: normal equations with a rank estimate, and a deflated solve.

``solve_spd`` factorises a client's whole normal matrix. ``factor_square`` and
``solve_deflated`` serve the common case of a square weight system shared by every client
(a conv layer whose output is known everywhere): its sparse LU and the few directions it
barely determines are computed once per weights; each client then needs one sparse solve
plus a small least-squares problem on those directions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import optimize, sparse
from scipy.linalg import blas, lapack
from scipy.sparse.linalg import SuperLU, splu

__all__ = [
    "ColumnMap",
    "OrderedLU",
    "SpdSolution",
    "SquareFactor",
    "cholesky",
    "cholesky_solve",
    "deflation_columns",
    "factor_square",
    "normal_matrix",
    "solve_deflated",
    "solve_spd",
    "solve_spd_blocks",
    "sparse_lu",
    "submatrix",
    "transposed_product",
    "well_posed_cholesky",
]

# Squared weight of the lost directions on an unknown above which it counts as undetermined.
_LEVERAGE_TOL = 1e-10
# Largest system the bounded solve takes on (Lawson-Hanson is cubic in the worst case).
_MAX_BOUNDED = 2048
# A bounded unknown this close to the bound (relative to the largest) counts as on it.
_ON_BOUND_RTOL = 1e-12
# Block principal pivoting: sweeps before the bounded solve falls back to Lawson-Hanson, and
# the sign tolerance of its optimality test (relative to the largest value or gradient).
_MAX_PIVOTING_SWEEPS = 60
_PIVOTING_RTOL = 1e-12
# A free set's matrix whose reciprocal condition is within 1000x of rounding is singular.
_SINGULAR_RTOL = (1e3 * float(np.finfo(np.float64).eps)) ** 0.5
# Lost directions by subspace iteration: extra block columns, sweeps, columns left over
# beyond the lost ones, and the residual a Ritz pair may have (relative to the cutoff, or
# to rounding when that is larger).
_LOST_OVERSAMPLING = 16
_LOST_SWEEPS = 3
_LOST_MARGIN = 4
_RITZ_RTOL = 1e-3
_RITZ_ROUNDING = 100  # in units of eps * the largest diagonal entry
# The pivoted factorisation's lost directions are all there are when the other eigenvalues
# provably exceed the cutoff by this factor (a margin for rounding in the bound).
_GAP_FACTOR = 4.0
# A free row's direction whose part outside the deflation basis is smaller than this
# fraction of it is already reachable through the basis.
_OUTSIDE_RTOL = 1e-6


@dataclass(frozen=True, slots=True)
class SpdSolution:
    """Solution of ``N x = r`` for a symmetric positive semi-definite ``N = A^T A``.

    Attributes
    ----------
    x : torch.Tensor
        Least-squares solution (minimum norm on the lost directions).
    rank : int
        Numerical rank of ``A`` at the requested tolerance.
    condition : float
        Estimated ``sigma_max / sigma_min`` of ``A`` (LAPACK's 1-norm estimate; inf when
        rank-deficient).
    undetermined : torch.Tensor or None
        When rank-deficient, the unknowns that the lost directions touch (the others are
        still exact); None when every unknown is determined.
    bounded : bool
        True when a lower bound on the unknowns settled the lost directions (``rank``
        then counts the active bounds too).
    """

    x: torch.Tensor
    rank: int
    condition: float
    undetermined: torch.Tensor | None = None
    bounded: bool = False


def transposed_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a.T @ b``, computed as ``(b.T @ a).T``.

    For a tall ``a`` and a thin ``b`` the transposed-left product takes a slow path
    (measured 0.58 against 0.09 ms for a (300, 1024) ``a`` and a (300, 3) ``b``).
    """
    return (b.T @ a).T


def submatrix(a: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``a[rows][:, cols]``, by one ``index_select`` per axis.

    Twice as fast as the double indexing (767 x 767 to 560 x 560: 0.61 against 1.10 ms).
    """
    return a.index_select(0, rows).index_select(1, cols)


def normal_matrix(a: torch.Tensor) -> torch.Tensor:
    """``A^T A`` (float64) by one symmetric rank-k update: half the flops of ``a.T @ a``."""
    lower = torch.from_numpy(blas.dsyrk(1.0, np.asfortranarray(a.numpy().T), lower=1))
    return lower + torch.tril(lower, -1).T


def cholesky(matrix: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Lower Cholesky factor of a symmetric float64 matrix, and LAPACK's ``info``.

    LAPACK's ``dpotrf`` through SciPy's OpenBLAS: on one thread of these machines it runs
    2-3x faster than torch's (0.21 against 0.60 ms at n = 256, 7.7 against 18 ms at
    n = 1024). It reads the lower triangle, as ``torch.linalg.cholesky`` does. ``info > 0``:
    the leading minor of that order is not positive definite (the factor is then partial).
    """
    # A row-major array read column-major is the transpose: the upper factor of the
    # matrix's transpose, read back row-major, is the lower factor of the matrix.
    upper, info = lapack.dpotrf(matrix.numpy().T, lower=0, clean=1)
    return torch.from_numpy(upper.T), int(info)


def cholesky_solve(rhs: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``(L L^T)^-1 rhs`` for a lower factor ``L`` from :func:`cholesky`; rhs (n,) or (n, k)."""
    x, _ = lapack.dpotrs(factor.numpy().T, rhs.reshape(rhs.shape[0], -1).numpy(), lower=0)
    return torch.from_numpy(np.ascontiguousarray(x)).reshape(rhs.shape)


def _reciprocal_condition(factor: torch.Tensor, anorm: float) -> float:
    """LAPACK's 1-norm estimate of ``1 / cond(normal)`` from its Cholesky factor (O(n^2))."""
    # Passed as the lower factor it is (measured: 4x faster than its transposed view as "U").
    rcond, info = lapack.dpocon(factor.numpy(), anorm, uplo="L")
    return float(rcond) if info == 0 else 0.0


def well_posed_cholesky(matrix: torch.Tensor, rank_rtol: float) -> torch.Tensor | None:
    """Lower Cholesky factor of ``A^T A`` when ``A`` is better conditioned than ``1 / rank_rtol``.

    None when the factorisation fails, a pivot is tiny against the largest diagonal entry
    (a lower bound of the largest eigenvalue), or LAPACK's condition estimate is too poor.
    """
    well_posed = _well_posed(matrix, rank_rtol, float(torch.linalg.matrix_norm(matrix, ord=1)))
    return None if well_posed is None else well_posed[0]


def _well_posed(
    matrix: torch.Tensor, rank_rtol: float, anorm: float
) -> tuple[torch.Tensor, float] | None:
    """:func:`well_posed_cholesky` given the 1-norm; also returns the reciprocal condition."""
    factor = _pivots_clear(matrix, rank_rtol, float(matrix.diagonal().max()))
    if factor is None:
        return None
    rcond = _reciprocal_condition(factor, anorm)
    return (factor, rcond) if rcond > rank_rtol**2 else None


def _pivots_clear(matrix: torch.Tensor, rank_rtol: float, top: float) -> torch.Tensor | None:
    """Lower Cholesky factor of ``matrix`` if it exists and every pivot squared is above
    ``rank_rtol**2 * top`` (``top``: the largest diagonal entry of the whole system)."""
    factor, info = cholesky(matrix)
    if info != 0 or not bool((factor.diagonal() ** 2 > (rank_rtol**2) * top).all()):
        return None
    return factor


def solve_spd_blocks(
    blocks: Sequence[tuple[torch.Tensor, torch.Tensor]], rhs: torch.Tensor, *, rank_rtol: float
) -> SpdSolution | None:
    """:func:`solve_spd` of a block-diagonal normal matrix, block by block, if well conditioned.

    Parameters
    ----------
    blocks : sequence of (torch.Tensor, torch.Tensor)
        ``(indices, block)``: the unknowns of each diagonal block and the block; together
        they hold every unknown once.
    rhs : torch.Tensor
        ``A^T b``, shape (n,) or (n, k).
    rank_rtol : float
        As for :func:`solve_spd`.

    Returns
    -------
    SpdSolution or None
        The Cholesky solve of every block when the whole matrix passes :func:`solve_spd`'s
        test (every pivot above ``rank_rtol**2`` of the largest diagonal entry, LAPACK's
        reciprocal condition estimate above ``rank_rtol**2``; for a block-diagonal matrix
        ``1 / (max_b ||N_b||_1 * max_b ||N_b^-1||_1)``); else None, and the caller takes
        :func:`solve_spd` on the whole matrix, which finds the rank.
    """
    if not blocks:
        return None
    top = max(float(block.diagonal().max()) for _, block in blocks)
    x = torch.empty_like(rhs)
    largest_norm = largest_inverse_norm = 0.0
    for indices, block in blocks:
        factor = _pivots_clear(block, rank_rtol, top)
        if factor is None:
            return None
        anorm = float(torch.linalg.matrix_norm(block, ord=1))
        rcond = _reciprocal_condition(factor, anorm)
        if rcond <= 0.0:
            return None
        largest_norm = max(largest_norm, anorm)
        largest_inverse_norm = max(largest_inverse_norm, 1.0 / (rcond * anorm))
        x[indices] = cholesky_solve(rhs[indices], factor)
    rcond = 1.0 / (largest_norm * largest_inverse_norm)
    if rcond <= rank_rtol**2:
        return None
    return SpdSolution(x=x, rank=rhs.shape[0], condition=rcond**-0.5)


def solve_spd(
    normal: torch.Tensor, rhs: torch.Tensor, *, rank_rtol: float, floor: float | None = None
) -> SpdSolution:
    """Solve the normal equations ``normal @ x = rhs`` and report the numerical rank.

    Parameters
    ----------
    normal : torch.Tensor
        ``A^T A`` of a row-normalised system, float64, shape (n, n).
    rhs : torch.Tensor
        ``A^T b``, shape (n,) or (n, k).
    rank_rtol : float
        Singular values of ``A`` below ``rank_rtol * sigma_max`` are treated as zero.
    floor : float, optional
        A known lower bound of every unknown (0 for a ReLU output). When ``A`` is
        rank-deficient, a bounded least-squares solve often pins the lost directions:
        the many outputs that sit exactly on the bound leave no freedom.

    Returns
    -------
    SpdSolution
        A Cholesky solve when ``A`` is well conditioned; otherwise a pivoted Cholesky
        factorisation that finds the lost directions (pivots below ``rank_rtol**2`` of the
        largest eigenvalue), drops them and reports how many there are.
    """
    n = normal.shape[0]
    if n == 0:
        return SpdSolution(x=rhs.clone(), rank=0, condition=1.0)
    # LAPACK's condition estimate needs the 1-norm; it is also the zero test.
    anorm = float(torch.linalg.matrix_norm(normal, ord=1))
    if anorm == 0.0:
        return SpdSolution(
            x=torch.zeros_like(rhs),
            rank=0,
            condition=float("inf"),
            undetermined=torch.ones(n, dtype=torch.bool),
        )
    # A failed, tiny-pivot or poorly conditioned factorisation sends the system to the
    # pivoted factorisation, which then decides the rank (4x cheaper than eigh at n = 768).
    well_posed = _well_posed(normal, rank_rtol, anorm)
    if well_posed is not None:
        factor, rcond = well_posed
        x = cholesky_solve(rhs, factor)
        return SpdSolution(x=x, rank=n, condition=rcond**-0.5)
    # Rank-deficient or nearly so: keep only the directions the data determine.
    cutoff = (rank_rtol**2) * _largest_eigenvalue(normal)
    revealed = _pivoted(normal, rhs, cutoff)
    if revealed is None:  # LAPACK gave up: the eigen-decomposition decides
        evals, evecs = torch.linalg.eigh(normal)
        cutoff = (rank_rtol**2) * float(evals[-1])
        keep = evals > cutoff
        kept = evecs[:, keep]
        coef = (kept.T @ rhs.reshape(n, -1)) / evals[keep].unsqueeze(1)
        x, rank = (kept @ coef).reshape(rhs.shape), int(keep.sum())
        lost = evecs[:, ~keep]
        condition = float((evals[-1] / evals[0]) ** 0.5) if rank == n else float("inf")
        complete = _yes  # every eigenvalue up to the cutoff is among them
    else:
        x, rank, lost, condition, complete = revealed
    if rank == n:
        return SpdSolution(x=x, rank=rank, condition=condition)
    # An unknown is still exact if the lost directions leave it (almost) untouched.
    touched = lost.square().sum(dim=1) > _LEVERAGE_TOL
    if floor is not None and rank > 0:

        def known_lost() -> torch.Tensor | None:
            return lost if complete() else None

        bounded = _bounded_where_lost(normal, rhs, x, touched, cutoff, floor, n - rank, known_lost)
        if bounded is not None:
            return bounded
    return SpdSolution(x=x, rank=rank, condition=float("inf"), undetermined=touched)


def _largest_eigenvalue(normal: torch.Tensor, steps: int = 30) -> float:
    """Power iteration for ``lambda_max`` of a PSD matrix (a few matrix-vector products)."""
    v = torch.ones(normal.shape[0], dtype=normal.dtype)
    top = 0.0
    for _ in range(steps):
        w = normal @ v
        top = float(w.norm())
        if top == 0.0:
            return float(normal.diagonal().max())
        v = w / top
    # A lower bound that converges from below; the largest diagonal entry is one too.
    return max(top, float(normal.diagonal().max()))


def _pivoted(
    normal: torch.Tensor, rhs: torch.Tensor, cutoff: float
) -> tuple[torch.Tensor, int, torch.Tensor, float, Callable[[], bool]] | None:
    """Minimum-norm solution, rank and lost directions by a pivoted Cholesky factorisation.

    LAPACK's ``dpstrf`` stops when every remaining pivot is at most ``cutoff``:
    ``P^T N P = R^T R + S`` with ``R = [R11 R12]`` of ``rank`` rows and ``S`` the small
    positive semi-definite remainder. The lost directions are ``P [-R11^-1 R12; I]``; the
    answer is the basic solution with its part along them removed, as the
    eigen-decomposition would give it, at a fraction of the cost.

    Returns
    -------
    (x, rank, lost, condition, complete) or None
        ``lost`` has orthonormal columns (n, n - rank); ``complete()`` is True when no
        other direction can have its eigenvalue below the cutoff: ``N >= P R^T R P^T``,
        whose ``rank`` non-zero eigenvalues are at least ``sigma_min(R11)^2 >=
        1 / ||R11^-1||_F^2``, above the cutoff (an inverse of R11: computed only if asked).
        None if LAPACK reports an error.
    """
    n = normal.shape[0]
    # The lower factor, of the matrix as the column-major array LAPACK works on (the
    # transposed view of a symmetric matrix): twice as fast as the upper factor of the
    # row-major array (17 against 36 ms at n = 1024).
    lower, piv, rank, info = lapack.dpstrf(normal.numpy().T, tol=cutoff, lower=1)
    if info < 0 or rank == 0:
        return None
    order = torch.from_numpy(piv.astype(np.int64) - 1)
    # R = L^T. The triangular solves read only their own triangle of L11 (the other holds
    # what dpstrf left there), so no copy of the triangle is made.
    factor = torch.from_numpy(lower)
    l11, r11 = factor[:rank, :rank], factor[:rank, :rank].T
    columns = rhs.reshape(n, -1)[order][:rank]
    basic = torch.linalg.solve_triangular(
        r11, torch.linalg.solve_triangular(l11, columns, upper=False), upper=True
    )
    x = torch.zeros(n, columns.shape[1], dtype=normal.dtype)
    x[order[:rank]] = basic
    if rank == n:
        rcond, info = lapack.dtrcon(lower, norm="1", uplo="L")
        condition = 1.0 / float(rcond) if info == 0 and rcond > 0 else float("inf")
        return x.reshape(rhs.shape), n, torch.zeros(n, 0, dtype=normal.dtype), condition, _yes
    null = torch.zeros(n, n - rank, dtype=normal.dtype)
    null[order[:rank]] = -torch.linalg.solve_triangular(r11, factor[rank:, :rank].T, upper=True)
    null[order[rank:]] = torch.eye(n - rank, dtype=normal.dtype)
    lost, _ = torch.linalg.qr(null)
    x = x - lost @ (lost.T @ x)

    def complete() -> bool:
        # The inverse's diagonal is 1 / diag(R11): its part of ||R11^-1||_F^2 alone may
        # already fail the test below, and then the inverse need not be made.
        if 1.0 / float(np.reciprocal(np.square(np.diag(lower)[:rank])).sum()) <= (
            _GAP_FACTOR * cutoff
        ):
            return False
        inverse, info = lapack.dtrtri(lower[:rank, :rank], lower=1)  # reads the lower triangle
        # 1 / ||R11^-1||_F^2 is a lower bound of sigma_min(R11)^2.
        return info == 0 and 1.0 / float(np.square(np.tril(inverse)).sum()) > _GAP_FACTOR * cutoff

    return x.reshape(rhs.shape), rank, lost, float("inf"), complete


def _yes() -> bool:
    return True


def _bounded_where_lost(
    normal: torch.Tensor,
    rhs: torch.Tensor,
    x: torch.Tensor,
    touched: torch.Tensor,
    cutoff: float,
    floor: float,
    expected: int,
    known_lost: Callable[[], torch.Tensor | None] | None = None,
) -> SpdSolution | None:
    """The bounded solve restricted to the unknowns the lost directions touch.

    The other unknowns are determined by the data (``x`` holds them); moving only the
    touched ones, the problem is ``N_TT x_T = r_T - N_TR x_R``, whose null space is that of
    ``N`` (its lost directions live on T). A handful of lost directions usually touch a few
    dozen unknowns (e.g. a dead filter's inputs), so this is far smaller than the whole.
    Eigenvalues up to ``cutoff`` count as lost; about ``expected`` of them are, or exactly
    those spanned by what ``known_lost()`` returns, if not None (the caller has shown there
    are no others; asked only where it would be used).
    """
    n = normal.shape[0]
    idx = torch.nonzero(touched).flatten()
    t = idx.numel()
    if t > _MAX_BOUNDED:
        return None
    columns, values = rhs.reshape(n, -1), x.reshape(n, -1)
    rest = torch.nonzero(~touched).flatten()
    sub_rhs = columns[idx] - submatrix(normal, idx, rest) @ values[rest]
    sub_normal = submatrix(normal, idx, idx)

    def known() -> torch.Tensor | None:
        vectors = known_lost() if known_lost is not None else None
        return None if vectors is None else vectors[idx]

    spectrum = _lost_directions(sub_normal, cutoff, expected, known)
    if spectrum is None:
        return None
    bounded = _bounded(sub_normal, spectrum, cutoff, sub_rhs, floor, values[idx] > floor)
    if bounded is None:
        return None
    out = values.clone()
    out[idx] = bounded.x.reshape(t, -1)
    return SpdSolution(x=out.reshape(rhs.shape), rank=n, condition=float("inf"), bounded=True)


@dataclass(frozen=True, slots=True)
class _Spectrum:
    """The lost eigenpairs of a normal matrix, and its whole decomposition if it was made."""

    vectors: torch.Tensor  # (n, k)
    values: torch.Tensor  # (k,)
    whole: tuple[torch.Tensor, torch.Tensor] | None = None  # (evals, evecs), ascending


def _lost_directions(
    normal: torch.Tensor,
    cutoff: float,
    expected: int,
    known: Callable[[], torch.Tensor | None] | None = None,
) -> _Spectrum | None:
    """Eigenpairs of ``normal`` with eigenvalue up to ``cutoff``.

    With few lost directions among many unknowns, they come from Rayleigh-Ritz on
    ``known()`` (directions spanning them all, when the caller has them), else from subspace
    iteration on ``(N + cutoff I)^-1``, which needs one Cholesky factorisation (n = 767:
    7 and 30 ms against 65 ms for the whole eigen-decomposition). The whole decomposition
    is used when they are not a small share (it is then needed anyway if the bounded
    solve falls back to Lawson-Hanson) or neither converges. None when no direction or
    every direction is lost (the bound has nothing to pin, or nothing to pin it with).
    """
    n = normal.shape[0]
    width = expected + _LOST_OVERSAMPLING
    found = None
    if 4 * width <= n:
        vectors = known() if known is not None else None
        if vectors is not None:
            found = _ritz_pairs(normal, vectors, cutoff)
        if found is None:
            found = _lost_by_iteration(normal, cutoff, width)
    if found is None:
        found = _eigen_spectrum(normal, cutoff)
    k = found.values.numel()
    return None if k in (0, n) else found


def _eigen_spectrum(normal: torch.Tensor, cutoff: float) -> _Spectrum:
    """:func:`_lost_directions` by the whole eigen-decomposition, which it keeps."""
    evals, evecs = torch.linalg.eigh(normal)
    lost = evals <= cutoff
    return _Spectrum(evecs[:, lost], evals[lost], (evals, evecs))


def _lost_by_iteration(normal: torch.Tensor, cutoff: float, width: int) -> _Spectrum | None:
    """:func:`_lost_directions` by shifted subspace iteration; None unless it converged.

    Converged means every Ritz pair below ``cutoff`` has a residual ``||N v - theta v||``
    below ``_RITZ_RTOL * cutoff``, the first pair above it is above it by more than its
    residual, and the block has room to spare.
    """
    n = normal.shape[0]
    shifted = normal.clone()
    shifted.diagonal().add_(cutoff)
    factor, info = cholesky(shifted)
    if info != 0:
        return None
    generator = torch.Generator().manual_seed(0)
    block = torch.randn(n, width, generator=generator, dtype=normal.dtype)
    for _ in range(_LOST_SWEEPS):
        block, _ = torch.linalg.qr(cholesky_solve(block, factor))
    small = block.T @ normal @ block
    theta, rotation = torch.linalg.eigh(0.5 * (small + small.T))
    k = int((theta <= cutoff).sum())
    if k >= width - _LOST_MARGIN:
        return None  # the block may hold fewer lost directions than there are
    ritz = block @ rotation[:, : k + 1]
    residual = (normal @ ritz - ritz * theta[: k + 1]).norm(dim=0)
    # Within ||r|| of each Ritz value lies an eigenvalue: the first kept one is clear of
    # the cutoff, and each lost one leaves at most a sliver of its direction's curvature
    # (or rounding, when the cutoff itself is below it).
    tolerance = _ritz_tolerance(normal, cutoff)
    if float(theta[k] - residual[k]) <= cutoff or bool((residual[:k] > tolerance).any()):
        return None
    return _Spectrum(ritz[:, :k], theta[:k])


def _ritz_pairs(normal: torch.Tensor, vectors: torch.Tensor, cutoff: float) -> _Spectrum | None:
    """The eigenpairs of ``normal`` in the span of ``vectors``, all up to ``cutoff``; or None.

    Rayleigh-Ritz on the given span (the lost directions a pivoted factorisation found,
    restricted to the touched unknowns): accepted when every Ritz value is at most the
    cutoff and every residual as small as :func:`_lost_by_iteration` demands. Used only
    when there are known to be no other such eigenpairs, it replaces that iteration's
    factorisation and sweeps (n = 767: 7 against 30 ms).
    """
    if vectors.shape[1] == 0 or vectors.shape[1] >= normal.shape[0]:
        return None
    basis, _ = torch.linalg.qr(vectors)
    product = normal @ basis
    small = basis.T @ product
    theta, rotation = torch.linalg.eigh(0.5 * (small + small.T))
    if float(theta[-1]) > cutoff:
        return None
    ritz = basis @ rotation
    residual = (product @ rotation - ritz * theta).norm(dim=0)
    if bool((residual > _ritz_tolerance(normal, cutoff)).any()):
        return None
    return _Spectrum(ritz, theta)


def _ritz_tolerance(normal: torch.Tensor, cutoff: float) -> float:
    """The residual a lost Ritz pair may have: a sliver of the cutoff, or rounding if larger."""
    rounding = _RITZ_ROUNDING * float(np.finfo(np.float64).eps) * float(normal.diagonal().max())
    return max(_RITZ_RTOL * cutoff, rounding)


def _bounded(
    normal: torch.Tensor,
    spectrum: _Spectrum,
    cutoff: float,
    rhs: torch.Tensor,
    floor: float,
    start: torch.Tensor,
) -> SpdSolution | None:
    """Least squares with ``x >= floor`` on the data-determined subspace.

    ``normal`` loses its part on the lost eigenvectors in ``spectrum`` (eigenvalues up to
    ``cutoff``): those directions cost nothing and only the bound can fix them. Solved
    by block principal pivoting from ``start`` (the unknowns first assumed above the bound);
    where that fails, by Lawson-Hanson on the equivalent ``diag(sqrt(lambda)) V^T`` of the
    kept eigenpairs. The solution is returned only if it is unique: no lost direction can
    move it while keeping every unknown that sits on the bound at or above it (a small
    linear program); else None.
    """
    n = normal.shape[0]
    columns = rhs.reshape(n, -1)
    lost = spectrum.vectors
    # Minus the few lost directions' part: a rank-k update, not a product over all n.
    kept_normal = normal - (lost * spectrum.values) @ lost.T
    kept_normal = 0.5 * (kept_normal + kept_normal.T)
    shift = kept_normal.sum(dim=1) * floor  # x = floor + z, z >= 0
    start = start.reshape(n, -1)
    whole = spectrum if spectrum.whole is not None else None  # made once, if ever needed
    out = torch.empty_like(columns)
    for k in range(columns.shape[1]):
        projected = columns[:, k] - lost @ (lost.T @ columns[:, k]) - shift
        pivoted = _block_pivoting(kept_normal, projected, start[:, k])
        if pivoted is not None:
            z, pinned_by = pivoted.numpy(), lost
        else:
            whole = whole or _eigen_spectrum(normal, cutoff)
            z, pinned_by = _lawson_hanson(whole, projected), whole.vectors
        if z is None:
            return None
        # A value within rounding of the bound sits on it (Lawson-Hanson may leave ~1e-15
        # in the passive set): it cannot move down either.
        on_bound = z <= _ON_BOUND_RTOL * max(1.0, float(np.abs(z).max()))
        if not _pinned(pinned_by.numpy(), on_bound):
            return None
        out[:, k] = torch.from_numpy(z + floor)
    return SpdSolution(x=out.reshape(rhs.shape), rank=n, condition=float("inf"), bounded=True)


def _block_pivoting(
    normal: torch.Tensor, rhs: torch.Tensor, start: torch.Tensor
) -> torch.Tensor | None:
    """``min 1/2 z^T N z - r^T z`` subject to ``z >= 0`` by block principal pivoting.

    Kim & Park's method (SIAM J. Sci. Comput. 33(6), 2011): guess which unknowns are free,
    solve for them with the rest at 0, and swap every unknown that breaks the optimality
    conditions (a free one below 0, a bound one whose gradient points below the bound);
    swapping only the last offender when the count stops falling. From a good guess (the
    unconstrained answer's sign) it needs a handful of Cholesky solves, where Lawson-Hanson
    adds one unknown per step (n = 768: 60 ms against 190 ms).

    Returns
    -------
    torch.Tensor or None
        ``z`` satisfying the optimality conditions to ``_PIVOTING_RTOL``; None when a free
        set's matrix is singular to rounding (a lost direction lies among the free
        unknowns: the bound does not fix it) or the sweeps run out.
    """
    n = normal.shape[0]
    free = start.clone()
    chances, best = 3, n + 1
    scale = float(rhs.abs().max())
    for _ in range(_MAX_PIVOTING_SWEEPS):
        z = torch.zeros(n, dtype=normal.dtype)
        idx = torch.nonzero(free).flatten()
        if idx.numel():
            chol = well_posed_cholesky(submatrix(normal, idx, idx), _SINGULAR_RTOL)
            if chol is None:
                return None
            z[idx] = cholesky_solve(rhs[idx], chol)
        gradient = normal @ z - rhs
        gradient[idx] = 0.0
        wrong = (free & (z < -_PIVOTING_RTOL * max(1.0, float(z.abs().max())))) | (
            ~free & (gradient < -_PIVOTING_RTOL * scale)
        )
        count = int(wrong.sum())
        if count == 0:
            return z.clamp_min(0.0)
        if count < best:
            best, chances = count, 3
            free ^= wrong
        elif chances > 0:
            chances -= 1
            free ^= wrong
        else:  # one at a time: guaranteed to terminate
            last = int(torch.nonzero(wrong).flatten()[-1])
            free[last] = ~free[last]
    return None


def _lawson_hanson(whole: _Spectrum, projected: torch.Tensor) -> np.ndarray | None:
    """The same bounded problem by Lawson-Hanson on ``diag(sqrt(lambda)) V^T``; None if stuck.

    ``whole`` carries the eigen-decomposition; its eigenpairs not counted lost are kept.
    """
    assert whole.whole is not None
    evals, evecs = whole.whole
    keep = torch.ones_like(evals, dtype=torch.bool)
    keep[: whole.values.numel()] = False  # ascending: the lost ones come first
    root = evals[keep].sqrt()
    kept = evecs[:, keep]
    a_red = (root.unsqueeze(1) * kept.T).numpy()
    b_red = ((kept.T @ projected) / root).numpy()
    try:
        z, _ = optimize.nnls(a_red, b_red, maxiter=3 * kept.shape[0])
    except RuntimeError:  # no convergence within the iteration cap
        return None
    return z


def _pinned(lost: np.ndarray, on_bound: np.ndarray) -> bool:
    """True if no combination of the lost directions keeps the on-bound unknowns >= 0."""
    if not on_bound.any():
        return False
    cone = lost[on_bound]  # each row: how a lost direction moves one on-bound unknown
    res = optimize.linprog(
        -cone.sum(axis=0),
        A_ub=-cone,
        b_ub=np.zeros(cone.shape[0]),
        bounds=[(-1.0, 1.0)] * lost.shape[1],
        method="highs",
    )
    return bool(res.status == 0 and -res.fun <= 1e-9 * max(1.0, float(np.abs(cone).max())))


@dataclass(frozen=True, slots=True)
class OrderedLU:
    """A sparse LU of ``K``'s columns taken in a given order; it solves systems in ``K``.

    Attributes
    ----------
    lu : scipy.sparse.linalg.SuperLU
        Sparse LU of ``K[:, order]``.
    order : numpy.ndarray
        The column order it was given.
    """

    lu: SuperLU
    order: np.ndarray

    @property
    def eliminated(self) -> np.ndarray:
        """``K``'s columns in the order the factorisation eliminated them.

        Given as ``order`` to a factorisation of a matrix with the same sparsity pattern,
        it spares the fill-reducing ordering, which depends on the pattern alone, and the
        factors come out the same.
        """
        # SuperLU factorises K[:, order] @ Pc, i.e. the columns order[argsort(perm_c)].
        return self.order[np.argsort(self.lu.perm_c)]

    def solve(self, rhs: np.ndarray, trans: str = "N") -> np.ndarray:
        """``K^-1 rhs``, or ``K^-T rhs`` with ``trans="T"``; rhs (n,) or (n, k)."""
        if trans == "N":
            permuted = self.lu.solve(rhs)
            out = np.empty_like(permuted)
            out[self.order] = permuted
            return out
        return self.lu.solve(rhs[self.order], trans=trans)


def sparse_lu(kmat: sparse.spmatrix, order: np.ndarray | None = None) -> OrderedLU:
    """Sparse LU of a square ``K``, optionally with its columns in a known good order.

    Parameters
    ----------
    kmat : scipy.sparse matrix
        ``K``, square.
    order : numpy.ndarray, optional
        :attr:`OrderedLU.eliminated` of an earlier factorisation of the same sparsity
        pattern; without it, a fill-reducing order is computed here.

    Raises
    ------
    RuntimeError
        If ``K`` is exactly singular.
    """
    csc = sparse.csc_matrix(kmat, dtype=np.float64)
    if order is None:
        # Minimum degree on K^T K: for conv matrices its factors fill less than COLAMD's
        # (rconv-main's first layer: 1.13M against 1.37M entries), and every client's
        # solve reads them all (0.53 against 0.74 ms per column).
        return OrderedLU(splu(csc, permc_spec="MMD_ATA"), np.arange(csc.shape[1]))
    # The ordering is 16 of the 42 ms of rconv-main's first layer.
    return OrderedLU(splu(csc[:, order], permc_spec="NATURAL"), order)


@dataclass(frozen=True, slots=True)
class SquareFactor:
    """A square sparse system factorised once, with the directions it barely determines.

    Attributes
    ----------
    lu : OrderedLU
        Sparse LU of ``K``.
    basis : torch.Tensor
        Orthonormal columns (n, k) spanning ``K``'s weakest directions (approximately its
        right singular vectors of smallest singular value), float64.
    k_basis : torch.Tensor
        ``K @ basis``, (n, k).
    k_gram : torch.Tensor
        ``(K basis)^T (K basis)``, (k, k).
    """

    lu: OrderedLU
    basis: torch.Tensor
    k_basis: torch.Tensor
    k_gram: torch.Tensor


# ``(compute, rows, columns) -> matrix``: assembles a matrix from its column blocks
# (fl_attack.engine.workers.shared_columns shares them among a round's workers).
ColumnMap = Callable[[Callable[[slice], np.ndarray], int, int], np.ndarray]


def _all_columns(compute: Callable[[slice], np.ndarray], rows: int, columns: int) -> np.ndarray:
    """A :data:`ColumnMap` that computes every column here, in one call."""
    del rows
    return compute(slice(0, columns))


def factor_square(
    kmat: sparse.spmatrix,
    width: int,
    *,
    seed: int = 0,
    columns: ColumnMap = _all_columns,
    order: np.ndarray | None = None,
) -> SquareFactor | None:
    """Sparse LU of a square ``K`` and a ``width``-column basis of its weakest directions.

    The basis is a randomised range finder of ``K^-1`` with one power step
    (``(K^T K)^-1 K^-1 Omega``): ``K^-1`` stretches direction ``i`` by ``1/sigma_i``, so the
    range is dominated by the directions that noise in ``K z = o`` blows up.

    Parameters
    ----------
    kmat : scipy.sparse matrix
        ``K``, square.
    width : int
        Columns of the basis.
    seed : int, optional
        Seed of the random test matrix ``Omega``.
    columns : callable, optional
        Assembles the range finder's columns (three sparse solves each, most of the
        cost) from blocks, e.g. shared among processes that all need this factorisation;
        by default all at once, here.
    order : numpy.ndarray, optional
        The column order of an earlier factorisation of the same sparsity pattern
        (:attr:`OrderedLU.eliminated`); by default one is computed.

    Returns
    -------
    SquareFactor or None
        None when ``K`` is singular to working precision (no LU).
    """
    n = kmat.shape[0]
    if kmat.shape != (n, n) or n == 0:
        return None
    try:
        lu = sparse_lu(kmat, order)
    except RuntimeError:  # exactly singular
        return None
    width = max(1, min(width, n))
    omega = np.random.default_rng(seed).standard_normal((n, width))

    def power_step(block: slice) -> np.ndarray:
        return lu.solve(lu.solve(lu.solve(omega[:, block]), trans="T"))

    y = columns(power_step, n, width)
    if not np.isfinite(y).all():
        return None
    # torch's QR: 4.9 against numpy's 10 ms at 3072 x 96.
    basis = torch.linalg.qr(torch.from_numpy(y)).Q.contiguous()
    k_basis = torch.from_numpy(np.asarray(kmat @ basis.numpy()))
    return SquareFactor(lu=lu, basis=basis, k_basis=k_basis, k_gram=k_basis.T @ k_basis)


def deflation_columns(target: torch.Tensor, free_rows: torch.Tensor) -> np.ndarray:
    """The columns :func:`solve_deflated` solves ``K`` for: ``[target, e_row...]``, (n, 1 + m).

    ``K^-1 target`` is the weight system's own answer; ``K^-1 e_row`` per free row moves
    that row only.
    """
    n, m = target.shape[0], free_rows.numel()
    columns = np.zeros((n, 1 + m))
    columns[:, 0] = target.numpy()
    columns[free_rows.numpy(), np.arange(1, m + 1)] = 1.0
    return columns


def solve_deflated(
    factor: SquareFactor,
    target: torch.Tensor,
    apply_other: Callable[[torch.Tensor], torch.Tensor],
    other_rhs: torch.Tensor,
    *,
    k_scale: float,
    rank_rtol: float,
    free_rows: torch.Tensor | None = None,
    other_on_basis: torch.Tensor | None = None,
    solved: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Least squares of ``[K / k_scale; A] z = [target / k_scale; other_rhs]`` near ``K^-1 target``.

    The weight system is solved exactly, ``z0 = K^-1 target``; its error lies mostly along
    ``K``'s weakest directions, which the other equations (``A``, the client's gradient
    constraints) then settle: ``z = z0 + [basis, D] @ alpha`` with ``alpha`` the
    least-squares solution of the stacked system on that subspace. Rows of ``K`` whose
    right-hand side is unknown (``free_rows``) are dropped from the weight equations; their
    value is one more unknown each, reached through ``D = K^-1 e_row``. Exact when the
    subspace holds every direction the weight system leaves open; the caller checks the
    residual.

    Parameters
    ----------
    factor : SquareFactor
        From :func:`factor_square` for ``K``.
    target : torch.Tensor
        Right-hand side of ``K z = target``, shape (n,); entries of free rows are guesses.
    apply_other : callable
        ``X (n, m) -> A @ X (rows, m)``.
    other_rhs : torch.Tensor
        Right-hand side of the other equations, shape (rows,).
    k_scale : float
        The weight rows' normalisation (their weight against the other rows).
    rank_rtol : float
        The small system must be better conditioned than ``1 / rank_rtol``.
    free_rows : torch.Tensor, optional
        Indices of rows of ``K`` whose right-hand side is unknown.
    other_on_basis : torch.Tensor, optional
        ``apply_other(factor.basis)``, when the caller has a faster way to it.
    solved : torch.Tensor, optional
        ``K^-1`` of :func:`deflation_columns`, when the caller has solved it already (for
        several clients in one pass over the LU, say).

    Returns
    -------
    torch.Tensor or None
        ``z`` (n,) float64; None when the small system is rank-deficient at ``rank_rtol``
        (the subspace does not determine the answer: use a full solve).
    """
    free = free_rows if free_rows is not None else torch.zeros(0, dtype=torch.long)
    m = free.numel()
    if solved is None:
        solved = torch.from_numpy(factor.lu.solve(deflation_columns(target, free)))
    if not bool(torch.isfinite(solved).all()):
        return None
    z0, reach = solved[:, 0], solved[:, 1:]
    basis = factor.basis
    # Gram of the weight rows on the basis, without the dropped (free) rows.
    k_free = factor.k_basis[free] / k_scale
    gram = factor.k_gram / (k_scale * k_scale) - k_free.T @ k_free
    if m:
        # K^-1 e_row lies mostly along the weakest directions already in the basis: keep only
        # the part outside it (else the small system is near-singular for no real reason).
        # On the kept rows K^-1 e_row maps to 0, so its outside part maps to -K basis coef.
        coef = transposed_product(basis, reach)
        whole = reach.norm(dim=0)
        reach = reach - basis @ coef
        norms = reach.norm(dim=0)
        # A direction (almost) inside the basis adds nothing the basis cannot reach.
        outside = norms > _OUTSIDE_RTOL * whole
        reach, coef, norms = reach[:, outside] / norms[outside], coef[:, outside], norms[outside]
        coef = coef / norms
        cross = -(gram @ coef)
        gram = torch.cat(
            [torch.cat([gram, cross], dim=1), torch.cat([cross.T, -(coef.T @ cross)], dim=1)]
        )
        basis = torch.cat([basis, reach], dim=1)
    on_basis = apply_other(factor.basis) if other_on_basis is None else other_on_basis
    av = torch.cat([on_basis, apply_other(reach)], dim=1) if m else on_basis
    resid = other_rhs - apply_other(z0.unsqueeze(1)).squeeze(1)
    chol = well_posed_cholesky(gram + normal_matrix(av), rank_rtol)
    if chol is None:
        return None
    alpha = cholesky_solve(transposed_product(av, resid.unsqueeze(1)), chol).squeeze(1)
    return z0 + basis @ alpha
