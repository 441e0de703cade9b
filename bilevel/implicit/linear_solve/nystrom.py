"""Randomized Nyström approximation: an approximate inverse from a few batched products,
alone or as the preconditioner of CG."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..._checks import check_fields as _check_fields
from ..._checks import nonneg_float as _nonneg_float
from ..._checks import positive_int as _positive_int
from ..._tree import seeded_normal_like
from ...status import Status
from ._base import _KRYLOV_RULES, KrylovSolver, _mark, _scaled_norm, resolve_maxiter
from .cg import _cg


def _non_negative_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class Nystrom(KrylovSolver):
    r"""Randomized Nyström approximation of a symmetric positive semi-definite ``A``.

    From :math:`k` = ``rank`` products with an orthonormal Gaussian sketch
    :math:`\Omega \in \mathbb{R}^{n \times k}` (one :func:`torch.func.vmap` of ``matvec``
    over its columns), the Nyström approximation

    .. math::

        \hat A = (A\Omega)\,(\Omega^\top A \Omega)^{+}\,(A\Omega)^\top = U \Lambda U^\top

    is formed in the numerically stable way of Tropp et al. (a shift
    :math:`\nu = \sqrt{n}\,\varepsilon\,\|A\Omega\|_F` before the Cholesky factor of
    :math:`\Omega^\top A \Omega`, removed from the eigenvalues after).  It captures the
    leading eigenpairs of :math:`A`; the directions the sketch missed are given
    one eigenvalue :math:`\rho`, which gives the approximate inverse

    .. math::

        P = U\,\max(\Lambda, \rho)^{-1} U^\top + \rho^{-1}\,(I - U U^\top),
        \qquad \rho = \min\{\lambda_i(\hat A) : \lambda_i > \sqrt{\varepsilon}\,\lambda_1\}
        \text{ by default},

    exact when ``rank`` reaches :math:`n`, and for a singular :math:`A` of rank at
    most ``rank`` and :math:`b` in its range (then :math:`x = A^+ b`).  With ``maxiter = 0`` (default) the solve returns
    :math:`x = P b`: the Nyström approximation of :math:`A^{-1} b` used for
    hypergradients by Hataya and Yamada, accurate where the spectrum decays
    fast, for :math:`k` products; ``x`` is linear in ``b`` (so the derivatives of
    the solve are consistent), and where the spectrum decays slowly the Nyström
    eigenvalues, which underestimate :math:`A`'s, make :math:`Pb` overshoot (a
    residual larger than :math:`\|b\|`, reported in ``info``).  (Hataya and Yamada build the approximation from
    sampled columns and invert :math:`\hat A + \rho I` by the Woodbury identity;
    here a Gaussian sketch is used, and the captured eigenvalues are kept as they
    are, floored at :math:`\rho`.)  With
    ``maxiter > 0``, CG preconditioned by :math:`P` goes on from there to ``tol``
    (Nyström PCG of Frangella et al.): the :math:`k` captured eigenvalues no
    longer slow CG down, which pays where a few large eigenvalues dominate a
    Hessian.

    The ``rank`` products run as one batched call, so on an accelerator the
    sketch costs about as much as a few single products.  Each batch element
    gets its own sketch and factorization (from one seeded draw: the same
    ``seed`` gives the same answer on every device and run), and, as in the
    Krylov solvers, works on :math:`b / s` with :math:`s` a power of two near
    :math:`\max |b|`, so tiny and huge right-hand sides are solved alike.
    Captured eigenvalues below :math:`\varepsilon^{2/3} \lambda_1` count as
    numerically zero (they get :math:`\rho` too): the approximation is exact up to
    condition numbers of about :math:`\varepsilon^{-2/3}` (:math:`3 \cdot 10^{10}` in
    float64, :math:`4 \cdot 10^{4}` in float32).

    ``maxiter = 0`` has no tolerance, like :class:`Neumann`'s fixed number of
    terms: the approximation is a success unless the sketch fails, and
    ``info.residual_norm`` says how close it came (``x0`` is not used).  It is
    accurate where the spectrum decays fast beyond the rank; on a flat or slowly
    decaying one, prefer ``maxiter > 0``.  ``A``
    must be symmetric positive semi-definite: an element whose sketched matrix
    :math:`\Omega^\top A \Omega` has no Cholesky factor (an indefinite :math:`A` whose
    negative curvature the sketch caught, or :math:`A = 0`) is reported as
    :attr:`~bilevel.status.Status.BREAKDOWN` with :math:`x = 0` (with ``maxiter > 0``,
    plain CG runs for it instead, and reports what it finds), one whose products
    are not finite as NONFINITE.

    Args:
        maxiter: preconditioned CG iterations after the sketch; default 0 (the
            approximation alone); ``None``: ``10 n`` capped at 1000.
        tol: relative residual tolerance of the CG iterations; ``None`` scales
            with the dtype.
        rank: sketch size :math:`k` (products spent on the approximation), at most
            :math:`n` is used; default 20.
        rho: eigenvalue given to the directions outside the sketch; ``None``: the
            smallest captured eigenvalue that is not numerically zero.
        seed: seed of the Gaussian sketch (drawn in float64 on the CPU).
        atol: absolute residual tolerance of the CG iterations (keyword), default 0.

    Raises:
        RuntimeError: ``matvec`` cannot be batched by :func:`torch.func.vmap`.

    Example:
        >>> import torch
        >>> from bilevel.implicit.linear_solve import Nystrom
        >>> Q, _ = torch.linalg.qr(torch.randn(50, 50, dtype=torch.float64,
        ...                                    generator=torch.Generator().manual_seed(0)))
        >>> A = Q @ torch.diag(torch.logspace(4, 0, 50, dtype=torch.float64)) @ Q.T
        >>> b = torch.ones(50, dtype=torch.float64)
        >>> x, info = Nystrom(rank=20, maxiter=100)(lambda v: A @ v, b)   # PCG
        >>> bool(info.converged), int(info.iterations)          # sketch included; CG alone: 145
        (True, 86)

    References:
        Tropp, J. A., Yurtsever, A., Udell, M. and Cevher, V. `Fixed-rank approximation
        of a positive-semidefinite matrix from streaming data
        <https://arxiv.org/abs/1706.05736>`_. NeurIPS 2017.
        Frangella, Z., Tropp, J. A. and Udell, M. `Randomized Nyström preconditioning
        <https://arxiv.org/abs/2110.02820>`_. SIAM J. Matrix Anal. Appl., 2023.
        Hataya, R. and Yamada, M. `Nyström method for accurate and scalable implicit
        differentiation <https://arxiv.org/abs/2302.09726>`_. AISTATS 2023.
    """

    maxiter: Optional[int] = 0
    rank: int = 20
    rho: Optional[float] = None
    seed: int = 0

    def __post_init__(self):
        _check_fields(
            self,
            **{**_KRYLOV_RULES, "maxiter": (lambda v: v is None or _non_negative_int(v), "a non-negative int or None")},
            rank=(_positive_int, "a positive int"),
            rho=(lambda v: v is None or (_nonneg_float(v) and v > 0), "a positive float or None"),
            seed=(_non_negative_int, "a non-negative int"),
        )

    def max_products(self, n: int) -> int:
        return min(self.rank, n) + resolve_maxiter(self.maxiter, n)

    def _gradient_rule(self):
        return "self", self  # the operator is symmetric

    def _residual_tolerances(self, dtype: torch.dtype):
        return None if self.maxiter == 0 else super()._residual_tolerances(dtype)  # no tolerance alone

    def _iterate(self, matvec, b, x0, threshold, maxiter, flatten):
        """On the unit-scaled ``b`` (:meth:`KrylovSolver._solve`)."""
        nbatch, n = b.shape
        k = min(self.rank, n)
        U, eigenvalues, ok, finite = self._approximation(matvec, b, k)
        real = eigenvalues.dtype
        if self.rho is not None:
            rho = torch.full((nbatch, 1), float(self.rho), dtype=real, device=b.device)
        else:  # the smallest captured eigenvalue that is not numerically 0 (a singular A's null
            # directions in the sketch would otherwise amplify rounding by 1 / rho)
            regular = eigenvalues > torch.finfo(real).eps ** (2 / 3) * eigenvalues[:, :1]
            rho = torch.where(regular, eigenvalues, torch.inf).amin(-1, keepdim=True)
            rho = torch.where(torch.isfinite(rho), rho, torch.ones_like(rho))  # no such eigenvalue
        inverse = 1.0 / torch.maximum(eigenvalues, rho)
        usable = (ok & finite).unsqueeze(-1)

        def precondition(r: torch.Tensor) -> torch.Tensor:
            """P r: the head U max(L, rho)^-1 U^T r plus the tail (r - U U^T r) / rho;
            the identity for an element without an approximation."""
            coefficients = (U.mH @ r.unsqueeze(-1)).squeeze(-1)
            head = (U @ (coefficients * inverse).unsqueeze(-1)).squeeze(-1)
            tail = (r - (U @ coefficients.unsqueeze(-1)).squeeze(-1)) / rho
            return torch.where(usable, head + tail, r)

        products = torch.full((nbatch,), k, dtype=torch.int64, device=b.device)
        if maxiter > 0:
            start = precondition(b) if x0 is None else x0
            x, iterations, status, *estimate = _cg(matvec, b, start, threshold, maxiter, precondition)
            status = _mark(status, ~finite & (status == Status.SUCCESS), Status.NONFINITE)
            return (x, iterations + products, status, *estimate)
        x = torch.where(usable, precondition(b), torch.zeros_like(b))
        status = _mark(torch.zeros_like(products), ~ok, Status.BREAKDOWN)
        return x, products, _mark(status, ~finite, Status.NONFINITE)

    def _approximation(self, matvec, b: torch.Tensor, k: int):
        """``(U, eigenvalues, ok, finite)``: the ``(B, n, k)`` eigenvectors and ``(B, k)``
        eigenvalues (descending) of each element's Nyström approximation, whether its
        Cholesky factor exists, and whether its products were finite."""
        nbatch, n = b.shape
        draw = seeded_normal_like([torch.empty((nbatch, n, k), dtype=b.dtype, device=b.device)],
                                  torch.Generator().manual_seed(self.seed))[0]
        omega, _ = torch.linalg.qr(draw)  # (B, n, k), orthonormal columns
        try:  # columns[j] = A omega[:, :, j]: one batched call
            columns = torch.func.vmap(matvec, in_dims=2, out_dims=2)(omega)
        except Exception as err:
            matvec(b)  # a matvec that fails without vmap too: its own error
            raise RuntimeError(
                f"Nystrom: `matvec` could not be batched with torch.func.vmap ({type(err).__name__}: {err}); "
                "the sketch applies it to all of its columns at once. Make `matvec` vmap-compatible (no "
                ".item(), NumPy or data-dependent Python control flow) or use CG."
            ) from err
        finite = torch.isfinite(columns).flatten(1).all(-1)
        columns = torch.where(finite[:, None, None], columns, 0)
        eps = torch.finfo(b.dtype).eps
        shift = (n ** 0.5) * eps * _scaled_norm(columns.flatten(1))  # (B,), ||A Omega||_F without overflow
        shifted = columns + shift[:, None, None] * omega
        small = omega.mH @ shifted
        small = 0.5 * (small + small.mH)
        factor, info = torch.linalg.cholesky_ex(small)
        ok = info == 0
        eye = torch.eye(k, dtype=b.dtype, device=b.device).expand_as(factor)
        factor = torch.where(ok[:, None, None], factor, eye)
        # B = Y_nu C^-H: the approximation is B B^H, so its eigenpairs come from the SVD of B
        scaled = torch.linalg.solve_triangular(factor, shifted.mH, upper=False).mH
        U, singular, _ = torch.linalg.svd(scaled, full_matrices=False)
        eigenvalues = torch.clamp_min(singular ** 2 - shift.real.unsqueeze(-1), 0)
        return U, eigenvalues, ok, finite


__all__ = ["Nystrom"]
