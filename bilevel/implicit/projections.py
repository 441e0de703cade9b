r"""Euclidean projections onto simple convex sets, and set objects for ``x_set=`` / ``y_set=``.

Each ``project_*`` function returns

.. math:: P_C(z) = \operatorname*{argmin}_{x \in C} \tfrac12 \|x - z\|_2^2,

is written with pure tensor operations (``clamp``, ``where``, ``sort``, ``gather``),
and is differentiable almost everywhere in ``z`` and in the set's parameters, also
through :mod:`torch.func` (``grad``, ``jacrev``, ``jvp``, ``vmap``).  Sets defined
along a vector (simplex, balls, affine sets) act on the **last** dimension, and
every leading dimension of ``z`` indexes independent problems.  dtype and device
follow ``z``.

Parameters that are Python numbers are checked when the function is called (a
negative radius is a ``ValueError``); tensor parameters are not inspected, since
that would need a host synchronization and would break ``vmap``.  The set
objects (:class:`Box`, :class:`Simplex`, ...) check their fields, tensors
included, once at construction.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Union

import torch

Scalar = Union[float, torch.Tensor]

__all__ = [
    "project_nonnegative",
    "project_box",
    "project_simplex",
    "project_l1_ball",
    "project_l2_ball",
    "project_linf_ball",
    "project_affine_set",
    "project_hyperplane",
    "project_halfspace",
    "kl_projection_simplex",
    "ConvexSet",
    "NonNegative",
    "Box",
    "Simplex",
    "L1Ball",
    "L2Ball",
]


# --------------------------------------------------------------------------- checks


def _check_tensor(z, name: str = "z", min_dim: int = 0) -> None:
    if not torch.is_tensor(z):
        raise TypeError(f"`{name}` must be a torch.Tensor; got {type(z).__name__}.")
    if not z.is_floating_point():
        raise TypeError(
            f"`{name}` must have a floating dtype; got {z.dtype}. Convert it with `.double()` or `.float()`."
        )
    if z.dim() < min_dim:
        raise ValueError(
            f"`{name}` must have at least {min_dim} dimension(s) (the set acts on the last one); "
            f"got shape {tuple(z.shape)}."
        )


def _check_radius(radius, name: str = "radius", strict: bool = True) -> None:
    """Check a Python-number radius; tensors are left alone (vmap-friendly)."""
    if torch.is_tensor(radius):
        return
    if isinstance(radius, bool) or not isinstance(radius, numbers.Real):
        raise TypeError(f"`{name}` must be a positive number or a tensor; got {type(radius).__name__}.")
    if not math.isfinite(radius) or radius < 0 or (strict and radius == 0):
        bound = "> 0" if strict else ">= 0"
        raise ValueError(f"`{name}` must be finite and {bound}; got {radius}.")


def _as_batch_scalar(radius: Scalar, z: torch.Tensor, name: str = "radius") -> Scalar:
    """A radius broadcastable to ``z.shape[:-1]``, unsqueezed to act on the last dim."""
    if not torch.is_tensor(radius):
        return float(radius)
    if radius.dim() == 0:
        return radius
    if radius.dim() > z.dim() - 1:
        raise ValueError(
            f"`{name}` must be a scalar or broadcastable to the batch shape {tuple(z.shape[:-1])} of `z`; "
            f"got shape {tuple(radius.shape)}."
        )
    return radius.unsqueeze(-1)


def _sq_norm(z: torch.Tensor) -> torch.Tensor:
    return (z * z).sum(-1, keepdim=True)


# ---------------------------------------------------------------- projections


def project_nonnegative(z: torch.Tensor) -> torch.Tensor:
    r"""Projection onto the non-negative orthant :math:`\{x : x \ge 0\}`.

    .. math:: P(z) = \max(z, 0) \quad \text{(elementwise)},\qquad
              \partial P / \partial z = \operatorname{diag}(\mathbb 1[z > 0]).

    Args:
        z: tensor of any shape.

    Returns:
        A tensor shaped like ``z``.

    Example:
        >>> import torch
        >>> project_nonnegative(torch.tensor([-1.0, 2.0]))
        tensor([0., 2.])
    """
    _check_tensor(z)
    return torch.clamp(z, min=0)


def project_box(z: torch.Tensor, lower: Optional[Scalar] = None, upper: Optional[Scalar] = None) -> torch.Tensor:
    r"""Projection onto the box :math:`\{x : l \le x \le u\}`.

    .. math:: P(z) = \min(\max(z, l), u) \quad \text{(elementwise)}.

    Its derivative is :math:`\mathbb 1[l < z < u]` in ``z``, :math:`\mathbb 1[z < l]`
    in ``lower`` and :math:`\mathbb 1[z > u]` in ``upper`` (elementwise).

    Args:
        z: tensor of any shape.
        lower: :math:`l`, a number or a tensor broadcastable to ``z`` (may require
            grad); ``None`` for no lower bound.
        upper: :math:`u`, likewise; ``None`` for no upper bound.  Where
            ``lower > upper`` the result is ``upper``.

    Returns:
        A tensor of the broadcast shape of ``z``, ``lower`` and ``upper``.

    Raises:
        ValueError: if both bounds are numbers and ``lower > upper``.

    Example:
        >>> import torch
        >>> project_box(torch.tensor([-2.0, 0.5, 3.0]), -1.0, torch.tensor([1.0, 1.0, 2.0]))
        tensor([-1.0000,  0.5000,  2.0000])
    """
    _check_tensor(z)
    bounds = {}
    for name, bound in (("lower", lower), ("upper", upper)):
        if bound is None:
            continue
        if torch.is_tensor(bound):
            bounds[name] = bound.to(dtype=z.dtype) if bound.dtype != z.dtype else bound
        elif isinstance(bound, numbers.Real) and not isinstance(bound, bool):
            bounds[name] = torch.full((), float(bound), dtype=z.dtype, device=z.device)  # no host-to-device copy
        else:
            raise TypeError(f"`{name}` must be a number, a tensor or None; got {type(bound).__name__}.")
    if isinstance(lower, numbers.Real) and isinstance(upper, numbers.Real) and lower > upper:
        raise ValueError(f"`lower` must be <= `upper`; got lower={lower}, upper={upper}.")
    out = z
    if "lower" in bounds:
        out = torch.maximum(out, bounds["lower"])
    if "upper" in bounds:
        out = torch.minimum(out, bounds["upper"])
    return out


def project_simplex(z: torch.Tensor, radius: Scalar = 1.0) -> torch.Tensor:
    r"""Projection onto the simplex :math:`\{x : x \ge 0,\ \mathbf 1^\top x = r\}` along the last dim.

    Sort-based (Held, Wolfe and Crowder 1974; Duchi et al. 2008):

    .. math::
        u = \operatorname{sort}(z)\ \text{descending},\quad
        \rho = \max\{j : u_j - (\textstyle\sum_{i \le j} u_i - r)/j > 0\},\quad
        \theta = (\textstyle\sum_{i \le \rho} u_i - r)/\rho,\quad
        P(z) = \max(z - \theta, 0).

    On the support :math:`S = \{i : P(z)_i > 0\}` the Jacobian is
    :math:`I_S - \tfrac{1}{|S|}\mathbf 1_S \mathbf 1_S^\top` (zero elsewhere), and
    :math:`\partial P / \partial r = \mathbf 1_S / |S|`.

    Args:
        z: tensor of shape ``(*batch, n)``, ``n >= 1``.
        radius: :math:`r > 0`, a number, or a tensor broadcastable to ``batch``
            (may require grad).  Default 1.

    Returns:
        A tensor of shape ``(*batch, n)``.

    Raises:
        TypeError / ValueError: ``z`` not a floating tensor of dim >= 1, or a
            numeric ``radius`` that is not positive.

    Example:
        >>> import torch
        >>> project_simplex(torch.tensor([0.5, 1.0, -1.0]))
        tensor([0.2500, 0.7500, 0.0000])

    References:
        Duchi, Shalev-Shwartz, Singer, Chandra, "Efficient projections onto the
        l1-ball for learning in high dimensions", ICML 2008.
    """
    _check_tensor(z, min_dim=1)
    _check_radius(radius)
    r = _as_batch_scalar(radius, z)
    n = z.shape[-1]
    # P(z + c 1) = P(z): shifting the largest entry to 0 keeps cumsum(u) - r exact
    # when the entries are large compared with r.
    z = z - z.detach().amax(dim=-1, keepdim=True)
    u, _ = torch.sort(z, dim=-1, descending=True)
    cssv = torch.cumsum(u, dim=-1) - r
    ind = torch.arange(1, n + 1, dtype=z.dtype, device=z.device)
    # The condition is true for a prefix of indices; rho is its length (>= 1 for r > 0).
    rho = (u * ind > cssv).sum(dim=-1, keepdim=True).clamp(min=1)
    theta = torch.gather(cssv, -1, rho - 1) / rho.to(z.dtype)
    return torch.clamp(z - theta, min=0)


def project_l1_ball(z: torch.Tensor, radius: Scalar = 1.0) -> torch.Tensor:
    r"""Projection onto the l1 ball :math:`\{x : \|x\|_1 \le r\}` along the last dim.

    .. math::
        P(z) = z \ \text{if}\ \|z\|_1 \le r, \quad\text{else}\quad
        \operatorname{sign}(z) \odot P_{\Delta_r}(|z|),

    with :math:`P_{\Delta_r}` the projection onto the simplex of radius ``r``
    (:func:`project_simplex`), i.e. soft thresholding at the level that makes
    the l1 norm equal to ``r``.

    Args:
        z: tensor of shape ``(*batch, n)``.
        radius: :math:`r > 0`, a number or a tensor broadcastable to ``batch``.

    Returns:
        A tensor of shape ``(*batch, n)``.

    Example:
        >>> import torch
        >>> project_l1_ball(torch.tensor([1.0, -1.0, 0.5]))
        tensor([ 0.5000, -0.5000,  0.0000])

    References:
        Duchi et al., ICML 2008 (as :func:`project_simplex`).
    """
    _check_tensor(z, min_dim=1)
    _check_radius(radius)
    r = _as_batch_scalar(radius, z)
    inside = z.abs().sum(-1, keepdim=True) <= r
    return torch.where(inside, z, torch.sign(z) * project_simplex(z.abs(), radius))


def project_l2_ball(z: torch.Tensor, radius: Scalar = 1.0) -> torch.Tensor:
    r"""Projection onto the Euclidean ball :math:`\{x : \|x\|_2 \le r\}` along the last dim.

    .. math:: P(z) = z \cdot \frac{r}{\max(\|z\|_2, r)}, \qquad
              \frac{\partial P}{\partial z} = \frac{r}{\|z\|}\Bigl(I - \frac{z z^\top}{\|z\|^2}\Bigr)
              \ \text{outside the ball},\ I\ \text{inside}.

    Gradients are finite everywhere, ``z = 0`` included.

    Args:
        z: tensor of shape ``(*batch, n)``.
        radius: :math:`r > 0`, a number or a tensor broadcastable to ``batch``.

    Returns:
        A tensor of shape ``(*batch, n)``.

    Example:
        >>> import torch
        >>> project_l2_ball(torch.tensor([3.0, 4.0]))
        tensor([0.6000, 0.8000])
    """
    _check_tensor(z, min_dim=1)
    _check_radius(radius)
    r = _as_batch_scalar(radius, z)
    sq = _sq_norm(z)
    outside = sq > r * r
    # Double `where`: inside the ball the norm is never differentiated, so z = 0 is safe.
    norm = torch.sqrt(torch.where(outside, sq, torch.ones_like(sq)))
    return torch.where(outside, z * (r / norm), z)


def project_linf_ball(z: torch.Tensor, radius: Scalar = 1.0) -> torch.Tensor:
    r"""Projection onto the l-infinity ball :math:`\{x : \|x\|_\infty \le r\}`: ``clamp(z, -r, r)``.

    Args:
        z: tensor of shape ``(*batch, n)``.
        radius: :math:`r > 0`, a number or a tensor broadcastable to ``batch``.

    Returns:
        A tensor of shape ``(*batch, n)``.

    Example:
        >>> import torch
        >>> project_linf_ball(torch.tensor([2.0, -0.5]))
        tensor([ 1.0000, -0.5000])
    """
    _check_tensor(z, min_dim=1)
    _check_radius(radius)
    r = _as_batch_scalar(radius, z)
    if not torch.is_tensor(r):
        return torch.clamp(z, -r, r)
    return torch.minimum(torch.maximum(z, -r), r)


def project_affine_set(z: torch.Tensor, A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""Projection onto the affine set :math:`\{x : A x = b\}` (``A`` of full row rank).

    .. math:: P(z) = z - A^\top (A A^\top)^{-1} (A z - b).

    Args:
        z: tensor of shape ``(*batch, n)``.
        A: tensor of shape ``(*batch, m, n)`` with ``m <= n`` and full row rank.
        b: tensor of shape ``(*batch, m)``.  Batch shapes broadcast.

    Returns:
        A tensor of shape ``(*batch, n)``.

    Raises:
        ValueError: on inconsistent shapes.

    Example:
        >>> import torch
        >>> project_affine_set(torch.tensor([1.0, 0.0]), torch.tensor([[1.0, 1.0]]), torch.tensor([0.0]))
        tensor([ 0.5000, -0.5000])
    """
    _check_tensor(z, min_dim=1)
    _check_tensor(A, "A", min_dim=2)
    _check_tensor(b, "b", min_dim=1)
    m, n = A.shape[-2], A.shape[-1]
    if n != z.shape[-1] or b.shape[-1] != m:
        raise ValueError(
            f"`A` must have shape (*batch, m, n) with n = z.shape[-1] and m = b.shape[-1]; got A "
            f"{tuple(A.shape)}, z {tuple(z.shape)}, b {tuple(b.shape)}."
        )
    if m > n:
        raise ValueError(
            f"`A` must have at most as many rows as columns (full row rank); got shape {tuple(A.shape)}."
        )
    residual = (A @ z.unsqueeze(-1)).squeeze(-1) - b
    gram = A @ A.transpose(-1, -2)
    mult = torch.linalg.solve(gram, residual.unsqueeze(-1))
    return z - (A.transpose(-1, -2) @ mult).squeeze(-1)


