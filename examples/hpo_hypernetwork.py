r"""
Hypernetwork tuning of weight decay and input dropout
=====================================================

Hypernetwork tuning of a weight decay and an input-dropout rate (Self-Tuning Networks style).

A best-response hypernetwork maps the two hyper-parameters of a 64-64-10 MLP
on the digits data — a weight decay (positive, tuned on a log scale) and the
rate at which input pixels are dropped (in (0, 1), tuned on a logit scale) —
to the network's weights, and is trained jointly with them
(:class:`bilevel.hpo.HypernetworkHPO`; Lorraine & Duvenaud 2018, MacKay et al.
2019): weight steps at hyper-parameters sampled around the current ones,
then a hyper-step on the validation loss through the hypernetwork.  The
dropout rate enters the training loss through random masks only, so it has no
gradient of its own: its gradient comes through the best response.

Printed: the test table (untuned default; random search over both
hyper-parameters with the same training steps; the tuned model, i.e. the
hypernetwork's weights at the tuned values; the network retrained from
scratch at the tuned values) and the best-response check — at a few
hyper-parameter values, the validation loss of the hypernetwork's weights
next to that of weights trained directly at those values.  Saves
``hpo_hypernetwork.png`` in ``--out``.

Run: ``python examples/hpo_hypernetwork.py`` (about 40 s on 2 cores);
``--steps 1000`` for a longer run.
"""

# %%
# Data, model and losses
# ----------------------
# The dropout rate only draws the random masks: the training loss is not
# differentiable in it, and the tuner never needs it to be.
from __future__ import annotations

import argparse
import math
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

from bilevel.hpo import Hyper, HypernetworkHPO

START = {"decay": 1e-4, "dropout": 0.05}


def arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=300, help="hyper-steps (default 300)")
    parser.add_argument("--weight-steps", type=int, default=5, help="weight steps per hyper-step (default 5)")
    parser.add_argument("--warmup", type=int, default=300, help="weight steps before tuning (default 300)")
    parser.add_argument("--trials", type=int, default=8, help="random-search trials (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest for a small MLP)")
    parser.add_argument("--out", default=".", help="folder for the plot (default: current directory)")
    # known arguments only: run by a test runner or the docs build, sys.argv holds theirs
    return parser.parse_known_args(argv)[0]


def digits(seed, n_train=300, n_val=300):
    X, y = load_digits(return_X_y=True)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    X, y = torch.tensor(X, dtype=torch.float32)[order] / 16.0, torch.tensor(y)[order]
    return [(X[a:b], y[a:b]) for a, b in ((0, n_train), (n_train, n_train + n_val), (n_train + n_val, len(y)))]


def make_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def train_loss(model, batch, hp):
    """Cross-entropy on inputs whose pixels are dropped at rate ``dropout``, plus weight decay."""
    x, labels = batch
    keep = 1.0 - hp["dropout"]
    x = x * torch.bernoulli(keep.expand_as(x)) / keep
    decay = 0.5 * hp["decay"] * sum((p ** 2).sum() for name, p in model.named_parameters() if "weight" in name)
    return F.cross_entropy(model(x), labels) + decay


def val_loss(model, batch):
    x, labels = batch
    return F.cross_entropy(model(x), labels)


def evaluate(model, split):
    with torch.no_grad():
        logits = model(split[0])
        return float(F.cross_entropy(logits, split[1])), float((logits.argmax(-1) == split[1]).float().mean())


