r"""A user's own linear-solve function in the place of a :class:`LinearSolver`.

Code ported from other libraries often carries its own solve, written to the
protocol ``solve(matvec, b, x0=None) -> x`` (TorchOpt, JAXopt) or
``-> (x, info)`` (this library's).  :func:`~bilevel.hypergrad` and
:func:`~bilevel.custom_root` accept such a function as ``solve=``; this module
wraps it so that the rest of the core sees a solver like its own: the answer's
structure is checked, and the certificate is measured, since a foreign ``info``
(or none) cannot be read.  The wrapper computes the true residual
:math:`\|b - A x\|` with one more product, per batch element, and calls the
solve converged where

* the function's ``info`` says so (an attribute or key ``converged``), or else
* :math:`\|b - A x\| \le \epsilon^{1/4}\,\|b\|` (about 1e-4 in float64, 0.02 in
  float32: the bar of an optimality residual, which the usual defaults of other
  libraries' solvers, e.g. CG to 1e-5, pass).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Optional

import torch

from ..._tolerance import default_residual_tol
from ..._tree import Raveler, check_same_structure, tree_map
from ...status import Status
from ...typing import Matvec, TensorTree
from ._base import LinearSolveInfo, LinearSolver


def _accepts(fn: Callable, name: str, position: int) -> bool:
    """Whether ``fn`` takes the parameter ``name`` (by keyword, or as the positional
    parameter number ``position``); ``True`` where its signature cannot be read."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return True
    if any(p.name == name and p.kind != p.POSITIONAL_ONLY for p in parameters):
        return True
    if position < 0:  # by keyword only
        return any(p.kind == p.VAR_KEYWORD for p in parameters)
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) > position or any(p.kind == p.VAR_POSITIONAL for p in parameters)


def _field(info: Any, name: str) -> Any:
    if isinstance(info, dict):
        return info.get(name)
    return getattr(info, name, None)


