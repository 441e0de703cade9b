r"""
When the implicit function theorem fails: single-loop methods
=============================================================

The implicit method computes the hypergradient
:math:`\nabla\Phi(x) = \frac{d}{dx} F(x, y^\star(x))` from the implicit function
theorem (IFT). The inner problem :math:`\min_y f(x, y)` defines :math:`y^\star(x)`
by :math:`\nabla_y f(x, y^\star(x)) = 0`. Differentiating this equation in
:math:`x` gives

.. math::

    \nabla^2_{yx} f + \nabla^2_{yy} f \, \frac{d y^\star}{d x} = 0
    \quad\Longrightarrow\quad
    \nabla\Phi = \nabla_x F - \nabla^2_{xy} f \, v, \qquad \nabla^2_{yy} f \, v = \nabla_y F .

Both steps need an invertible inner Hessian :math:`\nabla^2_{yy} f`. When it
is singular, the inner solution need not be unique, :math:`y^\star(x)` need
not be a differentiable function, and the linear system for :math:`v` has
no solution or infinitely many. This happens with over-parameterized models
and with inner variables that :math:`f` ignores. The first step fails too
when the inner problem has constraints: its solution is then characterized
by the KKT conditions, not by :math:`\nabla_y f = 0`.

This tutorial runs two small problems whose answers are known:

* **M1**, an inner problem with a continuum of solutions. The implicit method
  warns and stalls. The single-loop methods reach the optimum.
* **L**, an inner problem with a constraint :math:`y \le x` that couples both
  levels. The implicit method does not take constraints. LV-HBA does.

Every method runs with its defaults, except where the text says otherwise.
"""

# %%
# Problem M1: many inner solutions
# --------------------------------
# :func:`bilevel.problems.nonunique_lower_level` builds, with
# :math:`x, y_1, y_2 \in \mathbb{R}^{100}` and :math:`e` the all-ones vector,
#
# .. math::
#
#     \min_x \; F(x, y) = \tfrac12 \|x - y_2\|^2 + \tfrac12 \|y_1 - e\|^2
#     \quad\text{s.t.}\quad
#     y = (y_1, y_2) \in \arg\min_{y} \; f(x, y) = \tfrac12 \|y_1\|^2 - x^\top y_1 .
#
# The inner solutions are :math:`y_1 = x` with :math:`y_2` free. Among them,
# the upper level prefers :math:`y_2 = x`. The bilevel optimum is
# :math:`x^\star = y_1^\star = y_2^\star = e`, with :math:`F^\star = 0`. The
# inner Hessian is :math:`\nabla^2_{yy} f = \operatorname{diag}(I, 0)`: it is
# singular in :math:`y_2`.
#
# We measure the distance of the whole iterate :math:`(x, y_1, y_2)` to the
# solution, relative to the size of the solution, and the upper objective
# :math:`F(x, y)`. The error of :math:`x` alone is printed too, but it is not
# enough here: a method may move :math:`x` near :math:`e` while :math:`y_2`
# stays where it started.
import time
import warnings

import matplotlib.pyplot as plt
import torch

import bilevel
from bilevel.problems import coupled_constraint, nonunique_lower_level

torch.manual_seed(0)
problem = nonunique_lower_level(n=100)
e = problem.solution.x
solution = torch.cat([e, *problem.solution.y])


def errors(x, y):
    """Relative errors of x alone and of the whole iterate (x, y1, y2), and F(x, y)."""
    x = x.detach()
    joint = torch.cat([x, *y])
    return (float((x - e).norm() / e.norm()), float((joint - solution).norm() / solution.norm()),
            float(problem.outer(x, y)))


def run(name, method, steps, **options):
    """bilevel.solve with a callback that records the errors after every step."""
    trace = []
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", bilevel.BilevelWarning)
        result = bilevel.solve(problem, method=method, max_steps=steps, progress=False,
                               callback=lambda state, record: trace.append(errors(state.x, state.y)),
                               **options)
    seconds = time.perf_counter() - start
    return {"name": name, "result": result, "trace": trace, "seconds": seconds, "warnings": caught}


