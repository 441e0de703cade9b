"""bilevel.solve: reaches known solutions, resumes exactly, keeps memory flat, rejects bad input."""

import gc
import warnings

import pytest
import torch

import bilevel
from bilevel.algorithms import Implicit, Unrolled
from bilevel.implicit import CG
from bilevel.problems import coupled_constraint, quadratic
from bilevel.solvers import LBFGS


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def test_implicit_reaches_the_closed_form_optimum_of_q():
    problem = quadratic()
    result = bilevel.solve(problem, method="implicit", outer_optimizer="rprop", lr=0.05, max_steps=300,
                           progress=False)
    assert relative_error(result.x, problem.solution.x) < 1e-5
    assert result.history["outer"][-1] == pytest.approx(problem.solution.value, rel=1e-8)
    assert len(result.history["hypergradient_norm"]) == 300


def test_one_step_is_a_biased_baseline():
    problem = quadratic()
    implicit = bilevel.solve(problem, outer_optimizer="rprop", lr=0.05, max_steps=300, progress=False)
    one_step = bilevel.solve(problem, method="one_step", outer_optimizer="rprop", lr=0.05, max_steps=300,
                             progress=False)
    error = relative_error(one_step.x, problem.solution.x)
    assert 1e-3 < error < 1.0 and error > 100 * relative_error(implicit.x, problem.solution.x)


def orthogonal_ridge(d=4, n=30, seed=0):
    """Per-feature ridge whose optimal penalties are known: exp(lam*_j) = s_j.

    Orthogonal designs make the validation loss separable; the validation target
    is built so that the best w_j is half the unregularized fit, x_j^T t / s_j,
    which the penalty exp(lam_j) = s_j produces.
    """
    g = torch.Generator().manual_seed(seed)
    s = torch.linspace(1.0, 4.0, d)
    Q, _ = torch.linalg.qr(torch.randn(n, d, generator=g))
    Qv, _ = torch.linalg.qr(torch.randn(n, d, generator=g))
    X, Xv = Q * s.sqrt(), Qv * s.sqrt()
    t = torch.randn(n, generator=g)
    w_best = 0.5 * (X.T @ t) / s
    tv = Xv @ w_best + (torch.eye(n) - Qv @ Qv.T) @ torch.randn(n, generator=g)
    inner = lambda lam, w: 0.5 * ((X @ w - t) ** 2).sum() + 0.5 * (lam.exp() * w**2).sum()  # noqa: E731
    outer = lambda lam, w: 0.5 * ((Xv @ w - tv) ** 2).sum()  # noqa: E731
    return outer, inner, s.log()


def test_implicit_ridge_reaches_the_closed_form_optimal_hyperparameters():
    outer, inner, lam_star = orthogonal_ridge()
    result = bilevel.solve(outer, inner, torch.zeros(4), torch.zeros(4), method="implicit",
                           outer_optimizer="rprop", lr=0.05, max_steps=500, tol=1e-7, progress=False)
    assert relative_error(result.x, lam_star) < 1e-4
    assert result.converged and "tol" in result.message


