"""Truncated Neumann series for the inverse of an operator close to the identity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..._checks import check_fields as _check_fields
from ..._checks import nonneg_float as _nonneg_float
from ..._checks import positive_int as _positive_int
from ...status import Status
from ._base import (
    FlatMatvec,
    LinearSolver,
    _mark,
    _norm,
    _probe,
    _real_dtype,
    _unit_scale,
)


@dataclass(frozen=True)
class Neumann(LinearSolver):
    r"""Truncated Neumann series for ``A x = b``.

    Approximates :math:`A^{-1} b` by

    .. math:: x = \alpha \sum_{k=0}^{K-1} (I - \alpha A)^k b
              = A^{-1} \bigl(I - (I - \alpha A)^K\bigr) b,

    with :math:`K` = ``terms`` and :math:`\alpha` = ``alpha``; computed as
    :math:`p \leftarrow b,\ s \leftarrow b`, then ``terms - 1`` times
    :math:`p \leftarrow p - \alpha A p,\ s \leftarrow s + p`, and :math:`x = \alpha s`.

    The series converges when the spectral radius of :math:`I - \alpha A` is
    below 1: for symmetric :math:`A` with eigenvalues in :math:`(0, L]`, when
    :math:`0 < \alpha < 2 / L`; the error factor is
    :math:`\max_\lambda |1 - \alpha\lambda|^K`.  ``alpha=None`` estimates
    :math:`L` (the largest eigenvalue magnitude) per batch element by 20 steps
    of power iteration from a fixed start vector (the same for every element) and uses
    :math:`\alpha = 1 / L` (20 extra products).

    There is no tolerance: an element is a success unless its iterates become
    non-finite (:attr:`~bilevel.status.Status.NONFINITE`), the term
    :math:`\|p\|` grows above :math:`10^3 \|b\|`
    (:attr:`~bilevel.status.Status.DIVERGED`, ``alpha >= 2 / L`` or an
    indefinite operator; such an element stops at its last finite partial sum),
    or the series made no progress, the last term's norm within
    :math:`10^{-6} \|b\|` of :math:`\|b\|` (:attr:`~bilevel.status.Status.MAX_ITERATIONS`:
    :math:`\alpha \|A\|` is tiny, e.g. ``alpha=1`` on an objective of scale
    :math:`10^{-8}`, and :math:`x \approx \alpha K b` is no approximation of
    :math:`A^{-1} b`; ``alpha=None`` adapts :math:`\alpha` to the operator).
    Complex dtypes are supported (:math:`\alpha` stays real; the series needs the
    spectrum of :math:`\alpha A` in the disc :math:`|1 - z| < 1`).
    ``x0`` is ignored (the series starts from 0).  ``info.iterations`` counts
    the products of the series, ``terms - 1`` for an element that ran them all.

    Args:
        terms: number of terms :math:`K` of the series, a positive int.  Default 20.
        alpha: step :math:`\alpha > 0`, or ``None`` for :math:`1 / L` estimated by
            power iteration.  Default 1.0.

    Example:
        >>> import torch
        >>> from bilevel.implicit.linear_solve import Neumann
        >>> A = torch.tensor([[1.0, 0.2], [0.2, 0.5]], dtype=torch.float64)
        >>> x, info = Neumann(terms=200)(lambda v: A @ v, torch.ones(2, dtype=torch.float64))
        >>> torch.allclose(A @ x, torch.ones(2, dtype=torch.float64)), bool(info.converged)
        (True, True)

    References:
        Lorraine, J., Vicol, P. and Duvenaud, D. `Optimizing Millions of
        Hyperparameters by Implicit Differentiation
        <https://proceedings.mlr.press/v108/lorraine20a.html>`_. AISTATS, 2020.
    """

    terms: int = 20
    alpha: Optional[float] = 1.0

    def __post_init__(self):
        _check_fields(
            self,
            terms=(_positive_int, "a positive int"),
            alpha=(
                lambda v: v is None or (_nonneg_float(v) and v > 0),
                "a positive finite float or None (estimate 1 / L by power iteration)",
            ),
        )

    def max_products(self, n: int) -> int:
        return self.terms

    def _solve(self, matvec, b, x0, flatten):
        nbatch = b.shape[0]
        if self.alpha is None:
            alpha = _inverse_spectral_radius(matvec, b).unsqueeze(-1)
        else:
            alpha = torch.full((nbatch, 1), float(self.alpha), dtype=b.dtype, device=b.device)
        # the series on b / s, s a power of two near max |b| (exact, and x is linear in b):
        # the norms of its terms neither overflow nor underflow for a huge or tiny b
        scale = _unit_scale(b)
        b = b / scale
        limit = _DIVERGENCE_FACTOR * _norm(b)
        status = torch.zeros(nbatch, dtype=torch.int64, device=b.device)
        iterations = torch.zeros_like(status)
        active = torch.ones(nbatch, dtype=torch.bool, device=b.device)
        p, acc = b, b
        for _ in range(self.terms - 1):
            p_new = p - alpha * matvec(p)
            p_norm = _norm(p_new)
            nonfinite = active & ~torch.isfinite(p_norm)
            diverged = active & ~nonfinite & (p_norm > limit)
            status = _mark(_mark(status, nonfinite, Status.NONFINITE), diverged, Status.DIVERGED)
            iterations = iterations + active
            active = active & ~nonfinite & ~diverged
            p = torch.where(active.unsqueeze(-1), p_new, p)
            acc = torch.where(active.unsqueeze(-1), acc + p_new, acc)
        if self.terms > 1:  # (I - alpha A)^k b did not change size: alpha ||A|| is negligible
            stalled = active & ((_norm(p) - _norm(b)).abs() < _PROGRESS * _norm(b))
            status = _mark(status, stalled, Status.MAX_ITERATIONS)
        return alpha * acc * scale, iterations, status


_DIVERGENCE_FACTOR = 1e3
_PROGRESS = 1e-6  # the least relative change of the series' terms that counts as progress
_POWER_STEPS = 20


def _inverse_spectral_radius(matvec: FlatMatvec, b: torch.Tensor) -> torch.Tensor:
    """``1 / L`` per element, ``L ~ max |eigenvalue|`` by power iteration (1 where L = 0)."""
    v = _probe(b)
    v = v / _norm(v).unsqueeze(-1)
    lam = torch.zeros(b.shape[0], dtype=_real_dtype(b.dtype), device=b.device)
    for _ in range(_POWER_STEPS):
        w = matvec(v)
        lam = _norm(w)
        ok = torch.isfinite(lam) & (lam > 0)
        v = torch.where(ok.unsqueeze(-1), w / torch.where(ok, lam, 1).unsqueeze(-1), v)
    ok = torch.isfinite(lam) & (lam > 0)
    return torch.where(ok, 1 / torch.where(ok, lam, 1), torch.ones_like(lam))


# --------------------------------------------------------------------------- GMRES


__all__ = ['Neumann']
