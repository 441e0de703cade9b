"""hypergrad, unrolled and one-step hypergradients against closed forms (ALGORITHMS.md)."""

import sys

import pytest
import torch
from torch.func import jacrev, vmap

import bilevel
from bilevel.implicit import CG, one_step_hypergrad, unrolled_hypergrad
from bilevel.implicit.hypergrad import estimate_lipschitz
from bilevel.status import BilevelError, CurvatureWarning, OptimalityWarning
from helpers import Quadratic, Ridge


def test_quadratic_closed_form_and_cg_exact_in_dim_y_steps():
    q = Quadratic.make()
    x = torch.randn(3)
    g, info = bilevel.hypergrad(q.outer, q.inner, x, q.solution(x), return_info=True)
    torch.testing.assert_close(g, q.hypergradient(x), rtol=1e-12, atol=1e-12)
    assert info.ok and int(info.linear_solve.iterations) <= 5
    g5 = bilevel.hypergrad(q.outer, q.inner, x, q.solution(x), solve=CG(maxiter=5, tol=1e-12))
    torch.testing.assert_close(g5, q.hypergradient(x), rtol=1e-10, atol=1e-10)


def test_ridge_per_feature_closed_form():
    r = Ridge.make(n=50, d=6)
    lam = torch.linspace(-1, 1, 6)
    g = bilevel.hypergrad(r.outer, r.inner, lam, r.solution(lam))
    torch.testing.assert_close(g, r.hypergradient(lam), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("terms", [1, 3, 10])
def test_neumann_k_terms_matches_its_exact_formula(terms):
    Neumann = pytest.importorskip("bilevel.implicit.linear_solve").__dict__.get("Neumann")
    if Neumann is None:
        pytest.skip("Neumann not available")
    q = Quadratic.make()
    x, alpha = torch.randn(3), 0.2
    y = q.solution(x)
    g = bilevel.hypergrad(q.outer, q.inner, x, y, solve=Neumann(terms=terms, alpha=alpha))
    eye = torch.eye(5)
    truncated = eye - torch.linalg.matrix_power(eye - alpha * q.A, terms)
    expected = q.B.T @ torch.linalg.solve(q.A, truncated @ (y - q.y_target)) + q.rho * x
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-12)


def test_unrolled_matches_matrix_power_and_truncation():
    q = Quadratic.make()
    x, alpha, T = torch.randn(3), 0.1, 25
    eye = torch.eye(5)
    P = torch.linalg.matrix_power(eye - alpha * q.A, T)
    J = (eye - P) @ torch.linalg.solve(q.A, q.B)  # y_T = J x from y_0 = 0
    expected = J.T @ (J @ x - q.y_target) + q.rho * x
    g, y_T = unrolled_hypergrad(q.outer, q.inner, x, torch.zeros(5), T, alpha, return_solution=True)
    torch.testing.assert_close(y_T, J @ x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-12)
    # truncated to the last K steps: y_{T-K} is a constant
    K = 5
    y_start = (eye - torch.linalg.matrix_power(eye - alpha * q.A, T - K)) @ torch.linalg.solve(q.A, q.B @ x)
    PK = torch.linalg.matrix_power(eye - alpha * q.A, K)
    JK = (eye - PK) @ torch.linalg.solve(q.A, q.B)
    expected_K = JK.T @ (PK @ y_start + JK @ x - q.y_target) + q.rho * x
    gK = unrolled_hypergrad(q.outer, q.inner, x, torch.zeros(5), T, alpha, truncate=K)
    torch.testing.assert_close(gK, expected_K, rtol=1e-12, atol=1e-12)


