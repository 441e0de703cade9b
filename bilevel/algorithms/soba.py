r"""SOBA: the stochastic one-loop bilevel method of Dagréou et al. (2022)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import math
import warnings

import torch

from .._tree import tree_flatten, tree_leaves, tree_unflatten
from ..status import CurvatureWarning
from ._base import State, StepInfo, bind_batch, host_floats
from ._hyper_curvature import hyper_curvature
from ._single_loop import (
    STOCHASTIC_DECAYS,
    SingleLoop,
    autograd_grads,
    check_flat_set,
    coupled_step,
    outer_rose,
    shared_args,
    step_report,
    tangent_map,
    tracked,
    tree_sq_norm,
)


_REMEASURE = 2.0
"""Factor by which a scale the estimate of Phi's curvature rests on (the norms of
:math:`\nabla^2_{yy} f`, :math:`\nabla^2_{xy} f` and :math:`\nabla^2_{yy} F`) may move along
the run before the estimate is taken again (on hyper-cleaning and the logistic penalties
they stay within it; the smallest eigenvalue, whose 8-step re-estimates warm-start from
the last and settle over the run, is left out)."""
_MEASURED_SCALES = ("inner_y", "inner_cross", "outer_y")


def _phi_bound(scales: dict) -> float:
    r"""The block-norm bound :math:`L_\Phi = \|\nabla^2_{xx}(F + f)\| + 2\|\nabla^2_{xy} F\| \|B\|/\mu
    + \|\nabla^2_{yy} F\| \|B\|^2/\mu^2` on :math:`\|\nabla^2\Phi\|` (0 without strong convexity)."""
    curvature = scales["inner_y"]
    mu = max(scales.get("inner_y_min", 0.0), 1e-3 * curvature)
    cross = scales["inner_cross"]
    if not mu > 0:
        return 0.0
    return (scales["outer_x"] + scales["inner_x"] + 2 * scales["outer_cross"] * cross / mu
            + scales["outer_y"] * cross**2 / mu**2)


@shared_args
@dataclass(frozen=True)
class SOBA(SingleLoop):
    r"""SOBA: one step on :math:`y`, one on the linear-system variable :math:`v` and
    one on :math:`x` per iteration, every direction at :math:`(x_k, y_k, v_k)`:

    .. math::

        y &\leftarrow P_Y\bigl(y - \rho_k \nabla_y f(x, y)\bigr) \\
        v &\leftarrow v - \rho'_k \bigl(\nabla^2_{yy} f(x, y)\, v + \nabla_y F(x, y)\bigr) \\
        x &\leftarrow P_X\bigl(x - \gamma_k [\nabla_x F(x, y) + \nabla^2_{xy} f(x, y)\, v]\bigr),

    with :math:`\rho_k = \rho\,(k+1)^{-a}`, :math:`\rho'_k = \rho'\,(k+1)^{-a}` and
    :math:`\gamma_k = \gamma\,(k+1)^{-b}`.  The :math:`v` step is a gradient step on
    :math:`\tfrac12 v^\top \nabla^2_{yy} f\, v + v^\top \nabla_y F`, so :math:`v`
    tracks :math:`-(\nabla^2_{yy} f)^{-1} \nabla_y F` and the :math:`x` direction
    tracks the implicit hypergradient: the implicit method with its inner solve and
    its linear solve each cut to one step, warm-started along the run.  Two
    Hessian-vector products per iteration (one backward pass through the inner
    gradient), no inner loop; with mini-batches (``data=``) each step draws one
    batch, the stochastic setting the method was made for.

    Like the implicit method it assumes a lower level that is strongly convex in
    :math:`y` near the path: where :math:`\nabla^2_{yy} f` is singular (problem M1),
    :math:`v` grows without bound along its null space; use the penalty method,
    MEHA, sl-BAMM or BDA there.

    Defaults: :math:`\rho = \rho' = 1/L` with :math:`L = \|\nabla^2_{yy} f\|` from a
    curvature estimate (re-taken every 25 steps), and
    :math:`\gamma = \min\bigl(\alpha_c, \tfrac{1}{L_\Phi}\bigr)\, \mu_t / L`: a stable
    step on the hyper-objective, bounded by the coupled-block step :math:`\alpha_c` of
    :func:`~bilevel.algorithms._single_loop.coupled_step` (whose :math:`xx` block, the
    curvature of :math:`F + f` in :math:`x`, stands for the third derivatives of
    :math:`f` that :math:`L_\Phi` leaves out), slowed so that :math:`y` and :math:`v`
    keep up with :math:`x`.  They catch up with a move of :math:`x` along :math:`u` at
    the rate the curvature of :math:`f` along :math:`w = H^{-1}Bu` sets
    (:math:`H = \nabla^2_{yy} f`, :math:`B = \nabla^2_{yx} f`): :math:`\mu_t` is that
    Rayleigh quotient :math:`w^\top H w / w^\top w` for the stiffest direction :math:`u`
    of :math:`\Phi`, between the smallest eigenvalue :math:`\mu` of :math:`H` (by Lanczos)
    and :math:`L`.  On quadratics with :math:`L/\mu` from 13 to 160 this step is about
    half the largest step for which the iteration linearized at the start is
    stable; on hyper-cleaning, where :math:`B` lies in the span of the data
    and the flattest directions of :math:`H` are those only the L2 term curves,
    :math:`\mu_t \approx 4\mu`.  :math:`L_\Phi` is an
    estimate of :math:`\|\nabla^2\Phi\|` by power iteration with inner solves
    (:func:`~bilevel.algorithms._hyper_curvature.hyper_curvature`), taken at the start
    and again at a curvature re-estimate where :math:`\|\nabla^2_{yy} f\|`,
    :math:`\|B\|` or :math:`\|\nabla^2_{yy} F\|` moved by
    more than a factor 2 since; at least the cross term
    :math:`2\|\nabla^2_{xy} F\|\|B\|/\mu`, which the coupled iteration feels even where
    :math:`\Phi` is flat.  The block-norm bound
    :math:`\|\nabla^2_{xx}(F + f)\| + 2\|\nabla^2_{xy} F\| \|B\|/\mu
    + \|\nabla^2_{yy} F\| \|B\|^2/\mu^2` stands in where there is no estimate (a singular
    lower level); it assumes :math:`B` points into the flattest direction of
    :math:`\nabla^2_{yy} f` and is loose by about 2e3 on hyper-cleaning.  Steps are constant
    (:math:`a = b = 0`) without mini-batches and decay with the paper's exponents
    :math:`a = 2/5`, :math:`b = 3/5` when :func:`bilevel.solve` feeds them (``y_decay`` /
    ``x_decay`` left ``None``), which gives convergence to a stationary point under
    noise; it costs speed where the noise is mild (hyper-cleaning with batches of 32:
    69 % test accuracy after 500 steps, 73 % with constant steps), and it keeps the
    validation loss from rising where it is not (the logistic penalties with batches
    of 32: 0.2 % down after 500 steps, 5 % up with constant steps).  The history reports the norm of the
    :math:`x` direction, :math:`\|\nabla_y f(x, y)\|` and the residual
    :math:`\|\nabla^2_{yy} f\, v + \nabla_y F\|` of the linear system.

    Args:
        lr: :math:`\gamma` (``None``: derived).
        y_step: :math:`\rho` (``None``: derived).
        v_step: :math:`\rho'` (``None``: the :math:`y` step).
        y_decay: :math:`a \ge 0`, the decay exponent of the :math:`y` and :math:`v` steps
            (``None``: 2/5 with mini-batches, 0 without).
        x_decay: :math:`b \ge 0`, the decay exponent of the :math:`x` step (``None``: 3/5
            with mini-batches, 0 without).
        {single_loop_args}

    References:
        Dagréou, M., Ablin, P., Vaiter, S. and Moreau, T. `A framework for bilevel
        optimization that enables stochastic and global variance reduction algorithms
        <https://arxiv.org/abs/2201.13409>`_. NeurIPS 2022.

    Example:
        >>> import bilevel
        >>> p = bilevel.problems.quadratic()                     # strongly convex lower level
        >>> r = bilevel.solve(p, method="soba", max_steps=2000, progress=False)
        >>> float((r.x - p.solution.x).norm() / p.solution.x.norm()) < 1e-3
        True
    """

    y_step: Optional[float] = None
    v_step: Optional[float] = None
    y_decay: Optional[float] = None
    x_decay: Optional[float] = None

    # checkpoints from before the estimate of ||Hess Phi|| lack it: taken at the next re-estimate
    optional_extras: ClassVar[tuple] = SingleLoop.optional_extras + ("phi_curvature", "phi_measured_at", "phi_tracking")

    def __post_init__(self):
        for name in ("y_step", "v_step"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"SOBA: `{name}` must be a positive number or None; got {value!r}.")
        for name in ("y_decay", "x_decay"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not value >= 0):
                raise ValueError(f"SOBA: `{name}` must be a number >= 0 or None; got {value!r}.")

    def setup(self, problem, state: State) -> dict:
        s = self.scales(problem, state)
        v = [torch.zeros_like(t) for t in tree_leaves(state.y)]
        measured = self._measure(problem, state, s)
        extras = {"v": v, "scales": s, **measured, **self.step_sizes(s, measured)}
        if s["inner_y"] > 0 and s.get("inner_y_min", 0.0) <= 1e-6 * s["inner_y"]:
            extras["v_warned"] = True
            warnings.warn(
                f"SOBA: the lower-level Hessian is singular or indefinite at the start (smallest eigenvalue "
                f"{s.get('inner_y_min', 0.0):.2g}, largest {s['inner_y']:.3g}): v cannot solve "
                "Hess_yy f v = -grad_y F, so the x direction is no hypergradient. Use a method for non-unique "
                "lower levels (penalty, meha, bamm, bda).",
                CurvatureWarning, stacklevel=4,
            )
        return extras

    def step_sizes(self, scales: dict, extras: dict) -> dict:
        curvature = scales["inner_y"]
        rho = self.y_step if self.y_step is not None else (1.0 / curvature if curvature > 0 else 0.1)
        # mu: the lower level's strong convexity (floored at 1e-3 L: singular problems warn)
        mu = max(scales.get("inner_y_min", 0.0), 1e-3 * curvature)
        # the estimate of ||Hess Phi|| (the bound where there is none), at least the cross
        # term 2 ||Hess_xy F|| ||B|| / mu, which the coupled iteration feels even where Phi is flat
        cross_term = 2 * scales["outer_cross"] * scales["inner_cross"] / mu if mu > 0 else 0.0
        phi_curvature = max(extras.get("phi_curvature") or _phi_bound(scales), cross_term)
        # how fast y catches up with x: the curvature of f along the way y* moves (>= mu)
        tracking = min(max(mu, extras.get("phi_tracking") or 0.0), curvature)
        x_step = coupled_step(scales["outer_x"] + scales["inner_x"], curvature,
                              scales["outer_cross"] + scales["inner_cross"])
        if phi_curvature > 0 and curvature > 0:  # a stable step on Phi, slowed so that y and v keep up
            x_step = min(x_step, 1.0 / phi_curvature) * tracking / curvature
        return {"x_step": x_step, "y_step": rho, "v_step": self.v_step if self.v_step is not None else rho}

    def _decays(self, mini_batches: bool) -> tuple[float, float]:
        """The exponents ``(a, b)`` in force: the paper's 2/5 and 3/5 with mini-batches,
        constant steps without, where ``y_decay`` / ``x_decay`` are ``None``."""
        default = STOCHASTIC_DECAYS if mini_batches else (0.0, 0.0)
        return tuple(d if given is None else float(given)
                     for given, d in zip((self.y_decay, self.x_decay), default))

    def _remeasure(self, problem, state: State) -> None:
        """At a curvature re-estimate: take the estimate of Phi's curvature anew where one of
        the scales it rests on moved by more than a factor :data:`_REMEASURE` since (the
        lower level's curvature changed along the path; an estimate from elsewhere need not
        hold), or where there is none (a checkpoint from before the estimate, or from
        before the tracking curvature)."""
        ex = state.extras
        then = ex.get("phi_measured_at")
        now = [ex["scales"][key] for key in _MEASURED_SCALES]
        ratios = [a / b if b > 0 else (1.0 if a == 0 else math.inf) for a, b in zip(now, then or [])]
        if then and "phi_tracking" in ex and all(1 / _REMEASURE <= r <= _REMEASURE for r in ratios):
            return
        ex.update(self._measure(problem, state, ex["scales"]))
        ex.update(self.step_sizes(ex["scales"], ex))
        if self.lr is not None:
            ex["x_step"] = float(self.lr)

    def _measure(self, problem, state: State, scales: dict) -> dict:
        r"""``{"phi_curvature": estimate, "phi_tracking": curvature, "phi_measured_at": scales}``:
        the estimate of :math:`\|\nabla^2\Phi\|` by
        :func:`~bilevel.algorithms._hyper_curvature.hyper_curvature` at the current point,
        the tracking curvature it measures along (0: none), and the scales of
        :data:`_MEASURED_SCALES` it was taken at;
        an estimate of 0 where there is none to take (the block-norm bound then serves): a
        singular lower level (warned), an estimate that fails or sees no curvature (the
        third derivatives of f it leaves out may still curve Phi)."""
        at = {"phi_measured_at": [scales[key] for key in _MEASURED_SCALES], "phi_tracking": 0.0}
        if not _phi_bound(scales) > 0 or scales.get("inner_y_min", 0.0) <= 1e-6 * scales["inner_y"]:
            return {"phi_curvature": 0.0, **at}
        outer, inner = bind_batch(problem, problem.example_batch)
        xs, x_spec = tree_flatten(state.x)
        ys, y_spec = tree_flatten(state.y)
        condition = scales["inner_y"] / max(scales.get("inner_y_min", 0.0), 1e-3 * scales["inner_y"])
        solve_iterations = min(200, max(50, math.ceil(4 * math.sqrt(condition))))
        try:
            estimate, tracking = hyper_curvature(outer, inner, xs, ys, x_spec, y_spec,
                                                 max(self.curvature_iterations // 2, 5), solve_iterations)
        except FloatingPointError:
            return {"phi_curvature": 0.0, **at}
        if not estimate > 0:
            return {"phi_curvature": 0.0, **at}
        return {"phi_curvature": estimate, **at, "phi_tracking": tracking}

    def update(self, problem, outer, inner, state: State, batch, project_x, project_y) -> StepInfo:
        ex = state.extras
        if self.rescale_every and state.iteration and state.iteration % self.rescale_every == 0:
            self._remeasure(problem, state)
        y_decay, x_decay = self._decays(batch is not None)
        decay = (state.iteration + 1) ** -y_decay
        rho, rho_v = ex["y_step"] * decay, ex["v_step"] * decay
        gamma = ex["x_step"] * (state.iteration + 1) ** -x_decay
        xs, x_spec = tree_flatten(state.x)
        ys, y_spec = tree_flatten(state.y)
        v = ex["v"]
        n_x = len(xs)
        with torch.enable_grad():
            (xs_, x_tree), (ys_, y_tree) = tracked(xs, x_spec), tracked(ys, y_spec)
            gF = autograd_grads(outer(x_tree, y_tree).reshape(()), xs_ + ys_)
            gf_y = autograd_grads(inner(x_tree, y_tree).reshape(()), ys_, create_graph=True)
            # with y_set: the system of the constrained lower level (see tangent_map)
            tangent = tangent_map(project_y, ys, [g.detach() for g in gf_y], rho)
            if tangent is not None:
                v = tangent(v)
            hv = autograd_grads(gf_y, xs_ + ys_, grad_outputs=v)  # (cross term, Hessian) times v
        with torch.no_grad():
            d_x = [a + b for a, b in zip(gF[:n_x], hv[:n_x])]
            d_v = [a + b for a, b in zip(hv[n_x:], gF[n_x:])]
            if tangent is not None:
                d_v = tangent(d_v)
            ys_new = [y - rho * g.detach() for y, g in zip(ys, gf_y)]
            ex["v"] = [a - rho_v * b for a, b in zip(v, d_v)]
        if tangent is not None and state.iteration % max(self.rescale_every, 25) == 0:
            check_flat_set(tangent, ex["v"], ex, "SOBA")
        if project_y is not None:
            ys_new = project_y(ys_new)
        self.move_x(state, d_x, gamma, project_x)
        state.y = tree_unflatten(ys_new, y_spec)
        residual = torch.sqrt(tree_sq_norm([g.detach() for g in gf_y]))
        linear_residual = torch.sqrt(tree_sq_norm(d_v))
        scales = ex["scales"]
        # about ten times the steps v needs (L / mu; the estimate of mu is rough, hence the cap),
        # deterministic runs only (one mini-batch's residual is too noisy to judge), and a
        # host read only now and then
        patience = min(max(200, 10 * scales["inner_y"] / max(scales.get("inner_y_min", 0.0), 1e-12)), 1000)
        if batch is None and self.rescale_every and state.iteration % self.rescale_every == 0 and not ex.get("v_warned"):
            scale = torch.sqrt(tree_sq_norm(gF[n_x:]))
            peak = ex["grad_y_peak"] = torch.maximum(ex.get("grad_y_peak", scale), scale)  # on the device
            if state.iteration >= patience:
                scale, peak, lagging = host_floats([scale, peak, linear_residual])
                # with grad_y F = 0 the system is v = 0, and where grad_y F has all but vanished
                # (a converged run) the ratio is rounding: nothing to judge by
                if scale > torch.finfo(linear_residual.dtype).eps ** 0.25 * peak:
                    self._check_linear_system(state, lagging / scale)
                else:
                    ex["v_stuck"] = False
        return step_report(outer, state, d_x, residual, linear_residual=linear_residual)

    def _check_linear_system(self, state: State, relative: float) -> None:
        r"""Act once :math:`v` has not solved its system long after it should have: a relative
        residual :math:`\|\nabla^2_{yy} f\, v + \nabla_y F\| / \|\nabla_y F\|` above 1/2 at
        two looks in a row.

        Where the latest estimate of the smallest eigenvalue of :math:`\nabla^2_{yy} f` is
        positive, :math:`v` may lag because :math:`x` moves too fast for :math:`y` and
        :math:`v` to follow (an x step derived from an overestimated strong convexity,
        e.g. on problem Q with :math:`d = 100`); the next re-estimate decides
        (:meth:`_growth_diverged`).  Otherwise, or once the back-offs are spent, the
        lower-level Hessian is taken for singular (or indefinite), along whose null space
        :math:`v` only drifts (problem M1): a warning, once."""
        ex = state.extras
        stuck = relative > 0.5
        if stuck and ex.get("v_stuck") and not ex.get("v_warned"):
            scales = ex["scales"]
            definite = scales.get("inner_y_min", 0.0) > 1e-6 * scales["inner_y"]  # as in setup
            if definite and ex.get("backoffs_taken", 0) < self.backoffs:
                ex["v_lag"] = (state.iteration, relative)
                ex["v_stuck"] = False  # judged anew after the back-off
                return
            ex["v_warned"] = True
            warnings.warn(
                f"SOBA: after {state.iteration} steps v still leaves a relative residual of {relative:.2g} in "
                "Hess_yy f v = -grad_y F: the lower-level Hessian looks singular or indefinite, so the "
                "x direction is no hypergradient. Use a method for non-unique lower levels (penalty, meha, "
                "bamm, bda).",
                CurvatureWarning, stacklevel=5,
            )
        ex["v_stuck"] = stuck

    def _growth_diverged(self, state: State, outer) -> bool:
        r"""A lagging :math:`v` (:meth:`_check_linear_system`) on a lower level estimated
        positive definite: where the outer value went up since the window of the lowest
        :math:`\|d_x\|` (the median over the steps since the last re-estimate above
        that window's), the x step is too large and backs off; where the run still
        improves, a warning says that the direction is no accurate hypergradient.
        Then the growth test of every single-loop method."""
        ex = state.extras
        lag = ex.pop("v_lag", None)
        if lag is not None:
            step, relative = lag
            scales = ex["scales"]
            what = (f"v lags behind Hess_yy f v = -grad_y F (relative residual {relative:.2g} at step {step}, with "
                    f"the smallest eigenvalue of Hess_yy f estimated at {scales.get('inner_y_min', 0.0):.3g} and the "
                    f"largest at {scales['inner_y']:.3g})")
            if outer_rose(ex):
                self._slow_back_off(state, outer, what + " and the outer value rose: x moves too fast for y and v "
                                                         "to follow")
                return True
            ex["v_warned"] = True
            warnings.warn(
                f"SOBA: {what}: the x direction is no accurate hypergradient. Either x moves too fast for v to "
                "follow (lower `lr`) or the lower-level Hessian is singular or nearly so (then use a method for "
                "non-unique lower levels: penalty, meha, bamm, bda).",
                CurvatureWarning, stacklevel=5,
            )
        return super()._growth_diverged(state, outer)


__all__ = ["SOBA"]
