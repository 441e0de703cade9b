"""HypernetworkHPO on ridge regression, where the best response w*(lambda) is known in closed form."""

import math

import pytest
import torch
from torch import nn

from bilevel.hpo import GatedBestResponse, Hyper, HypernetworkHPO, LinearBestResponse


class Ridge:
    """0.5/n ||X w - t||^2 + 0.5 lam ||w||^2 on training rows, 0.5/n ||X_val w - t_val||^2 on validation."""

    def __init__(self, n=40, d=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.X, self.Xv = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
        w = torch.randn(d, generator=g)
        self.t = self.X @ w + 1.5 * torch.randn(n, generator=g)
        self.tv = self.Xv @ w + 1.5 * torch.randn(n, generator=g)

    def solution(self, lam):
        n, d = self.X.shape
        return torch.linalg.solve(self.X.T @ self.X / n + lam * torch.eye(d), self.X.T @ self.t / n)

    def val(self, w):
        return 0.5 * ((self.Xv @ w - self.tv) ** 2).mean()

    @staticmethod
    def train_loss(m, batch, hp):
        x, t = batch
        return 0.5 * ((m(x).squeeze(-1) - t) ** 2).mean() + 0.5 * hp["decay"] * (m.weight ** 2).sum()

    @staticmethod
    def val_loss(m, batch):
        x, t = batch
        return 0.5 * ((m(x).squeeze(-1) - t) ** 2).mean()

    def tuner(self, **options):
        model = nn.Linear(self.X.shape[1], 1, bias=False)
        options = {"weight_lr": 0.02, "progress": False, **options}
        return HypernetworkHPO(model, self.train_loss, self.val_loss, [(self.X, self.t)], [(self.Xv, self.tv)],
                               {"decay": Hyper(1.0, low=0.0)}, **options)


@pytest.mark.parametrize("kind", ["linear", "gated"])
def test_best_response_matches_the_closed_form_near_the_current_value(kind):
    problem = Ridge()
    tuner = problem.tuner(best_response=kind, sigma=0.3, warmup_steps=1000)
    tuner.run(0)  # weight phase only: lambda stays at 1
    assert tuner.hparams["decay"] == pytest.approx(1.0)
    for lam in (math.exp(-0.3), 1.0, math.exp(0.3)):
        w = tuner.best_response_at({"decay": lam})["weight"].reshape(-1)
        exact = problem.solution(torch.tensor(lam))
        assert float((w - exact).norm() / exact.norm()) < 0.02, lam  # measured 0.3-0.9%
        assert problem.val(w) == pytest.approx(float(problem.val(exact)), rel=0.02)


def test_joint_loop_finds_the_best_regularization():
    problem = Ridge()
    grid = torch.logspace(-3, 1, 400)
    values = torch.stack([problem.val(problem.solution(lam)) for lam in grid])
    best = float(grid[values.argmin()])
    assert 1e-2 < best < 5  # an interior optimum, far from the start 1.0 on a log scale
    tuner = problem.tuner(sigma=0.3, hyper_lr=0.03, weight_steps=10, warmup_steps=500)
    result = tuner.run(200)
    lam = float(result.hparams["decay"])
    assert abs(math.log(lam) - math.log(best)) < 0.25, (lam, best)
    w = result.model.weight.detach().reshape(-1)
    assert float(problem.val(w)) == pytest.approx(float(values.min()), rel=0.02)


def test_learned_sigma_moves_and_stays_positive():
    tuner = Ridge().tuner(sigma=0.3, learn_sigma=True, entropy_weight=1e-2, hyper_lr=0.05)
    result = tuner.run(30)
    assert result.history["sigma"][-1] != pytest.approx(0.3)
    assert all(s > 0 for s in result.history["sigma"])


def test_best_response_modules_have_the_advertised_size():
    weights = {"a": torch.zeros(4, 3), "b": torch.zeros(4)}
    center = torch.zeros(2)
    linear = sum(p.numel() for p in LinearBestResponse(weights, center).parameters())
    gated = sum(p.numel() for p in GatedBestResponse(weights, center).parameters())
    assert linear == 16 * 3  # w0 and one slope per hyper-parameter
    assert gated == 16 * 2 + 2 * 4 * 2  # w0, w1 and one gate per row and hyper-parameter
