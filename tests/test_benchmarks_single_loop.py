"""``benchmarks/single_loop.py --quick`` runs and prints its table (so that the script cannot rot)."""

import pytest
from helpers import run_benchmark

pytest.importorskip("sklearn")


@pytest.mark.slow  # a benchmark smoke test, about 14 s
def test_quick_mode_prints_the_table_and_the_wins():
    text = run_benchmark("single_loop.py", "--quick")
    assert "| problem | method | iterations to target |" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| problem")]
    methods = {line.split("|")[2].strip() for line in rows}
    for method in ("implicit", "unrolled", "one_step", "penalty", "meha", "bamm", "bda",
                   "lvhba (exact projection)", "lvhba (no projection)"):
        assert method in methods, method
    # every problem has its rows; the methods without constraint support are rejected on L
    for label in ("Q (quadratic", "M1 (non-unique", "L (coupled", "hyper-cleaning"):
        assert any(label in line for line in rows), label
    assert "rejected by bilevel.solve" in text
    # no method fails outright in the smoke run, and the summary is computed
    assert "error:" not in text
    assert "## Who wins where" in text
    assert "total time" in text
