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

Least-squares solvers (:class:`NormalCG`, ``Direct("lstsq")``) are differentiated
through their normal equations :math:`A^\top (b - A x) = 0`: the adjoint system
is :math:`A^\top A\, u = \bar x`, exact for a matrix of full column rank (for a
rank-deficient one, the gradient keeps :math:`x` in the row space: the
derivative of the pseudo-inverse solution has further terms).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from ...status import ConvergenceWarning, Status

FlatMatvec = Callable[[torch.Tensor], torch.Tensor]


class _ImplicitSolution(torch.autograd.Function):
    """Zeros forward; backward: the adjoint solve ``u = A^{-T} g``."""

    @staticmethod
    def forward(ctx, residual: torch.Tensor, solve_adjoint: Callable) -> torch.Tensor:
        ctx.solve_adjoint = solve_adjoint
        ctx.save_for_backward(residual)
        return torch.zeros_like(residual)

    @staticmethod
    def backward(ctx, x_bar: torch.Tensor):
        u = ctx.solve_adjoint(x_bar)
        if torch.is_grad_enabled():  # create_graph=True: a later derivative must not pass silently
            (residual,) = ctx.saved_tensors
            u = _FirstOrderOnly.apply(u, residual, x_bar)
        return u, None


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on ``u`` whose derivative is an error; tied to the residual (hence
    to ``b`` and the operator's tensors) and to the cotangent, so that every
    later derivative that depends on ``u`` reaches it."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, residual: torch.Tensor, x_bar: torch.Tensor) -> torch.Tensor:
        return u.clone()

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError(
            "a second derivative through a linear solve called directly is not supported: its "
            "gradient treats the solution x as a constant inside A(theta) x. Write the system as a "
            "root, bilevel.implicit.custom_root(lambda x, theta: A(theta) x - b(theta)), whose "
            "derivatives of every order are exact."
        )


def attach_gradient(solver, matvec: FlatMatvec, b: torch.Tensor, x: torch.Tensor, flatten: Callable, transpose):
    """``(x, residual)``: ``x`` carrying the implicit gradient where ``b`` or the
    operator requires grad (``x`` unchanged otherwise), and ``b - A x`` detached.

    Called with gradient recording on.  ``transpose(matvec, b)`` returns
    ``(A^T, adjoint-test mask)`` for a non-symmetric operator.
    """
    plain = b - matvec(x)
    if not plain.requires_grad:
        return x, plain
    kind, adjoint_solver = solver._gradient_rule()
    residual = plain
    if kind == "normal":
        _, rmatvec = torch.func.vjp(matvec, x)  # recorded: A^T's dependence on theta
        residual = rmatvec(plain)[0]

    def solve_adjoint(x_bar: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            adjoint = matvec
            if kind != "self":
                transposed, _ = transpose(matvec, b.detach())
                adjoint = transposed if kind == "transpose" else (lambda v: transposed(matvec(v)))
            u, _, status, *_ = adjoint_solver._solve(adjoint, x_bar, None, flatten)
            _warn_if_failed(solver, adjoint_solver, status, x_bar - adjoint(u), x_bar)
        return u

    return x + _ImplicitSolution.apply(residual, solve_adjoint), plain.detach()


def _warn_if_failed(solver, adjoint_solver, status, gap, x_bar) -> None:
    from ._base import _final_status  # the base module imports this one

    gap, scale = torch.linalg.vector_norm(gap, dim=-1), torch.linalg.vector_norm(x_bar, dim=-1)
    status = _final_status(adjoint_solver, status, gap, scale)
    failed = status != Status.SUCCESS
    if not bool(failed.any()):
        return
    relative = gap / scale.clamp_min(torch.finfo(gap.dtype).tiny)
    worst = int(torch.argmax(torch.where(failed, relative, -1)))
    warnings.warn(ConvergenceWarning(
        f"{type(solver).__name__}: the adjoint solve of the backward pass (A^T u = grad x) did not "
        f"converge for {int(failed.sum())} of {failed.numel()} systems (worst: batch element {worst}, "
        f"{Status(int(status[worst])).name}, relative residual {float(relative[worst]):.2e}); the "
        "gradient is inexact. Raise maxiter or use a solver suited to A^T."
    ), stacklevel=3)


__all__ = ["attach_gradient"]
