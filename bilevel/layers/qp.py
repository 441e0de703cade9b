r"""A batched quadratic-program solver in torch and a layer differentiating through it.

:func:`qp_solve` solves, for every element of a batch at once,

.. math::

    z^\star = \operatorname*{argmin}_z \ \tfrac12 z^\top Q z + q^\top z
    \quad \text{s.t.}\quad A z = b,\ \ G z \le h,

by a primal-dual interior-point method (Mehrotra's predictor-corrector, as in
OptNet's solver): every iteration solves the batch of reduced KKT systems
:math:`\begin{pmatrix} Q + G^\top \operatorname{diag}(\lambda/s) G & A^\top \\ A & 0\end{pmatrix}`
by batched Cholesky factorizations of :math:`H = Q + G^\top \operatorname{diag}(\lambda/s) G`
and of its Schur complement, with bound rows of ``G`` (one nonzero: :math:`z_j \le u`,
:math:`z \ge 0`) added to the diagonal of ``H`` instead of multiplied out (a diagonal ``Q``
with bounds only, as in projections onto the simplex or a box, costs :math:`O(n)` per
iteration); on the device and in the dtype of the inputs (no NumPy round trip).  It
stops each element at a relative accuracy of ``eps ** 0.75`` of the dtype (about
``2e-12`` in float64).  The start is CVXOPT's least-squares point with per-row
multipliers :math:`\lambda_i = 1 / s_i` (centred: every :math:`s_i \lambda_i = 1`).

The solution is differentiable in all of :math:`Q, q, A, b, G, h` by the
implicit function theorem on the KKT conditions at the solution
:math:`(z, \nu, \lambda)`:

.. math::

    F = \begin{pmatrix} Q z + q + A^\top \nu + G^\top \lambda \\ A z - b \\
        \operatorname{diag}(\lambda)(G z - h) \end{pmatrix} = 0, \qquad
    K = \partial_{(z,\nu,\lambda)} F = \begin{pmatrix} Q & A^\top & G^\top \\ A & 0 & 0 \\
        \operatorname{diag}(\lambda) G & 0 & \operatorname{diag}(G z - h) \end{pmatrix}.

A backward pass solves the adjoint system :math:`K^\top (d_z, d_\nu, d_\lambda) =
(\bar z, \bar\nu, \bar\lambda)` (the cotangents of the solution and, where a loss uses
them, of the multipliers; one batched LU of the system reduced by the active set: active bounds
fix their variables, inactive rows drop out; ``bilevel/layers/_qp_adjoint.py``) and
returns the closed forms of Amos & Kolter:

.. math::

    \bar q = -d_z,\ \ \bar Q = -\tfrac12(d_z z^\top + z d_z^\top),\ \
    \bar A = -(\nu d_z^\top + d_\nu z^\top),\ \ \bar b = d_\nu,\ \
    \bar G = -(\lambda d_z^\top + (\lambda \odot d_\lambda) z^\top),\ \
    \bar h = \lambda \odot d_\lambda.

:math:`K` is invertible when the active constraint gradients are linearly
independent, strict complementarity holds and :math:`Q` is positive definite on
their null space; at a degenerate solution the minimum-norm least-squares
adjoint is used and a :class:`~bilevel.status.CurvatureWarning` says so.

Under :func:`torch.func.vmap` the mapped problems join the batch (one solve of
``V * B`` problems), and under :func:`torch.func.jacrev` the ``V`` adjoint systems
of the Jacobian's rows are solved as one batch too; forward mode
(:func:`torch.func.jacfwd`) and second derivatives through a mapped backward pass
are refused with the alternative named (``torch.autograd.grad`` with
``create_graph=True`` gives second derivatives).

References:
    Amos, B. and Kolter, J. Z. `OptNet: Differentiable Optimization as a Layer in
    Neural Networks <https://arxiv.org/abs/1703.00443>`_. ICML 2017.
    Mehrotra, S. `On the implementation of a primal-dual interior point method
    <https://doi.org/10.1137/0802028>`_. SIAM J. Optimization, 1992.
"""

from __future__ import annotations

import enum
import math
import warnings
from dataclasses import dataclass, field

import torch

from .._autograd_context import refuse_grads_batched_by_autograd
from .._checks import check_fields as _check_fields
from .._checks import positive_int as _positive_int
from .._checks import tol_ok as _tol_ok
from ..implicit.linear_solve._base import _sync_every
from ..status import BilevelError, BilevelWarning
from ._checks import check_tensor
from ._qp_adjoint import adjoint as _adjoint
from ._qp_kkt import NewtonSystem, Quadratic, Rows, first, max_abs, row_sizes, scale_rows, shared, structure
from ._qp_kkt import inf_norm as _inf_norm
from ._qp_kkt import mv as _mv
from ._qp_kkt import on_host as _on_host

__all__ = ["QPInfo", "QPLayer", "QPStatus", "SolveError", "SolveWarning", "qp_solve"]


class QPStatus(enum.IntEnum):
    """Outcome of :func:`qp_solve` for one batch element (codes shared with
    :class:`~bilevel.status.Status` where they mean the same).

    ``QPInfo.status`` holds these codes as an ``int64`` tensor of the batch
    shape; with ``check=True`` (the default) any code but ``SOLVED`` raises a
    :class:`SolveError` naming it.

    Example:
        >>> import torch
        >>> from bilevel.layers import QPStatus, qp_solve
        >>> Q, q = torch.eye(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        >>> G = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)    # z <= h[0], -z <= h[1]
        >>> h = torch.tensor([[1.0, 1.0],                               # |z| <= 1
        ...                   [-1.0, -1.0]], dtype=torch.float64)       # z <= -1 and z >= 1
        >>> z, info = qp_solve(Q, q, G=G, h=h, check=False, return_info=True)
        >>> [QPStatus(int(code)).name for code in info.status]
        ['SOLVED', 'INFEASIBLE']
    """

    SOLVED = 0
    """The primal and dual residuals and the duality gap met the tolerance."""
    MAX_ITERATIONS = 1
    """The tolerance was not met (``maxiter`` ran out, or the iterates stopped
    improving) and no certificate of infeasibility or unboundedness was found."""
    NONFINITE = 3
    """A Newton step was NaN or infinite, and no certificate of infeasibility or
    unboundedness was found."""
    INFEASIBLE = 5
    """No point satisfies ``Az = b, Gz <= h``: a Farkas certificate was found."""
    UNBOUNDED = 6
    """The objective decreases without bound along a feasible direction ``d``
    (``Qd = 0``, ``Ad = 0``, ``Gd <= 0``, ``q^T d < 0``)."""


