"""End-to-end benchmark of ``bilevel.solve``: time, final outer value and memory per method.

Two markdown tables:

1. **solve**: every method (``implicit``, ``unrolled`` with a few ``T``,
   ``one_step``), with its default settings, on the ready-made problems of
   :mod:`bilevel.problems` (quadratic Q with its known optimum, per-feature
   ridge on diabetes, per-feature logistic on breast cancer, hyper-cleaning on
   digits with 50% corrupted labels), with the same outer optimizer, learning
   rate and number of outer steps for all methods of a problem.  Reported:
   total time, time per outer step, the outer value the method saw last, the
   true outer value at the final ``x`` (inner problem solved exactly),
   distance to ``x*`` (Q) and test accuracy of the final inner model
   (classification problems).
2. **memory**: peak memory of ONE outer step (one hypergradient) of
   ``implicit`` and ``unrolled`` as the number of inner steps ``T`` grows
   (``T = 10, 100, 1000``; for ``implicit`` the inner gradient-descent budget
   and the CG budget grow the same way), each case in a fresh subprocess
   (peak resident set size of the step above the resident set before it).

Usage::

    python benchmarks/solve.py                  # full run (a few minutes on 2 cores)
    python benchmarks/solve.py --quick          # smoke test, under a minute
    python benchmarks/solve.py --problems quadratic ridge --max-steps 50
    python benchmarks/solve.py --parts memory --memory-T 10 100 1000 3000

See ``benchmarks/README.md`` for the settings and what each column means.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

import bilevel
from _machine import busy as _busy, load_average as _load  # noqa: E402
from _machine import proc_status_kib as _proc_status  # noqa: E402
from _machine import reset_peak_rss as _reset_peak  # noqa: E402
from bilevel import problems as P
from bilevel.status import BilevelWarning

# ---------------------------------------------------------------------------
# Problems and their settings (one outer optimizer / lr / max_steps per problem)
# ---------------------------------------------------------------------------


@dataclass
class Spec:
    """A ready-made problem with the outer settings shared by every method on it."""

    label: str
    build: Callable[[bool], bilevel.BilevelProblem]  # quick -> problem
    optimizer: str
    lr: float
    max_steps: int
    quick_steps: int
    note: str = ""


PROBLEMS: dict[str, Spec] = {
    "quadratic": Spec(
        "quadratic Q (d=5, m=3)", lambda quick: P.quadratic(), "adam", 0.05, 300, 30,
        "known x*, F*",
    ),
    "ridge": Spec(
        "ridge, diabetes (10 penalties)", lambda quick: P.ridge_diabetes().as_problem(name="ridge_diabetes"),
        "adam", 0.05, 200, 20, "outer: validation sum of squares",
    ),
    "logistic": Spec(
        "logistic, breast cancer (30 penalties)", lambda quick: P.logistic_breast_cancer(), "adam", 0.05, 200, 20,
        "outer: mean validation log-loss",
    ),
    "cleaning": Spec(
        "hyper-cleaning, digits, 50% corrupted (600 weights)",
        lambda quick: P.hyper_cleaning_digits(corruption=0.5), "adam", 0.1, 100, 10,
        "outer: mean validation cross-entropy",
    ),
}


def methods(unrolled_steps: list[int]) -> list[tuple[str, str, dict]]:
    """(label, method name, options) for every method compared: the defaults of each method."""
    out = [("implicit", "implicit", {})]
    out += [(f"unrolled T={t}", "unrolled", {"steps": t}) for t in unrolled_steps]
    out.append(("one_step", "one_step", {}))
    return out


# ---------------------------------------------------------------------------
# Table 1: solve
# ---------------------------------------------------------------------------


@dataclass
class Row:
    label: str
    total_s: Optional[float] = None
    steps: int = 0
    step_ms: Optional[float] = None  # median seconds per outer step (history["time"])
    last_outer: Optional[float] = None  # history["outer"][-1]: F at the method's own last y
    phi: Optional[float] = None  # F(x_final, y*(x_final)), inner problem solved exactly
    distance: Optional[float] = None  # ||x - x*||
    accuracy: Optional[float] = None  # test accuracy of result.y
    warnings: list[str] = field(default_factory=list)
    error: Optional[str] = None


def _warning_summary(records) -> list[str]:
    """One line per warning, e.g. ``ConvergenceWarning at 100 step(s): LBFGS did not converge: ...``."""
    tags = []
    for w in records:
        text = str(w.message)
        if issubclass(w.category, BilevelWarning) and text.startswith("solve: "):
            # "solve: ConvergenceWarning at 96 step(s) (first at step 3); the first: <message>"
            head, _, first = text.partition("; the first: ")
            count = head.split(" at ", 1)[1].split(" (")[0] if " at " in head else ""
            tags.append(f"{w.category.__name__} at {count}: {first}")
        else:
            tags.append(f"{w.category.__name__}: {text}")
    return tags


def exact_outer(problem: bilevel.BilevelProblem, x, y_warm, quick: bool) -> float:
    """The true outer value at ``x``: ``F(x, y*(x))``, ``y*`` in closed form where known, else a
    tight L-BFGS solve warm-started at the method's last ``y``."""
    with torch.no_grad():
        if callable(problem.data.get("inner_solution")):
            y = problem.inner_solution(x)
        else:
            start = y_warm if all(torch.isfinite(t).all() for t in torch.utils._pytree.tree_leaves(y_warm)) \
                else problem.y0
            solver = bilevel.solvers.LBFGS(maxiter=300 if quick else 2000)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", BilevelWarning)
                y, _ = solver.run(lambda y_, x_: problem.inner(x_, y_), start, x)
        return float(problem.outer(x, y))


