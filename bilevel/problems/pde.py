r"""One-dimensional time-dependent PDEs with closed-form solutions.

Test problems for physics-informed models and for the hard-constraint layers of
:mod:`bilevel.layers` (mixture-of-experts hard constraints, Chalapathi, Du and
Krishnapriyan, ICLR 2024).  Each problem lives on the space-time box
:math:`[x_0, x_1] \times [0, T]` (points are rows ``(x, t)``) and knows:

* its exact solution :math:`u(x, t)` and the exact fields ``u``, ``u_x``,
  ``u_t``, ``u_xx`` (derivatives of the closed form by :mod:`torch.func`);
* its *pointwise* residual ``residual(fields, points, kind)``: the PDE operator at
  interior points, :math:`u - u_{\text{exact}}` at initial (``t = 0``) and
  boundary (``x = x_0, x_1``) points, so that the PDE, its initial condition and
  its Dirichlet boundary conditions are one residual vector;
* a collocation grid with the kind of each point (:attr:`INTERIOR`,
  :attr:`INITIAL`, :attr:`BOUNDARY`).

Problems:

* :func:`heat_1d` — :math:`u_t = \nu u_{xx}`,
  :math:`u = e^{-\nu\pi^2 t}\sin(\pi x)` on :math:`[0, 1]\times[0, T]`;
* :func:`burgers_1d` — viscous Burgers :math:`u_t + u u_x = \nu u_{xx}`,
  the Cole-Hopf solution
  :math:`u = 2\nu\pi e^{-\nu\pi^2 t}\sin(\pi x) / (a + e^{-\nu\pi^2 t}\cos(\pi x))`,
  :math:`a > 1`.

Only :mod:`torch` is needed here (the layering rule of ``DESIGN.md``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import jacfwd, vmap

__all__ = ["BOUNDARY", "INITIAL", "INTERIOR", "PDEProblem", "burgers_1d", "heat_1d"]

INTERIOR, INITIAL, BOUNDARY = 0, 1, 2
"""Kinds of collocation points: the PDE holds there / the initial condition / the boundary condition."""

Fields = dict  # {"u": (P,), "u_x": (P,), "u_t": (P,), "u_xx": (P,)}


@dataclass(frozen=True)
class PDEProblem:
    r"""A 1-D time-dependent PDE :math:`\mathcal N[u] = 0` on :math:`[x_0, x_1]\times[0, T]`
    with a closed-form solution, its initial and Dirichlet boundary values.

    Attributes:
        name: a short name (``"heat"``, ``"burgers"``).
        nu: the viscosity / diffusion coefficient :math:`\nu`.
        lower: ``(x0, 0.0)``, the lower corner of the space-time box.
        upper: ``(x1, T)``, the upper corner.
        solution: the exact solution ``solution(x, t)`` (elementwise, broadcasting).
        operator: the PDE operator on fields, ``operator(fields) -> (P,)``, zero
            for the exact solution; ``fields`` maps ``"u"``, ``"u_x"``, ``"u_t"``,
            ``"u_xx"`` to tensors of shape ``(P,)``.

    Example:
        >>> import torch
        >>> from bilevel.problems import heat_1d
        >>> p = heat_1d(nu=0.1)
        >>> p.name, p.lower, p.upper
        ('heat', (0.0, 0.0), (1.0, 1.0))
        >>> p.exact(torch.tensor([[0.5, 0.0]], dtype=torch.float64))     # sin(pi x) at t = 0
        tensor([1.], dtype=torch.float64)
    """

    name: str
    nu: float
    lower: tuple[float, float]
    upper: tuple[float, float]
    solution: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    operator: Callable[[Fields], torch.Tensor]

    def exact(self, points: torch.Tensor) -> torch.Tensor:
        """The exact solution at ``points`` of shape ``(P, 2)`` (rows ``(x, t)``): shape ``(P,)``."""
        _check_points(points, "exact")
        return self.solution(points[:, 0], points[:, 1])

    def exact_fields(self, points: torch.Tensor) -> Fields:
        """``u``, ``u_x``, ``u_t``, ``u_xx`` of the exact solution at ``points`` ``(P, 2)``."""
        _check_points(points, "exact_fields")

        def u(z):
            return self.solution(z[0], z[1])

        grad = jacfwd(u)
        hess = jacfwd(grad)
        g, h = vmap(grad)(points), vmap(hess)(points)
        return {"u": self.exact(points), "u_x": g[:, 0], "u_t": g[:, 1], "u_xx": h[:, 0, 0]}

    def residual(self, fields: Fields, points: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
        r"""The pointwise residual: :math:`\mathcal N[u]` where ``kind == INTERIOR``,
        :math:`u - u_{\text{exact}}` at initial and boundary points.

        Args:
            fields: ``{"u", "u_x", "u_t", "u_xx"}``, each of shape ``(P,)`` (``u_x``,
                ``u_t``, ``u_xx`` may be left out where the operator does not use them).
            points: ``(P, 2)``, rows ``(x, t)``.
            kind: ``(P,)`` integer codes (:data:`INTERIOR`, :data:`INITIAL`, :data:`BOUNDARY`).

        Returns:
            ``(P,)``; each entry depends only on its own point (a pointwise residual,
            as the hard-constraint layers expect).
        """
        pde = self.operator(fields)
        target = self.solution(points[..., 0], points[..., 1])
        return torch.where(kind == INTERIOR, pde, fields["u"] - target)

    def collocation(
        self, n_x: int, n_t: int, *, dtype: torch.dtype = torch.float64, device=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A uniform ``n_x`` by ``n_t`` grid on the box and the kind of each point.

        Points with ``t = 0`` are :data:`INITIAL`, the other points with
        ``x = x0`` or ``x = x1`` are :data:`BOUNDARY`, the rest :data:`INTERIOR`.

        Returns:
            ``points`` of shape ``(n_x * n_t, 2)`` (rows ``(x, t)``, ``t`` fastest)
            and ``kind`` of shape ``(n_x * n_t,)`` (``int64``).
        """
        for name, n in (("n_x", n_x), ("n_t", n_t)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 2:
                raise ValueError(f"{self.name}.collocation: `{name}` must be an int >= 2; got {n!r}.")
        points = self.grid(n_x, n_t, dtype=dtype, device=device)
        x, t = points[:, 0], points[:, 1]
        kind = torch.full(x.shape, INTERIOR, dtype=torch.int64, device=points.device)
        kind[(x == self.lower[0]) | (x == self.upper[0])] = BOUNDARY
        kind[t == self.lower[1]] = INITIAL
        return points, kind

    def grid(self, n_x: int, n_t: int, *, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
        """A uniform ``n_x`` by ``n_t`` grid of points ``(n_x * n_t, 2)``, corners included."""
        x = torch.linspace(self.lower[0], self.upper[0], n_x, dtype=dtype, device=device)
        t = torch.linspace(self.lower[1], self.upper[1], n_t, dtype=dtype, device=device)
        return torch.cartesian_prod(x, t)


def _check_points(points, where: str) -> None:
    if not torch.is_tensor(points) or not points.is_floating_point() or points.dim() != 2 or points.shape[1] != 2:
        got = f"shape {tuple(points.shape)}, dtype {points.dtype}" if torch.is_tensor(points) else type(points).__name__
        raise ValueError(f"{where}: `points` must be a floating tensor of shape (P, 2), rows (x, t); got {got}.")


def _check_positive(value: float, name: str, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: `{name}` must be a positive float; got {value!r}.")


def heat_1d(nu: float = 0.1, t_max: float = 1.0) -> PDEProblem:
    r"""The heat equation :math:`u_t = \nu u_{xx}` on :math:`[0, 1]\times[0, T]`.

    .. math::
        u(x, 0) = \sin(\pi x),\quad u(0, t) = u(1, t) = 0, \qquad
        u(x, t) = e^{-\nu\pi^2 t}\sin(\pi x).

    Args:
        nu: diffusion coefficient :math:`\nu > 0` (default 0.1).
        t_max: final time :math:`T > 0` (default 1).

    Returns:
        A :class:`PDEProblem` named ``"heat"`` on :math:`[0, 1]\times[0, T]`.

    Raises:
        ValueError: ``nu`` or ``t_max`` is not a positive float.

    Example:
        >>> import torch
        >>> from bilevel.problems import heat_1d
        >>> problem = heat_1d()
        >>> points, kind = problem.collocation(8, 6)
        >>> r = problem.residual(problem.exact_fields(points), points, kind)
        >>> points.shape, bool(r.abs().max() < 1e-12)
        (torch.Size([48, 2]), True)
    """
    _check_positive(nu, "nu", "heat_1d")
    _check_positive(t_max, "t_max", "heat_1d")

    def solution(x, t):
        return torch.exp(-nu * math.pi**2 * t) * torch.sin(math.pi * x)

    def operator(f):
        return f["u_t"] - nu * f["u_xx"]

    return PDEProblem("heat", float(nu), (0.0, 0.0), (1.0, float(t_max)), solution, operator)


def burgers_1d(nu: float = 0.1, a: float = 2.0, t_max: float = 1.0) -> PDEProblem:
    r"""Viscous Burgers :math:`u_t + u u_x = \nu u_{xx}` on :math:`[0, 1]\times[0, T]`.

    The Cole-Hopf transform :math:`u = -2\nu\,\phi_x/\phi` of the heat-equation
    solution :math:`\phi = a + e^{-\nu\pi^2 t}\cos(\pi x)` gives

    .. math::
        u(x, t) = \frac{2\nu\pi\, e^{-\nu\pi^2 t}\sin(\pi x)}{a + e^{-\nu\pi^2 t}\cos(\pi x)},
        \qquad u(0, t) = u(1, t) = 0,

    smooth for :math:`a > 1` (steeper as :math:`a \downarrow 1`).

    Args:
        nu: viscosity :math:`\nu > 0` (default 0.1).
        a: the constant :math:`a > 1` (default 2).
        t_max: final time :math:`T > 0` (default 1).

    Returns:
        A :class:`PDEProblem` named ``"burgers"`` on :math:`[0, 1]\times[0, T]`.

    Raises:
        ValueError: ``nu`` or ``t_max`` is not positive, or ``a <= 1``.

    Example:
        >>> import torch
        >>> from bilevel.problems import burgers_1d
        >>> problem = burgers_1d()
        >>> points, kind = problem.collocation(8, 6)
        >>> r = problem.residual(problem.exact_fields(points), points, kind)
        >>> bool(r.abs().max() < 1e-12)
        True
    """
    _check_positive(nu, "nu", "burgers_1d")
    _check_positive(t_max, "t_max", "burgers_1d")
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 1:
        raise ValueError(f"burgers_1d: `a` must be a float > 1 (the solution blows up otherwise); got {a!r}.")

    def solution(x, t):
        decay = torch.exp(-nu * math.pi**2 * t)
        return 2 * nu * math.pi * decay * torch.sin(math.pi * x) / (a + decay * torch.cos(math.pi * x))

    def operator(f):
        return f["u_t"] + f["u"] * f["u_x"] - nu * f["u_xx"]

    return PDEProblem("burgers", float(nu), (0.0, 0.0), (1.0, float(t_max)), solution, operator)
