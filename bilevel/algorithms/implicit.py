r"""Approximate implicit differentiation (AID): warm-started inner solves and IFT hypergradients."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from ..implicit import hypergrad
from ..implicit.hypergrad import estimate_lipschitz
from ..implicit.linear_solve import Auto, LinearSolver
from ..solvers import LBFGS, ProximalGradient
from ..solvers._base import Solver
from .._tolerance import default_tol
from .._tree import tree_flatten, tree_leaves, tree_map, tree_unflatten
from ._base import Algorithm, State, StepInfo, report_value, tree_norm, tree_norm_float, y_projection


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
    :math:`x` moves slowly (HOAG, Pedregosa 2016).  With ``warm_start=False``
    every inner solve starts from :math:`y_0` instead ("cold-start" BLO): on
    over-parameterized inner problems the two reach different solutions, and the
    warm-started inner iterate carries information about the outer objective
    (Vicol et al. 2022).

    Args:
        inner_solver: a :mod:`bilevel.solvers` object, used as given; default:
            warm-started ``LBFGS(maxiter=100)`` (line search: no step size to tune,
            robust on unscaled data) to a gradient norm of ``sqrt(eps)`` times the
            gradient scale at the cold start (not at the warm start, whose small
            gradient would ask for more than the line search can resolve).
        solve: linear solver of the IFT system; default
            ``Auto(symmetric=True, maxiter=100)``: exact dense solves up to 128
            unknowns, at most 100 CG iterations above (the usual AID budget; an
            unconverged solve is recorded in the history and warned once).
        damping: :math:`\epsilon` added to :math:`\nabla^2_{yy} f` (singular inner Hessians).
        strict: raise instead of warning when a certificate fails.
        y_set: a simple convex set for ``y`` (e.g.
            :class:`~bilevel.implicit.projections.NonNegative`), a callable
            projection :math:`P`, or a tree of them; ``None``: the problem's
            ``y_set``.  The inner problem is then :math:`\min_{y \in C} f(x, y)`,
            solved by projected gradient (:class:`~bilevel.solvers.ProximalGradient`
            with :math:`P` as the prox, warm-started), and the implicit function
            theorem is applied to its fixed point
            :math:`y = P(y - \eta \nabla_y f(x, y))` (a non-symmetric system:
            ``solve`` must handle one, the default GMRES does; its relative
            residual goes to ``history["linear_residual"]``).  ``inner_solver``
            and ``damping`` do not apply there.
        warm_start: start each inner solve from the previous one's solution
            (default ``True``); ``False``: from :math:`y_0` at every outer step.
        outer_optimizer, lr, x_set: see :class:`~bilevel.algorithms.Algorithm`.

    References:
        Pedregosa, F. `Hyperparameter optimization with approximate gradient
        <https://arxiv.org/abs/1602.02355>`_. ICML 2016.
        Lorraine, J., Vicol, P. and Duvenaud, D. `Optimizing Millions of
        Hyperparameters by Implicit Differentiation <https://arxiv.org/abs/1911.02590>`_.
        AISTATS 2020.
        Vicol, P., Lorraine, J., Pedregosa, F., Duvenaud, D. and Grosse, R. `On Implicit
        Bias in Overparameterized Bilevel Optimization <https://proceedings.mlr.press/v162/vicol22a.html>`_.
        ICML 2022.

    Example:
        >>> import bilevel
        >>> from bilevel.algorithms import Implicit
        >>> from bilevel.implicit.linear_solve import CG
        >>> p = bilevel.problems.quadratic()
        >>> method = Implicit(solve=CG(maxiter=20), outer_optimizer="sgd", lr=0.5)
        >>> r = bilevel.solve(p, method=method, max_steps=50, progress=False)
        >>> float((r.x - p.solution.x).norm() / p.solution.x.norm()) < 1e-4
        True
        >>> r.history["linear_residual"][-1] < 1e-6     # the CG certificate of the last step
        True
    """

    inner_solver: Optional[Solver] = None
    solve: Optional[LinearSolver] = None
    damping: float = 0.0
    strict: bool = False
    y_set: Any = None
    warm_start: bool = True

    handles_y_set: ClassVar[bool] = True

    def __post_init__(self):
        if not isinstance(self.warm_start, bool):
            raise TypeError(f"Implicit: `warm_start` must be True or False; got {self.warm_start!r}.")
        if self.inner_solver is not None and not isinstance(self.inner_solver, Solver):
            raise TypeError(
                "Implicit: `inner_solver` must be a bilevel.solvers object (e.g. LBFGS(), "
                f"GradientDescent()); got {type(self.inner_solver).__name__}."
            )
        if self.solve is not None and not callable(self.solve):
            raise TypeError(
                "Implicit: `solve` must be a linear solver of bilevel.implicit.linear_solve (e.g. "
                f"CG(maxiter=50)) or None; got {self.solve!r}."
            )

    def hypergradient(self, outer, inner, state: State, batch: Any):
        objective = lambda y_, x_: inner(x_, y_)  # noqa: E731  solution first, for the solvers
        if not self.warm_start:  # cold start: the inner solve runs from y0 (the step replaces state.y);
            # y0 is kept at the first step (a warm-started checkpoint resumed cold: its current y)
            start = state.extras.setdefault("y_start", [t.clone() for t in tree_leaves(state.y)])
            state.y = tree_unflatten([t.clone() for t in start], tree_flatten(state.y)[1])
        project = y_projection(state)
        if project is not None:
            return self._projected(outer, objective, state, project)
        if self.inner_solver is not None:
            y, inner_residual = _run(self.inner_solver, objective, state)
        else:
            y, inner_residual = self._default_inner_solve(objective, state)
        solve = self.solve if self.solve is not None else Auto(symmetric=True, maxiter=100)
        g, info = hypergrad(
            outer, inner, state.x, y, solve=solve, damping=self.damping, strict=self.strict,
            return_info=True,
        )
        with torch.no_grad():
            value = report_value(outer(state.x, y))
        step_info = StepInfo(  # tensors, read by the driver with other steps' (no host read here)
            outer=value,
            hypergradient_norm=tree_norm(g),
            inner_residual=inner_residual,
            linear_residual=info.linear_solve.relative_residual.max().detach(),
        )
        return y, g, step_info

    def _projected(self, outer, objective, state: State, project):
        """The inner problem over the set ``C``: projected gradient, differentiated at its
        fixed point by :class:`~bilevel.solvers.ProximalGradient` (the IFT on the prox
        condition, with ``solve``)."""

        def onto_set(z, _prox_args=None, _scaling=None):
            return project(z)

        solver = ProximalGradient(onto_set, implicit_solve=self.solve)
        x = tree_map(lambda t: t.detach().requires_grad_(t.is_floating_point()), state.x)
        with torch.enable_grad():
            y, root = solver._root_call(objective, onto_set(state.y), (x,))
            value = outer(x, y)
            leaves = tree_leaves(x)
            grads = torch.autograd.grad(value, leaves, allow_unused=True)
        g = tree_unflatten([torch.zeros_like(t) if d is None else d for t, d in zip(leaves, grads)],
                           tree_flatten(state.x)[1])
        y = tree_map(torch.Tensor.detach, y)
        with torch.no_grad():  # the gradient mapping at a unit step: 0 at a solution over C
            gradient = torch.func.grad(lambda y_: objective(y_, state.x).reshape(()))(y)
            moved = onto_set(tree_map(lambda a, b: a - b, y, gradient))
            inner_residual = tree_norm(tree_map(lambda a, b: a - b, y, moved))
        certificate = root.last_info  # the backward pass's; None where it did not reach the solve (F free of y)
        linear = math.nan if certificate is None else certificate.linear_solve.relative_residual.max().detach()
        info = StepInfo(outer=report_value(value.detach()), hypergradient_norm=tree_norm(g),
                        inner_residual=inner_residual, linear_residual=linear)
        return y, g, info

    def _default_inner_solve(self, objective, state: State):
        r"""Warm-started L-BFGS to :math:`\|\nabla_y f\| \le \sqrt{\varepsilon}\, s`, with
        the gradient scale :math:`s = \max(\|\nabla_y f(x_0, y_0)\|,\ \min(1, L\max(1, \|y_0\|)))`
        of the start (kept in the state), :math:`L \approx \|\nabla^2_{yy} f(x_0, y_0)\|`
        by power iteration (20 Hessian-vector products, once).  The curvature term
        stands in for the gradient where :math:`y_0` already solves the inner problem
        at :math:`x_0`; capped at 1 it only loosens the tolerance for an inner
        objective of small scale (scaling :math:`f` down by :math:`10^{-4}` then gives
        the same run), and :math:`s = 1` where both terms vanish.  A tolerance relative to the warm start's own,
        already small, gradient would ask for more than a line search comparing
        objective values can resolve on a large objective, and spend the whole
        budget every step."""
        gradient_norm = _gradient_norm(objective, state)
        if "inner_gradient_scale" not in state.extras:
            curvature = float(estimate_lipschitz(lambda x, y: objective(y, x), state.x, state.y))
            size = max(1.0, tree_norm_float(state.y))
            scale = max(gradient_norm, min(1.0, curvature * size) if math.isfinite(curvature) else 0.0)
            state.extras["inner_gradient_scale"] = scale if scale > 0 else 1.0
        scale = state.extras["inner_gradient_scale"]
        dtype = tree_leaves(state.y)[0].dtype
        threshold = default_tol(dtype) * scale
        if gradient_norm <= threshold:  # the warm start is already solved
            return state.y, gradient_norm
        solver = LBFGS(maxiter=100, tol=min(threshold / max(1.0, gradient_norm), 0.5))
        return _run(solver, objective, state)


def _gradient_norm(objective, state: State) -> float:
    gradient = torch.func.grad(lambda y_: objective(y_, state.x).reshape(()))(state.y)
    return tree_norm_float(gradient)


def _run(solver: Solver, objective, state: State):
    y, info = solver.run(objective, state.y, state.x)
    return y, info.residual_norm.max().detach()
