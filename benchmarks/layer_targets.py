"""Convex-layer targets of TARGETS.md: QPLayer and ConvexLayer vs cvxpylayers on three cases.

The "Convex layers" cases of ``shared/TARGETS.md``, a batch of B = 64 problems in
float64, forward + backward of ``(w * z).sum()`` (fixed random ``w``) in one call
for the whole batch:

* simplex projection, n = 50 and n = 200: ``z = argmin 1/2 ||z - y||^2`` s.t.
  ``1^T z = 1, z >= 0`` with ``y ~ N(0, 1)``; gradient w.r.t. ``y``.  Exact ``z`` by
  the sort-based projection; with ``s`` the support indicator, the closed-form
  gradient is ``dL/dy = s*w - s (s^T w) / |S|`` per row.
* box-constrained least squares, n = 100, m = 150: ``z = argmin 1/2 ||M z - c||^2``
  s.t. ``0 <= z <= 1``, ``M ~ N(0, 1) / sqrt(m)``, ``c = M (1/2) + 1/2 N(0, 1)`` (the
  unconstrained optimum scattered around the box's centre, so that bounds are
  active at 0 and at 1 and variables are free; the counts are printed);
  gradients w.r.t. ``M`` and ``c``.  Exact ``z``: Clarabel (through CVXPY) at tight
  tolerance, then least squares on the free set ``F``, KKT checked.  With
  ``u = (M_F^T M_F)^{-1} w_F`` on ``F``, 0 elsewhere, and ``e = c - M z``:
  ``dL/dc = M u`` and ``dL/dM = e u^T - (M u) z^T`` (checked against central
  finite differences).

Methods (rows), each timed as the median of ``--repeats`` forward + backward
rounds after a warm-up, all in the same run (fewer rounds, at least one, where
they would take more than ``--budget`` seconds):

* ``QPLayer``: simplex as ``Q = I, q = -y, A = 1^T, b = 1, G = -I, h = 0`` (only ``q``
  batched); box LS as ``Q = M^T M, q = -M^T c`` (built in torch in the timed
  region, so the gradient reaches ``M`` and ``c``), ``G = [I; -I], h = [1; 0]``;
* ``ConvexLayer``: the natural DPP CVXPY problem, ``method="auto"``;
* ``cvxpylayers`` (``CvxpyLayer``, diffcp; skipped with ``--no-peers``), with its
  default solver SCS at default settings and with Clarabel
  (``solver_args={"solve_method": "Clarabel"}``), timed with ``--peer-repeats``.
  diffcp runs the batch on a thread pool of ``os.cpu_count()`` workers.

Columns: time, speed-up = cvxpylayers-SCS time / method time (without peers:
against the SCS figure quoted in TARGETS.md), relative gradient error
``||g - g_exact|| / ||g_exact||`` over all the case's parameters, forward error
``max |z - z_exact|``, mean solver iterations where the layer reports them, and
notes: failures, elements the QP backward flagged degenerate (``last_info.degenerate``,
where it returns a generalized gradient), BilevelWarnings per call, reduced rounds.
The header lines give each case's smallest strict-complementarity margin, the
distance of the exact solution from a degenerate one.
Each case ends with MET / NOT MET for the target "QPLayer >= 20x faster than
cvxpylayers (SCS) with gradient error <= 1e-6".  Times are never asserted.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/layer_targets.py             # full run, about 1-2 min on 2 cores
    python benchmarks/layer_targets.py --quick                       # smoke test, under a minute
    python benchmarks/layer_targets.py --no-peers --device cuda      # torch methods on the GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _machine import busy as _busy
from _machine import load_report, platform_line
from _machine import load_average as _load

from bilevel.layers import ConvexLayer, QPLayer
from bilevel.status import BilevelWarning

B = 64
QUOTED_SCS_MS = {"simplex n = 50": 232.0, "simplex n = 200": 554.0, "box LS n = 100, m = 150": 1729.0}
TARGET_SPEEDUP, TARGET_GRAD = 20.0, 1e-6


# ----------------------------------------------------------------------------- cases


def project_simplex_sorted(y: torch.Tensor) -> torch.Tensor:
    """Exact Euclidean projection of each row onto the unit simplex (sort and threshold)."""
    u = torch.sort(y, dim=-1, descending=True).values
    css = u.cumsum(-1) - 1
    k = torch.arange(1, y.shape[-1] + 1, dtype=y.dtype)
    rho = (u - css / k > 0).sum(-1, keepdim=True)
    return (y - css.gather(-1, rho - 1) / rho).clamp_min(0)


def simplex_case(n: int) -> dict:
    """Data, exact solution, closed-form gradient, QP form and CVXPY form of the simplex projection."""
    import cvxpy as cp

    y = torch.randn(B, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = torch.randn(B, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z = project_simplex_sorted(y)
    s = (z > 0).to(y.dtype)
    grad = s * w - s * (s * w).sum(-1, keepdim=True) / s.sum(-1, keepdim=True)
    tau = ((y - z) * s).sum(-1, keepdim=True) / s.sum(-1, keepdim=True)
    margin = float(torch.where(s > 0, z, tau - y).min())  # min(z on S, multiplier tau - y off S)
    I = torch.eye(n, dtype=torch.float64)
    shared = {"Q": I, "A": torch.ones(1, n, dtype=torch.float64), "b": torch.ones(1, dtype=torch.float64),
              "G": -I, "h": torch.zeros(n, dtype=torch.float64)}

    def qp(layer, y, Q, A, b, G, h):
        return layer(Q, -y, A, b, G, h)

    def cvxpy_problem():
        zv, yp = cp.Variable(n), cp.Parameter(n)
        return cp.Problem(cp.Minimize(cp.sum_squares(zv - yp)), [cp.sum(zv) == 1, zv >= 0]), [yp], [zv]

    return {"name": f"simplex n = {n}", "inputs": [y], "w": w, "z": z, "grads": [grad], "shared": shared,
            "qp": qp, "cvxpy": cvxpy_problem, "about": f"support size |S| = {s.sum(-1).mean():.1f} of {n} on average; "
                     f"smallest strict-complementarity margin {margin:.1e}"}


def box_ls_exact(M: torch.Tensor, c: torch.Tensor, cvxpy_problem) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Exact box-LS solutions: Clarabel at tight tolerance, then least squares on the free set.

    Returns ``z``, the free-set mask, the largest KKT violation (stationarity on
    the free set, sign of the gradient on the active bounds, feasibility) and the
    smallest strict-complementarity margin (free variable to a bound, multiplier)."""
    problem, (Mp, cp_), (zv,) = cvxpy_problem()
    zs, frees, kkt, margin = [], [], 0.0, float("inf")
    for Mi, ci in zip(M, c):
        Mp.value, cp_.value = Mi.numpy(), ci.numpy()
        problem.solve(solver="CLARABEL", tol_gap_abs=1e-13, tol_gap_rel=1e-13, tol_feas=1e-13)
        z0 = torch.as_tensor(zv.value)
        free = (z0 > 1e-6) & (z0 < 1 - 1e-6)
        z = ((z0 > 0.5) & ~free).to(M.dtype)
        z[free] = torch.linalg.lstsq(Mi[:, free], ci - Mi @ z).solution
        r = Mi.mT @ (Mi @ z - ci)  # gradient of the objective: 0 on F, >= 0 at 0, <= 0 at 1
        bad = [r[free].abs(), (-r[~free & (z == 0)]).clamp_min(0), r[~free & (z == 1)].clamp_min(0),
               (-z).clamp_min(0), (z - 1).clamp_min(0)]
        kkt = max(kkt, *(float(v.max()) for v in bad if v.numel()))
        margin = min(margin, float(torch.where(free, torch.minimum(z, 1 - z), r.abs()).min()))
        zs.append(z)
        frees.append(free)
    return torch.stack(zs), torch.stack(frees), kkt, margin


