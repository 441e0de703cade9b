"""Single-loop and aggregation methods (penalty, MEHA, sl-BAMM, LV-HBA, BDA) on the
problems of ALGORITHMS.md section 8 with known answers, in float64, from the
problems' stated start points, with the methods' untuned defaults."""

import math
import warnings

import pytest
import torch

import bilevel
from bilevel.algorithms import BAMM, BDA, LVHBA, MEHA, METHODS, SOBA, Penalty
from bilevel.problems import coupled_constraint, nonunique_lower_level, quadratic
from bilevel.solvers import LBFGS
from bilevel.status import CurvatureWarning, StepSizeWarning

SINGLE_LOOP = ["penalty", "meha", "bamm", "bda"]


def relative_error(problem, x) -> float:
    return float((x - problem.solution.x).norm() / problem.solution.x.norm())


def run(problem, method, steps, **options):
    return bilevel.solve(problem, method=method, max_steps=steps, progress=False, **options)


def test_registered_by_name():
    expected = {"penalty": Penalty, "meha": MEHA, "bamm": BAMM, "lvhba": LVHBA, "bda": BDA, "soba": SOBA}
    for name, cls in expected.items():
        assert METHODS[name] is cls


# -- problem M1: a lower level with a continuum of solutions ----------------------------
# Budgets and tolerances measured with the defaults (relative error in x after the budget):
# MEHA 2000 -> 1e-3, 5000 -> 7e-6, 10000 -> 1e-8, penalty 2000 -> 2e-5,
# sl-BAMM 5000 -> 2e-6, BDA 500 -> 1e-7.
@pytest.mark.parametrize("method, steps, tol", [
    ("meha", 3000, 1e-3), ("penalty", 2000, 1e-4), ("bamm", 5000, 1e-4), ("bda", 500, 1e-5),
])
def test_nonunique_lower_level_reaches_optimistic_solution(method, steps, tol):
    problem = nonunique_lower_level(n=100)
    result = run(problem, method, steps)
    assert relative_error(problem, result.x) < tol
    y1, y2 = result.y
    assert torch.allclose(y1, torch.ones(100, dtype=torch.float64), atol=1e-2)
    assert torch.allclose(y2, torch.ones(100, dtype=torch.float64), atol=1e-2)
    assert result.history["outer"][-1] < 1e-3 < result.history["outer"][0]


def test_implicit_method_stalls_on_nonunique_lower_level_and_says_so():
    """The difference: the implicit method assumes a unique inner solution; on M1
    its inner Hessian is singular in y2, it warns, and it heads to 0.505 e; the
    single-loop methods reach e."""
    problem = nonunique_lower_level(n=20)
    with pytest.warns(CurvatureWarning, match="single-loop method"):
        implicit = run(problem, "implicit", 300, lr=0.05)
    assert relative_error(problem, implicit.x) > 0.45       # stuck near 0.5 e, far from e
    # the default solve hands the singular Hessian to CG, which solves its consistent
    # part: x drifts slightly past 0.505 e, nowhere near e
    assert float(implicit.x.max()) < 0.6
    meha = run(problem, "meha", 3000)
    assert relative_error(problem, meha.x) < 1e-3


# -- problem Q: strongly convex, every method must reach x* --------------------------------
@pytest.mark.parametrize("method, steps, tol", [
    ("penalty", 500, 1e-2), ("bamm", 5000, 1e-2), pytest.param("bda", 1000, 1e-2, marks=pytest.mark.slow),
    ("meha", 5000, 3e-2),
    ("soba", 2000, 1e-8),
])
def test_quadratic_reaches_solution(method, steps, tol):
    problem = quadratic()
    result = run(problem, method, steps)
    assert relative_error(problem, result.x) < tol


@pytest.mark.slow
def test_meha_quadratic_within_20000_steps():
    problem = quadratic()
    assert relative_error(problem, run(problem, "meha", 20000).x) < 1e-2


