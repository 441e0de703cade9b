r"""The cones of a canonical cone program, and projections onto their duals.

:class:`~bilevel.layers.ConvexLayer` differentiates the residual map of a cone
program through :math:`\Pi_{\mathcal K^*}`, the projection onto the dual of
its cone :math:`\mathcal K`; this module holds that projection, for every cone
CVXPY hands to Clarabel, with derivatives that are exact (not derivatives of an
iteration) and that work under :func:`torch.func.vmap` and
:func:`torch.func.jacfwd`.

*Cones.* The rows of :math:`A` come in CVXPY's order, which Clarabel keeps: the
zero cone (dual: the whole space), the non-negative orthant, second-order cones
:math:`\{(t, x): \|x\|_2 \le t\}`, PSD cones (scaled upper triangles) — these
three self-dual — then

* exponential cones, rows :math:`(r, s, t)`,
  :math:`K_{\exp} = \operatorname{cl}\{(r, s, t): s > 0,\ s e^{r/s} \le t\}`, with
  dual :math:`K_{\exp}^* = \operatorname{cl}\{(u, v, w): u < 0,\ -u e^{v/u} \le e\,w\}`
  (from ``log``, ``exp``, ``entr``, ``log_sum_exp``, ``kl_div``, ``rel_entr``,
  ``logistic``, ...);
* power cones, rows :math:`(x_1, \dots, x_k, z)` with weights :math:`\alpha > 0`,
  :math:`\sum_i \alpha_i = 1`:
  :math:`K_\alpha = \{(x, z): x \ge 0,\ \prod_i x_i^{\alpha_i} \ge |z|\}`, with dual
  :math:`K_\alpha^* = \{(u, w): u \ge 0,\ \prod_i (u_i/\alpha_i)^{\alpha_i} \ge |w|\}`; CVXPY
  emits 3-d ones (:math:`k = 2`, ``dims.p3d``) for ``power``, ``pnorm`` and friends and
  :math:`n`-d ones (``dims.pnd``) for ``geo_mean``, when asked for
  ``approx=False`` (by default it approximates them with second-order cones).

The duals are projected onto by Moreau's decomposition,
:math:`\Pi_{K^*}(v) = v + \Pi_K(-v)`, all the cones of a kind (power cones: of a
dimension) in one batched call, with

* :math:`\Pi_{K_{\exp}}(r, s, t)`: :math:`v` itself in :math:`K_{\exp}`, :math:`0` in
  the polar :math:`-K_{\exp}^*`, :math:`(r, 0, \max(t, 0))` when :math:`r \le 0` and
  :math:`s \le 0`; otherwise :math:`s_p\,(\rho, 1, e^\rho)`, with the polar part
  :math:`v - \Pi(v) = \mu\,(1, 1 - \rho, -e^{-\rho})`,
  :math:`s_p = ((\rho - 1) r + s)/q`, :math:`\mu = (r - \rho s)/q`,
  :math:`q = \rho^2 - \rho + 1`, where :math:`\rho` is the root of Friberg's

  .. math::

      h(\rho) = ((\rho - 1) r + s)\,e^\rho - (r - \rho s)\,e^{-\rho} - (\rho^2 - \rho + 1)\,t

  in the interval where :math:`s_p, \mu > 0`;
* :math:`\Pi_{K_\alpha}(x^0, z^0)`: :math:`v` in :math:`K_\alpha`, :math:`0` in the
  polar, :math:`(\max(x^0, 0), 0)` when :math:`z^0 = 0`; otherwise (Hien, for
  :math:`k = 2`; the same argument holds for any :math:`k`)
  :math:`(x(r), \operatorname{sign}(z^0)\, r)` with
  :math:`x_i(r) = \tfrac12\big(x^0_i + \sqrt{(x^0_i)^2 + 4 \alpha_i r (|z^0| - r)}\big)`
  and :math:`r \in (0, |z^0|)` the root of :math:`\prod_i x_i(r)^{\alpha_i} = r`.

Each root is found elementwise by a safeguarded Newton method (a bracket, with
bisection where a Newton point leaves it or stalls; Newton steps in the logarithm
of the distance to an end of the interval where the equation has a logarithmic
pole) with a fixed number of steps and no data-dependent branching, so the
projections run under ``vmap`` and ``jacfwd``. Their derivatives are exact: one
last Newton step :math:`\rho - g(\rho, v)/\partial_\rho g` with the slope detached gives
autograd :math:`\partial\rho/\partial v = -\partial_v g / \partial_\rho g`, the implicit
function theorem, not the derivative of the iteration.

References:
    Friberg, H. A. `Projection onto the exponential cone: a univariate root-finding
    problem <https://docs.mosek.com/whitepapers/expcone-proj.pdf>`_. MOSEK ApS, 2021.
    Hien, L. T. K. `Differential properties of Euclidean projection onto power cone
    <https://doi.org/10.1007/s00186-015-0514-0>`_. Math. Methods Oper. Res., 2015.
    Parikh, N. and Boyd, S. `Proximal Algorithms
    <https://web.stanford.edu/~boyd/papers/pdf/prox_algs.pdf>`_, section 6.3.
    Found. Trends Optim., 2014.
    Press, W. H., Teukolsky, S. A., Vetterling, W. T. and Flannery, B. P. *Numerical
    Recipes*, 3rd ed., section 9.4 (Newton's method with bracketing). Cambridge, 2007.
"""

