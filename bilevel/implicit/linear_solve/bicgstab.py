"""BiCGStab for non-symmetric systems."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...status import Status
from ._base import (
    KrylovSolver,
    _div,
    _inner,
    _mark,
    _norm,
    _look_every,
)


@dataclass(frozen=True)
class BiCGStab(KrylovSolver):
    r"""Stabilised bi-conjugate gradient for general non-singular systems ``A x = b``.

    Short-recurrence Krylov method for non-symmetric :math:`A` (constant memory,
    unlike :class:`GMRES`): each iteration takes a Bi-CG step along :math:`p`,

    .. math:: \rho = \langle \hat r_0, r\rangle,\quad
              p \leftarrow r + \tfrac{\rho}{\rho_{\rm old}}\tfrac{\alpha}{\omega}(p - \omega v),\quad
              v = A p,\quad \alpha = \rho / \langle \hat r_0, v\rangle,\quad s = r - \alpha v,

    then a one-dimensional residual minimisation
    :math:`\omega = \langle t, s\rangle / \langle t, t\rangle` with :math:`t = A s`,
    :math:`x \leftarrow x + \alpha p + \omega s`, :math:`r \leftarrow s - \omega t`.
    The shadow residual is :math:`\hat r_0 = r_0`.  Complex dtypes are supported
    (any non-singular complex :math:`A`; :math:`\langle u, v\rangle = u^H v`).

    Element ``i`` has converged when :math:`\|b_i - A_i x_i\| \le
    \max(\mathrm{tol}\,\|b_i\|, \mathrm{atol})` (``tol=None``: ``sqrt(eps)`` of the
    dtype), tested after each half step.  A vanishing :math:`\rho`,
    :math:`\langle \hat r_0, v\rangle` or :math:`\langle t, s\rangle` (relative to
    the norms involved, below ``eps``) is reported as
    :attr:`~bilevel.status.Status.BREAKDOWN` instead of producing NaN.  Since
    the residual of BiCGStab is not monotone, an element that fails returns
    the iterate with the smallest (recursive) residual it met.

    Args:
        maxiter: budget of matrix-vector products per element (an iteration uses
            two); ``None`` means ``10 n`` capped at 1000.  Default 100.
        tol: relative tolerance on the residual; ``None`` (default) scales with
            the dtype.
        atol: absolute tolerance on the residual norm, default 0.

    Example:
        >>> import torch
        >>> from bilevel.implicit.linear_solve import BiCGStab
        >>> A = torch.tensor([[2.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> x, info = BiCGStab()(lambda v: A @ v, torch.ones(2, dtype=torch.float64))
        >>> torch.allclose(A @ x, torch.ones(2, dtype=torch.float64)), bool(info.converged)
        (True, True)

    References:
        van der Vorst, H. A. `Bi-CGSTAB: A fast and smoothly converging variant of
        Bi-CG for the solution of nonsymmetric linear systems
        <https://doi.org/10.1137/0913035>`_. SIAM J. Sci. Stat. Comput., 1992.
    """

    def _iterate(self, matvec, b, x0, threshold, maxiter, flatten):
        return _bicgstab(matvec, b, x0, threshold, maxiter)


def _bicgstab(matvec, b, x0, threshold, maxiter):
    nbatch, _ = b.shape
    eps = torch.finfo(b.dtype).eps
    dot = _inner(b.dtype)  # <u, v> = u^H v (u^T v for real tensors)
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b.clone() if x0 is None else b - matvec(x)
    r_hat, r_hat_norm = r.clone(), _norm(r)
    p, v = torch.zeros_like(b), torch.zeros_like(b)
    rho = alpha = omega = torch.ones(nbatch, dtype=b.dtype, device=b.device)
    status = torch.zeros(nbatch, dtype=torch.int64, device=b.device)
    iterations = torch.zeros_like(status)
    status = _mark(status, ~torch.isfinite(r_hat_norm), Status.NONFINITE)
    active = torch.isfinite(r_hat_norm) & (r_hat_norm > threshold)
    best_x, best_norm = x, torch.where(torch.isfinite(r_hat_norm), r_hat_norm, math.inf)
    sync = _look_every(b)
    for k in range((maxiter + 1) // 2):
        if sync and k % sync == 0 and not bool(active.any()):
            break
        rho_new = dot(r_hat, r)
        bad = active & ~(rho_new.abs() > eps * r_hat_norm * _norm(r))
        status, active = _mark(status, bad, Status.BREAKDOWN), active & ~bad
        beta = _div(rho_new, rho, active) * _div(alpha, omega, active)
        p = torch.where(active.unsqueeze(-1), r + beta.unsqueeze(-1) * (p - omega.unsqueeze(-1) * v), 0)
        v = matvec(p)
        iterations = iterations + active
        rv = dot(r_hat, v)
        bad = active & ~(rv.abs() > eps * r_hat_norm * _norm(v))
        status, active = _mark(status, bad, Status.BREAKDOWN), active & ~bad
        alpha = _div(rho_new, rv, active)
        s = r - alpha.unsqueeze(-1) * v
        s_norm = _norm(s)
        nonfinite = active & ~torch.isfinite(s_norm)
        status, active = _mark(status, nonfinite, Status.NONFINITE), active & ~nonfinite
        x = torch.where(active.unsqueeze(-1), x + alpha.unsqueeze(-1) * p, x)
        r = torch.where(active.unsqueeze(-1), s, r)
        best_x, best_norm = _keep_best(best_x, best_norm, x, s_norm, active)
        active = active & (s_norm > threshold)
        if 2 * k + 1 >= maxiter:  # the budget leaves no product for the second half
            break
        t = matvec(torch.where(active.unsqueeze(-1), s, 0))
        iterations = iterations + active
        ts, t_norm = dot(t, s), _norm(t)
        bad = active & ~(ts.abs() > eps * t_norm * s_norm)
        status, active = _mark(status, bad, Status.BREAKDOWN), active & ~bad
        omega = _div(ts, t_norm**2, active)
        x = torch.where(active.unsqueeze(-1), x + omega.unsqueeze(-1) * s, x)
        r = torch.where(active.unsqueeze(-1), s - omega.unsqueeze(-1) * t, r)
        r_norm = _norm(r)
        nonfinite = active & ~torch.isfinite(r_norm)
        status = _mark(status, nonfinite, Status.NONFINITE)
        active = active & ~nonfinite
        best_x, best_norm = _keep_best(best_x, best_norm, x, r_norm, active)
        active = active & (r_norm > threshold)
        rho = rho_new
    status = _mark(status, active, Status.MAX_ITERATIONS)
    return best_x, iterations, status


def _keep_best(best_x, best_norm, x, x_norm, mask):
    """The iterate with the smallest residual norm so far, per element of ``mask``."""
    better = mask & (x_norm <= best_norm)
    return torch.where(better.unsqueeze(-1), x, best_x), torch.where(better, x_norm, best_norm)


# --------------------------------------------------------------------------- MINRES


__all__ = ['BiCGStab']
