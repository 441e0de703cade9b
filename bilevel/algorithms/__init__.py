"""Bilevel algorithms: each a config dataclass with ``init(problem)`` and
``step(problem, state, batch)``; :func:`bilevel.solve` drives them."""

from ._base import Algorithm, State, StepInfo, make_optimizer
from .implicit import Implicit
from .one_step import OneStep
from .unrolled import Unrolled

METHODS = {
    "implicit": Implicit,
    "unrolled": Unrolled,
    "one_step": OneStep,
}
"""Method names accepted by :func:`bilevel.solve`, with their config classes."""

__all__ = ["Algorithm", "State", "StepInfo", "Implicit", "Unrolled", "OneStep", "METHODS", "make_optimizer"]
