r"""Proximal gradient descent (ISTA / FISTA) with backtracking, made differentiable.

The loop here also runs :class:`~bilevel.solvers.GradientDescent` (the case
:math:`g = 0`, where the proximal operator is the identity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .._tolerance import default_tol
from .._tree import tree_leaves, tree_map
from ..implicit.conditions import Condition, proximal_gradient
from ..implicit.linear_solve import LinearSolver
from .._checks import check_fields as _check_fields
from ..status import Status
from ..typing import Objective, TensorTree
from ._base import (
    COMMON_RULES,
    FlatObjective,
    Solver,
    SolverInfo,
    _positive_or_none,
    _Scale,
    check_fun,
    check_init,
    detach_args,
    is_finite,
    warm_start,
    make_info,
    nonfinite,
    warn_if_failed,
)

__all__ = ["ProximalGradient"]

_MAX_BACKTRACK = 60  # halvings of the step before the line search gives up


@dataclass(frozen=True)
class ProximalGradient(Solver):
    r"""FISTA: accelerated proximal gradient descent for :math:`\min_x f(x, \theta) + g(x, \lambda)`.

    With :math:`f` = ``fun`` (smooth), :math:`\operatorname{prox}_{\eta g}` =
    ``prox(z, prox_args, eta)`` and step :math:`\eta_k`:

    .. math::
        x_{k+1} = \operatorname{prox}_{\eta_k g}\bigl(y_k - \eta_k \nabla f(y_k)\bigr), \quad
        t_{k+1} = \tfrac{1 + \sqrt{1 + 4 t_k^2}}{2}, \quad
        y_{k+1} = x_{k+1} + \tfrac{t_k - 1}{t_{k+1}}(x_{k+1} - x_k),

    (``acceleration=False``: :math:`y_k = x_k`, ISTA).  With ``step=None`` the
    step is found by backtracking (halving) until the quadratic upper bound holds,

    .. math::
        f(x_{k+1}) \le f(y_k) + \langle\nabla f(y_k), x_{k+1} - y_k\rangle
        + \tfrac{1}{2\eta_k}\|x_{k+1} - y_k\|^2,

    or, once that bound is below the rounding error of :math:`f` (near a
    solution), the secant test :math:`\|\nabla f(x_{k+1}) - \nabla f(y_k)\| \le
    \|x_{k+1} - y_k\| / \eta_k` (so tight tolerances stay reachable),

    starting from the previous accepted step (non-increasing with acceleration;
    without it, doubled after a step accepted at once), and from
    :math:`1 / \hat L` at :math:`k = 0`, :math:`\hat L` a secant estimate of the
    curvature along :math:`\nabla f(x_0)`; so no Lipschitz constant is needed.
    The momentum restarts when :math:`\langle y_k - x_{k+1}, x_{k+1} - x_k\rangle > 0`
    (gradient restart of O'Donoghue & Candès).

    Stopping: the gradient-mapping norm
    :math:`r(y) = \|y - \operatorname{prox}_{\eta g}(y - \eta\nabla f(y))\| / \eta`
    at the returned point is at most ``tol * max(1, r(x_0))`` (see
    :mod:`bilevel.solvers`).  The differentiable call uses
    :func:`~bilevel.implicit.proximal_gradient` ``(fun, prox, stepsize=final step)``
    as the condition, so gradients flow to both ``args`` and ``prox_args``.

    Args:
        prox: ``prox(z, prox_args, scaling)``, e.g.
            :func:`~bilevel.implicit.prox.prox_lasso`; ``z`` has the structure of ``init``.
        maxiter: iteration budget (default 1000).
        tol: relative tolerance; ``None``: ``sqrt(eps)`` of the dtype.
        step: fixed step :math:`\eta` (at most ``1 / L``); ``None`` (default): backtracking.
        acceleration: FISTA momentum (default ``True``).
        implicit_solve: linear solver of the backward system (``None``: GMRES default).

    Call signatures: ``run(fun, init, *args, prox_args=None) -> (sol, info)`` and
    ``solver(fun, init, *args, prox_args=None) -> sol`` (differentiable in
    ``args`` and ``prox_args``).

    Raises:
        ValueError: a setting out of range (naming the field), a non-scalar ``fun``.
        TypeError: ``fun`` or ``prox`` not callable, ``init`` not a tree of floating tensors.
        FloatingPointError: a non-finite objective or gradient at an iterate.

    Example:
        >>> import torch
        >>> from bilevel.solvers import ProximalGradient
        >>> from bilevel.implicit.prox import prox_lasso
        >>> f = lambda w, y: 0.5 * ((w - y) ** 2).sum()      # solution: soft-threshold(y, l1reg)
        >>> y = torch.tensor([2.0, 0.5, -3.0], dtype=torch.float64)
        >>> l1reg = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        >>> w = ProximalGradient(prox_lasso)(f, torch.zeros(3, dtype=torch.float64), y, prox_args=l1reg)
        >>> w.detach().round(decimals=6).tolist()
        [1.0, 0.0, -2.0]
        >>> torch.autograd.grad(w[0], l1reg)[0].item()                  # d w_0 / d l1reg = -sign(w_0)
        -1.0

    References:
        Beck, A. and Teboulle, M. `A Fast Iterative Shrinkage-Thresholding Algorithm
        for Linear Inverse Problems <https://doi.org/10.1137/080716542>`_. SIAM J.
        Imaging Sciences, 2009.
        Nesterov, Y. A method for solving the convex programming problem with
        convergence rate O(1/k^2). Soviet Math. Doklady, 1983.
        O'Donoghue, B. and Candès, E. `Adaptive Restart for Accelerated Gradient
        Schemes <https://arxiv.org/abs/1204.3982>`_. Found. Comput. Math., 2015.
    """

    prox: Callable
    maxiter: int = 1000
    tol: Optional[float] = None
    step: Optional[float] = None
    acceleration: bool = True
    implicit_solve: Optional[LinearSolver] = None

    def __post_init__(self):
        if not callable(self.prox):  # a wrong type, as the docstring says (the settings below are values)
            raise TypeError("ProximalGradient: `prox` must be a callable prox(z, prox_args, scaling), e.g. "
                            f"bilevel.implicit.prox_lasso; got {self.prox!r}.")
        _check_fields(
            self,
            **COMMON_RULES,
            step=(_positive_or_none, "None (backtracking) or a positive float"),
            acceleration=(lambda v: isinstance(v, bool), "a bool"),
        )

    def run(
        self, fun: Objective, init: TensorTree, *args: Any, prox_args: Any = None
    ) -> tuple[TensorTree, SolverInfo]:
        sol, info, _ = self._run(fun, init, args, prox_args)
        return sol, info

    def _run(self, fun, init, args, prox_args):
        obj = FlatObjective(fun, init, args, self.name)
        prox_args = detach_args((prox_args,))[0]

        def prox_map(z: torch.Tensor, eta: float) -> torch.Tensor:
            out = self.prox(obj.tree(z), prox_args, eta)
            flat = obj.rav.ravel(out) if all(torch.is_tensor(t) for t in tree_leaves(out)) else None
            if flat is None or flat.shape != z.shape:
                shapes = [tuple(t.shape) if torch.is_tensor(t) else type(t).__name__ for t in tree_leaves(out)]
                raise ValueError(
                    f"{self.name}: `prox(sol, prox_args, step)` must return a tensor or tree shaped like "
                    f"`init` (leaf shapes {[tuple(x) for x in obj.rav.shapes]}); got {shapes}.")
            return flat.to(z.dtype)

        with torch.no_grad():
            x, info, step = descent_loop(
                obj, prox_map, maxiter=self.maxiter, tol=self.tol, step=self.step,
                acceleration=self.acceleration,
            )
        warn_if_failed(info, self.name, stacklevel=4)
        return obj.tree(x), info, step

    def __call__(self, fun: Objective, init: TensorTree, *args: Any, prox_args: Any = None) -> TensorTree:
        return self._root_call(fun, init, args, prox_args)[0]

    def _root_call(self, fun: Objective, init: TensorTree, args: tuple, prox_args: Any = None):
        """``(sol, root)``: :meth:`__call__`'s solution, and the ``custom_root``-wrapped solve
        that produced it, whose ``last_info`` holds the certificate of the latest backward
        pass through ``sol`` (read by :class:`~bilevel.algorithms.Implicit`)."""
        check_fun(fun, self.name)
        dtype = check_init(init, self.name)[0].dtype
        scale = _Scale()
        tol = self._tol(dtype)

        def solve(objective_args, prox_args, *, init):
            sol, info, step = self._run(fun, init, objective_args, prox_args)
            scale.record(info, tol, step)
            return sol

        root = self._differentiable(self._prox_condition(fun, scale), solve, dtype)
        return root(tuple(args), prox_args, init=warm_start(init)), root

    def _prox_condition(self, fun: Objective, scale: _Scale) -> Condition:
        """The proximal-gradient fixed point at the final step, divided by
        ``step * max(1, r0)`` (the gradient-mapping scale of the stopping rule)."""
        conditions = {}

        def residual(sol, objective_args=(), prox_args=None):
            step = scale.step
            if step not in conditions:
                conditions[step] = proximal_gradient(fun, self.prox, stepsize=step)
            factor = scale.value / step
            return tree_map(lambda r: r * factor, conditions[step](sol, objective_args, prox_args))

        name = f"proximal_gradient({getattr(fun, '__name__', 'fun')}, {getattr(self.prox, '__name__', 'prox')})"
        condition = Condition(residual, symmetric=False, name=name)
        condition.objective = fun
        return condition


def descent_loop(
    obj: FlatObjective,
    prox_map: Optional[Callable[[torch.Tensor, float], torch.Tensor]],
    *,
    maxiter: int,
    tol: Optional[float],
    step: Optional[float],
    acceleration: bool,
) -> tuple[torch.Tensor, SolverInfo, float]:
    """(Accelerated) proximal gradient on a flat objective; ``prox_map=None`` is
    plain gradient descent.  Returns ``(x, info, final_step)``."""
    name = obj.name
    x = obj.x0
    fy, gy = obj.value_and_grad(x)
    if not is_finite(fy, gy):
        raise nonfinite(name, 0)
    eps = float(torch.finfo(x.dtype).eps)
    tol = default_tol(x.dtype) if tol is None else tol
    t = float(step) if step is not None else _initial_step(obj, x, gy)

    def mapping(y, g, t):
        z = y - t * g
        if prox_map is not None:
            z = prox_map(z, t)
        d = z - y
        r = float(torch.linalg.vector_norm(d)) / t
        if not math.isfinite(r):  # a NaN would end `while r > threshold` as a success
            what = "the proximal step (`prox` at `prox_args`)" if prox_map is not None else "the gradient step"
            raise nonfinite(name, k, what)
        return z, d, r

    y, k = x, 0
    z, d, r = mapping(y, gy, t)
    threshold = tol * max(1.0, r)
    momentum, status = 1.0, Status.SUCCESS
    while r > threshold:
        if k >= maxiter:
            status = Status.MAX_ITERATIONS
            break
        fz = gz = None
        immediate = True
        if step is None:  # backtracking on the quadratic upper bound
            for _ in range(_MAX_BACKTRACK):
                ok, fz, gz = _sufficient_decrease(obj, fy, gy, z, d, t, eps, need_grad=not acceleration)
                if ok:
                    break
                immediate = False
                t *= 0.5
                z, d, _ = mapping(y, gy, t)
            else:
                status = Status.BREAKDOWN
                break
        k += 1
        if acceleration:
            if float(((y - z) * (z - x)).sum()) > 0:  # gradient restart
                momentum, y_next = 1.0, z
            else:
                nxt = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * momentum**2))
                y_next = z + ((momentum - 1.0) / nxt) * (z - x)
                momentum = nxt
            x, y = z, y_next
            fy, gy = obj.value_and_grad(y)
            if y is not z and not is_finite(fy, gy):  # extrapolated out of the domain: restart
                momentum, y = 1.0, z
                fy, gy = obj.value_and_grad(y)
        else:
            x = y = z
            fy, gy = (fz, gz) if gz is not None else obj.value_and_grad(z)
            if step is None and immediate:
                t *= 2.0
        if not is_finite(fy, gy):
            hint = " With a fixed `step`, it may be too large: use step=None (backtracking)." if step else ""
            raise FloatingPointError(str(nonfinite(name, k)) + hint)
        z, d, r = mapping(y, gy, t)
    info = make_info(k, r, fy, status, threshold, y)
    return y, info, t


def _sufficient_decrease(obj, fy, gy, z, d, t, eps, need_grad):
    """Whether the step to ``z = y + d`` passes the backtracking test, with ``f(z)``
    (and ``grad f(z)`` when computed).

    Where the quadratic term ``||d||^2 / 2t`` is above the rounding error of
    ``f``, the test is the upper bound ``f(z) <= f(y) + <g, d> + ||d||^2 / 2t``;
    below it (near a solution, where value differences are noise), it is the
    secant curvature ``||grad f(z) - grad f(y)|| <= ||d|| / t`` (as in TFOCS), so
    the iterates keep converging in gradient norm past that floor.
    """
    quad = float((d * d).sum()) / (2 * t)
    reliable = quad > 100 * eps * float(fy.abs())
    if reliable and not need_grad:
        fz, gz = obj.value(z), None
    else:
        fz, gz = obj.value_and_grad(z)
    if not (bool(torch.isfinite(fz)) and (gz is None or bool(torch.isfinite(gz).all()))):
        return False, fz, gz
    if reliable:
        return bool(fz <= fy + (gy * d).sum() + quad + 10 * eps * fy.abs()), fz, gz
    return float(torch.linalg.vector_norm(gz - gy)) * t <= float(torch.linalg.vector_norm(d)), fz, gz


def _initial_step(obj: FlatObjective, x: torch.Tensor, g: torch.Tensor) -> float:
    """``1 / L_hat``, with ``L_hat`` the secant curvature along ``-g`` over a short probe."""
    g_norm = float(torch.linalg.vector_norm(g))
    if g_norm == 0.0:
        return 1.0
    h = float(torch.finfo(x.dtype).eps) ** (1 / 3) * max(1.0, float(torch.linalg.vector_norm(x)))
    _, g_probe = obj.value_and_grad(x - (h / g_norm) * g)
    curvature = float(torch.linalg.vector_norm(g_probe - g)) / h
    return 1.0 / curvature if math.isfinite(curvature) and curvature > 0 else 1.0
