"""Dense direct solves of a matrix materialized with vmap."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..._linalg import lu_factor_ex
from ..._checks import check_fields as _check_fields
from ..._tolerance import default_tol
from ...status import Status
from ._base import (
    LinearSolver,
    _mark,
    _scaled_norm,
)
from ._base import (
    materialize as _materialize,
)

_DIRECT_METHODS = ("cholesky", "lu", "lstsq")


@dataclass(frozen=True)
class Direct(LinearSolver):
    r"""Dense direct solve of ``A x = b`` after materialising ``A``.

    Builds the ``(B, n, n)`` matrix with one :func:`torch.func.vmap` of
    ``matvec`` over the identity basis (``n`` products, ``O(B n^2)`` memory),
    then factorises it (``(B, m, n)`` for a rectangular ``"lstsq"`` system, below):

    * ``"cholesky"``: :math:`A = L L^\top` for symmetric positive-definite
      :math:`A` (Hessians of strictly convex inner problems; :math:`L L^H` for
      a Hermitian positive-definite complex :math:`A`).  A failed
      factorisation (indefinite :math:`A`), a matrix that is not symmetric to
      ``sqrt(eps)`` relative, or a numerically singular one (pivots
      :math:`p_i = L_{ii}^2 / A_{ii}` with :math:`\min_i p_i \le n\,\mathrm{eps} \max_i p_i`:
      those of the unit-diagonal :math:`D^{-1/2} A D^{-1/2}`, so unknowns in very
      different units are no singularity) is reported as
      :attr:`~bilevel.status.Status.BREAKDOWN` for that element (``x = 0``),
      not raised;
    * ``"lu"``: :math:`P A = L U` with partial pivoting, for non-symmetric (and
      symmetric indefinite) non-singular systems, after equilibrating rows and
      columns by powers of two; a numerically singular
      :math:`U` (:math:`\min_i |U_{ii}| \le n\,\mathrm{eps} \max_i |U_{ii}|`) is a
      BREAKDOWN;
    * ``"lstsq"``: the minimum-norm least-squares solution :math:`A^+ b`
      (SVD-based: LAPACK ``gelsd`` on CPU, the pseudo-inverse elsewhere), for
      singular or inconsistent systems, and for rectangular ones: pass ``x0``
      shaped like the unknown (e.g. ``x0=torch.zeros(n)``, its values unused),
      and ``matvec`` maps a tree shaped like ``x0`` to one shaped like ``b``
      (``m`` equations, ``n`` unknowns, ``m < n`` or ``m > n``); the solution has
      ``x0``'s structure, shapes and dtypes.  Its derivatives are those of
      :math:`A^+ b`, including, with respect to the operator, the motion of
      :math:`A`'s null space where it has one: more unknowns than equations, or
      a rank (read off the SVD, with the solve's cut-off) below ``n``; inside
      :func:`torch.func.vmap`, where the rank cannot be read, always.  That term
      costs one more solve in the forward pass where the operator carries
      derivatives; a full-rank square or over-determined :math:`A` does without.
      ``"cholesky"`` and ``"lu"`` need a square system: an ``x0`` not shaped like
      ``b`` is refused.

    An element whose matrix holds NaN or inf is reported as
    :attr:`~bilevel.status.Status.NONFINITE` (``x = 0``) without disturbing the
    others.  There is no stopping tolerance, but a ``"cholesky"`` or ``"lu"``
    solution whose residual, in the equilibrated equations (``D^{-1/2}`` or
    ``D_r`` above), exceeds :math:`10 \sqrt{\mathrm{eps}}` times the
    right-hand side's (a pivot just above the singularity test, or a condition
    number near :math:`1/\sqrt{\mathrm{eps}}`) is reported as
    :attr:`~bilevel.status.Status.INACCURATE`.  ``x0`` is ignored (but for the
    shape of a rectangular system's unknown) and ``info.iterations`` is ``n``
    (the products spent building :math:`A`).  All three methods accept complex
    dtypes (``"cholesky"`` checks Hermitian-ness, :math:`A = A^H`).

    Args:
        method: ``"cholesky"`` (default), ``"lu"`` or ``"lstsq"``.

    Raises:
        RuntimeError: if ``matvec`` cannot be batched by :func:`torch.func.vmap`
            (e.g. it calls ``.item()`` or NumPy).

    Example:
        >>> import torch
        >>> from bilevel.implicit.linear_solve import Direct
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> x, info = Direct()(lambda v: A @ v, torch.ones(2, dtype=torch.float64))
        >>> torch.allclose(A @ x, torch.ones(2, dtype=torch.float64)), int(info.iterations)
        (True, 2)

    References:
        Golub, G. H. and Van Loan, C. F. `Matrix Computations, 4th edition
        <https://doi.org/10.56021/9781421407944>`_. Johns Hopkins University
        Press, 2013.
    """

    method: str = "cholesky"

    def __post_init__(self):
        _check_fields(
            self,
            method=(lambda v: v in _DIRECT_METHODS, f"one of {', '.join(map(repr, _DIRECT_METHODS))}"),
        )

    def _accepts_rectangular(self) -> bool:
        return self.method == "lstsq"

    def _solve(self, matvec, b, x0, flatten):
        # a rectangular A ("lstsq"): x0 (B, n) gives the unknowns' size, A is (B, m, n)
        domain = x0 if x0 is not None and x0.shape[-1] != b.shape[-1] else b
        x, iterations, status, deficient = self._factor_solve(_materialize(matvec, domain), b)
        if deficient is None:
            return x, iterations, status
        # "lstsq" tells the derivative whether A has a null space (rank < n), read off its SVD
        return x, iterations, status, None, deficient

    def _gradient_rule(self):
        return {"cholesky": "self", "lu": "transpose", "lstsq": "normal"}[self.method], self

    def _solve_matrix(self, A: torch.Tensor, b: torch.Tensor):
        """``(x, iterations, status)`` for the materialized ``(B, m, n)`` matrices ``A``
        (square, ``m = n``, but for ``"lstsq"``) and right-hand sides ``b`` ``(B, m)``."""
        return self._factor_solve(A, b)[:3]

    def _factor_solve(self, A: torch.Tensor, b: torch.Tensor):
        """:meth:`_solve_matrix`'s ``(x, iterations, status)``, and for ``"lstsq"`` which
        matrices are rank-deficient (rank below ``n``, as the solve truncated them;
        ``None`` for the other methods)."""
        eps = torch.finfo(b.dtype).eps
        deficient = None
        # A non-finite matrix or right-hand side (reaching here under vmap) is that
        # element's failure, not the batch's (LAPACK aborts the whole call on NaN):
        # solve with the identity and 0 in its place.
        finite = torch.isfinite(A).flatten(-2).all(-1) & torch.isfinite(b).all(-1)
        A = torch.where(finite[:, None, None], A, torch.eye(*A.shape[-2:], dtype=A.dtype, device=A.device))
        rhs = torch.where(finite.unsqueeze(-1), b, 0).unsqueeze(-1)
        if self.method == "cholesky":
            L, info = torch.linalg.cholesky_ex(A)
            # Hermitian: A^H is A^T for a real matrix
            symmetric = torch.linalg.matrix_norm(A - A.mH) <= math.sqrt(eps) * torch.linalg.matrix_norm(A)
            # pivots of the unit-diagonal D^-1/2 A D^-1/2 (D = diag A), whose factor is D^-1/2 L:
            # a well-posed system whose unknowns have very different units is not "singular"
            diagonal = A.diagonal(dim1=-2, dim2=-1).real
            pivots = L.diagonal(dim1=-2, dim2=-1).real ** 2 / torch.where(diagonal > 0, diagonal, 1)
            ok = (info == 0) & symmetric & (diagonal > 0).all(-1) & _regular_pivots(pivots, eps)
            x = torch.cholesky_solve(rhs, L).squeeze(-1)
            accurate = _small_residual(A, x, rhs, torch.where(diagonal > 0, diagonal, 1).sqrt().unsqueeze(-1))
        elif self.method == "lu":
            # equilibrated D_r A D_c (powers of two: exact), so that rows or unknowns in very
            # different units are no "singularity" for the pivot test; x = D_c y
            rows = _power_of_two(A.abs().amax(-1, keepdim=True))
            cols = _power_of_two((A / rows).abs().amax(-2, keepdim=True))
            LU, pivots, info = lu_factor_ex(A / rows / cols)
            ok = (info == 0) & _regular_pivots(LU.diagonal(dim1=-2, dim2=-1), eps)
            x = torch.linalg.lu_solve(LU, pivots, rhs / rows).squeeze(-1) / cols.squeeze(-2)
            accurate = _small_residual(A, x, rhs, rows)
        else:
            ok = accurate = finite
            if b.device.type == "cpu":
                solution = torch.linalg.lstsq(A, rhs, driver="gelsd")
                x, rank = solution.solution.squeeze(-1), solution.rank
            else:  # only the full-rank driver "gels" exists off CPU
                x, rank = _pinv_solve(A, rhs)
            deficient = (rank < A.shape[-1]) & finite
        ok = ok & finite
        x = torch.where(ok.unsqueeze(-1), x, 0)
        status = _mark(torch.zeros_like(ok, dtype=torch.int64), ~accurate, Status.INACCURATE)
        status = _mark(status, ~ok, Status.BREAKDOWN)
        status = _mark(status, ~finite, Status.NONFINITE)
        return x, torch.full_like(status, A.shape[-1]), status, deficient


def _pinv_solve(A: torch.Tensor, rhs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pinv(A) rhs, rank of A)`` for ``(B, m, n)`` ``A`` and ``(B, m, 1)`` ``rhs`` by one
    SVD, with :func:`torch.linalg.pinv`'s cut-off: singular values up to
    ``max(m, n) eps`` times the largest count as zero."""
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    cutoff = max(A.shape[-2:]) * torch.finfo(S.dtype).eps * S[..., :1]
    kept = S > cutoff
    inverse = torch.where(kept, 1 / torch.where(kept, S, 1), 0).to(A.dtype)
    x = Vh.mH @ (inverse.unsqueeze(-1) * (U.mH @ rhs))
    return x.squeeze(-1), kept.sum(-1)


def _power_of_two(size: torch.Tensor) -> torch.Tensor:
    """Powers of two near the positive finite entries of ``size`` (real), 1 elsewhere."""
    scale = torch.exp2(torch.floor(torch.log2(size.real if size.is_complex() else size)))
    return torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))


def _small_residual(A: torch.Tensor, x: torch.Tensor, rhs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Whether the residual of each solution, its rows divided by ``rows`` (the
    equilibration: the test is then blind to the units of the equations), is within
    ``10 sqrt(eps)`` of the scaled right-hand side."""
    residual = _scaled_norm(((rhs - A @ x.unsqueeze(-1)) / rows).squeeze(-1))
    return residual <= 10 * default_tol(x.dtype) * _scaled_norm((rhs / rows).squeeze(-1))


def _regular_pivots(pivots: torch.Tensor, eps: float) -> torch.Tensor:
    """Whether the pivots of a factorisation are not numerically singular:
    ``min |pivot| > n eps max |pivot|`` (a lower bound on the condition number)."""
    size = pivots.abs()
    return size.amin(-1) > pivots.shape[-1] * eps * size.amax(-1)


__all__ = ['Direct']
