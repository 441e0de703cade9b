r"""The certificate of an implicit gradient: optimality and linear-solve residuals.

:func:`report` runs after every adjoint solve.  It measures the optimality
residual ``||F(sol, args)||`` at the point where the implicit function theorem
is applied (free: it is the primal output of the linearization) and turns it
into a scale-free number, the estimated distance to the root

.. math:: \|\delta\| = \|J^{-1} F\| \approx \|F\| \, \|u\| / \|b\|,

where :math:`J^\top u = b` is the adjoint system just solved (so
:math:`\|b\|/\|u\|` is a curvature scale of :math:`J`, between its smallest and
largest singular values).  It is unchanged when the objective is rescaled and is
compared with ``residual_tol * max(1, ||sol||)`` (and not warned about where the
adjoint solve broke down: ``u`` is then meaningless, and the solve's own warning
says what happened).  It also reads the linear
solve's info; a failure becomes a warning naming the stage, the residual and the
remedy, or a :class:`~bilevel.status.BilevelError` in strict mode.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .._tolerance import default_residual_tol
from .._tree import all_finite, tree_leaves
from ..status import BilevelError, ConvergenceWarning, CurvatureWarning, OptimalityWarning, Status
from .linear_solve import LinearSolveInfo
from .linear_solve._base import _on_host


@dataclass(frozen=True)
class ImplicitInfo:
    r"""Certificate of one implicit differentiation (tensors of the batch shape).

    Attributes:
        optimality_residual: ``||F(sol, args)||`` at the solution (``None`` where
            it was not measured, e.g. in a forward-mode product).
        distance_to_root: the estimated Newton correction ``||F|| ||u|| / ||b||``
            (same units as ``sol``; ``None`` where not measured, 0 where ``b = 0``).
        solution_norm: ``||sol||``.
        residual_tol: the tolerance ``distance_to_root`` was checked against,
            relative to ``max(1, ||sol||)``.
        linear_solve: the adjoint solve's :class:`LinearSolveInfo`.
        damping: the damping added to the system (0 if none).
        solver: the linear solver used.
        negative_curvature: where the system is the Hessian of an objective that
            ``sol`` should minimize (:func:`~bilevel.hypergrad`'s inner problem),
            which elements' Hessian is proven not positive definite: by the adjoint
            solution :math:`u`, :math:`u^\top H u = u^\top b - u^\top r < 0` with
            :math:`r = b - H u`, or by the solver itself
            (``linear_solve.negative_curvature``; see :func:`report`); ``None``
            where not tested.

    Example:
        A function made differentiable by :func:`~bilevel.custom_root` keeps the
        certificate of its last backward pass in ``.last_info``:

        >>> import torch, bilevel
        >>> f = lambda w, lam: 0.5 * ((w - 1) ** 2).sum() + 0.5 * lam * (w ** 2).sum()
        >>> @bilevel.custom_root(bilevel.implicit.stationarity(f))
        ... def argmin(lam):                           # w* = 1 / (1 + lam)
        ...     return torch.ones(3, dtype=lam.dtype) / (1 + lam)
        >>> lam = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        >>> argmin(lam).sum().backward()
        >>> lam.grad                                   # -3 / (1 + lam)^2
        tensor(-0.7500, dtype=torch.float64)
        >>> info = argmin.last_info
        >>> info.ok, bool(info.linear_solve.converged), float(info.optimality_residual)
        (True, True, 0.0)
    """

    optimality_residual: Optional[torch.Tensor]
    distance_to_root: Optional[torch.Tensor]
    solution_norm: torch.Tensor
    residual_tol: float
    linear_solve: LinearSolveInfo
    damping: float
    solver: Any
    negative_curvature: Optional[torch.Tensor] = None

    @property
    def optimal(self) -> torch.Tensor:
        """Which batch elements satisfy the optimality condition to tolerance."""
        if self.distance_to_root is None:
            return torch.ones_like(self.solution_norm, dtype=torch.bool)
        return self.distance_to_root <= self.residual_tol * self.solution_norm.clamp_min(1.0)

    @property
    def ok(self) -> bool:
        """Both certificates pass for every batch element (and no direction of
        negative curvature was found where a minimum is expected)."""
        curved = self.negative_curvature is not None and bool(self.negative_curvature.any())
        return bool(self.optimal.all()) and bool(self.linear_solve.converged.all()) and not curved


def batch_norm(tree: Any, batch_dims: int) -> torch.Tensor:
    """Euclidean norm of a tree per batch element (over all non-batch dims)."""
    norms = [torch.linalg.vector_norm(x.reshape(*x.shape[:batch_dims], -1), dim=-1) for x in tree_leaves(tree)]
    if len(norms) == 1:
        return norms[0]
    dtype = functools.reduce(torch.promote_types, [n.dtype for n in norms])  # trees may mix dtypes
    return torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in norms]), dim=0)


def _elements(mask: torch.Tensor) -> str:
    if mask.dim() == 0:
        return ""
    idx = mask.reshape(-1).nonzero().reshape(-1).tolist()
    return f" (batch elements {idx[:8]}{'...' if len(idx) > 8 else ''})"


def _fail(category: type, message: str, strict: bool) -> None:
    if strict:
        raise BilevelError(message)
    warnings.warn(message, category, stacklevel=4)


def report(system, value, sol, info: LinearSolveInfo, x, b=None) -> ImplicitInfo:
    r"""Check and record the certificate of one adjoint solve :math:`M x = b`; returns it.

    Where ``system.residual`` is the gradient of an objective that the solution
    should minimize (``minimized`` set on the condition, as for
    :func:`~bilevel.hypergrad`'s inner problem) and ``b`` is given, the solve also
    tests the curvature for free: with the true residual :math:`r = b - M x`,

    .. math:: x^\top M x = x^\top b - x^\top r \le x^\top b + \|x\|\,\|r\|,

    so :math:`x^\top b < -(\|x\|\,\|r\| + \sqrt{\epsilon}\,\|x\|\,\|b\|)` proves a
    direction of negative curvature (beyond rounding): the solution is a saddle
    point or a maximum, which a solver for indefinite systems (MINRES, GMRES, LU)
    solves without complaint.  CG never shows it (its iterates keep
    :math:`x^\top b > 0` until it breaks down, which it reports itself); the test
    is one-sided, it misses a saddle whose negative directions barely meet ``b``.
    A solver that proves negative curvature itself (``info.negative_curvature``:
    MINRES counts the negative eigenvalues of its Lanczos matrix, which sees every
    direction of the Krylov space; :class:`Auto` reads the spectrum of the matrix
    whose Cholesky factorization broke down, every direction) is believed too,
    with or without ``b``.

    Every check is decided by one host read (the flags are stacked on the
    device), so a backward pass on an accelerator waits for it once; a single
    system on the CPU is checked on Python numbers."""
    stage, strict = system.stage, system.options.strict
    x_leaves = tree_leaves(x)
    dtype = x_leaves[0].dtype
    tol = system.options.residual_tol
    tol = default_residual_tol(dtype) if tol is None else tol
    sol_norm = batch_norm(sol, system.batch_dims)
    x_norm = batch_norm(x, system.batch_dims)
    optimality = distance = None
    measured = value is not None
    certify = system.certify and measured
    if measured:
        optimality = batch_norm(value, system.batch_dims)
    curved = None
    if getattr(system.residual, "minimized", False):
        if b is not None:
            curved = _negative_curvature(x, b, x_norm, info, system.batch_dims)
        if info.negative_curvature is not None:  # the solver's own proof (MINRES, Auto's dense path)
            proven = info.negative_curvature & (info.status != Status.NONFINITE)
            curved = proven if curved is None else curved | proven
    if _on_host(x_norm):
        failures = _host_failures(tol, sol_norm, x_norm, optimality, info)
        if measured:
            distance = torch.full_like(optimality, failures.pop())
            if not certify:
                failures.pop()
    else:
        if measured:
            b_norm = info.b_norm  # the norm of the right-hand side just solved for
            ratio = x_norm / b_norm.clamp_min(torch.finfo(b_norm.dtype).tiny)
            distance = torch.where(b_norm > 0, optimality * ratio, 0.0)
        failures = None
    certificate = ImplicitInfo(optimality, distance, sol_norm, tol, info, system.damping, system.solve, curved)
    if failures is None:
        # ||x|| is finite exactly when every entry is, short of an overflow (told apart
        # below). A NONFINITE status with a finite x is a stale iterate, no gradient either.
        flags = [torch.isfinite(x_norm).all(), (info.status == Status.NONFINITE).any(), (~info.converged).any(),
                 (info.status == Status.BREAKDOWN).any()]
        if certify:
            flags.append((~certificate.optimal & (info.status != Status.BREAKDOWN)).any())
            flags.append(torch.isfinite(optimality).all())
        if curved is not None:
            flags.append(curved.any())
        failures = torch.stack(flags).tolist()
        negative = failures.pop() if curved is not None else False  # (read with the other flags)
    else:
        negative = curved is not None and bool(curved.any())
        if certify:
            failures.append(math.isfinite(float(optimality)))
    finite, stale, any_failed, singular, *any_bad = failures
    if certify and not any_bad[1] and not all_finite(tree_leaves(value)):  # (not a norm that overflows)
        entries = [torch.isfinite(t.reshape(*t.shape[:system.batch_dims], -1)).all(-1) for t in tree_leaves(value)]
        raise FloatingPointError(
            f"{stage}: the optimality residual at the solution is NaN or inf"
            f"{_elements(~torch.stack(entries).all(0))}: the condition (for a bilevel problem, the inner "
            "gradient) is not finite there, so the implicit gradient is undefined. Check the objective at the "
            "solution (a log or sqrt outside its domain, 0 * inf).")
    if not finite or stale:
        if not all_finite(x_leaves):
            what = "NaN or inf"
        elif stale:
            what = "a stale iterate after NaN or inf appeared in the operator's products"
        else:
            what = "a solution whose norm overflows"
        raise FloatingPointError(f"{stage}: the adjoint linear solve returned {what}; {info.summary()}")
    if certify and any_bad[0]:
        # not where the adjoint solve broke down: its u, hence the distance estimate, is
        # meaningless there (the CurvatureWarning below says what happened)
        bad = ~certificate.optimal & (info.status != Status.BREAKDOWN)
        worst = int(torch.where(bad, distance, -1).reshape(-1).argmax())
        _fail(
            OptimalityWarning,
            f"{stage}: the optimality residual at the solution is "
            f"{float(optimality.reshape(-1)[worst]):.3g}{_elements(bad)}, an estimated distance "
            f"{float(distance.reshape(-1)[worst]):.3g} to the root, above {tol:.3g} x max(1, ||sol||): "
            "the solver did not converge, so the implicit gradient is inexact. Solve the inner "
            "problem more tightly.",
            strict,
        )
    if negative:
        _fail(CurvatureWarning, _negative_curvature_message(stage, curved, system.damping), strict)
    if any_failed:
        category = CurvatureWarning if singular else ConvergenceWarning
        hint = (
            " The system is singular or indefinite: the inner problem may be non-convex or its "
            "solution not unique; pass damping=..., a least-squares solve, or use a single-loop "
            "method (penalty, MEHA, BAMM)." if singular else ""
        )
        _fail(category, f"{stage}: {info.summary()}.{hint}{_autocast_hint(x_leaves[0].device.type)}", strict)
    system.options.record(certificate)
    return certificate


def _negative_curvature(x, b, x_norm: torch.Tensor, info: LinearSolveInfo, batch_dims: int) -> torch.Tensor:
    """Per element: whether ``x^T b < -(||x|| ||r|| + sqrt(eps) ||x|| ||b||)`` (see
    :func:`report`), ``False`` where the solve broke down (reported as such) or is
    not finite (an error of its own)."""
    terms = [(u.conj() * v).real.reshape(*u.shape[:batch_dims], -1).sum(-1)
             for u, v in zip(tree_leaves(x), tree_leaves(b))]
    curvature = terms[0] if len(terms) == 1 else torch.stack(terms).sum(0)
    slack = math.sqrt(torch.finfo(x_norm.dtype).eps)
    bound = x_norm * (info.residual_norm.to(x_norm.dtype) + slack * info.b_norm.to(x_norm.dtype))
    return (curvature.to(x_norm.dtype) < -bound) & (info.status != Status.BREAKDOWN) & (info.status != Status.NONFINITE)


def _negative_curvature_message(stage: str, curved: torch.Tensor, damping: float) -> str:
    shifted = f" + {damping:g} I" if damping else ""
    return (
        f"{stage}: the Hessian{shifted} of the inner objective is not positive definite at the solution"
        f"{_elements(curved)}: the adjoint solution u has u^T H u < 0 (measured by u^T b and the solve's "
        "residual), or the solver found an eigenvalue below -sqrt(eps) times the largest (MINRES's Lanczos "
        "matrix, or the matrix of the default solve): a direction of negative curvature, or a Hessian "
        "singular to working precision. The point is a saddle or a maximum of the inner objective, not a "
        "minimizer, and the implicit gradient "
        "follows that stationary point. Solve the inner problem to a minimum, or pass damping= larger than "
        "the negative curvature if this is intended."
    )


def _autocast_hint(device_type: str) -> str:
    """Where :func:`torch.autocast` is on, what limits the solve (its remedies name float64)."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # an older torch, or a device type autocast does not know
        return ""
    if not enabled:
        return ""
    dtype = str(torch.get_autocast_dtype(device_type)).replace("torch.", "")
    return (f" torch.autocast is on ({dtype}): the objective's products, hence the system, are computed in "
            f"{dtype}, whose precision limits the solve; compute the implicit gradient outside autocast.")


def _host_failures(tol, sol_norm, x_norm, optimality, info: LinearSolveInfo) -> list:
    """The flags of :func:`report` for a single system on the CPU, from Python
    numbers: ``[finite, stale, failed, singular]``, then ``bad`` and the
    distance to the root when ``optimality`` is measured."""
    code, x_size = int(info.status), float(x_norm)
    flags = [math.isfinite(x_size), code == Status.NONFINITE, code != Status.SUCCESS, code == Status.BREAKDOWN]
    if optimality is not None:
        b_size = float(info.b_norm)
        distance = float(optimality) * x_size / max(b_size, torch.finfo(info.b_norm.dtype).tiny) if b_size > 0 else 0.0
        bad = code != Status.BREAKDOWN and not distance <= tol * max(float(sol_norm), 1.0)
        flags += [bad, distance]
    return flags
