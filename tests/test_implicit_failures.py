"""Failures the implicit core names instead of returning them as numbers, and a user's own
solve function in the place of a linear solver (the TorchOpt / JAXopt protocol)."""

import warnings

import pytest
import torch

import bilevel
from bilevel.implicit import CG, stationarity
from bilevel.implicit.linear_solve.function import SolveFunction
from bilevel.status import ConvergenceWarning, Status

D = torch.float64


# ----- a cross term that is NaN where everything else is finite --------------------------
def _where_sqrt(x):
    """sqrt(x) for x > 0, else 0: finite, but its autograd derivative at x < 0 is NaN
    (torch.where differentiates both branches: 0 * NaN)."""
    return torch.where(x > 0, torch.sqrt(x), torch.zeros_like(x))


def _where_inner(x, y):
    return 0.5 * ((y - _where_sqrt(x)) ** 2).sum()


X_MIXED = torch.tensor([-1.0, 4.0], dtype=D)


def test_hypergrad_names_a_nan_cross_term_instead_of_returning_it():
    with pytest.raises(FloatingPointError, match=r"hypergrad: .*cross term.* not finite .*torch.where"):
        bilevel.hypergrad(lambda x, y: y.sum(), _where_inner, X_MIXED, _where_sqrt(X_MIXED))
    # the same problem where the derivative exists: 1 / (2 sqrt(x))
    x = torch.tensor([1.0, 4.0], dtype=D)
    torch.testing.assert_close(bilevel.hypergrad(lambda x, y: y.sum(), _where_inner, x, x.sqrt()),
                               0.5 / x.sqrt())


def test_hypergrad_names_a_nan_gradient_of_outer_in_x():
    outer = lambda x, y: y.sum() + (x * torch.log(x)).sum()  # noqa: E731 - d/dx at x = 0: log 0 = -inf
    x = torch.tensor([0.0, 1.0], dtype=D)
    with pytest.raises(FloatingPointError, match=r"gradient of `outer`"):
        bilevel.hypergrad(outer, lambda x, y: 0.5 * ((y - x) ** 2).sum(), x, x.clone())


@pytest.mark.parametrize("create_graph", [False, True])
def test_custom_root_names_a_nan_cross_term(create_graph):
    root = bilevel.custom_root(stationarity(lambda y, x: _where_inner(x, y)))(_where_sqrt)
    x = X_MIXED.clone().requires_grad_()
    with pytest.raises(FloatingPointError, match=r"custom_root: .*derivative in the arguments is not finite"):
        torch.autograd.grad(root(x).sum(), x, create_graph=create_graph)


def test_a_nan_optimality_residual_is_a_floating_point_error_not_a_convergence_warning():
    # grad_y is NaN (0 * log(-y)) while the Hessian is finite: no answer can be certified
    inner = lambda x, y: 0.5 * ((y - x) ** 2).sum() + 0 * (y * torch.log(-y)).sum()  # noqa: E731
    x = torch.tensor([1.0, 2.0], dtype=D)
    with pytest.raises(FloatingPointError, match=r"hypergrad: the optimality residual .* NaN or inf"):
        bilevel.hypergrad(lambda x, y: y.sum(), inner, x, x.clone())
    root = bilevel.custom_root(stationarity(lambda y, x: inner(x, y)))(lambda x: x.clone())
    xr = x.clone().requires_grad_()
    with pytest.raises(FloatingPointError, match=r"custom_root: the optimality residual .* NaN or inf"):
        torch.autograd.grad(root(xr).sum(), xr)


def test_a_nan_optimality_residual_in_a_batch_names_the_element():
    def objective(y, x):
        return 0.5 * ((y - x) ** 2).sum() + 0 * torch.sqrt(y[..., 0] - 1.5).sum()  # NaN gradient where y_0 < 1.5

    root = bilevel.custom_root(stationarity(objective), batch_dims=1)(lambda x: x.clone())
    x = torch.tensor([[1.0, 2.0], [2.0, 3.0]], dtype=D, requires_grad=True)
    with pytest.raises(FloatingPointError, match=r"batch elements \[0\]"):
        torch.autograd.grad(root(x).sum(), x)


