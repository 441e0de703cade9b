"""torch 2.13's CPU batched LU hangs with more than one thread for matrices of order >= 151
(bilevel/_linalg.py): the library's LU-based solves must return, and be right, there."""

import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent("""
    import torch
    from bilevel.implicit import Direct
    from bilevel.layers import QPLayer
    from bilevel import _linalg
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    M = torch.randn(2, 160, 160, dtype=torch.float64, generator=g) + 20 * torch.eye(160, dtype=torch.float64)
    b = torch.randn(2, 160, dtype=torch.float64, generator=g)
    x, info = Direct("lu")(lambda v: (M @ v.unsqueeze(-1)).squeeze(-1), b, batch_dims=1)
    assert bool(info.converged.all()) and torch.allclose(M @ x.unsqueeze(-1), b.unsqueeze(-1), atol=1e-10)
    assert torch.allclose(_linalg.solve(M, b.unsqueeze(-1)).squeeze(-1), x, atol=1e-10)
    n = 160                                             # projection onto the simplex: KKT order 161
    y = torch.randn(2, n, dtype=torch.float64, generator=g)
    eye = torch.eye(n, dtype=torch.float64)
    z = QPLayer()(eye, -y, torch.ones(1, n, dtype=torch.float64), torch.ones(1, dtype=torch.float64),
                  -eye, torch.zeros(n, dtype=torch.float64))
    u, _ = torch.sort(y, descending=True, dim=-1)
    k = torch.arange(1, n + 1, dtype=torch.float64)
    rho = ((u - (u.cumsum(-1) - 1) / k) > 0).sum(-1, keepdim=True)
    tau = (u.cumsum(-1).gather(-1, rho - 1) - 1) / rho
    assert torch.allclose(z, (y - tau).clamp_min(0), atol=1e-6)
    assert torch.get_num_threads() == 2                 # restored
    print("ok")
""")


def test_batched_lu_solves_of_order_above_150_return_with_two_threads():
    try:
        done = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("a batched LU solve of order 160 hung with two threads")
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
    assert "DLASWP" not in done.stdout + done.stderr