def box_ls_case(m: int = 150, n: int = 100) -> dict:
    """Data, exact solution, closed-form gradients, QP form and CVXPY form of box-constrained LS."""
    import cvxpy as cp

    g = torch.Generator().manual_seed(0)
    M = torch.randn(B, m, n, generator=g, dtype=torch.float64) / m ** 0.5
    c = 0.5 * M.sum(-1) + 0.5 * torch.randn(B, m, generator=g, dtype=torch.float64)
    w = torch.randn(B, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def cvxpy_problem():
        zv, Mp, cp_ = cp.Variable(n), cp.Parameter((m, n)), cp.Parameter(m)
        return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(Mp @ zv - cp_)), [zv >= 0, zv <= 1]), [Mp, cp_], [zv]

    z, free, kkt, margin = box_ls_exact(M, c, cvxpy_problem)
    u = torch.zeros_like(w)
    for i in range(B):  # u = (M_F^T M_F)^{-1} w_F on the free set, 0 elsewhere
        MF = M[i][:, free[i]]
        u[i, free[i]] = torch.linalg.solve(MF.mT @ MF, w[i, free[i]])
    Mu, e = (M @ u.unsqueeze(-1)).squeeze(-1), c - (M @ z.unsqueeze(-1)).squeeze(-1)
    grad_M = e.unsqueeze(-1) * u.unsqueeze(-2) - Mu.unsqueeze(-1) * z.unsqueeze(-2)
    I = torch.eye(n, dtype=torch.float64)
    shared = {"G": torch.cat([I, -I]), "h": torch.cat([torch.ones(n), torch.zeros(n)]).double()}

    def qp(layer, M, c, G, h):
        return layer(M.mT @ M, -(M.mT @ c.unsqueeze(-1)).squeeze(-1), G=G, h=h)

    counts = (f"on average {(z == 0).sum(-1).double().mean():.1f} bounds active at 0, "
              f"{(z == 1).sum(-1).double().mean():.1f} at 1, {free.sum(-1).double().mean():.1f} free of {n}; "
              f"exact solution's KKT violation {kkt:.1e}, smallest strict-complementarity margin {margin:.1e}")
    return {"name": f"box LS n = {n}, m = {m}", "inputs": [M, c], "w": w, "z": z, "grads": [grad_M, Mu],
            "shared": shared, "qp": qp, "cvxpy": cvxpy_problem, "about": counts}


