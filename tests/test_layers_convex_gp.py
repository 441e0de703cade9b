"""ConvexLayer with ``gp=True``: log-log convex (DGP) problems, geometric programs.

The layer solves the DCP problem in the logarithms of the variables and parameters
(CVXPY's Dgp2Dcp) and returns the exponentials.  Checked against an exact solution
(a one-dimensional reduction solved to machine precision) and its central differences,
CVXPY's own ``solve(gp=True)``, ``gradcheck``, cvxpylayers' ``gp=True``, a loop over the
batch, float32; then the error messages that steer a problem to (or away from) ``gp=True``.
"""


import numpy as np
import pytest
import torch
from test_layers_convex import _assert_fd, _directional_fd
from test_layers_convex_cones import assert_agrees_with_cvxpylayers

from bilevel.layers import ConvexLayer, SolveError, SolveWarning

cp = pytest.importorskip("cvxpy")
optimize = pytest.importorskip("scipy.optimize")

# CVXPY's own solve (the reference) may stop one digit short of its tolerances on exponential cones
pytestmark = pytest.mark.filterwarnings("ignore:Solution may be inaccurate:UserWarning")


# ----------------------------------------------------------------------------- problems


def basic_gp():
    """cvxpylayers' ``test_basic_gp``: ``c`` enters only as an exponent (``y ** c`` is ``c log y``),
    so it is not logged and may be negative."""
    x, y, z = cp.Variable(pos=True), cp.Variable(pos=True), cp.Variable(pos=True)
    a, b, c = cp.Parameter(pos=True), cp.Parameter(pos=True), cp.Parameter()
    problem = cp.Problem(cp.Minimize(1 / (x * y * z)), [a * (x * y + x * z + y * z) <= b, x >= y ** c])
    return problem, [a, b, c], [x, y, z]


def basic_gp_exact(a, b, c):
    """The solution of :func:`basic_gp` to machine precision.  The posynomial constraint is active.
    Where ``x >= y ** c`` is inactive, symmetry gives ``x = y = z = sqrt(b / 3a)``; otherwise
    ``x = y ** c``, ``z`` follows from the active posynomial constraint, and ``y`` maximizes
    ``(1 + c) log y + log z(y)`` on one dimension (a root of its derivative)."""
    r = b / a
    s = np.sqrt(r / 3)
    if s ** c <= s:
        return np.array([s, s, s])

    def dlog(y):
        return (1 + c) / y - (1 + c) * y ** c / (r - y ** (1 + c)) - (c * y ** (c - 1) + 1) / (y ** c + y)

    y = optimize.brentq(dlog, 1e-12, r ** (1 / (1 + c)) * (1 - 1e-15), xtol=1e-17, rtol=1e-15, maxiter=500)
    return np.array([y ** c, y, (r - y ** (1 + c)) / (y ** c + y)])


def vector_gp():
    """A vector GP: ``min sum(d / x)`` s.t. ``sum(A x) <= 1`` (a posynomial), ``x_0 x_1 >= e`` (a monomial).

    (One posynomial constraint, always active: an inactive one leaves the epigraph variables of its
    exponential cones non-unique, and the conic route then keeps Clarabel's accuracy, ~1e-6.)"""
    x = cp.Variable(3, pos=True)
    A, d, e = cp.Parameter((2, 3), pos=True), cp.Parameter(3, pos=True), cp.Parameter(pos=True)
    problem = cp.Problem(cp.Minimize(cp.sum(cp.multiply(d, x ** -1))), [cp.sum(A @ x) <= 1, x[0] * x[1] >= e])
    return problem, [A, d, e], [x]


