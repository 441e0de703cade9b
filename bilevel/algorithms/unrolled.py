r"""Iterative differentiation (ITD): reverse mode through T inner gradient steps."""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

import torch

from .._tree import tree_flatten, tree_leaves, tree_unflatten
from ..implicit.hypergrad import estimate_lipschitz, unrolled_hypergrad
from ..implicit.linear_solve._base import _sync_every
from ._base import Algorithm, State, StepInfo, report_value, tree_norm, y_projection
from ._single_loop import value_and_grads


@dataclass(frozen=True)
class Unrolled(Algorithm):
    r"""Iterative differentiation (ITD): differentiate through ``steps`` inner steps.

    .. math::

        y_t = y_{t-1} - s \nabla_y f(x_k, y_{t-1}),\ t = 1..T, \qquad
        x_{k+1} = \mathrm{opt}\bigl(x_k,\ \tfrac{d}{dx} F(x_k, y_T(x_k))\bigr).

    Memory grows linearly with :math:`T` (``truncate=K`` keeps only the last
    :math:`K` steps: Shaban et al. 2019).  ``warm_start=True`` starts each inner
    run from the previous :math:`y_T` instead of :math:`y_0`.

    Args:
        steps: :math:`T`, inner steps per outer step (default 100).
        step_size: :math:`s`; ``None`` uses :math:`1/L` with :math:`L` the largest
            inner Hessian eigenvalue (power iteration), re-estimated at every outer
            step from the previous estimate's eigenvector, at the previous inner
            run's end; at the first step the larger of the estimates at ``y0`` and
            at the end of a backtracked descent from it (a lower level flat at
            ``y0`` would otherwise give a huge step).
        truncate: differentiate only the last ``truncate`` steps.
        warm_start: start each inner run from the previous :math:`y_T`.
        y_set: a simple set for ``y`` (or the problem's): the inner steps are
            projected gradient steps, differentiated through the projection.

    References:
        Franceschi, L., Donini, M., Frasconi, P. and Pontil, M. `Forward and
        Reverse Gradient-Based Hyperparameter Optimization
        <https://arxiv.org/abs/1703.01785>`_. ICML 2017.
        Shaban, A., Cheng, C.-A., Hatch, N. and Boots, B. `Truncated
        Back-propagation for Bilevel Optimization <https://arxiv.org/abs/1810.10667>`_.
        AISTATS 2019.

    Example:
        >>> import bilevel
        >>> p = bilevel.problems.quadratic()
        >>> r = bilevel.solve(p, method="unrolled", steps=30, outer_optimizer="sgd", lr=0.5,
        ...                   max_steps=50, progress=False)
        >>> float((r.x - p.solution.x).norm() / p.solution.x.norm()) < 1e-3
        True
    """

    steps: int = 100
    step_size: Optional[float] = None
    truncate: Optional[int] = None
    warm_start: bool = False
    y_set: Any = None

    handles_y_set: ClassVar[bool] = True

    def __post_init__(self):
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ValueError(f"Unrolled: `steps` must be a positive int; got {self.steps!r}.")

    def init(self, problem, x0=None, y0=None) -> State:
        state = super().init(problem, x0, y0)
        state.extras["y_start"] = [t.clone() for t in tree_leaves(state.y)]
        return state

    def hypergradient(self, outer, inner, state: State, batch: Any):
        project = y_projection(state)
        step_size = _step_size(self.step_size, inner, state, self.steps, project)
        y0 = state.y if self.warm_start else tree_unflatten([t.clone() for t in state.extras["y_start"]], tree_flatten(state.y)[1])
        g, y = unrolled_hypergrad(
            outer, inner, state.x, y0 if project is None else project(y0), self.steps, step_size,
            truncate=self.truncate, return_solution=True, project=project,
        )
        with torch.no_grad():
            value = report_value(outer(state.x, y))
        return y, g, StepInfo(outer=value, hypergradient_norm=tree_norm(g))


