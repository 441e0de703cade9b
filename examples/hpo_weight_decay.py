r"""
Per-parameter weight decay by implicit differentiation
======================================================

Per-parameter weight decay for an MLP on the digits data, tuned by implicit differentiation.

One weight-decay coefficient *per weight* of a 64-64-10 MLP (4,810
hyper-parameters) is tuned on a validation split while the network trains:
every ``--inner-steps`` SGD steps, one hyper-step with the implicit-function-
theorem hypergradient and a Neumann series (Lorraine, Vicol & Duvenaud, 2020),
via :class:`bilevel.hpo.ImplicitHPO`.

Compared on the held-out test split, after the same number of training steps:

* the untuned default: one small weight decay (the tuner's start) everywhere;
* random search over one global weight decay (log-uniform), trials sharing the
  same number of training steps; and, as a reference, trials each trained as
  long as the tuned run (``--trials`` times the compute);
* the tuned model.

Prints the table, saves ``hpo_weight_decay.png`` (hyper-parameter
trajectories) in ``--out``.  Run: ``python examples/hpo_weight_decay.py``
(about 30 s on 2 cores); ``--steps 300`` for a longer run.
"""

# %%
# Data, model and losses
# ----------------------
# The losses are ordinary PyTorch; ``hp["decay"]`` is a dict of tensors shaped
# like the parameters (``Hyper(per_weight=True)``), and
# :func:`bilevel.hpo.l2_penalty` applies it.
from __future__ import annotations

import argparse
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bilevel.hpo import Hyper, ImplicitHPO, l2_penalty
from bilevel.implicit import CG, Neumann


def arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=100, help="hyper-steps (default 100)")
    parser.add_argument("--inner-steps", type=int, default=10, help="SGD steps per hyper-step (default 10)")
    parser.add_argument("--terms", type=int, default=10, help="Neumann terms (default 10)")
    parser.add_argument("--hyper-lr", type=float, default=0.1, help="Adam step on the log decays (default 0.1)")
    parser.add_argument("--cg", action="store_true",
                        help="CG (20 iterations) instead of the Neumann series; away from a minimum the network's "
                        "Hessian is indefinite and CG breaks down (a CurvatureWarning says so)")
    parser.add_argument("--trials", type=int, default=8, help="random-search trials (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest for a small MLP)")
    parser.add_argument("--out", default=".", help="folder for the plot (default: current directory)")
    # known arguments only: run by a test runner or the docs build, sys.argv holds theirs
    return parser.parse_known_args(argv)[0]


def digits(seed, n_train=300, n_val=300):
    """Standardized digits, split train / validation / test (the rest, 1197 rows)."""
    X, y = load_digits(return_X_y=True)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    X, y = torch.tensor(X, dtype=torch.float32)[order], torch.tensor(y)[order]
    mean, std = X[:n_train].mean(0), X[:n_train].std(0).clamp_min(1e-3)
    X = (X - mean) / std
    cut = (0, n_train, n_train + n_val, len(y))
    return [(X[a:b], y[a:b]) for a, b in zip(cut, cut[1:])]


def make_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def train_loss(model, batch, hp):
    x, labels = batch
    return F.cross_entropy(model(x), labels) + l2_penalty(model, hp["decay"])


def val_loss(model, batch):
    x, labels = batch
    return F.cross_entropy(model(x), labels)


def evaluate(model, split):
    with torch.no_grad():
        logits = model(split[0])
        return float(F.cross_entropy(logits, split[1])), float((logits.argmax(-1) == split[1]).float().mean())


