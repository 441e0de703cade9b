"""custom_root / custom_fixed_point against closed forms, in every differentiation mode."""

import contextlib
import warnings

import pytest
import torch
from torch.func import functional_call, grad, jacfwd, jacrev, vmap

import bilevel
from bilevel.implicit import CG, stationarity
from bilevel.status import (
    BilevelError,
    CapturedTensorWarning,
    ConvergenceWarning,
    CurvatureWarning,
    OptimalityWarning,
)
from helpers import Ridge


@pytest.fixture
def ridge():
    problem = Ridge.make()

    @bilevel.custom_root(stationarity(problem.inner_objective))
    def solve(lam):
        return problem.solution(lam)  # runs without autograd inside custom_root

    return problem, solve


def lam0(d=4):
    return torch.linspace(-0.5, 0.5, d)


def _modes(solve, lam):
    """The Jacobian d w*/d lam computed through every differentiation mode."""
    return {
        "jacrev": jacrev(solve)(lam),
        "jacfwd": jacfwd(solve)(lam),
        "autograd": torch.stack(
            [torch.autograd.grad(solve(lam.requires_grad_())[i], lam)[0] for i in range(lam.numel())]
        ),
        "func.grad": torch.stack([grad(lambda l, i=i: solve(l)[i])(lam.detach()) for i in range(lam.numel())]),
    }


def test_jacobian_every_mode_matches_closed_form(ridge):
    problem, solve = ridge
    lam = lam0()
    expected = problem.jacobian(lam)
    for mode, jac in _modes(solve, lam).items():
        torch.testing.assert_close(jac, expected, rtol=1e-10, atol=1e-12, msg=mode)


def test_gradcheck_and_gradgradcheck(ridge):
    _, solve = ridge
    lam = lam0().requires_grad_()
    assert torch.autograd.gradcheck(solve, (lam,))
    assert torch.autograd.gradgradcheck(solve, (lam,))


def test_second_derivative_follows_the_implicit_rule(ridge):
    problem, solve = ridge
    lam = lam0()
    expected = jacrev(jacrev(problem.solution))(lam)
    torch.testing.assert_close(jacrev(jacrev(solve))(lam), expected, rtol=1e-9, atol=1e-11)
    lam = lam.requires_grad_()
    g = torch.autograd.grad(solve(lam).sum(), lam, create_graph=True)[0]
    h = torch.autograd.grad(g @ torch.arange(4.0), lam)[0]
    g_ref = torch.autograd.grad(problem.solution(lam).sum(), lam, create_graph=True)[0]
    h_ref = torch.autograd.grad(g_ref @ torch.arange(4.0), lam)[0]
    torch.testing.assert_close(h, h_ref, rtol=1e-9, atol=1e-11)


def test_vmap_equals_loop(ridge):
    problem, solve = ridge
    lams = torch.randn(5, 4)
    torch.testing.assert_close(vmap(solve)(lams), torch.stack([problem.solution(l) for l in lams]))
    jac = vmap(jacrev(solve))(lams)
    torch.testing.assert_close(jac, torch.stack([problem.jacobian(l) for l in lams]), rtol=1e-10, atol=1e-12)


def test_scalar_root_with_every_linear_solver():
    solvers = [CG(), bilevel.implicit.linear_solve.Direct()]
    for name in ("GMRES", "BiCGStab", "MINRES", "NormalCG", "Neumann"):
        cls = getattr(bilevel.implicit.linear_solve, name, None)
        if cls is not None:
            solvers.append(cls(alpha=0.5, terms=200) if name == "Neumann" else cls())
    # x^2 - a = 0 has Jacobian 2 sqrt(a) > 0: every solver applies.  (The fixed-point
    # residual T(x) - x of Newton's map has Jacobian -1 there, which CG rightly refuses.)
    for solver in solvers:

        @bilevel.custom_root(lambda x, a: x * x - a, solve=solver)
        def sqrt(a):
            return a.sqrt()

        a = torch.tensor(2.0, requires_grad=True)
        (g,) = torch.autograd.grad(sqrt(a), a)
        torch.testing.assert_close(g, 0.5 / a.detach().sqrt(), msg=repr(solver))


def test_nonsymmetric_fixed_point_with_default_solve():
    torch.manual_seed(1)
    A = 0.4 * torch.randn(6, 6) / 6**0.5  # contraction, not symmetric
    T = lambda x, theta: A @ x + torch.tanh(theta)  # noqa: E731

    @bilevel.custom_fixed_point(T)
    def fixed_point(theta):
        x = torch.zeros(6)
        for _ in range(200):
            x = T(x, theta)
        return x

    theta = torch.randn(6)
    expected = torch.linalg.solve(torch.eye(6) - A, torch.diag(1 - torch.tanh(theta) ** 2))
    torch.testing.assert_close(jacrev(fixed_point)(theta), expected, rtol=1e-8, atol=1e-10)


def test_float32_defaults_are_quiet_and_accurate():
    p64 = Ridge.make()
    problem = Ridge(*(t.float() for t in (p64.X, p64.t, p64.Xv, p64.tv)))

    @bilevel.custom_root(stationarity(problem.inner_objective))
    def solve(lam):
        return problem.solution(lam)

    lam = lam0().float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jac = jacrev(solve)(lam)
    assert jac.dtype == torch.float32
    expected = p64.jacobian(lam.double())
    torch.testing.assert_close(jac.double(), expected, rtol=1e-3, atol=1e-4)


