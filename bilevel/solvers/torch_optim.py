r"""Bridges to :mod:`torch.optim`: any optimizer in a loop, and L-BFGS."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch

from .._tolerance import default_tol
from .._tree import tree_flatten, tree_unflatten
from ..implicit.linear_solve import LinearSolver
from ..implicit.linear_solve._base import _sync_every
from .._checks import check_fields as _check_fields
from ..status import Status
from ..typing import Objective, TensorTree
from .gradient_descent import polish_by_descent
from ._base import (
    COMMON_RULES,
    Solver,
    SolverInfo,
    _positive_or_none,
    check_fun,
    check_init,
    check_scalar,
    detach_args,
    make_info,
    nonfinite,
    warn_if_failed,
)


def _check_optimizer_options(cls: type, options: dict) -> None:
    """Name the options ``cls`` does not take, at construction rather than at the first run."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(options) - set(params) - {"self"})
    if unknown:
        known = sorted(set(params) - {"self", "params", "lr"})
        raise ValueError(f"OptimizerLoop: {cls.__name__} takes no option {unknown}; its options: {known}.")

__all__ = ["OptimizerLoop", "LBFGS"]

_CHUNK = 25  # L-BFGS iterations between progress checks

OptimizerSpec = Union[str, type, Callable[[list], torch.optim.Optimizer]]


def known_optimizers() -> dict[str, type]:
    """The :mod:`torch.optim` optimizers :class:`OptimizerLoop` knows by name (lower case).

    ``LBFGS`` is left out (use :class:`~bilevel.solvers.LBFGS`) and so is
    ``SparseAdam`` (it needs sparse gradients).  The list follows the installed
    torch version.

    Returns:
        A new ``dict`` from each lower-case name (``"adam"``, ``"sgd"``,
        ``"rprop"``, ...) to its :class:`torch.optim.Optimizer` subclass.

    Example:
        >>> import torch
        >>> from bilevel.solvers import OptimizerLoop, known_optimizers
        >>> known = known_optimizers()
        >>> known["adam"] is torch.optim.Adam, known["sgd"] is torch.optim.SGD
        (True, True)
        >>> "lbfgs" in known, "sparseadam" in known
        (False, False)
        >>> all(issubclass(cls, torch.optim.Optimizer) for cls in known.values())
        True
        >>> f = lambda w, c: ((w - c) ** 2).sum()               # Hessian 2 I: lr 0.5 is exact
        >>> c = torch.tensor([1.0, -2.0], dtype=torch.float64)
        >>> w, info = OptimizerLoop("SGD", lr=0.5).run(f, torch.zeros(2, dtype=torch.float64), c)
        >>> w.tolist(), int(info.iterations), bool(info.converged)   # any case of a known name
        ([1.0, -2.0], 1, True)
    """
    out = {}
    for name, obj in vars(torch.optim).items():
        is_optimizer = isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer)
        if is_optimizer and obj is not torch.optim.Optimizer and name not in ("LBFGS", "SparseAdam"):
            out[name.lower()] = obj
    return out