# ----------------------------------------------------------------------------- methods and timing


def methods(case: dict, args) -> list:
    """(name, solve(*inputs) -> z, device, repeats, layer with last_info or None), or (name, reason) if skipped."""
    dev = args.device
    shared = {k: v.to(dev) for k, v in case["shared"].items()}
    qp_layer = QPLayer()
    out = [("QPLayer", lambda *t: case["qp"](qp_layer, *t, **shared), dev, args.repeats, qp_layer)]
    convex = ConvexLayer(*case["cvxpy"]())
    out.append((f"ConvexLayer ({convex.method} route)", lambda *t: convex(*t)[0], dev, args.repeats, convex))
    if args.no_peers:
        return out
    try:
        from cvxpylayers.torch import CvxpyLayer
    except ImportError as err:
        return out + [("cvxpylayers", f"not importable: {err}")]
    scs, clarabel = CvxpyLayer(*case["cvxpy"]()), CvxpyLayer(*case["cvxpy"]())
    return out + [("cvxpylayers (SCS, default)", lambda *t: scs(*t)[0], "cpu", args.peer_repeats, None),
                  ("cvxpylayers (Clarabel)", lambda *t: clarabel(*t, solver_args={"solve_method": "Clarabel"})[0],
                   "cpu", args.peer_repeats, None)]


def timed(fn, inputs: list, w: torch.Tensor, repeats: int, device: str, budget: float):
    """Median seconds of forward + backward over ``repeats`` rounds after a warm-up (fewer, at least
    one, when the rounds would take more than ``budget`` seconds); the rounds run and the last (z, grads)."""
    def once():
        x = [t.detach().clone().requires_grad_() for t in inputs]
        z = fn(*x)
        grads = torch.autograd.grad((w * z).sum(), x)
        if device == "cuda":
            torch.cuda.synchronize()
        return z.detach(), grads

    t0 = time.perf_counter()
    once()
    rounds = max(1, min(repeats, int(budget / (time.perf_counter() - t0))))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = once()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), rounds, out


def run_case(case: dict, args) -> list:
    """One row per method: (name, seconds, grad error, forward error, iterations, note) or (name, reason)."""
    rows = []
    g_exact = torch.cat([g.reshape(-1) for g in case["grads"]])
    for spec in methods(case, args):
        if isinstance(spec[1], str):
            rows.append(spec)
            continue
        name, fn, device, repeats, layer = spec
        inputs, w = [t.to(device) for t in case["inputs"]], case["w"].to(device)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", BilevelWarning)
                seconds, rounds, (z, grads) = timed(fn, inputs, w, repeats, device, args.budget)
        except Exception as err:  # a failing method is a row of the table, not the end of the run
            rows.append((name, f"failed: {type(err).__name__}: {str(err)[:160]}"))
            continue
        z, g = z.cpu(), torch.cat([t.reshape(-1).cpu() for t in grads])
        info = getattr(layer, "last_info", None)
        iters = getattr(info, "iterations", None)
        iters = None if iters is None else float(torch.as_tensor(iters).double().mean())
        bad = int((~torch.isfinite(z)).any(-1).sum())
        degenerate = int(getattr(info, "degenerate", torch.zeros(0)).sum())
        kinds = sorted({w.category.__name__ for w in caught})
        note = ", ".join(x for x in (f"{bad} elements non-finite" if bad else "",
                                     f"{degenerate} elements flagged degenerate" if degenerate else "",
                                     f"{len(caught) / (rounds + 1):.0f} {'/'.join(kinds)} per call" if caught else "",
                                     f"{rounds} rounds (--budget)" if rounds < repeats else "") if x)
        rows.append((name, seconds, float((g - g_exact).norm() / g_exact.norm()),
                     float((z - case["z"]).abs().max()), iters, note))
    return rows


