r"""The differentiable call of a batched least-squares solve, one adjoint system per problem.

A batched solver (``batch_dims = k > 0``) takes an *already batched*
``fun(sol, *args)``: ``sol`` and the per-problem data carry ``k`` leading batch
dimensions, shared data do not.  :func:`~bilevel.implicit.custom_root` with
``batch_dims=k`` needs one problem's condition, vmapped over every tensor
argument, so this module

* sorts the tensor leaves of ``args`` by shape: a leaf whose leading ``k``
  dimensions are the batch shape of ``init`` is per-problem data; any other is
  shared.  A shared tensor that may carry a gradient is expanded to the batch
  with :meth:`torch.Tensor.expand` (a view: autograd sums its gradient over the
  batch); one that cannot is a constant of the condition, like the leaves that
  are not tensors;
* writes the condition of problem ``b`` with ``fun`` itself, on a batch of one:
  ``sol_b`` and the per-problem leaves get ``k`` leading dimensions of size 1,
  the shared leaves are passed as they are;
* checks that sort before trusting it: problem by problem (vmapped) the
  residuals must equal those of ``fun`` on the whole batch, at ``init`` and at a
  perturbed point.  A shared tensor whose leading dimensions happen to equal the
  batch shape fails the check (problem ``b`` would see its row ``b`` only), and
  so does a ``fun`` that cannot be vmapped, or a check that cannot read values
  (inside :func:`torch.func.vmap`).  Such calls keep the joint condition of
  the whole batch (one block-diagonal system: the same gradients, one
  certificate for the batch).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.func import vmap

from .._tree import is_transformed, tree_flatten, tree_map, tree_unflatten
from ..implicit.conditions import Condition, stationarity

__all__ = ["BatchedArgs"]


def _lead(t: torch.Tensor, k: int) -> torch.Tensor:
    """``t`` with ``k`` leading dimensions of size 1 (a batch of one)."""
    return t.reshape((1,) * k + tuple(t.shape))


_BATCHED, _SHARED, _CONSTANT = "batched", "shared", "constant"


class BatchedArgs:
    """How the arguments of a batched solve split into per-problem tensors, shared
    tensors to differentiate, and constants.

    A tensor leaf whose leading ``k`` dimensions are the batch shape is per-problem
    data; another tensor is shared: passed to ``custom_root`` expanded to the batch
    (a view) where it may carry a gradient (it requires grad, or a torch.func
    transform tracks it), and held as a constant of the condition otherwise,
    like every leaf that is not a tensor.

    Args:
        args: the arguments ``fun(sol, *args)`` receives (a tuple of trees).
        batch_shape: the leading shape of ``init`` (``k`` dimensions).
    """

    def __init__(self, args: tuple, batch_shape: tuple):
        self.batch = tuple(batch_shape)
        self.k = len(self.batch)
        leaves, self.spec = tree_flatten(tuple(args))
        self.kinds = [self._kind(a) for a in leaves]
        self.constants = [a if kind == _CONSTANT else None for a, kind in zip(leaves, self.kinds)]

    def _kind(self, a: Any) -> str:
        if not torch.is_tensor(a):
            return _CONSTANT
        if tuple(a.shape[: self.k]) == self.batch:
            return _BATCHED
        return _SHARED if a.requires_grad or is_transformed(a) else _CONSTANT

    @property
    def shared(self) -> list[bool]:
        """Per leaf of ``args``: whether it is a shared tensor passed to ``custom_root``."""
        return [kind == _SHARED for kind in self.kinds]

    def inputs(self, args: tuple) -> tuple:
        """The tensors handed to ``custom_root``: per-problem leaves as they are, shared
        ones expanded to the batch (views); constants are left out."""
        leaves = tree_flatten(tuple(args))[0]
        return tuple(
            a if kind == _BATCHED else a.expand(self.batch + tuple(a.shape))
            for a, kind in zip(leaves, self.kinds)
            if kind != _CONSTANT
        )

    def _rebuild(self, inputs: tuple, batched: Callable, shared: Callable) -> tuple:
        it = iter(inputs)
        leaves = [
            c if kind == _CONSTANT else (batched(next(it)) if kind == _BATCHED else shared(next(it)))
            for kind, c in zip(self.kinds, self.constants)
        ]
        return tree_unflatten(leaves, self.spec)

    def for_solver(self, inputs: tuple) -> tuple:
        """``args`` back from :meth:`inputs`: shared tensors with their own shape again (views)."""
        index = (0,) * self.k
        return self._rebuild(inputs, lambda a: a, lambda a: a[index])

    def for_element(self, inputs: tuple) -> tuple:
        """One problem's ``args``, from :meth:`inputs` as custom_root's vmap hands them
        over, as a batch of one for ``fun``."""
        return self._rebuild(inputs, lambda a: _lead(a, self.k), lambda a: a)

    def residual(self, fun: Callable) -> Callable:
        """``one(sol_b, *inputs_b)``: the flat residual vector of one problem, through ``fun``."""
        k, for_element = self.k, self.for_element

        def one(sol, *inputs):
            return fun(tree_map(lambda t: _lead(t, k), sol), *for_element(inputs)).reshape(-1)

        return one

    def condition(self, fun: Callable, scale: Any) -> Condition:
        """Stationarity of ``0.5 ||r_b||^2 * scale.value`` for one problem ``b``."""
        one = self.residual(fun)

        def half_squared_norm(sol, *inputs):
            r = one(sol, *inputs)
            return 0.5 * (r * r).sum() * scale.value

        half_squared_norm.__name__ = f"half_squared_norm({getattr(fun, '__name__', 'fun')})"
        return stationarity(half_squared_norm)

    def consistent(self, fun: Callable, init: Any, args: tuple) -> bool:
        """Whether ``fun`` evaluated problem by problem (vmapped, leaves as sorted)
        equals ``fun`` on the whole batch, at ``init`` and at a perturbed point.
        ``False`` also where that cannot be evaluated."""
        try:
            return self._consistent(fun, init, args)
        except Exception:  # noqa: BLE001 - any failure means: keep the joint condition
            return False

    def _consistent(self, fun: Callable, init: Any, args: tuple) -> bool:
        args = tree_map(lambda a: a.detach() if torch.is_tensor(a) else a, tuple(args))
        init = tree_map(lambda t: t.detach(), init)
        inputs = self.inputs(args)
        each = self.residual(fun)
        for _ in range(self.k):
            each = vmap(each)
        B = math.prod(self.batch)
        with torch.no_grad():
            for point in (init, _perturbed(init)):
                full, per = fun(point, *args), each(point, *inputs)
                if not (torch.is_tensor(full) and full.is_floating_point()) or full.numel() != per.numel():
                    return False
                full, per = full.reshape(B, -1), per.reshape(B, -1)
                tol = math.sqrt(float(torch.finfo(full.dtype).eps))
                atol = tol * float(full.abs().max())
                if not (math.isfinite(atol) and torch.allclose(per, full, rtol=tol, atol=atol)):
                    return False
        return True


def _perturbed(init: Any) -> Any:
    """``init`` moved by about 1e-2 of its size along a fixed, irregular direction."""

    def move(t):
        pattern = torch.cos(1.7 * torch.arange(t.numel(), dtype=t.dtype, device=t.device) + 0.3).reshape(t.shape)
        return t + 1e-2 * (1 + t.abs()) * pattern

    return tree_map(move, init)

