"""Inner solvers: solutions against closed forms, implicit Jacobians against closed
forms and finite differences, dtype contracts, per-element batches and failures.

A registry of solvers and one of problems with known answers; the tests run
over their product (the lineax / optimistix helpers style).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
from torch.func import hessian, jacrev

from bilevel.implicit.prox import prox_lasso, prox_none
from bilevel.solvers import (
    LBFGS,
    GaussNewton,
    GradientDescent,
    LevenbergMarquardt,
    OptimizerLoop,
    ProximalGradient,
    ScipyMinimize,
    SolverInfo,
)
from bilevel.status import ConvergenceWarning, OptimalityWarning, Status

# ----------------------------------------------------------------------------- problems


@dataclass
class Problem:
    """``fun(w, lam)`` with a reference solution; ``residual(w, lam)`` (least-squares
    form, ``0.5 ||residual||^2 = fun``) where there is one."""

    name: str
    fun: Callable
    lam: torch.Tensor
    solution: Callable  # lam -> w*
    residual: Optional[Callable] = None

    @property
    def init(self):
        return torch.zeros(self.lam.shape[0], dtype=self.lam.dtype)

    def jacobian(self, lam):
        """Closed form d w* / d lam = -H^{-1} diag(exp(lam) w*) (both problems have an
        l2 penalty 0.5 sum exp(lam) w^2)."""
        w = self.solution(lam)
        return -torch.linalg.solve(hessian(self.fun)(w, lam), torch.diag(lam.exp() * w))


def ridge(scale=1.0, n=40, d=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = scale * torch.randn(n, d, generator=g, dtype=dtype)
    t = X @ torch.randn(d, generator=g, dtype=dtype) + torch.randn(n, generator=g, dtype=dtype)

    def fun(w, lam):
        return 0.5 * ((X @ w - t) ** 2).sum() + 0.5 * (lam.exp() * w**2).sum()

    def residual(w, lam):
        return torch.cat([X @ w - t, (0.5 * lam).exp() * w], dim=-1)

    def solution(lam):
        return torch.linalg.solve(X.T @ X + torch.diag(lam.exp()), X.T @ t)

    name = "ridge" if scale == 1.0 else f"ridge_x{scale:g}"
    return Problem(name, fun, torch.linspace(-1.0, 1.0, d, dtype=dtype), solution, residual)


def logistic(n=60, d=4, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.sign(X @ torch.randn(d, generator=g, dtype=dtype) + 0.5 * torch.randn(n, generator=g, dtype=dtype))

    def fun(w, lam):
        return torch.nn.functional.softplus(-y * (X @ w)).sum() + 0.5 * (lam.exp() * w**2).sum()

    def solution(lam):  # a tight Newton solve
        w = torch.zeros(d, dtype=dtype)
        for _ in range(30):
            w = w - torch.linalg.solve(hessian(fun)(w, lam), torch.func.grad(fun)(w, lam))
        return w

    return Problem("logistic", fun, torch.linspace(-1.0, 1.0, d, dtype=dtype), solution)


PROBLEMS = {p.name: p for p in (ridge(), ridge(scale=30.0), logistic())}


def test_unscaled_ridge_is_badly_scaled():
    p = PROBLEMS["ridge_x30"]
    assert torch.linalg.matrix_norm(hessian(p.fun)(p.solution(p.lam), p.lam), 2) > 1e4


# ----------------------------------------------------------------------------- solvers

SMOOTH = {
    "GradientDescent": GradientDescent(),
    "GradientDescent(accelerated)": GradientDescent(acceleration=True),
    "OptimizerLoop(rprop)": OptimizerLoop("rprop", lr=1e-2, step_sizes=(1e-20, 50.0)),
    "LBFGS": LBFGS(),
    "ScipyMinimize(L-BFGS-B)": ScipyMinimize(),
    "ScipyMinimize(Newton-CG)": ScipyMinimize("Newton-CG"),
    "ScipyMinimize(trust-exact)": ScipyMinimize("trust-exact"),
    "ProximalGradient(prox_none)": ProximalGradient(prox_none),
}
LEAST_SQUARES = {"GaussNewton": GaussNewton(), "LevenbergMarquardt": LevenbergMarquardt()}


def cases():
    """(solver name, problem name) pairs: smooth solvers on every problem, least
    squares on the problems with a residual form."""
    out = [(s, p) for s in SMOOTH for p in PROBLEMS]
    out += [(s, p) for s in LEAST_SQUARES for p, prob in PROBLEMS.items() if prob.residual is not None]
    return out


def setup(solver_name, problem):
    """The solver and the function it minimizes (a residual for least squares)."""
    if solver_name in LEAST_SQUARES:
        return LEAST_SQUARES[solver_name], problem.residual
    return SMOOTH[solver_name], problem.fun


@pytest.mark.parametrize("solver_name,problem_name", cases())
def test_reaches_reference_solution(solver_name, problem_name):
    problem = PROBLEMS[problem_name]
    solver, fun = setup(solver_name, problem)
    w, info = solver.run(fun, problem.init, problem.lam)
    assert isinstance(info, SolverInfo)
    assert bool(info.converged) and int(info.status) == Status.SUCCESS
    assert float(info.residual_norm) <= float(info.tolerance)
    assert info.iterations.dtype == torch.int64 and info.status.shape == ()
    expected = problem.solution(problem.lam)  # default tolerance: |g| <= 1.5e-8 |g0|
    torch.testing.assert_close(w, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(info.value, problem.fun(w, problem.lam))  # = 0.5 ||residual||^2 too


@pytest.mark.parametrize("solver_name,problem_name", cases())
def test_jacobian_matches_closed_form_and_finite_differences(solver_name, problem_name):
    problem = PROBLEMS[problem_name]
    solver, fun = setup(solver_name, problem)
    lam = problem.lam
    jac = torch.autograd.functional.jacobian(lambda l: solver(fun, problem.init, l), lam)
    torch.testing.assert_close(jac, problem.jacobian(lam), rtol=1e-5, atol=1e-8)
    # Central differences of the solver itself (default settings), along a random direction:
    # with solutions accurate to about 1e-8 relative, h = 1e-3 leaves an error near 1e-5.
    v = torch.randn(lam.shape, dtype=lam.dtype, generator=torch.Generator().manual_seed(3))
    assert_matches_central_differences(lambda l: solver.run(fun, problem.init, l)[0], lam, v, jac @ v)


def assert_matches_central_differences(solve, x, v, expected, h=1e-3):
    """Central differences of ``solve`` along ``v``, up to the error that solutions
    accurate to about 1e-8 relative leave (1e-8 / h, relative to the solution)."""
    fd = (solve(x + h * v) - solve(x - h * v)) / (2 * h)
    scale = float(solve(x).abs().max())
    torch.testing.assert_close(fd, expected, rtol=1e-3, atol=1e-4 * scale)


@pytest.mark.parametrize(
    "solver",
    [
        GradientDescent(tol=1e-12),
        ProximalGradient(prox_none, tol=1e-12),
        OptimizerLoop("rprop", tol=1e-12, step_sizes=(1e-20, 50.0)),
    ],
    ids=lambda s: type(s).__name__,
)
def test_gradcheck(solver):
    problem = PROBLEMS["logistic"]
    lam = problem.lam.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda l: solver(problem.fun, problem.init, l), (lam,))


def test_gradcheck_gauss_newton():
    problem = PROBLEMS["ridge"]
    lam = problem.lam.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda l: GaussNewton(tol=1e-13)(problem.residual, problem.init, l), (lam,))


def test_torch_func_jacrev_vmap_and_pytree_init():
    """The differentiable call composes with torch.func, and keeps a tree structure."""
    problem = PROBLEMS["ridge"]
    jac = jacrev(lambda l: LBFGS()(problem.fun, problem.init, l))(problem.lam)
    torch.testing.assert_close(jac, problem.jacobian(problem.lam), rtol=1e-5, atol=1e-8)
    lams = torch.stack([problem.lam, problem.lam + 0.3])
    for solver in (GradientDescent(), ProximalGradient(prox_none)):
        jacs = torch.func.vmap(jacrev(lambda l, s=solver: s(problem.fun, problem.init, l)))(lams)
        torch.testing.assert_close(jacs, torch.stack([problem.jacobian(l) for l in lams]), rtol=1e-5, atol=1e-8)

    def split_fun(w, lam):
        return problem.fun(torch.cat([w["a"], w["b"].reshape(-1)]), lam)

    init = {"a": torch.zeros(1), "b": torch.zeros(2, 2)}
    expected = problem.solution(problem.lam)
    for solver in (GradientDescent(), LBFGS(), ScipyMinimize(), OptimizerLoop("rprop", step_sizes=(1e-20, 50.0))):
        w, info = solver.run(split_fun, init, problem.lam)
        assert set(w) == {"a", "b"} and w["b"].shape == (2, 2) and bool(info.converged)
        torch.testing.assert_close(torch.cat([w["a"], w["b"].reshape(-1)]), expected, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("solver_name", list(SMOOTH) + list(LEAST_SQUARES))
def test_dtype_is_kept(solver_name, dtype):
    problem = ridge(dtype=dtype)
    solver, fun = setup(solver_name, problem)
    lam = problem.lam.clone().requires_grad_()
    w, info = solver.run(fun, problem.init, lam)
    assert w.dtype == dtype and info.residual_norm.dtype == dtype and bool(info.converged)
    w = solver(fun, problem.init, lam)
    assert w.dtype == dtype
    (g,) = torch.autograd.grad(w.sum(), lam)
    assert g.dtype == dtype
    tol = 1e-3 if dtype == torch.float32 else 1e-6
    torch.testing.assert_close(w.detach(), problem.solution(lam.detach()), rtol=tol, atol=tol)
    torch.testing.assert_close(g, problem.jacobian(lam.detach()).sum(0), rtol=tol * 10, atol=tol)


# ----------------------------------------------------------------------------- lasso


def lasso_problem(n=50, d=8, seed=2):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    w_true = torch.tensor([3.0, -2.0, 0.0, 0.0, 1.5, 0.0, 0.0, 0.0])
    y = X @ w_true + 0.3 * torch.randn(n, generator=g)

    def fun(w, y):
        return 0.5 * ((X @ w - y) ** 2).sum()

    return X, y, fun


def coordinate_descent(X, y, l1reg, sweeps=2000):
    w = torch.zeros(X.shape[1])
    col_sq = (X**2).sum(0)
    for _ in range(sweeps):
        for j in range(X.shape[1]):
            r = y - X @ w + X[:, j] * w[j]
            rho = X[:, j] @ r
            w[j] = torch.sign(rho) * torch.clamp(rho.abs() - l1reg, min=0) / col_sq[j]
    return w


@pytest.mark.parametrize("acceleration", [True, False], ids=["FISTA", "ISTA"])
def test_lasso_solution_and_jacobians(acceleration):
    X, y, fun = lasso_problem()
    l1reg = torch.tensor(10.0)
    solver = ProximalGradient(prox_lasso, acceleration=acceleration)
    w, info = solver.run(fun, torch.zeros(X.shape[1]), y, prox_args=l1reg)
    assert bool(info.converged)
    reference = coordinate_descent(X, y, float(l1reg))
    torch.testing.assert_close(w, reference, rtol=1e-6, atol=1e-8)
    support = w.abs() > 1e-8
    assert 0 < int(support.sum()) < X.shape[1]

    jac_y, jac_l1 = torch.autograd.functional.jacobian(
        lambda y_, l_: solver(fun, torch.zeros(X.shape[1]), y_, prox_args=l_), (y, l1reg)
    )
    XS = X[:, support]
    gram_inv = torch.linalg.inv(XS.T @ XS)
    torch.testing.assert_close(jac_y[support], gram_inv @ XS.T, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(jac_l1[support], -gram_inv @ torch.sign(w[support]), rtol=1e-6, atol=1e-8)
    assert jac_y[~support].abs().max() < 1e-8 and jac_l1[~support].abs().max() < 1e-8


# ----------------------------------------------------------------------------- batched least squares

T = torch.linspace(0.0, 1.0, 25)


def exp_fit(p, data):
    """Residuals of a * exp(b t) against data, batched over the leading dimension."""
    return p[..., :1] * torch.exp(p[..., 1:] * T) - data


def exp_data(B=5, seed=4):
    g = torch.Generator().manual_seed(seed)
    truth = torch.stack([1.0 + torch.rand(B, generator=g), torch.linspace(-1.5, 1.0, B)], dim=-1)
    data = truth[:, :1] * torch.exp(truth[:, 1:] * T) + 0.01 * torch.randn(B, T.numel(), generator=g)
    return truth, data


@pytest.mark.parametrize("solver", [GaussNewton(batch_dims=1), LevenbergMarquardt(batch_dims=1)], ids=type)
def test_batched_least_squares_matches_loop_and_finite_differences(solver):
    truth, data = exp_data()
    init = torch.ones_like(truth)
    p, info = solver.run(exp_fit, init, data)
    assert info.status.shape == (5,) and info.iterations.shape == (5,) and bool(info.converged.all())
    single = type(solver)()  # batch_dims=0, one problem at a time
    loop = torch.stack([single.run(exp_fit, init[i], data[i])[0] for i in range(5)])
    torch.testing.assert_close(p, loop, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(p, truth, rtol=0.05, atol=0.05)

    jac = torch.autograd.functional.jacobian(lambda d: solver(exp_fit, init, d), data)  # (5, 2, 5, 25)
    blocks = torch.stack([jac[i, :, i] for i in range(5)])
    off = jac.clone()
    for i in range(5):
        off[i, :, i] = 0
    assert off.abs().max() == 0  # elements are independent
    v = torch.randn(data.shape, generator=torch.Generator().manual_seed(5))
    expected = torch.einsum("bpm,bm->bp", blocks, v)
    assert_matches_central_differences(lambda d: solver.run(exp_fit, init, d)[0], data, v, expected)


@pytest.mark.parametrize("cls", [GaussNewton, LevenbergMarquardt])
def test_hard_element_reports_its_own_status(cls):
    truth, data = exp_data()
    init = torch.ones_like(truth)
    init[2] = torch.tensor([0.01, 10.0])  # far away: needs more than 12 iterations, the others at most 5
    budget = 8
    with pytest.warns(ConvergenceWarning, match=r"batch elements \[2\].*residual"):
        p, info = cls(batch_dims=1, maxiter=budget).run(exp_fit, init, data)
    assert info.status.tolist() == [0, 0, Status.MAX_ITERATIONS, 0, 0]
    assert int(info.iterations[2]) == budget and bool((info.iterations[[0, 1, 3, 4]] < budget).all())
    assert float(info.residual_norm[2]) > float(info.tolerance[2])
    easy, _ = cls(batch_dims=1).run(exp_fit, init[[0, 1, 3, 4]], data[[0, 1, 3, 4]])
    torch.testing.assert_close(p[[0, 1, 3, 4]], easy, rtol=1e-7, atol=1e-9)
    _, info_full = cls(batch_dims=1).run(exp_fit, init, data)  # with a budget, it gets there
    assert bool(info_full.converged.all())


# ----------------------------------------------------------------------------- failures


@pytest.mark.parametrize("solver_name", list(SMOOTH) + list(LEAST_SQUARES))
def test_budget_exhausted_warns_with_residual(solver_name):
    problem = PROBLEMS["logistic"] if solver_name in SMOOTH else PROBLEMS["ridge_x30"]
    solver, fun = setup(solver_name, problem)
    if solver_name in LEAST_SQUARES:  # Gauss-Newton solves the linear ridge in one step
        fun = exp_fit
        problem = Problem("exp", None, exp_data(1)[1][0], None)
        init = torch.tensor([0.01, 10.0])
    else:
        init = problem.init
    short = dataclasses.replace(solver, maxiter=2)
    name = type(solver).__name__
    with pytest.warns(ConvergenceWarning, match=rf"{name} did not converge: MAX_ITERATIONS.*residual [0-9.e+-]+ > "
                      r"tolerance.*raise `maxiter`"):
        w, info = short.run(fun, init, problem.lam)
    assert int(info.status) == Status.MAX_ITERATIONS and not bool(info.converged)
    assert float(info.residual_norm) > float(info.tolerance) and int(info.iterations) <= 2
    assert torch.isfinite(w).all()


def test_lbfgs_finishes_below_the_line_search_resolution():
    """A value-based line search cannot resolve gradients below sqrt(eps L |f|); where it
    stalls, L-BFGS finishes with secant-tested gradient steps and reaches the tolerance."""
    problem = PROBLEMS["logistic"]
    _, info = LBFGS(tol=1e-15).run(problem.fun, problem.init, problem.lam)
    assert int(info.status) == Status.SUCCESS and int(info.iterations) < 100
    assert float(info.residual_norm) <= float(info.tolerance)


def test_inexact_solution_is_flagged_in_backward():
    problem = PROBLEMS["logistic"]
    lam = problem.lam.clone().requires_grad_()
    with pytest.warns(ConvergenceWarning):
        w = GradientDescent(maxiter=2)(problem.fun, problem.init, lam)
    with pytest.warns(OptimalityWarning):
        w.sum().backward()


@pytest.mark.parametrize("solver_name", list(SMOOTH) + list(LEAST_SQUARES))
def test_nan_objective_raises(solver_name):
    solver = SMOOTH.get(solver_name) or LEAST_SQUARES[solver_name]
    if solver_name in LEAST_SQUARES:
        def fun(w, c):
            return w * float("nan") - c
    else:
        def fun(w, c):
            return ((w - c) ** 2).sum() * float("nan")
    with pytest.raises(FloatingPointError, match=rf"{type(solver).__name__}.*not finite.*iteration"):
        solver.run(fun, torch.zeros(3), torch.ones(3))


def test_nan_later_raises_naming_iteration():
    def fun(w, c):  # NaN once w moves away from 0
        return ((w - c) ** 2).sum() + torch.where(w.abs().sum() > 0.5, float("nan"), 0.0)

    with pytest.raises(FloatingPointError, match=r"GradientDescent.*iteration [1-9]"):
        GradientDescent(step=0.4).run(fun, torch.zeros(3), torch.ones(3))


@pytest.mark.parametrize("acceleration", [True, False])
def test_nonfinite_prox_raises_instead_of_converging(acceleration):
    """A NaN from the prox (an l1 strength gone NaN in an outer loop) made the gradient-mapping
    norm NaN, and ``while r > tol`` ended the run as a success at ``init``."""
    X = torch.randn(20, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = X @ torch.ones(5, dtype=torch.float64)
    fun = lambda w: 0.5 * ((X @ w - y) ** 2).sum()  # noqa: E731
    solver = ProximalGradient(prox_lasso, acceleration=acceleration)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    with pytest.raises(FloatingPointError, match=r"ProximalGradient: the proximal step .* iteration 0"):
        solver.run(fun, torch.zeros(5, dtype=torch.float64), prox_args=nan)

    def prox_undefined_far_out(z, strength, step):  # NaN once the iterate leaves |z| <= 1.5
        out = prox_lasso(z, strength, step)
        return torch.where(out.abs() > 1.5, float("nan"), out)

    with pytest.raises(FloatingPointError, match=r"ProximalGradient: the proximal step .* iteration [1-9]"):
        ProximalGradient(prox_undefined_far_out, step=0.1, acceleration=acceleration).run(
            lambda w: 0.5 * ((w - 2.0) ** 2).sum(), torch.zeros(3, dtype=torch.float64),
            prox_args=torch.tensor(0.1, dtype=torch.float64))


def test_prox_of_the_wrong_shape_is_named():
    fun = lambda w: 0.5 * ((w - 1) ** 2).sum()  # noqa: E731
    for prox in (lambda z, p, s: z[:2], lambda z, p, s: (z, "not a tensor")):
        with pytest.raises(ValueError, match=r"ProximalGradient: `prox\(sol, prox_args, step\)` must return .* "
                                             r"shaped like `init` \(leaf shapes \[\(3,\)\]\)"):
            ProximalGradient(prox).run(fun, torch.zeros(3, dtype=torch.float64))


def test_lbfgs_stall_is_finished_with_the_rest_of_the_budget():
    """L-BFGS's value-based line search stalls on this small network near 4e-9; the descent
    polish used to stop after 200 steps and report MAX_ITERATIONS with 4000 iterations unspent."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(60, 3, dtype=torch.float64, generator=gen)
    target = torch.sin(X.sum(1))

    def loss(w):
        out = torch.tanh(X @ w["W1"].T + w["b1"]) @ w["W2"] + w["b2"]
        return ((out - target) ** 2).mean() + 0.025 * sum((v ** 2).sum() for v in w.values())

    w0 = {"W1": 0.5 * torch.randn(5, 3, dtype=torch.float64, generator=gen), "b1": torch.zeros(5, dtype=torch.float64),
          "W2": 0.5 * torch.randn(5, dtype=torch.float64, generator=gen), "b2": torch.zeros((), dtype=torch.float64)}
    w, info = LBFGS(maxiter=5000, tol=1e-10).run(loss, w0)
    assert Status(int(info.status)) == Status.SUCCESS and float(info.residual_norm) <= float(info.tolerance)
    assert int(info.iterations) < 5000
    grad = torch.func.grad(loss)(w)
    assert torch.sqrt(sum((g ** 2).sum() for g in grad.values())) <= float(info.tolerance)