def run_solve(problem, spec: Spec, label: str, method: str, options: dict, max_steps: int, lr: float,
              quick: bool) -> Row:
    row = Row(label)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        try:
            gc.collect()
            t0 = time.perf_counter()
            result = bilevel.solve(problem, method=method, outer_optimizer=spec.optimizer, lr=lr,
                                   max_steps=max_steps, progress=False, **options)
            row.total_s = time.perf_counter() - t0
            hist = result.history
            row.steps = len(hist["time"])
            row.step_ms = 1e3 * statistics.median(hist["time"]) if hist["time"] else None
            row.last_outer = hist["outer"][-1] if hist["outer"] else None
            row.phi = exact_outer(problem, result.x, result.y, quick)
            if problem.solution is not None and problem.solution.x is not None:
                row.distance = problem.distance_to_solution(result.x)["x"]
            if callable(problem.data.get("accuracy")):
                row.accuracy = float(problem.data["accuracy"](result.y))
        except Exception as e:  # a failing method is a table entry, not a crash
            row.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
            if os.environ.get("BENCH_DEBUG"):
                traceback.print_exc()
    row.warnings = _warning_summary(records)
    return row


def warm_up(method_list) -> None:
    """First use of torch.optim imports torch._dynamo (seconds), first torch.func use imports
    functorch: pay that here, not in the first timed run."""
    p = P.quadratic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _, method, options in method_list:
            try:
                bilevel.solve(p, method=method, max_steps=2, progress=False, **options)
            except Exception:
                pass


def _fmt(v: Optional[float], spec: str = ".4g") -> str:
    return "—" if v is None else format(v, spec)


