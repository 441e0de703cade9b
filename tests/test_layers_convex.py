"""ConvexLayer: CVXPY problems as layers (LP, QP, SOCP, SDP, projection), batching, errors."""

import numpy as np
import pytest
import torch

from bilevel.layers import ConvexLayer, QPLayer, SolveError, SolveWarning

cp = pytest.importorskip("cvxpy")


def _direct(problem, parameters, variables, values):
    """The same problem solved by CVXPY itself (Clarabel, tight tolerances)."""
    for p, v in zip(parameters, values):
        p.value = v.detach().numpy()
    problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    for p in parameters:
        p.value = None
    return [torch.as_tensor(v.value) for v in variables]


def _directional_fd(layer, values, eps=1e-6, seed=0):
    """Analytic vs central-difference derivative of a random weighting of the outputs
    along a random direction of every parameter."""
    g = torch.Generator().manual_seed(seed)
    outs = layer(*values)
    weights = [torch.randn(o.shape, generator=g) for o in outs]
    inputs = [v.clone().requires_grad_() for v in values]
    loss = lambda vals: sum((o * w).sum() for o, w in zip(layer(*vals), weights))
    grads = torch.autograd.grad(loss(inputs), inputs)
    pairs = []
    for i, v in enumerate(values):
        d = torch.randn(v.shape, generator=g)
        plus = [x + eps * d if j == i else x for j, x in enumerate(values)]
        minus = [x - eps * d if j == i else x for j, x in enumerate(values)]
        pairs.append((float((loss(plus) - loss(minus)) / (2 * eps)), float((grads[i] * d).sum())))
    return pairs


def _assert_fd(pairs, rtol=1e-5, atol=1e-6):
    for fd, an in pairs:
        assert abs(fd - an) <= atol + rtol * abs(fd), pairs


# ----------------------------------------------------------------------------- problems

def projection_problem(n=5):
    x, y = cp.Variable(n), cp.Parameter(n)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [x >= 0, cp.sum(x) <= 1])
    return problem, [y], [x]


def lp_problem(n=3, m=6):
    x, c, G, h = cp.Variable(n), cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
    problem = cp.Problem(cp.Minimize(c @ x), [G @ x <= h, x >= -1, x <= 1])
    return problem, [c, G, h], [x]


def qp_problem(n=4, m=5, p=1):
    x = cp.Variable(n)
    L, q = cp.Parameter((n, n)), cp.Parameter(n)
    G, h, A, b = cp.Parameter((m, n)), cp.Parameter(m), cp.Parameter((p, n)), cp.Parameter(p)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(L @ x) + q @ x), [G @ x <= h, A @ x == b])
    return problem, [L, q, G, h, A, b], [x]


def socp_problem(n=4):
    x, q, F, t = cp.Variable(n), cp.Parameter(n), cp.Parameter((3, n)), cp.Parameter()
    problem = cp.Problem(cp.Minimize(q @ x + cp.sum_squares(x)), [cp.norm(F @ x, 2) <= t, x >= -1])
    return problem, [q, F, t], [x]