def test_penalty_gradient_bias_decreases_as_one_over_lambda():
    """With lambda fixed, the penalty method converges to a stationary point of
    psi_lambda whose distance to x* shrinks like 1/lambda (ALGORITHMS.md, Q): 2.6e-2 and
    2.8e-3 for lambda = 10 and 100, reached within 1000 steps (the same to 1e-12 at 4000)."""
    problem = quadratic()
    errors = []
    for lam in (10.0, 100.0):
        result = run(problem, Penalty(lam0=lam, lam_growth=0.0), 1000)
        errors.append(relative_error(problem, result.x))
    assert 7 < errors[0] / errors[1] < 13  # about the factor 10 of lambda


# -- problem L: a coupled, active inner constraint y <= x ---------------------------------
@pytest.mark.parametrize("exact_projection", [True, False])
def test_lvhba_coupled_constraint(exact_projection):
    problem = coupled_constraint()
    if not exact_projection:  # the built-in projection onto {g <= 0} (a dual QP in torch)
        problem.data.pop("project")
    result = run(problem, "lvhba", 3000)
    assert float((result.x - problem.solution.x).abs().max()) < 1e-3
    assert float((result.y - problem.solution.y).abs().max()) < 1e-3
    assert float((result.y - result.x).max()) <= 1e-7  # feasible
    assert abs(result.history["outer"][-1] - problem.solution.value) < 1e-2


def test_constraint_ignored_gives_wrong_answer_lvhba_right_one():
    """The difference: without the coupled constraint the inner solution is b e and
    the best x is 0 with F = n/2; the constrained bilevel optimum is 0.5 e, F = n/4."""
    problem = coupled_constraint()
    with pytest.raises(ValueError, match="does not handle inner constraints"):
        run(problem, "implicit", 10)
    unconstrained = bilevel.BilevelProblem(problem.outer, problem.inner, problem.x0, problem.y0)
    implicit = run(unconstrained, "implicit", 1500, lr=0.05)
    assert float(implicit.x.abs().max()) < 1e-2          # converges, to the wrong problem's answer
    assert float(implicit.y.min()) > 1.9                 # violates y <= x
    lvhba = run(problem, "lvhba", 3000)
    assert float((lvhba.x - 0.5).abs().max()) < 1e-3


def test_lvhba_projection_with_simple_sets():
    """x in [0, 0.4]: the constrained optimum moves to x = y = 0.4 (box active)."""
    from bilevel.implicit.projections import Box

    problem = coupled_constraint()
    problem.data.pop("project")
    result = run(problem, LVHBA(x_set=Box(0.0, 0.4)), 3000)
    assert float((result.x - 0.4).abs().max()) < 1e-3
    assert float((result.y - 0.4).abs().max()) < 1e-3


def test_lvhba_user_projection_onto_the_constraint_with_an_x_set():
    """The problem's projection onto {y <= x} (pairs to their midpoint) followed by the
    x_set clip left y about one step above x (max(y - x) = 1.3e-3 after 1000 steps and
    9.5e-4 after 3000, no warning); combined by Dykstra's algorithm they project onto the
    intersection (x and y exact to rounding after 1000 steps)."""
    from bilevel.implicit.projections import Box

    problem = coupled_constraint()  # keeps data["project"], the projection onto {y <= x} alone
    result = run(problem, LVHBA(x_set=Box(0.0, 0.4)), 1000)
    assert float((result.y - result.x).max()) <= 1e-12  # feasible
    assert float((result.x - 0.4).abs().max()) < 1e-6
    assert float((result.y - 0.4).abs().max()) < 1e-6


def test_dykstra_is_the_projection_onto_an_intersection():
    """A half-space and a box in R^6: Dykstra's answer equals the QP
    min 1/2 |u - w|^2 over both (cvxpy), where projecting onto one then the other does not."""
    cp = pytest.importorskip("cvxpy")
    from bilevel.algorithms.lvhba import dykstra

    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, generator=g, dtype=torch.float64)
    w = 1.5 * a + torch.randn(6, generator=g, dtype=torch.float64)  # outside both sets
    onto_half = lambda u: u - torch.clamp(u @ a - 0.5, min=0) / (a @ a) * a  # noqa: E731 - {a.u <= 0.5}
    half = lambda xs, ys: ([onto_half(xs[0])], ys)  # noqa: E731
    box = lambda xs, ys: ([xs[0].clamp(-1, 1)], ys)  # noqa: E731
    (u,), _ = dykstra(half, box)([w], [])
    v = cp.Variable(6)
    cp.Problem(cp.Minimize(cp.sum_squares(v - w.numpy())), [a.numpy() @ v <= 0.5, v >= -1, v <= 1]).solve()
    exact = torch.from_numpy(v.value)
    torch.testing.assert_close(u, exact, atol=1e-6, rtol=0)
    assert float((onto_half(w).clamp(-1, 1) - exact).abs().max()) > 1e-4  # one after the other: not it


