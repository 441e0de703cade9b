"""The main job: hypergradients and a short hyper-parameter optimization on real data.

Run ``python -m bilevel``.  On scikit-learn's diabetes data it tunes one ridge
penalty per feature (10 hyper-parameters): it computes the hypergradient with
every method of :mod:`bilevel.implicit` and prints how exact each one is against
the closed form, then runs gradient descent on the validation loss with
implicit hypergradients and reports the certificate of the last step.
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bilevel", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="hyper-parameter steps (default 200)")
    parser.add_argument("--lr", type=float, default=0.1, help="Adam step on log-penalties (default 0.1)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float64)

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
    lam, info = optimize(problem, lam0, args.steps, args.lr, not args.no_progress)
    end = problem.outer(lam, problem.solution(lam))
    exact = problem.hypergradient(lam)
    print(f"\nValidation loss: {float(start):.1f} at lambda = 0 -> {float(end):.1f} after {args.steps} implicit hyper-steps")
    print(f"Final hypergradient norm {float(exact.norm()):.3g}; certificate of the last step: inner "
          f"residual {float(info.optimality_residual):.1e}, linear-solve residual "
          f"{float(info.linear_solve.relative_residual):.1e} ({int(info.linear_solve.iterations)} Hessian products)")
    print("Learned penalties exp(lambda):", ", ".join(f"{v:.3g}" for v in lam.exp().tolist()))


if __name__ == "__main__":
    main()
