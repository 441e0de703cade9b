"""Optimization-layer benchmark: QPLayer vs ConvexLayer vs cvxpylayers on a batch of QPs.

One batch of random strictly convex QPs

    min_z 0.5 ||L z||^2 + q^T z   s.t.  G z <= h      (B problems, n variables, m inequalities)

is solved and differentiated (forward + backward of a weighted sum of the
solutions, gradients w.r.t. L, q, G and h) by

* ``QPLayer``: bilevel's batched interior point in torch + the KKT adjoint;
* ``ConvexLayer``: the same problem written in CVXPY (DPP), routed automatically
  to the same torch QP solver (``method="auto"``), and with ``method="conic"``
  (Clarabel per element + the residual-map adjoint through ``custom_root``);
* ``cvxpylayers`` (if installed): SCS/diffcp via NumPy, CPU only, run at
  ``eps=1e-10`` (its default tolerance gives errors of ~1e-3 on this batch).

Each is timed batched (one call for the batch) and looped (one call per
element); times are the median of ``--repeats`` rounds after a warm-up, all
methods measured in the same run, so the ratios are side by side.  Solutions
and gradients are compared with QPLayer's.

Usage::

    python benchmarks/layers.py                  # B = 64, n = 20, m = 10 on CPU
    python benchmarks/layers.py --device cuda    # torch methods on the GPU (cvxpylayers stays on CPU)
    python benchmarks/layers.py --quick          # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _machine import busy as _busy
from _machine import load_average as _load

from bilevel.layers import ConvexLayer, QPLayer


def make_batch(B: int, n: int, m: int, device: str, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(B, n, n, generator=g) / n ** 0.5 + torch.eye(n)
    q = torch.randn(B, n, generator=g)
    G = torch.randn(B, m, n, generator=g)
    z0 = torch.randn(B, n, generator=g)
    h = (G @ z0.unsqueeze(-1)).squeeze(-1) + torch.rand(B, m, generator=g)
    return [t.to(device=device, dtype=torch.float64) for t in (L, q, G, h)]


def cvxpy_problem(n: int, m: int):
    import cvxpy as cp

    z = cp.Variable(n)
    L, q, G, h = cp.Parameter((n, n)), cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(L @ z) + q @ z), [G @ z <= h])
    return problem, [L, q, G, h], [z]


def methods(n: int, m: int, peers: bool) -> dict:
    """name -> (solve(L, q, G, h) -> z, device override or None); unavailable ones -> reason."""
    qp = QPLayer()
    out: dict = {"QPLayer": (lambda L, q, G, h: qp(L.mT @ L, q, G=G, h=h), None)}
    try:
        problem, params, variables = cvxpy_problem(n, m)
        auto = ConvexLayer(problem, params, variables)
        conic = ConvexLayer(problem, params, variables, method="conic")
        out[f"ConvexLayer ({auto.method} route)"] = (lambda *t: auto(*t)[0], None)
        out["ConvexLayer (conic, Clarabel)"] = (lambda *t: conic(*t)[0], "cpu")
    except ImportError as err:
        out["ConvexLayer"] = f"n/a: {err}"
    if peers:
        try:
            from cvxpylayers.torch import CvxpyLayer

            problem, params, variables = cvxpy_problem(n, m)
            peer = CvxpyLayer(problem, params, variables)
            tight = {"eps": 1e-10}  # SCS's default accuracy (~1e-3) is not comparable
            out["cvxpylayers (SCS eps=1e-10)"] = (lambda *t: peer(*t, solver_args=tight)[0], "cpu")
        except ImportError as err:
            out["cvxpylayers"] = f"n/a: {err}"
    return out


def run_once(fn, data, w, batched: bool, device: str):
    inputs = [t.detach().clone().requires_grad_() for t in data]
    if batched:
        z = fn(*inputs)
        loss = (z * w).sum()
    else:
        zs = [fn(*(t[i] for t in inputs)) for i in range(w.shape[0])]
        z = torch.stack(zs)
        loss = (z * w).sum()
    grads = torch.autograd.grad(loss, inputs)
    if device == "cuda":
        torch.cuda.synchronize()
    return z.detach(), grads


def timed(fn, data, w, batched, device, repeats):
    run_once(fn, data, w, batched, device)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = run_once(fn, data, w, batched, device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--n", type=int, default=20, help="variables")
    parser.add_argument("--m", type=int, default=10, help="inequalities")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="B = 8, 2 repeats: a smoke test")
    parser.add_argument("--no-peers", action="store_true", help="skip cvxpylayers")
    parser.add_argument("--no-loop", action="store_true", help="skip the looped (one call per element) timings")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1: batched LAPACK calls with 2 threads on a "
                             "loaded 2-core machine spin and distort the ratios)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.repeats = 8, 2
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", DeprecationWarning)
    B, n, m = args.batch, args.n, args.m

    print("# bilevel optimization-layer benchmark" + (" (--quick)" if args.quick else ""))
    print()
    gpu = f"; {torch.cuda.get_device_name()}" if args.device == "cuda" else ""
    print(f"{datetime.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}, float64; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs{gpu}; "
          f"python {platform.python_version()}; {args.threads} torch threads")
    busy = _busy()
    print(f"load average at start {_load()}" + (f"; CPUs {100 * busy:.0f}% busy" if busy is not None else ""))
    if busy is not None and busy > 0.25:
        print(f"\n**Warning: other processes kept {100 * busy:.0f}% of the CPUs busy; timings are inflated.**")
    print(f"\nQP batch: B = {B}, n = {n} variables, m = {m} inequalities; forward + backward "
          f"(gradients w.r.t. L, q, G, h) of sum(w * z); median of {args.repeats} rounds after a warm-up; "
          f"device {args.device} (Clarabel and cvxpylayers always on CPU).")
    print()

    data = make_batch(B, n, m, args.device)
    w = torch.randn(B, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(args.device)
    rows, notes, reference = [], [], None
    for name, spec in methods(n, m, not args.no_peers).items():
        if isinstance(spec, str):
            notes.append(f"{name}: {spec}")
            continue
        fn, override = spec
        device = override or args.device
        d = [t.to(device) for t in data]
        wd = w.to(device)
        t_b, (z, grads) = timed(fn, d, wd, True, device, args.repeats)
        t_l = None if args.no_loop else timed(fn, d, wd, False, device, max(1, args.repeats // 2))[0]
        z, grads = z.to(args.device), [g.to(args.device) for g in grads]
        if reference is None:
            reference = (t_b, z, grads)
        dz = float((z - reference[1]).abs().max())
        dg = max(float((g - r).abs().max() / r.abs().max().clamp_min(1e-300)) for g, r in zip(grads, reference[2]))
        rows.append((name, t_b, t_l, dz, dg))

    print("| method | batched ms | looped ms | looped / batched | batched / QPLayer batched | max abs dz | max rel dgrad |")
    print("|---|---|---|---|---|---|---|")
    for name, t_b, t_l, dz, dg in rows:
        loop = "-" if t_l is None else f"{1e3 * t_l:.1f}"
        ratio = "-" if t_l is None else f"{t_l / t_b:.1f}"
        print(f"| {name} | {1e3 * t_b:.1f} | {loop} | {ratio} | {t_b / reference[0]:.1f} | {dz:.1e} | {dg:.1e} |")
    for note in notes:
        print(f"\n{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