def _values(name, B=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = () if B is None else (B,)
    r = lambda *s: torch.randn(lead + s, generator=g)
    if name == "projection":
        return [r(5)]
    if name == "lp":
        return [r(3), torch.randn(6, 3, generator=g), torch.rand(6, generator=g) + 0.1]
    if name == "qp":
        return [torch.randn(4, 4, generator=g) + 2 * torch.eye(4), r(4), torch.randn(5, 4, generator=g),
                torch.rand(5, generator=g) + 0.1, torch.randn(1, 4, generator=g), 0.1 * torch.randn(1, generator=g)]
    if name == "socp":
        return [r(4), torch.randn(3, 4, generator=g), torch.tensor(0.5)]
    raise KeyError(name)


PROBLEMS = {"projection": projection_problem, "lp": lp_problem, "qp": qp_problem, "socp": socp_problem}


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_solution_matches_cvxpy(name):
    problem, params, variables = PROBLEMS[name]()
    layer = ConvexLayer(problem, params, variables)
    values = _values(name)
    (x,) = layer(*values)
    (ref,) = _direct(problem, params, variables, values)
    assert x.dtype == torch.float64 and x.shape == ref.shape
    assert torch.allclose(x, ref, atol=1e-8)
    assert layer.method == ("conic" if name == "socp" else "qp")


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_gradients_match_finite_differences(name):
    problem, params, variables = PROBLEMS[name]()
    layer = ConvexLayer(problem, params, variables)
    _assert_fd(_directional_fd(layer, _values(name)))


def test_gradcheck_qp_all_parameters():
    problem, params, variables = qp_problem(n=3, m=3)
    layer = ConvexLayer(problem, params, variables)
    g = torch.Generator().manual_seed(1)
    values = [torch.randn(3, 3, generator=g) + 2 * torch.eye(3), torch.randn(3, generator=g),
              torch.randn(3, 3, generator=g), torch.rand(3, generator=g) + 0.1, torch.randn(1, 3, generator=g),
              0.1 * torch.randn(1, generator=g)]
    inputs = [v.requires_grad_() for v in values]
    assert torch.autograd.gradcheck(lambda *v: layer(*v)[0], inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", ["projection", "socp"])
def test_conic_route_agrees_with_qp_route_and_gradcheck(name):
    problem, params, variables = PROBLEMS[name]()
    layer = ConvexLayer(problem, params, variables, method="conic")
    values = _values(name)
    (x,) = layer(*values)
    (ref,) = _direct(problem, params, variables, values)
    assert torch.allclose(x, ref, atol=1e-8)
    _assert_fd(_directional_fd(layer, values), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["lp", "socp"])
def test_batched_equals_loop(name):
    problem, params, variables = PROBLEMS[name]()
    layer = ConvexLayer(problem, params, variables)
    values = [v.requires_grad_() for v in _values(name, B=3)]
    (x,) = layer(*values)
    w = torch.randn(x.shape)
    grads = torch.autograd.grad((x * w).sum(), values)
    batched = [v.dim() > p.ndim and v.shape[0] == 3 for v, p in zip(values, params)]
    summed = [torch.zeros_like(v) for v in values]
    for i in range(3):
        one = [(v[i] if b else v).detach().clone().requires_grad_() for v, b in zip(values, batched)]
        (xi,) = layer(*one)
        assert torch.allclose(xi, x[i].detach(), atol=1e-9)
        gi = torch.autograd.grad((xi * w[i]).sum(), one)
        for k, (g, b) in enumerate(zip(gi, batched)):
            if b:
                assert torch.allclose(grads[k][i], g, atol=1e-7)
            else:
                summed[k] += g
    for k, b in enumerate(batched):
        if not b:  # shared parameters: gradients summed over the batch
            assert torch.allclose(grads[k], summed[k], atol=1e-7)


def test_sdp_with_symmetric_variable_and_psd_parameter():
    k = 3
    X, C = cp.Variable((k, k), symmetric=True), cp.Parameter((k, k), PSD=True)
    problem = cp.Problem(cp.Minimize(cp.trace(C @ X) + cp.sum_squares(X)), [X >> 0, cp.trace(X) == 1])
    layer = ConvexLayer(problem, [C], [X])
    M = torch.randn(k, k)
    C0 = M @ M.T
    (Xs,) = layer(C0)
    (ref,) = _direct(problem, [C], [X], [C0])
    assert torch.allclose(Xs, ref, atol=1e-8) and torch.allclose(Xs, Xs.T)
    # symmetric perturbations keep C PSD-valued; the derivative matches central differences
    D = torch.randn(k, k)
    D = D + D.T
    Cg = C0.clone().requires_grad_()
    W = torch.randn(k, k)
    (g,) = torch.autograd.grad((layer(Cg)[0] * W).sum(), Cg)
    eps = 1e-6
    fd = ((layer(C0 + eps * D)[0] - layer(C0 - eps * D)[0]) * W).sum() / (2 * eps)
    assert abs(float(fd) - float((g * D).sum())) < 1e-5


def test_variable_with_attributes():
    x, y = cp.Variable(3, nonneg=True), cp.Parameter(3)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - y)))
    layer = ConvexLayer(problem, [y], [x])
    y0 = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    (x0,) = layer(y0)
    assert torch.allclose(x0, y0.detach().clamp_min(0), atol=1e-9)
    (g,) = torch.autograd.grad(x0.sum(), y0)
    assert torch.allclose(g, torch.tensor([1.0, 0.0, 1.0]), atol=1e-8)