def _cvxpy_gp(problem, parameters, variables, values):
    """The same problem solved by CVXPY itself (``gp=True``, Clarabel, tight tolerances)."""
    for p, v in zip(parameters, values):
        p.value = np.asarray(v.detach().double().numpy())
    problem.solve(gp=True, solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    for p in parameters:
        p.value = None
    return [torch.as_tensor(v.value) for v in variables]


BASIC_POINTS = [(2.0, 1.0, 0.5), (1.5, 2.0, 0.3), (0.7, 3.0, -0.4)]  # the last: x >= y**c inactive, c < 0


# ----------------------------------------------------------------------------- forward and derivatives


@pytest.mark.parametrize("point", BASIC_POINTS)
def test_basic_gp_matches_exact_solution_and_cvxpy(point):
    problem, params, variables = basic_gp()
    layer = ConvexLayer(problem, params, variables, gp=True)
    assert layer.gp and layer.method == "conic" and layer.cones.exp > 0
    values = [torch.tensor(v, dtype=torch.float64) for v in point]
    out = torch.stack(layer(*values))
    assert torch.allclose(out, torch.as_tensor(basic_gp_exact(*point)), rtol=1e-12, atol=1e-12)
    assert torch.allclose(out, torch.stack(_cvxpy_gp(problem, params, variables, values)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("point", BASIC_POINTS)
def test_basic_gp_jacobian_matches_central_differences(point):
    """The full 3 x 3 Jacobian (through the torch.log of a, b and the exp of the log-variables)
    against central differences of the exact solution map."""
    problem, params, variables = basic_gp()
    layer = ConvexLayer(problem, params, variables, gp=True)
    jac = torch.autograd.functional.jacobian(lambda t: torch.stack(layer(*t)), torch.tensor(point, dtype=torch.float64))
    v0, h = np.array(point), 1e-5
    fd = np.stack([(basic_gp_exact(*(v0 + h * e)) - basic_gp_exact(*(v0 - h * e))) / (2 * h) for e in np.eye(3)], 1)
    assert np.abs(jac.numpy() - fd).max() <= 1e-7 * np.abs(fd).max()


def test_basic_gp_gradcheck_and_cvxpy_finite_differences():
    problem, params, variables = basic_gp()
    layer = ConvexLayer(problem, params, variables, gp=True)
    inputs = tuple(torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in BASIC_POINTS[0])
    assert torch.autograd.gradcheck(lambda *v: layer(*v), inputs, eps=1e-6, atol=1e-8, rtol=1e-6)
    # against CVXPY's own solutions (accurate to ~1e-7 here, hence the wide step and tolerance)
    v0, h = [torch.tensor(v, dtype=torch.float64) for v in BASIC_POINTS[0]], 1e-3
    jac = torch.autograd.functional.jacobian(lambda *t: torch.stack(layer(*t)), tuple(v0))
    for j in range(3):
        plus = [v + h if i == j else v for i, v in enumerate(v0)]
        minus = [v - h if i == j else v for i, v in enumerate(v0)]
        fd = (torch.stack(_cvxpy_gp(problem, params, variables, plus))
              - torch.stack(_cvxpy_gp(problem, params, variables, minus))) / (2 * h)
        assert torch.allclose(jac[j], fd, rtol=1e-3, atol=1e-4)


def test_vector_gp_matches_cvxpy_and_finite_differences():
    problem, params, variables = vector_gp()
    layer = ConvexLayer(problem, params, variables, gp=True)
    g = torch.Generator().manual_seed(3)
    values = [torch.rand(2, 3, generator=g, dtype=torch.float64) + 0.5,
              torch.rand(3, generator=g, dtype=torch.float64) + 0.5, torch.tensor(0.04, dtype=torch.float64)]
    (x,) = layer(*values)
    assert torch.allclose(x, _cvxpy_gp(problem, params, variables, values)[0], rtol=1e-6, atol=1e-7)
    _assert_fd(_directional_fd(layer, values), rtol=1e-6, atol=1e-8)


def test_gp_agrees_with_cvxpylayers():
    cvxpylayers_torch = pytest.importorskip("cvxpylayers.torch", reason="cvxpylayers is not installed")
    problem, params, variables = basic_gp()
    values = [torch.tensor([2.0, 1.5], dtype=torch.float64, requires_grad=True),
              torch.tensor(1.0, dtype=torch.float64, requires_grad=True),
              torch.tensor(0.5, dtype=torch.float64, requires_grad=True)]
    ours = torch.stack(ConvexLayer(problem, params, variables, gp=True)(*values))
    assert_agrees_with_cvxpylayers(
        ours, values, lambda: torch.stack(cvxpylayers_torch.CvxpyLayer(problem, params, variables, gp=True)(
            *values, solver_args={"eps": 1e-12, "max_iters": 100000})),
        torch.randn(ours.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64),
        grad_atol=1e-6, grad_rtol=1e-5)


# ----------------------------------------------------------------------------- batching, float32, LP route


def test_batched_gp_equals_loop_with_broadcasting():
    """A batched matrix parameter, shared (broadcast) vector and scalar ones."""
    problem, params, variables = vector_gp()
    layer = ConvexLayer(problem, params, variables, gp=True)
    g = torch.Generator().manual_seed(5)
    values = [(torch.rand(4, 2, 3, generator=g, dtype=torch.float64) + 0.5).requires_grad_(),
              (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_(),
              torch.tensor(0.04, dtype=torch.float64, requires_grad=True)]
    (x,) = layer(*values)
    assert x.shape == (4, 3)
    w = torch.randn(x.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((x * w).sum(), values)
    shared = [torch.zeros_like(values[1]), torch.zeros_like(values[2])]
    for i in range(4):
        one = [values[0][i].detach().requires_grad_(), values[1].detach().requires_grad_(),
               values[2].detach().requires_grad_()]
        (xi,) = layer(*one)
        assert torch.allclose(xi, x[i].detach(), atol=1e-12)
        gi = torch.autograd.grad((xi * w[i]).sum(), one)
        assert torch.allclose(grads[0][i], gi[0], atol=1e-10)
        shared[0] += gi[1]
        shared[1] += gi[2]
    assert torch.allclose(grads[1], shared[0], atol=1e-10) and torch.allclose(grads[2], shared[1], atol=1e-10)


def test_batched_basic_gp_matches_exact_solution():
    problem, params, variables = basic_gp()
    layer = ConvexLayer(problem, params, variables, gp=True)
    a = torch.tensor([2.0, 1.5, 0.7], dtype=torch.float64)
    b = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    c = torch.tensor([0.5, 0.3, -0.4], dtype=torch.float64)
    out = torch.stack(layer(a, b, c), -1)
    exact = np.stack([basic_gp_exact(*p) for p in zip(a.tolist(), b.tolist(), c.tolist())])
    assert torch.allclose(out, torch.as_tensor(exact), rtol=1e-12, atol=1e-12)


def test_gp_float32():
    problem, params, variables = basic_gp()
    layer = ConvexLayer(problem, params, variables, gp=True)
    inputs = [torch.tensor(v, dtype=torch.float32, requires_grad=True) for v in BASIC_POINTS[0]]
    outs = layer(*inputs)
    assert all(o.dtype == torch.float32 for o in outs)
    assert torch.allclose(torch.stack(outs).double(), torch.as_tensor(basic_gp_exact(*BASIC_POINTS[0])), rtol=1e-5)
    grads = torch.autograd.grad(sum(outs), inputs)
    inputs64 = [v.detach().double().requires_grad_() for v in inputs]
    grads64 = torch.autograd.grad(sum(layer(*inputs64)), inputs64)
    for g32, g64 in zip(grads, grads64):
        assert g32.dtype == torch.float32 and torch.allclose(g32.double(), g64, rtol=1e-4, atol=1e-5)


def test_monomial_gp_takes_the_lp_route():
    """``max x_0 x_1 x_2`` over a box ``[lo, hi]`` with monomial constraints is an LP in the
    logarithms (the torch QP route); with ``x_0 x_1 <= s`` and ``x_0 = 2 x_1`` active, the solution
    is ``(sqrt(2 s), sqrt(s / 2), hi_2)``."""
    x = cp.Variable(3, pos=True)
    lo, hi, s = cp.Parameter(3, pos=True), cp.Parameter(3, pos=True), cp.Parameter(pos=True)
    problem = cp.Problem(cp.Maximize(cp.prod(x)), [x <= hi, x >= lo, x[0] * x[1] <= s, x[0] == 2 * x[1]])
    layer = ConvexLayer(problem, [lo, hi, s], [x], gp=True)
    assert layer.method == "qp"
    s_t = torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True)
    hi_t = torch.tensor([4.0, 4.0, 3.0], dtype=torch.float64, requires_grad=True)
    (out,) = layer(torch.tensor([0.01, 0.01, 0.01], dtype=torch.float64), hi_t, s_t)
    # x_0 = 2 x_1, 2 x_1^2 = s  ->  x_1 = sqrt(s / 2), x_0 = sqrt(2 s); x_2 = hi_2
    expected = torch.stack([(2 * s_t).sqrt(), (s_t / 2).sqrt(), hi_t[2].expand(2)], -1)
    assert torch.allclose(out, expected.detach(), atol=1e-7)
    g_ours = torch.autograd.grad(out.sum(), (hi_t, s_t))
    g_ref = torch.autograd.grad(expected.sum(), (hi_t, s_t))
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, atol=1e-6)


# ----------------------------------------------------------------------------- failures and messages


def test_infeasible_gp_elements_are_nan_in_a_batch_and_raise_alone():
    x = cp.Variable(pos=True)
    lo, hi = cp.Parameter(pos=True), cp.Parameter(pos=True)
    layer = ConvexLayer(cp.Problem(cp.Minimize(x), [x >= lo, x <= hi]), [lo, hi], [x], gp=True)
    with pytest.warns(SolveWarning, match="batch element 1 is infeasible"):
        (out,) = layer(torch.tensor([1.0, 3.0], dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))
    assert torch.allclose(out[0], torch.tensor(1.0, dtype=torch.float64)) and torch.isnan(out[1])
    assert layer.last_failed == [1]
    with pytest.raises(SolveError, match="infeasible"):
        layer(torch.tensor(3.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))


def test_non_positive_parameter_values_are_refused():
    problem, params, variables = basic_gp()
    layer = ConvexLayer(problem, params, variables, gp=True)
    one = torch.tensor(1.0, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"`param\d+` must be positive \(batch element\(s\) \[1\]\)"):
        layer(torch.tensor([2.0, 0.0], dtype=torch.float64), one, torch.tensor(0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="must be positive.*logarithms"):
        layer(one, -one, torch.tensor(0.5, dtype=torch.float64))
    layer(one, 3 * one, -0.5 * one)  # c is an exponent only: any sign


def test_dgp_problem_without_gp_suggests_gp():
    problem, params, variables = basic_gp()
    with pytest.raises(ValueError, match="gp=True") as info:
        ConvexLayer(problem, params, variables)
    assert "not DCP" in str(info.value) and "not DPP" not in str(info.value)


def test_non_dcp_problem_is_called_not_dcp():
    x, y = cp.Variable(2), cp.Parameter(2)
    problem = cp.Problem(cp.Maximize(cp.sum_squares(x - y)), [x >= -1, x <= 1])  # maximize a convex function
    with pytest.raises(ValueError, match="not DCP") as info:
        ConvexLayer(problem, [y], [x])
    assert "not DPP" not in str(info.value) and "gp=True" not in str(info.value)


def test_gp_true_requires_a_dgp_dpp_problem():
    x, y = cp.Variable(2), cp.Parameter(2)
    dcp = cp.Problem(cp.Minimize(cp.sum_squares(x - y)))
    with pytest.raises(ValueError, match=r"gp=True.*not DGP.*It is DCP: leave gp=False"):
        ConvexLayer(dcp, [y], [x], gp=True)
    z, a, b = cp.Variable(pos=True), cp.Parameter(pos=True), cp.Parameter(pos=True)
    not_dpp = cp.Problem(cp.Minimize(z), [z >= a ** b])  # DGP, but a ** b is not DGP-DPP
    with pytest.raises(ValueError, match=r"gp=True.*DGP \(log-log convex\) but not DPP"):
        ConvexLayer(not_dpp, [a, b], [z], gp=True)
    neither = cp.Problem(cp.Maximize(cp.sum_squares(x - y)))
    with pytest.raises(ValueError, match=r"not DGP.*pos=True"):
        ConvexLayer(neither, [y], [x], gp=True)
    with pytest.raises(TypeError, match="`gp` must be True or False"):
        ConvexLayer(dcp, [y], [x], gp="yes")


def test_gp_repr_and_default():
    problem, params, variables = basic_gp()
    assert "gp=True" in repr(ConvexLayer(problem, params, variables, gp=True))
    x, y = cp.Variable(2), cp.Parameter(2)
    layer = ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(x - y))), [y], [x])
    assert layer.gp is False and "gp=" not in repr(layer)