def test_pytree_solution_args_kwargs_and_aux():
    X = torch.randn(10, 3)

    def objective(sol, params, scale):
        w, b = sol["w"], sol["b"]
        return 0.5 * ((X @ w + b - params["t"]) ** 2).sum() + 0.5 * scale * params["lam"].exp() * (w**2).sum()

    @bilevel.custom_root(stationarity(objective), has_aux=True)
    def solve(params, scale, init=None):
        assert init is not None  # kwargs reach the solver
        A = torch.cat([X, torch.ones(10, 1)], 1)
        reg = torch.diag(torch.cat([scale * params["lam"].exp().expand(3), torch.zeros(1)]))
        z = torch.linalg.solve(A.T @ A + reg, A.T @ params["t"])
        return {"w": z[:3], "b": z[3]}, "aux-info"

    params = {"t": torch.randn(10), "lam": torch.tensor(0.3)}

    def loss(p):
        sol, aux = solve(p, 2.0, init=0)
        assert aux == "aux-info"
        return (sol["w"] ** 2).sum() + sol["b"]

    def reference(p):
        A = torch.cat([X, torch.ones(10, 1)], 1)
        reg = torch.diag(torch.cat([2.0 * p["lam"].exp().expand(3), torch.zeros(1)]))
        z = torch.linalg.solve(A.T @ A + reg, A.T @ p["t"])
        return (z[:3] ** 2).sum() + z[3]

    g, g_ref = grad(loss)(params), grad(reference)(params)
    for k in params:
        torch.testing.assert_close(g[k], g_ref[k])


def test_vmap_splits_keyword_tensors_and_stacks_aux():
    """Under vmap each element's keyword tensors (a warm start) reach its own solve, and each
    element's aux comes back: the keywords reached the solver still batched (torch's
    'tensor escaped' error), and every element got the last element's aux."""
    objective = lambda w, lam: 0.5 * (1 + lam) * (w ** 2).sum() - w.sum()  # noqa: E731  (w* = 1 / (1 + lam))
    seen = []

    @bilevel.custom_root(stationarity(objective), has_aux=True)
    def solve(lam, init=None, *, steps=0):
        seen.append(init.clone())
        w = init.clone()
        for _ in range(steps):
            w = w - (1 + lam) ** -1 * ((1 + lam) * w - 1)  # one Newton step lands on w*
        return w, {"lam": lam * 1.0, "steps": torch.tensor(steps), "value": objective(w, lam)}

    lams = torch.tensor([0.0, 1.0, 3.0])
    inits = torch.stack([torch.full((2,), float(i)) for i in range(3)])
    w, aux = vmap(lambda lam, init: solve(lam, init=init, steps=1))(lams, inits)
    torch.testing.assert_close(w, (1 / (1 + lams))[:, None].expand(3, 2))
    torch.testing.assert_close(torch.stack(seen[-3:]), inits)  # each element its own warm start
    torch.testing.assert_close(aux["lam"], lams)
    torch.testing.assert_close(aux["value"], -1 / (1 + lams))
    assert aux["steps"].tolist() == [1, 1, 1]
    # derivatives through the vmapped root: dw*/dlam = -1 / (1 + lam)^2 per element
    g = vmap(grad(lambda lam, init: solve(lam, init=init, steps=1)[0].sum()))(lams, inits)
    torch.testing.assert_close(g, -2 / (1 + lams) ** 2)
    g_fwd = vmap(jacfwd(lambda lam, init: solve(lam, init=init, steps=1)[0]))(lams, inits)
    torch.testing.assert_close(g_fwd, (-1 / (1 + lams) ** 2)[:, None].expand(3, 2))
    # plain autograd with aux: the solution carries the gradient, the aux tensors none
    lam = torch.tensor(1.0, requires_grad=True)
    w1, aux1 = solve(lam, init=torch.zeros(2), steps=1)
    assert not aux1["lam"].requires_grad
    (dlam,) = torch.autograd.grad(w1.sum(), lam)
    torch.testing.assert_close(dlam, torch.tensor(-0.5))


def test_module_parameters_through_functional_call():
    net = torch.nn.Linear(3, 2)
    data = torch.randn(8, 3)

    def objective(z, params):
        out = functional_call(net, params, (data,))
        return 0.5 * ((z - out.sum(0)) ** 2).sum() + 0.25 * (z**4).sum()

    @bilevel.custom_root(stationarity(objective))
    def solve(params):
        z = torch.zeros(2)
        target = functional_call(net, params, (data,)).sum(0)
        for _ in range(100):  # Newton on z - target + z^3 = 0
            z = z - (z - target + z**3) / (1 + 3 * z**2)
        return z

    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p):
        return solve(p).sum()

    g = grad(loss)(params)
    eps = 1e-6
    for k, v in params.items():
        direction = torch.randn_like(v)
        plus = {**params, k: v + eps * direction}
        minus = {**params, k: v - eps * direction}
        fd = (loss(plus) - loss(minus)) / (2 * eps)
        torch.testing.assert_close((g[k] * direction).sum(), fd, rtol=1e-6, atol=1e-8)


def test_logistic_regression_against_dense_hessian():
    torch.manual_seed(3)
    X = torch.randn(40, 5)
    y = torch.sign(torch.randn(40))

    def objective(w, lam):
        return torch.nn.functional.softplus(-y * (X @ w)).sum() + 0.5 * (lam.exp() * w**2).sum()

    @bilevel.custom_root(stationarity(objective))
    def fit(lam):
        w = torch.zeros(5)
        for _ in range(50):  # Newton
            H = torch.func.hessian(objective)(w, lam)
            w = w - torch.linalg.solve(H, torch.func.grad(objective)(w, lam))
        return w

    lam = torch.randn(5)
    w = fit(lam)
    H = torch.func.hessian(objective)(w, lam)
    cross = jacrev(torch.func.grad(objective), argnums=1)(w, lam)
    torch.testing.assert_close(jacrev(fit)(lam), -torch.linalg.solve(H, cross), rtol=1e-9, atol=1e-11)


