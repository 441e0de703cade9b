"""Mixture-of-experts hard constraints: HardConstraintMoE, HardConstraint, SoftConstraint."""

import math
import warnings

import pytest
import torch

from bilevel.layers import (
    BoxPartition,
    HardConstraint,
    HardConstraintMoE,
    SoftConstraint,
    evaluate_basis,
)
from bilevel.problems import burgers_1d, heat_1d
from bilevel.solvers import GaussNewton, LevenbergMarquardt
from bilevel.status import BilevelError, ConvergenceWarning

FIELDS = {"u": (), "u_x": (0,), "u_t": (1,), "u_xx": (0, 0)}


def features(n, seed=0, dtype=torch.float64):
    """n smooth random features of (x, t): tanh(z W + b), as a function (P, 2) -> (P, n)."""
    g = torch.Generator().manual_seed(seed)
    W = (2 * torch.randn(2, n, generator=g)).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    return lambda z: torch.tanh(z @ W + b)


def exact_plus_features(problem, n, seed=0):
    """A basis whose first function is the exact solution, then n - 1 random features."""
    feat = features(n - 1, seed)
    return lambda z: torch.cat([problem.solution(z[:, :1], z[:, 1:]), feat(z)], 1)


def linear_residual(u, y):
    """Pointwise u - y: the expert problems are linear least squares."""
    return u - y


# ----------------------------------------------------------------------------- helpers


def test_box_partition_assigns_cells_row_major():
    part = BoxPartition(lower=(0.0, 0.0), upper=(1.0, 2.0), splits=(2, 3))
    pts = torch.tensor([[0.2, 0.1], [0.2, 1.0], [0.2, 1.9], [0.7, 0.1], [0.7, 1.0], [1.0, 2.0], [0.5, 0.0]])
    assert part(pts).tolist() == [0, 1, 2, 3, 4, 5, 3]
    assert part.num_experts == 6
    grid = torch.cartesian_prod(torch.linspace(0, 1, 10), torch.linspace(0, 2, 9))
    assert torch.bincount(part(grid), minlength=6).min() > 0


def test_box_partition_bad_input():
    with pytest.raises(ValueError, match="splits\\[1\\]"):
        BoxPartition((0.0, 0.0), (1.0, 1.0), (2, 0))
    with pytest.raises(ValueError, match="upper\\[0\\]"):
        BoxPartition((1.0,), (0.0,), (2,))
    with pytest.raises(ValueError, match="same positive length"):
        BoxPartition((0.0, 0.0), (1.0,), (2,))
    part = BoxPartition((0.0, 0.0), (1.0, 1.0), (2, 2))
    with pytest.raises(ValueError, match="`points` must lie in the box.*row 1"):
        part(torch.tensor([[0.5, 0.5], [1.5, 0.5]]))
    with pytest.raises(ValueError, match="shape \\(P, 2\\)"):
        part(torch.zeros(3, 3))


def test_evaluate_basis_matches_closed_form_derivatives():
    z = torch.rand(7, 2)
    fn = lambda p: torch.stack([torch.sin(p[:, 0]) * p[:, 1] ** 2, torch.exp(p[:, 0] * p[:, 1])], -1)
    b = evaluate_basis(fn, z, {"u": (), "u_x": (0,), "u_t": (1,), "u_xx": (0, 0), "u_xt": (0, 1)})
    x, t = z[:, 0], z[:, 1]
    e = torch.exp(x * t)
    expected = {
        "u": torch.stack([torch.sin(x) * t**2, e], -1),
        "u_x": torch.stack([torch.cos(x) * t**2, t * e], -1),
        "u_t": torch.stack([2 * torch.sin(x) * t, x * e], -1),
        "u_xx": torch.stack([-torch.sin(x) * t**2, t**2 * e], -1),
        "u_xt": torch.stack([2 * torch.cos(x) * t, e + x * t * e], -1),
    }
    for name, value in expected.items():
        torch.testing.assert_close(b[name], value, msg=name)


