"""MINRES-QLP for symmetric (or Hermitian), possibly indefinite or singular systems."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..._tolerance import default_tol
from ...status import Status
from ._base import (
    KrylovSolver,
    _div,
    _look_every,
    _mark,
    _norm,
    _real_inner,
)

# A last pivot mu_k of L_k at most this many eps ||T_k||_F is rounding noise (a numerically
# singular T_k). Measured in float64: at an exhausted Krylov space of singular inconsistent
# systems mu_k / (eps ||T_k||_F) stays below 1.1 (100 random 8 x 8 cases), while the smallest
# genuine pivot of J^T J + 1e-10 I (||A|| up to ~70) is above 2500 eps ||T_k||_F.
_NOISE_PIVOT = 10.0


@dataclass(frozen=True)
class MINRES(KrylovSolver):
    r"""Minimum-residual method for symmetric (possibly indefinite or singular) systems ``A x = b``.

    Lanczos builds an orthonormal basis :math:`V_k` of :math:`\mathcal K_k(A, r_0)`
    with :math:`A V_k = V_{k+1} \underline T_k` (:math:`\underline T_k` tridiagonal,
    :math:`(k+1) \times k`); MINRES takes

    .. math:: x_k = \arg\min_{x \in x_0 + \mathcal K_k(A, r_0)} \|b - A x\|.

    It is run as MINRES-QLP (Choi, Paige & Saunders, 2011): left reflections
    :math:`Q_k \underline T_k = [R_k; 0]` (MINRES's QR factorization, with
    :math:`Q_k \beta_1 e_1 = [t_k; \phi_k]` and :math:`\phi_k = \|r_k\|`), then
    right reflections :math:`R_k P_k = L_k`, two per step (:math:`P_{k-2,k}`
    zeroes :math:`R_{k-2,k}`, :math:`P_{k-1,k}` the entry it leaves in row
    :math:`k-1`), a lower-triangular :math:`L_k` with three bands whose diagonal
    reveals the rank of :math:`T_k`.  Then :math:`x_k = x_0 + W_k u_k` with
    :math:`W_k = V_k P_k` and :math:`L_k u_k = t_k`, updated by short
    recurrences in constant memory: :math:`w_{k-2}` and :math:`u_{k-2}` are final
    at step :math:`k`, :math:`u_{k-1}, u_k` are recomputed each step.  In exact
    arithmetic these are the MINRES iterates (the same residuals, so the same
    iteration counts).  Rows :math:`1..k-1` of :math:`L_k` do not depend on
    :math:`R_{kk}`: where the last pivot :math:`\mu_k = (L_k)_{kk}` is rounding
    noise (:math:`|\mu_k| \le 10\, \mathrm{eps}\, \|T_k\|_F`, a numerically singular
    :math:`T_k`), :math:`u_k` is left out, which gives the minimum-length
    least-squares solution :math:`A^+ b` of a singular inconsistent system
    (:math:`x_0 = 0`) once its Krylov space is exhausted instead of a step
    divided by the noise pivot.  A genuine small eigenvalue (a pivot above the
    noise) is solved.

    The operator must be symmetric; it may be indefinite or singular.  Complex
    dtypes: :math:`A` Hermitian, with a real :math:`T_k` (:math:`\alpha_k = v_k^H A v_k`).
    An element stops with :attr:`~bilevel.status.Status.BREAKDOWN` (a singular
    operator and an inconsistent right-hand side) at a noise pivot, or where its
    residual is already a least-squares residual to the tolerance,
    :math:`\|A r_{k-1}\| \le \max(\mathrm{tol}, \sqrt{\mathrm{eps}})\, \|T_k\|_F \|r_{k-1}\|`,
    and the step could not halve it (:math:`2\beta_{k+1} \ge |(R_k)_{kk}|`; a
    small eigenvalue being resolved removes the residual instead).  It returns the
    iterate with :math:`u_k` left out when that moves the residual by at most
    :math:`\mathrm{tol}\, \|r_{k-1}\|` (row :math:`k` of :math:`L_k` applied to
    the kept components), else the last iterate :math:`x_{k-1}`: a least-squares
    solution, :math:`A^+ b` when the noise pivot of an exhausted Krylov space
    stopped it (small systems), but in general not the minimum-length one: on
    larger singular systems, where the least-squares test stops it first, and in
    float32, its norm may exceed :math:`\|A^+ b\|` several times
    (:class:`NormalCG` or ``Direct("lstsq")`` give :math:`A^+ b`).

    Element ``i`` has converged when its residual estimate
    :math:`\phi_k = \|b_i - A_i x_i\|` satisfies :math:`\phi_k \le
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
        >>> from bilevel.status import Status
        >>> A = torch.tensor([[1.0, 2.0], [2.0, -1.0]], dtype=torch.float64)
        >>> x, info = MINRES()(lambda v: A @ v, torch.ones(2, dtype=torch.float64))
        >>> torch.allclose(A @ x, torch.ones(2, dtype=torch.float64)), bool(info.converged)
        (True, True)

        A singular system with ``b`` outside the range: the minimum-length
        least-squares solution, reported as a breakdown:

        >>> S = torch.diag(torch.tensor([2.0, -1.0, 0.0], dtype=torch.float64))
        >>> x, info = MINRES()(lambda v: S @ v, torch.ones(3, dtype=torch.float64))
        >>> x.round(decimals=12) + 0.0, info.status.item() == Status.BREAKDOWN
        (tensor([ 0.5000, -1.0000,  0.0000], dtype=torch.float64), True)

    References:
        Paige, C. C. and Saunders, M. A. `Solution of sparse indefinite systems of
        linear equations <https://doi.org/10.1137/0712047>`_. SIAM J. Numer.
        Anal., 1975.

        Choi, S.-C. T., Paige, C. C. and Saunders, M. A. `MINRES-QLP: a Krylov
        subspace method for indefinite or singular symmetric systems
        <https://doi.org/10.1137/100787921>`_. SIAM J. Sci. Comput. 33(4), 2011.
    """

    def _iterate(self, matvec, b, x0, threshold, maxiter, flatten):
        tol = self.tol if self.tol is not None else default_tol(b.dtype)
        # below sqrt(eps) the ratio ||A r|| / (||A|| ||r||) is rounding noise
        return _minres(matvec, b, x0, threshold, maxiter, max(tol, math.sqrt(torch.finfo(b.dtype).eps)))

    def _gradient_rule(self):
        return "self", self  # the operator is symmetric


def _reflection(a, b):
    """``(c, s, r)`` of the symmetric reflection ``[c s; s -c]`` taking ``(a, b)`` to
    ``(r, 0)``, ``r = hypot(a, b) >= 0``; the identity's ``c = 1, s = 0`` where ``a = b = 0``."""
    r = torch.hypot(a, b)
    nonzero = r > 0
    return torch.where(nonzero, _div(a, r, nonzero), 1), _div(b, r, nonzero), r