def print_solve_table(key: str, spec: Spec, problem, rows: list[Row], phi0: float, max_steps: int, lr: float,
                      notes: list[str]) -> None:
    known = problem.solution is not None and problem.solution.x is not None
    has_acc = callable(problem.data.get("accuracy"))
    star = f", F* = {problem.solution.value:.6g}" if problem.solution is not None and \
        problem.solution.value is not None else ""
    print(f"### {spec.label}: {spec.optimizer} lr={lr}, {max_steps} outer steps; "
          f"Φ(x0) = {phi0:.6g}{star}" + (f" ({spec.note})" if spec.note else ""))
    print()
    head = ["method", "total s", "ms / step", "time / implicit", "F last step", "Φ(x final)"]
    if known:
        head.append("‖x − x*‖")
    if has_acc:
        head.append("test acc.")
    head.append("warnings")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    ref = next((r.total_s for r in rows if r.label == "implicit" and r.total_s), None)
    for r in rows:
        if r.error:
            cells = [r.label, f"**failed**: {r.error}"] + [""] * (len(head) - 3)
        else:
            worse = r.phi is not None and (not math.isfinite(r.phi) or r.phi > phi0)
            phi = _fmt(r.phi, ".6g") + (" (worse than x0)" if worse else "")
            wild = r.last_outer is not None and (not math.isfinite(r.last_outer)
                                                 or abs(r.last_outer) > 10 * max(abs(phi0), abs(r.phi or 0.0)))
            last = _fmt(r.last_outer, ".6g") + (" (inner iterate diverged)" if wild else "")
            cells = [r.label, f"{r.total_s:.2f}", _fmt(r.step_ms, ".3g"),
                     f"{r.total_s / ref:.2f}" if ref else "—", last, phi]
            if known:
                cells.append(_fmt(r.distance, ".2e"))
            if has_acc:
                cells.append("—" if r.accuracy is None else f"{100 * r.accuracy:.1f}%")
        tags = []
        for w in r.warnings:
            notes.append(f"{key}, {r.label}: {w}")
            tags.append(f"[{len(notes)}]")
        cells.append(" ".join(tags) or "none")
        print("| " + " | ".join(cells) + " |")
    print()


# ---------------------------------------------------------------------------
# Table 2: peak memory of one outer step, each case in a fresh subprocess
# ---------------------------------------------------------------------------






def _trim() -> None:
    """Give memory freed earlier back to the OS, so that the step cannot hide in it."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _memory_algorithm(method: str, T: int, step_size: float):
    from bilevel.algorithms import Implicit, Unrolled
    from bilevel.implicit import CG
    from bilevel.solvers import GradientDescent

    if method == "implicit":  # T inner gradient steps (same step as unrolled), then T CG iterations
        return Implicit(inner_solver=GradientDescent(maxiter=T, step=step_size, tol=1e-30),
                        solve=CG(maxiter=T, tol=1e-30), outer_optimizer="adam", lr=0.01)
    return Unrolled(steps=T, step_size=step_size, outer_optimizer="adam", lr=0.01)


def memory_case(case: dict) -> dict:
    """Run in a fresh process: one outer step of ``case['method']`` with ``T`` inner steps on
    ridge (n, d); the peak RSS during the step above the RSS right before it."""
    torch.set_num_threads(case["threads"])
    warnings.simplefilter("ignore")  # T-step solves with tol=1e-30 never converge: warnings expected
    method, T = case["method"], case["T"]
    # warm-up on a tiny problem: lazy imports and one-time initializations happen before the baseline
    tiny = P.ridge(n=40, d=8, n_val=20)
    alg = _memory_algorithm(method, 3, 0.01)
    alg.step(tiny, alg.init(tiny))
    problem = P.ridge(n=case["n"], d=case["d"], n_val=case["n_val"])
    with torch.no_grad():  # the same fixed inner step 1/L for both methods
        L = float(torch.linalg.eigvalsh(problem.data["hessian"](problem.x0))[-1])
    alg = _memory_algorithm(method, T, 1.0 / L)
    state = alg.init(problem)
    del tiny
    _trim()
    rss0 = _proc_status("VmRSS")
    hwm_reset = _reset_peak()
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    state = alg.step(problem, state)
    seconds = time.perf_counter() - t0
    if hwm_reset and _proc_status("VmHWM") is not None:
        peak, how = _proc_status("VmHWM") - rss0, "VmHWM"
    else:  # no reset possible: the high-water mark of the whole process, from before the step
        peak, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - max(rss0 or 0, maxrss0), "ru_maxrss"
    info = state.info
    tensor_peak = _tensor_peak(lambda: alg.step(problem, state)) if case.get("profile", True) else None
    data_mb = sum(t.numel() * t.element_size() for t in (problem.data["X"], problem.data["X_val"])) / 2**20
    return dict(method=method, T=T, peak_mb=peak / 1024, baseline_mb=(rss0 or maxrss0) / 1024, seconds=seconds,
                how=how, data_mb=data_mb, outer=info.outer, grad_norm=info.hypergradient_norm,
                tensor_peak_mb=tensor_peak)


def _tensor_peak(fn: Callable[[], Any]) -> Optional[float]:
    """Peak of the bytes allocated by ``fn`` and not yet freed (MiB), from the allocation and free
    records of ``torch.profiler`` (``profile_memory=True``): exact tensor bytes, no allocator or
    page effects, Python objects not counted.  ``None`` where the records cannot be read."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                         if e.name() == "[memory]")
    except Exception:  # noqa: BLE001 - a private-ish profiler API: report n/a rather than fail
        return None
    current = peak = 0
    for _, nbytes in records:
        current += nbytes
        peak = max(peak, current)
    return peak / 2**20


