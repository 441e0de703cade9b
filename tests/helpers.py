"""Problems with known answers shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch


@dataclass
class Ridge:
    """inner 0.5||X w - t||^2 + 0.5 sum exp(lam) w^2, outer 0.5||Xv w - tv||^2."""

    X: torch.Tensor
    t: torch.Tensor
    Xv: torch.Tensor
    tv: torch.Tensor

    @classmethod
    def make(cls, n=30, d=4, seed=0, dtype=torch.float64):
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(n, d, generator=g, dtype=dtype)
        w = torch.randn(d, generator=g, dtype=dtype)
        Xv = torch.randn(n, d, generator=g, dtype=dtype)
        noise = 0.5 * torch.randn(2, n, generator=g, dtype=dtype)
        return cls(X, X @ w + noise[0], Xv, Xv @ w + noise[1])

    def inner_objective(self, w, lam):  # solution first, for custom_root
        return 0.5 * ((self.X @ w - self.t) ** 2).sum() + 0.5 * (lam.exp() * w**2).sum()

    def inner(self, lam, w):  # upper variable first, for bilevel
        return self.inner_objective(w, lam)

    def outer(self, lam, w):
        return 0.5 * ((self.Xv @ w - self.tv) ** 2).sum()

    def hessian(self, lam):
        return self.X.T @ self.X + torch.diag(lam.exp())

    def solution(self, lam):
        """Closed-form inner solution, differentiable in lam by ordinary autograd."""
        return torch.linalg.solve(self.hessian(lam), self.X.T @ self.t)

    def jacobian(self, lam):
        """d w* / d lam = -H^{-1} diag(exp(lam) * w*)."""
        w = self.solution(lam)
        return -torch.linalg.solve(self.hessian(lam), torch.diag(lam.exp() * w))

    def hypergradient(self, lam):
        w = self.solution(lam)
        return self.jacobian(lam).T @ (self.Xv.T @ (self.Xv @ w - self.tv))


@dataclass
class Quadratic:
    """Problem Q of ALGORITHMS.md: f = 0.5 y'Ay - y'Bx, F = 0.5||y - y_t||^2 + rho/2 ||x||^2."""

    A: torch.Tensor
    B: torch.Tensor
    y_target: torch.Tensor
    rho: float = 0.1

    @classmethod
    def make(cls, d=5, m=3, seed=0, dtype=torch.float64):
        g = torch.Generator().manual_seed(seed)
        M = torch.randn(d, d, generator=g, dtype=dtype)
        return cls(M @ M.T / 5 + torch.eye(d, dtype=dtype), torch.randn(d, m, generator=g, dtype=dtype),
                   torch.randn(d, generator=g, dtype=dtype))

    def inner(self, x, y):
        return 0.5 * y @ self.A @ y - y @ self.B @ x

    def outer(self, x, y):
        return 0.5 * ((y - self.y_target) ** 2).sum() + 0.5 * self.rho * (x**2).sum()

    def solution(self, x):
        return torch.linalg.solve(self.A, self.B @ x)

    def hypergradient(self, x):
        return self.B.T @ torch.linalg.solve(self.A, self.solution(x) - self.y_target) + self.rho * x

    def optimum(self):
        Ainv_B = torch.linalg.solve(self.A, self.B)
        lhs = Ainv_B.T @ Ainv_B + self.rho * torch.eye(self.B.shape[1], dtype=self.A.dtype)
        return torch.linalg.solve(lhs, Ainv_B.T @ self.y_target)


def seeded_randn(*shape, seed=0, scale=1.0, dtype=torch.float64):
    """``scale * N(0, 1)`` of ``shape`` from its own seeded generator (float64)."""
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, generator=g, dtype=dtype)


def run_benchmark(script: str, *args: str, timeout: float = 180) -> str:
    """Run ``benchmarks/<script>`` with ``args`` in a subprocess on one thread; its stdout
    (the run must succeed: its stderr is shown otherwise)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", script)
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="passive")
    out = subprocess.run([sys.executable, path, *args], capture_output=True, text=True, timeout=timeout,
                         env=env, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout
