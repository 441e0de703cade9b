"""Cost of hyper-parameter optimization with ``bilevel.hpo``, measured side by side.

Three markdown tables, MLPs on scikit-learn's digits (no download), float32
except the accuracy table (float64):

1. time of one hyper-step relative to one training step (implicit HPO with a
   Neumann series of K terms or CG, per-weight weight decay; hypernetwork HPO's
   weight and hyper phases), in interleaved rounds (median);
2. peak tensor memory of one hyper-step as the number of hyper-parameters
   grows (one global decay, one per layer, one per weight, one per weight and
   one per training example), relative to one training step;
3. relative error of the Neumann hypergradient against the exact one (dense
   Hessian solve) on a small network at a training minimum, per number of
   terms, with CG for comparison.

Usage::

    python benchmarks/hpo.py            # about a minute on 2 quiet cores
    python benchmarks/hpo.py --quick    # smoke test
    python benchmarks/hpo.py --hidden 512 --rounds 30

See ``benchmarks/README.md`` for what each column means.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.func import grad, hessian, jacrev

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import busy as _busy
from _machine import load_average as _load
from solve import _tensor_peak

from bilevel._tree import tree_flatten, tree_leaves, tree_unflatten
from bilevel.hpo import Hyper, HypernetworkHPO, ImplicitHPO, l2_penalty
from bilevel.implicit import CG, Neumann
from bilevel.status import BilevelWarning


def digits(dtype, n_train):
    X, y = load_digits(return_X_y=True)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    X, y = torch.tensor(X, dtype=dtype)[order], torch.tensor(y)[order]
    X = (X - X[:n_train].mean(0)) / X[:n_train].std(0).clamp_min(1e-3)
    return (X[:n_train], y[:n_train], torch.arange(n_train)), (X[n_train:], y[n_train:])


def mlp(hidden, dtype, layers=2, activation=nn.ReLU):
    torch.manual_seed(0)
    sizes = [64] + [hidden] * layers
    modules = []
    for a, b in zip(sizes, sizes[1:]):
        modules += [nn.Linear(a, b), activation()]
    return nn.Sequential(*modules, nn.Linear(sizes[-1], 10)).to(dtype)


def train_loss(model, batch, hp):
    x, labels, index = batch
    per_example = F.cross_entropy(model(x), labels, reduction="none")
    weights = hp["weights"][index] if "weights" in hp else 1.0
    decay = hp["decay"]
    if torch.is_tensor(decay) and decay.dim() == 1:  # one decay per parameter tensor
        decay = dict(zip([name for name, _ in model.named_parameters()], decay))
    return (weights * per_example).mean() + l2_penalty(model, decay)


def val_loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def batches(train, size):
    X, y, idx = train
    return [(X[i:i + size], y[i:i + size], idx[i:i + size]) for i in range(0, len(y), size)]


def specs(model):
    """The hyper-parameter specs of table 2, by label."""
    n_tensors = len(list(model.parameters()))
    per_weight = {"decay": Hyper(1e-4, low=0.0, per_weight=True)}
    return {
        "1 global decay": {"decay": Hyper(1e-4, low=0.0)},
        f"{n_tensors} decays (one per tensor)": {"decay": Hyper(1e-4, low=0.0, shape=(n_tensors,))},
        "one decay per weight": per_weight,
        "per weight + per example": {**per_weight, "weights": Hyper(0.5, low=0.0, high=1.0, shape=(1000,))},
    }


def timed(fns: dict, rounds: int) -> dict:
    """Median seconds of each callable over interleaved rounds (after one warm-up call each)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            tick = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - tick)
    return {k: statistics.median(v) for k, v in times.items()}