def test_a_fixed_point_map_returning_another_tree_is_named():
    """T returns a tuple where the solution is a tensor: a ValueError naming both trees at the
    backward pass (tree_map would take the tuple for a single leaf and fail in torch.sub)."""
    T = lambda s, a: (0.5 * (s + a / s), s)  # noqa: E731
    solver = bilevel.custom_fixed_point(T)(lambda a: torch.sqrt(a))
    a = torch.tensor(4.0, dtype=D, requires_grad=True)
    with pytest.raises(ValueError, match=r"`T\(sol, \*args\)` must return a tree like `sol`"):
        torch.autograd.grad(solver(a), a)


# ----- a user's own solve function -------------------------------------------------------
def _ridge():
    g = torch.Generator().manual_seed(0)
    X, t = torch.randn(20, 3, generator=g, dtype=D), torch.randn(20, generator=g, dtype=D)

    def objective(w, lam):
        return 0.5 * ((X @ w - t) ** 2).sum() + 0.5 * lam * (w ** 2).sum()

    def closed(lam):
        return torch.linalg.solve(X.T @ X + lam * torch.eye(3, dtype=D), X.T @ t)

    return objective, closed


def _dense_solve(matvec, b):
    """Materialize A by products with the identity and solve: the answer only, no info."""
    A = torch.func.vmap(matvec)(torch.eye(b.numel(), dtype=b.dtype)).T
    return torch.linalg.solve(A, b)


def _protocol_solve(matvec, b, x0=None):  # DESIGN.md's solver(matvec, b, x0=None) -> (x, info)
    return CG(tol=1e-12)(matvec, b, x0)


def _own_info_solve(matvec, b):  # another library's info: a dict with its own verdict
    x, info = CG(maxiter=1)(matvec, b)
    return x, {"converged": False, "iterations": 1}


@pytest.mark.parametrize("solve", [_dense_solve, _protocol_solve])
def test_custom_root_and_hypergrad_accept_a_solve_function(solve):
    objective, closed = _ridge()
    lam = torch.tensor(0.7, dtype=D, requires_grad=True)
    (expected,) = torch.autograd.grad(closed(lam).sum(), lam)
    root = bilevel.custom_root(stationarity(objective), solve=solve)(closed)
    (grad,) = torch.autograd.grad(root(lam).sum(), lam)
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=0)
    assert root.last_info.ok and isinstance(root.last_info.solver, SolveFunction)
    # the same hypergradient through bilevel.hypergrad (outer: the sum of the weights)
    g = bilevel.hypergrad(lambda lam, w: w.sum(), lambda lam, w: objective(w, lam), lam.detach(),
                          closed(lam.detach()), solve=solve)
    torch.testing.assert_close(g, expected, rtol=1e-9, atol=0)


def test_a_solve_function_with_a_wrong_answer_warns_with_its_measured_residual():
    objective, closed = _ridge()
    root = bilevel.custom_root(stationarity(objective), solve=lambda matvec, b: 0.5 * b)(closed)
    lam = torch.tensor(0.7, dtype=D, requires_grad=True)
    with pytest.warns(ConvergenceWarning, match=r"INACCURATE, relative residual"):
        torch.autograd.grad(root(lam).sum(), lam)
    info = root.last_info.linear_solve
    assert int(info.status) == Status.INACCURATE and float(info.relative_residual) > 0.1


def test_a_solve_function_reporting_its_own_failure_is_believed():
    objective, closed = _ridge()
    root = bilevel.custom_root(stationarity(objective), solve=_own_info_solve)(closed)
    lam = torch.tensor(0.7, dtype=D, requires_grad=True)
    with pytest.warns(ConvergenceWarning, match=r"MAX_ITERATIONS, relative residual .* after 1 iterations"):
        torch.autograd.grad(root(lam).sum(), lam)


