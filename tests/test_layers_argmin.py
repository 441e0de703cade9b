"""ArgminLayer: minimizers of objectives by any solver, differentiated by custom_root."""

import pytest
import torch

from bilevel.implicit import GMRES, stationarity
from bilevel.layers import ArgminLayer
from bilevel.solvers import LBFGS, GaussNewton, LevenbergMarquardt
from bilevel.status import ConvergenceWarning, Status

T = torch.linspace(0, 1, 12, dtype=torch.float64)


def exp_fit(p, y):
    """Residuals of one exponential fit y ~ a exp(k t), p = (a, k)."""
    return p[0] * torch.exp(p[1] * T.to(p.dtype)) - y


def _data(B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    truth = torch.stack([1 + torch.rand(B, generator=g), torch.rand(B, generator=g) - 0.5], -1)
    noise = 0.05 * torch.randn(B, T.numel(), generator=g)
    return truth[:, :1] * torch.exp(truth[:, 1:] * T) + noise


def _lm_layer(**kw):
    return ArgminLayer(exp_fit, LevenbergMarquardt(tol=1e-12), init=torch.ones(2), input_ndims=[1], **kw)


def test_least_squares_gradcheck_levenberg_marquardt():
    layer = _lm_layer()
    y = _data(B=2).requires_grad_()
    assert torch.autograd.gradcheck(layer, (y,), eps=1e-6, atol=1e-6, fast_mode=True)


def test_least_squares_gradient_matches_closed_form_ift():
    # d p*/d y = (J^T J + sum r_i H_i)^{-1} J^T: compare with autograd through a Newton solve.
    layer = _lm_layer()
    y = _data(B=1)[0].requires_grad_()
    p = layer(y)
    jac = torch.stack([torch.autograd.grad(p[i], y, retain_graph=True)[0] for i in range(2)])
    f = lambda p_: 0.5 * (exp_fit(p_, y.detach()) ** 2).sum()
    H = torch.autograd.functional.hessian(f, p.detach())
    cross = torch.autograd.functional.jacobian(lambda y_: torch.func.grad(lambda p_: 0.5 * (exp_fit(p_, y_) ** 2).sum())(p.detach()), y.detach())
    assert torch.allclose(jac, -torch.linalg.solve(H, cross), atol=1e-8)


def test_batched_equals_loop_forward_and_backward():
    layer = _lm_layer()
    y = _data(B=5).requires_grad_()
    w = torch.randn(5, 2)
    p = layer(y)
    assert p.shape == (5, 2) and layer.last_info.converged.all()
    (g,) = torch.autograd.grad((p * w).sum(), y)
    for i in range(5):
        yi = y[i].detach().clone().requires_grad_()
        pi = layer(yi)
        assert pi.shape == (2,) and torch.allclose(pi, p[i].detach(), atol=1e-9)
        (gi,) = torch.autograd.grad((pi * w[i]).sum(), yi)
        assert torch.allclose(gi, g[i], atol=1e-8)


def test_batched_backward_is_one_per_element_linear_solve():
    layer = _lm_layer(solve=GMRES(tol=1e-12))
    y = _data(B=3).requires_grad_()
    layer(y).sum().backward()
    assert y.grad.shape == (3, 12) and y.grad.isfinite().all()
    # One GMRES call over 3 independent 2x2 systems: per-element iterations and certificates.
    info = layer.implicit_info
    assert info.linear_solve.iterations.shape == (3,) and info.linear_solve.converged.all()
    assert info.optimal.shape == (3,) and info.optimal.all()


def test_shared_and_batched_inputs_with_lbfgs():
    # min_z 0.5 ||X z - t||^2 + 0.5 lam ||z||^2: ridge, batched over t, X and lam shared.
    X = torch.randn(10, 3)
    lam = torch.tensor(0.7, requires_grad=True)
    t = torch.randn(4, 10)

    def ridge(z, X, t, lam):
        return 0.5 * ((X @ z - t) ** 2).sum() + 0.5 * lam * (z ** 2).sum()

    layer = ArgminLayer(ridge, LBFGS(tol=1e-12), init=torch.zeros(3), input_ndims=[2, 1, 0])
    z = layer(X, t, lam)
    H = X.T @ X + lam.detach() * torch.eye(3)
    exact = torch.linalg.solve(H, (X.T @ t.T)).T
    assert torch.allclose(z, exact, atol=1e-7)
    (g,) = torch.autograd.grad(z.sum(), lam)
    expected = -(torch.linalg.solve(H, exact.T)).sum()  # d z / d lam = -H^{-1} z
    assert torch.allclose(g, expected, atol=1e-6)


def test_module_objective_parameters_get_implicit_gradients():
    class Quadratic(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor([1.0, 2.0]))

        def forward(self, z, c):
            return 0.5 * (self.scale * z ** 2).sum() - (c * z).sum()

    module = Quadratic()
    layer = ArgminLayer(module, init=torch.zeros(2), input_ndims=[1])
    c = torch.tensor([[1.0, 1.0], [2.0, -1.0]])
    z = layer(c)  # z = c / scale
    assert torch.allclose(z, c / module.scale.detach(), atol=1e-8)
    z.sum().backward()
    expected = -(c / module.scale.detach() ** 2).sum(0)  # d/ds (c / s)
    assert torch.allclose(module.scale.grad, expected, atol=1e-6)
    assert any(name == "objective.scale" for name, _ in layer.named_parameters())


def test_custom_residual_and_call_time_init():
    # Newton's sqrt as a root of z^2 - a = 0 (not a minimizer's gradient): residual given.
    def objective(z, a):
        return 0.25 * ((z ** 2 - a) ** 2).sum()

    layer = ArgminLayer(objective, GaussNewton(), residual=lambda z, a: z ** 2 - a, input_ndims=[1])
    a = torch.tensor([[4.0, 9.0]], requires_grad=True)
    with pytest.raises(ValueError, match="no warm start"):  # no tensor input to shape a default start on
        ArgminLayer(lambda z: (z ** 2).sum())()
    # Gauss-Newton minimizes 0.5||r||^2 with r = objective's output: wrap as residuals
    layer = ArgminLayer(lambda z, a: z ** 2 - a, GaussNewton(tol=1e-12), residual=lambda z, a: z ** 2 - a,
                        input_ndims=[1])
    z = layer(a, init=torch.ones(1, 2))
    assert torch.allclose(z, torch.tensor([[2.0, 3.0]]))
    (g,) = torch.autograd.grad(z.sum(), a)
    assert torch.allclose(g, 1 / (2 * z.detach()))


def test_stationarity_residual_matches_default():
    f = lambda z, c: 0.5 * ((z - c) ** 2).sum() + 0.25 * (z ** 4).sum()
    c = torch.tensor([0.5, -1.0], requires_grad=True)
    a = ArgminLayer(f, init=torch.zeros(2))(c)
    b = ArgminLayer(f, residual=stationarity(f), init=torch.zeros(2))(c)
    ga = torch.autograd.grad(a.sum(), c)[0]
    gb = torch.autograd.grad(b.sum(), c)[0]
    assert torch.allclose(ga, gb) and torch.allclose(ga, 1 / (1 + 3 * a.detach() ** 2))


def test_dtype_follows_inputs():
    layer = ArgminLayer(exp_fit, LevenbergMarquardt(), init=torch.ones(2), input_ndims=[1])
    p = layer(_data(B=2).float())
    assert p.dtype == torch.float32 and layer.last_info.converged.all()


def test_bad_inputs():
    layer = _lm_layer()
    with pytest.raises(ValueError, match=r"input 0 must have 1 dimensions .* got shape \(2, 3, 12\)"):
        layer(torch.zeros(2, 3, 12))
    with pytest.raises(ValueError, match="expected 1 inputs"):
        layer(torch.zeros(12), torch.zeros(12))
    with pytest.raises(ValueError, match="batch_dims=0"):
        ArgminLayer(exp_fit, LevenbergMarquardt(batch_dims=1))
    with pytest.raises(TypeError, match="`solver` must be a bilevel.solvers solver"):
        ArgminLayer(exp_fit, solver="lbfgs")
    with pytest.raises(TypeError, match="`objective` must be callable"):
        ArgminLayer(3)
    two = ArgminLayer(lambda z, a, b: ((z - a - b) ** 2).sum(), init=torch.zeros(2), input_ndims=[1, 1])
    with pytest.raises(ValueError, match="different batch sizes"):
        two(torch.zeros(2, 2), torch.zeros(3, 2))


def test_without_init_starts_from_zeros_shaped_like_one_problem_input():
    """DESIGN's ``ArgminLayer(objective, solver=...)(u)``: no warm start given, the
    layer starts from zeros like one problem's first input, batched or not, and
    computes what it computes with an explicit warm start."""
    def objective(z, u):
        return 0.5 * ((z - u) ** 2).sum() + 0.1 * (z ** 4).sum()

    u = torch.randn(5, requires_grad=True)
    z = ArgminLayer(objective, solver=LBFGS())(u)
    z_ref = ArgminLayer(objective, solver=LBFGS(), init=torch.zeros(5))(u)
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(torch.autograd.grad(z.sum(), u)[0], torch.autograd.grad(z_ref.sum(), u)[0])
    batch = torch.randn(3, 5)
    zb = ArgminLayer(objective, solver=LBFGS(), input_ndims=[1])(batch)
    assert zb.shape == (3, 5)
    torch.testing.assert_close(zb[1], ArgminLayer(objective, solver=LBFGS())(batch[1]))


def test_without_init_a_shape_that_does_not_fit_asks_for_init():
    W = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"no warm start was given.*\(3,\).*pass `init=`"):
        ArgminLayer(lambda z, u: 0.5 * ((W @ z - u) ** 2).sum(), solver=LBFGS())(torch.randn(3))


