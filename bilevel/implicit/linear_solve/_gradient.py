r"""Gradients through a linear solve, by implicit differentiation.

A solver's iterations are not differentiated (their step sizes are data-dependent
and, on the CPU, read as Python numbers): the solution :math:`x = A^{-1} b` is
differentiated through the equation it satisfies.  With :math:`A = A(\theta)`
given by ``matvec`` and :math:`r = b - A(\theta)\, x`,

.. math:: dx = A^{-1}\,(db - dA\, x) = A^{-1}\, dr\big|_{x\ \mathrm{fixed}},

so the reverse mode needs one more solve, :math:`A^\top u = \bar x`, after which
:math:`\bar b = u` and :math:`\bar\theta = -(\partial_\theta A(\theta) x)^\top u`.
Autograd is handed :math:`x + Z(r)`, where :math:`Z` returns zeros and its
backward solves :math:`A^\top u = \bar x`: the value is the solver's :math:`x`,
the gradient is the one above, and ``r``'s graph carries the dependence on
``b`` and on every tensor ``matvec`` captures (one product, taken only when
gradients are recorded).

Least-squares solvers (:class:`NormalCG`, ``Direct("lstsq")``) return the
minimum-norm least-squares solution :math:`x = A^+ b`, also for a rectangular
:math:`A` (``m x n``; NormalCG from a warm start adds ``x0``'s part in the null
space of :math:`A`, which is not differentiated: the derivative is that of
:math:`A^+ b`).  Where :math:`A` has a null space, the pseudo-inverse is
differentiated as Golub and Pereyra (1973) do (exact where the rank of
:math:`A` does not change):

.. math:: dx = (A^\top A)^+\, d\big(A^\top (b - A x)\big)\big|_{x\ \mathrm{fixed}}
          + (I - A^+ A)\, dA^\top y, \qquad y = (A A^\top)^+ A x,

the derivative of the normal equations (with the minimum-norm adjoint
:math:`u = (A^\top A)^+ \bar x`) plus the motion of :math:`A`'s null space,
which the minimum-norm solution :math:`x = A^\top y` is kept orthogonal to
(inside the first term, :math:`x` is that row-space part :math:`A^\top y`).  The
second term vanishes for a matrix of full column rank, and costs one more
solve, for :math:`y`, in the forward pass: it is taken only where the operator
carries derivatives and :math:`A` is known to have a null space:

* more unknowns than equations (``n > m``, an under-determined system): always;
* ``Direct("lstsq")``: also where its SVD finds the materialized matrix
  rank-deficient (rank below ``n``), and inside :func:`torch.func.vmap`, where the
  rank cannot be read;
* :class:`NormalCG` with a square or over-determined :math:`A` (``n <= m``): never.
  A rank-deficient such :math:`A` gets the first term alone, which leaves the
  null space's motion out (exact for a full column rank; for a rank-deficient
  :math:`A` use ``Direct("lstsq")``, or an under-determined formulation).

Complex dtypes: every transpose above is the adjoint :math:`A^H`, which
:func:`torch.func.vjp` of a complex ``matvec`` already returns (PyTorch's
conjugate Wirtinger convention: :math:`\bar b = A^{-H} \bar x`), so the rule
is unchanged.

Forward mode (:mod:`torch.autograd.forward_ad`) follows the same rule:
:math:`\dot x = A^{-1} \dot r` with :math:`\dot r = \dot b - \dot A x`, one solve
per tangent, and so do :func:`torch.func.grad`, ``jacrev`` and ``vmap``.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.autograd.forward_ad as fwAD

from ...status import ConvergenceWarning, Status

FlatMatvec = Callable[[torch.Tensor], torch.Tensor]


class _ImplicitSolution(torch.autograd.Function):
    """Zeros forward; backward: the adjoint solve ``u = A^{-T} g``; forward mode:
    the tangent ``A^{-1} r_dot`` of the solution (``r``'s tangent carries those
    of ``b`` and of the operator).  Written with ``setup_context`` and a generated
    vmap rule, so that it also runs under ``torch.func`` (``grad``, ``jacrev``,
    ``vmap``): the solvers take their transform-safe paths there."""

    generate_vmap_rule = True

    @staticmethod
    def forward(residual: torch.Tensor, solves: "_Solves") -> torch.Tensor:
        return torch.zeros_like(residual)

    @staticmethod
    def setup_context(ctx, inputs, output):
        residual, solves = inputs
        ctx.solves = solves
        ctx.save_for_backward(residual)
        ctx.save_for_forward(residual)

    @staticmethod
    def backward(ctx, x_bar: torch.Tensor):
        u = ctx.solves.adjoint(x_bar)
        if torch.is_grad_enabled():  # create_graph=True: a later derivative must not pass silently
            (residual,) = ctx.saved_tensors
            u = _FirstOrderOnly.apply(u, residual, x_bar)
        return u, None

    @staticmethod
    def jvp(ctx, residual_dot: torch.Tensor, _):
        x_dot = ctx.solves.tangent(residual_dot)
        (residual,) = ctx.saved_tensors  # a reverse pass over the tangent must not pass silently
        return _FirstOrderOnly.apply(x_dot, residual, residual_dot)


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on ``u`` whose derivative is an error; tied to the residual (hence
    to ``b`` and the operator's tensors) and to the cotangent, so that every
    later derivative that depends on ``u`` reaches it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(u: torch.Tensor, residual: torch.Tensor, x_bar: torch.Tensor) -> torch.Tensor:
        return u.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError(_SECOND_ORDER)

    @staticmethod
    def jvp(ctx, *_):
        raise RuntimeError(_SECOND_ORDER)


_SECOND_ORDER = (
    "a second derivative through a linear solve called directly is not supported: its "
    "derivative treats the solution x as a constant inside A(theta) x. Write the system as a "
    "root, bilevel.implicit.custom_root(lambda x, theta: A(theta) x - b(theta)), whose "
    "derivatives of every order are exact."
)


def _primal(t: torch.Tensor) -> torch.Tensor:
    """``t`` without its forward-mode tangent (if any)."""
    return fwAD.unpack_dual(t).primal


def _has_tangent(t: torch.Tensor) -> bool:
    return fwAD.unpack_dual(t).tangent is not None


def attach_gradient(solver, matvec: FlatMatvec, b: torch.Tensor, x: torch.Tensor, flatten: Callable, transpose,
                    extras=()):
    """``(x, residual)``: ``x`` carrying the implicit derivatives (reverse and
    forward mode) where ``b`` or the operator requires grad or carries a tangent
    (``x`` unchanged otherwise), and ``b - A x`` detached.

    Called with derivatives recorded.  ``transpose(matvec, b)`` returns
    ``(A^T, adjoint-test mask)`` for a non-symmetric operator.  ``extras``: what the
    solve returned after ``(x, iterations, status)``; a least-squares solver's second
    (after a residual estimate) tells whether ``A`` is known to have a null space (a
    bool, or a per-element bool tensor; absent or ``None``: unknown, i.e. only where
    ``A`` has more unknowns than equations), which decides whether its motion is
    differentiated.
    """
    x = _primal(x)  # the iterations' own tangents (step sizes held fixed) are not the solution's
    product = matvec(x)
    plain = b - product
    if not (plain.requires_grad or _has_tangent(plain)):
        return x, plain
    kind, inner_solver = solver._gradient_rule()
    # a rectangular operator (least squares): x gives A^T's output space
    domain = None if x.shape[-1] == b.shape[-1] else x.detach()
    solves = _Solves(solver, inner_solver, kind, matvec, _primal(b.detach()), flatten, transpose, domain)
    if kind != "normal":
        return x + _ImplicitSolution.apply(plain, solves), plain.detach()
    null_space = extras[1] if len(extras) > 1 else None
    if (product.requires_grad or _has_tangent(product)) and _has_null_space(x, b, null_space):
        # The operator moves, and so does its null space: differentiate A^+ b, through its
        # row-space part x_min = A^T y (y = (A A^T)^+ A x; x_min = x but for a warm start's
        # null-space part), which the minimum-norm solution is kept to.
        y, x_min = solves.coefficients(x.detach())
        product_min, rmatvec = torch.func.vjp(matvec, _primal(x_min))  # recorded: A(theta), A(theta)^T
        residual = rmatvec(b - product_min)[0]
        motion = rmatvec(_primal(y))[0]  # A(theta)^T y, y fixed
        return x + _LeastSquaresSolution.apply(residual, motion, solves), plain.detach()
    _, rmatvec = torch.func.vjp(matvec, x)  # recorded: A^T's dependence on theta
    return x + _ImplicitSolution.apply(rmatvec(plain)[0], solves), plain.detach()


def _has_null_space(x: torch.Tensor, b: torch.Tensor, known) -> bool:
    """Whether the null-space term of a least-squares derivative is taken: always for
    more unknowns than equations (a null space exists); else where the solver found
    ``A`` rank-deficient (``known``), or could not tell (values unreadable under vmap)."""
    if x.shape[-1] > b.shape[-1]:
        return True
    if known is None or isinstance(known, bool):
        return bool(known)
    try:
        return bool(known.any())
    except RuntimeError:  # under vmap the values cannot be read: the exact derivative
        return True


class _LeastSquaresSolution(torch.autograd.Function):
    """:class:`_ImplicitSolution` of a least-squares solve whose operator carries
    derivatives: a second input, ``A(theta)^T y`` (``y`` fixed), whose derivative
    reaches ``x`` projected on the null space of ``A``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(residual: torch.Tensor, motion: torch.Tensor, solves: "_Solves") -> torch.Tensor:
        return torch.zeros_like(residual)

    @staticmethod
    def setup_context(ctx, inputs, output):
        residual, _, solves = inputs
        ctx.solves = solves
        ctx.save_for_backward(residual)
        ctx.save_for_forward(residual)

    @staticmethod
    def backward(ctx, x_bar: torch.Tensor):
        u, w = ctx.solves.adjoint(x_bar, null_space=True)
        if torch.is_grad_enabled():  # create_graph=True: a later derivative must not pass silently
            (residual,) = ctx.saved_tensors
            u, w = _FirstOrderOnly.apply(u, residual, x_bar), _FirstOrderOnly.apply(w, residual, x_bar)
        return u, w, None

    @staticmethod
    def jvp(ctx, residual_dot, motion_dot, _):
        x_dot = ctx.solves.tangent(residual_dot)
        if motion_dot is not None:
            x_dot = x_dot + ctx.solves.null_projection(motion_dot)
        (residual,) = ctx.saved_tensors
        return _FirstOrderOnly.apply(x_dot, residual, residual_dot)


