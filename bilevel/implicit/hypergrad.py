r"""Hypergradients of bilevel problems: implicit (IFT), unrolled and one-step.

For :math:`\min_x F(x, y^\star(x))` with :math:`y^\star(x) = \arg\min_y f(x, y)`
(``outer(x, y)`` = :math:`F`, ``inner(x, y)`` = :math:`f`, upper variable first),
the implicit function theorem applied to :math:`\nabla_y f(x, y^\star) = 0` gives

.. math::

    \frac{dF}{dx} = \nabla_x F - \nabla^2_{xy} f \, v, \qquad
    \nabla^2_{yy} f \, v = \nabla_y F,

evaluated at :math:`(x, y^\star)`: one linear solve with Hessian-vector
products (never a Hessian) and one cross-derivative product.

References:
    Pedregosa, F. `Hyperparameter optimization with approximate gradient
    <https://arxiv.org/abs/1602.02355>`_. ICML 2016.
    Lorraine, J., Vicol, P. and Duvenaud, D. `Optimizing Millions of
    Hyperparameters by Implicit Differentiation <https://arxiv.org/abs/1911.02590>`_.
    AISTATS 2020.
    Franceschi, L., Donini, M., Frasconi, P. and Pontil, M. `Forward and Reverse
    Gradient-Based Hyperparameter Optimization <https://arxiv.org/abs/1703.01785>`_.
    ICML 2017.
    Liu, H., Simonyan, K. and Yang, Y. `DARTS: Differentiable Architecture Search
    <https://arxiv.org/abs/1806.09055>`_. ICLR 2019.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional, Union

import torch
from torch.func import grad, vjp

from .._autograd_context import differentiates
from .._tree import (
    all_finite,
    describe,
    inside_transform,
    is_transformed,
    seeded_normal_like,
    tensor_leaves,
    tree_flatten,
    tree_leaves,
    tree_map,
    tree_unflatten,
)
from ..typing import TensorTree
from ._certificate import ImplicitInfo, report
from .conditions import Condition
from .linear_solve import LinearSolver
from .linear_solve.function import as_linear_solver
from .operators import damped, densify, hessian_operator, linearize
from .root import (
    AdjointSystem,
    _Options,
    check_adjoint_options,
    check_cross_products,
    default_solve,
    solve_adjoint,
)

BilevelObjective = Callable[[TensorTree, TensorTree], torch.Tensor]


def _call(fn: BilevelObjective, name: str, x: TensorTree, y: TensorTree) -> torch.Tensor:
    """``fn(x, y)``; an error raised inside it gets a note (Python >= 3.11) naming the
    objective and the shapes it was called with, the upper variable first."""
    try:
        return fn(x, y)
    except Exception as err:
        if hasattr(err, "add_note") and not getattr(err, "_bilevel_noted", False):
            err.add_note(f"bilevel: raised by `{name}(x, y)`, called with x: {describe(x)} and y: "
                         f"{describe(y)} (the upper variable comes first).")
            err._bilevel_noted = True
        raise


def _checked_variables(stage: str, x: TensorTree, y: TensorTree, y_name: str):
    """``(leaves, spec)`` of ``x`` and of ``y`` after checking that they are trees of
    finite floating-point tensors (an error naming the argument otherwise)."""
    x_leaves, x_spec = tensor_leaves(x, "x")
    y_leaves, y_spec = tensor_leaves(y, y_name)
    if not all(t.is_floating_point() for t in x_leaves + y_leaves):
        raise TypeError(f"{stage}: `x` and `{y_name}` must hold floating-point tensors.")
    if not all_finite(x_leaves + y_leaves):
        raise FloatingPointError(f"{stage}: `x` or `{y_name}` contains NaN or inf.")
    return (x_leaves, x_spec), (y_leaves, y_spec)


def _scalar_check(name: str, value: torch.Tensor) -> None:
    if not torch.is_tensor(value) or value.numel() != 1:
        shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
        raise ValueError(f"hypergrad: `{name}(x, y)` must return a scalar tensor; got {shape}.")


def _checked_grads(outer: BilevelObjective, x: TensorTree, y: TensorTree, eager: bool):
    """(grad_x F, grad_y F): by one autograd call on plain tensors, else torch.func."""

    def value(x_, y_):
        out = _call(outer, "outer", x_, y_)
        _scalar_check("outer", out)
        return out.reshape(())

    if eager:
        with torch.enable_grad():
            xr, yr = (tree_map(lambda t: t.detach().requires_grad_(), z) for z in (x, y))
            leaves = tree_leaves((xr, yr))
            out = value(xr, yr)  # a constant (no dependence on x or y) has zero gradients
            grads = torch.autograd.grad(out, leaves, allow_unused=True) if out.requires_grad else [None] * len(leaves)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
        n_x = len(tree_leaves(x))
        gx = tree_unflatten(grads[:n_x], tree_flatten(x)[1])
        gy = tree_unflatten(grads[n_x:], tree_flatten(y)[1])
    else:
        gx, gy = grad(value, argnums=(0, 1))(x, y)
    if not all_finite(tree_leaves(gy)):  # the solve's right-hand side (gx: checked with the result)
        raise FloatingPointError("hypergrad: the gradient of `outer` at (x, y) contains NaN or inf.")
    return gx, gy


def inner_stationarity(inner: BilevelObjective) -> Condition:
    r"""The inner problem's optimality condition as ``residual(y, x) = \nabla_y f(x, y)``
    (solution first, as :func:`~bilevel.implicit.custom_root` expects)."""

    def objective(y, x):
        out = _call(inner, "inner", x, y)
        _scalar_check("inner", out)
        return out.reshape(())

    gradient = grad(objective)
    condition = Condition(lambda y, x: gradient(y, x), symmetric=True, name="inner stationarity")
    condition.objective = condition.gradient_of = objective
    condition.minimized = True  # y minimizes f: the certificate also looks for negative curvature
    return condition


@differentiates
def hypergrad(
    outer: BilevelObjective,
    inner: BilevelObjective,
    x: TensorTree,
    y: TensorTree,
    solve: Optional[LinearSolver] = None,
    *,
    damping: float = 0.0,
    strict: bool = False,
    residual_tol: Optional[float] = None,
    create_graph: bool = False,
    return_info: bool = False,
) -> Union[TensorTree, tuple[TensorTree, ImplicitInfo]]:
    r"""Implicit hypergradient :math:`dF/dx` at an inner solution ``y``.

    .. math::

        \frac{dF}{dx} = \nabla_x F(x, y) - \nabla^2_{xy} f(x, y)\, v,
        \qquad (\nabla^2_{yy} f(x, y) + \epsilon I)\, v = \nabla_y F(x, y),

    with :math:`F` = ``outer``, :math:`f` = ``inner`` and :math:`\epsilon` =
    ``damping``.  The Hessian is linearized once and applied by the solver.

    ``y`` should minimize ``inner``: where the adjoint solution proves a direction
    of negative curvature (:math:`v^\top \nabla_y F` below minus the solve's
    residual bound, free to test: :math:`v^\top H v = v^\top b - v^\top r` with
    :math:`r` the solve's residual), ``y`` is a saddle point or a maximum and a
    :class:`~bilevel.status.CurvatureWarning` says so (an error with ``strict``),
    also with the solvers for indefinite systems (MINRES, GMRES, BiCGStab, LU)
    that solve such a system without complaint; CG and Cholesky report their own
    breakdown.  The test is one-sided: a saddle whose negative directions barely
    meet :math:`\nabla_y F` goes unseen, except by
    :class:`~bilevel.implicit.linear_solve.MINRES`, which also counts the negative
    eigenvalues of its Lanczos matrix (below :math:`-\sqrt{\mathrm{eps}}` times its
    norm), a proof of negative curvature in any direction its Krylov space reaches,
    and by the default solve on a system small enough to be materialized, which reads
    the matrix's spectrum where its Cholesky factorization breaks down.

    Args:
        outer: upper-level objective ``outer(x, y)`` (scalar).
        inner: lower-level objective ``inner(x, y)`` (scalar), minimized by ``y``.
        x: upper variable, a tensor or tree of tensors.
        y: an (approximate) inner solution :math:`y^\star(x)`, tensor or tree.
        solve: linear solver for the Hessian system; default
            :class:`~bilevel.implicit.linear_solve.Auto`: a dense Cholesky solve
            for at most 128 unknowns, otherwise CG with a budget of
            ``min(10 dim(y), 1000)`` products and a dtype-scaled tolerance.  A
            function ``solve(matvec, b) -> x`` or ``-> (x, info)`` is accepted too
            (as in :func:`~bilevel.custom_root`).
        damping: :math:`\epsilon \ge 0`, remedy for singular / indefinite Hessians.
        strict: raise :class:`~bilevel.status.BilevelError` when a certificate fails.
        residual_tol: tolerance on the estimated distance of ``y`` to the inner
            solution, :math:`\|\nabla_y f\|\,\|v\| / \|\nabla_y F\|` (invariant to
            rescaling :math:`f`), relative to :math:`\max(1, \|y\|)`; default
            ``eps ** 0.25`` of the dtype.
        create_graph: record the computation so the hypergradient can itself be
            differentiated (second order); default ``False`` (faster, detached).
        return_info: also return the :class:`~bilevel.implicit.ImplicitInfo`
            certificate (inner optimality residual, linear-solve residual).
            Under :func:`torch.func.vmap` it already covers the whole batch
            (one entry per element): pass ``out_dims=(0, None)``.

    Returns:
        ``dF/dx`` with the structure of ``x`` (and the info if ``return_info``).

    Raises:
        ValueError: an objective is not scalar, or shapes do not match.
        FloatingPointError: a gradient or the solve is not finite.

    Example:
        >>> import torch, bilevel
        >>> A = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
        >>> inner = lambda x, y: 0.5 * y @ A @ y - x @ y          # y* = A^{-1} x
        >>> outer = lambda x, y: 0.5 * (y ** 2).sum()
        >>> x = torch.tensor([1.0, -1.0], dtype=torch.float64)
        >>> g = bilevel.hypergrad(outer, inner, x, torch.linalg.solve(A, x))
        >>> torch.allclose(g, torch.linalg.solve(A, torch.linalg.solve(A, x)))
        True
    """
    check_adjoint_options(solve, damping, residual_tol, strict)
    if _is_compiling():  # under torch.compile: a graph break, and the whole computation runs eagerly
        return _eager_hypergrad(outer, inner, x, y, solve, damping=damping, strict=strict,
                                residual_tol=residual_tol, create_graph=create_graph, return_info=return_info)
    (x_leaves, x_spec), (y_leaves, y_spec) = _checked_variables("hypergrad", x, y, "y")
    condition = inner_stationarity(inner)
    recorded: list[ImplicitInfo] = []
    symmetric_solve = as_linear_solver(solve) if solve is not None else default_solve(True)
    system = AdjointSystem(
        residual=condition, sol_spec=y_spec, n_sol=len(y_leaves),
        rebuild_args=lambda tensors: (tree_unflatten(list(tensors), x_spec),),
        solve=symmetric_solve, symmetric=True, damping=float(damping),
        options=_Options(strict, residual_tol, recorded.append), stage="hypergrad",
    )
    eager = not (create_graph or inside_transform() or any(is_transformed(t) for t in x_leaves + y_leaves))
    # Inside torch.func transforms the result stays differentiable: a grad level
    # over this call would otherwise see a constant (no_grad) and return zeros.
    with contextlib.nullcontext() if create_graph or not eager else torch.no_grad():
        gx, gy = _checked_grads(outer, x, y, eager)
        if eager:  # one linearization for the Hessian products and the cross term
            lin = linearize(condition, y, (x,), objective=condition.gradient_of, wrt_args=True)
            operator = densify(damped(lin.transpose_matvec, system.damping), gy, 0, system.solve)
            v, info = system.solve(operator, gy)
            report(system, lin.value, y, info, v, gy)
            cross = tree_unflatten(lin.cross(v), x_spec)
        else:  # differentiable and vmappable
            v = tree_unflatten(list(solve_adjoint(system, tree_leaves(gy), y_leaves, x_leaves)), y_spec)
            _, pullback = vjp(lambda x_: condition(y, x_), x)
            (cross,) = pullback(v)
        result = tree_map(torch.sub, gx, cross)
    if not all_finite(tree_leaves(result)):
        if not all_finite(tree_leaves(gx)):
            raise FloatingPointError("hypergrad: the gradient of `outer` at (x, y) contains NaN or inf.")
        check_cross_products("hypergrad", cross, "the derivative of the inner gradient in x (the cross term)")
        raise FloatingPointError("hypergrad: the hypergradient overflows (NaN or inf): the gradient of `outer` "
                                 "and the cross term are finite, their difference is not.")
    return (result, recorded[-1]) if return_info else result


def _is_compiling() -> bool:
    check = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling
    return bool(check())


# torch.compile cannot trace the adjoint machinery (data-dependent solver loops, the
# certificate's host reads, autograd.Function state); under compile, hypergrad runs
# through this eager copy, which dynamo leaves out of the graph.
_eager_hypergrad = torch.compiler.disable(hypergrad)


def estimate_lipschitz(
    inner: BilevelObjective,
    x: TensorTree,
    y: TensorTree,
    iterations: int = 20,
    start: Optional[TensorTree] = None,
    return_vector: bool = False,
):
    r"""Largest eigenvalue of :math:`\nabla^2_{yy} f(x, y)` by power iteration
    (Hessian-vector products only), a curvature scale for step sizes.

    ``start`` (e.g. the vector returned by an earlier call, with
    ``return_vector=True``) warm-starts the iteration, so a few iterations track
    a curvature that changes as ``x`` moves.  Without it the iteration starts
    from a fixed pseudo-random vector (its own generator, seeded 0, drawn in
    float64 on the CPU and cast to ``y``), the same in every run and on every
    process: ranks of a data-parallel run then take the same products, whose
    all-reduced sum is the full Hessian's, and the global random state is left
    alone.
    """
    objective = inner_stationarity(inner).objective
    _, hvp = hessian_operator(objective, y, x)
    if start is None:
        generator = torch.Generator().manual_seed(0)
        leaves, spec = tree_flatten(y)
        start = tree_unflatten(seeded_normal_like(leaves, generator), spec)
    v = start
    estimate = torch.zeros((), dtype=tree_leaves(y)[0].dtype)
    for _ in range(iterations):
        norm = torch.sqrt(sum((t * t).sum() for t in tree_leaves(v)))
        v = tree_map(lambda t: t / norm.clamp_min(torch.finfo(t.dtype).tiny), v)
        hv = hvp(v)
        estimate = sum((a * b).sum() for a, b in zip(tree_leaves(v), tree_leaves(hv)))
        v = hv
    return (estimate.abs(), v) if return_vector else estimate.abs()


def _inner_step(inner: BilevelObjective, step_size, project: Optional[Callable] = None) -> Callable:
    grad_y = grad(lambda x, y: _call(inner, "inner", x, y).reshape(()), argnums=1)
    if project is None:
        return lambda x, y: tree_map(lambda a, g: a - step_size * g, y, grad_y(x, y))
    return lambda x, y: project(tree_map(lambda a, g: a - step_size * g, y, grad_y(x, y)))


@differentiates
def unrolled_hypergrad(
    outer: BilevelObjective,
    inner: BilevelObjective,
    x: TensorTree,
    y0: TensorTree,
    steps: int,
    step_size: Optional[float] = None,
    *,
    truncate: Optional[int] = None,
    return_solution: bool = False,
    project: Optional[Callable[[TensorTree], TensorTree]] = None,
    create_graph: bool = False,
):
    r"""Reverse-mode hypergradient through ``steps`` gradient steps on the inner problem.

    .. math:: y_t = P\bigl(y_{t-1} - s \nabla_y f(x, y_{t-1})\bigr), \quad t = 1..T, \qquad
              \frac{d}{dx} F(x, y_T(x)),

    with :math:`P` the identity, or ``project`` (projected gradient steps for a
    lower level constrained to a simple set; differentiated like the steps).

    With ``truncate=K`` only the last :math:`K` steps are differentiated (the
    first :math:`T-K` run without a graph): memory :math:`O(K)` instead of
    :math:`O(T)`, biased gradient (Shaban et al. 2019).

    The result is a function of ``y0`` too: under :func:`torch.func.grad` /
    :func:`~torch.func.jacrev` or with ``create_graph=True`` its derivative in
    ``y0`` goes through the :math:`T` steps (meta-learning an initialization);
    with ``truncate`` it is zero, the first steps carrying no graph.

    Args:
        outer, inner: objectives ``(x, y) -> scalar``.
        x: upper variable (tensor or tree).
        y0: inner initialization.
        steps: :math:`T \ge 1`.
        step_size: :math:`s`; ``None`` uses :math:`1 / L` with :math:`L` the
            largest Hessian eigenvalue at ``(x, y0)`` (power iteration).
        truncate: number of final steps to differentiate through (default all).
        return_solution: also return :math:`y_T`.
        project: ``P``, a map of trees shaped like ``y`` onto the lower level's
            feasible set (e.g. a projection of :mod:`bilevel.implicit.projections`);
            ``None``: no constraint.
        create_graph: record the computation so the hypergradient can itself be
            differentiated with :func:`torch.autograd.grad` (second order through
            the unrolled steps); default ``False`` (detached).  Under
            :func:`torch.func.grad`, :func:`~torch.func.jacrev` or
            :func:`~torch.func.vmap` the result is differentiable either way.

    Returns:
        ``dF/dx`` shaped like ``x`` (and :math:`y_T` if ``return_solution``).

    Example:
        On :math:`f = \tfrac12\|y\|^2 - x^\top y` (so :math:`y^\star = x`), steps
        of size :math:`s = 1/2` from :math:`y_0 = 0` give :math:`y_T = (1 - 2^{-T})\, x`,
        hence :math:`dF/dx = (1 - 2^{-T})\, (y_T - t)` for :math:`F = \tfrac12\|y - t\|^2`:

        >>> import torch, bilevel
        >>> t = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> inner = lambda x, y: 0.5 * (y ** 2).sum() - x @ y
        >>> outer = lambda x, y: 0.5 * ((y - t) ** 2).sum()
        >>> x = torch.tensor([3.0, -1.0], dtype=torch.float64)
        >>> g, yT = bilevel.implicit.unrolled_hypergrad(
        ...     outer, inner, x, torch.zeros_like(x), steps=3, step_size=0.5, return_solution=True)
        >>> c = 1 - 0.5 ** 3
        >>> torch.allclose(yT, c * x), torch.allclose(g, c * (c * x - t))
        (True, True)
    """
    return _unrolled(outer, inner, x, y0, steps, step_size, truncate=truncate, return_solution=return_solution,
                     project=project, create_graph=create_graph)


def _unrolled(outer, inner, x, y0, steps, step_size, *, truncate=None, return_solution=False, project=None,
              create_graph=False, stage: str = "unrolled_hypergrad", y_name: str = "y0"):
    """:func:`unrolled_hypergrad`, with its errors naming the function ``stage`` called
    and its argument ``y_name`` (:func:`one_step_hypergrad` is one step of it)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{stage}: `steps` must be a positive int; got {steps!r}.")
    if step_size is not None and (isinstance(step_size, bool) or not (
            isinstance(step_size, (int, float)) or torch.is_tensor(step_size))):
        raise ValueError(f"{stage}: `step_size` must be a positive number or None; got {step_size!r}.")
    _checked_variables(stage, x, y0, y_name)
    if truncate is not None and not (isinstance(truncate, int) and 1 <= truncate <= steps):
        raise ValueError(f"{stage}: `truncate` must be an int in [1, steps={steps}]; got {truncate!r}.")
    derived = step_size is None
    if derived:
        # a setting, not part of the function: second derivatives treat it as a constant
        step_size = 1.0 / estimate_lipschitz(inner, x, y0).detach().clamp_min(1e-12)
        if not is_transformed(step_size):  # a number; per element under torch.func.vmap
            step_size = float(step_size)
    # checked wherever it is free: a number or a CPU tensor (an accelerator's estimate is
    # our own 1/L, positive by construction, and reading it would stall the device)
    on_host = not torch.is_tensor(step_size) or (step_size.device.type == "cpu" and not is_transformed(step_size))
    if on_host and derived and not math.isfinite(float(step_size)):
        raise FloatingPointError(
            f"{stage}: the curvature estimate of `inner` at (x, {y_name}) that sets the step size is not "
            f"finite: its Hessian-vector products give NaN or inf there; check `inner` (and its gradient) at {y_name}.")
    if on_host and not bool(step_size > 0):
        raise ValueError(f"{stage}: `step_size` must be positive; got {step_size!r}.")
    if project is not None and not callable(project):
        raise TypeError(f"{stage}: `project` must be callable (y -> P(y)) or None; got {project!r}.")
    step = _inner_step(inner, step_size, project)
    differentiated = steps if truncate is None else truncate
    y_start = y0  # differentiable in y0 too (an outer jacrev or create_graph sees T steps of it)
    if differentiated < steps:  # truncated: the first steps carry no graph, and y0 none either
        y = y0
        with torch.no_grad():
            for _ in range(steps - differentiated):
                y = step(x, y)
        y_start = tree_map(torch.Tensor.detach, y)

    def unrolled(x_):
        y_ = y_start
        for _ in range(differentiated):
            y_ = step(x_, y_)
        out = _call(outer, "outer", x_, y_)
        _scalar_check("outer", out)
        return out.reshape(()), y_

    leaves = tree_leaves(x) + tree_leaves(y0)
    eager = not (create_graph or inside_transform() or any(is_transformed(t) for t in leaves))
    # as in hypergrad: under an outer torch.func level (jacrev of this function) a no_grad
    # here would hand it a constant, and it would return zeros
    with torch.no_grad() if eager else contextlib.nullcontext():
        g, y_final = grad(unrolled, has_aux=True)(x)
    if not all_finite(tree_leaves(g)):
        raise FloatingPointError(
            f"{stage}: the hypergradient is not finite; the inner iteration probably "
            f"diverged (step_size={step_size:.3g}); use a smaller step_size."
        )
    return (g, y_final) if return_solution else g


@differentiates
def one_step_hypergrad(
    outer: BilevelObjective,
    inner: BilevelObjective,
    x: TensorTree,
    y: TensorTree,
    step_size: Optional[float] = None,
    *,
    project: Optional[Callable[[TensorTree], TensorTree]] = None,
    create_graph: bool = False,
) -> TensorTree:
    r"""One-step (DARTS-style) approximation of the hypergradient.

    Differentiates :math:`F(x, y')` through a single inner step
    :math:`y' = y - \xi \nabla_y f(x, y)`:

    .. math:: \nabla_x F(x, y') - \xi\, \nabla^2_{xy} f(x, y)\, \nabla_y F(x, y').

    A cheap, biased baseline (exact only when the step reaches :math:`y^\star`);
    it is :func:`unrolled_hypergrad` with ``steps=1``.

    Args:
        outer: upper-level objective ``outer(x, y)`` (scalar).
        inner: lower-level objective ``inner(x, y)`` (scalar).
        x: upper variable, a tensor or tree of tensors.
        y: the current inner iterate, the start of the step (tensor or tree).
        step_size: :math:`\xi > 0`; ``None`` uses :math:`1 / L` with :math:`L` the
            largest eigenvalue of :math:`\nabla^2_{yy} f(x, y)` (power iteration),
            as in :func:`unrolled_hypergrad`.
        project: a projection onto the lower level's feasible set, applied after
            the step (see :func:`unrolled_hypergrad`); ``None``: no constraint.
        create_graph: keep the result differentiable by :func:`torch.autograd.grad`
            (see :func:`unrolled_hypergrad`); default ``False``.

    Returns:
        The approximate ``dF/dx``, with the structure of ``x``.

    Example:
        On a quadratic inner problem :math:`f = \tfrac12\|y\|^2 - x^\top y`, the step
        :math:`\xi = 1` lands on :math:`y^\star = x` from anywhere, and the one-step
        hypergradient equals the implicit one:

        >>> import torch, bilevel
        >>> inner = lambda x, y: 0.5 * (y ** 2).sum() - x @ y
        >>> outer = lambda x, y: 0.5 * ((y - 1) ** 2).sum()
        >>> x = torch.tensor([3.0, -1.0], dtype=torch.float64)
        >>> g = bilevel.implicit.one_step_hypergrad(outer, inner, x, torch.zeros_like(x), step_size=1.0)
        >>> g
        tensor([ 2., -2.], dtype=torch.float64)
        >>> torch.allclose(g, bilevel.hypergrad(outer, inner, x, x))
        True
    """
    return _unrolled(outer, inner, x, y, 1, step_size, project=project, create_graph=create_graph,
                     stage="one_step_hypergrad", y_name="y")


__all__ = [
    "hypergrad",
    "unrolled_hypergrad",
    "one_step_hypergrad",
    "inner_stationarity",
    "estimate_lipschitz",
]
