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
pole), at most 16 steps, then improved by one more Newton step. Each projection is
an autograd function whose forward runs on plain tensors (its ``vmap`` rule hands
it the whole batch: no transform wraps the root finding) and returns, with the
point, its Jacobian in closed form, one small dense block per cone; ``jvp`` and
``backward`` apply that block, so the projections run under ``vmap``, ``jacfwd``
and ``jacrev`` at the cost of one plain call. The derivatives are exact: the root's
is that of the implicit function theorem,
:math:`\partial\rho/\partial v = -\partial_v h / \partial_\rho h` at the root, not the
derivative of the iteration, chained through the closed-form point.

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
# Both projections come down to one scalar equation per cone. Each is an autograd.Function
# (_ConeProjection) whose forward, on plain tensors, finds the root, the point and its Jacobian
# blocks in closed form (implicit function theorem at the root); see the module docstring.

_ROOT_ITERS = 16  # most needed: 8 (exponential) and 12 (power), over 6e5 random points, entries 1e-6..1e6
_E2_3 = math.exp(2.0) / 3.0  # min of e^rho / (rho^2 - rho + 1) on [1, inf)
_E_3 = math.e / 3.0  # min of e^-rho / (rho^2 - rho + 1) on (-inf, -1]


def _safeguarded_root(fun, lo: torch.Tensor, hi: torch.Tensor, poles: tuple, active: torch.Tensor | None = None,
                      iters: int = _ROOT_ITERS):
    r"""Elementwise root of ``fun`` in ``[lo, hi]``, where ``fun(lo) <= 0 <= fun(hi)``.

    ``fun(x)`` returns ``(f, df)``. A step takes the Newton point when it lies in the bracket
    and moves less than half the step before last, the midpoint otherwise (the ``rtsafe``
    rule of Press et al., *Numerical Recipes*, section 9.4); the bracket then shrinks on the
    sign of ``f``. ``poles = (left, right)`` are points at or beyond the ends of the bracket
    where ``f`` may grow like a logarithm (``-inf`` / ``inf`` for none): the Newton step is
    taken in :math:`\log|x - p|` for the nearer pole :math:`p`, so it never crosses the pole
    and is exact for :math:`f = a + b \log|x - p|`. An element whose step reaches rounding
    level keeps its point; the loop stops after ``iters`` steps or once every ``active``
    element (default: all) keeps its point, which changes no result (an element that keeps
    its point keeps it to the end) and costs a host sync a step on an accelerator. Inputs
    must be plain tensors (detached, under no transform).
    """
    eps = torch.finfo(lo.dtype).eps
    one = torch.ones_like(lo)
    finite = torch.isfinite(poles[0]), torch.isfinite(poles[1])
    x = 0.5 * (lo + hi)
    f, df = fun(x)
    step_old = step = hi - lo
    done = torch.zeros_like(lo, dtype=torch.bool) if active is None else ~active
    for _ in range(iters):
        if bool(done.all()):
            break
        left = x - poles[0] <= poles[1] - x
        pole = torch.where(left, poles[0], poles[1])
        d = x - pole
        use_log = torch.where(left, finite[0], finite[1]) & (d != 0)
        d1 = torch.where(use_log, d, one)
        slope = torch.where(df != 0, df, one)
        logged = pole + d1 * torch.exp(torch.clamp(-f / (slope * d1), max=50))
        at_pole = use_log & (logged == pole)  # the root is within rounding of the pole
        logged = torch.where(at_pole, torch.nextafter(pole, x), logged)
        newton = torch.where(use_log, logged, x - f / slope)
        move, width = (newton - x).abs(), hi - lo
        tol = 64 * eps * torch.clamp(x.abs(), min=1)
        narrow = width <= tol
        small = (move <= tol) | narrow | at_pole
        slow = (2 * move > step_old) & ~small
        bisect = ~torch.isfinite(newton) | ~torch.isfinite(df) | (newton < lo) | (newton > hi) | slow
        step_old = step
        step = torch.where(bisect, 0.5 * width, move)
        x = torch.where(done, x, torch.where(bisect, 0.5 * (lo + hi), newton))
        done = done | (small & ~bisect) | narrow
        f, df = fun(x)
        lo = torch.where(f < 0, x, lo)
        hi = torch.where(f > 0, x, hi)
    return x