def test_last_info_is_a_passing_certificate(ridge):
    _, solve = ridge
    lam = lam0().requires_grad_()
    solve(lam).sum().backward()
    info = solve.last_info
    assert info.ok
    assert float(info.optimality_residual) < 1e-10
    assert int(info.linear_solve.iterations) > 0


# -- failures are reported, never silent -------------------------------------------------

def test_captured_tensor_is_named():
    X = torch.randn(10, 3)
    scale = torch.tensor(2.0, requires_grad=True)

    def objective(w, t):
        return 0.5 * ((X @ w - t) ** 2).sum() + scale * (w**2).sum()

    def solve(t):
        return torch.linalg.solve(X.T @ X + 2 * scale.detach() * torch.eye(3), X.T @ t)

    t = torch.randn(10, requires_grad=True)
    with pytest.warns(CapturedTensorWarning, match="'scale'"):
        bilevel.custom_root(stationarity(objective))(solve)(t)
    with pytest.raises(BilevelError, match="'scale'"):
        bilevel.custom_root(stationarity(objective), strict=True)(solve)(t)


def test_a_warm_start_from_an_earlier_output_does_not_link_the_graphs():
    """Keyword tensors go through the autograd.Function (for vmap); one that still carried the
    previous call's graph made the second backward fail ('backward through the graph a second time')."""
    objective = lambda z, theta: 0.5 * ((z - 2 * theta) ** 2).sum()  # noqa: E731  (z* = 2 theta)

    @bilevel.custom_root(stationarity(objective))
    def solve(theta, init=None):
        return 2 * theta

    theta = torch.ones(3, requires_grad=True)
    z1 = solve(theta, init=torch.zeros(3))
    z1.sum().backward()
    with pytest.warns(CapturedTensorWarning, match="`init`"):
        z2 = solve(theta, init=z1)  # not detached
    theta.grad = None
    z2.sum().backward()
    torch.testing.assert_close(theta.grad, torch.full((3,), 2.0))


def test_batch_dims_with_an_unbatched_argument_is_named_when_differentiated():
    X = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    t = torch.ones(10)
    objective = lambda w, lam, X: 0.5 * ((X @ w - t) ** 2).sum() + 0.5 * lam * (w ** 2).sum()  # noqa: E731

    @bilevel.custom_root(stationarity(objective), batch_dims=1)
    def solve(lam, X):
        X = X if X.dim() == 2 else X[0]
        return torch.stack([torch.linalg.solve(X.T @ X + s * torch.eye(4), X.T @ t) for s in lam])

    lam = torch.tensor([0.1, 1.0, 10.0], requires_grad=True)
    with torch.no_grad():
        solve(lam, X)  # a forward pass alone never vmaps the residual
    match = r"custom_root\(batch_dims=1\): .* batch shape \(3,\); got argument tensor 1 of shape \(10, 4\)"
    with pytest.raises(ValueError, match=match):
        torch.autograd.grad(solve(lam, X).sum(), lam)
    with pytest.raises(ValueError, match=match):
        jacfwd(lambda lam_: solve(lam_, X))(lam.detach())
    (g,) = torch.autograd.grad(solve(lam, X.expand(3, 10, 4)).sum(), lam)  # expanded: fine
    expected = [torch.func.grad(lambda s: torch.linalg.solve(X.T @ X + s * torch.eye(4), X.T @ t).sum())(s)
                for s in lam.detach()]
    torch.testing.assert_close(g, torch.stack(expected))


def test_a_set_bound_that_requires_grad_is_reported():
    """A projection's set holds its bounds as constants; one that requires grad got no gradient
    and no warning (the captured-tensor check did not look into dataclass fields)."""
    upper = torch.tensor(0.5, requires_grad=True)
    condition = bilevel.implicit.projected_gradient(lambda x, c: 0.5 * ((x - c) ** 2).sum(),
                                                    bilevel.implicit.Box(-1.0, upper))

    def solve(objective_args, projection_args=()):
        return condition.projection(objective_args[0].detach())

    with pytest.warns(CapturedTensorWarning, match=r"'Box.upper' of shape \(\)"):
        bilevel.custom_root(condition)(solve)((torch.ones(3),))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CapturedTensorWarning)  # a constant bound is not reported
        constant = bilevel.implicit.projected_gradient(lambda x, c: 0.5 * ((x - c) ** 2).sum(),
                                                       bilevel.implicit.Box(-1.0, upper.detach()))
        bilevel.custom_root(constant)(solve)((torch.ones(3),))


def test_captured_module_is_named():
    net = torch.nn.Linear(3, 3)

    def residual(z, t):
        return z - net(t)

    with pytest.warns(CapturedTensorWarning, match="'net'"):
        bilevel.custom_root(residual)(lambda t: net(t).detach())(torch.randn(3))


