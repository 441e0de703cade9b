r"""
Hypergradients and ``custom_root`` in five minutes
==================================================

A bilevel problem has an optimization problem inside another one. Here the
inner problem fits ridge regression weights :math:`w` on training data, with one
penalty :math:`e^{\lambda_j}` per feature. The outer problem scores the fitted
weights on validation data:

.. math::

    \min_\lambda \; F(\lambda, w^\star(\lambda)) = \tfrac12 \|X_{val} w^\star(\lambda) - t_{val}\|^2,
    \qquad
    w^\star(\lambda) = \arg\min_w \; f(\lambda, w) = \tfrac12 \|X w - t\|^2 + \tfrac12 \sum_j e^{\lambda_j} w_j^2 .

Gradient descent on :math:`\lambda` needs the *hypergradient*
:math:`\nabla\Phi(\lambda) = \frac{d}{d\lambda} F(\lambda, w^\star(\lambda))`.
It depends on :math:`\lambda` through the solution of the inner problem.
This tutorial computes it in three ways and checks each one:

1. :func:`bilevel.hypergrad`, given the two objectives and an inner solution;
2. :func:`bilevel.custom_root` around a solver that autograd cannot see through;
3. central finite differences, as an independent check.
"""

# %%
# The problem
# -----------
# Both objectives take the upper variable first: ``inner(lam, w)`` and
# ``outer(lam, w)``. We work in float64, so that the checks below can be tight.
import warnings

import torch

import bilevel
from bilevel.implicit import stationarity

torch.manual_seed(0)
dtype = torch.float64
n, n_val, d = 200, 100, 8
w_true = torch.randn(d, dtype=dtype)
X, X_val = torch.randn(n, d, dtype=dtype), torch.randn(n_val, d, dtype=dtype)
t = X @ w_true + 2.0 * torch.randn(n, dtype=dtype)
t_val = X_val @ w_true + 2.0 * torch.randn(n_val, dtype=dtype)


def inner(lam, w):
    """f: training loss plus one ridge penalty exp(lam_j) per feature."""
    return 0.5 * ((X @ w - t) ** 2).sum() + 0.5 * (lam.exp() * w**2).sum()


def outer(lam, w):
    """F: validation loss of the fitted weights."""
    return 0.5 * ((X_val @ w - t_val) ** 2).sum()


# %%
# This problem has a closed form, which serves as the reference below. With
# :math:`H = X^\top X + \operatorname{diag}(e^\lambda)`, the solution is
# :math:`w^\star = H^{-1} X^\top t` and the hypergradient is
# :math:`\nabla\Phi = -e^\lambda \odot w^\star \odot H^{-1} X_{val}^\top (X_{val} w^\star - t_{val})`.


def exact_solution(lam):
    return torch.linalg.solve(X.T @ X + torch.diag(lam.exp()), X.T @ t)


def exact_hypergradient(lam):
    w = exact_solution(lam)
    v = torch.linalg.solve(X.T @ X + torch.diag(lam.exp()), X_val.T @ (X_val @ w - t_val))
    return -lam.exp() * w * v


lam = torch.full((d,), 2.0, dtype=dtype)
exact = exact_hypergradient(lam)


def relative_error(g):
    return float((g - exact).norm() / exact.norm())


# %%
# 1. ``bilevel.hypergrad``
# ------------------------
# Give it the two objectives, the upper variable and an inner solution. It
# applies the implicit function theorem at that point,
# :math:`\nabla\Phi = \nabla_\lambda F - \nabla^2_{\lambda w} f\, v` with
# :math:`\nabla^2_{ww} f\, v = \nabla_w F`. This needs Hessian-vector products
# only. With ``return_info=True`` it also returns a *certificate*: how far
# :math:`w` is from a root of :math:`\nabla_w f`, and how well the linear
# system was solved.
w_star = exact_solution(lam)
g, info = bilevel.hypergrad(outer, inner, lam, w_star, return_info=True)
print(f"relative error of bilevel.hypergrad: {relative_error(g):.1e}")
print(f"certificate: ||grad_w f|| = {float(info.optimality_residual):.1e}, "
      f"linear-solve residual = {float(info.linear_solve.relative_residual):.1e}, ok = {info.ok}")

# %%
# The certificate matters when the inner solution is not exact. Below, five
# gradient steps from zero give a poor :math:`w`. ``bilevel`` still returns a
# hypergradient, but it warns, and the warning gives the residual. (Pass
# ``strict=True`` to get an error instead.)
step = 1.0 / float(torch.linalg.eigvalsh(X.T @ X + torch.diag(lam.exp()))[-1])
w_rough = torch.zeros(d, dtype=dtype)
for _ in range(5):
    w_rough = w_rough - step * torch.func.grad(inner, argnums=1)(lam, w_rough)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", bilevel.BilevelWarning)
    g_rough = bilevel.hypergrad(outer, inner, lam, w_rough)
