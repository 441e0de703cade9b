r"""The interface every inner solver keeps, and what the solvers share.

Interface
---------
A solver is a frozen dataclass of settings, checked at construction (an error
names the field).  It minimizes ``fun(sol, *args)`` over ``sol`` (the solution
first, then the arguments it depends on) in two ways:

``sol, info = solver.run(fun, init, *args)``
    Runs the iterations without autograd (under :func:`torch.no_grad`, on
    detached inputs; each gradient comes from a local graph freed at once) from
    the warm start ``init``, a tensor or a tree of floating tensors.  It is
    not differentiable and not meant to run under :mod:`torch.func` transforms:
    use the call below for both.  ``sol`` has the structure, dtypes and device
    of ``init``; ``info`` is a :class:`SolverInfo`.

``sol = solver(fun, init, *args)``
    The differentiable version: :func:`~bilevel.implicit.custom_root` with the
    solver's optimality condition (:func:`~bilevel.implicit.stationarity` of
    ``fun``; the proximal-gradient fixed point for
    :class:`~bilevel.solvers.ProximalGradient`; the Gauss-Newton stationarity
    :math:`J^\top r = 0` for least squares) wrapped around :meth:`run`.  ``init``
    is passed to the solver as a keyword, so it is a warm start and is not
    differentiated; gradients w.r.t. every floating tensor in ``args`` come from
    the implicit function theorem.  ``implicit_solve`` (a field of every solver)
    is the linear solver of that backward system (``None``: custom_root's default).
    For a batch of least-squares problems (``batch_dims > 0``) the condition is
    one problem's and ``custom_root`` solves one backward system per problem.

Tolerance rule
--------------
Each solver measures an optimality residual :math:`r(x)`: the gradient norm
:math:`\|\nabla f(x)\|_2` (smooth solvers), the gradient-mapping norm
:math:`\|x - \operatorname{prox}_{\eta g}(x - \eta\nabla f(x))\|_2 / \eta`
(proximal gradient; equal to the gradient norm when :math:`g = 0`), or
:math:`\|J^\top r\|_2` per batch element (least squares).  It stops at

.. math:: r(x_k) \le \mathrm{tol}\cdot\max(1, r(x_0)),

with ``tol=None`` meaning :math:`\sqrt{\varepsilon}` of the dtype of ``init``
(1.5e-8 in float64, 3.5e-4 in float32; :func:`bilevel._tolerance.default_tol`).
Relative to the initial residual, the rule is reachable in either precision
whatever the scale of the objective (a ridge problem on raw features, with a
Hessian norm in the thousands, stops at the same relative accuracy as a
standardized one).  The threshold is kept in ``info.tolerance``.  The
least-squares solvers raise a threshold that lies below the rounding floor of
:math:`J^\top r` to that floor, and :class:`LevenbergMarquardt` also tests its
step, so that damping cannot stop it short of the root of an ill-conditioned
problem (:mod:`bilevel.solvers.least_squares`).

For :meth:`__call__`, the condition handed to ``custom_root`` is divided by
:math:`\max(1, r(x_0))`: the same normalization, a constant that leaves the
implicit gradient unchanged, so that ``custom_root``'s optimality certificate
measures the quantity the solver stopped on.

Failures
--------
* Budget exhausted: status :attr:`~bilevel.status.Status.MAX_ITERATIONS`, the
  residual in ``info`` and a :class:`~bilevel.status.ConvergenceWarning`
  naming the solver, the residual and the remedy (raise ``maxiter``, loosen ``tol``).
* Non-finite value or gradient at an iterate: :class:`FloatingPointError`
  naming the solver and the iteration.  Trial points of the line searches of
  :class:`GradientDescent`, :class:`ProximalGradient`, :class:`GaussNewton` and
  :class:`LevenbergMarquardt` may be non-finite (they are rejected); the
  bridges (:class:`LBFGS`, :class:`ScipyMinimize`) raise at any non-finite
  evaluation.  In a batch of least-squares problems, an element whose iterate
  turns non-finite gets status NONFINITE and the others go on.
* Bad input (``fun`` not callable, a non-scalar objective, ``init`` not a
  tree of floating tensors): ``TypeError`` / ``ValueError`` naming the argument.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from .._autograd_context import clone_tensors, differentiates
from .._tolerance import default_residual_tol, default_tol
from .._tree import Raveler, tensor_leaves, tree_map
from ..implicit import custom_root
from ..implicit.conditions import Condition, stationarity
from ..implicit.linear_solve import LinearSolver
from ..status import ConvergenceWarning, Status
from ..typing import Objective, TensorTree

__all__ = ["Solver", "SolverInfo"]


@dataclass(frozen=True)
class SolverInfo:
    """Outcome of :meth:`Solver.run` (tensors; per batch element for batched solvers).

    Attributes:
        iterations: iterations run (``int64``).
        residual_norm: the optimality residual at the returned point (gradient
            norm; gradient-mapping norm for proximal gradient; ``||J^T r||`` for
            least squares).
        value: the objective at the returned point (the smooth part ``f`` for
            proximal gradient; ``0.5 ||r||^2`` for least squares); ``None``
            where not available.
        status: :class:`~bilevel.status.Status` codes (``int64``).
        tolerance: the threshold ``residual_norm`` was compared with,
            ``tol * max(1, initial residual)`` (for least squares, at least the
            rounding floor of ``||J^T r||`` where the element stopped).

    ``info.converged`` is the boolean tensor ``status == SUCCESS`` and
    ``info.summary(name)`` one line naming the failed elements and the remedy
    (the text of the :class:`~bilevel.status.ConvergenceWarning`).

    Example:
        >>> import torch, warnings
        >>> from bilevel.solvers import GradientDescent
        >>> from bilevel.status import Status
        >>> f = lambda w, c: 0.5 * ((w - c) ** 2).sum()          # Hessian I: step 1 is exact
        >>> c = torch.tensor([1.0, -2.0], dtype=torch.float64)
        >>> w, info = GradientDescent(step=1.0).run(f, torch.zeros(2, dtype=torch.float64), c)
        >>> w.tolist(), int(info.iterations), bool(info.converged)
        ([1.0, -2.0], 1, True)
        >>> bool(info.residual_norm <= info.tolerance), info.summary("GradientDescent")
        (True, 'GradientDescent converged')
        >>> g = lambda w, c: f(w, c) + 0.25 * (w ** 4).sum()     # two steps are not enough
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _, info = GradientDescent(maxiter=2).run(g, torch.zeros(2, dtype=torch.float64), c)
        >>> Status(int(info.status)).name, bool(info.converged), caught[0].category.__name__
        ('MAX_ITERATIONS', False, 'ConvergenceWarning')
        >>> info.summary("GradientDescent").split(":")[0]
        'GradientDescent did not converge'
    """

    iterations: torch.Tensor
    residual_norm: torch.Tensor
    value: Optional[torch.Tensor]
    status: torch.Tensor
    tolerance: torch.Tensor

    @property
    def converged(self) -> torch.Tensor:
        """Boolean tensor: which problems reached the tolerance."""
        return self.status == Status.SUCCESS

    def summary(self, name: str = "solver") -> str:
        """One line naming the failed elements, the worst residual and the remedy."""
        failed = (~self.converged).reshape(-1)
        if not bool(failed.any()):
            return f"{name} converged"
        idx = failed.nonzero().reshape(-1).tolist()
        res = self.residual_norm.reshape(-1)
        worst = max(idx, key=lambda i: float(res[i]) if math.isfinite(float(res[i])) else math.inf)
        where = "" if self.status.dim() == 0 else f" (batch elements {idx[:8]}{'...' if len(idx) > 8 else ''})"
        status = Status(int(self.status.reshape(-1)[worst]))
        remedy = _REMEDIES.get(status, status.message)
        return (
            f"{name} did not converge{where}: {status.name} after "
            f"{int(self.iterations.reshape(-1)[worst])} iterations, optimality residual "
            f"{float(res[worst]):.3g} > tolerance {float(self.tolerance.reshape(-1)[worst]):.3g}; {remedy}."
        )


_REMEDIES = {
    Status.MAX_ITERATIONS: "raise `maxiter` or loosen `tol`",
    Status.BREAKDOWN: (
        "no step decreased the objective (the line search failed): `tol` may be below the "
        "precision reachable for this objective (loosen it), or `fun` is not smooth"
    ),
}


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _tol_ok(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1)


def _positive_or_none(v) -> bool:
    return v is None or (
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    )


COMMON_RULES = dict(
    maxiter=(_positive_int, "a positive int"),
    tol=(_tol_ok, "None or a float in (0, 1)"),
    implicit_solve=(
        lambda v: v is None or isinstance(v, LinearSolver),
        "None or a linear solver such as bilevel.implicit.CG()",
    ),
)


@dataclass(frozen=True)
class Solver:
    """Base class of the inner solvers (see the module docstring for the interface).

    Subclasses implement :meth:`run` and, if their optimality condition is not
    the stationarity of ``fun``, :meth:`_condition`.  The base class has no
    settings of its own: each subclass's fields (``maxiter``, ``tol``,
    ``implicit_solve``, ...) are described on its page.

    Example:
        Both entry points on the quadratic
        :math:`f(w, b) = \\tfrac12 w^\\top A w - b^\\top w`, whose minimizer
        :math:`w^\\star = A^{-1} b` has the Jacobian
        :math:`\\partial w^\\star / \\partial b = A^{-1}`:

        >>> import torch
        >>> from bilevel.solvers import LBFGS, Solver
        >>> A = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
        >>> f = lambda w, b: 0.5 * w @ A @ w - b @ w
        >>> b = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
        >>> init = torch.zeros(2, dtype=torch.float64)
        >>> solver = LBFGS()
        >>> isinstance(solver, Solver)
        True
        >>> w, info = solver.run(f, init, b)                      # no autograd: (sol, info)
        >>> bool(info.converged), w.requires_grad
        (True, False)
        >>> torch.allclose(w, torch.linalg.solve(A, b.detach()))
        True
        >>> w = solver(f, init, b)                                # differentiable in b
        >>> w.requires_grad, torch.allclose(w, torch.linalg.solve(A, b.detach()))
        (True, True)
        >>> J = torch.autograd.functional.jacobian(lambda b: solver(f, init, b), b)
        >>> torch.allclose(J, torch.linalg.inv(A))                # implicit function theorem
        True
    """

    @property
    def name(self) -> str:
        return type(self).__name__

    def run(self, fun: Objective, init: TensorTree, *args: Any) -> tuple[TensorTree, SolverInfo]:
        raise NotImplementedError

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "run" in cls.__dict__:
            cls.run = _outside_inference_mode(cls.__dict__["run"])

    def __call__(self, fun: Objective, init: TensorTree, *args: Any) -> TensorTree:
        check_fun(fun, self.name)
        solve, scale, dtype = self._recorded_run(fun, init)
        return self._differentiable(self._condition(fun, scale), solve, dtype)(*args, init=warm_start(init))

    def _recorded_run(self, fun: Callable, init: TensorTree) -> tuple[Callable, "_Scale", torch.dtype]:
        """``solve(*args, init)``: :meth:`run` returning the solution alone and recording
        its tolerance in the returned :class:`_Scale`; also the dtype of ``init``."""
        dtype = check_init(init, self.name)[0].dtype
        scale = _Scale()

        def solve(*args, init):
            sol, info = self.run(fun, init, *args)
            scale.record(info, self._tol(dtype))
            return sol

        return solve, scale, dtype

    def _condition(self, fun: Objective, scale: _Scale) -> Condition:
        """``stationarity(fun / max(1, r0))``: the gradient vanishes."""

        def normalized(sol, *args):
            return fun(sol, *args) * scale.value

        normalized.__name__ = getattr(fun, "__name__", "fun")
        return stationarity(normalized)

    def _differentiable(
        self, condition: Condition, solve: Callable, dtype: torch.dtype, batch_dims: int = 0
    ) -> Callable:
        """``solve`` made differentiable by ``custom_root(condition)``; with ``batch_dims``
        leading dimensions of independent problems (``condition`` is then one problem's)."""
        residual_tol = max(self._tol(dtype), default_residual_tol(dtype))
        return custom_root(
            condition, solve=self.implicit_solve, residual_tol=residual_tol, batch_dims=batch_dims
        )(solve)

    def _tol(self, dtype: torch.dtype) -> float:
        return default_tol(dtype) if self.tol is None else float(self.tol)


def warm_start(init: TensorTree) -> TensorTree:
    """``init`` detached, for the keyword of a differentiable solve: the solution
    does not depend on its warm start, so no gradient is lost, and ``custom_root``
    does not report it as a differentiated keyword."""
    return detach_args((init,))[0]


class _Scale:
    """The constant ``1 / max(1, r0)`` by which :meth:`Solver.__call__` divides the
    condition; set by the run (the smallest over runs, e.g. under vmap)."""

    def __init__(self):
        self.value = 1.0
        self.step = None  # the final step size, for step-dependent conditions
        self._set = False

    def record(self, info: SolverInfo, tol: float, step: Optional[float] = None) -> None:
        value = float((tol / info.tolerance).min())
        self.value = value if not self._set else min(self.value, value)
        self._set = True
        if step is not None:
            self.step = step if self.step is None else min(self.step, step)


# ----------------------------------------------------------------------------- input checks


def check_fun(fun: Any, name: str, signature: str = "fun(sol, *args) -> scalar tensor") -> None:
    if not callable(fun):
        raise TypeError(f"{name}: `fun` must be callable {signature}; got {type(fun).__name__}.")


def check_init(init: Any, name: str) -> list[torch.Tensor]:
    """The leaves of ``init``, checked to be floating tensors."""
    try:
        leaves, _ = tensor_leaves(init, "init")
    except (TypeError, ValueError) as err:
        raise type(err)(f"{name}: {err}") from None
    for i, leaf in enumerate(leaves):
        if not leaf.is_floating_point():
            raise TypeError(
                f"{name}: `init` must hold floating-point tensors (the warm start); leaf {i} has "
                f"dtype {leaf.dtype}. Pass e.g. `init.double()` or `init.float()`."
            )
    if sum(leaf.numel() for leaf in leaves) == 0:
        raise ValueError(f"{name}: `init` has no elements: there is nothing to solve for.")
    return leaves


def _outside_inference_mode(run: Callable) -> Callable:
    """``run`` made to work under :func:`torch.inference_mode`, where autograd records
    nothing and a gradient-based solver would see a zero gradient and stop at its start:
    there it runs with inference mode off, on copies of ``init`` and ``args`` (inference
    tensors can neither be saved for a backward pass nor updated in place outside it),
    and the solution is returned as inference tensors."""
    return differentiates(run, finish=lambda out: (clone_tensors(out[0]), out[1]))


def detach_args(args: Sequence[Any]) -> tuple:
    """``args`` with every tensor detached (the solvers never build graphs through them)."""
    return tuple(tree_map(lambda a: a.detach() if torch.is_tensor(a) else a, tuple(args)))


def check_scalar(value: Any, name: str) -> torch.Tensor:
    if not torch.is_tensor(value) or value.dim() != 0 or not value.is_floating_point():
        got = f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}" if torch.is_tensor(value) else (
            type(value).__name__
        )
        raise ValueError(
            f"{name}: `fun(sol, *args)` must return a scalar (0-d) floating tensor, the objective; "
            f"got {got}. Reduce it, e.g. with `.sum()`."
        )
    return value


