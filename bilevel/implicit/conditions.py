r"""Ready-made optimality conditions ``residual(sol, *args)``, zero at the solution.

A condition is a :class:`Condition`: a callable ``residual(sol, *args)``
(solution first, then the differentiable arguments) that also records whether
its Jacobian in ``sol`` is symmetric.  :func:`~bilevel.implicit.custom_root`
reads that flag to choose its default linear solver: CG for symmetric systems
(stationarity of an objective), GMRES otherwise (fixed points, KKT systems).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch.func import grad

from .._tree import tree_map
from ..typing import FixedPointMap, Objective, TensorTree


class Condition:
    """An optimality condition ``residual(sol, *args)`` with metadata.

    Args:
        fn: the residual function ``fn(sol, *args) -> tree shaped like sol``.
        symmetric: whether the Jacobian ``d fn / d sol`` is symmetric (true for
            the gradient of an objective); it picks CG as the default solve.
        name: a label used in messages.
    """

    def __init__(self, fn: Callable[..., TensorTree], *, symmetric: bool = False, name: Optional[str] = None):
        if not callable(fn):
            raise TypeError(f"`fn` must be callable residual(sol, *args); got {type(fn).__name__}.")
        self.fn = fn
        self.symmetric = bool(symmetric)
        self.name = name or getattr(fn, "__name__", "residual")

    def __call__(self, sol: TensorTree, *args: Any) -> TensorTree:
        return self.fn(sol, *args)

    def __repr__(self) -> str:
        return f"Condition({self.name}, symmetric={self.symmetric})"


def is_symmetric(residual: Callable) -> bool:
    """Whether ``residual`` is declared to have a symmetric Jacobian in ``sol``."""
    return bool(getattr(residual, "symmetric", False))


def stationarity(objective: Objective) -> Condition:
    r"""First-order optimality of an unconstrained objective.

    .. math:: F(s, \theta) = \nabla_s f(s, \theta) = 0

    with ``objective(sol, *args)`` playing :math:`f`.  Its Jacobian in ``sol`` is
    the Hessian :math:`\nabla^2_{ss} f`, symmetric, so CG is the default solve.

    Args:
        objective: scalar function ``objective(sol, *args)``; ``sol`` may be a tree.

    Returns:
        A symmetric :class:`Condition` ``residual(sol, *args) = grad objective``.

    Example:
        >>> import torch
        >>> from bilevel.implicit import stationarity
        >>> residual = stationarity(lambda w, lam: 0.5 * ((w - 1) ** 2).sum() + 0.5 * lam * (w ** 2).sum())
        >>> residual(torch.tensor([0.5]), torch.tensor(1.0))
        tensor([0.])
    """
    if not callable(objective):
        raise TypeError(f"`objective` must be callable objective(sol, *args); got {type(objective).__name__}.")
    gradient = grad(objective)

    def residual(sol, *args):
        return gradient(sol, *args)

    name = f"stationarity({getattr(objective, '__name__', 'objective')})"
    condition = Condition(residual, symmetric=True, name=name)
    condition.objective = objective
    return condition


def fixed_point_residual(T: FixedPointMap, *, symmetric: bool = False) -> Condition:
    r"""The condition of a fixed point ``sol = T(sol, *args)``.

    .. math:: F(s, \theta) = T(s, \theta) - s = 0

    Its Jacobian :math:`\partial_s T - I` is in general not symmetric, so GMRES is
    the default solve; pass ``symmetric=True`` when it is (e.g. for a gradient step
    :math:`T(s) = s - \eta \nabla f(s)`).

    Args:
        T: the map ``T(sol, *args)``, returning a tree shaped like ``sol``.
        symmetric: declare ``dT/dsol`` symmetric.
    """
    if not callable(T):
        raise TypeError(f"`T` must be callable T(sol, *args); got {type(T).__name__}.")

    def residual(sol, *args):
        return tree_map(torch.sub, T(sol, *args), sol)

    name = f"fixed_point({getattr(T, '__name__', 'T')})"
    condition = Condition(residual, symmetric=symmetric, name=name)
    condition.fixed_point_map = T
    return condition


__all__ = ["Condition", "is_symmetric", "stationarity", "fixed_point_residual"]