def test_unrolled_default_step_survives_a_lower_level_flat_at_the_start():
    """f = y^4 / 4 - x y is flat at y0 = 0 (curvature 0): the step 1/L taken there was
    1e12 and the first inner run diverged.  The first estimate now also looks at the end
    of a probe descent (curvature 3 y*^2 there), and the run reaches the optimum of
    F = (y - 0.5)^2 + 0.1 (x - 0.1)^2 with y*(x) = x^(1/3): x* = 0.12368 (a scalar minimization
    of the closed-form hyper-objective), which the implicit method finds too."""
    from scipy.optimize import minimize_scalar

    inner = lambda x, y: 0.25 * (y ** 4).sum() - (x * y).sum()  # noqa: E731
    outer = lambda x, y: ((y - 0.5) ** 2).sum() + 0.1 * ((x - 0.1) ** 2).sum()  # noqa: E731
    x_star = minimize_scalar(lambda x: (x ** (1 / 3) - 0.5) ** 2 + 0.1 * (x - 0.1) ** 2, bounds=(1e-6, 1.0),
                             method="bounded", options={"xatol": 1e-12}).x
    x0, y0 = torch.tensor([0.3], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unrolled = bilevel.solve(outer, inner, x0, y0, method="unrolled", max_steps=150, progress=False)
    reference = bilevel.solve(outer, inner, x0, y0, method="implicit", max_steps=150, progress=False)
    for result in (unrolled, reference):
        assert abs(float(result.x) - x_star) < 1e-3 * x_star
    torch.testing.assert_close(unrolled.y, unrolled.x ** (1 / 3), rtol=1e-3, atol=1e-4)


def test_unrolled_approaches_the_optimum_as_steps_grow():
    problem = quadratic()
    errors = []
    for steps in (2, 8, 32):
        result = bilevel.solve(problem, method="unrolled", steps=steps, outer_optimizer="rprop", lr=0.05,
                               max_steps=150, progress=False)
        errors.append(relative_error(result.x, problem.solution.x))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-2


def test_resume_ends_where_the_uninterrupted_run_ends(tmp_path):
    problem = quadratic()
    full = bilevel.solve(problem, method="implicit", max_steps=40, lr=0.05, progress=False)
    half = bilevel.solve(problem, method="implicit", max_steps=20, lr=0.05, progress=False)
    path = tmp_path / "checkpoint.pt"
    torch.save(half.state.state_dict(), path)
    resumed = bilevel.solve(problem, method="implicit", max_steps=40, lr=0.05, progress=False,
                            resume=torch.load(path))
    torch.testing.assert_close(resumed.x, full.x, rtol=0, atol=0)
    assert resumed.state.iteration == 40 and len(resumed.history["outer"]) == 20


def test_memory_stays_flat_over_many_steps():
    problem = quadratic(d=20, m=10)

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if torch.is_tensor(o))

    state = {}

    def count(s, record):
        if record["step"] == 20:
            state["before"] = live_tensors()

    bilevel.solve(problem, method="implicit", max_steps=120, progress=False, callback=count)
    result = bilevel.solve(problem, method="implicit", max_steps=20, progress=False)
    del result
    after = live_tensors()
    assert after - state["before"] <= 40  # the second run's own few tensors, not 100 steps' graphs


def test_callback_tol_and_history():
    problem = quadratic()
    seen = []
    result = bilevel.solve(problem, max_steps=50, progress=False,
                           callback=lambda s, r: seen.append(r["step"]) or r["step"] == 7)
    assert seen == list(range(1, 8)) and result.message == "stopped by the callback"
    assert set(bilevel.api.HISTORY_KEYS) <= set(result.history)
    assert all(t > 0 for t in result.history["time"])


def test_minibatches_are_passed_and_cycled():
    torch.manual_seed(0)
    X, t = torch.randn(40, 3), torch.randn(40)
    batches = [torch.arange(i, i + 10) for i in range(0, 40, 10)]
    used = []

    def inner(lam, w, idx):
        used.append(idx)
        return 0.5 * ((X[idx] @ w - t[idx]) ** 2).sum() + 0.5 * (lam.exp() * w**2).sum()

    def outer(lam, w, idx):
        return 0.5 * ((X @ w - t) ** 2).sum()

    result = bilevel.solve(outer, inner, torch.zeros(3), torch.zeros(3), max_steps=9, data=batches,
                           progress=False, inner_solver=LBFGS(maxiter=50))
    assert result.state.iteration == 9 and torch.isfinite(result.x).all()
    assert any(u is batches[0] for u in used) and any(u is batches[3] for u in used)
    with pytest.raises(ValueError, match="ran out after 2"):
        bilevel.solve(outer, inner, torch.zeros(3), torch.zeros(3), max_steps=5, data=iter(batches[:2]),
                      progress=False)


