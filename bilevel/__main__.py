"""The main job: bilevel problems on real, bundled data.

``python -m bilevel`` (default ``--problem hyper-cleaning``): data hyper-cleaning
on scikit-learn's digits with half of the training labels corrupted.  One weight
per training example is learned by ``bilevel.solve`` with the implicit,
unrolled and one-step methods; it prints a comparison table (validation loss,
test accuracy of the classifier trained with the learned weights, how well the
weights find the corrupted examples, time, hypergradient evaluations) against
the unweighted classifier, and saves a convergence plot.

``python -m bilevel --problem ridge``: per-feature ridge on the diabetes data;
every hypergradient method against the closed form, then implicit HPO.
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm.auto import tqdm

import bilevel
from bilevel.implicit import CG, one_step_hypergrad, stationarity, unrolled_hypergrad
from bilevel.problems import ridge_diabetes


def _relative_error(g: torch.Tensor, exact: torch.Tensor) -> float:
    return float((g - exact).norm() / exact.norm())


def _timed(fn, repeats: int = 5):
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return out, (time.perf_counter() - start) / repeats * 1e3


def compare_methods(problem, lam: torch.Tensor) -> list[tuple[str, float, float]]:
    """(method, relative error, ms) for each way of computing the hypergradient."""
    w = problem.solution(lam)
    exact = problem.hypergradient(lam)

    @bilevel.custom_root(stationarity(lambda w_, lam_: problem.inner(lam_, w_)))
    def fit(lam_):  # any solver works; here torch's L-BFGS
        w_ = torch.zeros(problem.num_features, dtype=lam_.dtype, requires_grad=True)
        opt = torch.optim.LBFGS([w_], lr=1, max_iter=500, tolerance_grad=1e-12,
                                tolerance_change=1e-15, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            with torch.enable_grad():
                loss = problem.inner(lam_, w_)
                loss.backward()
            return loss

        opt.step(closure)
        return w_.detach()

    def through_custom_root():
        lam_ = lam.clone().requires_grad_()
        return torch.autograd.grad(problem.outer(lam_, fit(lam_)), lam_)[0]

    rows = []
    for name, fn in [
        ("implicit, default solve", lambda: bilevel.hypergrad(problem.outer, problem.inner, lam, w)),
        ("implicit, CG 5 steps", lambda: bilevel.hypergrad(problem.outer, problem.inner, lam, w, solve=CG(maxiter=5, tol=1e-30))),
        ("custom_root around L-BFGS", through_custom_root),
        ("unrolled, 100 steps", lambda: unrolled_hypergrad(problem.outer, problem.inner, lam, torch.zeros_like(w), 100)),
        ("unrolled, 1000 steps", lambda: unrolled_hypergrad(problem.outer, problem.inner, lam, torch.zeros_like(w), 1000)),
        ("one-step (DARTS)", lambda: one_step_hypergrad(problem.outer, problem.inner, lam, w)),
    ]:
        import warnings

        with warnings.catch_warnings():  # deliberately truncated solves warn; the table shows their error
            warnings.simplefilter("ignore", bilevel.BilevelWarning)
            g, ms = _timed(fn, repeats=1 if "1000" in name or "L-BFGS" in name else 5)
        rows.append((name, _relative_error(g, exact), ms))
    return rows


def optimize(problem, lam: torch.Tensor, steps: int, lr: float, progress: bool):
    """Adam on the per-feature log-penalties with implicit hypergradients."""
    lam = lam.clone().requires_grad_()
    optimizer = torch.optim.Adam([lam], lr=lr)
    info = None
    bar = tqdm(range(steps), desc="hyper-steps", disable=not progress)
    for _ in bar:
        w = problem.solution(lam.detach())  # the inner problem, solved exactly
        g, info = bilevel.hypergrad(problem.outer, problem.inner, lam.detach(), w, return_info=True)
        lam.grad = g
        optimizer.step()
        bar.set_postfix(val=f"{float(problem.outer(lam.detach(), w)):.1f}")
    return lam.detach(), info


def ridge_main(args) -> None:
    """Per-feature ridge on diabetes: hypergradient accuracy, then implicit HPO."""
    problem = ridge_diabetes()
    print(f"bilevel {bilevel.__version__}: ridge with one penalty per feature on scikit-learn's diabetes data")
    print(f"  {problem.X.shape[0]} training and {problem.X_val.shape[0]} validation rows, "
          f"{problem.num_features} hyper-parameters\n")
    lam0 = torch.zeros(problem.num_features)
    print("Hypergradient at lambda = 0 against the closed form:")
    print(f"  {'method':28s} {'relative error':>15s} {'time (ms)':>10s}")
    for name, err, ms in compare_methods(problem, lam0):
        print(f"  {name:28s} {err:15.2e} {ms:10.2f}")
    start = problem.outer(lam0, problem.solution(lam0))
    lam, info = optimize(problem, lam0, args.max_steps, args.lr, not args.no_progress)
    end = problem.outer(lam, problem.solution(lam))
    exact = problem.hypergradient(lam)
    print(f"\nValidation loss: {float(start):.1f} at lambda = 0 -> {float(end):.1f} after {args.max_steps} implicit hyper-steps")
    print(f"Final hypergradient norm {float(exact.norm()):.3g}; certificate of the last step: inner "
          f"residual {float(info.optimality_residual):.1e}, linear-solve residual "
          f"{float(info.linear_solve.relative_residual):.1e} ({int(info.linear_solve.iterations)} Hessian products)")
    print("Learned penalties exp(lambda):", ", ".join(f"{v:.3g}" for v in lam.exp().tolist()))


def hyper_cleaning_methods() -> dict:
    """The options of ``bilevel.solve`` for each method compared by the main job."""
    from bilevel.implicit import CG
    from bilevel.solvers import LBFGS

    return {
        # AID: 20 warm-started L-BFGS steps and 30 CG steps per hyper-step
        "implicit": dict(method="implicit", inner_solver=LBFGS(maxiter=20), solve=CG(maxiter=30)),
        # ITD: reverse mode through 30 warm-started gradient steps
        "unrolled": dict(method="unrolled", steps=30, warm_start=True),
        # DARTS-style one-step approximation
        "one_step": dict(method="one_step"),
    }


METHOD_NAMES = ("implicit", "unrolled", "one_step")


def hyper_cleaning_main(args) -> None:
    """Hyper-cleaning on digits with each method; table and convergence plot."""
    import warnings

    from bilevel.problems import hyper_cleaning_digits
    from bilevel.solvers import LBFGS

    problem = hyper_cleaning_digits(corruption=args.corruption)
    data = problem.data
    accuracy, cleaning_f1 = data["accuracy"], data["cleaning_f1"]
    print(f"bilevel {bilevel.__version__}: data hyper-cleaning on scikit-learn's digits")
    print(f"  {len(data['labels_train'])} training examples ({args.corruption:.0%} with a wrong label), "
          f"{len(data['labels_val'])} clean validation and {len(data['labels_test'])} test examples; "
          f"one weight per training example, {args.max_steps} hyper-steps of Adam (lr {args.lr})\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bilevel.BilevelWarning)
        unweighted, _ = LBFGS(maxiter=500).run(lambda y, x: problem.inner(x, y), problem.y0, problem.x0)
    rows = [("unweighted (no hyper-cleaning)", float(problem.outer(problem.x0, unweighted)),
             accuracy(unweighted), float("nan"), 0.0, 0)]
    curves = {}
    methods = hyper_cleaning_methods()
    for name in args.methods:
        options = methods[name]
        start = time.perf_counter()
        with warnings.catch_warnings():  # truncated inner and CG solves are the method's design
            warnings.simplefilter("ignore", bilevel.BilevelWarning)
            result = bilevel.solve(problem, lr=args.lr, max_steps=args.max_steps,
                                   progress=not args.no_progress, **options)
        seconds = time.perf_counter() - start
        curves[name] = result.history["outer"]
        rows.append((name, result.history["outer"][-1], accuracy(result.y), cleaning_f1(result.x), seconds,
                     result.state.iteration))
    print(f"  {'method':32s} {'val. loss':>9s} {'test acc.':>9s} {'cleaning F1':>11s} {'time (s)':>8s} {'hypergradients':>14s}")
    for name, loss, acc, f1, seconds, evaluations in rows:
        f1_text = "-" if f1 != f1 else f"{f1:.3f}"
        print(f"  {name:32s} {loss:9.4f} {acc:9.3f} {f1_text:>11s} {seconds:8.1f} {evaluations:14d}")
    _plot(curves, args.plot)


def _plot(curves: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(install matplotlib to save the convergence plot)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, label=name)
    ax.set_xlabel("hyper-step")
    ax.set_ylabel("validation loss")
    ax.set_yscale("log")
    ax.set_title("Data hyper-cleaning on digits")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"\nConvergence plot saved to {path}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bilevel", description=__doc__.splitlines()[0])
    parser.add_argument("--problem", choices=("hyper-cleaning", "ridge"), default="hyper-cleaning")
    parser.add_argument("--methods", nargs="+", choices=METHOD_NAMES, default=list(METHOD_NAMES),
                        help="hyper-cleaning methods to compare")
    parser.add_argument("--max-steps", "--steps", type=int, default=None, dest="max_steps",
                        help="hyper-steps (default 200)")
    parser.add_argument("--lr", type=float, default=0.1, help="Adam step on the hyper-parameters (default 0.1)")
    parser.add_argument("--corruption", type=float, default=0.5, help="fraction of corrupted labels (default 0.5)")
    parser.add_argument("--plot", default="bilevel_convergence.png", help="where to save the convergence plot")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    args.max_steps = 200 if args.max_steps is None else args.max_steps
    torch.set_default_dtype(torch.float64)
    if args.problem == "ridge":
        ridge_main(args)
    else:
        hyper_cleaning_main(args)


if __name__ == "__main__":
    main()
