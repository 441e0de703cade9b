r"""The one-step (DARTS-style) approximation: one inner step, differentiated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from .._tree import tree_map
from ..implicit.hypergrad import one_step_hypergrad
from ._base import Algorithm, State, StepInfo, report_value, tree_norm, y_projection
from .unrolled import _step_size


@dataclass(frozen=True)
class OneStep(Algorithm):
    r"""One-step (first-order, DARTS-style) hypergradient: a cheap, biased baseline.

    Each outer step moves :math:`y` by ``inner_steps`` plain gradient steps, then
    differentiates :math:`F(x, y')` through one more step
    :math:`y' = y - \xi \nabla_y f(x, y)`:

    .. math:: \nabla_x F(x, y') - \xi\, \nabla^2_{xy} f(x, y)\, \nabla_y F(x, y').

    Exact only if :math:`y'` is the inner solution; use it as a baseline.

    Args:
        step_size: :math:`\xi`; ``None`` uses :math:`1/L`, :math:`L` the largest eigenvalue
            of :math:`\nabla^2_{yy} f`, re-estimated at every outer step by a power
            iteration warm-started from the last eigenvector (20 products at the first
            step, 3 after).
        inner_steps: plain gradient steps on :math:`y` per outer step (default 1).
        y_set: a simple set for ``y`` (or the problem's): every inner step, the
            differentiated one included, is a projected gradient step.

    References:
        Liu, H., Simonyan, K. and Yang, Y. `DARTS: Differentiable Architecture
        Search <https://arxiv.org/abs/1806.09055>`_. ICLR 2019.

    Example:
        On problem Q the estimate vanishes at a point whose distance to
        :math:`x^\star` is a third of :math:`\|x^\star\|`: even with :math:`y` at
        the inner solution, :math:`\xi I` stands in for the inverse inner Hessian.

        >>> import bilevel
        >>> p = bilevel.problems.quadratic()
        >>> r = bilevel.solve(p, method="one_step", outer_optimizer="sgd", lr=0.5, max_steps=50,
        ...                   progress=False)
        >>> r.history["hypergradient_norm"][-1] < 1e-6
        True
        >>> round(float((r.x - p.solution.x).norm() / p.solution.x.norm()), 2)
        0.33
    """

    step_size: Optional[float] = None
    inner_steps: int = 1
    y_set: Any = None

    handles_y_set: ClassVar[bool] = True

    def __post_init__(self):
        if not (isinstance(self.inner_steps, int) and self.inner_steps >= 0):
            raise ValueError(f"OneStep: `inner_steps` must be a non-negative int; got {self.inner_steps!r}.")

    def hypergradient(self, outer, inner, state: State, batch: Any):
        xi = _step_size(self.step_size, inner, state)
        project = y_projection(state)
        y = state.y if project is None else project(state.y)
        grad_y = torch.func.grad(lambda y_: inner(state.x, y_).reshape(()))
        with torch.no_grad():
            for _ in range(self.inner_steps):
                y = tree_map(lambda a, g: a - xi * g, y, grad_y(y))
                y = y if project is None else project(y)
        g = one_step_hypergrad(outer, inner, state.x, y, xi, project=project)
        with torch.no_grad():
            value = report_value(outer(state.x, y))
        return y, g, StepInfo(outer=value, hypergradient_norm=tree_norm(g))