# -- bad input ----------------------------------------------------------------------------
def test_lvhba_needs_constraints():
    with pytest.raises(ValueError, match="needs lower-level constraints"):
        run(quadratic(), "lvhba", 1)


def test_constraints_with_wrong_output_are_rejected():
    problem = coupled_constraint(n=3)
    with pytest.raises(TypeError, match="must return a tensor"):
        bilevel.BilevelProblem(problem.outer, problem.inner, problem.x0, problem.y0,
                               constraints=lambda x, y: [y - x])
    calls = {"n": 0}

    def growing(x, y):
        calls["n"] += 1
        g = y - x
        return g if calls["n"] < 40 else torch.cat([g, g])

    changing = bilevel.BilevelProblem(problem.outer, problem.inner, problem.x0, problem.y0, constraints=growing,
                                      data={"project": problem.data["project"]})
    with pytest.raises(ValueError, match=r"returned shape \(6,\) at step \d+.*\(3,\) at the start"):
        run(changing, "lvhba", 100)


def test_infeasible_constraints_are_reported():
    problem = coupled_constraint(n=3)
    empty = bilevel.BilevelProblem(
        problem.outer, problem.inner, problem.x0, problem.y0,
        constraints=lambda x, y: torch.cat([y - x + 1.0, x - y + 1.0]),   # y <= x - 1 and y >= x + 1
    )
    with pytest.raises(ValueError, match="infeasible"):
        run(empty, "lvhba", 5)


@pytest.mark.parametrize("method", ["meha", "penalty", "bamm", "lvhba", "soba"])
def test_divergent_step_size_is_reported_with_its_step(method):
    problem = coupled_constraint() if method == "lvhba" else quadratic()
    options = {"lr": 50.0} if method not in ("bamm", "soba") else {"y_step": 50.0}
    if method == "meha":
        options["beta"] = 50.0
    with pytest.raises(FloatingPointError, match=r"step \d+"):
        run(problem, method, 2000, backoffs=0, **options)


def test_blown_up_x_step_backs_off_and_recovers():
    """An x step 750 times too large: the method goes back to its last saved state
    with a 10x smaller step (warning each time) until it is stable, then solves Q."""
    problem = quadratic()
    with pytest.warns(StepSizeWarning, match="went back to step") as caught:
        result = run(problem, "penalty", 2000, lr=50.0)
    backoffs = [str(w.message) for w in caught if w.category is StepSizeWarning]
    assert backoffs and "with an x step of 50;" in backoffs[0] and "go on with an x step of 5 " in backoffs[0]
    assert "(back-off 1 of 3;" in backoffs[0]
    assert any(abs(result.state.extras["x_step_scale"] - 10.0 ** -k) < 1e-12 for k in (1, 2, 3))
    assert relative_error(problem, result.x) < 1e-2


def test_blown_up_x_step_raises_after_the_last_backoff():
    with pytest.raises(FloatingPointError, match=r"diverged at step \d+ .* with an x step of 1e\+04, after 2 back-off"):
        with pytest.warns(StepSizeWarning):
            run(quadratic(), "penalty", 2000, lr=1e6, backoffs=2)


@pytest.mark.parametrize("cls, bad", [
    (MEHA, {"gamma": -1.0}), (MEHA, {"p": 1.5}), (MEHA, {"nonsmooth": lambda x, y: 0.0}),
    (Penalty, {"inner_steps": 0}), (Penalty, {"lam0": 0.0}), (BAMM, {"mu0": 1.5}),
    (LVHBA, {"eta": 0.0}), (BDA, {"steps": 0}), (BDA, {"mu": 2.0}),
    (SOBA, {"y_step": 0.0}), (SOBA, {"v_step": -1.0}), (SOBA, {"x_decay": -0.5}), (SOBA, {"y_decay": True}),
])
def test_invalid_settings(cls, bad):
    with pytest.raises(ValueError):
        cls(**bad)