def _quadratic_batch(*conditions):
    """Diagonal quadratics 0.5 w^T H w - c^T w, one per condition number: w* = c / diag(H)."""
    H = torch.stack([torch.diag(torch.logspace(0, k, 10, dtype=torch.float64)) for k in conditions])
    c = torch.ones(len(conditions), 10, dtype=torch.float64)
    return H, c, c / H.diagonal(dim1=-2, dim2=-1)


def test_a_badly_conditioned_element_does_not_spoil_its_neighbours():
    """A batch for LBFGS is one run on the summed objective; its stopping test passed while the
    easy element was 30 % off (the hard one dominated the joint gradient).  Each element is now
    held to its own tolerance, solved again alone if it missed it, and reported on its own."""
    objective = lambda w, H, c: 0.5 * w @ H @ w - c @ w  # noqa: E731
    layer = ArgminLayer(objective, LBFGS(maxiter=300), init=torch.zeros(10, dtype=torch.float64), input_ndims=[2, 1])
    H, c, exact = _quadratic_batch(1, 8)  # condition numbers 10 and 1e8
    with pytest.warns(ConvergenceWarning, match=r"batch elements \[1\]"):
        z = layer(H, c)
    torch.testing.assert_close(z[0], exact[0], rtol=1e-7, atol=0)
    info = layer.last_info
    assert info.status.tolist() == [int(Status.SUCCESS), int(Status.MAX_ITERATIONS)]
    assert info.residual_norm.shape == (2,) and bool(info.residual_norm[0] <= info.tolerance[0])
    # the same element alone, and in a batch of easy ones: the same answer, one joint run
    alone = layer(H[0], c[0])
    torch.testing.assert_close(z[0], alone, rtol=1e-7, atol=0)
    H3, c3, exact3 = _quadratic_batch(1, 2, 1)
    torch.testing.assert_close(layer(H3, c3), exact3, rtol=1e-7, atol=0)
    assert layer.last_info.converged.all() and len(set(layer.last_info.iterations.tolist())) == 1
    # gradients of the batch are still the closed form: d w*_i / d c_i = 1 / H_ii
    c3 = c3.clone().requires_grad_()
    (g,) = torch.autograd.grad(layer(H3, c3).sum(), c3)
    torch.testing.assert_close(g, 1 / H3.diagonal(dim1=-2, dim2=-1), rtol=1e-6, atol=0)


