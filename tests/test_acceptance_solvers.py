"""Acceptance tests of the inner solvers of :mod:`bilevel.solvers`, written against the public API.

Scenarios follow SciPy's optimize tests (Rosenbrock in 2 and 10 dimensions,
every ``scipy.optimize.minimize`` method reporting honestly), Theseus'
Gauss-Newton / Levenberg-Marquardt tests (curve fits against
``scipy.optimize.least_squares``, batches of problems), TorchOpt's and JAXopt's
implicit-differentiation tests (solvers made differentiable through
``custom_root`` / ``custom_fixed_point`` and their own ``__call__``, first and
second derivatives).  Every answer is checked against a closed form, a dense
reference (Newton's method, ``torch.linalg.solve``), SciPy or central finite
differences, never against the library's own output.

The solution error of a quadratic is bounded by the *true* gradient at the
returned point, ``||w - w*|| <= ||A w - b|| / lambda_min(A)``, so the tests
check the solver's report (``info.residual_norm``, ``info.tolerance``) and the
error it implies rather than a hand-picked tolerance.

Tests marked ``xfail(strict=True)`` document library bugs found by these
scenarios; each reason names the symptom and the suspected cause.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares, rosen, rosen_der, rosen_hess
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, vmap

import bilevel
from bilevel.implicit import CG, GMRES, MINRES, Direct, stationarity
from bilevel.implicit.prox import prox_none
from bilevel.solvers import (
    LBFGS,
    GaussNewton,
    GradientDescent,
    LevenbergMarquardt,
    OptimizerLoop,
    ProximalGradient,
    ScipyInfo,
    ScipyMinimize,
    SolverInfo,
)
from bilevel.status import ConvergenceWarning, Status

F64 = torch.float64
SQRT_EPS = {torch.float32: math.sqrt(torch.finfo(torch.float32).eps), F64: math.sqrt(torch.finfo(F64).eps)}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def _distance_to(solver):
    """``w -> w - c`` as the solver expects it: residuals for least squares, else a quadratic."""
    if is_least_squares(solver):
        return lambda w, c: w - c
    return lambda w, c: 0.5 * ((w - c) ** 2).sum()


def is_least_squares(solver) -> bool:
    return isinstance(solver, (GaussNewton, LevenbergMarquardt))


@pytest.fixture(autouse=True)
def _quiet_torch_internal_warnings():
    # forward-mode AD (used by Hessian-vector products) makes torch emit a jit
    # DeprecationWarning on first use; it is torch's, not the library's.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
        yield


# Smooth solvers (scalar objective) and least-squares solvers (residual vector).
SMOOTH = {
    "GradientDescent": GradientDescent(),
    "GradientDescent(acc)": GradientDescent(acceleration=True),
    "LBFGS": LBFGS(),
    "Scipy(L-BFGS-B)": ScipyMinimize(),
    "Scipy(BFGS)": ScipyMinimize("BFGS"),
    "Scipy(Newton-CG)": ScipyMinimize("Newton-CG"),
    "Scipy(trust-exact)": ScipyMinimize("trust-exact"),
    "Scipy(trust-krylov)": ScipyMinimize("trust-krylov"),
    "OptimizerLoop(rprop)": OptimizerLoop("rprop"),
    "ProximalGradient(none)": ProximalGradient(prox_none),
}
LSQ = {"GaussNewton": GaussNewton(), "LevenbergMarquardt": LevenbergMarquardt()}
ALL = {**SMOOTH, **LSQ}


# ============================================================================ 1. known minimizers


def spd_quadratic(d=8, cond=50.0, seed=0, dtype=F64):
    """A = Q diag(1..cond) Q^T, b with ||b|| about 10 (> 1, so the tolerance is relative)."""
    g = gen(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    eigs = torch.linspace(1.0, cond, d, dtype=F64)
    A = (Q * eigs) @ Q.T
    A = 0.5 * (A + A.T)
    b = 4.0 * torch.randn(d, generator=g, dtype=F64)
    R = eigs.sqrt()[:, None] * Q.T  # R^T R = A
    return A.to(dtype), b.to(dtype), R.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(SMOOTH) + ["OptimizerLoop(sgd)"] + list(LSQ))
def test_quadratic_error_is_bounded_by_the_reported_gradient(name, dtype):
    A, b, R = spd_quadratic(dtype=dtype)
    solver = OptimizerLoop("sgd", lr=2 / 51, maxiter=2000) if name == "OptimizerLoop(sgd)" else ALL[name]
    if is_least_squares(solver):
        z = torch.linalg.solve(R.T.double(), b.double()).to(dtype)  # 0.5||R w - z||^2 = 0.5 w'Aw - b'w + const

        def fun(w, b):
            return R @ w - z
    else:

        def fun(w, b):
            return 0.5 * w @ A @ w - b @ w

    w, info = solver.run(fun, torch.zeros(8, dtype=dtype), b)
    assert w.dtype == dtype and info.residual_norm.dtype == dtype
    assert bool(info.converged) and int(info.status) == Status.SUCCESS and int(info.iterations) >= 1

    # Reference in float64 on the problem as represented in `dtype`.
    Ad, bd, wd = A.double(), b.double(), w.double()
    if is_least_squares(solver):
        Ad = R.double().T @ R.double()
        bd = R.double().T @ z.double()
    w_star = torch.linalg.solve(Ad, bd)
    g_true = float(torch.linalg.vector_norm(Ad @ wd - bd))
    eps = torch.finfo(dtype).eps
    rounding = 20 * 8 * eps * (float(torch.linalg.matrix_norm(Ad, 2)) * float(wd.norm()) + float(bd.norm()))
    base = SQRT_EPS[dtype] * max(1.0, float(bd.norm()))  # the documented default: sqrt(eps) * max(1, ||g0||)
    if is_least_squares(solver):
        assert float(info.tolerance) >= base * (1 - 1e-6)  # may be raised to the rounding floor of J^T r
    else:
        assert float(info.tolerance) == pytest.approx(base, rel=1e-5)
    # what it reports is the gradient at the returned point, and it met the tolerance
    assert abs(float(info.residual_norm) - g_true) <= 1e-6 * g_true + rounding
    assert g_true <= float(info.tolerance) + rounding
    # the error that this gradient implies: w - w* = A^{-1} (A w - b)
    lam_min = float(torch.linalg.eigvalsh(Ad)[0])
    assert float((wd - w_star).norm()) <= g_true / lam_min * (1 + 1e-6) + 1e-12
    expected_value = 0.5 * wd @ Ad @ wd - bd @ wd
    if is_least_squares(solver):
        expected_value = expected_value + 0.5 * float(z.double() @ z.double())
    assert float(info.value) == pytest.approx(float(expected_value), rel=1e-5 if dtype == F64 else 1e-3, abs=1e-8)


def rosen_torch(x, a):
    return ((a - x[:-1]) ** 2).sum() + 100 * ((x[1:] - x[:-1] ** 2) ** 2).sum()


def rosen_residuals(x, a):
    """0.5 ||r||^2 = rosen(x): the same objective, as residuals."""
    return math.sqrt(2) * torch.cat([10 * (x[1:] - x[:-1] ** 2), a - x[:-1]])


ROSEN_SOLVERS = {
    "GradientDescent(acc)": GradientDescent(acceleration=True, maxiter=5000),
    "LBFGS": LBFGS(),
    "Scipy(L-BFGS-B)": ScipyMinimize(),
    "Scipy(BFGS)": ScipyMinimize("BFGS"),
    "Scipy(CG)": ScipyMinimize("CG"),
    "Scipy(Newton-CG)": ScipyMinimize("Newton-CG"),
    "Scipy(trust-exact)": ScipyMinimize("trust-exact"),
    "Scipy(trust-ncg)": ScipyMinimize("trust-ncg"),
    "ProximalGradient(none)": ProximalGradient(prox_none, maxiter=5000),
    "GaussNewton": GaussNewton(),
    "LevenbergMarquardt": LevenbergMarquardt(),
}


@pytest.mark.parametrize("n", [2, 10])
@pytest.mark.parametrize("name", list(ROSEN_SOLVERS))
def test_rosenbrock_minimizer(name, n):
    solver = ROSEN_SOLVERS[name]
    # SciPy's test starting points
    x0 = torch.tensor([-1.2, 1.0] if n == 2 else [1.3, 0.7, 0.8, 1.9, 1.2] * 2, dtype=F64)
    lsq = is_least_squares(solver)
    x, info = solver.run(rosen_residuals if lsq else rosen_torch, x0, 1.0)
    assert bool(info.converged)
    xn = x.numpy()
    true_grad = np.linalg.norm(rosen_der(xn))  # SciPy's own gradient
    assert float(info.residual_norm) == pytest.approx(true_grad, rel=1e-8, abs=1e-13)
    assert float(info.value) == pytest.approx(rosen(xn), rel=1e-8, abs=1e-20)
    hess_min = np.linalg.eigvalsh(rosen_hess(np.ones(n)))[0]
    # near the minimizer, ||x - 1|| ~ ||grad|| / lambda_min (factor 2 for the non-quadratic part)
    assert np.linalg.norm(xn - 1.0) <= 2 * true_grad / hess_min + 1e-12


def logistic_data(n=60, d=4, seed=1):
    g = gen(seed)
    X = torch.randn(n, d, generator=g, dtype=F64)
    y = torch.sign(X @ torch.randn(d, generator=g, dtype=F64) + 0.4 + 0.5 * torch.randn(n, generator=g, dtype=F64))
    return X, y


def logistic_dict(params, lam, X, y):
    """Mean logistic loss with an unpenalized intercept; params = {"w": (d,), "b": ()}."""
    margins = y * (X @ params["w"] + params["b"])
    return torch.nn.functional.softplus(-margins).mean() + 0.5 * lam * (params["w"] ** 2).sum()


def dense_newton_logistic(lam, X, y):
    def flat(v):
        return logistic_dict({"w": v[:-1], "b": v[-1]}, lam, X, y)

    v = torch.zeros(X.shape[1] + 1, dtype=F64)
    for _ in range(40):
        v = v - torch.linalg.solve(hessian(flat)(v), grad(flat)(v))
    return v, hessian(flat)(v)


@pytest.mark.parametrize(
    "name", ["GradientDescent", "LBFGS", "Scipy(L-BFGS-B)", "Scipy(trust-exact)", "OptimizerLoop(rprop)",
             "ProximalGradient(none)"]
)
def test_logistic_regression_with_a_dict_of_parameters_matches_dense_newton(name):
    solver = SMOOTH[name]
    X, y = logistic_data()
    lam = torch.tensor(0.1, dtype=F64)
    v_ref, H = dense_newton_logistic(lam, X, y)
    init = {"w": torch.zeros(4, dtype=F64), "b": torch.zeros((), dtype=F64)}
    params, info = solver.run(logistic_dict, init, lam, X, y)
    assert set(params) == {"w", "b"} and params["w"].shape == (4,) and params["b"].shape == ()
    assert bool(info.converged)
    v = torch.cat([params["w"], params["b"].reshape(1)])
    bound = float(info.tolerance) / float(torch.linalg.eigvalsh(H)[0])  # |g0| < 1: absolute tolerance
    assert float((v - v_ref).norm()) <= 2 * bound
    # d(w, b)/d lam = -H^{-1} [w; 0]   (the cross derivative of 0.5 lam ||w||^2)
    lam_g = lam.clone().requires_grad_()
    out = solver(logistic_dict, init, lam_g, X, y)
    dv = torch.autograd.grad(torch.cat([out["w"], out["b"].reshape(1)]) @ torch.arange(1.0, 6.0, dtype=F64), lam_g)[0]
    expected = -torch.linalg.solve(H, torch.cat([v_ref[:-1], torch.zeros(1, dtype=F64)]))
    assert float(dv) == pytest.approx(float(expected @ torch.arange(1.0, 6.0, dtype=F64)), rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("name", ["GradientDescent", "LBFGS", "Scipy(L-BFGS-B)", "GaussNewton", "LevenbergMarquardt"])
def test_module_parameters_through_functional_call_match_closed_form_ridge(name):
    """nn.Linear(3, 2) parameters as the solution; ridge on the weight, bias free."""
    solver = ALL[name]
    g = gen(2)
    net = torch.nn.Linear(3, 2).double()
    X = torch.randn(25, 3, generator=g, dtype=F64)
    Y = torch.randn(25, 2, generator=g, dtype=F64)

    def residuals(params, lam):
        pred = functional_call(net, params, (X,))
        return torch.cat([(pred - Y).reshape(-1), lam.sqrt() * params["weight"].reshape(-1)])

    def objective(params, lam):
        return 0.5 * (residuals(params, lam) ** 2).sum()

    def closed_form(lam):
        Xa = torch.cat([X, torch.ones(25, 1, dtype=F64)], dim=1)
        D = torch.diag(torch.cat([lam.expand(3), torch.zeros(1, dtype=F64)]))
        coef = torch.linalg.solve(Xa.T @ Xa + D, Xa.T @ Y)  # (4, 2)
        return {"weight": coef[:3].T, "bias": coef[3]}

    lam = torch.tensor(0.8, dtype=F64, requires_grad=True)
    init = {k: torch.zeros_like(v, dtype=F64).detach() for k, v in net.named_parameters()}
    fun = residuals if is_least_squares(solver) else objective
    out = solver(fun, init, lam)
    ref = closed_form(lam)
    for k in ("weight", "bias"):
        assert out[k].shape == ref[k].shape
        torch.testing.assert_close(out[k].detach(), ref[k].detach(), rtol=1e-6, atol=1e-8)
    (dg,) = torch.autograd.grad(out["weight"].sum() + 2 * out["bias"].sum(), lam)
    (dg_ref,) = torch.autograd.grad(ref["weight"].sum() + 2 * ref["bias"].sum(), lam)
    torch.testing.assert_close(dg, dg_ref, rtol=1e-5, atol=1e-8)


T_FIT = torch.linspace(0.0, 4.0, 30, dtype=F64)


def model_exp(p):
    return p[..., 0:1] * torch.exp(-p[..., 1:2] * T_FIT) + p[..., 2:3]


def model_sin(p):
    return p[..., 0:1] * torch.sin(p[..., 1:2] * T_FIT + p[..., 2:3])


FITS = {
    "exp": (model_exp, torch.tensor([2.0, 0.7, 0.3], dtype=F64), torch.tensor([1.0, 1.0, 0.0], dtype=F64)),
    "sin": (model_sin, torch.tensor([1.5, 1.3, 0.4], dtype=F64), torch.tensor([1.0, 1.2, 0.0], dtype=F64)),
}


def scipy_fit(model, data, x0):
    res = least_squares(
        lambda p: (model(torch.from_numpy(p)) - data).numpy(), np.asarray(x0), method="lm",
        xtol=1e-15, ftol=1e-15, gtol=1e-15,
    )
    return torch.from_numpy(res.x)


@pytest.mark.parametrize("model_name", list(FITS))
@pytest.mark.parametrize("name", ["GaussNewton", "LevenbergMarquardt", "LBFGS", "Scipy(trust-exact)"])
def test_curve_fit_and_its_data_jacobian_match_scipy_least_squares(name, model_name):
    model, truth, x0 = FITS[model_name]
    solver = ALL[name]
    data = model(truth) + 0.05 * torch.randn(T_FIT.shape, generator=gen(3), dtype=F64)
    p_ref = scipy_fit(model, data, x0)

    def residual(p, d):
        return model(p) - d

    def half_sq(p, d):
        return 0.5 * (residual(p, d) ** 2).sum()

    fun = residual if is_least_squares(solver) else half_sq
    p, info = solver.run(fun, x0, data)
    assert bool(info.converged)
    torch.testing.assert_close(p, p_ref, rtol=1e-6, atol=1e-7)
    # implicit Jacobian d p* / d data = H^{-1} J^T, H the exact Hessian of 0.5||r||^2 at SciPy's fit
    H = hessian(lambda q: half_sq(q, data))(p_ref)
    Jr = jacrev(lambda q: residual(q, data))(p_ref)
    expected = torch.linalg.solve(H, Jr.T)
    J = torch.autograd.functional.jacobian(lambda d: solver(fun, x0, d), data)
    torch.testing.assert_close(J, expected, rtol=1e-5, atol=1e-7)
    # and central differences of SciPy's own solutions along a random direction
    v = torch.randn(T_FIT.shape, generator=gen(4), dtype=F64)
    h = 1e-3
    fd = (scipy_fit(model, data + h * v, p_ref) - scipy_fit(model, data - h * v, p_ref)) / (2 * h)
    torch.testing.assert_close(J @ v, fd, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [GaussNewton, LevenbergMarquardt])
def test_batched_sinusoid_fits_match_scipy_element_by_element(cls):
    truths = torch.tensor([[1.5, 1.3, 0.4], [0.8, 0.9, -0.2], [2.0, 1.6, 1.0], [1.1, 1.1, 0.0]], dtype=F64)
    data = model_sin(truths) + 0.03 * torch.randn(4, T_FIT.numel(), generator=gen(5), dtype=F64)
    init = truths + 0.1 * torch.tensor([[1.0, -1.0, 1.0]], dtype=F64)

    def residual(p, d):  # already batched over the leading dimension
        return model_sin(p) - d

    p, info = cls(batch_dims=1).run(residual, init, data)
    assert info.status.shape == (4,) and bool(info.converged.all())
    for i in range(4):
        ref = scipy_fit(model_sin, data[i], init[i])
        torch.testing.assert_close(p[i], ref, rtol=1e-6, atol=1e-7)
        r = model_sin(p[i]) - data[i]
        Ji = jacrev(lambda q: model_sin(q) - data[i])(p[i])
        assert float(info.residual_norm[i]) == pytest.approx(float((Ji.T @ r).norm()), rel=1e-6, abs=1e-13)
        assert float(info.value[i]) == pytest.approx(0.5 * float(r @ r), rel=1e-10)


@pytest.mark.parametrize("name", list(ALL))
def test_warm_start_at_the_solution_stops_at_once(name):
    solver = ALL[name]
    A, b, R = spd_quadratic(d=5, seed=7)
    w_star = torch.linalg.solve(A, b)
    if is_least_squares(solver):
        z = torch.linalg.solve(R.T, b)

        def fun(w, b):
            return R @ w - z
    else:

        def fun(w, b):
            return 0.5 * w @ A @ w - b @ w

    init = w_star.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        w, info = solver.run(fun, init, b)
    assert int(info.iterations) == 0 and bool(info.converged)
    assert torch.equal(w, w_star)


@pytest.mark.parametrize("cls", [GaussNewton, LevenbergMarquardt])
def test_batch_with_some_elements_warm_started_at_their_solution(cls):
    truths = torch.tensor([[2.0, 0.5, 0.1], [1.0, 1.5, -0.3], [0.5, 0.2, 0.0]], dtype=F64)
    data = model_exp(truths)  # exact data: each truth is a root

    def residual(p, d):
        return model_exp(p) - d

    init = truths.clone()
    init[1] = torch.tensor([1.0, 1.0, 0.0], dtype=F64)  # only element 1 has work to do
    p, info = cls(batch_dims=1).run(residual, init, data)
    assert info.iterations[0] == 0 and info.iterations[2] == 0 and info.iterations[1] > 0
    assert torch.equal(p[0], truths[0]) and torch.equal(p[2], truths[2])
    torch.testing.assert_close(p[1], truths[1], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(
    "name",
    [
        *SMOOTH,
        *LSQ,
    ],
)
def test_returned_solution_does_not_alias_the_warm_start(name):
    solver = ALL[name]
    c = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    fun = _distance_to(solver)
    init = c.clone()  # already the solution: zero iterations
    w, _ = solver.run(fun, init, c)
    c_grad = c.clone().requires_grad_()
    w_diff = solver(fun, init, c_grad)
    init.zero_()  # the user reuses the warm-start buffer
    assert torch.equal(w, c) and torch.equal(w_diff.detach(), c)
    (g,) = torch.autograd.grad(w_diff @ torch.arange(1.0, 4.0, dtype=F64), c_grad)  # dw/dc = I
    torch.testing.assert_close(g, torch.arange(1.0, 4.0, dtype=F64))


@pytest.mark.parametrize("name", ["GradientDescent", "GradientDescent(acc)", "ProximalGradient(none)",
                                  "GaussNewton", "LevenbergMarquardt"])
def test_nonfinite_trial_points_are_rejected_by_the_line_search(name):
    """Documented for these solvers: a trial point outside the domain (log of a negative
    number) is rejected, not an error.  f = w - log w (minimizer 1) from 0.01, where the
    first gradient step overshoots below 0; residual log w (root 1) from 3, where the
    first Gauss-Newton step lands at -0.29."""
    solver = ALL[name]
    if is_least_squares(solver):
        x, info = solver.run(lambda w, a: torch.log(w) - a, torch.tensor([3.0], dtype=F64), 0.0)
    else:
        x, info = solver.run(lambda w, a: (w - torch.log(w)).sum() - a, torch.tensor([0.01], dtype=F64), 0.0)
    assert bool(info.converged)
    torch.testing.assert_close(x, torch.ones(1, dtype=F64), rtol=0, atol=1e-6)


def barrier(w, a):
    """0.5 (w - 3)^2 - log(1 - w): minimizer 2 - sqrt(2); from w = 0 a unit step reaches w = 1."""
    return (0.5 * (w - 3) ** 2 - torch.log(1 - w)).sum() + a


@pytest.mark.parametrize("name", ["GradientDescent", "OptimizerLoop(rprop)", "LBFGS", "Scipy(L-BFGS-B)", "Scipy(BFGS)"])
def test_domain_errors_are_rejected_by_descent_and_raised_by_the_bridges(name):
    """Documented: GradientDescent rejects non-finite trial points; the bridges (LBFGS,
    ScipyMinimize) raise FloatingPointError at any non-finite evaluation, never return NaN."""
    solver = SMOOTH[name]
    if isinstance(solver, (LBFGS, ScipyMinimize)):
        with pytest.raises(FloatingPointError, match=rf"{type(solver).__name__}: .*not finite"):
            solver.run(barrier, torch.zeros(1, dtype=F64), 0.0)
        return
    w, info = solver.run(barrier, torch.zeros(1, dtype=F64), 0.0)
    assert bool(info.converged)
    assert float(w) == pytest.approx(2 - math.sqrt(2), abs=1e-7)


@pytest.mark.parametrize("model_name", list(FITS))
@pytest.mark.parametrize("name", ["GaussNewton", "LevenbergMarquardt", "LBFGS", "Scipy(L-BFGS-B)", "GradientDescent"])
def test_float32_curve_fit_is_as_accurate_as_its_dtype_scaled_tolerance(name, model_name):
    """float32 in, float32 out; the error against SciPy's float64 fit is bounded by the
    reported tolerance over the smallest Hessian eigenvalue (plus float32 rounding of the data)."""
    model, truth, x0 = FITS[model_name]
    solver = dataclasses.replace(ALL[name], maxiter=5000) if name == "GradientDescent" else ALL[name]
    data = model(truth) + 0.05 * torch.randn(T_FIT.shape, generator=gen(3), dtype=F64)
    p_ref = scipy_fit(model, data, x0)
    t32, d32 = T_FIT.float(), data.float()

    def residual(p, d):
        return p[0] * (torch.exp(-p[1] * t32) if model_name == "exp" else torch.sin(p[1] * t32 + p[2])) + (
            p[2] if model_name == "exp" else 0.0) - d

    fun = residual if is_least_squares(solver) else (lambda p, d: 0.5 * (residual(p, d) ** 2).sum())
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        p, info = solver.run(fun, x0.float(), d32)
    assert p.dtype == torch.float32 and info.residual_norm.dtype == torch.float32 and bool(info.converged)
    H = hessian(lambda q: 0.5 * ((model(q) - data) ** 2).sum())(p_ref)
    bound = 2 * float(info.tolerance) / float(torch.linalg.eigvalsh(H)[0])
    assert float((p.double() - p_ref).norm()) <= bound + 1e-4


# ============================================================================ 2. differentiability


def ridge_data(n=30, d=4, seed=8):
    g = gen(seed)
    X = torch.randn(n, d, generator=g, dtype=F64)
    y = X @ torch.randn(d, generator=g, dtype=F64) + 0.3 * torch.randn(n, generator=g, dtype=F64)
    return X, y


def ridge_objective(w, lam, X, y):
    return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (lam * w**2).sum()


def ridge_residual(w, lam, X, y):
    return torch.cat([X @ w - y, lam.sqrt() * w])


def ridge_closed_form(lam, X, y):
    """w*(lam) = (X^T X + diag(lam))^{-1} X^T y, differentiable by ordinary autograd."""
    return torch.linalg.solve(X.T @ X + torch.diag(lam), X.T @ y)


LAM = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=F64)


@pytest.mark.parametrize("name", list(ALL) + ["Scipy(BFGS)"])
def test_ridge_jacobians_match_closed_form_and_finite_differences(name):
    solver = ScipyMinimize("BFGS") if name == "Scipy(BFGS)" else ALL[name]
    X, y = ridge_data()
    fun = ridge_residual if is_least_squares(solver) else ridge_objective
    init = torch.zeros(4, dtype=F64)
    w_star = ridge_closed_form(LAM, X, y)
    H = X.T @ X + torch.diag(LAM)
    J_lam, J_y = torch.autograd.functional.jacobian(lambda l, t: solver(fun, init, l, X, t), (LAM, y))
    torch.testing.assert_close(J_lam, -torch.linalg.solve(H, torch.diag(w_star)), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(J_y, torch.linalg.solve(H, X.T), rtol=1e-5, atol=1e-8)
    # central differences of tightly solved problems (the default tolerance leaves errors ~1e-8 / h)
    tight = dataclasses.replace(solver, tol=1e-12)
    v = torch.randn(4, generator=gen(9), dtype=F64)
    h = 1e-4
    fd = (tight.run(fun, init, LAM + h * v, X, y)[0] - tight.run(fun, init, LAM - h * v, X, y)[0]) / (2 * h)
    torch.testing.assert_close(J_lam @ v, fd, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "linear_solve",
    [None, CG(tol=1e-10), Direct(), Direct("lu"), GMRES(tol=1e-10), MINRES(tol=1e-10)],
    ids=["default", "CG", "Direct(cholesky)", "Direct(lu)", "GMRES", "MINRES"],
)
@pytest.mark.parametrize("name", ["LBFGS", "Scipy(trust-exact)", "OptimizerLoop(rprop)"])
def test_custom_root_stationarity_around_run_gives_closed_form_gradients(name, linear_solve):
    """The documented composition: custom_root(stationarity(objective)) around a run."""
    solver = SMOOTH[name]
    X, y = ridge_data()

    @bilevel.custom_root(stationarity(ridge_objective), solve=linear_solve)
    def ridge(lam, X, y, init=None):
        return solver.run(ridge_objective, init, lam, X, y)[0]

    lam = LAM.clone().requires_grad_()
    Xg = X.clone().requires_grad_()
    w = ridge(lam, Xg, y, init=torch.zeros(4, dtype=F64))
    cot = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
    g_lam, g_X = torch.autograd.grad(w @ cot, (lam, Xg))
    lam_r = LAM.clone().requires_grad_()
    X_r = X.clone().requires_grad_()
    r_lam, r_X = torch.autograd.grad(ridge_closed_form(lam_r, X_r, y) @ cot, (lam_r, X_r))
    torch.testing.assert_close(g_lam, r_lam, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(g_X, r_X, rtol=1e-6, atol=1e-8)
    assert ridge.last_info is not None  # the backward certificate is kept


@pytest.mark.parametrize("loop", ["GradientDescent(step)", "OptimizerLoop(sgd)"])
def test_custom_fixed_point_of_the_gradient_step_around_a_fixed_step_solver(loop):
    X, y = ridge_data()
    L = float(torch.linalg.eigvalsh(X.T @ X + torch.diag(LAM))[-1])
    eta = 1.0 / L
    gradient = grad(ridge_objective)
    solver = (GradientDescent(step=eta, tol=1e-12, maxiter=20000) if loop.startswith("Gradient")
              else OptimizerLoop("sgd", lr=eta, tol=1e-12, maxiter=20000))

    def T(w, lam, X, y):
        return w - eta * gradient(w, lam, X, y)

    @bilevel.custom_fixed_point(T)
    def ridge(lam, X, y):
        return solver.run(ridge_objective, torch.zeros(4, dtype=F64), lam, X, y)[0]

    J = jacrev(ridge)(LAM, X, y)
    expected = jacrev(ridge_closed_form)(LAM, X, y)
    torch.testing.assert_close(J, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["LBFGS", "Scipy(trust-exact)", "LevenbergMarquardt"])
def test_gradcheck_and_gradgradcheck(name):
    solver = {"LBFGS": LBFGS(tol=1e-13), "Scipy(trust-exact)": ScipyMinimize("trust-exact", tol=1e-13),
              "LevenbergMarquardt": LevenbergMarquardt(tol=1e-13)}[name]

    # minimizer of 0.5||w - c||^2 + 0.25 sum w^4 + 0.5 sum lam w^2 (residual form below)
    def objective(w, lam):
        return 0.5 * ((w - 1.0) ** 2).sum() + 0.25 * (w**4).sum() + 0.5 * (lam * w**2).sum() + lam.prod() * w.sum()

    def residual(w, lam):
        # the root form r = grad objective: a square system whose least-squares minimum is its root
        return grad(objective)(w, lam)

    fun = residual if is_least_squares(solver) else objective
    lam = torch.tensor([0.3, 0.8], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l: solver(fun, torch.zeros(2, dtype=F64), l), (lam,))
    assert torch.autograd.gradgradcheck(lambda l: solver(fun, torch.zeros(2, dtype=F64), l), (lam,))


@pytest.mark.parametrize(
    "name", ["LBFGS", "GradientDescent", "Scipy(BFGS)", "OptimizerLoop(rprop)", "GaussNewton", "LevenbergMarquardt",
             "ProximalGradient(none)"]
)
def test_second_derivative_of_a_scalar_root_matches_closed_form(name):
    """w* solves w + w^3 = c: w' = 1 / (1 + 3 w^2), w'' = -6 w w'^3."""
    solver = {
        "LBFGS": LBFGS(tol=1e-12), "GradientDescent": GradientDescent(tol=1e-12),
        "Scipy(BFGS)": ScipyMinimize("BFGS", tol=1e-12), "OptimizerLoop(rprop)": OptimizerLoop("rprop", tol=1e-12),
        "GaussNewton": GaussNewton(tol=1e-12), "LevenbergMarquardt": LevenbergMarquardt(tol=1e-12),
        "ProximalGradient(none)": ProximalGradient(prox_none, tol=1e-12),
    }[name]
    if is_least_squares(solver):
        def fun(w, c):
            return (w + w**3 - c).reshape(1)
    else:
        def fun(w, c):
            return 0.5 * (w - c) ** 2 + 0.25 * w**4

    for c0 in (0.8, -2.5):
        c = torch.tensor(c0, dtype=F64, requires_grad=True)
        w = solver(fun, torch.zeros((), dtype=F64), c)
        # independent root by bisection on the cubic
        lo, hi = -10.0, 10.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if mid + mid**3 < c0 else (lo, mid)
        assert float(w.detach()) == pytest.approx(lo, abs=1e-10)
        (d1,) = torch.autograd.grad(w, c, create_graph=True)
        (d2,) = torch.autograd.grad(d1, c)
        e1 = 1 / (1 + 3 * lo**2)
        assert float(d1.detach()) == pytest.approx(e1, rel=1e-8)
        assert float(d2) == pytest.approx(-6 * lo * e1**3, rel=1e-7)


@pytest.mark.parametrize("cls", [GaussNewton, LevenbergMarquardt])
def test_second_derivatives_through_a_batch_of_roots(cls):
    """Three independent cubics w_b + w_b^3 = c_b solved as one batch: the Hessian of
    sum_b w_b(c) is diagonal with entries -6 w_b w_b'^3."""
    c = torch.tensor([[0.8], [-2.5], [1.3]], dtype=F64)
    solver = cls(batch_dims=1, tol=1e-12)

    def roots(c):
        return solver(lambda w, c: w + w**3 - c, torch.zeros(3, 1, dtype=F64), c)

    w = roots(c).detach()
    e1 = 1 / (1 + 3 * w**2)
    H = hessian(lambda c_: roots(c_).sum())(c).reshape(3, 3)
    torch.testing.assert_close(H, torch.diag((-6 * w * e1**3).reshape(-1)), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", ["LBFGS", "Scipy(L-BFGS-B)", "GaussNewton"])
def test_hessian_of_the_hyperobjective_by_torch_func(name):
    """Phi(lam) = 0.5||Xv w*(lam) - yv||^2: torch.func.hessian (forward over reverse) through
    the solver equals the Hessian through the closed-form solve."""
    solver = {"LBFGS": LBFGS(tol=1e-12), "Scipy(L-BFGS-B)": ScipyMinimize(tol=1e-12),
              "GaussNewton": GaussNewton(tol=1e-12)}[name]
    X, y = ridge_data()
    Xv, yv = ridge_data(seed=11)
    fun = ridge_residual if is_least_squares(solver) else ridge_objective

    def phi(lam):
        return 0.5 * ((Xv @ solver(fun, torch.zeros(4, dtype=F64), lam, X, y) - yv) ** 2).sum()

    def phi_ref(lam):
        return 0.5 * ((Xv @ ridge_closed_form(lam, X, y) - yv) ** 2).sum()

    torch.testing.assert_close(hessian(phi)(LAM), hessian(phi_ref)(LAM), rtol=1e-6, atol=1e-9)
    _, jvp_out = torch.func.jvp(lambda l: solver(fun, torch.zeros(4, dtype=F64), l, X, y), (LAM,), (torch.ones(4, dtype=F64),))
    torch.testing.assert_close(jvp_out, jacfwd(ridge_closed_form)(LAM, X, y).sum(-1), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "name", ["LBFGS", "Scipy(L-BFGS-B)", "OptimizerLoop(rprop)", "GaussNewton", "LevenbergMarquardt"]
)
def test_vmap_over_hyper_parameters_equals_closed_form(name):
    solver = ALL[name]
    X, y = ridge_data()
    fun = ridge_residual if is_least_squares(solver) else ridge_objective
    lams = torch.stack([LAM, LAM.flip(0), 0.1 + LAM**2])
    init = torch.zeros(4, dtype=F64)
    W = vmap(lambda l: solver(fun, init, l, X, y))(lams)
    torch.testing.assert_close(W, torch.stack([ridge_closed_form(l, X, y) for l in lams]), rtol=1e-6, atol=1e-8)
    J = vmap(jacrev(lambda l: solver(fun, init, l, X, y)))(lams)
    expected = torch.stack([jacrev(ridge_closed_form)(l, X, y) for l in lams])
    torch.testing.assert_close(J, expected, rtol=1e-5, atol=1e-8)


# ============================================================================ 3. failures


def quartic(w, c):
    return 0.5 * ((w - c) ** 2).sum() + 0.25 * (w**4).sum()


def quartic_residual(w, c):
    return torch.cat([w - c, w**2 / math.sqrt(2)])


SETTING_CLASSES = {
    "GradientDescent": GradientDescent, "LBFGS": LBFGS, "OptimizerLoop": OptimizerLoop,
    "ScipyMinimize": ScipyMinimize, "GaussNewton": GaussNewton, "LevenbergMarquardt": LevenbergMarquardt,
    "ProximalGradient": lambda **kw: ProximalGradient(prox_none, **kw),
}


@pytest.mark.parametrize(
    "field,value",
    [("maxiter", 0), ("maxiter", -5), ("maxiter", 2.5), ("maxiter", True), ("tol", 0.0), ("tol", 1.5),
     ("tol", float("nan")), ("tol", "1e-6"), ("implicit_solve", "cg")],
)
@pytest.mark.parametrize("cls", list(SETTING_CLASSES))
def test_bad_settings_raise_naming_the_solver_and_the_field(cls, field, value):
    with pytest.raises(ValueError, match=rf"{cls}: `{field}` must be"):
        SETTING_CLASSES[cls](**{field: value})


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: OptimizerLoop("sgd", lr=-0.1), "lr"),
        (lambda: OptimizerLoop("sgd", lr=float("inf")), "lr"),
        (lambda: GradientDescent(step=float("nan")), "step"),
        (lambda: ProximalGradient(prox_none, step=0.0), "step"),
        (lambda: LevenbergMarquardt(damping=float("inf")), "damping"),
        (lambda: LevenbergMarquardt(batch_dims=1.0), "batch_dims"),
        (lambda: LBFGS(history_size=2.0), "history_size"),
        (lambda: ScipyMinimize(method=3), "method"),
        (lambda: OptimizerLoop(optimizer=3), "optimizer"),
    ],
)
def test_more_bad_settings_name_the_field(make, field):
    with pytest.raises(ValueError, match=rf"`{field}` must be"):
        make()