@pytest.mark.parametrize("problem", [heat_1d(nu=0.2), burgers_1d(nu=0.1, a=1.5)], ids=["heat", "burgers"])
def test_pde_problems_exact_solution_has_zero_residual(problem):
    pts, kind = problem.collocation(9, 7)
    assert set(kind.tolist()) == {0, 1, 2}
    fields = problem.exact_fields(pts)
    r = problem.residual(fields, pts, kind)
    assert r.abs().max() < 1e-13
    # wrong fields are caught, in the interior and on the initial line
    wrong = {k: v + 0.01 for k, v in fields.items()}
    r_wrong = problem.residual(wrong, pts, kind)
    assert r_wrong[kind == 0].abs().max() > 1e-4 and r_wrong[kind == 1].abs().max() > 1e-4


# ----------------------------------------------------------------------------- correctness


def test_closed_form_linear_experts_with_regularization():
    # residual u - y is linear in omega: expert k solves (A_k^T A_k + gamma I) w = A_k^T y_k.
    P, N, gamma = 10, 4, 1e-3
    A = torch.randn(P, N, requires_grad=True)
    y = torch.randn(P, requires_grad=True)
    experts = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])  # expert sizes 3, 3, 4: fewer rows than N
    layer = HardConstraintMoE(linear_residual, experts, solver=GaussNewton(tol=1e-12), regularization=gamma)
    omega = layer(A, y)
    w = torch.randn(3, N)
    grads = torch.autograd.grad((omega * w).sum(), (A, y))
    expected = torch.stack([
        torch.linalg.solve(A[experts == k].T @ A[experts == k] + gamma * torch.eye(N), A[experts == k].T @ y[experts == k])
        for k in range(3)
    ])
    grads_expected = torch.autograd.grad((expected * w).sum(), (A, y))
    torch.testing.assert_close(omega, expected, atol=1e-9, rtol=1e-9)
    for g, ge in zip(grads, grads_expected):
        torch.testing.assert_close(g, ge, atol=1e-8, rtol=1e-8)
    assert layer.last_info.converged.shape == (3,) and layer.last_info.converged.all()


@pytest.mark.parametrize(
    "problem, solver",
    [(heat_1d(nu=0.2), GaussNewton()), (heat_1d(nu=0.2), LevenbergMarquardt()), (burgers_1d(nu=0.1), LevenbergMarquardt())],
    ids=["heat-gn", "heat-lm", "burgers-lm"],
)
@pytest.mark.parametrize("splits", [(1, 1), (2, 1), (3, 1)])  # split in space: every expert sees u(x, 0)
def test_hard_constraint_recovers_exact_solution_in_basis(problem, solver, splits):
    # The basis holds the exact solution, so each expert's residual can reach zero:
    # at the solution it is at the solver's tolerance and the field is the exact one.
    pts, kind = problem.collocation(12, 10)
    fn = exact_plus_features(problem, 6)
    basis = evaluate_basis(fn, pts, FIELDS)
    part = BoxPartition(problem.lower, problem.upper, splits)
    layer = HardConstraintMoE(problem.residual, part(pts), solver=solver)
    omega = layer(basis, pts, kind).detach()
    info = layer.last_info
    assert omega.shape == (part.num_experts, 6) and info.converged.all()
    r = layer.pde_residual(omega, basis, pts, kind)
    # At a zero-residual solution r = J delta, so ||r_k|| <= ||J_k^T r_k|| / sigma_min(J_k), and the solver
    # stopped at ||J_k^T r_k|| <= tolerance_k: the residual is at the solver's tolerance.
    experts = part(pts)
    for k in range(part.num_experts):
        idx = experts == k
        sub = {n: b[idx] for n, b in basis.items()}

        def rows(w, sub=sub, idx=idx):
            return problem.residual({n: b @ w for n, b in sub.items()}, pts[idx], kind[idx])

        J = torch.func.jacrev(rows)(omega[k])
        bound = float(info.tolerance[k]) / float(torch.linalg.svdvals(J)[-1])
        assert float(r[idx].norm()) <= bound * (1 + 1e-6) + 1e-13, k
    assert r.abs().max() < 1e-5
    test = problem.grid(17, 13)
    u = layer.fields(omega, {"u": fn(test)}, part(test))["u"]
    torch.testing.assert_close(u, problem.exact(test), atol=1e-5, rtol=0)


