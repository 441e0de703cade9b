r"""Inner solvers, solver-agnostic, each differentiable through its optimality condition.

Every solver is a frozen dataclass of settings with two entry points:

* ``sol, info = solver.run(fun, init, *args)``: run without autograd; ``info`` is a
  :class:`SolverInfo` (iterations, residual_norm, value, status, tolerance, converged);
* ``sol = solver(fun, init, *args)``: the same solution, differentiable in ``args`` by
  :func:`~bilevel.implicit.custom_root` with the matching optimality condition.

``fun(sol, *args)`` takes the solution first and returns a scalar objective (a
residual vector for :class:`GaussNewton` / :class:`LevenbergMarquardt`).  See
:mod:`bilevel.solvers._base` for the interface, tolerance rule and failures.

Example:
    >>> import torch
    >>> from bilevel.solvers import LBFGS
    >>> f = lambda w, c: 0.5 * ((w - c) ** 2).sum() + 0.25 * (w ** 4).sum()
    >>> c = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    >>> w = LBFGS()(f, torch.zeros(2, dtype=torch.float64), c)
    >>> dw = torch.autograd.grad(w.sum(), c)[0]                    # (1 + 3 w^2)^-1
    >>> torch.allclose(dw, 1 / (1 + 3 * w.detach() ** 2))
    True
"""

from ._base import Solver, SolverInfo
from .gradient_descent import GradientDescent
from .least_squares import GaussNewton, LevenbergMarquardt
from .proximal_gradient import ProximalGradient
from .scipy_bridge import ScipyInfo, ScipyMinimize
from .torch_optim import LBFGS, OptimizerLoop, known_optimizers

__all__ = [
    "Solver",
    "SolverInfo",
    "ScipyInfo",
    "GradientDescent",
    "OptimizerLoop",
    "LBFGS",
    "ScipyMinimize",
    "ProximalGradient",
    "GaussNewton",
    "LevenbergMarquardt",
    "known_optimizers",
]
