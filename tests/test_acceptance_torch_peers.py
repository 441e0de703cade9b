"""Acceptance scenarios of the PyTorch peers (TorchOpt, Betty, hypertorch), written
against the public API of DESIGN.md.

Each test takes a scenario the peers exercise in their tests and examples (iMAML
with nn.Module parameters, custom_root around a torch.optim loop, fixed-point /
CG / Neumann hypergradients with K iterations, unrolled reverse mode, learning to
reweight, data hyper-cleaning, vmap over tasks, dtype handling) and checks it
against a closed form, a dense reference, or a known answer of ALGORITHMS.md.
Tests of known bugs are ``xfail(strict=True)`` with the reason.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, vmap
from torch.utils.data import DataLoader, TensorDataset

import bilevel
from bilevel.implicit import CG, GMRES, MINRES, BiCGStab, Direct, Neumann, NormalCG

# --------------------------------------------------------------------------- helpers


def _flat(tree):
    leaves = tree.values() if isinstance(tree, dict) else tree
    return torch.cat([t.reshape(-1) for t in leaves])


def _unflattener(tree):
    names = list(tree)
    shapes = [tree[k].shape for k in names]
    sizes = [tree[k].numel() for k in names]
    return lambda v: {k: t.reshape(s) for k, t, s in zip(names, v.split(sizes), shapes)}


def _dense_hypergrad(outer, inner, x: dict, y: dict) -> torch.Tensor:
    """-(d2f/dx dy)^T (d2f/dy2)^-1 dF/dy + dF/dx on flattened dicts, dense."""
    ux, uy = _unflattener(x), _unflattener(y)
    f = lambda a, b: inner(ux(a), uy(b))
    big_f = lambda a, b: outer(ux(a), uy(b))
    a, b = _flat(x), _flat(y)
    H = hessian(f, argnums=1)(a, b)
    Hyx = jacrev(grad(f, argnums=1), argnums=0)(a, b)
    gx, gy = grad(big_f, argnums=(0, 1))(a, b)
    return gx - Hyx.T @ torch.linalg.solve(H, gy)


def _gd(objective, y, steps, lr):
    """Plain gradient descent on objective(y) for pytrees (no autograd graph kept)."""
    for _ in range(steps):
        g = grad(objective)(y)
        y = {k: y[k] - lr * g[k] for k in y} if isinstance(y, dict) else y - lr * g
    return y


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# --------------------------------------------------------------------------- iMAML with nn.Module


def _imaml_setup(dtype=torch.float64, lam=2.0):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)
    X, Xq = torch.randn(12, 3, dtype=torch.float64).to(dtype), torch.randn(8, 3, dtype=torch.float64).to(dtype)
    lab, labq = torch.randint(0, 2, (12,)), torch.randint(0, 2, (8,))

    def inner(w0, w):  # iMAML proximal inner problem
        prox = sum(((w[k] - w0[k]) ** 2).sum() for k in w)
        return F.cross_entropy(functional_call(net, w, (X,)), lab) + lam / 2 * prox

    def outer(w0, w):
        return F.cross_entropy(functional_call(net, w, (Xq,)), labq)

    w0 = {k: v.detach().clone() for k, v in net.named_parameters()}
    return net, inner, outer, w0


def _lbfgs_dict(objective, start: dict) -> dict:
    w = {k: v.detach().clone().requires_grad_() for k, v in start.items()}
    opt = torch.optim.LBFGS(list(w.values()), lr=1, max_iter=500, tolerance_grad=1e-13,
                            tolerance_change=1e-16, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = objective(w)
        value.backward()
        return value

    with torch.enable_grad():
        opt.step(closure)
    return {k: v.detach() for k, v in w.items()}


@pytest.mark.parametrize("solve", [None, CG(maxiter=200, tol=1e-12), GMRES(tol=1e-12), MINRES(tol=1e-12), Direct()],
                         ids=["default", "cg", "gmres", "minres", "direct"])
def test_imaml_mlp_dict_hypergrad_matches_dense_hessian(solve):
    _, inner, outer, w0 = _imaml_setup()
    w_star = _lbfgs_dict(lambda w: inner(w0, w), w0)
    g = bilevel.hypergrad(outer, inner, w0, w_star, solve=solve)
    assert isinstance(g, dict) and list(g) == list(w0)
    assert all(g[k].shape == w0[k].shape for k in w0)
    ref = _dense_hypergrad(outer, inner, w0, w_star)
    assert _rel(_flat(g), ref) < 1e-9


def test_imaml_closed_form_identity_lam_times_inverse_hessian():
    """iMAML (Rajeswaran et al. 2019): dw*/dw0 = lam (H + lam I)^-1 with H the task-loss Hessian."""
    lam = 2.0
    _, inner, outer, w0 = _imaml_setup(lam=lam)
    w_star = _lbfgs_dict(lambda w: inner(w0, w), w0)
    g = bilevel.hypergrad(outer, inner, w0, w_star)
    uy = _unflattener(w_star)
    H = hessian(lambda b: inner(w0, uy(b)))(_flat(w_star))  # already contains + lam I
    gy = _flat(grad(outer, argnums=1)(w0, w_star))
    assert _rel(_flat(g), lam * torch.linalg.solve(H, gy)) < 1e-9


def test_imaml_float32_module_follows_dtype_and_is_accurate():
    _, inner64, outer64, w0 = _imaml_setup(torch.float64)
    w_star = _lbfgs_dict(lambda w: inner64(w0, w), w0)
    ref = bilevel.hypergrad(outer64, inner64, w0, w_star, solve=Direct())
    _, inner32, outer32, _ = _imaml_setup(torch.float32)
    f32 = lambda t: {k: v.float() for k, v in t.items()}
    for solve in (None, CG(), Neumann(terms=200, alpha=0.3)):
        g = bilevel.hypergrad(outer32, inner32, f32(w0), f32(w_star), solve=solve)
        assert all(v.dtype == torch.float32 for v in g.values())
        assert _rel(_flat(g).double(), _flat(ref)) < 2e-3


def test_imaml_meta_params_as_pytree_vmap_over_tasks_matches_loop():
    """FuncTorch-style: one hypergradient per task under vmap, shared meta-parameters."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    meta = {k: v.detach() for k, v in net.named_parameters()}
    T, lam = 3, 1.0
    Xs, Ys, Xq, Yq = torch.randn(T, 10, 2), torch.randn(T, 10, 1), torch.randn(T, 10, 2), torch.randn(T, 10, 1)

    def task_objectives(X, Y, Xq_, Yq_):
        def inner(m, w):
            prox = sum(((w[k] - m[k]) ** 2).sum() for k in w)
            return F.mse_loss(functional_call(net, w, (X,)), Y) + lam / 2 * prox

        return (lambda m, w: F.mse_loss(functional_call(net, w, (Xq_,)), Yq_)), inner

    def task_hypergrad(m, X, Y, Xq_, Yq_, w_star):
        outer, inner = task_objectives(X, Y, Xq_, Yq_)
        return bilevel.hypergrad(outer, inner, m, w_star, solve=CG(maxiter=100, tol=1e-12))

    w_stars = [_lbfgs_dict(lambda w, i=i: task_objectives(Xs[i], Ys[i], Xq[i], Yq[i])[1](meta, w), meta)
               for i in range(T)]
    loop = [task_hypergrad(meta, Xs[i], Ys[i], Xq[i], Yq[i], w_stars[i]) for i in range(T)]
    W = {k: torch.stack([w[k] for w in w_stars]) for k in meta}
    batched = vmap(task_hypergrad, in_dims=(None, 0, 0, 0, 0, 0))(meta, Xs, Ys, Xq, Yq, W)
    for k in meta:
        torch.testing.assert_close(batched[k], torch.stack([g[k] for g in loop]), rtol=1e-9, atol=1e-12)
    for i in range(T):  # and each against the dense reference
        outer, inner = task_objectives(Xs[i], Ys[i], Xq[i], Yq[i])
        assert _rel(_flat(loop[i]), _dense_hypergrad(outer, inner, meta, w_stars[i])) < 1e-8