def _small_moe(problem, K, solver):
    pts, kind = problem.collocation(9, 6)
    part = BoxPartition(problem.lower, problem.upper, (K, 1))
    basis = evaluate_basis(features(4, seed=1), pts, FIELDS)
    return HardConstraintMoE(problem.residual, part(pts), solver=solver), basis, pts, kind


@pytest.mark.parametrize("name", ["heat", "burgers"])
def test_gradcheck_wrt_basis_several_experts(name):
    # Non-zero residual at the optimum (4 random features cannot solve the PDE), so the
    # second-order term sum r_i hess r_i of the Burgers Hessian matters.
    problem = heat_1d(nu=0.2) if name == "heat" else burgers_1d(nu=0.1)
    layer, basis, pts, kind = _small_moe(problem, 3, GaussNewton(tol=1e-13))
    names = list(basis)
    leaves = tuple(basis[k].detach().clone().requires_grad_() for k in names)

    def f(*leaves):
        return layer(dict(zip(names, leaves)), pts, kind)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_gradcheck_wrt_network_parameters():
    # theta -> basis values and derivatives (nested jacfwd) -> K = 2 expert solves -> u at data points.
    problem = heat_1d(nu=0.2)
    pts, kind = problem.collocation(8, 6)
    part = BoxPartition(problem.lower, problem.upper, (2, 1))
    layer = HardConstraintMoE(problem.residual, part(pts), solver=GaussNewton(tol=1e-13))
    data = torch.tensor([[0.2, 0.3], [0.7, 0.9], [0.4, 0.5]])
    g = torch.Generator().manual_seed(3)
    W1, b1, W2 = torch.randn(2, 6, generator=g), torch.randn(6, generator=g), torch.randn(6, 5, generator=g)

    def u_at_data(W1, b1):
        net = lambda z: torch.tanh(z @ W1 + b1) @ W2
        omega = layer(evaluate_basis(net, pts, FIELDS), pts, kind)
        return layer.fields(omega, net(data), part(data))

    assert torch.autograd.gradcheck(u_at_data, (W1.requires_grad_(), b1.requires_grad_()), eps=1e-6, atol=1e-6,
                                    rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("name", ["heat", "burgers"])
def test_batched_experts_equal_loop_forward_and_backward(name):
    problem = heat_1d(nu=0.2) if name == "heat" else burgers_1d(nu=0.1)
    pts, kind = problem.collocation(12, 8)
    part = BoxPartition(problem.lower, problem.upper, (2, 2))
    experts = part(pts)
    basis = {k: v.detach().requires_grad_() for k, v in evaluate_basis(features(5, seed=2), pts, FIELDS).items()}
    solver = LevenbergMarquardt(tol=1e-12, maxiter=200)
    moe = HardConstraintMoE(problem.residual, experts, solver=solver)
    omega = moe(basis, pts, kind)
    w = torch.randn(omega.shape)
    grads = torch.autograd.grad((omega * w).sum(), list(basis.values()))
    single = HardConstraint(problem.residual, solver=solver)
    looped = [torch.zeros_like(b) for b in basis.values()]
    for k in range(part.num_experts):
        idx = (experts == k).nonzero().reshape(-1)
        sub = {n: b.detach()[idx].requires_grad_() for n, b in basis.items()}
        omega_k = single(sub, pts[idx], kind[idx])
        assert omega_k.shape == (1, 5)
        torch.testing.assert_close(omega_k[0], omega[k].detach(), atol=1e-9, rtol=1e-9)
        for acc, g in zip(looped, torch.autograd.grad((omega_k[0] * w[k]).sum(), list(sub.values()))):
            acc[idx] += g
    for g, gl in zip(grads, looped):
        torch.testing.assert_close(g, gl, atol=1e-8, rtol=1e-7)
    # the backward was one linear-solve call over the K experts, with per-expert certificates
    info = moe.implicit_info
    assert info.linear_solve.iterations.shape == (4,) and info.optimal.shape == (4,) and info.optimal.all()


def test_module_residual_parameter_gets_implicit_gradient():
    # A learnable diffusion coefficient nu inside the residual: d/dnu of the layer's output
    # matches central finite differences.
    class Heat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.log_nu = torch.nn.Parameter(torch.tensor(math.log(0.2)))
            self.problem = heat_1d(nu=0.2)

        def forward(self, f, pts, kind):
            pde = f["u_t"] - self.log_nu.exp() * f["u_xx"]
            return torch.where(kind == 0, pde, f["u"] - self.problem.exact(pts))

    problem, residual = heat_1d(nu=0.2), Heat()
    pts, kind = problem.collocation(9, 6)
    part = BoxPartition(problem.lower, problem.upper, (2, 1))
    layer = HardConstraintMoE(residual, part(pts), solver=GaussNewton(tol=1e-13))
    assert [n for n, _ in layer.named_parameters()] == ["residual.log_nu"]
    basis = evaluate_basis(features(4, seed=1), pts, FIELDS)
    w = torch.randn(2, 4)
    (g,) = torch.autograd.grad((layer(basis, pts, kind) * w).sum(), residual.log_nu)
    h = 1e-6
    values = []
    for s in (h, -h):
        with torch.no_grad():
            residual.log_nu += s
            values.append(float((layer(basis, pts, kind) * w).sum()))
            residual.log_nu -= s
    assert float(g) == pytest.approx((values[0] - values[1]) / (2 * h), rel=1e-5, abs=1e-8)


def test_single_hard_constraint_is_moe_with_one_expert():
    problem = heat_1d(nu=0.2)
    pts, kind = problem.collocation(8, 6)
    basis = {k: v.requires_grad_() for k, v in evaluate_basis(features(5), pts, FIELDS).items()}
    a = HardConstraint(problem.residual)(basis, pts, kind)
    b = HardConstraintMoE(problem.residual, torch.zeros(len(pts), dtype=torch.int64))(basis, pts, kind)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    ga = torch.autograd.grad(a.sum(), basis["u_xx"])[0]
    gb = torch.autograd.grad(b.sum(), basis["u_xx"])[0]
    torch.testing.assert_close(ga, gb, atol=0, rtol=0)


def test_soft_constraint_penalty_and_gradient():
    problem = heat_1d(nu=0.2)
    pts, kind = problem.collocation(8, 6)
    basis = evaluate_basis(features(5), pts, FIELDS)
    soft = SoftConstraint(problem.residual, 5, weight=3.0, dtype=torch.float64)
    with torch.no_grad():
        soft.omega.copy_(torch.randn(1, 5))
    omega = soft(basis, pts, kind)
    assert omega is soft.omega
    penalty = soft.penalty(omega, basis, pts, kind)
    fields = {k: v @ omega[0] for k, v in basis.items()}
    r = problem.residual(fields, pts, kind)
    torch.testing.assert_close(penalty, 3.0 * (r**2).mean())
    (g,) = torch.autograd.grad(penalty, soft.omega)
    A = torch.func.jacrev(lambda w: problem.residual({k: v @ w for k, v in basis.items()}, pts, kind))(omega[0].detach())
    torch.testing.assert_close(g[0], 3.0 * 2 * A.T @ r.detach() / len(r))


def test_dtype_follows_inputs_float32():
    problem = heat_1d(nu=0.2)
    pts, kind = problem.collocation(8, 6, dtype=torch.float32)
    basis = {k: v.float() for k, v in evaluate_basis(features(4, dtype=torch.float32), pts, FIELDS).items()}
    part = BoxPartition(problem.lower, problem.upper, (2, 1))
    layer = HardConstraintMoE(problem.residual, part(pts))
    omega = layer(basis, pts, kind)
    assert omega.dtype == torch.float32 and layer.last_info.converged.all()


# ----------------------------------------------------------------------------- failures


def test_non_converged_expert_is_reported_with_its_index_and_residual():
    problem = burgers_1d(nu=0.1)
    layer, basis, pts, kind = _small_moe(problem, 3, LevenbergMarquardt(maxiter=1))
    with pytest.warns(ConvergenceWarning, match=r"experts \[0, 1, 2\].*expert 0: MAX_ITERATIONS after 1 iterations, "
                                                r"\|\|J\^T r\|\| = \S+ > tolerance"):
        layer(basis, pts, kind)
    assert not layer.last_info.converged.any()
    strict, *_ = _small_moe(problem, 3, LevenbergMarquardt(maxiter=1))
    strict.strict = True
    with pytest.raises(BilevelError, match="did not converge for experts"):
        strict(basis, pts, kind)


def test_only_the_failing_expert_is_reported():
    # expert 1's data hold a point far off the others: within 3 iterations only it fails.
    x = torch.linspace(0, 1, 12)
    basis = torch.stack([torch.ones_like(x), x], 1)
    experts = (x > 0.5).long()

    def exp_fit(u, y):  # nonlinear in omega: exp(u) - y
        return torch.exp(u) - y

    y = torch.where(experts == 0, torch.exp(0.1 * x), torch.exp(8 + 3 * x))
    layer = HardConstraintMoE(exp_fit, experts, solver=LevenbergMarquardt(maxiter=3))
    with pytest.warns(ConvergenceWarning, match=r"experts \[1\]: expert 1"):
        layer(basis, y)
    assert layer.last_info.converged.tolist() == [True, False]


def test_non_finite_residual_raises():
    problem = heat_1d(nu=0.2)
    pts, kind = problem.collocation(8, 6)
    basis = evaluate_basis(features(4), pts, FIELDS)
    basis["u_xx"] = basis["u_xx"].clone()
    basis["u_xx"][8, 0] = float("nan")  # an interior point
    layer = HardConstraintMoE(problem.residual, BoxPartition(problem.lower, problem.upper, (2, 1))(pts))
    with pytest.raises(FloatingPointError, match="not finite"):
        layer(basis, pts, kind)


def test_wrong_shapes_name_the_argument():
    problem = heat_1d(nu=0.2)
    pts, kind = problem.collocation(8, 6)
    basis = evaluate_basis(features(4), pts, FIELDS)
    experts = BoxPartition(problem.lower, problem.upper, (2, 1))(pts)
    layer = HardConstraintMoE(problem.residual, experts)
    with pytest.raises(ValueError, match="`basis` must have one row per collocation point \\(48 points"):
        layer({k: v[:-1] for k, v in basis.items()}, pts[:-1], kind[:-1])
    with pytest.raises(ValueError, match="every leaf of `basis`"):
        layer({**basis, "u_x": basis["u_x"][:, :3]}, pts, kind)
    with pytest.raises(ValueError, match="`data\\[1\\]` must be a tensor with one row per collocation point"):
        layer(basis, pts, kind[:-2])
    with pytest.raises(TypeError, match="`data\\[0\\]` has dtype torch.float32"):
        layer(basis, pts.float(), kind)
    with pytest.raises(ValueError, match="`init` must have shape \\(K, N\\) = \\(2, 4\\)"):
        layer(basis, pts, kind, init=torch.zeros(4))
    with pytest.raises(ValueError, match="`residual\\(fields, \\*data\\)` must be pointwise"):
        HardConstraintMoE(lambda f, p, k: problem.residual(f, p, k).sum(), experts)(basis, pts, kind)
    with pytest.raises(ValueError, match="`experts` must be a 1-D integer tensor"):
        HardConstraintMoE(problem.residual, experts.double())
    with pytest.raises(ValueError, match=r"experts \[1\] have none"):
        HardConstraintMoE(problem.residual, experts * 2)
    with pytest.raises(TypeError, match="`solver` must be a least-squares solver"):
        HardConstraintMoE(problem.residual, experts, solver="lm")
    with pytest.raises(ValueError, match="`regularization` must be a non-negative float"):
        HardConstraintMoE(problem.residual, experts, regularization=-1.0)
    with pytest.raises(TypeError, match="`residual` must be callable"):
        HardConstraint(None)
    omega = layer(basis, pts, kind).detach()
    with pytest.raises(ValueError, match="`omega` must have shape \\(K, 4\\)"):
        layer.fields(omega[:, :3], basis)
    with pytest.raises(ValueError, match="`experts` must lie in \\[0, 2\\)"):
        layer.fields(omega, basis["u"], torch.full((len(pts),), 5))


def test_too_few_rows_without_regularization_is_an_error():
    x = torch.linspace(0, 1, 6)[:, None]
    basis = torch.cat([x**i for i in range(4)], 1)  # N = 4, experts of 3 points
    experts = (x[:, 0] > 0.5).long()
    with pytest.raises(ValueError, match="fewer residual rows \\(3\\) than basis functions \\(N = 4\\).*`regularization`"):
        HardConstraintMoE(linear_residual, experts)(basis, x[:, 0])
    omega = HardConstraintMoE(linear_residual, experts, regularization=1e-8)(basis, x[:, 0])
    assert omega.shape == (2, 4)


def test_captured_tensor_requiring_grad_is_flagged():
    from bilevel.status import CapturedTensorWarning

    nu = torch.tensor(0.2, requires_grad=True)
    x = torch.linspace(0, 1, 6)
    basis = torch.stack([torch.ones_like(x), x], 1)
    layer = HardConstraint(lambda u, y: u - nu * y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CapturedTensorWarning)
        with pytest.raises(CapturedTensorWarning, match="nu"):
            layer(basis, x)


# ----------------------------------------------------------------------------- devices


def _devices_setup(devices, K=4):
    """A Burgers MoE (nonlinear experts, learnable coefficient) with the experts spread over ``devices``."""

    class Burgers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.log_nu = torch.nn.Parameter(torch.tensor(math.log(0.1), dtype=torch.float64))
            self.problem = burgers_1d(nu=0.1)

        def forward(self, f, pts, kind):
            pde = f["u_t"] + f["u"] * f["u_x"] - self.log_nu.exp() * f["u_xx"]
            return torch.where(kind == 0, pde, f["u"] - self.problem.exact(pts))

    problem = burgers_1d(nu=0.1)
    pts, kind = problem.collocation(12, 8)
    part = BoxPartition(problem.lower, problem.upper, (K, 1))
    layer = HardConstraintMoE(Burgers(), part(pts), solver=GaussNewton(tol=1e-13), devices=devices)
    basis = {k: v.detach().requires_grad_() for k, v in evaluate_basis(features(5, seed=4), pts, FIELDS).items()}
    return layer, basis, pts, kind


@pytest.mark.parametrize("devices", [["cpu", "cpu"], ["cpu", "cpu", "cpu"], ["cpu"] * 4])
def test_experts_spread_over_devices_equal_one_device(devices):
    one, basis, pts, kind = _devices_setup(None)
    spread, _, _, _ = _devices_setup(devices)
    w = torch.randn(4, 5, dtype=torch.float64)
    outs, grads = [], []
    for layer in (one, spread):
        omega = layer(basis, pts, kind)
        outs.append(omega.detach())
        grads.append(torch.autograd.grad((omega * w).sum(), [*basis.values(), layer.residual.log_nu]))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-12, rtol=1e-10)
    for g_spread, g_one in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_spread, g_one, atol=1e-9, rtol=1e-8)
    # per-expert solver info in expert order; one backward certificate per device group
    assert spread.last_info.iterations.shape == (4,) and spread.last_info.converged.all()
    torch.testing.assert_close(spread.last_info.residual_norm, one.last_info.residual_norm, atol=1e-12, rtol=0)
    groups = spread.implicit_info if len(devices) > 1 else [spread.implicit_info]
    assert [info.optimal.numel() for info in groups] == [len(r) for r in torch.arange(4).tensor_split(len(devices))]
    assert "devices=['cpu'" in repr(spread)