def test_module_argument_is_reported_unless_functional_call_replaces_its_parameters():
    """A module among the arguments, called directly, reads its own parameters (no
    implicit gradient reaches them): reported.  Called through functional_call
    with parameters that are arguments, it is only an architecture: silent."""
    net = torch.nn.Linear(3, 3)
    t = torch.randn(3)

    with pytest.warns(CapturedTensorWarning, match=r"argument leaf 1 \(nn.Module\)"):
        bilevel.custom_root(lambda z, t, model: z - model(t))(lambda t, model: model(t).detach())(t, net)

    params = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}

    def through(z, p, t, model):
        return z - torch.func.functional_call(model, p, (t,))

    @bilevel.custom_root(lambda z, p, t, model: through(z, p, t, model), strict=True)
    def solve(p, t, model):
        return torch.func.functional_call(model, p, (t,)).detach()

    z = solve(params, t, net)
    (g,) = torch.autograd.grad(z.sum(), [params["bias"]])
    torch.testing.assert_close(g, torch.ones(3))


def test_inexact_solution_warns_with_residual(ridge):
    problem, _ = ridge

    @bilevel.custom_root(stationarity(problem.inner_objective))
    def sloppy(lam):
        return problem.solution(lam) + 0.1

    lam = lam0().requires_grad_()
    with pytest.warns(OptimalityWarning, match="optimality residual"):
        sloppy(lam).sum().backward()
    strict = bilevel.custom_root(stationarity(problem.inner_objective), strict=True)(
        lambda l: problem.solution(l) + 0.1
    )
    with pytest.raises(BilevelError, match="optimality residual"):
        strict(lam).sum().backward()


def test_linear_solve_budget_exhausted_warns(ridge):
    problem, _ = ridge
    solve = bilevel.custom_root(stationarity(problem.inner_objective), solve=CG(maxiter=1))(problem.solution)
    with pytest.warns(ConvergenceWarning, match="MAX_ITERATIONS"):
        jacrev(solve)(lam0())


def test_singular_system_is_detected_and_damping_is_a_remedy():
    def objective(y, x):  # no curvature in y[1]: singular Hessian
        return 0.5 * (y[0] - x) ** 2 + 0.0 * y[1]

    solve = bilevel.custom_root(stationarity(objective))(lambda x: torch.stack([x, torch.zeros(())]))
    x = torch.tensor(1.0, requires_grad=True)
    with pytest.warns(CurvatureWarning, match="singular or indefinite"):
        torch.autograd.grad(solve(x) @ torch.tensor([1.0, 1.0]), x)
    damped = bilevel.custom_root(stationarity(objective), damping=1e-8)(lambda x: torch.stack([x, torch.zeros(())]))
    (g,) = torch.autograd.grad(damped(x)[0], x)
    torch.testing.assert_close(g, torch.tensor(1.0), rtol=1e-6, atol=0)


def test_indefinite_system_cg_warns_gmres_is_exact():
    def objective(y, x):  # saddle: Hessian diag(1, -2)
        return 0.5 * y[0] ** 2 - y[1] ** 2 - x * (y[0] + y[1])

    solution = lambda x: torch.stack([x, -x / 2])  # noqa: E731
    cg = bilevel.custom_root(stationarity(objective), solve=CG())(solution)
    x = torch.tensor(1.0, requires_grad=True)
    with pytest.warns(CurvatureWarning):
        torch.autograd.grad(cg(x).sum(), x)
    gmres = bilevel.implicit.linear_solve.GMRES()
    exact = bilevel.custom_root(stationarity(objective), solve=gmres)(solution)
    (g,) = torch.autograd.grad(exact(x).sum(), x)
    torch.testing.assert_close(g, torch.tensor(0.5))


def test_nonfinite_solution_raises():
    solve = bilevel.custom_root(lambda z, t: z - t)(lambda t: t * float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        solve(torch.ones(2, requires_grad=True))


def test_residual_with_wrong_shape_raises():
    solve = bilevel.custom_root(lambda z, t: (z - t).sum())(lambda t: t.clone())
    t = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="structure and shapes"):
        solve(t).sum().backward()


def test_bad_arguments_raise():
    with pytest.raises(TypeError, match="residual"):
        bilevel.custom_root(3)
    with pytest.raises(TypeError, match="solve"):
        bilevel.custom_root(lambda z: z, solve="cg")
    with pytest.raises(ValueError, match="damping"):
        bilevel.custom_root(lambda z: z, damping=-1.0)
    with pytest.raises(TypeError, match="the solver's output"):
        bilevel.custom_root(lambda z, t: z)(lambda t: "not a tensor")(torch.ones(2))


@pytest.mark.slow
def test_torch_compile_gives_the_implicit_gradient(ridge):
    problem, solve = ridge
    lam = lam0().requires_grad_()
    compiled = torch.compile(lambda l: solve(l).sum())
    compiled(lam).backward()
    torch.testing.assert_close(lam.grad, problem.jacobian(lam.detach()).sum(0))


def test_module_used_through_functional_call_is_not_flagged():
    net = torch.nn.Linear(2, 2)

    def residual(z, params):
        return z - functional_call(net, params, (torch.ones(2),))

    params = {k: v.detach().requires_grad_() for k, v in net.named_parameters()}
    solve = bilevel.custom_root(residual)(lambda p: functional_call(net, p, (torch.ones(2),)).detach())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solve(params).sum().backward()
    torch.testing.assert_close(params["bias"].grad, torch.ones(2))


