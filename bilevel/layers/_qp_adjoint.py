r"""The adjoint KKT solve of :func:`~bilevel.layers.qp_solve`'s backward pass.

At a solution :math:`(z, \nu, \lambda)` with slacks :math:`s = h - Gz` the backward pass
solves :math:`K^\top (d_z, d_\nu, d_\lambda) = (\bar z, \bar\nu, \bar\lambda)` with

.. math::

    K = \begin{pmatrix} Q & A^\top & G^\top \\ A & 0 & 0 \\
        \operatorname{diag}(\lambda_{\mathcal A}) G & 0 & -\operatorname{diag}(s) \end{pmatrix},

where :math:`\lambda_{\mathcal A}` keeps the multipliers of the active rows (0 elsewhere, as
at the exact solution), and the gradients use :math:`w = \lambda \odot d_\lambda` only.

:func:`adjoint` eliminates what the structure gives for free before it factorizes:

* an **inactive row** has :math:`w_i = 0`: its equation only defines :math:`d_{\lambda,i}`;
* an **active bound row** (one nonzero :math:`g` in column ``j``) fixes :math:`d_{z,j} =
  \bar\lambda_i / g` (its slack is zero at the solution), and its :math:`w_i` follows from
  the ``j``-th stationarity equation once the rest is known;
* what remains couples the free variables ``F``, the equality rows and the active general
  rows ``K`` (whose slacks are 0 at the solution):

.. math::

    \begin{pmatrix} Q_{FF} & A_F^\top & G_{KF}^\top \\ A_F & 0 & 0 \\ G_{KF} & 0 & 0
    \end{pmatrix} \begin{pmatrix} d_{z,F} \\ d_\nu \\ w_K \end{pmatrix} = \text{right-hand side},

of order :math:`|F| + p + |K|` (padded to the largest in the batch) instead of
:math:`n + p + m`: the Jacobian of a projection onto the simplex with ``n = 200`` and 10
positive coordinates is a system of order 11 instead of 401.  One step of iterative
refinement against the full system follows; differentiated, it carries the derivatives
w.r.t. the entries the reduction skips (second derivatives).  The full form with the
iterate's slacks of the active rows, as OptNet and this module's first version solve it,
is off by their ratio to the multipliers: relative errors of 1e-5 on box-constrained QPs,
where the reduced form is exact to rounding.  A degenerate element (weakly
active rows, linearly dependent active rows, a singular reduced matrix) is solved in the
full form instead (:func:`dense_adjoint`), where the minimum-norm least-squares adjoint
stands in for the inverse of a singular :math:`K`.
"""

from __future__ import annotations

import math
import warnings

import torch

from .._linalg import lu_factor_ex
from ..status import CurvatureWarning
from ._qp_kkt import inf_norm, mv, row_sizes


def inf_norm_rows(G: torch.Tensor) -> torch.Tensor:
    """``max_j |G_ij|`` per row, 1 for a zero row (``(B, m)``)."""
    size = row_sizes(G)
    return torch.where(size > 0, size, torch.ones_like(size))


