"""The default linear solver: dense for small systems, Krylov otherwise."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..._checks import check_fields as _check_fields
from ..._checks import positive_int_or_none as _positive_int_or_none
from ..._checks import tol_ok as _tol_ok
from ..._tolerance import default_tol
from ..._tree import is_transformed
from ...status import Status
from ._base import LinearSolver, materialize, resolve_maxiter
from .cg import CG
from .direct import Direct
from .gmres import GMRES


@dataclass(frozen=True)
class Auto(LinearSolver):
    r"""The solver used when none is named: exact and cheap for small systems,
    matrix-free for large ones, and dense again where a Krylov solve turns out slow.

    * :math:`n \le` ``max_direct`` unknowns and a vmappable operator: the matrix
      is materialized with one vmapped product and factorized, Cholesky when
      ``symmetric`` (when it breaks down, on a singular or indefinite matrix, CG
      takes over: it solves a consistent singular system and reports an
      indefinite one as BREAKDOWN) and LU otherwise (when it breaks down, the
      minimum-norm least-squares solution, a success where the singular system
      is consistent) — exact, and cheaper than tens of Krylov iterations
      whose cost is dominated by per-operation overhead at this size;
    * with ``max_dense > 0``, one system of :math:`n \le` ``max_dense`` unknowns: :class:`CG` if
      ``symmetric``, else :class:`GMRES`, for at most :math:`n/16` products;
      a system not solved by then (out of budget, or a stagnating GMRES) is materialized (vmapped products, 128
      basis vectors at a time) and factorized as above.  A vmapped product
      costs a fraction of a single one (one matrix-matrix product instead of
      many matrix-vector products: :math:`n/18` to :math:`n/4` single products
      for the whole matrix, measured on ridge and logistic Hessians), so a
      slow Krylov solve is cut short at a bounded price, while a fast one never
      pays for the matrix (ski rental: at worst about 5 times the cost of the
      better choice, at best many times cheaper than a long Krylov run).  The
      Krylov solve goes on from its iterate when the matrix cannot be built or
      factorized;
      ``info.iterations`` counts every product spent, the :math:`n` of the
      matrix included, so it can exceed ``maxiter``;
    * otherwise (larger systems, batches of systems, inside ``torch.func``
      transforms, or an operator that cannot be vmapped): :class:`CG` if
      ``symmetric``, else :class:`GMRES`, with a budget of ``maxiter`` products
      (``None``: ``min(10 n, 1000)``) and relative tolerance ``tol``.

    Complex dtypes are supported, ``symmetric`` then meaning Hermitian.

    Args:
        symmetric: whether the operator is symmetric (positive definite expected).
        max_direct: largest system solved densely at once, default 128.
        max_dense: largest single system materialized after a slow start of the
            Krylov solve; default 0 (off: the matrix's vmapped products can need
            many times the memory of one product when its intermediates are
            large), e.g. 1024 for regression-sized problems.
        tol: tolerance of the Krylov solve; ``None`` scales with the dtype.
        maxiter: budget of the Krylov solve; ``None``: ``min(10 n, 1000)``.

    Example:
        >>> import torch
        >>> from bilevel.implicit.linear_solve import Auto
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> x, info = Auto(symmetric=True)(lambda v: A @ v, torch.ones(2, dtype=torch.float64))
        >>> torch.allclose(A @ x, torch.ones(2, dtype=torch.float64)), int(info.iterations)
        (True, 2)
    """

    symmetric: bool = False
    max_direct: int = 128
    tol: Optional[float] = None
    maxiter: Optional[int] = None
    max_dense: int = 0

    def __post_init__(self):
        _check_fields(
            self,
            symmetric=(lambda v: isinstance(v, bool), "a bool"),
            max_direct=(lambda v: isinstance(v, int) and v >= 0, "a non-negative int"),
            max_dense=(lambda v: isinstance(v, int) and v >= 0, "a non-negative int"),
            tol=(_tol_ok, "a float in (0, 1) or None"),
            maxiter=(_positive_int_or_none, "a positive int or None"),
        )

    def _krylov(self, maxiter: Optional[int] = None) -> LinearSolver:
        maxiter = self.maxiter if maxiter is None else maxiter
        return CG(maxiter=maxiter, tol=self.tol) if self.symmetric else GMRES(maxiter=maxiter, tol=self.tol)

    def _gradient_rule(self):
        return ("self" if self.symmetric else "transpose"), self

    def _solve(self, matvec, b, x0, flatten):
        n = b.shape[-1]
        if n <= self.max_direct:
            dense, negative = self._dense(matvec, b)
            return dense if dense is not None else _flagged(self._krylov()._solve(matvec, b, x0, flatten), negative)
        if n > self.max_dense or b.shape[0] > 1 or is_transformed(b):
            return self._krylov()._solve(matvec, b, x0, flatten)
        budget = resolve_maxiter(self.maxiter, n)
        probe = min(budget, max(n // 16, 1))
        x, iterations, status, *estimate = self._krylov(probe)._solve(matvec, b, x0, flatten)
        code = int(status[0])
        # Out of budget, or a stagnating restarted GMRES (BREAKDOWN): the matrix
        # settles it.  Solved, non-finite or indefinite for CG: nothing to gain.
        slow = code == Status.MAX_ITERATIONS or (code == Status.BREAKDOWN and not self.symmetric)
        if not slow or probe == budget:
            return (x, iterations, status, *estimate)
        dense, negative = self._dense(matvec, b)
        if dense is not None:
            x, dense_products, status = dense
            return x, iterations + dense_products, status
        x, more, status, *estimate = self._krylov(budget - probe)._solve(matvec, b, x, flatten)
        return _flagged((x, iterations + more, status, *estimate), negative)

    def _dense(self, matvec, b):
        r"""``((x, products, status), None)`` by a factorization of the materialized matrix,
        or ``(None, negative)`` where the Krylov solve should take over: no vmappable
        operator (``negative`` is ``None``), or a symmetric matrix whose Cholesky
        factorization broke down, singular or indefinite; ``negative`` then says, per
        element, whether it has an eigenvalue below :math:`-\sqrt{\mathrm{eps}}` times
        its largest in magnitude (``info.negative_curvature``)."""
        try:
            A = materialize(matvec, b, chunk_size=_CHUNK)
            x, iterations, status = Direct("cholesky" if self.symmetric else "lu")._solve_matrix(A, b)
        except RuntimeError:  # the operator cannot be vmapped (or densely solved): stay matrix-free
            return None, None
        broke = not is_transformed(status) and bool((status == Status.BREAKDOWN).any())
        if not broke:
            return (x, iterations, status), None
        if not self.symmetric:
            return _least_squares(A, b, self.tol), None
        # Singular or indefinite: CG still solves a consistent singular system (e.g. an
        # unregularized bias) and reports an indefinite one where its iterates meet the
        # negative curvature; the spectrum tells the two apart in every direction.
        return None, _indefinite(A)


_CHUNK = 128
"""Basis vectors per vmapped product when a matrix is materialized: memory of at
most 128 products' intermediates at once, as for the largest direct system."""


