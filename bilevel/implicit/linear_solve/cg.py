"""Conjugate gradient (CG) for symmetric positive-definite systems."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ...status import Status
from ...typing import Matvec
from ._base import (
    KrylovSolver,
    _mark,
    _check_fields,
    _sync_every,
)


@dataclass(frozen=True)
class CG(KrylovSolver):
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

    M: Optional[Matvec] = None

    def __post_init__(self):
        super().__post_init__()
        _check_fields(self, M=(lambda v: v is None or callable(v), "None or a callable preconditioner r -> M r"))

    def _iterate(self, matvec, b, x0, threshold, maxiter, flatten):
        precondition = flatten(self.M) if self.M is not None else None
        return _cg(matvec, b, x0, threshold, maxiter, precondition)


def _cg(matvec, b, x0, threshold, maxiter, precondition):
    """Batched CG on flat ``(B, n)`` tensors; about 20 small ops per iteration.

    Non-positive curvature is tested through ``1 / alpha = p^T A p / r^T z``, which
    CG keeps inside ``[lambda_min, lambda_max]`` for an SPD operator: a value at or
    below ``sqrt(n) eps`` times the largest seen (or NaN) is a breakdown.
    """
    nbatch, n = b.shape
    if x0 is None:
        x, r = torch.zeros_like(b), b.clone()
    else:
        x = x0.clone()
        r = b - matvec(x)
    z = precondition(r) if precondition else r
    p = z
    rz = torch.linalg.vecdot(r, z)
    rr = rz if precondition is None else torch.linalg.vecdot(r, r)
    threshold2 = threshold.square()
    active = rr > threshold2
    broke = torch.zeros_like(active)
    iterations = torch.zeros(nbatch, dtype=torch.int64, device=b.device)
    max_inv_alpha = torch.zeros_like(rz)
    factor = math.sqrt(n) * torch.finfo(b.dtype).eps
    sync = _sync_every(b)
    for k in range(maxiter):
        if k % sync == 0 and not bool(active.any()):
            break
        Ap = matvec(p)
        inv_alpha = torch.linalg.vecdot(p, Ap) / rz
        max_inv_alpha = torch.maximum(max_inv_alpha, inv_alpha)
        ok = inv_alpha > factor * max_inv_alpha  # False for NaN, <= 0 or negligible curvature
        broke = broke | (active > ok)
        active = active & ok
        alpha = torch.where(active, inv_alpha.reciprocal(), 0).unsqueeze(-1)
        x = torch.addcmul(x, alpha, p)
        r = torch.addcmul(r, alpha, Ap, value=-1)
        iterations += active
        z = precondition(r) if precondition else r
        rz_new = torch.linalg.vecdot(r, z)
        rr = rz_new if precondition is None else torch.linalg.vecdot(r, r)
        beta = torch.where(active, rz_new / rz, 0).unsqueeze(-1)
        p = torch.addcmul(z, beta, p)
        rz = rz_new
        active = active & ~(rr <= threshold2)  # a NaN residual stays active and breaks down next
    status = torch.zeros(nbatch, dtype=torch.int64, device=b.device)
    status = _mark(status, broke, Status.BREAKDOWN)
    return x, iterations, _mark(status, active, Status.MAX_ITERATIONS)


__all__ = ['CG']
