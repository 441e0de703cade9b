"""Host synchronizations of the hot paths, counted on the device itself.

On CUDA every operation that makes the host wait for the GPU (a ``.item()``, a
data-dependent shape, a blocking copy, a kernel that checks its own status) is
reported by ``torch.cuda.set_sync_debug_mode("warn")``; this script runs each
hot path once to warm up, then once under that mode, and prints how many
synchronizations it made against how many iterations or steps it ran.  The
library's policy (``bilevel.implicit.linear_solve._base._sync_every``) is to
test convergence every 8 iterations on accelerators, so a loop of ``k``
iterations should show about ``k / 8`` plus a few fixed reads, never ``k``.

On the CPU there is nothing to wait for; there the script counts the same
events with the dispatcher-level counter of ``tests/_host_syncs.py`` (which
sees them the same way, but the CPU path of the library looks every step, so
the CPU figures are about ``k``).

Usage::

    python benchmarks/cuda_syncs.py               # CUDA if present
    python benchmarks/cuda_syncs.py --device cpu  # the dispatcher counter
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
import warnings
from collections import Counter
from typing import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import bilevel  # noqa: E402
from bilevel.implicit import CG, GMRES, MINRES, BiCGStab, Neumann  # noqa: E402
from bilevel.layers import qp_solve  # noqa: E402
from bilevel.solvers import OptimizerLoop  # noqa: E402


class _CudaCounter:
    """Counts the warnings of ``torch.cuda.set_sync_debug_mode("warn")``, and
    where in ``bilevel`` each came from (the innermost library frames of the
    Python stack at the moment of the warning)."""

    def __init__(self) -> None:
        self.count = 0
        self.sites: Counter = Counter()

    def _record(self, message: warnings.WarningMessage) -> None:
        if "synchroniz" not in str(message.message):
            return
        self.count += 1
        frames = [f for f in traceback.extract_stack()[:-1] if f"{os.sep}bilevel{os.sep}" in f.filename]
        where = " <- ".join(f"{f.filename.split(os.sep + 'bilevel' + os.sep)[-1]}:{f.lineno}" for f in frames[::-1][:2])
        self.sites[where or f"{message.filename}:{message.lineno}"] += 1

    @contextlib.contextmanager
    def __call__(self):
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings._showwarnmsg = self._record  # type: ignore[attr-defined]  # called with the stack intact
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield self
            finally:
                torch.cuda.set_sync_debug_mode("default")


def count(fn: Callable[[], int], device: torch.device) -> tuple[int, int, Counter]:
    """(host synchronizations, iterations, sites) of one call of ``fn`` after a warm-up."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        counter = _CudaCounter()
        with counter():
            iterations = fn()
        return counter.count, iterations, counter.sites
    from _host_syncs import count_host_syncs

    with count_host_syncs() as syncs:
        iterations = fn()
    return syncs.count, iterations, Counter(syncs.sites)


