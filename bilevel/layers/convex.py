r"""A CVXPY problem as a differentiable layer (needs the ``bilevel[cvxpy]`` extra).

A DPP problem (disciplined parametrized programming) is canonicalized once by
CVXPY to the cone program

.. math::

    \min_x \ \tfrac12 x^\top P x + c^\top x \quad\text{s.t.}\quad A x + s = b,\ \ s \in \mathcal K,

whose data :math:`(P, c, A, b)` are *affine* in the parameters :math:`\theta`
(the matrices of that map are taken from CVXPY's ``ParamConeProg`` and applied in
torch), and the optimal variables are slices (or fixed linear maps) of
:math:`x^\star`.  :math:`\mathcal K` is a product of the zero cone
(equalities), the non-negative orthant, second-order cones, PSD cones,
exponential cones and power cones (see *Cones* below).

*Forward.* Problems with only equality and inequality rows and a quadratic or
linear objective (LPs, QPs) go to the batched interior point
:func:`~bilevel.layers.qp_solve` in torch (on the device of the inputs, no NumPy
round trip); other cone programs are solved by Clarabel, element by element.
On the QP route the auxiliary variables CVXPY defines by equalities (``t = x - y`` for
``sum_squares(x - y)``) are eliminated first, in float64 (``bilevel/layers/_presolve.py``):
``last_info`` is then the :class:`~bilevel.layers.QPInfo` of the QP without them.  The
maps from :math:`\theta` to the data are sparse on every route.

*Backward.* The cone program's KKT conditions, written with the dual
:math:`y \in \mathcal K^*` and slack :math:`s` folded into one vector
:math:`v = y - s` (Moreau: :math:`y = \Pi_{\mathcal K^*}(v)`,
:math:`s = \Pi_{\mathcal K^*}(v) - v`), are the root of the semismooth map

.. math::

    F(x, v; P, c, A, b) = \begin{pmatrix} P x + c + A^\top \Pi_{\mathcal K^*}(v) \\
        A x + \Pi_{\mathcal K^*}(v) - v - b \end{pmatrix} = 0,

the residual map of Busseti, Moursi & Boyd with the homogenizing variable fixed
to 1.  :func:`~bilevel.custom_root` differentiates its root (one batched
adjoint solve over the batch, per-element convergence and certificates), and
autograd carries the result back through the affine map to :math:`\theta`.
For LPs and QPs the same derivative is the KKT differential of
:func:`~bilevel.layers.qp_solve` (OptNet).  Both are exact to solver tolerance
and agree with ``cvxpylayers`` (which differentiates the homogeneous embedding
with diffcp).

*Cones.* :math:`\mathcal K` and the projection onto its dual, with exact
derivatives for every cone, are in ``bilevel/layers/_cones.py`` (the cone order, the
duals, the projections and their math).

References:
    Agrawal, A., Amos, B., Barratt, S., Boyd, S., Diamond, S. and Kolter, J. Z.
    `Differentiable Convex Optimization Layers <https://arxiv.org/abs/1910.12430>`_.
    NeurIPS 2019.
    Agrawal, A., Barratt, S., Boyd, S., Busseti, E. and Moursi, W. M.
    `Differentiating through a cone program <https://arxiv.org/abs/1904.09043>`_.
    J. Appl. Numer. Optim., 2019.
    Amos, B. and Kolter, J. Z. `OptNet: Differentiable Optimization as a Layer in
    Neural Networks <https://arxiv.org/abs/1703.00443>`_. ICML 2017.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.func import jacfwd, vmap

from .._linalg import solve_ex
from ..implicit import custom_root
from ..implicit.linear_solve import LinearSolver
from ._checks import check_tensor
from ._cones import _Cones
from ._presolve import find_elimination
from .qp import QPStatus, _qp_solve, _vmapped, settle_failures

__all__ = ["ConvexLayer"]

_METHODS = ("auto", "qp", "conic")


def _import_cvxpy():
    try:
        import cvxpy
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "ConvexLayer needs CVXPY: install it with `pip install 'bilevel[cvxpy]'` (or `pip install cvxpy`)."
        ) from err
    return cvxpy


def _fortran_flat(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Flatten the last ``ndim`` dims of ``x`` in column-major (CVXPY's) order."""
    lead = x.dim() - ndim
    perm = list(range(lead)) + list(range(x.dim() - 1, lead - 1, -1))
    return x.permute(perm).reshape(x.shape[:lead] + (math.prod(x.shape[lead:]),))  # also for 0 rows


def _fortran_unflat(x: torch.Tensor, shape: tuple) -> torch.Tensor:
    """Inverse of :func:`_fortran_flat`: ``(..., prod(shape)) -> (..., *shape)``."""
    lead = x.dim() - 1
    y = x.reshape(x.shape[:lead] + tuple(reversed(shape)))
    perm = list(range(lead)) + list(range(y.dim() - 1, lead - 1, -1))
    return y.permute(perm)


