r"""MEHA: the Moreau-envelope based, single-loop, Hessian-free bilevel method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .._tree import tree_flatten, tree_leaves, tree_unflatten
from ._base import State, StepInfo
from ._single_loop import (
    STOCHASTIC_DECAYS, SingleLoop, coupled_step, power_schedule, shared_args, step_report, tree_sq_norm,
    value_and_grads,
)


@shared_args
@dataclass(frozen=True)
class MEHA(SingleLoop):
    r"""Moreau Envelope based Hessian-free Algorithm (MEHA).

    The lower level :math:`\varphi(x, y) = f(x, y) + g(x, y)` may be non-convex in
    :math:`y` (:math:`f` smooth and :math:`\rho`-weakly convex, :math:`g` convex
    with an easy proximal map, e.g. an L1 term, or absent).  Its Moreau envelope

    .. math:: v_\gamma(x, y) = \min_\theta\ \varphi(x, \theta) + \tfrac{1}{2\gamma}\|\theta - y\|^2,
              \qquad \gamma < 1/(2\rho),

    turns the bilevel problem into :math:`\min F(x, y)` s.t.
    :math:`\varphi(x, y) - v_\gamma(x, y) \le 0`, which MEHA penalizes as
    :math:`F / c_k + \varphi - v_\gamma` with :math:`c_k = c\,(k+1)^p`,
    :math:`p \in (0, 1/2)`.  One iteration:

    .. math::

        \theta &\leftarrow \operatorname{Prox}_{\eta g(x,\cdot)}\bigl(\theta - \eta[\nabla_y f(x, \theta)
                 + (\theta - y)/\gamma]\bigr) \\
        d_x &= \nabla_x F(x, y)/c_k + \nabla_x \varphi(x, y) - \nabla_x \varphi(x, \theta), \qquad
        x \leftarrow P_X(x - \alpha d_x) \\
        d_y &= \nabla_y F(x, y)/c_k + \nabla_y f(x, y) - (y - \theta)/\gamma \quad (\text{new } x), \qquad
        y \leftarrow \operatorname{Prox}_{\beta g(x,\cdot)}(y - \beta d_y).

    Only gradients are used.  For a non-convex lower level the reformulation is
    a relaxation: every lower-level *critical point* (even a maximum) is
    feasible, so MEHA finds solutions of that relaxed problem.  The history
    reports :math:`\|c_k d_x\|` (the penalty estimate of the hypergradient) and
    :math:`\|y - \theta\|/\gamma` (lower-level optimality: zero exactly when
    :math:`y` is a proximal fixed point).

    Defaults come from curvature estimates at the start point (power iteration
    with Hessian-vector products): with :math:`L_f = \|\nabla^2_{yy} f\|`,
    :math:`\gamma = \min(10/L_f, 1/(4\rho))` with :math:`\rho` the weak-convexity
    modulus seen at the start (minus the smallest Hessian eigenvalue, by Lanczos), :math:`\eta = 1/(L_f + 1/\gamma)`,
    :math:`\beta = \tfrac12 / (\|\nabla^2_{yy} F\|/c + L_f + 1/\gamma)`,
    :math:`\alpha = \min\bigl(\tfrac{1}{2\|A\|}, \tfrac{1}{8\beta\|B\|^2}\bigr)` with
    :math:`\|A\| = \|\nabla^2_{xx}F\|/c + 2\|\nabla^2_{xx}f\|`,
    :math:`\|B\| = \|\nabla^2_{xy}F\|/c + 2\|\nabla^2_{xy}f\|` (the coupled-block step of
    :func:`~bilevel.algorithms._single_loop.coupled_step`; it lets a weakly coupled
    :math:`x` move fast), and :math:`p = 0.4`.  A large
    :math:`\gamma` brings :math:`v_\gamma` close to the value function, which
    shrinks the :math:`O(1/c_k)` bias on strongly convex lower levels (on problem
    Q: 0.8 % relative error in :math:`x` after 20 000 steps, against 7.7 % with
    the paper's :math:`\gamma = 1/L_f`, :math:`p = 0.3`); on problem M1 the
    relative error is about 6e-8 after 10 000 steps.

    **Mini-batches.**  The method and its analysis are deterministic, and its steps stay
    constant with mini-batches, as in the paper's experiments.  With noisy directions
    :math:`y` and :math:`\theta` then hover around their targets, and :math:`d_x`, which
    is non-linear in them, is biased: on the per-feature penalties of logistic
    regression with batches of 32 of 284 rows, the validation loss at
    :math:`y^\star(x)` fell by 20 % in 50 steps and then rose to 57 % above the start by
    step 500.  ``stochastic=True`` decays the steps as in stochastic approximation,
    :math:`\eta_k, \beta_k \propto (k+1)^{-2/5}` and :math:`\alpha_k \propto (k+1)^{-3/5}`
    (the exponents of SOBA's analysis): there the loss falls steadily, by 14 % in 500
    steps; where the noise is mild it costs speed (hyper-cleaning with batches of 32:
    validation loss down 51 % in 500 steps against 79 % with constant steps; a ridge
    penalty fed by a ``DataLoader`` of 4 batches of 50: outer value down 10 % in 100
    steps against 65 %).

    The arguments from ``outer_optimizer`` on are those of every single-loop
    method; :doc:`/guide` ("Single-loop and aggregation methods") explains the
    warm-up, the curvature re-estimates and the back-offs.

    Args:
        lr: :math:`\alpha`, the step of :math:`x` (``None``: derived).
        beta: the step of :math:`y` (``None``: derived).
        eta: the step of :math:`\theta` (``None``: derived).
        gamma: the Moreau parameter :math:`\gamma` (``None``: derived; must be
            below :math:`1/(2\rho)` for a :math:`\rho`-weakly convex lower level).
        c, p: penalty schedule :math:`c_k = c (k+1)^p` (defaults 1, 0.4).
        nonsmooth: optional :math:`g(x, y)`, a convex lower-level term in :math:`y`.
        prox: its proximal map ``prox(y, x, step)`` :math:`= \arg\min_u g(x, u) +
            \|u - y\|^2/(2\,\text{step})` (required with ``nonsmooth``).
        stochastic: decay the steps as in stochastic approximation (default ``False``).
        {single_loop_args}

    References:
        Liu, R., Liu, Z., Yao, W., Zeng, S. and Zhang, J. `Moreau Envelope for
        Nonconvex Bi-Level Optimization: A Single-loop and Hessian-free Solution
        Strategy <https://arxiv.org/abs/2405.09927>`_. ICML 2024.

    Example:
        On problem M1 the damped implicit method settles at :math:`0.505\,e`, half-way
        to :math:`x^\star = e`; MEHA heads for :math:`e`:

        >>> import bilevel
        >>> p = bilevel.problems.nonunique_lower_level(n=5)
        >>> r = bilevel.solve(p, method="meha", max_steps=500, progress=False)
        >>> float((r.x - p.solution.x).norm() / p.solution.x.norm()) < 0.1
        True
    """

    beta: Optional[float] = None
    eta: Optional[float] = None
    gamma: Optional[float] = None
    c: float = 1.0
    p: float = 0.4
    nonsmooth: Optional[Callable] = None
    prox: Optional[Callable] = None
    stochastic: bool = False

    def __post_init__(self):
        for name in ("beta", "eta", "gamma"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"MEHA: `{name}` must be positive or None; got {value!r}.")
        if not self.c > 0 or not 0 <= self.p < 1:
            raise ValueError(f"MEHA: need c > 0 and 0 <= p < 1 (the paper: p in (0, 1/2)); got c={self.c}, p={self.p}.")
        if not isinstance(self.stochastic, bool):
            raise ValueError(f"MEHA: `stochastic` must be True or False; got {self.stochastic!r}.")
        if (self.nonsmooth is None) != (self.prox is None):
            raise ValueError("MEHA: pass `nonsmooth` (g(x, y)) and its `prox` (prox(y, x, step)) together.")

    def setup(self, problem, state: State) -> dict:
        s = self.scales(problem, state)
        lf = s["inner_y"] if s["inner_y"] > 0 else 1.0
        rho = s["inner_weak_convexity"]
        gamma = self.gamma if self.gamma is not None else min(10.0 / lf, 1.0 / (4.0 * rho) if rho > 0 else float("inf"))
        theta = [t.detach().clone() for t in tree_leaves(state.y)]
        return {"gamma": gamma, "theta": theta, "scales": s, **self.step_sizes(s, {"gamma": gamma})}

    def step_sizes(self, scales: dict, extras: dict) -> dict:
        lf = scales["inner_y"] if scales["inner_y"] > 0 else 1.0
        gamma = extras["gamma"]  # fixed for the run: it defines the reformulation
        eta = self.eta if self.eta is not None else 1.0 / (lf + 1.0 / gamma)
        y_curv = scales["outer_y"] / self.c + lf + 1.0 / gamma
        alpha = coupled_step(scales["outer_x"] / self.c + 2 * scales["inner_x"], y_curv,
                             scales["outer_cross"] / self.c + 2 * scales["inner_cross"])
        beta = self.beta if self.beta is not None else 0.5 / y_curv
        return {"x_step": alpha, "y_step": beta, "eta": eta}

    def _lower(self, inner):
        if self.nonsmooth is None:
            return inner
        return lambda x, y: inner(x, y) + self.nonsmooth(x, y)

    def _prox(self, leaves, x_leaves, x_spec, y_spec, step):
        if self.prox is None:
            return leaves
        out = self.prox(tree_unflatten(leaves, y_spec), tree_unflatten(x_leaves, x_spec), step)
        return [t.detach() for t in tree_leaves(out)]

    def update(self, problem, outer, inner, state: State, batch, project_x, project_y) -> StepInfo:
        ex = state.extras
        k = state.iteration
        c_k = power_schedule(self.c, k, self.p)
        gamma, eta, beta, alpha = ex["gamma"], ex["eta"], ex["y_step"], ex["x_step"]
        if self.stochastic:
            lower_decay, upper_decay = ((k + 1) ** -a for a in STOCHASTIC_DECAYS)
            eta, beta, alpha = eta * lower_decay, beta * lower_decay, alpha * upper_decay
        xs, x_spec = tree_flatten(state.x)
        ys, y_spec = tree_flatten(state.y)
        xs = [t.detach().clone() for t in xs]
        theta = ex["theta"]
        lower = self._lower(inner)
        # theta: one proximal-gradient step on f(x, .) + |. - y|^2 / (2 gamma)
        _, _, g_theta = value_and_grads(inner, xs, theta, x_spec, y_spec, "y")
        with torch.no_grad():
            theta = [t - eta * (g + (t - y) / gamma) for t, g, y in zip(theta, g_theta, ys)]
        theta = self._prox(theta, xs, x_spec, y_spec, eta)
        if project_y is not None:
            theta = project_y(theta)
        # x: the penalized gradient at (x_k, y_k)
        _, gx_pen, _ = value_and_grads(lambda x, y: outer(x, y) / c_k + lower(x, y), xs, ys, x_spec, y_spec, "x")
        _, gx_theta, _ = value_and_grads(lower, xs, theta, x_spec, y_spec, "x")
        d_x = [a - b for a, b in zip(gx_pen, gx_theta)]
        self.move_x(state, d_x, alpha, project_x)
        # y: at the new x
        xs_new = [t.detach() for t in tree_leaves(state.x)]
        _, _, gy = value_and_grads(lambda x, y: outer(x, y) / c_k + inner(x, y), xs_new, ys, x_spec, y_spec, "y")
        with torch.no_grad():
            ys_new = [y - beta * (g - (y - t) / gamma) for y, g, t in zip(ys, gy, theta)]
        ys_new = self._prox(ys_new, xs_new, x_spec, y_spec, beta)
        if project_y is not None:
            ys_new = project_y(ys_new)
        state.y = tree_unflatten(ys_new, y_spec)
        ex["theta"] = theta
        gap = torch.sqrt(tree_sq_norm([y - t for y, t in zip(ys, theta)])) / gamma
        return step_report(outer, state, d_x, gap, scale=c_k)


__all__ = ["MEHA"]
