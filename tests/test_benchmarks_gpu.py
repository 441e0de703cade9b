"""``benchmarks/gpu.py --quick`` runs (on the CPU here) and prints its tables, so that the script cannot rot."""

import os
import subprocess
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu.py")


def test_quick_mode_prints_the_device_and_both_tables():
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="passive")
    out = subprocess.run([sys.executable, SCRIPT, "--quick", "--device", "cpu", "--models", "resnet", "transformer"],
                         capture_output=True, text=True, timeout=120, env=env, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "device: cpu" in text
    assert "| model | weights | operation | bilevel (ms) | floor (ms) | bilevel / floor |" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "ms)" not in line]
    network = [r for r in rows if "CG hypergradient" in r or "HVP x" in r]
    assert len(network) == 6  # 2 models x (2 HVP rows + 1 CG row)
    for row in network:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        float(cells[3])  # bilevel ran on every row
        if "CG hypergradient" in row or "loop of" in row:
            # the floor ran, and bilevel computes the same thing (float32, k fixed): the error column is small
            assert cells[5].endswith("x"), row
            assert float(cells[9].split()[0]) < 1e-4, row
    batched = [r for r in rows if "SPD systems" in r or "ridge problems" in r]
    counts = {r.split("|")[1].strip() for r in batched}
    assert counts == {"64", "1024"}
    for row in batched:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[4].endswith("x") and float(cells[5]) < 1e-10, row  # batched == looped


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quick_mode_on_cuda():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, SCRIPT, "--quick", "--device", "cuda"], capture_output=True, text=True,
                         timeout=300, env=env, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "device: cuda" in out.stdout and "CG hypergradient" in out.stdout


@pytest.mark.slow  # about 18 s; the quick-mode test above runs the script by default
def test_host_sync_table_runs_on_the_cpu_with_every_row():
    """``benchmarks/cuda_syncs.py`` falls back to the dispatcher counter on the CPU;
    every hot path runs (no ``error`` row), and the paths that never look at the
    host inside their loop (Neumann) read a fixed few times."""
    script = os.path.join(os.path.dirname(SCRIPT), "cuda_syncs.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="passive")
    out = subprocess.run([sys.executable, script, "--device", "cpu", "--sites", "2"],
                         capture_output=True, text=True, timeout=300, env=env, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [r for r in out.stdout.splitlines() if r.startswith("| ") and "hot path" not in r]
    assert len(rows) == 18 and not any("| error |" in r for r in rows), out.stdout
    cells = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in rows}
    neumann = cells["Neumann (100 terms), 256 systems"]
    assert int(neumann[0]) == 99 and int(neumann[1]) <= 4