def _apply_jacobian(J: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
    """``J @ dv`` for stacks of Jacobian blocks ``(..., d, d)`` and vectors ``(..., d)``."""
    return (J @ dv.unsqueeze(-1)).squeeze(-1)


def _batch_first(info, in_dims: tuple, v: torch.Tensor, *consts) -> tuple:
    """Inputs of a cone projection's vmap rule with the batch dim first: ``v`` (expanded if it is
    not batched) and tensor constants of one dim less per row (weights), padded to broadcast
    against it; other constants as they are."""
    v = v.movedim(in_dims[0], 0) if in_dims[0] is not None else v.expand(info.batch_size, *v.shape)
    out = []
    for c, dim in zip(consts, in_dims[1:]):
        if dim is not None:
            c = c.movedim(dim, 0)
            c = c.reshape(c.shape[:1] + (1,) * (v.dim() - c.dim()) + c.shape[1:])
        out.append(c)
    return (v, *out)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors have the same shape, dtype, device and values."""
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


class _Recent:
    """The last ``size`` results of one deterministic function of plain tensors, handed out again
    for inputs equal to earlier ones (as copies, so that no tensor is the output of two autograd
    nodes). :class:`ConvexLayer`'s backward evaluates its residual at the point that its forward
    polished, whose projections are known by then."""

    def __init__(self, size: int = 2):
        self.size, self.entries = size, []

    def __call__(self, fun, *inputs: torch.Tensor) -> tuple:
        for keys, outs in self.entries:
            if all(_same(a, b) for a, b in zip(keys, inputs)):
                return tuple(o.clone() for o in outs)
        outs = fun(*inputs)
        entry = (tuple(x.clone() for x in inputs), tuple(o.clone() for o in outs))
        self.entries = [entry, *self.entries[: self.size - 1]]
        return outs


class _ConeProjection(torch.autograd.Function):
    r"""``(p, J) = Function.apply(v, *consts, recent)``: a projection computed with its Jacobian
    blocks :math:`J = \partial p / \partial v`, one ``(d, d)`` block per row of ``v``, on plain tensors.

    Subclasses' ``forward`` computes ``(p, J)`` (through ``recent``, a :class:`_Recent`, when it is
    not ``None``). Derivatives apply ``J`` (forward mode :math:`J\,\dot v`, reverse mode
    :math:`J^\top \bar p`; the constants get none), and ``vmap`` hands ``forward`` the whole batch
    at once (it is elementwise over the leading dims), so the projection runs under ``vmap``,
    ``jacfwd`` and ``jacrev`` at the cost of one plain call. ``J`` is a non-differentiable output:
    the projection's second derivatives are not available (its derivative is taken as constant).
    """

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, J = output
        ctx.mark_non_differentiable(J)
        ctx.save_for_backward(J)
        ctx.save_for_forward(J)

    @staticmethod
    def jvp(ctx, dv, *_):
        (J,) = ctx.saved_tensors
        return (torch.zeros(J.shape[:-1], dtype=J.dtype, device=J.device) if dv is None
                else _apply_jacobian(J, dv)), None

    @staticmethod
    def backward(ctx, dp, _dJ):
        (J,) = ctx.saved_tensors
        return (_apply_jacobian(J.mT, dp), *([None] * (len(ctx.needs_input_grad) - 1)))


class _ProjectExp(_ConeProjection):
    r""":math:`\Pi_{K_{\exp}}` with its Jacobian blocks (:func:`_exp_projection`)."""

    @staticmethod
    def forward(v, recent):
        return _exp_projection(v) if recent is None else recent(_exp_projection, v)

    @staticmethod
    def vmap(info, in_dims, v, recent):
        return _ProjectExp.apply(*_batch_first(info, in_dims, v, recent)), (0, 0)


class _ProjectPower(_ConeProjection):
    r""":math:`\Pi_{K_\alpha}` with its Jacobian blocks (:func:`_power_projection`); no derivative in
    the weights."""

    @staticmethod
    def forward(v, alpha, recent):
        return _power_projection(v, alpha) if recent is None else recent(_power_projection, v, alpha)

    @staticmethod
    def vmap(info, in_dims, v, alpha, recent):
        return _ProjectPower.apply(*_batch_first(info, in_dims, v, alpha, recent)), (0, 0)


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


def _exp_h_dv(rho):
    r"""The gradient in :math:`(r, s, t)` of :math:`h(\rho)\,e^{-|\rho|}` (:math:`h` is linear in them):
    :math:`e^{-|\rho|}\big((\rho - 1) e^\rho - e^{-\rho},\ e^\rho + \rho e^{-\rho},\ -(\rho^2 - \rho + 1)\big)`."""
    a = rho.abs()
    ep, em, e0 = torch.exp(rho - a), torch.exp(-rho - a), torch.exp(-a)
    return torch.stack([(rho - 1) * ep - em, ep + rho * em, -(rho * rho - rho + 1) * e0], -1)


def _exp_g(r, s, t):
    r"""The function whose root the iteration finds, as ``g(rho) -> (G, G')``: the sign and root of
    :math:`h`, in logarithms (the terms that do not depend on :math:`\rho` computed once).

    With :math:`P = s_p e^\rho`, the last entry of the projection, and :math:`D = \mu e^{-\rho}`,
    minus that of the polar part (both positive inside the bracket), :math:`h/q = P - D - t`.
    :math:`G = \log(P + t_- + c) - \log(D + t_+ + c)`, :math:`c = \|v\|`, is nearly linear in
    :math:`\rho` where :math:`P` or :math:`D` is exponentially large, like :math:`h/(qc)` elsewhere,
    so that Newton's method takes a few steps in both regimes.
    """
    c = torch.sqrt(r * r + s * s + t * t)
    log_tm, log_tp, neg_s = torch.log(t.clamp(max=0).neg() + c), torch.log(t.clamp(min=0) + c), -s

    def g(rho):
        quad, dquad = rho * rho - rho + 1, 2 * rho - 1
        lin_p, lin_d = (rho - 1) * r + s, r - rho * s
        pos_p, pos_d = lin_p > 0, lin_d > 0
        log_sp = torch.where(pos_p, torch.log(torch.where(pos_p, lin_p, quad) / quad), -math.inf)
        log_mu = torch.where(pos_d, torch.log(torch.where(pos_d, lin_d, quad) / quad), -math.inf)
        log_a, log_b = log_tm - rho, log_tp + rho
        big_p, big_d = torch.logaddexp(log_sp, log_a), torch.logaddexp(log_mu, log_b)
        quad2 = quad * quad
        dsp = (r * quad - lin_p * dquad) / quad2
        dmu = (neg_s * quad - lin_d * dquad) / quad2
        value = 2 * rho + big_p - big_d
        slope = (2 + dsp * torch.exp(-big_p) - torch.exp(log_a - big_p)
                 - dmu * torch.exp(-big_d) - torch.exp(log_b - big_d))
        return value, slope

    return g
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


def _exp_regions(r, s, t):
    r"""Masks of the points in :math:`K_{\exp}` (:math:`s e^{r/s} \le t`, compared in logarithms, and its
    face :math:`s = 0, r \le 0, t \ge 0`), in the polar (:math:`r e^{s/r - 1} \le -t`, and its face) and in
    the corner :math:`r \le 0, s \le 0` outside both, whose projection is :math:`(r, 0, t_+)`."""
    tiny, one = torch.finfo(r.dtype).tiny, torch.ones_like(r)
    r_pos, s_pos = r > 0, s > 0
    r1, s1 = torch.where(r_pos, r, one), torch.where(s_pos, s, one)
    in_k = (s_pos & (t > 0) & (r / s1 <= torch.log(t.clamp_min(tiny) / s1))) | ((s == 0) & (r <= 0) & (t >= 0))
    in_polar = (r_pos & (t < 0) & (s / r1 - 1 <= torch.log((-t).clamp_min(tiny) / r1))) | (
        (r == 0) & (s <= 0) & (t <= 0))
    corner = (r <= 0) & (s <= 0) & ~in_k & ~in_polar
    return in_k, in_polar, corner


def _exp_distances(r, s, t):
    r"""Distances from :math:`v` to two points of :math:`K_{\exp}`, :math:`(\min(r, 0), 0, t_+)` and
    :math:`(r, s, s e^{r/s})` (``inf`` for :math:`s \le 0`), and an upper bound on its distance to the
    polar, from :math:`(0, \min(s, 0), \min(t, 0))` and :math:`(r, s, -r e^{s/r - 1})`: ``(dp1, dp2, dd)``."""
    cap, one = _exp_cap(r.dtype), torch.ones_like(r)
    r_pos, s_pos = r > 0, s > 0
    r1, s1 = torch.where(r_pos, r, one), torch.where(s_pos, s, one)
    dp1 = torch.sqrt(r.clamp_min(0) ** 2 + s * s + t.clamp(max=0) ** 2)
    tp2 = torch.exp(torch.clamp(r / s1 + torch.log(s1), max=cap))
    dp2 = torch.where(s_pos, (tp2 - t).abs(), torch.full_like(r, math.inf))
    dd1 = torch.sqrt(r * r + s.clamp_min(0) ** 2 + t.clamp_min(0) ** 2)
    td2 = torch.exp(torch.clamp(s / r1 - 1 + torch.log(r1), max=cap))
    dd2 = torch.where(r_pos, (t + td2).abs(), torch.full_like(r, math.inf))
    return dp1, dp2, torch.minimum(dd1, dd2)


def _exp_root_point(v, rho_d, general, dp):
    r"""The projection from Friberg's root :math:`\rho`, its Jacobian, and where it is used.

    The point is :math:`s_p(\rho)\,(\rho, 1, e^\rho)` or, equivalently, :math:`v` minus the polar part
    :math:`\mu(\rho)\,(1, 1 - \rho, -e^{-\rho})`, whichever loses fewer digits (:math:`s_p` or :math:`\mu`
    cancels near an end), from :math:`\rho` = the root ``rho_d`` improved by one Newton step on
    :math:`h`; it is used where it is valid and no farther from :math:`v` than a heuristic point of
    :math:`K_{\exp}` (at distance ``dp``). :math:`h(\rho, v) = 0` and the implicit function theorem give
    :math:`\partial\rho/\partial v = -\nabla_v h / h'(\rho)`; with :math:`q = \rho^2 - \rho + 1`,
    :math:`s_p = ((\rho - 1) r + s)/q` and :math:`\mu = (r - \rho s)/q`,

    .. math::

        \mathrm d s_p = \big((\rho - 1, 1, 0)\cdot\mathrm dv + (r - (2\rho - 1) s_p)\,\mathrm d\rho\big)/q, \qquad
        \mathrm d\mu = \big((1, -\rho, 0)\cdot\mathrm dv - (s + (2\rho - 1)\mu)\,\mathrm d\rho\big)/q,

    and the product rule gives the Jacobian of either form. Returns ``(point, J, use_root)``.
    """
    r, s, t = v.unbind(-1)
    eps, tiny, cap = torch.finfo(v.dtype).eps, torch.finfo(v.dtype).tiny, _exp_cap(v.dtype)
    one, zero = torch.ones_like(r), torch.zeros_like(r)
    # the two forms at the root, and the rounding error each would carry
    quad_d = rho_d * rho_d - rho_d + 1
    lin_p, lin_d = (rho_d - 1) * r + s, r - rho_d * s
    sp_d, mu_d = lin_p / quad_d, lin_d / quad_d
    log_tp = rho_d + torch.log(torch.where(sp_d > 0, sp_d, one))
    log_td = -rho_d + torch.log(torch.where(mu_d > 0, mu_d, one))
    valid_p = general & (sp_d > 0) & (log_tp < cap) & torch.isfinite(rho_d)
    valid_d = general & (mu_d > 0) & (log_td < cap) & torch.isfinite(rho_d)
    vp_d = torch.stack([rho_d * sp_d, sp_d, torch.exp(torch.where(valid_p, log_tp, zero))], -1)
    vd_d = torch.stack([mu_d, (1 - rho_d) * mu_d, -torch.exp(torch.where(valid_d, log_td, zero))], -1)
    nv = torch.linalg.vector_norm(v, dim=-1)
    cond_p = ((rho_d - 1).abs() * r.abs() + s.abs() + rho_d.abs() * r.abs()) / lin_p.abs().clamp_min(tiny)
    cond_d = (r.abs() + 2 * rho_d.abs() * s.abs()) / lin_d.abs().clamp_min(tiny)
    err_p = cond_p * torch.linalg.vector_norm(vp_d, dim=-1)
    err_d = nv + cond_d * torch.linalg.vector_norm(vd_d, dim=-1)
    by_p = valid_p & (~valid_d | (err_p <= err_d))
    by_d = valid_d & ~by_p
    dist = torch.where(by_p, torch.linalg.vector_norm(v - vp_d, dim=-1), torch.linalg.vector_norm(vd_d, dim=-1))
    use_root = (by_p | by_d) & (dist <= dp + 16 * eps * nv)  # the root's point, unless a heuristic one is nearer
    by_p, by_d = by_p & use_root, by_d & use_root
    # one more Newton step (harmless values where the root is not used)
    _, dh_d = _exp_h(rho_d, r, s, t)
    rho_s = torch.where(use_root, rho_d, zero)
    slope = torch.where(use_root & (dh_d != 0), dh_d, one)
    h, _ = _exp_h(rho_s, r, s, t)
    rho = torch.where(use_root, rho_s - h / slope, zero)
    quad, dquad = rho * rho - rho + 1, 2 * rho - 1
    sp_raw = torch.where(by_p, ((rho - 1) * r + s) / quad, one)
    mu_raw = torch.where(by_d, (r - rho * s) / quad, one)
    sp, mu = sp_raw.clamp_min(tiny), mu_raw.clamp_min(tiny)
    tp = torch.exp(torch.where(by_p, rho, zero) + torch.log(sp))  # s_p e^rho
    tm = torch.exp(torch.where(by_d, -rho, zero) + torch.log(mu))  # mu e^-rho
    point_p = torch.stack([rho * sp, sp, tp], -1)
    point_d = v - torch.stack([mu, (1 - rho) * mu, -tm], -1)
    point = torch.where(by_p.unsqueeze(-1), point_p, point_d)
    # the Jacobian: d rho / dv by the implicit function theorem, then the product rule
    drho = -_exp_h_dv(rho_s) / slope.unsqueeze(-1)
    dsp = (torch.stack([rho - 1, one, zero], -1) + (r - dquad * sp_raw).unsqueeze(-1) * drho) / quad.unsqueeze(-1)
    dmu = (torch.stack([one, -rho, zero], -1) - (s + dquad * mu_raw).unsqueeze(-1) * drho) / quad.unsqueeze(-1)
    dsp = torch.where((sp_raw >= tiny).unsqueeze(-1), dsp, 0.0)  # clamped: constant
    dmu = torch.where((mu_raw >= tiny).unsqueeze(-1), dmu, 0.0)
    sp, mu, tp, tm, rho = (x.unsqueeze(-1) for x in (sp, mu, tp, tm, rho))
    J_p = torch.stack([sp * drho + rho * dsp, dsp, tp * (drho + dsp / sp)], -2)
    J_d = torch.eye(3, dtype=v.dtype, device=v.device) - torch.stack(
        [dmu, (1 - rho) * dmu - mu * drho, tm * (drho - dmu / mu)], -2)
    J = torch.where(by_p[..., None, None], J_p, J_d)
    return point, J, use_root


def _exp_near_point(r, s, t, dp1, dp2):
    r"""The nearer of the points :math:`(\min(r, 0), 0, t_+)` and :math:`(r, s, s e^{r/s})` of :math:`K_{\exp}`
    (see :func:`_exp_distances`), with its Jacobian: where the root's point is not used."""
    cap, one, zero = _exp_cap(r.dtype), torch.ones_like(r), torch.zeros_like(r)
    use_p2 = (s > 0) & (dp2 < dp1)
    s_h, r_h = torch.where(use_p2, s, one), torch.where(use_p2, r, zero)
    expo = r_h / s_h + torch.log(s_h)
    tp2 = torch.exp(expo.clamp(max=cap))
    point = torch.where(use_p2.unsqueeze(-1), torch.stack([r, s, tp2], -1),
                        torch.stack([r.clamp(max=0), zero, t.clamp_min(0)], -1))
    d = torch.where(expo <= cap, tp2 / s_h, zero)  # d (s e^(r/s)) / dr; / ds is d (1 - r/s)
    J_p2 = torch.stack([torch.stack([one, zero, zero], -1), torch.stack([zero, one, zero], -1),
                        torch.stack([d, d * (1 - r_h / s_h), zero], -1)], -2)
    J_face = torch.diag_embed(torch.stack([(r <= 0).to(r.dtype), zero, (t >= 0).to(r.dtype)], -1))
    return point, torch.where(use_p2[..., None, None], J_p2, J_face)


def _exp_projection(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`\Pi_{K_{\exp}}(v)` and its Jacobian blocks, for plain rows :math:`(r, s, t)` of ``v`` (shape
    ``(..., 3)``): ``v`` in :math:`K_{\exp}` (Jacobian :math:`I`), :math:`0` in the polar, :math:`(r, 0, t_+)` in
    the corner, otherwise the point of Friberg's root (:func:`_exp_root_point`) or, where that is not
    nearer, a heuristic point (:func:`_exp_near_point`)."""
    r, s, t = v.unbind(-1)
    in_k, in_polar, corner = _exp_regions(r, s, t)
    general = ~(in_k | in_polar | corner)
    dp1, dp2, dd = _exp_distances(r, s, t)
    dp = torch.minimum(dp1, dp2)
    lo, hi = _exp_bracket(r, s, t, dp, dd)
    one = torch.ones_like(r)
    poles = (torch.where(r > 0, 1 - s / torch.where(r > 0, r, one), -math.inf),
             torch.where(s > 0, r / torch.where(s > 0, s, one), math.inf))
    rho_d = _safeguarded_root(_exp_g(r, s, t), lo, hi, poles, active=general)
    root, J_root, use_root = _exp_root_point(v, rho_d, general, dp)
    near, J_near = _exp_near_point(r, s, t, dp1, dp2)
    zero = torch.zeros_like(r)
    corner_point = torch.stack([r, zero, t.clamp_min(0)], -1)
    J_corner = torch.diag_embed(torch.stack([one, zero, (t >= 0).to(r.dtype)], -1))
    eye = torch.eye(3, dtype=v.dtype, device=v.device).expand_as(J_root)
    point, J = torch.where(use_root.unsqueeze(-1), root, near), torch.where(use_root[..., None, None], J_root, J_near)
    point, J = torch.where(corner.unsqueeze(-1), corner_point, point), torch.where(corner[..., None, None], J_corner, J)
    point, J = torch.where(in_polar.unsqueeze(-1), 0.0, point), torch.where(in_polar[..., None, None], 0.0, J)
    return torch.where(in_k.unsqueeze(-1), v, point), torch.where(in_k[..., None, None], eye, J)


def _project_exp(v: torch.Tensor, recent: _Recent | None = None) -> torch.Tensor:
    r"""Projection onto the exponential cone, for rows :math:`(r, s, t)` of ``v`` (shape ``(..., 3)``),
    differentiable (exactly, by :func:`_exp_projection`'s Jacobian) and vmappable; ``recent`` keeps
    the last results (see :class:`_Recent`).

    See the module docstring for the regions and the equation in :math:`\rho`.
    """
    return _ProjectExp.apply(v, recent)[0]


def _power_x(r, x0, az, alpha):
    r"""Hien's :math:`x_i(r) = \tfrac12\big(x_{0,i} + \sqrt{x_{0,i}^2 + 4\alpha_i r(|z_0| - r)}\big)`
    (in a cancellation-free form for :math:`x_{0,i} < 0`), :math:`x_i'(r)`, and :math:`q_i`, the square root."""
    a = alpha * (r * (az - r)).unsqueeze(-1)
    u = x0 * x0 + 4 * a
    pos_u, neg = u > 0, x0 < 0
    q = torch.where(pos_u, torch.sqrt(torch.where(pos_u, u, torch.ones_like(u))), torch.zeros_like(u))
    x = torch.where(neg, 2 * a / torch.where(neg, q - x0, torch.ones_like(q)), 0.5 * (x0 + q))
    dx = alpha * (az - 2 * r).unsqueeze(-1) / torch.where(pos_u, q, torch.ones_like(q))
    return x, dx, q


def _power_psi(r, x0, az, alpha):
    r""":math:`\psi(r) = \sum_i \alpha_i \log x_i(r) - \log r` and :math:`\psi'(r)`: the sign of
    :math:`\Phi(r) = \prod_i x_i(r)^{\alpha_i} - r` on :math:`(0, |z_0|)`, with its limits at the ends."""
    x, dx, _ = _power_x(r, x0, az, alpha)
    x_pos, r_pos = (x > 0).all(-1), r > 0
    x1 = torch.where(x > 0, x, torch.ones_like(x))
    r1 = torch.where(r_pos, r, torch.ones_like(r))
    psi = (alpha * torch.log(x1)).sum(-1) - torch.log(r1)
    psi = torch.where(r_pos, torch.where(x_pos, psi, -math.inf), math.inf)
    dpsi = (alpha * dx / x1).sum(-1) - 1 / r1
    return psi, torch.where(x_pos & r_pos, dpsi, math.nan)


def _power_root_jacobian(r_d, slope, r, x0, az, sign, alpha):
    r"""The Jacobian of :math:`(x(r), \operatorname{sign}(z_0)\,r)` in :math:`(x_0, z_0)`, where :math:`r` is
    the root ``r_d`` improved by a Newton step of slope ``slope`` = :math:`\psi'(r_d)`.

    With :math:`q_i = \sqrt{x_{0,i}^2 + 4\alpha_i r(|z_0| - r)}`, :math:`x_i(r)` has partials
    :math:`x_i/q_i` in :math:`x_{0,i}`, :math:`\alpha_i r/q_i` in :math:`|z_0|` and
    :math:`\alpha_i(|z_0| - 2r)/q_i` in :math:`r`; so :math:`\psi` has partials :math:`\alpha_i/q_i` and
    :math:`\sum_i \alpha_i^2 r/(x_i q_i)`, and the implicit function theorem gives
    :math:`\partial r/\partial(x_0, |z_0|) = -\partial_{(x_0, |z_0|)}\psi / \psi'(r)` at the root.
    """
    x_d, _, q_d = _power_x(r_d, x0, az, alpha)
    one = torch.ones_like(q_d)
    q_d1, x_d1 = torch.where(q_d > 0, q_d, one), torch.where(x_d > 0, x_d, one)
    dr_dx0 = -(alpha / q_d1) / slope.unsqueeze(-1)
    dr_daz = -(alpha * alpha * r_d.unsqueeze(-1) / (x_d1 * q_d1)).sum(-1) / slope
    x, dx_dr, q = _power_x(r, x0, az, alpha)
    q1 = torch.where(q > 0, q, one)
    dx_dx0 = torch.diag_embed(x / q1) + dx_dr.unsqueeze(-1) * dr_dx0.unsqueeze(-2)
    dx_daz = alpha * r.unsqueeze(-1) / q1 + dx_dr * dr_daz.unsqueeze(-1)
    top = torch.cat([dx_dx0, (sign.unsqueeze(-1) * dx_daz).unsqueeze(-1)], -1)
    bottom = torch.cat([sign.unsqueeze(-1) * dr_dx0, dr_daz.unsqueeze(-1)], -1)
    return torch.cat([top, bottom.unsqueeze(-2)], -2)


def _power_projection(v: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`\Pi_{K_\alpha}(v)` and its Jacobian blocks, for plain rows ``v`` of shape ``(..., n + 1)`` and
    weights ``alpha`` of shape ``(..., n)``: ``v`` in :math:`K_\alpha` (Jacobian :math:`I`), :math:`0` in the
    polar, Hien's point :math:`(x(r), \operatorname{sign}(z_0) r)` (:func:`_power_root_jacobian`), or
    :math:`(x_{0,+}, 0)` or :math:`(x_{0,+}, z_0)` where :math:`z_0 = 0` or the root is within rounding of
    :math:`0` or :math:`|z_0|`."""
    x0, z0 = v[..., :-1], v[..., -1]
    az = z0.abs()
    one = torch.ones_like(x0)

    def geo(w):
        return torch.where((w > 0).all(-1), torch.exp((alpha * torch.log(torch.where(w > 0, w, one))).sum(-1)), 0.0)

    in_k = (x0 >= 0).all(-1) & (geo(x0) >= az)
    in_polar = (x0 <= 0).all(-1) & (geo(-x0 / alpha) >= az)
    general = ~in_k & ~in_polar & (az > 0)
    # psi > 0 on (0, r*), < 0 on (r*, |z0|) (Phi is concave, Phi(0) >= 0 > Phi(|z0|)); psi has
    # logarithmic poles at 0 and |z0|, where the Newton steps are taken in log r and log(|z0| - r)
    zero = torch.zeros_like(az)
    r_d = _safeguarded_root(lambda r: tuple(-w for w in _power_psi(r, x0, az, alpha)), zero, az, (zero, az),
                            active=general)
    psi_d, dpsi_d = _power_psi(r_d, x0, az, alpha)
    fine = torch.isfinite(psi_d) & torch.isfinite(dpsi_d) & (dpsi_d != 0)
    slope = torch.where(fine, dpsi_d, -torch.ones_like(az))
    r = r_d - torch.where(fine, psi_d, zero) / slope  # one more Newton step
    x, _, _ = _power_x(r, x0, az, alpha)
    ok = general & fine & (r > 0) & (r < az) & (x > 0).all(-1)
    sign = torch.sign(z0)
    root = torch.cat([x, (sign * r).unsqueeze(-1)], -1)
    half = torch.full_like(az, 0.5)  # harmless values where the root is not used
    x0_s, az_s = torch.where(ok.unsqueeze(-1), x0, one), torch.where(ok, az, torch.ones_like(az))
    J_root = _power_root_jacobian(torch.where(ok, r_d, half), slope, torch.where(ok, r, half), x0_s, az_s, sign, alpha)
    # z0 = 0, or a root within rounding of 0 or |z0|: (x0_+, 0) or (x0_+, z0), exact to rounding
    keep_z = general & (r_d >= 0.5 * az)
    edge = torch.cat([x0.clamp_min(0), torch.where(keep_z, z0, zero).unsqueeze(-1)], -1)
    J_edge = torch.diag_embed(torch.cat([(x0 >= 0), keep_z.unsqueeze(-1)], -1).to(v.dtype))
    point, J = torch.where(ok.unsqueeze(-1), root, edge), torch.where(ok[..., None, None], J_root, J_edge)
    point, J = torch.where(in_polar.unsqueeze(-1), 0.0, point), torch.where(in_polar[..., None, None], 0.0, J)
    eye = torch.eye(v.shape[-1], dtype=v.dtype, device=v.device)
    return torch.where(in_k.unsqueeze(-1), v, point), torch.where(in_k[..., None, None], eye, J)


def _project_power(v: torch.Tensor, alpha: torch.Tensor, recent: _Recent | None = None) -> torch.Tensor:
    r"""Projection onto the power cone :math:`\{(x, z): x \ge 0, \prod_i x_i^{\alpha_i} \ge |z|\}`,
    for rows ``v`` of shape ``(..., n + 1)`` and weights ``alpha`` of shape ``(..., n)`` (positive,
    summing to one), differentiable in ``v`` (exactly, by :func:`_power_projection`'s Jacobian) and
    vmappable; ``recent`` keeps the last results (see :class:`_Recent`). See the module docstring
    for the regions and the equation in :math:`r`.
    """
    return _ProjectPower.apply(v, alpha, recent)[0]


def _project_exp_dual(v: torch.Tensor, recent: _Recent | None = None) -> torch.Tensor:
    r"""Projection onto the dual exponential cone, by Moreau: :math:`\Pi_{K^*}(v) = v + \Pi_K(-v)`."""
    return v + _project_exp(-v, recent)


def _project_power_dual(v: torch.Tensor, alpha: torch.Tensor, recent: _Recent | None = None) -> torch.Tensor:
    r"""Projection onto the dual power cone, by Moreau: :math:`\Pi_{K^*}(v) = v + \Pi_K(-v)`."""
    return v + _project_power(-v, alpha, recent)


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
        # the last projections of each kind, reused for equal inputs (the layer's backward)
        self.recent_exp, self.recent_power = _Recent(), [_Recent() for _ in self.power_groups]
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
            parts.append(_project_exp_dual(block, self.recent_exp).reshape(-1))
        if self.power:
            power = v[self.power_start:]
            done = []
            for (index, alpha), recent in zip(self.power_groups, self.recent_power):
                idx = torch.as_tensor(index, device=v.device)
                alpha = torch.as_tensor(alpha, dtype=v.dtype, device=v.device)
                done.append(_project_power_dual(power[idx], alpha, recent))
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
