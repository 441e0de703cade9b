"""MINRES for symmetric, possibly indefinite systems."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..._tolerance import default_tol
from ...status import Status
from ._base import (
    KrylovSolver,
    _div,
    _mark,
    _norm,
    _look_every,
    _real_inner,
)


@dataclass(frozen=True)
class MINRES(KrylovSolver):
    r"""Minimum-residual method for symmetric (possibly indefinite) systems ``A x = b``.

    Lanczos builds an orthonormal basis of
    :math:`\mathcal K_k(A, r_0)` with a tridiagonal :math:`T_k`; MINRES takes

    .. math:: x_k = \arg\min_{x \in x_0 + \mathcal K_k(A, r_0)} \|b - A x\|,

    updated by short recurrences and Givens rotations (constant memory).  The
    operator must be symmetric; it may be indefinite.  Complex dtypes: :math:`A`
    Hermitian, with a real :math:`T_k` (:math:`\alpha_k = v_k^H A v_k`).  A
    residual that is already a least-squares residual to the tolerance,
    :math:`\|A r_k\| \le \max(\mathrm{tol}, \sqrt{\mathrm{eps}})\, \|T_k\|_F \|r_k\|`, where the next
    step could not halve it (a singular operator and an inconsistent right-hand
    side, not a small eigenvalue; past that point the recurrences lose all
    accuracy), or a vanishing rotated pivot
    :math:`\gamma_k \le \mathrm{eps}\, \|T_k\|_F` is reported as
    :attr:`~bilevel.status.Status.BREAKDOWN` and the element stops at its last
    iterate: a least-squares solution, though not in general the minimum-norm
    one (:class:`NormalCG` or ``Direct("lstsq")`` give :math:`A^+ b`).

    Element ``i`` has converged when its residual estimate
    :math:`\bar\phi_k = \|b_i - A_i x_i\|` satisfies :math:`\bar\phi_k \le
    \max(\mathrm{tol}\,\|b_i\|, \mathrm{atol})` (``tol=None``: ``sqrt(eps)`` of the
    dtype); the true residual is re-checked at the end.

    Args:
        maxiter: iteration (matrix-vector product) budget per element; ``None``
            means ``10 n`` capped at 1000.  Default 100.
        tol: relative tolerance on the residual; ``None`` (default) scales with
            the dtype.
        atol: absolute tolerance on the residual norm, default 0.

    Example:
        >>> import torch
        >>> from bilevel.implicit.linear_solve import MINRES
        >>> A = torch.tensor([[1.0, 2.0], [2.0, -1.0]], dtype=torch.float64)
        >>> x, info = MINRES()(lambda v: A @ v, torch.ones(2, dtype=torch.float64))
        >>> torch.allclose(A @ x, torch.ones(2, dtype=torch.float64)), bool(info.converged)
        (True, True)

    References:
        Paige, C. C. and Saunders, M. A. `Solution of sparse indefinite systems of
        linear equations <https://doi.org/10.1137/0712047>`_. SIAM J. Numer.
        Anal., 1975.
    """

    def _iterate(self, matvec, b, x0, threshold, maxiter, flatten):
        tol = self.tol if self.tol is not None else default_tol(b.dtype)
        # below sqrt(eps) the ratio ||A r|| / (||A|| ||r||) is rounding noise
        return _minres(matvec, b, x0, threshold, maxiter, max(tol, math.sqrt(torch.finfo(b.dtype).eps)))

    def _gradient_rule(self):
        return "self", self  # the operator is symmetric


def _minres(matvec, b, x0, threshold, maxiter, tol):
    nbatch, _ = b.shape
    eps = torch.finfo(b.dtype).eps
    dot = _real_inner(b.dtype)  # v^T A v, or the real v^H A v of a Hermitian A: T_k stays real
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r1 = b.clone() if x0 is None else b - matvec(x)
    y, r2 = r1, r1
    beta = phibar = _norm(r1)
    zeros = torch.zeros_like(beta)
    old_beta, dbar, epsln, sn, t_norm2 = zeros, zeros, zeros, zeros, zeros
    cs = -torch.ones_like(beta)
    w, w2 = torch.zeros_like(b), torch.zeros_like(b)
    status = torch.zeros(nbatch, dtype=torch.int64, device=b.device)
    iterations = torch.zeros_like(status)
    status = _mark(status, ~torch.isfinite(beta), Status.NONFINITE)
    active = torch.isfinite(beta) & (beta > threshold)
    sync = _look_every(b)
    for k in range(maxiter):
        if sync and k % sync == 0 and not bool(active.any()):
            break
        v = _div(y, beta.unsqueeze(-1), active.unsqueeze(-1))  # Lanczos step
        y = matvec(v)
        iterations = iterations + active
        if k > 0:
            y = y - _div(beta, old_beta, active).unsqueeze(-1) * r1
        alfa = dot(v, y)
        y = y - _div(alfa, beta, active).unsqueeze(-1) * r2
        r1, r2 = r2, y
        old_beta, beta = beta, _norm(y)
        # ||T_k||_F^2; the first old_beta is ||r_0||, not an entry of T (it would
        # tie the least-squares test below to the scale of b)
        t_norm2 = t_norm2 + alfa**2 + (old_beta**2 if k > 0 else 0) + beta**2
        old_eps = epsln  # QR of T_k by Givens rotations
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = torch.hypot(gbar, beta)
        nonfinite = active & ~torch.isfinite(gamma)
        # ||A r|| / (||T|| ||r||) of the last iterate: a least-squares residual
        # (singular A, inconsistent b) cannot be reduced any further.
        t_norm = t_norm2.sqrt()
        # Told apart from a small eigenvalue (cond > 1/tol, still solvable) by the step
        # it would take: there it removes the residual (sn ~ 0), here it cannot (sn ~ 1).
        least_squares = (torch.hypot(gbar, dbar) <= tol * t_norm) & (2 * beta >= gamma)
        singular = active & ~nonfinite & (least_squares | ~(gamma > eps * t_norm))
        status = _mark(_mark(status, nonfinite, Status.NONFINITE), singular, Status.BREAKDOWN)
        active = active & ~nonfinite & ~singular
        cs, sn = _div(gbar, gamma, active), _div(beta, gamma, active)
        phi, phibar = cs * phibar, sn * phibar
        w1, w2 = w2, w
        direction = v - old_eps.unsqueeze(-1) * w1 - delta.unsqueeze(-1) * w2
        w = _div(direction, gamma.unsqueeze(-1), active.unsqueeze(-1))
        x = torch.where(active.unsqueeze(-1), x + phi.unsqueeze(-1) * w, x)
        active = active & (phibar.abs() > threshold)
    status = _mark(status, active, Status.MAX_ITERATIONS)
    return x, iterations, status


# --------------------------------------------------------------------------- NormalCG


__all__ = ['MINRES']
