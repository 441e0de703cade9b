"""Linear solvers for the systems of the implicit function theorem.

Each solver is a small frozen dataclass of settings, checked at construction,
and callable as ``solver(matvec, b, x0=None, *, batch_dims=0) -> (x, info)``:

* ``matvec`` maps a tensor tree shaped like ``b`` to another one (``v -> A v``);
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
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .._tolerance import default_tol
from .._tree import Raveler, all_finite, check_same_structure, tree_leaves
from ..status import Status
from ..typing import Matvec, TensorTree

FlatMatvec = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LinearSolveInfo:
    """Per-batch-element outcome of a linear solve (all tensors of the batch shape).

    Attributes:
        iterations: number of iterations (matrix-vector products for Krylov
            methods) each element ran.
        residual_norm: ``||b - A x||`` at the returned ``x``.
        b_norm: ``||b||``.
        status: :class:`~bilevel.status.Status` codes (``int64``).
    """

    iterations: torch.Tensor
    residual_norm: torch.Tensor
    b_norm: torch.Tensor
    status: torch.Tensor

    @property
    def converged(self) -> torch.Tensor:
        """Boolean tensor: which elements reached the tolerance."""
        return self.status == Status.SUCCESS

    @property
    def relative_residual(self) -> torch.Tensor:
        """``||b - A x|| / ||b||`` (0 where ``b = 0`` and the residual is 0)."""
        return self.residual_norm / self.b_norm.clamp_min(torch.finfo(self.b_norm.dtype).tiny)

    def summary(self) -> str:
        """One line naming the failed elements, their residuals and the remedy."""
        failed = (~self.converged).reshape(-1).nonzero().reshape(-1).tolist()
        if not failed:
            return "linear solve converged"
        codes = self.status.reshape(-1)
        rel = self.relative_residual.reshape(-1)
        worst = max(failed, key=lambda i: float(rel[i]) if math.isfinite(rel[i]) else math.inf)
        where = "" if self.status.dim() == 0 else f" (batch elements {failed[:8]}{'...' if len(failed) > 8 else ''})"
        status = Status(int(codes[worst]))
        return (
            f"linear solve failed{where}: {status.name}, relative residual "
            f"{float(rel[worst]):.3g} after {int(self.iterations.reshape(-1)[worst])} "
            f"iterations; {status.message}"
        )


@dataclass(frozen=True)
class LinearSolver:
    """Base class: pytree and batch handling around a flat ``(B, n)`` solve.

    Subclasses implement :meth:`_solve`, which receives ``matvec`` and ``b`` as
    flat tensors of shape ``(B, n)`` (``B`` independent systems), ``x0`` flat or
    ``None``, and ``flatten``, which turns any other tree-to-tree map (a
    preconditioner) into a flat one; it returns ``(x, iterations, status)``.  The
    base class recomputes the true residual and builds the info.
    """

    def __call__(
        self,
        matvec: Matvec,
        b: TensorTree,
        x0: Optional[TensorTree] = None,
        *,
        batch_dims: int = 0,
    ) -> tuple[TensorTree, LinearSolveInfo]:
        if not callable(matvec):
            raise TypeError(f"`matvec` must be callable (v -> A v); got {type(matvec).__name__}.")
        if not isinstance(batch_dims, int) or batch_dims < 0:
            raise ValueError(f"`batch_dims` must be a non-negative int; got {batch_dims!r}.")
        rav = Raveler(b, batch_dims, name="b")
        if not rav.dtype.is_floating_point and not rav.dtype.is_complex:
            raise TypeError(f"`b` must be floating point; got dtype {rav.dtype}.")
        if x0 is not None:
            check_same_structure(x0, b, "x0", "b")
        if not all_finite(tree_leaves(b)):
            raise FloatingPointError("linear solve: the right-hand side `b` contains NaN or inf.")
        batch, n = rav.batch_shape, rav.size
        nbatch = math.prod(batch)

        def flatten(tree_fn: Matvec) -> FlatMatvec:
            def flat_fn(v: torch.Tensor) -> torch.Tensor:
                out = tree_fn(rav.unravel(v.reshape(tuple(batch) + (n,))))
                return rav.ravel(out).reshape(nbatch, n)

            return flat_fn

        flat_matvec = flatten(matvec)
        b_flat = rav.ravel(b).reshape(nbatch, n)
        x0_flat = None if x0 is None else rav.ravel(x0).reshape(nbatch, n).to(b_flat.dtype)
        x, iterations, status = self._solve(flat_matvec, b_flat, x0_flat, flatten)
        residual = b_flat - flat_matvec(x)
        residual_norm = torch.linalg.vector_norm(residual, dim=-1)
        b_norm = torch.linalg.vector_norm(b_flat, dim=-1)
        status = _final_status(self, status, residual_norm, b_norm)
        info = LinearSolveInfo(
            iterations=iterations.reshape(batch),
            residual_norm=residual_norm.reshape(batch),
            b_norm=b_norm.reshape(batch),
            status=status.reshape(batch),
        )
        return rav.unravel(x.reshape(tuple(batch) + (n,))), info

    def _solve(
        self,
        matvec: FlatMatvec,
        b: torch.Tensor,
        x0: Optional[torch.Tensor],
        flatten: Callable[[Matvec], FlatMatvec],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _threshold(self, b: torch.Tensor) -> torch.Tensor:
        """Per-element stopping threshold ``max(tol * ||b||, atol)``."""
        tol = getattr(self, "tol", None)
        tol = default_tol(b.dtype) if tol is None else tol
        atol = getattr(self, "atol", 0.0)
        return torch.clamp_min(tol * torch.linalg.vector_norm(b, dim=-1), atol)


def _final_status(
    solver: LinearSolver, status: torch.Tensor, residual_norm: torch.Tensor, b_norm: torch.Tensor
) -> torch.Tensor:
    """Re-check the true residual: a solve is a success only if ``b - A x`` is small."""
    status = torch.where(torch.isfinite(residual_norm), status, torch.full_like(status, Status.NONFINITE))
    if getattr(solver, "tol", "absent") == "absent":  # direct and fixed-term solvers set no tolerance
        return status
    tol = solver.tol if solver.tol is not None else default_tol(residual_norm.dtype)
    # The recursive residual of a Krylov method drifts from the true one by a few
    # ulps times the condition number: allow a factor 10 before calling it a failure.
    small = residual_norm <= 10 * torch.clamp_min(tol * b_norm, getattr(solver, "atol", 0.0))
    failed_late = (status == Status.SUCCESS) & ~small
    return torch.where(failed_late, torch.full_like(status, Status.MAX_ITERATIONS), status)


def _check_fields(obj, **rules: tuple[Callable[[object], bool], str]) -> None:
    for field, (ok, expected) in rules.items():
        value = getattr(obj, field)
        if not ok(value):
            raise ValueError(f"{type(obj).__name__}: `{field}` must be {expected}; got {value!r}.")


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _positive_int_or_none(v) -> bool:
    return v is None or _positive_int(v)


def _tol_ok(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and 0 < v < 1)


def _nonneg_float(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


_KRYLOV_RULES = dict(
    maxiter=(_positive_int_or_none, "a positive int or None"),
    tol=(_tol_ok, "a float in (0, 1) or None"),
    atol=(_nonneg_float, "a non-negative float"),
)


def _mark(status: torch.Tensor, mask: torch.Tensor, code: Status) -> torch.Tensor:
    """Set ``status`` to ``code`` where ``mask`` holds."""
    return torch.where(mask, torch.full_like(status, code), status)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-batch-element dot product of two ``(B, n)`` tensors."""
    return (a * b).sum(-1)


