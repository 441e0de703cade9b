r"""Euclidean projection onto a constraint set :math:`C = \{w : g(w) \le 0\} \cap S`.

.. math:: P_C(w_0) = \arg\min_w \tfrac12 \|w - w_0\|^2 \quad\text{s.t.}\quad g(w) \le 0,\ w \in S,

with :math:`S` a simple set (a product of ``x_set`` / ``y_set``, or everything).
For an affine :math:`g(w) = Jw + h` the dual problem

.. math:: \max_{\mu \ge 0}\ \min_{w \in S}\ \tfrac12\|w - w_0\|^2 + \mu^\top (J w + h),
          \qquad w(\mu) = P_S(w_0 - J^\top \mu),

is smooth and concave with gradient :math:`J w(\mu) + h` and Lipschitz constant
:math:`\|J\|_2^2`; accelerated projected gradient ascent (FISTA) on
:math:`\mu \ge 0` solves it, warm-started from the previous multipliers.  A
convex non-affine :math:`g` is linearized at the current point and the
projection repeated (sequential linearization; the linearization of a convex
:math:`g` contains :math:`C`), until :math:`g(w) \le` tolerance.  Affinity is
detected once, by comparing Jacobians at two points, so affine constraints
cost one small dense Jacobian in total.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ._base import host_floats


class ConstraintProjection:
    """Projects flat vectors onto ``{w : g(w) <= 0} ∩ S``.

    Args:
        g: flat constraint map ``w -> (m,)`` tensor.
        project_simple: projection onto :math:`S` on flat vectors, or ``None``.
        w_example: a point at which to probe ``g`` (its Jacobian, affinity).
        tol: feasibility tolerance on ``max g(w)`` (default ``sqrt(eps)``).
    """

    def __init__(self, g: Callable, project_simple: Optional[Callable], w_example: torch.Tensor,
                 tol: Optional[float] = None, max_rounds: int = 20, max_iterations: int = 5000):
        self.g, self.project_simple = g, project_simple
        self.tol = float(torch.finfo(w_example.dtype).eps) ** 0.5 if tol is None else tol
        self.max_rounds, self.max_iterations = max_rounds, max_iterations
        jac = self.jacobian(w_example)
        probe = w_example + torch.randn(w_example.shape, generator=torch.Generator().manual_seed(1),
                                        dtype=torch.float64).to(w_example)
        self.affine = bool(torch.allclose(self.jacobian(probe), jac, rtol=1e-10, atol=1e-12))
        self.fixed = (jac, g(w_example).detach() - jac @ w_example) if self.affine else None
        self.dual: Optional[torch.Tensor] = None
        self._lipschitz: Optional[tuple] = None  # (Jacobian, ||J||_2^2)

    def jacobian(self, w: torch.Tensor) -> torch.Tensor:
        jac = torch.func.jacrev(self.g)(w.detach())
        return jac.reshape(-1, w.numel())

    def __call__(self, w0: torch.Tensor) -> torch.Tensor:
        w0 = w0.detach()
        inside = w0 if self.project_simple is None else self.project_simple(w0)
        same = (inside == w0).all() if inside is not w0 else True  # torch.equal, without its own read
        magnitude, g_max, same = host_floats([w0.abs().max(), self.g(inside).max(), same])  # one read
        scale = self.tol * (1.0 + magnitude)
        if g_max <= scale and same:
            return w0
        w = inside
        for _ in range(self.max_rounds):
            jac, h = self.fixed if self.affine else (self.jacobian(w), None)
            if h is None:
                h = self.g(w).detach() - jac @ w
            w = self._linear(w0, jac, h, scale)
            violation = float(self.g(w).max())
            if violation <= scale or self.affine:
                break
        if not violation <= 10 * scale:
            raise ValueError(
                f"the projection onto the constraint set {{g(x, y) <= 0}} failed: the closest point found "
                f"violates a constraint by {violation:.3g} (tolerance {scale:.3g}); the set may be empty "
                "(infeasible constraints), or g not convex."
            )
        return w

    def _linear(self, w0: torch.Tensor, jac: torch.Tensor, h: torch.Tensor, scale: float) -> torch.Tensor:
        """Projection onto ``{w in S : jac w + h <= 0}`` by FISTA on the dual."""
        m = jac.shape[0]
        if self._lipschitz is None or self._lipschitz[0] is not jac:  # one SVD per Jacobian (affine g: one)
            self._lipschitz = (jac, float(torch.linalg.matrix_norm(jac, 2)) ** 2)
        lipschitz = self._lipschitz[1]
        if lipschitz == 0.0:
            return w0 if self.project_simple is None else self.project_simple(w0)
        mu = self.dual if self.dual is not None and self.dual.shape == (m,) else torch.zeros(m, dtype=w0.dtype, device=w0.device)
        nu, t = mu, 1.0
        primal = self._primal(w0, jac, mu)
        for i in range(self.max_iterations):
            slack = jac @ self._primal(w0, jac, nu) + h
            mu_next = (nu + slack / lipschitz).clamp_min(0)
            t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
            nu = mu_next + ((t - 1) / t_next) * (mu_next - mu)
            mu, t = mu_next, t_next
            if i % 10 == 9:  # every 10 iterations, one host read for the stopping rule and the blow-up test
                primal = self._primal(w0, jac, mu)
                residual = jac @ primal + h
                worst, complementarity, size, finite = host_floats(
                    [residual.max(), (mu * residual).abs().max(), mu.abs().max(), torch.isfinite(mu).all()])
                if worst <= scale and complementarity <= scale * (1 + size):
                    break
                if not finite or size > 1e12:
                    raise ValueError("the constraint set {g(x, y) <= 0} is empty (the projection's multipliers "
                                     "diverge): the constraints are infeasible.")
        self.dual = mu
        return self._primal(w0, jac, mu)

    def _primal(self, w0, jac, mu):
        w = w0 - jac.T @ mu
        return w if self.project_simple is None else self.project_simple(w)


__all__ = ["ConstraintProjection"]
