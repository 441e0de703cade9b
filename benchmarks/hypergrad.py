"""Hypergradient benchmark: ``bilevel`` against a hand-written torch floor and the peers.

Prints markdown tables for the hypergradient problems of ``shared/TARGETS.md``
(ridge with one L2 weight per feature at d = 100 and d = 1000, logistic
regression at d = 500) and for a batch of 64 small independent problems.
Every figure is the hypergradient alone at the exact inner solution; times are
medians (``--stat``) over ``--repeats`` interleaved rounds after a warm-up, reported
as ratios to the hand-written floor measured in the same run.

Usage::

    python benchmarks/hypergrad.py                 # full run (k = 10, 50, 100)
    python benchmarks/hypergrad.py --quick         # smoke test, well under a minute
    python benchmarks/hypergrad.py --problems ridge1000 --k 50 --repeats 15
    python benchmarks/hypergrad.py --no-peers      # bilevel and the floor only

TorchOpt and JAXopt are optional: a column whose library does not import
shows ``n/a`` and the reason is printed under the table.  See
``benchmarks/README.md`` for the peer environment and what each column means.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import importlib
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _problems as P  # noqa: E402
from _machine import busy as _busy, load_average as _load  # noqa: E402

TIGHT = 1e-30  # CG tolerance so small that exactly k iterations run
STAT: Callable[[list[float]], float] = statistics.median  # --stat min: best of the rounds


class Unavailable(Exception):
    """A method cannot run here (library missing, API not written yet); the cell shows n/a."""


# ---------------------------------------------------------------------------
# Locating bilevel's API (parts of it may not exist yet)
# ---------------------------------------------------------------------------
def _bilevel_attr(*paths: str):
    """First callable found among dotted ``paths`` (e.g. ``bilevel.hypergrad``)."""
    for path in paths:
        module_name, _, attr = path.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            continue
        if callable(obj):
            return obj
        if hasattr(obj, attr) and callable(getattr(obj, attr)):  # a module named like its function
            return getattr(obj, attr)
    raise Unavailable(f"{paths[0]} not found in this checkout")


HYPERGRAD_PATHS = ("bilevel.hypergrad", "bilevel.implicit.hypergrad", "bilevel.implicit.hypergrad.hypergrad")
CUSTOM_ROOT_PATHS = ("bilevel.custom_root", "bilevel.implicit.custom_root", "bilevel.implicit.root.custom_root")


def _first_tensor(out):
    """Accept ``g`` or ``(g, info)`` from a hypergradient function."""
    if isinstance(out, tuple) and out and torch.is_tensor(out[0]) and not all(torch.is_tensor(o) for o in out):
        return out[0]
    return out


# ---------------------------------------------------------------------------
# The floor: hand-written torch, explicit Hessian products
# ---------------------------------------------------------------------------
def _cg_fixed(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly ``k`` CG iterations from zero, no convergence test (no host sync)."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = r @ r
    for _ in range(k):
        Ap = matvec(p)
        alpha = rs / (p @ Ap)
        x += alpha * p
        r -= alpha * Ap
        rs_new = r @ r
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x


def floor_method(p: P.HypergradProblem, k: int) -> Callable[[], torch.Tensor]:
    """k CG steps with explicit Hessian products, plus the outer gradient and the cross term."""
    X, y, Xv, yv, lam, w = p.X, p.y, p.X_val, p.y_val, p.lam, p.w

    if p.kind == "ridge":
        def run():
            reg = lam.exp()
            g = Xv.T @ (Xv @ w - yv)
            v = _cg_fixed(lambda u: X.T @ (X @ u) + reg * u, g, k)
            return -reg * w * v
    else:
        def run():
            reg = lam.exp()
            m = y * (X @ w)
            s = torch.sigmoid(m) * torch.sigmoid(-m)  # curvature weights, computed once
            g = -(Xv.T @ (yv * torch.sigmoid(-yv * (Xv @ w))))
            v = _cg_fixed(lambda u: X.T @ (s * (X @ u)) + reg * u, g, k)
            return -reg * w * v
    return run


def autograd_floor_method(p: P.HypergradProblem, k: int) -> Callable[[], torch.Tensor]:
    """The same hypergradient hand-written with ``torch.autograd`` (no library): the inner
    gradient built once with ``create_graph=True``, k CG steps whose products are double
    backward passes through it, and the cross term by one more.  No certificate, no checks,
    no pytrees: the least any library built on autograd Hessian-vector products can cost.
    Its ratio to the floor is the price of autograd products themselves (the graph's
    elementwise nodes run one by one, where the explicit product is two matvecs)."""
    inner, outer = p.inner, p.outer

    def run():
        lam = p.lam.detach().requires_grad_()
        w = p.w.detach().requires_grad_()
        gw = torch.autograd.grad(outer(lam, w), w)[0]
        (g,) = torch.autograd.grad(inner(lam, w), w, create_graph=True)
        v = _cg_fixed(lambda u: torch.autograd.grad(g, w, u, retain_graph=True)[0], gw, k)
        return -torch.autograd.grad(g, lam, v)[0]
    return run


def dense_method(p: P.HypergradProblem, k=None) -> Callable[[], torch.Tensor]:
    """The exact hypergradient: explicit Hessian and ``torch.linalg.solve``."""
    X, y, Xv, yv, lam, w = p.X, p.y, p.X_val, p.y_val, p.lam, p.w

    def run():
        reg = lam.exp()
        if p.kind == "ridge":
            H = X.T @ X + torch.diag(reg)
            g = Xv.T @ (Xv @ w - yv)
        else:
            m = y * (X @ w)
            s = torch.sigmoid(m) * torch.sigmoid(-m)
            H = X.T @ (s[:, None] * X) + torch.diag(reg)
            g = -(Xv.T @ (yv * torch.sigmoid(-yv * (Xv @ w))))
        return -reg * w * torch.linalg.solve(H, g)
    return run


# ---------------------------------------------------------------------------
# bilevel
# ---------------------------------------------------------------------------
def _cg(k: Optional[int]):
    CG = _bilevel_attr("bilevel.implicit.CG", "bilevel.implicit.linear_solve.CG")
    return None if k is None else CG(maxiter=k, tol=TIGHT)


def ours_method(p: P.HypergradProblem, k: Optional[int]) -> Callable[[], torch.Tensor]:
    """``bilevel.hypergrad(outer, inner, lam, w, solve=CG(maxiter=k))``; ``k=None``: out of the box."""
    hypergrad = _bilevel_attr(*HYPERGRAD_PATHS)
    solve = _cg(k)
    outer, inner, lam, w = p.outer, p.inner, p.lam, p.w
    return lambda: _first_tensor(hypergrad(outer, inner, lam, w, solve=solve))


def ours_custom_root_method(p: P.HypergradProblem, k: Optional[int]) -> Callable[[], torch.Tensor]:
    """``bilevel.custom_root(stationarity(inner), solve=CG(maxiter=k))`` around a solver
    returning the known solution, then ``torch.autograd.grad`` of the outer loss."""
    custom_root = _bilevel_attr(*CUSTOM_ROOT_PATHS)
    stationarity = _bilevel_attr("bilevel.implicit.stationarity", "bilevel.implicit.conditions.stationarity")
    inner, outer, w_star = p.inner, p.outer, p.w

    def inner_objective(w, lam):  # solution first, as optimality conditions are written
        return inner(lam, w)

    @custom_root(stationarity(inner_objective), solve=_cg(k))
    def solver(lam):
        return w_star

    def run():
        lam = p.lam.detach().requires_grad_()
        w = _first_tensor(solver(lam))
        return torch.autograd.grad(outer(lam, w), lam)[0]
    return run


# ---------------------------------------------------------------------------
# TorchOpt
# ---------------------------------------------------------------------------
def _torchopt():
    try:
        import torchopt  # noqa: F401
        import torchopt.diff.implicit  # noqa: F401
        import torchopt.linear_solve  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        raise Unavailable(f"TorchOpt does not import ({type(e).__name__}: {e})")
    return torchopt


def torchopt_method(p: P.HypergradProblem, k: Optional[int]) -> Callable[[], torch.Tensor]:
    """``torchopt.diff.implicit.custom_root`` with ``solve_cg(maxiter=k)``; ``k=None``: its default solve."""
    torchopt = _torchopt()
    inner, outer, w_star = p.inner, p.outer, p.w
    stationarity = torch.func.grad(lambda w, lam: inner(lam, w))
    solve = None if k is None else torchopt.linear_solve.solve_cg(maxiter=k, rtol=TIGHT)

    @torchopt.diff.implicit.custom_root(stationarity, argnums=1, solve=solve)
    def solver(w_init, lam):
        return w_star

    def run():
        lam = p.lam.detach().requires_grad_()
        w = solver(w_star, lam)
        return torch.autograd.grad(outer(lam, w), lam)[0]
    return run


# ---------------------------------------------------------------------------
# JAXopt (jitted, float64)
# ---------------------------------------------------------------------------
_JAX_CACHE: dict = {}


def _jax():
    if "modules" not in _JAX_CACHE:
        try:
            import jax
            jax.config.update("jax_enable_x64", True)
            import jax.numpy as jnp
            import jaxopt
        except Exception as e:
            _JAX_CACHE["modules"] = Unavailable(f"JAX/JAXopt does not import ({type(e).__name__}: {e})")
        else:
            _JAX_CACHE["modules"] = (jax, jnp, jaxopt)
    if isinstance(_JAX_CACHE["modules"], Unavailable):
        raise _JAX_CACHE["modules"]
    return _JAX_CACHE["modules"]


def jaxopt_method(p: P.HypergradProblem, k: Optional[int]) -> Callable[[], np.ndarray]:
    """``jaxopt.implicit_diff.custom_root`` with a k-step CG solve (``k=None``: its default),
    the whole hypergradient under ``jax.jit``; data passed as arguments, not baked-in constants."""
    jax, jnp, jaxopt = _jax()
    logistic = p.kind == "logistic"

    def inner(w, lam, X, y):
        reg = 0.5 * jnp.sum(jnp.exp(lam) * w * w)
        if logistic:
            return jnp.sum(jax.nn.softplus(-y * (X @ w))) + reg
        r = X @ w - y
        return 0.5 * jnp.sum(r * r) + reg

    def outer(w, Xv, yv):
        if logistic:
            return jnp.sum(jax.nn.softplus(-yv * (Xv @ w)))
        r = Xv @ w - yv
        return 0.5 * jnp.sum(r * r)

    solve = None if k is None else functools.partial(jaxopt.linear_solve.solve_cg, maxiter=k, tol=TIGHT)

    @jaxopt.implicit_diff.custom_root(jax.grad(inner), solve=solve)
    def solver(w_init, lam, X, y):
        return w_init  # the known solution is handed in as the initialization

    @jax.jit
    def hypergrad(lam, w_star, X, y, Xv, yv):
        return jax.grad(lambda lam_: outer(solver(w_star, lam_, X, y), Xv, yv))(lam)

    a = p.numpy
    args = [jnp.asarray(v) for v in (a["lam"], p.w.numpy(), a["X"], a["y"], a["X_val"], a["y_val"])]
    return lambda: hypergrad(*args).block_until_ready()


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------
@dataclass
class Result:
    ms: Optional[float] = None
    error: Optional[float] = None
    note: Optional[str] = None  # why there is no figure
    rounds: int = 0


def time_group(methods: dict[str, Callable], problem: P.HypergradProblem, k: Optional[int], repeats: int,
               budget_s: float, warmup: int = 1) -> dict[str, Result]:
    """Build each method for ``(problem, k)``, warm it up, then time all of them in
    interleaved rounds; the median (or, with ``--stat min``, the minimum) per method.

    Rounds stop at ``repeats``, or once ``budget_s`` is spent and at least
    ``min(3, repeats)`` rounds ran (slow out-of-the-box solves).
    """
    results: dict[str, Result] = {}
    live: dict[str, Callable[[], Any]] = {}
    for name, build in methods.items():
        try:
            fn = build(problem, k)
            out = None
            for _ in range(warmup):
                out = fn()
            results[name] = Result(error=problem.relative_error(_to_torch(out)))
            live[name] = fn
        except Unavailable as e:
            results[name] = Result(note=str(e))
        except Exception as e:  # a bug in a method: report it, keep benchmarking the others
            results[name] = Result(note=f"failed: {type(e).__name__}: {e}".splitlines()[0][:200])
            if os.environ.get("BENCH_DEBUG"):
                traceback.print_exc()
    times: dict[str, list[float]] = {name: [] for name in live}
    start = time.perf_counter()
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            if r >= min(3, repeats) and time.perf_counter() - start > budget_s:
                break
            for name, fn in live.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    finally:
        gc.enable()
    for name, ts in times.items():
        results[name].ms = 1e3 * STAT(ts)
        results[name].rounds = len(ts)
    return results


def _to_torch(out) -> torch.Tensor:
    if torch.is_tensor(out):
        return out.detach()
    return torch.from_numpy(np.array(out))


# ---------------------------------------------------------------------------
# Batched independent problems
# ---------------------------------------------------------------------------
def _ridge_single_inner(w, lam, X, y):
    r = X @ w - y
    return 0.5 * (r * r).sum() + 0.5 * (lam.exp() * w * w).sum()


def _ridge_single_outer(w, Xv, yv):
    r = Xv @ w - yv
    return 0.5 * (r * r).sum()


def _generic_hypergrad(w, lam, X, y, Xv, yv, CG, batch_dims: int):
    """IFT hypergradient with torch.func products and bilevel's CG, for one problem
    (``batch_dims=0``) or a stack of independent ones (``batch_dims=1``, vmapped products)."""
    from torch.func import grad, vjp, vmap

    grad_inner = grad(_ridge_single_inner)
    grad_outer = grad(_ridge_single_outer)
    if batch_dims:
        grad_inner, grad_outer = vmap(grad_inner), vmap(grad_outer)
    gw = grad_outer(w, Xv, yv)
    _, hvp = vjp(lambda s: grad_inner(s, lam, X, y), w)  # linearized once; block-diagonal, symmetric
    v, _ = CG(lambda u: hvp(u)[0], gw, batch_dims=batch_dims)
    _, cross = vjp(lambda lam_: grad_inner(w, lam_, X, y), lam)
    return -cross(v)[0]


def batched_benchmark(batch: int, repeats: int, budget_s: float) -> dict:
    """One batched call over ``batch`` ridge problems against a Python loop over them, for each
    path that works: ``vmap(bilevel.hypergrad)``, and the batched linear solve with vmapped HVPs."""
    b = P.ridge_batch(batch=batch)
    data = (b.w, b.lam, b.X, b.y, b.X_val, b.y_val)
    out: dict = {"batch": batch, "d": b.X.shape[2], "n": b.X.shape[1]}
    try:
        CG = _bilevel_attr("bilevel.implicit.CG")()
    except Unavailable as e:
        out["note"] = str(e)
        return out

    candidates = []
    try:  # preferred: bilevel.hypergrad itself under torch.func.vmap
        hypergrad = _bilevel_attr(*HYPERGRAD_PATHS)

        def one(w, lam, X, y, Xv, yv):
            inner = lambda lam_, s: _ridge_single_inner(s, lam_, X, y)  # noqa: E731
            outer = lambda lam_, s: _ridge_single_outer(s, Xv, yv)  # noqa: E731
            return _first_tensor(hypergrad(outer, inner, lam, w, solve=CG))

        candidates.append(("bilevel.hypergrad under torch.func.vmap vs a loop of bilevel.hypergrad",
                           lambda: torch.func.vmap(one)(*data),
                           lambda: torch.stack([one(*(t[i] for t in data)) for i in range(batch)])))
    except Unavailable as e:
        out["vmap_note"] = str(e)
    candidates.append(("batched CG (batch_dims=1) with vmapped HVPs vs a loop of single CG solves",
                       lambda: _generic_hypergrad(*data, CG, batch_dims=1),
                       lambda: torch.stack([_generic_hypergrad(*(t[i] for t in data), CG, batch_dims=0)
                                            for i in range(batch)])))

    def rel(g):
        return float(((g - b.exact).norm(dim=-1) / b.exact.norm(dim=-1)).max())

    for label, batched, loop in candidates:
        try:
            err_b, err_l = rel(batched()), rel(loop())
            if not err_b < 1e-4:
                raise RuntimeError(f"batched result wrong (max relative error {err_b:.2g})")
        except Exception as e:
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            out.setdefault("skipped", []).append(f"{label.split(' vs ')[0]}: {reason}")
            continue
        t_b, t_l = [], []
        start = time.perf_counter()
        for r in range(repeats):
            if r >= min(3, repeats) and time.perf_counter() - start > budget_s:
                break
            t0 = time.perf_counter(); batched(); t_b.append(time.perf_counter() - t0)  # noqa: E702
            t0 = time.perf_counter(); loop(); t_l.append(time.perf_counter() - t0)  # noqa: E702
        out.setdefault("rows", []).append(dict(path=label, batched_ms=1e3 * STAT(t_b), loop_ms=1e3 * STAT(t_l),
                                               err_batched=err_b, err_loop=err_l))
    if not out.get("rows"):
        out["note"] = "no batched path ran"
    return out


# ---------------------------------------------------------------------------
# Problems and the run
# ---------------------------------------------------------------------------
FULL = {
    "ridge100": lambda: P.ridge(100),
    "ridge1000": lambda: P.ridge(1000),
    "logistic": lambda: P.logistic(500),
}
QUICK = {  # same constructions, smaller: a smoke test
    "ridge100": lambda: P.ridge(100, n=500, n_val=250),
    "ridge1000": lambda: P.ridge(200, n=500, n_val=250),
    "logistic": lambda: P.logistic(100, n=1000, n_val=500),
}
K_METHODS = {
    "floor": floor_method,
    "autograd floor": autograd_floor_method,
    "ours": ours_method,
    "ours custom_root": ours_custom_root_method,
    "TorchOpt": torchopt_method,
    "JAXopt (jit)": jaxopt_method,
}
DEFAULT_METHODS = {
    "dense solve": dense_method,
    "ours default": ours_method,
    "TorchOpt default": torchopt_method,
    "JAXopt default (jit)": jaxopt_method,
}
PEERS = {"TorchOpt", "JAXopt (jit)", "TorchOpt default", "JAXopt default (jit)"}


def _versions(peers: bool) -> str:
    import importlib.metadata as md

    parts = []
    for dist in ("bilevel", "torchopt", "jax", "jaxopt") if peers else ("bilevel",):
        try:
            parts.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            parts.append(f"{dist} not installed")
    return ", ".join(parts)


def _fmt_cell(res: Result, floor_ms: Optional[float]) -> str:
    if res.ms is None:
        return "n/a"
    ratio = f"{res.ms / floor_ms:.2f}x" if floor_ms else f"{res.ms:.3g} ms"
    return f"{ratio}, {res.error:.1e}"


def _ratio(a: Result, b: Result) -> str:
    return f"{a.ms / b.ms:.2f}" if a.ms is not None and b.ms is not None else "n/a"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller problems, k = 10, 3 repeats: a smoke test")
    parser.add_argument("--problems", nargs="+", default=None, choices=[*FULL, "batched"],
                        help="which problems (default: all)")
    parser.add_argument("--k", nargs="+", type=int, default=None, help="CG iteration counts (default 10 50 100)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per method (default 9; quick 3)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds per timing group after which rounds stop early (min 3 rounds; default 20)")
    parser.add_argument("--stat", choices=["median", "min"], default="median",
                        help="statistic over the timed rounds (default median; min resists a busy machine)")
    parser.add_argument("--no-peers", action="store_true", help="skip TorchOpt and JAXopt")
    parser.add_argument("--no-default", action="store_true", help="skip the out-of-the-box table")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    global STAT
    STAT = min if args.stat == "min" else statistics.median
    try:  # k-step solves with tol=1e-30 never "converge": bilevel warns every time, as it should
        from bilevel import ConvergenceWarning
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
    except ImportError:
        pass
    warnings.filterwarnings("ignore", category=FutureWarning, module="torchopt")  # its functorch.vjp calls
    problems = args.problems or [*FULL, "batched"]
    ks = args.k or ([10] if args.quick else [10, 50, 100])
    repeats = args.repeats or (3 if args.quick else 9)
    budget = args.budget if args.budget is not None else (2.0 if args.quick else 20.0)
    builders = QUICK if args.quick else FULL
    k_methods = {n: m for n, m in K_METHODS.items() if not (args.no_peers and n in PEERS)}
    d_methods = {n: m for n, m in DEFAULT_METHODS.items() if not (args.no_peers and n in PEERS)}
    t_start = time.perf_counter()

    print("# bilevel hypergradient benchmark" + (" (--quick: smaller problems)" if args.quick else ""))
    print()
    print(f"{datetime.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}), "
          f"float64; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; python {platform.python_version()}")
    busy = _busy()
    print(f"{_versions(not args.no_peers)}; load average at start {_load()}"
          + (f"; CPU busy with other work before the run: {100 * busy:.0f}%" if busy is not None else ""))
    if busy is not None and busy > 0.2:
        print(f"\n**Warning: other processes kept {100 * busy:.0f}% of the CPUs busy before the run; with "
              f"{torch.get_num_threads()} torch threads on a small machine, timings (small problems most) "
              f"are unreliable. Rerun on a quiet machine, or with OMP_WAIT_POLICY=passive and --stat min.**")
    print(f"{args.stat} of up to {repeats} interleaved rounds after one warm-up; hypergradient alone at the exact "
          f"inner solution; error = ||g - g_exact|| / ||g_exact|| with g_exact from a dense solve")
    print()

    notes: dict[str, str] = {}
    k_rows, d_rows = [], []
    for key in (p for p in problems if p != "batched"):
        prob = builders[key]()
        label = f"{prob.name}, n={prob.n} (cond {prob.condition_number():.0f})"
        for k in ks:
            res = time_group(k_methods, prob, k, repeats, budget)
            _collect_notes(res, notes)
            k_rows.append((label, k, res))
        if not args.no_default:
            res = time_group(d_methods, prob, None, repeats, budget)
            _collect_notes(res, notes)
            d_rows.append((label, res))

    if k_rows:
        peers = [n for n in k_methods if n not in ("floor",)]
        print("## CG with k iterations: time / floor, relative error")
        print()
        head = ["problem", "k", "floor ms", "floor error", *peers]
        if "autograd floor" in k_methods:
            head.append("ours / autograd floor")
        if "TorchOpt" in k_methods:
            head.append("TorchOpt / ours")
        if "JAXopt (jit)" in k_methods:
            head.append("ours / JAXopt")
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for label, k, res in k_rows:
            fl = res["floor"]
            cells = [label, str(k), f"{fl.ms:.3g}" if fl.ms else "n/a", f"{fl.error:.1e}" if fl.ms else "n/a"]
            cells += [_fmt_cell(res[n], fl.ms) for n in peers]
            if "autograd floor" in k_methods:
                cells.append(_ratio(res["ours"], res["autograd floor"]))
            if "TorchOpt" in k_methods:
                cells.append(_ratio(res["TorchOpt"], res["ours"]))
            if "JAXopt (jit)" in k_methods:
                cells.append(_ratio(res["ours"], res["JAXopt (jit)"]))
            print("| " + " | ".join(cells) + " |")
        print()

    if d_rows:
        print("## Out of the box (no solver named): ms, relative error")
        print()
        names = list(d_methods)
        head = ["problem", *names] + (["TorchOpt default / ours default"] if "TorchOpt default" in names else [])
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for label, res in d_rows:
            cells = [label] + [f"{res[n].ms:.3g} ms, {res[n].error:.1e}" if res[n].ms is not None else "n/a"
                               for n in names]
            if "TorchOpt default" in names:
                cells.append(_ratio(res["TorchOpt default"], res["ours default"]))
            print("| " + " | ".join(cells) + " |")
        print()

    if "batched" in problems:
        out = batched_benchmark(64, repeats, budget)
        print(f"## Batched: {out['batch']} independent ridge problems (d = {out['d']}, n = {out['n']}), "
              "CG default tolerance")
        print()
        print("| path | loop ms | batched ms | speedup | max rel. error (batched) | max rel. error (loop) |")
        print("|---|---|---|---|---|---|")
        for row in out.get("rows", []):
            print(f"| {row['path']} | {row['loop_ms']:.3g} | {row['batched_ms']:.3g} | "
                  f"{row['loop_ms'] / row['batched_ms']:.1f}x | {row['err_batched']:.1e} | {row['err_loop']:.1e} |")
        if not out.get("rows"):
            print("| n/a | n/a | n/a | n/a | n/a | n/a |")
        print()
        for s in out.get("skipped", []):
            notes.setdefault(f"batched path not used: {s}", "")
        if "note" in out:
            notes.setdefault(f"batched: {out['note']}", "")

    if notes:
        print("Notes:")
        for text in notes:
            print(f"- {text}")
        print()
    elapsed = time.perf_counter() - t_start
    busy = _busy()
    print(f"total time {elapsed:.0f} s; load average at end {_load()}"
          + (f"; CPU busy with other work after the run: {100 * busy:.0f}%" if busy is not None else "")
          + " (other processes on the machine make small-problem ratios noisy)")
    return 0


def _collect_notes(res: dict[str, Result], notes: dict[str, str]) -> None:
    for name, r in res.items():
        if r.note:
            notes.setdefault(f"{name}: {r.note}", "")
        elif r.rounds and r.rounds < 3:
            notes.setdefault(f"{name}: only {r.rounds} timed round(s)", "")


if __name__ == "__main__":
    sys.exit(main())
