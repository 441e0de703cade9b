"""Nyström PCG and the Nyström approximate inverse against plain CG on ridge Hessians.

The systems are ``H x = b`` with ``H = X^T X + diag(exp(lam))`` (float64, ``X`` of
``n`` rows and ``d`` columns, ``lam ~ N(0, 0.5^2)``, ``b ~ N(0, 1)``), applied only
through the product ``v -> X^T (X v) + exp(lam) * v``, for three spectra of ``X``:

* ``flat``: iid Gaussian entries (Marchenko-Pastur spectrum, well conditioned);
* ``outliers``: the same with 5 columns scaled by 100 (a few huge eigenvalues);
* ``decaying``: column scales falling geometrically from 1 to 1e-2.

Each spectrum is solved to one tolerance (``--tol``, default 1e-10) by
``bilevel.implicit.CG``, by ``bilevel.implicit.Nystrom`` as a CG preconditioner
(rank 10 and 50) and by ``Nystrom`` alone (``maxiter=0``: ``x = P b``, rank 50 and
200).  Reported per solver: the products it spent (``info.iterations``, the
sketch included), whether it converged, its relative residual, its relative
error against ``torch.linalg.solve`` on the explicit ``H``, the median time over
interleaved rounds (one call of every solver of a spectrum per round, after a
warm-up call) and that time over CG's, measured side by side in the same run.
A line under the table, computed from it, says where Nyström PCG beats CG.

Usage::

    python benchmarks/nystrom.py                  # full run, n = 2000, d = 500
    python benchmarks/nystrom.py --quick          # smoke test, n = 300, d = 60, 2 rounds (a few seconds)
    python benchmarks/nystrom.py --n 5000 --d 1000 --repeats 5 --spectra outliers decaying
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
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import load_report  # noqa: E402

import bilevel  # noqa: E402
from bilevel import ConvergenceWarning  # noqa: E402

Matvec = Callable[[torch.Tensor], torch.Tensor]
Solver = Callable[[Matvec, torch.Tensor], tuple]

SPECTRA = ("flat", "outliers", "decaying")
SPECTRUM_LABELS = {
    "flat": "flat (iid Gaussian)",
    "outliers": "outliers (5 columns x100)",
    "decaying": "decaying (scales 1 to 1e-2)",
}
PCG_RANKS = (10, 50)
ALONE_RANKS = (50, 200)
HEADER = "| spectrum | solver | products | converged | rel. residual | rel. error | ms | time / CG |"


# ---------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------


@dataclass
class Problem:
    """One ridge system ``(X^T X + diag(reg)) x = b`` with its dense reference solution."""

    spectrum: str
    X: torch.Tensor
    reg: torch.Tensor
    b: torch.Tensor
    exact: torch.Tensor
    condition: float

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.X.T @ (self.X @ v) + self.reg * v


def column_scales(spectrum: str, d: int) -> torch.Tensor:
    """The factor applied to each column of the Gaussian matrix for ``spectrum``."""
    scales = torch.ones(d, dtype=torch.float64)
    if spectrum == "outliers":
        scales[:min(5, d)] = 100.0
    elif spectrum == "decaying":
        scales = torch.logspace(0, -2, d, dtype=torch.float64)
    elif spectrum != "flat":
        raise ValueError(f"unknown spectrum {spectrum!r}")
    return scales


def build_problem(spectrum: str, n: int, d: int, seed: int) -> Problem:
    """Draws ``X``, ``lam`` and ``b`` (in that order, from one seeded generator) for ``spectrum``."""
    generator = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, d, dtype=torch.float64, generator=generator)
    lam = 0.5 * torch.randn(d, dtype=torch.float64, generator=generator)
    b = torch.randn(d, dtype=torch.float64, generator=generator)
    X = Z * column_scales(spectrum, d)
    reg = torch.exp(lam)
    H = X.T @ X + torch.diag(reg)
    eigenvalues = torch.linalg.eigvalsh(H)
    return Problem(spectrum, X, reg, b, torch.linalg.solve(H, b),
                   float(eigenvalues[-1] / eigenvalues[0]))


# ---------------------------------------------------------------------------
# Solvers and measurements
# ---------------------------------------------------------------------------


def make_solvers(d: int, tol: float, seed: int) -> dict[str, Solver]:
    """The solvers of one spectrum, in table order; CG first (the reference of the ratios)."""
    maxiter = 2 * d  # CG converges in at most d steps in exact arithmetic: room for rounding
    solvers: dict[str, Solver] = {"CG": bilevel.implicit.CG(maxiter=maxiter, tol=tol)}
    for rank in PCG_RANKS:
        solvers[f"Nystrom PCG rank {rank}"] = bilevel.implicit.Nystrom(
            maxiter=maxiter, tol=tol, rank=rank, seed=seed)
    for rank in ALONE_RANKS:
        solvers[f"Nystrom alone rank {rank}"] = bilevel.implicit.Nystrom(maxiter=0, rank=rank, seed=seed)
    return solvers


@dataclass
class Row:
    """What one solver did on one spectrum."""

    spectrum: str
    solver: str
    products: int
    converged: bool
    residual: float
    error: float
    times: list[float] = field(default_factory=list)  # seconds, one per timed round

    @property
    def ms(self) -> float:
        return 1e3 * statistics.median(self.times)

    @property
    def is_pcg(self) -> bool:
        return self.solver.startswith("Nystrom PCG")


def measure(problem: Problem, solvers: dict[str, Solver], repeats: int) -> list[Row]:
    """One warm-up call per solver (which gives the accuracy figures), then ``repeats``
    interleaved timed rounds; each round starts one solver further on, so that no
    solver always runs first."""
    rows = []
    for name, solver in solvers.items():
        x, info = solver(problem.matvec, problem.b)
        error = float(torch.linalg.vector_norm(x - problem.exact) / torch.linalg.vector_norm(problem.exact))
        rows.append(Row(problem.spectrum, name, int(info.iterations), bool(info.converged),
                        float(info.relative_residual), error))
    order = list(zip(rows, solvers.values()))
    for round_index in range(repeats):
        shift = round_index % len(order)
        for row, solver in order[shift:] + order[:shift]:
            start = time.perf_counter()
            solver(problem.matvec, problem.b)
            row.times.append(time.perf_counter() - start)
    return rows


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def format_table(rows: list[Row]) -> str:
    reference = {row.spectrum: row for row in rows if row.solver == "CG"}
    lines = [HEADER, "|---|---|---:|---|---:|---:|---:|---:|"]
    for row in rows:
        ratio = row.ms / reference[row.spectrum].ms
        lines.append(f"| {SPECTRUM_LABELS[row.spectrum]} | {row.solver} | {row.products} | "
                     f"{'yes' if row.converged else 'no'} | {row.residual:.1e} | {row.error:.1e} | "
                     f"{row.ms:.2f} | {ratio:.2f} |")
    return "\n".join(lines)


def summarize_wins(rows: list[Row]) -> str:
    """One line: on which spectra, and at which ranks, converged Nyström PCG spent fewer
    products or less time than CG."""
    reference = {row.spectrum: row for row in rows if row.solver == "CG"}
    fewer: dict[str, list[str]] = {}
    faster: dict[str, list[str]] = {}
    for row in rows:
        cg = reference[row.spectrum]
        if not (row.is_pcg and row.converged):
            continue
        rank = row.solver.rsplit(" ", 1)[-1]
        if not cg.converged or row.products < cg.products:
            fewer.setdefault(row.spectrum, []).append(f"rank {rank}: {row.products} vs {cg.products}")
        if row.ms < cg.ms:
            faster.setdefault(row.spectrum, []).append(f"rank {rank}: {row.ms / cg.ms:.2f}x")

    def describe(wins: dict[str, list[str]]) -> str:
        if not wins:
            return "nowhere"
        return "on " + "; ".join(f"{spectrum} ({', '.join(items)})" for spectrum, items in wins.items())

    spectra = list(reference)
    no_win = [s for s in spectra if s not in fewer and s not in faster]
    line = (f"**Where Nyström PCG wins:** fewer products than CG {describe(fewer)}; "
            f"less time than CG {describe(faster)}")
    if no_win:
        line += f"; no win on {', '.join(no_win)}"
    return line + "."


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="n = 300, d = 60, 2 repeats: a smoke test")
    parser.add_argument("--n", type=int, default=None, help="rows of X (default 2000; quick 300)")
    parser.add_argument("--d", type=int, default=None, help="columns of X, the size of H (default 500; quick 60)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per solver (default 7; quick 2)")
    parser.add_argument("--tol", type=float, default=1e-10, help="relative residual tolerance (default 1e-10)")
    parser.add_argument("--spectra", nargs="+", choices=SPECTRA, default=list(SPECTRA),
                        help="which spectra (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of the sketches (default 0)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own, which follows OMP_NUM_THREADS)")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=ConvergenceWarning)  # the table's converged column says it
    n = args.n or (300 if args.quick else 2000)
    d = args.d or (60 if args.quick else 500)
    repeats = args.repeats or (2 if args.quick else 7)
    t_start = time.perf_counter()

    print("# Nyström preconditioning benchmark" + (" (--quick: small problems)" if args.quick else ""))
    print()
    print(f"{datetime.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, float64; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; python {platform.python_version()}")
    print(load_report())
    print(f"H = X^T X + diag(exp(lam)), X {n} x {d}; tol = {args.tol:g}; median of {repeats} interleaved "
          f"rounds after one warm-up; rel. error = ||x - x*|| / ||x*|| with x* from torch.linalg.solve")
    print()

    rows: list[Row] = []
    conditions = []
    for spectrum in args.spectra:
        problem = build_problem(spectrum, n, d, args.seed)
        conditions.append(f"{spectrum} {problem.condition:.3g}")
        rows.extend(measure(problem, make_solvers(d, args.tol, args.seed), repeats))

    print(format_table(rows))
    print()
    print(summarize_wins(rows))
    print()
    print(f"Condition numbers of H: {', '.join(conditions)}.")
    print("`products` counts matrix-vector products, the Nyström sketch included (its rank products "
          "run as one vmapped call). `Nystrom alone` (maxiter=0) has no tolerance: converged means "
          "the sketch succeeded" + (f"; a rank above d = {d} is capped at d (the inverse is then exact)."
                                    if max(ALONE_RANKS + PCG_RANKS) > d else "."))
    wall = time.perf_counter() - t_start
    print(f"Total {wall:.1f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