def cases(device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[], int]]:
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device)

    B, n = 256, 64
    M = rand(B, n, n)
    A = M @ M.mT / n + 0.05 * torch.eye(n, dtype=dtype, device=device)
    b = rand(B, n)

    def matvec(v):
        return (A @ v.unsqueeze(-1)).squeeze(-1)

    def krylov(solver):
        def run() -> int:
            _, info = solver(matvec, b, batch_dims=1)
            return int(info.iterations.max())
        return run

    # ridge hypergradient, d = 1000 (the TARGETS problem's shape)
    d, rows = 1000, 2000
    X, Xv = rand(rows, d), rand(rows // 2, d)
    y, yv = rand(rows), rand(rows // 2)
    lam = 0.5 * rand(d)

    def inner(lam, w):
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (lam.exp() * w ** 2).sum()

    def outer(lam, w):
        return 0.5 * ((Xv @ w - yv) ** 2).sum()

    H = X.T @ X + torch.diag(lam.exp())
    w_star = torch.linalg.solve(H, X.T @ y)

    def hypergrad(solve, iterations):
        def run() -> int:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", bilevel.BilevelWarning)
                bilevel.hypergrad(outer, inner, lam, w_star, solve=solve)
            return iterations
        return run

    # a quadratic bilevel problem for bilevel.solve
    m, k = 20, 10
    P = rand(m, m)
    Ainner = P @ P.T / m + torch.eye(m, dtype=dtype, device=device)
    Bc, target = rand(m, k), rand(m)

    def q_inner(x, y):
        return 0.5 * y @ (Ainner @ y) - y @ (Bc @ x)

    def q_outer(x, y):
        return 0.5 * ((y - target) ** 2).sum() + 0.05 * (x ** 2).sum()

    x0, y0 = torch.zeros(k, dtype=dtype, device=device), torch.zeros(m, dtype=dtype, device=device)

    def solve(method, **options):
        def run() -> int:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", bilevel.BilevelWarning)
                bilevel.solve(q_outer, q_inner, x0, y0, method=method, max_steps=64, progress=False, **options)
            return 64
        return run

    # batched QP layer, forward and backward
    Lq = rand(64, 16, 16)
    Q = Lq @ Lq.mT + torch.eye(16, dtype=dtype, device=device)
    q, G = rand(64, 16), rand(64, 24, 16)
    h = torch.rand(64, 24, generator=g, dtype=dtype).to(device) + 0.1

    def qp() -> int:
        qq = q.clone().requires_grad_()
        z, info = qp_solve(Q, qq, G=G, h=h, return_info=True)
        torch.autograd.grad((z ** 2).sum(), qq)
        return int(info.iterations.max())

    ridge_lr = 1.0 / float(torch.linalg.matrix_norm(H, 2))
    inner_lr = 0.5 / float(torch.linalg.matrix_norm(Ainner, 2))

    def optimizer_loop() -> int:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", bilevel.BilevelWarning)
            _, info = OptimizerLoop("sgd", lr=ridge_lr, maxiter=200).run(
                inner, torch.zeros_like(w_star), lam)
        return int(info.iterations)

    return {
        f"CG, {B} SPD systems n = {n}": krylov(CG(maxiter=400, tol=1e-10)),
        f"MINRES, {B} systems": krylov(MINRES(maxiter=400, tol=1e-10)),
        f"GMRES(restart 20), {B} systems": krylov(GMRES(maxiter=400, tol=1e-10, restart=20)),
        f"BiCGStab, {B} systems": krylov(BiCGStab(maxiter=400, tol=1e-10)),
        f"Neumann (100 terms), {B} systems": krylov(Neumann(terms=100, alpha=0.1)),
        "hypergrad ridge d = 1000, CG k = 50": hypergrad(CG(maxiter=50, tol=1e-30), 50),
        "hypergrad ridge d = 1000, Neumann 50 terms": hypergrad(Neumann(terms=50, alpha=1e-4), 50),
        "hypergrad ridge d = 1000, default solve": hypergrad(None, 1),
        "OptimizerLoop('sgd') on the ridge inner problem, d = 1000": optimizer_loop,
        **{f"bilevel.solve {m!r}, 64 steps": solve(m) for m in ("penalty", "meha", "bamm", "bda", "one_step")},
        "bilevel.solve 'implicit' (default inner L-BFGS), 64 steps": solve("implicit"),
        "bilevel.solve 'implicit', inner OptimizerLoop('sgd'), 64 steps": solve(
            "implicit", inner_solver=OptimizerLoop("sgd", lr=inner_lr)),
        "bilevel.solve 'unrolled' (5 steps), 64 steps": solve("unrolled", steps=5),
        "QP layer 64 x (16 vars, 24 ineq.), fwd + bwd": qp,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, ...")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--sites", type=int, default=0, help="list the N most frequent call sites of each row")
    args = parser.parse_args()
    name = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    device, dtype = torch.device(name), getattr(torch, args.dtype)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dispatcher counter)"
    print(f"device: {device} ({label}), {args.dtype}, torch {torch.__version__}\n")
    print("| hot path | iterations / steps | host syncs | syncs per iteration |")
    print("|---|---|---|---|")
    sites = {}
    for what, fn in cases(device, dtype).items():
        try:
            syncs, iterations, sites[what] = count(fn, device)
        except Exception as error:  # a benchmark row, not a crash of the whole table
            print(f"| {what} | error | {type(error).__name__}: {str(error)[:80]} | |")
            continue
        print(f"| {what} | {iterations} | {syncs} | {syncs / max(iterations, 1):.2f} |")
    for what, where in sites.items():
        if args.sites and where:
            print(f"\n{what}:")
            for site, n in where.most_common(args.sites):
                print(f"  {n:6d}  {site}")


if __name__ == "__main__":
    main()
