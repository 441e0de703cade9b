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

A second section times the per-problem Jacobians :math:`dz/dq`, :math:`dz/dh` of
the batch: ``torch.func.vmap`` of ``torch.func.jacrev`` over the problems (one
batched solve, and every row of a problem's adjoint system with one
factorization), against ``n`` autograd backward passes through the batch and
``torch.autograd.functional.jacobian`` (one row of the flattened batch per pass).

A third section benchmarks the mixture-of-experts hard constraint
(``HardConstraintMoE``, Chalapathi, Du and Krishnapriyan, ICLR 2024) on the heat
equation of ``bilevel.problems.heat_1d``:

* MoE with K experts (spatial splits) vs the single global constraint
  (``HardConstraint``, K = 1) and the soft constraint: time per training step
  (basis + derivatives, K batched Gauss-Newton solves, batched implicit backward,
  Adam step), time of the layer alone (forward + backward at a fixed basis), and
  after training the RMS PDE residual at the collocation points and the relative
  error to the exact solution;
* batched vs looped experts: the K expert problems in one ``HardConstraintMoE``
  call vs a Python loop of ``HardConstraint`` calls, one per expert, forward +
  backward at a fixed basis, with the differences of solutions and gradients.

Usage::

    python benchmarks/layers.py                  # B = 64, n = 20, m = 10 on CPU, then the MoE section
    python benchmarks/layers.py --device cuda    # torch methods on the GPU (cvxpylayers stays on CPU)
    python benchmarks/layers.py --quick          # smoke test
    python benchmarks/layers.py --only moe       # one section: qp or moe
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
from _machine import load_report, platform_line

from bilevel.layers import (
    BoxPartition,
    ConvexLayer,
    HardConstraint,
    HardConstraintMoE,
    QPLayer,
    SoftConstraint,
    evaluate_basis,
    qp_solve,
)
from bilevel.problems import heat_1d
from bilevel.solvers import GaussNewton
from bilevel.status import BilevelWarning


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


def qp_section(args) -> None:
    B, n, m = args.batch, args.n, args.m
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


def jacobian_section(args) -> None:
    """Per-problem Jacobians dz/dq and dz/dh of the QP batch, three ways."""
    B, n, m = args.batch, args.n, args.m
    L, q, G, h = make_batch(B, n, m, args.device)
    Q = L @ L.mT
    solve = lambda q_, h_: qp_solve(Q, q_, G=G, h=h_)  # noqa: E731
    one = lambda Qi, Gi: (lambda q_, h_: qp_solve(Qi, q_, G=Gi, h=h_))  # noqa: E731

    def by_vmap():  # vmap over the problems of jacrev of one problem
        return torch.func.vmap(lambda Qi, Gi, qi, hi: torch.func.jacrev(one(Qi, Gi), argnums=(0, 1))(qi, hi))(
            Q, G, q, h)

    def by_rows():  # n backward passes, each through the whole batch (row i of every problem)
        q_, h_ = q.clone().requires_grad_(), h.clone().requires_grad_()
        z = solve(q_, h_)
        rows = [torch.autograd.grad(z[:, i].sum(), (q_, h_), retain_graph=i < n - 1) for i in range(n)]
        return torch.stack([r[0] for r in rows], 1), torch.stack([r[1] for r in rows], 1)

    def by_jacobian():  # torch.autograd.functional.jacobian, one row of the flattened batch at a time
        J = torch.autograd.functional.jacobian(solve, (q, h))
        index = torch.arange(B)
        return J[0][index, :, index], J[1][index, :, index]

    print(f"\nJacobians dz/dq and dz/dh of the QP batch (B = {B}, n = {n}, m = {m}), one (n x n) and one "
          f"(n x m) block per problem; median of {args.repeats} rounds after a warm-up.\n")
    print("| method | ms | / vmap(jacrev) | max abs difference |")
    print("|---|---|---|---|")
    reference = by_vmap()
    timings = [("vmap(jacrev) over the problems", by_vmap), ("autograd rows through the batch", by_rows)]
    if not args.quick:
        timings.append(("autograd.functional.jacobian", by_jacobian))
    base = None
    for name, fn in timings:
        t = _median_time(fn, args.repeats)
        base = base or t
        diff = max(float((a - b).abs().max()) for a, b in zip(fn(), reference))
        print(f"| {name} | {1e3 * t:.1f} | {t / base:.1f} | {diff:.1e} |")


# ----------------------------------------------------------------------------- MoE hard constraints

MOE_FIELDS = {"u": (), "u_x": (0,), "u_t": (1,), "u_xx": (0, 0)}


