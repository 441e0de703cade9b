"""Scenarios for tests/test_distributed.py, run on every rank of a gloo group.

Each scenario takes ``wrap`` (how to make an objective data-parallel) and
``take`` (which part of a batch this process sees).  The test runs them once in
its own process with ``wrap = identity`` and ``take = identity`` (one process on
the concatenated batches) and once here on 2 ranks with
``wrap = bilevel.distributed.data_parallel`` and ``take = bilevel.distributed.shard``.

Launched by the test as ``python -m torch.distributed.run --standalone
--nproc_per_node=2 tests/_distributed_worker.py OUT_DIR``; each rank saves its
results to ``OUT_DIR/rank{r}.pt``.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.nn.functional as F

import bilevel
from bilevel.implicit import CG, Neumann


def problem_data(d: int = 10, n: int = 32, seed: int = 0) -> dict:
    """A logistic regression with one L2 weight per feature (float64): training
    and validation rows, labels in {-1, +1}."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -1, d, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    out = {}
    for name in ("train", "val"):
        X = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
        out[name] = (X, torch.sign(X @ w + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)))
    return out


def inner(x, y, batch):
    """Mean logistic loss on the training rows + sum_j exp(x_j) y_j^2 / 2 (y: a dict of two leaves)."""
    X, t = batch["train"]
    w = torch.cat([y["head"], y["tail"]])
    return F.softplus(-t * (X @ w)).mean() + 0.5 * (x.exp() * w ** 2).sum()


def outer(x, y, batch):
    X, t = batch["val"]
    w = torch.cat([y["head"], y["tail"]])
    return F.softplus(-t * (X @ w)).mean()


def outer_sum(x, y, batch):
    """The validation loss summed (not averaged) over the rows: reduced with ``reduction="sum"``."""
    X, t = batch["val"]
    w = torch.cat([y["head"], y["tail"]])
    return F.softplus(-t * (X @ w)).sum()


def _split(w: torch.Tensor) -> dict:
    return {"head": w[:3].clone(), "tail": w[3:].clone()}


def _inner_solution(x, batch, d):
    """A precise inner solution on the *full* batch (Newton), the same on every rank."""
    w = torch.zeros(d, dtype=torch.float64)
    objective = lambda w_: inner(x, _split(w_), batch)  # noqa: E731
    for _ in range(30):
        g = torch.func.grad(objective)(w)
        H = torch.func.hessian(objective)(w)
        w = w - torch.linalg.solve(H, g)
    return _split(w)


def hypergradients(wrap, take) -> dict:
    """(i) bilevel.hypergrad with the default solve (dense, through vmap), CG,
    a Neumann series, and the differentiable (torch.func) path."""
    out = {}
    for d in (10, 150):  # 150 > DENSE_MAX_SIZE: CG runs on the operator itself
        full = problem_data(d=d)
        x = torch.linspace(-1.0, 0.5, d, dtype=torch.float64)
        y = _inner_solution(x, full, d)
        batch = take(full)
        f_in = wrap(lambda x_, y_, batch=batch: inner(x_, y_, batch))
        f_out = wrap(lambda x_, y_, batch=batch: outer(x_, y_, batch))
        out[f"default d={d}"] = bilevel.hypergrad(f_out, f_in, x, y)
        out[f"cg d={d}"] = bilevel.hypergrad(f_out, f_in, x, y, solve=CG(maxiter=40, tol=1e-13))
        out[f"neumann d={d}"] = bilevel.hypergrad(f_out, f_in, x, y, solve=Neumann(terms=15, alpha=0.8))
        if d == 10:
            total = wrap(lambda x_, y_, batch=batch: outer_sum(x_, y_, batch), reduction="sum")
            out["sum reduction d=10"] = bilevel.hypergrad(total, f_in, x, y)
            xg = x.clone().requires_grad_()
            g = bilevel.hypergrad(f_out, f_in, xg, y, create_graph=True)
            (second,) = torch.autograd.grad((g ** 2).sum(), xg)
            out["create_graph d=10"] = g.detach()
            out["d|g|^2/dx d=10"] = second
    return out


def _batches(take, steps: int = 4) -> list:
    full = problem_data(d=10, n=64, seed=1)
    rows = 16  # 4 mini-batches of 16 rows each (8 per rank on 2 ranks)
    batches = []
    for k in range(steps):
        piece = {name: (X[k * rows:(k + 1) * rows], t[k * rows:(k + 1) * rows]) for name, (X, t) in full.items()}
        batches.append(take(piece))
    return batches


METHODS = {
    "implicit": {"lr": 0.1},
    "unrolled": {"lr": 0.1},
    "one_step": {"lr": 0.1},
    "penalty": {"warmup": 20},
    "meha": {"warmup": 20},
    "bamm": {"warmup": 20},
    "bda": {"warmup": 20},
}


def solve_runs(wrap, take) -> dict:
    """(ii) bilevel.solve with the double-loop methods (implicit, unrolled, one_step)
    and (iii) the single-loop methods (penalty with its stochastic F2SA schedule,
    MEHA, sl-BAMM, BDA) on mini-batches."""
    x0 = torch.full((10,), -1.0, dtype=torch.float64)
    y0 = _split(torch.zeros(10, dtype=torch.float64))
    out = {}
    for method, options in METHODS.items():
        result = bilevel.solve(wrap(outer), wrap(inner), x0, y0, method=method, data=_batches(take), max_steps=4,
                               progress=False, **options)
        out[method] = {"x": result.x, "y": result.y, "outer": torch.tensor(result.history["outer"])}
    return out


def tuner_run(wrap, take) -> dict:
    """The HPO tuner (ImplicitHPO) on a small network: a few hyper-steps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)).double()
    g = torch.Generator().manual_seed(2)
    X = torch.randn(48, 4, generator=g, dtype=torch.float64)
    t = X.sum(-1, keepdim=True).sin()
    train = [take((X[k * 16:(k + 1) * 16], t[k * 16:(k + 1) * 16])) for k in range(2)]
    val = [take((X[32:], t[32:]))]

    def train_loss(m, batch, hp):
        return ((m(batch[0]) - batch[1]) ** 2).mean() + hp["decay"] * sum((p ** 2).sum() for p in m.parameters())

    def val_loss(m, batch):
        return ((m(batch[0]) - batch[1]) ** 2).mean()

    result = bilevel.hpo.implicit_hpo(model, wrap(train_loss), wrap(val_loss), train, val,
                                      {"decay": bilevel.hpo.Hyper(0.05, low=0.0)}, max_steps=3, inner_steps=2,
                                      progress=False)
    return {"decay": result.hparams["decay"], "weights": dict(result.model.state_dict()),
            "val_loss": torch.tensor(result.history["val_loss"])}


SCENARIOS = {"hypergrad": hypergradients, "solve": solve_runs, "tuner": tuner_run}


def main(out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    # a short collective timeout: ranks that fall out of lock-step fail fast instead of hanging
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        results = {name: run(bilevel.distributed.data_parallel, bilevel.distributed.shard)
                   for name, run in SCENARIOS.items()}
        results["replicated"] = bilevel.distributed.is_replicated(
            [t for t in torch.utils._pytree.tree_leaves(results) if torch.is_tensor(t)])
        results["world_size"] = dist.get_world_size()
        torch.save(results, os.path.join(out_dir, f"rank{dist.get_rank()}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