@pytest.mark.parametrize("solve", [_dense_solve, _protocol_solve, _own_info_solve])
def test_a_solve_function_written_for_one_system_solves_a_batch_element_by_element(solve):
    """Under vmap (independent systems) and jacrev (one operator, many right-hand sides) a
    function without `batch_dims` is called once per element, on that element's operator;
    its own per-element verdicts are kept (the 1-step CG: MAX_ITERATIONS for each)."""
    objective, closed = _ridge()
    root = bilevel.custom_root(stationarity(objective), solve=solve)(closed)
    lams = torch.tensor([0.5, 1.0, 3.0], dtype=D)
    expected = torch.stack([torch.func.grad(lambda lam: closed(lam).sum())(lam) for lam in lams])
    if solve is _own_info_solve:
        with pytest.warns(ConvergenceWarning, match=r"batch elements \[0, 1, 2\]\): MAX_ITERATIONS"):
            torch.func.vmap(torch.func.grad(lambda lam: root(lam).sum()))(lams)
        return
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(lambda lam: root(lam).sum()))(lams), expected,
                               rtol=1e-9, atol=0)
    w_root = bilevel.custom_root(stationarity(lambda w, v: objective(w, 0.0) + 0.5 * (v * w * w).sum()),
                                 solve=solve)(lambda v: torch.linalg.solve(
                                     _ridge_gram() + torch.diag(v), _ridge_rhs()))
    v = torch.tensor([0.5, 1.0, 2.0], dtype=D)
    J = torch.func.jacrev(w_root)(v)  # three cotangents through one operator
    w = w_root(v)
    torch.testing.assert_close(J, -torch.linalg.solve(_ridge_gram() + torch.diag(v), torch.diag(w)), rtol=1e-9, atol=0)


def _ridge_gram():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 3, generator=g, dtype=D)
    return X.T @ X


def _ridge_rhs():
    g = torch.Generator().manual_seed(0)
    X, t = torch.randn(20, 3, generator=g, dtype=D), torch.randn(20, generator=g, dtype=D)
    return X.T @ t


def test_a_solve_function_that_takes_batch_dims_solves_a_batch():
    objective, closed = _ridge()

    def batched_cg(matvec, b, batch_dims=0):
        return CG(tol=1e-12)(matvec, b, batch_dims=batch_dims)

    root = bilevel.custom_root(stationarity(objective), solve=batched_cg)(closed)
    lams = torch.tensor([0.5, 1.0], dtype=D)
    grads = torch.func.vmap(torch.func.grad(lambda lam: root(lam).sum()))(lams)
    expected = torch.stack([torch.func.grad(lambda lam: closed(lam).sum())(lam) for lam in lams])
    torch.testing.assert_close(grads, expected, rtol=1e-9, atol=0)


def test_a_solve_function_returning_the_wrong_shape_is_named():
    objective, closed = _ridge()
    root = bilevel.custom_root(stationarity(objective), solve=lambda matvec, b: b[:2])(closed)
    lam = torch.tensor(0.7, dtype=D, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"solve: .* same structure and shapes.* x shaped like b"):
            torch.autograd.grad(root(lam).sum(), lam)


def test_a_solve_function_on_a_tuple_solution_returns_x_alone():
    """x shaped like b = (b1, b2), a pair, is the answer, not (x, info)."""
    inner = lambda x, y: 0.5 * ((y[0] - x) ** 2).sum() + ((y[1] - 2 * x) ** 2).sum()  # noqa: E731
    outer = lambda x, y: y[0].sum() + y[1].sum()  # noqa: E731

    def diagonal(matvec, b):  # the Hessian is diag(1, 2) by blocks
        return b[0], b[1] / 2

    x = torch.tensor([1.0, 2.0], dtype=D)
    g = bilevel.hypergrad(outer, inner, x, (x.clone(), 2 * x), solve=diagonal)
    torch.testing.assert_close(g, torch.full((2,), 3.0, dtype=D))  # d/dx (x + 2x)


