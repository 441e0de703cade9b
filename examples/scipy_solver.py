"""
Making a SciPy solver differentiable
====================================

SciPy's Newton-CG knows nothing of autograd: it works on NumPy arrays. Here
torch computes the gradients and Hessian-vector products that SciPy asks for.
Declare the optimality condition of the problem SciPy solves (the gradient of
a smooth logistic-regression loss vanishes at the solution), and ``bilevel``
gives exact gradients of the solution with respect to the per-feature
regularization, by the implicit function theorem. Finite differences check
them.

Run it with ``python examples/scipy_solver.py`` (it needs SciPy and scikit-learn).
"""

# %%
# The problem
# -----------
# Logistic regression on scikit-learn's breast-cancer data (569 samples, 30
# standardized features, labels in {-1, +1}), with one L2 penalty
# :math:`e^{\lambda_j}` per feature:
#
# .. math::
#
#     w^\star(\lambda) = \arg\min_w \sum_i \log(1 + e^{-y_i x_i^\top w})
#     + \tfrac12 \sum_j e^{\lambda_j} w_j^2 .
#
# The objective takes the solution first, then what the solution depends on.
import numpy as np
import scipy.optimize
import torch
from sklearn.datasets import load_breast_cancer

import bilevel
from bilevel.implicit import stationarity
from bilevel.implicit.operators import hvp

X_np, y_np = load_breast_cancer(return_X_y=True)
X_np = (X_np - X_np.mean(0)) / X_np.std(0)
X, y = torch.as_tensor(X_np, dtype=torch.float64), torch.as_tensor(2.0 * y_np - 1.0, dtype=torch.float64)


def objective(w, log_lam):
    """Logistic loss + per-feature L2 penalty; the solution w*(log_lam) is its minimizer."""
    return torch.nn.functional.softplus(-y * (X @ w)).sum() + 0.5 * (log_lam.exp() * w**2).sum()


# %%
# The solver, made differentiable
# -------------------------------
# ``fit`` hands SciPy two NumPy callbacks, the objective with its gradient and
# the Hessian-vector product, and returns SciPy's answer as a tensor.
# Autograd cannot follow it through SciPy. The decorator supplies the
# gradient instead: at the returned :math:`w^\star`, it solves one linear
# system with the Hessian of ``objective`` (by conjugate gradient, using
# Hessian-vector products only).


@bilevel.custom_root(stationarity(objective))
def fit(log_lam):
    """Solve with SciPy (float64 NumPy round trip, gradient supplied from torch)."""

    def fun(w_np):
        w = torch.as_tensor(w_np).requires_grad_()
        with torch.enable_grad():
            value = objective(w, log_lam)
            (g,) = torch.autograd.grad(value, w)
        return value.item(), g.numpy()

    def hessp(w_np, p_np):
        return hvp(objective, torch.as_tensor(w_np), torch.as_tensor(p_np), log_lam).numpy()

    result = scipy.optimize.minimize(fun, np.zeros(X.shape[1]), jac=True, hessp=hessp,
                                     method="Newton-CG", options={"xtol": 1e-14})
    return torch.as_tensor(result.x)


# %%
# Gradients of the solution
# -------------------------
# Any function of the solution can now be differentiated with respect to the
# regularization. Here we take the squared norm of the weights. We compare its
# derivative along a random direction with a central finite difference of
# two more SciPy solves. SciPy stops at a gradient norm near ``1e-8``, so the
# difference step is not tiny (``1e-3``: rounding of the two solves and the
# step's own truncation error both stay near ``1e-7`` relative).
log_lam = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
w = fit(log_lam)
margin = (w**2).sum()  # any function of the solution
(g,) = torch.autograd.grad(margin, log_lam)

direction = torch.randn(X.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
eps = 1e-3
with torch.no_grad():
    fd = ((fit(log_lam + eps * direction) ** 2).sum() - (fit(log_lam - eps * direction) ** 2).sum()) / (2 * eps)
implicit_derivative, fd_derivative = float(g @ direction), float(fd)
print(f"directional derivative, implicit:           {implicit_derivative:.8f}")
print(f"directional derivative, finite differences: {fd_derivative:.8f}")

# %%
# The certificate
# ---------------
# ``fit.last_info`` describes the last backward pass. It gives the gradient
# norm at SciPy's solution, where the implicit function theorem was applied,
# and the residual of the linear solve. If either one exceeded its tolerance,
# a warning would have said so.
print(f"certificate: inner residual {float(fit.last_info.optimality_residual):.1e}, "
      f"linear-solve residual {float(fit.last_info.linear_solve.residual_norm):.1e}, "
      f"ok = {fit.last_info.ok}")
