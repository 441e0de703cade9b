"""CG on the normal equations: least-squares and minimum-norm solutions."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..._checks import check_fields as _check_fields
from ...status import Status
from ._base import (
    LinearSolver,
    _final_status,
    _mark,
    _norm,
    transpose_operator,
)
from .cg import CG


@dataclass(frozen=True)
class NormalCG(LinearSolver):
    r"""Least-squares solve of ``A x = b`` through the normal equations.

    Solves

    .. math:: A^\top A\, x = A^\top b

    with the ``inner`` solver (CG by default, i.e. CGNR / CGLS): from
    :math:`x_0 = 0` CG converges to the minimum-norm least-squares solution
    :math:`A^+ b`, so :math:`A` may be non-symmetric, indefinite, singular or
    the system inconsistent.  :math:`A^\top v` is the vector-Jacobian product of
    the (linear) ``matvec``, linearised once per solve with
    :func:`torch.func.vjp`; ``matvec`` must therefore be differentiable by
    ``torch.func``.  The transpose is checked once by an adjoint test
    :math:`\langle A u, w\rangle = \langle u, A^\top w\rangle` on fixed vectors:
    a failure raises, or under :func:`torch.func.vmap` marks the element
    :attr:`~bilevel.status.Status.BREAKDOWN`.  The condition number is squared: prefer :class:`GMRES` for
    non-singular systems.  Complex dtypes are supported: :math:`A^H A x = A^H b`,
    with the VJP giving the adjoint :math:`A^H v` (and the inner solver conjugating).

    Tolerance rule: the *normal* residual is tested, element ``i`` succeeds when
    :math:`\|A_i^\top (b_i - A_i x_i)\| \le \max(\mathrm{tol}\,\|A_i^\top b_i\|,
    \mathrm{atol})` with the ``inner`` solver's ``tol`` and ``atol``.  The status
    comes from that test; ``info.residual_norm`` is still the residual
    :math:`\|b - A x\|` of the original system, which is not small for an
    inconsistent system.  ``info.iterations`` are the inner iterations (each a
    product with :math:`A` and one with :math:`A^\top`).

    Args:
        inner: a solver for the symmetric positive semi-definite normal
            equations (:class:`CG`, :class:`MINRES` or ``Direct("cholesky")``);
            its preconditioner, if any, approximates :math:`(A^\top A)^{-1}`.
            Default ``CG()``.

    Example:
        >>> import torch
        >>> from bilevel.implicit.linear_solve import NormalCG
        >>> A = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)  # singular
        >>> x, info = NormalCG()(lambda v: A @ v, torch.tensor([1.0, 3.0], dtype=torch.float64))
        >>> torch.allclose(x, torch.ones(2, dtype=torch.float64)), bool(info.converged)  # A^+ b
        (True, True)

    References:
        Hestenes, M. R. and Stiefel, E. `Methods of conjugate gradients for solving
        linear systems <https://doi.org/10.6028/jres.049.044>`_ (section 10).
        J. Res. NBS, 1952.

        Björck, Å. `Numerical Methods for Least Squares Problems
        <https://doi.org/10.1137/1.9781611971484>`_. SIAM, 1996.
    """

    inner: LinearSolver = dataclasses.field(default_factory=CG)

    def __post_init__(self):
        _check_fields(
            self,
            inner=(lambda v: isinstance(v, LinearSolver), "a LinearSolver such as CG()"),
        )

    def max_products(self, n: int) -> int:
        return 2 * self.inner.max_products(n)

    def _gradient_rule(self):
        return "normal", self.inner

    def _solve(self, matvec, b, x0, flatten):
        rmatvec, adjoint = transpose_operator(matvec, b)

        def normal(v: torch.Tensor) -> torch.Tensor:
            return rmatvec(matvec(v))

        rhs = rmatvec(b)
        x, iterations, status, *estimate = self.inner._solve(normal, rhs, x0, flatten)
        normal_residual = estimate[0] if estimate and estimate[0] is not None else _norm(rhs - normal(x))
        status = _final_status(self.inner, status, normal_residual, _norm(rhs))
        return x, iterations, _mark(status, ~adjoint, Status.BREAKDOWN)


__all__ = ['NormalCG']