def test_several_variables_matrix_shapes_and_float32():
    X, Y = cp.Variable((2, 3)), cp.Variable(2)
    P, r = cp.Parameter((2, 3)), cp.Parameter(2)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(X - P) + cp.sum_squares(Y - r)), [Y >= 0])
    layer = ConvexLayer(problem, [P, r], [X, Y])
    P0, r0 = torch.randn(4, 2, 3), torch.randn(4, 2)
    Xs, Ys = layer(P0, r0)
    assert torch.allclose(Xs, P0, atol=1e-8) and torch.allclose(Ys, r0.clamp_min(0), atol=1e-8)
    X32, Y32 = layer(P0.float(), r0.float())
    assert X32.dtype == Y32.dtype == torch.float32 and torch.allclose(X32, P0.float(), atol=1e-4)


def test_agrees_with_cvxpylayers():
    cvxpylayers_torch = pytest.importorskip("cvxpylayers.torch", reason="cvxpylayers is not installed")
    problem, params, variables = qp_problem()
    values = [v.requires_grad_() for v in _values("qp", B=2)]
    ours = ConvexLayer(problem, params, variables)(*values)[0]
    theirs = cvxpylayers_torch.CvxpyLayer(problem, params, variables)(*values)[0]
    assert torch.allclose(ours, theirs, atol=1e-4)
    w = torch.randn(ours.shape)
    g_ours = torch.autograd.grad((ours * w).sum(), values)
    g_theirs = torch.autograd.grad((theirs * w).sum(), values)
    for a, b in zip(g_ours, g_theirs):
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3)


# ----------------------------------------------------------------------------- bad input


def test_non_dpp_problem_is_refused():
    x, P = cp.Variable(2), cp.Parameter((2, 2), PSD=True)
    problem = cp.Problem(cp.Minimize(cp.quad_form(x, P) + cp.sum(x)), [x >= -1])
    with pytest.raises(ValueError, match="not DPP"):
        ConvexLayer(problem, [P], [x])


def test_parameter_and_variable_lists_are_checked():
    problem, params, variables = qp_problem()
    with pytest.raises(ValueError, match=r"missing \['param"):
        ConvexLayer(problem, params[:-1], variables)
    with pytest.raises(ValueError, match="not a variable of the problem"):
        ConvexLayer(problem, params, [cp.Variable(2)])
    with pytest.raises(TypeError, match=r"`variables\[0\]` must be a cp.Variable"):
        ConvexLayer(problem, params, [params[0]])
    with pytest.raises(NotImplementedError, match="not an LP/QP"):
        ConvexLayer(*socp_problem(), method="qp")


def test_wrong_shapes_name_the_parameter():
    problem, params, variables = lp_problem()
    layer = ConvexLayer(problem, params, variables)
    c, G, h = _values("lp")
    name = params[1].name()
    with pytest.raises(ValueError, match=rf"parameter `{name}` has shape \(6, 3\) .* got a tensor of shape \(3, 6\)"):
        layer(c, G.T, h)
    with pytest.raises(ValueError, match="expected 3 parameter tensors"):
        layer(c, G)
    with pytest.raises(ValueError, match="different batch sizes"):
        layer(c.expand(2, 3), G, h.expand(4, 6))
    with pytest.raises(TypeError, match="must be a floating-point tensor"):
        layer(c, G, np.ones(6))


@pytest.mark.parametrize("method", ["qp", "conic"])
def test_infeasible_element_is_named(method):
    x, h = cp.Variable(2), cp.Parameter(2)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x)), [x[0] <= h[0], x[0] >= h[1]])
    layer = ConvexLayer(problem, [h], [x], method=method)
    values = torch.tensor([[1.0, -0.5], [0.0, 1.0], [2.0, -1.0]], requires_grad=True)  # 1: x0 <= 0, x0 >= 1
    with pytest.warns(SolveWarning, match="batch element 1 is infeasible") as record:
        (out,) = layer(values)  # the batch is not aborted: element 1 is NaN, the others are solved
    assert record[0].message.elements == [1] and layer.last_failed == [1]
    assert bool(out[1].isnan().all()) and bool(torch.isfinite(out[[0, 2]]).all())
    torch.testing.assert_close(out[[0, 2]], torch.zeros(2, 2), atol=1e-7, rtol=0)  # 0 is strictly feasible
    out[[0, 2]].sum().backward()
    assert bool(torch.isfinite(values.grad).all()) and bool((values.grad[1] == 0).all())
    strict = ConvexLayer(problem, [h], [x], method=method, check=True)
    with pytest.raises(SolveError, match="batch element 1 is infeasible") as err:
        strict(values)
    assert err.value.elements == [1]
    with pytest.raises(SolveError, match="the problem is infeasible"):  # unbatched: nothing else to return
        layer(values[1])
    with pytest.warns(SolveWarning):
        assert bool(ConvexLayer(problem, [h], [x], method=method, check=False)(values[1])[0].isnan().all())


