"""Layers for ``torch.nn`` models whose output is the solution of an optimization problem.

* :class:`ArgminLayer`: the minimizer of ``objective(z, *inputs)`` found by any
  :mod:`bilevel.solvers` solver, differentiated by :func:`~bilevel.custom_root`;
* :class:`QPLayer` / :func:`qp_solve`: a batched quadratic program solved in torch
  (interior point, GPU-ready), differentiated through its KKT conditions (OptNet);
* :class:`ConvexLayer`: a DPP CVXPY problem mapping parameters to optimal
  variables (needs the ``bilevel[cvxpy]`` extra);
* :class:`HardConstraintMoE` / :class:`HardConstraint` / :class:`SoftConstraint`:
  physics-informed hard constraints on basis-function coefficients, split among
  K experts (one batched Levenberg-Marquardt solve and one batched implicit
  backward), on one domain, or as a loss penalty; :class:`BoxPartition` and
  :func:`evaluate_basis` build their inputs.
"""

from .argmin import ArgminLayer
from .convex import ConvexLayer
from .moe import (
    BoxPartition,
    HardConstraint,
    HardConstraintMoE,
    SoftConstraint,
    evaluate_basis,
)
from .qp import QPInfo, QPLayer, QPStatus, SolveError, SolveWarning, qp_solve

__all__ = [
    "ArgminLayer",
    "BoxPartition",
    "ConvexLayer",
    "HardConstraint",
    "HardConstraintMoE",
    "QPInfo",
    "QPLayer",
    "QPStatus",
    "SoftConstraint",
    "SolveError",
    "SolveWarning",
    "evaluate_basis",
    "qp_solve",
]
