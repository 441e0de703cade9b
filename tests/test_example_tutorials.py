"""The tutorials on single-loop methods and on convex optimization layers run and
show what their text claims.

The tolerances leave a margin of 5x or more over the numbers measured with the
methods' defaults, so that a change of a default step size does not break them,
while the gap between a method that works and one that does not stays large
(e.g. 2e-2 against 0.5).
"""

import pytest
import torch
from test_examples import run

import bilevel


@pytest.mark.slow  # about 12 s; the docs build runs the tutorial too, this checks what it claims
def test_single_loop_tutorial():
    ns = run("plot_single_loop")
    runs, final = ns["runs"], ns["final"]  # final[key] = (error of x, error of (x, y), F)

    # M1: the implicit method warns that the Hessian is singular, and the iterate stays far away
    assert any(issubclass(w.category, bilevel.CurvatureWarning) for w in runs["implicit"]["warnings"])
    assert final["implicit"][1] > 0.5 and final["implicit"][2] > 10.0
    # with damping it converges, without a warning, to the optimum of another problem: x = 0.505 e
    assert not runs["implicit, damping"]["warnings"]
    x_damped = runs["implicit, damping"]["result"].x
    assert torch.allclose(x_damped, torch.full_like(x_damped, 0.505), atol=0.03)
    assert final["implicit, damping"][1] > 0.5

    # the single-loop methods reach x* = y1* = y2* = e with their defaults, without warnings
    tolerances = {"penalty": 2e-3, "meha": 2e-2, "bamm": 2e-2, "bda": 2e-3}
    for method, tol in tolerances.items():
        assert final[method][1] < tol, (method, final[method])
        assert final[method][2] < 1e-2, (method, final[method])
        assert not runs[method]["warnings"], method

    # L: the implicit method refuses constraints; LV-HBA with its own projection finds 0.5 e
    assert "does not handle inner constraints" in ns.get("implicit_error", "")
    assert ns["error_x_l"] < 5e-3 and ns["error_y_l"] < 5e-3
    assert ns["violation_l"] <= 1e-10  # every iterate feasible
    assert float(ns["outer"](ns["lvhba"].x, ns["lvhba"].y)) == pytest.approx(2.5, abs=1e-2)


@pytest.mark.slow  # about 8 s; the docs build runs the tutorial too, this checks what it claims
def test_convex_layer_tutorial():
    pytest.importorskip("cvxpy")
    ns = run("plot_convex_layer")
    layer_history = ns["histories"]["convex layer"]
    constrained, baseline = ns["results"]["convex layer"], ns["results"]["unconstrained"]

    # the layer's outputs are feasible at every training step and on the test set
    assert max(layer_history["violation"]) < 1e-6
    assert constrained["test_violation"] < 1e-6 and constrained["infeasible"] == 0.0
    # training works, and the unconstrained baseline violates the constraints and fits worse
    assert layer_history["loss"][-1] < layer_history["loss"][0] / 10
    assert baseline["infeasible"] > 0.5 and baseline["test_violation"] > 1e-2
    assert constrained["test_loss"] < baseline["test_loss"]

    # gradients: gradcheck of the layer and the directional check through the trained model
    assert ns["gradcheck_ok"]
    assert ns["fd_relative_difference"] < 1e-5
    # a batched call equals single calls; the three routes agree
    assert ns["batch_difference"] < 1e-10
    for name, (z_difference, gradient_difference) in ns["route_differences"].items():
        assert z_difference < 1e-7 and gradient_difference < 1e-5, name