def _halfspace_parts(z, a, b):
    _check_tensor(z, min_dim=1)
    _check_tensor(a, "a", min_dim=1)
    if a.shape[-1] != z.shape[-1]:
        raise ValueError(f"`a` must have last dim {z.shape[-1]} like `z`; got shape {tuple(a.shape)}.")
    if not torch.is_tensor(b):
        if isinstance(b, bool) or not isinstance(b, numbers.Real):
            raise TypeError(f"`b` must be a number or a tensor; got {type(b).__name__}.")
        b = torch.full((), float(b), dtype=z.dtype, device=z.device)
    gap = (a * z).sum(-1) - b
    return gap, (a * a).sum(-1)


def project_hyperplane(z: torch.Tensor, a: torch.Tensor, b: Scalar) -> torch.Tensor:
    r"""Projection onto the hyperplane :math:`\{x : a^\top x = b\}` along the last dim.

    .. math:: P(z) = z - \frac{a^\top z - b}{\|a\|^2}\, a.

    Args:
        z: tensor of shape ``(*batch, n)``.
        a: non-zero tensor of shape ``(*batch, n)`` (broadcasting).
        b: number or tensor of shape ``batch``.

    Returns:
        A tensor of shape ``(*batch, n)`` (the broadcast batch shape of ``z`` and ``a``).

    Example:
        >>> import torch
        >>> project_hyperplane(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]), 0.0)
        tensor([0., 1.])
    """
    gap, sq = _halfspace_parts(z, a, b)
    return z - (gap / sq).unsqueeze(-1) * a