def train_fixed(model, decay, steps, loader, lr=0.1):
    """Ordinary training with one fixed weight decay (the baselines)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    batches = iter(())
    for _ in range(steps):
        batch = next(batches, None)
        if batch is None:
            batches = iter(loader)
            batch = next(batches)
        optimizer.zero_grad()
        train_loss(model, batch, {"decay": decay}).backward()
        optimizer.step()
    return model


def random_search(seed, trials, steps, loader, val):
    """Log-uniform global weight decay in [1e-5, 1e-1]; the best trial by validation loss."""
    rng = torch.Generator().manual_seed(seed + 1)
    best = None
    for trial in range(trials):
        decay = 10 ** (-5 + 4 * float(torch.rand((), generator=rng)))
        model = train_fixed(make_model(seed), decay, steps, loader)
        score = evaluate(model, val)[0]
        if best is None or score < best[0]:
            best = (score, decay, model)
    return best[1], best[2]


# %%
# Tuning and the baselines
# ------------------------
# The table compares the models on the test split; ``main`` returns its rows
# as a dict ``{method: {"val_loss", "val_acc", "test_loss", "test_acc", ...}}``.
def main(argv=None):
    args = arguments(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train, val, test = digits(args.seed)
    train_loader = DataLoader(TensorDataset(*train), batch_size=64, shuffle=True)
    val_loader = [val]  # the whole validation split at every hyper-step
    start_decay, steps = 1e-4, args.steps * args.inner_steps
    rows, tick = [], time.perf_counter()

    default = train_fixed(make_model(args.seed), start_decay, steps, train_loader)
    rows.append(("untuned default", steps, default, f"decay {start_decay:.0e} everywhere", time.perf_counter() - tick))

    tick = time.perf_counter()
    spec = {"decay": Hyper(start_decay, low=0.0, per_weight=True)}
    solve = CG(maxiter=20) if args.cg else Neumann(terms=args.terms, alpha=0.1)
    tuner = ImplicitHPO(make_model(args.seed), train_loss, val_loss, train_loader, val_loader, spec,
                        inner_steps=args.inner_steps, inner_lr=0.1, hyper_lr=args.hyper_lr, solve=solve, progress=False)
    result = tuner.run(args.steps)
    decays = torch.cat([d.reshape(-1) for d in result.hparams["decay"].values()])
    summary = f"{decays.numel()} decays, median {decays.median():.1e}, range [{decays.min():.0e}, {decays.max():.0e}]"
    rows.append(("implicit HPO (tuned)", result.train_steps, result.model, summary, time.perf_counter() - tick))

    for label, trial_steps in (("same steps", steps // args.trials), (f"{args.trials}x the steps", steps)):
        tick = time.perf_counter()
        decay, model = random_search(args.seed, args.trials, trial_steps, train_loader, val)
        rows.append((f"random search, {label}", args.trials * trial_steps, model,
                     f"best global decay {decay:.1e}", time.perf_counter() - tick))

    print(f"\nPer-parameter weight decay, MLP 64-64-10 on digits (train {len(train[1])}, val {len(val[1])}, "
          f"test {len(test[1])}), {'CG' if args.cg else f'Neumann {args.terms} terms'}\n")
    print("| method | training steps | val loss | val acc | test loss | test acc | seconds | hyper-parameters |")
    print("|---|---|---|---|---|---|---|---|")
    table = {}
    for name, n_steps, model, what, seconds in rows:
        (vl, va), (tl, ta) = evaluate(model, val), evaluate(model, test)
        table[name] = dict(steps=n_steps, val_loss=vl, val_acc=va, test_loss=tl, test_acc=ta, seconds=seconds)
        print(f"| {name} | {n_steps} | {vl:.4f} | {va:.3f} | {tl:.4f} | {ta:.3f} | {seconds:.1f} | {what} |")
    plot(result, os.path.join(args.out, "hpo_weight_decay.png"))
    return table, result


# %%
# Trajectories
# ------------
def plot(result, path):
    """Mean weight decay of each parameter tensor, and the validation loss, per hyper-step."""
    history = result.history
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, values in history["hparams"].items():
        left.semilogy(history["step"], values, label=key.replace("decay.", ""))
    left.set(xlabel="hyper-step", ylabel="mean weight decay", title="per-parameter weight decay")
    left.legend(fontsize=8)
    right.plot(history["step"], history["val_loss"], label="validation")
    right.plot(history["step"], history["train_loss"], label="training (mean of the steps)")
    right.set(xlabel="hyper-step", ylabel="cross-entropy", yscale="log", title="losses")
    right.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)  # left open: the documentation's gallery shows it
    print(f"\nsaved {path}")


# %%
# Run
# ---
if __name__ == "__main__":
    table, result = main()
