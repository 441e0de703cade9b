"""``benchmarks/layers.py --quick --only qp`` runs and prints its tables (so that the script cannot rot)."""

from __future__ import annotations

from helpers import run_benchmark

JACOBIANS = "| method | ms | / vmap(jacrev) | max abs difference |"


def test_quick_qp_section_prints_the_solve_and_the_jacobian_tables():
    text = run_benchmark("layers.py", "--quick", "--only", "qp", "--no-peers", "--no-loop")
    assert "| QPLayer |" in text and "| ConvexLayer (qp route) |" in text
    lines = text.splitlines()
    start = lines.index(JACOBIANS)
    rows = [line.strip("|").split("|") for line in lines[start + 2:start + 4]]
    assert [row[0].strip() for row in rows] == ["vmap(jacrev) over the problems", "autograd rows through the batch"]
    for row in rows:  # the Jacobians by autograd rows equal vmap(jacrev)'s
        assert float(row[1]) > 0 and float(row[3]) < 1e-8
