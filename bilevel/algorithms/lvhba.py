r"""LV-HBA: proximal Lagrangian value function, Hessian-free, for coupled inner constraints."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .._tree import tree_flatten, tree_leaves, tree_unflatten
from ._base import State, StepInfo
from ._constraint_set import ConstraintProjection
from ._single_loop import (
    SingleLoop, check_constraint_value, power_schedule, shared_args, step_report, tree_sq_norm, value_and_grads,
)


@shared_args
@dataclass(frozen=True)
class LVHBA(SingleLoop):
    r"""LV-HBA: bilevel problems whose lower level has constraints coupling both levels.

    .. math::

        \min_{x \in X,\, y \in Y} F(x, y) \quad\text{s.t.}\quad
        y \in \arg\min_{y' \in Y} \{ f(x, y') : g(x, y') \le 0 \},

    :math:`f` and :math:`g` convex in :math:`y`, :math:`g` passed as
    ``bilevel.solve(..., constraints=g)``.  The proximal Lagrangian value function

    .. math:: v_\gamma(x, y, z) = \min_{\theta \in Y} \max_{\lambda \ge 0}\ f(x, \theta)
              + \lambda^\top g(x, \theta) + \tfrac{1}{2\gamma_1}\|\theta - y\|^2
              - \tfrac{1}{2\gamma_2}\|\lambda - z\|^2

    makes lower-level optimality the smooth constraint :math:`f(x, y) - v_\gamma \le 0`,
    penalized with :math:`c_k = c (k+1)^p`.  One iteration (gradients only):

    .. math::

        \theta &\leftarrow P_Y\bigl(\theta - \eta[\nabla_y f(x, \theta) + \textstyle\sum_i \lambda_i
                 \nabla_y g_i(x, \theta) + (\theta - y)/\gamma_1]\bigr), \quad
        \lambda \leftarrow \max\bigl(\lambda - \eta[-g(x, \theta) + (\lambda - z)/\gamma_2], 0\bigr) \\
        d_x &= \nabla_x F(x, y)/c_k + \nabla_x f(x, y) - \nabla_x f(x, \theta)
               - \textstyle\sum_i \lambda_i \nabla_x g_i(x, \theta) \\
        d_y &= \nabla_y F(x, y)/c_k + \nabla_y f(x, y) - (y - \theta)/\gamma_1 \\
        (x, y) &\leftarrow P_C\bigl((x, y) - \alpha (d_x, d_y)\bigr), \quad
        z \leftarrow P_{[0, r]}\bigl(z - \beta (z - \lambda)/\gamma_2\bigr),

    with :math:`C = \{(x, y) \in X \times Y : g(x, y) \le 0\}`.  :math:`P_C` is the
    user's ``projection`` when given (or the problem's ``data["project"]``), else
    computed: exactly for affine :math:`g` (a small QP solved on its dual in
    torch), by sequential linearization for convex :math:`g`.  Infeasible
    constraints are reported.

    **Defaults** follow the problem rather than constants (the method converges
    only in a band of step sizes that depends on the curvature of :math:`f` and on
    the scale of :math:`\nabla g`): from :math:`L_f = \|\nabla^2_{yy} f\|` and
    :math:`J = \|\partial_y g\|_2` at the start, :math:`\gamma_1 = \gamma_2 = 1/L_f`,
    :math:`\eta = \mu/\ell^2` with :math:`\mu = 1/\gamma_1` and
    :math:`\ell = L_f + 1/\gamma_1 + J` (the step of a stable gradient
    descent-ascent on the :math:`(\theta, \lambda)` saddle), and
    :math:`\alpha = \beta = \min(\eta/2,\ \tfrac12 / (\|\nabla^2 F\|/c + \|\nabla^2 f\| + 1/\gamma_1))`,
    so that :math:`(x, y)` moves slower than :math:`(\theta, \lambda)` tracks
    the saddle.  On problem L they give the paper's :math:`\gamma = 1`,
    :math:`\eta \approx 0.1`, :math:`\alpha = \beta \approx 0.05`.

    Where the coupled constraint is inactive at the solution, :math:`y` carries the
    bias of the value-function penalty, shrinking like :math:`1/c_k` (as for MEHA):
    on :math:`F = \tfrac12\|x - 1\|^2 + \tfrac12\|y - 1\|^2`,
    :math:`f = \tfrac12\|y - 0.2\|^2`, :math:`y \le x` (:math:`x^\star = 1`,
    :math:`y^\star = 0.2`), :math:`|y - y^\star|` is 0.16, 0.11 and 0.074 after
    1000, 5000 and 20 000 steps while :math:`x` is exact; ``history["inner_residual"]``
    shows it.

    The arguments from ``outer_optimizer`` on are those of every single-loop
    method, but ``outer_optimizer`` must take plain gradient steps (``"sgd"``):
    the :math:`(x, y)` step is projected onto :math:`C` as a pair, and another
    rule for :math:`x` (Adam's preconditioner, momentum) moves the fixed points
    away from the KKT points, so it is refused; :doc:`/guide` ("Single-loop and aggregation methods") explains the
    warm-up, the curvature re-estimates and the back-offs.  Here the warm-up and
    the re-estimates are off by default: lower-level steps that ignore the
    constraints :math:`g` would leave :math:`C`, and the derived steps are kept
    for the whole run (the state is still saved, and a slow divergence looked
    for, every 25 steps: with ``lr=3`` on problem L, ten times the derived step,
    :math:`\|x\|` crept to 880 in 2000 steps without a warning; now a back-off
    at step 125 brings it to :math:`x^\star`).

    Args:
        lr: :math:`\alpha` (``None``: derived).
        beta, eta, gamma1, gamma2: as above (``None``: derived).
        c, p: penalty schedule :math:`c_k = c (k+1)^p` (defaults 1, 0.3).
        r: bound of the multiplier proxy :math:`z` (default 1e3).
        projection: optional exact projection ``(x, y) -> (x, y)`` onto :math:`C`, or
            onto :math:`\{g \le 0\}` alone: with an ``x_set`` or ``y_set`` it is combined
            with their projections by Dykstra's algorithm (the projection onto the
            intersection; applying one after the other is not, and left :math:`y`
            above :math:`x` on problem L).
        {single_loop_args}

    References:
        Yao, W., Yu, C., Zeng, S. and Zhang, J. `Constrained Bi-Level
        Optimization: Proximal Lagrangian Value Function Approach and
        Hessian-free Algorithm <https://arxiv.org/abs/2401.16164>`_. ICLR 2024.

    Example:
        >>> import bilevel
        >>> p = bilevel.problems.coupled_constraint()           # x* = y* = 0.5 e, y <= x active
        >>> r = bilevel.solve(p, method="lvhba", max_steps=700, progress=False)
        >>> round(float(r.x.mean()), 1), round(float(r.y.mean()), 1), bool((r.y <= r.x).all())
        (0.5, 0.5, True)
    """

    handles_constraints = True
    _backoff_scope = "the joint (x, y) step alpha, and beta where it follows alpha, shrink alike"

    beta: Optional[float] = None
    eta: Optional[float] = None
    gamma1: Optional[float] = None
    gamma2: Optional[float] = None
    c: float = 1.0
    p: float = 0.3
    r: float = 1e3
    projection: Optional[Callable] = None
    warmup: int = 0  # unconstrained lower-level steps would leave the feasible set
    rescale_every: int = 0

    def __post_init__(self):
        for name in ("beta", "eta", "gamma1", "gamma2"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"LVHBA: `{name}` must be positive or None; got {value!r}.")
        if not self.c > 0 or not 0 <= self.p < 1 or not self.r > 0:
            raise ValueError(f"LVHBA: need c > 0, 0 <= p < 1, r > 0; got c={self.c}, p={self.p}, r={self.r}.")

    def init(self, problem, x0=None, y0=None) -> State:
        state = super().init(problem, x0, y0)
        optimizer = state.optimizer
        plain = type(optimizer) is torch.optim.SGD and all(
            not group.get("momentum") and not group.get("weight_decay") and not group.get("maximize")
            for group in optimizer.param_groups)
        if not plain:
            raise ValueError(
                f"LVHBA: `outer_optimizer` must take plain gradient steps ('sgd', or torch.optim.SGD without "
                f"momentum or weight decay); got {self.outer_optimizer!r} ({type(optimizer).__name__}). The "
                "(x, y) step is projected onto C = {g(x, y) <= 0} as a pair: with another rule for x than for y "
                "(a preconditioner, momentum), the iteration's fixed points are no longer the problem's KKT "
                "points (Adam ends at twice x* on problem L, without a warning).")
        return state

    def setup(self, problem, state: State) -> dict:
        if problem.constraints is None:
            raise ValueError("method 'lvhba' needs lower-level constraints: pass constraints=g with g(x, y) <= 0 "
                             "(for an unconstrained lower level use 'meha').")
        xs, x_spec = tree_flatten(state.x)
        ys, y_spec = tree_flatten(state.y)
        with torch.no_grad():
            g0 = problem.constraints(state.x, state.y)
        check_constraint_value(g0)
        s = self.scales(problem, state)
        w0 = _flat(xs + ys).detach()
        n_x = sum(t.numel() for t in xs)
        jac = torch.func.jacrev(_flat_constraints(problem, xs, ys))(w0).reshape(-1, w0.numel())
        j_y = float(torch.linalg.matrix_norm(jac[:, n_x:], 2)) if jac[:, n_x:].numel() else 0.0
        lf = s["inner_y"] if s["inner_y"] > 0 else 1.0
        gamma1 = self.gamma1 if self.gamma1 is not None else 1.0 / lf
        gamma2 = self.gamma2 if self.gamma2 is not None else gamma1
        mu = min(1.0 / gamma1, 1.0 / gamma2)
        ell = max(lf + 1.0 / gamma1, 1.0 / gamma2) + j_y
        eta = self.eta if self.eta is not None else mu / ell**2
        alpha = min(eta / 2, 0.5 / (s["outer_xy"] / self.c + s["inner_xy"] + 1.0 / gamma1))
        beta = self.beta if self.beta is not None else (self.lr if self.lr is not None else alpha)
        extras = {
            "x_step": alpha, "beta": beta, "eta": eta, "gamma1": gamma1, "gamma2": gamma2, "scales": s,
            "constraint_norm": j_y, "theta": [t.detach().clone() for t in ys],
            "lam": torch.zeros_like(g0), "z": torch.zeros_like(g0),
        }
        # start feasible: project (x0, y0) onto C
        project = self._joint_projection(problem, state)
        new_x, new_y = project(xs, ys)
        with torch.no_grad():
            for leaf, value in zip(tree_leaves(state.x), new_x):
                leaf.copy_(value)
        state.y = tree_unflatten(new_y, y_spec)
        return extras

    def _joint_projection(self, problem, state: State):
        """``(x_leaves, y_leaves) -> (x_leaves, y_leaves)`` onto :math:`C`, built once per run."""
        cached = getattr(state, "_lvhba_projection", None)
        if cached is not None:
            return cached
        xs, x_spec = tree_flatten(state.x)
        ys, y_spec = tree_flatten(state.y)
        user = self.projection if self.projection is not None else problem.data.get("project")
        project_x, project_y = self._projections(problem, state.x, state.y)
        if user is not None:
            def by_user(x_leaves, y_leaves):
                px, py = user(tree_unflatten(list(x_leaves), x_spec), tree_unflatten(list(y_leaves), y_spec))
                return tree_leaves(px), tree_leaves(py)

            def onto_sets(x_leaves, y_leaves):
                return (project_x(x_leaves) if project_x else x_leaves), (project_y(y_leaves) if project_y else y_leaves)

            # one after the other is not the projection onto the intersection (the x_set clip
            # undid half of the user's move: y stalled above x on problem L with an x_set)
            project = dykstra(by_user, onto_sets) if (project_x or project_y) else by_user
        else:
            examples = [t.detach() for t in xs + ys]
            g_flat = _flat_constraints(problem, xs, ys)

            def simple(w):
                parts = _unflat(w, examples)
                px, py = parts[: len(xs)], parts[len(xs):]
                return _flat((project_x(px) if project_x else px) + (project_y(py) if project_y else py))

            solver = ConstraintProjection(g_flat, simple if (project_x or project_y) else None, _flat(examples))

            def project(x_leaves, y_leaves):
                parts = _unflat(solver(_flat(list(x_leaves) + list(y_leaves))), examples)
                return parts[: len(xs)], parts[len(xs):]
        object.__setattr__(state, "_lvhba_projection", project)
        return project

    def update(self, problem, outer, inner, state: State, batch, project_x, project_y) -> StepInfo:
        ex = state.extras
        k = state.iteration
        c_k = power_schedule(self.c, k, self.p)
        eta, g1, g2, alpha, beta = ex["eta"], ex["gamma1"], ex["gamma2"], ex["x_step"], ex["beta"]
        xs, x_spec = tree_flatten(state.x)
        xs = [t.detach().clone() for t in xs]
        ys, y_spec = tree_flatten(state.y)
        theta, lam, z = ex["theta"], ex["lam"], ex["z"]
        constraint = problem.constraints
        shape = lam.shape

        def lagrangian(multiplier):
            def value(x, y):
                gv = constraint(x, y)
                check_constraint_value(gv, shape, k)
                return inner(x, y) + (multiplier * gv).sum()
            return value

        # (theta, lambda): one projected gradient descent-ascent step on the proximal Lagrangian
        _, _, g_theta = value_and_grads(lagrangian(lam), xs, theta, x_spec, y_spec, "y")
        with torch.no_grad():
            g_at_theta = constraint(tree_unflatten(xs, x_spec), tree_unflatten(theta, y_spec))
            check_constraint_value(g_at_theta, shape, k)
            theta = [t - eta * (g + (t - y) / g1) for t, g, y in zip(theta, g_theta, ys)]
            lam = (lam - eta * (-g_at_theta + (lam - z) / g2)).clamp_min(0)
        if project_y is not None:
            theta = project_y(theta)
        # (x, y): one projected step on F/c_k + f - v
        _, gx_theta, _ = value_and_grads(lagrangian(lam), xs, theta, x_spec, y_spec, "x")
        _, gx, gy = value_and_grads(lambda x, y: outer(x, y) / c_k + inner(x, y), xs, ys, x_spec, y_spec, "xy")
        d_x = [a - b for a, b in zip(gx, gx_theta)]
        with torch.no_grad():
            d_y = [g - (y - t) / g1 for g, y, t in zip(gy, ys, theta)]
            # after a back-off: the joint step alpha (which `lr` sets) is smaller for x, as in move_x,
            # and for y alike
            x_alpha = alpha * ex.get("x_step_scale", 1.0)
            x_try = [a - x_alpha * d for a, d in zip(xs, d_x)] if self.outer_optimizer == "sgd" else None
            y_try = [a - x_alpha * d for a, d in zip(ys, d_y)]
        if x_try is None:  # a custom optimizer moves x; project the pair afterwards
            self.move_x(state, d_x, alpha, None)
            x_try = [t.detach() for t in tree_leaves(state.x)]
        new_x, new_y = self._joint_projection(problem, state)(x_try, y_try)
        with torch.no_grad():
            for leaf, value in zip(tree_leaves(state.x), new_x):
                leaf.copy_(value)
            if self.beta is None:  # beta follows `lr` (or the derived alpha): it backs off with it
                beta = beta * ex.get("x_step_scale", 1.0)
            z = (z - beta * (z - lam) / g2).clamp(0, self.r)
        state.y = tree_unflatten(list(new_y), y_spec)
        ex.update(theta=theta, lam=lam, z=z)
        with torch.no_grad():
            violation = constraint(state.x, state.y).clamp_min(0).max()
            gap = torch.sqrt(tree_sq_norm([y - t for y, t in zip(ys, theta)])) / g1
        return step_report(outer, state, d_x, torch.maximum(gap, violation), scale=c_k)


def _flat_constraints(problem, xs, ys) -> Callable[[torch.Tensor], torch.Tensor]:
    """``w -> g(x, y).reshape(-1)`` on the concatenation ``w`` of the leaves of ``x`` and ``y``."""
    examples = [t.detach() for t in xs + ys]
    x_spec, y_spec = tree_flatten(problem.x0)[1], tree_flatten(problem.y0)[1]

    def g_flat(w):
        parts = _unflat(w, examples)
        x = tree_unflatten(parts[: len(xs)], x_spec)
        return problem.constraints(x, tree_unflatten(parts[len(xs):], y_spec)).reshape(-1)

    return g_flat


def _flat(leaves) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in leaves])


def _unflat(w: torch.Tensor, examples) -> list:
    out, start = [], 0
    for t in examples:
        out.append(w[start:start + t.numel()].reshape(t.shape))
        start += t.numel()
    return out


__all__ = ["LVHBA"]


_DYKSTRA_ITERATIONS = 200


def dykstra(first: Callable, second: Callable, iterations: int = _DYKSTRA_ITERATIONS) -> Callable:
    r"""The projection onto :math:`A \cap B` from the projections onto two closed convex sets.

    Dykstra's algorithm: from :math:`u_0 = w`, :math:`p_0 = q_0 = 0`,

    .. math::

        v_k = P_A(u_k + p_k),\quad p_{k+1} = u_k + p_k - v_k, \qquad
        u_{k+1} = P_B(v_k + q_k),\quad q_{k+1} = v_k + q_k - u_{k+1},

    converges to :math:`P_{A \cap B}(w)` (plain alternating projections reach a point
    of the intersection, but not the nearest one).  It stops once an iteration moves
    :math:`u` by at most :math:`10\,\mathrm{eps} \max(1, \|u\|_\infty)`, or after
    ``iterations``; the answer lies in :math:`B`.  Where :math:`P_A` already lands in
    :math:`B` (a projection onto the whole intersection) it stops at the second
    iteration.

    Args:
        first, second: :math:`P_A` and :math:`P_B` as maps ``(x_leaves, y_leaves) ->
            (x_leaves, y_leaves)``.
        iterations: the most iterations.

    Returns:
        The map ``(x_leaves, y_leaves) -> (x_leaves, y_leaves)`` onto :math:`A \cap B`.

    References:
        Boyle, J. P. and Dykstra, R. L. A method for finding projections onto the
        intersection of convex sets in Hilbert spaces. Lecture Notes in Statistics 37, 1986.
    """

    def project(x_leaves, y_leaves):
        n = len(x_leaves)
        u = [t.detach() for t in list(x_leaves) + list(y_leaves)]
        p = [torch.zeros_like(t) for t in u]
        q = [torch.zeros_like(t) for t in u]
        for _ in range(iterations):
            shifted = [a + b for a, b in zip(u, p)]
            vx, vy = first(shifted[:n], shifted[n:])
            v = list(vx) + list(vy)
            p = [a - b for a, b in zip(shifted, v)]
            shifted = [a + b for a, b in zip(v, q)]
            ux, uy = second(shifted[:n], shifted[n:])
            new = list(ux) + list(uy)
            q = [a - b for a, b in zip(shifted, new)]
            moved, size = (float(torch.cat(parts).abs().max()) for parts in (  # one read each, all leaves
                [(a - b).reshape(-1) for a, b in zip(new, u)], [a.reshape(-1) for a in new]))
            u = new
            if moved <= 10 * torch.finfo(u[0].dtype).eps * max(1.0, size):
                break
        return u[:n], u[n:]

    return project
