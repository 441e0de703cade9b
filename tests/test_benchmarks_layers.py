"""``benchmarks/layers.py --quick --only qp`` runs and prints its tables (so that the script cannot rot)."""

from __future__ import annotations

import pytest

from helpers import run_benchmark

JACOBIANS = "| method | ms | / vmap(jacrev) | max abs difference |"


@pytest.mark.slow  # a benchmark smoke test, about 5 s
def test_quick_qp_section_prints_the_solve_and_the_jacobian_tables():
    text = run_benchmark("layers.py", "--quick", "--only", "qp", "--no-peers", "--no-loop")
    assert "| QPLayer |" in text and "| ConvexLayer (qp route) |" in text
    lines = text.splitlines()
    start = lines.index(JACOBIANS)
    rows = [line.strip("|").split("|") for line in lines[start + 2:start + 4]]
    assert [row[0].strip() for row in rows] == ["vmap(jacrev) over the problems", "autograd rows through the batch"]
    for row in rows:  # the Jacobians by autograd rows equal vmap(jacrev)'s
        assert float(row[1]) > 0 and float(row[3]) < 1e-8


@pytest.mark.slow  # a benchmark smoke test, about 9 s
def test_quick_layer_targets_prints_every_case_with_exact_gradients():
    """``benchmarks/layer_targets.py --quick --no-peers``: the three TARGETS.md cases, each
    with its verdict line, and QPLayer's gradients within the target error (1e-6)."""
    text = run_benchmark("layer_targets.py", "--quick", "--no-peers")
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ") and "| QPLayer |" in line]
    assert [row[0].strip() for row in rows] == ["simplex n = 50", "simplex n = 200", "box LS n = 100, m = 150"]
    for row in rows:
        assert float(row[4]) <= 1e-6, row  # relative gradient error against the closed form
    assert sum(line.startswith(("simplex n = ", "box LS")) and "MET" in line for line in text.splitlines()) == 3