# %%
# The implicit method
# ^^^^^^^^^^^^^^^^^^^
# First with its defaults: a warm-started L-BFGS inner solve, then CG on
# :math:`\nabla^2_{yy} f \, v = \nabla_y F`, then an Adam step on :math:`x`.
# L-BFGS never moves :math:`y_2`, because :math:`\nabla_{y_2} f = 0`. The
# right-hand side has the component :math:`\nabla_{y_2} F = y_2 - x`, which is
# outside the range of the Hessian. CG breaks down, and ``bilevel`` says so:
runs = {}
runs["implicit"] = run("implicit", "implicit", 100)
for warning in runs["implicit"]["warnings"]:
    print(f"{warning.category.__name__}: {warning.message}\n")

# %%
# The warning names the remedies for a singular Hessian. We try one of them:
# ``damping=1e-3`` solves with :math:`\nabla^2_{yy} f + 10^{-3} I`. This is the
# one option we set in this part. The linear solve is now well defined, and
# nothing warns. The inner solution is still not unique, though, and
# :math:`y_2` still never moves.
runs["implicit, damping"] = run("implicit, damping=1e-3", "implicit", 100, damping=1e-3)
print(f"warnings with damping: {len(runs['implicit, damping']['warnings'])}")
for key in ("implicit", "implicit, damping"):
    norms = runs[key]["result"].history["hypergradient_norm"]
    print(f"{runs[key]['name']:24s} norm of the x direction: {norms[0]:.3g} at step 1, {norms[-1]:.3g} at step {len(norms)}")

# %%
# The single-loop methods
# ^^^^^^^^^^^^^^^^^^^^^^^
# Each of them moves :math:`x`, :math:`y` and a few auxiliary variables by one
# explicit step per iteration, and none of them inverts the Hessian. They all
# target the *optimistic* bilevel problem: among the inner solutions, pick the
# one that is best for :math:`F`. Here is what each one optimizes instead of
# :math:`\Phi`, and its update. :math:`\alpha, \beta, \eta, \tau` are step sizes,
# and :math:`c_k = c\,(k+1)^p` and :math:`\lambda_k` are penalty weights that grow
# with the step number :math:`k`.
#
# * **Penalty** (:class:`~bilevel.algorithms.Penalty`) uses the value function
#   :math:`f^\star(x) = \min_z f(x, z)`. The condition :math:`f(x, y) \le f^\star(x)`
#   says that :math:`y` is an inner solution, without asking it to be unique. The
#   method minimizes :math:`F + \lambda_k (f - f^\star)` over :math:`(x, y)`, with
#   :math:`z` tracking :math:`\arg\min f` and :math:`y` tracking
#   :math:`\arg\min_y F + \lambda_k f`:
#   :math:`x \leftarrow x - \alpha [\nabla_x F(x, y) + \lambda_k (\nabla_x f(x, y) - \nabla_x f(x, z))]`.
# * **MEHA** (:class:`~bilevel.algorithms.MEHA`) replaces :math:`f^\star` by the
#   Moreau envelope :math:`v_\gamma(x, y) = \min_\theta f(x, \theta) + \tfrac{1}{2\gamma}\|\theta - y\|^2`,
#   which is smooth even for a (weakly) non-convex :math:`f`. It minimizes
#   :math:`F / c_k + f - v_\gamma`, with :math:`\theta` tracking the inner minimizer:
#   :math:`\theta \leftarrow \theta - \eta[\nabla_y f(x, \theta) + (\theta - y)/\gamma]`,
#   :math:`x \leftarrow x - \alpha [\nabla_x F / c_k + \nabla_x f(x, y) - \nabla_x f(x, \theta)]`,
#   :math:`y \leftarrow y - \beta [\nabla_y F / c_k + \nabla_y f(x, y) - (y - \theta)/\gamma]`.
# * **sl-BAMM** (:class:`~bilevel.algorithms.BAMM`) averages the upper objective
#   into the lower one, :math:`\phi_k = \mu_k F + (1 - \mu_k) f` with
#   :math:`\mu_k \to 0`, so that the inner iterates drift to the solution that
#   :math:`F` prefers. A multiplier :math:`z` tracks
#   :math:`(\nabla^2_{yy}\phi_k)^{-1} \nabla_y F` by one line-search step per iteration:
#   :math:`y \leftarrow y - s_y \nabla_y \phi_k`,
#   :math:`x \leftarrow x - s_x [\nabla_x F - \nabla^2_{xy} \phi_k \, z]`.
#   It uses two Hessian-vector products per step, but no Hessian inverse.
# * **BDA** (:class:`~bilevel.algorithms.BDA`) runs :math:`T` inner steps that
#   also descend :math:`F`, with a vanishing weight :math:`\alpha_t`:
#   :math:`y_{t+1} = y_t - [\alpha_t s_u \nabla_y F + (1 - \alpha_t) s_l \nabla_y f](x, y_t)`.
#   Then :math:`x \leftarrow x - \text{lr} \, \frac{d}{dx} F(x, y_T(x))` by
#   reverse mode through the :math:`T = 16` steps, warm-started from the
#   previous :math:`y_T`.
#
# Their step sizes come from curvature estimates (power iterations with
# Hessian-vector products), so we pass no option. The step
# budgets below are set so that the page builds quickly.
budgets = {"penalty": 1000, "meha": 2000, "bamm": 2000, "bda": 200}
for method, steps in budgets.items():
    runs[method] = run(method, method, steps)