print(f"relative error at the rough inner solution: {relative_error(g_rough):.1e}")
for warning in caught:
    print(f"{warning.category.__name__}: {warning.message}")

# %%
# 2. ``custom_root`` around any solver
# ------------------------------------
# Often the inner problem is solved by a routine that autograd cannot (or
# should not) differentiate: a hand-written loop, SciPy, a C library. Declare
# the routine's optimality condition and decorate it. Here the condition is
# stationarity of the objective, :math:`\nabla_w f(\lambda, w) = 0`. The solver
# runs without autograd. The gradients of its output with respect to its
# arguments come from the implicit function theorem.
#
# Optimality conditions take the **solution first**, then the arguments it
# depends on. Every tensor that the solution depends on must be an argument.


def objective(w, lam):  # solution first
    return inner(lam, w)


@bilevel.custom_root(stationarity(objective))
def fit(lam):
    """Plain gradient descent to a tight tolerance: no autograd inside."""
    H = X.T @ X + torch.diag(lam.exp())
    step = 1.0 / float(torch.linalg.eigvalsh(H)[-1])
    w = torch.zeros(d, dtype=dtype)
    for _ in range(10_000):
        gradient = H @ w - X.T @ t
        if gradient.norm() < 1e-12 * (X.T @ t).norm():
            break
        w = w - step * gradient
    return w


lam_param = lam.clone().requires_grad_()
loss = outer(lam_param, fit(lam_param))
loss.backward()
g_root = lam_param.grad
print(f"relative error through custom_root: {relative_error(g_root):.1e}")
print(f"its certificate: ok = {fit.last_info.ok}")

# %%
# The decorated solver also works with the ``torch.func`` transforms. For
# example, :func:`torch.func.jacrev` gives the Jacobian of the solution,
# :math:`\partial w^\star / \partial \lambda = -H^{-1} \operatorname{diag}(e^\lambda \odot w^\star)`.
jacobian = torch.func.jacrev(fit)(lam)
H = X.T @ X + torch.diag(lam.exp())
jacobian_exact = -torch.linalg.solve(H, torch.diag(lam.exp() * w_star))
print(f"Jacobian dw*/dlam: shape {tuple(jacobian.shape)}, relative error "
      f"{float((jacobian - jacobian_exact).norm() / jacobian_exact.norm()):.1e}")

# %%
# The library's own inner solvers (:mod:`bilevel.solvers`) are already wrapped
# this way: ``LBFGS()(objective, init, lam)`` returns a solution that autograd
# can differentiate with respect to ``lam``. Its error here is that of its
# default tolerance, a gradient norm of :math:`\sqrt{\varepsilon}` relative to the start.
from bilevel.solvers import LBFGS  # noqa: E402

lam_param = lam.clone().requires_grad_()
w_lbfgs = LBFGS()(objective, torch.zeros(d, dtype=dtype), lam_param)
(g_lbfgs,) = torch.autograd.grad(outer(lam_param, w_lbfgs), lam_param)
print(f"relative error through bilevel.solvers.LBFGS: {relative_error(g_lbfgs):.1e}")

# %%
# 3. A check against finite differences
# -------------------------------------
# This check needs no closed form. Compare the directional derivative
# :math:`\nabla\Phi(\lambda)^\top u` along a random direction :math:`u` with the
# central difference :math:`(\Phi(\lambda + \epsilon u) - \Phi(\lambda - \epsilon u)) / 2\epsilon`.
# In float64 the two agree to about :math:`\epsilon^2`, up to rounding.


def hyperobjective(lam):
    return float(outer(lam, fit(lam)))


u = torch.randn(d, dtype=dtype)
eps = 1e-5
finite_difference = (hyperobjective(lam + eps * u) - hyperobjective(lam - eps * u)) / (2 * eps)
implicit = float(g @ u)
print(f"directional derivative, implicit:           {implicit:.10f}")
print(f"directional derivative, finite differences: {finite_difference:.10f}")
print(f"relative difference: {abs(implicit - finite_difference) / abs(finite_difference):.1e}")

# %%
# Where next: :doc:`scipy_solver` wraps a SciPy solver the same way.
# :doc:`plot_cg_neumann_unrolled` compares the ways of solving the linear
# system. :doc:`plot_hyper_cleaning` runs a whole bilevel optimization with
# :func:`bilevel.solve`.
