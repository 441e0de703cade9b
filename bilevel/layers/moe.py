r"""Physics-informed hard constraints, on one domain or split among a mixture of experts.

A network proposes :math:`N` basis functions :math:`\phi_1, \dots, \phi_N` of
the space-time point :math:`z`; the prediction is
:math:`u_\omega(z) = \sum_i \omega_i \phi_i(z)`.  The *hard constraint* picks the
coefficients so that the PDE holds at collocation points :math:`z_1, \dots, z_P`
(Négiar et al., 2023; Chalapathi, Du and Krishnapriyan, 2024):

.. math::
    \omega^\star(\theta) = \operatorname*{argmin}_\omega \tfrac12 \sum_p
        \|\mathcal R(u_\omega, z_p)\|^2 + \tfrac{\gamma}{2}\|\omega\|^2,

with :math:`\mathcal R` a *pointwise* residual (the PDE operator at interior
points, the initial and boundary conditions at theirs), evaluated on the
fields :math:`u_\omega, \partial u_\omega, \dots` at :math:`z_p`, which are
:math:`\Phi^{(d)}_p \omega` for the values / derivatives :math:`\Phi^{(d)}` of
the basis functions at the points (the network's output, see
:func:`evaluate_basis`).

The **mixture of experts** splits the collocation points among :math:`K`
subdomains (a fixed partition, e.g. :class:`BoxPartition`); expert :math:`k` has
its own coefficients :math:`\omega^k` and solves the problem above on its
points :math:`\mathcal P_k` only.  The :math:`K` problems are independent: the
forward pass solves them in **one** batched Levenberg-Marquardt call
(``batch_dims=1``), the backward pass differentiates them by **one** batched
implicit-function-theorem solve (:func:`~bilevel.custom_root` with
``batch_dims=1``): with :math:`f_k(\omega, \theta) = \tfrac12\|r_k(\omega, \theta)\|^2
+ \tfrac\gamma2\|\omega\|^2` and :math:`\theta` the basis values,

.. math::
    \nabla^2_{\omega\omega} f_k\; v_k = \bar\omega^k, \qquad
    \bar\theta \mathrel{+}= -(\partial_\theta \nabla_\omega f_k)^\top v_k,
    \qquad k = 1, \dots, K,

a block-diagonal system solved block by block in one call (a batched dense
Cholesky for :math:`N \le 128`).  Smaller, local problems are cheaper and better
conditioned than the global one, and :math:`K N` coefficients fit more than
:math:`N`.

References:
    Chalapathi, N., Du, Y. and Krishnapriyan, A. S. `Scaling physics-informed
    hard constraints with mixture-of-experts <https://arxiv.org/abs/2402.13412>`_.
    ICLR 2024.
    Négiar, G., Mahoney, M. W. and Krishnapriyan, A. S. `Learning differentiable
    solvers for systems with hard constraints <https://arxiv.org/abs/2207.08675>`_.
    ICLR 2023.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.func import functional_call, jacfwd, vmap

from .._tolerance import default_residual_tol, default_tol
from .._tree import tree_flatten, tree_map, tree_unflatten
from ..implicit import custom_root, stationarity
from ..implicit.linear_solve import LinearSolver
from ..solvers import GaussNewton, LevenbergMarquardt
from ..solvers._base import SolverInfo
from ..status import BilevelError, ConvergenceWarning, Status
from ..typing import TensorTree

__all__ = ["BoxPartition", "HardConstraint", "HardConstraintMoE", "SoftConstraint", "evaluate_basis"]

PointwiseResidual = Callable[..., torch.Tensor]
"""``residual(fields, *data) -> (P,)`` or ``(P, c)``: row ``p`` depends on point ``p`` only."""


# ----------------------------------------------------------------------------- partition


class BoxPartition:
    r"""Split the box :math:`\prod_j [\ell_j, h_j] \subset \mathbb R^d` into
    :math:`\prod_j s_j` equal cells, one per expert.

    Calling it on points ``(P, d)`` returns the cell (expert) of each point,
    numbered in row-major order over the dimensions (the last dimension fastest).
    Points on a shared face go to the upper cell; points on the upper face of the
    box to the last one.

    Args:
        lower: the lower corner :math:`\ell` (length ``d``).
        upper: the upper corner :math:`h` (length ``d``), ``upper > lower``.
        splits: the number of cells :math:`s_j \ge 1` along each dimension.

    Raises:
        ValueError: corners of different lengths, ``upper <= lower``, a split
            that is not a positive int; points outside the box (when called).

    Example:
        >>> import torch
        >>> from bilevel.layers import BoxPartition
        >>> part = BoxPartition(lower=(0.0, 0.0), upper=(1.0, 1.0), splits=(2, 2))
        >>> part(torch.tensor([[0.1, 0.1], [0.1, 0.9], [0.9, 0.1], [1.0, 1.0]]))
        tensor([0, 1, 2, 3])
    """

    def __init__(self, lower: Sequence[float], upper: Sequence[float], splits: Sequence[int]):
        lower, upper, splits = tuple(lower), tuple(upper), tuple(splits)
        if not (len(lower) == len(upper) == len(splits)) or not lower:
            raise ValueError(
                f"BoxPartition: `lower`, `upper` and `splits` must have the same positive length (the "
                f"dimension); got {len(lower)}, {len(upper)} and {len(splits)}."
            )
        for j, (lo, hi) in enumerate(zip(lower, upper)):
            if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
                raise ValueError(f"BoxPartition: `upper[{j}]` must exceed `lower[{j}]`; got {lo!r} and {hi!r}.")
        for j, s in enumerate(splits):
            if isinstance(s, bool) or not isinstance(s, int) or s < 1:
                raise ValueError(f"BoxPartition: `splits[{j}]` must be a positive int; got {s!r}.")
        self.lower, self.upper, self.splits = tuple(map(float, lower)), tuple(map(float, upper)), splits

    @property
    def num_experts(self) -> int:
        return math.prod(self.splits)

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        d = len(self.splits)
        if not torch.is_tensor(points) or not points.is_floating_point() or points.dim() != 2 or points.shape[1] != d:
            got = f"shape {tuple(points.shape)}, dtype {points.dtype}" if torch.is_tensor(points) else type(points).__name__
            raise ValueError(f"BoxPartition: `points` must be a floating tensor of shape (P, {d}); got {got}.")
        # Column by column with the bounds as Python numbers: no small tensors copied to the device.
        eps = 16 * torch.finfo(points.dtype).eps
        scaled = [(points[:, j] - lo) / (hi - lo) for j, (lo, hi) in enumerate(zip(self.lower, self.upper))]
        outside = torch.stack([(t < -eps) | (t > 1 + eps) for t in scaled], -1).any(-1)
        if bool(outside.any()):
            i = int(outside.nonzero()[0])
            raise ValueError(
                f"BoxPartition: `points` must lie in the box [{self.lower}, {self.upper}]; row {i} "
                f"({points[i].tolist()}) and {int(outside.sum()) - 1} other(s) do not."
            )
        index = torch.zeros(points.shape[0], dtype=torch.int64, device=points.device)
        for t, splits in zip(scaled, self.splits):
            cell = torch.floor(t * splits).to(torch.int64).clamp(0, splits - 1)
            index = index * splits + cell
        return index

    def __repr__(self) -> str:
        return f"BoxPartition(lower={self.lower}, upper={self.upper}, splits={self.splits})"


# ----------------------------------------------------------------------------- basis helper


def evaluate_basis(
    fn: Callable[[torch.Tensor], torch.Tensor],
    points: torch.Tensor,
    derivatives: Mapping[str, Sequence[int]],
) -> dict[str, torch.Tensor]:
    r"""Values and partial derivatives of basis functions at points.

    For a network ``fn`` mapping points ``(P, d)`` to basis values ``(P, N)``,
    returns ``{name: (P, N)}`` with entry ``[p, i]`` equal to
    :math:`\partial_{j_1}\cdots\partial_{j_r}\phi_i(z_p)` for
    ``derivatives[name] = (j_1, ..., j_r)`` (``()`` for the values).  Derivatives
    come from nested :func:`torch.func.jacfwd` under :func:`torch.func.vmap`, and
    stay differentiable with respect to the network's parameters.

    Args:
        fn: the basis network, ``fn(points) -> (P, N)`` for points ``(P, d)``
            (applied to one point at a time, as a batch of one).
        points: floating tensor ``(P, d)``, the collocation points :math:`z_p`.
        derivatives: ``{name: (j_1, ..., j_r)}``, the input indices to
            differentiate by, in order; ``()`` for the values themselves.

    Returns:
        ``{name: tensor (P, N)}``, one entry per key of ``derivatives``: the
        ``basis`` argument of the hard-constraint layers.

    Raises:
        TypeError: ``fn`` is not callable.
        ValueError: ``points`` is not a floating ``(P, d)`` tensor, or an index
            of ``derivatives`` is not in ``[0, d)``.

    Example:
        >>> import torch
        >>> from bilevel.layers import evaluate_basis
        >>> fn = lambda z: torch.stack([z[:, 0] ** 2 * z[:, 1], z[:, 1]], -1)      # N = 2, d = 2
        >>> b = evaluate_basis(fn, torch.tensor([[1.0, 2.0]]), {"u": (), "u_x": (0,), "u_xx": (0, 0)})
        >>> b["u"].tolist(), b["u_x"].tolist(), b["u_xx"].tolist()
        ([[2.0, 2.0]], [[4.0, 0.0]], [[4.0, 0.0]])
    """
    if not callable(fn):
        raise TypeError(f"evaluate_basis: `fn` must be callable fn(points) -> (P, N); got {type(fn).__name__}.")
    if not torch.is_tensor(points) or points.dim() != 2 or not points.is_floating_point():
        raise ValueError(f"evaluate_basis: `points` must be a floating tensor (P, d); got {points!r:.80}.")
    d = points.shape[1]
    for name, idx in derivatives.items():
        if not all(isinstance(j, int) and 0 <= j < d for j in idx):
            raise ValueError(f"evaluate_basis: `derivatives[{name!r}]` must hold input indices in [0, {d}); got {idx!r}.")

    def one(z):
        return fn(z.unsqueeze(0)).squeeze(0)

    by_order, f = {}, one
    for r in range(max((len(i) for i in derivatives.values()), default=0) + 1):
        if any(len(i) == r for i in derivatives.values()):
            by_order[r] = vmap(f)(points)  # (P, N, d, ..., d)
        f = jacfwd(f)
    return {name: by_order[len(idx)][(slice(None), slice(None), *idx)] for name, idx in derivatives.items()}


# ----------------------------------------------------------------------------- shared base


class _BasisExpansion(torch.nn.Module):
    """Fields ``u = sum_i omega[k(p), i] phi_i(z_p)`` and their pointwise residual."""

    residual: PointwiseResidual

    def _stage(self) -> str:
        return type(self).__name__

    def _check_residual_fn(self, residual) -> None:
        if not callable(residual):
            raise TypeError(
                f"{self._stage()}: `residual` must be callable residual(fields, *data) -> (P,) or (P, c); "
                f"got {type(residual).__name__}."
            )
        self.residual = residual  # a sub-module if it is one

    def _check_basis(self, basis: TensorTree, points: int | None = None, name: str = "basis") -> tuple:
        """Leaves of ``basis`` (each ``(P, N)``, same P, N, dtype, device), P, N."""
        leaves, spec = tree_flatten(basis)
        if not leaves or not all(torch.is_tensor(b) for b in leaves):
            raise TypeError(f"{self._stage()}: `{name}` must be a tensor (P, N) or a dict of them; got {type(basis).__name__}.")
        ref = leaves[0]
        for b in leaves:
            if not b.is_floating_point() or b.dim() != 2 or b.shape != ref.shape or b.dtype != ref.dtype or b.device != ref.device:
                raise ValueError(
                    f"{self._stage()}: every leaf of `{name}` must be a floating tensor of the same shape (P, N) "
                    f"(P points, N basis functions), dtype and device; got "
                    f"{[(tuple(x.shape), x.dtype) for x in leaves]}."
                )
        if points is not None and ref.shape[0] != points:
            raise ValueError(
                f"{self._stage()}: `{name}` must have one row per collocation point ({points} points, the length of "
                f"`experts`); got shape {tuple(ref.shape)}."
            )
        return leaves, spec, ref.shape[0], ref.shape[1]

    def _params(self) -> dict:
        return dict(self.residual.named_parameters()) if isinstance(self.residual, torch.nn.Module) else {}

    def fields(self, omega: torch.Tensor, basis: TensorTree, experts: torch.Tensor | None = None) -> TensorTree:
        r"""The expansion :math:`\sum_i \omega^{k(q)}_i \Phi_{q i}` at each point ``q``.

        Args:
            omega: coefficients ``(K, N)`` (the layer's output).
            basis: a tensor ``(Q, N)`` or a tree of them (values / derivatives of
                the basis functions at ``Q`` points).
            experts: ``(Q,)`` expert of each point (e.g. ``partition(points)``);
                default: the layer's collocation points' experts (then ``Q = P``).

        Returns:
            ``basis``'s structure with leaves of shape ``(Q,)``, e.g. ``{"u": u, "u_x": u_x}``.
        """
        leaves, spec, Q, N = self._check_basis(basis)
        experts = self._experts_for(Q) if experts is None else experts
        if not torch.is_tensor(omega) or omega.dim() != 2 or omega.shape[1] != N:
            got = tuple(omega.shape) if torch.is_tensor(omega) else type(omega).__name__
            raise ValueError(f"{self._stage()}.fields: `omega` must have shape (K, {N}) (N from `basis`); got {got}.")
        if not torch.is_tensor(experts) or experts.shape != (Q,) or experts.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{self._stage()}.fields: `experts` must be an integer tensor of shape ({Q},); got {experts!r:.80}.")
        if Q and (int(experts.min()) < 0 or int(experts.max()) >= omega.shape[0]):
            raise ValueError(f"{self._stage()}.fields: `experts` must lie in [0, {omega.shape[0]}) (the rows of `omega`).")
        w = omega[experts.to(omega.device)]
        return tree_unflatten([(b * w).sum(-1) for b in leaves], spec)

    def pde_residual(self, omega: torch.Tensor, basis: TensorTree, *data: Any,
                     experts: torch.Tensor | None = None) -> torch.Tensor:
        """The pointwise residual ``residual(fields(omega, basis, experts), *data)``
        at every point (no regularization rows): ``(Q,)`` or ``(Q, c)``."""
        return self.residual(self.fields(omega, basis, experts), *data)

    def _experts_for(self, points: int) -> torch.Tensor:
        raise NotImplementedError


# ----------------------------------------------------------------------------- hard constraints


class HardConstraintMoE(_BasisExpansion):
    r"""Mixture-of-experts hard constraint: :math:`K` local PDE-constrained least squares, batched.

    Expert :math:`k` owns the collocation points :math:`\mathcal P_k = \{p : k(p) = k\}`
    (``experts``) and solves

    .. math::
        \omega^{k\star} = \operatorname*{argmin}_{\omega \in \mathbb R^N}
        \tfrac12 \sum_{p \in \mathcal P_k} \big\|\mathcal R\big(\{\Phi^{(d)}_p \omega\}_d,\ \text{data}_p\big)\big\|^2
        + \tfrac{\gamma}{2} \|\omega\|^2,

    where :math:`\Phi^{(d)}` are the leaves of ``basis`` (``(P, N)`` each; e.g.
    ``{"u": Φ, "u_x": Φ_x, "u_t": Φ_t, "u_xx": Φ_xx}``), :math:`\mathcal R` is
    ``residual`` and :math:`\gamma` is ``regularization``.  The :math:`K` problems
    are padded to the largest expert (padded rows are masked to zero) and solved
    by one call of ``solver`` with ``batch_dims=1``, which stops per expert.  The
    gradient with respect to ``basis`` and every floating tensor of ``data``
    comes from the implicit function theorem applied to
    :math:`\nabla_\omega f_k = J_k^\top r_k + \gamma\omega = 0` of every expert, one
    batched adjoint solve for all experts (:func:`~bilevel.custom_root` with
    ``batch_dims=1``; the exact Hessian :math:`J_k^\top J_k + \sum_i r_{k,i}\nabla^2
    r_{k,i} + \gamma I`).  Nothing is unrolled and there is no Python loop over
    experts.

    ``residual(fields, *data)`` must be **pointwise**: ``fields`` has the structure
    of ``basis`` with leaves ``(P,)``, each tensor of ``data`` has ``P`` leading
    rows, and row ``p`` of the output (``(P,)`` or ``(P, c)``) depends on row
    ``p`` of its inputs only.  The layer calls it on one expert's points at a time
    (under :func:`torch.func.vmap`), so it must be vmappable (no ``.item()``, no
    in-place writes into inputs).  If it is an :class:`torch.nn.Module`, its
    parameters (e.g. a learnable PDE coefficient) are registered and get implicit
    gradients too.  Constants may be captured; tensors that require grad must be
    passed in ``data`` (or be module parameters) to get gradients.

    Uniqueness: the implicit gradient needs a nonsingular Hessian, so each expert
    must have at least :math:`N` residual rows, or ``regularization > 0``.  With
    more rows than :math:`N` the constraint holds in the least-squares sense; when
    the basis can satisfy it exactly (e.g. :math:`N` larger than the rows,
    :math:`\gamma` small) the residual is driven to the solver's tolerance.

    Well-posedness: each expert's data must determine its solution.  For an
    evolution equation, split the domain in space (``BoxPartition`` splits
    ``(K, 1)`` over ``(x, t)``), so that every expert holds its part of the
    initial condition; an expert owning only a later time slab has no initial
    data, and :math:`u = 0` may satisfy its PDE and boundary rows exactly.
    (Interface conditions between experts are not imposed: experts are
    independent, as in the paper.)

    Devices: the experts are independent, so with ``devices=[d_0, ..., d_{D-1}]``
    they are split into :math:`D` contiguous groups of :math:`\lceil K/D\rceil` or
    :math:`\lfloor K/D\rfloor` experts; group :math:`g` gets its basis rows, data,
    warm start and residual parameters copied to :math:`d_g`, is solved there by
    one batched call and differentiated there by one batched adjoint solve, and
    its coefficients are copied back to the device of ``basis`` (the copies are
    differentiable, so gradients flow back the same way).  The groups are issued
    one after the other from one Python thread: on GPUs the kernels of a group are
    queued asynchronously, so the devices overlap as far as the solver's
    convergence checks (host reads) allow.  Without ``devices`` every expert runs
    on the device of ``basis``.

    Args:
        residual: the pointwise residual ``residual(fields, *data)`` (see above).
        experts: ``(P,)`` integer tensor, the expert of each collocation point
            (e.g. ``BoxPartition(...)(points)``); experts are ``0 .. K-1`` and each
            must own at least one point.  Fixed (a buffer, moves with ``.to()``).
        solver: a :class:`~bilevel.solvers.LevenbergMarquardt` (default, with the
            dtype-aware tolerance :math:`\sqrt\varepsilon`) or
            :class:`~bilevel.solvers.GaussNewton`; its ``batch_dims`` is set to 1.
        regularization: :math:`\gamma \ge 0` (default 0).
        solve: linear solver of the backward system (default: the solver's
            ``implicit_solve``, else a batched dense solve for :math:`N \le 128`).
        strict: raise :class:`~bilevel.status.BilevelError` instead of warning
            when an expert's solve or the backward certificate fails.
        devices: optional list of ``D <= K`` devices (``torch.device`` or strings
            such as ``"cuda:1"``, repeats allowed) over which the experts are spread
            in contiguous groups (see "Devices" above); default: the device of
            ``basis``.

    Example:
        >>> import torch
        >>> from bilevel.layers import BoxPartition, HardConstraintMoE
        >>> x = torch.linspace(0, 1, 12, dtype=torch.float64)[:, None]
        >>> basis = torch.cat([torch.ones_like(x), x, x ** 2], 1)          # P = 12, N = 3
        >>> experts = BoxPartition([0.0], [1.0], [2])(x)                  # 2 experts, 6 points each
        >>> fit = lambda u, y: u - y                                      # pointwise: fit u to data y
        >>> layer = HardConstraintMoE(fit, experts)
        >>> y = torch.where(x[:, 0] < 0.5, 1.0, 2.0 * x[:, 0])            # piecewise linear data
        >>> omega = layer(basis, y)                                       # (K, N): one fit per expert
        >>> omega.shape, torch.allclose(omega, torch.tensor([[1.0, 0, 0], [0, 2, 0]]).double(), atol=1e-4)
        (torch.Size([2, 3]), True)
        >>> layer.last_info.converged.tolist()
        [True, True]

    References:
        Chalapathi, N., Du, Y. and Krishnapriyan, A. S. `Scaling physics-informed
        hard constraints with mixture-of-experts <https://arxiv.org/abs/2402.13412>`_.
        ICLR 2024.
    """

    def __init__(
        self,
        residual: PointwiseResidual,
        experts: torch.Tensor | None,
        *,
        solver: LevenbergMarquardt | GaussNewton | None = None,
        regularization: float = 0.0,
        solve: LinearSolver | None = None,
        strict: bool = False,
        devices: Sequence[torch.device | str] | None = None,
    ):
        super().__init__()
        self._check_residual_fn(residual)
        solver = LevenbergMarquardt() if solver is None else solver
        if not isinstance(solver, (LevenbergMarquardt, GaussNewton)):
            raise TypeError(
                f"{self._stage()}: `solver` must be a least-squares solver, bilevel.solvers.LevenbergMarquardt() "
                f"or GaussNewton(); got {type(solver).__name__}."
            )
        if isinstance(regularization, bool) or not isinstance(regularization, (int, float)) or not (
            math.isfinite(regularization) and regularization >= 0
        ):
            raise ValueError(f"{self._stage()}: `regularization` must be a non-negative float; got {regularization!r}.")
        if solve is not None and not isinstance(solve, LinearSolver):
            raise TypeError(f"{self._stage()}: `solve` must be a linear solver such as bilevel.implicit.CG(); got {solve!r}.")
        self.solver = dataclasses.replace(solver, batch_dims=1)
        if not isinstance(strict, bool):
            raise TypeError(f"{self._stage()}: `strict` must be True or False; got {strict!r}.")
        self.regularization, self.solve, self.strict = float(regularization), solve, strict
        self.last_info: SolverInfo | None = None  # per expert, of the last forward pass
        self._roots: list = []  # one differentiable solve per device group, of the last forward pass
        if experts is None:  # one expert over all points (HardConstraint)
            self.register_buffer("experts", None)
            self.num_experts = 1
            self.devices = self._check_devices(devices)
            return
        if not torch.is_tensor(experts) or experts.dim() != 1 or experts.dtype not in (torch.int64, torch.int32):
            got = f"shape {tuple(experts.shape)}, dtype {experts.dtype}" if torch.is_tensor(experts) else type(experts).__name__
            raise ValueError(
                f"{self._stage()}: `experts` must be a 1-D integer tensor (the expert of each collocation point, "
                f"e.g. BoxPartition(...)(points)); got {got}."
            )
        experts = experts.to(torch.int64)
        self.num_experts = self._count_experts(experts)
        self.devices = self._check_devices(devices)
        self.register_buffer("experts", experts)
        gather, mask = _layout(experts, self.num_experts)
        self.register_buffer("_gather", gather, persistent=False)
        self.register_buffer("_mask", mask, persistent=False)

    def _count_experts(self, experts: torch.Tensor) -> int:
        """``K``, checking that every expert ``0..K-1`` has a collocation point."""
        if experts.numel() == 0 or int(experts.min()) < 0:
            raise ValueError(f"{self._stage()}: `experts` must be non-empty with entries >= 0.")
        K = int(experts.max()) + 1
        counts = torch.bincount(experts, minlength=K)
        if bool((counts == 0).any()):
            empty = (counts == 0).nonzero().reshape(-1).tolist()
            raise ValueError(
                f"{self._stage()}: `experts` must give every expert 0..{K - 1} at least one collocation point; "
                f"experts {empty[:8]} have none (use fewer splits or more points)."
            )
        return K

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Loading a state dict loads the partition: the layout derived from the
        ``experts`` buffer (number of experts, gather indices, masks) follows it."""
        incoming = state_dict.get(prefix + "experts")
        if self.experts is not None and torch.is_tensor(incoming):  # refused before anything is loaded
            if incoming.dim() != 1 or incoming.dtype not in (torch.int64, torch.int32):
                raise ValueError(
                    f"{self._stage()}: the state dict's `experts` must be a 1-D integer tensor; got shape "
                    f"{tuple(incoming.shape)}, dtype {incoming.dtype}."
                )
            K = self._count_experts(incoming.to(torch.int64))
            if self.devices is not None and len(self.devices) > K:
                raise ValueError(
                    f"{self._stage()}: the state dict's partition has {K} expert(s), fewer than the "
                    f"{len(self.devices)} devices of this layer."
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.experts is not None and prefix + "experts" in state_dict:
            self.num_experts = self._count_experts(self.experts)
            self.devices = self._check_devices(self.devices)
            gather, mask = _layout(self.experts, self.num_experts)
            self._gather, self._mask = gather, mask

    # ------------------------------------------------------------------ layout

    def _check_devices(self, devices) -> list[torch.device] | None:
        if devices is None:
            return None
        if isinstance(devices, (str, torch.device)) or not isinstance(devices, Sequence) or not devices:
            raise ValueError(
                f"{self._stage()}: `devices` must be a non-empty list of devices, e.g. ['cuda:0', 'cuda:1']; "
                f"got {devices!r}."
            )
        try:
            parsed = [torch.device(d) for d in devices]
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"{self._stage()}: `devices` must hold torch devices or their names; got {devices!r} ({err}).") from None
        if len(parsed) > self.num_experts:
            raise ValueError(
                f"{self._stage()}: {len(parsed)} devices for {self.num_experts} expert(s); give at most one device per expert."
            )
        return parsed

    def _groups(self, K: int, device: torch.device) -> list[tuple[torch.device, slice]]:
        """``(device, experts)`` of each group: contiguous, balanced slices of ``0 .. K-1``."""
        if self.devices is None:
            return [(device, slice(0, K))]
        D = len(self.devices)
        sizes = [K // D + (g < K % D) for g in range(D)]  # the first K mod D groups get one more
        bounds = [sum(sizes[:g]) for g in range(D + 1)]
        return [(d, slice(lo, hi)) for d, lo, hi in zip(self.devices, bounds[:-1], bounds[1:])]

    def _experts_for(self, points: int) -> torch.Tensor:
        if self.experts is None:
            return torch.zeros(points, dtype=torch.int64)
        if points != self.experts.numel():
            raise ValueError(
                f"{self._stage()}: pass `experts=` for points other than the {self.experts.numel()} collocation "
                f"points; got {points} points."
            )
        return self.experts

    def _layout_for(self, P: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.experts is None:
            return (torch.arange(P, device=device)[None], torch.ones(1, P, dtype=torch.bool, device=device))
        return self._gather.to(device), self._mask.to(device)

    # ------------------------------------------------------------------ the expert problem

    def _check_data(self, data: tuple, P: int, ref: torch.Tensor) -> None:
        for i, d in enumerate(data):
            if not torch.is_tensor(d) or d.dim() < 1 or d.shape[0] != P:
                got = f"shape {tuple(d.shape)}" if torch.is_tensor(d) else type(d).__name__
                raise ValueError(
                    f"{self._stage()}: `data[{i}]` must be a tensor with one row per collocation point ({P} rows); "
                    f"got {got}. Capture constants in `residual` instead."
                )
            if d.device != ref.device or (d.is_floating_point() and d.dtype != ref.dtype):
                raise TypeError(
                    f"{self._stage()}: `data[{i}]` has dtype {d.dtype} on {d.device} but `basis` has {ref.dtype} "
                    f"on {ref.device}; floating inputs must share dtype and device."
                )

    @staticmethod
    def _merge(infos: list, device: torch.device) -> SolverInfo:
        """The per-group solver infos as one, in expert order, on ``device``."""
        if len(infos) == 1:
            return infos[0]
        return dataclasses.replace(infos[0], **{
            f.name: None if getattr(infos[0], f.name) is None
            else torch.cat([getattr(i, f.name).to(device) for i in infos])
            for f in dataclasses.fields(infos[0])
        })

    def _report(self, info: SolverInfo) -> None:
        failed = (~info.converged).reshape(-1)
        if not bool(failed.any()):
            return
        idx = failed.nonzero().reshape(-1).tolist()
        parts = [
            f"expert {k}: {Status(int(info.status[k])).name} after {int(info.iterations[k])} iterations, "
            f"||J^T r|| = {float(info.residual_norm[k]):.3g} > tolerance {float(info.tolerance[k]):.3g}, "
            f"0.5||r||^2 = {float(info.value[k]):.3g}"
            for k in idx[:4]
        ]
        more = f" (and {len(idx) - 4} more)" if len(idx) > 4 else ""
        message = (
            f"{self._stage()}: the {self.solver.name} solve did not converge for experts {idx[:16]}: "
            + "; ".join(parts) + more + ". Raise the solver's `maxiter`, loosen its `tol`, or add "
            "`regularization`; the gradient of these experts is taken at a non-stationary point."
        )
        if self.strict:
            raise BilevelError(message)
        warnings.warn(message, ConvergenceWarning, stacklevel=4)

    # ------------------------------------------------------------------ forward

    def forward(self, basis: TensorTree, *data: torch.Tensor, init: torch.Tensor | None = None) -> torch.Tensor:
        r"""Solve the :math:`K` expert problems; differentiable in ``basis`` and ``data``.

        Args:
            basis: a tensor ``(P, N)`` or a tree (e.g. a dict) of tensors ``(P, N)``:
                values and derivatives of the ``N`` basis functions at the ``P``
                collocation points; its structure is that of ``fields``.
            *data: per-point tensors (``P`` leading rows), passed to ``residual``
                after ``fields`` (e.g. the points and their kinds, a forcing term).
            init: warm start ``(K, N)`` (default zeros).

        Returns:
            The coefficients ``omega`` of shape ``(K, N)``, row ``k`` for expert ``k``
            (``(1, N)`` for :class:`HardConstraint`).  ``self.last_info`` holds the
            solver's per-expert :class:`~bilevel.solvers.SolverInfo`.

        Raises:
            ValueError: ``basis`` leaves that are not ``(P, N)`` with P the number of
                collocation points, ``data`` without ``P`` rows, a residual that is not
                pointwise, an expert with fewer residual rows than ``N`` and
                ``regularization == 0``, a warm start of the wrong shape.
            TypeError: mixed dtypes or devices.
            FloatingPointError: non-finite residuals at ``init``, or a non-finite solution.

        Warns:
            ConvergenceWarning: an expert's solve did not reach its tolerance (naming
                the experts, their status and residuals); an error with ``strict=True``.
        """
        P_fixed = None if self.experts is None else self.experts.numel()
        leaves, spec, P, N = self._check_basis(basis, P_fixed)
        ref = leaves[0]
        self._check_data(data, P, ref)
        K = self.num_experts
        gather, mask = self._layout_for(P, ref.device)
        basis_k = [b[gather] for b in leaves]  # (K, Pmax, N)
        data_k = [d[gather] for d in data]  # (K, Pmax, ...)
        params = {name: p.expand((K,) + p.shape) for name, p in self._params().items()}
        if init is None:
            init = torch.zeros(K, N, dtype=ref.dtype, device=ref.device)
        elif not torch.is_tensor(init) or init.shape != (K, N):
            got = tuple(init.shape) if torch.is_tensor(init) else type(init).__name__
            raise ValueError(f"{self._stage()}: `init` must have shape (K, N) = ({K}, {N}); got {got}.")
        args = (params, mask, *basis_k, *data_k)

        one = _expert_residual(self.residual, spec, self.regularization, self._stage())
        batched = vmap(one)
        with torch.no_grad():
            r0 = batched(init.detach(), *tree_map(lambda t: t.detach(), args))
        self._check_rows(r0, mask, N)

        def objective(omega, params, mask, *tensors):
            r = one(omega, params, mask, *tensors)
            return 0.5 * (r * r).sum()

        infos: list = []

        def run(*args, init):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)  # reported per expert below
                sol, info = self.solver.run(batched, init, *args)
            infos.append(info)
            return sol

        tol = self.solver.tol
        residual_tol = max(default_tol(ref.dtype) if tol is None else float(tol), default_residual_tol(ref.dtype))
        solve = self.solve if self.solve is not None else self.solver.implicit_solve
        self._roots, omegas = [], []
        for device, part in self._groups(K, ref.device):
            root = custom_root(
                stationarity(objective), solve=solve, residual_tol=residual_tol, batch_dims=1, strict=self.strict
            )(run)
            group_args = (
                {name: p[part].to(device) for name, p in params.items()},
                *(t[part].to(device) for t in args[1:]),
            )
            omegas.append(root(*group_args, init=init[part].detach().to(device)).to(ref.device))
            self._roots.append(root)
        self.last_info = self._merge(infos, ref.device)
        self._report(self.last_info)
        return omegas[0] if len(omegas) == 1 else torch.cat(omegas)

    def _check_rows(self, r0: torch.Tensor, mask: torch.Tensor, N: int) -> None:
        if self.regularization:
            return
        per_point = r0.shape[1] // mask.shape[1] if mask.shape[1] else 0  # no points: no rows
        rows = mask.sum(1) * per_point
        few = (rows < N).nonzero().reshape(-1).tolist()
        if few:
            raise ValueError(
                f"{self._stage()}: experts {few[:8]} have fewer residual rows ({int(rows.min())}) than basis "
                f"functions (N = {N}): their least-squares problem has many solutions and no implicit gradient. "
                "Pass `regularization` > 0 (e.g. 1e-8), use fewer experts, more collocation points or fewer basis functions."
            )

    @property
    def implicit_info(self):
        """The certificate of the last backward pass (per expert), or ``None`` before one;
        with ``devices``, a list of them, one per device group."""
        if not self._roots:
            return None
        infos = [root.last_info for root in self._roots]
        return infos[0] if len(infos) == 1 else infos

    def extra_repr(self) -> str:
        devices = "" if self.devices is None else f", devices={[str(d) for d in self.devices]}"
        return f"num_experts={self.num_experts}, solver={self.solver!r}, regularization={self.regularization}{devices}"

    def __getstate__(self) -> dict:
        """Pickling (``torch.save(model)``, ``copy.deepcopy``) leaves out the last forward
        pass's differentiable solves, closures, and with them :attr:`implicit_info`."""
        state = self.__dict__.copy()
        state["_roots"] = []
        return state


def _expert_residual(residual: PointwiseResidual, spec, gamma: float, stage: str) -> Callable:
    """The residual vector of one expert, ``one(omega, params, mask, *basis_leaves, *data)``:
    the masked pointwise rows, then ``sqrt(gamma) * omega``.  A module ``residual``
    gets ``params`` through ``functional_call`` (so they are arguments of the
    optimality condition, and differentiated implicitly)."""
    module = residual if isinstance(residual, torch.nn.Module) else None
    n_basis = spec.num_leaves
    root_gamma = math.sqrt(gamma)

    def one(omega, params, mask, *tensors):
        basis = tree_unflatten(list(tensors[:n_basis]), spec)
        fields = tree_map(lambda b: b @ omega, basis)
        if module is not None:
            r = functional_call(module, params, (fields, *tensors[n_basis:]))
        else:
            r = residual(fields, *tensors[n_basis:])
        if not torch.is_tensor(r) or r.dim() < 1 or r.shape[0] != mask.shape[0]:
            got = tuple(r.shape) if torch.is_tensor(r) else type(r).__name__
            raise ValueError(
                f"{stage}: `residual(fields, *data)` must be pointwise, returning (P,) or (P, c) for the P "
                f"points it is given; got {got} for {mask.shape[0]} points."
            )
        r = (r.reshape(mask.shape[0], math.prod(r.shape[1:])) * mask.to(r.dtype)[:, None]).reshape(-1)
        return torch.cat([r, root_gamma * omega]) if gamma else r

    return one


def _layout(experts: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``gather (K, Pmax)`` point indices per expert (padded with the expert's first
    point) and ``mask (K, Pmax)`` (False on padding)."""
    counts = torch.bincount(experts, minlength=K)
    order = torch.argsort(experts, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    pmax = int(counts.max())
    slot = torch.arange(pmax, device=experts.device)
    mask = slot[None, :] < counts[:, None]
    position = starts[:, None] + torch.where(mask, slot[None, :], torch.zeros_like(slot)[None, :])
    return order[position], mask


class HardConstraint(HardConstraintMoE):
    r"""The single-domain hard constraint: :class:`HardConstraintMoE` with one expert.

    .. math::
        \omega^\star = \operatorname*{argmin}_\omega \tfrac12 \sum_{p=1}^P
        \|\mathcal R(\{\Phi^{(d)}_p\omega\}_d, \text{data}_p)\|^2 + \tfrac\gamma2\|\omega\|^2,

    over all collocation points (any number ``P`` per call), by the same code
    path as the mixture (a batch of one).  Arguments as in
    :class:`HardConstraintMoE`, without ``experts``; the output has shape ``(1, N)``.

    Args:
        residual: the pointwise residual ``residual(fields, *data)``, as in
            :class:`HardConstraintMoE`.
        solver: a :class:`~bilevel.solvers.LevenbergMarquardt` (default) or
            :class:`~bilevel.solvers.GaussNewton`.
        regularization: :math:`\gamma \ge 0` (default 0).
        solve: linear solver of the backward system (default: the solver's
            ``implicit_solve``, else a dense solve for :math:`N \le 128`).
        strict: raise :class:`~bilevel.status.BilevelError` instead of warning
            when the solve or the backward certificate fails.

    Example:
        >>> import torch
        >>> from bilevel.layers import HardConstraint
        >>> x = torch.linspace(0, 1, 12, dtype=torch.float64)
        >>> basis = {"u": torch.stack([torch.ones_like(x), x], 1), "u_x": torch.stack([0 * x, 1 + 0 * x], 1)}
        >>> layer = HardConstraint(lambda f, y: torch.stack([f["u"] - y, f["u_x"] - 1], -1))  # c = 2 rows per point
        >>> layer(basis, 3 + x).detach().round(decimals=6).tolist()
        [[3.0, 1.0]]

    References:
        Négiar, G., Mahoney, M. W. and Krishnapriyan, A. S. `Learning differentiable
        solvers for systems with hard constraints <https://arxiv.org/abs/2207.08675>`_.
        ICLR 2023.
    """

    def __init__(
        self,
        residual: PointwiseResidual,
        *,
        solver: LevenbergMarquardt | GaussNewton | None = None,
        regularization: float = 0.0,
        solve: LinearSolver | None = None,
        strict: bool = False,
    ):
        super().__init__(residual, None, solver=solver, regularization=regularization, solve=solve, strict=strict)


# ----------------------------------------------------------------------------- soft constraint


class SoftConstraint(_BasisExpansion):
    r"""The soft (loss-penalty) counterpart of :class:`HardConstraint`, for comparisons.

    The coefficients :math:`\omega \in \mathbb R^{K\times N}` are ordinary trainable
    parameters (the network's last linear layer), and the PDE enters the loss:

    .. math::
        \text{penalty}(\omega, \theta) = \frac{\lambda}{P\,c} \sum_{p=1}^P
        \|\mathcal R(\{\Phi^{(d)}_p \omega^{k(p)}\}_d, \text{data}_p)\|^2,

    with the same pointwise ``residual`` and basis as the hard layers, so the
    three variants differ only in how :math:`\omega` is chosen.

    Args:
        residual: the pointwise residual ``residual(fields, *data)``.
        num_basis: ``N``.
        weight: :math:`\lambda > 0` (default 1).
        experts: optional ``(P,)`` expert of each collocation point (``K`` rows of
            ``omega``); default one row used at every point.
        dtype, device: of ``omega`` (default: torch's default dtype, CPU); move with ``.to()``.

    Example:
        >>> import torch
        >>> from bilevel.layers import SoftConstraint
        >>> x = torch.linspace(0, 1, 5, dtype=torch.float64)[:, None]
        >>> soft = SoftConstraint(lambda u, y: u - y, num_basis=1, dtype=torch.float64)
        >>> omega = soft(x)                                   # the parameter, (1, 1), zeros
        >>> soft.penalty(omega, x, 2 * x[:, 0]).item()          # mean of (0 - 2x)^2
        1.5
    """

    def __init__(
        self,
        residual: PointwiseResidual,
        num_basis: int,
        *,
        weight: float = 1.0,
        experts: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self._check_residual_fn(residual)
        if isinstance(num_basis, bool) or not isinstance(num_basis, int) or num_basis < 1:
            raise ValueError(f"SoftConstraint: `num_basis` must be a positive int; got {num_basis!r}.")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"SoftConstraint: `weight` must be a positive float; got {weight!r}.")
        if experts is not None and (not torch.is_tensor(experts) or experts.dim() != 1 or experts.dtype != torch.int64
                                    or experts.numel() == 0 or int(experts.min()) < 0):
            raise ValueError("SoftConstraint: `experts` must be a non-empty 1-D int64 tensor of expert indices >= 0.")
        K = 1 if experts is None else int(experts.max()) + 1
        self.weight = float(weight)
        self.register_buffer("experts", experts)
        self.omega = torch.nn.Parameter(torch.zeros(K, num_basis, dtype=dtype, device=device))

    def extra_repr(self) -> str:
        num_experts, num_basis = self.omega.shape
        return f"num_experts={num_experts}, num_basis={num_basis}, weight={self.weight}"

    def _experts_for(self, points: int) -> torch.Tensor:
        if self.experts is None:
            return torch.zeros(points, dtype=torch.int64, device=self.omega.device)
        return self.experts

    def forward(self, basis: TensorTree | None = None, *data: Any) -> torch.Tensor:
        """The coefficients ``(K, N)`` (the parameter; ``basis`` is checked, not used)."""
        if basis is not None:
            leaves, _, _, N = self._check_basis(basis)
            if N != self.omega.shape[1] or leaves[0].dtype != self.omega.dtype or leaves[0].device != self.omega.device:
                raise ValueError(
                    f"SoftConstraint: `basis` has N = {N}, {leaves[0].dtype} on {leaves[0].device}; the layer has "
                    f"N = {self.omega.shape[1]}, {self.omega.dtype} on {self.omega.device} (use .to())."
                )
        return self.omega

    def penalty(self, omega: torch.Tensor, basis: TensorTree, *data: Any,
                experts: torch.Tensor | None = None) -> torch.Tensor:
        """``weight * mean(residual ** 2)`` over the points (and residual components)."""
        r = self.pde_residual(omega, basis, *data, experts=experts)
        return self.weight * (r * r).mean()
