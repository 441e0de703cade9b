"""Conjugate gradient (CG) for symmetric positive-definite systems."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ...status import Status
from ...typing import Matvec
from ._base import (
    LinearSolver,
    _check_fields,
    _positive_int_or_none,
    _sync_every,
    _tol_ok,
    resolve_maxiter,
)


@dataclass(frozen=True)
class CG(LinearSolver):
    r"""Conjugate gradient for symmetric positive-definite systems ``A x = b``.

    Solves :math:`A x = b` for symmetric positive-definite :math:`A`, given only
    products :math:`v \mapsto A v`.  After :math:`k` steps the error is minimal in
    the :math:`A`-norm over the Krylov space
    :math:`\mathcal K_k = \mathrm{span}\{r_0, A r_0, \dots, A^{k-1} r_0\}`; in exact
    arithmetic the solve is exact after ``n`` steps.

    The operator must be symmetric positive definite.  Non-positive curvature
    ``p^T A p <= sqrt(n) * eps * max curvature seen`` is reported as
    :attr:`~bilevel.status.Status.BREAKDOWN` for that element (indefinite or
    singular operator) and the element stops at its last iterate.

    Args:
        maxiter: iteration (matrix-vector product) budget per element; ``None``
            means ``10 n`` capped at 1000.  Default 100.
        tol: relative tolerance on the residual; ``None`` (default) scales with
            the dtype (``sqrt(eps)``: 1.5e-8 in float64, 3.5e-4 in float32).
        atol: absolute tolerance on the residual norm, default 0.
        M: optional preconditioner, a matvec ``r -> M r`` approximating
            :math:`A^{-1}` (symmetric positive definite), on trees like ``b``.

    Example:
        >>> import torch, bilevel
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> x, info = bilevel.implicit.CG()(lambda v: A @ v, torch.ones(2, dtype=torch.float64))
        >>> torch.allclose(A @ x, torch.ones(2, dtype=torch.float64)), bool(info.converged)
        (True, True)

    References:
        Hestenes, M. R. and Stiefel, E. `Methods of conjugate gradients for solving
        linear systems <https://doi.org/10.6028/jres.049.044>`_. J. Res. NBS, 1952.
    """

    maxiter: Optional[int] = 100
    tol: Optional[float] = None
    atol: float = 0.0
    M: Optional[Matvec] = None

    def __post_init__(self):
        _check_fields(
            self,
            maxiter=(_positive_int_or_none, "a positive int or None"),
            tol=(_tol_ok, "a float in (0, 1) or None"),
            atol=(lambda v: isinstance(v, (int, float)) and v >= 0, "a non-negative float"),
            M=(lambda v: v is None or callable(v), "None or a callable preconditioner r -> M r"),
        )

    def _solve(self, matvec, b, x0, flatten):
        precondition = flatten(self.M) if self.M is not None else None
        maxiter = resolve_maxiter(self.maxiter, b.shape[-1])
        return _cg(matvec, b, x0, self._threshold(b), maxiter, precondition)


def _cg(matvec, b, x0, threshold, maxiter, precondition):
    nbatch, n = b.shape
    if x0 is None:
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        x = x0.clone()
        r = b - matvec(x)
    z = precondition(r) if precondition else r
    p = z.clone()
    rz = (r * z).sum(-1)
    status = torch.zeros(nbatch, dtype=torch.int64, device=b.device)
    iterations = torch.zeros(nbatch, dtype=torch.int64, device=b.device)
    active = torch.linalg.vector_norm(r, dim=-1) > threshold
    eps = torch.finfo(b.dtype).eps
    max_curvature = torch.zeros(nbatch, dtype=b.dtype, device=b.device)
    sync = _sync_every(b)
    for k in range(maxiter):
        if k % sync == 0 and not bool(active.any()):
            break
        Ap = matvec(p)
        pAp = (p * Ap).sum(-1)
        curvature = pAp / (p * p).sum(-1).clamp_min(torch.finfo(b.dtype).tiny)
        max_curvature = torch.maximum(max_curvature, curvature)
        bad = active & ~(curvature > math.sqrt(n) * eps * max_curvature)
        status = torch.where(bad, torch.full_like(status, Status.BREAKDOWN), status)
        active = active & ~bad
        alpha = torch.where(active, rz / torch.where(active, pAp, 1), 0).unsqueeze(-1)
        x = x + alpha * p
        r = r - alpha * Ap
        iterations = iterations + active
        z = precondition(r) if precondition else r
        rz_new = (r * z).sum(-1)
        beta = torch.where(active, rz_new / torch.where(active, rz, 1), 0).unsqueeze(-1)
        p = z + beta * p
        rz = rz_new
        rnorm = torch.linalg.vector_norm(r, dim=-1)
        nonfinite = active & ~torch.isfinite(rnorm)
        status = torch.where(nonfinite, torch.full_like(status, Status.NONFINITE), status)
        active = active & (rnorm > threshold) & ~nonfinite
    status = torch.where(active, torch.full_like(status, Status.MAX_ITERATIONS), status)
    return x, iterations, status


# --------------------------------------------------------------------------- Neumann


__all__ = ['CG']