print(f"{'method':24s} {'steps':>5s} {'err. x':>8s} {'err. (x, y)':>11s} {'F':>9s} "
      f"{'warnings':>8s} {'time (s)':>8s}")
for key, r in runs.items():
    err_x, err_xy, value = r["trace"][-1]
    print(f"{r['name']:24s} {len(r['trace']):5d} {err_x:8.1e} {err_xy:11.1e} "
          f"{value:9.2e} {len(r['warnings']):8d} {r['seconds']:8.1f}")
final = {key: r["trace"][-1] for key, r in runs.items()}

# %%
# Error against step
# ^^^^^^^^^^^^^^^^^^
# One step is one update of :math:`x`. Its cost differs between methods: the
# implicit method runs an inner solve and a linear solve, BDA runs 16 inner
# steps and a reverse pass, the other methods evaluate a few gradients (or,
# for sl-BAMM, Hessian-vector products).
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
for key, r in runs.items():
    _, err_xy, value = zip(*r["trace"])
    style = "--" if key.startswith("implicit") else "-"
    steps = range(1, len(value) + 1)
    axes[0].semilogy(steps, err_xy, style, label=r["name"])
    axes[1].semilogy(steps, value, style, label=r["name"])
axes[0].set_ylabel("relative error")
axes[0].set_title(r"distance of $(x, y_1, y_2)$ to the solution")
axes[1].set_title(r"upper objective $F(x, y)$, optimum $F^\star = 0$")
for ax in axes:
    ax.set_xlabel("step")
    ax.set_xscale("log")
    ax.grid(True, which="major", alpha=0.3)
axes[0].legend()
fig.suptitle("problem M1: an inner problem with many solutions")
fig.tight_layout()