from __future__ import annotations

import math

import numpy as np
import torch



def _svec_indices(k: int) -> tuple[list, list]:
    """Row and column of each entry of Clarabel's scaled upper triangle, by columns."""
    rows, cols = [], []
    for j in range(k):
        for i in range(j + 1):
            rows.append(i)
            cols.append(j)
    return rows, cols


class _ProjectPSD(torch.autograd.Function):
    r"""Projection of symmetric matrices onto the PSD cone, :math:`U \max(\Lambda, 0) U^\top`,
    with the derivative :math:`H \mapsto U (\Gamma \circ U^\top H U) U^\top` (Löwner's
    divided differences, well defined for repeated eigenvalues, unlike autograd of eigh)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(X):
        w, U = torch.linalg.eigh(X)
        return (U * w.clamp_min(0).unsqueeze(-2)) @ U.mT, w, U

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, w, U = output
        ctx.mark_non_differentiable(w, U)
        ctx.save_for_backward(w, U)
        ctx.save_for_forward(w, U)

    @staticmethod
    def _apply_derivative(w, U, H):
        pos = w > 0
        pi, pj = pos.unsqueeze(-1), pos.unsqueeze(-2)
        diff = w.unsqueeze(-1) - w.unsqueeze(-2)
        mixed = pi != pj
        ratio = (w.clamp_min(0).unsqueeze(-1) - w.clamp_min(0).unsqueeze(-2)) / torch.where(
            mixed, diff, torch.ones_like(diff)
        )
        gamma = torch.where(mixed, ratio, (pi & pj).to(w.dtype))
        H = 0.5 * (H + H.mT)
        return U @ (gamma * (U.mT @ H @ U)) @ U.mT

    @staticmethod
    def backward(ctx, gY, _gw, _gU):
        w, U = ctx.saved_tensors
        return _ProjectPSD._apply_derivative(w, U, gY)

    @staticmethod
    def jvp(ctx, dX):
        w, U = ctx.saved_tensors
        return _ProjectPSD._apply_derivative(w, U, dX), None, None


def _project_soc(v: torch.Tensor) -> torch.Tensor:
    """Projection onto :math:`\\{(t, x): \\|x\\| \\le t\\}` along the last dim."""
    t, x = v[..., :1], v[..., 1:]
    nx = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    safe = torch.where(nx > 0, nx, torch.ones_like(nx))
    coef = 0.5 * (t + nx)
    boundary = torch.cat([coef, coef * x / safe], -1)
    inside = nx <= t
    below = nx <= -t
    return torch.where(inside, v, torch.where(below, torch.zeros_like(v), boundary))


# ----------------------------------------------------------------------------- exponential and power cones
#
# Both projections come down to one scalar equation per cone. Its root is found with no autograd
# (detached inputs) by a safeguarded Newton method with a fixed number of steps and no
# data-dependent branching, so that the projections run under vmap and jacfwd. They are then
# differentiated exactly: one more Newton step in which only the slope is detached,
#     rho = rho_d - g(rho_d, v) / g'(rho_d, v_d),
# has the value of a Newton step and the derivative d rho / d v = -(dg/dv) / (dg/drho) of the
# implicit function theorem at the computed root (not the derivative of the iteration).

_ROOT_ITERS = 16  # most needed: 8 (exponential) and 12 (power), over 6e5 random points, entries 1e-6..1e6
_E2_3 = math.exp(2.0) / 3.0  # min of e^rho / (rho^2 - rho + 1) on [1, inf)
_E_3 = math.e / 3.0  # min of e^-rho / (rho^2 - rho + 1) on (-inf, -1]


def _safeguarded_root(fun, lo: torch.Tensor, hi: torch.Tensor, poles: tuple, iters: int = _ROOT_ITERS):
    r"""Elementwise root of ``fun`` in ``[lo, hi]``, where ``fun(lo) <= 0 <= fun(hi)``.

    ``fun(x)`` returns ``(f, df)``. A step takes the Newton point when it lies in the bracket
    and moves less than half the step before last, the midpoint otherwise (the ``rtsafe``
    rule of Press et al., *Numerical Recipes*, section 9.4); the bracket then shrinks on the
    sign of ``f``. ``poles = (left, right)`` are points at or beyond the ends of the bracket
    where ``f`` may grow like a logarithm (``-inf`` / ``inf`` for none): the Newton step is
    taken in :math:`\log|x - p|` for the nearer pole :math:`p`, so it never crosses the pole
    and is exact for :math:`f = a + b \log|x - p|`. An element whose step reaches rounding
    level keeps its point. Inputs must be detached.
    """
    eps = torch.finfo(lo.dtype).eps
    one = torch.ones_like(lo)
    x = 0.5 * (lo + hi)
    f, df = fun(x)
    step_old = step = hi - lo
    done = torch.zeros_like(lo, dtype=torch.bool)
    for _ in range(iters):
        pole = torch.where(x - poles[0] <= poles[1] - x, poles[0], poles[1])
        d = x - pole
        use_log = torch.isfinite(pole) & (d != 0)
        d1 = torch.where(use_log, d, one)
        slope = torch.where(df != 0, df, one)
        logged = pole + d1 * torch.exp(torch.clamp(-f / (slope * d1), max=50))
        at_pole = use_log & (logged == pole)  # the root is within rounding of the pole
        logged = torch.where(at_pole, torch.nextafter(pole, x), logged)
        newton = torch.where(use_log, logged, x - f / slope)
        tol = 64 * eps * torch.clamp(x.abs(), min=1)
        small = ((newton - x).abs() <= tol) | (hi - lo <= tol) | at_pole
        slow = (2 * (newton - x).abs() > step_old) & ~small
        bisect = ~torch.isfinite(newton) | ~torch.isfinite(df) | (newton < lo) | (newton > hi) | slow
        step_old = step
        step = torch.where(bisect, 0.5 * (hi - lo), (newton - x).abs())
        x = torch.where(done, x, torch.where(bisect, 0.5 * (lo + hi), newton))
        done = done | (small & ~bisect) | (hi - lo <= tol)
        f, df = fun(x)
        lo = torch.where(f < 0, x, lo)
        hi = torch.where(f > 0, x, hi)
    return x


def _exp_cap(dtype) -> float:
    """Largest exponent whose ``exp`` is finite in ``dtype``, with a margin."""
    return math.log(torch.finfo(dtype).max) - 2.0


def _exp_h(rho, r, s, t):
    r"""Friberg's :math:`h(\rho)` and :math:`h'(\rho)` times :math:`e^{-|\rho|}` (same root, no overflow)."""
    a = rho.abs()
    ep, em, e0 = torch.exp(rho - a), torch.exp(-rho - a), torch.exp(-a)
    quad = rho * rho - rho + 1
    h = ((rho - 1) * r + s) * ep - (r - rho * s) * em - quad * t * e0
    dh = (rho * r + s) * ep + (r - (rho - 1) * s) * em - (2 * rho - 1) * t * e0
    return h, dh


def _exp_g(rho, r, s, t):
    r"""The function whose root the iteration finds: the sign and root of :math:`h`, in logarithms.

    With :math:`P = s_p e^\rho`, the last entry of the projection, and :math:`D = \mu e^{-\rho}`,
    minus that of the polar part (both positive inside the bracket), :math:`h/q = P - D - t`.
    This returns :math:`G = \log(P + t_- + c) - \log(D + t_+ + c)`, :math:`c = \|v\|`: nearly
    linear in :math:`\rho` where :math:`P` or :math:`D` is exponentially large, like :math:`h/(qc)`
    elsewhere, so that Newton's method takes a few steps in both regimes.
    """
    quad = rho * rho - rho + 1
    lin_p, lin_d = (rho - 1) * r + s, r - rho * s
    c = torch.sqrt(r * r + s * s + t * t)
    ninf = torch.full_like(rho, -math.inf)
    log_sp = torch.where(lin_p > 0, torch.log(torch.where(lin_p > 0, lin_p, quad) / quad), ninf)
    log_mu = torch.where(lin_d > 0, torch.log(torch.where(lin_d > 0, lin_d, quad) / quad), ninf)
    log_a, log_b = torch.log(t.clamp(max=0).neg() + c) - rho, torch.log(t.clamp(min=0) + c) + rho
    big_p, big_d = torch.logaddexp(log_sp, log_a), torch.logaddexp(log_mu, log_b)
    dsp = (r * quad - lin_p * (2 * rho - 1)) / (quad * quad)
    dmu = (-s * quad - lin_d * (2 * rho - 1)) / (quad * quad)
    g = 2 * rho + big_p - big_d
    dg = 2 + dsp * torch.exp(-big_p) - torch.exp(log_a - big_p) - dmu * torch.exp(-big_d) - torch.exp(log_b - big_d)
    return g, dg


def _exp_bracket(r, s, t, dp, dd):
    r"""An interval holding the root :math:`\rho^\star`, from upper bounds ``dp`` on
    :math:`\operatorname{dist}(v, K)` and ``dd`` on :math:`\operatorname{dist}(v, K^\circ)`.

    :math:`s_p > 0` and :math:`\mu > 0` give :math:`1 - s/r < \rho < r/s` (for :math:`r > 0`,
    :math:`s > 0`); the sign of :math:`t` and :math:`s_p, \mu \le 1.55 \|(r, s)\|` give
    :math:`e^\rho \ge t / (1.55\|(r, s)\|)` or :math:`e^{-\rho} \ge -t / (1.55\|(r, s)\|)`; and
    :math:`P \le T`, :math:`D \le U` with :math:`T, U` from ``dp``, ``dd`` bound the other side,
    linearly near the end where :math:`s_p` or :math:`\mu` vanishes and logarithmically beyond.
    """
    inf, one = torch.full_like(r, math.inf), torch.ones_like(r)
    tiny, cap = torch.finfo(r.dtype).tiny, _exp_cap(r.dtype)
    norm = torch.sqrt(r * r + s * s).clamp_min(tiny)
    r_pos, s_pos = r > 0, s > 0
    r1, s1 = torch.where(r_pos, r, one), torch.where(s_pos, s, one)
    lo0 = torch.where(r_pos, 1 - s / r1, -inf)
    hi0 = torch.where(s_pos, r / s1, inf)
    # |last entry| of the projection <= T, of the polar part <= U (with a margin for rounding)
    Dp = torch.sqrt((dp * dp - s.clamp(max=0) ** 2).clamp_min(0))
    Dd = torch.sqrt((dd * dd - r.clamp(max=0) ** 2).clamp_min(0))
    slack = 16 * torch.finfo(r.dtype).eps * torch.sqrt(r * r + s * s + t * t)
    T = (torch.minimum(Dd, t + Dp) + slack).clamp_min(tiny)
    U = (torch.minimum(Dp, Dd - t) + slack).clamp_min(tiny)
    lo_t = torch.where(t > 0, torch.log(t.clamp_min(tiny) / (1.55 * norm)), -inf)
    hi_t = torch.where(t < 0, -torch.log((-t).clamp_min(tiny) / (1.55 * norm)), inf)
    # P = r (rho - lo0) e^rho / q >= r (rho - lo0) min(e^lo0 / q(lo0), e^2/3), and >= 0.46 r e^(rho/2)
    # once rho >= max(lo0 + 1, 1)
    lo0_f = torch.where(r_pos, lo0, one)
    w_lo = torch.exp(lo0_f.clamp(max=cap)) / (lo0_f * lo0_f - lo0_f + 1)
    hi_lin = lo0_f + T / (r1 * w_lo.clamp(max=_E2_3))
    hi_log = torch.maximum(torch.maximum(lo0_f + 1, one), 2 * torch.log(T / (0.46 * r1)))
    hi_r = torch.where(r_pos, torch.minimum(hi_lin, hi_log), inf)
    # D = s (hi0 - rho) e^-rho / q, symmetrically
    hi0_f = torch.where(s_pos, hi0, -one)
    w_hi = torch.exp((-hi0_f).clamp(max=cap)) / (hi0_f * hi0_f - hi0_f + 1)
    lo_lin = hi0_f - U / (s1 * w_hi.clamp(max=_E_3))
    lo_log = torch.minimum(torch.minimum(hi0_f - 1, -one), -2 * torch.log(U / (0.15 * s1)))
    lo_s = torch.where(s_pos, torch.maximum(lo_lin, lo_log), -inf)
    lo = torch.maximum(torch.maximum(lo0, lo_t), lo_s)
    hi = torch.minimum(torch.minimum(hi0, hi_t), hi_r)
    lo = torch.where(torch.isfinite(lo), lo, -one)  # infinite only where no root is sought
    hi = torch.where(torch.isfinite(hi), hi, one)
    return torch.minimum(lo, hi), torch.maximum(lo, hi)


def _project_exp(v: torch.Tensor) -> torch.Tensor:
    r"""Projection onto the exponential cone, for rows :math:`(r, s, t)` of ``v`` (shape ``(..., 3)``).

    See :class:`ConvexLayer`'s notes for the regions and the equation in :math:`\rho`.
    """
    r, s, t = v.unbind(-1)
    rd, sd, td = r.detach(), s.detach(), t.detach()
    eps, tiny, cap = torch.finfo(v.dtype).eps, torch.finfo(v.dtype).tiny, _exp_cap(v.dtype)
    one, zero = torch.ones_like(rd), torch.zeros_like(rd)
    r_pos, s_pos = rd > 0, sd > 0
    r1, s1 = torch.where(r_pos, rd, one), torch.where(s_pos, sd, one)
    # in K: s e^(r/s) <= t; in the polar: r e^(s/r - 1) <= -t (compared in logarithms); their faces
    in_k = (s_pos & (td > 0) & (rd / s1 <= torch.log(td.clamp_min(tiny) / s1))) | (
        (sd == 0) & (rd <= 0) & (td >= 0))
    in_polar = (r_pos & (td < 0) & (sd / r1 - 1 <= torch.log((-td).clamp_min(tiny) / r1))) | (
        (rd == 0) & (sd <= 0) & (td <= 0))
    corner = (rd <= 0) & (sd <= 0) & ~in_k & ~in_polar
    general = ~(in_k | in_polar | corner)
    # points of K and of the polar next to v, and their distances: bounds for the bracket
    dp1 = torch.sqrt(rd.clamp_min(0) ** 2 + sd * sd + td.clamp(max=0) ** 2)  # (min(r, 0), 0, max(t, 0))
    tp2 = torch.exp(torch.clamp(rd / s1 + torch.log(s1), max=cap))  # (r, s, s e^(r/s))
    dp2 = torch.where(s_pos, (tp2 - td).abs(), torch.full_like(rd, math.inf))
    dd1 = torch.sqrt(rd * rd + sd.clamp_min(0) ** 2 + td.clamp_min(0) ** 2)  # (0, min(s, 0), min(t, 0))
    td2 = torch.exp(torch.clamp(sd / r1 - 1 + torch.log(r1), max=cap))  # (r, s, -r e^(s/r - 1))
    dd2 = torch.where(r_pos, (td + td2).abs(), torch.full_like(rd, math.inf))
    dp, dd = torch.minimum(dp1, dp2), torch.minimum(dd1, dd2)
    lo, hi = _exp_bracket(rd, sd, td, dp, dd)
    poles = (torch.where(r_pos, 1 - sd / r1, -math.inf), torch.where(s_pos, rd / s1, math.inf))
    rho_d = _safeguarded_root(lambda x: _exp_g(x, rd, sd, td), lo, hi, poles)
    # From rho: projection s_p (rho, 1, e^rho), polar part mu (1, 1 - rho, -e^-rho). Take the projection
    # directly or as v minus the polar part, whichever loses fewer digits (s_p or mu cancels near an end).
    quad_d = rho_d * rho_d - rho_d + 1
    lin_p, lin_d = (rho_d - 1) * rd + sd, rd - rho_d * sd
    sp_d, mu_d = lin_p / quad_d, lin_d / quad_d
    log_tp = rho_d + torch.log(torch.where(sp_d > 0, sp_d, one))
    log_td = -rho_d + torch.log(torch.where(mu_d > 0, mu_d, one))
    valid_p = general & (sp_d > 0) & (log_tp < cap) & torch.isfinite(rho_d)
    valid_d = general & (mu_d > 0) & (log_td < cap) & torch.isfinite(rho_d)
    vp_d = torch.stack([rho_d * sp_d, sp_d, torch.exp(torch.where(valid_p, log_tp, zero))], -1)
    vd_d = torch.stack([mu_d, (1 - rho_d) * mu_d, -torch.exp(torch.where(valid_d, log_td, zero))], -1)
    nv = torch.linalg.vector_norm(v.detach(), dim=-1)
    cond_p = ((rho_d - 1).abs() * rd.abs() + sd.abs() + rho_d.abs() * rd.abs()) / lin_p.abs().clamp_min(tiny)
    cond_d = (rd.abs() + 2 * rho_d.abs() * sd.abs()) / lin_d.abs().clamp_min(tiny)
    err_p = cond_p * torch.linalg.vector_norm(vp_d, dim=-1)
    err_d = nv + cond_d * torch.linalg.vector_norm(vd_d, dim=-1)
    by_p = valid_p & (~valid_d | (err_p <= err_d))
    by_d = valid_d & ~by_p
    dist = torch.where(by_p, torch.linalg.vector_norm(v.detach() - vp_d, dim=-1),
                       torch.linalg.vector_norm(vd_d, dim=-1))
    use_root = (by_p | by_d) & (dist <= dp + 16 * eps * nv)  # the root's point, unless a heuristic one is nearer
    by_p, by_d = by_p & use_root, by_d & use_root
    # the differentiable Newton step (harmless values where the root is not used)
    _, dh_d = _exp_h(rho_d, rd, sd, td)
    rho_s = torch.where(use_root, rho_d, zero)
    h, _ = _exp_h(rho_s, r, s, t)
    rho = torch.where(use_root, rho_s - h / torch.where(use_root & (dh_d != 0), dh_d, one), zero)
    quad = rho * rho - rho + 1
    sp = torch.where(by_p, ((rho - 1) * r + s) / quad, one).clamp_min(tiny)
    mu = torch.where(by_d, (r - rho * s) / quad, one).clamp_min(tiny)
    root_p = torch.stack([rho * sp, sp, torch.exp(torch.where(by_p, rho, zero) + torch.log(sp))], -1)
    root_d = v - torch.stack([mu, (1 - rho) * mu, -torch.exp(torch.where(by_d, -rho, zero) + torch.log(mu))], -1)
    root = torch.where(by_p.unsqueeze(-1), root_p, root_d)
    # otherwise the nearer heuristic point of K (s e^(r/s) evaluated only where it is used)
    use_p2 = s_pos & (dp2 < dp1)
    s_h, r_h = torch.where(use_p2, s, one), torch.where(use_p2, r, zero)
    near = torch.where(
        use_p2.unsqueeze(-1),
        torch.stack([r, s, torch.exp(torch.clamp(r_h / s_h + torch.log(s_h), max=cap))], -1),
        torch.stack([r.clamp(max=0), torch.zeros_like(s), t.clamp_min(0)], -1),
    )
    out = torch.where(use_root.unsqueeze(-1), root, near)
    out = torch.where(corner.unsqueeze(-1), torch.stack([r, torch.zeros_like(s), t.clamp_min(0)], -1), out)
    out = torch.where(in_polar.unsqueeze(-1), torch.zeros_like(v), out)
    return torch.where(in_k.unsqueeze(-1), v, out)


def _power_x(r, x0, az, alpha):
    r"""Hien's :math:`x_i(r) = \tfrac12\big(x_{0,i} + \sqrt{x_{0,i}^2 + 4\alpha_i r(|z_0| - r)}\big)`
    (in a cancellation-free form for :math:`x_{0,i} < 0`) and :math:`x_i'(r)`."""
    a = alpha * (r * (az - r)).unsqueeze(-1)
    u = x0 * x0 + 4 * a
    pos_u, neg = u > 0, x0 < 0
    q = torch.where(pos_u, torch.sqrt(torch.where(pos_u, u, torch.ones_like(u))), torch.zeros_like(u))
    x = torch.where(neg, 2 * a / torch.where(neg, q - x0, torch.ones_like(q)), 0.5 * (x0 + q))
    dx = alpha * (az - 2 * r).unsqueeze(-1) / torch.where(pos_u, q, torch.ones_like(q))
    return x, dx


