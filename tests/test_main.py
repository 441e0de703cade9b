"""The main job runs end to end and its numbers are right."""

import pytest
import torch

pytest.importorskip("sklearn")

from bilevel.__main__ import compare_methods, main  # noqa: E402
from bilevel.problems import ridge_diabetes  # noqa: E402


def test_ridge_diabetes_closed_forms_agree_with_autograd():
    problem = ridge_diabetes()
    lam = torch.linspace(-1, 1, problem.num_features, requires_grad=True)
    (g,) = torch.autograd.grad(problem.outer(lam, problem.solution(lam)), lam)
    torch.testing.assert_close(problem.hypergradient(lam.detach()), g)


def test_methods_table_is_exact_where_it_should_be():
    problem = ridge_diabetes()
    errors = {name: err for name, err, _ in compare_methods(problem, torch.zeros(problem.num_features))}
    assert errors["implicit, default solve"] < 1e-6
    assert errors["custom_root around L-BFGS"] < 1e-6
    assert errors["unrolled, 1000 steps"] < 1e-6
    assert errors["one-step (DARTS)"] > 1e-2  # a biased baseline, visibly so


def test_ridge_main_runs_and_lowers_the_validation_loss(capsys):
    main(["--problem", "ridge", "--steps", "20", "--no-progress"])
    out = capsys.readouterr().out
    before, after = out.split("Validation loss: ")[1].split(" after")[0].split(" at lambda = 0 -> ")
    assert float(after) < float(before)


def test_hyper_cleaning_main_prints_the_table_and_saves_the_plot(capsys, tmp_path):
    plot = tmp_path / "curve.png"
    main(["--max-steps", "15", "--methods", "implicit", "one_step", "--no-progress", "--plot", str(plot)])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip().startswith(("unweighted", "implicit", "one_step"))}
    unweighted_acc, implicit_acc = float(rows["unweighted"][-4]), float(rows["implicit"][-4])
    assert implicit_acc > unweighted_acc + 0.1  # learned weights beat training on corrupted labels
    if pytest.importorskip("matplotlib"):
        assert plot.exists() and plot.stat().st_size > 1000