def test_a_solve_function_info_may_hold_one_element_tensors_and_loose_answers_pass():
    objective, closed = _ridge()

    def cg_to_1e5(matvec, b):  # other libraries' default: relative residual 1e-5
        x, info = CG(tol=1e-5)(matvec, b)
        return x, {"converged": info.converged.reshape(1), "iterations": info.iterations.reshape(1)}

    def cg_without_info(matvec, b):
        return CG(tol=1e-5)(matvec, b)[0]

    lam = torch.tensor(0.7, dtype=D, requires_grad=True)
    for solve in (cg_to_1e5, cg_without_info):
        root = bilevel.custom_root(stationarity(objective), solve=solve)(closed)
        torch.autograd.grad(root(lam).sum(), lam)  # no warning (BilevelWarnings are errors here)
        assert root.last_info.ok


def test_an_overflowing_but_finite_residual_is_not_called_nan():
    """float32: entries of -1e20 have a norm of inf; the solver is far from converged (a
    warning), not broken (an error)."""
    f = lambda w, lam: 0.5 * ((w - 1e20) ** 2).sum() + 0.5 * lam * (w ** 2).sum()  # noqa: E731
    root = bilevel.custom_root(stationarity(f))(lambda lam: torch.zeros(3, dtype=lam.dtype))
    lam = torch.tensor(1.0, dtype=torch.float32, requires_grad=True)
    with pytest.warns(bilevel.status.OptimalityWarning):
        root(lam).sum().backward()


def test_a_nan_cross_term_in_a_batch_names_the_element():
    root = bilevel.custom_root(stationarity(lambda y, x: _where_inner(x, y)), batch_dims=1)(_where_sqrt)
    x = torch.tensor([[1.0, 4.0], [-1.0, 4.0], [9.0, 1.0]], dtype=D, requires_grad=True)
    with pytest.raises(FloatingPointError, match=r"NaN or inf \(batch elements \[1\]\)"):
        torch.autograd.grad(root(x).sum(), x)


# ----- a saddle point of the inner problem, solved by a solver for indefinite systems -----
_Q = torch.linalg.qr(torch.randn(6, 6, dtype=D, generator=torch.Generator().manual_seed(5)))[0]


def _hessian(lowest):
    return _Q @ torch.diag(torch.tensor([lowest, 1.0, 2.0, 3.0, 4.0, 5.0], dtype=D)) @ _Q.T


def _quadratic_inner(H):
    return lambda x, y: 0.5 * y @ H @ y - x @ y  # noqa: E731 - stationary at y = H^-1 x


def _toward_negative_curvature(x, y):
    """grad_y F = q + 0.2 y with q the Hessian's eigenvector of eigenvalue -2: the adjoint
    solution u = H^-1 grad_y F has u^T grad_y F < 0."""
    return _Q[:, 0] @ y + 0.1 * (y ** 2).sum()


@pytest.mark.parametrize("solve", [bilevel.implicit.MINRES(), bilevel.implicit.GMRES(), bilevel.implicit.Direct("lu"),
                                   bilevel.implicit.BiCGStab()], ids=["MINRES", "GMRES", "lu", "BiCGStab"])