class ConvexLayer(torch.nn.Module):
    r"""A DPP (or DGP, ``gp=True``) CVXPY problem as a layer: parameter tensors in, optimal variable tensors out.

    .. math::

        (\theta_1, \dots, \theta_k) \mapsto (x_1^\star, \dots, x_l^\star)(\theta)
        = \operatorname*{argmin}\{f_0(x; \theta) : f_i(x; \theta) \le 0,\ A(\theta) x = b(\theta)\}

    The problem is canonicalized once to a cone program with data affine in
    :math:`\theta`; see the module docstring for the forward solvers (a batched
    torch interior point for LPs/QPs, Clarabel otherwise), for the KKT /
    residual-map system differentiated by :func:`~bilevel.custom_root`, and for
    the cones: zero, non-negative, second-order, PSD, exponential (``log``,
    ``exp``, ``entr``, ``log_sum_exp``, ``kl_div``, ...) and power cones
    (``power``, ``pnorm``, ``geo_mean`` with ``approx=False``), the last two
    projected onto by Friberg's and Hien's scalar equations, with exact
    derivatives.

    *Geometric programs* (``gp=True``).  A log-log convex problem (DGP, e.g. a
    geometric program) in positive variables :math:`x > 0` with positive
    parameters :math:`\theta > 0`,

    .. math::

        \min_{x > 0} f_0(x; \theta) \quad\text{s.t.}\quad f_i(x; \theta) \le 1,\ \ g_j(x; \theta) = 1

    (:math:`f_i` log-log convex, such as posynomials; :math:`g_j` monomials), is
    convex in :math:`u = \log x`: with :math:`\varphi = \log \theta` it is

    .. math::

        \min_u \log f_0(e^u; e^\varphi) \quad\text{s.t.}\quad \log f_i(e^u; e^\varphi) \le 0,\ \
        \log g_j(e^u; e^\varphi) = 0,

    whose canonical cone program (exponential cones for posynomials) has data
    affine in :math:`\varphi` when the problem is DGP-DPP.  The layer takes
    :math:`\theta`, computes :math:`\varphi = \log \theta` in torch, solves for
    :math:`u^\star(\varphi)` as above and returns :math:`x^\star = e^{u^\star}`;
    autograd composes the chain rule
    :math:`\partial x^\star / \partial \theta = \operatorname{diag}(x^\star)\,
    (\partial u^\star / \partial \varphi)\, \operatorname{diag}(1 / \theta)`.
    A parameter that enters only as an exponent (``x ** p`` becomes
    :math:`p \log x`) is used as it is, and may have any sign.  This is CVXPY's
    ``solve(gp=True)`` and cvxpylayers' ``gp=True``.

    Args:
        problem: a ``cvxpy.Problem`` that is DPP (``problem.is_dpp()``), or, with
            ``gp=True``, DGP-DPP (``problem.is_dgp(dpp=True)``).
        parameters: its ``cp.Parameter`` objects, all of them, in the order the
            layer takes their values.
        variables: the ``cp.Variable`` objects whose optimal values the layer
            returns, in order.
        method: ``"auto"`` (default: LPs and QPs to the torch QP solver, other
            problems to Clarabel), ``"qp"`` (require the QP route) or
            ``"conic"`` (always Clarabel plus the residual-map derivative).
        solve: linear solver of the conic backward system (default:
            :func:`~bilevel.custom_root`'s, a dense LU per element up to 128
            unknowns, GMRES above).  The system is singular where a cone
            constraint is inactive (the canonical form's epigraph variables are
            then not unique); the default's least-squares fallback handles that.
        check: what an infeasible, unbounded or unsolved problem does.
            ``None`` (default): an unbatched problem raises
            :class:`~bilevel.layers.SolveError`; in a batch, the failed
            elements' outputs are NaN, a :class:`~bilevel.layers.SolveWarning`
            names them and their statuses, and the other elements are
            unaffected.  ``True``: always raise.  ``False``: never raise (NaN
            and the warning).  The failed indices are kept in ``last_failed``.
        gp: solve a log-log convex (DGP) problem in the logarithms of its
            variables and parameters (see *Geometric programs* above).  The
            values of the parameters that the problem takes logarithms of must
            then be positive (a ``ValueError`` otherwise, naming the batch
            elements).

    Raises:
        ImportError: CVXPY is not installed.
        ValueError: the problem is not DCP (or, when it is DGP, without
            ``gp=True``), not DPP, or with ``gp=True`` not DGP-DPP; the
            parameter list is not the problem's parameters, or a variable is not
            in the problem.
        NotImplementedError: a cone outside the list above in the canonical
            form (none that CVXPY emits for Clarabel today); ``method="qp"`` for
            a problem that is not an LP/QP.

    Example:
        An entropy-regularized linear objective over the simplex (exponential
        cones), whose solution is :math:`\operatorname{softmax}(\theta)`:

        >>> import pytest; cp = pytest.importorskip("cvxpy")
        >>> import torch
        >>> from bilevel.layers import ConvexLayer
        >>> x, theta = cp.Variable(3), cp.Parameter(3)
        >>> problem = cp.Problem(cp.Minimize(-theta @ x - cp.sum(cp.entr(x))), [cp.sum(x) == 1])
        >>> layer = ConvexLayer(problem, parameters=[theta], variables=[x])
        >>> t = torch.tensor([[0.5, 1.0, 2.0], [0.0, 0.0, 1.0]], dtype=torch.float64, requires_grad=True)
        >>> (p,) = layer(t)                                         # a batch of two
        >>> bool(torch.allclose(p, torch.softmax(t, -1), atol=1e-9))
        True
        >>> p[:, 0].sum().backward()                                # d softmax_0 / d theta

        A geometric program, ``min x + y`` s.t. ``x y >= a``, solved by
        :math:`x = y = \sqrt a`:

        >>> x, y, a = cp.Variable(pos=True), cp.Variable(pos=True), cp.Parameter(pos=True)
        >>> gp_layer = ConvexLayer(cp.Problem(cp.Minimize(x + y), [x * y >= a]), [a], [x, y], gp=True)
        >>> a_t = torch.tensor([4.0, 9.0], dtype=torch.float64, requires_grad=True)
        >>> x_t, y_t = gp_layer(a_t)
        >>> bool(torch.allclose(x_t, a_t.sqrt(), atol=1e-9))
        True

    References:
        Agrawal, A., Amos, B., Barratt, S., Boyd, S., Diamond, S. and Kolter, J. Z.
        `Differentiable Convex Optimization Layers <https://arxiv.org/abs/1910.12430>`_.
        NeurIPS 2019.
        Friberg, H. A. `Projection onto the exponential cone: a univariate
        root-finding problem <https://docs.mosek.com/whitepapers/expcone-proj.pdf>`_.
        MOSEK ApS, 2021.
        Hien, L. T. K. `Differential properties of Euclidean projection onto power
        cone <https://doi.org/10.1007/s00186-015-0514-0>`_. Math. Methods Oper.
        Res., 2015.
    """

    def __init__(
        self,
        problem: Any,
        parameters: Sequence[Any],
        variables: Sequence[Any],
        *,
        method: str = "auto",
        solve: LinearSolver | None = None,
        check: bool | None = None,
        gp: bool = False,
    ):
        super().__init__()
        cp = _import_cvxpy()
        if not isinstance(gp, bool):
            raise TypeError(f"ConvexLayer: `gp` must be True or False; got {gp!r}.")
        _check_problem(cp, problem, parameters, variables, gp)
        if method not in _METHODS:
            raise ValueError(f"ConvexLayer: `method` must be one of {', '.join(map(repr, _METHODS))}; got {method!r}.")
        if solve is not None and not isinstance(solve, LinearSolver):
            raise TypeError(f"ConvexLayer: `solve` must be a linear solver such as bilevel.implicit.GMRES(); got {solve!r}.")
        self.problem, self.parameters, self.variables = problem, list(parameters), list(variables)
        self.gp = gp
        data, chain, inverse = _problem_data(cp, problem, self.parameters, gp)
        prog = data[cp.settings.PARAM_PROB]
        self._chain, self._data = chain, data
        self.cones = _Cones(data["dims"], rows=prog.A.shape[0] // (prog.x.size + 1))
        self.n, self.m = int(prog.x.size), self.cones.size
        self.quadratic = prog.P is not None
        self.method = ("qp" if self.cones.polyhedral else "conic") if method == "auto" else method
        if self.method == "qp" and not self.cones.polyhedral:
            raise NotImplementedError(
                "ConvexLayer(method='qp'): the problem is not an LP/QP (its canonical form has second-order, "
                "PSD, exponential or power cones); use method='auto' or 'conic'."
            )
        if check is not None and not isinstance(check, bool):
            raise TypeError(f"ConvexLayer: `check` must be None, True or False; got {check!r}.")
        self.solve, self.check = solve, check
        sources, start = [], 0  # (cvxpy parameter fed, first column of theta, size)
        for p in self.parameters:
            sources.append((p, start, p.size))
            start += p.size
        self._logged: list[tuple[int, int, int]] = []  # gp: (index, first column, size) of the parameters taken logs of
        first = 0  # offset of the start of the variable chain: after Dgp2Dcp for gp
        if gp:
            at, dgp = _dgp_reduction(chain)
            first = at + 1
            column = start
            logs = {orig.id: new for orig, new in dgp.canon_methods._parameters.items()}
            for k, (p, offset, size) in enumerate(list(sources)):
                if p.id in logs:  # a leaf of a log-log expression: its log is a parameter of the DCP problem
                    sources.append((logs[p.id], column, size))
                    self._logged.append((k, offset, size))
                    column += size
                # (a parameter may also enter as itself, e.g. as an exponent: x ** p -> p log x)
            log_vars = {orig.id: new for orig, new in dgp.canon_methods._variables.items()}
            variables_in = [log_vars.get(v.id) for v in self.variables]
        else:
            variables_in = self.variables
        theta = _parameter_map(chain, prog, sources)  # (P_total + 1, U (+ logged sizes for gp) + 1)
        c_map = _sparse_matmul(prog.q, theta)[: self.n]
        ab = _sparse_matmul(prog.A, theta)  # rows: [A | b] flattened column-major, cvxpy's sign
        p_map = _sparse_matmul(prog.P, theta) if self.quadratic else None
        # the QP route solves without the auxiliary variables CVXPY defines by equalities
        self._elimination = (find_elimination(ab, p_map, self.n, self.m, self.cones.zero, theta.shape[1] - 1)
                             if self.method == "qp" else None)
        self._blocks: list[str] = []  # with a diagonal elimination, the reduced QP's data come block by block
        self._constant_blocks: set[str] = set()  # ... those no parameter changes
        if self._elimination is not None and self._elimination.diagonal:
            for name, mapping in self._elimination.block_maps(c_map, ab, p_map, self.n, self.m, self.cones.zero).items():
                self.register_buffer(f"_block_{name}", _to_torch(mapping), persistent=False)
                self._blocks.append(name)
                if mapping[:, : theta.shape[1] - 1].nnz == 0:
                    self._constant_blocks.add(name)
        if not self._blocks:  # the full data's maps (unused where the blocks are)
            self.register_buffer("_c_map", _to_torch(c_map), persistent=False)
            self.register_buffer("_ab_map", _to_torch(ab), persistent=False)
            if self.quadratic:
                self.register_buffer("_p_map", _to_torch(p_map), persistent=False)
        self._outputs = _variable_maps(cp, chain, inverse, prog, variables_in, self.variables, first)
        self.last_info = None
        self.last_failed: list[int] = []

    # ------------------------------------------------------------------ forward

    def forward(self, *params: torch.Tensor, solver_args: dict | None = None) -> tuple[torch.Tensor, ...]:
        """Solve for the given parameter values.

        Args:
            *params: one tensor per parameter, of the parameter's shape, or with
                one leading batch dimension ``B`` (shared by every batched one;
                the others are broadcast).
            solver_args: options of the forward solver: for the QP route
                ``tol`` and ``maxiter`` of :func:`~bilevel.layers.qp_solve`; for
                Clarabel its settings (e.g. ``max_iter``, ``tol_gap_rel``).
                cvxpylayers' ``eps`` and ``max_iters`` are translated to these;
                its solver choices (``solve_method``, ``verbose``, ``n_jobs_*``,
                ``acceleration_lookback``) are dropped with a warning.

        Returns:
            A tuple with one tensor per variable, of the variable's shape
            (``(B, *shape)`` when batched), dtype and device of the parameters.

        Raises:
            ValueError: a wrong number of tensors, or a tensor whose shape is
                neither the parameter's nor a batch of it (naming both).
            TypeError: non-floating tensors, or mixed dtypes / devices.
            SolveError: an infeasible, unbounded or unsolved problem (naming the
                element and the solver status), as ``check`` says (class docstring).
            NotImplementedError: under :func:`torch.func.vmap` (the layer is batched
                already: stack the parameter values along a leading dimension).
        """
        if any(_vmapped(t) for t in params):
            raise NotImplementedError(
                "ConvexLayer does not run under torch.func.vmap; it is batched already: stack the "
                "parameter values along a leading dimension (shape (B, *parameter.shape)) and call it once."
            )
        theta, B = self._stack(params)
        if self.gp and B != 0:
            theta = torch.cat([theta] + [torch.log(theta[:, i: i + n]) for _, i, n in self._logged], -1)
        if B == 0:  # an empty batch (a data loader's last): outputs with 0 rows, in theta's graph
            zero = theta.sum(-1) * 0
            return tuple(zero.reshape((0,) + (1,) * len(var.shape)).expand((0, *var.shape)) for var in self.variables)
        ones = torch.ones(theta.shape[0], 1, dtype=theta.dtype, device=theta.device)
        theta = torch.cat([theta, ones], -1)  # (B, U + 1)
        if self._blocks:
            return self._finish(self._solve_reduced(theta, solver_args, B), B)
        c = _apply_map(self._c_map, theta)
        ab = _apply_map(self._ab_map, theta).reshape(-1, self.n + 1, self.m).mT  # (B, m, n + 1)
        A, b = -ab[..., :-1], ab[..., -1]  # the solver's form A x + s = b
        if self.quadratic:
            P = _apply_map(self._p_map, theta).reshape(-1, self.n, self.n)
            P = 0.5 * (P + P.mT)
        else:
            P = torch.zeros(theta.shape[0], self.n, self.n, dtype=theta.dtype, device=theta.device)
        self._failures = ([], [], "")
        x = self._solve_qp(P, c, A, b, solver_args, B) if self.method == "qp" else (
            self._solve_conic(P, c, A, b, solver_args, B)
        )
        return self._finish(x, B)

    def _finish(self, x: torch.Tensor, B: int | None) -> tuple[torch.Tensor, ...]:
        """The variables' values from the canonical solution ``x`` (B, n), failures settled."""
        self.last_failed = self._failures[0]
        (x,) = settle_failures((x,), *self._failures[:2], B is not None, self.check, self._failures[2])
        outs = tuple(_output(x, how, var.shape) for how, var in zip(self._outputs, self.variables))
        if self.gp:  # the DCP problem's variables are the logs of the DGP problem's
            outs = tuple(torch.exp(o) for o in outs)
        return outs if B is not None else tuple(o[0] for o in outs)

    def _stack(self, params: tuple) -> tuple[torch.Tensor, int | None]:
        """Check the tensors against the parameters; return ``(B or 1, U)`` column-major values."""
        if len(params) != len(self.parameters):
            raise ValueError(
                f"ConvexLayer: expected {len(self.parameters)} parameter tensors "
                f"({', '.join(p.name() for p in self.parameters)}); got {len(params)}."
            )
        ref_at = next((i for i, t in enumerate(params) if torch.is_tensor(t) and t.is_floating_point()), 0)
        ref, ref_what = params[ref_at], f"parameter `{self.parameters[ref_at].name()}`"
        batch = {}
        for p, t in zip(self.parameters, params):
            check_tensor(t, f"the value of parameter `{p.name()}`", ref, ref_what, "ConvexLayer")
            shape = tuple(p.shape)
            if tuple(t.shape) == shape:
                continue
            if t.dim() == len(shape) + 1 and tuple(t.shape[1:]) == shape:
                batch[p.name()] = t.shape[0]
                continue
            raise ValueError(
                f"ConvexLayer: parameter `{p.name()}` has shape {shape} (or (B, *{shape}) for a batch); "
                f"got a tensor of shape {tuple(t.shape)}."
            )
        if len(set(batch.values())) > 1:
            raise ValueError(f"ConvexLayer: the batched parameters have different batch sizes: {batch}.")
        B = next(iter(batch.values()), None)
        for p, t in zip(self.parameters, params):
            if not bool(torch.isfinite(t).all()):
                raise FloatingPointError(f"ConvexLayer: the value of parameter `{p.name()}` contains NaN or inf.")
        for k, _, _ in self._logged:
            p, t = self.parameters[k], params[k]
            if not bool((t > 0).all()):
                where = ""
                if t.dim() > len(p.shape):
                    bad = (t <= 0).reshape(t.shape[0], -1).any(-1).nonzero().reshape(-1).tolist()
                    where = f" (batch element(s) {bad[:8]}{' and more' if len(bad) > 8 else ''})"
                raise ValueError(
                    f"ConvexLayer(gp=True): the value of parameter `{p.name()}` must be positive{where}: the layer "
                    f"solves the problem in the logarithms of the parameters; got min {float(t.min()):.3g}."
                )
        flat = []
        for p, t in zip(self.parameters, params):
            nd = len(p.shape)
            t = t if t.dim() > nd else t.unsqueeze(0)
            flat.append(_fortran_flat(t, nd).expand(1 if B is None else B, -1))
        return torch.cat(flat, -1), B

    def _solve_qp(self, P, c, A, b, solver_args, B):
        z = self.cones.zero
        data = (P, c, A[:, :z], b[:, :z], A[:, z:], b[:, z:])
        if self._elimination is None:
            return self._qp(data, solver_args, B)
        source = c.dtype  # the reduction squares conditioning (P' = M^T M): in float64, as qp_solve works
        data, recovery = self._elimination.reduce(*(t.to(torch.float64) for t in data))
        return self._elimination.recover(self._qp(data, solver_args, B, source), *recovery, self.n).to(source)

    def _solve_reduced(self, theta, solver_args, B):
        """The QP route on the reduced problem computed block by block from the parameters."""
        maps = {name: getattr(self, f"_block_{name}") for name in self._blocks}
        source = theta.dtype  # the reduction squares conditioning (P' = M^T M): in float64, as qp_solve works
        data, recovery = self._elimination.blocks_from(maps, theta.to(torch.float64), _apply_map, self._constant_blocks)
        return self._elimination.recover(self._qp(data, solver_args, B, source), *recovery, self.n).to(source)

    def _qp(self, data, solver_args, B, source=None):
        """:func:`qp_solve` on ``data`` (``source``: the dtype the data were computed from, where
        lower than theirs), failures recorded for the layer."""
        opts = _translate_solver_args(solver_args, {"eps": ("tol",), "max_iters": ("maxiter",)})
        unknown = set(opts) - {"tol", "maxiter"}
        if unknown:
            raise ValueError(f"ConvexLayer: the QP route takes solver_args `tol` and `maxiter`; got {sorted(unknown)}.")
        x, info = _qp_solve(*data, opts.get("tol"), opts.get("maxiter", 100), False, True, source)
        self.last_info = info
        self._failures = _failures(
            (~info.converged).nonzero().reshape(-1).tolist(),
            [QPStatus(int(s)).name for s in info.status], B,
            lambda i: f"primal residual {float(info.primal_residual[i]):.3g}, dual residual "
                      f"{float(info.dual_residual[i]):.3g}",
        )
        return x

    def _solve_conic(self, P, c, A, b, solver_args, B):
        cones = self.cones
        layer = self

        def residual(sol, P, c, A, b):
            x, v = sol
            y = cones.project_dual(v)
            return (P @ x + c + A.mT @ y, A @ x + y - v - b)

        def solver(P, c, A, b):
            x, v = layer._clarabel(P, c, A, b, solver_args, B)
            return _polish(residual, x, v, (P, c, A, b))

        x, _ = custom_root(residual, solve=self.solve, batch_dims=1)(solver)(P, c, A, b)
        return x

    def _clarabel(self, P, c, A, b, solver_args, B):
        import scipy.sparse as sp

        opts = dict(_CLARABEL_DEFAULTS)
        opts.update(_translate_solver_args(
            solver_args, {"eps": ("tol_gap_abs", "tol_gap_rel", "tol_feas"), "max_iters": ("max_iter",)}))
        arrays = [t.detach().cpu().numpy() for t in (P, c, A, b)]
        xs, vs, failed, statuses = [], [], [], []
        for i in range(arrays[1].shape[0]):  # Clarabel solves one problem per call
            data = dict(self._data)
            data.update(P=sp.csc_array(arrays[0][i]), c=arrays[1][i], A=sp.csc_array(arrays[2][i]), b=arrays[3][i])
            sol = self._chain.solver.solve_via_data(data, False, False, opts)
            status = str(sol.status)
            statuses.append(status)
            if status not in ("Solved", "AlmostSolved"):
                failed.append(i)
                xs.append(np.zeros(self.n))
                vs.append(np.zeros(self.m))
                continue
            xs.append(np.asarray(sol.x))
            vs.append(np.asarray(sol.z) - np.asarray(sol.s))
        self._failures = _failures(failed, statuses, B, lambda i: "Clarabel")
        self.last_info = statuses
        like = {"dtype": c.dtype, "device": c.device}
        return torch.as_tensor(np.stack(xs), **like), torch.as_tensor(np.stack(vs), **like)

    def extra_repr(self) -> str:
        return (f"parameters={[p.name() for p in self.parameters]}, variables={[v.name() for v in self.variables]}, "
                f"method={self.method!r}, n={self.n}, m={self.m}" + (", gp=True" if self.gp else ""))


_POLISH_MAX = 400


def _polish(residual, x: torch.Tensor, v: torch.Tensor, data: tuple, steps: int = 3) -> tuple:
    """A few semismooth Newton steps on ``F(x, v) = 0`` from the interior-point solution
    (batched dense Jacobians by forward mode), each kept only where it reduces ``||F||``:
    this takes Clarabel's ~1e-9 accuracy to machine precision, so that derivatives are
    exact to the solution's precision.  Skipped above ``_POLISH_MAX`` unknowns.

    ``F`` and its Jacobian come from one forward-mode call at each point (the value is that
    call's primal), so a step costs one residual evaluation, not two; the Jacobian at the
    last trial point is not needed and that point gets a plain evaluation.  After the first
    step (always tried: the solution may come from another precision), a step within rounding
    of the point, ``||step|| <= 4 eps (1 + ||w||)``, is not taken (Newton's convergence being
    quadratic, the step before reached rounding), and the steps stop once no element has
    another to take; each element's steps are independent of the other elements'."""
    n = x.shape[-1]
    if n + v.shape[-1] > _POLISH_MAX:
        return x, v
    eps = torch.finfo(x.dtype).eps

    def flat(w, *args):
        fx, fv = residual((w[:n], w[n:]), *args)
        F = torch.cat([fx, fv])
        return F, F

    batched = vmap(lambda w, *args: flat(w, *args)[0])
    with_jacobian = vmap(jacfwd(flat, has_aux=True))
    w = torch.cat([x, v], -1)
    J, F = with_jacobian(w, *data)
    norm = torch.linalg.vector_norm(F, dim=-1)
    for i in range(steps):
        step, info = solve_ex(J, -F)
        rounding = 4 * eps * (1 + torch.linalg.vector_norm(w, dim=-1))
        worth = (info == 0) & ((i == 0) | (torch.linalg.vector_norm(step, dim=-1) > rounding))
        if not bool(worth.any()):
            break
        trial = w + step
        if i + 1 < steps:
            J_trial, F_trial = with_jacobian(trial, *data)
        else:
            F_trial = batched(trial, *data)
        norm_trial = torch.linalg.vector_norm(F_trial, dim=-1)
        better = worth & torch.isfinite(norm_trial) & (norm_trial < norm)
        if not bool(better.any()):
            break
        w = torch.where(better.unsqueeze(-1), trial, w)
        F = torch.where(better.unsqueeze(-1), F_trial, F)
        norm = torch.where(better, norm_trial, norm)
        if i + 1 < steps:
            J = torch.where(better[:, None, None], J_trial, J)
    return w[..., :n], w[..., n:]


_CLARABEL_DEFAULTS = {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10, "tol_ktratio": 1e-8, "max_iter": 200}

_STATUS_HINTS = {
    "INFEASIBLE": "infeasible", "PrimalInfeasible": "infeasible", "AlmostPrimalInfeasible": "infeasible",
    "UNBOUNDED": "unbounded", "DualInfeasible": "unbounded", "AlmostDualInfeasible": "unbounded",
}


_CVXPYLAYERS_ONLY = ("solve_method", "verbose", "n_jobs_forward", "n_jobs_backward", "acceleration_lookback")


def _translate_solver_args(solver_args: dict | None, names: dict) -> dict:
    """``solver_args`` with cvxpylayers' keys (``eps``, ``max_iters``) renamed to the
    forward solver's (``names``) and its solver choices dropped with a warning."""
    opts = dict(solver_args or {})
    dropped = [k for k in _CVXPYLAYERS_ONLY if k in opts]
    for key in dropped:
        opts.pop(key)
    if dropped:
        warnings.warn(f"ConvexLayer: solver_args {dropped} choose cvxpylayers' solvers and are ignored here.",
                      UserWarning, stacklevel=4)
    for key, targets in names.items():
        if key in opts:
            value = opts.pop(key)
            for target in targets:
                opts.setdefault(target, value)
    return opts


def _failures(failed: list, statuses: list, B: int | None, detail) -> tuple[list, list, str]:
    """``(failed, their statuses, the message naming them)`` for :func:`settle_failures`."""
    if not failed:
        return [], [], ""
    lines = []
    for i in failed[:8]:
        where = f"batch element {i}" if B is not None else "the problem"
        kind = _STATUS_HINTS.get(statuses[i], "not solved")
        lines.append(f"{where} is {kind} (status {statuses[i]}; {detail(i)})")
    more = f" (and {len(failed) - 8} more)" if len(failed) > 8 else ""
    message = (
        f"ConvexLayer: {len(failed)} problem(s) could not be solved{more}:\n  " + "\n  ".join(lines)
        + "\nCheck the parameter values of these elements (feasibility, boundedness)."
    )
    return failed, [statuses[i] for i in failed], message


# ----------------------------------------------------------------------------- canonicalization helpers


def _check_problem(cp, problem, parameters, variables, gp=False) -> None:
    if not isinstance(problem, cp.Problem):
        raise TypeError(f"ConvexLayer: `problem` must be a cvxpy.Problem; got {type(problem).__name__}.")
    if gp:
        _check_dgp(problem)
    elif not problem.is_dcp():
        if problem.is_dgp():
            raise ValueError(
                "ConvexLayer: the problem is not DCP (disciplined convex programming) but it is DGP "
                "(log-log convex, e.g. a geometric program): pass gp=True to solve it in the logarithms "
                "of its variables and parameters (as CVXPY's solve(gp=True) does)."
                + ("" if problem.is_dgp(dpp=True) else " It is not DGP-DPP either, which gp=True also needs: "
                   "see https://www.cvxpy.org/tutorial/dpp/.")
            )
        raise ValueError(
            "ConvexLayer: the problem is not DCP (disciplined convex programming): CVXPY cannot prove it "
            "convex, parameters taken as constants (a layer needs a problem that is DCP, and DPP too). "
            "Check the curvature of the objective and constraints (`expr.curvature`, e.g. Maximize of a "
            "convex function, or a product of a parameter of unknown sign with a nonlinear expression: "
            "declare its sign with cp.Parameter(nonneg=True)); see https://www.cvxpy.org/tutorial/dcp/."
        )
    elif not problem.is_dpp():
        raise ValueError(
            "ConvexLayer: the problem is not DPP (disciplined parametrized programming), so its "
            "canonical form is not affine in the parameters. Rewrite it so that parameters enter "
            "affinely (e.g. replace quad_form(x, P) by sum_squares(L @ x) with P = L^T L); see "
            "https://www.cvxpy.org/tutorial/dpp/."
        )
    for name, items, kind in (("parameters", parameters, cp.Parameter), ("variables", variables, cp.Variable)):
        if not isinstance(items, (list, tuple)):
            raise TypeError(f"ConvexLayer: `{name}` must be a list of cp.{kind.__name__}; got {type(items).__name__}.")
        for i, item in enumerate(items):
            if not isinstance(item, kind):
                raise TypeError(f"ConvexLayer: `{name}[{i}]` must be a cp.{kind.__name__}; got {type(item).__name__}.")
    ids = {p.id for p in parameters}
    missing = [p.name() for p in problem.parameters() if p.id not in ids]
    extra = [p.name() for p in parameters if p.id not in {q.id for q in problem.parameters()}]
    if missing or extra or len(ids) != len(parameters):
        raise ValueError(
            "ConvexLayer: `parameters` must list each parameter of the problem once; "
            f"missing {missing}, not in the problem {extra}."
        )
    known = {v.id for v in problem.variables()}
    for v in variables:
        if v.id not in known:
            raise ValueError(f"ConvexLayer: variable `{v.name()}` is not a variable of the problem.")


def _check_dgp(problem) -> None:
    if problem.is_dgp(dpp=True):
        return
    if problem.is_dgp():
        raise ValueError(
            "ConvexLayer(gp=True): the problem is DGP (log-log convex) but not DPP in the DGP sense "
            "(`problem.is_dgp(dpp=True)` is False), so its log-log canonical form is not affine in the "
            "logarithms of the parameters. Rewrite it so that parameters enter as coefficients and "
            "exponents of monomials; see https://www.cvxpy.org/tutorial/dpp/."
        )
    hint = " It is DCP: leave gp=False." if problem.is_dcp() else (
        " Check the log-log curvature of the objective and constraints (`expr.log_log_curvature`) and that "
        "every variable and parameter that is a leaf of a log-log expression is declared positive "
        "(cp.Variable(pos=True), cp.Parameter(pos=True)).")
    raise ValueError(
        "ConvexLayer(gp=True): the problem is not DGP (disciplined geometric programming: log-log convex, "
        "`problem.is_dgp()` is False)." + hint + " See https://www.cvxpy.org/tutorial/dgp/."
    )


def _dgp_reduction(chain) -> tuple[int, Any]:
    """The position and the ``Dgp2Dcp`` reduction of a ``gp=True`` solving chain."""
    from cvxpy.reductions.dgp2dcp.dgp2dcp import Dgp2Dcp

    for at, red in enumerate(chain.reductions):
        if isinstance(red, Dgp2Dcp):
            return at, red
    raise RuntimeError("ConvexLayer(gp=True): CVXPY's solving chain has no Dgp2Dcp reduction.")  # pragma: no cover


def _placeholder(p) -> np.ndarray:
    """A value satisfying the parameter's attributes (canonicalization needs one)."""
    for guess in (np.ones(p.shape), np.zeros(p.shape), -np.ones(p.shape), np.eye(*p.shape) if p.ndim == 2 else None):
        if guess is None:
            continue
        try:
            p.value = guess
            return guess
        except ValueError:
            continue
    return p.project(np.ones(p.shape))


def _problem_data(cp, problem, parameters, gp=False):
    saved = [p.value for p in parameters]
    try:
        for p in parameters:
            if p.value is None:
                _placeholder(p)
        return problem.get_problem_data(cp.CLARABEL, gp=gp)
    finally:
        for p, v in zip(parameters, saved):
            if v is None:
                p.value = None


def _parameter_map(chain, prog, sources):
    """Sparse ``(P_total + 1, U + 1)`` matrix: the canonical parameter vector (with its
    constant 1 last) from the values flattened column-major (with a 1 last).

    ``sources`` lists ``(parameter, start, size)``: the values of ``parameter`` are the
    columns ``start: start + size`` (the user's parameters; for ``gp=True`` also the
    log-parameters of ``Dgp2Dcp``, fed the logarithms of the user's values)."""
    reduced = {}
    for red in chain.reductions:
        for orig, new in getattr(red, "_parameters", {}).items():
            reduced[orig.id] = (new, orig)
    total = sum(prog.param_id_to_size.values())
    U = max((start + size for _, start, size in sources), default=0)
    import scipy.sparse as sp

    M = sp.lil_array((total + 1, U + 1))
    M[prog.param_id_to_col[-1], U] = 1.0
    fed = {p.id for p, _, _ in sources} | {reduced[p.id][0].id for p, _, _ in sources if p.id in reduced}
    unfed = [pid for pid in prog.param_id_to_col if pid != -1 and pid not in fed]
    if unfed:  # a parameter CVXPY made that the layer cannot compute from the values it is given
        raise NotImplementedError(
            f"ConvexLayer: the canonical form has parameters (ids {unfed}) that are not the problem's "
            "parameters nor known transforms of them; this CVXPY reduction is not supported."
        )
    for p, start, size in sources:
        if p.id in prog.param_id_to_col:
            col = prog.param_id_to_col[p.id]
            M[np.arange(col, col + size), np.arange(start, start + size)] = 1.0
        elif p.id in reduced:
            from cvxpy.reductions.cvx_attr2constr import lower_value

            new, orig = reduced[p.id]
            col = prog.param_id_to_col[new.id]
            for j in range(size):
                e = np.zeros(size)
                e[j] = 1.0
                low = np.asarray(lower_value(orig, np.reshape(e, p.shape, order="F"))).reshape(-1, order="F")
                nonzero = np.flatnonzero(low)
                M[col + nonzero, np.full(nonzero.size, start + j)] = low[nonzero]
        # else: the parameter does not reach the canonical data (its column stays zero)
    return M.tocsr()


def _sparse_matmul(T, M):
    """``T @ M`` as a sparse matrix: CVXPY's maps to its canonical data times the
    parameter map.  Kept sparse: dense, the maps of a 100 x 150 least-squares problem
    with its matrix as a parameter held 1.3e9 entries (10 GB) and every call multiplied
    them out (170 GFlop)."""
    import scipy.sparse as sp

    return sp.csr_array(sp.csr_array(T) @ M)


def _to_torch(a) -> torch.Tensor:
    """A scipy sparse matrix as a torch sparse COO tensor (float64)."""
    coo = a.tocoo()
    indices = torch.as_tensor(np.stack([coo.row, coo.col]).astype(np.int64))
    values = torch.as_tensor(coo.data, dtype=torch.float64)
    return torch.sparse_coo_tensor(indices, values, coo.shape, check_invariants=True).coalesce()


def _apply_map(mapping: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``theta @ mapping.T`` for a sparse ``(R, U + 1)`` map and values ``(B, U + 1)``: ``(B, R)``."""
    return torch.sparse.mm(mapping.to(theta), theta.mT).mT.contiguous()  # (B, R) row-major: bmm-friendly


def _variable_maps(cp, chain, inverse, prog, variables, named=None, first: int = 0) -> list:
    """For each variable: ``("slice", start, size)`` into the canonical ``x``, or
    ``("matrix", M)`` with ``value = M x`` (variables rewritten by CVXPY, e.g. ``nonneg=True``
    or ``symmetric=True``), found by inverting the reduction chain on basis vectors.

    The chain is inverted from its end down to ``chain.reductions[first]`` (every reduction
    there linear); for ``gp=True`` that is the one after ``Dgp2Dcp``, and ``variables`` are
    its log-variables (``None`` where one is missing; ``named``: the user's, for messages)."""
    out = []
    for v, user in zip(variables, named or variables):
        if v is None:
            raise NotImplementedError(
                f"ConvexLayer: variable `{user.name()}` cannot be recovered from the canonical form.")
        size = int(np.prod(v.shape, dtype=int))
        if v.id in prog.var_id_to_col and prog.id_to_var[v.id].size == size:
            out.append(("slice", prog.var_id_to_col[v.id], size))
            continue
        n = prog.x.size
        cols = [_invert_primal(cp, chain, inverse, np.eye(n)[j], v, first, user.name()) for j in range(n)]
        out.append(("matrix", torch.as_tensor(np.stack(cols, 1), dtype=torch.float64)))
    return out


def _invert_primal(cp, chain, inverse, x: np.ndarray, v, first: int = 0, name: str | None = None) -> np.ndarray:
    from cvxpy.reductions.solution import Solution

    sol = Solution(cp.OPTIMAL, 0.0, {0: x}, {}, {})
    for red, inv in zip(reversed(chain.reductions[first:-1]), reversed(inverse[first:-1])):
        sol = red.invert(sol, inv)
    value = sol.primal_vars.get(v.id)
    if value is None:
        raise NotImplementedError(
            f"ConvexLayer: variable `{name or v.name()}` cannot be recovered from the canonical form.")
    return np.reshape(np.asarray(value), -1, order="F")


def _output(x: torch.Tensor, how: tuple, shape: tuple) -> torch.Tensor:
    if how[0] == "slice":
        flat = x[..., how[1]: how[1] + how[2]]
    else:
        flat = x @ how[1].to(x).mT
    return _fortran_unflat(flat, tuple(shape)) if len(shape) else flat[..., 0]