def run_memory_case(case: dict, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-case", json.dumps(case)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return dict(case, error=f"timed out after {timeout:.0f} s")
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        err = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(case, error=f"exit {out.returncode}: {err}"[:200])
    return json.loads(lines[-1])


def print_memory_table(results: list[dict], size: dict) -> None:
    ok = [r for r in results if "error" not in r]
    data = f" (X and X_val: {ok[0]['data_mb']:.1f} MiB)" if ok else ""
    print(f"## Peak memory of one outer step (one hypergradient), ridge n = {size['n']}, d = {size['d']}{data}")
    print()
    print("implicit: T gradient-descent inner steps (fixed step 1/L) then T CG iterations (tol 1e-30, so all T run); "
          "unrolled: reverse mode through T gradient steps of the same size. Each case in a fresh process.")
    print()
    print("| method | T | RSS peak above pre-step RSS, MiB | ratio to smallest T | tensor peak (profiler), MiB | "
          "ratio to smallest T | pre-step RSS, MiB | step s | outer (step) |")
    print("|---|---|---|---|---|---|---|---|---|")
    first: dict[tuple[str, str], float] = {}

    def ratio(r, key):
        value = r.get(key)
        if value is None:
            return "—"
        base = first.setdefault((r["method"], key), value)
        return f"{value / base:.2f}" if base > 0 else "—"

    for r in results:
        if "error" in r:
            print(f"| {r['method']} | {r['T']} | **failed**: {r['error']} |  |  |  |  |  |  |")
            continue
        tensor = "n/a" if r.get("tensor_peak_mb") is None else f"{r['tensor_peak_mb']:.3f}"
        print(f"| {r['method']} | {r['T']} | {r['peak_mb']:.2f} | {ratio(r, 'peak_mb')} | {tensor} | "
              f"{ratio(r, 'tensor_peak_mb')} | {r['baseline_mb']:.0f} | {r['seconds']:.2f} | {r['outer']:.6g} |")
    print()
    for method, target in (("implicit", "target <= 1.05: flat"), ("unrolled", "expected to grow ~linearly in T")):
        rs = [r for r in ok if r["method"] == method]
        if len(rs) < 2:
            continue
        lo, hi = rs[0], rs[-1]
        parts = []
        if lo["peak_mb"] > 0:
            per_step = 1024 * (hi["peak_mb"] - lo["peak_mb"]) / (hi["T"] - lo["T"])
            parts.append(f"RSS **{hi['peak_mb'] / lo['peak_mb']:.2f}** ({hi['peak_mb']:.2f} vs {lo['peak_mb']:.2f} "
                         f"MiB, {per_step:.1f} KiB per extra inner step)")
        if lo.get("tensor_peak_mb") and hi.get("tensor_peak_mb") is not None:
            per_step = 1024 * (hi["tensor_peak_mb"] - lo["tensor_peak_mb"]) / (hi["T"] - lo["T"])
            parts.append(f"tensors **{hi['tensor_peak_mb'] / lo['tensor_peak_mb']:.2f}** "
                         f"({hi['tensor_peak_mb']:.3f} vs {lo['tensor_peak_mb']:.3f} MiB, {per_step:.2f} KiB per "
                         "extra inner step)")
        print(f"- {method}(T={hi['T']}) / {method}(T={lo['T']}) ({target}): " + "; ".join(parts))
    hows = {r.get("how") for r in ok}
    if hows:
        print(f"- RSS: {', '.join(sorted(hows))} (peak resident set, reset right before the step) minus VmRSS "
              "before it; page granularity, and glibc grows its heap in ~128 KiB steps, so differences below "
              "~0.2 MiB are noise. Tensor peak: allocation/free records of torch.profiler(profile_memory=True) "
              "over a second, profiled step; exact tensor bytes, no Python or autograd-node overhead.")
    print()


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: few outer steps, unrolled T=10 only, memory at a smaller size and T=10, 100")
    parser.add_argument("--problems", nargs="+", choices=list(PROBLEMS), default=None,
                        help="problems of the solve table (default: all)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="outer steps for every problem (default: per problem, see the README)")
    parser.add_argument("--lr", type=float, default=None, help="outer learning rate for every problem "
                        "(default: per problem)")
    parser.add_argument("--unrolled-steps", nargs="+", type=int, default=None,
                        help="T of the unrolled rows of the solve table (default 10 100; quick 10)")
    parser.add_argument("--parts", nargs="+", choices=["solve", "memory"], default=["solve", "memory"],
                        help="which tables (default both)")
    parser.add_argument("--memory-T", nargs="+", type=int, default=None,
                        help="inner steps T of the memory table (default 10 100 1000; quick 10 100)")
    parser.add_argument("--memory-size", nargs=2, type=int, metavar=("N", "D"), default=None,
                        help="ridge rows and features of the memory table (default 2000 1000; quick 600 300)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)  # internal: one subprocess case
    args = parser.parse_args(argv)

    if args.memory_case is not None:
        print(json.dumps(memory_case(json.loads(args.memory_case))))
        return 0

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    keys = args.problems or list(PROBLEMS)
    unrolled_steps = args.unrolled_steps or ([10] if args.quick else [10, 100])
    memory_T = args.memory_T or ([10, 100] if args.quick else [10, 100, 1000])
    n_mem, d_mem = args.memory_size or ((600, 300) if args.quick else (2000, 1000))

    print("# bilevel.solve benchmark" + (" (--quick: few outer steps, smaller memory problem)" if args.quick else ""))
    print()
    print(f"{datetime.datetime.now().isoformat(timespec='seconds')}; bilevel {bilevel.__version__}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}")
    busy = _busy()
    print(f"load average at start {_load()}"
          + (f"; CPU busy with other work before the run: {100 * busy:.0f}%" if busy is not None else ""))
    if busy is not None and busy > 0.2:
        print(f"\n**Warning: other processes kept {100 * busy:.0f}% of the CPUs busy before the run; "
              "timings are unreliable (ratios less so).**")
    print()

    notes: list[str] = []
    if "solve" in args.parts:
        method_list = methods(unrolled_steps)
        warm_up(method_list)
        print("## solve: each method with its default settings, same outer optimizer / lr / steps per problem")
        print()
        print("F last step: the outer value the method reported at its last step (at its own inner iterate); "
              "Φ(x final) = F(x, y*(x)) at the final x with the inner problem solved exactly (closed form, "
              "or L-BFGS to tolerance); test acc.: the method's final inner model on the test split.")
        print()
        for key in keys:
            spec = PROBLEMS[key]
            max_steps = args.max_steps or (spec.quick_steps if args.quick else spec.max_steps)
            lr = args.lr if args.lr is not None else spec.lr
            try:
                problem = spec.build(args.quick)
                phi0 = exact_outer(problem, problem.x0, problem.y0, args.quick)
            except Exception as e:
                print(f"### {spec.label}: **failed to build**: {type(e).__name__}: {e}")
                print()
                continue
            rows = [run_solve(problem, spec, label, method, options, max_steps, lr, args.quick)
                    for label, method, options in method_list]
            print_solve_table(key, spec, problem, rows, phi0, max_steps, lr, notes)
        if notes:
            print("Warnings (one per category and run; bilevel.solve counts the steps):")
            print()
            for i, text in enumerate(notes, 1):
                print(f"{i}. {text[:300]}")
            print()

    if "memory" in args.parts:
        size = dict(n=n_mem, d=d_mem, n_val=max(1, n_mem // 2))
        results = []
        for method in ("implicit", "unrolled"):
            for T in memory_T:
                case = dict(method=method, T=T, threads=args.threads, **size)
                results.append(run_memory_case(case, timeout=600))
        print_memory_table(results, size)

    elapsed = time.perf_counter() - t_start
    print(f"total time {elapsed:.0f} s; load average at end {_load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