# --------------------------------------------------------------------------- custom_root, the TorchOpt way


def _softmax_regression_data():
    torch.manual_seed(0)
    net = nn.Linear(5, 3)
    X, lab = torch.randn(20, 5), torch.randint(0, 3, (20,))
    return net, X, lab


def test_custom_root_tuple_params_torch_optim_loop_with_aux():
    net, X, lab = _softmax_regression_data()
    names = ["weight", "bias"]

    def objective(params, meta, data):  # solution first, then what it depends on
        Xb, yb = data
        prox = sum(0.5 * ((p - m) ** 2).sum() for p, m in zip(params, meta))
        return F.cross_entropy(functional_call(net, dict(zip(names, params)), (Xb,)), yb) + prox

    @bilevel.custom_root(bilevel.implicit.stationarity(objective), has_aux=True)
    def solver(meta, data):
        params = tuple(m.detach().clone().requires_grad_() for m in meta)
        opt = torch.optim.SGD(params, lr=0.5)
        with torch.enable_grad():
            for _ in range(500):
                opt.zero_grad()
                objective(params, meta, data).backward()
                opt.step()
        return tuple(p.detach() for p in params), {"steps": 500}

    meta = tuple(p.detach().clone().requires_grad_() for p in net.parameters())
    sol, aux = solver(meta, (X, lab))  # integer labels inside the data tuple
    assert aux == {"steps": 500}
    assert isinstance(sol, tuple) and all(s.requires_grad for s in sol)
    g = torch.autograd.grad(sum(s.sum() for s in sol), meta)

    shapes, sizes = [m.shape for m in meta], [m.numel() for m in meta]
    unf = lambda v: tuple(a.reshape(s) for a, s in zip(v.split(sizes), shapes))
    f = lambda p, m: objective(unf(p), unf(m), (X, lab))
    ps, ms = _flat(sol).detach(), _flat(meta).detach()
    jac = -torch.linalg.solve(hessian(f, argnums=0)(ps, ms), jacrev(grad(f, argnums=0), argnums=1)(ps, ms))
    assert _rel(_flat(g), jac.T @ torch.ones(len(ps))) < 1e-9


def test_custom_root_dict_params_lbfgs_autograd_and_torch_func_agree():
    net, X, lab = _softmax_regression_data()

    def objective(params, meta, data):
        Xb, yb = data
        prox = sum(0.5 * ((params[k] - meta[k]) ** 2).sum() for k in params)
        return F.cross_entropy(functional_call(net, params, (Xb,)), yb) + prox

    @bilevel.custom_root(bilevel.implicit.stationarity(objective))
    def solver(meta, data):
        return _lbfgs_dict(lambda p: objective(p, meta, data), meta)

    meta = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    sol = solver(meta, (X, lab))
    g_autograd = torch.autograd.grad(sum(s.sum() for s in sol.values()), list(meta.values()))
    g_func = grad(lambda m: sum(s.sum() for s in solver(m, (X, lab)).values()))(
        {k: v.detach() for k, v in meta.items()})
    torch.testing.assert_close(_flat(g_autograd), _flat(g_func), rtol=1e-10, atol=1e-12)
    # dense reference: d(sum sol)/d meta = -(d2/dmeta dp)^T H^-1 1
    um = _unflattener(meta)
    f = lambda p, m: objective(um(p), um(m), (X, lab))
    ps, ms = _flat(sol).detach(), _flat(meta).detach()
    jac = -torch.linalg.solve(hessian(f, argnums=0)(ps, ms), jacrev(grad(f, argnums=0), argnums=1)(ps, ms))
    assert _rel(_flat(g_func), jac.T @ torch.ones(len(ps))) < 1e-9


def test_custom_root_module_passed_in_data_tuple_is_not_a_captured_tensor():
    net, X, lab = _softmax_regression_data()

    def objective(params, meta, data):
        Xb, yb, model = data
        prox = sum(0.5 * ((params[k] - meta[k]) ** 2).sum() for k in params)
        return F.cross_entropy(functional_call(model, params, (Xb,)), yb) + prox

    @bilevel.custom_root(bilevel.implicit.stationarity(objective), strict=True)
    def solver(meta, data):
        return _lbfgs_dict(lambda p: objective(p, meta, data), meta)

    meta = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", bilevel.CapturedTensorWarning)
        sol = solver(meta, (X, lab, net))
    assert all(s.requires_grad for s in sol.values())


