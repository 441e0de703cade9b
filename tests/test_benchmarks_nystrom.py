"""``benchmarks/nystrom.py --quick`` runs and prints its table (so that the script cannot rot)."""

from __future__ import annotations

from helpers import run_benchmark

HEADER = "| spectrum | solver | products | converged | rel. residual | rel. error | ms | time / CG |"
SPECTRA = ("flat (iid Gaussian)", "outliers (5 columns x100)", "decaying (scales 1 to 1e-2)")
SOLVERS = ("CG", "Nystrom PCG rank 10", "Nystrom PCG rank 50", "Nystrom alone rank 50", "Nystrom alone rank 200")


def _table_rows(text: str) -> list[dict[str, str]]:
    """The rows of the markdown table under ``HEADER``, as column -> cell."""
    lines = text.splitlines()
    start = lines.index(HEADER)
    columns = [cell.strip() for cell in HEADER.strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:  # past the header and its separator
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        assert len(cells) == len(columns), line
        rows.append(dict(zip(columns, cells)))
    return rows


def test_quick_mode_prints_one_row_per_spectrum_and_solver():
    text = run_benchmark("nystrom.py", "--quick")
    assert HEADER in text
    rows = _table_rows(text)
    pairs = [(row["spectrum"], row["solver"]) for row in rows]
    assert sorted(pairs) == sorted((spectrum, solver) for spectrum in SPECTRA for solver in SOLVERS)

    pcg = [row for row in rows if row["solver"].startswith("Nystrom PCG")]
    assert any(row["converged"] == "yes" for row in pcg)
    for row in pcg:
        if row["converged"] == "yes":
            assert float(row["rel. error"]) < 1e-6, row
    for row in rows:
        assert int(row["products"]) > 0, row
        assert float(row["ms"]) > 0, row
    cg_ratios = [float(row["time / CG"]) for row in rows if row["solver"] == "CG"]
    assert cg_ratios == [1.0] * len(SPECTRA)
    assert "**Where Nyström PCG wins:**" in text