def moe_setup(grid: int, device: str, dtype=torch.float64) -> dict:
    """The heat equation of the tutorial examples/plot_moe_pde.py on a ``grid`` x ``grid`` mesh."""
    problem = heat_1d(nu=0.1)
    points, kind = problem.collocation(grid, grid, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(0)
    measured = torch.rand(64, 2, generator=g, dtype=dtype).to(device)
    test = problem.grid(41, 41, dtype=dtype, device=device)
    return {"problem": problem, "points": points, "kind": kind, "measured": measured, "u_measured": problem.exact(measured),
                "test": test, "u_test": problem.exact(test)}


def moe_network(N: int, device: str, dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, N)
    ).to(device=device, dtype=dtype)


def moe_variant(name: str, K: int, N: int, s: dict, gamma: float):
    """(layer, partition) for "soft", or a hard constraint with K experts (K = 1: HardConstraint)."""
    problem = s["problem"]
    part = BoxPartition(problem.lower, problem.upper, (K, 1))
    if name == "soft":
        return SoftConstraint(problem.residual, N, dtype=s["points"].dtype, device=s["points"].device), part
    if K == 1:
        return HardConstraint(problem.residual, solver=GaussNewton(), regularization=gamma), part
    return HardConstraintMoE(problem.residual, part(s["points"]), solver=GaussNewton(), regularization=gamma), part