def _indefinite(A: torch.Tensor) -> Optional[torch.Tensor]:
    """Per matrix of the ``(B, n, n)`` symmetric (Hermitian) ``A``: whether its smallest
    eigenvalue lies below ``-sqrt(eps)`` times its largest in magnitude (rounding cannot
    make a semidefinite matrix look that indefinite); ``None`` where the eigenvalues
    cannot be computed (a non-finite matrix)."""
    try:
        eigenvalues = torch.linalg.eigvalsh(A)  # ascending
    except RuntimeError:
        return None
    size = eigenvalues.abs().amax(-1)
    return eigenvalues[..., 0] < -math.sqrt(torch.finfo(eigenvalues.dtype).eps) * size


def _flagged(result: tuple, negative: Optional[torch.Tensor]) -> tuple:
    """A Krylov ``_solve`` result with the negative-curvature flags in the place
    :class:`~bilevel.implicit.linear_solve.LinearSolver` reads them from (after a
    residual estimate and a rank flag, ``None`` where absent)."""
    if negative is None:
        return result
    x, iterations, status, *extras = result
    return (x, iterations, status, *(extras + [None, None])[:2], negative)


def _least_squares(A, b, tol):
    """The minimum-norm least-squares solution of the matrices ``A`` whose LU was
    singular: a success where the system is consistent (residual within ``tol``),
    BREAKDOWN where it is not (a non-finite matrix stays NONFINITE)."""
    x, iterations, status = Direct("lstsq")._solve_matrix(A, b)
    tol = default_tol(b.dtype) if tol is None else tol
    residual = torch.linalg.vector_norm(b - (A @ x.unsqueeze(-1)).squeeze(-1), dim=-1)
    consistent = residual <= tol * torch.linalg.vector_norm(b, dim=-1)
    return x, iterations, torch.where(consistent | (status != Status.SUCCESS), status, int(Status.BREAKDOWN))


__all__ = ["Auto"]
