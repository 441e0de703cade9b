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

    Rectangular systems: :math:`A` may map ``n`` unknowns to ``m`` equations,
    ``m != n`` (or trees of other structures).  Pass ``x0`` shaped like the
    unknown, e.g. ``solver(matvec, b, x0=torch.zeros(n))``: its structure, shapes
    and dtypes are the solution's, and ``matvec`` maps a tree shaped like ``x0`` to
    one shaped like ``b`` (with ``batch_dims``, both share the leading batch shape;
    a ``.transpose`` attribute maps back).  From ``x0 = 0`` the result is
    :math:`A^+ b`: the minimum-norm solution of an under-determined system
    (``m < n``), the least-squares solution of an over-determined one (``m > n``);
    from another ``x0``, :math:`A^+ b` plus ``x0``'s part in the null space of
    :math:`A`.  Without ``x0`` the unknown is taken to be shaped like ``b``.

    Derivatives with respect to ``b`` and to the tensors ``matvec`` captures are
    those of :math:`A^+ b` (a warm start's null-space part is not differentiated).
    With respect to the operator: for an under-determined :math:`A` (more
    unknowns than equations) they include the motion of :math:`A`'s null space
    (Golub and Pereyra's term; one more solve, in the forward pass, where the
    operator carries derivatives); for a square or over-determined :math:`A` they
    are those of the normal equations alone, exact for :math:`A` of full column
    rank, but without the null space's motion for a rank-deficient one (use
    ``Direct("lstsq")``, which detects the rank deficiency, where that derivative
    matters).

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

        A rectangular (2 x 3) system: ``x0`` gives the unknown's shape, and the
        minimum-norm solution is returned:

        >>> A = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
        >>> b = torch.tensor([2.0, 2.0], dtype=torch.float64)
        >>> x, info = NormalCG()(lambda v: A @ v, b, x0=torch.zeros(3, dtype=torch.float64))
        >>> torch.allclose(x, torch.linalg.pinv(A) @ b), bool(info.converged)
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

    def _accepts_rectangular(self) -> bool:
        return True

    def _solve(self, matvec, b, x0, flatten):
        # a rectangular A (x0 of n unknowns, b of m): x0 gives A^T's output space
        domain = x0 if x0 is not None and x0.shape[-1] != b.shape[-1] else None
        rmatvec, adjoint = transpose_operator(matvec, b, domain)

        def normal(v: torch.Tensor) -> torch.Tensor:
            return rmatvec(matvec(v))

        rhs = rmatvec(b)
        x, iterations, status, *estimate = self.inner._solve(normal, rhs, x0, flatten)
        normal_residual = estimate[0] if estimate and estimate[0] is not None else _norm(rhs - normal(x))
        status = _final_status(self.inner, status, normal_residual, _norm(rhs))
        return x, iterations, _mark(status, ~adjoint, Status.BREAKDOWN)


__all__ = ['NormalCG']
