"""Randomized Nyström approximation: an approximate inverse from a few batched products,
alone or as the preconditioner of CG."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..._checks import check_fields as _check_fields
from ..._tree import seeded_normal_like
from ...status import Status
from ._base import LinearSolver, _mark, _norm, _on_host, _positive_int_or_none, _tol_ok
from .cg import _cg


def _non_negative_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class Nystrom(LinearSolver):
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
    fast, for :math:`k + 1` products (the last one measures the residual).  With
    ``maxiter > 0``, CG preconditioned by :math:`P` goes on from there to ``tol``
    (Nyström PCG of Frangella et al.): the :math:`k` captured eigenvalues no
    longer slow CG down, which pays where a few large eigenvalues dominate a
    Hessian.

    The ``rank`` products run as one batched call, so on an accelerator the
    sketch costs about as much as a few single products.  Each batch element
    gets its own sketch and factorization (from one seeded draw: the same
    ``seed`` gives the same answer on every device and run).  ``A`` must be
    symmetric positive semi-definite: an element whose sketched matrix
    :math:`\Omega^\top A \Omega` has no Cholesky factor (indefinite :math:`A`) is reported
    as :attr:`~bilevel.status.Status.BREAKDOWN` with :math:`x = 0` (with
    ``maxiter > 0``, plain CG runs for it instead), one whose products are not
    finite as NONFINITE.  Without ``maxiter``, a residual above ``tol`` is
    reported as MAX_ITERATIONS (an approximation, not a failure of the sketch):
    raise ``rank`` or set ``maxiter``.

    Args:
        rank: sketch size :math:`k` (products spent on the approximation), at most
            :math:`n` is used; default 20.
        maxiter: preconditioned CG iterations after the approximation; default 0
            (the approximation alone); ``None``: ``10 n`` capped at 1000.
        tol: relative residual tolerance; ``None`` scales with the dtype.
        atol: absolute residual tolerance, default 0.
        rho: eigenvalue given to the directions outside the sketch; ``None``: the
            smallest captured eigenvalue above ``sqrt(eps)`` times the largest.
        seed: seed of the Gaussian sketch (drawn in float64 on the CPU).

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

    rank: int = 20
    maxiter: Optional[int] = 0
    tol: Optional[float] = None
    atol: float = 0.0
    rho: Optional[float] = None
    seed: int = 0

    def __post_init__(self):
        _check_fields(
            self,
            rank=(lambda v: _positive_int_or_none(v) and v is not None, "a positive int"),
            maxiter=(lambda v: v is None or _non_negative_int(v), "a non-negative int or None"),
            tol=(_tol_ok, "a float in (0, 1) or None"),
            atol=(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < float("inf"),
                  "a non-negative float"),
            rho=(lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                         and 0 < v < float("inf")), "a positive float or None"),
            seed=(_non_negative_int, "a non-negative int"),
        )

    def max_products(self, n: int) -> int:
        refine = min(10 * n, 1000) if self.maxiter is None else self.maxiter
        return min(self.rank, n) + refine

    def _gradient_rule(self):
        return "self", self  # the operator is symmetric

    def _solve(self, matvec, b, x0, flatten):
        nbatch, n = b.shape
        k = min(self.rank, n)
        U, eigenvalues, ok, finite = self._approximation(matvec, b, k)
        real = eigenvalues.dtype
        if self.rho is not None:
            rho = torch.full((nbatch, 1), float(self.rho), dtype=real, device=b.device)
        else:
            # the smallest captured eigenvalue that is not numerically 0 (a singular A's null
            # directions in the sketch would otherwise amplify rounding by 1 / rho)
            regular = eigenvalues > (torch.finfo(real).eps ** 0.5) * eigenvalues[:, :1]
            rho = torch.where(regular, eigenvalues, torch.inf).amin(-1, keepdim=True)
            rho = torch.where(torch.isfinite(rho), rho, torch.ones_like(rho))  # A = 0 on the sketch: no scale
        inverse = 1.0 / torch.maximum(eigenvalues, rho)
        usable = (ok & finite).unsqueeze(-1)

        def precondition(r: torch.Tensor) -> torch.Tensor:
            """P r: the head U max(L, rho)^-1 U^T r plus the tail (r - U U^T r) / rho;
            the identity for an element without an approximation."""
            coefficients = (U.mH @ r.unsqueeze(-1)).squeeze(-1)
            head = (U @ (coefficients * inverse).unsqueeze(-1)).squeeze(-1)
            tail = (r - (U @ coefficients.unsqueeze(-1)).squeeze(-1)) / rho
            return torch.where(usable, head + tail, r)

        threshold = self._threshold(b)
        products = torch.full((nbatch,), k, dtype=torch.int64, device=b.device)
        if self.maxiter != 0:
            start = precondition(b) if x0 is None else x0
            maxiter = min(10 * n, 1000) if self.maxiter is None else self.maxiter
            x, iterations, status, *estimate = _cg(matvec, b, start, threshold, maxiter, precondition)
            status = _mark(status, ~finite & (status == Status.SUCCESS), Status.NONFINITE)
            return (x, iterations + products, status, *estimate)
        x = torch.where(usable, precondition(b), torch.zeros_like(b))
        residual = _norm(b - matvec(x))
        status = torch.where(residual <= threshold, int(Status.SUCCESS), int(Status.MAX_ITERATIONS))
        status = _mark(status, ~ok, Status.BREAKDOWN)
        status = _mark(status, ~finite, Status.NONFINITE)
        if _on_host(status) and not bool((status == Status.SUCCESS).any()):
            return x, products + 1, status, residual  # no success claimed: the residual just measured
        return x, products + 1, status

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
        shift = (n ** 0.5) * eps * torch.linalg.matrix_norm(columns)  # (B,), ||A Omega||_F
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