_HINTS = {
    QPStatus.MAX_ITERATIONS: "raise `maxiter` or loosen `tol`",
    QPStatus.NONFINITE: "check the inputs for NaN/inf and the scaling of the problem",
    QPStatus.INFEASIBLE: "the constraints Az = b, Gz <= h have no common point (a Farkas certificate was found)",
    QPStatus.UNBOUNDED: (
        "the objective decreases without bound along a feasible direction (Q is not positive "
        "definite there): add constraints or make Q positive definite"
    ),
}


class SolveError(BilevelError):
    """An optimization layer could not solve some batch elements.

    Attributes:
        elements: the indices of the failed batch elements (``[0]`` unbatched).
        statuses: their status names, e.g. ``"INFEASIBLE"``.
    """

    def __init__(self, message: str, elements: list, statuses: list):
        super().__init__(message)
        self.elements = elements
        self.statuses = statuses


class SolveWarning(BilevelWarning):
    """Some problems of a batch given to a layer could not be solved: their
    outputs are NaN, the other elements are unaffected.

    Attributes:
        elements: the indices of the failed batch elements.
        statuses: their status names, e.g. ``"INFEASIBLE"``.
    """

    def __init__(self, message: str, elements: list, statuses: list):
        super().__init__(message)
        self.elements = elements
        self.statuses = statuses


def settle_failures(
    outputs: tuple, failed: list, statuses: list, batched: bool, check: bool | None, message: str
) -> tuple:
    """Act on the failed elements of a layer's batch (one policy for every layer).

    ``check=True`` raises :class:`SolveError`; ``check=False`` warns with a
    :class:`SolveWarning` and returns the outputs with the failed elements' rows
    set to NaN (no gradient flows to them); ``check=None`` (the layers' default)
    raises for an unbatched problem, which has nothing else to return, and
    warns for a batch, whose other elements stand.

    Args:
        outputs: tensors with the batch in dimension 0 (size 1 when unbatched).
        failed: indices of the failed elements.
        statuses: their status names.
        batched: whether the call was batched.
        check: the policy above.
        message: what failed and why, naming the elements (without the remedy).

    Returns:
        ``outputs``, with NaN rows for the failed elements.
    """
    if not failed:
        return outputs
    if check or (check is None and not batched):
        raise SolveError(message, failed if batched else [0], statuses)
    warnings.warn(SolveWarning(
        message + "\nTheir outputs are NaN; mask them out of the loss (see the layer's `last_failed`), or pass "
        "check=True to raise instead.", failed, statuses), stacklevel=3)
    index = torch.tensor(failed, device=outputs[0].device)
    return tuple(out.index_fill(0, index, math.nan) for out in outputs)


@dataclass(frozen=True)
class QPInfo:
    """Per-element outcome of :func:`qp_solve` (tensors of the batch shape).

    Attributes:
        eq_dual: multipliers :math:`\\nu` of ``Az = b``, shape ``(..., p)``.
        ineq_dual: multipliers :math:`\\lambda \\ge 0` of ``Gz <= h``, shape ``(..., m)``.
        slack: :math:`s = h - Gz \\ge 0`, shape ``(..., m)``.
        iterations: interior-point iterations run.
        primal_residual: :math:`\\max(\\|Az - b\\|_\\infty, \\|Gz + s - h\\|_\\infty)`.
        dual_residual: :math:`\\|Qz + q + A^\\top\\nu + G^\\top\\lambda\\|_\\infty`.
        gap: the duality gap :math:`s^\\top\\lambda`.
        status: :class:`QPStatus` codes (``int64``).
        degenerate: ``True`` where the backward pass found the KKT matrix singular
            or nearly so (a weakly active constraint, dependent active
            constraints): the gradient there is one generalized gradient.  Filled
            in by ``backward``; all ``False`` before it runs.

    Example:
        >>> import torch
        >>> from bilevel.layers import qp_solve
        >>> Q, q = torch.eye(2, dtype=torch.float64), torch.tensor([-1.0, -1.0], dtype=torch.float64)
        >>> G, h = torch.ones(1, 2, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
        >>> z, info = qp_solve(Q, q, G=G, h=h, return_info=True)   # project (1, 1) onto z1 + z2 <= 1
        >>> bool(info.converged), info.ineq_dual.round(decimals=6)      # active: a positive multiplier
        (True, tensor([0.5000], dtype=torch.float64))
        >>> float(info.slack) < 1e-9, info.eq_dual.shape                 # no equality constraints
        (True, torch.Size([0]))
    """

    eq_dual: torch.Tensor
    ineq_dual: torch.Tensor
    slack: torch.Tensor
    iterations: torch.Tensor
    primal_residual: torch.Tensor
    dual_residual: torch.Tensor
    gap: torch.Tensor
    status: torch.Tensor
    degenerate: torch.Tensor

    @property
    def converged(self) -> torch.Tensor:
        """``status == QPStatus.SOLVED``, per element (a bool tensor)."""
        return self.status == QPStatus.SOLVED


# ----------------------------------------------------------------------------- input checks

_SHAPES = {"Q": ("n", "n"), "q": ("n",), "A": ("p", "n"), "b": ("p",), "G": ("m", "n"), "h": ("m",)}


def _finite(tensors: dict) -> dict:
    """Per named tensor, whether it is all finite (one host read).  Under
    :func:`torch.func.vmap` the answer waits for the vmap rule, which reads the
    physical tensors (:meth:`_QPFunction.vmap`): every name passes here."""
    if any(_vmapped(t) for t in tensors.values()):
        return dict.fromkeys(tensors, True)
    return dict(zip(tensors, torch.stack([torch.isfinite(t).all() for t in tensors.values()]).tolist()))


