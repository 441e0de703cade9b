"""No autograd graph or tensor survives a step: memory stays flat over many steps."""

import gc

import torch

import bilevel
from bilevel.implicit import stationarity
from helpers import Ridge


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if torch.is_tensor(o))


def test_repeated_implicit_steps_do_not_accumulate_tensors():
    problem = Ridge.make(n=50, d=8)
    solve = bilevel.custom_root(stationarity(problem.inner_objective))(problem.solution)
    lam = torch.zeros(8, requires_grad=True)
    optimizer = torch.optim.SGD([lam], lr=1e-3)

    def step():
        optimizer.zero_grad()
        problem.outer(lam, solve(lam)).backward()
        optimizer.step()
        with torch.no_grad():
            lam_ = lam.detach()
            bilevel.hypergrad(problem.outer, problem.inner, lam_, problem.solution(lam_))

    for _ in range(5):  # warm-up: caches, optimizer state
        step()
    before = _live_tensors()
    for _ in range(200):
        step()
    assert _live_tensors() - before <= 2