def _norm(a: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(a, dim=-1)


def _div(num: torch.Tensor, den: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``mask`` holds, 0 elsewhere (no NaN from masked-out zeros)."""
    return torch.where(mask, num / torch.where(mask, den, torch.ones_like(den)), 0)


def _singular_tol(dtype: torch.dtype) -> float:
    """Relative size below which a Krylov pivot means a numerically singular
    operator: ``eps ** (2/3)`` (3.7e-11 in float64, 2.4e-5 in float32), i.e. a
    condition number above ``eps ** (-2/3)``."""
    return float(torch.finfo(dtype).eps) ** (2 / 3)


def _sync_every(x: torch.Tensor) -> int:
    """How often the convergence test synchronises with the host: every step on
    CPU (free), every 8 steps on accelerators (frozen elements lose nothing)."""
    return 1 if x.device.type == "cpu" else 8


def resolve_maxiter(maxiter: Optional[int], n: int) -> int:
    """``maxiter=None`` means ``10 n``, at most 1000."""
    return maxiter if maxiter is not None else min(10 * n, 1000)


@dataclass(frozen=True)
class CG(LinearSolver):
    r"""Conjugate gradient for symmetric positive-definite systems ``A x = b``.

    Solves :math:`A x = b` for symmetric positive-definite :math:`A`, given only
    products :math:`v \mapsto A v`.  After :math:`k` steps the error is minimal in
    the :math:`A`-norm over the Krylov space
    :math:`\mathcal K_k = \mathrm{span}\{r_0, A r_0, \dots, A^{k-1} r_0\}`; in exact
    arithmetic the solve is exact after ``n`` steps.

    The operator must be symmetric positive definite.  Non-positive curvature
    ``p^T A p <= sqrt(n) * eps * max curvature seen`` is reported as
    :attr:`~bilevel.status.Status.BREAKDOWN` for that element (indefinite or
    singular operator) and the element stops at its last iterate.

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

    maxiter: Optional[int] = 100
    tol: Optional[float] = None
    atol: float = 0.0
    M: Optional[Matvec] = None

    def __post_init__(self):
        _check_fields(
            self,
            maxiter=(_positive_int_or_none, "a positive int or None"),
            tol=(_tol_ok, "a float in (0, 1) or None"),
            atol=(lambda v: isinstance(v, (int, float)) and v >= 0, "a non-negative float"),
            M=(lambda v: v is None or callable(v), "None or a callable preconditioner r -> M r"),
        )

    def _solve(self, matvec, b, x0, flatten):
        precondition = flatten(self.M) if self.M is not None else None
        maxiter = resolve_maxiter(self.maxiter, b.shape[-1])
        return _cg(matvec, b, x0, self._threshold(b), maxiter, precondition)


def _cg(matvec, b, x0, threshold, maxiter, precondition):
    nbatch, n = b.shape
    if x0 is None:
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        x = x0.clone()
        r = b - matvec(x)
    z = precondition(r) if precondition else r
    p = z.clone()
    rz = (r * z).sum(-1)
    status = torch.zeros(nbatch, dtype=torch.int64, device=b.device)
    iterations = torch.zeros(nbatch, dtype=torch.int64, device=b.device)
    active = torch.linalg.vector_norm(r, dim=-1) > threshold
    eps = torch.finfo(b.dtype).eps
    max_curvature = torch.zeros(nbatch, dtype=b.dtype, device=b.device)
    sync = _sync_every(b)
    for k in range(maxiter):
        if k % sync == 0 and not bool(active.any()):
            break
        Ap = matvec(p)
        pAp = (p * Ap).sum(-1)
        curvature = pAp / (p * p).sum(-1).clamp_min(torch.finfo(b.dtype).tiny)
        max_curvature = torch.maximum(max_curvature, curvature)
        bad = active & ~(curvature > math.sqrt(n) * eps * max_curvature)
        status = torch.where(bad, torch.full_like(status, Status.BREAKDOWN), status)
        active = active & ~bad
        alpha = torch.where(active, rz / torch.where(active, pAp, 1), 0).unsqueeze(-1)
        x = x + alpha * p
        r = r - alpha * Ap
        iterations = iterations + active
        z = precondition(r) if precondition else r
        rz_new = (r * z).sum(-1)
        beta = torch.where(active, rz_new / torch.where(active, rz, 1), 0).unsqueeze(-1)
        p = z + beta * p
        rz = rz_new
        rnorm = torch.linalg.vector_norm(r, dim=-1)
        nonfinite = active & ~torch.isfinite(rnorm)
        status = torch.where(nonfinite, torch.full_like(status, Status.NONFINITE), status)
        active = active & (rnorm > threshold) & ~nonfinite
    status = torch.where(active, torch.full_like(status, Status.MAX_ITERATIONS), status)
    return x, iterations, status


# --------------------------------------------------------------------------- Neumann


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
    of power iteration from a fixed-seed random start and uses
    :math:`\alpha = 1 / L` (20 extra products).

    There is no tolerance: an element is a success unless its iterates become
    non-finite (:attr:`~bilevel.status.Status.NONFINITE`) or the term
    :math:`\|p\|` grows above :math:`10^3 \|b\|`
    (:attr:`~bilevel.status.Status.DIVERGED`, ``alpha >= 2 / L`` or an
    indefinite operator); such an element stops at its last finite partial sum.
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

    def _solve(self, matvec, b, x0, flatten):
        nbatch = b.shape[0]
        if self.alpha is None:
            alpha = _inverse_spectral_radius(matvec, b).unsqueeze(-1)
        else:
            alpha = torch.full((nbatch, 1), float(self.alpha), dtype=b.dtype, device=b.device)
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
        return alpha * acc, iterations, status


_DIVERGENCE_FACTOR = 1e3
_POWER_STEPS = 20


def _inverse_spectral_radius(matvec: FlatMatvec, b: torch.Tensor) -> torch.Tensor:
    """``1 / L`` per element, ``L ~ max |eigenvalue|`` by power iteration (1 where L = 0)."""
    generator = torch.Generator(device=b.device).manual_seed(0)
    v = torch.randn(b.shape, generator=generator, dtype=b.dtype, device=b.device)
    v = v / _norm(v).unsqueeze(-1)
    lam = torch.zeros(b.shape[0], dtype=b.dtype, device=b.device)
    for _ in range(_POWER_STEPS):
        w = matvec(v)
        lam = _norm(w)
        ok = torch.isfinite(lam) & (lam > 0)
        v = torch.where(ok.unsqueeze(-1), w / torch.where(ok, lam, 1).unsqueeze(-1), v)
    ok = torch.isfinite(lam) & (lam > 0)
    return torch.where(ok, 1 / torch.where(ok, lam, 1), torch.ones_like(lam))


# --------------------------------------------------------------------------- GMRES


@dataclass(frozen=True)
class GMRES(LinearSolver):
    r"""Restarted GMRES for general non-singular systems ``A x = b``.

    Each cycle builds an orthonormal basis :math:`V_m` of the Krylov space
    :math:`\mathcal K_m(A, r_0) = \mathrm{span}\{r_0, A r_0, \dots, A^{m-1} r_0\}`
    by Arnoldi (modified Gram--Schmidt), :math:`A V_m = V_{m+1} \bar H_m`, and
    takes the update minimising the residual over it,

    .. math:: x = x_0 + V_m y, \qquad
              y = \arg\min_y \bigl\| \|r_0\| e_1 - \bar H_m y \bigr\|,

    with the least-squares residual tracked by Givens rotations at every step;
    after :math:`m` = ``restart`` steps the cycle restarts from the new true
    residual.  :math:`A` need not be symmetric, only non-singular.

    Element ``i`` has converged when :math:`\|b_i - A_i x_i\| \le
    \max(\mathrm{tol}\,\|b_i\|, \mathrm{atol})` (``tol=None``: ``sqrt(eps)`` of the
    dtype).  A singular step (the new direction adds nothing to the range: a
    pivot of the rotated :math:`\bar H` below ``eps ** (2/3)`` times
    :math:`\|A v_j\|`, which a non-singular :math:`A` only reaches with a
    condition number above ``eps ** (-2/3)``) or a full cycle that does not
    reduce the true residual (stagnation, e.g. a singular inconsistent system)
    is reported as :attr:`~bilevel.status.Status.BREAKDOWN` and the element
    keeps the minimum-residual iterate up to that step.  An exact (happy)
    breakdown of Arnoldi gives the exact solution.

    Args:
        maxiter: budget of Arnoldi steps (matrix-vector products) per element,
            summed over restarts (each restart also spends one product on the
            true residual); ``None`` means ``10 n`` capped at 1000.  Default 100.
        tol: relative tolerance on the residual; ``None`` (default) scales with
            the dtype.
        atol: absolute tolerance on the residual norm, default 0.
        restart: Krylov dimension :math:`m` of a cycle (at most ``n``); memory is
            ``O(m n)`` per element.  Default 20.

    Example:
        >>> import torch
        >>> from bilevel.implicit.linear_solve import GMRES
        >>> A = torch.tensor([[2.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> x, info = GMRES()(lambda v: A @ v, torch.ones(2, dtype=torch.float64))
        >>> torch.allclose(A @ x, torch.ones(2, dtype=torch.float64)), bool(info.converged)
        (True, True)

    References:
        Saad, Y. and Schultz, M. H. `GMRES: A generalized minimal residual
        algorithm for solving nonsymmetric linear systems
        <https://doi.org/10.1137/0907058>`_. SIAM J. Sci. Stat. Comput., 1986.
    """

    maxiter: Optional[int] = 100
    tol: Optional[float] = None
    atol: float = 0.0
    restart: int = 20

    def __post_init__(self):
        _check_fields(
            self,
            **_KRYLOV_RULES,
            restart=(_positive_int, "a positive int"),
        )

    def _solve(self, matvec, b, x0, flatten):
        maxiter = resolve_maxiter(self.maxiter, b.shape[-1])
        return _gmres(matvec, b, x0, self._threshold(b), maxiter, self.restart)


def _gmres(matvec, b, x0, threshold, maxiter, restart):
    nbatch, n = b.shape
    m = min(restart, n)
    eps = torch.finfo(b.dtype).eps
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b.clone() if x0 is None else b - matvec(x)
    beta = _norm(r)
    status = torch.zeros(nbatch, dtype=torch.int64, device=b.device)
    iterations = torch.zeros_like(status)
    status = _mark(status, ~torch.isfinite(beta), Status.NONFINITE)
    active = torch.isfinite(beta) & (beta > threshold)
    used = 0
    while used < maxiter and bool(active.any()):
        steps = min(m, maxiter - used)
        dx, done, code, ran = _arnoldi_cycle(matvec, r, beta, active, threshold, steps)
        used += ran
        iterations = iterations + done
        status = torch.where(code != 0, code, status)
        active = active & (code == 0)
        x = x + dx
        r = b - matvec(x)
        beta_new = _norm(r)
        nonfinite = active & ~torch.isfinite(beta_new)
        stagnated = active & ~nonfinite & (done == m) & (beta_new >= (1 - 10 * eps) * beta)
        stagnated = stagnated & (beta_new > threshold)
        status = _mark(_mark(status, nonfinite, Status.NONFINITE), stagnated, Status.BREAKDOWN)
        active = active & ~nonfinite & ~stagnated & (beta_new > threshold)
        beta = beta_new
    status = _mark(status, active, Status.MAX_ITERATIONS)
    return x, iterations, status


def _arnoldi_cycle(matvec, r, beta, active, threshold, steps):
    """One GMRES cycle of at most ``steps`` Arnoldi steps, batched.

    Returns the update ``dx``, the products each element spent, a status code
    per element (0 to go on, BREAKDOWN or NONFINITE), and the steps run.
    """
    nbatch, n = r.shape
    V = r.new_zeros(nbatch, steps + 1, n)
    H = r.new_zeros(nbatch, steps + 1, steps)
    cs = r.new_zeros(nbatch, steps)
    sn = r.new_zeros(nbatch, steps)
    g = r.new_zeros(nbatch, steps + 1)
    g[:, 0] = torch.where(active, beta, 0)
    V[:, 0] = torch.where(active.unsqueeze(-1), r / torch.where(active, beta, 1).unsqueeze(-1), 0)
    running = active.clone()
    done = torch.zeros(nbatch, dtype=torch.int64, device=r.device)
    usable = torch.zeros_like(done)
    code = torch.zeros_like(done)
    sync = _sync_every(r)
    ran = 0
    for j in range(steps):
        if j > 0 and j % sync == 0 and not bool(running.any()):
            break
        ran = j + 1
        w = matvec(V[:, j])
        done = done + running
        w_norm = _norm(w)
        col = r.new_zeros(nbatch, steps + 1)
        for i in range(j + 1):  # modified Gram-Schmidt
            h = _dot(w, V[:, i])
            col[:, i] = h
            w = w - h.unsqueeze(-1) * V[:, i]
        h_next = _norm(w)
        for i in range(j):  # previous Givens rotations
            top = cs[:, i] * col[:, i] + sn[:, i] * col[:, i + 1]
            col[:, i + 1] = -sn[:, i] * col[:, i] + cs[:, i] * col[:, i + 1]
            col[:, i] = top
        pivot = torch.hypot(col[:, j], h_next)
        finite = torch.isfinite(pivot) & torch.isfinite(w_norm)
        regular = finite & (pivot > _singular_tol(r.dtype) * w_norm) & (pivot > 0)
        cs[:, j] = _div(col[:, j], pivot, regular) + (~regular).to(r.dtype)
        sn[:, j] = _div(h_next, pivot, regular)
        col[:, j] = torch.where(regular, pivot, col[:, j])
        H[:, :, j] = col
        g[:, j + 1] = -sn[:, j] * g[:, j]
        g[:, j] = cs[:, j] * g[:, j]
        code = _mark(code, running & ~finite, Status.NONFINITE)
        code = _mark(code, running & finite & ~regular, Status.BREAKDOWN)
        good = running & regular
        usable = usable + good
        running = good & (g[:, j + 1].abs() > threshold)
        next_ok = running & (h_next > 0)
        V[:, j + 1] = torch.where(next_ok.unsqueeze(-1), w / torch.where(next_ok, h_next, 1).unsqueeze(-1), 0)
    return _cycle_update(V, H, g, usable, ran), done, code, ran


def _cycle_update(V, H, g, usable, k):
    """``V_k y`` with ``y`` solving the rotated triangular system, per element on
    its first ``usable`` columns (the rest is replaced by identity rows)."""
    if k == 0:
        return torch.zeros_like(V[:, 0])
    cols = torch.arange(k, device=V.device)
    used = cols < usable.unsqueeze(-1)
    eye = torch.eye(k, dtype=H.dtype, device=H.device)
    R = torch.where(used.unsqueeze(-1) & used.unsqueeze(-2), H[:, :k, :k], eye)
    rhs = torch.where(used, g[:, :k], 0).unsqueeze(-1)
    y = torch.linalg.solve_triangular(R, rhs, upper=True).squeeze(-1)
    return torch.einsum("bk,bkn->bn", y, V[:, :k])


# --------------------------------------------------------------------------- BiCGStab


@dataclass(frozen=True)
class BiCGStab(LinearSolver):
    r"""Stabilised bi-conjugate gradient for general non-singular systems ``A x = b``.

    Short-recurrence Krylov method for non-symmetric :math:`A` (constant memory,
    unlike :class:`GMRES`): each iteration takes a Bi-CG step along :math:`p`,

    .. math:: \rho = \langle \hat r_0, r\rangle,\quad
              p \leftarrow r + \tfrac{\rho}{\rho_{\rm old}}\tfrac{\alpha}{\omega}(p - \omega v),\quad
              v = A p,\quad \alpha = \rho / \langle \hat r_0, v\rangle,\quad s = r - \alpha v,

    then a one-dimensional residual minimisation
    :math:`\omega = \langle t, s\rangle / \langle t, t\rangle` with :math:`t = A s`,
    :math:`x \leftarrow x + \alpha p + \omega s`, :math:`r \leftarrow s - \omega t`.
    The shadow residual is :math:`\hat r_0 = r_0`.

    Element ``i`` has converged when :math:`\|b_i - A_i x_i\| \le
    \max(\mathrm{tol}\,\|b_i\|, \mathrm{atol})` (``tol=None``: ``sqrt(eps)`` of the
    dtype), tested after each half step.  A vanishing :math:`\rho`,
    :math:`\langle \hat r_0, v\rangle` or :math:`\langle t, s\rangle` (relative to
    the norms involved, below ``eps``) is reported as
    :attr:`~bilevel.status.Status.BREAKDOWN` instead of producing NaN.  Since
    the residual of BiCGStab is not monotone, an element that fails returns
    the iterate with the smallest (recursive) residual it met.

    Args:
        maxiter: budget of matrix-vector products per element (an iteration uses
            two); ``None`` means ``10 n`` capped at 1000.  Default 100.
        tol: relative tolerance on the residual; ``None`` (default) scales with
            the dtype.
        atol: absolute tolerance on the residual norm, default 0.

    Example:
        >>> import torch
        >>> from bilevel.implicit.linear_solve import BiCGStab
        >>> A = torch.tensor([[2.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> x, info = BiCGStab()(lambda v: A @ v, torch.ones(2, dtype=torch.float64))
        >>> torch.allclose(A @ x, torch.ones(2, dtype=torch.float64)), bool(info.converged)
        (True, True)

    References:
        van der Vorst, H. A. `Bi-CGSTAB: A fast and smoothly converging variant of
        Bi-CG for the solution of nonsymmetric linear systems
        <https://doi.org/10.1137/0913035>`_. SIAM J. Sci. Stat. Comput., 1992.
    """

    maxiter: Optional[int] = 100
    tol: Optional[float] = None
    atol: float = 0.0

    def __post_init__(self):
        _check_fields(self, **_KRYLOV_RULES)

    def _solve(self, matvec, b, x0, flatten):
        maxiter = resolve_maxiter(self.maxiter, b.shape[-1])
        return _bicgstab(matvec, b, x0, self._threshold(b), maxiter)


def _bicgstab(matvec, b, x0, threshold, maxiter):
    nbatch, _ = b.shape
    eps = torch.finfo(b.dtype).eps
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b.clone() if x0 is None else b - matvec(x)
    r_hat, r_hat_norm = r.clone(), _norm(r)
    p, v = torch.zeros_like(b), torch.zeros_like(b)
    rho = alpha = omega = torch.ones(nbatch, dtype=b.dtype, device=b.device)
    status = torch.zeros(nbatch, dtype=torch.int64, device=b.device)
    iterations = torch.zeros_like(status)
    status = _mark(status, ~torch.isfinite(r_hat_norm), Status.NONFINITE)
    active = torch.isfinite(r_hat_norm) & (r_hat_norm > threshold)
    best_x, best_norm = x, torch.where(torch.isfinite(r_hat_norm), r_hat_norm, math.inf)
    sync = _sync_every(b)
    for k in range((maxiter + 1) // 2):
        if k % sync == 0 and not bool(active.any()):
            break
        rho_new = _dot(r_hat, r)
        bad = active & ~(rho_new.abs() > eps * r_hat_norm * _norm(r))
        status, active = _mark(status, bad, Status.BREAKDOWN), active & ~bad
        beta = _div(rho_new, rho, active) * _div(alpha, omega, active)
        p = torch.where(active.unsqueeze(-1), r + beta.unsqueeze(-1) * (p - omega.unsqueeze(-1) * v), 0)
        v = matvec(p)
        iterations = iterations + active
        rv = _dot(r_hat, v)
        bad = active & ~(rv.abs() > eps * r_hat_norm * _norm(v))
        status, active = _mark(status, bad, Status.BREAKDOWN), active & ~bad
        alpha = _div(rho_new, rv, active)
        s = r - alpha.unsqueeze(-1) * v
        s_norm = _norm(s)
        nonfinite = active & ~torch.isfinite(s_norm)
        status, active = _mark(status, nonfinite, Status.NONFINITE), active & ~nonfinite
        x = torch.where(active.unsqueeze(-1), x + alpha.unsqueeze(-1) * p, x)
        r = torch.where(active.unsqueeze(-1), s, r)
        best_x, best_norm = _keep_best(best_x, best_norm, x, s_norm, active)
        active = active & (s_norm > threshold)
        if 2 * k + 1 >= maxiter:  # the budget leaves no product for the second half
            break
        t = matvec(torch.where(active.unsqueeze(-1), s, 0))
        iterations = iterations + active
        ts, t_norm = _dot(t, s), _norm(t)
        bad = active & ~(ts.abs() > eps * t_norm * s_norm)
        status, active = _mark(status, bad, Status.BREAKDOWN), active & ~bad
        omega = _div(ts, t_norm**2, active)
        x = torch.where(active.unsqueeze(-1), x + omega.unsqueeze(-1) * s, x)
        r = torch.where(active.unsqueeze(-1), s - omega.unsqueeze(-1) * t, r)
        r_norm = _norm(r)
        nonfinite = active & ~torch.isfinite(r_norm)
        status = _mark(status, nonfinite, Status.NONFINITE)
        active = active & ~nonfinite
        best_x, best_norm = _keep_best(best_x, best_norm, x, r_norm, active)
        active = active & (r_norm > threshold)
        rho = rho_new
    status = _mark(status, active, Status.MAX_ITERATIONS)
    return best_x, iterations, status


def _keep_best(best_x, best_norm, x, x_norm, mask):
    """The iterate with the smallest residual norm so far, per element of ``mask``."""
    better = mask & (x_norm <= best_norm)
    return torch.where(better.unsqueeze(-1), x, best_x), torch.where(better, x_norm, best_norm)


# --------------------------------------------------------------------------- MINRES


@dataclass(frozen=True)
class MINRES(LinearSolver):
    r"""Minimum-residual method for symmetric (possibly indefinite) systems ``A x = b``.

    Lanczos builds an orthonormal basis of
    :math:`\mathcal K_k(A, r_0)` with a tridiagonal :math:`T_k`; MINRES takes

    .. math:: x_k = \arg\min_{x \in x_0 + \mathcal K_k(A, r_0)} \|b - A x\|,

    updated by short recurrences and Givens rotations (constant memory).  The
    operator must be symmetric; it may be indefinite.  A residual that is
    already a least-squares residual, :math:`\|A r_k\| \le \mathrm{eps}^{2/3}
    \|T_k\|_F \|r_k\|` (a singular operator and an inconsistent right-hand
    side), or a vanishing rotated pivot :math:`\gamma_k \le \mathrm{eps}\,
    \|T_k\|_F` is reported as :attr:`~bilevel.status.Status.BREAKDOWN` and the
    element stops at its last iterate.

    Element ``i`` has converged when its residual estimate
    :math:`\bar\phi_k = \|b_i - A_i x_i\|` satisfies :math:`\bar\phi_k \le
    \max(\mathrm{tol}\,\|b_i\|, \mathrm{atol})` (``tol=None``: ``sqrt(eps)`` of the
    dtype); the true residual is re-checked at the end.

    Args:
        maxiter: iteration (matrix-vector product) budget per element; ``None``
            means ``10 n`` capped at 1000.  Default 100.
        tol: relative tolerance on the residual; ``None`` (default) scales with
            the dtype.
        atol: absolute tolerance on the residual norm, default 0.

    Example:
        >>> import torch
        >>> from bilevel.implicit.linear_solve import MINRES
        >>> A = torch.tensor([[1.0, 2.0], [2.0, -1.0]], dtype=torch.float64)
        >>> x, info = MINRES()(lambda v: A @ v, torch.ones(2, dtype=torch.float64))
        >>> torch.allclose(A @ x, torch.ones(2, dtype=torch.float64)), bool(info.converged)
        (True, True)

    References:
        Paige, C. C. and Saunders, M. A. `Solution of sparse indefinite systems of
        linear equations <https://doi.org/10.1137/0712047>`_. SIAM J. Numer.
        Anal., 1975.
    """

    maxiter: Optional[int] = 100
    tol: Optional[float] = None
    atol: float = 0.0

    def __post_init__(self):
        _check_fields(self, **_KRYLOV_RULES)

    def _solve(self, matvec, b, x0, flatten):
        maxiter = resolve_maxiter(self.maxiter, b.shape[-1])
        return _minres(matvec, b, x0, self._threshold(b), maxiter)


def _minres(matvec, b, x0, threshold, maxiter):
    nbatch, _ = b.shape
    eps = torch.finfo(b.dtype).eps
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r1 = b.clone() if x0 is None else b - matvec(x)
    y, r2 = r1, r1
    beta = phibar = _norm(r1)
    zeros = torch.zeros_like(beta)
    old_beta, dbar, epsln, sn, t_norm2 = zeros, zeros, zeros, zeros, zeros
    cs = -torch.ones_like(beta)
    w, w2 = torch.zeros_like(b), torch.zeros_like(b)
    status = torch.zeros(nbatch, dtype=torch.int64, device=b.device)
    iterations = torch.zeros_like(status)
    status = _mark(status, ~torch.isfinite(beta), Status.NONFINITE)
    active = torch.isfinite(beta) & (beta > threshold)
    sync = _sync_every(b)
    for k in range(maxiter):
        if k % sync == 0 and not bool(active.any()):
            break
        v = _div(y, beta.unsqueeze(-1), active.unsqueeze(-1))  # Lanczos step
        y = matvec(v)
        iterations = iterations + active
        if k > 0:
            y = y - _div(beta, old_beta, active).unsqueeze(-1) * r1
        alfa = _dot(v, y)
        y = y - _div(alfa, beta, active).unsqueeze(-1) * r2
        r1, r2 = r2, y
        old_beta, beta = beta, _norm(y)
        t_norm2 = t_norm2 + alfa**2 + old_beta**2 + beta**2
        old_eps = epsln  # QR of T_k by Givens rotations
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = torch.hypot(gbar, beta)
        nonfinite = active & ~torch.isfinite(gamma)
        # ||A r|| / (||T|| ||r||) of the last iterate: a least-squares residual
        # (singular A, inconsistent b) cannot be reduced any further.
        t_norm = t_norm2.sqrt()
        least_squares = torch.hypot(gbar, dbar) <= _singular_tol(b.dtype) * t_norm
        singular = active & ~nonfinite & (least_squares | ~(gamma > eps * t_norm))
        status = _mark(_mark(status, nonfinite, Status.NONFINITE), singular, Status.BREAKDOWN)
        active = active & ~nonfinite & ~singular
        cs, sn = _div(gbar, gamma, active), _div(beta, gamma, active)
        phi, phibar = cs * phibar, sn * phibar
        w1, w2 = w2, w
        direction = v - old_eps.unsqueeze(-1) * w1 - delta.unsqueeze(-1) * w2
        w = _div(direction, gamma.unsqueeze(-1), active.unsqueeze(-1))
        x = torch.where(active.unsqueeze(-1), x + phi.unsqueeze(-1) * w, x)
        active = active & (phibar.abs() > threshold)
    status = _mark(status, active, Status.MAX_ITERATIONS)
    return x, iterations, status


# --------------------------------------------------------------------------- NormalCG


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
    ``torch.func``.  The condition number is squared: prefer :class:`GMRES` for
    non-singular systems.

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

    def _solve(self, matvec, b, x0, flatten):
        try:
            _, vjp_fn = torch.func.vjp(matvec, b)
        except Exception as err:
            raise RuntimeError(
                "NormalCG: could not form A^T v as the VJP of `matvec` with "
                f"torch.func.vjp ({type(err).__name__}: {err}); write `matvec` with "
                "differentiable torch operations, or use GMRES / Direct('lstsq')."
            ) from err

        def normal(v: torch.Tensor) -> torch.Tensor:
            return vjp_fn(matvec(v))[0]

        rhs = vjp_fn(b)[0]
        x, iterations, status = self.inner._solve(normal, rhs, x0, flatten)
        normal_residual = _norm(rhs - normal(x))
        status = _final_status(self.inner, status, normal_residual, _norm(rhs))
        return x, iterations, status


# --------------------------------------------------------------------------- Direct

_DIRECT_METHODS = ("cholesky", "lu", "lstsq")


@dataclass(frozen=True)
class Direct(LinearSolver):
    r"""Dense direct solve of ``A x = b`` after materialising ``A``.

    Builds the ``(B, n, n)`` matrix with one :func:`torch.func.vmap` of
    ``matvec`` over the identity basis (``n`` products, ``O(B n^2)`` memory),
    then factorises it:

    * ``"cholesky"``: :math:`A = L L^\top` for symmetric positive-definite
      :math:`A` (Hessians of strictly convex inner problems).  A failed
      factorisation (indefinite :math:`A`), a matrix that is not symmetric to
      ``sqrt(eps)`` relative, or a numerically singular one (pivots
      :math:`\min_i L_{ii}^2 \le n\,\mathrm{eps} \max_i L_{ii}^2`) is reported as
      :attr:`~bilevel.status.Status.BREAKDOWN` for that element (``x = 0``),
      not raised;
    * ``"lu"``: :math:`P A = L U` with partial pivoting, for non-symmetric (and
      symmetric indefinite) non-singular systems; a numerically singular
      :math:`U` (:math:`\min_i |U_{ii}| \le n\,\mathrm{eps} \max_i |U_{ii}|`) is a
      BREAKDOWN;
    * ``"lstsq"``: the minimum-norm least-squares solution :math:`A^+ b`
      (SVD-based: LAPACK ``gelsd`` on CPU, the pseudo-inverse elsewhere), for
      singular or inconsistent systems.

    There is no tolerance; ``x0`` is ignored and ``info.iterations`` is ``n``
    (the products spent building :math:`A`).

    Args:
        method: ``"cholesky"`` (default), ``"lu"`` or ``"lstsq"``.

    Raises:
        RuntimeError: if ``matvec`` cannot be batched by :func:`torch.func.vmap`
            (e.g. it calls ``.item()`` or NumPy).

    Example:
        >>> import torch
        >>> from bilevel.implicit.linear_solve import Direct
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> x, info = Direct()(lambda v: A @ v, torch.ones(2, dtype=torch.float64))
        >>> torch.allclose(A @ x, torch.ones(2, dtype=torch.float64)), int(info.iterations)
        (True, 2)

    References:
        Golub, G. H. and Van Loan, C. F. `Matrix Computations, 4th edition
        <https://doi.org/10.56021/9781421407944>`_. Johns Hopkins University
        Press, 2013.
    """

    method: str = "cholesky"

    def __post_init__(self):
        _check_fields(
            self,
            method=(lambda v: v in _DIRECT_METHODS, f"one of {', '.join(map(repr, _DIRECT_METHODS))}"),
        )

    def _solve(self, matvec, b, x0, flatten):
        A = _materialize(matvec, b)
        rhs = b.unsqueeze(-1)
        eps = torch.finfo(b.dtype).eps
        if self.method == "cholesky":
            L, info = torch.linalg.cholesky_ex(A)
            symmetric = torch.linalg.matrix_norm(A - A.mT) <= math.sqrt(eps) * torch.linalg.matrix_norm(A)
            ok = (info == 0) & symmetric & _regular_pivots(L.diagonal(dim1=-2, dim2=-1) ** 2, eps)
            x = torch.cholesky_solve(rhs, L).squeeze(-1)
        elif self.method == "lu":
            LU, pivots, info = torch.linalg.lu_factor_ex(A)
            ok = (info == 0) & _regular_pivots(LU.diagonal(dim1=-2, dim2=-1), eps)
            x = torch.linalg.lu_solve(LU, pivots, rhs).squeeze(-1)
        else:
            ok = torch.ones(b.shape[0], dtype=torch.bool, device=b.device)
            if b.device.type == "cpu":
                x = torch.linalg.lstsq(A, rhs, driver="gelsd").solution.squeeze(-1)
            else:  # only the full-rank driver "gels" exists off CPU
                x = (torch.linalg.pinv(A) @ rhs).squeeze(-1)
        x = torch.where(ok.unsqueeze(-1), x, 0)
        status = _mark(torch.zeros_like(ok, dtype=torch.int64), ~ok, Status.BREAKDOWN)
        return x, torch.full_like(status, b.shape[-1]), status


def _regular_pivots(pivots: torch.Tensor, eps: float) -> torch.Tensor:
    """Whether the pivots of a factorisation are not numerically singular:
    ``min |pivot| > n eps max |pivot|`` (a lower bound on the condition number)."""
    size = pivots.abs()
    return size.amin(-1) > pivots.shape[-1] * eps * size.amax(-1)


def _materialize(matvec: FlatMatvec, b: torch.Tensor) -> torch.Tensor:
    """The ``(B, n, n)`` matrices of a flat batched ``matvec``, by one vmap over ``e_j``."""
    nbatch, n = b.shape
    basis = torch.eye(n, dtype=b.dtype, device=b.device).unsqueeze(1).expand(n, nbatch, n)
    try:
        columns = torch.func.vmap(matvec)(basis)  # columns[j, i] = A_i e_j
    except Exception as err:
        matvec(b)  # a matvec that fails without vmap too: let its own error through
        raise RuntimeError(
            "Direct: `matvec` could not be batched with torch.func.vmap "
            f"({type(err).__name__}: {err}). Direct materialises A with one vmap over "
            "the identity basis; make `matvec` vmap-compatible (no .item(), NumPy or "
            "data-dependent Python control flow) or use an iterative solver (CG, GMRES)."
        ) from err
    return columns.permute(1, 2, 0)


__all__ = [
    "LinearSolveInfo",
    "LinearSolver",
    "CG",
    "Neumann",
    "GMRES",
    "BiCGStab",
    "MINRES",
    "NormalCG",
    "Direct",
    "resolve_maxiter",
]
