"""Benchmark problems of ``shared/TARGETS.md``, rebuilt exactly from ``numpy.random.default_rng(0)``.

Each builder returns a :class:`HypergradProblem`: the data as float64 torch
tensors, the hyper-parameters ``lam`` (one L2 weight per feature), the exact
inner solution ``w``, plain torch objectives ``outer(lam, w)`` and
``inner(lam, w)`` (upper variable first, as in ``bilevel``), the explicit
Hessian of the inner problem, and the exact hypergradient from a dense solve.

The problems (``n`` training rows plus ``n_val`` validation rows, ``d`` features):

* ridge: inner ``1/2 ||X w - y||^2 + 1/2 sum_j exp(lam_j) w_j^2``, outer
  ``1/2 ||X_val w - y_val||^2``; ``X = Z * s`` with ``Z ~ N(0, 1)`` of shape
  ``(n + n_val, d)``, column scales ``s = logspace(0, -1, d)``, ``w_true ~ N(0, 1)``,
  ``y = X w_true + 0.5 N(0, 1)``, ``lam ~ N(0, 0.5^2)``.
* logistic: inner ``sum_i softplus(-y_i x_i^T w) + 1/2 sum_j exp(lam_j) w_j^2``,
  outer the same loss on validation rows; columns scaled as above,
  ``w_true ~ N(0, 9/d)``, ``y = sign(X w_true + logistic noise)``,
  ``lam ~ N(0, 0.5^2)``.

Random draws are taken in the order ``Z, w_true, noise, lam``; the first ``n``
rows are the training set, the last ``n_val`` the validation set.

Only numpy and torch are needed; the peers' benchmarks convert the same arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

DTYPE = torch.float64


@dataclass
class HypergradProblem:
    """One hypergradient problem with its exact answer (all tensors float64).

    Attributes:
        name: label used in tables, e.g. ``"ridge d=1000"``.
        kind: ``"ridge"`` or ``"logistic"``.
        X, y: training data, shapes ``(n, d)`` and ``(n,)``.
        X_val, y_val: validation data.
        lam: hyper-parameters, shape ``(d,)`` (log L2 weights).
        w: the exact inner solution at ``lam``, shape ``(d,)``.
        curvature: per-row weights of the Gauss-Newton form of the inner
            Hessian, ``H = X^T diag(curvature) X + diag(exp(lam))`` (ones for
            ridge, ``sigma(m)(1 - sigma(m))`` at the solution for logistic).
        hessian: explicit inner Hessian at ``(lam, w)``, ``(d, d)``.
        exact: exact hypergradient ``dF/dlam`` (dense solve), ``(d,)``.
        numpy: the same data as numpy arrays (for the JAX peer).
    """

    name: str
    kind: str
    X: torch.Tensor
    y: torch.Tensor
    X_val: torch.Tensor
    y_val: torch.Tensor
    lam: torch.Tensor
    w: torch.Tensor
    curvature: torch.Tensor = field(repr=False)
    hessian: torch.Tensor = field(repr=False)
    exact: torch.Tensor = field(repr=False)
    numpy: dict = field(repr=False, default_factory=dict)

    @property
    def d(self) -> int:
        return self.X.shape[1]

    @property
    def n(self) -> int:
        return self.X.shape[0]

    # ----- plain torch objectives, upper variable first -------------------
    @property
    def outer(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return ridge_outer(self.X_val, self.y_val) if self.kind == "ridge" else logistic_outer(self.X_val, self.y_val)

    @property
    def inner(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return ridge_inner(self.X, self.y) if self.kind == "ridge" else logistic_inner(self.X, self.y)

    def condition_number(self) -> float:
        """Condition number of the inner Hessian at the solution."""
        eig = torch.linalg.eigvalsh(self.hessian)
        return float(eig[-1] / eig[0])

    def relative_error(self, g: torch.Tensor) -> float:
        """``||g - exact|| / ||exact||``."""
        g = torch.as_tensor(np.asarray(g) if not torch.is_tensor(g) else g, dtype=DTYPE)
        return float(torch.linalg.vector_norm(g - self.exact) / torch.linalg.vector_norm(self.exact))


# ----- objectives (factories, so that the data are closed over once) -------
def ridge_inner(X: torch.Tensor, y: torch.Tensor):
    def inner(lam: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        r = X @ w - y
        return 0.5 * (r * r).sum() + 0.5 * (lam.exp() * w * w).sum()

    return inner


def ridge_outer(X_val: torch.Tensor, y_val: torch.Tensor):
    def outer(lam: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        r = X_val @ w - y_val
        return 0.5 * (r * r).sum()

    return outer


def logistic_inner(X: torch.Tensor, y: torch.Tensor):
    def inner(lam: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.softplus(-y * (X @ w)).sum() + 0.5 * (lam.exp() * w * w).sum()

    return inner


def logistic_outer(X_val: torch.Tensor, y_val: torch.Tensor):
    def outer(lam: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.softplus(-y_val * (X_val @ w)).sum()

    return outer


# ----- data ---------------------------------------------------------------
def _scaled_design(rng: np.random.Generator, rows: int, d: int) -> np.ndarray:
    Z = rng.standard_normal((rows, d))
    return Z * np.logspace(0, -1, d)


def _tensors(*arrays: np.ndarray) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(a)).to(DTYPE) for a in arrays]


def _exact_hypergrad(H: torch.Tensor, lam: torch.Tensor, w: torch.Tensor, grad_outer_w: torch.Tensor) -> torch.Tensor:
    """``dF/dlam = - diag(exp(lam) w) H^{-1} grad_w F`` (the outer loss has no direct lam term)."""
    v = torch.linalg.solve(H, grad_outer_w)
    return -lam.exp() * w * v


def ridge(d: int, n: int = 2000, n_val: int = 1000, seed: int = 0) -> HypergradProblem:
    """Ridge regression with one L2 weight per feature; inner solution in closed form."""
    rng = np.random.default_rng(seed)
    Xall = _scaled_design(rng, n + n_val, d)
    w_true = rng.standard_normal(d)
    yall = Xall @ w_true + 0.5 * rng.standard_normal(n + n_val)
    lam = 0.5 * rng.standard_normal(d)
    X, y, X_val, y_val, lam_t = _tensors(Xall[:n], yall[:n], Xall[n:], yall[n:], lam)
    H = X.T @ X + torch.diag(lam_t.exp())
    w = torch.linalg.solve(H, X.T @ y)
    g_outer = X_val.T @ (X_val @ w - y_val)
    return HypergradProblem(
        name=f"ridge d={d}", kind="ridge", X=X, y=y, X_val=X_val, y_val=y_val, lam=lam_t, w=w,
        curvature=torch.ones(n, dtype=DTYPE), hessian=H, exact=_exact_hypergrad(H, lam_t, w, g_outer),
        numpy=dict(X=Xall[:n], y=yall[:n], X_val=Xall[n:], y_val=yall[n:], lam=lam),
    )


def _logistic_newton(X: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, tol: float = 1e-13, maxiter: int = 50):
    """Tight Newton solve of the regularized logistic regression (dense Hessian)."""
    reg = lam.exp()
    w = torch.zeros(X.shape[1], dtype=X.dtype)
    for _ in range(maxiter):
        m = y * (X @ w)
        grad = -X.T @ (y * torch.sigmoid(-m)) + reg * w
        s = torch.sigmoid(m) * torch.sigmoid(-m)
        H = X.T @ (s[:, None] * X) + torch.diag(reg)
        w = w - torch.linalg.solve(H, grad)
        if float(torch.linalg.vector_norm(grad)) <= tol * max(1.0, float(torch.linalg.vector_norm(X.T @ y))):
            break
    m = y * (X @ w)
    grad = -X.T @ (y * torch.sigmoid(-m)) + reg * w
    gnorm = float(torch.linalg.vector_norm(grad))
    if gnorm > 1e-9:
        raise RuntimeError(f"logistic Newton solve did not converge: |grad| = {gnorm:.3g}")
    return w


def logistic(d: int = 500, n: int = 5000, n_val: int = 2500, seed: int = 0) -> HypergradProblem:
    """L2-regularized logistic regression, one weight per feature; inner solution by Newton."""
    rng = np.random.default_rng(seed)
    Xall = _scaled_design(rng, n + n_val, d)
    w_true = rng.normal(0.0, 3.0 / np.sqrt(d), d)
    yall = np.sign(Xall @ w_true + rng.logistic(size=n + n_val))
    yall[yall == 0] = 1.0
    lam = 0.5 * rng.standard_normal(d)
    X, y, X_val, y_val, lam_t = _tensors(Xall[:n], yall[:n], Xall[n:], yall[n:], lam)
    w = _logistic_newton(X, y, lam_t)
    m = y * (X @ w)
    s = torch.sigmoid(m) * torch.sigmoid(-m)
    H = X.T @ (s[:, None] * X) + torch.diag(lam_t.exp())
    g_outer = -X_val.T @ (y_val * torch.sigmoid(-y_val * (X_val @ w)))
    return HypergradProblem(
        name=f"logistic d={d}", kind="logistic", X=X, y=y, X_val=X_val, y_val=y_val, lam=lam_t, w=w,
        curvature=s, hessian=H, exact=_exact_hypergrad(H, lam_t, w, g_outer),
        numpy=dict(X=Xall[:n], y=yall[:n], X_val=Xall[n:], y_val=yall[n:], lam=lam),
    )


# ----- many small independent problems (batched benchmarks) ---------------
@dataclass
class RidgeBatch:
    """``B`` independent ridge problems stacked on a leading dimension.

    Shapes: ``X (B, n, d)``, ``y (B, n)``, ``X_val (B, n_val, d)``,
    ``y_val (B, n_val)``, ``lam (B, d)``, ``w (B, d)`` (exact inner solutions),
    ``exact (B, d)`` (exact hypergradients).
    """

    X: torch.Tensor
    y: torch.Tensor
    X_val: torch.Tensor
    y_val: torch.Tensor
    lam: torch.Tensor
    w: torch.Tensor
    exact: torch.Tensor

    @property
    def size(self) -> int:
        return self.X.shape[0]


def ridge_batch(batch: int = 64, d: int = 20, n: int = 100, n_val: int = 50, seed: int = 0) -> RidgeBatch:
    """``batch`` ridge problems built as :func:`ridge`, each with its own data (one generator, drawn in turn)."""
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(batch):
        Xall = _scaled_design(rng, n + n_val, d)
        w_true = rng.standard_normal(d)
        yall = Xall @ w_true + 0.5 * rng.standard_normal(n + n_val)
        lam = 0.5 * rng.standard_normal(d)
        parts.append((Xall[:n], yall[:n], Xall[n:], yall[n:], lam))
    X, y, X_val, y_val, lam = _tensors(*(np.stack(p) for p in zip(*parts)))
    H = X.transpose(1, 2) @ X + torch.diag_embed(lam.exp())
    w = torch.linalg.solve(H, (X.transpose(1, 2) @ y[..., None]))[..., 0]
    g_outer = (X_val.transpose(1, 2) @ (X_val @ w[..., None] - y_val[..., None]))[..., 0]
    v = torch.linalg.solve(H, g_outer[..., None])[..., 0]
    return RidgeBatch(X=X, y=y, X_val=X_val, y_val=y_val, lam=lam, w=w, exact=-lam.exp() * w * v)


__all__ = [
    "DTYPE", "HypergradProblem", "RidgeBatch", "ridge", "logistic", "ridge_batch",
    "ridge_inner", "ridge_outer", "logistic_inner", "logistic_outer",
]