@pytest.mark.parametrize("solver", ["NormalCG", "lstsq"])
def test_least_squares_adjoint_is_an_explicit_remedy(solver):
    def objective(y, x):  # H = diag(1, 0): singular, the adjoint system is inconsistent
        return 0.5 * (y[0] - x) ** 2 + 0.0 * y[1]

    linear = bilevel.implicit.NormalCG() if solver == "NormalCG" else bilevel.implicit.Direct("lstsq")
    solve = bilevel.custom_root(stationarity(objective), solve=linear)(lambda x: torch.stack([x, torch.zeros(())]))
    x = torch.tensor(1.0, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (g,) = torch.autograd.grad(solve(x).sum(), x)
    torch.testing.assert_close(g, torch.tensor(1.0))  # minimum-norm adjoint u = (1, 0)


@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e6])
def test_optimality_certificate_is_invariant_to_the_scale_of_the_objective(scale):
    problem = Ridge.make()

    def objective(w, lam):
        return scale * problem.inner_objective(w, lam)

    exact = bilevel.custom_root(stationarity(objective))(problem.solution)
    lam = lam0().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ||F|| is ~1e-9 at scale 1e6, yet the solution is exact
        exact(lam).sum().backward()
    assert exact.last_info.ok
    wrong = bilevel.custom_root(stationarity(objective))(lambda l: problem.solution(l) + 1e-2)
    with pytest.warns(OptimalityWarning, match="distance"):  # ||F|| is ~1e-10 at scale 1e-8
        wrong(lam).sum().backward()
    torch.testing.assert_close(wrong.last_info.distance_to_root, torch.tensor(1e-2 * 2.0), rtol=1.0, atol=0)


# ---------------------------------------------------------------------------
# Forward mode through the adjoint solve (second derivatives by jacfwd / hessian)
# ---------------------------------------------------------------------------
def _cubic_root():
    """y*(x) solves y^3 + y - x = 0 elementwise: y' = 1 / (3y^2 + 1), y'' = -6 y y'^3."""

    def newton(x):
        y = torch.zeros_like(x)
        for _ in range(60):
            y = y - (y**3 + y - x) / (3 * y**2 + 1)
        return y

    return bilevel.custom_root(lambda y, x: y**3 + y - x)(newton), newton


def test_forward_over_reverse_second_derivative_of_a_nonlinear_root():
    root, newton = _cubic_root()
    x = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)

    def loss(x):
        return (root(x) ** 2).sum()

    y = newton(x)
    d1 = 1 / (3 * y**2 + 1)
    d2 = -6 * y * d1**3
    exact = torch.diag(2 * d1**2 + 2 * y * d2)  # d^2/dx^2 of y(x)^2, elementwise
    torch.testing.assert_close(jacfwd(jacrev(loss))(x), exact)
    torch.testing.assert_close(torch.func.hessian(loss)(x), exact)
    torch.testing.assert_close(jacrev(jacrev(loss))(x), exact)


def test_jvp_of_a_differentiable_hypergradient():
    A = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    x = torch.tensor([1.0, -1.0], dtype=torch.float64)

    def hg(x):
        return bilevel.hypergrad(lambda x, y: 0.5 * (y**2).sum(), lambda x, y: 0.5 * y @ A @ y - x @ y,
                                 x, torch.linalg.solve(A, x), create_graph=True)

    v = torch.tensor([1.0, 2.0], dtype=torch.float64)
    A2 = torch.linalg.inv(A @ A)
    value, tangent = torch.func.jvp(hg, (x,), (v,))
    torch.testing.assert_close(value, A2 @ x)
    torch.testing.assert_close(tangent, A2 @ v)


def test_jacfwd_through_non_symmetric_fixed_points():
    sqrt = bilevel.custom_fixed_point(lambda y, a: 0.5 * (y + a / y))(torch.sqrt)  # Heron's map
    a = torch.tensor([4.0, 9.0], dtype=torch.float64)
    torch.testing.assert_close(jacfwd(sqrt)(a), torch.diag(0.5 / a.sqrt()))
    torch.testing.assert_close(jacfwd(grad(lambda a: sqrt(a).sum()))(a), torch.diag(-0.25 * a**-1.5))
    M = torch.tensor([[3.0, 1.0], [0.5, 2.0]], dtype=torch.float64)
    solve = bilevel.custom_fixed_point(lambda y, b: y - 0.1 * (M @ y - b), solve=bilevel.implicit.NormalCG())(
        lambda b: torch.linalg.solve(M, b)
    )
    b = torch.ones(2, dtype=torch.float64)
    torch.testing.assert_close(jacrev(solve)(b), torch.linalg.inv(M))
    torch.testing.assert_close(jacfwd(solve)(b), torch.linalg.inv(M))


def test_a_differentiated_keyword_tensor_is_reported(ridge):
    problem, _ = ridge

    @bilevel.custom_root(stationarity(problem.inner_objective))
    def by_keyword(init, **kw):
        return problem.solution(kw["lam"])

    lam = lam0()
    with pytest.warns(CapturedTensorWarning, match="`lam`"):
        torch.func.grad(lambda l: by_keyword(None, lam=l).sum())(lam)
    with pytest.warns(CapturedTensorWarning, match="`lam`"):
        by_keyword(None, lam=lam.clone().requires_grad_())
    strict = bilevel.custom_root(stationarity(problem.inner_objective), strict=True)(by_keyword.__wrapped__)
    with pytest.raises(BilevelError, match="keyword"):
        strict(None, lam=lam.clone().requires_grad_())
    with warnings.catch_warnings():  # a detached warm start is fine
        warnings.simplefilter("error")
        by_keyword(torch.zeros_like(lam), lam=lam)


