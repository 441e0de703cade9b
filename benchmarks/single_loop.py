"""Iterations and wall time to a given accuracy: the single-loop methods against implicit and unrolled.

One markdown table: every method of ``bilevel.solve`` that applies, with **its
default settings** (the outer learning rate too: ``bilevel.solve``'s default,
Adam with ``lr=1e-2``, for implicit / unrolled / one_step; the single-loop
methods derive their steps from curvature estimates at the start point), on

* the toy problems with known answers of ``bilevel.problems`` (ALGORITHMS.md,
  section 8): Q (``quadratic()``), M1 (``nonunique_lower_level(n=100)``) and L
  (``coupled_constraint()``, only ``lvhba`` handles its inner constraint; it
  runs with the problem's exact projection and without it), target
  ``||x - x*|| / ||x*|| <= 1e-2``, each run stopped by the callback once the
  target is reached and held;
* data hyper-cleaning on digits (``hyper_cleaning_digits()``, 50 % corrupted
  labels), target: test accuracy >= 85 % of the classifier retrained at the
  method's ``x`` (``y*(x)`` by L-BFGS; the unweighted classifier gets 66 %,
  the one trained on the clean half only 95 %), also reporting the
  hyper-objective ``Phi(x) = F(x, y*(x))`` (validation cross-entropy) where
  the run stopped.

Reported per run: iterations and wall time to the target (or "not reached"),
median milliseconds per step, where and with what error the run stopped, and
the warnings ``bilevel.solve`` issued; then a few lines on which method wins
where, computed from the table.

Usage::

    python benchmarks/single_loop.py                 # full run (about 10 minutes on 2 busy cores)
    python benchmarks/single_loop.py --quick         # smoke test (~15 s)
    python benchmarks/single_loop.py --problems Q M1 --methods implicit meha bda --budget 5000

See ``benchmarks/README.md`` ("Single-loop methods") for the settings and columns.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import busy as _busy  # noqa: E402
from _machine import load_average as _load  # noqa: E402

import bilevel  # noqa: E402
from bilevel import problems as P  # noqa: E402
from bilevel._tree import tree_leaves  # noqa: E402
from bilevel.algorithms import METHODS  # noqa: E402
from bilevel.status import BilevelWarning  # noqa: E402

# the table's order: the classical hypergradient methods, then the single-loop / aggregation ones
METHOD_ORDER = ("implicit", "unrolled", "one_step", "soba", "penalty", "meha", "bamm", "bda", "lvhba")
CLASSICAL = ("implicit", "unrolled", "one_step", "soba")
PROBLEM_ORDER = ("Q", "M1", "L", "cleaning")
PROBLEM_LABELS = {
    "Q": "Q (quadratic, d=5, m=3)",
    "M1": "M1 (non-unique LL, n=100)",
    "L": "L (coupled y <= x, n=10)",
    "cleaning": "hyper-cleaning (digits, 50% corrupt)",
}


# ---------------------------------------------------------------------------
# One run: bilevel.solve with a callback that measures progress
# ---------------------------------------------------------------------------


@dataclass
class Run:
    """The outcome of one method on one problem."""

    problem: str
    label: str
    method: str
    hit_step: Optional[int] = None  # first step of the stretch within the target that lasted
    hit_time: Optional[float] = None  # seconds from the call of bilevel.solve to hit_step (callback excluded)
    stop_step: int = 0
    stop_metric: Optional[float] = None  # relative error (toys) or Phi (hyper-cleaning) where the run stopped
    step_ms: Optional[float] = None  # median of history["time"]
    status: str = ""  # "reached", "budget", "stalled", "error", "rejected"
    reason: str = ""  # error / rejection message
    crossings: int = 0  # times the target was reached and then left again (toys)
    acc_star: Optional[float] = None  # hyper-cleaning: test accuracy of y*(x final)
    acc_own: Optional[float] = None  # hyper-cleaning: test accuracy of the method's own final y
    warnings: list = field(default_factory=list)
    traceback: str = ""


class Tracker:
    """The callback of ``bilevel.solve``: measures the metric, keeps the clock without its own
    time, and stops the run when the target is reached and held (or when the run stalls).

    ``metric(state) -> float`` (lower is better) is evaluated every ``every`` steps and at the
    last one.  With ``tol`` set (toys), a run is stopped once the metric has been ``<= tol`` for
    ``max(50, hit / 10)`` steps in a row (a method passing through the target does not count),
    or, with ``stall`` set, when the best metric of the second half of the run so far is not
    1 % better than that of the first half (checked every 100 steps from step 1000 on).
    """

    def __init__(self, metric: Callable[[Any], float], budget: int, every: int = 1,
                 tol: Optional[float] = None, stall: bool = False):
        self.metric, self.budget, self.every, self.tol, self.stall = metric, budget, every, tol, stall
        self.start = time.perf_counter()
        self.overhead = 0.0
        self.values: list[float] = []  # metric at every evaluation
        self.step_times: list[float] = []
        self.candidate: Optional[tuple[int, float]] = None
        self.crossings = 0
        self.reached = False
        self.stalled = False
        self.state = None

    def elapsed(self, now: float) -> float:
        return now - self.start - self.overhead

    def __call__(self, state, record) -> bool:
        now = time.perf_counter()
        try:
            self.state = state
            self.step_times.append(record["time"])
            k = state.iteration
            if k % self.every and k < self.budget:
                return False
            value = float(self.metric(state))
            self.values.append(value)
            if self.tol is None:
                return False
            if value <= self.tol:
                if self.candidate is None:
                    self.candidate = (k, self.elapsed(now))
                if k - self.candidate[0] >= max(50, math.ceil(self.candidate[0] / 10)):
                    self.reached = True
                    return True
            elif self.candidate is not None:
                self.candidate = None
                self.crossings += 1
            n = len(self.values)
            if self.stall and self.candidate is None and k >= 1000 and k % 100 == 0:
                before, recent = min(self.values[: n // 2]), min(self.values[n // 2:])
                if not recent < 0.99 * before:
                    self.stalled = True
                    return True
            return False
        finally:
            self.overhead += time.perf_counter() - now


def _short(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}"[:140]


def _warning_tags(records) -> list[str]:
    """``CurvatureWarning at 96 step(s): <first message>`` per category that bilevel.solve issued."""
    tags = []
    for w in records:
        text = str(w.message)
        if issubclass(w.category, BilevelWarning) and text.startswith("solve: "):
            head, _, first = text.partition("; the first: ")
            count = head.split(" at ", 1)[1].split(" (")[0] if " at " in head else ""
            tags.append(f"{w.category.__name__} at {count}: {first}")
        elif not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning)):
            tags.append(f"{w.category.__name__}: {text}")
    return tags


def run_one(problem, key: str, label: str, method: str, budget: int, tracker_args: dict,
            metric: Callable, options: Optional[dict] = None) -> tuple[Run, Tracker]:
    run = Run(key, label, method)
    tracker = Tracker(metric, budget, **tracker_args)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        try:
            tracker.start = time.perf_counter()
            bilevel.solve(problem, method=method, max_steps=budget, progress=False, callback=tracker,
                          **(options or {}))
        except Exception as err:  # a failing method is a table entry, not a crash
            run.status, run.reason = "error", _short(err)
            run.traceback = traceback.format_exc()
            if os.environ.get("BENCH_DEBUG"):
                traceback.print_exc()
    run.warnings = _warning_tags(records)
    state = tracker.state
    run.stop_step = 0 if state is None else state.iteration
    run.step_ms = 1e3 * statistics.median(tracker.step_times) if tracker.step_times else None
    run.crossings = tracker.crossings
    if tracker.values:
        run.stop_metric = tracker.values[-1]
    if tracker.candidate is not None and tracker.tol is not None:  # held until the stop (or the budget)
        run.hit_step, run.hit_time = tracker.candidate
    if not run.status:
        run.status = "reached" if run.hit_step is not None else ("stalled" if tracker.stalled else "budget")
    return run, tracker


# ---------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------


def relative_error(problem) -> Callable:
    star = [t.detach() for t in tree_leaves(problem.solution.x)]
    norm = math.sqrt(sum(float((t * t).sum()) for t in star))

    def metric(state) -> float:
        with torch.no_grad():
            return math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(tree_leaves(state.x), star))) / norm

    return metric


def without_projection(problem):
    """Problem L without ``data["project"]``: LV-HBA then computes the projection onto C itself."""
    data = {k: v for k, v in problem.data.items() if k != "project"}
    return replace(problem, data=data, name=problem.name + " (no projection)")


class Cleaning:
    """Hyper-cleaning.  The tracked metric is the test error of the classifier retrained at ``x``,
    ``y*(x)`` by L-BFGS warm-started at the previous evaluation's; ``Phi(x) = F(x, y*(x))`` is kept
    on the side."""

    def __init__(self, quick: bool):
        self.problem = P.hyper_cleaning_digits(corruption=0.5)
        self.accuracy = self.problem.data["accuracy"]
        self.maxiter = 100 if quick else 500
        self.reset()
        self.phi0 = self.phi(self.problem.x0)
        self.acc0 = self.accuracy(self.y_star)
        # reference: weight 1 on the clean training examples only, 0 on the corrupted ones
        self.reset()
        oracle = torch.where(self.problem.data["corrupted"], -30.0, 30.0).to(self.problem.x0)
        self.phi_oracle = self.phi(oracle)
        self.acc_oracle = self.accuracy(self.y_star)
        self.reset()

    def reset(self) -> None:
        self.y_warm = self.problem.y0
        self.y_star = None
        self.last_phi = None

    def phi(self, x) -> float:
        from bilevel.solvers import LBFGS

        p = self.problem
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BilevelWarning)
            y, _ = LBFGS(maxiter=self.maxiter).run(lambda y_, x_: p.inner(x_, y_), self.y_warm, x.detach())
        self.y_warm = self.y_star = y
        with torch.no_grad():
            self.last_phi = float(p.outer(x, y))
        return self.last_phi

    def metric(self, state) -> float:
        self.phi(state.x)
        return 1.0 - self.accuracy(self.y_star)


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------


def applies(method: str, key: str) -> bool:
    return (method == "lvhba") == (key == "L")


def toy_runs(key: str, methods: list[str], budget: int, stall: bool) -> list[Run]:
    problem = {"Q": P.quadratic, "M1": lambda: P.nonunique_lower_level(n=100), "L": P.coupled_constraint}[key]()
    metric = relative_error(problem)
    tracker_args = dict(tol=TOL, stall=stall)
    runs = []
    rejected = []
    for method in methods:
        if key == "L" and method != "lvhba":
            # bilevel.solve must refuse methods without constraint support: check that it does
            run, _ = run_one(problem, key, method, method, 1, {}, metric)
            if run.status == "error" and "does not handle inner constraints" in run.reason:
                rejected.append(method)
                continue
            runs.append(run)
            continue
        if not applies(method, key):
            continue
        if method == "lvhba":
            for label, prob in (("lvhba (exact projection)", problem),
                                ("lvhba (no projection)", without_projection(problem))):
                runs.append(run_one(prob, key, label, method, budget, tracker_args, metric)[0])
        else:
            runs.append(run_one(problem, key, method, method, budget, tracker_args, metric)[0])
    if rejected:
        runs.append(Run(key, ", ".join(rejected), "", status="rejected",
                        reason="rejected by bilevel.solve (ValueError: does not handle inner constraints)"))
    return runs


def cleaning_runs(cleaning: Cleaning, methods: list[str], budget: int, every: int, target_acc: float) -> list[Run]:
    runs = []
    for method in methods:
        if not applies(method, "cleaning"):
            continue
        cleaning.reset()
        run, tracker = run_one(cleaning.problem, "cleaning", method, method, budget,
                               dict(every=every, tol=1.0 - target_acc), cleaning.metric)
        run.stop_metric = cleaning.last_phi
        if tracker.state is not None and cleaning.y_star is not None:
            run.acc_star = cleaning.accuracy(cleaning.y_star)
            run.acc_own = cleaning.accuracy(tracker.state.y)
        runs.append(run)
    return runs


TOL = 1e-2


def _cell_metric(r: Run) -> str:
    if r.stop_metric is None:
        return "—"
    if r.problem == "cleaning":
        return f"Φ = {r.stop_metric:.4f}"
    return f"{r.stop_metric:.2e}"


def print_table(runs: list[Run], notes: list[str]) -> None:
    head = ["problem", "method", "iterations to target", "time to target, s", "ms / step",
            "error (toys) / Φ (cleaning) at stop", "stopped at step", "test acc. y*(x) / own y", "notes"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    last = None
    for r in runs:
        problem = PROBLEM_LABELS[r.problem] if r.problem != last else ""
        last = r.problem
        if r.status == "rejected":
            print(f"| {problem} | {r.label} | — | — | — | — | — | — | {r.reason} |")
            continue
        if r.status == "reached":
            its, secs = f"{r.hit_step}", f"{r.hit_time:.2f}"
        elif r.status == "error":
            its, secs = f"error: {r.reason}", "—"
        elif r.status == "stalled":
            its, secs = "not reached (stalled)", "—"
        else:
            its, secs = "not reached (budget)", "—"
        acc = "—" if r.acc_star is None else f"{100 * r.acc_star:.1f}% / {100 * r.acc_own:.1f}%"
        tags = []
        if r.crossings:
            tags.append(f"passed through the target {r.crossings}× before")
        if r.status == "error" and r.traceback:
            tags.append("traceback below the table")
        for w in r.warnings:
            notes.append(f"{r.problem}, {r.label}: {w[:300]}")
            tags.append(f"{w.split(':')[0]} [{len(notes)}]")
        cells = [problem, r.label, its, secs, "—" if r.step_ms is None else f"{r.step_ms:.3g}", _cell_metric(r),
                 str(r.stop_step), acc, "; ".join(tags) or ""]
        print("| " + " | ".join(cells) + " |")
    print()


def print_wins(runs: list[Run], keys: list[str]) -> None:
    print("## Who wins where (from the table)")
    print()
    for key in keys:
        rs = [r for r in runs if r.problem == key and r.status not in ("rejected",)]
        if not rs:
            continue
        ok = [r for r in rs if r.status == "reached"]
        name = PROBLEM_LABELS[key]
        if not ok:
            print(f"- {name}: no method reached the target within the budget.")
            continue
        by_time = sorted(ok, key=lambda r: r.hit_time)
        fewest = min(r.hit_step for r in ok)
        line = f"- {name}: fastest to the target **{by_time[0].label}** ({by_time[0].hit_time:.2f} s, " \
               f"{by_time[0].hit_step} iterations)"
        if len(by_time) > 1:
            line += f", {by_time[1].hit_time / max(by_time[0].hit_time, 1e-9):.1f}× ahead of {by_time[1].label}"
        line += f"; fewest iterations **{', '.join(r.label for r in ok if r.hit_step == fewest)}** ({fewest})"
        classical = [r for r in ok if r.method in CLASSICAL]
        single = [r for r in ok if r.method not in CLASSICAL]
        if classical and single:
            c, s = min(classical, key=lambda r: r.hit_time), min(single, key=lambda r: r.hit_time)
            if {c.label, s.label} != {r.label for r in by_time[:2]}:
                if s.hit_time < c.hit_time:
                    line += f"; best single-loop/aggregation method {s.label} is {c.hit_time / s.hit_time:.1f}× " \
                            f"faster than the best classical one ({c.label})"
                else:
                    line += f"; best classical method {c.label} is {s.hit_time / c.hit_time:.1f}× faster " \
                            f"than the best single-loop/aggregation one ({s.label})"
        elif single and any(r.method in CLASSICAL for r in rs):
            line += "; no classical method (implicit, unrolled, one_step, soba) reached it"
        elif classical and any(r.method not in CLASSICAL for r in rs):
            line += "; no single-loop/aggregation method reached it"
        missed = [r for r in rs if r.status != "reached"]
        if missed:
            parts = []
            for r in missed:
                if r.status == "error":
                    parts.append(f"{r.label} (error)")
                elif r.acc_star is not None:
                    parts.append(f"{r.label} (test acc. {100 * r.acc_star:.1f}% at step {r.stop_step}, {r.status})")
                else:
                    parts.append(f"{r.label} ({_cell_metric(r)} at step {r.stop_step}, {r.status})")
            line += "; not reached: " + ", ".join(parts)
        print(line + ".")
    print()


def warm_up(methods: list[str]) -> None:
    """The first torch.optim optimizer imports torch._dynamo, the first torch.func call functorch
    (seconds): pay that before the first timed run."""
    q, lc = P.quadratic(), P.coupled_constraint()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for method in methods:
            try:
                bilevel.solve(lc if method == "lvhba" else q, method=method, max_steps=2, progress=False)
            except Exception:  # noqa: BLE001 - the timed run reports it
                pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: toy budget 40, hyper-cleaning budget 6 (evaluated every 3 steps)")
    parser.add_argument("--problems", nargs="+", choices=PROBLEM_ORDER, default=None,
                        help="problems (default: all)")
    parser.add_argument("--methods", nargs="+", choices=METHOD_ORDER, default=None,
                        help="methods (default: all that apply)")
    parser.add_argument("--budget", type=int, default=None, help="steps per run on the toys (default 20000)")
    parser.add_argument("--cleaning-budget", type=int, default=None,
                        help="steps per run on hyper-cleaning (default 500)")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="hyper-cleaning: retrain at x and evaluate every N steps (default 10)")
    parser.add_argument("--cleaning-target", type=float, default=0.85,
                        help="hyper-cleaning: target test accuracy of the classifier retrained at x (default 0.85)")
    parser.add_argument("--no-stall-stop", action="store_true",
                        help="toys: run to the budget even when the error has stopped improving")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    keys = [k for k in PROBLEM_ORDER if k in (args.problems or PROBLEM_ORDER)]
    methods = [m for m in METHOD_ORDER if m in (args.methods or METHOD_ORDER)]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"methods not in this version of bilevel: {unknown}")
        methods = [m for m in methods if m in METHODS]
    budget = args.budget or (40 if args.quick else 20000)
    cleaning_budget = args.cleaning_budget or (6 if args.quick else 500)
    every = args.eval_every or (3 if args.quick else 10)

    print("# Single-loop methods: iterations and time to a given accuracy"
          + (" (--quick: smoke test, tiny budgets)" if args.quick else ""))
    print()
    print(f"{datetime.datetime.now().isoformat(timespec='seconds')}; bilevel {bilevel.__version__}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float64; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}")
    busy = _busy()
    print(f"load average at start {_load()}"
          + (f"; CPU busy with other work before the run: {100 * busy:.0f}%" if busy is not None else ""))
    if busy is not None and busy > 0.2:
        print(f"\n**Warning: other processes kept {100 * busy:.0f}% of the CPUs busy before the run; "
              "timings are inflated and noisy.**")
    print()

    warm_up(methods)
    runs: list[Run] = []
    for key in keys:
        if key == "cleaning":
            try:
                cleaning = Cleaning(args.quick)
            except Exception as err:  # e.g. scikit-learn missing
                print(f"hyper-cleaning: **failed to build**: {_short(err)}\n")
                continue
            runs += cleaning_runs(cleaning, methods, cleaning_budget, every, args.cleaning_target)
        else:
            runs += toy_runs(key, methods, budget, stall=not args.no_stall_stop)

    print(f"Budgets: {budget} steps per run on the toys, {cleaning_budget} on hyper-cleaning. Every method with "
          "its defaults; implicit / unrolled / one_step with bilevel.solve's default outer optimizer (Adam, "
          "lr = 1e-2), the single-loop methods with the steps they derive from curvature estimates at the start.")
    print()
    notes: list[str] = []
    print_table(runs, notes)
    print(f"Toys (Q, M1, L): target ‖x − x*‖ / ‖x*‖ ≤ {TOL:g}, reached at the first step of a stretch within the "
          "target that lasted max(50, 10 % of the step) steps (a method that passes through x* and leaves "
          "does not count; the run stops at the end of that stretch: 'stopped at step'); 'not reached "
          "(stalled)': stopped early because the best error of the second half of the run was not 1 % below "
          "that of the first half (checked from step 1000 on; --no-stall-stop runs to the budget).")
    if "cleaning" in keys and "cleaning" in {r.problem for r in runs}:
        print(f"Hyper-cleaning: target test accuracy ≥ {100 * args.cleaning_target:g}% of the classifier "
              f"retrained at x (y*(x) by L-BFGS, warm-started), evaluated every {every} steps and at the last, "
              "held as on the toys; Φ(x) = F(x, y*(x)), the validation cross-entropy, where the run stopped. "
              f"References: unweighted (x0) Φ = {cleaning.phi0:.4f}, test acc. {100 * cleaning.acc0:.1f}%; "
              f"trained on the clean half only Φ = {cleaning.phi_oracle:.4f}, test acc. "
              f"{100 * cleaning.acc_oracle:.1f}%. Test acc. column: the classifier retrained at the final x / "
              "the method's own final y (single-loop methods move y towards the validation loss too).")
    print("Time: from the call of bilevel.solve (setup included) to the step, without the benchmark's "
          "own measurements. lvhba runs only on L (it needs inner constraints) and is the only method "
          "bilevel.solve accepts there; the others are tried on L and must be rejected.")
    print()
    if notes:
        print("Notes:")
        print()
        for i, text in enumerate(notes, 1):
            print(f"{i}. {text}")
        print()
    failures = [r for r in runs if r.status == "error" and r.traceback]
    if failures:
        print("Failures:")
        print()
        for r in failures:
            print(f"- {r.problem}, {r.label}:")
            print()
            print("```")
            print(r.traceback.rstrip())
            print("```")
            print()
    print_wins(runs, keys)
    print(f"total time {time.perf_counter() - t_start:.0f} s; load average at end {_load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