def test_optimizer_loop_rejects_lr_none_for_a_named_optimizer():
    with pytest.raises(ValueError, match="`lr`"):
        OptimizerLoop("sgd", lr=None).run(quartic, torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64))


def test_unknown_optimizer_option_is_named():
    with pytest.raises((TypeError, ValueError), match="foo"):
        OptimizerLoop("adam", foo=1.0).run(quartic, torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64))


BUDGET = {
    "GradientDescent": GradientDescent(maxiter=3),
    "GradientDescent(acc)": GradientDescent(maxiter=3, acceleration=True),
    "LBFGS": LBFGS(maxiter=3),
    "Scipy(L-BFGS-B)": ScipyMinimize(maxiter=3),
    "Scipy(BFGS)": ScipyMinimize("BFGS", maxiter=3),
    "Scipy(trust-exact)": ScipyMinimize("trust-exact", maxiter=3),
    "OptimizerLoop(adam)": OptimizerLoop("adam", lr=1e-3, maxiter=3),
    "ProximalGradient(none)": ProximalGradient(prox_none, maxiter=3),
    "GaussNewton": GaussNewton(maxiter=1),
    "LevenbergMarquardt": LevenbergMarquardt(maxiter=3),  # rejected steps count too
}


@pytest.mark.parametrize("name", list(BUDGET))
def test_exhausted_budget_reports_the_residual_of_the_returned_point(name):
    solver = BUDGET[name]
    lsq = is_least_squares(solver)
    x0 = torch.tensor([-1.2, 1.0], dtype=F64)
    with pytest.warns(ConvergenceWarning, match=r"did not converge: MAX_ITERATIONS") as record:
        x, info = solver.run(rosen_residuals if lsq else rosen_torch, x0, 1.0)
    assert int(info.status) == Status.MAX_ITERATIONS and not bool(info.converged)
    assert 1 <= int(info.iterations) <= solver.maxiter
    assert torch.isfinite(x).all() and not torch.equal(x, x0)
    true_grad = np.linalg.norm(rosen_der(x.numpy()))
    assert float(info.residual_norm) == pytest.approx(true_grad, rel=1e-9)
    assert float(info.value) == pytest.approx(rosen(x.numpy()), rel=1e-12)
    assert float(info.residual_norm) > float(info.tolerance)
    message = str(record[0].message)
    assert f"{float(info.residual_norm):.3g}" in message and "maxiter" in message


