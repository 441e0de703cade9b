"""Differentiate through a SciPy solver with ``custom_root``.

SciPy's Newton-CG knows nothing of autograd: it works on NumPy arrays (here it
gets gradients and Hessian-vector products computed by torch). Declaring
the optimality condition of its problem (the gradient of a smooth logistic
regression loss vanishes) is enough for ``bilevel`` to give exact gradients of
the solution with respect to the per-feature regularization, by the implicit
function theorem. We check them against finite differences.

Run: ``python examples/scipy_solver.py`` (needs scipy and scikit-learn).
"""

import numpy as np
import scipy.optimize
import torch
from sklearn.datasets import load_breast_cancer

import bilevel
from bilevel.implicit import stationarity
from bilevel.implicit.operators import hvp

torch.set_default_dtype(torch.float64)
X_np, y_np = load_breast_cancer(return_X_y=True)
X_np = (X_np - X_np.mean(0)) / X_np.std(0)
X, y = torch.as_tensor(X_np), torch.as_tensor(2.0 * y_np - 1.0)


def objective(w, log_lam):
    """Logistic loss + per-feature L2 penalty; the solution w*(log_lam) is its minimizer."""
    return torch.nn.functional.softplus(-y * (X @ w)).sum() + 0.5 * (log_lam.exp() * w**2).sum()


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


def main():
    log_lam = torch.zeros(X.shape[1], requires_grad=True)
    w = fit(log_lam)
    margin = (w**2).sum()  # any function of the solution
    (g,) = torch.autograd.grad(margin, log_lam)
    direction = torch.randn(X.shape[1], generator=torch.Generator().manual_seed(0))
    eps = 1e-5
    with torch.no_grad():
        fd = ((fit(log_lam + eps * direction) ** 2).sum() - (fit(log_lam - eps * direction) ** 2).sum()) / (2 * eps)
    print(f"directional derivative, implicit: {float(g @ direction):.8f}")
    print(f"directional derivative, finite differences: {float(fd):.8f}")
    print(f"certificate: inner residual {float(fit.last_info.optimality_residual):.1e}, "
          f"linear-solve residual {float(fit.last_info.linear_solve.residual_norm):.1e}")
    return float(g @ direction), float(fd)


if __name__ == "__main__":
    main()
