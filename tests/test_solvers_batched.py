"""Batched least squares: per-problem implicit gradients, and Levenberg-Marquardt's
stopping rule on ill-conditioned problems.

* The differentiable call of a batch (``batch_dims > 0``) solves one adjoint
  system per problem: its gradients w.r.t. per-problem and shared arguments
  equal a loop of single solves, pass ``gradcheck``, compose with torch.func,
  and its certificate names the problem that fails.
* Levenberg-Marquardt with default settings reaches the root of ill-conditioned
  linear and nonlinear problems about as accurately as Gauss-Newton.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.func import jacfwd, jacrev, vmap

from bilevel.solvers import GaussNewton, LevenbergMarquardt
from bilevel.solvers._batched import BatchedArgs
from bilevel.status import ConvergenceWarning, OptimalityWarning, Status

D = torch.float64
SOLVERS = [GaussNewton, LevenbergMarquardt]

# ----------------------------------------------------------------------------- problems


def exp_batch(B=4, m=12, seed=0):
    """Per-problem data (B, m) of a * exp(b t) at shared times t (m,)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, m, dtype=D)
    truth = torch.stack([1 + torch.rand(B, generator=g, dtype=D), torch.linspace(-1.0, 0.8, B, dtype=D)], -1)
    data = truth[:, :1] * torch.exp(truth[:, 1:] * t) + 0.02 * torch.randn(B, m, generator=g, dtype=D)
    return data, t


def weighted_fit(p, data, t, w):
    """Batched residuals w * (a exp(b t) - data): data per problem, t and w shared."""
    return w * (p[..., :1] * torch.exp(p[..., 1:] * t) - data)


def vandermonde(n=10, m=60, seed=0):
    """A polynomial fit in the monomial basis on [0, 1] (n = 10, m = 60: condition number 3.6e6)."""
    t = torch.linspace(0, 1, m, dtype=D)
    V = t[:, None] ** torch.arange(n, dtype=D)
    c = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=D)
    return V, c


def linear(x, A, b):
    return A @ x - b


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("cls", SOLVERS, ids=lambda c: c.__name__)
def test_batched_gradients_equal_a_loop_of_single_solves(cls):
    data, t = exp_batch()
    data, t = data.requires_grad_(), t.requires_grad_()
    w = torch.tensor(1.3, dtype=D, requires_grad=True)
    init = torch.ones(data.shape[0], 2, dtype=D)
    v = torch.randn(init.shape, generator=torch.Generator().manual_seed(1), dtype=D)
    assert BatchedArgs((data, t, w), (4,)).consistent(weighted_fit, init, (data, t, w))  # one system per problem
    p = cls(batch_dims=1, tol=1e-12)(weighted_fit, init, data, t, w)
    batched = torch.autograd.grad((p * v).sum(), (data, t, w))
    single = cls(tol=1e-12)
    loop = sum((single(weighted_fit, init[i], data[i], t, w) * v[i]).sum() for i in range(data.shape[0]))
    looped = torch.autograd.grad(loop, (data, t, w))
    for got, expected, name in zip(batched, looped, ("data (per problem)", "t (shared)", "w (shared scalar)")):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12, msg=name)
    assert float(looped[1].abs().max()) > 1e-3  # the shared gradient is not trivially zero


@pytest.mark.parametrize("cls", SOLVERS, ids=lambda c: c.__name__)
def test_gradcheck_per_problem_and_shared_arguments(cls):
    data, t = exp_batch(B=3, m=6)
    data, t = data.requires_grad_(), t.requires_grad_()
    init = torch.ones(3, 2, dtype=D)
    solver = cls(batch_dims=1, tol=1e-13)
    one = torch.ones((), dtype=D)
    assert torch.autograd.gradcheck(lambda d, s: solver(weighted_fit, init, d, s, one), (data, t))


def test_trees_and_two_batch_dimensions():
    # init a dict with batch shape (2, 3); args a dict of per-problem data and a shared tensor.
    data, t = exp_batch(B=6, m=10)
    data = data.reshape(2, 3, 10).requires_grad_()
    t = t.requires_grad_()

    def fit(p, args):
        return p["a"] * torch.exp(p["b"] * args["t"]) - args["data"]

    init = {"a": torch.ones(2, 3, 1, dtype=D), "b": torch.zeros(2, 3, 1, dtype=D)}
    p = LevenbergMarquardt(batch_dims=2)(fit, init, {"data": data, "t": t})
    grads = torch.autograd.grad(p["a"].sum() + p["b"].sum(), (data, t))
    single = LevenbergMarquardt()
    loop = 0
    for i in range(2):
        for j in range(3):
            q = single(fit, {"a": init["a"][i, j], "b": init["b"][i, j]}, {"data": data[i, j], "t": t})
            loop = loop + q["a"].sum() + q["b"].sum()
    for got, expected in zip(grads, torch.autograd.grad(loop, (data, t))):
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-10)


