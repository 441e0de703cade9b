r"""A layer whose output is the minimizer of an objective, found by any inner solver.

:class:`ArgminLayer` maps inputs :math:`\theta` to

.. math:: z^\star(\theta) = \operatorname*{argmin}_z f(z, \theta),

found by a :mod:`bilevel.solvers` solver without autograd, and differentiated by
:func:`~bilevel.custom_root` on the optimality condition :math:`F(z, \theta) = 0`
(:math:`\nabla_z f = 0` by default): the backward pass solves the adjoint system
:math:`(\partial_z F)^\top u = \bar z` and returns :math:`\bar\theta = -(\partial_\theta F)^\top u`
(implicit function theorem; Blondel et al. 2022).  Inputs with a leading batch
dimension give a batch of independent problems, solved together and
differentiated by one batched linear solve with per-element convergence.
Convergence is per element in the forward pass too: least-squares solvers stop
per element, and a batch solved as one problem by another solver is checked
element by element, each element that missed its own tolerance solved again on
its own.

References:
    Amos, B. and Kolter, J. Z. `OptNet: Differentiable Optimization as a Layer in
    Neural Networks <https://arxiv.org/abs/1703.00443>`_. ICML 2017.
    Blondel, M. et al. `Efficient and Modular Implicit Differentiation
    <https://arxiv.org/abs/2105.15183>`_. NeurIPS 2022.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.func import functional_call, vmap

from .._tolerance import default_residual_tol, default_tol
from .._tree import tree_flatten, tree_map, tree_norm, tree_unflatten
from ..implicit import custom_root, stationarity
from ..implicit.linear_solve import LinearSolver
from ..solvers import LBFGS, GaussNewton, LevenbergMarquardt, ProximalGradient, Solver
from ..solvers._base import SolverInfo, warm_start, warn_if_failed
from ..status import ConvergenceWarning, Status
from ..typing import Objective, Residual, TensorTree

__all__ = ["ArgminLayer"]

_LEAST_SQUARES = (GaussNewton, LevenbergMarquardt)


class ArgminLayer(torch.nn.Module):
    r"""The minimizer :math:`z^\star(\theta) = \operatorname{argmin}_z f(z, \theta)` as a layer.

    .. math::

        F(z^\star, \theta) = 0,\qquad
        \bar\theta = -(\partial_\theta F)^\top u,\quad (\partial_z F)^\top u = \bar z,

    with :math:`F = \nabla_z f` (``objective``), :math:`F = J_r^\top r` for the
    least-squares solvers (:class:`~bilevel.solvers.GaussNewton`,
    :class:`~bilevel.solvers.LevenbergMarquardt`, whose ``objective`` is the
    residual vector :math:`r(z, \theta)`), or the condition given as ``residual``.

    ``objective(z, *inputs)`` describes **one** problem.  When ``input_ndims``
    is given, an input with one more dimension than declared carries a leading
    batch dimension ``B``; the others are shared.  The batch is solved at once
    (``objective`` vmapped; least-squares solvers get ``batch_dims=1`` and
    stop per element) and differentiated by one call of the linear solver over
    ``B`` independent systems (:func:`~bilevel.custom_root` with
    ``batch_dims=1``), not a loop.  Other solvers minimize the batch's summed
    objective in one run; then each element's optimality residual is held to the
    solver's rule on its own, :math:`\|F_b(z_b)\| \le \mathrm{tol}\,\max(1,
    \|F_b(z_{0,b})\|)`, and an element that misses it (a badly conditioned
    neighbour slowed the joint run) is solved again alone from its warm start.
    :attr:`last_info` then holds one entry per element; a non-finite objective
    in one element is reported with its index.

    If ``objective`` is an :class:`torch.nn.Module`, it is registered as a
    sub-module and its parameters are passed to it through
    :func:`torch.func.functional_call`, so they get implicit gradients too.

    Args:
        objective: ``objective(z, *inputs)`` returning a scalar (a residual vector
            for least-squares solvers).
        solver: any :class:`~bilevel.solvers.Solver` for one problem (default
            :class:`~bilevel.solvers.LBFGS`).
        residual: the optimality condition ``residual(z, *inputs)`` of one
            problem when it is not the solver's (required for
            :class:`~bilevel.solvers.ProximalGradient`).
        solve: linear solver of the backward system (default: the solver's
            ``implicit_solve``, else :func:`~bilevel.custom_root`'s default,
            a dense solve per element for up to 128 unknowns).
        init: warm start of one problem (a tensor or tree); may be given per
            call instead.  Stored as a buffer (moves with ``.to()``).  Without
            one, the layer starts from zeros shaped like one problem's first
            floating tensor input (right when ``z`` has the input's shape, as in a
            projection; otherwise an error asks for ``init``).
        input_ndims: for each input, its number of dimensions in one problem
            (``None`` for an input never batched, e.g. a tree).  ``None``
            (default): the inputs are one problem.

    Example:
        >>> import torch
        >>> from bilevel.layers import ArgminLayer
        >>> from bilevel.solvers import LevenbergMarquardt
        >>> t = torch.linspace(0, 1, 10, dtype=torch.float64)
        >>> fit = lambda p, y: p[0] * torch.exp(p[1] * t) - y          # residuals of one problem
        >>> layer = ArgminLayer(fit, LevenbergMarquardt(), init=torch.ones(2, dtype=torch.float64),
        ...                     input_ndims=[1])
        >>> y = torch.stack([2 * torch.exp(-t), torch.exp(0.5 * t)]).requires_grad_()  # a batch of 2
        >>> p = layer(y)
        >>> p.detach().round(decimals=6)
        tensor([[ 2.0000, -1.0000],
                [ 1.0000,  0.5000]], dtype=torch.float64)
        >>> torch.autograd.grad(p[0, 0], y)[0].shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        objective: Objective,
        solver: Solver | None = None,
        residual: Residual | None = None,
        solve: LinearSolver | None = None,
        *,
        init: TensorTree | None = None,
        input_ndims: Sequence[int | None] | None = None,
    ):
        super().__init__()
        if not callable(objective):
            raise TypeError(f"ArgminLayer: `objective` must be callable objective(z, *inputs); got {type(objective).__name__}.")
        solver = LBFGS() if solver is None else solver
        if not isinstance(solver, Solver):
            raise TypeError(
                f"ArgminLayer: `solver` must be a bilevel.solvers solver such as LBFGS() or "
                f"LevenbergMarquardt(); got {type(solver).__name__}."
            )
        if getattr(solver, "batch_dims", 0):
            raise ValueError(
                f"ArgminLayer: `solver` must solve one problem (batch_dims=0); got batch_dims="
                f"{solver.batch_dims}. Declare `input_ndims` and pass batched inputs instead."
            )
        if isinstance(solver, ProximalGradient) and residual is None:
            raise ValueError(
                "ArgminLayer: ProximalGradient's optimality condition involves its prox; pass it as "
                "`residual=` (e.g. bilevel.implicit.proximal_gradient(...) adapted to residual(z, *inputs))."
            )
        if residual is not None and not callable(residual):
            raise TypeError(f"ArgminLayer: `residual` must be callable residual(z, *inputs); got {type(residual).__name__}.")
        if solve is not None and not isinstance(solve, LinearSolver):
            raise TypeError(f"ArgminLayer: `solve` must be a linear solver such as bilevel.implicit.CG(); got {solve!r}.")
        if input_ndims is not None:
            input_ndims = tuple(input_ndims)
            for i, k in enumerate(input_ndims):
                if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
                    raise ValueError(f"ArgminLayer: `input_ndims[{i}]` must be a non-negative int or None; got {k!r}.")
        self.objective = objective  # registered as a sub-module if it is one
        self.solver, self.residual, self.solve, self.input_ndims = solver, residual, solve, input_ndims
        init = None if init is None else tree_map(lambda t: t.detach().clone(), init)
        if init is not None and not all(torch.is_tensor(t) and t.is_floating_point() for t in tree_flatten(init)[0]):
            raise TypeError(
                "ArgminLayer: `init` must be a floating-point tensor or a tree of them (the warm start of one "
                f"problem); got {[getattr(t, 'dtype', type(t).__name__) for t in tree_flatten(init)[0]]}."
            )
        if torch.is_tensor(init):
            self.register_buffer("init", init)
        else:
            self.init = init
        self.last_info = None  # the solver's info of the last forward pass
        self._root = None

    # ------------------------------------------------------------------ helpers

    def _functions(self) -> tuple[Callable, Any]:
        """The objective of one problem as ``f(z, params, *inputs)`` and its parameters."""
        if isinstance(self.objective, torch.nn.Module):
            module = self.objective

            def f(z, params, *inputs):
                return functional_call(module, params, (z, *inputs))

            return f, dict(module.named_parameters())
        objective = self.objective
        return (lambda z, params, *inputs: objective(z, *inputs)), {}

    def _condition(self, f: Callable) -> Callable:
        if self.residual is not None:
            user = self.residual
            return lambda z, params, *inputs: user(z, *inputs)
        if isinstance(self.solver, _LEAST_SQUARES):
            def half_squared_norm(z, *args):
                r = f(z, *args)
                return 0.5 * (r * r).sum()

            return stationarity(half_squared_norm)
        return stationarity(f)

    def _batch_size(self, inputs: tuple) -> int | None:
        if self.input_ndims is None:
            return None
        if len(inputs) != len(self.input_ndims):
            raise ValueError(
                f"ArgminLayer: expected {len(self.input_ndims)} inputs (one per entry of `input_ndims`); "
                f"got {len(inputs)}."
            )
        sizes = {}
        for i, (x, k) in enumerate(zip(inputs, self.input_ndims)):
            if k is None:
                continue
            if not torch.is_tensor(x):
                raise TypeError(f"ArgminLayer: input {i} must be a tensor (input_ndims[{i}]={k}); got {type(x).__name__}.")
            if x.dim() == k + 1:
                sizes[i] = x.shape[0]
            elif x.dim() != k:
                raise ValueError(
                    f"ArgminLayer: input {i} must have {k} dimensions (one problem) or {k + 1} (a batch); "
                    f"got shape {tuple(x.shape)}."
                )
        if len(set(sizes.values())) > 1:
            raise ValueError(f"ArgminLayer: the batched inputs have different batch sizes: {sizes} (input: size).")
        return next(iter(sizes.values()), None)

    def _init(self, init: TensorTree | None, batch: int | None, like: torch.Tensor | None,
              per_problem: bool = False) -> TensorTree:
        per_problem = per_problem or init is None  # the constructor's warm start is one problem's; a call's is batched
        init = self.init if init is None else init
        if init is None:
            raise ValueError("ArgminLayer: no warm start: pass `init=` to the constructor or to the call.")
        if like is not None:
            init = tree_map(lambda t: t.to(dtype=like.dtype, device=like.device) if t.is_floating_point() else t, init)
        if batch is None or not per_problem:
            return init
        return tree_map(lambda t: t.expand((batch,) + t.shape).clone(), init)

    def _solver(self, batched: bool) -> Solver:
        if batched and isinstance(self.solver, _LEAST_SQUARES):
            return dataclasses.replace(self.solver, batch_dims=1)
        return self.solver

    # ------------------------------------------------------------------ forward

    def forward(self, *inputs: Any, init: TensorTree | None = None) -> TensorTree:
        """The minimizer: shaped like ``init`` for one problem, with a leading ``B``
        when an input is batched.

        Args:
            *inputs: the arguments of ``objective`` after ``z``.
            init: a warm start overriding the constructor's; in a batched call it
                must be batched too (leading ``B``).

        Raises:
            ValueError: a wrong number of inputs, an input whose number of
                dimensions matches neither one problem nor a batch, batch sizes
                that differ, or no warm start.
            FloatingPointError: the solver returned NaN or inf.
        """
        B = self._batch_size(inputs)
        _check_devices(inputs)
        floating = [t for t in tree_flatten(inputs)[0] if torch.is_tensor(t) and t.is_floating_point()]
        guessed = init is None and self.init is None
        if guessed:
            init = self._default_init(inputs, B)
        z0 = self._init(init, B, floating[0] if floating else None, per_problem=guessed)
        f, params = self._functions()
        condition = self._condition(f)
        solver = self._solver(B is not None)
        args = (params, *inputs)
        if B is None:
            fun = f
        else:
            args = _expand_shared(args, self.input_ndims, B)
            per_problem = vmap(f)
            fun = per_problem if isinstance(solver, _LEAST_SQUARES) else (lambda z, *a: per_problem(z, *a).sum())
        dtype = tree_flatten(z0)[0][0].dtype
        tol = getattr(solver, "tol", None)
        residual_tol = max(default_tol(dtype) if tol is None else float(tol), default_residual_tol(dtype))
        layer = self

        def run(*args, init):
            if not B or isinstance(solver, _LEAST_SQUARES):  # one problem, or none (an empty batch)
                sol, info = solver.run(fun, init, *args)
            else:
                sol, info = _solve_each(solver, f, condition, init, args)
            layer.last_info = info
            return sol

        solve = self.solve if self.solve is not None else getattr(solver, "implicit_solve", None)
        differentiable = custom_root(condition, solve=solve, residual_tol=residual_tol, batch_dims=int(B is not None))
        self._root = differentiable(run)
        try:
            return self._root(*args, init=warm_start(z0))
        except RuntimeError as error:
            if not guessed:
                raise
            shape = tuple(tree_flatten(z0)[0][0].shape)
            raise ValueError(
                f"ArgminLayer: no warm start was given, and zeros shaped like the first input "
                f"({shape}) do not fit `objective` ({error}); pass `init=` (one problem's z) to the "
                "constructor or to the call."
            ) from error

    def _default_init(self, inputs: tuple, batch: int | None) -> TensorTree:
        """Zeros shaped like one problem's first floating tensor input (the common case
        of a layer whose output lives where its input does, e.g. a projection)."""
        for i, x in enumerate(inputs):
            if torch.is_tensor(x) and x.is_floating_point():
                declared = self.input_ndims[i] if self.input_ndims is not None and i < len(self.input_ndims) else None
                batched = batch is not None and declared is not None and x.dim() == declared + 1
                one = x[0] if batched else x
                return torch.zeros_like(one.detach())
        raise ValueError("ArgminLayer: no warm start: pass `init=` to the constructor or to the call.")

    @property
    def implicit_info(self):
        """The certificate of the last backward pass (:class:`~bilevel.implicit.ImplicitInfo`,
        per batch element), or ``None`` before one."""
        root = getattr(self, "_root", None)
        return None if root is None else root.last_info

    def extra_repr(self) -> str:
        return f"solver={self.solver!r}, input_ndims={self.input_ndims}"

    def __getstate__(self) -> dict:
        """Pickling (``torch.save(model)``, ``copy.deepcopy``) leaves out the last forward
        pass's differentiable solve, a closure, and with it :attr:`implicit_info`."""
        state = self.__dict__.copy()
        state["_root"] = None
        return state


def _solve_each(solver: Solver, f: Callable, condition: Callable, init: TensorTree,
                args: tuple) -> tuple[TensorTree, SolverInfo]:
    r"""A batch for a solver of one problem: one run on the summed objective, then
    each element held to the solver's tolerance rule on its own residual, and the
    elements that miss it solved again alone.  ``args`` and ``init`` have every
    tensor leaf batched (leading ``B``).

    The joint run's tolerance is tightened so that passing it implies every
    element's own test where the elements' scales are alike: its threshold is
    ``tol * max(1, ||G_0||)`` for the whole batch's residual :math:`G`, about
    :math:`\sqrt B` times an element's ``tol * max(1, ||g_{0,b}||)``.  A residual
    that cannot be vmapped (a data-dependent condition) keeps the joint run alone."""
    name = getattr(solver, "name", type(solver).__name__)
    per_problem = vmap(f)
    joint_objective = lambda z, *a: per_problem(z, *a).sum()  # noqa: E731
    norms = vmap(lambda z, *a: tree_norm(condition(z, *a)))
    leaves, spec = tree_flatten(init)
    B = leaves[0].shape[0]
    tol = getattr(solver, "tol", None)
    tol = default_tol(leaves[0].dtype) if tol is None else float(tol)
    try:
        start = norms(init, *args)
    except RuntimeError:  # e.g. a residual that reads values (.item()): judged as one problem
        return solver.run(joint_objective, init, *args)
    tolerance = tol * start.clamp_min(1.0)
    joint_solver = solver
    if "tol" in {field.name for field in dataclasses.fields(solver)}:
        scale = float(start.clamp_min(1.0).min()) / max(1.0, float(torch.linalg.vector_norm(start)))
        joint_solver = dataclasses.replace(solver, tol=tol * max(scale, B ** -0.5))
    iterations = torch.zeros(B, dtype=torch.int64, device=leaves[0].device)
    with warnings.catch_warnings():  # the joint run's failure is judged per element below
        warnings.simplefilter("ignore", ConvergenceWarning)
        try:
            sol, joint = joint_solver.run(joint_objective, init, *args)
        except FloatingPointError:  # one element's objective blew up: solve them one by one
            sol = None
    if sol is None:
        sol, residual = init, torch.full_like(tolerance, float("nan"))
    else:
        residual = norms(sol, *args)
        iterations += joint.iterations
    status = torch.where(residual <= tolerance, int(Status.SUCCESS), int(Status.MAX_ITERATIONS))
    again = (status != int(Status.SUCCESS)).nonzero().reshape(-1).tolist()
    if again:
        sol_leaves = [t.clone() for t in tree_flatten(sol)[0]]
        for b in again:
            pick = lambda t: t[b] if torch.is_tensor(t) else t  # noqa: E731
            try:
                with warnings.catch_warnings():  # reported once for the batch
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    one, info = solver.run(f, tree_map(pick, init), *tree_map(pick, args))
            except FloatingPointError as error:
                raise FloatingPointError(f"ArgminLayer: batch element {b} of {B}: {error}") from error
            for full, part in zip(sol_leaves, tree_flatten(one)[0]):
                full[b] = part
            iterations[b] += info.iterations
            residual[b], status[b], tolerance[b] = info.residual_norm, info.status, info.tolerance
        sol = tree_unflatten(sol_leaves, spec)
    info = SolverInfo(iterations=iterations, residual_norm=residual, value=per_problem(sol, *args).detach(),
                      status=status, tolerance=tolerance)
    warn_if_failed(info, name, stacklevel=4)
    return sol, info


def _check_devices(inputs: tuple) -> None:
    """All tensor inputs on one device (0-d CPU tensors aside, which torch mixes with any
    device), or an error naming the first one elsewhere."""
    first = None
    for i, x in enumerate(inputs):
        for t in tree_flatten(x)[0]:
            if not torch.is_tensor(t) or (t.dim() == 0 and t.device.type == "cpu"):
                continue
            if first is None:
                first = (i, t.device)
            elif t.device != first[1]:
                raise ValueError(
                    f"ArgminLayer: input {i} is on {t.device} but input {first[0]} is on {first[1]}: "
                    "put every input (and the module, with `.to(device)`) on one device."
                )


def _expand_shared(args: tuple, input_ndims: Sequence[int | None], B: int) -> tuple:
    """``args = (params, *inputs)`` with every leaf expanded to the batch ``B``,
    except the batched inputs (those with one more dimension than declared)."""

    def expand(t):
        return t.expand((B,) + t.shape) if torch.is_tensor(t) else t

    params, inputs = args[0], args[1:]
    out = [tree_map(expand, params)]
    for x, k in zip(inputs, input_ndims):
        batched = k is not None and torch.is_tensor(x) and x.dim() == k + 1
        out.append(x if batched else tree_map(expand, x))
    return tuple(out)