def test_unrolled_and_one_step_second_derivatives():
    """d/dx of the unrolled hypergradient g = J^T (J x - y_t) + rho x is J^T J + rho I; jacrev and
    grad over it returned zeros (the inner grad ran under no_grad, a constant to the outer level)."""
    q = Quadratic.make()
    x, alpha, T = torch.randn(3), 0.1, 7
    eye = torch.eye(5)
    J = (eye - torch.linalg.matrix_power(eye - alpha * q.A, T)) @ torch.linalg.solve(q.A, q.B)
    expected = J.T @ J + q.rho * torch.eye(3)
    unrolled = lambda x_: unrolled_hypergrad(q.outer, q.inner, x_, torch.zeros(5), T, alpha)  # noqa: E731
    torch.testing.assert_close(jacrev(unrolled)(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.func.jacfwd(unrolled)(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.func.grad(lambda x_: unrolled(x_) @ x_)(x), unrolled(x) + expected.T @ x,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vmap(jacrev(unrolled))(torch.stack([x, 2 * x])), torch.stack([expected] * 2),
                               rtol=1e-12, atol=1e-12)
    # plain autograd: detached by default, a graph with create_graph=True
    xr = x.clone().requires_grad_()
    assert not unrolled_hypergrad(q.outer, q.inner, xr, torch.zeros(5), T, alpha).requires_grad
    g = unrolled_hypergrad(q.outer, q.inner, xr, torch.zeros(5), T, alpha, create_graph=True)
    rows = [torch.autograd.grad(g[i], xr, retain_graph=True)[0] for i in range(3)]
    torch.testing.assert_close(torch.stack(rows), expected, rtol=1e-12, atol=1e-12)
    # one step of size xi from y: d y'/dx = xi B, so dg/dx = xi^2 B^T B + rho I
    y, xi = torch.randn(5), 0.3
    one = lambda x_: one_step_hypergrad(q.outer, q.inner, x_, y, xi)  # noqa: E731
    torch.testing.assert_close(jacrev(one)(x), xi ** 2 * q.B.T @ q.B + q.rho * torch.eye(3), rtol=1e-12, atol=1e-12)
    g1 = one_step_hypergrad(q.outer, q.inner, xr, y, xi, create_graph=True)
    torch.testing.assert_close(torch.autograd.grad(g1.sum(), xr)[0], (xi ** 2 * q.B.T @ q.B + q.rho * torch.eye(3)).sum(0),
                               rtol=1e-12, atol=1e-12)
    # a derived step (1 / L) is a setting: its estimate is not differentiated
    unrolled_auto = lambda x_: unrolled_hypergrad(q.outer, q.inner, x_, torch.zeros(5), T)  # noqa: E731
    step = 1.0 / float(estimate_lipschitz(q.inner, x, torch.zeros(5)))
    J_auto = (eye - torch.linalg.matrix_power(eye - step * q.A, T)) @ torch.linalg.solve(q.A, q.B)
    torch.testing.assert_close(jacrev(unrolled_auto)(x), J_auto.T @ J_auto + q.rho * torch.eye(3), rtol=1e-9, atol=1e-9)


def test_unrolled_hypergradient_is_differentiable_in_the_initialization():
    """y_T = P^T y0 + (I - P^T) A^-1 B x with P = I - alpha A, so g = J^T (y_T - y_t) + rho x
    has dg/dy0 = J^T P^T (meta-learning an initialization, MAML-style); jacrev and
    create_graph returned exact zeros (y0 was detached).  With truncate=K the first T - K
    steps carry no graph: the derivative in y0 is 0 by design."""
    q = Quadratic.make()
    x, y0, alpha, T = torch.randn(3), torch.randn(5), 0.1, 7
    eye = torch.eye(5)
    PT = torch.linalg.matrix_power(eye - alpha * q.A, T)
    J = (eye - PT) @ torch.linalg.solve(q.A, q.B)
    expected = J.T @ PT
    unrolled = lambda y_: unrolled_hypergrad(q.outer, q.inner, x, y_, T, alpha)  # noqa: E731
    torch.testing.assert_close(jacrev(unrolled)(y0), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.func.jacfwd(unrolled)(y0), expected, rtol=1e-12, atol=1e-12)
    yr = y0.clone().requires_grad_()
    g = unrolled_hypergrad(q.outer, q.inner, x, yr, T, alpha, create_graph=True)
    rows = [torch.autograd.grad(g[i], yr, retain_graph=True)[0] for i in range(3)]
    torch.testing.assert_close(torch.stack(rows), expected, rtol=1e-12, atol=1e-12)
    truncated = lambda y_: unrolled_hypergrad(q.outer, q.inner, x, y_, T, alpha, truncate=3)  # noqa: E731
    assert torch.equal(jacrev(truncated)(y0), torch.zeros(3, 5))


def test_a_nan_curvature_at_the_start_is_a_floating_point_error():
    """The inner gradient is NaN at y0 (torch.where's NaN branch) while the value is finite: the
    derived step 1/L was NaN and the error said '`step_size` must be positive; got nan'."""
    def inner(x, y):
        trap = torch.where(y[0] <= 0, torch.zeros((), dtype=y.dtype), 0.0 * torch.sqrt(-y[0]))
        return 0.5 * ((y - x) ** 2).sum() + trap

    outer = lambda x, y: 0.5 * ((y - 1) ** 2).sum()  # noqa: E731
    zeros = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(FloatingPointError, match=r"unrolled_hypergrad: the curvature estimate of `inner`"):
        unrolled_hypergrad(outer, inner, zeros, zeros, 5)
    with pytest.raises(FloatingPointError, match=r"Unrolled: the curvature estimate of `inner`"):
        bilevel.solve(outer, inner, zeros, zeros, method="unrolled", max_steps=5, progress=False)


def test_unrolled_approaches_implicit_as_steps_grow():
    q = Quadratic.make()
    x = torch.randn(3)
    exact = q.hypergradient(x)
    errors = [float((unrolled_hypergrad(q.outer, q.inner, x, torch.zeros(5), T) - exact).norm()) for T in (5, 50, 500)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-8


def test_one_step_matches_its_formula():
    q = Quadratic.make()
    x, y, xi = torch.randn(3), torch.randn(5), 0.3
    y_next = y - xi * (q.A @ y - q.B @ x)
    # d/dx F(x, y - xi grad_y f(x, y)) with d y_next / dx = xi B
    expected = xi * q.B.T @ (y_next - q.y_target) + q.rho * x
    torch.testing.assert_close(one_step_hypergrad(q.outer, q.inner, x, y, xi), expected)


def test_one_step_errors_name_one_step_and_its_argument_y():
    q = Quadratic.make()
    x, y = torch.randn(3), torch.randn(5)
    with pytest.raises(FloatingPointError, match=r"^one_step_hypergrad: `x` or `y` contains NaN"):
        one_step_hypergrad(q.outer, q.inner, x, y * float("nan"), 0.3)
    with pytest.raises(ValueError, match=r"^one_step_hypergrad: `step_size` must be positive"):
        one_step_hypergrad(q.outer, q.inner, x, y, -0.3)
    with pytest.raises(FloatingPointError, match=r"^unrolled_hypergrad: `x` or `y0` contains NaN"):
        bilevel.implicit.unrolled_hypergrad(q.outer, q.inner, x, y * float("nan"), 2, 0.3)


def test_pytree_upper_and_lower_variables():
    r = Ridge.make(n=40, d=3)

    def inner(x, y):
        return r.inner(x["lam"], y["w"]) + 0.5 * x["c"].exp() * (y["b"] - 1) ** 2

    def outer(x, y):
        return r.outer(x["lam"], y["w"]) + (y["b"] - 3) ** 2

    x = {"lam": torch.tensor([0.1, -0.2, 0.3]), "c": torch.tensor(0.5)}
    y = {"w": r.solution(x["lam"]), "b": torch.tensor(1.0)}
    g = bilevel.hypergrad(outer, inner, x, y)
    torch.testing.assert_close(g["lam"], r.hypergradient(x["lam"]), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(g["c"], torch.tensor(0.0), atol=1e-12, rtol=0)  # b* = 1 for every c


def test_create_graph_gives_the_hessian_of_the_hyperobjective():
    q = Quadratic.make()
    x = torch.randn(3)

    def hyper_gradient(x_):
        return bilevel.hypergrad(q.outer, q.inner, x_, q.solution(x_), create_graph=True)

    Ainv_B = torch.linalg.solve(q.A, q.B)
    expected = Ainv_B.T @ Ainv_B + q.rho * torch.eye(3)
    torch.testing.assert_close(jacrev(hyper_gradient)(x), expected, rtol=1e-10, atol=1e-10)
    assert not bilevel.hypergrad(q.outer, q.inner, x.requires_grad_(), q.solution(x)).requires_grad


def test_vmap_over_independent_problems_equals_loop():
    r = Ridge.make(n=40, d=3)
    lams = torch.randn(6, 3)
    ws = torch.stack([r.solution(l) for l in lams])
    batched = vmap(lambda l, w: bilevel.hypergrad(r.outer, r.inner, l, w))(lams, ws)
    torch.testing.assert_close(batched, torch.stack([r.hypergradient(l) for l in lams]), rtol=1e-9, atol=1e-10)


def test_m1_singular_hessian_points_to_single_loop_methods():
    n = 4
    inner = lambda x, y: 0.5 * (y[:n] ** 2).sum() - x @ y[:n]  # noqa: E731
    outer = lambda x, y: 0.5 * ((x - y[n:]) ** 2).sum() + 0.5 * ((y[:n] - 1) ** 2).sum()  # noqa: E731
    # where the implicit method stalls on M1: x = 0.505 e, y1 = x, y2 = y2_0 = 0.01 e
    x = torch.full((n,), 0.505)
    y = torch.cat([x, torch.full((n,), 0.01)])
    with pytest.warns(CurvatureWarning, match="single-loop"):
        bilevel.hypergrad(outer, inner, x, y)
    with pytest.raises(BilevelError):
        bilevel.hypergrad(outer, inner, x, y, strict=True)


def test_inexact_inner_solution_is_flagged():
    q = Quadratic.make()
    x = torch.randn(3)
    with pytest.warns(OptimalityWarning, match="optimality residual"):
        bilevel.hypergrad(q.outer, q.inner, x, q.solution(x) + 0.05)


def test_bad_input():
    q = Quadratic.make()
    x = torch.randn(3)
    y = q.solution(x)
    with pytest.raises(ValueError, match="scalar"):
        bilevel.hypergrad(lambda x, y: y, q.inner, x, y)
    with pytest.raises(ValueError, match="scalar"):
        bilevel.hypergrad(q.outer, lambda x, y: y * x.sum(), x, y)
    with pytest.raises(FloatingPointError, match="NaN"):
        bilevel.hypergrad(q.outer, q.inner, x, y * float("nan"))
    with pytest.raises(FloatingPointError, match="outer"):
        bilevel.hypergrad(lambda x, y: (y.sqrt()).sum() * 0 + torch.tensor(float("inf")) * y.sum(), q.inner, x, y)
    with pytest.raises(TypeError, match="tensor"):
        bilevel.hypergrad(q.outer, q.inner, [1.0, 2.0], y)
    with pytest.raises(ValueError, match="steps"):
        unrolled_hypergrad(q.outer, q.inner, x, y, 0)
    with pytest.raises(ValueError, match="truncate"):
        unrolled_hypergrad(q.outer, q.inner, x, y, 3, 0.1, truncate=5)


def test_gradcheck_of_the_differentiable_hypergradient():
    q = Quadratic.make()

    def hyper_gradient(x):
        return bilevel.hypergrad(q.outer, q.inner, x, q.solution(x), create_graph=True)

    x = torch.randn(3, requires_grad=True)
    assert torch.autograd.gradcheck(hyper_gradient, (x,))
    assert torch.autograd.gradgradcheck(hyper_gradient, (x,))


def test_unrolled_rejects_a_non_positive_tensor_step_size():
    x = torch.tensor([1.0], dtype=torch.float64)
    inner = lambda x, y: ((y - x) ** 2).sum()  # noqa: E731
    outer = lambda x, y: (y ** 2).sum()  # noqa: E731
    with pytest.raises(ValueError, match="`step_size` must be positive"):
        bilevel.implicit.unrolled_hypergrad(outer, inner, x, torch.zeros(1, dtype=torch.float64), 3,
                                            step_size=torch.tensor(-0.1, dtype=torch.float64))


def test_certificate_under_vmap_covers_the_batch():
    """vmap over hypergrad(return_info=True) with out_dims=(0, None): one certificate
    entry per batch element, each matching the unbatched call's."""
    inner = lambda x, y: 0.5 * ((y - x) ** 2).sum() + 0.5 * (y**2).sum()  # noqa: E731
    outer = lambda x, y: ((y - 1) ** 2).sum()  # noqa: E731
    X = torch.randn(4, 3)
    g, info = torch.func.vmap(lambda x: bilevel.hypergrad(outer, inner, x, x / 2, return_info=True),
                              out_dims=(0, None))(X)
    assert info.linear_solve.status.shape == (4,) and bool(info.ok)
    for i in range(4):
        g_i, info_i = bilevel.hypergrad(outer, inner, X[i], X[i] / 2, return_info=True)
        torch.testing.assert_close(g[i], g_i)
        torch.testing.assert_close(info.solution_norm[i], info_i.solution_norm)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes need Python 3.11")
@pytest.mark.parametrize("broken", ["outer", "inner"])
def test_an_error_inside_an_objective_is_annotated_with_the_shapes(broken):
    """Objectives written (y, x) instead of (x, y) fail inside torch with a bare size
    mismatch; the error keeps its type and message and gains a note naming the
    objective and the shapes, upper variable first."""
    X = torch.randn(20, 3, dtype=torch.float64)
    good = lambda lam, w: 0.5 * ((X @ w) ** 2).sum() + 0.5 * lam.exp().sum() * (w * w).sum()  # noqa: E731
    swapped = lambda w, lam: 0.5 * ((X @ w) ** 2).sum()  # noqa: E731
    outer, inner = (swapped, good) if broken == "outer" else (good, swapped)
    lam, w = torch.zeros(2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for method in (bilevel.hypergrad, unrolled_hypergrad, one_step_hypergrad):
        extra = (5, 0.1) if method is unrolled_hypergrad else (0.1,) if method is one_step_hypergrad else ()
        with pytest.raises(RuntimeError) as caught:
            method(outer, inner, lam, w, *extra)
        notes = getattr(caught.value, "__notes__", [])
        assert len(notes) == 1
        assert f"`{broken}(x, y)`" in notes[0] and "x: tensor of shape (2,)" in notes[0]
        assert "y: tensor of shape (3,)" in notes[0]


def test_a_solve_spoiled_by_autocast_says_so():
    """Under bf16 autocast the products of the objective run in bfloat16 and the adjoint solve
    cannot reach a float32 tolerance: the warning names autocast (its generic remedy, float64,
    would not help), not only ill-conditioning."""
    g = torch.Generator().manual_seed(0)
    X, t = torch.randn(200, 50, generator=g, dtype=torch.float32), torch.randn(200, generator=g, dtype=torch.float32)
    inner = lambda lam, w: 0.5 * ((X @ w - t) ** 2).mean() + 0.5 * (lam.exp() * w ** 2).sum()  # noqa: E731
    outer = lambda lam, w: 0.5 * ((X @ w - t) ** 2).mean()  # noqa: E731
    lam = torch.full((50,), -3.0, dtype=torch.float32)
    w = torch.linalg.solve(X.T @ X / 200 + torch.diag(lam.exp()), X.T @ t / 200)
    with pytest.warns(bilevel.status.ConvergenceWarning, match="autocast is on"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bilevel.hypergrad(outer, inner, lam, w)