def _minres(matvec, b, x0, threshold, maxiter, tol):
    nbatch, _ = b.shape
    eps = torch.finfo(b.dtype).eps
    dot = _real_inner(b.dtype)  # v^T A v, or the real v^H A v of a Hermitian A: T_k stays real
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r1 = b.clone() if x0 is None else b - matvec(x)
    y, r2 = r1, r1
    beta = phibar = _norm(r1)
    zeros, ones = torch.zeros_like(beta), torch.ones_like(beta)
    # Left reflections Q_k (MINRES's QR of T_k); cs = -1 starts the recurrence.
    old_beta, dbar, epsln, sn, t_norm2 = zeros, zeros, zeros, zeros, zeros
    cs = -ones
    # Right reflections (R_k P_k = L_k) and L_k u = t: rows -1 and 0 are ghosts (the
    # identity, u = 0), so that steps 1 and 2 run the general recurrence.
    mubis, psibar, mubar = ones, zeros, ones  # (L)_{k-2,k-2} and (L)_{k-1,k-2} before P_{k-2,k}; (L)_{k-1,k-1}
    num, xi = zeros, zeros  # right-hand sides of rows k-2 and k-1 less their final terms
    u1, u0 = zeros, zeros  # u_{k-1}, u_k (provisional)
    # W_k = V_k P_k: w-hat_{k-1}, w-bar_k (provisional); xc = sum of the final u_j w_j
    what, wbar, xc = torch.zeros_like(b), torch.zeros_like(b), torch.zeros_like(b)
    drop = torch.zeros(nbatch, dtype=torch.bool, device=b.device)  # u_k left out (a noise pivot)
    status = torch.zeros(nbatch, dtype=torch.int64, device=b.device)
    iterations = torch.zeros_like(status)
    status = _mark(status, ~torch.isfinite(beta), Status.NONFINITE)
    active = torch.isfinite(beta) & (beta > threshold)
    # Inertia of T_k + sigma I (sigma = sqrt(eps) ||T_k||_F): its LDL^T pivots d_k, one more per step
    pivot, negative = ones, torch.zeros_like(active)
    sqrt_eps = math.sqrt(eps)
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
        # tie the tests below to the scale of b)
        t_norm2 = t_norm2 + alfa**2 + (old_beta**2 if k > 0 else 0) + beta**2
        t_norm = t_norm2.sqrt()
        # Sylvester: as many negative pivots as eigenvalues of T_k below -sigma, and these lie
        # above A's smallest (interlacing): a negative pivot proves negative curvature of A
        shifted = alfa + sqrt_eps * t_norm - (_div(old_beta**2, pivot, active) if k > 0 else 0)
        negative = negative | (active & (shifted < 0))
        pivot = torch.where(active, torch.where(shifted == 0, eps * t_norm, shifted), pivot)  # (a zero pivot: perturbed)
        # Q_k: column k of R_k is (eps_k, delta_k, gamma_k) in rows k-2, k-1, k
        eps_k = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = torch.hypot(gbar, beta)
        new_cs, new_sn = _div(gbar, gamma, gamma > 0), _div(beta, gamma, gamma > 0)
        tau = new_cs * phibar  # t_k
        new_phibar = new_sn * phibar  # ||r_k||
        # P_{k-2,k} zeroes eps_k against (L)_{k-2,k-2}: row k-2 of L is final
        c1, s1, mu = _reflection(mubis, eps_k)
        psi = c1 * psibar + s1 * delta  # (L)_{k-1,k-2}, final
        theta = s1 * psibar - c1 * delta  # left in (k-1, k)
        rho = s1 * gamma  # (L)_{k,k-2}, final
        eta = -c1 * gamma
        # P_{k-1,k} zeroes theta against (L)_{k-1,k-1}
        c2, s2, new_mubis = _reflection(mubar, theta)
        new_psibar = s2 * eta  # (L)_{k,k-1}
        new_mubar = -c2 * eta  # (L)_{k,k}: the last pivot
        # forward substitution: u_{k-2} final, u_{k-1} and u_k provisional
        u2 = _div(num, mu, active)
        new_num = xi - psi * u2
        new_u1 = _div(new_num, new_mubis, active)
        new_xi = tau - rho * u2
        omega = new_psibar * new_u1  # row k of L_k applied to u_{k-2}, u_{k-1}, with rho u_{k-2} in xi
        new_u0 = _div(new_xi - omega, new_mubar, active & (new_mubar != 0))
        omega = omega + rho * u2
        nonfinite = active & ~(torch.isfinite(gamma) & torch.isfinite(new_u1) & torch.isfinite(new_u0))
        # ||A r_{k-1}|| / (||T|| ||r_{k-1}||): a least-squares residual (singular A,
        # inconsistent b) cannot be reduced any further. Told apart from a small
        # eigenvalue (cond > 1/tol, still solvable) by the step it would take: there
        # it removes the residual (sn ~ 0), here it cannot (sn ~ 1).
        least_squares = (torch.hypot(gbar, dbar) <= tol * t_norm) & (2 * beta >= gamma)
        noise_pivot = new_mubar.abs() <= _NOISE_PIVOT * eps * t_norm
        singular = active & ~nonfinite & (least_squares | noise_pivot)
        # Leaving u_k out moves the residual by omega (r = r_{k-1} - omega q, |q| = 1):
        # where that is within the tolerance, keep the step without it, else x_{k-1}.
        truncate = singular & (omega.abs() <= tol * phibar)
        status = _mark(_mark(status, nonfinite, Status.NONFINITE), singular, Status.BREAKDOWN)
        step = active & ~nonfinite & (truncate | ~singular)
        stepv = step.unsqueeze(-1)
        # W_k = V_k P_k: the same reflections on its columns (w_{k-2} is final)
        c1, s1, c2, s2 = c1.unsqueeze(-1), s1.unsqueeze(-1), c2.unsqueeze(-1), s2.unsqueeze(-1)
        w2 = c1 * what + s1 * v
        tmp = s1 * what - c1 * v
        xc = torch.where(stepv, xc + u2.unsqueeze(-1) * w2, xc)
        what = torch.where(stepv, c2 * wbar + s2 * tmp, what)
        wbar = torch.where(stepv, s2 * wbar - c2 * tmp, wbar)
        cs, sn, phibar = torch.where(step, new_cs, cs), torch.where(step, new_sn, sn), torch.where(step, new_phibar, phibar)
        mubis, psibar, mubar = (torch.where(step, new, old) for new, old in
                                ((new_mubis, mubis), (new_psibar, psibar), (new_mubar, mubar)))
        num, xi = torch.where(step, new_num, num), torch.where(step, new_xi, xi)
        u1, u0 = torch.where(step, new_u1, u1), torch.where(step, new_u0, u0)
        drop = drop | truncate
        active = step & ~singular & (new_phibar.abs() > threshold)
    status = _mark(status, active, Status.MAX_ITERATIONS)
    x = x + xc + u1.unsqueeze(-1) * what + torch.where(drop, 0, u0).unsqueeze(-1) * wbar
    return x, iterations, status, None, None, negative


__all__ = ['MINRES']