def cost_table(args):
    train, val = digits(torch.float32, 1000)
    model = mlp(args.hidden, torch.float32)
    n_weights = sum(p.numel() for p in model.parameters())
    loader, val_batch = batches(train, 64), [(val[0][:64], val[1][:64])]
    spec = {"decay": Hyper(1e-4, low=0.0, per_weight=True)}
    implicit = ImplicitHPO(model, train_loss, val_loss, loader, val_batch, spec, progress=False)
    plain = mlp(args.hidden, torch.float32)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    decays = [torch.full_like(p, 1e-4) for p in plain.parameters()]

    def plain_step():  # the floor: an ordinary PyTorch training step with the same fixed per-weight decays
        x, labels, _ = loader[0]
        plain_opt.zero_grad()
        penalty = sum((d * p ** 2).sum() for d, p in zip(decays, plain.parameters()))
        (F.cross_entropy(plain(x), labels) + 0.5 * penalty).backward()
        plain_opt.step()

    iterations = {}

    def hyper_step(solve):
        def step():
            g, info = implicit.hypergradient(loader[1], val_batch[0], solve=solve)
            iterations[type(solve).__name__] = int(info.linear_solve.iterations)
            for leaf, value in zip(tree_leaves(implicit.raw), tree_leaves(g)):
                leaf.grad = value
            implicit.hyper_optimizer.step()
        return step

    n_tensors = len(list(model.parameters()))
    linear = HypernetworkHPO(model, train_loss, val_loss, loader, val_batch, {"decay": Hyper(1e-4, low=0.0)},
                             progress=False)
    gated = HypernetworkHPO(model, train_loss, val_loss, loader, val_batch,
                            {"decay": Hyper(1e-4, low=0.0, shape=(n_tensors,))}, best_response="gated",
                            progress=False)
    fns = {"plain PyTorch training step (floor)": plain_step, "ImplicitHPO training step": implicit._train_step}
    for k in args.terms:
        fns[f"ImplicitHPO hyper-step, Neumann K={k}"] = hyper_step(Neumann(terms=k, alpha=0.1))
    fns["ImplicitHPO hyper-step, CG maxiter=20"] = hyper_step(CG(maxiter=20, tol=1e-30))
    fns["HypernetworkHPO weight step, linear best response, 1 hyper-parameter"] = linear._train_step
    fns["HypernetworkHPO hyper phase, linear, 1 hyper-parameter"] = lambda: _hyper_phase(linear)
    fns[f"HypernetworkHPO weight step, gated (STN) best response, {n_tensors} hyper-parameters"] = gated._train_step
    fns[f"HypernetworkHPO hyper phase, gated, {n_tensors} hyper-parameters"] = lambda: _hyper_phase(gated)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BilevelWarning)  # CG with tol=1e-30 never "converges"
        times = timed(fns, args.rounds)
    floor = times["ImplicitHPO training step"]
    print(f"\n### 1. Time of one step, MLP 64-{args.hidden}-{args.hidden}-10 ({n_weights} weights, one decay per "
          f"weight), training and validation batches of 64, median of {args.rounds} interleaved rounds\n")
    print("| step | ms | / ImplicitHPO training step | overhead per training step at T = 10 |")
    print("|---|---|---|---|")
    for key, seconds in times.items():
        overhead = f"{seconds / (10 * floor):.2f}" if "hyper-step" in key else ""
        print(f"| {key} | {1e3 * seconds:.2f} | {seconds / floor:.2f} | {overhead} |")
    print(f"\nCG ran {iterations['CG']} iterations of its 20 in the last round (it stops at non-positive "
          "curvature: away from a minimum the Hessian of a network is indefinite; the Neumann series runs all its "
          "terms regardless).")
    return times


def _hyper_phase(tuner):
    """The hyper phase alone: ``_hyper_step`` less its weight steps."""
    step, tuner._train_step = tuner._train_step, lambda: 0.0
    try:
        tuner._hyper_step()
    finally:
        del tuner._train_step
    return step


def memory_table(args):
    train, val = digits(torch.float32, 1000)
    loader, val_batch = batches(train, 64), [(val[0][:64], val[1][:64])]
    rows = []
    for label, spec in specs(mlp(args.hidden, torch.float32)).items():
        tuner = ImplicitHPO(mlp(args.hidden, torch.float32), train_loss, val_loss, loader, val_batch, spec,
                            solve=Neumann(terms=10, alpha=0.1), progress=False)
        n_hyper = tuner.spec.numel()
        step = lambda: tuner.hypergradient(loader[1], val_batch[0])
        step()
        train_peak = _tensor_peak(tuner._train_step)
        hyper_peak = _tensor_peak(step)
        rows.append((label, n_hyper, train_peak, hyper_peak))
    n_weights = sum(p.numel() for p in mlp(args.hidden, torch.float32).parameters())
    print(f"\n### 2. Peak tensor memory of one step vs number of hyper-parameters ({n_weights} weights, "
          "1000 training examples, Neumann K = 10)\n")
    print("| hyper-parameters | count | training step MiB | hyper-step MiB | hyper / training | "
          "hyper-parameters + Adam state MiB |")
    print("|---|---|---|---|---|---|")
    for label, n, t, h in rows:
        state = 3 * n * 4 / 2**20  # raw values and Adam's two moments, float32
        print(f"| {label} | {n} | {t:.2f} | {h:.2f} | {h / t:.2f} | {state:.2f} |")


