"""The MoE hard-constraint tutorial (examples/plot_moe_pde.py) says what it claims."""

import pytest
import torch
from test_examples import run


@pytest.mark.slow  # about 8 s; the docs build runs the example too, this checks what it claims
def test_moe_pde_example_claims():
    ns = run("plot_moe_pde")
    soft, hard, moe = ns["results"].values()
    # hard constraints: much smaller PDE residual and error than the soft penalty
    assert hard["residual_rms"] * 5 < soft["residual_rms"]
    assert hard["error"] * 10 < soft["error"] and hard["error"] < 5e-3
    # K experts fit the PDE more closely than the single constraint, at most a few times slower
    assert moe["residual_rms"] * 3 < hard["residual_rms"]
    assert moe["error"] < soft["error"]
    assert moe["ms_per_step"] < 4 * hard["ms_per_step"]
    assert ns["info"].converged.all() and ns["info"].converged.shape == (4,)
    # the reported numbers are those of the trained models
    problem, test = ns["problem"], ns["test"]
    u = hard["u"]
    assert abs(float((u - problem.exact(test)).norm() / problem.exact(test).norm()) - hard["error"]) < 1e-12
    assert torch.isfinite(moe["omega"]).all() and moe["omega"].shape == (4, ns["N"])