# %%
# Reading the plot
# ^^^^^^^^^^^^^^^^
# * **Implicit with damping** converges, smoothly and without a warning, to
#   :math:`x = 0.505\,e`. This is the optimum of another problem: the one in
#   which :math:`y_2` is frozen at its start value :math:`0.01\,e`, so that
#   :math:`\Phi(x) = \tfrac12\|x - 0.01 e\|^2 + \tfrac12\|x - e\|^2`. Damping
#   repairs the linear algebra, not the bilevel problem. The least-squares
#   solves (``solve=NormalCG()`` or ``Direct("lstsq")``) end at the same point.
# * **Implicit with the defaults** warns at every step. The direction it gets
#   back from the broken-down CG solve is not a hypergradient: its norm grows
#   from 10 to over 1000 (printed above). Adam's normalized steps keep
#   :math:`x` bounded, and here they happen to push it near :math:`e` (the
#   small "err. x" in the table). But :math:`y_2` never moves, so the iterate
#   stays far from the solution. With :math:`y_2 = 0.01\,e` and :math:`y_1 = x`,
#   :math:`F` cannot fall below 24.5, its value at :math:`x = 0.505\,e`.
# * **The single-loop methods** all reach the optimum, with :math:`y_2` too.
#   BDA needs the fewest steps, but each of its steps costs 16 inner steps and
#   a reverse pass. The table above gives the time of each run.

# %%
# Problem L: a constraint that couples both levels
# ------------------------------------------------
# :func:`bilevel.problems.coupled_constraint` has :math:`x, y \in \mathbb{R}^{10}` and
#
# .. math::
#
#     \min_x \; \tfrac12 \|x\|^2 + \tfrac12 \|y - e\|^2
#     \quad\text{s.t.}\quad
#     y \in \arg\min_{y'} \bigl\{ \tfrac12 \|y' - 2e\|^2 \;:\; y' - x \le 0 \bigr\} .
#
# The inner solution is :math:`y^\star(x) = \min(2e, x)`. The optimum is
# :math:`x^\star = y^\star = 0.5\,e`, with the constraint active and
# :math:`F^\star = 10/4`. Without the constraint, the inner solution would be
# :math:`y = 2e` for every :math:`x`, and the best :math:`x` would be 0: the
# answer to another problem, and one that violates :math:`y \le x`.
#
# Constraints are a function ``g(x, y)`` whose entries must be :math:`\le 0`.
# We write the problem with plain functions, so that no projection comes with
# it. The implicit method refuses the constraint:
problem_l = coupled_constraint(n=10)
a, c, b = 0.0, 1.0, 2.0


def outer(x, y):
    return 0.5 * ((x - a) ** 2).sum() + 0.5 * ((y - c) ** 2).sum()


def inner(x, y):
    return 0.5 * ((y - b) ** 2).sum()


def g(x, y):
    return y - x  # y <= x, entry by entry


x0, y0 = torch.zeros(10, dtype=torch.float64), torch.zeros(10, dtype=torch.float64)
try:
    bilevel.solve(outer, inner, x0, y0, constraints=g, method="implicit", progress=False)
except ValueError as error:
    implicit_error = str(error)
    print(f"ValueError: {error}")

# %%
# LV-HBA
# ^^^^^^
# LV-HBA (:class:`~bilevel.algorithms.LVHBA`) writes inner optimality with the
# proximal Lagrangian value function
#
# .. math::
#
#     v_\gamma(x, y, z) = \min_\theta \max_{\lambda \ge 0} \; f(x, \theta) + \lambda^\top g(x, \theta)
#     + \tfrac{1}{2\gamma_1}\|\theta - y\|^2 - \tfrac{1}{2\gamma_2}\|\lambda - z\|^2 ,
#
# and penalizes :math:`f(x, y) - v_\gamma(x, y, z) \le 0` as MEHA does. Each
# step takes one gradient descent-ascent step on the saddle point
# :math:`(\theta, \lambda)`. Then it moves :math:`(x, y)` and projects them back
# onto the feasible set :math:`C = \{(x, y) : g(x, y) \le 0\}`:
# :math:`(x, y) \leftarrow P_C\bigl((x, y) - \alpha (d_x, d_y)\bigr)`, with
# :math:`d_x = \nabla_x F / c_k + \nabla_x f(x, y) - \nabla_x f(x, \theta) - \nabla_x g(x, \theta)^\top \lambda`
# and :math:`d_y = \nabla_y F / c_k + \nabla_y f(x, y) - (y - \theta)/\gamma_1`.
# We do not pass a projection: for an affine :math:`g`, LV-HBA computes
# :math:`P_C` itself, exactly, by solving a small QP in torch. The steps again
# come from the problem's curvature and from the size of :math:`\nabla g`.
x_star = problem_l.solution.x
trace_l = []


