"""Layers for ``torch.nn`` models whose output is the solution of an optimization problem.

* :class:`ArgminLayer`: the minimizer of ``objective(z, *inputs)`` found by any
  :mod:`bilevel.solvers` solver, differentiated by :func:`~bilevel.custom_root`;
* :class:`QPLayer` / :func:`qp_solve`: a batched quadratic program solved in torch
  (interior point, GPU-ready), differentiated through its KKT conditions (OptNet);
* :class:`ConvexLayer`: a DPP CVXPY problem mapping parameters to optimal
  variables (needs the ``bilevel[cvxpy]`` extra).
"""

from .argmin import ArgminLayer
from .convex import ConvexLayer
from .qp import QPInfo, QPLayer, QPStatus, SolveError, qp_solve

__all__ = [
    "ArgminLayer",
    "ConvexLayer",
    "QPInfo",
    "QPLayer",
    "QPStatus",
    "SolveError",
    "qp_solve",
]