def _check_inputs(Q, q, A, b, G, h) -> tuple:
    """Check shapes, dtypes and devices; return the batch shape and the six tensors
    expanded to ``(B, ...)`` (``B = 1`` unbatched), absent constraints as empty tensors."""
    if (A is None) != (b is None):
        raise ValueError("`A` and `b` must be given together (the equality constraints Az = b), or both None.")
    if (G is None) != (h is None):
        raise ValueError("`G` and `h` must be given together (the inequality constraints Gz <= h), or both None.")
    given = {k: v for k, v in {"Q": Q, "q": q, "A": A, "b": b, "G": G, "h": h}.items() if v is not None}
    for name, t in given.items():
        check_tensor(t, f"`{name}`", q, "`q`", "qp_solve")
    if q.dim() not in (1, 2):
        raise ValueError(f"qp_solve: `q` must have shape (n,) or (B, n); got {tuple(q.shape)}.")
    if q.shape[-1] == 0:
        raise ValueError(f"qp_solve: the problem is empty (n=0 variables: `q` has shape {tuple(q.shape)}).")
    sizes = {"n": q.shape[-1], "p": None if A is None else A.shape[-2], "m": None if G is None else G.shape[-2]}
    finite = _finite(given)
    batch = set()
    for name, t in given.items():
        core = _SHAPES[name]
        expected = tuple(sizes[d] for d in core)
        if t.dim() not in (len(core), len(core) + 1) or tuple(t.shape[-len(core):]) != expected:
            want = "(" + ", ".join(f"{d}={sizes[d]}" for d in core) + ")"
            raise ValueError(
                f"qp_solve: `{name}` must have shape {want} or (B, {want[1:]} for a batch; got {tuple(t.shape)}."
            )
        if t.dim() == len(core) + 1:
            batch.add(t.shape[0])
        if not finite[name]:
            raise FloatingPointError(f"qp_solve: `{name}` contains NaN or inf.")
    if len(batch) > 1:
        shapes = {k: tuple(v.shape) for k, v in given.items()}
        raise ValueError(f"qp_solve: the inputs have different batch sizes {sorted(batch)}: {shapes}.")
    B = batch.pop() if batch else None
    n, dtype, device = sizes["n"], q.dtype, q.device

    def full(t, name, *core):
        if t is None:
            return torch.zeros((1 if B is None else B,) + core, dtype=dtype, device=device)
        return t.expand((1 if B is None else B,) + t.shape) if t.dim() == len(_SHAPES[name]) else t

    out = (
        full(Q, "Q"), full(q, "q"), full(A, "A", 0, n), full(b, "b", 0), full(G, "G", 0, n), full(h, "h", 0)
    )
    return B, out


# ----------------------------------------------------------------------------- interior point


def _vmapped(x: object) -> bool:
    """Whether ``x`` is a tensor batched by ``torch.func.vmap``, also below the wrappers
    of other transforms (``vmap(jacrev(f))``: a gradient-tracking tensor around a
    batched one), where its values cannot be read on the host."""
    functorch = torch._C._functorch
    if not hasattr(functorch, "is_batchedtensor"):
        return False
    while torch.is_tensor(x):
        if functorch.is_batchedtensor(x):
            return True
        if not functorch.is_functorch_wrapped_tensor(x):
            return False
        x = functorch.get_unwrapped(x)
    return False