def _step_size(step_size: Optional[float], inner, state: State, steps: int = 100,
               project=None) -> Union[float, torch.Tensor]:
    """The fixed step, or ``1/L`` re-estimated at every outer step: the inner
    curvature changes as ``x`` moves, and a step from a stale estimate can exceed
    ``2/L`` and diverge.  The power iteration is warm-started from the previous
    eigenvector (20 products the first time, 3 after).  On accelerators the
    estimate stays a 0-d tensor on the device (no host read; the same value).

    At the first outer step ``state.y`` is the start ``y0``, not the end of an inner
    run, and the curvature there may be far below the one the run meets (a lower
    level flat at ``y0``, e.g. quartic, where ``1/L`` is huge): ``L`` is the larger
    of the estimates at ``y0`` and at the end of a probe descent from it (``steps``
    gradient steps without a graph, each backtracked until ``f`` falls, see
    :func:`_probe_descent`).  Later estimates are taken at the previous run's end."""
    if step_size is not None:
        return step_size
    previous = state.extras.get("power_vector")
    with torch.no_grad():
        lipschitz, vector = estimate_lipschitz(
            inner, state.x, state.y, iterations=20 if previous is None else 3,
            start=None if previous is None else tree_unflatten(previous, tree_flatten(state.y)[1]),
            return_vector=True,
        )
    if previous is None and _sync_every(lipschitz) == 1:
        probe = _probe_descent(inner, state.x, state.y, steps, float(lipschitz), project)
        if probe is not None:
            with torch.no_grad():
                further, further_vector = estimate_lipschitz(inner, state.x, probe, iterations=20, return_vector=True)
            if float(further) > float(lipschitz):
                lipschitz, vector = further, further_vector
    state.extras["power_vector"] = [t.detach() for t in tree_leaves(vector)]
    estimate = 1.0 / lipschitz.clamp_min(1e-12)
    state.extras["step_size"] = float(estimate) if _sync_every(estimate) == 1 else estimate
    if isinstance(state.extras["step_size"], float) and not math.isfinite(state.extras["step_size"]):
        raise FloatingPointError(
            f"Unrolled: the curvature estimate of `inner` that sets the inner step is not finite at step "
            f"{state.iteration + 1}: its Hessian-vector products at (x, y) give NaN or inf; check `inner` there.")
    return state.extras["step_size"]


def _probe_descent(inner, x, y, steps: int, lipschitz: float, project=None):
    r"""Up to ``steps`` gradient steps :math:`y \leftarrow P(y - s \nabla_y f(x, y))` without
    a graph, each step halved until :math:`f` falls (at most 30 halvings; the next one
    tries twice the accepted step, up to the first), from :math:`s = 1/L` or, where
    the curvature ``lipschitz`` at ``y`` is 0 (a flat start), from the step that
    moves :math:`y` by :math:`\max(1, \|y\|)`.  Returns the last point, or ``None``
    where ``y`` is stationary or ``f`` is not finite there (nothing to probe)."""
    leaves, spec = tree_flatten(y)
    x_leaves, x_spec = tree_flatten(x)

    def value_and_grad(ys):
        value, _, grads = value_and_grads(inner, x_leaves, ys, x_spec, spec, "y")
        return float(value), grads

    ys = [t.detach() for t in leaves]
    value, grads = value_and_grad(ys)
    size = math.sqrt(sum(float((g * g).sum()) for g in grads))
    if not (math.isfinite(value) and math.isfinite(size)) or size == 0.0:
        return None
    y_norm = math.sqrt(sum(float((t * t).sum()) for t in ys))
    first = 1.0 / lipschitz if lipschitz > 0 else max(1.0, y_norm) / size
    trial = first
    for _ in range(steps):
        for _ in range(30):
            with torch.no_grad():
                moved = [t - trial * g for t, g in zip(ys, grads)]
            if project is not None:
                moved = tree_leaves(project(tree_unflatten(moved, spec)))
            new_value, new_grads = value_and_grad(moved)
            if new_value < value:
                break
            trial *= 0.5
        else:
            break  # no step lowers f: as far as the probe goes
        ys, value, grads = moved, new_value, new_grads
        trial = min(2.0 * trial, first)
    return tree_unflatten(ys, spec)
