r"""Linear solvers for the systems of the implicit function theorem.

Each solver is a small frozen dataclass of settings, checked at construction,
and callable as ``solver(matvec, b, x0=None, *, batch_dims=0) -> (x, info)``:

* ``matvec`` maps a tensor tree shaped like ``b`` to another one (``v -> A v``);
  for the least-squares solvers (:class:`NormalCG`, ``Direct("lstsq")``) ``A``
  may be rectangular: ``x0`` then gives the unknown's structure and shapes, and
  ``matvec`` maps a tree shaped like ``x0`` to one shaped like ``b`` (the other
  solvers refuse an ``x0`` not shaped like ``b``);
* ``b`` is a tensor or a tree of tensors; its first ``batch_dims`` dimensions
  (shared by every leaf) index *independent* systems ``A_i x_i = b_i``, solved
  together: dot products, step sizes and stopping are per batch element, and
  ``matvec`` is applied to the whole batch at once;
* ``info`` is a :class:`LinearSolveInfo` with one entry per batch element.

Tolerance rule (Krylov solvers): element ``i`` has converged when
``||b_i - A_i x_i|| <= max(tol * ||b_i||, atol)``; ``tol=None`` means
``sqrt(eps)`` of the dtype (:func:`bilevel._tolerance.default_tol`).  The
residual reported in ``info`` is the true residual ``b - A x`` recomputed at
the end, not the recursively updated one.

Gradients: called where autograd records (``b``, or a tensor that ``matvec``
captures, requires grad), a solve returns an ``x`` differentiable by the
implicit function theorem, :math:`dx = A^{-1}(db - dA\,x)`, whatever the solver:
the backward pass solves :math:`A^\top u = \bar x` with the same solver (the
operator itself for the solvers that assume symmetry: CG, MINRES,
``Direct("cholesky")``, ``Auto(symmetric=True)``; its transpose, by
:func:`torch.func.vjp`, for the others; the normal equations for the
least-squares solvers).  The iterations are not recorded, so the memory does
not grow with them; a backward solve that misses its tolerance warns with
its residual.  First order: a second derivative through such a solve raises
(write the system as a root with :func:`bilevel.implicit.custom_root` for
derivatives of every order).

Complex dtypes (``complex64``, ``complex128``): every solver accepts them, with
the inner products :math:`u^H v` and residual norms, ``info`` included, real.
"Symmetric" then reads "Hermitian" (CG, MINRES, ``Direct("cholesky")``,
``Auto(symmetric=True)``) and every transpose :math:`A^\top` reads as the adjoint
:math:`A^H` (the VJP of a complex ``matvec``, and a ``.transpose`` attribute);
gradients follow PyTorch's conjugate Wirtinger convention (the backward pass
solves :math:`A^H u = \bar x`).  A ``b`` mixing real and complex leaves is
refused (``TypeError``).
"""

from ._base import (
    KrylovSolver,
    LinearSolveInfo,
    LinearSolver,
    materialize,
    resolve_maxiter,
)
from .auto import Auto
from .bicgstab import BiCGStab
from .cg import CG
from .direct import Direct
from .gmres import GMRES
from .minres import MINRES
from .neumann import Neumann
from .normal_cg import NormalCG
from .nystrom import Nystrom

__all__ = [
    "LinearSolveInfo",
    "LinearSolver",
    "KrylovSolver",
    "resolve_maxiter",
    "materialize",
    "Auto",
    "CG",
    "Neumann",
    "GMRES",
    "BiCGStab",
    "MINRES",
    "NormalCG",
    "Nystrom",
    "Direct",
]