def accuracy_table(args):
    train, val = digits(torch.float64, 300)
    model = mlp(args.small_hidden, torch.float64, layers=1, activation=nn.Tanh)  # smooth: a true minimum
    spec = {"decay": Hyper(args.decay, low=0.0, per_weight=True)}
    tuner = ImplicitHPO(model, train_loss, val_loss, [train], [val], spec, progress=False)
    params = list(tuner.params.values())
    opt = torch.optim.LBFGS(params, max_iter=1000, tolerance_grad=1e-12, tolerance_change=0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = tuner.losses.train(tuner.params, train, tuner._hparams())
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    H, b, C = _dense(tuner, train, val)
    eigenvalues = torch.linalg.eigvalsh(H)
    exact = -C.T @ torch.linalg.solve(H, b)
    alpha = float(1 / eigenvalues[-1])
    n = H.shape[0]
    print(f"\n### 3. Neumann vs exact hypergradient, tanh MLP 64-{args.small_hidden}-10 ({n} weights, one decay per "
          f"weight, float64, 300 training rows) at a training minimum (gradient norm {_grad_norm(tuner, train):.1e}); "
          f"Hessian eigenvalues in [{float(eigenvalues[0]):.2e}, {float(eigenvalues[-1]):.2e}], "
          f"alpha = 1/L = {alpha:.3g}, decay {args.decay} on every weight\n")
    print("| terms / iterations | Neumann relative error | CG relative error |")
    print("|---|---|---|")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BilevelWarning)
        for k in args.accuracy_terms:
            g_n, _ = tuner.hypergradient(train, val, solve=Neumann(terms=k, alpha=alpha))
            g_c, _ = tuner.hypergradient(train, val, solve=CG(maxiter=k, tol=1e-30))
            err = [float((_flat(g) - exact).norm() / exact.norm()) for g in (g_n, g_c)]
            print(f"| {k} | {err[0]:.2e} | {err[1]:.2e} |")


def _grad_norm(tuner, train):
    with torch.enable_grad():
        loss = tuner.losses.train(tuner.params, train, tuner._hparams())
        grads = torch.autograd.grad(loss, list(tuner.params.values()))
    return float(torch.sqrt(sum((g ** 2).sum() for g in grads)))


def _flat(tree):
    return torch.cat([t.reshape(-1) for t in tree_leaves(tree)])


def _dense(tuner, train, val):
    weights = {k: p.detach() for k, p in tuner.params.items()}
    raw = {k: {n: t.detach() for n, t in v.items()} for k, v in tuner.raw.items()}
    (w_leaves, w_spec), (r_leaves, r_spec) = tree_flatten(weights), tree_flatten(raw)

    def unflat(v, leaves, spec):
        parts = torch.split(v, [t.numel() for t in leaves])
        return tree_unflatten([p.reshape(t.shape) for p, t in zip(parts, leaves)], spec)

    def loss(r, w):
        return tuner.losses.train(unflat(w, w_leaves, w_spec), train, tuner.spec.constrain(unflat(r, r_leaves, r_spec)))

    w0, r0 = _flat(weights), _flat(raw)
    H = hessian(loss, argnums=1)(r0, w0)
    b = grad(lambda w: tuner.losses.val(unflat(w, w_leaves, w_spec), val))(w0)
    C = jacrev(lambda r: grad(loss, argnums=1)(r, w0))(r0)
    return H, b, C


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: small network, few rounds")
    parser.add_argument("--hidden", type=int, default=256, help="hidden width of tables 1 and 2 (default 256)")
    parser.add_argument("--small-hidden", type=int, default=16, help="hidden width of table 3 (default 16)")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (default 20)")
    parser.add_argument("--terms", type=int, nargs="+", default=[5, 10, 20], help="Neumann terms of table 1")
    parser.add_argument("--accuracy-terms", type=int, nargs="+", default=[1, 5, 10, 20, 50, 100, 200, 500])
    parser.add_argument("--decay", type=float, default=0.05, help="weight decay of table 3 (default 0.05)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest for these sizes)")
    parser.add_argument("--parts", nargs="+", choices=["cost", "memory", "accuracy"],
                        default=["cost", "memory", "accuracy"])
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.small_hidden, args.rounds, args.accuracy_terms = 64, 8, 5, [1, 10, 100]
    torch.set_num_threads(args.threads)
    busy = _busy()
    print(f"# bilevel.hpo benchmark — torch {torch.__version__}, {args.threads} threads, load average {_load()}, "
          f"other work kept {'n/a' if busy is None else f'{100 * busy:.0f}%'} of the CPUs busy before the run")
    if busy is not None and busy > 0.2:
        print("\n**Warning: the machine is busy; absolute times are inflated, compare the ratios.**")
    if "cost" in args.parts:
        cost_table(args)
    if "memory" in args.parts:
        memory_table(args)
    if "accuracy" in args.parts:
        accuracy_table(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