def dependent(rows: torch.Tensor, used: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
    r"""Per element: whether the ``used`` rows of ``rows`` (``(B, r, c)``) are linearly
    dependent (LICQ fails: the multipliers are not unique).  The rows are normalized (by
    ``norms``, default their own) and their Gram matrix factorized (unused rows as unit rows
    of their own); a squared pivot, the squared distance of a row to the span of the rows
    before it, below :math:`\sqrt{\varepsilon}` is a dependence.  At the interior point's
    last iterate the KKT matrix of such a solution is only nearly singular (its slack block
    is of the order of the solver's tolerance), so its own pivots do not show it.  No host
    read (a Cholesky, not an SVD)."""
    if rows.shape[-2] == 0:
        return torch.zeros(rows.shape[:-2], dtype=torch.bool, device=rows.device)
    largest = rows.abs().amax(-1, keepdim=True)  # rows scaled by their largest entry first: no under/overflow
    safe = torch.where(largest > 0, largest, 1)
    scaled = rows / safe
    size = torch.linalg.vector_norm(scaled, dim=-1, keepdim=True) if norms is None else norms.unsqueeze(-1) / safe
    unit = torch.where(used.unsqueeze(-1) & (size > 0), scaled / torch.where(size > 0, size, 1), 0)
    gram = unit @ unit.mT
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    gram = torch.where(used.unsqueeze(-1) & used.unsqueeze(-2), gram, eye)
    factor, info = torch.linalg.cholesky_ex(gram)
    pivots = factor.diagonal(dim1=-2, dim2=-1) ** 2
    zero_row = (used & (scaled.abs().amax(-1) == 0)).any(-1)  # a 0 = 0 constraint row: no direction at all
    return (info > 0) | (pivots.amin(-1) <= torch.finfo(rows.dtype).eps ** 0.5) | zero_row


def dense_adjoint(Q, A, G, lam, slack, active, weak, rhs, failed):
    """The adjoint in the full form (module docstring) for the whole batch: ``(u, degenerate)``,
    ``u`` of shape ``(B, n + p + m, C)`` with ``w`` in its last block.  Elements whose ``K``
    is singular get the minimum-norm least-squares solution."""
    B, n = Q.shape[:2]
    p, m = A.shape[-2], G.shape[-2]
    zeros = lambda *s: torch.zeros((B,) + s, dtype=Q.dtype, device=Q.device)  # noqa: E731
    eps = torch.finfo(Q.dtype).eps
    # K at the exact solution, where complementarity makes the multiplier of an inactive
    # constraint 0 (the iterate's is of the order of gap / slack).  Kept, those tiny
    # multipliers hid a singular K behind a pivot of their size: where the optimum is not
    # unique (an LP with ties: Q = 0 along the optimal face) the adjoint came out ~1e12
    # instead of being detected as degenerate.
    lam_k = torch.where(active, lam, 0)
    K = torch.cat([
        torch.cat([Q, A.mT, G.mT], -1),
        torch.cat([A, zeros(p, p), zeros(p, m)], -1),
        torch.cat([lam_k.unsqueeze(-1) * G, zeros(m, p), torch.diag_embed(-slack)], -1),
    ], -2)
    LU, piv, info = lu_factor_ex(K)
    diag = LU.diagonal(dim1=-2, dim2=-1).abs()
    singular = ((info > 0) | (diag.amin(-1) <= K.shape[-1] * eps * diag.amax(-1))) & ~failed
    with torch.no_grad():
        equalities = torch.ones(B, p, dtype=torch.bool, device=A.device)
        dependence = dependent(torch.cat([A, G], -2), torch.cat([equalities, active], -1))
    degenerate = (singular | (weak.any(-1) if m else torch.zeros_like(singular)) | dependence) & ~failed
    if bool(singular.any()):
        # the LU solve of a singular K is NaN, and so is its derivative (a second-order pass
        # multiplies it by 0): solve those elements with the identity, then use the pinv
        eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
        LU, piv, _ = lu_factor_ex(torch.where(singular[:, None, None], eye, K))
        u = torch.linalg.lu_solve(LU, piv, rhs, adjoint=True)
        idx = singular.nonzero().reshape(-1)
        u = u.index_put((idx,), torch.linalg.pinv(K[idx].mT) @ rhs[idx])
    else:
        u = torch.linalg.lu_solve(LU, piv, rhs, adjoint=True)
    w = lam.unsqueeze(-1) * u[:, n + p:]
    return torch.cat([u[:, :n + p], w], 1), degenerate


def reduced_adjoint(Q, A, G, active, rhs, skip):
    """The adjoint in the reduced form (module docstring): ``(u, flagged)`` with ``u`` as
    :func:`dense_adjoint`'s, and ``flagged`` the elements (not ``skip``-ped) the reduced form
    cannot take: two active bounds on one variable, dependent active rows, a singular
    reduced matrix.  ``skip``-ped and flagged elements' ``u`` is meaningless (and may be
    non-finite in a first-order pass; with autograd on, the flagged elements are solved with
    the identity instead, so that a second-order pass multiplies finite numbers by 0)."""
    B, n = Q.shape[:2]
    p, m, C = A.shape[-2], G.shape[-2], rhs.shape[-1]
    eps = torch.finfo(Q.dtype).eps
    nonzero = G != 0
    bound = nonzero.sum(-1) == 1                                  # (B, m), per element
    col = nonzero.to(torch.int8).argmax(-1)                       # the column of a bound row
    coef = G.gather(-1, col.unsqueeze(-1)).squeeze(-1)
    fixing = active & bound & ~skip.unsqueeze(-1)
    general = active & ~bound & ~skip.unsqueeze(-1)
    fixed = torch.zeros(B, n, dtype=torch.int64, device=G.device).scatter_add(1, col, fixing.to(torch.int64))
    free = (fixed == 0) & ~skip.unsqueeze(-1)  # a skipped element's system is the identity: no size
    twice = (fixed > 1).any(-1)                                   # lower = upper bound active: dependent rows
    n_free, n_general = free.sum(-1), general.sum(-1)
    F, K = torch.stack([n_free.amax(), n_general.amax()]).tolist()  # the padded sizes: one host read
    F = max(F, 1)  # one padded column at least: no empty system
    # free columns first, then active general rows first (stable: in their own order)
    idx_f = torch.argsort((~free).to(torch.int8), dim=-1, stable=True)[:, :F]
    valid_f = torch.arange(F, device=G.device) < n_free.unsqueeze(-1)
    idx_k = torch.argsort((~general).to(torch.int8), dim=-1, stable=True)[:, :K]
    valid_k = torch.arange(K, device=G.device) < n_general.unsqueeze(-1)

    def rows(M, idx, valid):  # M's rows idx (B, k, .), zero where not valid
        out = M.gather(1, idx.unsqueeze(-1).expand(idx.shape + M.shape[2:]))
        return torch.where(valid.unsqueeze(-1), out, 0)

    def cols(M, idx, valid):  # M's columns idx (B, ., k), zero where not valid
        out = M.gather(2, idx.unsqueeze(1).expand(M.shape[:2] + idx.shape[1:]))
        return torch.where(valid.unsqueeze(1), out, 0)

    eye_f = torch.diag_embed((~valid_f).to(Q.dtype))
    Q_ff = cols(rows(Q, idx_f, valid_f), idx_f, valid_f) + eye_f
    A_f = cols(A, idx_f, valid_f)
    G_kf = cols(rows(G, idx_k, valid_k), idx_f, valid_f)
    padding = torch.diag_embed((~valid_k).to(Q.dtype))  # an active row's slack is 0 at the solution
    zeros = lambda *s: torch.zeros((B,) + s, dtype=Q.dtype, device=Q.device)  # noqa: E731
    M = torch.cat([
        torch.cat([Q_ff, A_f.mT, G_kf.mT], -1),
        torch.cat([A_f, zeros(p, p), zeros(p, K)], -1),
        torch.cat([G_kf, zeros(K, p), -padding], -1),
    ], -2)
    with torch.no_grad():  # the active rows' dependence, in the reduced space (rows normalized in the full one)
        full_norms = torch.linalg.vector_norm(torch.cat([A, rows(G, idx_k, valid_k)], 1), dim=-1)
        flagged = twice | dependent(torch.cat([A_f, G_kf], 1),
                                    torch.cat([torch.ones(B, p, dtype=torch.bool, device=A.device), valid_k], -1), full_norms)
    M = torch.where((skip | flagged)[:, None, None], torch.eye(M.shape[-1], dtype=M.dtype, device=M.device), M)
    # symmetric equilibration, D M D with D = diag(max_j |M_ij|)^-1/2: the pivot test below then
    # judges M, not the units of its rows (a well-posed QP whose rows were scaled by 1e-6 was
    # flagged singular, and its gradient was off by 100%)
    with torch.no_grad():
        equilibrate = M.abs().amax(-1).clamp_min(torch.finfo(M.dtype).tiny).rsqrt()
    M = M * equilibrate.unsqueeze(-1) * equilibrate.unsqueeze(-2)
    LU, piv, info = lu_factor_ex(M)
    diag = LU.diagonal(dim1=-2, dim2=-1).abs()
    flagged = (flagged | (info > 0) | (diag.amin(-1) <= M.shape[-1] * eps * diag.amax(-1))) & ~skip
    if torch.is_grad_enabled():  # a backward with create_graph: the LU of a singular M has NaN derivatives
        M = torch.where(flagged[:, None, None], torch.eye(M.shape[-1], dtype=M.dtype, device=M.device), M)
        LU, piv, _ = lu_factor_ex(M)
    divisor = torch.where(fixing, coef, 1).unsqueeze(-1)
    index_f, index_k, index_m = (i.unsqueeze(-1).expand(B, i.shape[1], C) for i in (idx_f, idx_k, col))

    def solve(r: torch.Tensor) -> torch.Tensor:
        r1, r2, r3 = r[:, :n], r[:, n:n + p], r[:, n + p:]
        # the variables fixed by active bound rows: g d_z,j = r3_i
        d_fixed = zeros(n, C).scatter_add(1, index_m, torch.where(fixing.unsqueeze(-1), r3 / divisor, 0))
        t1, t2, t3 = r1 - Q @ d_fixed, r2 - A @ d_fixed, r3 - G @ d_fixed
        b = torch.cat([rows(t1, idx_f, valid_f), t2, rows(t3, idx_k, valid_k)], 1)
        x = equilibrate.unsqueeze(-1) * torch.linalg.lu_solve(LU, piv, equilibrate.unsqueeze(-1) * b)
        x_f, y, w_k = x[:, :F], x[:, F:F + p], x[:, F + p:]  # M is symmetric: M x = b
        d_z = d_fixed.scatter_add(1, index_f, torch.where(valid_f.unsqueeze(-1), x_f, 0))
        w = zeros(m, C).scatter_add(1, index_k, torch.where(valid_k.unsqueeze(-1), w_k, 0))
        # an active bound row's w from the stationarity equation of its column
        stationarity = r1 - Q @ d_z - A.mT @ y - G.mT @ w
        w = torch.where(fixing.unsqueeze(-1), stationarity.gather(1, index_m) / divisor, w)
        return torch.cat([d_z, y, w], 1)

    # One step of refinement against the full system: as its residual is differentiated in
    # every entry of Q, A and G, it gives the second derivatives w.r.t. the entries the
    # reduction skips (the zeros of a bound row, the inactive rows), and it corrects rounding.
    u = solve(rhs)
    d_z, y, w = u[:, :n], u[:, n:n + p], u[:, n + p:]
    residual = torch.cat([
        rhs[:, :n] - Q @ d_z - A.mT @ y - G.mT @ w,
        rhs[:, n:n + p] - A @ d_z,
        torch.where((fixing | general).unsqueeze(-1), rhs[:, n + p:] - G @ d_z, 0),
    ], 1)
    return u + solve(residual), flagged


def adjoint(Q, A, G, h, z, y, lam, bars, stage, failed, tol):
    r"""Solve :math:`K^\top (d_z, d_\nu, d_\lambda) = (\bar z, \bar\nu, \bar\lambda)` for the
    batch (module docstring); return ``(d_z, d_nu, w, degenerate)`` with :math:`w = \lambda
    \odot d_\lambda`.

    ``bars`` are ``(C, B, .)``: ``C`` right-hand sides per element (the rows of a
    Jacobian under :func:`torch.func.jacrev`) share one factorization of each
    :math:`K`; the solutions come back as ``(C, B, .)``.  The ``failed`` elements
    (no solution: their outputs were NaN) are left out of the checks; their adjoint
    is 0 where their output was masked out of the loss (:math:`\bar z = 0`), NaN
    otherwise.  A degenerate solution warns (:class:`~bilevel.status.CurvatureWarning`).

    A row is active where its slack is smaller than its multiplier, each in its own units
    (the slack against ``||G_i|| + |h_i|``; the multiplier of the equilibrated problem,
    ``lambda_i ||G_i|| / max(|Q|, |q|)``, against ``1 +`` its largest):
    at a solution one of the two is 0 (complementarity), and the interior point's last
    iterate has ``s_i lambda_i`` of the order of its tolerance ``tol``.  A row where both
    are below ``10 sqrt(tol)`` is weakly active (both ~ ``sqrt(gap)`` on the central path):
    the solution map is not differentiable there.  Thresholds of ``eps ** 0.25`` on each,
    as before, took a bound 6e-5 away for an active one, or a multiplier of 3e-4 for a
    zero one, on well-posed problems (simplex projections, box-constrained least squares),
    and returned a generalized gradient off by 0.1 for them.
    """
    n, p = z.shape[-1], A.shape[-2]
    slack = h - mv(G, z)
    # per row, in the row's own units (slack / ||G_i|| against 1 + |h_i| / ||G_i||): a distant
    # bound elsewhere, or a row's scaling, does not change whether it is active
    rows = inf_norm_rows(G)
    s_unit = slack / (rows + h.abs())
    with torch.no_grad():
        q = -(mv(Q, z) + mv(A.mT, y) + mv(G.mT, lam))  # the linear term, from stationarity
        size = torch.maximum(Q.abs().amax((-2, -1)), inf_norm(q))
        lam_unit = lam * rows / torch.where(size > 0, size, 1).unsqueeze(-1)
        lam_unit = lam_unit / (1 + inf_norm(lam_unit)).unsqueeze(-1)
    active = s_unit < lam_unit
    weak = torch.maximum(s_unit, lam_unit) <= 10 * max(tol, torch.finfo(z.dtype).eps) ** 0.5
    rhs = torch.cat(bars, -1).movedim(0, -1)  # (B, N, C)
    weakly = weak.any(-1) & ~failed
    u, flagged = reduced_adjoint(Q, A, G, active, rhs, failed | weakly)
    degenerate = flagged | weakly
    finite = torch.isfinite(u).flatten(1).all(-1) | failed
    any_degenerate, ok = torch.stack([degenerate.any(), (finite | degenerate).all()]).tolist()
    if any_degenerate:  # those elements in the full form
        dense, degenerate_ = dense_adjoint(Q, A, G, lam, slack, active, weak, rhs, failed)
        u = torch.where(degenerate[:, None, None], dense, u)
        degenerate = degenerate & degenerate_
        ok = bool((torch.isfinite(u).flatten(1).all(-1) | failed).all())
    used = (rhs != 0).any(-2, keepdim=True)  # per element and right-hand side
    u = torch.where(failed[:, None, None], torch.where(used, math.nan, 0.0).to(u.dtype), u)
    if any_degenerate:
        # one fixed text, so that a training loop shows it once; the elements are in info.degenerate
        warnings.warn(
            f"{stage}: a degenerate solution in the batch (a weakly active constraint with zero "
            "multiplier, (nearly) linearly dependent active constraints, or Q singular on their null space): "
            "the KKT matrix is singular or nearly so, the solution map is not differentiable there, "
            "and the gradient returned is one of its generalized gradients. The elements are marked "
            "in `info.degenerate` (QPLayer.last_info, or qp_solve(..., return_info=True)).",
            CurvatureWarning,
            stacklevel=4,
        )
    if not ok:
        raise FloatingPointError(f"{stage}: the adjoint KKT solve returned NaN or inf.")
    u = u.movedim(-1, 0)  # (C, B, N)
    return u[..., :n], u[..., n:n + p], u[..., n + p:], degenerate