class _Solves:
    r"""The solves behind the derivatives of one linear solve ``A x = b``.

    ``adjoint``: :math:`A^{-\top} \bar x` (the operator itself where the solver
    assumes symmetry); for a least-squares solver, :math:`u = (A^\top A)^+ \bar x`,
    the minimum-norm solution, in two consistent stages
    :math:`(A A^\top) z = A \bar x`, then :math:`(A^\top A) u = A^\top z`
    (:math:`z = (A^\top)^+ \bar x`, :math:`u = A^+ z`): a rank-deficient
    :math:`A` leaves :math:`A^\top A u = \bar x` without a solution.
    With ``null_space=True``, also :math:`(I - A^+ A) \bar x = \bar x - A^\top z`, free
    from the first stage.  ``tangent``: :math:`A^{-1} \dot r` (:math:`(A^\top A)^+ \dot r`
    for least squares).  ``coefficients``: :math:`y = (A A^\top)^+ A x`, for which the
    minimum-norm :math:`x = A^\top y`.
    """

    def __init__(self, solver, inner_solver, kind, matvec, b, flatten, transpose, domain=None):
        self.solver, self.inner_solver, self.kind = solver, inner_solver, kind
        self.matvec, self.b, self.flatten, self.transpose = matvec, b, flatten, transpose
        self.domain = domain  # (B, n) like the unknowns where A is rectangular, else None

    def _transposed(self) -> FlatMatvec:
        if self.domain is None:
            return self.transpose(self.matvec, self.b)[0]
        return self.transpose(self.matvec, self.b, self.domain)[0]

    def _solve(self, solver, operator, rhs, what: str) -> torch.Tensor:
        u, _, status, *_ = solver._solve(operator, rhs, None, self.flatten)
        _warn_if_failed(self.solver, solver, status, rhs - operator(u), rhs, what)
        return u

    def _range_solve(self, At: FlatMatvec, v: torch.Tensor, what: str) -> torch.Tensor:
        """The minimum-norm solution ``z`` of the consistent ``(A A^T) z = A v``."""
        A = self.matvec
        # (A A^T) lives in b's space: a preconditioner of the unknowns' (A^T A) does not
        # apply there when A is rectangular
        solver = self.inner_solver if self.domain is None else _unpreconditioned(self.inner_solver)
        return self._solve(solver, lambda t: A(At(t)), A(v), what)

    def adjoint(self, x_bar: torch.Tensor, null_space: bool = False):
        with torch.no_grad():
            if self.kind == "self":
                return self._solve(self.inner_solver, self.matvec, x_bar, "A^T u = grad x")
            transposed = self._transposed()
            if self.kind == "transpose":
                return self._solve(self.inner_solver, transposed, x_bar, "A^T u = grad x")
            A, At = self.matvec, transposed
            z = self._range_solve(At, x_bar, "(A A^T) z = A g")
            Atz = At(z)  # A^+ A g: g's part in the row space of A
            u = self._solve(self.inner_solver, lambda v: At(A(v)), Atz, "(A^T A) u = A^T z")
            return (u, x_bar - Atz) if null_space else u

    def null_projection(self, v: torch.Tensor) -> torch.Tensor:
        """``(I - A^+ A) v``: ``v``'s part in the null space of ``A``."""
        with torch.no_grad():
            v = _primal(v)
            At = self._transposed()
            return v - At(self._range_solve(At, v, "(A A^T) z = A v"))

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, A^T y)`` with ``y = (A A^T)^+ A x``: ``A^T y = A^+ A x`` is ``x``'s part in
        the row space of ``A`` (``x`` itself for the minimum-norm solution)."""
        with torch.no_grad():
            At = self._transposed()
            y = self._range_solve(At, _primal(x), "(A A^T) y = A x")
            return y, At(y)

    def tangent(self, residual_dot: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            residual_dot = _primal(residual_dot)
            if self.kind != "normal":
                return self._solve(self.solver, self.matvec, residual_dot, "A x_dot = r_dot")
        return self.adjoint(residual_dot)  # (A^T A)^+ r_dot: A^T A is its own transpose


def _unpreconditioned(solver):
    """``solver`` without its preconditioner ``M`` (if it has one)."""
    if getattr(solver, "M", None) is None:
        return solver
    import dataclasses

    return dataclasses.replace(solver, M=None)


def _warn_if_failed(solver, used, status, gap, rhs, what: str) -> None:
    from ._base import _final_status  # the base module imports this one

    gap, scale = torch.linalg.vector_norm(gap, dim=-1), torch.linalg.vector_norm(rhs, dim=-1)
    status = _final_status(used, status, gap, scale)
    failed = status != Status.SUCCESS
    try:
        if not bool(failed.any()):
            return
    except RuntimeError:  # under vmap the values cannot be read
        return
    relative = gap / scale.clamp_min(torch.finfo(gap.dtype).tiny)
    worst = int(torch.argmax(torch.where(failed, relative, -1)))
    warnings.warn(ConvergenceWarning(
        f"{type(solver).__name__}: the solve {what} for the derivative of the solution did not "
        f"converge for {int(failed.sum())} of {failed.numel()} systems (worst: batch element {worst}, "
        f"{Status(int(status[worst])).name}, relative residual {float(relative[worst]):.2e}); the "
        "derivative is inexact. A budget or tolerance that suits the forward solve may not suit this "
        "one (raise maxiter), or the operator is singular there."
    ), stacklevel=4)


__all__ = ["attach_gradient"]