def test_sgd_loop_stops_at_the_closed_form_step_count_and_iterate():
    """f = 0.5||w - c||^2, SGD with lr 0.5: g_k = 0.5^k g_0, so the test
    ||g_k|| <= tol max(1, ||g_0||) first holds at k = ceil(log(tol) / log(0.5))."""
    c = torch.tensor([3.0, -4.0], dtype=F64)  # ||g_0|| = 5
    f = lambda w, c: 0.5 * ((w - c) ** 2).sum()  # noqa: E731
    w, info = OptimizerLoop("sgd", lr=0.5, tol=1e-6).run(f, torch.zeros(2, dtype=F64), c)
    k = math.ceil(math.log(1e-6) / math.log(0.5))
    assert int(info.iterations) == k and bool(info.converged)
    torch.testing.assert_close(w, c * (1 - 0.5**k), rtol=0, atol=1e-15)
    assert float(info.tolerance) == pytest.approx(5e-6, rel=1e-12)
    with pytest.warns(ConvergenceWarning):
        w5, info5 = OptimizerLoop("sgd", lr=0.5, maxiter=5).run(f, torch.zeros(2, dtype=F64), c)
    torch.testing.assert_close(w5, c * (1 - 0.5**5), rtol=0, atol=1e-15)
    assert int(info5.iterations) == 5 and float(info5.residual_norm) == pytest.approx(5 * 0.5**5, rel=1e-12)