# -- checkpoints, trees, mini-batches -------------------------------------------------------
@pytest.mark.parametrize("method", ["penalty", "meha", "bamm", "bda", "lvhba", "soba"])
def test_resume_equals_uninterrupted(method):
    # SOBA assumes a unique lower-level solution: on M1 it warns that the Hessian is singular
    problems = {"lvhba": lambda: coupled_constraint(n=4), "soba": quadratic}
    problem = problems.get(method, lambda: nonunique_lower_level(n=4))()
    full = run(problem, method, 60)
    half = run(problem, method, 30)
    resumed = run(problem, method, 60, resume=half.state.state_dict())
    assert torch.allclose(resumed.x, full.x, rtol=0, atol=1e-12)
    assert resumed.state.iteration == 60


def test_meha_nonsmooth_lower_level():
    r"""Lower level min_y 1/2 |y - b|^2 + x |y|_1 (x > 0 scalar): y*(x) = soft(b, x).
    Upper level 1/2 |y - c|^2 with c = soft(b, 0.5): the answer is x* = 0.5."""
    from bilevel.implicit.prox import prox_lasso

    b = torch.tensor([2.0, -1.5, 1.0, 0.2], dtype=torch.float64)
    c = torch.sign(b) * (b.abs() - 0.5).clamp_min(0)
    problem = bilevel.BilevelProblem(
        lambda x, y: 0.5 * ((y - c) ** 2).sum(), lambda x, y: 0.5 * ((y - b) ** 2).sum(),
        torch.tensor(0.1, dtype=torch.float64), torch.zeros(4, dtype=torch.float64),
    )
    method = MEHA(nonsmooth=lambda x, y: x * y.abs().sum(), prox=lambda y, x, step: prox_lasso(y, x, step))
    result = run(problem, method, 1000)  # errors 8e-6, 3e-8, 6e-11 after 300, 600, 1000 steps
    assert abs(float(result.x) - 0.5) < 1e-8
    assert torch.allclose(result.y, c, atol=1e-8, rtol=0)


def test_penalty_stochastic_minibatches_on_logistic_hpo():
    """F2SA: decaying steps with mini-batches; the validation loss goes down."""
    problem = bilevel.problems.logistic_breast_cancer()
    n = min(problem.data["X_train"].shape[0], problem.data["X_val"].shape[0])
    g = torch.Generator().manual_seed(0)
    batches = [torch.randperm(n, generator=g)[:32] for _ in range(10)]
    with warnings.catch_warnings():
        # log-parametrized weights e^x: curvature grows fast with x, a back-off may be needed
        warnings.simplefilter("ignore", StepSizeWarning)
        result = bilevel.solve(problem, method="penalty", data=batches, max_steps=200, progress=False)
    assert result.state.extras["lam"] > result.state.extras["lam0"]
    assert outer_at_inner_solution(problem, result.x) < outer_at_inner_solution(problem, problem.x0)


def test_penalty_stochastic_minibatches_clean_the_labels():
    """F2SA on hyper-cleaning with batches of 32 moves x as far as the deterministic rule
    does: the validation loss at y*(x) falls by more than half in 300 steps and most
    corrupted examples get weights below 1/2 (with the joint-Hessian base step, thousands
    of times smaller, x stayed at the start: Phi fell by 0.5 %)."""
    problem = bilevel.problems.hyper_cleaning_digits(n_train=300, n_val=300)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randperm(300, generator=g)[:32] for _ in range(30)]
    result = run(problem, "penalty", 300, data=batches)
    start, end = outer_at_inner_solution(problem, problem.x0), outer_at_inner_solution(problem, result.x)
    assert end < 0.5 * start, (start, end)
    flagged = torch.sigmoid(result.x) < 0.5
    assert float(flagged[problem.data["corrupted"]].float().mean()) > 0.7