@pytest.mark.parametrize("method", ["qp", "conic"])
def test_unbounded_problem_is_reported(method):
    x, c = cp.Variable(2), cp.Parameter(2)
    problem = cp.Problem(cp.Minimize(c @ x), [x >= 0])
    layer = ConvexLayer(problem, [c], [x], method=method)
    with pytest.raises(SolveError, match="the problem is unbounded"):
        layer(torch.tensor([1.0, -1.0]))


def test_cvxpylayers_solver_args_are_translated():
    """cvxpylayers' ``eps`` / ``max_iters`` reach both forward solvers; its solver
    choice is dropped with a warning, not an error."""
    n = 4
    x, u = cp.Variable(n), cp.Parameter(n)
    u_value = torch.tensor([1.0, -0.5, 2.0, -1.0])
    qp = ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(x - u)), [x >= 0]), parameters=[u], variables=[x])
    with pytest.warns(UserWarning, match="solve_method"):
        (z,) = qp(u_value, solver_args={"eps": 1e-10, "max_iters": 50, "solve_method": "SCS"})
    torch.testing.assert_close(z, u_value.clamp_min(0), atol=1e-8, rtol=0)
    y = cp.Variable(n)
    ball = ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - u)), [cp.norm(y) <= 1]), parameters=[u],
                       variables=[y])
    (z,) = ball(u_value, solver_args={"eps": 1e-10, "max_iters": 100})
    torch.testing.assert_close(z, u_value / u_value.norm(), atol=1e-8, rtol=0)
    with pytest.raises(ValueError, match="tol.*maxiter"):
        qp(u_value, solver_args={"alpha": 1.5})


def test_parameter_maps_are_sparse_for_a_matrix_parameter():
    """A least-squares layer with its 150 x 100 matrix as a parameter: CVXPY's maps from the
    15151 parameter values to the canonical data have ~15000 nonzeros each; held dense they
    were 1.3e9 entries (10 GB), 11 s to build, 170 GFlop per call.  The solution still
    matches CVXPY's."""
    n, m = 100, 150
    z, M, c = cp.Variable(n), cp.Parameter((m, n)), cp.Parameter(m)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(M @ z - c)), [z >= 0, z <= 1])
    layer = ConvexLayer(problem, [M, c], [z])
    maps = dict(layer.named_buffers())
    assert maps and all(mapping.is_sparse for mapping in maps.values())
    assert sum(mapping._nnz() for mapping in maps.values()) < 100_000
    g = torch.Generator().manual_seed(0)
    Mv, cv = torch.randn(m, n, generator=g, dtype=torch.float64) / m ** 0.5, torch.randn(m, generator=g, dtype=torch.float64)
    (out,) = layer(Mv, cv)
    M.value, c.value = Mv.numpy(), cv.numpy()
    problem.solve(solver=cp.CLARABEL)
    torch.testing.assert_close(out, torch.tensor(z.value), atol=1e-6, rtol=0)


