"""Restarted GMRES for general non-singular systems."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..._checks import check_fields as _check_fields
from ..._checks import positive_int as _positive_int
from ...status import Status
from ._base import (
    KrylovSolver,
    _div,
    _dot,
    _mark,
    _norm,
    _singular_tol,
    _look_every,
)


@dataclass(frozen=True)
class GMRES(KrylovSolver):
    r"""Restarted GMRES for general non-singular systems ``A x = b``.

    Each cycle builds an orthonormal basis :math:`V_m` of the Krylov space
    :math:`\mathcal K_m(A, r_0) = \mathrm{span}\{r_0, A r_0, \dots, A^{m-1} r_0\}`
    by Arnoldi (modified Gram--Schmidt), :math:`A V_m = V_{m+1} \bar H_m`, and
    takes the update minimising the residual over it,

    .. math:: x = x_0 + V_m y, \qquad
              y = \arg\min_y \bigl\| \|r_0\| e_1 - \bar H_m y \bigr\|,

    with the least-squares residual tracked by Givens rotations at every step;
    after :math:`m` = ``restart`` steps the cycle restarts from the new true
    residual.  :math:`A` need not be symmetric, only non-singular.  Complex
    dtypes are supported (any non-singular complex :math:`A`; complex rotations).

    Element ``i`` has converged when :math:`\|b_i - A_i x_i\| \le
    \max(\mathrm{tol}\,\|b_i\|, \mathrm{atol})` (``tol=None``: ``sqrt(eps)`` of the
    dtype).  A singular step (the new direction adds nothing to the range: a
    pivot of the rotated :math:`\bar H` below ``eps ** (2/3)`` times
    :math:`\|A v_j\|`, which a non-singular :math:`A` only reaches with a
    condition number above ``eps ** (-2/3)``) or a full cycle that does not
    reduce the true residual (stagnation, e.g. a singular inconsistent system)
    is reported as :attr:`~bilevel.status.Status.BREAKDOWN` and the element
    keeps the minimum-residual iterate up to that step; a cycle whose update
    would increase the true residual (which exact arithmetic rules out: the
    rotated :math:`\bar H` is numerically singular as a whole although each
    pivot passed) is discarded, and the element stops at the iterate before it.
    An exact (happy) breakdown of Arnoldi gives the exact solution.

    Args:
        maxiter: budget of Arnoldi steps (matrix-vector products) per element,
            summed over restarts (each restart also spends one product on the
            true residual); ``None`` means ``10 n`` capped at 1000.  Default 100.
        tol: relative tolerance on the residual; ``None`` (default) scales with
            the dtype.
        atol: absolute tolerance on the residual norm, default 0.
        restart: Krylov dimension :math:`m` of a cycle (at most ``n``); memory is
            ``O(m n)`` per element.  Default 20.

    Example:
        >>> import torch
        >>> from bilevel.implicit.linear_solve import GMRES
        >>> A = torch.tensor([[2.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> x, info = GMRES()(lambda v: A @ v, torch.ones(2, dtype=torch.float64))
        >>> torch.allclose(A @ x, torch.ones(2, dtype=torch.float64)), bool(info.converged)
        (True, True)

    References:
        Saad, Y. and Schultz, M. H. `GMRES: A generalized minimal residual
        algorithm for solving nonsymmetric linear systems
        <https://doi.org/10.1137/0907058>`_. SIAM J. Sci. Stat. Comput., 1986.
    """

    restart: int = 20

    def __post_init__(self):
        super().__post_init__()
        _check_fields(self, restart=(_positive_int, "a positive int"))

    def _iterate(self, matvec, b, x0, threshold, maxiter, flatten):
        return _gmres(matvec, b, x0, threshold, maxiter, self.restart)


def _gmres(matvec, b, x0, threshold, maxiter, restart):
    nbatch, n = b.shape
    m = min(restart, n)
    eps = torch.finfo(b.dtype).eps
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b.clone() if x0 is None else b - matvec(x)
    beta = _norm(r)
    status = torch.zeros(nbatch, dtype=torch.int64, device=b.device)
    iterations = torch.zeros_like(status)
    status = _mark(status, ~torch.isfinite(beta), Status.NONFINITE)
    active = torch.isfinite(beta) & (beta > threshold)
    used = 0
    while used < maxiter and (not _look_every(r) or bool(active.any())):
        steps = min(m, maxiter - used)
        dx, done, code, ran = _arnoldi_cycle(matvec, r, beta, active, threshold, steps)
        used += ran
        iterations = iterations + done
        cycled = active
        status = torch.where(code != 0, code, status)
        active = active & (code == 0)
        x_new = x + dx
        r_new = b - matvec(x_new)
        beta_new = _norm(r_new)
        # In exact arithmetic a cycle never increases the residual: one that does (or gives
        # NaN) solved a numerically singular triangular factor; keep the previous iterate.
        grew = (cycled & ~(beta_new <= beta)).unsqueeze(-1)
        x, r = torch.where(grew, x, x_new), torch.where(grew, r, r_new)
        nonfinite = active & ~torch.isfinite(beta_new)
        beta_new = torch.where(grew.squeeze(-1), beta, beta_new)
        stagnated = active & ~nonfinite & (grew.squeeze(-1) | (done == m)) & (beta_new >= (1 - 10 * eps) * beta)
        stagnated = stagnated & (beta_new > threshold)
        status = _mark(_mark(status, nonfinite, Status.NONFINITE), stagnated, Status.BREAKDOWN)
        active = active & ~nonfinite & ~stagnated & (beta_new > threshold)
        beta = beta_new
    status = _mark(status, active, Status.MAX_ITERATIONS)
    return x, iterations, status


def _arnoldi_cycle(matvec, r, beta, active, threshold, steps):
    """One GMRES cycle of at most ``steps`` Arnoldi steps, batched.

    Returns the update ``dx``, the products each element spent, a status code
    per element (0 to go on, BREAKDOWN or NONFINITE), and the steps run.
    """
    nbatch, n = r.shape
    complex_ = r.is_complex()
    # h_ij = v_i^H A v_j, as sum(w * conj(v_i)): the operand order of the real path, whose
    # summation (and results under vmap) stays what it was
    dot = (lambda w_, v_: (w_ * v_.conj()).sum(-1)) if complex_ else _dot
    V = _buffer(r, steps + 1, n)
    H = _buffer(r, steps + 1, steps)
    cs = _buffer(r, steps)
    sn = _buffer(r, steps)  # real-valued: it rotates against h_{j+1, j} = ||w|| >= 0
    # the rotations [[conj(c), s], [-s, c]] (unitary for real s): conj(c) is c when real
    cs_conj = _buffer(r, steps) if complex_ else cs
    g = _buffer(r, steps + 1)
    g[:, 0] = torch.where(active, beta, 0)
    V[:, 0] = torch.where(active.unsqueeze(-1), r / torch.where(active, beta, 1).unsqueeze(-1), 0)
    running = active.clone()
    done = torch.zeros(nbatch, dtype=torch.int64, device=r.device)
    usable = torch.zeros_like(done)
    code = torch.zeros_like(done)
    sync = _look_every(r)
    ran = 0
    for j in range(steps):
        if sync and j > 0 and j % sync == 0 and not bool(running.any()):
            break
        ran = j + 1
        w = matvec(V[:, j])
        done = done + running
        w_norm = _norm(w)
        col = _buffer(r, steps + 1)
        for i in range(j + 1):  # modified Gram-Schmidt
            h = dot(w, V[:, i])
            col[:, i] = h
            w = w - h.unsqueeze(-1) * V[:, i]
        h_next = _norm(w)
        for i in range(j):  # previous Givens rotations
            top = cs_conj[:, i] * col[:, i] + sn[:, i] * col[:, i + 1]
            col[:, i + 1] = -sn[:, i] * col[:, i] + cs[:, i] * col[:, i + 1]
            col[:, i] = top
        pivot = torch.hypot(col[:, j].abs() if complex_ else col[:, j], h_next)
        finite = torch.isfinite(pivot) & torch.isfinite(w_norm)
        regular = finite & (pivot > _singular_tol(r.dtype) * w_norm) & (pivot > 0)
        cs[:, j] = _div(col[:, j], pivot, regular) + (~regular).to(r.dtype)
        sn[:, j] = _div(h_next, pivot, regular)
        if complex_:
            cs_conj[:, j] = cs[:, j].conj()
        col[:, j] = torch.where(regular, pivot, col[:, j])
        H[:, :, j] = col
        g[:, j + 1] = -sn[:, j] * g[:, j]
        g[:, j] = cs_conj[:, j] * g[:, j]
        code = _mark(code, running & ~finite, Status.NONFINITE)
        code = _mark(code, running & finite & ~regular, Status.BREAKDOWN)
        good = running & regular
        usable = usable + good
        running = good & (g[:, j + 1].abs() > threshold)
        next_ok = running & (h_next > 0)
        V[:, j + 1] = torch.where(next_ok.unsqueeze(-1), w / torch.where(next_ok, h_next, 1).unsqueeze(-1), 0)
    return _cycle_update(V, H, g, usable, ran), done, code, ran


def _buffer(r: torch.Tensor, *shape: int) -> torch.Tensor:
    """Zeros of shape ``(B, *shape)`` for in-place writes, made from ``r`` so that they
    are batched wherever ``r`` is (``new_zeros`` is not, under ``torch.func.vmap``)."""
    return torch.zeros_like(r[:, :1]).expand(r.shape[0], math.prod(shape)).clone().reshape(r.shape[0], *shape)


def _cycle_update(V, H, g, usable, k):
    """``V_k y`` with ``y`` solving the rotated triangular system, per element on
    its first ``usable`` columns (the rest is replaced by identity rows)."""
    if k == 0:
        return torch.zeros_like(V[:, 0])
    cols = torch.arange(k, device=V.device)
    used = cols < usable.unsqueeze(-1)
    eye = torch.eye(k, dtype=H.dtype, device=H.device)
    R = torch.where(used.unsqueeze(-1) & used.unsqueeze(-2), H[:, :k, :k], eye)
    rhs = torch.where(used, g[:, :k], 0).unsqueeze(-1)
    y = torch.linalg.solve_triangular(R, rhs, upper=True).squeeze(-1)
    return torch.einsum("bk,bkn->bn", y, V[:, :k])


# --------------------------------------------------------------------------- BiCGStab


__all__ = ['GMRES']