# ----------------------------------------------------------------------------- report


def report(case: dict, rows: list) -> None:
    """The case's table rows and its MET / NOT MET line."""
    times = {r[0]: r[1] for r in rows if not isinstance(r[1], str)}
    scs = times.get("cvxpylayers (SCS, default)")
    base, base_what = (scs, "measured") if scs else (1e-3 * QUOTED_SCS_MS[case["name"]], "TARGETS.md's quoted")
    for row in rows:
        if isinstance(row[1], str):
            print(f"| {case['name']} | {row[0]} | - | - | - | - | - | {row[1]} |")
            continue
        name, t, ge, fe, it, note = row
        iters = "-" if it is None else f"{it:.1f}"
        print(f"| {case['name']} | {name} | {1e3 * t:.1f} | {base / t:.1f}x | {ge:.1e} | {fe:.1e} | {iters} | {note} |")
    qp = next(r for r in rows if r[0] == "QPLayer")
    if isinstance(qp[1], str):
        case["verdict"] = f"{case['name']}: NOT MET (QPLayer {qp[1]})"
        return
    speedup, ge = base / qp[1], qp[2]
    met = speedup >= TARGET_SPEEDUP and ge <= TARGET_GRAD
    case["verdict"] = (f"{case['name']}: {'MET' if met else 'NOT MET'} -- QPLayer {1e3 * qp[1]:.1f} ms, "
                       f"{speedup:.1f}x vs {base_what} cvxpylayers-SCS {1e3 * base:.0f} ms (target >= "
                       f"{TARGET_SPEEDUP:.0f}x), gradient error {ge:.1e} (target <= {TARGET_GRAD:.0e})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device of the torch methods")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds of the torch methods")
    parser.add_argument("--peer-repeats", type=int, default=3, help="timed rounds of cvxpylayers (seconds each)")
    parser.add_argument("--quick", action="store_true",
                        help="2 / 1 rounds, ConvexLayer on simplex n = 50 only: a smoke test")
    parser.add_argument("--budget", type=float, default=20.0,
                        help="seconds of timed rounds per method; a slower method runs fewer rounds (at least 1)")
    parser.add_argument("--no-peers", action="store_true", help="skip cvxpylayers")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (the target machine has 2 cores)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.peer_repeats = 2, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.filterwarnings("ignore", module="cvxpy")  # "solution may be inaccurate" and the like

    print("# Convex-layer targets (TARGETS.md, Convex layers)" + (" (--quick)" if args.quick else ""))
    print()
    print(platform_line(args.device))
    print(load_report())
    print(f"\nB = {B}, forward + backward of sum(w * z) per batch; median of {args.repeats} rounds "
          f"({args.peer_repeats} for cvxpylayers) after a warm-up; device {args.device} (cvxpylayers on CPU). "
          f"speed-up: cvxpylayers-SCS time / method time; grad error: ||g - g_exact|| / ||g_exact||; "
          f"forward error: max |z - z_exact|.\n")

    cases = []
    for make in (lambda: simplex_case(50), lambda: simplex_case(200), box_ls_case):
        t0 = time.perf_counter()
        case = make()
        print(f"- {case['name']}: {case['about']} (exact solution in {time.perf_counter() - t0:.1f} s)")
        cases.append(case)
    print("\n| case | method | ms | speed-up | grad error | forward error | iterations | note |")
    print("|---|---|---|---|---|---|---|---|")
    for case in cases:
        report(case, run_case(case, args))
    busy = _busy()
    print(f"\nload average at the end {_load()}" + (f"; CPUs {100 * busy:.0f}% busy" if busy is not None else ""))
    print()
    for case in cases:
        print(case["verdict"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