def _power_psi(r, x0, az, alpha):
    r""":math:`\psi(r) = \sum_i \alpha_i \log x_i(r) - \log r` and :math:`\psi'(r)`: the sign of
    :math:`\Phi(r) = \prod_i x_i(r)^{\alpha_i} - r` on :math:`(0, |z_0|)`, with its limits at the ends."""
    x, dx = _power_x(r, x0, az, alpha)
    x_pos, r_pos = (x > 0).all(-1), r > 0
    x1 = torch.where(x > 0, x, torch.ones_like(x))
    r1 = torch.where(r_pos, r, torch.ones_like(r))
    psi = (alpha * torch.log(x1)).sum(-1) - torch.log(r1)
    psi = torch.where(r_pos, torch.where(x_pos, psi, -math.inf), math.inf)
    dpsi = (alpha * dx / x1).sum(-1) - 1 / r1
    return psi, torch.where(x_pos & r_pos, dpsi, math.nan)


def _project_power(v: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    r"""Projection onto the power cone :math:`\{(x, z): x \ge 0, \prod_i x_i^{\alpha_i} \ge |z|\}`,
    for rows ``v`` of shape ``(..., n + 1)`` and weights ``alpha`` of shape ``(..., n)`` (positive,
    summing to one). See :class:`ConvexLayer`'s notes for the regions and the equation in :math:`r`.
    """
    x0, z0 = v[..., :-1], v[..., -1]
    xd, zd = x0.detach(), z0.detach()
    az = zd.abs()
    one = torch.ones_like(xd)

    def geo(w):
        return torch.where((w > 0).all(-1), torch.exp((alpha * torch.log(torch.where(w > 0, w, one))).sum(-1)), 0.0)

    in_k = (xd >= 0).all(-1) & (geo(xd) >= az)
    in_polar = (xd <= 0).all(-1) & (geo(-xd / alpha) >= az)
    general = ~in_k & ~in_polar & (az > 0)
    # psi > 0 on (0, r*), < 0 on (r*, |z0|) (Phi is concave, Phi(0) >= 0 > Phi(|z0|)); psi has
    # logarithmic poles at 0 and |z0|, where the Newton steps are taken in log r and log(|z0| - r)
    zero = torch.zeros_like(az)
    r_d = _safeguarded_root(lambda r: tuple(-w for w in _power_psi(r, xd, az, alpha)), zero, az, (zero, az))
    psi_d, dpsi_d = _power_psi(r_d, xd, az, alpha)
    fine = torch.isfinite(psi_d) & torch.isfinite(dpsi_d) & (dpsi_d != 0)
    slope = torch.where(fine, dpsi_d, -torch.ones_like(az))
    r_next = r_d - torch.where(fine, psi_d, zero) / slope
    x_next, _ = _power_x(r_next, xd, az, alpha)
    ok = general & fine & (r_next > 0) & (r_next < az) & (x_next > 0).all(-1)
    # the differentiable Newton step (harmless values where the root is not used)
    half = torch.full_like(az, 0.5)
    r_s = torch.where(ok, r_d, half)
    x_s = torch.where(ok.unsqueeze(-1), x0, one)
    az_s = torch.where(ok, z0.abs(), torch.ones_like(az))
    psi, _ = _power_psi(r_s, x_s, az_s, alpha)
    r = torch.where(ok, r_s - psi / slope, half)
    x, _ = _power_x(r, x_s, az_s, alpha)
    root = torch.cat([x, (torch.sign(zd) * r).unsqueeze(-1)], -1)
    # z0 = 0, or a root within rounding of 0 or |z0|: (x0_+, 0) or (x0_+, z0), exact to rounding
    keep_z = general & (r_d >= 0.5 * az)
    edge = torch.cat([x0.clamp_min(0), torch.where(keep_z, z0, torch.zeros_like(z0)).unsqueeze(-1)], -1)
    out = torch.where(ok.unsqueeze(-1), root, edge)
    out = torch.where(in_polar.unsqueeze(-1), torch.zeros_like(v), out)
    return torch.where(in_k.unsqueeze(-1), v, out)


def _project_exp_dual(v: torch.Tensor) -> torch.Tensor:
    r"""Projection onto the dual exponential cone, by Moreau: :math:`\Pi_{K^*}(v) = v + \Pi_K(-v)`."""
    return v + _project_exp(-v)


def _project_power_dual(v: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    r"""Projection onto the dual power cone, by Moreau: :math:`\Pi_{K^*}(v) = v + \Pi_K(-v)`."""
    return v + _project_power(-v, alpha)


class _Cones:
    r"""The cone :math:`\mathcal K^*` of the canonical program and its projection.

    Rows come in CVXPY's (and Clarabel's) order: zero cone, non-negative orthant, second-order
    cones, PSD cones (scaled upper triangles), exponential cones (triples ``(r, s, t)``), 3-d power
    cones (triples ``(x, y, z)``, one weight each) and n-d power cones (``(w_1..w_k, z)``). The
    zero cone's dual is the whole space; the non-negative, second-order and PSD cones are
    self-dual; the exponential and power cones are projected onto their duals by Moreau.
    ``rows``, the row count of the canonical ``A``, guards against a cone this class does not know.
    """

    def __init__(self, dims, rows: int | None = None):
        self.zero, self.nonneg = int(dims.zero), int(dims.nonneg)
        self.soc = [int(k) for k in dims.soc]
        self.psd = [int(k) for k in dims.psd]
        self.exp = int(getattr(dims, "exp", 0) or 0)
        weights = [[float(a), 1.0 - float(a)] for a in (getattr(dims, "p3d", None) or [])]
        weights += [[float(a) for a in np.ravel(row)] for row in (getattr(dims, "pnd", None) or [])]
        self.power = weights  # the weights of each power cone, 3-d ones as (alpha, 1 - alpha)
        self.psd_index = [_svec_indices(k) for k in self.psd]
        self.exp_start = self.zero + self.nonneg + sum(self.soc) + sum(k * (k + 1) // 2 for k in self.psd)
        self.power_start = self.exp_start + 3 * self.exp
        self.size = self.power_start + sum(len(w) + 1 for w in weights)
        # power cones grouped by dimension, each group projected in one batched call
        starts = np.cumsum([0] + [len(w) + 1 for w in weights])[:-1]
        self.power_groups, order = [], []
        for n in sorted({len(w) for w in weights}):
            members = [i for i, w in enumerate(weights) if len(w) == n]
            index = np.stack([starts[i] + np.arange(n + 1) for i in members]).astype(np.int64)
            self.power_groups.append((index, np.array([weights[i] for i in members])))
            order.append(index.ravel())
        self.power_order = np.argsort(np.concatenate(order)) if order else np.zeros(0, dtype=np.int64)
        if rows is not None and rows != self.size:
            raise NotImplementedError(
                f"ConvexLayer: the canonical cone program has {rows} cone rows but the cones this layer "
                f"supports (zero, non-negative, second-order, PSD, exponential, power) account for "
                f"{self.size} ({dims}); it has a cone that ConvexLayer cannot project onto."
            )

    @property
    def polyhedral(self) -> bool:
        return not (self.soc or self.psd or self.exp or self.power)

    def project_dual(self, v: torch.Tensor) -> torch.Tensor:
        r""":math:`\Pi_{\mathcal K^*}(v)` for one problem's ``v`` of shape ``(m,)``."""
        parts = [v[: self.zero], v[self.zero: self.zero + self.nonneg].clamp_min(0)]
        start = self.zero + self.nonneg
        for k in self.soc:
            parts.append(_project_soc(v[start: start + k]))
            start += k
        for k, (rows, cols) in zip(self.psd, self.psd_index):
            size = k * (k + 1) // 2
            parts.append(_psd_svec(v[start: start + size], k, rows, cols))
            start += size
        if self.exp:
            block = v[self.exp_start: self.power_start].reshape(self.exp, 3)
            parts.append(_project_exp_dual(block).reshape(-1))
        if self.power:
            power = v[self.power_start:]
            done = []
            for index, alpha in self.power_groups:
                idx = torch.as_tensor(index, device=v.device)
                done.append(_project_power_dual(power[idx], torch.as_tensor(alpha, dtype=v.dtype, device=v.device)))
            flat = torch.cat([d.reshape(-1) for d in done])
            parts.append(flat[torch.as_tensor(self.power_order, device=v.device)])
        return torch.cat(parts)


def _psd_svec(vec: torch.Tensor, k: int, rows: list, cols: list) -> torch.Tensor:
    """Project a scaled upper-triangle vector onto the PSD cone, in the same format."""
    r = torch.tensor(rows, device=vec.device)
    c = torch.tensor(cols, device=vec.device)
    off = (r != c).to(vec.dtype)
    scale = 1 + off * (math.sqrt(0.5) - 1)  # 1/sqrt(2) off the diagonal
    vals = vec * scale
    X = torch.zeros(k, k, dtype=vec.dtype, device=vec.device)
    X = X.index_put((r, c), vals).index_put((c, r), vals)
    Y = _ProjectPSD.apply(X)[0]
    return Y[r, c] / scale


# ----------------------------------------------------------------------------- the layer