@pytest.mark.parametrize("kind", ["GradientDescent", "ProximalGradient(ISTA)"])
def test_fixed_step_descent_count_and_iterate_match_closed_form(kind):
    """A = diag(1, 4), step 0.2: g_k = (I - 0.2 A)^k g_0 exactly; count the steps independently."""
    a = torch.tensor([1.0, 4.0], dtype=F64)
    c = torch.tensor([3.0, -4.0], dtype=F64)
    f = lambda w, c: 0.5 * (a * (w - c) ** 2).sum()  # noqa: E731
    solver = (GradientDescent(step=0.2, tol=1e-8) if kind == "GradientDescent"
              else ProximalGradient(prox_none, step=0.2, tol=1e-8, acceleration=False))
    w, info = solver.run(f, torch.zeros(2, dtype=F64), c)
    g0 = -a * c
    k = 0
    while float(((1 - 0.2 * a) ** k * g0).norm()) > 1e-8 * max(1.0, float(g0.norm())):
        k += 1
    assert int(info.iterations) == k
    torch.testing.assert_close(w, c - (1 - 0.2 * a) ** k * c, rtol=0, atol=1e-13)


@pytest.mark.parametrize("stage", ["run", "call"])
@pytest.mark.parametrize("name", list(ALL))
def test_nonfinite_objective_at_the_start_is_an_error_naming_the_solver(name, stage):
    solver = ALL[name]
    if is_least_squares(solver):
        def fun(w, c):
            return torch.log(w) - c  # -inf at w = 0
    else:
        def fun(w, c):
            return ((w - c) ** 2).sum() - torch.log(w).sum()  # +inf at w = 0
    c = torch.ones(3, dtype=F64, requires_grad=stage == "call")
    with pytest.raises(FloatingPointError, match=rf"{type(solver).__name__}.*not finite.*iteration 0"):
        if stage == "run":
            solver.run(fun, torch.zeros(3, dtype=F64), c)
        else:
            solver(fun, torch.zeros(3, dtype=F64), c)