def project_halfspace(z: torch.Tensor, a: torch.Tensor, b: Scalar) -> torch.Tensor:
    r"""Projection onto the half-space :math:`\{x : a^\top x \le b\}` along the last dim.

    .. math:: P(z) = z - \frac{\max(a^\top z - b, 0)}{\|a\|^2}\, a.

    Args:
        z: tensor of shape ``(*batch, n)``.
        a: non-zero tensor of shape ``(*batch, n)`` (broadcasting).
        b: number or tensor of shape ``batch``.

    Returns:
        A tensor of shape ``(*batch, n)`` (the broadcast batch shape of ``z`` and ``a``).

    Example:
        >>> import torch
        >>> project_halfspace(torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.0]), 1.0)
        tensor([1., 1.])
    """
    gap, sq = _halfspace_parts(z, a, b)
    return z - (torch.clamp(gap, min=0) / sq).unsqueeze(-1) * a


def kl_projection_simplex(y: torch.Tensor, radius: Scalar = 1.0) -> torch.Tensor:
    r"""KL (Bregman) projection onto the simplex of a point given in the dual (log) space.

    For the entropy mirror map :math:`\phi(x) = \sum_i x_i \log x_i`, the
    Bregman projection of :math:`\nabla\phi^*(y) = e^{y - 1}` onto
    :math:`\{x \ge 0, \mathbf 1^\top x = r\}` is

    .. math:: \operatorname*{argmin}_{x \in \Delta_r} \mathrm{KL}(x \,\|\, e^{y}) = r\,\operatorname{softmax}(y),

    along the last dim.  With the mapping :math:`x \mapsto \log x` this gives the
    exponentiated-gradient step used by :func:`~bilevel.implicit.conditions.mirror_descent`.

    Args:
        y: tensor of shape ``(*batch, n)`` (dual / log-space point).
        radius: :math:`r > 0`, a number or a tensor broadcastable to ``batch``.

    Returns:
        :math:`r\,\operatorname{softmax}(y)`, a tensor of shape ``(*batch, n)`` on the simplex.

    Example:
        >>> import torch
        >>> kl_projection_simplex(torch.zeros(4))
        tensor([0.2500, 0.2500, 0.2500, 0.2500])
    """
    _check_tensor(y, "y", min_dim=1)
    _check_radius(radius)
    r = _as_batch_scalar(radius, y)
    return r * torch.softmax(y, dim=-1)