class _Loader:
    """A re-iterable stream of mini-batches that is not itself a batch (like a DataLoader)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


@pytest.mark.parametrize("form", ["pair", "dict"])
def test_one_data_stream_per_level(form):
    """data=(outer_data, inner_data) or {"outer": ..., "inner": ...}: each step draws one
    batch from each stream (cycled on its own); outer sees only validation batches,
    inner only training batches."""
    torch.manual_seed(0)
    X, t, Xv, tv = torch.randn(40, 3), torch.randn(40), torch.randn(20, 3), torch.randn(20)
    train = _Loader([("train", torch.arange(i, i + 20)) for i in (0, 20)])
    valid = _Loader([("valid", torch.arange(i, i + 10)) for i in (0, 10, 10)])
    seen = {"outer": set(), "inner": set()}

    def inner(lam, w, batch):
        kind, idx = batch
        seen["inner"].add(kind)
        return 0.5 * ((X[idx] @ w - t[idx]) ** 2).sum() + 0.5 * (lam.exp() * w**2).sum()

    def outer(lam, w, batch):
        kind, idx = batch
        seen["outer"].add(kind)
        return 0.5 * ((Xv[idx] @ w - tv[idx]) ** 2).sum()

    data = (valid, train) if form == "pair" else {"inner": train, "outer": valid}
    result = bilevel.solve(outer, inner, torch.zeros(3), torch.zeros(3), max_steps=7, data=data,
                           progress=False, inner_solver=LBFGS(maxiter=100))
    assert result.state.iteration == 7 and bool(torch.isfinite(result.x).all())
    assert seen == {"outer": {"valid"}, "inner": {"train"}}


def test_data_dict_must_name_both_levels():
    problem = quadratic()
    with pytest.raises(ValueError, match="exactly the keys 'outer' and 'inner'"):
        bilevel.solve(problem.outer, problem.inner, problem.x0, problem.y0, data={"train": [1]}, progress=False)


def test_a_tuple_of_two_batches_is_still_a_stream_of_batches():
    from bilevel.problems import LevelBatches

    got = []

    def inner(x, y, batch):
        got.append(batch)
        return 0.5 * ((y - x) ** 2).sum()

    batches = ((torch.ones(2), torch.zeros(2)), (torch.zeros(2), torch.ones(2)))  # two (X, t) batches
    bilevel.solve(lambda x, y, b: ((y - 1) ** 2).sum(), inner, torch.zeros(2), torch.zeros(2), max_steps=2,
                  data=batches, progress=False)
    assert got and not any(isinstance(b, LevelBatches) for b in got)
    assert any(b is batches[0] for b in got) and any(b is batches[1] for b in got)


def test_a_pair_mixing_a_loader_and_a_list_is_refused_as_ambiguous():
    """(list_of_batches, loader) is neither two batches (a loader is no batch) nor, by the
    pair rule, two streams (a list may be a batch): the error points to the dict form,
    which works."""
    problem = quadratic()
    loader = _Loader([None, None])
    with pytest.raises(ValueError, match=r"pair of a list and a _Loader.*'outer'"):
        bilevel.solve(problem.outer, problem.inner, problem.x0, problem.y0, data=([None, None], loader),
                      max_steps=1, progress=False)
    outer = lambda x, y, b: problem.outer(x, y)  # noqa: E731
    inner = lambda x, y, b: problem.inner(x, y)  # noqa: E731
    result = bilevel.solve(outer, inner, problem.x0, problem.y0, data={"outer": [None, None], "inner": loader},
                           max_steps=2, progress=False)
    assert result.state.iteration == 2


def test_config_objects_and_options():
    problem = quadratic()
    result = bilevel.solve(problem, method=Implicit(solve=CG(maxiter=50), lr=0.05), max_steps=5, progress=False)
    assert result.state.iteration == 5
    result = bilevel.solve(problem, method=Unrolled(steps=3), max_steps=2, progress=False, truncate=2)
    assert result.state.iteration == 2


def test_bad_input_is_rejected_clearly():
    problem = quadratic()
    with pytest.raises(ValueError, match="known methods: bamm, bda, implicit, lvhba, meha, one_step, penalty, soba, unrolled"):
        bilevel.solve(problem, method="newton")
    with pytest.raises(TypeError, match="does not take option"):
        bilevel.solve(problem, method="implicit", steps=3)
    with pytest.raises(TypeError, match=r"method Implicit does not take option\(s\) \['steps'\]; its options are"):
        bilevel.solve(problem, method=bilevel.algorithms.Implicit(), steps=3)
    with pytest.raises(ValueError, match="outer_optimizer"):
        bilevel.solve(problem, outer_optimizer="adamax-ish", max_steps=1, progress=False)
    inner = lambda x, y: 0.5 * ((y - x) ** 2).sum()  # noqa: E731
    with pytest.raises(ValueError, match="scalar"):
        bilevel.solve(lambda x, y: y - 1, inner, torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="x0"):  # shapes that the functions reject
        bilevel.solve(lambda x, y: (y**2).sum(), inner, torch.zeros(3), torch.zeros(2))
    with pytest.raises(FloatingPointError):
        bilevel.solve(lambda x, y: (y**2).sum() * float("nan"), inner, torch.zeros(2), torch.zeros(2))
    with pytest.raises(TypeError, match="missing"):
        bilevel.solve(lambda x, y: (y**2).sum(), inner, torch.zeros(2))
    with pytest.raises(ValueError, match="constraints"):
        bilevel.solve(lambda x, y: (y**2).sum(), inner, torch.zeros(2), torch.zeros(2),
                      constraints=lambda x, y: y - x, progress=False)
    diverging = bilevel.solve  # a huge learning rate on an unbounded-below outer objective
    with pytest.raises(FloatingPointError, match="finite"):
        diverging(lambda x, y: -(y**4).sum(), inner, torch.ones(2), torch.ones(2), method="one_step",
                  outer_optimizer="sgd", lr=1e3, max_steps=50, progress=False)


@pytest.mark.parametrize("method", ["implicit", "penalty", "meha", "bamm", "bda", "soba"])
def test_a_non_finite_start_is_named_before_any_step(method):
    """NaN in x0 (where the objectives never read it: relu) or inf in a leaf of y0 is an error
    naming the argument, not a blow-up blamed on the learning rate or on the objectives."""
    relu = lambda x: torch.where(x > 0, x, torch.zeros_like(x))  # noqa: E731
    inner = lambda x, y: 0.5 * ((y["a"] - relu(x)) ** 2).sum() + 0.5 * (y["b"] ** 2).sum()  # noqa: E731
    outer = lambda x, y: 0.5 * ((y["a"] - 1) ** 2).sum()  # noqa: E731
    y0 = {"a": torch.zeros(2, dtype=torch.float64), "b": torch.zeros(1, dtype=torch.float64)}
    x0 = torch.tensor([0.5, float("nan")], dtype=torch.float64)
    with pytest.raises(FloatingPointError, match=r"not finite: `x0` contains NaN or inf; the iterations need a finite start"):
        bilevel.solve(outer, inner, x0, y0, method=method, max_steps=3, progress=False)
    y0["b"] = torch.tensor([float("inf")], dtype=torch.float64)
    with pytest.raises(FloatingPointError, match=r"`y0` contains NaN or inf \(leaves \[1\]\)"):
        bilevel.solve(outer, inner, torch.zeros(2, dtype=torch.float64), y0, method=method, max_steps=3,
                      progress=False)


def test_defaults_work_on_problems_as_users_write_them():
    """Unscaled features (inner Hessian norm in the thousands), float32, a 0-d or a
    pytree upper variable, an optimizer instance: the defaults just work."""
    g = torch.Generator().manual_seed(0)
    X = 30 * torch.randn(80, 3, generator=g)
    t = X @ torch.tensor([1.0, -2.0, 0.5]) + torch.randn(80, generator=g)
    Xv, tv = X[:40] + 0.1, t[:40]
    for dtype in (torch.float64, torch.float32):
        Xd, td, Xvd, tvd = (a.to(dtype) for a in (X, t, Xv, tv))
        inner = lambda lam, w: 0.5 * ((Xd @ w - td) ** 2).sum() + 0.5 * lam.exp() * (w**2).sum()  # noqa: E731
        outer = lambda lam, w: 0.5 * ((Xvd @ w - tvd) ** 2).sum()  # noqa: E731
        result = bilevel.solve(outer, inner, torch.tensor(0.0, dtype=dtype), torch.zeros(3, dtype=dtype),
                               max_steps=30, progress=False)
        assert result.x.dtype == dtype and result.x.shape == () and torch.isfinite(result.x)
        assert result.history["outer"][-1] <= result.history["outer"][0] * (1 + 1e-3)  # float32 noise
    x0 = {"log_l2": torch.tensor(0.0), "shift": torch.zeros(3)}
    inner = lambda x, w: 0.5 * ((X @ w - t) ** 2).sum() + 0.5 * x["log_l2"].exp() * ((w - x["shift"]) ** 2).sum()  # noqa: E731
    outer = lambda x, w: 0.5 * ((Xv @ w - tv) ** 2).sum()  # noqa: E731
    optimizer = torch.optim.SGD([torch.zeros(1)], lr=1e-6, momentum=0.5)
    result = bilevel.solve(outer, inner, x0, torch.zeros(3), outer_optimizer=optimizer, max_steps=20,
                           progress=False)
    assert set(result.x) == {"log_l2", "shift"} and isinstance(result.state.optimizer, torch.optim.SGD)
    assert result.state.optimizer.defaults["momentum"] == 0.5
    assert result.history["outer"][-1] <= result.history["outer"][0]


@pytest.mark.parametrize("method", ["one_step", "unrolled"])
def test_default_inner_step_follows_a_growing_curvature(method):
    """The inner curvature exp(x) w grows 50-fold while the inner optimum y* = x moves:
    a step size estimated once would exceed 2/L and let the inner iterate diverge."""
    weights = torch.tensor([1.0, 0.5, 0.25])
    inner = lambda x, y: 0.5 * x.exp() * (weights * (y - x) ** 2).sum()  # noqa: E731
    outer = lambda x, y: -x + 0.5 * ((y - x) ** 2).sum()  # noqa: E731  pushes x up
    options = {"steps": 5, "warm_start": True} if method == "unrolled" else {}
    result = bilevel.solve(outer, inner, torch.tensor(0.0), torch.zeros(3), method=method,
                           outer_optimizer="sgd", lr=0.05, max_steps=80, progress=False, **options)
    assert float(result.x) > 3.0  # curvature grows more than exp(3) ~ 20-fold
    assert max(abs(v) for v in result.history["outer"]) < 10
    assert float((result.y - result.x).abs().max()) < 0.5


def test_default_implicit_inner_solves_converge_on_an_unscaled_objective():
    """Ridge on diabetes: an inner objective near 5e5. The default inner tolerance follows
    the problem's gradient scale, so warm-started solves converge instead of spending
    their budget and warning at every step (a tolerance relative to the warm start did)."""
    from bilevel.problems import ridge_diabetes

    problem = ridge_diabetes().as_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = bilevel.solve(problem, method="implicit", lr=0.05, max_steps=40, progress=False)
    assert result.history["outer"][-1] < result.history["outer"][0]


@pytest.mark.parametrize("method", ["implicit", "unrolled", "one_step"])
def test_hypergradient_methods_project_x_onto_x_set(method):
    """Projected hypergradient descent: with x in a box that cuts off x*, implicit
    and unrolled end at the fixed point of x = P(x - a dF/dx) of the exact
    hypergradient (one_step, biased, only stays inside the box)."""
    from bilevel.implicit.projections import Box

    p = quadratic()
    box = Box(-0.1, 0.1)
    assert float(p.solution.x.abs().max()) > 0.5  # the box is active at the optimum
    x = torch.zeros_like(p.x0)
    for _ in range(3000):  # the reference: projected gradient with the closed-form hypergradient
        x = box(x - 0.5 * p.hypergradient(x))
    options = {"steps": 100} if method == "unrolled" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bilevel.BilevelWarning)
        r = bilevel.solve(p, method=method, x_set=box, outer_optimizer="sgd", lr=0.5, max_steps=60,
                          progress=False, **options)
    assert float(r.x.abs().max()) <= 0.1 + 1e-12
    if method != "one_step":
        torch.testing.assert_close(r.x, x, atol=1e-6, rtol=0)
    problem_set = bilevel.BilevelProblem(p.outer, p.inner, p.x0, p.y0, x_set=box)  # the problem's set is used
    r2 = bilevel.solve(problem_set, method=method, max_steps=5, progress=False, **options)
    assert float(r2.x.abs().max()) <= 0.1 + 1e-12


def test_a_method_without_y_set_support_refuses_a_constrained_lower_level():
    from dataclasses import dataclass

    from bilevel.algorithms import Algorithm
    from bilevel.implicit.projections import Box

    @dataclass(frozen=True)
    class Plain(Algorithm):  # a user's method that differentiates the unconstrained stationarity
        def hypergradient(self, outer, inner, state, batch):
            raise AssertionError("not reached")

    p = quadratic()
    constrained = bilevel.BilevelProblem(p.outer, p.inner, p.x0, p.y0, y_set=Box(0, 1))
    with pytest.raises(ValueError, match="constrains y.*single-loop.*'implicit'"):
        bilevel.solve(constrained, method=Plain(), max_steps=2, progress=False)


def test_one_argument_callback_and_a_tensor_as_known_solution():
    p = quadratic()
    seen = []
    bilevel.solve(p, method="implicit", max_steps=3, progress=False, callback=lambda state: seen.append(state.iteration))
    assert seen == [1, 2, 3]
    with pytest.raises(TypeError, match="callback"):
        bilevel.solve(p, method="implicit", max_steps=1, progress=False, callback=lambda a, b, c: None)
    known = bilevel.BilevelProblem(p.outer, p.inner, p.x0, p.y0, solution=p.solution.x)
    torch.testing.assert_close(known.solution.x, p.solution.x)
    assert known.solution.y is None


def test_constraints_take_no_batch_and_a_dry_level_stream_is_named():
    """lvhba with data: the constraints are g(x, y) in validation as in the steps; a
    per-level generator that runs dry names its level."""
    problem = coupled_constraint()
    batches = [torch.tensor(1.0), torch.tensor(1.0)]
    result = bilevel.solve(lambda x, y, b: problem.outer(x, y) * b, lambda x, y, b: problem.inner(x, y) * b,
                           problem.x0, problem.y0, method="lvhba", constraints=problem.constraints,
                           data=batches, max_steps=3, progress=False)
    assert result.state.iteration == 3
    outer = lambda x, y, b: ((y - 1) ** 2).sum()  # noqa: E731
    inner = lambda x, y, b: 0.5 * ((y - x) ** 2).sum()  # noqa: E731
    with pytest.raises(ValueError, match="the inner stream of `data` ran out after 2"):
        bilevel.solve(outer, inner, torch.zeros(2), torch.zeros(2), max_steps=5, progress=False,
                      data={"outer": [1, 2, 3], "inner": iter([1, 2])})
    with pytest.raises(ValueError, match="both streams"):
        bilevel.solve(outer, inner, torch.zeros(2), torch.zeros(2), data={"outer": None, "inner": [1]},
                      progress=False)


@pytest.mark.parametrize("method, options", [("implicit", {}), ("unrolled", {"steps": 30}),
                                             ("one_step", {"inner_steps": 5})])
def test_hypergradient_methods_with_a_constrained_lower_level(method, options):
    """y*(x) = max(x, 0) (inner 1/2 |y - x|^2 over y >= 0), F = 1/2 |y - t|^2, t = (1, -1):
    dF/dx = (y* - t) where the constraint is inactive, 0 where it is active; the run
    reaches x_1 = 1 with y_2 = 0 (outer value 1/2), the set given to the method or
    to the problem."""
    from bilevel.algorithms import METHODS
    from bilevel.implicit import NonNegative
    from bilevel.problems import BilevelProblem

    t = torch.tensor([1.0, -1.0])
    inner = lambda x, y: 0.5 * ((y - x) ** 2).sum()  # noqa: E731
    outer = lambda x, y: 0.5 * ((y - t) ** 2).sum()  # noqa: E731
    if method == "implicit":  # one step against the closed form
        algorithm = METHODS[method](y_set=NonNegative(), outer_optimizer="sgd", lr=1.0)
        for x0, y_star in [((0.5, 0.5), (0.5, 0.5)), ((0.5, -0.5), (0.5, 0.0))]:
            problem = BilevelProblem(outer, inner, torch.tensor(x0), torch.zeros(2))
            state = algorithm.step(problem, algorithm.init(problem))
            torch.testing.assert_close(state.y, torch.tensor(y_star), atol=1e-7, rtol=0)
            g = torch.tensor(y_star) - t
            g[torch.tensor(y_star) == 0] = 0
            torch.testing.assert_close(state.x, torch.tensor(x0) - g, atol=1e-6, rtol=0)  # one SGD step
    for given_to in ("method", "problem"):
        problem = BilevelProblem(outer, inner, torch.tensor([0.5, 0.5]), torch.zeros(2),
                                 y_set=NonNegative() if given_to == "problem" else None)
        extra = {"y_set": NonNegative()} if given_to == "method" else {}
        result = bilevel.solve(problem, method=method, lr=0.1, outer_optimizer="sgd", max_steps=200,
                               progress=False, **options, **extra)
        assert abs(float(result.x[0]) - 1) < 1e-4 and float(result.y[1]) == 0.0
        assert abs(result.history["outer"][-1] - 0.5) < 1e-6


def test_implicit_with_a_constrained_lower_level_records_the_adjoint_solve_residual():
    """With a y_set the IFT runs inside the projected-gradient solver's own custom_root; its
    certificate still reaches the history: tiny with the default solve, large with a
    one-iteration GMRES on a coupled 5-d system (never NaN where a solve ran)."""
    from bilevel.implicit import NonNegative
    from bilevel.implicit.linear_solve import GMRES
    from bilevel.problems import BilevelProblem

    g = torch.Generator().manual_seed(3)
    B = torch.randn(5, 5, generator=g, dtype=torch.float64)
    A = B @ B.T + torch.eye(5, dtype=torch.float64)
    t = torch.randn(5, generator=g, dtype=torch.float64)
    inner = lambda x, y: 0.5 * y @ A @ y - x @ y  # noqa: E731
    outer = lambda x, y: 0.5 * ((y - t) ** 2).sum()  # noqa: E731
    x0 = torch.tensor([3.0, 2.0, -1.0, 4.0, 1.0], dtype=torch.float64)
    problem = BilevelProblem(outer, inner, x0, torch.zeros(5, dtype=torch.float64), y_set=NonNegative())
    exact = bilevel.solve(problem, method="implicit", lr=0.01, outer_optimizer="sgd", max_steps=3, progress=False)
    residuals = exact.history["linear_residual"]
    assert len(residuals) == 3 and all(0 <= r < 1e-8 for r in residuals), residuals
    with pytest.warns(bilevel.ConvergenceWarning):
        short = bilevel.solve(problem, method=Implicit(solve=GMRES(maxiter=1, restart=1), lr=0.01,
                                                      outer_optimizer="sgd"), max_steps=1, progress=False)
    assert 1e-3 < short.history["linear_residual"][0] < 1.5


def test_implicit_cold_start_runs_every_inner_solve_from_y0():
    """warm_start=False: after each outer step, y is the inner solver's run from y0 at the
    x of that step (here one gradient step, so warm and cold runs visibly differ); the
    default warm start continues from the previous y.  State dicts keep y0 for resuming."""
    from bilevel.solvers import GradientDescent

    problem = quadratic()
    objective = lambda y, x: problem.inner(x, y)  # noqa: E731
    one_step = GradientDescent(maxiter=1)
    for warm in (False, True):
        method = Implicit(inner_solver=one_step, solve=CG(maxiter=50), outer_optimizer="sgd", lr=0.5,
                          warm_start=warm)
        state = method.init(problem, y0=torch.ones(5, dtype=torch.float64))
        y_previous = state.y.clone()
        for _ in range(3):
            x_before = state.x.clone()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # one inner step: the certificate warns
                state = method.step(problem, state)
            start = torch.ones(5, dtype=torch.float64) if not warm else y_previous
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected, _ = one_step.run(objective, start, x_before)
            torch.testing.assert_close(state.y, expected, rtol=1e-12, atol=1e-12)
            y_previous = state.y.clone()
        resumed = method.init(problem, y0=torch.ones(5, dtype=torch.float64)).load_state_dict(state.state_dict())
        assert ("y_start" in resumed.extras) == (not warm)


def test_implicit_cold_start_reaches_the_solution_of_a_strongly_convex_problem():
    """With exact inner solves the start does not matter: cold-start AID converges to x* of Q."""
    problem = quadratic()
    result = bilevel.solve(problem, method=Implicit(solve=CG(maxiter=20), outer_optimizer="sgd", lr=0.5,
                                                    warm_start=False), max_steps=100, progress=False)
    torch.testing.assert_close(result.x, problem.solution.x, rtol=1e-6, atol=1e-8)


def test_resuming_twice_from_one_checkpoint_gives_the_same_run():
    """torch's Optimizer.load_state_dict keeps the checkpoint's tensors (Adam's moments);
    a resumed run must not update them in place, or a second resume from the same
    checkpoint starts elsewhere."""
    problem = quadratic()
    part = bilevel.solve(problem, method="implicit", lr=0.05, max_steps=10, progress=False)
    checkpoint = part.state.state_dict()
    moments = [t.clone() for t in checkpoint["optimizer"]["state"][0].values() if torch.is_tensor(t)]
    first = bilevel.solve(problem, method="implicit", lr=0.05, max_steps=20, progress=False, resume=checkpoint)
    second = bilevel.solve(problem, method="implicit", lr=0.05, max_steps=20, progress=False, resume=checkpoint)
    assert torch.equal(first.x, second.x)
    after = [t for t in checkpoint["optimizer"]["state"][0].values() if torch.is_tensor(t)]
    assert all(torch.equal(a, b) for a, b in zip(moments, after))


def test_implicit_warm_start_must_be_a_bool():
    with pytest.raises(TypeError, match="warm_start"):
        Implicit(warm_start="no")


@pytest.mark.parametrize("method", ["meha", "bamm", "soba", "penalty", "bda"])
def test_tol_does_not_stop_a_single_loop_method_on_its_first_lagging_estimate(method):
    """On an outer objective of y only, grad_x F(x0, y0) = 0: the single-loop estimates of the
    first step (theta, v, z at their start) vanished, and tol stopped meha / bamm / soba after one
    step with converged=True at x0.  tol now holds over consecutive steps, at the solution."""
    outer = lambda x, y: 0.5 * ((y - 1) ** 2).sum()  # noqa: E731
    inner = lambda x, y: 0.5 * ((y - x) ** 2).sum()  # noqa: E731  (y*(x) = x, so x* = 1)
    zeros = torch.zeros(3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = bilevel.solve(outer, inner, zeros, zeros, method=method, tol=1e-6, max_steps=5000, progress=False)
    assert r.converged and r.state.iteration >= 10
    torch.testing.assert_close(r.x, torch.ones(3, dtype=torch.float64), atol=1e-4, rtol=0)
    assert all(h <= 1e-6 for h in r.history["hypergradient_norm"][-10:])


def test_class_settings_are_not_options():
    for name in ("field_rules", "tol_patience"):
        with pytest.raises(TypeError, match=rf"does not take option\(s\) \['{name}'\]"):
            bilevel.solve(quadratic(), method="meha", max_steps=1, progress=False, **{name: 1})
    with pytest.raises(TypeError, match=r"its options are \[(?!.*field_rules)"):
        bilevel.solve(quadratic(), method="meha", max_steps=1, progress=False, stepz=1)


def test_with_data_a_level_that_uses_none_may_take_two_arguments():
    """DESIGN: the mini-batch is an optional third argument. An outer level over the
    hyper-parameters alone, written outer(x, y), runs with data= beside inner(x, y, batch),
    and equals the same outer written with an unused batch argument."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    inner = lambda x, y, b: 0.5 * ((b @ y - b @ x) ** 2).mean() + 5e-3 * (y ** 2).sum()  # noqa: E731
    outer = lambda x, y: 0.5 * ((y - 1) ** 2).sum()  # noqa: E731
    start = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    two = bilevel.solve(outer, inner, *start, data=batches, max_steps=5, progress=False)
    three = bilevel.solve(lambda x, y, b: outer(x, y), inner, *start, data=batches, max_steps=5, progress=False)
    torch.testing.assert_close(two.x, three.x, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"`inner\(x0, y0, batch\)` raised TypeError"):
        bilevel.solve(outer, lambda x, y, b, c: outer(x, y), *start, data=batches, max_steps=1, progress=False)
    # a batch taken by keyword only is not the optional third argument: refused as before
    with pytest.raises(ValueError, match=r"`inner\(x0, y0, batch\)` raised TypeError"):
        bilevel.solve(outer, lambda x, y, *, batch=None: outer(x, y), *start, data=batches, max_steps=1,
                      progress=False)
