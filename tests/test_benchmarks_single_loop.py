"""``benchmarks/single_loop.py --quick`` runs and prints its table (so that the script cannot rot)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "single_loop.py")


def test_quick_mode_prints_the_table_and_the_wins():
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="passive")
    out = subprocess.run([sys.executable, SCRIPT, "--quick"], capture_output=True, text=True, timeout=180,
                         env=env, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
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