def test_auxiliary_variables_defined_by_equalities_are_eliminated():
    """CVXPY writes sum_squares(x - y) as ||t||^2 with t = x - y, and sum_squares(M z - c)
    with t = M z - c; the QP route solves without t (bilevel.layers._presolve), block by
    block from the parameter maps.  Solutions and gradients equal QPLayer's on the direct
    form, and gradcheck holds through the elimination."""
    n = 6
    x, y = cp.Variable(n), cp.Parameter(n)
    layer = ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [x >= 0, cp.sum(x) == 1]), [y], [x])
    assert layer.method == "qp" and layer._elimination.eliminated.numel() == n and layer._blocks
    g = torch.Generator().manual_seed(1)
    values = torch.randn(4, n, generator=g, dtype=torch.float64, requires_grad=True)
    (out,) = layer(values)
    eye = torch.eye(n, dtype=torch.float64)
    direct = QPLayer()(eye, -values, torch.ones(1, n, dtype=torch.float64), torch.ones(1, dtype=torch.float64),
                       -eye, torch.zeros(n, dtype=torch.float64))
    w = torch.randn(4, n, generator=g, dtype=torch.float64)
    (g_layer,), (g_direct,) = (torch.autograd.grad((o * w).sum(), values) for o in (out, direct))
    torch.testing.assert_close(out, direct, atol=1e-9, rtol=0)
    torch.testing.assert_close(g_layer, g_direct, atol=1e-9, rtol=0)

    m, k = 8, 5
    z, M, c = cp.Variable(k), cp.Parameter((m, k)), cp.Parameter(m)
    ls = ConvexLayer(cp.Problem(cp.Minimize(0.5 * cp.sum_squares(M @ z - c)), [z >= 0, z <= 1]), [M, c], [z])
    assert ls._elimination.eliminated.numel() == m
    Mv = torch.randn(m, k, generator=g, dtype=torch.float64).requires_grad_()
    cv = torch.randn(m, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda M_, c_: ls(M_, c_)[0], (Mv, cv), eps=1e-6, atol=1e-6)


def test_elimination_with_a_non_diagonal_objective_on_the_auxiliaries():
    """quad_form(t, S) with t == M z - c and a dense S: the eliminated block of P is not diagonal, so the
    full data are reduced (Elimination.reduce); the solution matches CVXPY's and the
    gradient finite differences."""
    m, k = 4, 3
    g = torch.Generator().manual_seed(2)
    L = torch.randn(m, m, generator=g, dtype=torch.float64)
    S = (L @ L.T + torch.eye(m, dtype=torch.float64)).numpy()
    z, t, M, c = cp.Variable(k), cp.Variable(m), cp.Parameter((m, k)), cp.Parameter(m)
    problem = cp.Problem(cp.Minimize(cp.quad_form(t, S) + cp.sum(z)), [t == M @ z - c, z >= -1, z <= 1])
    layer = ConvexLayer(problem, [M, c], [z])
    assert layer.method == "qp" and layer._elimination is not None and not layer._elimination.diagonal
    Mv = torch.randn(m, k, generator=g, dtype=torch.float64).requires_grad_()
    cv = torch.randn(m, generator=g, dtype=torch.float64).requires_grad_()
    (out,) = layer(Mv, cv)
    M.value, c.value = Mv.detach().numpy(), cv.detach().numpy()
    problem.solve(solver=cp.CLARABEL)
    torch.testing.assert_close(out, torch.tensor(z.value), atol=1e-6, rtol=0)
    assert torch.autograd.gradcheck(lambda M_, c_: layer(M_, c_)[0], (Mv, cv), eps=1e-6, atol=1e-6)


def test_float32_parameters_keep_float64_accuracy_through_the_elimination():
    """float32 values of a least-squares layer (cond(M) = 100, the box inactive): the reduced
    data (P' = M^T M) are formed in float64, as the QP solver works, so the solution is the
    exact least-squares solution of the float32 values to ~1e-7; formed in float32 it was off
    by eps32 cond(M)^2 ~ 1e-5."""
    m, k = 12, 6
    z, M, c = cp.Variable(k), cp.Parameter((m, k)), cp.Parameter(m)
    layer = ConvexLayer(cp.Problem(cp.Minimize(0.5 * cp.sum_squares(M @ z - c)), [z >= -100, z <= 100]), [M, c], [z])
    rng = np.random.default_rng(0)
    U, _ = np.linalg.qr(rng.standard_normal((m, k)))
    V, _ = np.linalg.qr(rng.standard_normal((k, k)))
    M32 = torch.tensor(U @ np.diag(np.logspace(0, -2, k)) @ V.T, dtype=torch.float32)
    c32 = M32 @ torch.tensor(rng.uniform(-1, 1, k), dtype=torch.float32)
    exact = torch.linalg.lstsq(M32.double(), c32.double()).solution
    (out,) = layer(M32, c32)
    assert out.dtype == torch.float32
    assert float((out.double() - exact).abs().max()) < 1e-6
