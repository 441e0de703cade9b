r"""Make any solver differentiable by declaring its optimality condition.

:func:`custom_root` wraps a solver ``solver(*args) -> sol`` whose output is a
root of ``residual(sol, *args) = 0``.  The solver runs without autograd (it may
be a torch loop, L-BFGS, SciPy, cvxpy...); the gradient of ``sol`` with respect
to every floating-point tensor in ``args`` comes from the implicit function
theorem (Krantz & Parks 2002; Blondel et al. 2022):

.. math::

    F(s^\star(\theta), \theta) = 0 \;\Rightarrow\;
    \partial_\theta s^\star = -(\partial_s F)^{-1} \partial_\theta F,

so a reverse-mode product :math:`\bar\theta = (\partial_\theta s^\star)^\top \bar s`
costs one *adjoint* linear solve :math:`(\partial_s F)^\top u = \bar s` followed by
:math:`\bar\theta = -(\partial_\theta F)^\top u`, with products from
:mod:`~bilevel.implicit.operators` and the solve from
:mod:`~bilevel.implicit.linear_solve`.

Composability: the decorated function is an :class:`torch.autograd.Function`
with ``setup_context``, a vmap rule and a forward-mode rule, so it works with
``torch.autograd``, :func:`torch.func.grad`, :func:`~torch.func.jacrev`,
:func:`~torch.func.jacfwd` and :func:`~torch.func.vmap`; the adjoint solve is a
differentiable function too, so second derivatives follow the implicit rule.

Certificates: every backward pass measures the optimality residual
:math:`\|F(s, \theta)\|` at the point where the theorem is applied and the
adjoint solve's residual; past tolerance it warns
(:class:`~bilevel.status.OptimalityWarning`,
:class:`~bilevel.status.ConvergenceWarning`,
:class:`~bilevel.status.CurvatureWarning`) or, with ``strict=True``, raises.
The last certificate is kept as ``decorated.last_info``.

References:
    Blondel, M., Berthet, Q., Cuturi, M., Frostig, R., Hoyer, S., Llinares-López,
    F., Pedregosa, F. and Vert, J.-P. `Efficient and Modular Implicit
    Differentiation <https://arxiv.org/abs/2105.15183>`_. NeurIPS 2022.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch.func import vjp, vmap

from .._autograd_context import differentiates, refuse_grads_batched_by_autograd
from .._tree import (
    all_finite,
    in_dual_level,
    inside_transform,
    is_transformed,
    split_leaves,
    tensor_leaves,
    tree_flatten,
    tree_leaves,
    tree_unflatten,
    tree_vdot,
)
from ..typing import FixedPointMap, Residual
from ._captured import check_captured, check_keywords
from ._certificate import ImplicitInfo, _elements, report
from .conditions import fixed_point_residual, is_symmetric
from .linear_solve import Auto, LinearSolver
from .linear_solve.function import as_linear_solver
from .operators import damped, densify, forward_product, linearize


def default_solve(symmetric: bool) -> LinearSolver:
    """The linear solver used when ``solve=None``: :class:`~bilevel.implicit.linear_solve.Auto`,
    a dense Cholesky (symmetric) or LU solve for at most 128 unknowns, CG
    (symmetric) or GMRES otherwise with a budget of ``min(10 n, 1000)`` products
    and dtype-scaled tolerances."""
    return Auto(symmetric=symmetric)


@dataclass(frozen=True)
class _Options:
    strict: bool
    residual_tol: Optional[float]
    record: Callable[[ImplicitInfo], None]


@dataclass(frozen=True)
class AdjointSystem:
    """Static description of the IFT linear system ``M u = b`` with
    ``M = (d residual / d sol)^T + damping I`` (``transpose=True``) or its
    transpose, over ``batch_dims`` leading dimensions of independent problems.

    ``rebuild_args`` maps the tensor leaves of the arguments back to ``args``.
    """

    residual: Residual
    sol_spec: Any
    n_sol: int
    rebuild_args: Callable[[tuple], tuple]
    solve: LinearSolver
    symmetric: bool
    damping: float
    options: _Options
    transpose: bool = True
    batch_dims: int = 0
    certify: bool = True
    stage: str = "custom_root"

    def batched_residual(self) -> Callable:
        """``f(sol, arg_tensors)`` evaluating the residual over the batch dims."""

        def f(sol, arg_tensors):
            return self.residual(sol, *self.rebuild_args(arg_tensors))

        for _ in range(self.batch_dims):
            f = vmap(f)
        return f

    def batched_objective(self) -> Optional[Callable]:
        """For a stationarity condition, a scalar ``g(sol, arg_tensors)`` whose
        gradient in ``sol`` is the batched residual (the objectives of independent
        batch elements summed); ``None`` for other conditions."""
        objective = getattr(self.residual, "gradient_of", None)
        if objective is None:
            return None

        def g(sol, arg_tensors):
            return objective(sol, *self.rebuild_args(arg_tensors))

        for _ in range(self.batch_dims):
            g = vmap(g)
        return (lambda sol, arg_tensors: g(sol, arg_tensors).sum()) if self.batch_dims else g


def solve_adjoint(system: AdjointSystem, b_leaves, sol_leaves, arg_tensors) -> tuple:
    """Differentiable, vmappable solve of the system described by ``system``."""
    n_b = len(b_leaves)
    if n_b != system.n_sol or len(sol_leaves) != system.n_sol:
        raise ValueError(
            f"{system.stage}: the cotangent has {n_b} leaves but the solution has {system.n_sol}."
        )
    return _Adjoint.apply(system, *b_leaves, *sol_leaves, *arg_tensors)


def _solve_system(system: AdjointSystem, b, sol, args, wrt_args=False) -> tuple:
    """Solve the system of ``system`` for the right-hand side ``b`` at ``(sol, args)``
    and certify the answer (no graph recorded): ``(x, lin)``, with ``lin`` the
    :class:`~bilevel.implicit.operators.Linearization` whose products the solve used
    (its ``cross`` prepared for the argument leaves ``wrt_args``), or ``None`` for a
    forward-mode system."""
    f = system.batched_residual()
    lin = value = None
    if system.transpose or system.symmetric:
        lin = linearize(f, sol, (tuple(args),), objective=system.batched_objective(), wrt_args=wrt_args)
        value, matvec = lin.value, lin.transpose_matvec
        _check_residual_structure(system, value, sol)
    else:
        matvec = lambda w: forward_product(lambda s: f(s, args), (sol,), (w,))[1]  # noqa: E731
    operator = densify(damped(matvec, system.damping), b, system.batch_dims, system.solve)
    x, info = system.solve(operator, b, batch_dims=system.batch_dims)
    report(system, value, sol, info, x, b)
    return x, lin


class _Adjoint(torch.autograd.Function):
    @staticmethod
    def forward(system: AdjointSystem, *tensors):
        n = system.n_sol
        b = tree_unflatten(list(tensors[:n]), system.sol_spec)
        sol = tree_unflatten(list(tensors[n : 2 * n]), system.sol_spec)
        x, _ = _solve_system(system, b, sol, tensors[2 * n :])
        return tuple(tree_leaves(x))

    @staticmethod
    def setup_context(ctx, inputs, output):
        system = inputs[0]
        ctx.system = system
        ctx.save_for_backward(*inputs[1 + system.n_sol :], *output)
        ctx.save_for_forward(*inputs[1 + system.n_sol :], *output)

    @staticmethod
    @differentiates
    def jvp(ctx, _, *tangents):
        r"""Forward mode: :math:`x = M^{-1} b` moves by
        :math:`\dot x = M^{-1}(\dot b - \dot M x)`, where :math:`\dot M x` is the
        derivative of :math:`M(s, \theta)\, x` (``x`` held fixed) along the
        tangents of the solution and of the arguments; one more solve with the
        same operator, itself differentiable."""
        system = ctx.system
        n = system.n_sol
        saved = ctx.saved_tensors
        sol_leaves, args, x = saved[:n], saved[n:-n], saved[-n:]
        tangents = [torch.zeros_like(t) if d is None else d for t, d in zip((*x, *sol_leaves, *args), tangents)]
        db, dsol, dargs = tangents[:n], tangents[n : 2 * n], tangents[2 * n :]
        float_pos = [i for i, a in enumerate(args) if a.is_floating_point()]
        f = system.batched_residual()
        spec = system.sol_spec
        x_tree = tree_unflatten(list(x), spec)

        def applied(sol_ls, float_args):  # M(s, theta) x, damping left out (its derivative is 0)
            full = list(args)
            for i, a in zip(float_pos, float_args):
                full[i] = a
            s = tree_unflatten(list(sol_ls), spec)
            if system.transpose:
                out = vjp(lambda s_: f(s_, full), s)[1](x_tree)[0]
            else:
                out = forward_product(lambda s_: f(s_, full), (s,), (x_tree,))[1]
            return tuple(tree_leaves(out))

        primals = (tuple(sol_leaves), tuple(args[i] for i in float_pos))
        directions = (tuple(dsol), tuple(dargs[i] for i in float_pos))
        _, dm_x = forward_product(applied, primals, directions)
        rhs = [b - m for b, m in zip(db, dm_x)]
        other = dataclasses.replace(system, certify=False)
        return tuple(_Adjoint.apply(other, *rhs, *sol_leaves, *args))

    @staticmethod
    @differentiates
    def backward(ctx, *u_bar):
        refuse_grads_batched_by_autograd(u_bar, "the second derivative of a custom_root root")
        system = ctx.system
        n = system.n_sol
        saved = ctx.saved_tensors
        sol_leaves, args, u = saved[:n], saved[n:-n], saved[-n:]
        u_bar = [torch.zeros_like(x) if g is None else g for x, g in zip(u, u_bar)]
        other = dataclasses.replace(system, transpose=not system.transpose, certify=False)
        w = _Adjoint.apply(other, *u_bar, *sol_leaves, *args)
        needs = ctx.needs_input_grad[1:]
        need_sol = any(needs[n : 2 * n])
        float_pos = [i for i, a in enumerate(args) if a.is_floating_point() and needs[2 * n + i]]
        if not (need_sol or float_pos):
            return (None, *w, *([None] * (len(saved) - n)))
        # d/dtheta of <w, M(theta) u> with u, w held fixed; M u = J^T u or J u.
        left, right = (u, w) if system.transpose else (w, u)
        f = system.batched_residual()

        def pairing(sol_ls, float_args):
            full = list(args)
            for i, a in zip(float_pos, float_args):
                full[i] = a
            s = tree_unflatten(list(sol_ls), system.sol_spec)
            _, pullback = vjp(lambda s_: f(s_, full), s)
            jt_left = pullback(tree_unflatten(list(left), system.sol_spec))[0]
            return tree_vdot(jt_left, tree_unflatten(list(right), system.sol_spec))

        _, pullback = vjp(pairing, tuple(sol_leaves), tuple(args[i] for i in float_pos))
        g_sol, g_args = pullback(torch.ones((), dtype=sol_leaves[0].dtype, device=sol_leaves[0].device))
        arg_grads = [None] * len(args)
        for i, g in zip(float_pos, g_args):
            arg_grads[i] = -g
        sol_grads = [-g if need_sol else None for g in g_sol]
        return (None, *w, *sol_grads, *arg_grads)

    @staticmethod
    def vmap(info, in_dims, system, *tensors):
        moved = _batch_first(info.batch_size, in_dims[1:], tensors, 2 * system.n_sol)
        out = _Adjoint.apply(dataclasses.replace(system, batch_dims=system.batch_dims + 1), *moved)
        return out, (0,) * len(out)


def _batch_first(size: int, in_dims, tensors, n_copied: int) -> list:
    """Move each tensor's vmapped dim to the front; expand unbatched ones.

    The first ``n_copied`` tensors (right-hand side and solution, solution-sized)
    are expanded into real copies: forward-mode products take the solution as a
    primal, and a dual tensor cannot be built on a view whose entries share
    memory.  The others (the arguments, possibly large data) stay views."""
    moved = []
    for i, (t, d) in enumerate(zip(tensors, in_dims)):
        if d is not None:
            moved.append(t.movedim(d, 0))
        else:
            expanded = t.expand(size, *t.shape)
            moved.append(expanded.contiguous() if i < n_copied else expanded)
    return moved


def _check_residual_structure(system: AdjointSystem, value, sol) -> None:
    v_leaves, v_spec = tree_flatten(value)
    s_leaves = tree_leaves(sol)
    if v_spec != system.sol_spec or any(
        not torch.is_tensor(a) or a.shape != b.shape for a, b in zip(v_leaves, s_leaves)
    ):
        raise ValueError(
            f"{system.stage}: `residual(sol, *args)` must return a tree with the structure and "
            f"shapes of `sol` ({[tuple(x.shape) for x in s_leaves]}); got {v_spec} with "
            f"{[tuple(x.shape) if torch.is_tensor(x) else type(x).__name__ for x in v_leaves]}."
        )


@dataclass
class _RootCall:
    """Everything about one call of a decorated solver that is not a tensor."""

    solver: Callable
    rebuild_kwargs: Callable[[Sequence], dict]  # from the keyword tensors, inputs after the arguments'
    has_aux: bool
    system: Callable[[Any, int], AdjointSystem]
    rebuild_args: Callable[[tuple], tuple]
    n_args: int  # tensors of the positional arguments; the keyword tensors follow them
    sol_spec: Any = None
    n_sol: int = 0  # outputs that are the solution; the tensors of ``aux`` follow them
    rebuild_aux: Optional[Callable[[Sequence], Any]] = None


def check_adjoint_options(solve, damping, residual_tol, strict) -> None:
    """Refuse, naming it, a bad option of an implicit differentiation (shared by
    :func:`custom_root` and :func:`~bilevel.hypergrad`)."""
    if isinstance(solve, type):
        raise TypeError(f"`solve` must be a linear solver instance, e.g. {solve.__name__}(); got the class itself.")
    if solve is not None and not callable(solve):
        raise TypeError(
            f"`solve` must be a linear solver such as bilevel.implicit.CG(); got {type(solve).__name__}."
        )
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 <= damping < math.inf:
        raise ValueError(f"`damping` must be a non-negative finite float; got {damping!r}.")
    if residual_tol is not None and (isinstance(residual_tol, bool) or not isinstance(residual_tol, (int, float))
                                     or not residual_tol > 0):
        raise ValueError(f"`residual_tol` must be a positive float or None; got {residual_tol!r}.")
    if not isinstance(strict, bool):
        raise TypeError(f"`strict` must be True or False; got {strict!r}.")


def _check_differentiable_output(leaves, tensors, name: str) -> None:
    """An integer or boolean solution cannot carry the implicit gradient: refuse it
    where an argument asks for one, instead of dropping that gradient silently."""
    if any(torch.is_tensor(t) and t.requires_grad for t in tensors):
        bad = [str(x.dtype) for x in leaves if not (x.is_floating_point() or x.is_complex())]
        if bad:
            raise TypeError(
                f"custom_root: the solver's output (`{name}`) has dtype {', '.join(sorted(set(bad)))}, which "
                "cannot carry a gradient, while an argument requires grad; return floating-point tensors."
            )


def _check_batch_shapes(leaves, tensors, batch_dims: int) -> None:
    """With ``batch_dims``, every tensor argument carries the solution's leading batch
    shape (the residual is vmapped over all of them): refuse one that does not, naming
    it, where a derivative would fail with vmap's size message (a forward pass alone
    never evaluates the residual, and needs no such shape)."""
    if not batch_dims or not leaves:
        return
    batch = tuple(leaves[0].shape[:batch_dims])
    bad = [f"argument tensor {i} of shape {tuple(t.shape)}" for i, t in enumerate(tensors)
           if tuple(t.shape[:batch_dims]) != batch]
    if bad:
        raise ValueError(
            f"custom_root(batch_dims={batch_dims}): every tensor argument must lead with the solution's batch "
            f"shape {batch}; got {', '.join(bad)}. Expand data shared by the problems to the batch "
            "(e.g. X.expand(B, *X.shape), a view) or close over it in the residual if it needs no gradient."
        )


def _note_positional_arguments(err: TypeError, n_args: int) -> None:
    """A note for the usual cause of a TypeError when the condition is evaluated."""
    if "positional argument" in str(err) and hasattr(err, "add_note"):
        err.add_note(
            f"custom_root: the optimality condition is called as residual(sol, *args) with all {n_args} "
            "positional arguments of the decorated solver; pass the solver's own options (iteration "
            "counts, tolerances) as keyword arguments, which the condition does not receive."
        )


class _Root(torch.autograd.Function):
    """Inputs: the tensors of the positional arguments (differentiated), then those of
    the keyword arguments (the solver's only: warm starts, options).  Outputs: the
    solution's leaves, then the tensors of ``aux`` (not differentiable).  Keyword and
    ``aux`` tensors go through the Function so that its vmap rule splits and stacks
    them with the rest."""

    @staticmethod
    def forward(call: _RootCall, *tensors):
        args = call.rebuild_args(tensors[:call.n_args])
        kwargs = call.rebuild_kwargs(tensors[call.n_args:])
        with torch.no_grad():
            try:
                out = call.solver(*args, **kwargs)
            except RuntimeError as err:
                if "does not require grad" not in str(err):
                    raise
                raise RuntimeError(
                    f"custom_root: the solver `{getattr(call.solver, '__name__', call.solver)}` runs without "
                    f"autograd (torch.no_grad), and it needed gradients ({err}). A solver that differentiates "
                    "inside (a torch.optim loop) opens `with torch.enable_grad():` itself, on detached copies "
                    "of its inputs; its result's gradients still come from the implicit function theorem."
                ) from err
        aux_leaves = []
        if call.has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError("custom_root(has_aux=True): the solver must return a pair (sol, aux).")
            out, aux = out
            aux_leaves, call.rebuild_aux = split_leaves(aux, torch.is_tensor)
        leaves, call.sol_spec = tensor_leaves(out, "the solver's output")
        call.n_sol = len(leaves)
        if not all_finite(leaves):
            raise FloatingPointError(
                f"custom_root: the solver `{getattr(call.solver, '__name__', call.solver)}` returned "
                "non-finite values (NaN or inf) in its solution."
            )
        return tuple(x.detach().clone() if any(x is t for t in tensors) else x.detach()
                     for x in (*leaves, *aux_leaves))

    @staticmethod
    def setup_context(ctx, inputs, output):
        call = ctx.call = inputs[0]
        ctx.n_in, ctx.n_out = call.n_args, len(output)
        ctx.mark_non_differentiable(*output[call.n_sol:])
        ctx.save_for_backward(*inputs[1:1 + call.n_args], *output[:call.n_sol])
        ctx.save_for_forward(*inputs[1:1 + call.n_args], *output[:call.n_sol])

    @staticmethod
    @differentiates
    def backward(ctx, *sol_bar):
        call, n_in = ctx.call, ctx.n_in
        n_kw = len(ctx.needs_input_grad) - 1 - n_in  # keyword tensors get no gradient
        sol_bar = sol_bar[:call.n_sol]
        refuse_grads_batched_by_autograd(sol_bar, "the backward pass of a custom_root root")
        saved = ctx.saved_tensors
        tensors, sol_leaves = saved[:n_in], saved[n_in:]
        needs = ctx.needs_input_grad[1:]
        float_pos = [i for i, t in enumerate(tensors) if needs[i] and t.is_floating_point()]
        if not float_pos:
            return (None,) * (1 + n_in + n_kw)
        sol_bar = [torch.zeros_like(s) if g is None else g for s, g in zip(sol_leaves, sol_bar)]
        system = call.system(call.sol_spec, len(sol_leaves))
        _check_batch_shapes(sol_leaves, tensors, system.batch_dims)
        try:
            if _final(sol_bar, saved):
                grads = _final_grads(system, sol_bar, sol_leaves, tensors, float_pos)
            else:
                u = solve_adjoint(system, sol_bar, sol_leaves, tensors)
                grads = _cross_pullback(system, sol_leaves, tensors, float_pos, u)
        except TypeError as err:
            _note_positional_arguments(err, len(call.rebuild_args(tensors)))
            raise
        check_cross_products(system.stage, grads, "the residual's derivative in the arguments", system.batch_dims)
        out = [None] * (n_in + n_kw)
        for i, g in zip(float_pos, grads):
            out[i] = -g
        return (None, *out)

    @staticmethod
    @differentiates
    def jvp(ctx, _call_tangent, *tangents):
        call, n_in = ctx.call, ctx.n_in
        saved = ctx.saved_tensors
        tensors, sol_leaves = saved[:n_in], saved[n_in:]
        tangents = tangents[:n_in]  # the keyword tensors' tangents do not reach the solution
        n_aux = ctx.n_out - call.n_sol
        float_pos = [i for i, t in enumerate(tangents) if t is not None and tensors[i].is_floating_point()]
        if not float_pos:
            return tuple(torch.zeros_like(s) for s in sol_leaves) + (None,) * n_aux
        system = call.system(call.sol_spec, len(sol_leaves))
        _check_batch_shapes(sol_leaves, tensors, system.batch_dims)
        sol = tree_unflatten(list(sol_leaves), system.sol_spec)

        def of_args(*float_args):
            full = list(tensors)
            for i, a in zip(float_pos, float_args):
                full[i] = a
            return system.batched_residual()(sol, full)

        _, dres = forward_product(
            of_args, tuple(tensors[i].contiguous() for i in float_pos), tuple(tangents[i] for i in float_pos))
        forward_system = dataclasses.replace(system, transpose=False)
        b = [-x for x in tree_leaves(dres)]
        return tuple(solve_adjoint(forward_system, b, sol_leaves, tensors)) + (None,) * n_aux

    @staticmethod
    def vmap(info, in_dims, call, *tensors):
        # The solver is a black box: solve each batch element separately.
        outs = []
        for i in range(info.batch_size):
            element = [t.select(d, i) if d is not None else t for t, d in zip(tensors, in_dims[1:])]
            outs.append(_Root.apply(call, *element))
        try:
            stacked = tuple(torch.stack(parts) for parts in zip(*outs))
        except RuntimeError as err:
            raise ValueError(
                "custom_root under vmap: the batch elements' solutions (or the tensors of their `aux`) "
                f"differ in shape and cannot be stacked: {err}") from err
        return stacked, (0,) * len(stacked)


def _final(cotangents, saved) -> bool:
    """Whether a backward pass computes final gradients: no graph to record
    (``create_graph=False``), no torch.func level over it, and no forward-mode dual
    level (forward-over-reverse: the tangents of the solution and the arguments must
    reach the gradient, and the final route works on detached copies)."""
    return not (in_dual_level() or torch.is_grad_enabled() or inside_transform()
                or any(is_transformed(t) for t in (*cotangents, *saved)))


def _final_grads(system: AdjointSystem, sol_bar, sol_leaves, tensors, float_pos) -> list:
    r""":math:`(\partial_\theta F)^\top u` with :math:`(\partial_s F)^\top u = \bar s`, for the
    floating tensors at ``float_pos``, from one linearization of the residual that serves
    the adjoint solve's products and the cross products (the differentiable route
    evaluates the residual again for the latter: at small sizes a third of the time)."""
    floating = [i for i, t in enumerate(tensors) if t.is_floating_point()]  # split_differentiable order
    spec = system.sol_spec
    u, lin = _solve_system(system, tree_unflatten(list(sol_bar), spec), tree_unflatten(list(sol_leaves), spec),
                           tensors, wrt_args=[floating.index(i) for i in float_pos])
    return lin.cross(u)


def check_cross_products(stage: str, products, what: str, batch_dims: int = 0) -> None:
    r"""Raise where the cross products :math:`(\partial_\theta F)^\top u` hold NaN or inf
    (``u``, the adjoint solution, was found finite): ``what`` names the derivative, the
    message the batch elements (the first ``batch_dims`` dimensions of every product).
    One host read; tensors inside a :mod:`torch.func` transform are not inspected."""
    tensors = [g for g in tree_leaves(products) if torch.is_tensor(g)]
    if not all_finite(tensors):
        where = ""
        if batch_dims:
            finite = [torch.isfinite(g.reshape(*g.shape[:batch_dims], -1)).all(-1) for g in tensors]
            where = _elements(~torch.stack(finite).all(0))
        raise FloatingPointError(
            f"{stage}: the gradient contains NaN or inf{where}: {what} is not finite at the solution, though the "
            "adjoint solve is (a sqrt, log or division at 0, or a torch.where whose unused branch is NaN or "
            "inf there: autograd differentiates both branches; mask the input of that branch instead)."
        )


def _cross_pullback(system: AdjointSystem, sol_leaves, tensors, float_pos, u) -> tuple:
    r""":math:`(\partial_\theta F)^\top u` for the floating tensors at ``float_pos``."""
    sol = tree_unflatten(list(sol_leaves), system.sol_spec)

    def of_args(*float_args):
        full = list(tensors)
        for i, a in zip(float_pos, float_args):
            full[i] = a
        return system.batched_residual()(sol, full)

    _, pullback = vjp(of_args, *(tensors[i] for i in float_pos))
    return pullback(tree_unflatten(list(u), system.sol_spec))


def custom_root(
    residual: Residual,
    solve: Optional[LinearSolver] = None,
    *,
    has_aux: bool = False,
    damping: float = 0.0,
    strict: bool = False,
    residual_tol: Optional[float] = None,
    batch_dims: int = 0,
) -> Callable[[Callable], Callable]:
    r"""Decorator: differentiate a solver's output implicitly through ``residual``.

    The decorated ``solver(*args, **kwargs)`` must return ``sol`` (a tensor or a
    tree of tensors) with ``residual(sol, *args) = 0``.  Positional ``args`` may be
    tensors or trees; gradients flow to every floating-point tensor among them
    through the implicit function theorem

    .. math:: (\partial_s F)^\top u = \bar s, \qquad \bar\theta = -(\partial_\theta F)^\top u,

    with :math:`F` = ``residual``.  Keyword arguments (e.g. a warm start
    ``init=...``) go to the solver only and are not differentiated; a keyword
    tensor that requires grad is reported by a
    :class:`~bilevel.status.CapturedTensorWarning` (an error in strict mode).

    Args:
        residual: the optimality condition ``residual(sol, *args)``, returning a
            tree shaped like ``sol``; e.g. :func:`~bilevel.implicit.stationarity`.
        solve: linear solver for the adjoint system (any
            :mod:`~bilevel.implicit.linear_solve` object, or a function
            ``solve(matvec, b) -> x`` or ``-> (x, info)``, as other libraries write
            them, whose answer is then certified by one more product; see
            :class:`~bilevel.implicit.linear_solve.function.SolveFunction`).  ``None`` picks CG when
            ``residual`` is declared symmetric (stationarity of an objective) and
            GMRES otherwise, with dtype-scaled tolerances.
        has_aux: the solver returns ``(sol, aux)``; ``aux`` (a tree whose
            tensors are detached; other leaves pass as they are) is passed
            through without gradient.
        damping: :math:`\epsilon \ge 0` added to the system,
            :math:`(\partial_s F + \epsilon I)^\top u = \bar s` — a remedy for
            singular or indefinite systems (biases the gradient by
            :math:`O(\epsilon)`).
        strict: raise :class:`~bilevel.status.BilevelError` instead of warning
            when a certificate fails.
        residual_tol: tolerance on the estimated distance to the root,
            :math:`\|F(s, \theta)\|\,\|u\|/\|\bar s\|` (invariant to rescaling
            the condition), relative to :math:`\max(1, \|s\|)`; default
            ``eps ** 0.25`` of the dtype.
        batch_dims: number of leading dimensions of the solution and of *every*
            tensor argument that index independent problems (default 0).  The
            solver returns the whole batch at once; ``residual`` is written for
            one problem and is vmapped over these dimensions, and the adjoint
            system is solved per batch element (block-diagonal, with per-element
            convergence and certificates) in one call of the linear solver.

    Returns:
        A decorator; the decorated function has the solver's signature and keeps
        the last backward certificate in ``.last_info``
        (:class:`~bilevel.implicit.ImplicitInfo`).

    Raises:
        FloatingPointError: the solver returned NaN/inf, or the adjoint solve did.
        ValueError: the residual's output does not match the solution's structure.

    Example:
        >>> import torch, bilevel
        >>> X = torch.randn(20, 3, dtype=torch.float64); t = torch.randn(20, dtype=torch.float64)
        >>> def objective(w, lam):
        ...     return 0.5 * ((X @ w - t) ** 2).sum() + 0.5 * lam * (w ** 2).sum()
        >>> @bilevel.custom_root(bilevel.implicit.stationarity(objective))
        ... def ridge(lam):
        ...     return torch.linalg.solve(X.T @ X + lam * torch.eye(3, dtype=X.dtype), X.T @ t)
        >>> lam = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        >>> ridge(lam).sum().backward()
        >>> w = ridge(lam.detach()); H = X.T @ X + lam.detach() * torch.eye(3, dtype=X.dtype)
        >>> torch.allclose(lam.grad, -(torch.linalg.solve(H, w)).sum())
        True
    """
    if not callable(residual):
        raise TypeError(f"`residual` must be callable residual(sol, *args); got {type(residual).__name__}.")
    check_adjoint_options(solve, damping, residual_tol, strict)
    if isinstance(batch_dims, bool) or not isinstance(batch_dims, int) or batch_dims < 0:
        raise ValueError(f"`batch_dims` must be a non-negative int; got {batch_dims!r}.")
    if not isinstance(has_aux, bool):
        raise TypeError(f"`has_aux` must be True or False; got {has_aux!r}.")
    symmetric = is_symmetric(residual)
    linear_solver = as_linear_solver(solve) if solve is not None else default_solve(symmetric)

    def decorator(solver: Callable) -> Callable:
        if not callable(solver):
            raise TypeError(f"custom_root decorates a solver function; got {type(solver).__name__}.")

        @functools.wraps(solver)
        def wrapped(*args, **kwargs):
            check_captured(residual, args, strict=strict, stage="custom_root")
            check_keywords(kwargs, strict=strict, stage="custom_root")
            tensors, rebuild = split_leaves(args, torch.is_tensor)
            kw_tensors, rebuild_kwargs = split_leaves(kwargs, torch.is_tensor)
            # the solver's own inputs, never differentiated: detached, so that a warm start taken
            # from an earlier output does not link this graph to one already freed
            kw_tensors = [t.detach() for t in kw_tensors]
            options = _Options(strict, residual_tol, lambda info: setattr(wrapped, "last_info", info))

            def system(sol_spec, n_sol):
                return AdjointSystem(
                    residual=residual, sol_spec=sol_spec, n_sol=n_sol, rebuild_args=rebuild,
                    solve=linear_solver, symmetric=symmetric, damping=float(damping), options=options,
                    batch_dims=batch_dims,
                )

            call = _RootCall(solver, rebuild_kwargs, has_aux, system, rebuild, len(tensors))
            outputs = _Root.apply(call, *tensors, *kw_tensors)
            leaves = outputs[:call.n_sol]
            _check_differentiable_output(leaves, tensors, getattr(solver, "__name__", "the solver"))
            sol = tree_unflatten(list(leaves), call.sol_spec)
            return (sol, call.rebuild_aux(outputs[call.n_sol:])) if has_aux else sol

        wrapped.last_info = None
        return wrapped

    return decorator


def custom_fixed_point(
    T: FixedPointMap,
    solve: Optional[LinearSolver] = None,
    *,
    has_aux: bool = False,
    damping: float = 0.0,
    strict: bool = False,
    residual_tol: Optional[float] = None,
    batch_dims: int = 0,
) -> Callable[[Callable], Callable]:
    r"""Decorator: differentiate a solver whose output is a fixed point ``sol = T(sol, *args)``.

    Equivalent to :func:`custom_root` with the residual :math:`s - T(s, \theta)`,
    whose Jacobian :math:`I - \partial_s T` is in general not symmetric, so the
    default solve is GMRES.  The adjoint system solved in the backward pass is
    :math:`(I - \partial_s T)^\top u = \bar s`, and
    :math:`\bar\theta = (\partial_\theta T)^\top u`.

    Args:
        T: the map ``T(sol, *args)``, returning a tree shaped like ``sol``,
            whose fixed point the decorated solver returns.
        solve: linear solver for the adjoint system (any
            :mod:`~bilevel.implicit.linear_solve` object, or a function
            ``solve(matvec, b) -> x`` or ``-> (x, info)``, as in
            :func:`custom_root`); ``None`` picks GMRES
            with dtype-scaled tolerances.
        has_aux: the solver returns ``(sol, aux)``; ``aux`` (a tree whose
            tensors are detached; other leaves pass as they are) is passed
            through without gradient.
        damping: :math:`\epsilon \ge 0` added to the system, as in
            :func:`custom_root` (a remedy when :math:`I - \partial_s T` is
            singular; biases the gradient by :math:`O(\epsilon)`).
        strict: raise :class:`~bilevel.status.BilevelError` instead of warning
            when a certificate fails.
        residual_tol: tolerance on the estimated distance to the fixed point,
            as in :func:`custom_root` (default ``eps ** 0.25`` of the dtype).
        batch_dims: number of leading dimensions of the solution and of every
            tensor argument that index independent fixed points, as in
            :func:`custom_root`: ``T`` is written for one problem and vmapped,
            and one call of the linear solver solves the adjoint systems with
            per-element stopping and certificates.

    Returns:
        The decorator that :func:`custom_root` returns for the residual
        :math:`T(s, \theta) - s` (same signature, same ``.last_info``).

    Raises:
        FloatingPointError: a non-finite fixed point from the solver, or a
            non-finite adjoint solution.
        ValueError: ``T`` returns a tree unlike the solution's.

    Example:
        >>> import torch, bilevel
        >>> T = lambda x, a: 0.5 * (x + a / x)          # Newton map for sqrt(a)
        >>> @bilevel.custom_fixed_point(T)
        ... def sqrt(a):
        ...     x = torch.ones_like(a)
        ...     for _ in range(60):
        ...         x = T(x, a)
        ...     return x
        >>> a = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
        >>> torch.autograd.grad(sqrt(a), a)[0].item()  # 1 / (2 sqrt a)
        0.25
    """
    return custom_root(
        fixed_point_residual(T), solve, has_aux=has_aux, damping=damping, strict=strict,
        residual_tol=residual_tol, batch_dims=batch_dims,
    )


__all__ = ["custom_root", "custom_fixed_point", "default_solve", "AdjointSystem", "solve_adjoint", "ImplicitInfo"]