def test_meha_stochastic_decays_its_steps_and_improves_logistic_penalties():
    """With batches of 32 and constant steps (the default), MEHA's validation loss on the
    logistic penalties fell for 50 steps, then rose 43 % above the start by step 400 (the
    noise of y and theta biases d_x); stochastic=True, the stochastic-approximation
    decays, keeps it falling."""
    problem = bilevel.problems.logistic_breast_cancer()  # 142 validation, 284 training rows
    g = torch.Generator().manual_seed(0)
    data = {"outer": [torch.randperm(142, generator=g)[:32] for _ in range(40)],
            "inner": [torch.randperm(284, generator=g)[:32] for _ in range(40)]}
    result = run(problem, MEHA(stochastic=True), 400, data=data)
    assert outer_at_inner_solution(problem, result.x) < 0.95 * outer_at_inner_solution(problem, problem.x0)
    short = {level: batches[:5] for level, batches in data.items()}
    constant = run(problem, "meha", 5, data=short)
    assert torch.equal(constant.x, run(problem, MEHA(stochastic=False), 5, data=short).x)
    assert not torch.equal(constant.x, run(problem, MEHA(stochastic=True), 5, data=short).x)


@pytest.mark.parametrize("method", [*SINGLE_LOOP, "soba"])
def test_ready_made_problems_improve(method):
    """Every method runs on hyper-cleaning and ridge HPO through bilevel.solve and
    lowers the upper objective at the (numerically) exact inner solution of its x."""
    for problem in (bilevel.problems.ridge_diabetes().as_problem(),
                    bilevel.problems.hyper_cleaning_digits(n_train=200, n_val=200)):
        steps = {"meha": 1000, "bda": 30}.get(method, 100)   # MEHA's x step is small on ridge
        result = run(problem, method, steps)
        assert all(math.isfinite(v) for v in result.history["outer"])
        assert outer_at_inner_solution(problem, result.x) < outer_at_inner_solution(problem, problem.x0)


def outer_at_inner_solution(problem, x) -> float:
    """F(x, y*(x)) with y*(x) from L-BFGS on the full (not mini-batch) inner objective."""
    y, _ = LBFGS(maxiter=1000, tol=1e-7).run(lambda y_, x_: problem.inner(x_, y_), problem.y0, x)
    return float(problem.outer(x, y))