def test_torch_func_transforms():
    data, t = exp_batch(B=3, m=8)
    init = torch.ones(3, 2, dtype=D)
    solver = LevenbergMarquardt(batch_dims=1)
    one = torch.ones((), dtype=D)

    def f(d, s):
        return solver(weighted_fit, init, d, s, one)

    expected = torch.autograd.functional.jacobian(f, (data, t))
    for transform in (jacrev, jacfwd):
        got = transform(f, argnums=(0, 1))(data, t)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # vmap over a further batch dimension (the joint condition is used inside vmap)
    stacked = torch.stack([data, 1.1 * data])
    out = vmap(lambda d: f(d, t))(stacked)
    torch.testing.assert_close(out[1], f(1.1 * data, t))
    jacs = vmap(jacrev(lambda d: f(d, t)))(stacked)
    torch.testing.assert_close(jacs[0], expected[0], rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- per-problem condition


def test_shared_arguments_are_sorted_by_their_leading_shape():
    data, t = exp_batch(B=4, m=12)
    init = torch.ones(4, 2, dtype=D)
    t = t.requires_grad_()
    w = torch.tensor(2.0, dtype=D)  # shared, no gradient: a constant of the condition
    sort = BatchedArgs((data, t, w), (4,))
    assert sort.shared == [False, True, False]
    inputs = sort.inputs((data, t, w))
    assert len(inputs) == 2 and inputs[1].shape == (4, 12) and inputs[1].data_ptr() == t.data_ptr()  # a view
    back = sort.for_solver(inputs)
    assert back[0] is data and back[1].shape == (12,) and back[2] is w
    assert sort.consistent(weighted_fit, init, (data, t, w))


def test_ambiguous_shared_tensor_falls_back_to_the_joint_condition():
    # A shared (B, n) matrix with B = 4 problems looks batched; problem b would see its row b only.
    B, n = 4, 2
    M = torch.randn(B, n, generator=torch.Generator().manual_seed(2), dtype=D)
    y = 0.5 * torch.rand(B, B, generator=torch.Generator().manual_seed(3), dtype=D)

    def fit(p, y, M):  # problem b fits tanh(M p_b) to y_b: it uses the whole of M
        return torch.tanh(p @ M.T) - y

    init = torch.zeros(B, n, dtype=D)
    assert not BatchedArgs((y, M), (B,)).consistent(fit, init, (y, M))
    M = M.requires_grad_()
    p = LevenbergMarquardt(batch_dims=1)(fit, init, y, M)
    got = torch.autograd.grad(p.sum(), M)[0]
    single = LevenbergMarquardt()
    loop = sum(single(lambda q, y, M: fit(q[None], y[None], M)[0], init[i], y[i], M).sum() for i in range(B))
    torch.testing.assert_close(got, torch.autograd.grad(loop, M)[0], rtol=1e-7, atol=1e-10)


def test_non_converged_problem_is_named_forward_and_backward():
    # Four linear least-squares problems; problem 2 is a Vandermonde fit (condition number
    # 1e5) that Levenberg-Marquardt cannot finish in 4 iterations (it takes 18), the others take 3.
    V, c = vandermonde(n=8, m=30)
    Q = torch.linalg.qr(torch.randn(30, 8, generator=torch.Generator().manual_seed(4), dtype=D))[0]
    A = torch.stack([Q, 2 * Q, V, Q + 0.1]).requires_grad_()
    b = (A.detach() @ c).requires_grad_()

    def fit(x, A, b):
        return (A @ x.unsqueeze(-1)).squeeze(-1) - b

    init = torch.zeros(4, 8, dtype=D)
    with pytest.warns(ConvergenceWarning, match=r"LevenbergMarquardt did not converge \(batch elements \[2\]\)"):
        x = LevenbergMarquardt(batch_dims=1, maxiter=4)(fit, init, A, b)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.autograd.grad(x.sum(), (A, b))
    messages = [str(w.message) for w in caught if issubclass(w.category, OptimalityWarning)]
    assert len(messages) == 1 and "(batch elements [2])" in messages[0], messages


# ----------------------------------------------------------------------------- ill-conditioned problems


def _relative_error(x, expected):
    return float((x - expected).norm() / expected.norm())


@pytest.mark.parametrize("noise", [0.0, 1e-3], ids=["consistent", "noisy"])
def test_default_levenberg_marquardt_reaches_the_root_of_an_ill_conditioned_fit(noise):
    V, c = vandermonde()
    assert float(torch.linalg.cond(V)) > 1e6
    y = V @ c + noise * torch.randn(V.shape[0], generator=torch.Generator().manual_seed(5), dtype=D)
    root = torch.linalg.lstsq(V, y, driver="gelsd").solution
    init = torch.zeros(V.shape[1], dtype=D)
    x_gn, info_gn = GaussNewton().run(linear, init, V, y)
    x_lm, info_lm = LevenbergMarquardt().run(linear, init, V, y)
    assert int(info_lm.status) == Status.SUCCESS and float(info_lm.residual_norm) <= float(info_lm.tolerance)
    # Before the step test, LM stopped after 9 iterations with a relative error of 0.5 (consistent)
    # and 1.0 (noisy); GN gets about 1e-4 and 2e-6.
    assert _relative_error(x_lm, root) <= max(10 * _relative_error(x_gn, root), 1e-8)
    assert int(info_lm.iterations) <= 40


def test_default_levenberg_marquardt_on_a_discretized_fourth_derivative():
    # (d^2/dx^2)^2 on 40 interior points, condition number 5e5 and norm 4e7: J^T r cannot be computed
    # below about 1 at the root, far above tol * ||g0||.  Before the rounding floor, GN ended with
    # BREAKDOWN and LM with MAX_ITERATIONS (100 iterations), both at the root.
    n = 40
    h = 1.0 / (n + 1)
    L = (2 * torch.eye(n, dtype=D) - torch.diag(torch.ones(n - 1, dtype=D), 1)
         - torch.diag(torch.ones(n - 1, dtype=D), -1)) / h**2
    A = L @ L
    u = torch.sin(math.pi * torch.linspace(h, 1 - h, n, dtype=D))
    init = torch.zeros(n, dtype=D)
    for solver in (GaussNewton(), LevenbergMarquardt()):
        x, info = solver.run(linear, init, A, A @ u)
        assert int(info.status) == Status.SUCCESS and float(info.residual_norm) <= float(info.tolerance)
        assert _relative_error(x, u) < 1e-8 and int(info.iterations) < 40, type(solver).__name__


def test_default_levenberg_marquardt_on_an_ill_conditioned_nonlinear_problem():
    # r(x) = V x + 0.3 (V x)^3 - y with a 9-term Vandermonde V: Jacobian condition number ~6e5 at the root.
    V, _ = vandermonde(n=9, m=60)
    c = 0.5 * torch.randn(9, generator=torch.Generator().manual_seed(1), dtype=D)
    y = V @ c + 0.3 * (V @ c) ** 3

    def cubic(x, V, y):
        z = V @ x
        return z + 0.3 * z**3 - y

    init = torch.zeros(9, dtype=D)
    x_gn, _ = GaussNewton().run(cubic, init, V, y)
    x_lm, info = LevenbergMarquardt().run(cubic, init, V, y)
    assert int(info.status) == Status.SUCCESS
    # Before: 9 iterations and a relative error of 0.6; now about 1e-10 (GN: 1e-8).
    assert _relative_error(x_lm, c) <= max(10 * _relative_error(x_gn, c), 1e-8)


def test_well_conditioned_problems_take_no_more_iterations():
    # Iteration counts of the rule before the step test, measured on these problems.
    g = torch.Generator().manual_seed(5)
    A = torch.randn(80, 20, generator=g, dtype=D)
    b = A @ torch.randn(20, generator=g, dtype=D) + 0.1 * torch.randn(80, generator=g, dtype=D)
    _, info = LevenbergMarquardt().run(linear, torch.zeros(20, dtype=D), A, b)
    assert bool(info.converged) and int(info.iterations) <= 3
    data, t = exp_batch(B=16, m=25)
    _, info = LevenbergMarquardt(batch_dims=1).run(weighted_fit, torch.ones(16, 2, dtype=D), data, t, 1.0)
    assert bool(info.converged.all()) and int(info.iterations.max()) <= 6


@pytest.mark.skipif(not hasattr(Exception, "add_note"), reason="exception notes need Python >= 3.11")
@pytest.mark.parametrize("cls", [GaussNewton, LevenbergMarquardt])
def test_an_error_inside_fun_names_the_call_and_the_shapes(cls):
    """A batch of 3 starts against data for 4 problems: torch's own broadcasting error, with a
    note naming the solver, init's shape and batch shape, and the arguments' shapes."""
    t = torch.linspace(0, 1, 10, dtype=torch.float64)
    fit = lambda p, y: torch.exp(p[:, :1] * t) + p[:, 1:] - y  # noqa: E731
    with pytest.raises(RuntimeError) as caught:
        cls(batch_dims=1)(fit, torch.zeros(3, 2, dtype=torch.float64), torch.ones(4, 10, dtype=torch.float64))
    note = "\n".join(getattr(caught.value, "__notes__", []))
    assert f"in {cls.__name__}" in note and "(3, 2)" in note and "batch shape (3,)" in note and "(4, 10)" in note