# ---------------------------------------------------------------- set objects


def _check_field(value, name: str, cls: str, positive: bool = True):
    """Check a numeric or tensor field of a set object at construction."""
    if torch.is_tensor(value):
        if not value.is_floating_point():
            raise TypeError(f"{cls}.{name} must be a number or a floating tensor; got dtype {value.dtype}.")
        bad = ~torch.isfinite(value) | ((value <= 0) if positive else torch.zeros_like(value, dtype=torch.bool))
        if bool(bad.any()):
            raise ValueError(f"{cls}.{name} must be finite{' and > 0' if positive else ''}; got {value}.")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{cls}.{name} must be a number or a tensor; got {type(value).__name__}.")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{cls}.{name} must be finite{' and > 0' if positive else ''}; got {value}.")


class ConvexSet:
    """Base class of the simple sets passed as ``x_set=`` / ``y_set=``.

    Subclasses implement :meth:`project`; calling the set projects too.  The
    fields of a set are constants for implicit differentiation: to differentiate
    a solution with respect to a bound or a radius, use the ``project_*``
    function and pass that tensor among the condition's ``projection_args``
    (e.g. ``projected_gradient(f, project_box)`` with ``projection_args=(lo, hi)``).

    Example:
        A set of one's own needs only :meth:`project`:

        >>> import torch
        >>> class AtMost(ConvexSet):                 # {x : x_i <= c}
        ...     def __init__(self, c):
        ...         self.c = c
        ...     def project(self, z):
        ...         return torch.clamp(z, max=self.c)
        >>> s = AtMost(1.0)
        >>> s(torch.tensor([0.5, 2.0]))
        tensor([0.5000, 1.0000])
        >>> s.contains(torch.tensor([0.5, 2.0]))
        tensor(False)
    """

    def project(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.project(z)

    def contains(self, z: torch.Tensor, atol: Optional[float] = None) -> torch.Tensor:
        """Whether ``z`` lies in the set, up to ``atol`` (default ``sqrt(eps)`` of ``z``'s dtype).

        Returns a boolean tensor over the batch dims (for vector sets) or a 0-d one.
        """
        _check_tensor(z)
        tol = float(torch.finfo(z.dtype).eps) ** 0.5 if atol is None else float(atol)
        gap = (self.project(z) - z).abs()
        scale = 1.0 + z.abs()
        ok = gap <= tol * scale
        return ok.all() if self._elementwise else ok.all(dim=-1)

    _elementwise = False


@dataclass(frozen=True, eq=False)
class NonNegative(ConvexSet):
    r"""The non-negative orthant :math:`\{x : x \ge 0\}` (elementwise).

    Example:
        >>> import torch
        >>> NonNegative().project(torch.tensor([-1.0, 1.0]))
        tensor([0., 1.])
    """

    _elementwise = True

    def project(self, z: torch.Tensor) -> torch.Tensor:
        return project_nonnegative(z)


@dataclass(frozen=True, eq=False)
class Box(ConvexSet):
    r"""The box :math:`\{x : l \le x \le u\}` (elementwise, bounds broadcast against ``z``).

    Args:
        lower: number or tensor; ``None`` (or ``-inf``) for no lower bound.
        upper: number or tensor; ``None`` (or ``+inf``) for no upper bound.

    Raises:
        ValueError: if some ``lower > upper`` or a bound is NaN.

    Example:
        >>> import torch
        >>> Box(0.0, 1.0).project(torch.tensor([-1.0, 0.5, 2.0]))
        tensor([0.0000, 0.5000, 1.0000])
    """

    lower: Optional[Scalar] = None
    upper: Optional[Scalar] = None

    _elementwise = True

    def __post_init__(self):
        for name in ("lower", "upper"):
            value = getattr(self, name)
            if value is None:
                continue
            if torch.is_tensor(value):
                if not value.is_floating_point():
                    raise TypeError(f"Box.{name} must be a number or a floating tensor; got dtype {value.dtype}.")
                if bool(torch.isnan(value).any()):
                    raise ValueError(f"Box.{name} contains NaN.")
            elif isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"Box.{name} must be a number, a tensor or None; got {type(value).__name__}.")
            elif math.isnan(value):
                raise ValueError(f"Box.{name} is NaN.")
        if self.lower is not None and self.upper is not None:
            lo = torch.as_tensor(self.lower).detach().cpu().double()
            hi = torch.as_tensor(self.upper).detach().cpu().double()
            try:
                lo, hi = torch.broadcast_tensors(lo, hi)
            except RuntimeError as err:
                raise ValueError(
                    f"Box.lower and Box.upper must broadcast; got shapes {tuple(lo.shape)} and {tuple(hi.shape)}."
                ) from err
            if bool((lo > hi).any()):
                raise ValueError(
                    f"Box.lower must be <= Box.upper everywhere; got lower={self.lower}, upper={self.upper}."
                )

    def project(self, z: torch.Tensor) -> torch.Tensor:
        return project_box(z, self.lower, self.upper)