def test_custom_root_captured_hyperparameter_is_reported():
    X, t = torch.randn(10, 3), torch.randn(10)
    lam = torch.tensor(0.5, requires_grad=True)

    @bilevel.custom_root(bilevel.implicit.stationarity(
        lambda w, X_: 0.5 * ((X_ @ w - t) ** 2).sum() + 0.5 * lam * (w ** 2).sum()))
    def solver(X_):
        return torch.linalg.solve(X_.T @ X_ + lam.detach() * torch.eye(3), X_.T @ t)

    with pytest.warns(bilevel.CapturedTensorWarning, match="lam"):
        solver(X.clone().requires_grad_())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ridge_solver_built_on_library_cg_is_differentiable(dtype):
    """TorchOpt test_rr_solve_cg: the inner solver itself runs a linear solve."""
    torch.manual_seed(0)
    X, t = torch.randn(40, 4, dtype=dtype), torch.randn(40, dtype=dtype)
    Xq, tq = torch.randn(20, 4, dtype=dtype), torch.randn(20, dtype=dtype)

    def objective(w, l2reg, data):
        Xb, tb = data
        return 0.5 * ((Xb @ w - tb) ** 2).mean() + 0.5 * l2reg * (w ** 2).sum()

    @bilevel.custom_root(bilevel.implicit.stationarity(objective))
    def ridge(l2reg, data):
        Xb, tb = data
        w, info = CG(maxiter=50)(lambda v: Xb.T @ (Xb @ v) / len(tb) + l2reg * v, Xb.T @ tb / len(tb))
        assert bool(info.converged.all())
        return w

    l2reg = torch.tensor(0.3, dtype=dtype, requires_grad=True)
    outer = lambda w: 0.5 * ((Xq @ w - tq) ** 2).mean()
    (g,) = torch.autograd.grad(outer(ridge(l2reg, (X, t))), l2reg)
    assert g.dtype == dtype

    def closed(lam):
        A = X.double().T @ X.double() / 40 + lam * torch.eye(4, dtype=torch.float64)
        return torch.linalg.solve(A, X.double().T @ t.double() / 40)

    ref = grad(lambda lam: 0.5 * ((Xq.double() @ closed(lam) - tq.double()) ** 2).mean())(
        torch.tensor(0.3, dtype=torch.float64))
    tol = 1e-3 if dtype == torch.float32 else 1e-10
    assert abs(float(g) - float(ref)) <= tol * abs(float(ref))