@pytest.mark.parametrize("name", list(SMOOTH))
@pytest.mark.parametrize("bad", ["shape (1,)", "python float", "int tensor", "tuple"])
def test_objective_that_is_not_a_scalar_tensor_is_refused(name, bad):
    solver = SMOOTH[name]
    wrap = {
        "shape (1,)": lambda v: v.reshape(1),
        "python float": lambda v: float(v.detach()),
        "int tensor": lambda v: v.detach().round().long(),
        "tuple": lambda v: (v, v),
    }[bad]
    with pytest.raises(ValueError, match=rf"{type(solver).__name__}: `fun\(sol, \*args\)` must return a scalar"):
        solver.run(lambda w, c: wrap(quartic(w, c)), torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64))


def trap_residual(p, d, trap):
    """Root p = d.  Where `trap` is set, the residual gets + sqrt(p - d) for p >= d, whose
    derivative is infinite exactly at the root (the first Gauss-Newton step lands there)."""
    extra = torch.sqrt((p - d).abs() + (~trap).to(p.dtype))
    return p - d + torch.where(trap & (p >= d), extra, torch.zeros_like(p))


def test_gauss_newton_nonfinite_jacobian_is_named_per_batch_element_and_raised_unbatched():
    d = torch.tensor([[2.0], [3.0], [-1.0]], dtype=F64)
    trap = torch.tensor([[False], [True], [False]])
    with pytest.warns(ConvergenceWarning, match=r"batch elements \[1\].*NONFINITE"):
        p, info = GaussNewton(batch_dims=1).run(trap_residual, torch.zeros(3, 1, dtype=F64), d, trap)
    assert info.status.tolist() == [Status.SUCCESS, Status.NONFINITE, Status.SUCCESS]
    torch.testing.assert_close(p[[0, 2]], d[[0, 2]])
    with pytest.raises(FloatingPointError, match=r"GaussNewton.*not finite.*iteration 1"):
        GaussNewton().run(trap_residual, torch.zeros(1, dtype=F64), d[1], trap[1])