class SolveFunction:
    r"""``fn(matvec, b, x0=None) -> x`` or ``-> (x, info)``, called like a :class:`LinearSolver`.

    Args:
        fn: the function.  It receives the operator ``matvec`` (trees shaped like
            ``b`` to trees shaped like ``b``) and ``b``; ``x0`` only where it takes a
            third argument, ``batch_dims`` only where it is not 0 (a batch of
            independent systems, e.g. under :func:`torch.func.vmap` or
            :func:`~torch.func.jacrev`), and then only if it takes that keyword;
            a function written for one system is called once per batch element
            instead (each of its products then costs one batched product).

    Example:
        >>> import torch
        >>> from bilevel.implicit.linear_solve.function import SolveFunction
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> def dense(matvec, b):                  # materializes A: fine for 2 unknowns
        ...     return torch.linalg.solve(torch.func.vmap(matvec)(torch.eye(2, dtype=b.dtype)).T, b)
        >>> x, info = SolveFunction(dense)(lambda v: A @ v, torch.tensor([1.0, 0.0], dtype=torch.float64))
        >>> torch.allclose(A @ x, torch.tensor([1.0, 0.0], dtype=torch.float64)), bool(info.converged)
        (True, True)
    """

    def __init__(self, fn: Callable):
        if not callable(fn):
            raise TypeError(f"`solve` must be callable; got {type(fn).__name__}.")
        self.fn = fn
        self.name = getattr(fn, "__name__", type(fn).__name__)
        self._takes_x0 = _accepts(fn, "x0", 2)
        self._takes_batch_dims = _accepts(fn, "batch_dims", -1)

    def __repr__(self) -> str:
        return f"SolveFunction({self.name})"

    def __call__(self, matvec: Matvec, b: TensorTree, x0: Optional[TensorTree] = None, *,
                 batch_dims: int = 0) -> tuple[TensorTree, LinearSolveInfo]:
        if batch_dims and not self._takes_batch_dims:
            x, info = self._loop(matvec, b, x0, batch_dims)
        else:
            x, info = self._call(matvec, b, x0, {"batch_dims": batch_dims} if batch_dims else {})
        if isinstance(info, LinearSolveInfo):
            return x, info
        return x, self._measured_info(matvec, b, x, batch_dims, info)

    def _call(self, matvec: Matvec, b: TensorTree, x0: Optional[TensorTree], kwargs: dict) -> tuple:
        """``(x, info or None)`` from one call of the function, ``x`` checked against ``b``."""
        args = (matvec, b) if x0 is None or not self._takes_x0 else (matvec, b, x0)
        out = self.fn(*args, **kwargs)
        x, info = out, None
        if isinstance(out, tuple) and len(out) == 2 and not _same_structure(out, b):  # (x, info)
            x, info = out
        try:
            check_same_structure(x, b, f"{self.name}(matvec, b)", "b")
        except ValueError as err:
            raise ValueError(f"solve: {err} A solve function returns x, or (x, info), with x shaped like b.") from None
        return x, info

    def _loop(self, matvec: Matvec, b: TensorTree, x0: Optional[TensorTree], batch_dims: int) -> tuple:
        r"""A batch of independent systems (a root with ``batch_dims``, or one under
        :func:`torch.func.jacrev` / :func:`~torch.func.vmap`) for a function written for one
        system: called once per element, with :math:`v \mapsto A_i v` taken as element
        :math:`i` of the batched product of :math:`v` placed in slot :math:`i` (zeros
        elsewhere; the systems are independent).  Each of its products costs one batched
        product, so a batch of :math:`B` costs :math:`B` times the products of one solve: a
        solver of :mod:`bilevel.implicit`, or a function taking ``batch_dims``, solves the
        batch in one go."""
        rav = Raveler(b, batch_dims)  # also ravels and unravels single systems (no batch dimensions)
        batch, n = tuple(rav.batch_shape), rav.size
        count = math.prod(batch)
        flat_b = rav.ravel(b).reshape(count, n)
        flat_x0 = None if x0 is None else rav.ravel(x0).reshape(count, n)  # (x0 is shaped like b)

        def system(i: int):
            slot = (torch.arange(count, device=flat_b.device) == i).unsqueeze(-1)

            def element_matvec(v):
                placed = torch.where(slot, rav.ravel(v).reshape(1, n), 0).reshape(*batch, n)
                return rav.unravel(rav.ravel(matvec(rav.unravel(placed))).reshape(count, n)[i])

            return element_matvec

        xs, infos = [], []
        for i in range(count):
            x_i, info_i = self._call(system(i), rav.unravel(flat_b[i]),
                                     None if flat_x0 is None else rav.unravel(flat_x0[i]), {})
            xs.append(rav.ravel(x_i).reshape(n))
            infos.append(info_i)
        x = rav.unravel(torch.stack(xs).reshape(*batch, n))
        verdicts = [_field(info, "converged") for info in infos]
        info = None if any(v is None for v in verdicts) else {
            "converged": torch.stack([torch.as_tensor(v).reshape(()) for v in verdicts]).reshape(batch)}
        return x, info

    def _measured_info(self, matvec: Matvec, b: TensorTree, x: TensorTree, batch_dims: int,
                       info: Any) -> LinearSolveInfo:
        """The certificate of ``x``: its true residual, and whether it counts as converged."""
        rav = Raveler(b, batch_dims)
        with torch.no_grad():
            residual = tree_map(torch.sub, b, matvec(x))
            b_norm, residual_norm = (torch.linalg.vector_norm(rav.ravel(t), dim=-1) for t in (b, residual))
        converged = _field(info, "converged")
        if converged is None:  # judged by its residual, against the tolerance of an optimality residual
            converged, failure = residual_norm <= default_residual_tol(b_norm.dtype) * b_norm, Status.INACCURATE
        else:  # its own verdict: its iterations ran out
            converged, failure = _per_element(converged, b_norm).to(torch.bool), Status.MAX_ITERATIONS
        status = torch.where(converged, int(Status.SUCCESS), int(failure))
        status = torch.where(torch.isfinite(residual_norm), status, int(Status.NONFINITE))
        iterations = _field(info, "iterations")
        iterations = torch.zeros_like(status) if iterations is None else _per_element(iterations, b_norm).to(
            torch.int64)
        return LinearSolveInfo(iterations, residual_norm, b_norm, status)


def _per_element(value: Any, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a number, a sequence or a tensor) as a tensor of ``like``'s shape: one
    entry per batch element, or one for all."""
    value = torch.as_tensor(value, device=like.device)
    if value.numel() == like.numel():
        return value.reshape(like.shape)
    if value.numel() == 1:
        return value.reshape(()).expand(like.shape)
    raise ValueError(f"solve: the function's info holds {value.numel()} values where the batch has "
                     f"{like.numel()} systems.")


def _same_structure(a: Any, b: Any) -> bool:
    try:
        check_same_structure(a, b, "a", "b")
    except ValueError:
        return False
    return True


def as_linear_solver(solve: Any) -> Any:
    """``solve`` itself where it is ``None`` or a :class:`LinearSolver` (or already
    wrapped), else a :class:`SolveFunction` around it."""
    if solve is None or isinstance(solve, (LinearSolver, SolveFunction)):
        return solve
    return SolveFunction(solve)


__all__ = ["SolveFunction", "as_linear_solver"]
