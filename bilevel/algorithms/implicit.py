r"""Approximate implicit differentiation (AID): warm-started inner solves and IFT hypergradients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..implicit import hypergrad
from ..implicit.linear_solve import Auto, LinearSolver
from ..solvers import LBFGS
from ..solvers._base import Solver
from ._base import Algorithm, State, StepInfo, tree_norm_float


@dataclass(frozen=True)
class Implicit(Algorithm):
    r"""Approximate implicit differentiation (AID).

    Each outer step warm-starts the inner solver at the previous :math:`y`, then
    applies the implicit function theorem at the solution it returns:

    .. math::

        y_k \approx \arg\min_y f(x_k, y), \qquad
        \nabla^2_{yy} f\, v = \nabla_y F, \qquad
        x_{k+1} = \mathrm{opt}\bigl(x_k,\ \nabla_x F - \nabla^2_{xy} f\, v\bigr),

    with "opt" the outer optimizer.  Warm starts make each inner solve cheap once
    :math:`x` moves slowly (HOAG, Pedregosa 2016).

    Args:
        inner_solver: a :mod:`bilevel.solvers` object; default
            ``LBFGS(maxiter=100)`` (line search: no step size to tune, robust on
            unscaled data).
        solve: linear solver of the IFT system; default
            ``Auto(symmetric=True, maxiter=100)``: exact dense solves up to 128
            unknowns, at most 100 CG iterations above (the usual AID budget; an
            unconverged solve is recorded in the history and warned once).
        damping: :math:`\epsilon` added to :math:`\nabla^2_{yy} f` (singular inner Hessians).
        strict: raise instead of warning when a certificate fails.
        outer_optimizer, lr: see :class:`~bilevel.algorithms.Algorithm`.

    References:
        Pedregosa, F. `Hyperparameter optimization with approximate gradient
        <https://arxiv.org/abs/1602.02355>`_. ICML 2016.
        Lorraine, J., Vicol, P. and Duvenaud, D. `Optimizing Millions of
        Hyperparameters by Implicit Differentiation <https://arxiv.org/abs/1911.02590>`_.
        AISTATS 2020.
    """

    inner_solver: Optional[Solver] = None
    solve: Optional[LinearSolver] = None
    damping: float = 0.0
    strict: bool = False

    def __post_init__(self):
        if self.inner_solver is not None and not isinstance(self.inner_solver, Solver):
            raise TypeError(
                "Implicit: `inner_solver` must be a bilevel.solvers object (e.g. LBFGS(), "
                f"GradientDescent()); got {type(self.inner_solver).__name__}."
            )

    def hypergradient(self, outer, inner, state: State, batch: Any):
        solver = self.inner_solver if self.inner_solver is not None else LBFGS(maxiter=100)
        y, inner_info = solver.run(lambda y_, x_: inner(x_, y_), state.y, state.x)
        solve = self.solve if self.solve is not None else Auto(symmetric=True, maxiter=100)
        g, info = hypergrad(
            outer, inner, state.x, y, solve=solve, damping=self.damping, strict=self.strict,
            return_info=True,
        )
        with torch.no_grad():
            value = float(outer(state.x, y))
        step_info = StepInfo(
            outer=value,
            hypergradient_norm=tree_norm_float(g),
            inner_residual=float(inner_info.residual_norm.max()),
            linear_residual=float(info.linear_solve.relative_residual.max()),
        )
        return y, g, step_info