@dataclass(frozen=True, eq=False)
class Simplex(ConvexSet):
    r"""The simplex :math:`\{x : x \ge 0, \mathbf 1^\top x = r\}` along the last dim.

    Args:
        radius: :math:`r > 0` (number or tensor broadcastable to the batch shape).

    Example:
        >>> import torch
        >>> Simplex().project(torch.tensor([2.0, 0.0]))
        tensor([1., 0.])
    """

    radius: Scalar = 1.0

    def __post_init__(self):
        _check_field(self.radius, "radius", "Simplex")

    def project(self, z: torch.Tensor) -> torch.Tensor:
        return project_simplex(z, self.radius)


@dataclass(frozen=True, eq=False)
class L1Ball(ConvexSet):
    r"""The l1 ball :math:`\{x : \|x\|_1 \le r\}` along the last dim.

    Args:
        radius: :math:`r > 0` (number or tensor broadcastable to the batch shape;
            default 1).

    Example:
        >>> import torch
        >>> L1Ball(1.0).project(torch.tensor([2.0, 0.0]))
        tensor([1., 0.])
    """

    radius: Scalar = 1.0

    def __post_init__(self):
        _check_field(self.radius, "radius", "L1Ball")

    def project(self, z: torch.Tensor) -> torch.Tensor:
        return project_l1_ball(z, self.radius)


@dataclass(frozen=True, eq=False)
class L2Ball(ConvexSet):
    r"""The Euclidean ball :math:`\{x : \|x\|_2 \le r\}` along the last dim.

    Args:
        radius: :math:`r > 0` (number or tensor broadcastable to the batch shape;
            default 1).

    Example:
        >>> import torch
        >>> L2Ball(1.0).project(torch.tensor([3.0, 4.0]))
        tensor([0.6000, 0.8000])
    """

    radius: Scalar = 1.0

    def __post_init__(self):
        _check_field(self.radius, "radius", "L2Ball")

    def project(self, z: torch.Tensor) -> torch.Tensor:
        return project_l2_ball(z, self.radius)