def test_a_nan_product_in_the_adjoint_solve_raises():
    root = bilevel.custom_root(lambda y, a: torch.sqrt(y) - a)(lambda a: a**2)  # d/dy sqrt(y) = inf at y = 0
    a = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        torch.autograd.grad(root(a).sum(), a)


@pytest.mark.parametrize("kind", ["root", "fixed_point"])
def test_torch_autograd_forward_ad_through_a_root(kind):
    """Dual tensors of torch.autograd.forward_ad (what gradcheck(check_forward_ad=True)
    uses) go through the forward-mode rule, whose products then cannot open a
    torch.func.jvp level of their own: they are taken by two reverse passes."""
    import torch.autograd.forward_ad as fwAD

    if kind == "root":  # w* solves w - 1 + lam w + 0.4 w^3 = 0 (elementwise), by Newton
        g = lambda w, lam: 0.5 * ((w - 1) ** 2).sum() + 0.5 * (lam * w**2).sum() + 0.1 * (w**4).sum()  # noqa: E731

        @bilevel.custom_root(stationarity(g), solve=bilevel.implicit.GMRES(tol=1e-12))
        def solution(lam):
            w = torch.zeros_like(lam)
            for _ in range(60):
                w = w - (w - 1 + lam * w + 0.4 * w**3) / (1 + lam + 1.2 * w**2)
            return w

        exact = lambda lam, w: -w / (1 + lam + 1.2 * w**2)  # noqa: E731  (implicit derivative, diagonal)
    else:  # x* = 0.5 cos(x*) + a, by iteration
        @bilevel.custom_fixed_point(lambda x, a: 0.5 * torch.cos(x) + a)
        def solution(a):
            x = torch.zeros_like(a)
            for _ in range(200):
                x = 0.5 * torch.cos(x) + a
            return x

        exact = lambda a, x: 1 / (1 + 0.5 * torch.sin(x))  # noqa: E731
    theta = torch.tensor([0.5, 1.0, 2.0])
    tangent = torch.tensor([1.0, -2.0, 0.5])
    with fwAD.dual_level():
        out = solution(fwAD.make_dual(theta, tangent))
        primal, jvp = fwAD.unpack_dual(out)
    torch.testing.assert_close(jvp, exact(theta, primal) * tangent, rtol=1e-9, atol=1e-12)
    assert torch.autograd.gradcheck(solution, (theta.clone().requires_grad_(),), check_forward_ad=True)


def test_a_solver_that_needs_autograd_is_told_how():
    """The solver runs under torch.no_grad; a torch.optim loop inside it fails with
    torch's bare message unless it opens enable_grad itself: the error says so, and
    the documented fix works."""
    f = lambda w, lam: 0.5 * ((w - 1) ** 2).sum() + 0.5 * lam * (w**2).sum()  # noqa: E731  w* = 1 / (1 + lam)

    def make(enable):
        @bilevel.custom_root(stationarity(f))
        def argmin(lam):
            with torch.enable_grad() if enable else contextlib.nullcontext():
                w = torch.zeros(3, requires_grad=True)
                opt = torch.optim.SGD([w], lr=0.3)
                for _ in range(200):
                    opt.zero_grad()
                    f(w, lam.detach()).backward()
                    opt.step()
            return w.detach()

        return argmin

    lam = torch.tensor(1.0, requires_grad=True)
    with pytest.raises(RuntimeError, match="enable_grad"):
        make(False)(lam)
    (g,) = torch.autograd.grad(make(True)(lam).sum(), lam)
    torch.testing.assert_close(g, torch.tensor(-3 / 4))


def test_custom_fixed_point_batch_dims_equals_a_loop():
    """``batch_dims=1`` on custom_fixed_point, as on custom_root: B independent
    non-symmetric fixed points x = tanh(W_b x + a_b) differentiated in one call give
    the per-problem gradients of a loop, which match finite differences."""
    gen = torch.Generator().manual_seed(3)
    B, n = 4, 5
    W = 0.4 * torch.randn(B, n, n, generator=gen, dtype=torch.float64) / n**0.5
    a = torch.randn(B, n, generator=gen, dtype=torch.float64)
    T = lambda x, W_, a_: torch.tanh(W_ @ x + a_)  # noqa: E731  one problem; contraction

    def iterate(W_, a_):
        x = torch.zeros_like(a_)
        for _ in range(200):
            x = torch.tanh((W_ @ x.unsqueeze(-1)).squeeze(-1) + a_)
        return x

    batched = bilevel.custom_fixed_point(T, batch_dims=1)(iterate)
    single = bilevel.custom_fixed_point(T)(iterate)
    Wr, ar = W.clone().requires_grad_(), a.clone().requires_grad_()
    weights = torch.linspace(0.5, 2.0, n, dtype=torch.float64)
    gW, ga = torch.autograd.grad((batched(Wr, ar) * weights).sum(), (Wr, ar))
    for b in range(B):
        Wb, ab = W[b].clone().requires_grad_(), a[b].clone().requires_grad_()
        gWb, gab = torch.autograd.grad((single(Wb, ab) * weights).sum(), (Wb, ab))
        torch.testing.assert_close(gW[b], gWb, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(ga[b], gab, rtol=1e-8, atol=1e-10)
    assert torch.autograd.gradcheck(lambda a_: batched(W, a_), (a.clone().requires_grad_(),))


def test_root_backward_and_hypergrad_lift_saved_tensor_hooks_and_restore_them():
    """Under saved-tensor hooks (save_on_cpu, a user's own pack/unpack pair), torch.func
    refuses to run; the library lifts the hooks while it differentiates and puts them
    back: the caller's own saved tensors still go through them, the gradients are exact."""
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0]])

    def objective(w, lam):
        return 0.5 * w @ A @ w + 0.5 * lam * (w @ w) - w.sum()

    @bilevel.custom_root(stationarity(objective))
    def argmin(lam):
        return torch.linalg.solve(A + lam * torch.eye(2), torch.ones(2))

    packed = []

    def pack(t):
        packed.append(t.shape)
        return t

    lam = torch.tensor(0.5, requires_grad=True)
    top = torch._C._autograd._top_saved_tensors_default_hooks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hooks = top(True)
        loss = (argmin(lam) ** 2).sum() * lam.exp()  # the caller's graph saves tensors
        loss.backward()
        assert top(True) == hooks  # restored after the backward pass
        g = bilevel.hypergrad(lambda x, y: (y ** 2).sum(), lambda x, y: objective(y, x), lam.detach(),
                              argmin(lam.detach()))
        assert top(True) == hooks
    assert top(True) is None and packed  # the caller's tensors went through its hooks
    M = A + lam.detach() * torch.eye(2)
    w = torch.linalg.solve(M, torch.ones(2))
    dw = -torch.linalg.solve(M, w)
    expected = (2 * w @ dw) * lam.detach().exp() + (w ** 2).sum() * lam.detach().exp()
    torch.testing.assert_close(lam.grad, expected)
    torch.testing.assert_close(g, 2 * w @ dw)