class _Leaves:
    """The leaves of ``init`` as fresh leaf tensors (the optimizer's parameters),
    and ``fun`` evaluated on them with gradients."""

    def __init__(self, fun: Objective, init: TensorTree, args, name: str):
        check_fun(fun, name)
        leaves = check_init(init, name)
        _, self.spec = tree_flatten(init)
        self.params = [leaf.detach().clone().requires_grad_() for leaf in leaves]
        self.fun, self.args, self.name = fun, detach_args(args), name

    def tree(self, leaves=None) -> TensorTree:
        return tree_unflatten(list(self.params if leaves is None else leaves), self.spec)

    def evaluate_on_device(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Objective at the parameters, gradients into ``.grad``; returns (value, grad norm)
        as tensors, without reading them on the host."""
        for p in self.params:
            p.grad = None
        with torch.enable_grad():
            value = check_scalar(self.fun(self.tree(), *self.args), self.name)
            grads = (
                torch.autograd.grad(value, self.params, allow_unused=True)
                if value.requires_grad else [None] * len(self.params)
            )
        for p, g in zip(self.params, grads):
            p.grad = torch.zeros_like(p) if g is None else g
        norms = torch.stack([torch.linalg.vector_norm(p.grad) for p in self.params])
        return value.detach(), torch.linalg.vector_norm(norms)

    def evaluate(self, iteration: int) -> tuple[torch.Tensor, float]:
        """Objective at the parameters, gradients into ``.grad``; returns (value, grad norm)."""
        value, norm = self.evaluate_on_device()
        norm, value_host = torch.stack([norm, value.to(norm.dtype)]).tolist()
        if not (math.isfinite(norm) and math.isfinite(value_host)):  # one host synchronisation
            raise nonfinite(self.name, iteration)
        return value, norm

    def solution(self) -> TensorTree:
        return self.tree([p.detach().clone() for p in self.params])


@dataclass(frozen=True, init=False)
class OptimizerLoop(Solver):
    r"""Minimize ``fun`` with any :mod:`torch.optim` optimizer, full batch, up to ``maxiter`` steps.

    .. math:: x_{k+1} = \mathrm{step}_{\mathrm{opt}}\bigl(x_k, \nabla f(x_k, \theta)\bigr)

    on a copy of ``init`` (one parameter per leaf), stopping early when
    :math:`\|\nabla f(x_k)\| \le \mathrm{tol}\cdot\max(1, \|\nabla f(x_0)\|)`
    (``tol=None``: ``sqrt(eps)`` of the dtype), checked at every step, at the
    point where the gradient was taken (that point is returned).  On an
    accelerator the host reads that test every 8 steps only, so the loop queues
    device work without waiting; steps taken after the test passed are undone,
    so the result is the same as on the CPU.  Optimizers
    with a constant learning rate (Adam, SGD) typically hover at a distance set by
    ``lr`` instead of converging tightly: loosen ``tol`` for them, or prefer
    :class:`~bilevel.solvers.LBFGS` / :class:`~bilevel.solvers.GradientDescent`
    where a tight inner solution matters (the implicit gradient assumes one).
    Scale-free methods such as ``"rprop"`` converge tightly too (its smallest
    step is lowered from torch's ``1e-6`` to ``1e-12`` unless ``step_sizes``
    is given).

    Args:
        optimizer: a name (``"adam"``, ``"sgd"``, ``"rprop"``, ... any
            :mod:`torch.optim` class, case-insensitive), an optimizer class, or a
            factory ``params -> optimizer``.
        lr: learning rate (for names and classes).
        maxiter: step budget (default 1000).
        tol: relative gradient tolerance; ``None``: ``sqrt(eps)`` of the dtype.
        implicit_solve: linear solver of the backward system (``None``: custom_root's default).
        **options: further keyword arguments of the optimizer (e.g. ``momentum=0.9``),
            for names and classes; kept in ``.options`` as sorted ``(key, value)`` pairs.

    Raises:
        ValueError: an unknown optimizer name (the error lists the known ones), a
            setting out of range, ``options`` given with a factory, a non-scalar ``fun``.
        TypeError: ``fun`` not callable, ``init`` not a tree of floating tensors, an
            ``optimizer`` class or factory that does not give a :class:`torch.optim.Optimizer`.
        FloatingPointError: a non-finite objective or gradient at an iterate.

    Example:
        >>> import torch
        >>> from bilevel.solvers import OptimizerLoop
        >>> f = lambda w, c: ((w - c) ** 2).sum()
        >>> w, info = OptimizerLoop("rprop", lr=0.1).run(
        ...     f, torch.zeros(2, dtype=torch.float64), torch.tensor([1.0, -2.0], dtype=torch.float64))
        >>> w.round(decimals=6).tolist(), bool(info.converged)
        ([1.0, -2.0], True)

    References:
        Kingma, D. P. and Ba, J. `Adam: A Method for Stochastic Optimization
        <https://arxiv.org/abs/1412.6980>`_. ICLR 2015 (the default optimizer).
    """

    optimizer: OptimizerSpec = "adam"
    lr: float = 1e-2
    maxiter: int = 1000
    tol: Optional[float] = None
    implicit_solve: Optional[LinearSolver] = None
    options: tuple = field(default=())

    def __init__(
        self,
        optimizer: OptimizerSpec = "adam",
        lr: float = 1e-2,
        maxiter: int = 1000,
        tol: Optional[float] = None,
        implicit_solve: Optional[LinearSolver] = None,
        **options: Any,
    ):
        options = {**dict(options.pop("options", ())), **options}  # dataclasses.replace passes `options`
        for name, value in dict(optimizer=optimizer, lr=lr, maxiter=maxiter, tol=tol,
                                implicit_solve=implicit_solve, options=tuple(sorted(options.items()))).items():
            object.__setattr__(self, name, value)
        _check_fields(
            self,
            **COMMON_RULES,
            lr=(lambda v: _positive_or_none(v) and v is not None, "a positive float"),
            optimizer=(lambda v: isinstance(v, str) or callable(v),
                       "a torch.optim name, an optimizer class or a factory params -> optimizer"),
        )
        cls = self._optimizer_class()  # resolve names now: errors at construction
        if cls is not None:
            _check_optimizer_options(cls, dict(self.options))

    def _optimizer_class(self) -> Optional[type]:
        opt = self.optimizer
        if isinstance(opt, str):
            known = known_optimizers()
            if opt.lower() not in known:
                hint = " Use bilevel.solvers.LBFGS for L-BFGS." if opt.lower() == "lbfgs" else ""
                raise ValueError(
                    f"OptimizerLoop: unknown `optimizer` {opt!r}; known names: {', '.join(sorted(known))}.{hint}"
                )
            return known[opt.lower()]
        if isinstance(opt, type):
            if not issubclass(opt, torch.optim.Optimizer):
                raise TypeError(f"OptimizerLoop: `optimizer` class {opt.__name__} is not a torch.optim.Optimizer.")
            if issubclass(opt, torch.optim.LBFGS):  # its step needs a closure
                raise ValueError("OptimizerLoop: torch.optim.LBFGS needs a closure; use bilevel.solvers.LBFGS.")
            return opt
        if self.options:
            raise ValueError(
                "OptimizerLoop: optimizer options "
                f"{[k for k, _ in self.options]} were given with a factory `optimizer`; "
                "set them inside the factory."
            )
        return None

    def _make(self, params: list) -> torch.optim.Optimizer:
        cls = self._optimizer_class()
        options = dict(self.options)
        if cls is not None and issubclass(cls, torch.optim.Rprop) and "step_sizes" not in options:
            # torch's smallest Rprop step, 1e-6, stops it short of the tolerance; the step
            # then shrinks down to the rounding of the iterates instead
            options["step_sizes"] = (_RPROP_MIN_STEP, 50.0)
        opt = cls(params, lr=self.lr, **options) if cls is not None else self.optimizer(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                f"OptimizerLoop: the factory `optimizer` must return a torch.optim.Optimizer; "
                f"got {type(opt).__name__}."
            )
        return opt

    def run(self, fun: Objective, init: TensorTree, *args: Any) -> tuple[TensorTree, SolverInfo]:
        problem = _Leaves(fun, init, args, self.name)
        opt = self._make(problem.params)
        with torch.no_grad():
            value, norm = problem.evaluate(0)
            dtype = problem.params[0].dtype
            threshold = (default_tol(dtype) if self.tol is None else self.tol) * max(1.0, norm)
            k = 0
            if _sync_every(problem.params[0]) == 1:
                while norm > threshold and k < self.maxiter:
                    opt.step()
                    k += 1
                    value, norm = problem.evaluate(k)
            elif norm > threshold:
                k, value, norm = _device_loop(problem, opt, threshold, self.maxiter, _sync_every(problem.params[0]))
        status = Status.SUCCESS if norm <= threshold else Status.MAX_ITERATIONS
        info = make_info(k, norm, value, status, threshold, problem.params[0])
        warn_if_failed(info, self.name)
        return problem.solution(), info


_RPROP_MIN_STEP = 1e-12


def _device_loop(problem: _Leaves, opt: torch.optim.Optimizer, threshold: float, maxiter: int, sync: int):
    """:class:`OptimizerLoop`'s loop on an accelerator, where the host reads the
    convergence and finiteness flags only every ``sync`` steps.

    Steps after the tolerance was met are undone (the parameters are restored from
    the copy taken before the step), so the returned point, value, norm and step
    count are those of the host loop that stops at once; a non-finite objective or
    gradient raises the same error, naming the step where it first appeared.
    Returns ``(steps, value, norm)``."""
    device = problem.params[0].device
    done = torch.zeros((), dtype=torch.bool, device=device)
    steps = torch.zeros((), dtype=torch.int64, device=device)
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)
    value = norm = None
    for k in range(1, maxiter + 1):
        saved = [p.detach().clone() for p in problem.params]
        opt.step()
        for p, old in zip(problem.params, saved):
            p.copy_(torch.where(done, old, p))
        value, norm = problem.evaluate_on_device()
        bad = ~(torch.isfinite(value) & torch.isfinite(norm))
        first_bad = torch.where(bad & (first_bad < 0) & ~done, k, first_bad)
        steps = torch.where(done, steps, k)
        done = done | bad | (norm <= threshold)
        if k % sync == 0 or k == maxiter:
            stop, bad_at = torch.stack([done.to(torch.int64), first_bad]).tolist()
            if bad_at >= 0:
                raise nonfinite(problem.name, bad_at)
            if stop:
                break
    steps, norm_host = torch.stack([steps.to(norm.dtype), norm]).tolist()
    return int(steps), value, norm_host


@dataclass(frozen=True)
class LBFGS(Solver):
    r"""Limited-memory BFGS (:class:`torch.optim.LBFGS`) with a strong-Wolfe line search.

    .. math:: x_{k+1} = x_k - \eta_k H_k \nabla f(x_k, \theta),

    :math:`H_k` the inverse-Hessian approximation built from the last
    ``history_size`` pairs :math:`(x_{i+1} - x_i, \nabla f_{i+1} - \nabla f_i)` by the
    two-loop recursion, :math:`\eta_k` from the line search.  The iterations
    run inside :class:`torch.optim.LBFGS` (its ``max_iter``, in chunks of 25 that
    keep its history), whose own tolerances are set so that they never stop it
    early; after each chunk the gradient norm itself is checked against
    :math:`\mathrm{tol}\cdot\max(1, \|\nabla f(x_0)\|)` (``tol=None``:
    ``sqrt(eps)`` of the dtype).  A chunk that lowers neither the objective nor
    the gradient norm stops the run with
    status BREAKDOWN: the line search compares objective values, so gradient
    norms below about :math:`\sqrt{\varepsilon L |f|}` (:math:`L` the curvature)
    are out of its reach; ``tol`` much below the default may be unreachable.

    Args:
        maxiter: L-BFGS iteration budget (default 500).
        tol: relative gradient tolerance; ``None``: ``sqrt(eps)`` of the dtype.
        history_size: number of correction pairs kept (default 10).
        line_search: ``"strong_wolfe"`` (default) or ``None`` (unit steps, the
            first one scaled by ``1 / ||g||_1``: only for well-scaled problems).
        implicit_solve: linear solver of the backward system (``None``: custom_root's default).

    Raises:
        ValueError: a setting out of range (naming the field), a non-scalar ``fun``.
        TypeError: ``fun`` not callable, ``init`` not a tree of floating tensors.
        FloatingPointError: a non-finite objective or gradient at an evaluation.

    Example:
        >>> import torch
        >>> from bilevel.solvers import LBFGS
        >>> rosen = lambda x, a: (a - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
        >>> x, info = LBFGS().run(rosen, torch.zeros(2, dtype=torch.float64), 1.0)
        >>> torch.allclose(x, torch.ones(2, dtype=torch.float64)), bool(info.converged)
        (True, True)

    References:
        Liu, D. C. and Nocedal, J. `On the limited memory BFGS method for large
        scale optimization <https://doi.org/10.1007/BF01589116>`_. Mathematical
        Programming, 1989.
    """

    maxiter: int = 500
    tol: Optional[float] = None
    history_size: int = 10
    line_search: Optional[str] = "strong_wolfe"
    implicit_solve: Optional[LinearSolver] = None

    def __post_init__(self):
        _check_fields(
            self,
            **COMMON_RULES,
            history_size=(lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive int"),
            line_search=(lambda v: v in ("strong_wolfe", None), "'strong_wolfe' or None"),
        )

    def run(self, fun: Objective, init: TensorTree, *args: Any) -> tuple[TensorTree, SolverInfo]:
        problem = _Leaves(fun, init, args, self.name)
        params = problem.params
        with torch.no_grad():
            value, norm = problem.evaluate(0)
        dtype = params[0].dtype
        threshold = (default_tol(dtype) if self.tol is None else self.tol) * max(1.0, norm)
        # torch's L-BFGS tests the largest gradient entry; ||g||_2 <= sqrt(n) ||g||_inf, so
        # threshold / sqrt(n) makes its test imply ours (else it may stop before any step).
        size = sum(p.numel() for p in params)
        opt = torch.optim.LBFGS(
            params, lr=1.0, max_iter=self.maxiter, max_eval=4 * self.maxiter,
            tolerance_grad=threshold / math.sqrt(size),
            tolerance_change=0.0, history_size=self.history_size, line_search_fn=self.line_search,
        )
        state = opt.state[params[0]]

        def closure():
            with torch.enable_grad():
                loss, _ = problem.evaluate(state.get("n_iter", 0))
            return loss

        done, status = 0, Status.MAX_ITERATIONS
        while norm > threshold and done < self.maxiter:
            opt.param_groups[0]["max_iter"] = min(_CHUNK, self.maxiter - done)
            opt.step(closure)
            done = state.get("n_iter", 0)
            previous = (float(value), norm)
            with torch.no_grad():
                value, norm = problem.evaluate(done)
            if float(value) >= previous[0] and norm >= previous[1]:  # a chunk without progress
                status = Status.BREAKDOWN
                break
            # L-BFGS tests the largest gradient entry; tighten it until the 2-norm passes.
            inf_norm = max(float(p.grad.abs().max()) for p in params)
            opt.param_groups[0]["tolerance_grad"] = min(
                opt.param_groups[0]["tolerance_grad"], 0.5 * inf_norm * threshold / max(norm, 1e-300)
            )
        if norm <= threshold:
            status = Status.SUCCESS
        solution = problem.solution()
        if status == Status.BREAKDOWN and done < self.maxiter:
            # The value-based line search stalls where objective decreases fall below
            # rounding; gradient descent's secant test keeps going from there.
            solution, polish = polish_by_descent(fun, solution, args, threshold / max(1.0, norm), self.maxiter - done)
            done += int(polish.iterations)
            value, norm, status = polish.value, float(polish.residual_norm), Status(int(polish.status))
        info = make_info(done, norm, value, status, threshold, params[0])
        warn_if_failed(info, self.name)
        return solution, info