def nonfinite(name: str, iteration: int, what: str = "the objective or its gradient") -> FloatingPointError:
    return FloatingPointError(
        f"{name}: {what} is not finite (NaN or inf) at iteration {iteration}. Check `fun` and its "
        "arguments for NaN/inf, or the domain of `fun` at `init`."
    )


def is_finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# ----------------------------------------------------------------------------- flat problems


class FlatObjective:
    """A scalar objective ``fun(sol, *args)`` seen as a function of one flat vector.

    ``init``'s leaves are concatenated (:class:`~bilevel._tree.Raveler`); the
    iterations work on the flat vector and :meth:`tree` rebuilds the solution
    with the structure, shapes and dtypes of ``init``.
    """

    def __init__(self, fun: Objective, init: TensorTree, args: Sequence[Any], name: str):
        check_fun(fun, name)
        check_init(init, name)
        self.fun, self.args, self.name = fun, detach_args(args), name
        self.rav = Raveler(init, 0, name="init")
        self.x0 = self.rav.ravel(tree_map(lambda t: t.detach(), init)).to(self.rav.dtype).clone()
        self.evaluations = 0

    def tree(self, x: torch.Tensor) -> TensorTree:
        return self.rav.unravel(x)

    def value(self, x: torch.Tensor) -> torch.Tensor:
        """``fun`` at ``x`` (no gradient)."""
        self.evaluations += 1
        with torch.no_grad():
            return check_scalar(self.fun(self.tree(x), *self.args), self.name).detach()

    def value_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``fun`` and its gradient at ``x`` (one local graph, freed at once)."""
        self.evaluations += 1
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            value = check_scalar(self.fun(self.tree(x), *self.args), self.name)
            if not value.requires_grad:  # fun does not depend on sol
                return value.detach(), torch.zeros_like(x)
            (g,) = torch.autograd.grad(value, x, allow_unused=True)
        return value.detach(), (torch.zeros_like(x) if g is None else g)


def make_info(iterations: int, residual: torch.Tensor, value: Optional[torch.Tensor], status: Status,
              tolerance: float, like: torch.Tensor) -> SolverInfo:
    """A scalar :class:`SolverInfo` on the device of ``like`` (filled there: no
    host-to-device copy, which would make the host wait on CUDA)."""
    kw = dict(device=like.device)
    if torch.is_tensor(residual):
        residual = residual.detach().to(dtype=like.dtype, device=like.device).reshape(())
    else:
        residual = torch.full((), float(residual), dtype=like.dtype, **kw)
    return SolverInfo(
        iterations=torch.full((), int(iterations), dtype=torch.int64, **kw),
        residual_norm=residual,
        value=None if value is None else value.detach().reshape(()),
        status=torch.full((), int(status), dtype=torch.int64, **kw),
        tolerance=torch.full((), float(tolerance), dtype=like.dtype, **kw),
    )


def warn_if_failed(info: SolverInfo, name: str, stacklevel: int = 3) -> None:
    """Warn with :class:`~bilevel.status.ConvergenceWarning` where an element failed."""
    if not bool(info.converged.all()):
        warnings.warn(info.summary(name), ConvergenceWarning, stacklevel=stacklevel)
