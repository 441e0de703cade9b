"""The implicit-differentiation core: operators, linear solves, roots, conditions."""

from . import conditions, linear_solve, operators
from ._certificate import ImplicitInfo
from .conditions import Condition, fixed_point_residual, stationarity
from .linear_solve import CG, LinearSolveInfo
from .hypergrad import hypergrad, one_step_hypergrad, unrolled_hypergrad
from .root import custom_fixed_point, custom_root

__all__ = [
    "CG",
    "Condition",
    "ImplicitInfo",
    "LinearSolveInfo",
    "conditions",
    "custom_fixed_point",
    "custom_root",
    "fixed_point_residual",
    "hypergrad",
    "one_step_hypergrad",
    "unrolled_hypergrad",
    "linear_solve",
    "operators",
    "stationarity",
]
