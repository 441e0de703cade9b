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
from torch.func import grad, vjp

from .._tree import check_same_structure, describe, tree_flatten, tree_map
from ..typing import FixedPointMap, Objective, TensorTree
from .projections import kl_projection_simplex


class Condition:
    """An optimality condition ``residual(sol, *args)`` with metadata.

    Args:
        fn: the residual function ``fn(sol, *args) -> tree shaped like sol``.
        symmetric: whether the Jacobian ``d fn / d sol`` is symmetric (true for
            the gradient of an objective); it picks CG as the default solve.
        name: a label used in messages (default: ``fn``'s ``__name__``).

    Example:
        >>> import torch
        >>> from bilevel.implicit import Condition
        >>> c = Condition(lambda x, a: x ** 3 - a, name="cube_root")   # zero at x = a^(1/3)
        >>> c
        Condition(cube_root, symmetric=False)
        >>> c(torch.tensor([2.0]), torch.tensor([8.0]))
        tensor([0.])
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
    """Whether ``residual`` is declared to have a symmetric Jacobian in ``sol``.

    :func:`~bilevel.implicit.custom_root` asks this to pick its default linear
    solver (CG if symmetric, GMRES otherwise).

    Args:
        residual: a :class:`Condition`, or any callable; a plain function counts
            as not symmetric unless it carries a true ``symmetric`` attribute.

    Returns:
        ``True`` when the Jacobian is declared symmetric, else ``False``.

    Example:
        >>> from bilevel.implicit.conditions import is_symmetric, stationarity
        >>> is_symmetric(stationarity(lambda w: (w ** 2).sum()))
        True
        >>> is_symmetric(lambda w: w - 1)
        False
    """
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
    condition.gradient_of = objective  # the residual is exactly grad_sol of this
    return condition


def fixed_point_residual(T: FixedPointMap, *, symmetric: bool = False) -> Condition:
    r"""The condition of a fixed point ``sol = T(sol, *args)``.

    .. math:: F(s, \theta) = s - T(s, \theta) = 0

    Its Jacobian :math:`I - \partial_s T` is in general not symmetric, so GMRES is
    the default solve; pass ``symmetric=True`` when it is (e.g. for a gradient step
    :math:`T(s) = s - \eta \nabla f(s)`, where :math:`I - \partial_s T = \eta
    \nabla^2 f` is positive definite at a strict minimum, as CG needs; a Neumann
    series with ``alpha=1`` is then :math:`\sum_k (\partial_s T)^k`, the
    fixed-point iteration of the adjoint).

    Args:
        T: the map ``T(sol, *args)``, returning a tree shaped like ``sol``.
        symmetric: declare ``dT/dsol`` symmetric (default ``False``).

    Returns:
        A :class:`Condition` ``residual(sol, *args) = sol - T(sol, *args)``.

    Example:
        The square root of :math:`a` is the fixed point of Heron's map
        :math:`T(s, a) = (s + a / s) / 2`:

        >>> import torch
        >>> from bilevel.implicit import fixed_point_residual
        >>> residual = fixed_point_residual(lambda s, a: 0.5 * (s + a / s))
        >>> residual(torch.tensor([3.0]), torch.tensor([9.0]))
        tensor([0.])
    """
    if not callable(T):
        raise TypeError(f"`T` must be callable T(sol, *args); got {type(T).__name__}.")

    def residual(sol, *args):
        image = T(sol, *args)
        if tree_flatten(image)[1] != tree_flatten(sol)[1]:  # (a tuple would be one "leaf" of a tensor sol)
            raise ValueError(f"fixed point: `T(sol, *args)` must return a tree like `sol`; got {describe(image)} "
                             f"for a solution {describe(sol)}.")
        return tree_map(torch.sub, sol, image)

    name = f"fixed_point({getattr(T, '__name__', 'T')})"
    condition = Condition(residual, symmetric=symmetric, name=name)
    condition.fixed_point_map = T
    return condition


__all__ = ["Condition", "is_symmetric", "stationarity", "fixed_point_residual"]


# --------------------------------------------------------------------------------------
# Fixed points of first-order methods (projected / proximal gradient, mirror descent) and
# KKT conditions.  Reference for all of them:
#   Blondel, Berthet, Cuturi, Frostig, Hoyer, Llinares-López, Pedregosa, Vert,
#   "Efficient and Modular Implicit Differentiation", NeurIPS 2022, section 2.2 and
#   appendix (https://arxiv.org/abs/2105.15183).


def _as_args(value: Any) -> tuple:
    """Normalize an ``*_args`` bundle: tuple/list -> tuple, None -> (), other -> (value,)."""
    if value is None:
        return ()
    if isinstance(value, (tuple, list)):
        return tuple(value)
    return (value,)


def _check_callable(fn: Any, name: str, signature: str) -> None:
    if not callable(fn):
        raise TypeError(f"`{name}` must be callable {signature}; got {type(fn).__name__}.")


def _check_stepsize(stepsize: Any) -> float:
    if isinstance(stepsize, bool) or not isinstance(stepsize, (int, float)):
        raise TypeError(
            f"`stepsize` must be a positive Python number; got {type(stepsize).__name__}. "
            "(The fixed points do not depend on it, so it is never differentiated.)"
        )
    if not (stepsize > 0 and stepsize < float("inf")):
        raise ValueError(f"`stepsize` must be finite and > 0; got {stepsize}.")
    return float(stepsize)


def _label(fn: Any, default: str) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__ or default


def _gradient_step(gradient: Callable, sol: TensorTree, objective_args: Any, stepsize: float) -> TensorTree:
    g = gradient(sol, *_as_args(objective_args))
    return tree_map(lambda s, d: s - stepsize * d, sol, g)


def _fixed_point_condition(T: Callable, name: str, objective: Objective, **attrs: Any) -> Condition:
    condition = fixed_point_residual(T)
    condition.name = name
    condition.objective = objective
    for key, value in attrs.items():
        setattr(condition, key, value)
    return condition


def projected_gradient(objective: Objective, projection: Callable, stepsize: float = 1.0) -> Condition:
    r"""Fixed point of projected gradient descent: optimality of :math:`\min_{x \in C} f(x, \theta)`.

    .. math::
        T(x, \theta, \phi) = P_{C(\phi)}\bigl(x - \eta \nabla_x f(x, \theta)\bigr), \qquad
        F(x, \theta, \phi) = x - T(x, \theta, \phi) = 0,

    with :math:`f` = ``objective``, :math:`P_{C(\phi)}` = ``projection``,
    :math:`\eta` = ``stepsize``.  For convex :math:`f` and :math:`C` the zeros of
    :math:`F` are exactly the minimizers, for every :math:`\eta > 0`.  The Jacobian
    :math:`\partial_x T - I = \partial P\,(I - \eta\nabla^2 f) - I` is not symmetric,
    so GMRES is the default solve.

    The residual is ``residual(sol, objective_args=(), projection_args=())``
    computing ``projection(sol - stepsize * grad objective(sol, *objective_args),
    *projection_args) - sol``: so ``custom_root(condition)`` decorates a solver
    ``solver(objective_args, projection_args) -> sol`` and differentiates ``sol``
    with respect to the tensors in both tuples (e.g. data and box bounds).  In
    every condition of this module an ``*_args`` bundle is a tuple (or list) that
    is splatted; ``None`` stands for ``()`` and any other value (a tensor, a dict)
    for a one-element tuple.
    The map :math:`T` itself, with the same signature, is ``condition.fixed_point_map``
    (for :func:`~bilevel.implicit.custom_fixed_point`).

    Args:
        objective: smooth scalar ``objective(sol, *objective_args)``.
        projection: ``projection(z, *projection_args)``, the Euclidean projection
            onto the feasible set, e.g. :func:`~bilevel.implicit.projections.project_simplex`
            or a set object such as ``Box(0, 1)``.
        stepsize: :math:`\eta > 0` (a Python number; default 1).  A value near
            ``1 / L`` (``L`` the Lipschitz constant of :math:`\nabla f`) keeps the
            linear system well conditioned.

    Returns:
        A non-symmetric :class:`Condition`, with attributes ``fixed_point_map``,
        ``objective``, ``projection`` and ``stepsize``.

    Raises:
        TypeError / ValueError: non-callable ``objective`` / ``projection``, or a
            non-positive ``stepsize``.

    Example:
        >>> import torch
        >>> from bilevel.implicit.projections import project_nonnegative
        >>> f = lambda x, c: 0.5 * ((x - c) ** 2).sum()
        >>> condition = projected_gradient(f, project_nonnegative)
        >>> condition(torch.tensor([0.0, 2.0]), (torch.tensor([-1.0, 2.0]),), ())
        tensor([0., 0.])

    References:
        Blondel et al., `Efficient and Modular Implicit Differentiation
        <https://arxiv.org/abs/2105.15183>`_, NeurIPS 2022 (section 2.2).
    """
    _check_callable(objective, "objective", "objective(sol, *objective_args)")
    _check_callable(projection, "projection", "projection(z, *projection_args)")
    stepsize = _check_stepsize(stepsize)
    gradient = grad(objective)

    def projected_gradient_map(sol, objective_args=(), projection_args=()):
        z = _gradient_step(gradient, sol, objective_args, stepsize)
        return projection(z, *_as_args(projection_args))

    name = f"projected_gradient({_label(objective, 'objective')}, {_label(projection, 'projection')})"
    return _fixed_point_condition(
        projected_gradient_map, name, objective, projection=projection, stepsize=stepsize
    )


def proximal_gradient(objective: Objective, prox: Callable, stepsize: float = 1.0) -> Condition:
    r"""Fixed point of proximal gradient descent: optimality of :math:`\min_x f(x, \theta) + g(x, \lambda)`.

    .. math::
        T(x, \theta, \lambda) = \operatorname{prox}_{\eta g(\cdot, \lambda)}\bigl(x - \eta \nabla_x f(x, \theta)\bigr),
        \qquad F = x - T(x, \theta, \lambda) = 0,

    with :math:`f` = ``objective`` (smooth), :math:`\operatorname{prox}` = ``prox``
    called as ``prox(z, prox_hyperparams, stepsize)`` (the convention of
    :mod:`~bilevel.implicit.prox`), :math:`\eta` = ``stepsize``.  For convex
    :math:`f, g` the zeros of :math:`F` are the minimizers, for every :math:`\eta > 0`.
    Non-symmetric Jacobian: GMRES is the default solve.

    The residual is ``residual(sol, objective_args=(), prox_hyperparams=None)``;
    ``custom_root(condition)`` decorates ``solver(objective_args, prox_hyperparams)``.
    ``prox_hyperparams`` is handed to ``prox`` as one object (a tensor, a pair
    ``(l1reg, l2reg)``, ...), and its tensors are differentiated.
    ``condition.fixed_point_map`` is :math:`T` with the same signature.

    Args:
        objective: smooth scalar ``objective(sol, *objective_args)``.
        prox: ``prox(z, prox_hyperparams, scaling)``, e.g.
            :func:`~bilevel.implicit.prox.prox_lasso`.
        stepsize: :math:`\eta > 0` (a Python number; default 1).

    Returns:
        A non-symmetric :class:`Condition` with attributes ``fixed_point_map``,
        ``objective``, ``prox`` and ``stepsize``.

    Example:
        >>> import torch
        >>> from bilevel.implicit.prox import prox_lasso
        >>> f = lambda w, y: 0.5 * ((w - y) ** 2).sum()       # solution: soft-threshold(y, lam)
        >>> condition = proximal_gradient(f, prox_lasso)
        >>> y, lam = torch.tensor([2.0, 0.5]), torch.tensor(1.0)
        >>> condition(torch.tensor([1.0, 0.0]), (y,), lam)
        tensor([0., 0.])

    References:
        Blondel et al., `Efficient and Modular Implicit Differentiation
        <https://arxiv.org/abs/2105.15183>`_, NeurIPS 2022 (section 2.2).
    """
    _check_callable(objective, "objective", "objective(sol, *objective_args)")
    _check_callable(prox, "prox", "prox(z, hyperparams, scaling)")
    stepsize = _check_stepsize(stepsize)
    gradient = grad(objective)

    def proximal_gradient_map(sol, objective_args=(), prox_hyperparams=None):
        z = _gradient_step(gradient, sol, objective_args, stepsize)
        return prox(z, prox_hyperparams, stepsize)

    name = f"proximal_gradient({_label(objective, 'objective')}, {_label(prox, 'prox')})"
    return _fixed_point_condition(proximal_gradient_map, name, objective, prox=prox, stepsize=stepsize)


def mirror_descent(
    objective: Objective,
    projection: Optional[Callable] = None,
    mapping: Optional[Callable] = None,
    stepsize: float = 1.0,
) -> Condition:
    r"""Fixed point of mirror descent: optimality of :math:`\min_{x \in C} f(x, \theta)` in a Bregman geometry.

    With a mirror map :math:`\phi` (strictly convex on :math:`C`),
    ``mapping`` :math:`= \nabla\phi` and ``projection`` the Bregman projection
    from the dual space, :math:`y \mapsto \operatorname{argmin}_{x \in C} D_\phi(x, \nabla\phi^*(y))`:

    .. math::
        T(x, \theta, \phi) = \mathrm{proj}^\phi_{C}\bigl(\nabla\phi(x) - \eta \nabla_x f(x, \theta)\bigr),
        \qquad F = x - T(x) = 0.

    Default (both ``projection`` and ``mapping`` left ``None``): the entropy
    :math:`\phi(x) = \sum_i x_i \log x_i` on the simplex, i.e. the
    exponentiated-gradient step along the last dim

    .. math:: T(x) = r\,\operatorname{softmax}\bigl(\log x - \eta\nabla f(x)\bigr),

    with :func:`~bilevel.implicit.projections.kl_projection_simplex` (radius
    :math:`r` from ``projection_args``, default 1) and ``mapping = torch.log``.
    The solution must then be strictly positive (as for entropy-regularized
    problems); zeros give ``log 0 = -inf``.

    The residual is ``residual(sol, objective_args=(), projection_args=())``;
    ``custom_root(condition)`` decorates ``solver(objective_args, projection_args)``,
    and ``condition.fixed_point_map`` is :math:`T`.  Non-symmetric: GMRES default.

    Args:
        objective: smooth scalar ``objective(sol, *objective_args)``.
        projection: ``projection(y, *projection_args)`` from the dual space to
            :math:`C`; default :func:`~bilevel.implicit.projections.kl_projection_simplex`.
        mapping: :math:`\nabla\phi`, ``mapping(sol)``; default ``torch.log``.
            Give both or neither.
        stepsize: :math:`\eta > 0` (a Python number; default 1).

    Returns:
        A non-symmetric :class:`Condition` with attributes ``fixed_point_map``,
        ``objective``, ``projection``, ``mapping`` and ``stepsize``.

    Example:
        >>> import torch
        >>> c = torch.tensor([1.0, 2.0, 3.0])
        >>> f = lambda x, c: (c * x).sum() + (x * torch.log(x)).sum()   # solution softmax(-c)
        >>> condition = mirror_descent(f, stepsize=0.5)
        >>> condition(torch.softmax(-c, -1), (c,)).abs().max() < 1e-6
        tensor(True)

    References:
        Beck and Teboulle, "Mirror descent and nonlinear projected subgradient
        methods for convex optimization", Operations Research Letters 2003.
        Blondel et al., `Efficient and Modular Implicit Differentiation
        <https://arxiv.org/abs/2105.15183>`_, NeurIPS 2022 (section 2.2).
    """
    _check_callable(objective, "objective", "objective(sol, *objective_args)")
    if (projection is None) != (mapping is None):
        raise ValueError(
            "`projection` and `mapping` must be given together (a Bregman projection belongs to its "
            "mirror map), or both left None for the entropy / KL case on the simplex."
        )
    if projection is None:
        projection, mapping = kl_projection_simplex, torch.log
    _check_callable(projection, "projection", "projection(y, *projection_args)")
    _check_callable(mapping, "mapping", "mapping(sol)")
    stepsize = _check_stepsize(stepsize)
    gradient = grad(objective)

    def mirror_descent_map(sol, objective_args=(), projection_args=()):
        g = gradient(sol, *_as_args(objective_args))
        y = tree_map(lambda m, d: m - stepsize * d, mapping(sol), g)
        return projection(y, *_as_args(projection_args))

    name = f"mirror_descent({_label(objective, 'objective')}, {_label(projection, 'projection')})"
    return _fixed_point_condition(
        mirror_descent_map, name, objective, projection=projection, mapping=mapping, stepsize=stepsize
    )


def _is_absent(part: Any) -> bool:
    return part is None or (isinstance(part, (tuple, list)) and len(part) == 0)


def _unpack_kkt(sol: Any, has_eq: bool, has_ineq: bool) -> tuple:
    if not isinstance(sol, (tuple, list)) or len(sol) != 3:
        raise ValueError(
            "`sol` of a KKT condition must be the triple (primal, eq_dual, ineq_dual), with () or None "
            f"for an absent kind of constraint; got {type(sol).__name__}"
            + (f" of length {len(sol)}." if isinstance(sol, (tuple, list)) else ".")
        )
    primal, eq_dual, ineq_dual = sol
    for present, dual, name, fn in ((has_eq, eq_dual, "eq_dual", "eq_constraints"),
                                    (has_ineq, ineq_dual, "ineq_dual", "ineq_constraints")):
        if present and _is_absent(dual):
            raise ValueError(f"`{fn}` was given, so `sol` must hold its multipliers `{name}`; got {dual!r}.")
        if not present and not _is_absent(dual):
            raise ValueError(
                f"`{fn}` is None, so `{name}` must be () or None; got {type(dual).__name__}."
            )
    return primal, eq_dual, ineq_dual


def kkt(
    objective: Objective,
    eq_constraints: Optional[Callable] = None,
    ineq_constraints: Optional[Callable] = None,
) -> Condition:
    r"""Karush-Kuhn-Tucker conditions of :math:`\min_x f(x, \theta)` s.t. :math:`h(x, \psi) = 0,\ g(x, \chi) \le 0`.

    On the tree ``sol = (x, nu, mu)`` (primal, equality and inequality multipliers):

    .. math::
        F(x, \nu, \mu) = \begin{pmatrix}
            \nabla_x f(x, \theta) + J_h(x)^\top \nu + J_g(x)^\top \mu \\
            h(x, \psi) \\
            \mu \odot g(x, \chi)
        \end{pmatrix} = 0

    (stationarity, primal feasibility, complementary slackness).  Its Jacobian is
    not symmetric (GMRES is the default solve); it is invertible at a solution
    with linearly independent active constraint gradients, strict
    complementarity (:math:`\mu_i > 0` on active constraints) and a positive
    definite Lagrangian Hessian on the tangent space of the active constraints.
    Products :math:`J^\top v` use :func:`torch.func.vjp`: no Jacobian is formed.
    Dual feasibility :math:`\mu \ge 0` and :math:`g \le 0` are the solver's job;
    the residual is zero at any KKT point of the active set.

    The residual is ``residual(sol, objective_args=(), eq_args=(), ineq_args=())``,
    calling ``objective(x, *objective_args)``, ``eq_constraints(x, *eq_args)`` and
    ``ineq_constraints(x, *ineq_args)``; it returns a triple shaped like ``sol``.
    So ``custom_root(condition)`` decorates ``solver(objective_args, eq_args, ineq_args)``
    returning ``(x, nu, mu)``.  For a kind of constraint that is absent, put ``()``
    (or ``None``) in its slot of ``sol``; it is returned unchanged.  Prefer ``()``
    when the triple goes through :mod:`torch.func` or :func:`~bilevel.custom_root`,
    which accept only tensors as leaves.

    Args:
        objective: scalar ``objective(x, *objective_args)``; ``x`` may be a tree.
        eq_constraints: ``h(x, *eq_args)``, a tensor (or tree) shaped like ``nu``; or None.
        ineq_constraints: ``g(x, *ineq_args)``, a tensor (or tree) shaped like ``mu``,
            feasible where ``<= 0``; or None.

    Returns:
        A non-symmetric :class:`Condition` with attributes ``objective``,
        ``eq_constraints`` and ``ineq_constraints``.

    Raises:
        ValueError: (when called) ``sol`` is not a triple, a multiplier is missing
            for a given constraint or present for an absent one, or a multiplier's
            shape differs from its constraint's value.

    Example:
        >>> import torch
        >>> f = lambda x: 0.5 * (x ** 2).sum()
        >>> h = lambda x: x.sum(-1, keepdim=True) - 1.0        # solution x = (1/2, 1/2), nu = -1/2
        >>> condition = kkt(f, eq_constraints=h)
        >>> condition((torch.tensor([0.5, 0.5]), torch.tensor([-0.5]), ()))
        (tensor([0., 0.]), tensor([0.]), ())

    References:
        Blondel et al., `Efficient and Modular Implicit Differentiation
        <https://arxiv.org/abs/2105.15183>`_, NeurIPS 2022 (section 2.2, KKT conditions).
        Amos and Kolter, "OptNet: Differentiable Optimization as a Layer in Neural
        Networks", ICML 2017.
    """
    _check_callable(objective, "objective", "objective(x, *objective_args)")
    if eq_constraints is not None:
        _check_callable(eq_constraints, "eq_constraints", "eq_constraints(x, *eq_args)")
    if ineq_constraints is not None:
        _check_callable(ineq_constraints, "ineq_constraints", "ineq_constraints(x, *ineq_args)")
    gradient = grad(objective)

    def add(a, b):
        return tree_map(torch.add, a, b)

    def kkt_residual(sol, objective_args=(), eq_args=(), ineq_args=()):
        primal, eq_dual, ineq_dual = _unpack_kkt(sol, eq_constraints is not None, ineq_constraints is not None)
        stat = gradient(primal, *_as_args(objective_args))
        eq_res, ineq_res = eq_dual, ineq_dual
        if eq_constraints is not None:
            eargs = _as_args(eq_args)
            eq_res, pull = vjp(lambda x: eq_constraints(x, *eargs), primal)
            check_same_structure(eq_res, eq_dual, "eq_constraints(x, *eq_args)", "eq_dual")
            stat = add(stat, pull(eq_dual)[0])
        if ineq_constraints is not None:
            iargs = _as_args(ineq_args)
            g_val, pull = vjp(lambda x: ineq_constraints(x, *iargs), primal)
            check_same_structure(g_val, ineq_dual, "ineq_constraints(x, *ineq_args)", "ineq_dual")
            stat = add(stat, pull(ineq_dual)[0])
            ineq_res = tree_map(torch.mul, ineq_dual, g_val)
        out = (stat, eq_res, ineq_res)
        return type(sol)(out) if isinstance(sol, list) else out

    names = [_label(objective, "objective")]
    names += [f"eq={_label(eq_constraints, 'h')}"] if eq_constraints is not None else []
    names += [f"ineq={_label(ineq_constraints, 'g')}"] if ineq_constraints is not None else []
    condition = Condition(kkt_residual, symmetric=False, name=f"kkt({', '.join(names)})")
    condition.objective = objective
    condition.eq_constraints = eq_constraints
    condition.ineq_constraints = ineq_constraints
    return condition


__all__ += ["projected_gradient", "proximal_gradient", "mirror_descent", "kkt"]