def _max_step(v: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
    """Largest ``a`` in [0, inf) with ``v + a dv >= 0`` per element."""
    ratio = torch.where(dv < 0, -v / torch.where(dv < 0, dv, -torch.ones_like(dv)), torch.full_like(v, math.inf))
    return ratio.amin(-1) if v.shape[-1] else torch.full(v.shape[:-1], math.inf, dtype=v.dtype, device=v.device)


def _start(Q: Quadratic, q, A, b, G: Rows, h):
    """The KKT solution with ``W = I`` (as CVXOPT's ``coneqp``), its slacks shifted into the
    interior, and centred multipliers ``lam_i = 1 / s_i``.  Multipliers shifted like the
    slacks, as ``coneqp`` does, are all of the size of the farthest bound: one bound at 1e9
    (a stand-in for "no bound") gave the near rows multipliers of 1e9, and the iterates
    zig-zagged between the near bounds for 20 or more iterations."""
    m = h.shape[-1]
    z, y = NewtonSystem(Q, G, torch.ones_like(h), A).solve(-q + G.rmv(h), b)
    s = h - G.mv(z)
    if m:
        s = s + torch.clamp_min(1 - s.amin(-1, keepdim=True), 0)
    return z, y, 1 / s, s


def _measure(Q: Quadratic, q, A, b, G: Rows, h, z, y, lam, s):
    """Residuals, the relative merit ``max(pres / p_scale, dres / d_scale, gap / (1 + |obj|))``
    (OSQP-style scales of the residuals) and the three raw figures reported in :class:`QPInfo`."""
    Qz, Az, Gz, ATy, GTl = Q.mv(z), _mv(A, z), G.mv(z), _mv(A.mT, y), G.rmv(lam)
    rd, rp, ri = Qz + q + ATy + GTl, Az - b, Gz + s - h
    gap = (s * lam).sum(-1)
    p_scale = 1 + torch.stack([_inf_norm(b), _inf_norm(h), _inf_norm(Az), _inf_norm(Gz)]).amax(0)
    d_scale = 1 + torch.stack([_inf_norm(q), _inf_norm(Qz), _inf_norm(ATy), _inf_norm(GTl)]).amax(0)
    pobj = 0.5 * (z * Qz).sum(-1) + (q * z).sum(-1)
    pres = torch.maximum(_inf_norm(rp), _inf_norm(ri))
    dres = _inf_norm(rd)
    merit = torch.stack([pres / p_scale, dres / d_scale, gap / (1 + pobj.abs())]).amax(0)
    return (rd, rp, ri), merit, (pres, dres, gap)


def _newton_step(Q: Quadratic, A, G: Rows, z, y, lam, s, residuals):
    """Mehrotra's predictor-corrector step (one factorization, two solves); ``(z, y, lam, s)`` updated."""
    rd, rp, ri = residuals
    m = s.shape[-1]
    kkt = NewtonSystem(Q, G, lam / s, A)
    if m == 0:  # an equality-constrained QP: one Newton step is exact
        dz, dy = kkt.solve(-rd, -rp)
        return z + dz, y + dy, lam, s

    def direction(rc):
        dz, dy = kkt.solve(-rd - G.rmv((rc + lam * ri) / s), -rp)
        ds = -ri - G.mv(dz)
        return dz, dy, ds, (rc - lam * ds) / s

    _, _, ds_a, dl_a = direction(-lam * s)
    alpha = torch.clamp(torch.minimum(_max_step(s, ds_a), _max_step(lam, dl_a)), max=1.0).unsqueeze(-1)
    mu = (s * lam).sum(-1) / m
    mu_aff = ((s + alpha * ds_a) * (lam + alpha * dl_a)).sum(-1) / m
    sigma = (mu_aff / mu.clamp_min(torch.finfo(s.dtype).tiny)).clamp(0, 1) ** 3
    dz, dy, ds, dl = direction(-lam * s + (sigma * mu).unsqueeze(-1) - ds_a * dl_a)
    alpha = torch.clamp(0.99 * torch.minimum(_max_step(s, ds), _max_step(lam, dl)), max=1.0).unsqueeze(-1)
    return z + alpha * dz, y + alpha * dy, lam + alpha * dl, s + alpha * ds


_STALL = 3
"""Iterations without progress (a better merit; near a solution, see ``_PROGRESS``) after
which an element stops: near the solution the KKT matrices lose all precision, and further
steps make the residuals grow."""
_PROGRESS = 0.5
"""Near a solution (best merit below ``sqrt(tol)``) an iteration is progress, and resets the
stall count, where it lowers the merit by this factor (within ``_STALL`` iterations: a linear
rate of 0.79 or better); interior-point iterations there gain far more.  Where the KKT solves
reached their precision floor (a few ``tol``), the merit drifts by small factors from one
iteration to the next, and counting every slightly lower value as progress kept such elements,
and with them the batch, running for several more iterations."""
_STALL_FAR = 30
"""The same while the best merit is above ``sqrt(tol)``: the merit of the first iterations
can grow before it falls (a bound far from the start)."""


def _interior_point(Q, q, A, b, G, h, tol: float, maxiter: int, accept: float | None = None):
    """Mehrotra predictor-corrector on a batch; returns ``(z, y, lam, s, QPInfo)`` at each
    element's best iterate (smallest merit).  An element stops at ``merit <= tol``; one that
    stalls (no progress in ``_STALL`` iterations, ``_STALL_FAR`` far from a solution) is
    SOLVED if its best merit is within ``accept`` (default ``100 tol``), else classified.  The loop asks
    the host whether any element is still running every iteration on the CPU and every 8 on
    accelerators (``_sync_every``), where it makes no other host read."""
    B, device = q.shape[0], q.device
    accept = 100 * tol if accept is None else accept
    # bound rows first (held as columns and coefficients, see Rows); the order is undone at the end
    order, bounds, diagonal, tiles = structure(Q, G)
    Q = Quadratic(Q, diagonal)
    original = (Q, q, A, b, Rows(G), h)
    G, h = (first(G)[:, order].expand(G.shape) if shared(G) else G[:, order]), h[:, order]
    (Q, q, A, b, G, h), factors = _equilibrate(Q, q, A, b, G, h)
    sizes = (Q.size(), _inf_norm(q), max_abs(A), _inf_norm(b), max_abs(G), _inf_norm(h))
    huge = (1 + torch.stack(sizes).amax(0)) / torch.finfo(q.dtype).eps
    G = Rows(G, bounds, tiles)
    if A.shape[-2] and (Q.dense is not None or G.dense is not None):  # a dense H: see Quadratic.augment
        Q.augment(A)
    state = _start(Q, q, A, b, G, h)
    best = list(state)
    best_merit = torch.full((B,), math.inf, dtype=q.dtype, device=device)
    status = torch.full((B,), int(QPStatus.MAX_ITERATIONS), dtype=torch.int64, device=device)
    iterations = torch.zeros(B, dtype=torch.int64, device=device)
    stall = torch.zeros(B, dtype=torch.int64, device=device)
    last = torch.full((B,), math.inf, dtype=q.dtype, device=device)  # merit at the last progress
    active = torch.ones(B, dtype=torch.bool, device=device)
    # Finished elements are frozen (every update is masked by `active`), so looking for the end
    # only every `sync` iterations changes nothing but the work done.
    sync = _sync_every(q)
    for k in range(maxiter + 1):
        residuals, merit, _ = _measure(Q, q, A, b, G, h, *state)
        better = active & (merit < best_merit)
        best = [torch.where(better.unsqueeze(-1), new, old) for new, old in zip(state, best)]
        best_merit = torch.where(better, merit, best_merit)
        done = active & (merit <= tol)
        # far from a solution the merit may rise for a while before it falls (a bound far from
        # the start), so only near one does a short stall stop an element; an infeasible or
        # unbounded element stops as soon as its iterate carries the certificate
        far = best_merit > tol ** 0.5
        # near one, only a merit below _PROGRESS times that of the last progress counts as
        # progress: at the precision floor of the KKT solves the merit drifts by small factors
        progress = better & (far | (merit <= _PROGRESS * last))
        last = torch.where(progress, merit, last)
        stall = torch.where(progress, 0, stall + 1)
        # only elements whose merit stalled can be infeasible or unbounded: on the host, skip
        # the certificates while none did (well-posed batches then cost what they did)
        suspects = active & ~done & far & (stall >= 1)
        if sync == 1 and not bool(suspects.any()):
            proven = farkas = torch.zeros_like(active)
        else:
            farkas, ray = _certificates(Q, q, A, b, G, h, state[0], state[1], state[2])
            proven = suspects & (farkas | ray)
        status = torch.where(proven & farkas, int(QPStatus.INFEASIBLE), status)
        status = torch.where(proven & ~farkas, int(QPStatus.UNBOUNDED), status)
        stalled = active & ~done & ~proven & (stall >= torch.where(far, _STALL_FAR, _STALL))
        status = torch.where(done | (stalled & (best_merit <= accept)), int(QPStatus.SOLVED), status)
        active = active & ~done & ~stalled & ~proven
        if k == maxiter or ((k + 1) % sync == 0 and not bool(active.any())):
            break
        new = _newton_step(Q, A, G, *state, residuals)
        size = _inf_norm(torch.cat(new[:3], -1))
        status = torch.where(active & ~torch.isfinite(size), int(QPStatus.NONFINITE), status)
        # Iterates of infeasible or unbounded problems grow without bound: stop them early.
        keep = active & torch.isfinite(size)
        state = [torch.where(keep.unsqueeze(-1), a, b_) for a, b_ in zip(new, state)]
        iterations += keep.to(torch.int64)
        active = keep & (size <= huge)
    failed = (status == QPStatus.MAX_ITERATIONS) | (status == QPStatus.NONFINITE)
    if not _on_host(q) or bool(failed.any()):  # classify from the last iterate, where the certificates have grown
        status = _classify(status, failed, Q, q, A, b, G, h, state[0], state[1], state[2])
    z, y, lam, s = _unscale(best, factors)
    undo = torch.argsort(order)
    lam, s = lam[:, undo], s[:, undo]
    _, _, figures = _measure(*original, z, y, lam, s)  # the residuals reported in the data's own units
    info = QPInfo(y, lam, s, iterations, *figures, status, torch.zeros_like(status, dtype=torch.bool))
    return z, y, lam, s, info


def _equilibrate(Q, q, A, b, G, h):
    r"""The same QP with unit-sized data: the objective divided by
    :math:`c = \max(\|Q\|_\infty, \|q\|_\infty)` and each constraint row (with its
    right-hand side) by its largest coefficient.  The minimizer does not change; the
    multipliers become :math:`\nu_i' = r_i \nu_i / c` (rows :math:`r` of ``A``) and
    :math:`\lambda_i' = g_i \lambda_i / c` (rows :math:`g` of ``G``), the slacks
    :math:`s_i' = s_i / g_i`.  Without it the interior-point start (multipliers and
    slacks of order 1) and the stopping rule (residuals relative to ``1 +`` the data)
    are tied to the data's units: a QP scaled by 1e4 stalled, one scaled by 1e-6
    stopped at a relative error of 1e-6.  Zero rows and a zero objective keep scale 1."""
    def safe(x):  # shared where x is
        top = first(x)
        return torch.where(top > torch.finfo(x.dtype).tiny, top, torch.ones_like(top)).expand(x.shape)

    c = safe(torch.maximum(Q.size(), _inf_norm(q)))
    ra, rg = safe(row_sizes(A)), safe(row_sizes(G))
    scaled = (Q.scaled(c), q / c[:, None], scale_rows(A, ra), b / ra, scale_rows(G, rg), h / rg)
    return scaled, (c, ra, rg)


def _unscale(point, factors):
    """``(z, nu, lambda, s)`` of the equilibrated QP mapped back to the original one."""
    z, y, lam, s = point
    c, ra, rg = factors
    return z, c[:, None] * y / ra, c[:, None] * lam / rg, s * rg


def _classify(status, failed, Q: Quadratic, q, A, b, G: Rows, h, z, y, lam):
    """Label unconverged elements INFEASIBLE or UNBOUNDED where the iterate carries the
    certificate (:func:`_certificates`)."""
    farkas, ray = _certificates(Q, q, A, b, G, h, z, y, lam)
    status = torch.where(failed & farkas, int(QPStatus.INFEASIBLE), status)
    return torch.where(failed & ~farkas & ray, int(QPStatus.UNBOUNDED), status)


def _certificates(Q: Quadratic, q, A, b, G: Rows, h, z, y, lam):
    """Per element: whether ``(y, lam)`` is a Farkas certificate of infeasibility
    (``A^T y + G^T lam ~ 0``, ``b^T y + h^T lam < 0``), and whether ``z`` points along a ray
    of unboundedness (``Qd ~ 0, Ad ~ 0, Gd <= 0, q^T d < 0`` for ``d = z / ||z||``)."""
    loose = float(torch.finfo(q.dtype).eps) ** 0.25
    dual = torch.cat([y, lam], -1)
    dn = torch.linalg.vector_norm(dual, dim=-1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)
    yy, ll = y / dn, lam / dn
    data = 1 + torch.maximum(max_abs(A), G.size)
    farkas = (_inf_norm(_mv(A.mT, yy) + G.rmv(ll)) <= loose * data) & (
        (b * yy).sum(-1) + (h * ll).sum(-1) < -loose
    )
    d = z / torch.linalg.vector_norm(z, dim=-1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)
    Gd = G.mv(d)
    ray = (
        (_inf_norm(Q.mv(d)) <= loose * (1 + Q.size()))
        & (_inf_norm(_mv(A, d)) <= loose * data)
        & ((Gd.amax(-1) if Gd.shape[-1] else torch.zeros_like(d[..., 0])) <= loose * data)
        & ((q * d).sum(-1) < -loose * (1 + _inf_norm(q)))
    )
    return farkas, ray


def _raise_failures(info: QPInfo, batched: bool, stage: str = "qp_solve") -> None:
    bad, names, message = _failures(info, batched, stage)
    if bad:
        raise SolveError(message, bad if batched else [0], names)


def _failures(info: QPInfo, batched: bool, stage: str) -> tuple[list, list, str]:
    """The failed elements, their status names and the message naming them
    (empty lists and no message when every element is solved)."""
    failed = ~info.converged.reshape(-1)
    if not bool(failed.any()):  # the one host read of a forward pass
        return [], [], ""
    bad = failed.nonzero().reshape(-1).tolist()
    status, iterations, primal, dual, gap = (
        getattr(info, f).reshape(-1) for f in ("status", "iterations", "primal_residual", "dual_residual", "gap"))
    lines = []
    for i in bad[:8]:
        st = QPStatus(int(status[i]))
        where = f"batch element {i}" if batched else "the problem"
        lines.append(
            f"{where}: {st.name} after {int(iterations[i])} iterations (primal residual "
            f"{float(primal[i]):.3g}, dual residual {float(dual[i]):.3g}, gap {float(gap[i]):.3g}): {_HINTS[st]}"
        )
    more = f" (and {len(bad) - 8} more)" if len(bad) > 8 else ""
    message = f"{stage}: {len(bad)} of {status.numel()} problems not solved{more}:\n  " + "\n  ".join(lines)
    return bad, [QPStatus(int(status[i])).name for i in bad], message


# ----------------------------------------------------------------------------- differentiation


@dataclass
class _Options:
    tol: float
    maxiter: int
    check: bool
    batched: bool
    stage: str
    accept: float | None = None  # the best merit at which a stalled element is SOLVED (None: 100 tol)
    info: QPInfo | None = None
    reports: list = field(default_factory=list)  # the QPInfo objects handed out, updated by backward


def _merged(t: torch.Tensor, dim: int | None, size: int) -> torch.Tensor:
    """A physical tensor of a vmap rule, ``(..., V at dim, ...)`` with the problems'
    batch ``(B, ...)`` behind it, as ``(V * B, ...)`` (broadcast along V where ``dim``
    is None)."""
    t = t.expand((size,) + t.shape) if dim is None else t.movedim(dim, 0)
    return t.reshape((t.shape[0] * t.shape[1],) + t.shape[2:])  # explicit: A, G may have no rows


def _split(t: torch.Tensor, size: int) -> torch.Tensor:
    """The inverse of :func:`_merged`: ``(V * B, ...)`` as ``(V, B, ...)``."""
    return t.reshape((size, t.shape[0] // size) + t.shape[1:])


_NAMES = ("Q", "q", "A", "b", "G", "h")


class _QPFunction(torch.autograd.Function):
    """Forward: the interior point method; backward: the OptNet adjoint.  Written
    with ``setup_context`` so that it also runs under ``torch.func.grad`` /
    ``functional_call``.  The backward is built from differentiable operations on the
    saved solution and duals (all three are outputs), so second derivatives follow
    the same implicit rule where the active set is locally constant.

    Under :func:`torch.func.vmap` (the :meth:`vmap` rule) the mapped problems join
    the batch: one interior-point run over ``V * B`` problems.  A backward pass
    under vmap (:func:`torch.func.jacrev`, or vmap over a gradient) solves its
    adjoint systems the same way (:class:`_QPAdjoint`)."""

    @staticmethod
    def vmap(info, in_dims, options: _Options, *tensors):
        size = info.batch_size
        flat = [_merged(t, d, size) for t, d in zip(tensors, in_dims[1:])]
        for name, ok in _finite(dict(zip(_NAMES, flat))).items():  # the check qp_solve left (innermost level)
            if not ok:
                raise FloatingPointError(f"{options.stage}: `{name}` contains NaN or inf.")
        options.batched = True  # failures are named by their index among the V * B problems
        outputs = _QPFunction.apply(options, *flat)
        return tuple(_split(t, size) for t in outputs), (0, 0, 0, 0)

    @staticmethod
    def forward(options: _Options, Q, q, A, b, G, h):
        with torch.no_grad():
            z, y, lam, _, info = _interior_point(Q, q, A, b, G, h, options.tol, options.maxiter, options.accept)
        options.info = info
        options.reports.append(info)
        if options.check:
            _raise_failures(info, options.batched, options.stage)
        # the info keeps its own duals, out of the graph; `element` numbers the problems
        # of this info, and is mapped along with the outputs by every vmap level above
        element = torch.arange(z.shape[0], device=z.device)
        return z, y.clone(), lam.clone(), element

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(
            "qp_solve has no forward-mode rule (torch.func.jvp, jacfwd, hessian): use torch.func.jacrev "
            "(Hessians: torch.func.jacrev(torch.func.grad(f))), or torch.autograd.grad row by row."
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        options, Q, _, A, _, G, h = inputs
        z, y, lam, element = output
        ctx.mark_non_differentiable(element)
        ctx.save_for_backward(Q, A, G, h, z, y, lam, element)
        ctx.options = options

    @staticmethod
    def backward(ctx, z_bar, y_bar, lam_bar, _):
        refuse_grads_batched_by_autograd((z_bar, y_bar, lam_bar), "the backward pass of qp_solve")
        saved = ctx.saved_tensors
        # the duals are outputs too: their cotangents (a loss on them, or a second-order
        # pass through this backward) join the adjoint system's right-hand side
        bars = [torch.zeros_like(t) if bar is None else bar for t, bar in zip(saved[4:7], (z_bar, y_bar, lam_bar))]
        if any(_vmapped(t) for t in (*saved, *bars)):  # jacrev, or a gradient under vmap
            grads = _QPAdjoint.apply(ctx.options, ctx.needs_input_grad[1:], *saved, *bars)
        else:
            grads = _input_grads(ctx.options, *saved, *bars, need=ctx.needs_input_grad[1:])
        return (None, *grads)  # None where not needed


def _input_grads(options: _Options, Q, A, G, h, z, y, lam, element, z_bar, y_bar, lam_bar,
                 need: tuple = (True,) * 6, columns: bool = False) -> tuple:
    """The gradients w.r.t. ``(Q, q, A, b, G, h)`` from the adjoint KKT solve
    (the closed forms of the module docstring), for the cotangents of ``(z, y, lam)``
    (``None`` where not ``need``-ed); row ``i`` belongs to problem ``element[i]`` of
    ``options.info`` (rows repeat it where a vmapped backward pass solves several
    adjoints of one problem).  ``columns``: the cotangents are ``(C, B, .)``, ``C``
    of them per problem (one factorization each), and so are the gradients."""
    # no solution at the failed elements (their outputs are NaN or an error): their
    # gradients come from the adjoint alone
    failed = ~options.info.converged.reshape(-1)[element]
    z, y, lam = (torch.where(failed.unsqueeze(-1), 0, t) for t in (z, y, lam))
    bars = (z_bar, y_bar, lam_bar) if columns else (z_bar[None], y_bar[None], lam_bar[None])
    d_z, d_y, w, degenerate = _adjoint(Q, A, G, h, z, y, lam, bars, options.stage, failed, options.tol)
    for report in options.reports:  # frozen dataclasses: set, not mutated in place (torch.func)
        flags = torch.zeros(report.status.numel(), dtype=torch.int8, device=degenerate.device)
        flags = flags.scatter_reduce(0, element, degenerate.detach().to(torch.int8), "amax")
        object.__setattr__(report, "degenerate", flags.bool().reshape(report.status.shape))
    outer = lambda u, v: u.unsqueeze(-1) * v.unsqueeze(-2)
    grads = (
        -outer(d_z, z) if need[0] else None,
        -d_z if need[1] else None,
        -(outer(y, d_z) + outer(d_y, z)) if need[2] else None,
        d_y if need[3] else None,
        -(outer(lam, d_z) + outer(w, z)) if need[4] else None,
        w if need[5] else None,
    )
    return grads if columns else tuple(None if g is None else g[0] for g in grads)


class _QPAdjoint(torch.autograd.Function):
    """:func:`_input_grads` for cotangents batched by :func:`torch.func.vmap` (the
    backward pass under :func:`torch.func.jacrev`).  The vmap rule solves the ``V``
    adjoint systems of each problem with one factorization of its KKT matrix where only
    the cotangents are mapped (jacrev over a problem or a batch), else as one batch of
    ``V * B`` problems.  Its outputs are not differentiated again (a second derivative
    through a vmapped backward pass is refused: ``jacrev(grad(f))`` gives Hessians)."""

    @staticmethod
    def forward(options: _Options, need: tuple, *tensors):
        return _input_grads(options, *tensors, need=need)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(
            "qp_solve: second derivatives through a backward pass under torch.func.vmap / jacrev are not "
            "supported; take them as torch.func.jacrev(torch.func.grad(f)), or with torch.autograd.grad("
            "..., create_graph=True)."
        )

    @staticmethod
    def vmap(info, in_dims, options: _Options, need: tuple, *tensors):
        size = info.batch_size
        saved, bars = tensors[:-3], tensors[-3:]
        dims = in_dims[2:]
        if all(d is None for d in dims[:len(saved)]) and not any(_vmapped(t) for t in tensors):
            # only the cotangents are mapped, here and nowhere below: V right-hand sides per problem
            bars = [b.expand((size,) + b.shape) if d is None else b.movedim(d, 0)
                    for b, d in zip(bars, dims[len(saved):])]
            grads = _input_grads(options, *saved, *bars, need=need, columns=True)
        else:
            flat = [_merged(t, d, size) for t, d in zip(tensors, dims)]
            grads = tuple(None if g is None else _split(g, size) for g in _QPAdjoint.apply(options, need, *flat))
        return grads, tuple(None if g is None else 0 for g in grads)


_PROMOTED = (torch.float32, torch.float16, torch.bfloat16)


def _empty_batch(tensors: tuple, return_info: bool):
    """``z`` of shape ``(0, n)``, in the graph of ``q`` (a zero gradient flows back), and
    an info whose per-element fields are empty."""
    _, q, A, _, G, _ = tensors
    z = q * 0
    if not return_info:
        return z
    empty = lambda *shape, dtype=q.dtype: torch.zeros((0,) + shape, dtype=dtype, device=q.device)  # noqa: E731
    info = QPInfo(
        eq_dual=empty(A.shape[-2]), ineq_dual=empty(G.shape[-2]), slack=empty(G.shape[-2]),
        iterations=empty(dtype=torch.int64), primal_residual=empty(), dual_residual=empty(), gap=empty(),
        status=empty(dtype=torch.int64), degenerate=empty(dtype=torch.bool),
    )
    return z, info


def _default_tol(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) ** 0.75


def qp_solve(
    Q: torch.Tensor,
    q: torch.Tensor,
    A: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    G: torch.Tensor | None = None,
    h: torch.Tensor | None = None,
    *,
    tol: float | None = None,
    maxiter: int = 100,
    check: bool = True,
    return_info: bool = False,
):
    r"""Solve a (batch of) convex quadratic program(s), differentiably.

    .. math::

        z^\star = \operatorname*{argmin}_z \ \tfrac12 z^\top Q z + q^\top z
        \quad \text{s.t.}\quad A z = b,\ \ G z \le h

    by a batched primal-dual interior-point method (module docstring), with
    gradients w.r.t. every input from the KKT conditions (OptNet's closed form).
    Only the symmetric part :math:`(Q + Q^\top)/2` of ``Q`` is used.

    Args:
        Q: ``(n, n)`` or ``(B, n, n)``, positive semi-definite (``0`` gives an LP).
        q: ``(n,)`` or ``(B, n)``.
        A, b: ``(p, n)`` and ``(p,)`` (or batched), the equality constraints; or None.
        G, h: ``(m, n)`` and ``(m,)`` (or batched), the inequality constraints; or None.
            Any input may carry the leading batch dimension ``B``; the others are
            shared by all problems.
        tol: relative accuracy of the primal and dual residuals and of the gap;
            ``None``: ``eps ** 0.75`` of the working dtype (inputs in float32 or
            lower precision are solved in float64, whose ill-conditioned final
            KKT systems they cannot resolve; the solution is returned in the
            input dtype, and an element whose iterates stall within the input
            dtype's rounding error, e.g. dependent equality rows that are consistent
            only up to it, counts as solved).
        maxiter: interior-point iterations (default 100; 10 to 30 are typical).
        check: raise :class:`SolveError` if an element is not solved (default);
            ``False`` returns its last iterate, with its status in the info.
        return_info: also return a :class:`QPInfo` (duals, residuals, status).

    Returns:
        ``z`` of shape ``(n,)`` or ``(B, n)`` (and the :class:`QPInfo` if asked).
        Under :func:`torch.func.vmap` the mapped problems are solved as one batch of
        ``V * B``: the :class:`QPInfo` (return it with ``out_dims=(0, None)``: it is
        no tensor) and the element indices of a :class:`SolveError` count the
        problems of that flattened batch, vmap dimensions first (with
        ``chunk_size``: of the chunk).  :func:`torch.func.jacrev` solves the adjoint
        systems of all rows of a problem with one factorization.

    Raises:
        ValueError / TypeError: shapes, dtypes or devices that do not match (the
            message names the argument and the expected shape).
        FloatingPointError: NaN or inf in the inputs or the adjoint solve.
        SolveError: an infeasible, unbounded or unconverged element (naming the
            batch element, its status and residuals), when ``check=True``.

    Example:
        >>> import torch
        >>> from bilevel.layers import qp_solve
        >>> Q, q = torch.eye(2, dtype=torch.float64), torch.tensor([-1.0, -1.0], dtype=torch.float64)
        >>> G, h = torch.ones(1, 2, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
        >>> h.requires_grad_()                            # projection of (1, 1) onto z1 + z2 <= h
        tensor([1.], dtype=torch.float64, requires_grad=True)
        >>> z = qp_solve(Q, q, G=G, h=h)
        >>> z.detach()
        tensor([0.5000, 0.5000], dtype=torch.float64)
        >>> torch.autograd.grad(z.sum(), h)[0].round(decimals=6)
        tensor([1.], dtype=torch.float64)

    References:
        Amos, B. and Kolter, J. Z. `OptNet: Differentiable Optimization as a Layer
        in Neural Networks <https://arxiv.org/abs/1703.00443>`_. ICML 2017.
    """
    return _qp_solve(Q, q, A, b, G, h, tol, maxiter, check, return_info)


def _qp_solve(Q, q, A, b, G, h, tol, maxiter, check, return_info, source: torch.dtype | None = None):
    """:func:`qp_solve`; ``source`` as :func:`_solve`'s."""
    if not torch.is_tensor(q):
        raise TypeError(f"qp_solve: `q` must be a floating-point tensor; got {type(q).__name__}.")
    if tol is not None and not _tol_ok(tol):
        raise ValueError(f"qp_solve: `tol` must be None or a float in (0, 1); got {tol!r}.")
    if not _positive_int(maxiter):
        raise ValueError(f"qp_solve: `maxiter` must be a positive int; got {maxiter!r}.")
    B, tensors = _check_inputs(Q, q, A, b, G, h)
    if B == 0:  # an empty batch (a data loader's last): nothing to solve
        return _empty_batch(tensors, return_info)
    z, info, _ = _solve(B, tensors, tol, maxiter, check, source)
    return (z, info) if return_info else z


def _solve(B: int | None, tensors: tuple, tol: float | None, maxiter: int, check: bool,
           source: torch.dtype | None = None) -> tuple:
    """:func:`qp_solve` on checked inputs: ``(z, info, element)``, where under
    :func:`torch.func.vmap` ``element`` (mapped like ``z``) numbers the problems of
    ``info``, which covers the ``V * B`` problems the vmap rule solved together.
    ``source``: the dtype the data were given in, where the caller computed them in
    float64 from lower-precision values (ConvexLayer's elimination); the default
    tolerance's leniency follows it, and ``z`` is returned in the tensors' dtype."""
    q = tensors[1]
    given = q.dtype if source is None else source
    # Below float64 the KKT systems of the last iterations are too ill-conditioned: solve in float64.
    work = torch.float64 if q.dtype in _PROMOTED else q.dtype
    # an input all problems share stays one tensor (expanded): products with it are one GEMM
    tensors = tuple(first(t).to(work).expand(t.shape) if shared(t) else t.to(work) for t in tensors)
    Qf = first(tensors[0])
    tensors = ((0.5 * (Qf + Qf.mT)).expand(tensors[0].shape),) + tensors[1:]
    options = _Options(_default_tol(work) if tol is None else float(tol), maxiter, check, B is not None,
                       "qp_solve")
    if tol is None and work != given:
        # data given in a lower precision are known to its rounding error only: dependent
        # equality rows, consistent in exact arithmetic, are inconsistent by ~eps of that
        # dtype (b = (0.6, 0.4, 1) for z1 + z2, z3, z1 + z2 + z3 in float32), where the
        # float64 tolerance cannot be met; a stall within that error is a solution
        options.accept = max(100 * options.tol, float(torch.finfo(given).eps))
    z, _, _, element = _QPFunction.apply(options, *tensors)
    z = z.to(q.dtype)
    info = options.info
    if B is None:
        z, element = z[0], element[0]
        if not any(_vmapped(t) for t in tensors):
            info = QPInfo(*(getattr(info, f)[0] for f in info.__dataclass_fields__))
            options.reports.append(info)
    return z, info, element


class QPLayer(torch.nn.Module):
    r"""A layer whose output is the solution of a quadratic program (OptNet).

    .. math::

        z^\star(Q, q, A, b, G, h) = \operatorname*{argmin}_z \ \tfrac12 z^\top Q z + q^\top z
        \quad \text{s.t.}\quad A z = b,\ \ G z \le h,

    solved by :func:`qp_solve` (batched interior point, on the inputs' device and
    dtype) and differentiated through the KKT conditions w.r.t. all six inputs.
    Any input may be batched (leading ``B``) or shared.

    Args:
        tol: relative accuracy (``None``: ``eps ** 0.75`` of the dtype).
        maxiter: interior-point iterations (default 100).
        check: what an infeasible, unbounded or unconverged problem does.
            ``None`` (default): an unbatched problem raises :class:`SolveError`;
            in a batch, the failed elements' rows of ``z`` are NaN, a
            :class:`SolveWarning` names them and their statuses, and the other
            elements are unaffected.  ``True``: always raise.  ``False``:
            never raise (NaN and the warning).  The failed indices are kept in
            ``last_failed``, the statuses in ``last_info``.  Under
            :func:`torch.func.vmap` the mapped problems are a batch: ``None``
            behaves as ``False``, and the indices count the flattened batch
            (:func:`qp_solve`, Returns).

    Example:
        >>> import torch
        >>> from bilevel.layers import QPLayer
        >>> layer = QPLayer()
        >>> Q = torch.eye(3, dtype=torch.float64)
        >>> q = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)   # a batch of 4
        >>> G, h = -torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
        >>> z = layer(Q, q, G=G, h=h)                       # z = max(-q, 0)
        >>> torch.allclose(z, (-q).clamp_min(0))
        True
        >>> z.sum().backward(); q.grad.shape
        torch.Size([4, 3])

    References:
        Amos, B. and Kolter, J. Z. `OptNet: Differentiable Optimization as a Layer
        in Neural Networks <https://arxiv.org/abs/1703.00443>`_. ICML 2017.
    """

    def __init__(self, tol: float | None = None, maxiter: int = 100, *, check: bool | None = None):
        super().__init__()
        self.tol, self.maxiter, self.check = tol, maxiter, check
        _check_fields(self, tol=(_tol_ok, "None or a float in (0, 1)"), maxiter=(_positive_int, "a positive int"),
                      check=(lambda v: v is None or isinstance(v, bool), "None, True or False"))
        self.last_info: QPInfo | None = None
        self.last_failed: list[int] = []

    def forward(
        self,
        Q: torch.Tensor,
        q: torch.Tensor,
        A: torch.Tensor | None = None,
        b: torch.Tensor | None = None,
        G: torch.Tensor | None = None,
        h: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The solution ``z`` of shape ``(n,)`` or ``(B, n)``; the :class:`QPInfo` is kept
        in ``self.last_info``.  A problem that is not solved is handled as ``check``
        says (class docstring)."""
        if any(_vmapped(t) for t in (Q, q, A, b, G, h)):
            return self._mapped(*_check_inputs(Q, q, A, b, G, h))
        z, info = qp_solve(Q, q, A, b, G, h, tol=self.tol, maxiter=self.maxiter, check=False, return_info=True)
        self.last_info = info
        batched = z.dim() == 2
        failed, statuses, message = _failures(info, batched, "QPLayer")
        self.last_failed = failed
        (z,) = settle_failures((z if batched else z.unsqueeze(0),), failed, statuses, batched, self.check, message)
        return z if batched else z[0]

    def _mapped(self, B: int | None, tensors: tuple) -> torch.Tensor:
        """Under :func:`torch.func.vmap`, where the mapped problems make a batch: a
        problem that is not solved gives NaN (and no gradient) with a
        :class:`SolveWarning`, or raises with ``check=True``.  ``last_info`` and
        ``last_failed`` count the flattened batch (:func:`qp_solve`, Returns)."""
        z, info, element = _solve(B, tensors, self.tol, self.maxiter, False)
        self.last_info = info
        failed, statuses, message = _failures(info, True, "QPLayer")
        self.last_failed = failed
        if failed:
            if self.check:
                raise SolveError(message, failed, statuses)
            warnings.warn(SolveWarning(message, failed, statuses), stacklevel=3)
            unsolved = ~info.converged.reshape(-1)[element]
            z = torch.where(unsolved.unsqueeze(-1), math.nan, z)
        return z

    def extra_repr(self) -> str:
        return f"tol={self.tol}, maxiter={self.maxiter}, check={self.check}"
