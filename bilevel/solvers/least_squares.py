r"""Batched nonlinear least squares: Gauss-Newton and Levenberg-Marquardt.

Both minimize :math:`\tfrac12\|r(x, \theta)\|^2` for ``r = fun(sol, *args)``, a
residual *vector* function, on a batch of independent problems at once (e.g.
the K experts of a mixture, each with a few dozen coefficients):

* ``batch_dims`` (a setting, default 0) leading dimensions of ``init`` index
  independent problems.  ``fun`` is called on the whole batch (it is *already
  batched*: vectorized over those dimensions) and must return residuals with
  the same leading batch shape, row ``b`` depending only on problem ``b``
  (wrap a per-problem function with :func:`torch.vmap` to get one).  Data of
  each problem go in ``args`` with the same leading dimensions; shared data may
  be captured or passed unbatched.
* Stopping, damping, line searches and ``info`` are per batch element: an
  element that converged stops moving, one that fails reports its own status.
* Jacobians are dense, :math:`J_b \in \mathbb R^{m\times n}`, built for the whole
  batch by one :func:`torch.vmap` over the ``n`` basis tangents of
  :func:`torch.func.jvp` (over the ``m`` basis cotangents of
  :func:`torch.func.vjp` when ``m < n``): this uses the independence of the
  rows, so it costs ``min(n, m)`` batched products, not ``B`` separate Jacobians.
  The normal equations are solved by a batched Cholesky factorization.

Stopping.  Both stop an element on the gradient :math:`g = J^\top r`,

.. math::
    \|g\| \le \tau = \max\bigl(\mathrm{tol}\cdot\max(1, \|g^0\|),\; a\,\epsilon_r\bigr),
    \qquad a = \|J^\top J\|_F^{1/2}, \quad \epsilon_r = \varepsilon\,(a\|x\| + \|r\|),

where :math:`g^0` is the gradient at ``init``, :math:`a` estimates :math:`\|J\|_2`
(within a factor :math:`n^{1/4}`), :math:`\epsilon_r` is the rounding error of the
residual vector and :math:`a\,\epsilon_r` the size of the computed :math:`J^\top r`
at an exact root.  A tolerance below that floor (an operator with a large norm,
such as a discretized fourth derivative) is replaced by it instead of running
to ``maxiter``.  A gradient at the floor can still hide an error in directions
of small singular values, so :class:`GaussNewton` stops there only once its
next step is below :math:`\mathrm{tol}\cdot\max(1, \|x\|)`, and
:class:`LevenbergMarquardt` always tests its step (see there).
``info.tolerance`` is :math:`\tau` where the element stopped.

Differentiable call ``solver(fun, init, *args)``: ``custom_root`` with the
condition :math:`J^\top r = 0`, i.e. ``stationarity(0.5 * ||fun||^2)`` (the exact
Hessian :math:`J^\top J + \sum_i r_i \nabla^2 r_i` is used in the backward solve).
With ``batch_dims = k > 0`` the condition is one problem's and ``custom_root``
gets ``batch_dims=k``: one adjoint system per problem, solved together with
per-problem convergence, and a certificate per problem: its warnings
(:class:`~bilevel.status.OptimalityWarning`, :class:`~bilevel.status.ConvergenceWarning`)
name the problems that fail it.  Tensors of ``args`` whose
leading dimensions are not the batch shape are shared data, expanded to the
batch as a view (their gradient is summed over the problems).  A call where
this sort cannot be trusted (a shared tensor whose leading dimensions happen to
equal the batch shape, a ``fun`` that cannot be vmapped, a call inside
:func:`torch.func.vmap`) is differentiated through the joint condition of the
whole batch instead: the same gradients, one certificate for the batch (see
:mod:`bilevel.solvers._batched`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch.func import jvp, vjp, vmap

from .._tolerance import default_tol
from .._tree import Raveler, describe, tree_map
from ..implicit.conditions import Condition, stationarity
from ..implicit.linear_solve import LinearSolver
from .._checks import check_fields as _check_fields
from ..status import Status
from ..typing import TensorTree
from ._base import COMMON_RULES, Solver, SolverInfo, _Scale, check_fun, check_init, detach_args, warm_start, warn_if_failed
from ._batched import BatchedArgs

__all__ = ["GaussNewton", "LevenbergMarquardt"]

_MAX_BACKTRACK = 30
_BATCH_RULE = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a non-negative int")


class _Residuals:
    """``fun`` on flat ``(B, n)`` iterates, returning flat ``(B, m)`` residuals."""

    def __init__(self, fun: Callable, init: TensorTree, args, batch_dims: int, name: str):
        check_fun(fun, name, "fun(sol, *args) -> residual tensor")
        check_init(init, name)
        self.fun, self.args, self.name = fun, detach_args(args), name
        self.rav = Raveler(init, batch_dims, name="init")
        self.batch = tuple(self.rav.batch_shape)
        self.B, self.n = math.prod(self.batch), self.rav.size
        self.x0 = self.rav.ravel(tree_map(lambda t: t.detach().clone(), init)).to(self.rav.dtype).reshape(self.B, self.n)

    def tree(self, x: torch.Tensor) -> TensorTree:
        return self.rav.unravel(x.reshape(self.batch + (self.n,)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        try:
            r = self.fun(self.tree(x), *self.args)
        except Exception as err:  # e.g. a shape error: say which call, with which shapes
            if hasattr(err, "add_note") and not getattr(err, "_bilevel_noted", False):
                err.add_note(f"bilevel: raised by `fun(sol, *args)` in {self.name}, called with sol shaped like "
                             f"`init`: {describe(self.tree(x))} (batch_dims={len(self.batch)}, batch shape "
                             f"{self.batch}) and args: {describe(tuple(self.args))}.")
                err._bilevel_noted = True
            raise
        if not torch.is_tensor(r) or not r.is_floating_point() or tuple(r.shape[: len(self.batch)]) != self.batch:
            got = f"shape {tuple(r.shape)}, dtype {r.dtype}" if torch.is_tensor(r) else type(r).__name__
            raise ValueError(
                f"{self.name}: `fun(sol, *args)` must return a floating residual tensor whose leading "
                f"dimensions are the batch shape {self.batch} of `init`; got {got}."
            )
        return r.reshape(self.B, -1)

    def jacobian(self, x: torch.Tensor, m: int) -> torch.Tensor:
        """Per-element Jacobians ``(B, m, n)`` by ``min(n, m)`` vmapped products."""
        if self.n <= m:
            basis = torch.eye(self.n, dtype=x.dtype, device=x.device)
            cols = vmap(lambda e: jvp(self, (x,), (e.expand(self.B, self.n),))[1])(basis)  # (n, B, m)
            return cols.permute(1, 2, 0)
        _, pullback = vjp(self, x)
        basis = torch.eye(m, dtype=x.dtype, device=x.device)
        rows = vmap(lambda e: pullback(e.expand(self.B, m))[0])(basis)  # (m, B, n)
        return rows.permute(1, 0, 2)


@dataclass(frozen=True)
class _LeastSquares(Solver):
    def __post_init__(self):
        _check_fields(self, **COMMON_RULES, batch_dims=_BATCH_RULE)

    def _condition(self, fun: Callable, scale: _Scale) -> Condition:
        def half_squared_norm(sol, *args):
            r = fun(sol, *args)
            return 0.5 * (r * r).sum() * scale.value

        half_squared_norm.__name__ = f"half_squared_norm({getattr(fun, '__name__', 'fun')})"
        return stationarity(half_squared_norm)

    def __call__(self, fun: Callable, init: TensorTree, *args: Any) -> TensorTree:
        if not self.batch_dims:
            return super().__call__(fun, init, *args)
        check_fun(fun, self.name, "fun(sol, *args) -> residual tensor")
        solve, scale, dtype = self._recorded_run(fun, init)
        batch = Raveler(init, self.batch_dims, name="init").batch_shape
        batched = BatchedArgs(args, batch)
        if not batched.consistent(fun, init, args):  # one joint system for the whole batch
            return self._differentiable(self._condition(fun, scale), solve, dtype)(*args, init=warm_start(init))

        def solve_batched(*inputs, init):
            return solve(*batched.for_solver(inputs), init=init)

        differentiable = self._differentiable(batched.condition(fun, scale), solve_batched, dtype, self.batch_dims)
        return differentiable(*batched.inputs(args), init=warm_start(init))

    def run(self, fun: Callable, init: TensorTree, *args: Any) -> tuple[TensorTree, SolverInfo]:
        res = _Residuals(fun, init, args, self.batch_dims, self.name)
        with torch.no_grad():
            x, info = self._loop(res)
        warn_if_failed(info, self.name)
        return res.tree(x), info

    def _start(self, res: _Residuals) -> tuple:
        """Residuals, objective, Jacobian and gradient at ``init`` (checked finite)."""
        x = res.x0
        r = res(x)
        f = 0.5 * (r * r).sum(-1)
        J = res.jacobian(x, r.shape[-1])
        g = torch.einsum("bmn,bm->bn", J, r)
        bad = ~(torch.isfinite(f) & torch.isfinite(g).all(-1))
        if bool(bad.any()):
            where = f" (batch elements {bad.nonzero().reshape(-1).tolist()[:8]})" if res.batch else ""
            raise FloatingPointError(
                f"{self.name}: the residuals or their Jacobian are not finite (NaN or inf) at iteration 0"
                f"{where}. Check `fun`, its arguments and `init`."
            )
        return x, r, f, J, g

    def _loop(self, res: _Residuals) -> tuple[torch.Tensor, SolverInfo]:
        x, r, f, J, g = self._start(res)
        eps = float(torch.finfo(x.dtype).eps)
        g_norm = torch.linalg.vector_norm(g, dim=-1)
        tol = default_tol(x.dtype) if self.tol is None else self.tol
        base = tol * g_norm.clamp_min(1.0)
        status = torch.full((res.B,), int(Status.SUCCESS), dtype=torch.int64, device=x.device)
        iterations = torch.zeros(res.B, dtype=torch.int64, device=x.device)
        active = torch.ones(res.B, dtype=torch.bool, device=x.device)
        state = self._init_state(res.B, x)
        threshold = base
        eye = torch.eye(res.n, dtype=x.dtype, device=x.device)
        k = 0
        while True:
            # Stopped elements (a non-finite Jacobian among them) get a harmless system.
            A = torch.where(active[:, None, None], J.transpose(-1, -2) @ J, eye)
            g = torch.where(active[:, None], g, torch.zeros_like(g))
            a, r_err = _rounding(A, r, x, eps)
            threshold = torch.where(active, torch.maximum(base, a * r_err), threshold)
            state["r_err"], state["base"] = r_err, base
            done = self._converged(x, g, g_norm, A, threshold, active, state, tol, eps)
            active = active & ~done
            if not bool(active.any()) or k >= self.maxiter:
                break
            x_new, r_new, f_new, accept, failed = self._step(res, x, f, g, A, active, state, eps)
            x = torch.where(accept[:, None], x_new, x)
            r = torch.where(accept[:, None], r_new, r)
            f = torch.where(accept, f_new, f)
            if bool(accept.any()):
                J = res.jacobian(x, r.shape[-1])
                g = torch.einsum("bmn,bm->bn", J, r)
                g_norm = torch.linalg.vector_norm(g, dim=-1)
            iterations += active.to(torch.int64)
            nonfinite = active & ~torch.isfinite(g_norm)
            status = torch.where(failed, int(Status.BREAKDOWN), status)
            status = torch.where(nonfinite, int(Status.NONFINITE), status)
            if bool(nonfinite.any()) and not res.batch:
                raise FloatingPointError(
                    f"{self.name}: the Jacobian is not finite (NaN or inf) at iteration {k + 1}. "
                    "Check `fun` and its arguments."
                )
            active = active & ~failed & ~nonfinite
            k += 1
        status = torch.where(active, int(Status.MAX_ITERATIONS), status)
        info = SolverInfo(
            iterations=iterations.reshape(res.batch),
            residual_norm=g_norm.reshape(res.batch),
            value=f.reshape(res.batch),
            status=status.reshape(res.batch),
            tolerance=threshold.reshape(res.batch),
        )
        return x, info

    def _converged(self, x, g, g_norm, A, threshold, active, state, tol, eps) -> torch.Tensor:
        """Gauss-Newton: the gradient test; where only the rounding floor meets it, the
        next step must be below the tolerance too.  Keeps that step for :meth:`_step`."""
        newton = torch.where(active[:, None], _solve_normal(A, -g), torch.zeros_like(g))
        state["delta"] = newton
        at_root = torch.linalg.vector_norm(newton, dim=-1) <= tol * torch.linalg.vector_norm(x, dim=-1).clamp_min(1.0)
        return active & (g_norm <= threshold) & ((g_norm <= state["base"]) | at_root)


def _rounding(A: torch.Tensor, r: torch.Tensor, x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per element, ``a = ||J^T J||_F^{1/2}`` (an estimate of ``||J||_2``, within a
    factor ``n^{1/4}``) and ``eps (a ||x|| + ||r||)``, the rounding error of the
    residual vector ``r`` (``J x`` summed in floating point, then the data)."""
    a = torch.linalg.matrix_norm(A).sqrt()
    return a, eps * (a * torch.linalg.vector_norm(x, dim=-1) + torch.linalg.vector_norm(r, dim=-1))