@pytest.mark.parametrize(
    "name",
    [
        "GradientDescent", "OptimizerLoop(rprop)", "ProximalGradient(none)",
        "LBFGS", "Scipy(L-BFGS-B)", *LSQ,
    ],
)
def test_problem_without_unknowns_returns_at_once_or_names_init(name):
    """GradientDescent returns an empty solution with 0 iterations; every solver should do
    the same or refuse with an error naming `init` (not an arithmetic error)."""
    solver = ALL[name]
    c = torch.tensor([1.0, 2.0], dtype=F64)
    if is_least_squares(solver):
        def fun(w, c):
            return c + w.sum()
    else:
        def fun(w, c):
            return (c**2).sum() + (w**2).sum()
    try:
        w, info = solver.run(fun, torch.zeros(0, dtype=F64), c)
    except (TypeError, ValueError) as err:
        assert "init" in str(err)
        return
    assert w.shape == (0,) and int(info.iterations) == 0


# ============================================================================ 4. info / results


SCIPY_METHODS = ["L-BFGS-B", "BFGS", "CG", "Newton-CG", "TNC", "SLSQP", "trust-constr", "trust-ncg",
                 "trust-krylov", "trust-exact", "dogleg", "Nelder-Mead", "Powell", "COBYLA", "COBYQA"]


