"""Type aliases shared across :mod:`bilevel`.

A *tensor tree* is a tensor or any nesting of tuples, lists and dicts of tensors
(a pytree in :mod:`torch.utils._pytree`'s sense), e.g. the
``dict(model.named_parameters())`` used with :func:`torch.func.functional_call`.
"""

from __future__ import annotations

from typing import Any, Callable, Union

import torch

TensorTree = Union[torch.Tensor, tuple, list, dict, Any]
"""A tensor or a pytree (tuple / list / dict nesting) of tensors."""

Matvec = Callable[[TensorTree], TensorTree]
"""A linear map ``v -> A v`` over tensor trees of one structure."""

Residual = Callable[..., TensorTree]
"""An optimality condition ``residual(sol, *args)``, zero at the solution."""

FixedPointMap = Callable[..., TensorTree]
"""A map ``T(sol, *args)`` whose fixed point ``sol = T(sol, *args)`` is the solution."""

Objective = Callable[..., torch.Tensor]
"""A scalar objective ``objective(sol, *args)``."""

__all__ = ["TensorTree", "Matvec", "Residual", "FixedPointMap", "Objective"]