def test_bad_inputs_are_named():
    fun = PROBLEMS["ridge"].fun
    lam = PROBLEMS["ridge"].lam
    for solver in (GradientDescent(), LBFGS(), OptimizerLoop(), ScipyMinimize(), ProximalGradient(prox_none)):
        name = type(solver).__name__
        with pytest.raises(ValueError, match=rf"{name}: `fun\(sol, \*args\)` must return a scalar"):
            solver.run(lambda w, lam: w * lam, torch.zeros(5), lam)
        with pytest.raises(TypeError, match=rf"{name}: `init` must be a tensor or a tree of tensors"):
            solver.run(fun, [0.0] * 5, lam)
        with pytest.raises(TypeError, match=rf"{name}: `init` must hold floating-point tensors"):
            solver.run(fun, torch.zeros(5, dtype=torch.int64), lam)
        with pytest.raises(TypeError, match=rf"{name}: `fun` must be callable"):
            solver.run("f", torch.zeros(5), lam)
    data = exp_data()[1]
    data[3, 4] = float("nan")
    with pytest.raises(FloatingPointError, match=r"GaussNewton: .* not finite .* iteration 0 \(batch elements \[3\]\)"):
        GaussNewton(batch_dims=1).run(exp_fit, torch.ones(5, 2), data)
    with pytest.raises(ValueError, match=r"GaussNewton: `fun\(sol, \*args\)` must return .* batch shape \(5,\)"):
        GaussNewton(batch_dims=1).run(lambda p, d: (p[..., :1] - d).reshape(-1), torch.ones(5, 2), torch.ones(5, 3))


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: GradientDescent(maxiter=0), "maxiter"),
        (lambda: GradientDescent(tol=2.0), "tol"),
        (lambda: GradientDescent(step=-1.0), "step"),
        (lambda: LBFGS(history_size=0), "history_size"),
        (lambda: LBFGS(line_search="armijo"), "line_search"),
        (lambda: LevenbergMarquardt(damping=0.0), "damping"),
        (lambda: GaussNewton(batch_dims=-1), "batch_dims"),
        (lambda: ScipyMinimize(options=3), "options"),
        (lambda: OptimizerLoop(lr=-1.0), "lr"),
        (lambda: GradientDescent(implicit_solve="cg"), "implicit_solve"),
    ],
)
def test_settings_are_checked(make, field):
    with pytest.raises(ValueError, match=rf"`{field}` must be"):
        make()


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown `optimizer` 'adamz'; known names: .*adam, .*sgd"):
        OptimizerLoop("adamz")
    with pytest.raises(ValueError, match=r"bilevel.solvers.LBFGS"):
        OptimizerLoop("lbfgs")
    with pytest.raises(ValueError, match=re.escape("`method` must be one of the scipy.optimize.minimize methods")):
        ScipyMinimize("newton")