@pytest.mark.parametrize("method", SCIPY_METHODS)
def test_every_scipy_method_reports_what_an_independent_gradient_says(method):
    """Converged iff the true gradient at the returned point meets the tolerance; a method
    that stops short (gradient-free ones) warns; never a silent failure."""
    c = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w, info = ScipyMinimize(method).run(quartic, torch.zeros(3, dtype=F64), c)
    assert isinstance(info, ScipyInfo) and isinstance(info, SolverInfo)
    assert torch.isfinite(w).all() and info.nfev >= 1 and isinstance(info.message, str)
    true_grad = float(((w - c) + w**3).norm())
    assert float(info.residual_norm) == pytest.approx(true_grad, rel=1e-9, abs=1e-15)
    assert float(info.tolerance) == pytest.approx(SQRT_EPS[F64] * max(1.0, float(c.norm())), rel=1e-9)
    warned = [w_ for w_ in caught if issubclass(w_.category, ConvergenceWarning)]
    assert bool(info.converged) == (true_grad <= float(info.tolerance))
    if bool(info.converged):
        assert not warned
        assert float((w + w**3 - c).norm()) <= float(info.tolerance)
    else:
        assert int(info.status) in (Status.MAX_ITERATIONS, Status.BREAKDOWN)
        assert len(warned) == 1 and "ScipyMinimize did not converge" in str(warned[0].message)


