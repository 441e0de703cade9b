"""Bilevel algorithms: each a config dataclass with ``init(problem)`` and
``step(problem, state, batch)``; :func:`bilevel.solve` drives them."""

from .bamm import BAMM
from .bda import BDA
from ._base import Algorithm, State, StepInfo, make_optimizer
from .implicit import Implicit
from .lvhba import LVHBA
from .meha import MEHA
from .one_step import OneStep
from .penalty import Penalty
from .soba import SOBA
from .unrolled import Unrolled

METHODS = {
    "implicit": Implicit,
    "unrolled": Unrolled,
    "one_step": OneStep,
    "meha": MEHA,
    "penalty": Penalty,
    "bamm": BAMM,
    "lvhba": LVHBA,
    "bda": BDA,
    "soba": SOBA,
}
"""Method names accepted by :func:`bilevel.solve`, with their config classes."""

__all__ = ["Algorithm", "State", "StepInfo", "Implicit", "Unrolled", "OneStep", "MEHA", "Penalty", "BAMM", "LVHBA", "BDA", "SOBA", "METHODS", "make_optimizer"]