def test_gradcheck_experts_over_two_devices():
    layer, basis, pts, kind = _devices_setup(["cpu", "cpu"], K=3)
    names = list(basis)

    def f(*leaves):
        return layer(dict(zip(names, leaves)), pts, kind)

    assert torch.autograd.gradcheck(f, tuple(basis[k] for k in names), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_non_converged_expert_on_a_later_device_is_named_globally():
    x = torch.linspace(0, 1, 12, dtype=torch.float64)
    basis = torch.stack([torch.ones_like(x), x], 1)
    experts = (x > 0.5).long()
    y = torch.where(experts == 0, torch.exp(0.1 * x), torch.exp(8 + 3 * x))
    layer = HardConstraintMoE(lambda u, y: torch.exp(u) - y, experts, solver=LevenbergMarquardt(maxiter=3),
                              devices=["cpu", "cpu"])
    with pytest.warns(ConvergenceWarning, match=r"experts \[1\]: expert 1"):
        layer(basis, y)
    assert layer.last_info.converged.tolist() == [True, False]


def test_devices_bad_input():
    experts = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="`devices` must be a non-empty list"):
        HardConstraintMoE(linear_residual, experts, devices="cpu")
    with pytest.raises(ValueError, match="`devices` must be a non-empty list"):
        HardConstraintMoE(linear_residual, experts, devices=[])
    with pytest.raises(ValueError, match="3 devices for 2 expert"):
        HardConstraintMoE(linear_residual, experts, devices=["cpu"] * 3)
    with pytest.raises(ValueError, match="`devices` must hold torch devices"):
        HardConstraintMoE(linear_residual, experts, devices=["not-a-device"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_experts_on_cpu_and_cuda_equal_one_device():
    one, basis, pts, kind = _devices_setup(None)
    spread, _, _, _ = _devices_setup(["cpu", "cuda"])
    torch.testing.assert_close(spread(basis, pts, kind).detach(), one(basis, pts, kind).detach(), atol=1e-10, rtol=1e-8)


def test_load_state_dict_refuses_a_bad_partition_before_changing_anything():
    """A float, 2-D or device-incompatible `experts` is refused with the layer unchanged."""
    x = torch.linspace(0, 1, 12, dtype=torch.float64)
    layer = HardConstraintMoE(lambda u, y: u - y, torch.arange(12) % 2, devices=["cpu", "cpu"])
    before = layer.experts.clone()
    for bad in (torch.zeros(12, dtype=torch.int64), torch.full((12,), 0.7), torch.zeros(2, 6, dtype=torch.int64)):
        with pytest.raises(ValueError):
            layer.load_state_dict({"experts": bad})
        assert torch.equal(layer.experts, before) and layer.num_experts == 2
    basis = torch.stack([torch.ones(12, dtype=torch.float64), x], 1)
    assert layer(basis, x).shape == (2, 2)