def test_hypergrad_at_a_saddle_of_the_inner_problem_warns_with_solvers_for_indefinite_systems(solve):
    """These solvers solve the indefinite system without complaint (CG breaks down and says
    so); u^T H u = u^T b - u^T r < 0 proves the negative curvature, and the gradient is
    then that of the saddle path, which the warning names."""
    H = _hessian(-2.0)
    x = torch.linspace(-1.0, 1.0, 6, dtype=D)
    y = torch.linalg.solve(H, x)
    with pytest.warns(bilevel.CurvatureWarning, match=r"not positive definite .* saddle or a maximum"):
        g, info = bilevel.hypergrad(_toward_negative_curvature, _quadratic_inner(H), x, y, solve=solve,
                                    return_info=True)
    assert bool(info.negative_curvature) and not info.ok
    # the number is still the saddle path's derivative: dy/dx = H^-1, dF/dx = H^-1 grad_y F
    torch.testing.assert_close(g, torch.linalg.solve(H, _Q[:, 0] + 0.2 * y))
    with pytest.raises(bilevel.BilevelError, match="not positive definite"):
        bilevel.hypergrad(_toward_negative_curvature, _quadratic_inner(H), x, y, solve=solve, strict=True)


@pytest.mark.parametrize("lowest", [1.0, 1e-7, 0.0], ids=["spd", "cond-5e7", "singular-psd"])
@pytest.mark.parametrize("solve", [bilevel.implicit.MINRES(), bilevel.implicit.GMRES(), bilevel.implicit.Direct("lu"),
                                   bilevel.implicit.Direct("lstsq"), None],
                         ids=["MINRES", "GMRES", "lu", "lstsq", "default"])
def test_no_negative_curvature_is_claimed_at_a_minimum(solve, lowest):
    """Positive definite, ill-conditioned and singular positive semidefinite Hessians
    (grad_y F in the range there) never raise the negative-curvature warning."""
    if lowest == 0.0 and solve == bilevel.implicit.Direct("lu"):
        pytest.skip("LU on a singular matrix is a failed solve, reported as such")
    H = _hessian(lowest)
    x = _Q[:, 1:] @ torch.linspace(-1.0, 1.0, 5, dtype=D)  # in the range of every H above
    y = torch.linalg.lstsq(H, x).solution
    outer = lambda x, y: (_Q[:, 2] @ y) ** 2 + 0.5 * (y ** 2).sum()  # noqa: E731
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not positive definite.*")
        warnings.filterwarnings("ignore", category=bilevel.BilevelWarning)  # e.g. a singular system's own report
        _, info = bilevel.hypergrad(outer, _quadratic_inner(H), x, y, solve=solve, return_info=True)
    assert not bool(info.negative_curvature)


def test_negative_curvature_in_a_batch_names_the_element():
    """Under vmap, element 1 of three sits at a saddle: the warning names it alone."""
    def inner(s, y):
        return 0.5 * y @ _hessian_of(s) @ y - y.sum()

    def _hessian_of(s):
        return _Q @ torch.diag(torch.cat([s.reshape(1), torch.tensor([1.0, 2, 3, 4, 5], dtype=D)])) @ _Q.T

    s = torch.tensor([[1.0], [-2.0], [3.0]], dtype=D)
    y = torch.stack([torch.linalg.solve(_hessian_of(si), torch.ones(6, dtype=D)) for si in s])
    with pytest.warns(bilevel.CurvatureWarning, match=r"not positive definite at the solution \(batch elements \[1\]\)"):
        torch.func.vmap(lambda a, b: bilevel.hypergrad(_toward_negative_curvature, inner, a, b,
                                                       solve=bilevel.implicit.MINRES()))(s, y)


def test_minres_proves_a_saddle_that_the_adjoint_test_cannot_see():
    """grad_y F with a small part along the eigenvalue -2: u^T b > 0, so the one-sided test
    is silent, but the Lanczos matrix of MINRES has a Ritz value near -2 (its inertia)."""
    H = _hessian(-2.0)
    x = torch.linspace(-1.0, 1.0, 6, dtype=D)
    y = torch.linalg.solve(H, x)
    direction = _Q[:, 0] * 0.3 + _Q[:, 1:] @ torch.ones(5, dtype=D)
    outer = lambda x, y: direction @ y  # noqa: E731
    u = torch.linalg.solve(H, direction)
    assert float(u @ direction) > 0.5  # the adjoint test alone proves nothing here
    with pytest.warns(bilevel.CurvatureWarning, match="Lanczos matrix"):
        g, info = bilevel.hypergrad(outer, _quadratic_inner(H), x, y, solve=bilevel.implicit.MINRES(),
                                    return_info=True)
    assert bool(info.negative_curvature) and bool(info.linear_solve.negative_curvature) and not info.ok
    torch.testing.assert_close(g, u)  # still the saddle path's derivative