def test_optimizer_loop_accepts_names_classes_and_factories():
    problem = PROBLEMS["ridge"]
    expected = problem.solution(problem.lam)
    for opt in (
        OptimizerLoop("SGD", lr=1e-2, momentum=0.9, maxiter=3000),
        OptimizerLoop(torch.optim.SGD, lr=1e-2, momentum=0.9, maxiter=3000),
        OptimizerLoop(lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9), maxiter=3000),
    ):
        w, info = opt.run(problem.fun, problem.init, problem.lam)
        assert bool(info.converged)
        torch.testing.assert_close(w, expected, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="factory"):
        OptimizerLoop(lambda params: torch.optim.SGD(params, lr=0.1), momentum=0.9)
    changed = dataclasses.replace(OptimizerLoop("sgd", momentum=0.9), maxiter=7)
    assert changed.maxiter == 7 and changed.options == (("momentum", 0.9),)
    # Adam with a constant learning rate hovers: it reports so rather than pretending.
    with pytest.warns(ConvergenceWarning, match="OptimizerLoop did not converge"):
        _, info = OptimizerLoop("adam", lr=1e-1, maxiter=300).run(problem.fun, problem.init, problem.lam)
    assert int(info.status) == Status.MAX_ITERATIONS


def test_scipy_info_keeps_scipy_outcome():
    problem = PROBLEMS["logistic"]
    _, info = ScipyMinimize().run(problem.fun, problem.init, problem.lam)
    assert isinstance(info.message, str) and info.message and info.nfev > 0
    assert info.scipy_status == 99  # stopped by the gradient test