def record_l(state, record):
    x, y = state.x.detach(), state.y
    trace_l.append((float((x - x_star).abs().max()), float((y - x_star).abs().max()), float(g(x, y).max())))


start = time.perf_counter()
lvhba = bilevel.solve(outer, inner, x0, y0, constraints=g, method="lvhba", max_steps=1500,
                      progress=False, callback=record_l)
seconds_l = time.perf_counter() - start
error_x_l, error_y_l, _ = trace_l[-1]
violation_l = max(v for _, _, v in trace_l)
print(f"LV-HBA after {len(trace_l)} steps ({seconds_l:.1f} s): max |x - x*| = {error_x_l:.1e}, "
      f"max |y - y*| = {error_y_l:.1e}")
print(f"F = {float(outer(lvhba.x, lvhba.y)):.6f} (F* = {problem_l.solution.value}); "
      f"largest g(x, y) over all steps: {violation_l:.1e}")

fig, ax = plt.subplots(figsize=(6, 4))
err_x, err_y, _ = zip(*trace_l)
ax.semilogy(range(1, len(err_x) + 1), err_x, label=r"$\max_i |x_i - x^\star_i|$")
ax.semilogy(range(1, len(err_y) + 1), err_y, "--", label=r"$\max_i |y_i - y^\star_i|$")
ax.set_xlabel("step")
ax.set_ylabel("error")
ax.set_title(r"problem L: LV-HBA with the constraint $y \leq x$")
ax.grid(True, which="major", alpha=0.3)
ax.legend()
fig.tight_layout()

# %%
# Every iterate is feasible, because each step ends with the projection onto
# :math:`C`. If you have a cheaper exact projection, pass it as
# ``projection=`` (a function ``(x, y) -> (x, y)``); it saves the QP solve.
#
# Which method to pick
# --------------------
# * The inner problem is **strongly convex** (an L2 penalty is enough): use
#   ``"implicit"``. Its hypergradient is exact up to the inner and linear-solve
#   tolerances, and its certificate tells you when an assumption fails.
# * The inner problem has **many solutions or is non-convex**, and
#   :class:`~bilevel.status.CurvatureWarning` fires: use a single-loop method.
#   ``"penalty"`` is first-order and the simplest, and it has a stochastic
#   variant (F2SA) for mini-batches. ``"meha"`` handles weakly non-convex
#   inner problems and a non-smooth term with its ``prox``. ``"bamm"`` uses two
#   Hessian-vector products per step. ``"bda"`` costs :math:`T` inner steps and
#   a reverse pass per step, and its memory grows with :math:`T`.
# * The inner problem has **constraints that involve** :math:`x`: use
#   ``"lvhba"`` with ``constraints=g``.
#
# A non-convex inner problem has one more catch. The methods then track
# inner *stationary* points, not global minima. MEHA's reformulation, for
# one, accepts every inner critical point as feasible, so it solves a
# relaxation of the bilevel problem.
# :doc:`/guide` has the assumptions of every method and more measurements.
#
# References: Liu, Mu, Yuan, Zeng and Zhang, `BDA <https://arxiv.org/abs/2006.04045>`_,
# ICML 2020. Liu, Liu, Zeng and Zhang, `sl-BAMM <https://arxiv.org/abs/2302.03407>`_,
# ICML 2023. Kwon, Kwon, Wright and Nowak, `F2SA <https://arxiv.org/abs/2301.10945>`_,
# ICML 2023. Liu, Liu, Yao, Zeng and Zhang, `MEHA <https://arxiv.org/abs/2405.09927>`_,
# ICML 2024. Yao, Yu, Zeng and Zhang, `LV-HBA <https://arxiv.org/abs/2401.16164>`_,
# ICLR 2024.