def test_the_default_solve_finds_a_saddle_in_a_direction_the_right_hand_side_never_meets():
    """grad_y F orthogonal to the eigenvector of -2: CG converges (its Krylov space never
    meets the negative curvature) and u^T b > 0, but the dense default solve, whose
    Cholesky factorization broke down, reads the matrix's spectrum."""
    H = _hessian(-2.0)
    x = torch.linspace(-1.0, 1.0, 6, dtype=D)
    y = torch.linalg.solve(H, x)
    direction = _Q[:, 1:] @ torch.linspace(1.0, 2.0, 5, dtype=D)
    outer = lambda x, y: direction @ y  # noqa: E731
    with pytest.warns(bilevel.CurvatureWarning, match="not positive definite"):
        g, info = bilevel.hypergrad(outer, _quadratic_inner(H), x, y, return_info=True)
    assert bool(info.linear_solve.negative_curvature) and bool(info.linear_solve.converged) and not info.ok
    torch.testing.assert_close(g, torch.linalg.solve(H, direction))
    _, info = bilevel.implicit.CG()(lambda v: H @ v, direction)  # the Krylov solve alone is silent
    assert bool(info.converged) and info.negative_curvature is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_minres_reports_the_inertia_of_each_system_of_a_batch(dtype):
    """info.negative_curvature per element: indefinite, positive definite, singular
    semidefinite (b in the range) and cond-1e7 systems; a solve stays a success."""
    lows = [-0.5, 1.0, 0.0, 1e-7 if dtype == torch.float64 else 1e-3]
    A = torch.stack([_hessian(low) for low in lows]).to(dtype)
    b = (_Q @ torch.linspace(-1.0, 1.0, 6, dtype=D)).expand(4, 6).clone()
    b[2] = _Q[:, 1:] @ torch.linspace(-1.0, 1.0, 5, dtype=D)  # in the range of the singular one
    b = b.to(dtype)
    x, info = bilevel.implicit.MINRES(maxiter=60)(lambda v: (A @ v.unsqueeze(-1)).squeeze(-1), b, batch_dims=1)
    assert info.negative_curvature.tolist() == [True, False, False, False]
    assert bool(info.converged[0]) and bool(info.converged[1])
    _, cg_info = bilevel.implicit.CG()(lambda v: (A[1] @ v), b[1])
    assert cg_info.negative_curvature is None  # CG reports an indefinite system as its breakdown instead
    # a pytree node: vmap stacks the flags too
    flags = torch.func.vmap(lambda M, r: bilevel.implicit.MINRES(maxiter=60)(lambda v: M @ v, r)[1].negative_curvature)(A, b)
    assert flags.tolist() == [True, False, False, False]


def test_custom_root_of_a_stationarity_condition_is_not_judged_for_curvature():
    """custom_root(stationarity(f)) may mean a maximum or a saddle on purpose (min-max):
    only hypergrad, whose inner problem is a minimization by definition, looks."""
    H = _hessian(-2.0)
    root = bilevel.custom_root(stationarity(lambda y, x: _quadratic_inner(H)(x, y)),
                               solve=bilevel.implicit.MINRES())(lambda x: torch.linalg.solve(H, x))
    x = torch.linspace(-1.0, 1.0, 6, dtype=D).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (g,) = torch.autograd.grad(_toward_negative_curvature(x, root(x)), x)
    torch.testing.assert_close(g, torch.linalg.solve(H, _Q[:, 0] + 0.2 * torch.linalg.solve(H, x.detach())))