def train_fixed(seed, hp, steps, loader, lr=1e-3):
    """A network trained directly at fixed hyper-parameters (Adam, like the hypernetwork)."""
    model = make_model(seed)
    hp = {k: torch.tensor(float(v)) for k, v in hp.items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batches = iter(())
    for _ in range(steps):
        batch = next(batches, None)
        if batch is None:
            batches = iter(loader)
            batch = next(batches)
        optimizer.zero_grad()
        train_loss(model, batch, hp).backward()
        optimizer.step()
    return model


# %%
# Tuning, baselines and the best-response check
# ---------------------------------------------
# ``main`` returns the table as a dict ``{method: {"val_loss", "val_acc",
# "test_loss", "test_acc", ...}}``, the best-response check as a list of
# ``(hparams, val loss of w(λ), val loss trained at λ)`` and the tuner's result.
def main(argv=None):
    args = arguments(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train, val, test = digits(args.seed)
    train_loader = DataLoader(TensorDataset(*train), batch_size=32, shuffle=True)
    val_loader = DataLoader(TensorDataset(*val), batch_size=100, shuffle=True)
    steps = args.warmup + args.steps * args.weight_steps
    rows = []

    tick = time.perf_counter()
    rows.append(("untuned default", steps, train_fixed(args.seed, START, steps, train_loader), START,
                 time.perf_counter() - tick))

    tick = time.perf_counter()
    spec = {"decay": Hyper(START["decay"], low=0.0), "dropout": Hyper(START["dropout"], low=0.0, high=1.0)}
    tuner = HypernetworkHPO(make_model(args.seed), train_loss, val_loss, train_loader, val_loader, spec,
                            weight_steps=args.weight_steps, weight_lr=1e-3, hyper_lr=0.03, sigma=0.5,
                            warmup_steps=args.warmup, progress=False)
    result = tuner.run(args.steps)
    tuned = {k: float(v) for k, v in result.hparams.items()}
    rows.append(("hypernetwork HPO (tuned)", result.train_steps, result.model, tuned, time.perf_counter() - tick))

    tick = time.perf_counter()
    rng, best = torch.Generator().manual_seed(args.seed + 1), None
    for _ in range(args.trials):  # log-uniform decay in [1e-6, 1e-1], uniform dropout in [0, 0.8]
        u = torch.rand(2, generator=rng)
        hp = {"decay": 10 ** (-6 + 5 * float(u[0])), "dropout": 0.8 * float(u[1])}
        model = train_fixed(args.seed, hp, steps // args.trials, train_loader)
        if best is None or evaluate(model, val)[0] < best[0]:
            best = (evaluate(model, val)[0], hp, model)
    rows.append(("random search, same steps", steps, best[2], best[1], time.perf_counter() - tick))

    check = best_response_check(tuner, tuned, args, steps, train_loader, val)
    rows.append(("retrained from scratch at the tuned values", steps, check[0][3], tuned, float("nan")))

    print(f"\nHypernetwork HPO, MLP 64-64-10 on digits (train {len(train[1])}, val {len(val[1])}, test "
          f"{len(test[1])}): weight decay and input-dropout rate\n")
    print("| method | training steps | val loss | val acc | test loss | test acc | seconds | decay | dropout |")
    print("|---|---|---|---|---|---|---|---|---|")
    table = {}
    for name, n_steps, model, hp, seconds in rows:
        (vl, va), (tl, ta) = evaluate(model, val), evaluate(model, test)
        table[name] = dict(steps=n_steps, val_loss=vl, val_acc=va, test_loss=tl, test_acc=ta, seconds=seconds, **hp)
        print(f"| {name} | {n_steps} | {vl:.4f} | {va:.3f} | {tl:.4f} | {ta:.3f} | {seconds:.1f} | "
              f"{hp['decay']:.2e} | {hp['dropout']:.3f} |")
    print("\nBest-response check: validation loss of the hypernetwork's weights w(λ) and of weights trained "
          f"directly at λ ({steps} Adam steps)\n")
    print("| decay | dropout | val loss, hypernetwork w(λ) | val loss, trained at λ | gap | relative gap |")
    print("|---|---|---|---|---|---|")
    for hp, amortized, direct, _ in check:
        print(f"| {hp['decay']:.2e} | {hp['dropout']:.3f} | {amortized:.4f} | {direct:.4f} | "
              f"{amortized - direct:+.4f} | {(amortized - direct) / direct:+.1%} |")
    plot(result, os.path.join(args.out, "hpo_hypernetwork.png"))
    return table, [(hp, amortized, direct) for hp, amortized, direct, _ in check], result


# %%
# The best-response check and the trajectories
# --------------------------------------------
def best_response_check(tuner, tuned, args, steps, loader, val):
    """At the tuned values and around them (decay x e^(+-1), dropout logit +-0.5): val loss of
    w_phi(lambda) against that of a network trained directly at lambda."""
    logit = math.log(tuned["dropout"] / (1 - tuned["dropout"]))
    points = [tuned, {**tuned, "decay": tuned["decay"] * math.e}, {**tuned, "decay": tuned["decay"] / math.e},
              {**tuned, "dropout": 1 / (1 + math.exp(-(logit + 0.5)))},
              {**tuned, "dropout": 1 / (1 + math.exp(-(logit - 0.5)))}]
    out = []
    for hp in points:
        amortized = evaluate(tuner.model_at(hp), val)[0]
        direct_model = train_fixed(args.seed, hp, steps, loader)
        out.append((hp, amortized, evaluate(direct_model, val)[0], direct_model))
    return out


def plot(result, path):
    history = result.history
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].semilogy(history["step"], history["hparams"]["decay"])
    axes[0].set(xlabel="hyper-step", ylabel="weight decay", title="weight decay")
    axes[1].plot(history["step"], history["hparams"]["dropout"])
    axes[1].set(xlabel="hyper-step", ylabel="rate", title="input-dropout rate")
    axes[2].plot(history["step"], history["val_loss"], label="validation (mini-batch)")
    axes[2].plot(history["step"], history["train_loss"], label="training (perturbed, mean)")
    axes[2].set(xlabel="hyper-step", ylabel="cross-entropy", yscale="log", title="losses")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)  # left open: the documentation's gallery shows it
    print(f"\nsaved {path}")


# %%
# Run
# ---
if __name__ == "__main__":
    table, check, result = main()