# -- SOBA: the implicit method cut to one step per level -----------------------------------
def test_soba_steps_follow_the_update_rule():
    """Three steps with explicit step sizes and decays against the rule written out
    with plain autograd: y, v and x each move from the same (x_k, y_k, v_k)."""
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    A, B = M @ M.T / 4 + torch.eye(4, dtype=torch.float64), torch.randn(4, 2, generator=gen, dtype=torch.float64)
    inner = lambda x, y: 0.5 * y @ A @ y - y @ B @ torch.sin(x) + 0.1 * (y**4).sum()  # noqa: E731
    outer = lambda x, y: 0.5 * ((y - 1) ** 2).sum() + 0.3 * (x**2).sum() * y.sum()  # noqa: E731
    x0, y0 = torch.tensor([0.3, -0.2], dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    problem = bilevel.problems.BilevelProblem(outer, inner, x0, y0)
    rho, rho_v, gamma, a, b = 0.2, 0.15, 0.1, 0.4, 0.6
    method = SOBA(lr=gamma, y_step=rho, v_step=rho_v, y_decay=a, x_decay=b, warmup=0, rescale_every=0)
    state = method.init(problem)
    x, y, v = x0.clone(), y0.clone(), torch.zeros(4, dtype=torch.float64)
    for k in range(3):
        state = method.step(problem, state)
        xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
        gFx, gFy = torch.autograd.grad(outer(xr, yr), (xr, yr))
        (gfy,) = torch.autograd.grad(inner(xr, yr), yr, create_graph=True)
        cross, hess = torch.autograd.grad(gfy, (xr, yr), v)
        decay = (k + 1) ** -a
        x, y, v = (x - gamma * (k + 1) ** -b * (gFx + cross), y - rho * decay * gfy.detach(),
                   v - rho_v * decay * (hess + gFy))
        torch.testing.assert_close(state.x, x, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(state.y, y, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(state.extras["v"][0], v, rtol=1e-12, atol=1e-14)


def test_soba_warns_on_a_singular_lower_level_and_names_the_alternatives():
    """On M1 (inner Hessian singular in y2) v cannot solve its system; SOBA heads to
    0.505 e like the implicit method, and says so once."""
    problem = nonunique_lower_level(n=20)
    with pytest.warns(CurvatureWarning, match="singular or indefinite.*penalty, meha, bamm, bda") as caught:
        result = run(problem, "soba", 600)
    assert sum(w.category is CurvatureWarning for w in caught) == 1
    assert relative_error(problem, result.x) > 0.45
    with warnings.catch_warnings():
        warnings.simplefilter("error", CurvatureWarning)
        run(quadratic(), "soba", 600)  # a strongly convex lower level: no warning


def test_soba_lagging_v_on_a_definite_lower_level_backs_off_instead_of_calling_it_singular():
    """Q with d = 100, m = 50, seed 2 (lower Hessian eigenvalues 1 to 81) with an x step of
    2e-3, several times the derived one: v stops tracking its system.  That used to be
    reported as a singular lower-level Hessian (with the advice to switch methods) while
    the run diverged; now the x step backs off, with a warning that says why.  Which test
    sees it first depends on the patience of the lag test, 10 L / mu steps: with mu
    overestimated at 3.4 (shifted power iteration) the lag test did, at step 250; with
    Lanczos' mu = 1.0 it waits 810 steps and the slow-divergence test backs off at step 125."""
    problem = quadratic(d=100, m=50, seed=2)
    assert float(torch.linalg.eigvalsh(problem.data["A"])[0]) > 1.0  # positive definite
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run(problem, SOBA(lr=2e-3), 750)
    assert not [w for w in caught if issubclass(w.category, CurvatureWarning)]
    messages = [str(w.message) for w in caught if issubclass(w.category, StepSizeWarning)]
    assert len(messages) == 1 and "back-off 1 of 3" in messages[0], messages
    assert "v lags behind Hess_yy f v = -grad_y F" in messages[0] or "diverged slowly" in messages[0]
    assert result.state.extras["backoffs_taken"] == 1
    assert result.state.extras["scales"]["inner_y_min"] == pytest.approx(1.0, rel=0.05)


def test_soba_default_steps_are_stable_on_an_ill_conditioned_lower_level():
    """Problem Q with d = 20 (lower Hessian eigenvalues 1 to 15, hyper-objective curvature
    21): the derived x step keeps y and v ahead of x (a coupled-block step of 0.08 diverged);
    no back-off, no warning, and x heads to x*."""
    problem = quadratic(d=20, m=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CurvatureWarning)
        warnings.simplefilter("error", StepSizeWarning)
        result = run(problem, "soba", 3000)
    assert relative_error(problem, result.x) < 0.05


@pytest.mark.parametrize("b_term, lowest", [
    (lambda b: 0.0 * b.sum(), 0.0),           # f ignores the leaf b
    (lambda b: 5.0 * b.sum(), 0.0),           # f is linear in b
    (lambda b: 0.25 * (b * b).sum(), 0.5),    # curvature 0.5 in b: the smallest eigenvalue
])
def test_smallest_lower_curvature_counts_every_leaf(b_term, lowest):
    """The estimate of the smallest eigenvalue of the lower Hessian (SOBA's singularity
    check and step) sees a leaf the lower level is flat in; it used to drop it and read
    the smallest eigenvalue off the other leaves (2 here instead of 0)."""
    c = torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64)
    problem = bilevel.BilevelProblem(
        lambda x, y: 0.5 * ((y["a"] - x) ** 2).sum() + 0.5 * (y["b"] ** 2).sum(),
        lambda x, y: 0.5 * (c * y["a"] ** 2).sum() - (x * y["a"]).sum() + b_term(y["b"]),
        torch.zeros(3, dtype=torch.float64),
        {"a": torch.ones(3, dtype=torch.float64), "b": torch.ones(2, dtype=torch.float64)},
    )
    state = BAMM(warmup=0).init(problem)
    assert state.extras["scales"]["inner_y"] == pytest.approx(4.0, rel=1e-3)
    assert state.extras["scales"]["inner_y_min"] == pytest.approx(lowest, abs=1e-3)


def test_soba_lagging_v_in_an_improving_run_warns_without_backing_off():
    """A given ``lr`` too large for v to follow (relative residual ~1 after 200 steps) on a
    definite lower level, while the run still improves (the outer value falls): no back-off
    slows it (the x direction is still a descent direction here), but a warning says the
    direction is no accurate hypergradient and names both causes; the run ends at the optimum."""
    gen = torch.Generator().manual_seed(704)
    D = torch.float64
    Q_, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=D))
    A = Q_ @ torch.diag(torch.logspace(0, 1, 3, dtype=D)) @ Q_.T
    B = torch.randn(3, 8, generator=gen, dtype=D) / 8 ** 0.5
    c = 10 * torch.randn(3, generator=gen, dtype=D) / 3 ** 0.5
    yt = 100 * torch.randn(3, generator=gen, dtype=D)
    xt = torch.randn(8, generator=gen, dtype=D)
    inner = lambda x, y: 0.5 * (y - B @ x - c) @ (A @ (y - B @ x - c))  # noqa: E731  y*(x) = B x + c
    outer = lambda x, y: 0.5 * ((y - yt) ** 2).sum() + 0.005 * ((x - xt) ** 2).sum()  # noqa: E731
    x_star = torch.linalg.solve(B.T @ B + 0.01 * torch.eye(8, dtype=D), B.T @ (yt - c) + 0.01 * xt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = bilevel.solve(outer, inner, torch.zeros(8, dtype=D), torch.zeros(3, dtype=D), method="soba",
                               lr=0.3, max_steps=1000, progress=False)
    assert not [w for w in caught if issubclass(w.category, StepSizeWarning)]
    messages = [str(w.message) for w in caught if issubclass(w.category, CurvatureWarning)]
    assert len(messages) == 1 and "v lags behind" in messages[0], messages
    assert "lower `lr`" in messages[0] and "singular or nearly so" in messages[0]
    F_star = float(outer(x_star, B @ x_star + c))
    assert abs(float(outer(result.x, result.y)) - F_star) < 1e-3 * F_star


@pytest.mark.parametrize("method", ["meha", "bamm", "soba", "penalty",
                                    pytest.param("bda", marks=pytest.mark.slow)])  # bda: about 15 s
def test_a_lower_level_that_ignores_x(method):
    """f(x, y) = |y - 2|^2 / 2 has no x: its x-gradient is zero, and MEHA (and LV-HBA, below)
    stopped with autograd's 'element 0 of tensors does not require grad'.  x* = y* = 2 e."""
    D = torch.float64
    outer = lambda x, y: 0.5 * ((x - y) ** 2).sum()  # noqa: E731
    inner = lambda x, y: 0.5 * ((y - 2) ** 2).sum()  # noqa: E731
    r = bilevel.solve(outer, inner, torch.zeros(3, dtype=D), torch.zeros(3, dtype=D), method=method,
                      max_steps=2000, progress=False)
    torch.testing.assert_close(r.x, torch.full((3,), 2.0, dtype=D), atol=1e-3, rtol=0)


def test_lvhba_with_a_constraint_of_y_only():
    """A cap y <= 1.5 on problem L's objectives: y* = 1.5 e, x* = 0 (the constraint has no x)."""
    p = coupled_constraint()
    r = bilevel.solve(p.outer, p.inner, p.x0, p.y0, method="lvhba", constraints=lambda x, y: y - 1.5,
                      max_steps=2000, progress=False)
    torch.testing.assert_close(r.y, torch.full_like(r.y, 1.5), atol=1e-4, rtol=0)
    assert float(r.x.abs().max()) < 1e-4


def test_lvhba_refuses_outer_optimizers_that_are_not_plain_steps():
    """Adam on x with plain steps on y, then a joint projection onto C, has other fixed points:
    on problem L it ended at x = 1.0 e (x* = 0.5 e) with F = 5.04 (F* = 2.5) and no warning."""
    p = coupled_constraint()
    for optimizer in ("adam", lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.5)):
        with pytest.raises(ValueError, match=r"LVHBA: `outer_optimizer` must take plain gradient steps"):
            bilevel.solve(p, method="lvhba", outer_optimizer=optimizer, max_steps=5, progress=False)
    by_name = bilevel.solve(p, method="lvhba", outer_optimizer="sgd", max_steps=300, progress=False)
    by_class = bilevel.solve(p, method="lvhba", outer_optimizer=torch.optim.SGD, max_steps=300, progress=False)
    torch.testing.assert_close(by_class.x, by_name.x, rtol=1e-12, atol=1e-12)