def moe_train(layer, part, N: int, s: dict, steps: int, device: str) -> dict:
    """Train the tutorial's model; per-step times, then residual and error of the trained model."""
    net = moe_network(N, device)
    optimizer = torch.optim.Adam([*net.parameters(), *layer.parameters()], lr=1e-2)
    experts_measured = part(s["measured"])
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        basis = evaluate_basis(net, s["points"], MOE_FIELDS)
        omega = layer(basis, s["points"], s["kind"])
        u = layer.fields(omega, net(s["measured"]), experts_measured)
        loss = ((u - s["u_measured"]) ** 2).mean()
        if isinstance(layer, SoftConstraint):
            loss = loss + layer.penalty(omega, basis, s["points"], s["kind"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    basis = evaluate_basis(net, s["points"], MOE_FIELDS)
    omega = layer(basis, s["points"], s["kind"]).detach()
    residual = layer.pde_residual(omega, basis, s["points"], s["kind"]).detach()
    u = layer.fields(omega, net(s["test"]), part(s["test"])).detach()
    # the layer alone at the trained basis: forward + backward
    basis = {k: v.detach().requires_grad_() for k, v in basis.items()}
    w = torch.randn(omega.shape, generator=torch.Generator().manual_seed(2), dtype=omega.dtype).to(device)

    def layer_call():
        out = layer(basis, s["points"], s["kind"])
        torch.autograd.grad((out * w).sum(), list(basis.values()), allow_unused=True)
        if device == "cuda":
            torch.cuda.synchronize()

    return {"step": statistics.median(times[1:] if len(times) > 1 else times),
                "layer": _median_time(layer_call, 5),
                "residual": float(residual.pow(2).mean().sqrt()),
                "error": float((u - s["u_test"]).norm() / s["u_test"].norm())}


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def moe_batched_vs_looped(K: int, N: int, s: dict, repeats: int, device: str, gamma: float) -> tuple:
    """Forward + backward of K expert problems: one batched call vs a loop of K calls."""
    problem, points, kind = s["problem"], s["points"], s["kind"]
    part = BoxPartition(problem.lower, problem.upper, (K, 1))
    experts = part(points)
    g = torch.Generator().manual_seed(4)
    W = (3 * torch.randn(2, N, generator=g, dtype=points.dtype)).to(device)
    c = torch.randn(N, generator=g, dtype=points.dtype).to(device)
    basis = evaluate_basis(lambda z: torch.tanh(z @ W + c), points, MOE_FIELDS)  # random features
    w = torch.randn(K, N, generator=torch.Generator().manual_seed(3), dtype=points.dtype).to(device)
    moe = HardConstraintMoE(problem.residual, experts, solver=GaussNewton(), regularization=gamma)
    single = HardConstraint(problem.residual, solver=GaussNewton(), regularization=gamma)
    index = [(experts == k).nonzero().reshape(-1) for k in range(K)]

    def batched():
        b = {k: v.detach().requires_grad_() for k, v in basis.items()}
        omega = moe(b, points, kind)
        grads = torch.autograd.grad((omega * w).sum(), list(b.values()))
        return omega.detach(), grads

    def looped():
        b = {k: v.detach().requires_grad_() for k, v in basis.items()}
        omegas = [single({n: v[i] for n, v in b.items()}, points[i], kind[i])[0] for i in index]
        omega = torch.stack(omegas)
        grads = torch.autograd.grad((omega * w).sum(), list(b.values()))
        return omega.detach(), grads

    t_b, t_l = _median_time(batched, repeats), _median_time(looped, repeats)
    (ob, gb), (ol, gl) = batched(), looped()
    d_omega = float((ob - ol).abs().max() / ob.abs().max())
    d_grad = max(float((x - y).abs().max() / x.abs().max()) for x, y in zip(gb, gl))
    return t_b, t_l, d_omega, d_grad


def moe_section(args) -> None:
    device, steps, gamma = args.device, args.moe_steps, args.moe_regularization
    grid, N = (16, 16) if args.quick else (24, 16)
    Ks = (2, 4) if args.quick else (2, 4, 8)
    s = moe_setup(grid, device)
    print("\n## MoE hard constraints (HardConstraintMoE) on the heat equation u_t = 0.1 u_xx\n")
    print(f"{grid} x {grid} collocation points, N = {N} basis functions from an MLP 2-32-32-N, experts = spatial "
          f"slabs (BoxPartition splits (K, 1)), Gauss-Newton (the PDE is linear in the coefficients), "
          f"regularization {gamma:g}; "
          f"{steps} Adam steps on the misfit at 64 measurements (+ the penalty for soft); device {device}.")
    print("step ms: median time of a training step; layer ms: forward + backward of the layer alone at the "
          "trained basis (median of 5); residual: RMS PDE residual at the collocation points; error: relative "
          "L2 error to the exact solution on a 41 x 41 grid; solver warnings: BilevelWarnings during training "
          "(forward solves and backward certificates).\n")
    rows = []
    for name, K in [("soft", 1), ("hard", 1)] + [("hard", K) for K in Ks]:
        layer, part = moe_variant(name, K, N, s, gamma)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", BilevelWarning)
            result = moe_train(layer, part, N, s, steps, device)
        result["warnings"] = sum(issubclass(w.category, BilevelWarning) for w in caught)
        rows.append((name if name == "soft" else ("single (K = 1)" if K == 1 else f"MoE K = {K}"), result))
    ref = rows[1][1]
    print("| variant | step ms | step / single | layer ms | layer / single | PDE residual (RMS) | relative error "
          "| solver warnings |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        solve = "- | -" if name == "soft" else f"{1e3 * r['layer']:.1f} | {r['layer'] / ref['layer']:.2f}"
        print(f"| {name} | {1e3 * r['step']:.1f} | {r['step'] / ref['step']:.2f} | {solve} | "
              f"{r['residual']:.1e} | {r['error']:.1e} | {r['warnings']} |")

    print(f"\nBatched vs looped experts: forward + backward of the K expert problems at a fixed basis "
          f"(N random features tanh(W z + c)), one HardConstraintMoE call vs K HardConstraint calls; median of {args.repeats}.\n")
    print("| K | points / expert | batched ms | looped ms | looped / batched | max rel d omega | max rel d grad "
          "| solver warnings |")
    print("|---|---|---|---|---|---|---|---|")
    for K in (2, 4, 8) if args.quick else (2, 4, 8, 16):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", BilevelWarning)
            t_b, t_l, d_o, d_g = moe_batched_vs_looped(K, N, s, args.repeats, device, gamma)
        n_warn = sum(issubclass(w.category, BilevelWarning) for w in caught)
        print(f"| {K} | {grid * grid // K} | {1e3 * t_b:.1f} | {1e3 * t_l:.1f} | {t_l / t_b:.1f} | {d_o:.1e} | "
              f"{d_g:.1e} | {n_warn} |")


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
    parser.add_argument("--only", choices=["qp", "moe"], default=None, help="run one section only")
    parser.add_argument("--moe-steps", type=int, default=60, help="training steps per MoE variant")
    parser.add_argument("--moe-regularization", type=float, default=1e-8,
                        help="gamma of the hard constraints (bounds the conditioning of small experts)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1: batched LAPACK calls with 2 threads on a "
                             "loaded 2-core machine spin and distort the ratios)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.repeats, args.moe_steps = 8, 2, 10
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", DeprecationWarning)

    print("# bilevel optimization-layer benchmark" + (" (--quick)" if args.quick else ""))
    print()
    print(platform_line(args.device))
    print(load_report())
    if args.only in (None, "qp"):
        qp_section(args)
        jacobian_section(args)
    if args.only in (None, "moe"):
        moe_section(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