def _noise(f: torch.Tensor, r_err: torch.Tensor, eps: float) -> torch.Tensor:
    """The rounding error of ``f = 0.5 ||r||^2``: ``100 eps f + ||r|| r_err``."""
    return 100 * eps * f.abs() + (2 * f.abs()).sqrt() * r_err


def _solve_normal(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``A^{-1} b`` for a batch of symmetric positive semi-definite ``A`` (Cholesky;
    singular elements are shifted by ``sqrt(eps) * max diag``, then pseudo-inverted)."""
    L, info = torch.linalg.cholesky_ex(A)
    if bool((info > 0).any()):
        eps = float(torch.finfo(A.dtype).eps)
        scale = A.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp_min(torch.finfo(A.dtype).tiny)
        shift = torch.where(info > 0, math.sqrt(eps) * scale, torch.zeros_like(scale))
        A = A + shift[:, None, None] * torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        L, info = torch.linalg.cholesky_ex(A)
        if bool((info > 0).any()):
            fallback = (torch.linalg.pinv(A, hermitian=True) @ b.unsqueeze(-1)).squeeze(-1)
            ok = (info == 0)[:, None]
            direct = torch.cholesky_solve(b.unsqueeze(-1), torch.where(ok[..., None], L, torch.eye(
                A.shape[-1], dtype=A.dtype, device=A.device))).squeeze(-1)
            return torch.where(ok, direct, fallback)
    return torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)


@dataclass(frozen=True)
class GaussNewton(_LeastSquares):
    r"""Gauss-Newton for batched nonlinear least squares :math:`\min_x \tfrac12\|r(x, \theta)\|^2`.

    Per batch element :math:`b`, with :math:`J_b = \partial r_b / \partial x_b`:

    .. math::
        J_b^\top J_b\, \delta_b = -J_b^\top r_b, \qquad x_b \leftarrow x_b + \alpha_b \delta_b,

    :math:`\alpha_b` the first of :math:`1, \tfrac12, \tfrac14, \dots` with
    sufficient decrease :math:`f(x_b + \alpha_b\delta_b) \le f(x_b) + 10^{-4}\alpha_b
    \nabla f^\top \delta_b`, up to the rounding error of :math:`f` (damped
    Gauss-Newton: full steps near a solution, safe far from one; non-finite
    trial residuals are rejected).  A singular
    :math:`J^\top J` is shifted by :math:`\sqrt{\varepsilon}\max\operatorname{diag}`.
    Stopping per element: :math:`\|J_b^\top r_b\| \le \mathrm{tol}\cdot\max(1, \|J_b^\top r_b\|_{x^0})`
    (``tol=None``: ``sqrt(eps)`` of the dtype), or below the rounding floor of
    :math:`J_b^\top r_b` where that is larger, with a next step
    :math:`\|\delta_b\| \le \mathrm{tol}\cdot\max(1, \|x_b\|)` (see
    :mod:`bilevel.solvers.least_squares`); a line search that fails gives that
    element status BREAKDOWN.  The full
    steps make the gradient test enough: near a root each step solves the
    linearized problem exactly, in every direction.  Batching conventions: see
    :mod:`bilevel.solvers.least_squares`.

    Args:
        maxiter: iteration budget per element (default 100).
        tol: relative tolerance on :math:`\|J^\top r\|`; ``None``: ``sqrt(eps)`` of the dtype.
        batch_dims: leading dimensions of ``init`` (and of ``fun``'s output) that
            index independent problems (default 0: one problem).
        implicit_solve: linear solver of the backward system (``None``: custom_root's default).

    Returns:
        ``run(fun, init, *args) -> (sol, SolverInfo)`` with per-element info
        (``value`` is :math:`\tfrac12\|r_b\|^2`); ``solver(fun, init, *args) -> sol``,
        differentiable in ``args`` through :math:`J^\top r = 0`.

    Raises:
        ValueError: a setting out of range (naming the field); residuals whose
            leading shape is not the batch shape of ``init``.
        TypeError: ``fun`` not callable, ``init`` not a tree of floating tensors.
        FloatingPointError: non-finite residuals or Jacobian at ``init`` (naming the
            elements), or at an iterate of an unbatched problem (batched elements get
            status NONFINITE instead, without stopping the others).

    Example:
        >>> import torch
        >>> from bilevel.solvers import GaussNewton
        >>> t = torch.linspace(0, 1, 20, dtype=torch.float64)
        >>> truth = torch.tensor([[1.0, -1.0], [2.0, 0.5]], dtype=torch.float64)   # two problems (a, b)
        >>> data = truth[:, :1] * torch.exp(truth[:, 1:] * t)                     # (2, 20)
        >>> fit = lambda p, y: p[:, :1] * torch.exp(p[:, 1:] * t) - y            # batched residuals
        >>> p, info = GaussNewton(batch_dims=1).run(fit, torch.ones(2, 2, dtype=torch.float64), data)
        >>> torch.allclose(p, truth), info.converged.tolist()
        (True, [True, True])

    References:
        Gauss, C. F. Theoria motus corporum coelestium, 1809.
        Hartley, H. O. `The modified Gauss-Newton method for the fitting of
        non-linear regression functions by least squares
        <https://doi.org/10.1080/00401706.1961.10489945>`_. Technometrics, 1961.
    """

    maxiter: int = 100
    tol: Optional[float] = None
    batch_dims: int = 0
    implicit_solve: Optional[LinearSolver] = None

    def _init_state(self, B: int, x: torch.Tensor) -> dict:
        return {}

    def _step(self, res, x, f, g, A, active, state, eps):
        delta = state["delta"]
        slope = (g * delta).sum(-1)
        noise = _noise(f, state["r_err"], eps)
        alpha = torch.ones_like(f)
        pending = active.clone()
        x_new, r_new, f_new = x, None, f
        for _ in range(_MAX_BACKTRACK):
            x_try = x + alpha[:, None] * delta
            r_try = res(x_try)
            f_try = 0.5 * (r_try * r_try).sum(-1)
            ok = torch.isfinite(f_try) & (f_try <= f + 1e-4 * alpha * slope + noise)
            take = pending & ok
            x_new = torch.where(take[:, None], x_try, x_new)
            r_new = r_try if r_new is None else torch.where(take[:, None], r_try, r_new)
            f_new = torch.where(take, f_try, f_new)
            pending = pending & ~ok
            if not bool(pending.any()):
                break
            alpha = torch.where(pending, 0.5 * alpha, alpha)
        accept = active & ~pending
        return x_new, r_new, f_new, accept, pending


@dataclass(frozen=True)
class LevenbergMarquardt(_LeastSquares):
    r"""Levenberg-Marquardt for batched nonlinear least squares :math:`\min_x \tfrac12\|r(x, \theta)\|^2`.

    Per batch element :math:`b`, with :math:`J_b = \partial r_b / \partial x_b` and
    :math:`D_b = \operatorname{diag}(J_b^\top J_b)` (Marquardt's scaling, floored
    at :math:`\varepsilon \max D_b`):

    .. math::
        (J_b^\top J_b + \mu_b D_b)\,\delta_b = -J_b^\top r_b, \qquad
        \rho_b = \frac{f(x_b) - f(x_b + \delta_b)}
                      {-\nabla f^\top\delta_b - \tfrac12 \delta_b^\top J_b^\top J_b \delta_b}.

    The step is accepted where :math:`\rho_b > 0`, and then
    :math:`\mu_b \leftarrow \mu_b \max(\tfrac13, 1 - (2\rho_b - 1)^3)`; otherwise
    :math:`\mu_b \leftarrow \nu_b \mu_b`, :math:`\nu_b \leftarrow 2\nu_b` (Nielsen's
    update): the damping adapts per element, large far from a solution
    (gradient-descent-like), small near one (Gauss-Newton).  Non-finite trial
    residuals are rejected.  Where the predicted decrease is below the rounding
    error of :math:`f`, :math:`100\varepsilon f + \|r_b\|\epsilon_r` (:math:`\epsilon_r`
    the rounding error of :math:`r_b`, see :mod:`bilevel.solvers.least_squares`),
    :math:`\rho_b` is noise: the step is taken unless :math:`f` grows by more, and
    :math:`\mu_b` shrinks as for :math:`\rho_b = 1`.  Damping above
    :math:`1/\varepsilon` (no step decreases the objective) gives status BREAKDOWN.

    Stopping per element: the gradient test of :class:`GaussNewton`,
    :math:`\|J_b^\top r_b\| \le \tau_b`, and a test on the step.  With
    :math:`\delta^{\mathrm{GN}}_b = -(J_b^\top J_b)^{-1} J_b^\top r_b` the undamped
    (Gauss-Newton) step and :math:`\delta_b` the damped one above, both from the
    same gradient, :math:`x_b` stops when

    .. math::
        \|\delta^{\mathrm{GN}}_b(x_b)\| \le \mathrm{tol}\cdot\max(1, \|x_b\|)
        \quad\text{or}\quad
        \|\delta^{\mathrm{GN}}_b - \delta_b\|_{\text{at } x_b^-} \le \mathrm{tol}\cdot\max(1, \|x_b^-\|),

    :math:`x_b^-` the iterate the last accepted step started from: :math:`x_b` is
    within tolerance of the root of the linearized problem, or was reached by a
    step that the damping shortened by less than the tolerance.  Why: in a
    direction :math:`v` of a small singular value :math:`\sigma` of :math:`J_b`, an
    error :math:`e` shows in the gradient as :math:`\sigma^2 e` only, and the step
    covers the fraction :math:`\sigma^2/(\sigma^2 + \mu_b D_{b})` of it.  On an
    ill-conditioned problem (a Vandermonde fit, a discretized PDE, condition
    number :math:`10^6`-:math:`10^8`) the gradient test alone is met while
    :math:`\mu_b D_b \gg \sigma^2` still holds the step back, far from the root;
    the step test keeps going until the damping no longer matters, which is
    where :class:`GaussNewton` gets in one step.  On a well-conditioned problem
    both tests are met at the same iterate, or the step test one iteration
    later where the gradient test left an error above the tolerance.  The step
    test costs one more Cholesky factorization of :math:`J_b^\top J_b` per iteration.

    Batching conventions: see :mod:`bilevel.solvers.least_squares`.

    Args:
        maxiter: iteration budget per element, rejected steps included (default 100).
        tol: relative tolerance on :math:`\|J^\top r\|` and on the step (above);
            ``None``: ``sqrt(eps)`` of the dtype.
        damping: initial :math:`\mu` (default ``1e-3``), relative to :math:`D`.
        batch_dims: leading dimensions of ``init`` indexing independent problems (default 0).
        implicit_solve: linear solver of the backward system (``None``: custom_root's default).

    Returns, Raises: as :class:`GaussNewton`.

    Example:
        >>> import torch
        >>> from bilevel.solvers import LevenbergMarquardt
        >>> t = torch.linspace(0, 1, 20, dtype=torch.float64)
        >>> y = torch.stack([torch.exp(-t), 2 * torch.exp(0.5 * t)])              # two problems
        >>> fit = lambda p, y: p[:, :1] * torch.exp(p[:, 1:] * t) - y
        >>> y = y.requires_grad_()
        >>> p = LevenbergMarquardt(batch_dims=1)(fit, torch.ones(2, 2, dtype=torch.float64), y)
        >>> p.detach().round(decimals=6)
        tensor([[ 1.0000, -1.0000],
                [ 2.0000,  0.5000]], dtype=torch.float64)
        >>> torch.autograd.grad(p[0, 0], y)[0][1].abs().sum() == 0   # element 0 ignores data of element 1
        tensor(True)

    References:
        Levenberg, K. `A method for the solution of certain non-linear problems in
        least squares <https://doi.org/10.1090/qam/10666>`_. Quarterly of Applied
        Mathematics, 1944.
        Marquardt, D. W. `An algorithm for least-squares estimation of nonlinear
        parameters <https://doi.org/10.1137/0111030>`_. SIAM J. Appl. Math., 1963.
        Nielsen, H. B. Damping parameter in Marquardt's method. Technical report
        IMM-REP-1999-05, DTU, 1999.
    """

    maxiter: int = 100
    tol: Optional[float] = None
    damping: float = 1e-3
    batch_dims: int = 0
    implicit_solve: Optional[LinearSolver] = None

    def __post_init__(self):
        super().__post_init__()
        _check_fields(
            self,
            damping=(
                lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
                "a positive float",
            ),
        )

    def _init_state(self, B: int, x: torch.Tensor) -> dict:
        return dict(mu=torch.full((B,), float(self.damping), dtype=x.dtype, device=x.device),
                    nu=torch.full((B,), 2.0, dtype=x.dtype, device=x.device),
                    undamped=torch.zeros(B, dtype=torch.bool, device=x.device))

    def _converged(self, x, g, g_norm, A, threshold, active, state, tol, eps) -> torch.Tensor:
        """The gradient test and the step test (class docstring); computes the next
        damped step, kept in ``state`` for :meth:`_step`, and the undamped one."""
        diag = A.diagonal(dim1=-2, dim2=-1)
        diag = torch.maximum(diag, eps * diag.amax(-1, keepdim=True)).clamp_min(torch.finfo(x.dtype).tiny)
        damped = A + torch.diag_embed(state["mu"][:, None] * diag)
        zero = torch.zeros_like(g)
        delta = torch.where(active[:, None], _solve_normal(damped, -g), zero)
        newton = torch.where(active[:, None], _solve_normal(A, -g), zero)
        xtol = tol * torch.linalg.vector_norm(x, dim=-1).clamp_min(1.0)
        state["delta"] = delta
        state["step_undamped"] = torch.linalg.vector_norm(newton - delta, dim=-1) <= xtol
        at_root = torch.linalg.vector_norm(newton, dim=-1) <= xtol
        return active & (g_norm <= threshold) & (state["undamped"] | at_root)

    def _step(self, res, x, f, g, A, active, state, eps):
        mu, nu = state["mu"], state["nu"]
        delta = state["delta"]
        x_try = x + delta
        r_try = res(x_try)
        f_try = 0.5 * (r_try * r_try).sum(-1)
        predicted = -(g * delta).sum(-1) - 0.5 * (delta * (A @ delta.unsqueeze(-1)).squeeze(-1)).sum(-1)
        actual = f - f_try
        rho = actual / torch.where(predicted > 0, predicted, torch.ones_like(predicted))
        # Below the rounding error of f, rho is noise: take the step unless f visibly grew.
        noise = _noise(f, state["r_err"], eps)
        measurable = predicted > noise
        accept = active & torch.isfinite(f_try) & torch.where(measurable, rho > 0, actual >= -noise)
        reject = active & ~accept
        shrink = torch.where(measurable, torch.clamp(1 - (2 * rho - 1) ** 3, min=1 / 3), torch.full_like(mu, 1 / 3))
        state["mu"] = torch.where(accept, mu * shrink, torch.where(reject, mu * nu, mu))
        state["nu"] = torch.where(accept, torch.full_like(nu, 2.0), torch.where(reject, 2 * nu, nu))
        state["undamped"] = torch.where(accept, state["step_undamped"], state["undamped"])
        failed = active & (state["mu"] > 1 / eps)
        return x_try, r_try, f_try, accept, failed
