"""Conjugate gradient (CG) for symmetric positive-definite systems."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..._checks import check_fields as _check_fields
from ...status import Status
from ...typing import Matvec
from ._base import (
    KrylovSolver,
    _mark,
    _look_every,
    _real_dtype,
    _real_inner,
)


@dataclass(frozen=True)
class CG(KrylovSolver):
    r"""Conjugate gradient for symmetric positive-definite systems ``A x = b``.

    Solves :math:`A x = b` for symmetric positive-definite :math:`A`, given only
    products :math:`v \mapsto A v`.  After :math:`k` steps the error is minimal in
    the :math:`A`-norm over the Krylov space
    :math:`\mathcal K_k = \mathrm{span}\{r_0, A r_0, \dots, A^{k-1} r_0\}`; in exact
    arithmetic the solve is exact after ``n`` steps.

    Complex dtypes: :math:`A` Hermitian positive definite, inner products :math:`u^H v`.

    The operator must be symmetric positive definite.  Non-positive curvature
    ``p^T A p <= sqrt(n) * eps * max curvature seen`` is reported as
    :attr:`~bilevel.status.Status.BREAKDOWN` for that element (indefinite or
    singular operator) and the element stops at its last iterate, or at its start
    where the last iterate's residual is the larger: for the singular
    :math:`A = \mathrm{diag}(I, 0)` and :math:`b = (b_1, b_2)` the first iterate is
    :math:`x_1 = (\|b\|^2 / \|b_1\|^2)\, b`, whose residual exceeds :math:`\|b\|`
    once :math:`\|b_2\| > \|b_1\|` (the null-space part of the residual stays and
    the step overshoots along the range), and the next step breaks down
    (``info.iterations`` still counts the steps taken).

    Args:
        maxiter: iteration (matrix-vector product) budget per element; ``None``
            means ``10 n`` capped at 1000.  Default 100.
        tol: relative tolerance on the residual; ``None`` (default) scales with
            the dtype (``sqrt(eps)``: 1.5e-8 in float64, 3.5e-4 in float32).
        atol: absolute tolerance on the residual norm, default 0.
        M: optional preconditioner, a matvec ``r -> M r`` approximating
            :math:`A^{-1}` (symmetric positive definite), on trees like ``b``.

    Example:
        >>> import torch, bilevel
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> x, info = bilevel.implicit.CG()(lambda v: A @ v, torch.ones(2, dtype=torch.float64))
        >>> torch.allclose(A @ x, torch.ones(2, dtype=torch.float64)), bool(info.converged)
        (True, True)

    References:
        Hestenes, M. R. and Stiefel, E. `Methods of conjugate gradients for solving
        linear systems <https://doi.org/10.6028/jres.049.044>`_. J. Res. NBS, 1952.
    """

    M: Optional[Matvec] = None

    def __post_init__(self):
        super().__post_init__()
        _check_fields(self, M=(lambda v: v is None or callable(v), "None or a callable preconditioner r -> M r"))

    def _iterate(self, matvec, b, x0, threshold, maxiter, flatten):
        precondition = flatten(self.M) if self.M is not None else None
        return _cg(matvec, b, x0, threshold, maxiter, precondition)

    def _gradient_rule(self):
        return "self", self  # the operator is symmetric


def _cg(matvec, b, x0, threshold, maxiter, precondition):
    """Batched CG on flat ``(B, n)`` tensors.

    A single system on the CPU takes a scalar path (:func:`_cg_single`): the
    convergence test reads the residual on the host every step anyway, so step
    sizes are Python floats and no masking is needed (about 6 tensor ops per
    step instead of about 20; the per-op cost dominates for small systems).
    """
    if b.shape[0] == 1 and _look_every(b) == 1:  # the CPU: host reads are free
        return _cg_single(matvec, b, x0, float(threshold), maxiter, precondition)
    return _cg_batched(matvec, b, x0, threshold, maxiter, precondition)


def _start(matvec, b, x0):
    if x0 is None:
        return torch.zeros_like(b), b.clone()
    return x0.clone(), b - matvec(x0)


def _cg_single(matvec, b, x0, threshold, maxiter, precondition):
    """CG for one system (``B = 1``), step sizes on the host; the iterates are
    kept as vectors so that each inner product is one ``dot``."""
    n = b.shape[-1]

    def apply(op, v):  # the flat operators take and return (1, n)
        on_vectors = getattr(op, "on_vectors", None)  # the user's own map, where b is a vector
        if on_vectors is not None:
            out = on_vectors(v)
            if torch.is_tensor(out) and out.shape == v.shape:
                return out if out.dtype == v.dtype else out.to(v.dtype)
        return op(v.view(1, n)).reshape(n)

    # u^T v, or Re u^H v for a complex (Hermitian) system: picked once, the real loop is unchanged
    dot = (lambda u, v: torch.vdot(u, v).real) if b.is_complex() else torch.dot
    x, r = _start(matvec, b, x0)
    x, r = x.reshape(n), r.reshape(n)
    z = apply(precondition, r) if precondition else r
    p = z
    rz = float(dot(r, z))
    rr = rz if precondition is None else float(dot(r, r))
    factor = math.sqrt(n) * torch.finfo(b.dtype).eps
    max_inv_alpha, status, k, last = 0.0, Status.SUCCESS, 0, None
    start, rr_start = x, rr
    while rr > threshold**2:
        if k == maxiter:
            status = Status.MAX_ITERATIONS
            break
        Ap = apply(matvec, p)
        last = p, Ap
        inv_alpha = float(dot(p, Ap)) / rz
        max_inv_alpha = max(max_inv_alpha, inv_alpha)
        if not inv_alpha > factor * max_inv_alpha:  # also catches NaN
            status = Status.BREAKDOWN
            if rr > rr_start:  # no step beats that one (see CG)
                x, rr = start, rr_start
            break
        x = x.add(p, alpha=1.0 / inv_alpha)
        r = r.add(Ap, alpha=-1.0 / inv_alpha)
        z = apply(precondition, r) if precondition else r
        rz_new = float(dot(r, z))
        rr = rz_new if precondition is None else float(dot(r, r))
        p = z.add(p, alpha=rz_new / rz)
        rz, k = rz_new, k + 1
        if not math.isfinite(rr):
            status = Status.NONFINITE
            break
    device = b.device
    iterations, code = torch.tensor([k], device=device), torch.tensor([int(status)], device=device)
    if status == Status.SUCCESS:  # the base class confirms a success with the true residual
        return x.view(1, n), iterations, code
    if not _estimate_is_reliable(rr, b, x, last, k):
        return x.view(1, n), iterations, code  # the base class measures the true residual
    # a failure is reported with the recursive residual, sparing one product
    estimate = torch.full((1,), math.sqrt(rr) if rr >= 0 else math.nan, dtype=_real_dtype(r.dtype), device=device)
    return x.view(1, n), iterations, code, estimate


def _estimate_is_reliable(rr: float, b, x, last, k: int) -> bool:
    """Whether CG's recursive residual ``sqrt(rr)`` can stand for the true one.

    The two drift apart by rounding, about ``k sqrt(n) eps (||b|| + ||A|| ||x||)``
    after ``k`` steps (Greenbaum, 1997); near that floor (float32, or an
    ill-conditioned system run long) the recursive residual keeps shrinking while
    the true one stalls.  It is trusted only 10 times above the bound, with
    ``||A||`` estimated by ``||A p|| / ||p||`` of the last step.
    """
    if not math.isfinite(rr):
        return True  # a non-finite residual is reported as it is
    p, Ap = last  # a failed solve took at least one step
    a_norm = float(torch.linalg.vector_norm(Ap)) / max(float(torch.linalg.vector_norm(p)), 1e-300)
    scale = float(torch.linalg.vector_norm(b)) + a_norm * float(torch.linalg.vector_norm(x))
    floor = (k + 1) * math.sqrt(b.shape[-1]) * torch.finfo(b.dtype).eps * scale
    return math.sqrt(rr) > 10 * floor


def _cg_batched(matvec, b, x0, threshold, maxiter, precondition):
    """CG for ``B`` independent systems with per-element masks.

    Non-positive curvature is tested through ``1 / alpha = p^T A p / r^T z``, which
    CG keeps inside ``[lambda_min, lambda_max]`` for an SPD operator: a value at or
    below ``sqrt(n) eps`` times the largest seen (or NaN) is a breakdown.
    """
    nbatch, n = b.shape
    dot = _real_inner(b.dtype)  # u^T v, or Re u^H v for a complex (Hermitian) system
    x, r = _start(matvec, b, x0)
    z = precondition(r) if precondition else r
    p = z
    rz = dot(r, z)
    rr = rz if precondition is None else dot(r, r)
    start, rr_start = x, rr
    threshold2 = threshold.square()
    active = rr > threshold2
    broke = torch.zeros_like(active)
    zero = torch.zeros_like(rz)
    history = []
    max_inv_alpha = torch.zeros_like(rz)
    factor = math.sqrt(n) * torch.finfo(b.dtype).eps
    sync = _look_every(b)
    for k in range(maxiter):
        if sync and k % sync == 0 and not bool(active.any()):
            break
        Ap = matvec(p)
        inv_alpha = dot(p, Ap) / rz
        max_inv_alpha = torch.maximum(max_inv_alpha, inv_alpha)
        ok = inv_alpha > factor * max_inv_alpha  # False for NaN, <= 0 or negligible curvature
        broke = broke | (active > ok)
        active = active & ok
        history.append(active)
        alpha = torch.where(active, inv_alpha.reciprocal(), zero).unsqueeze(-1)
        # a stopped element keeps its iterate and residual (0 * a NaN direction or product would
        # not), as the single path does
        moving = active.unsqueeze(-1)
        x = torch.addcmul(x, alpha, torch.where(moving, p, 0))
        r = torch.addcmul(r, alpha, torch.where(moving, Ap, 0), value=-1)
        z = precondition(r) if precondition else r
        rz_new = dot(r, z)
        rr = rz_new if precondition is None else dot(r, r)
        beta = torch.where(active, rz_new / rz, zero).unsqueeze(-1)
        p = torch.addcmul(z, beta, p)
        rz = rz_new
        active = active & ~(rr <= threshold2)  # a NaN residual stays active and breaks down next
    iterations = torch.stack(history).sum(0) if history else torch.zeros(nbatch, dtype=torch.int64, device=b.device)
    status = torch.zeros(nbatch, dtype=torch.int64, device=b.device)
    status = _mark(status, broke, Status.BREAKDOWN)
    x = torch.where((broke & (rr > rr_start)).unsqueeze(-1), start, x)  # no step beats that one (see CG)
    return x, iterations, _mark(status, active, Status.MAX_ITERATIONS)


__all__ = ['CG']