def test_an_unbounded_element_is_named():
    objective = lambda w, a, c: 0.5 * a * (w ** 2).sum() - (c * w).sum()  # noqa: E731  (unbounded for a < 0)
    layer = ArgminLayer(objective, LBFGS(), init=torch.zeros(2, dtype=torch.float64), input_ndims=[0, 1])
    with pytest.raises(FloatingPointError, match=r"ArgminLayer: batch element 2 of 3: LBFGS"):
        layer(torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64), torch.ones(3, 2, dtype=torch.float64))


def test_a_batch_of_alike_elements_needs_no_second_solve():
    """The joint run's threshold is about sqrt(B) times an element's: it is tightened so that
    alike elements pass their own tests (3-4 of 64 were solved again, up to 6x slower)."""
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(64, 20, 20, dtype=torch.float64, generator=gen)
    H = M @ M.transpose(-1, -2) / 20 + torch.eye(20, dtype=torch.float64)
    c = torch.randn(64, 20, dtype=torch.float64, generator=gen)
    layer = ArgminLayer(lambda w, H, c: 0.5 * w @ H @ w - c @ w, LBFGS(), init=torch.zeros(20, dtype=torch.float64),
                        input_ndims=[2, 1])
    z = layer(H, c)
    assert len(set(layer.last_info.iterations.tolist())) == 1 and layer.last_info.converged.all()
    torch.testing.assert_close(z, torch.linalg.solve(H, c), rtol=1e-6, atol=1e-8)


def test_a_residual_that_cannot_be_vmapped_still_solves_a_batch():
    """The per-element check evaluates the condition under vmap; one that reads values (a step chosen
    with float(...)) keeps the joint run's answer instead of failing the forward pass."""
    from bilevel.implicit.prox import prox_lasso
    from bilevel.solvers import ProximalGradient

    def residual(z, c):  # the proximal-gradient fixed point, with a data-dependent step
        step = 1.0 if float(z.abs().max()) < 100 else 0.5
        return prox_lasso(z - step * (z - c), 0.1, step) - z

    c = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    layer = ArgminLayer(lambda z, c: 0.5 * ((z - c) ** 2).sum(), ProximalGradient(lambda z, _, s: prox_lasso(z, 0.1, s)),
                        residual=residual, init=torch.zeros(3, dtype=torch.float64), input_ndims=[1])
    with torch.no_grad():
        z = layer(c)
    torch.testing.assert_close(z, torch.sign(c) * (c.abs() - 0.1).clamp_min(0), rtol=0, atol=1e-7)