@pytest.mark.parametrize("scale", [0.01, 100.0], ids=["small_g0", "large_g0"])
@pytest.mark.parametrize("name", ["GradientDescent", "LBFGS", "Scipy(L-BFGS-B)", "OptimizerLoop(rprop)",
                                  "ProximalGradient(none)", "GaussNewton", "LevenbergMarquardt"])
def test_user_tolerance_is_relative_to_max_1_initial_gradient(name, scale):
    solver = type(ALL[name])(prox_none, tol=1e-5) if name.startswith("Proximal") else (
        OptimizerLoop("rprop", tol=1e-5) if name.startswith("OptimizerLoop") else type(ALL[name])(tol=1e-5))
    c = scale * torch.tensor([0.6, -0.8], dtype=F64)  # ||g0|| = scale (quadratic part)
    fun = _distance_to(solver)
    w, info = solver.run(fun, torch.zeros(2, dtype=F64), c)
    expected_tol = 1e-5 * max(1.0, scale)
    if is_least_squares(solver):
        assert float(info.tolerance) >= expected_tol * (1 - 1e-9)
    else:
        assert float(info.tolerance) == pytest.approx(expected_tol, rel=1e-12)
    assert bool(info.converged) and float((w - c).norm()) <= float(info.tolerance)
    assert float(info.residual_norm) == pytest.approx(float((w - c).norm()), rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("name", list(ALL))
def test_run_detaches_and_keeps_inputs_untouched(name):
    solver = ALL[name]
    c = torch.tensor([1.0, -2.0, 0.5], dtype=F64, requires_grad=True)
    init = torch.full((3,), 0.1, dtype=F64, requires_grad=True)
    fun = quartic_residual if is_least_squares(solver) else quartic
    w, info = solver.run(fun, init, c)
    assert not w.requires_grad and w.grad_fn is None
    assert torch.equal(init.detach(), torch.full((3,), 0.1, dtype=F64)) and init.grad is None and c.grad is None
    torch.testing.assert_close(w + w**3, c.detach(), rtol=1e-6, atol=1e-7)
    assert info.iterations.dtype == torch.int64 and info.status.dtype == torch.int64
    assert info.iterations.shape == () and info.status.shape == ()
