r"""The value-function penalty method and its fully first-order stochastic variant (F2SA)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .._tree import tree_flatten, tree_leaves, tree_unflatten
from ._base import State, StepInfo
from ._single_loop import SingleLoop, coupled_step, shared_args, step_report, tree_sq_norm, value_and_grads


_MAX_INNER_FACTOR = 64
"""Slow divergences multiply the inner steps by 4 up to this factor, then divide the x step by 10."""


@shared_args
@dataclass(frozen=True)
class Penalty(SingleLoop):
    r"""Value-function penalty method (first order), with the F2SA schedule for mini-batches.

    The bilevel problem is relaxed to
    :math:`\min_x \psi_\lambda(x) = \min_y F(x, y) + \lambda\,(f(x, y) - f^\star(x))`,
    :math:`f^\star(x) = \min_z f(x, z)`, whose gradient needs first derivatives only:

    .. math::

        \nabla\psi_\lambda(x) = \nabla_x F(x, y_\lambda) + \lambda\bigl(\nabla_x f(x, y_\lambda)
        - \nabla_x f(x, z^\star)\bigr), \quad
        y_\lambda = \arg\min_y F + \lambda f, \quad z^\star = \arg\min_z f,

    and :math:`\|\nabla\psi_\lambda - \nabla\Phi\| = O(1/\lambda)` under lower-level
    strong convexity (Kwon et al. also cover closed convex sets and non-convex
    lower levels with a proximal error bound).  One iteration, warm-started:

    .. math::

        &\text{repeat } T \text{ times:}\quad
        z \leftarrow P_Y(z - \gamma \nabla_y f(x, z)), \quad
        y \leftarrow P_Y\bigl(y - \tau_k [\nabla_y F(x, y) + \lambda_k \nabla_y f(x, y)]\bigr) \\
        &x \leftarrow P_X\bigl(x - \alpha_k [\nabla_x F(x, y) + \lambda_k (\nabla_x f(x, y)
          - \nabla_x f(x, z))]\bigr).

    **Schedules.**  Deterministic (no mini-batches): :math:`\lambda_k = \lambda_0 (1 + k/\kappa)`
    grows linearly (``lam_growth`` :math:`= 1/\kappa`); :math:`\gamma = 1/L_f`,
    :math:`\tau_k = 1/(L_F + \lambda_k L_f)` follow the curvature of the two
    lower problems, and :math:`\alpha` is constant.  Stochastic (F2SA, used when
    :func:`bilevel.solve` feeds mini-batches, or with ``stochastic=True``): the
    steps decay as :math:`\tau_k \propto (k+1)^{-5/7}`, :math:`\gamma_k, \alpha_k
    \propto (k+1)^{-4/7}` and :math:`\lambda_k = \lambda_0 + \delta\,((k+1)^{1/7} - 1)`,
    so that :math:`\lambda_k` grows as the ratio :math:`(k+1)^{1/7}` of the two
    lower steps (the exponents of the F2SA analysis, where
    :math:`\lambda_k = \gamma_k / \tau_k`; :math:`\lambda_k \alpha_k` then decays and the
    coupled iteration stays stable), with :math:`\tau_k` capped at the
    stability limit :math:`1/(L_F + \lambda_k L_f)`.

    Defaults come from curvature estimates at the start (power iteration):
    :math:`L_F = \|\nabla^2 F\|` (joint Hessian in :math:`(x, y)`), :math:`L_f = \|\nabla^2_{yy} f\|`,
    :math:`\lambda_0 = \max(1, L_F / L_f)` (in :math:`\tau_k`, :math:`L_F` is the block
    :math:`\|\nabla^2_{yy} F\|`), and :math:`\alpha` the coupled-block step
    :math:`\min\bigl(\tfrac{1}{2\|A\|}, \tfrac{\|C\|}{4\|B\|^2}\bigr)` with
    :math:`A, B, C` the :math:`xx`, :math:`xy`, :math:`yy` blocks of
    :math:`\nabla^2(F + f)`, not of :math:`\nabla^2(F + \lambda f)`: in :math:`d_x` the
    :math:`\lambda` terms differ at :math:`y` and :math:`z`, :math:`O(1/\lambda)` apart, so
    the curvature of :math:`\psi_\lambda` does not grow with :math:`\lambda`
    (:func:`~bilevel.algorithms._single_loop.coupled_step`):
    it lets a weakly coupled :math:`x` move fast (hyper-cleaning: 95 % test
    accuracy after 500 steps, against 71 % with :math:`\tfrac12/\|\nabla^2(F + f)\|`).
    With mini-batches (F2SA) the same base step decays as above: the decay, not a
    smaller base, tames the noise (hyper-cleaning with batches of 32: 89 % test
    accuracy after 500 steps, where the joint-Hessian base step
    :math:`\tfrac12/\|\nabla^2(F + f)\|`, thousands of times smaller there, left :math:`x`
    where it started, at 66 %).
    The history reports :math:`\|d_x\|` (the estimate of :math:`\nabla\psi_\lambda`),
    :math:`\|\nabla_y f(x, z)\|` as the inner residual, and :math:`F(x, y)` at the
    penalized iterate :math:`y \approx y_\lambda` (also ``result.y``) as the outer
    value: it lies below :math:`\Phi(x) = F(x, y^\star(x))` by up to
    :math:`O(1/\lambda)` and can fall while :math:`\Phi` rises.

    On an ill-conditioned lower level that step can outrun :math:`y` and :math:`z`,
    which converge at a rate of about :math:`1/\kappa` per step: the coupled
    iteration diverges slowly (on problem Q with :math:`d = 50`, below about
    :math:`3.6/(L_\Phi \kappa)`, a 25th of the derived step, is stable).  A slow
    divergence is answered by dividing the :math:`x` step by 4 and running 4 times as
    many inner steps :math:`T` (``backoffs`` below): on 60 instances of Q with
    :math:`d` = 10 to 100, 1000 steps end at a median relative error of 2e-3 at
    :math:`d = 20` and :math:`100` (0.17 and 15 with the step divided by 10 alone).

    The arguments from ``outer_optimizer`` on are those of every single-loop
    method; :doc:`/guide` ("Single-loop and aggregation methods") explains the
    warm-up, the curvature re-estimates and the back-offs.

    Args:
        lr: base step :math:`\alpha` of :math:`x` (``None``: derived).
        inner_steps: :math:`T`, steps on :math:`y` and :math:`z` per iteration (default 1).
        lam0: :math:`\lambda_0` (``None``: derived).
        lam_growth: deterministic growth rate :math:`1/\kappa` of :math:`\lambda_k` (default 1/10).
        lam_max: cap on :math:`\lambda_k` (default ``1e6``).
        delta: stochastic growth scale :math:`\delta` of :math:`\lambda` (``None``: :math:`\lambda_0`,
            i.e. :math:`\lambda_k = \lambda_0 (k+1)^{1/7}`).
        stochastic: ``None`` (decaying F2SA steps exactly when mini-batches are
            given), ``True`` or ``False``.
        {single_loop_args}

    References:
        Kwon, J., Kwon, D., Wright, S. and Nowak, R. `A Fully First-Order Method
        for Stochastic Bilevel Optimization <https://arxiv.org/abs/2301.10945>`_.
        ICML 2023 (F2SA).
        Kwon, J., Kwon, D., Wright, S. and Nowak, R. `On Penalty Methods for
        Nonconvex Bilevel Optimization and First-Order Stochastic Approximation
        <https://arxiv.org/abs/2309.01753>`_. ICLR 2024.

    Example:
        >>> import bilevel
        >>> p = bilevel.problems.quadratic()
        >>> r = bilevel.solve(p, method="penalty", max_steps=300, progress=False)
        >>> float((r.x - p.solution.x).norm() / p.solution.x.norm()) < 1e-2
        True
    """

    inner_steps: int = 1
    lam0: Optional[float] = None
    lam_growth: float = 0.1
    lam_max: float = 1e6
    delta: Optional[float] = None
    stochastic: Optional[bool] = None

    _backoff_note = ("; a slow divergence, where :math:`y` and :math:`z` lag behind\n"
                     "    :math:`x`, Penalty answers by dividing it by 4 and running 4 times as many\n"
                     "    inner steps :math:`T` from then on, up to 64 times ``inner_steps``")

    def _backoff_change(self, extras: dict, slow: bool) -> tuple[float, dict, str]:
        steps = extras.get("inner_factor", 1)
        if not slow or steps >= _MAX_INNER_FACTOR:  # a blow-up: the x step is too large on its own
            factor, _, scope = super()._backoff_change(extras, slow)
            return factor, ({"inner_factor": steps} if steps > 1 else {}), (
                f"the inner steps stay at {self.inner_steps * steps}" if steps > 1 else scope)
        # y and z lag behind x: fewer x steps, and more of theirs per x step
        steps *= 4
        return 4.0, {"inner_factor": steps}, f"the inner steps per iteration multiplied by 4, to {self.inner_steps * steps}"

    def __post_init__(self):
        if not (isinstance(self.inner_steps, int) and self.inner_steps >= 1):
            raise ValueError(f"Penalty: `inner_steps` must be a positive int; got {self.inner_steps!r}.")
        for name in ("lam0", "delta"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"Penalty: `{name}` must be positive or None; got {value!r}.")
        if not self.lam_growth >= 0 or not self.lam_max > 0:
            raise ValueError(f"Penalty: need lam_growth >= 0 and lam_max > 0; got {self.lam_growth}, {self.lam_max}.")

    def setup(self, problem, state: State) -> dict:
        s = self.scales(problem, state)
        lam0 = self.lam0 if self.lam0 is not None else max(1.0, s["outer_xy"] / max(s["inner_y"], 1e-12))
        z = [t.detach().clone() for t in tree_leaves(state.y)]
        return {"lam": lam0, "lam0": lam0, "z": z, "scales": s, **self.step_sizes(s, {"lam0": lam0})}

    def step_sizes(self, scales: dict, extras: dict) -> dict:
        lf = scales["inner_y"] if scales["inner_y"] > 0 else 1.0
        x_step = coupled_step(scales["outer_x"] + scales["inner_x"], scales["outer_y"] + lf,
                              scales["outer_cross"] + scales["inner_cross"])
        return {"x_step": x_step, "lf": lf, "lF": scales["outer_y"]}

    def _lambda(self, ex: dict, k: int, stochastic: bool) -> float:
        if not stochastic:
            return min(self.lam_max, ex["lam0"] * (1.0 + self.lam_growth * k))
        delta = self.delta if self.delta is not None else ex["lam0"]
        return min(self.lam_max, ex["lam0"] + delta * ((k + 1) ** (1 / 7) - 1.0))

    def update(self, problem, outer, inner, state: State, batch, project_x, project_y) -> StepInfo:
        ex = state.extras
        k = state.iteration
        stochastic = self.stochastic if self.stochastic is not None else batch is not None
        lam = ex["lam"] = self._lambda(ex, k, stochastic)
        lf, lF = ex["lf"], ex["lF"]
        tau = 1.0 / (lF + lam * lf)
        gamma, alpha = 1.0 / lf, ex["x_step"]
        if stochastic:
            tau = min(tau, (1.0 / (lF + ex["lam0"] * lf)) / (k + 1) ** (5 / 7))
            gamma, alpha = gamma / (k + 1) ** (4 / 7), alpha / (k + 1) ** (4 / 7)
        xs, x_spec = tree_flatten(state.x)
        xs = [t.detach().clone() for t in xs]
        ys, y_spec = tree_flatten(state.y)
        z = ex["z"]
        penalized = lambda x, y: outer(x, y) + lam * inner(x, y)  # noqa: E731
        for _ in range(self.inner_steps * ex.get("inner_factor", 1)):  # more after a slow divergence
            _, _, gz = value_and_grads(inner, xs, z, x_spec, y_spec, "y")
            _, _, gy = value_and_grads(penalized, xs, ys, x_spec, y_spec, "y")
            with torch.no_grad():
                z = [a - gamma * g for a, g in zip(z, gz)]
                ys = [a - tau * g for a, g in zip(ys, gy)]
            if project_y is not None:
                z, ys = project_y(z), project_y(ys)
        _, gx_pen, _ = value_and_grads(penalized, xs, ys, x_spec, y_spec, "x")
        _, gx_z, gz = value_and_grads(inner, xs, z, x_spec, y_spec, "xy")
        d_x = [a - lam * b for a, b in zip(gx_pen, gx_z)]
        self.move_x(state, d_x, alpha, project_x)
        state.y = tree_unflatten(ys, y_spec)
        ex["z"] = z
        return step_report(outer, state, d_x, torch.sqrt(tree_sq_norm(gz)))


__all__ = ["Penalty"]
