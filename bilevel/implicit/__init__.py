"""The implicit-differentiation core: operators, linear solves, roots, conditions.

Knows nothing of bilevel algorithms; everything else in :mod:`bilevel` builds on it.
"""

from . import conditions, linear_solve, operators, projections, prox
from ._certificate import ImplicitInfo
from .conditions import (
    Condition,
    fixed_point_residual,
    kkt,
    mirror_descent,
    projected_gradient,
    proximal_gradient,
    stationarity,
)
from .hypergrad import hypergrad, one_step_hypergrad, unrolled_hypergrad
from .linear_solve import CG, GMRES, MINRES, Auto, BiCGStab, Direct, LinearSolveInfo, Neumann, NormalCG, Nystrom
from .projections import (
    Box,
    ConvexSet,
    L1Ball,
    L2Ball,
    NonNegative,
    Simplex,
    kl_projection_simplex,
    project_affine_set,
    project_box,
    project_halfspace,
    project_hyperplane,
    project_l1_ball,
    project_l2_ball,
    project_linf_ball,
    project_nonnegative,
    project_simplex,
)
from .prox import prox_elastic_net, prox_group_lasso, prox_lasso, prox_none, prox_nonnegative_lasso, prox_ridge
from .root import custom_fixed_point, custom_root

__all__ = [
    # differentiable roots and hypergradients
    "custom_root", "custom_fixed_point", "hypergrad", "unrolled_hypergrad", "one_step_hypergrad", "ImplicitInfo",
    # linear solvers
    "Auto", "CG", "Neumann", "GMRES", "BiCGStab", "MINRES", "NormalCG", "Nystrom", "Direct", "LinearSolveInfo",
    # optimality conditions
    "Condition", "stationarity", "fixed_point_residual", "projected_gradient", "proximal_gradient",
    "mirror_descent", "kkt",
    # projections and sets
    "project_nonnegative", "project_box", "project_simplex", "project_l1_ball", "project_l2_ball",
    "project_linf_ball", "project_affine_set", "project_hyperplane", "project_halfspace",
    "kl_projection_simplex", "ConvexSet", "NonNegative", "Box", "Simplex", "L1Ball", "L2Ball",
    # proximal operators
    "prox_none", "prox_lasso", "prox_nonnegative_lasso", "prox_ridge", "prox_elastic_net", "prox_group_lasso",
    # sub-modules
    "conditions", "linear_solve", "operators", "projections", "prox",
]