def test_fixed_step_that_is_too_large_diverges_loudly():
    problem = PROBLEMS["ridge_x30"]
    with pytest.raises(FloatingPointError, match="step=None"):
        GradientDescent(step=1e-2, maxiter=5000).run(problem.fun, problem.init, problem.lam)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rprop_reaches_the_default_tolerance_untuned(dtype):
    """torch's smallest Rprop step (1e-6) stops it short of a sqrt(eps) gradient
    tolerance; OptimizerLoop's default lowers it, so the untuned call converges."""
    f = lambda w, c: ((w - c) ** 2).sum() + 0.1 * (w**4).sum()  # noqa: E731
    c = torch.tensor([1.0, -2.0, 0.3], dtype=dtype)
    w, info = OptimizerLoop("rprop", lr=0.1).run(f, torch.zeros(3, dtype=dtype), c)
    assert bool(info.converged)
    gradient = 2 * (w - c) + 0.4 * w**3
    assert float(gradient.norm()) <= float(info.tolerance)


@pytest.mark.parametrize("make", [
    lambda: GradientDescent(), lambda: LBFGS(),
    lambda: OptimizerLoop("adam", lr=0.05, maxiter=3000), lambda: ScipyMinimize(),
], ids=["gd", "lbfgs", "adam", "scipy"])
def test_gradient_based_solvers_work_under_inference_mode(make):
    """Under torch.inference_mode autograd records nothing; the solvers run with it off
    on copies of their inputs and give the no_grad answer, as an inference tensor."""
    f = lambda z, y: 0.5 * ((z - y) ** 2).sum() + 0.25 * (z**4).sum()  # noqa: E731
    y = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    with torch.no_grad():
        want, _ = make().run(f, torch.zeros(3, dtype=torch.float64), y)
    with torch.inference_mode():
        got, info = make().run(f, torch.zeros(3, dtype=torch.float64), y)
    assert got.is_inference() and bool(info.converged)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prox", [3, None, "prox_lasso"])
def test_proximal_gradient_with_a_prox_that_is_not_callable_is_a_type_error(prox):
    """The docstring promises a TypeError for a `prox` that is not callable (it was a ValueError)."""
    with pytest.raises(TypeError, match=r"ProximalGradient: `prox` must be a callable prox\(z, prox_args, scaling\)"):
        ProximalGradient(prox)
