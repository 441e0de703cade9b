r"""Gradient descent with an Armijo backtracking line search, made differentiable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..implicit.linear_solve import LinearSolver
from .._checks import check_fields as _check_fields
from ..typing import Objective, TensorTree
from ._base import COMMON_RULES, FlatObjective, Solver, SolverInfo, _positive_or_none, warn_if_failed
from .proximal_gradient import descent_loop

__all__ = ["GradientDescent"]


@dataclass(frozen=True)
class GradientDescent(Solver):
    r"""Gradient descent on a smooth objective, with backtracking (Armijo) steps.

    .. math:: x_{k+1} = x_k - \eta_k \nabla f(x_k, \theta),

    with :math:`f` = ``fun`` and :math:`\theta` = ``args``.  With ``step=None``
    (default) :math:`\eta_k` is found by backtracking (halving) until the Armijo
    condition with constant :math:`c = 1/2`,

    .. math:: f(x_{k+1}) \le f(x_k) - \tfrac{\eta_k}{2} \|\nabla f(x_k)\|^2,

    holds.  The first trial is the previous accepted step, doubled when that
    step was accepted at once (so the step follows the local curvature up and
    down), and :math:`1/\hat L` at :math:`k = 0` (:math:`\hat L` a secant
    curvature estimate along :math:`\nabla f(x_0)`).  Near a solution, where
    that difference of values is rounding noise, the secant test
    :math:`\|\nabla f(x_{k+1}) - \nabla f(x_k)\| \le \|x_{k+1} - x_k\| / \eta_k`
    replaces it, so tolerances far below :math:`\sqrt{\varepsilon}` stay reachable.  No step size to tune: it
    works on unscaled data (Hessian norms in the thousands) as on standardized
    data.  ``acceleration=True`` runs Nesterov's accelerated method (FISTA with
    :math:`g = 0`: momentum, non-increasing backtracked steps, gradient restart).

    Stopping: :math:`\|\nabla f(x_k)\| \le \mathrm{tol}\cdot\max(1, \|\nabla f(x_0)\|)`,
    ``tol=None`` meaning ``sqrt(eps)`` of the dtype.  ``fun`` should be smooth
    and bounded below; the differentiable call needs a non-singular Hessian at
    the solution (strict local minimum).

    Args:
        maxiter: iteration budget (default 1000).
        tol: relative gradient tolerance; ``None``: ``sqrt(eps)`` of the dtype.
        step: fixed step :math:`\eta` (stable for :math:`\eta < 2/L`); ``None``:
            backtracking (default).
        acceleration: Nesterov momentum (default ``False``).
        implicit_solve: linear solver of the backward system (``None``: custom_root's default).

    Returns:
        ``run(fun, init, *args) -> (sol, SolverInfo)``; ``solver(fun, init, *args) -> sol``,
        differentiable in ``args``.

    Raises:
        ValueError: a setting out of range (naming the field), a non-scalar ``fun``.
        TypeError: ``fun`` not callable, ``init`` not a tree of floating tensors.
        FloatingPointError: a non-finite objective or gradient at an iterate.

    Example:
        >>> import torch
        >>> from bilevel.solvers import GradientDescent
        >>> X = 30 * torch.randn(50, 3, dtype=torch.float64)          # unscaled features
        >>> t = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
        >>> f = lambda w, lam: 0.5 * ((X @ w - t) ** 2).sum() + 0.5 * lam * (w ** 2).sum()
        >>> lam = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        >>> w = GradientDescent()(f, torch.zeros(3, dtype=torch.float64), lam)
        >>> H = X.T @ X + torch.eye(3, dtype=torch.float64)
        >>> torch.allclose(w, torch.linalg.solve(H, X.T @ t))
        True
        >>> dw = torch.autograd.grad(w.sum(), lam)[0]            # d w / d lam = -H^{-1} w
        >>> torch.allclose(dw, -torch.linalg.solve(H, w.detach()).sum())
        True

    References:
        Armijo, L. `Minimization of functions having Lipschitz continuous first
        partial derivatives <https://doi.org/10.2140/pjm.1966.16.1>`_. Pacific J.
        Math., 1966.
        Nesterov, Y. A method for solving the convex programming problem with
        convergence rate O(1/k^2). Soviet Math. Doklady, 1983.
    """

    maxiter: int = 1000
    tol: Optional[float] = None
    step: Optional[float] = None
    acceleration: bool = False
    implicit_solve: Optional[LinearSolver] = None

    def __post_init__(self):
        _check_fields(
            self,
            **COMMON_RULES,
            step=(_positive_or_none, "None (backtracking) or a positive float"),
            acceleration=(lambda v: isinstance(v, bool), "a bool"),
        )

    def run(self, fun: Objective, init: TensorTree, *args: Any) -> tuple[TensorTree, SolverInfo]:
        obj = FlatObjective(fun, init, args, self.name)
        with torch.no_grad():
            x, info, _ = descent_loop(
                obj, None, maxiter=self.maxiter, tol=self.tol, step=self.step, acceleration=self.acceleration
            )
        warn_if_failed(info, self.name)
        return obj.tree(x), info


def polish_by_descent(fun: Objective, init: TensorTree, args: tuple, tol: float, budget: int):
    """Finish a solve whose value-based line search stalled: gradient-descent steps,
    whose secant test keeps making progress where objective decreases fall below the
    rounding of the objective's value, for the rest of the caller's iteration budget
    (a stall far from the tolerance can need thousands; a cut-off below ``budget``
    would end in MAX_ITERATIONS with iterations still unspent).

    Args:
        fun, init, args: the objective, the point reached, its extra arguments.
        tol: the tolerance, relative to ``max(1, ||grad at init||)``.
        budget: iterations left.

    Returns:
        ``(solution, info)`` of :class:`GradientDescent`, without its warning (the
        caller reports the final status).
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GradientDescent(maxiter=max(budget, 1), tol=min(max(tol, 1e-300), 0.5)).run(fun, init, *args)