def test_a_full_backward_hook_in_a_root_objective_is_named():
    """torch.func refuses nn.Module full backward hooks with a message naming neither; where
    the library differentiates through torch.func (a backward that records a graph), its
    error names the hook and what to do.  A plain backward runs on autograd alone and gives
    the gradient, the hook called."""
    layer = torch.nn.Linear(2, 2, bias=False, dtype=torch.float64).requires_grad_(False)  # a fixed map
    calls = []
    layer.register_full_backward_hook(lambda *a: calls.append(1))

    @bilevel.custom_root(stationarity(lambda w, lam: 0.5 * (layer(w) ** 2).sum() + 0.5 * lam * (w @ w) - w.sum()))
    def argmin(lam):
        M = layer.weight.detach().T @ layer.weight.detach() + lam.detach() * torch.eye(2, dtype=torch.float64)
        return torch.linalg.solve(M, torch.ones(2, dtype=torch.float64))

    lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="full backward hooks"):
        torch.autograd.grad(argmin(lam).sum(), lam, create_graph=True)
    (g,) = torch.autograd.grad(argmin(lam).sum(), lam)
    W = layer.weight.detach()
    M = W.T @ W + 0.5 * torch.eye(2, dtype=torch.float64)
    w = torch.linalg.solve(M, torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(g, -torch.linalg.solve(M, w).sum(), rtol=1e-10, atol=1e-12)  # dw/dlam = -M^-1 w
    assert calls


def test_gradients_batched_by_autograd_are_refused_by_name():
    """torch.autograd.functional.jacobian(vectorize=True) hands the backward legacy-batched
    cotangents: refused with the supported alternatives named, not an opaque crash."""
    @bilevel.custom_root(stationarity(lambda w, lam: 0.5 * (w @ w) * (1 + lam) - w.sum()))
    def argmin(lam):
        return torch.ones(3) / (1 + lam)

    lam = torch.tensor(0.5)
    with pytest.raises(NotImplementedError, match="vectorize=False"):
        torch.autograd.functional.jacobian(argmin, lam, vectorize=True)
    torch.testing.assert_close(torch.autograd.functional.jacobian(argmin, lam), -torch.ones(3) / 1.5 ** 2)


def test_a_solver_option_passed_positionally_is_explained():
    """Every positional argument of the decorated solver goes to the condition too: an
    iteration count given positionally makes the condition's call fail in the backward
    pass; the error says why and what to do (keywords are not passed on)."""
    T = lambda w, lam: 0.5 * w + lam  # noqa: E731  fixed point w* = 2 lam

    @bilevel.custom_fixed_point(T)
    def fixed_point(lam, iterations):
        w = torch.zeros_like(lam)
        for _ in range(iterations):
            w = T(w, lam)
        return w

    lam = torch.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(TypeError) as caught:
        fixed_point(lam, 60).sum().backward()
    if hasattr(caught.value, "add_note"):  # Python >= 3.11
        assert any("keyword arguments" in note for note in getattr(caught.value, "__notes__", []))

    @bilevel.custom_fixed_point(T)
    def by_keyword(lam, *, iterations=60):
        w = torch.zeros_like(lam)
        for _ in range(iterations):
            w = T(w, lam)
        return w

    lam = torch.tensor([1.0, 2.0], requires_grad=True)
    by_keyword(lam, iterations=60).sum().backward()
    torch.testing.assert_close(lam.grad, torch.full((2,), 2.0))


def _grads_both_routes(fn, *inputs):
    """Gradients of ``fn(*inputs).sum()`` by a plain backward (the final route: one
    linearization) and by one that records a graph (the differentiable route)."""
    plain = torch.autograd.grad(fn(*inputs), inputs)
    recorded = torch.autograd.grad(fn(*inputs), inputs, create_graph=True)
    return plain, [g.detach() for g in recorded]


def test_plain_and_recording_backward_routes_agree():
    """A plain backward reuses the adjoint solve's linearization for the cross products (and
    computes them only for the arguments that need them); a backward that records a graph
    goes through torch.func.  Both give the same gradients: a pytree solution with several
    arguments (one of them data that needs no gradient, one an integer tensor), a batch of
    roots (batch_dims=1), and a non-symmetric fixed point."""
    gen = torch.Generator().manual_seed(3)
    D = torch.float64
    X = torch.randn(30, 4, generator=gen, dtype=D)
    t = torch.randn(30, generator=gen, dtype=D)

    def objective(sol, lam, scale, data, k):  # k: an integer tensor, held fixed
        w, b = sol["w"], sol["b"]
        r = data @ w + b - t
        return 0.5 * (r @ r) / k + 0.5 * lam.exp() @ (w * w) + 0.5 * scale * b ** 2

    def dense_argmin(lam, scale, data, k):
        A = torch.cat([data, torch.ones(30, 1, dtype=D)], 1)
        H = A.T @ A / k + torch.diag(torch.cat([lam.exp(), scale.reshape(1)]))
        z = torch.linalg.solve(H, A.T @ t / k)
        return {"w": z[:4], "b": z[4]}

    root = bilevel.custom_root(stationarity(objective), solve=CG(tol=1e-13, maxiter=50))(
        lambda *a: {k_: v.detach() for k_, v in dense_argmin(*a).items()})
    lam = torch.randn(4, generator=gen, dtype=D).requires_grad_()
    scale = torch.tensor(2.0, dtype=D, requires_grad=True)
    k = torch.tensor(3)
    plain, recorded = _grads_both_routes(
        lambda lam_, scale_: (root(lam_, scale_, X, k)["w"] ** 2).sum() + root(lam_, scale_, X, k)["b"],
        lam, scale)
    exact = torch.autograd.grad((dense_argmin(lam, scale, X, k)["w"] ** 2).sum() + dense_argmin(lam, scale, X, k)["b"],
                                (lam, scale))
    for p, r, e in zip(plain, recorded, exact):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(p, e, rtol=1e-9, atol=1e-11)

    # a batch of 5 roots of a_i y^3 + y - c_i = 0
    cubic = bilevel.custom_root(lambda y, a, c: a * y ** 3 + y - c, batch_dims=1)(
        lambda a, c: torch.stack([_newton_cubic(ai, ci) for ai, ci in zip(a, c)]))
    a = torch.rand(5, 1, generator=gen, dtype=D).add(0.5).requires_grad_()
    c = torch.randn(5, 1, generator=gen, dtype=D).requires_grad_()
    plain, recorded = _grads_both_routes(lambda a_, c_: (cubic(a_, c_) * torch.arange(1.0, 6.0, dtype=D)[:, None]).sum(), a, c)
    y = cubic(a, c).detach()
    dy_dc = 1 / (3 * a.detach() * y ** 2 + 1)
    weights = torch.arange(1.0, 6.0, dtype=D)[:, None]
    torch.testing.assert_close(plain[1], weights * dy_dc, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(plain[0], -weights * dy_dc * y ** 3, rtol=1e-10, atol=1e-12)
    for p, r in zip(plain, recorded):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-14)

    # a non-symmetric fixed point y = tanh(W y + u)
    W = 0.3 * torch.randn(3, 3, generator=gen, dtype=D)
    fixed = bilevel.custom_fixed_point(lambda y, W_, u: torch.tanh(W_ @ y + u))(_iterate_tanh)
    W_ = W.clone().requires_grad_()
    u = torch.randn(3, generator=gen, dtype=D).requires_grad_()
    plain, recorded = _grads_both_routes(lambda W__, u_: fixed(W__, u_)[0] - fixed(W__, u_)[2], W_, u)
    for p, r in zip(plain, recorded):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-14)
    y = fixed(W, u.detach())
    J = torch.diag(1 - torch.tanh(W @ y + u.detach()) ** 2)       # dT/d(Wy+u)
    e = torch.tensor([1.0, 0.0, -1.0], dtype=D)
    torch.testing.assert_close(plain[1], torch.linalg.solve((torch.eye(3, dtype=D) - J @ W).T, e) @ J,
                               rtol=1e-9, atol=1e-11)


