"""bilevel: bilevel optimization and implicit differentiation for PyTorch."""

from . import algorithms, distributed, hpo, implicit, layers, problems, solvers, status
from .api import BilevelResult, solve
from .implicit import custom_fixed_point, custom_root, hypergrad
from .problems import BilevelProblem
from .status import (
    BilevelError,
    BilevelWarning,
    CapturedTensorWarning,
    ConvergenceWarning,
    CurvatureWarning,
    OptimalityWarning,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "solve",
    "BilevelResult",
    "algorithms",
    "distributed",
    "hpo",
    "layers",
    "solvers",
    "BilevelProblem",
    "BilevelError",
    "BilevelWarning",
    "CapturedTensorWarning",
    "ConvergenceWarning",
    "CurvatureWarning",
    "OptimalityWarning",
    "custom_fixed_point",
    "custom_root",
    "hypergrad",
    "implicit",
    "problems",
    "status",
]