def test_custom_root_vmap_and_grad_over_hyperparameters_with_torch_optim_solver():
    torch.manual_seed(0)
    X, t = torch.randn(20, 3), torch.randn(20)

    def objective(w, log_lam):
        return 0.5 * ((X @ w - t) ** 2).sum() + 0.5 * log_lam.exp() * (w ** 2).sum()

    @bilevel.custom_root(bilevel.implicit.stationarity(objective))
    def ridge_gd(log_lam):
        w = torch.zeros(3, requires_grad=True)
        opt = torch.optim.SGD([w], lr=0.01)
        with torch.enable_grad():
            for _ in range(2000):
                opt.zero_grad()
                objective(w, log_lam).backward()
                opt.step()
        return w.detach()

    def closed(log_lam):
        return torch.linalg.solve(X.T @ X + log_lam.exp() * torch.eye(3), X.T @ t)

    lams = torch.tensor([-1.0, 0.0, 1.0])
    torch.testing.assert_close(vmap(ridge_gd)(lams), vmap(closed)(lams), rtol=1e-8, atol=1e-10)
    ref = vmap(grad(lambda lam: closed(lam).sum()))(lams)
    torch.testing.assert_close(vmap(grad(lambda lam: ridge_gd(lam).sum()))(lams), ref, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(jacrev(ridge_gd)(lams[0]), jacrev(closed)(lams[0]), rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("solver", [
    bilevel.solvers.OptimizerLoop("sgd", lr=0.5, maxiter=2000),
    bilevel.solvers.OptimizerLoop(torch.optim.Adam, lr=0.05, maxiter=3000),
    bilevel.solvers.LBFGS(),
    bilevel.solvers.GradientDescent(),
], ids=["sgd-loop", "adam-loop", "lbfgs", "gd"])
def test_library_solvers_are_differentiable_in_meta_parameter_dicts(solver):
    net, X, lab = _softmax_regression_data()
    c = {k: torch.randn_like(v) for k, v in net.named_parameters()}  # a generic outer cotangent

    def objective(params, meta, data):
        Xb, yb = data
        prox = sum(0.5 * ((params[k] - meta[k]) ** 2).sum() for k in params)
        return F.cross_entropy(functional_call(net, params, (Xb,)), yb) + prox

    meta = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    sol = solver(objective, {k: v.detach() for k, v in meta.items()}, meta, (X, lab))
    g = torch.autograd.grad(sum((sol[k] * c[k]).sum() for k in sol), list(meta.values()))
    um = _unflattener(meta)
    f = lambda p, m: objective(um(p), um(m), (X, lab))
    ps, ms = _flat(sol).detach(), _flat(meta).detach()
    jac = -torch.linalg.solve(hessian(f, argnums=0)(ps, ms), jacrev(grad(f, argnums=0), argnums=1)(ps, ms))
    assert _rel(_flat(g), jac.T @ _flat(c)) < 1e-6


def test_imaml_meta_training_with_solve_torch_optim_inner_and_neumann():
    """Betty / TorchOpt iMAML: inner solver a torch.optim loop, Neumann hypergradient."""
    _, inner, outer, w0 = _imaml_setup()

    def hyper_objective(meta):
        return float(outer(meta, _lbfgs_dict(lambda w: inner(meta, w), meta)))

    method = bilevel.algorithms.Implicit(inner_solver=bilevel.solvers.OptimizerLoop("sgd", lr=0.1, maxiter=500,
                                                                                     tol=1e-6),
                                         solve=Neumann(terms=20, alpha=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bilevel.BilevelWarning)
        r = bilevel.solve(outer, inner, w0, w0, method=method, max_steps=30, lr=0.05, progress=False)
    assert isinstance(r.x, dict) and list(r.x) == list(w0)
    assert hyper_objective(r.x) < 0.1 * hyper_objective(w0)


# --------------------------------------------------------------------------- second order


def _q_root():
    p = bilevel.problems.quadratic()
    A, B, rho = p.data["A"], p.data["B"], p.data["rho"]
    hess_phi = B.T @ torch.linalg.solve(A, torch.linalg.solve(A, B)) + rho * torch.eye(3)

    @bilevel.custom_root(bilevel.implicit.stationarity(lambda y, x: p.inner(x, y)))
    def y_star(x):
        return torch.linalg.solve(A, B @ x)

    return p, y_star, hess_phi


def test_hessian_of_hyperobjective_by_reverse_over_reverse_through_custom_root():
    p, y_star, hess_phi = _q_root()
    x = torch.randn(3)
    torch.testing.assert_close(jacrev(grad(lambda x_: p.outer(x_, y_star(x_))))(x), hess_phi)
    xr = x.clone().requires_grad_()
    g = bilevel.hypergrad(p.outer, p.inner, xr, y_star(xr), create_graph=True)
    H = torch.stack([torch.autograd.grad(g[i], xr, retain_graph=True)[0] for i in range(3)])
    torch.testing.assert_close(H, hess_phi)
    J = jacrev(lambda x_: bilevel.hypergrad(p.outer, p.inner, x_, y_star(x_), create_graph=True))(x)
    torch.testing.assert_close(J, hess_phi)


def test_torch_func_hessian_through_custom_root():
    """Forward-over-reverse (torch.func.hessian, jacfwd of grad) through the adjoint solve."""
    p, y_star, hess_phi = _q_root()
    phi = lambda x_: p.outer(x_, y_star(x_))
    x = torch.randn(3)
    torch.testing.assert_close(hessian(phi)(x), hess_phi)
    torch.testing.assert_close(jacfwd(grad(phi))(x), hess_phi)
    J = jacfwd(lambda x_: bilevel.hypergrad(p.outer, p.inner, x_, y_star(x_), create_graph=True))(x)
    torch.testing.assert_close(J, hess_phi)


def test_jacrev_of_hypergrad_without_create_graph():
    p, y_star, hess_phi = _q_root()
    J = jacrev(lambda x_: bilevel.hypergrad(p.outer, p.inner, x_, y_star(x_)))(torch.randn(3))
    torch.testing.assert_close(J, hess_phi)


def test_hypergrad_under_torch_compile_works_or_refuses_clearly():
    A = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    outer = lambda x, y: (y ** 2).sum()
    inner = lambda x, y: 0.5 * y @ A @ y - x @ y
    x = torch.tensor([1.0, -1.0])
    try:
        g = torch.compile(lambda x_: bilevel.hypergrad(outer, inner, x_, torch.linalg.solve(A, x_)))(x)
    except (TypeError, ValueError, NotImplementedError, bilevel.BilevelError) as error:  # a clear refusal
        assert "compile" in str(error)
    else:
        torch.testing.assert_close(g, 2 * torch.linalg.solve(A, torch.linalg.solve(A, x)))


# --------------------------------------------------------------------------- hypertorch: K-iteration hypergradients


def _logistic_hpo():
    """hypertorch's logistic-regression example: one L2 weight per feature (log scale)."""
    torch.manual_seed(0)
    n, d = 60, 8
    X = torch.randn(n, d)
    labels = (X @ torch.randn(d) + 0.3 * torch.randn(n) > 0).double()
    Xv = torch.randn(40, d)
    labels_v = (Xv @ torch.randn(d) > 0).double()

    def inner(lam, w):
        return F.binary_cross_entropy_with_logits(X @ w, labels) + 0.5 * (lam.exp() * w ** 2).sum()

    def outer(lam, w):
        return F.binary_cross_entropy_with_logits(Xv @ w, labels_v)

    lam = torch.full((d,), -2.0)
    w = _gd(lambda w_: inner(lam, w_), torch.zeros(d), 2000, 1.0)
    H = hessian(inner, argnums=1)(lam, w)
    Hyx = jacrev(grad(inner, argnums=1), argnums=0)(lam, w)
    gy = grad(outer, argnums=1)(lam, w)
    exact = -Hyx.T @ torch.linalg.solve(H, gy)
    return inner, outer, lam, w, H, Hyx, gy, exact


def test_cg_with_k_iterations_error_decreases_and_is_exact_at_dim():
    inner, outer, lam, w, _, _, _, exact = _logistic_hpo()
    errors = []
    for K in (1, 2, 4, 8):
        g = _quiet(bilevel.hypergrad, outer, inner, lam, w, solve=CG(maxiter=K, tol=1e-30))
        errors.append(_rel(g, exact))
    assert all(b < a for a, b in itertools.pairwise(errors))
    assert errors[0] > 1e-2 and errors[-1] < 1e-12  # exact after dim(y) = 8 iterations


def test_neumann_k_terms_equals_hypertorch_fixed_point_iteration():
    """hypertorch fixed_point(K) with fp_map w - lr grad f: v <- (I - lr H) v + dF/dw from 0."""
    inner, outer, lam, w, H, Hyx, gy, exact = _logistic_hpo()
    lr = 1.0 / float(torch.linalg.eigvalsh(H).max())
    errors = []
    for K in (1, 5, 20, 100):
        v = torch.zeros_like(w)
        for _ in range(K):
            v = v - lr * H @ v + gy
        reference = -lr * Hyx.T @ v
        g = bilevel.hypergrad(outer, inner, lam, w, solve=Neumann(terms=K, alpha=lr))
        torch.testing.assert_close(g, reference, rtol=1e-10, atol=1e-14)
        errors.append(_rel(g, exact))
    assert all(b < a for a, b in itertools.pairwise(errors)) and errors[-1] < 1e-10


def test_custom_fixed_point_gradient_step_map_default_solve_is_exact():
    inner, outer, lam, w, H, _, _, exact = _logistic_hpo()
    lr = 1.0 / float(torch.linalg.eigvalsh(H).max())
    step = lambda w_, lam_: w_ - lr * grad(inner, argnums=1)(lam_, w_)

    @bilevel.custom_fixed_point(step)
    def fixed_point(lam_):
        return w.clone()

    lam_r = lam.clone().requires_grad_()
    (g,) = torch.autograd.grad(outer(lam_r, fixed_point(lam_r)), lam_r)
    assert _rel(g, exact) < 1e-9


def test_custom_fixed_point_with_neumann_is_the_fixed_point_method():
    A = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    lr = 0.4
    T = lambda y, x: y - lr * (A @ y - x)  # gradient step on 0.5 y'Ay - x'y
    x = torch.tensor([1.0, -1.0], requires_grad=True)
    for K in (1, 3, 50):
        v = torch.zeros(2)
        for _ in range(K):
            v = v - lr * A @ v + torch.ones(2)
        reference = lr * v  # (dT/dx)^T v

        @bilevel.custom_fixed_point(T, solve=Neumann(terms=K, alpha=1.0))
        def fixed_point(x_):
            return torch.linalg.solve(A, x_)

        (g,) = _quiet(torch.autograd.grad, fixed_point(x).sum(), x)
        torch.testing.assert_close(g, reference)


def test_custom_fixed_point_symmetric_map_with_cg():
    A = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    T = lambda y, x: y - 0.4 * (A @ y - x)
    residual = bilevel.implicit.fixed_point_residual(T, symmetric=True)

    @bilevel.custom_root(residual, solve=CG())
    def fixed_point(x_):
        return torch.linalg.solve(A, x_)

    x = torch.tensor([1.0, -1.0], requires_grad=True)
    (g,) = _quiet(torch.autograd.grad, fixed_point(x).sum(), x)
    torch.testing.assert_close(g, torch.linalg.solve(A, torch.ones(2)))


@pytest.mark.parametrize("solve", [None, GMRES(), BiCGStab(tol=1e-12), Direct("lu"), NormalCG()],
                         ids=["default", "gmres", "bicgstab", "lu", "normalcg"])
def test_custom_fixed_point_equilibrium_map_matches_unrolled_reverse_mode(solve):
    """hypertorch's equilibrium-model example: h = tanh(W h + U x + b), non-symmetric Jacobian."""
    torch.manual_seed(0)
    n, d = 6, 3
    W = torch.randn(n, n)
    W = 0.5 * W / torch.linalg.matrix_norm(W, 2)
    U, b, xin, c = torch.randn(n, d), torch.randn(n), torch.randn(d), torch.randn(n)
    T = lambda h, W_, U_, b_: torch.tanh(W_ @ h + U_ @ xin + b_)

    def iterate(W_, U_, b_):
        h = torch.zeros(n)
        for _ in range(200):
            h = T(h, W_, U_, b_)
        return h

    params = [t.clone().requires_grad_() for t in (W, U, b)]
    got = torch.autograd.grad(c @ bilevel.custom_fixed_point(T, solve=solve)(iterate)(*params), params)
    params2 = [t.clone().requires_grad_() for t in (W, U, b)]
    ref = torch.autograd.grad(c @ iterate(*params2), params2)  # reverse mode through 200 steps
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-7, atol=1e-9)


# --------------------------------------------------------------------------- unrolled / one-step baselines


def test_unrolled_and_truncated_reverse_mode_closed_form_on_q():
    p = bilevel.problems.quadratic()
    A, B, yt, rho = p.data["A"], p.data["B"], p.data["y_target"], p.data["rho"]
    x, alpha, T, K = torch.randn(3), 0.3, 7, 3
    eye = torch.eye(5)
    P = (eye - torch.linalg.matrix_power(eye - alpha * A, T)) @ torch.linalg.solve(A, B)
    y_T = P @ x
    g, y = bilevel.implicit.unrolled_hypergrad(p.outer, p.inner, x, torch.zeros(5), steps=T, step_size=alpha,
                                               return_solution=True)
    torch.testing.assert_close(y, y_T)
    torch.testing.assert_close(g, P.T @ (y_T - yt) + rho * x)
    PK = (eye - torch.linalg.matrix_power(eye - alpha * A, K)) @ torch.linalg.solve(A, B)
    g = bilevel.implicit.unrolled_hypergrad(p.outer, p.inner, x, torch.zeros(5), steps=T, step_size=alpha,
                                            truncate=K)
    torch.testing.assert_close(g, PK.T @ (y_T - yt) + rho * x)


def test_unrolled_error_to_implicit_decreases_with_steps():
    inner, outer, lam, w, H, _, _, exact = _logistic_hpo()
    lr = 1.0 / float(torch.linalg.eigvalsh(H).max())
    errors = [_rel(bilevel.implicit.unrolled_hypergrad(outer, inner, lam, torch.zeros_like(w), steps=T,
                                                       step_size=lr), exact) for T in (5, 20, 80, 300)]
    # strictly down until the float32 floor (~3e-7, where the sums' rounding decides)
    assert all(b < a or max(a, b) < 1e-6 for a, b in itertools.pairwise(errors)) and errors[-1] < 1e-6


def test_one_step_hypergrad_is_learning_to_reweight():
    """L2R (Ren et al. 2018): d L_val(theta - a sum eps_i grad l_i) / d eps_i = -a <grad L_val(theta'), grad l_i(theta)>."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    Xtr, ytr = torch.randn(16, 3), torch.randint(0, 2, (16,))
    Xv, yv = torch.randn(10, 3), torch.randint(0, 2, (10,))
    theta = {k: v.detach() for k, v in net.named_parameters()}
    per_example = lambda p, X, y: F.cross_entropy(functional_call(net, p, (X,)), y, reduction="none")
    inner = lambda eps, p: (eps * per_example(p, Xtr, ytr)).sum()
    outer = lambda eps, p: per_example(p, Xv, yv).mean()
    a = 0.3
    g = bilevel.implicit.one_step_hypergrad(outer, inner, torch.zeros(16), theta, step_size=a)
    g_val = grad(lambda p: outer(None, p))(theta)
    g_each = vmap(grad(lambda p, x, y: per_example(p, x[None], y[None]).sum()), in_dims=(None, 0, 0))(theta, Xtr, ytr)
    ref = -a * sum((g_each[k] * g_val[k]).flatten(1).sum(1) for k in theta)
    torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-14)
    eps = torch.rand(16) / 16  # and away from eps = 0, against autograd through the lookahead step

    def lookahead(e):
        step = grad(lambda p: inner(e, p))(theta)
        return outer(e, {k: theta[k] - a * step[k] for k in theta})

    torch.testing.assert_close(bilevel.implicit.one_step_hypergrad(outer, inner, eps, theta, step_size=a),
                               grad(lookahead)(eps))


def test_maml_as_reparametrized_unrolled_hypergrad_vmapped_over_tasks():
    """MAML (TorchOpt FuncTorch example): adapted = meta + delta, delta_0 = 0."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
    meta = {k: v.detach() for k, v in net.named_parameters()}
    T = 4
    amp, phase = torch.rand(T) * 4 + 1, torch.rand(T) * 3
    Xs, Xq = torch.rand(T, 10, 1) * 10 - 5, torch.rand(T, 10, 1) * 10 - 5
    Ys = amp[:, None, None] * torch.sin(Xs + phase[:, None, None])
    Yq = amp[:, None, None] * torch.sin(Xq + phase[:, None, None])
    lr, steps = 0.01, 3

    def ours(m, X, Y, Xq_, Yq_):
        add = lambda m_, d: {k: m_[k] + d[k] for k in m_}
        inner = lambda m_, d: F.mse_loss(functional_call(net, add(m_, d), (X,)), Y)
        outer = lambda m_, d: F.mse_loss(functional_call(net, add(m_, d), (Xq_,)), Yq_)
        zero = {k: torch.zeros_like(v) for k, v in m.items()}
        return bilevel.implicit.unrolled_hypergrad(outer, inner, m, zero, steps=steps, step_size=lr)

    def manual(m, X, Y, Xq_, Yq_):
        def meta_loss(m_):
            w = m_
            for _ in range(steps):
                g = grad(lambda w_: F.mse_loss(functional_call(net, w_, (X,)), Y))(w)
                w = {k: w[k] - lr * g[k] for k in w}
            return F.mse_loss(functional_call(net, w, (Xq_,)), Yq_)

        return grad(meta_loss)(m)

    got = vmap(ours, in_dims=(None, 0, 0, 0, 0))(meta, Xs, Ys, Xq, Yq)
    ref = vmap(manual, in_dims=(None, 0, 0, 0, 0))(meta, Xs, Ys, Xq, Yq)
    for k in meta:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- batching


@pytest.mark.parametrize("solve", [None, CG(), Neumann(terms=300, alpha=0.2), GMRES(), Direct()],
                         ids=["default", "cg", "neumann", "gmres", "direct"])
def test_vmap_hypergrad_over_upper_variables_matches_closed_form(solve):
    p = bilevel.problems.quadratic()
    xs = torch.randn(4, 3)
    ys = torch.stack([p.inner_solution(x) for x in xs])
    g = vmap(lambda x, y: bilevel.hypergrad(p.outer, p.inner, x, y, solve=solve))(xs, ys)
    torch.testing.assert_close(g, torch.stack([p.hypergradient(x) for x in xs]), rtol=1e-9, atol=1e-11)


# --------------------------------------------------------------------------- hyper-cleaning / reweighting


def _cleaning_problem(n=100, d=5, c=3, noise=0.3):
    """Synthetic data hyper-cleaning (Franceschi et al. 2017): one weight per training example,
    softmax regression with an unregularized bias (as in most peer examples)."""
    g = torch.Generator().manual_seed(0)
    W_true = torch.randn(d, c, generator=g) * 3
    Xtr, Xv = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    ytr, yv = (Xtr @ W_true).argmax(1), (Xv @ W_true).argmax(1)
    noisy = torch.rand(n, generator=g) < noise
    ytr = torch.where(noisy, (ytr + torch.randint(1, c, (n,), generator=g)) % c, ytr)

    def inner(x, y):
        losses = F.cross_entropy(Xtr @ y["W"] + y["b"], ytr, reduction="none")
        return (torch.sigmoid(x) * losses).mean() + 1e-3 * (y["W"] ** 2).sum()

    def outer(x, y):
        return F.cross_entropy(Xv @ y["W"] + y["b"], yv)

    def separation(x):  # clean examples should end with larger weights than corrupted ones
        w = torch.sigmoid(x)
        return float(w[~noisy].mean() - w[noisy].mean())

    return outer, inner, torch.zeros(n), {"W": torch.zeros(d, c), "b": torch.zeros(c)}, separation


def test_default_hypergrad_on_singular_but_consistent_softmax_hessian():
    outer, inner, x0, y0, _ = _cleaning_problem(n=40, d=4)
    y = _gd(lambda y_: inner(x0, y_), y0, 5000, 2.0)
    reference = bilevel.hypergrad(outer, inner, x0, y, solve=CG())
    torch.testing.assert_close(reference, bilevel.hypergrad(outer, inner, x0, y, solve=Direct("lstsq")))
    assert float(reference.norm()) > 1e-2
    torch.testing.assert_close(_quiet(bilevel.hypergrad, outer, inner, x0, y), reference)


@pytest.mark.parametrize("method, steps", [
    ("penalty", 200), ("meha", 200), ("bamm", 200), ("bda", 40), ("one_step", 200),
    ("implicit-cg", 100),
    ("implicit", 100),  # the singular softmax Hessian: Auto falls back from Cholesky to CG
])
def test_hyper_cleaning_untuned_defaults_reduce_outer_loss(method, steps):
    outer, inner, x0, y0, separation = _cleaning_problem()
    options = {"solve": CG()} if method == "implicit-cg" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bilevel.BilevelWarning)
        r = bilevel.solve(outer, inner, x0, y0, method=method.split("-")[0], max_steps=steps, progress=False,
                          **options)
    h = r.history["outer"]
    assert len(h) == steps and all(map(torch.isfinite, map(torch.tensor, h)))
    assert h[-1] < 0.8 * h[0]
    assert separation(r.x) > 0.1  # corrupted examples got down-weighted
    assert isinstance(r.y, dict) and r.y["W"].shape == (5, 3)


@pytest.mark.parametrize("method", ["one_step", "penalty", "meha", "bamm"])
def test_meta_weight_net_upper_variable_is_an_mlp_parameter_dict(method):
    """Betty / TorchOpt L2R-style reweighting: example weights from a small MLP of the loss."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
    mwn = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    Xtr, ytr = torch.randn(16, 3), torch.randint(0, 2, (16,))
    Xv, yv = torch.randn(10, 3), torch.randint(0, 2, (10,))
    theta0 = {k: v.detach().clone() for k, v in net.named_parameters()}
    phi0 = {k: v.detach().clone() for k, v in mwn.named_parameters()}
    per_example = lambda p, X, y: F.cross_entropy(functional_call(net, p, (X,)), y, reduction="none")

    def inner(phi, p):
        losses = per_example(p, Xtr, ytr)
        weights = torch.sigmoid(functional_call(mwn, phi, (losses.detach()[:, None],))).squeeze(1)
        return (weights * losses).mean() + 1e-2 * sum((v ** 2).sum() for v in p.values())

    def outer(phi, p):
        return per_example(p, Xv, yv).mean()

    def hyper_objective(phi):  # F(phi, w*(phi)), the inner problem solved by L-BFGS
        return float(outer(phi, _lbfgs_dict(lambda p: inner(phi, p), theta0)))

    r = bilevel.solve(outer, inner, phi0, theta0, method=method, max_steps=50, progress=False)
    assert isinstance(r.x, dict) and list(r.x) == list(phi0)
    assert hyper_objective(r.x) < 0.9 * hyper_objective(phi0)
    # inputs untouched (the library works on copies)
    assert all(torch.equal(phi0[k], v) for k, v in mwn.named_parameters())


@pytest.mark.parametrize("method", ["implicit", "penalty", "meha", "bamm", "one_step"])
def test_minibatches_from_a_dataloader(method):
    torch.manual_seed(0)
    n, d = 200, 5
    w_true = torch.randn(d)
    X, Xv = torch.randn(n, d), torch.randn(100, d)
    t, tv = X @ w_true + 0.5 * torch.randn(n), Xv @ w_true + 0.5 * torch.randn(100)

    def inner(log_lam, w, batch):
        Xb, tb = batch
        return 0.5 * ((Xb @ w - tb) ** 2).mean() + 0.5 * log_lam.exp() * (w ** 2).sum()

    def outer(log_lam, w, batch=None):
        return 0.5 * ((Xv @ w - tv) ** 2).mean()

    loader = DataLoader(TensorDataset(X, t), batch_size=50, shuffle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bilevel.BilevelWarning)
        r = bilevel.solve(outer, inner, torch.tensor(1.0), torch.zeros(d), method=method, data=loader,
                          max_steps=100, progress=False)
    assert r.history["outer"][-1] < 0.8 * r.history["outer"][0]
    assert float(r.x) < 0.5  # less regularization helps here


# --------------------------------------------------------------------------- known answers (ALGORITHMS.md)


def test_q_implicit_reaches_x_star():
    p = bilevel.problems.quadratic()
    r = bilevel.solve(p, method="implicit", outer_optimizer="sgd", lr=0.5, max_steps=100, progress=False)
    assert _rel(r.x, p.solution.x) < 1e-6


def test_q_penalty_reaches_x_star_untuned():
    p = bilevel.problems.quadratic()
    r = bilevel.solve(p, method="penalty", max_steps=1000, progress=False)
    assert _rel(r.x, p.solution.x) < 1e-2


@pytest.mark.parametrize("method, steps, tol", [("penalty", 1000, 1e-3), ("bda", 100, 1e-2)])
def test_m1_single_loop_reach_e_untuned(method, steps, tol):
    p = bilevel.problems.nonunique_lower_level(n=10)
    r = bilevel.solve(p, method=method, max_steps=steps, progress=False)
    assert _rel(r.x, p.solution.x) < tol


def test_m1_implicit_warns_about_singular_curvature():
    p = bilevel.problems.nonunique_lower_level(n=10)
    with pytest.warns(bilevel.CurvatureWarning):
        bilevel.solve(p, method="implicit", max_steps=20, progress=False)


def test_l_lvhba_reaches_active_constraint_solution_untuned():
    p = bilevel.problems.coupled_constraint()
    r = bilevel.solve(p, method="lvhba", max_steps=1000, progress=False)
    assert float((r.x - p.solution.x).abs().max()) < 2e-2


# --------------------------------------------------------------------------- dtype and bad inputs


def _linear_model_problem():
    torch.manual_seed(0)
    net = nn.Linear(4, 1).float()  # float32 parameters (the tests default to float64)
    X, t = torch.randn(30, 4, dtype=torch.float32), torch.randn(30, 1, dtype=torch.float32)

    def inner(log_lam, w):
        return F.mse_loss(functional_call(net, w, (X,)), t) + 0.5 * log_lam.exp() * sum((v ** 2).sum()
                                                                                     for v in w.values())

    def outer(log_lam, w):
        return F.mse_loss(functional_call(net, w, (X[:10],)), t[:10])

    return net, inner, outer


@pytest.mark.parametrize("method", ["implicit", "unrolled", "one_step", "penalty", "meha", "bamm", "bda"])
def test_float64_hyperparameter_with_float32_module_parameters(method):
    net, inner, outer = _linear_model_problem()
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    lam = torch.tensor(-1.0, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bilevel.BilevelWarning)
        r = bilevel.solve(outer, inner, lam, dict(net.named_parameters()), method=method, max_steps=3,
                          progress=False, **({"steps": 10} if method == "unrolled" else {}))
    assert r.x.dtype == torch.float64 and all(v.dtype == torch.float32 for v in r.y.values())
    assert not r.x.requires_grad and not any(v.requires_grad for v in r.y.values())
    assert all(torch.equal(before[k], v) for k, v in net.named_parameters())  # module untouched
    assert float(lam) == -1.0


@pytest.mark.parametrize("method", ["penalty", "meha", "bamm", "bda"])
def test_single_loop_float64_upper_float32_lower_with_zero_hessian_block(method):
    inner = lambda x, y: 0.5 * (y ** 2).sum() - (x.float() * y).sum()  # y* = x
    outer = lambda x, y: 0.5 * ((y - 1) ** 2).sum()  # x* = 1
    r = bilevel.solve(outer, inner, torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float32),
                      method=method, max_steps=300, progress=False)
    assert r.x.dtype == torch.float64 and float((r.x - 1).abs().max()) < 0.05


def test_hypergrad_dtype_follows_upper_variable():
    net, inner, outer = _linear_model_problem()
    w = {k: v.detach() for k, v in net.named_parameters()}
    for dtype in (torch.float32, torch.float64):
        g = _quiet(bilevel.hypergrad, outer, inner, torch.tensor(-1.0, dtype=dtype), w)
        assert g.dtype == dtype and torch.isfinite(g)


def test_bad_inputs_give_clear_errors():
    net, inner, outer = _linear_model_problem()
    w = {k: v.detach() for k, v in net.named_parameters()}
    lam = torch.tensor(-1.0)
    with pytest.raises(ValueError, match="scalar"):
        bilevel.hypergrad(lambda x, y: functional_call(net, y, (torch.randn(5, 4, dtype=torch.float32),)), inner, lam, w)
    with pytest.raises(ValueError, match="scalar"):
        bilevel.solve(outer, lambda x, y: functional_call(net, y, (torch.randn(5, 4, dtype=torch.float32),)), lam, w, max_steps=1,
                      progress=False)
    with pytest.raises(TypeError, match="floating"):
        bilevel.solve(outer, inner, torch.tensor(0), w, max_steps=1, progress=False)
    with pytest.raises(TypeError, match="floating"):
        bilevel.hypergrad(outer, inner, torch.tensor(0), w)
    with pytest.raises(FloatingPointError):
        bilevel.solve(outer, lambda x, y: inner(x, y) * float("nan"), lam, w, max_steps=1, progress=False)
    with pytest.raises(ValueError, match="known methods"):
        bilevel.solve(outer, inner, lam, w, method="maml", max_steps=1, progress=False)
    with pytest.raises(TypeError, match="does not take"):
        bilevel.solve(outer, inner, lam, w, method="meha", steps=3, max_steps=1, progress=False)
    with pytest.raises(TypeError, match="leaf"):
        bilevel.hypergrad(outer, inner, lam, {**w, "extra": None})
    with pytest.raises(ValueError, match="structure and shapes"):
        bilevel.custom_root(lambda s, a: (s - a).sum())(lambda a: a.clone())(
            torch.ones(3, requires_grad=True)).sum().backward()
    with pytest.raises(FloatingPointError, match="non-finite"):
        bilevel.custom_root(lambda s, a: s - a)(lambda a: a * float("nan"))(torch.ones(3, requires_grad=True))
    with pytest.raises(bilevel.BilevelError, match="optimality residual"):
        bilevel.hypergrad(lambda x, y: ((y - 3) ** 2).sum(), lambda x, y: ((y - x) ** 2).sum(), torch.zeros(2),
                          torch.ones(2), strict=True)


# --------------------------------------------------------------------------- device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["implicit", "penalty", "meha", "bamm", "bda", "one_step", "unrolled"])
def test_cuda_module_parameters_stay_on_device_and_dtype(method):
    torch.manual_seed(0)
    dev = torch.device("cuda")
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(dev, torch.float32)
    X, Xv = torch.randn(50, 3, device=dev, dtype=torch.float32), torch.randn(30, 3, device=dev, dtype=torch.float32)
    lab, labv = torch.randint(0, 2, (50,), device=dev), torch.randint(0, 2, (30,), device=dev)

    def inner(x, y):
        losses = F.cross_entropy(functional_call(net, y, (X,)), lab, reduction="none")
        return (torch.sigmoid(x) * losses).mean() + 1e-2 * sum((v ** 2).sum() for v in y.values())

    def outer(x, y):
        return F.cross_entropy(functional_call(net, y, (Xv,)), labv)

    x0 = torch.zeros(50, device=dev, dtype=torch.float32)  # mixed dtypes: see the xfail test above
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bilevel.BilevelWarning)
        r = bilevel.solve(outer, inner, x0, dict(net.named_parameters()), method=method, max_steps=20,
                          progress=False, **({"steps": 10} if method == "unrolled" else {}))
    assert r.x.device.type == "cuda" and r.x.dtype == torch.float32
    assert all(v.device.type == "cuda" and v.dtype == torch.float32 for v in r.y.values())
    assert all(map(torch.isfinite, map(torch.tensor, r.history["outer"])))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("solve", [None, CG(), Neumann(terms=300, alpha=0.2), GMRES()], ids=["default", "cg", "neumann", "gmres"])
def test_cuda_vmap_hypergrad_matches_closed_form(solve):
    p = bilevel.problems.quadratic()
    dev = torch.device("cuda")
    A, B, yt = (p.data[k].to(dev) for k in ("A", "B", "y_target"))

    def inner(x, y):
        return 0.5 * y @ (A @ y) - y @ (B @ x)

    def outer(x, y):
        return 0.5 * ((y - yt) ** 2).sum() + 0.5 * p.data["rho"] * (x ** 2).sum()

    xs = torch.randn(4, 3, dtype=torch.float64)
    ys = torch.stack([p.inner_solution(x) for x in xs])
    g = vmap(lambda x, y: bilevel.hypergrad(outer, inner, x, y, solve=solve))(xs.to(dev), ys.to(dev))
    assert g.device.type == "cuda"
    torch.testing.assert_close(g.cpu(), torch.stack([p.hypergradient(x) for x in xs]), rtol=1e-9, atol=1e-11)