def _newton_cubic(a, c):
    y = c.clone()
    for _ in range(60):
        y = y - (a * y ** 3 + y - c) / (3 * a * y ** 2 + 1)
    return y.detach()


def _iterate_tanh(W, u):
    y = torch.zeros_like(u)
    for _ in range(200):
        y = torch.tanh(W @ y + u)
    return y.detach()


def test_forward_over_reverse_through_a_fixed_point_keeps_every_tangent():
    """A Hessian-vector product by forward-over-reverse with torch.autograd.forward_ad: the
    backward runs without create_graph but on dual tensors, whose tangents must reach the
    gradient through the residual's dependence on the argument and the solution (the
    route that reuses one detached linearization dropped them: Hv 0.75 for 0.375)."""
    import torch.autograd.forward_ad as fwAD

    heron = lambda y, a: 0.5 * (y + a / y)  # noqa: E731
    sqrt = bilevel.custom_fixed_point(heron)(lambda a: torch.sqrt(a).detach())
    a = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    with fwAD.dual_level():
        dual = fwAD.make_dual(a, torch.tensor(1.0, dtype=torch.float64))
        (g,) = torch.autograd.grad(sqrt(dual) ** 3, a)    # d/da a^1.5 = 1.5 a^0.5, tangent 0.75 a^-0.5
        value, tangent = fwAD.unpack_dual(g)
    torch.testing.assert_close(value, torch.tensor(3.0, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tangent, torch.tensor(0.375, dtype=torch.float64), rtol=1e-10, atol=1e-12)
