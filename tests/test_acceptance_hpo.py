"""Acceptance tests: hyper-parameter optimization (``bilevel.hpo``) and differentiable outside solvers.

Written from the papers and from other libraries' test suites against the public
API of DESIGN.md:

* IFT hyper-parameter optimization with one hyper-parameter per weight (Lorraine,
  Vicol & Duvenaud, AISTATS 2020): hypergradients against closed forms and dense
  references, the Neumann series' known truncation, convergence to a known
  optimum, thousands of hyper-parameters without dense matrices, resume,
  progress, dtypes, bad input.
* Best-response hypernetworks (Lorraine & Duvenaud 2018; Self-Tuning Networks,
  MacKay et al. 2019) on a toy whose best response is known.
* ``custom_root`` / ``custom_fixed_point`` around solvers the library does not own
  (``scipy.optimize.minimize`` / ``root`` / ``fixed_point``, ``torch.optim``
  loops, ``torch.optim.LBFGS``) and the library's bridges and least-squares
  solvers, as in JAXopt's ``implicit_diff`` tests and TorchOpt / Theseus:
  float64 finite differences, ``torch.autograd.gradcheck``, closed forms.

Every problem is seeded; no test depends on the global random state unless it
sets it.  Tolerances are derived in the comments next to them.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings

import numpy as np
import pytest
import scipy.optimize
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves as _pytree_leaves

import bilevel
from bilevel.hpo import (
    Hyper,
    HypernetworkHPO,
    HyperSpec,
    ImplicitHPO,
    LinearBestResponse,
    hypernetwork_hpo,
    implicit_hpo,
    l2_penalty,
)
from bilevel.implicit import CG, Neumann, stationarity
from bilevel.solvers import (
    LBFGS,
    GaussNewton,
    LevenbergMarquardt,
    OptimizerLoop,
    ScipyMinimize,
)
from bilevel.status import BilevelWarning, CapturedTensorWarning, ConvergenceWarning

F64 = torch.float64


# ----------------------------------------------------------------------------- helpers


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _orthogonal_design(n, coef, noise, g, dtype=F64):
    """Inputs X (n x d) with X^T X / n = I and targets X coef + noise * r, r orthogonal to X's columns."""
    d = coef.numel()
    Q, _ = torch.linalg.qr(torch.randn(n, d + 1, generator=g, dtype=dtype))
    X = math.sqrt(n) * Q[:, :d]
    r = math.sqrt(n) * Q[:, d]
    return X, X @ coef + noise * r


def _mse(model, batch):
    x, t = batch
    return 0.5 * ((model(x).squeeze(-1) - t) ** 2).mean()


def _ridge_train_loss(model, batch, hp):
    return _mse(model, batch) + 0.5 * (hp["decay"]["weight"] * model.weight ** 2).sum()


def _linear(d, weight=None, dtype=F64, bias=False):
    """nn.Linear(d, 1) with given (or seeded) weights, zero bias: independent of the global RNG."""
    model = nn.Linear(d, 1, bias=bias).to(dtype)
    if weight is None:
        weight = 0.1 * torch.randn(d, generator=_gen(99), dtype=dtype)
    with torch.no_grad():
        model.weight.copy_(weight.reshape(1, -1))
        if bias:
            model.bias.zero_()
    return model


def _regression_data(n=40, d=5, seed=0, dtype=F64, noise=0.5):
    g = _gen(seed)
    X, Xv = torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.randn(d, generator=g, dtype=dtype)
    t = X @ w + noise * torch.randn(n, generator=g, dtype=dtype)
    tv = Xv @ w + noise * torch.randn(n, generator=g, dtype=dtype)
    return (X, t), (Xv, tv)


def _flat(tree):
    return torch.cat([t.reshape(-1) for t in _pytree_leaves(tree)])


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor any ATen op produces while active."""

    def __init__(self):
        super().__init__()
        self.max = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in _pytree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.max = max(self.max, t.numel())
        return out


def _no_bilevel_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, BilevelWarning)]


# ============================================================================= 1. IFT HPO


# Independent transforms lambda = T(rho) (spec.py's table, re-derived here).
_TRANSFORMS = {
    "exp": ({"low": 0.0}, lambda r: r.exp()),
    "softplus": ({"low": 0.0, "transform": "softplus"}, lambda r: torch.nn.functional.softplus(r)),
    "sigmoid": ({"low": 0.0, "high": 10.0}, lambda r: 10.0 * torch.sigmoid(r)),
    "log-sigmoid": ({"low": 1e-3, "high": 10.0, "log": True},
                    lambda r: torch.exp(math.log(1e-3) + (math.log(10.0) - math.log(1e-3)) * torch.sigmoid(r))),
}


@pytest.mark.parametrize("kind", sorted(_TRANSFORMS))
def test_per_feature_ridge_hypergradient_matches_closed_form_in_raw_coordinates(kind):
    """Per-feature L2 on ridge regression: w*(lam) = (X^T X/n + diag lam)^-1 X^T t/n in closed
    form, so dPhi/drho = autograd through that solve composed with lam = T(rho).  At the exact
    w* and with CG run to 1e-13 on a 6x6 SPD system the IFT is exact up to rounding:
    rtol 1e-8 leaves ~5 digits of margin for cond(H) ~ 10 in float64."""
    (X, t), (Xv, tv) = _regression_data(n=30, d=6, seed=1)
    bounds, T = _TRANSFORMS[kind]
    init = torch.tensor([0.3, 1.0, 2.0, 0.05, 0.7, 4.0], dtype=F64)
    n = X.shape[0]

    def w_star(lam):
        return torch.linalg.solve(X.T @ X / n + torch.diag(lam), X.T @ t / n)

    hyper = Hyper(init.reshape(1, -1), per_weight="weight", **bounds)
    model = _linear(6, w_star(init))
    tuner = ImplicitHPO(model, _ridge_train_loss, _mse, [(X, t)], [(Xv, tv)], {"decay": hyper}, progress=False)
    torch.testing.assert_close(tuner.hparams["decay"]["weight"].reshape(-1), init, rtol=1e-12, atol=0)
    g, info = tuner.hypergradient((X, t), (Xv, tv), solve=CG(maxiter=50, tol=1e-13))

    rho = hyper.to_raw(init).detach().requires_grad_()
    phi = 0.5 * ((Xv @ w_star(T(rho)) - tv) ** 2).mean()
    (expected,) = torch.autograd.grad(phi, rho)
    torch.testing.assert_close(g["decay"]["weight"].reshape(-1), expected, rtol=1e-8, atol=1e-14)
    assert float(info.optimality_residual) < 1e-12  # the weights were the exact minimizer


def test_fixed_shape_vector_hyper_parameter_and_damping_follow_their_definitions():
    """Hyper(shape=(d,)) as one decay per input feature (not tied to a parameter name): the
    hypergradient equals the closed form.  With damping eps the tuner's documented system is
    (H + eps I) v = grad L_V, so the result is exactly -C^T (H + eps I)^-1 b (dense reference)."""
    (X, t), (Xv, tv) = _regression_data(n=30, d=4, seed=31)
    n, lam0 = X.shape[0], torch.tensor([0.3, 1.0, 2.0, 0.05], dtype=F64)

    def train_loss(m, batch, hp):
        return _mse(m, batch) + 0.5 * (hp["decay"] * m.weight.reshape(-1) ** 2).sum()

    def w_star(lam):
        return torch.linalg.solve(X.T @ X / n + torch.diag(lam), X.T @ t / n)

    spec = {"decay": Hyper(lam0, low=0.0, shape=(4,))}
    w = w_star(lam0)
    rho = lam0.log().requires_grad_()
    (exact,) = torch.autograd.grad(0.5 * ((Xv @ w_star(rho.exp()) - tv) ** 2).mean(), rho)
    H, b = X.T @ X / n + torch.diag(lam0), Xv.T @ (Xv @ w - tv) / Xv.shape[0]
    for eps in (0.0, 0.5):
        tuner = ImplicitHPO(_linear(4, w), train_loss, _mse, [(X, t)], [(Xv, tv)], spec, damping=eps, progress=False)
        g, info = tuner.hypergradient((X, t), (Xv, tv), solve=CG(maxiter=50, tol=1e-13))
        assert g["decay"].shape == (4,)
        reference = -(lam0 * w) * torch.linalg.solve(H + eps * torch.eye(4, dtype=F64), b)
        torch.testing.assert_close(g["decay"], reference, rtol=1e-9, atol=1e-15)
        if eps == 0.0:
            torch.testing.assert_close(g["decay"], exact, rtol=1e-9, atol=1e-15)
        else:
            assert info.damping == eps and not torch.allclose(g["decay"], exact, rtol=1e-3)


def test_neumann_terms_follow_the_truncated_series_identity():
    """ALGORITHMS.md §1 / DESIGN: Neumann(terms=K, alpha) = alpha sum_{k<K} (I - alpha H)^k b
    = H^-1 (I - (I - alpha H)^K) b, so the K-term hypergradient is -C^T of that, exactly
    (up to rounding), for every K.  H, C, b are built densely from the closed forms of ridge."""
    (X, t), (Xv, tv) = _regression_data(n=25, d=4, seed=2)
    n, lam = X.shape[0], torch.tensor([0.5, 0.1, 1.0, 0.2], dtype=F64)
    H = X.T @ X / n + torch.diag(lam)
    w = torch.linalg.solve(H, X.T @ t / n)
    b = Xv.T @ (Xv @ w - tv) / n  # grad_w L_V
    C = torch.diag(lam * w)  # d(grad_w L_T)/d rho for lam = exp(rho): d/d rho_i (lam_i w_i) = lam_i w_i e_i
    tuner = ImplicitHPO(_linear(4, w), _ridge_train_loss, _mse, [(X, t)], [(Xv, tv)],
                        {"decay": Hyper(lam.reshape(1, -1), low=0.0, per_weight="weight")}, progress=False)
    alpha = float(0.9 / torch.linalg.eigvalsh(H)[-1])
    eye = torch.eye(4, dtype=F64)
    errors = []
    for K in (1, 2, 7, 30):
        g, _ = tuner.hypergradient((X, t), (Xv, tv), solve=Neumann(terms=K, alpha=alpha))
        v_K = torch.linalg.solve(H, (eye - torch.linalg.matrix_power(eye - alpha * H, K)) @ b)
        torch.testing.assert_close(g["decay"]["weight"].reshape(-1), -C.T @ v_K, rtol=1e-10, atol=1e-14)
        errors.append(float((g["decay"]["weight"].reshape(-1) + C.T @ torch.linalg.solve(H, b)).norm()))
    assert all(later < earlier for earlier, later in itertools.pairwise(errors)), errors


def test_logistic_per_weight_hypergradient_matches_dense_reference_and_finite_differences():
    """Logistic regression (weight and bias), one decay per parameter entry.  Weights set to the
    training minimum by Newton's method (quadratic convergence: gradient ~1e-15); the dense
    reference is -C^T H^-1 grad L_V with torch.func Hessians.  A central difference of the
    hyper-objective Phi(rho) = L_V(w*(rho)) with step 1e-5 has truncation error O(h^2) ~ 1e-10
    and rounding ~1e-16/1e-5 relative, so 1e-6 relative agreement is a real check."""
    g = _gen(3)
    n, d = 60, 4
    X, Xv = torch.randn(n, d, generator=g, dtype=F64), torch.randn(n, d, generator=g, dtype=F64)
    w_true = torch.tensor([1.5, -2.0, 0.5, 0.0], dtype=F64)
    y = (torch.rand(n, generator=g, dtype=F64) < torch.sigmoid(X @ w_true + 0.3)).to(F64)
    yv = (torch.rand(n, generator=g, dtype=F64) < torch.sigmoid(Xv @ w_true + 0.3)).to(F64)
    bce = nn.functional.binary_cross_entropy_with_logits

    def val_loss(m, batch):
        return bce(m(batch[0]).squeeze(-1), batch[1])

    def train_loss(m, batch, hp):
        return val_loss(m, batch) + l2_penalty(m, {**hp["dw"], **hp["db"]})

    def flat_train(w, rho):  # w = (weight[4], bias), rho the raw decays (same layout)
        lam = rho.exp()
        return bce(X @ w[:d] + w[d], y) + 0.5 * (lam * w * w).sum()

    def flat_val(w):
        return bce(Xv @ w[:d] + w[d], yv)

    lam0 = torch.tensor([0.05, 0.2, 0.01, 0.1, 0.03], dtype=F64)
    rho0 = lam0.log()

    def minimize(rho):
        w = torch.zeros(d + 1, dtype=F64)
        for _ in range(30):
            step = torch.linalg.solve(hessian(flat_train)(w, rho), grad(flat_train)(w, rho))
            w = w - step
        return w

    w0 = minimize(rho0)
    assert float(grad(flat_train)(w0, rho0).norm()) < 1e-13
    model = nn.Linear(d, 1).to(F64)
    with torch.no_grad():
        model.weight.copy_(w0[:d].reshape(1, -1))
        model.bias.copy_(w0[d:])
    spec = HyperSpec(dw=Hyper(lam0[:d].reshape(1, d), low=0.0, per_weight="weight"),
                     db=Hyper(lam0[d:], low=0.0, per_weight="bias"))
    tuner = ImplicitHPO(model, train_loss, val_loss, [(X, y)], [(Xv, yv)], spec, progress=False)
    got, _ = tuner.hypergradient((X, y), (Xv, yv), solve=CG(maxiter=100, tol=1e-14))
    got = torch.cat([got["dw"]["weight"].reshape(-1), got["db"]["bias"].reshape(-1)])

    H = hessian(flat_train)(w0, rho0)
    C = jacrev(grad(flat_train), argnums=1)(w0, rho0)  # d(grad_w)/d rho, (d+1) x (d+1)
    reference = -C.T @ torch.linalg.solve(H, grad(flat_val)(w0))
    torch.testing.assert_close(got, reference, rtol=1e-9, atol=1e-15)

    direction = torch.randn(d + 1, generator=g, dtype=F64)
    h = 1e-5
    fd = (flat_val(minimize(rho0 + h * direction)) - flat_val(minimize(rho0 - h * direction))) / (2 * h)
    assert float(got @ direction) == pytest.approx(float(fd), rel=1e-6)


def test_tuning_per_feature_ridge_reaches_the_known_optimum():
    """A per-feature ridge problem with a known answer.  Train inputs with X^T X / n = I and
    X^T t / n = a, validation inputs with Xv^T Xv / m = I and Xv^T tv / m = c: then
    w_i*(lam) = a_i / (1 + lam_i) and L_V = 0.5 ||w - c||^2 + const, minimized at
    lam_i* = a_i / c_i - 1 (all positive here), with L_V* = 0.5 * noise_v^2.  The training
    Hessian is diagonal, so even a truncated Neumann series scales each coordinate of the
    hypergradient by a positive factor and leaves the fixed point exactly at lam*: the tuned
    values must approach lam*, not a Neumann-biased point."""
    g = _gen(4)
    a = torch.tensor([2.0, 3.0, -4.0, 1.5, 0.8], dtype=F64)
    c = torch.tensor([1.0, 1.0, -2.0, 1.0, 0.4], dtype=F64)
    lam_star = a / c - 1  # [1, 2, 1, 0.5, 1]
    X, t = _orthogonal_design(50, a, 0.7, g)
    Xv, tv = _orthogonal_design(40, c, 0.3, g)
    spec = HyperSpec(decay=Hyper(0.2, low=0.0, per_weight="weight"))
    result = implicit_hpo(_linear(5), _ridge_train_loss, _mse, [(X, t)], [(Xv, tv)], spec, max_steps=120,
                          inner_steps=20, inner_lr=0.5, hyper_lr=0.05, progress=False)
    val = result.history["val_loss"]
    assert val[-1] < 0.5 * val[0]
    assert val[-1] == pytest.approx(0.5 * 0.3 ** 2, rel=2e-3)  # the irreducible validation loss
    torch.testing.assert_close(result.hparams["decay"]["weight"].reshape(-1), lam_star, rtol=2e-2, atol=0)
    assert result.history["hparams"]["decay.weight"][-1] == pytest.approx(float(lam_star.mean()), rel=2e-2)
    # Warm-started training keeps up: 20 SGD steps of contraction |1 - 0.5 (1 + lam)| <= 0.5 per
    # hyper-step leave the weights at the training minimum of the decays they were trained with
    # (those of the step before the last hyper-update, which moves lam by < 0.1%).
    assert result.history["inner_residual"][-1] < 1e-5
    lam = result.hparams["decay"]["weight"].reshape(-1)
    torch.testing.assert_close(result.model.weight.detach().reshape(-1), a / (1 + lam), rtol=1e-3, atol=1e-6)


def test_hyper_steps_reproduce_an_independent_implementation_of_lorraine_et_al():
    """Algorithm 2-3 of Lorraine, Vicol & Duvenaud (2020) as specified in ALGORITHMS.md §10,
    re-implemented here with torch.func: per hyper-step, T = 3 warm-started SGD steps on the
    cycled training batches at fixed lam; then, on the next training and validation batches,
    v = alpha sum_{k<10} (I - alpha H)^k grad_w L_V (alpha = the training lr, DESIGN's
    Neumann(terms=10)), hypergradient -(d^2 L_T / d rho dw) v, one Adam step on rho = log lam.
    Five hyper-steps of the tuner must match it to rounding (float64)."""
    g = _gen(30)
    batches = [(torch.randn(10, 4, generator=g, dtype=F64), torch.randn(10, generator=g, dtype=F64))
               for _ in range(4)]
    train, val = batches[:2], batches[2:]
    model = nn.Linear(4, 1).to(F64)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, 4, generator=g, dtype=F64))
        model.bias.fill_(0.3)
    lr, T, K = 0.1, 3, 10

    def loss_t(w, batch, lam):
        x, t = batch
        fit = 0.5 * ((x @ w["weight"].T + w["bias"] - t[:, None]) ** 2).mean()
        return fit + 0.5 * sum((lam[k] * w[k] ** 2).sum() for k in w)

    def loss_v(w, batch):
        x, t = batch
        return 0.5 * ((x @ w["weight"].T + w["bias"] - t[:, None]) ** 2).mean()

    w = {k: p.detach().clone() for k, p in model.named_parameters()}
    rho = {k: torch.full_like(p, math.log(0.05)).requires_grad_() for k, p in w.items()}
    adam = torch.optim.Adam(list(rho.values()), lr=0.05)
    tb = vb = 0
    for _ in range(5):
        lam = {k: r.detach().exp() for k, r in rho.items()}
        for _ in range(T):
            gw = grad(loss_t)(w, train[tb % 2], lam)
            w = {k: w[k] - lr * gw[k] for k in w}
            tb += 1
        batch_t, batch_v = train[tb % 2], val[vb % 2]
        tb, vb = tb + 1, vb + 1
        b = grad(loss_v)(w, batch_v)
        p, acc = b, b
        for _ in range(K - 1):
            hp = torch.func.jvp(functools.partial(grad(loss_t), batch=batch_t, lam=lam), (w,), (p,))[1]
            p = {k: p[k] - lr * hp[k] for k in p}
            acc = {k: acc[k] + p[k] for k in acc}
        v = {k: lr * acc[k] for k in acc}

        def cross(r, w, batch_t, v):
            gw_ = grad(loss_t)(w, batch_t, {k: r[k].exp() for k in r})
            return sum((gw_[k] * v[k]).sum() for k in v)

        g_rho = grad(cross)({k: r.detach() for k, r in rho.items()}, w, batch_t, v)
        for k, r in rho.items():
            r.grad = -g_rho[k]
        adam.step()

    spec = {"decay": Hyper(0.05, low=0.0, per_weight=True)}
    result = implicit_hpo(model, lambda m, b_, hp: _mse(m, b_) + l2_penalty(m, hp["decay"]), _mse, train, val,
                          spec, max_steps=5, inner_steps=T, inner_optimizer="sgd", inner_lr=lr,
                          hyper_optimizer="adam", hyper_lr=0.05, progress=False)
    for k in w:
        torch.testing.assert_close(result.hparams["decay"][k], rho[k].detach().exp(), rtol=1e-10, atol=0)
        torch.testing.assert_close(dict(result.model.named_parameters())[k].detach(), w[k], rtol=1e-10, atol=1e-14)
    assert result.train_steps == 5 * T


def test_thousands_of_hyper_parameters_do_not_materialize_dense_matrices():
    """3000 per-weight decays: a dense Hessian or cross Jacobian would hold 9e6 entries.  Every
    tensor produced by any ATen op during two hyper-steps (Neumann default and CG) must stay
    far below that; the largest legitimate ones are O(n d) = 1.9e5 (the data)."""
    g = _gen(5)
    n, d = 64, 3000
    X, Xv = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    w = torch.randn(d, generator=g) / math.sqrt(d)
    train, val = [(X, X @ w + 0.1 * torch.randn(n, generator=g))], [(Xv, Xv @ w)]
    spec = {"decay": Hyper(0.1, low=0.0, per_weight="weight")}

    probe = _MaxNumel()  # positive control: the instrument does see a dense d x d matrix
    with probe:
        torch.func.hessian(lambda v: (v ** 2).sum() ** 2)(torch.ones(d))
    assert probe.max >= d * d

    for solve in (None, CG(maxiter=20)):
        tuner = ImplicitHPO(_linear(d, dtype=torch.float32), _ridge_train_loss, _mse, train, val, spec, inner_steps=3,
                            inner_lr=0.01, hyper_lr=0.01, solve=solve, progress=False)
        assert tuner.spec.numel() == d
        with _MaxNumel() as probe:
            result = tuner.run(2)
        assert probe.max <= 2 * n * d, probe.max
        assert result.hparams["decay"]["weight"].shape == (1, d)
        assert all(math.isfinite(v) for v in result.history["hypergradient_norm"])
        assert result.history["hypergradient_norm"][0] > 0

    # the same through bilevel.hypergrad with its default linear solve, weights at the ridge minimum
    lam = torch.full((d,), 0.1)

    def inner(x, w_):
        return 0.5 * ((X @ w_ - train[0][1]) ** 2).mean() + 0.5 * (x.exp() * w_ ** 2).sum()

    def outer(x, w_):
        return 0.5 * ((Xv @ w_ - val[0][1]) ** 2).mean()

    w_star = bilevel.solvers.LBFGS().run(lambda w_, x: inner(x, w_), torch.zeros(d), lam.log())[0]
    with _MaxNumel() as probe:
        hg = bilevel.hypergrad(outer, inner, lam.log(), w_star)
    assert probe.max <= 2 * n * d, probe.max
    assert hg.shape == (d,) and bool(torch.isfinite(hg).all())


def test_per_example_weights_hypergradient_matches_dense_reference():
    """Data re-weighting (one hyper-parameter per training example, Hyper(per_example=True)):
    L_T = sum_i s_i (x_i w - t_i)^2 / (2n) + 0.5 mu ||w||^2 with s_i = sigmoid(rho_i) in (0, 1).
    Closed form w*(s) = (X^T S X / n + mu I)^-1 X^T S t / n, differentiated by autograd."""
    g = _gen(6)
    n, d, mu = 24, 3, 0.1
    X, Xv = torch.randn(n, d, generator=g, dtype=F64), torch.randn(n, d, generator=g, dtype=F64)
    w_true = torch.randn(d, generator=g, dtype=F64)
    t, tv = X @ w_true, Xv @ w_true
    t[:5] += 3.0  # corrupted labels the re-weighting should learn to down-weight
    s0 = torch.full((n,), 0.5, dtype=F64)

    def w_star(s):
        return torch.linalg.solve(X.T @ (s[:, None] * X) / n + mu * torch.eye(d, dtype=F64), X.T @ (s * t) / n)

    dataset = torch.utils.data.TensorDataset(torch.arange(n), X, t)
    loader = torch.utils.data.DataLoader(dataset, batch_size=n, shuffle=False)

    def train_loss(m, batch, hp):
        idx, x, target = batch
        s = hp["weights"][idx]
        return 0.5 * (s * (m(x).squeeze(-1) - target) ** 2).mean() + 0.5 * mu * (m.weight ** 2).sum()

    spec = {"weights": Hyper(0.5, low=0.0, high=1.0, per_example=True)}
    tuner = ImplicitHPO(_linear(d, w_star(s0)), train_loss, _mse, loader, [(Xv, tv)], spec, progress=False)
    assert tuner.hparams["weights"].shape == (n,)
    got, _ = tuner.hypergradient(next(iter(loader)), (Xv, tv), solve=CG(maxiter=50, tol=1e-13))
    rho = torch.zeros(n, dtype=F64, requires_grad=True)  # sigmoid(0) = 0.5
    phi = 0.5 * ((Xv @ w_star(torch.sigmoid(rho)) - tv) ** 2).mean()
    (expected,) = torch.autograd.grad(phi, rho)
    torch.testing.assert_close(got["weights"], expected, rtol=1e-8, atol=1e-14)
    # descending the hypergradient down-weights the corrupted examples on average, up-weights the clean ones
    assert float(got["weights"][:5].mean()) > 0 > float(got["weights"][5:].mean())


def test_bounded_hyper_parameters_stay_admissible_under_aggressive_steps():
    """The raw (logit / log) parametrization keeps every value inside its bounds whatever the step."""
    train, val = _regression_data(n=30, d=4, seed=7)

    def train_loss(m, batch, hp):
        return _mse(m, batch) * hp["scale"] + 0.5 * hp["decay"] * (m.weight ** 2).sum()

    spec = {"decay": Hyper(0.5, low=1e-4, high=2.0, log=True), "scale": Hyper(0.5, low=0.1, high=1.0)}
    result = implicit_hpo(_linear(4), train_loss, _mse, [train], [val], spec, max_steps=15, hyper_lr=2.0,
                          inner_steps=5, progress=False)
    for values, (low, high) in ((result.history["hparams"]["decay"], (1e-4, 2.0)),
                                (result.history["hparams"]["scale"], (0.1, 1.0))):
        assert all(low < v < high for v in values), values
    assert 1e-4 < float(result.hparams["decay"]) < 2.0


# ----------------------------------------------------------------------------- resume, progress, dtypes


def _shuffled_tuner(seed_loader=11, **options):
    (X, t), (Xv, tv) = _regression_data(n=48, d=6, seed=8, dtype=torch.float32)
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, t), batch_size=8, shuffle=True,
                                        generator=_gen(seed_loader))
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(Xv, tv), batch_size=16, shuffle=True,
                                      generator=_gen(seed_loader + 1))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))

    def train_loss(m, batch, hp):
        return _mse(m, batch) + l2_penalty(m, hp["decay"])

    return ImplicitHPO(model, train_loss, _mse, train, val, {"decay": Hyper(1e-2, low=0.0, per_weight=True)},
                       inner_steps=3, inner_optimizer="sgd", inner_lr=0.05, hyper_lr=0.05, damping=1e-3,
                       progress=False, **options)


def test_resume_of_a_long_run_from_a_saved_checkpoint_ends_where_the_uninterrupted_run_ends(tmp_path):
    """Shuffling mini-batch loaders, SGD + Adam states, per-weight hyper-parameters: a run
    stopped after 7 hyper-steps, saved to disk, loaded into a *fresh* tuner (new loaders) and
    continued to 16 must be bit-identical to 16 uninterrupted hyper-steps."""
    whole = _shuffled_tuner().run(16)

    first = _shuffled_tuner()
    partial = first.run(7)
    path = tmp_path / "hpo.pt"
    torch.save(partial.state, path)
    torch.manual_seed(1234)  # the global random state is part of the checkpoint, not of this process
    state = torch.load(path, weights_only=False)
    resumed = _shuffled_tuner().load_state_dict(state).run(16)

    assert resumed.history["step"] == list(range(1, 17))
    assert resumed.history["val_loss"] == whole.history["val_loss"]
    assert resumed.train_steps == whole.train_steps == 16 * 3
    for name in whole.hparams["decay"]:
        assert torch.equal(resumed.hparams["decay"][name], whole.hparams["decay"][name])
    for p, q in zip(resumed.model.parameters(), whole.model.parameters()):
        assert torch.equal(p, q)


def test_checkpoint_loads_with_torch_load_weights_only(tmp_path):
    """torch.load defaults to weights_only=True; a checkpoint made of tensors and plain data
    (as documented: 'tensors and plain data, torch.save-able') should load that way too."""
    partial = _shuffled_tuner().run(2)
    path = tmp_path / "hpo.pt"
    torch.save(partial.state, path)
    state = torch.load(path)  # the default, weights_only=True
    resumed = _shuffled_tuner().load_state_dict(state).run(3)
    assert resumed.history["step"] == [1, 2, 3]


def test_resume_through_implicit_hpo_function():
    (X, t), (Xv, tv) = _regression_data(n=30, d=3, seed=9)
    model = _linear(3, torch.tensor([0.5, -0.5, 1.0], dtype=F64))
    args = (model, _ridge_train_loss, _mse, [(X, t)], [(Xv, tv)], {"decay": Hyper(0.3, low=0.0, per_weight="weight")})
    whole = implicit_hpo(*args, max_steps=10, inner_steps=4, progress=False)
    half = implicit_hpo(*args, max_steps=4, inner_steps=4, progress=False)
    rest = implicit_hpo(*args, max_steps=10, inner_steps=4, progress=False, resume=half.state)
    assert torch.equal(rest.hparams["decay"]["weight"], whole.hparams["decay"]["weight"])
    assert rest.history["val_loss"] == whole.history["val_loss"]
    assert half.message == "reached max_steps=4" and rest.train_steps == 40
    # the model handed in is copied, never trained in place
    assert torch.equal(model.weight.detach(), torch.tensor([[0.5, -0.5, 1.0]], dtype=F64))
    assert not torch.equal(whole.model.weight, model.weight)
    nothing = implicit_hpo(*args, max_steps=0, progress=False, warmup_steps=2)
    assert nothing.history["val_loss"] == [] and nothing.train_steps == 2
    torch.testing.assert_close(nothing.hparams["decay"]["weight"], torch.full((1, 3), 0.3, dtype=F64))


def test_progress_bar_is_shown_by_default_and_silenced_on_request(capsys):
    (X, t), (Xv, tv) = _regression_data(n=20, d=3, seed=10)
    args = (_linear(3), _ridge_train_loss, _mse, [(X, t)], [(Xv, tv)],
            {"decay": Hyper(0.3, low=0.0, per_weight="weight")})
    implicit_hpo(*args, max_steps=3, inner_steps=2, progress=False)
    quiet = capsys.readouterr()
    assert quiet.err == "" and quiet.out == ""
    implicit_hpo(*args, max_steps=3, inner_steps=2)  # progress=True is the documented default
    shown = capsys.readouterr()
    assert "implicit HPO" in shown.err and "3/3" in shown.err
    tuner = ImplicitHPO(*args, inner_steps=2, progress=True)
    tuner.run(2, progress=False)  # the per-run override wins
    assert capsys.readouterr().err == ""
    train_loss, val_loss = _toy_losses()
    HypernetworkHPO(_Vector(3), train_loss, val_loss, [0], [0], {"lam": Hyper(0.0)}).run(2)
    assert "hypernetwork HPO" in capsys.readouterr().err


def test_callback_sees_every_record_and_can_stop_the_run():
    (X, t), (Xv, tv) = _regression_data(n=20, d=3, seed=10)
    seen = []

    def callback(tuner, record):
        seen.append(dict(record))
        return record["step"] == 4

    result = implicit_hpo(_linear(3), _ridge_train_loss, _mse, [(X, t)], [(Xv, tv)],
                          {"decay": Hyper(0.3, low=0.0, per_weight="weight")}, max_steps=50, inner_steps=2,
                          callback=callback, progress=False)
    assert [r["step"] for r in seen] == [1, 2, 3, 4]
    assert result.message == "stopped by the callback"
    assert len(result.history["val_loss"]) == 4 and result.train_steps == 8
    for key in ("train_loss", "val_loss", "hypergradient_norm", "inner_residual", "linear_residual"):
        assert key in seen[0] and len(result.history[key]) == 4


def test_float32_model_gives_float32_hyper_parameters_without_warnings():
    """dtype follows the model: a float32 nn.Linear (torch's default) tunes float32
    hyper-parameters, with default tolerances that do not warn in float32."""
    (X, t), (Xv, tv) = _regression_data(n=40, d=4, seed=12, dtype=torch.float32)
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = implicit_hpo(nn.Linear(4, 1), lambda m, b, hp: _mse(m, b) + l2_penalty(m, hp["decay"]), _mse,
                              [(X, t)], [(Xv, tv)], {"decay": Hyper(0.5, low=0.0, per_weight=True)}, max_steps=20,
                              inner_steps=10, hyper_lr=0.1, progress=False)
    assert _no_bilevel_warnings(record) == []
    assert all(v.dtype == torch.float32 for v in result.hparams["decay"].values())
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    assert result.history["val_loss"][-1] < result.history["val_loss"][0]


def test_float64_batches_follow_a_float64_model():
    """Batches are moved to the model's dtype: float32 data with a float64 model trains in float64."""
    (X, t), (Xv, tv) = _regression_data(n=20, d=3, seed=13, dtype=torch.float32)
    result = implicit_hpo(_linear(3), _ridge_train_loss, _mse, [(X, t)], [(Xv, tv)],
                          {"decay": Hyper(0.3, low=0.0, per_weight="weight")}, max_steps=2, progress=False)
    assert result.hparams["decay"]["weight"].dtype == F64


# ----------------------------------------------------------------------------- bad input


def test_bad_hpo_input_gives_clear_errors():
    (X, t), (Xv, tv) = _regression_data(n=20, d=3, seed=14)
    good = {"model": _linear(3), "train_loss": _ridge_train_loss, "val_loss": _mse, "train_loader": [(X, t)],
            "val_loader": [(Xv, tv)], "spec": {"decay": Hyper(0.3, low=0.0, per_weight="weight")}}

    def build(**changes):
        kw = {**good, **changes}
        return ImplicitHPO(kw.pop("model"), kw.pop("train_loss"), kw.pop("val_loss"), kw.pop("train_loader"),
                           kw.pop("val_loader"), kw.pop("spec"), progress=False, **kw)

    with pytest.raises(ValueError, match="init"):
        Hyper(-1.0, low=0.0)
    with pytest.raises(ValueError, match="low"):
        Hyper(0.5, low=1.0, high=0.0)
    with pytest.raises(ValueError, match="per_weight"):
        build(spec={"decay": Hyper(0.3, low=0.0, per_weight="0.weight")})
    with pytest.raises(TypeError, match="Hyper"):
        build(spec={"decay": 0.3})
    with pytest.raises(ValueError, match="empty"):
        build(val_loader=[])
    with pytest.raises(TypeError, match="re-iterable"):
        build(train_loader=iter([(X, t)]))
    with pytest.raises(ValueError, match="inner_lr|learning rate"):
        build(inner_lr=-0.1)
    with pytest.raises(ValueError, match="known names"):
        build(hyper_optimizer="adamw2")
    with pytest.raises(TypeError, match="solve"):
        build(solve="cg")
    with pytest.raises(ValueError, match="inner_steps"):
        build(inner_steps=0)
    with pytest.raises(TypeError, match="model"):
        build(model=lambda x: x)
    with pytest.raises(ValueError, match="scalar"):
        build(val_loss=lambda m, b: (m(b[0]).squeeze(-1) - b[1]) ** 2).run(1)
    with pytest.raises(KeyError, match="weight_decay.*decay"):
        build(train_loss=lambda m, b, hp: _mse(m, b) + hp["weight_decay"] * (m.weight ** 2).sum()).run(1)


def test_diverging_tuning_raises_floating_point_error_naming_the_step():
    (X, t), (Xv, tv) = _regression_data(n=20, d=3, seed=15)
    X = 100 * X  # training Hessian ~1e4: SGD with lr 1 diverges at once
    with pytest.raises(FloatingPointError, match="step"):
        implicit_hpo(_linear(3), _ridge_train_loss, _mse, [(X, t)], [(Xv, tv)],
                     {"decay": Hyper(0.3, low=0.0, per_weight="weight")}, max_steps=5, inner_steps=50, inner_lr=1.0,
                     progress=False)


def test_inexact_weights_and_a_diverging_neumann_series_are_warned_once_with_counts():
    """DESIGN, failure behaviour: a certificate that fails is recorded and warned once, with the
    residual.  (a) One SGD step per hyper-step leaves the weights far from stationary: with
    residual_tol=1e-6 every hyper-step fails the optimality certificate -> one OptimalityWarning
    counting 5 steps.  (b) Neumann with alpha = 10 > 2/L diverges -> one ConvergenceWarning, and the
    history's linear residual shows it (>> 1)."""
    (X, t), (Xv, tv) = _regression_data(n=40, d=4, seed=35)
    args = (_linear(4), _ridge_train_loss, _mse, [(X, t)], [(Xv, tv)],
            {"decay": Hyper(0.1, low=0.0, per_weight="weight")})
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        implicit_hpo(*args, max_steps=5, inner_steps=1, residual_tol=1e-6, progress=False)
    ours = [w for w in record if issubclass(w.category, BilevelWarning)]
    assert len(ours) == 1 and issubclass(ours[0].category, bilevel.OptimalityWarning), [str(w.message) for w in ours]
    assert "5 hyper-step" in str(ours[0].message)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = implicit_hpo(*args, max_steps=4, solve=Neumann(terms=50, alpha=10.0), progress=False)
    ours = [w for w in record if issubclass(w.category, BilevelWarning)]
    assert len(ours) == 1 and issubclass(ours[0].category, ConvergenceWarning), [str(w.message) for w in ours]
    assert "4 hyper-step" in str(ours[0].message) and "DIVERGED" in str(ours[0].message)
    assert min(result.history["linear_residual"]) > 1


def test_checkpoint_of_a_different_spec_is_refused():
    (X, t), (Xv, tv) = _regression_data(n=20, d=3, seed=16)
    a = implicit_hpo(_linear(3), _ridge_train_loss, _mse, [(X, t)], [(Xv, tv)],
                     {"decay": Hyper(0.3, low=0.0, per_weight="weight")}, max_steps=1, progress=False)
    other = ImplicitHPO(_linear(3), lambda m, b, hp: _mse(m, b) + hp["decay"] * (m.weight ** 2).sum(), _mse,
                        [(X, t)], [(Xv, tv)], {"decay": Hyper(0.3, low=0.0)}, progress=False)
    with pytest.raises(ValueError, match="spec"):
        other.load_state_dict(a.state)


# ============================================================================= 2. hypernetwork HPO


class _Vector(nn.Module):
    def __init__(self, d, dtype=F64):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d, dtype=dtype))

    def forward(self, x):
        return x @ self.w


_U = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
_V = torch.tensor([2.0, -1.0, 3.0], dtype=F64)


def _toy_losses():
    """L_T(w, lam) = 0.5 ||w - lam u||^2: best response w*(lam) = lam u (linear in lam, so both
    the linear and the gated best response can represent it exactly and the weight phase has
    zero loss at its optimum for every perturbation).  L_V(w) = 0.5 ||w - v||^2:
    Phi(lam) = 0.5 ||lam u - v||^2, minimized at lam* = u.v / u.u = 5.5 / 5.25."""

    def train_loss(m, batch, hp):
        return 0.5 * ((m.w - hp["lam"] * _U) ** 2).sum()

    def val_loss(m, batch):
        return 0.5 * ((m.w - _V) ** 2).sum()

    return train_loss, val_loss


@pytest.mark.parametrize("kind", ["linear", "gated"])
def test_hypernetwork_learns_the_known_best_response_and_the_optimal_hyper_parameter(kind):
    """Start far away (lam = -1, w = 0).  Linear best response with plain SGD in both phases: the
    weight phase interpolates (zero loss for every sampled lam at w0 = c u, D = u), so SGD
    converges to the exact best response, and the hyper phase is then gradient descent on the
    quadratic Phi (contraction 1 - 0.1 * 5.25 per step): lam -> lam* to 1e-3 and w_phi(lam) ->
    lam u to 2e-3 at lam* +- 0.2.  The gated (STN) response is bilinear in its parameters (gate
    times w1), unstable under that SGD step; with the default Adam optimizers at a constant
    lr = 0.05 both phases hover within O(lr) of their optimum, hence 2e-2 for that kind."""
    train_loss, val_loss = _toy_losses()
    lam_star = float(_U @ _V / (_U @ _U))
    if kind == "linear":
        options = {"weight_optimizer": "sgd", "weight_lr": 0.2, "hyper_optimizer": "sgd", "hyper_lr": 0.1}
        tol = (1e-3, 2e-3)
    else:
        options, tol = {"weight_lr": 0.05, "hyper_lr": 0.05}, (2e-2, 2e-2)
    tuner = HypernetworkHPO(_Vector(3), train_loss, val_loss, [0], [0], {"lam": Hyper(-1.0)}, best_response=kind,
                            weight_steps=10, sigma=0.3, warmup_steps=100, seed=0, progress=False, **options)
    result = tuner.run(150)
    lam = float(result.hparams["lam"].detach())
    assert lam == pytest.approx(lam_star, abs=tol[0])
    phi_star = 0.5 * float((lam_star * _U - _V).norm() ** 2)
    assert result.history["val_loss"][0] > 2 * phi_star
    assert result.history["val_loss"][-1] == pytest.approx(phi_star, abs=tol[0])
    for lam in (lam_star - 0.2, lam_star, lam_star + 0.2):
        torch.testing.assert_close(tuner.best_response_at({"lam": lam})["w"], lam * _U, rtol=0, atol=tol[1])
    torch.testing.assert_close(result.model.w.detach(), lam_star * _U, rtol=0, atol=2 * tol[1])


def test_returned_hyper_parameters_are_detached_snapshots():
    """HPOResult.hparams is documented as 'the tuned hyper-parameters', Tuner.hparams as
    'constrained values, detached': a result must not change when the tuner runs on."""
    train_loss, val_loss = _toy_losses()
    tuner = HypernetworkHPO(_Vector(3), train_loss, val_loss, [0], [0], {"lam": Hyper(-1.0)}, weight_lr=0.05,
                            hyper_lr=0.05, progress=False)
    result = tuner.run(2)
    snapshot = result.hparams["lam"].detach().clone()
    tuner.run(6)
    assert not result.hparams["lam"].requires_grad and not tuner.hparams["lam"].requires_grad
    assert torch.equal(result.hparams["lam"], snapshot)


def test_hypernetwork_hpo_on_ridge_prefers_less_decay_when_validation_matches_training():
    """Lorraine & Duvenaud's setting on a real model: validation data drawn like the training data
    with little noise; the best weight decay is small, so tuning from a large one lowers it
    and the validation loss.  The one-call function and a user-supplied hypernetwork module
    work the same way."""
    (X, t), (Xv, tv) = _regression_data(n=40, d=4, seed=17, noise=0.1)

    def train_loss(m, b, hp):
        return _mse(m, b) + 0.5 * hp["decay"] * (m.weight ** 2).sum()

    result = hypernetwork_hpo(_linear(4), train_loss, _mse, [(X, t)], [(Xv, tv)], {"decay": Hyper(2.0, low=0.0)},
                              max_steps=60, weight_lr=0.05, hyper_lr=0.05, warmup_steps=100, progress=False)
    assert float(result.hparams["decay"]) < 1.0
    assert result.history["val_loss"][-1] < 0.5 * result.history["val_loss"][0]
    assert "sigma" in result.history and result.history["sigma"][-1] == pytest.approx(0.5)

    torch.manual_seed(0)
    custom = LinearBestResponse({"weight": torch.zeros(1, 4, dtype=F64)}, center=torch.zeros(1, dtype=F64))
    result2 = hypernetwork_hpo(_linear(4), train_loss, _mse, [(X, t)], [(Xv, tv)],
                               {"decay": Hyper(1.0, low=0.0)}, best_response=custom, max_steps=5, progress=False)
    assert math.isfinite(result2.history["val_loss"][-1])


def test_hypernetwork_with_learned_sigma_resumes_exactly(tmp_path):
    """Noise is drawn from the tuner's own generator, which is checkpointed: a resumed run with a
    learned perturbation scale (STN) repeats the uninterrupted one bit for bit."""
    base_loss, val_loss = _toy_losses()

    def train_loss(m, batch, hp):  # noise from the *global* generator, e.g. dropout (restored on resume too)
        return base_loss(m, batch, hp) * (1 + 0.1 * torch.rand(()))

    def make():
        torch.manual_seed(5)
        return HypernetworkHPO(_Vector(3), train_loss, val_loss, [0], [0], {"lam": Hyper(0.0)}, best_response="gated",
                               learn_sigma=True, weight_steps=3, weight_lr=0.05, hyper_lr=0.05, seed=3,
                               warmup_steps=5, progress=False)

    whole = make().run(12)
    first = make()
    first.run(5)
    torch.save(first.state_dict(), tmp_path / "hn.pt")
    torch.rand(100)  # disturb the global generator between save and resume
    resumed = make().load_state_dict(torch.load(tmp_path / "hn.pt", weights_only=False)).run(12)
    assert resumed.history["sigma"] == whole.history["sigma"]
    assert resumed.history["train_loss"] == whole.history["train_loss"]
    assert torch.equal(resumed.hparams["lam"], whole.hparams["lam"])
    assert len(set(whole.history["sigma"])) > 1  # sigma is learned, not fixed
    assert all(s > 0 for s in whole.history["sigma"])


def test_hypernetwork_bad_input():
    train_loss, val_loss = _toy_losses()
    with pytest.raises(ValueError, match="ImplicitHPO"):
        HypernetworkHPO(_Vector(3), train_loss, val_loss, [0], [0], {"lam": Hyper(0.1, low=0.0, per_weight=True)},
                        progress=False)
    with pytest.raises(ValueError, match="best_response"):
        HypernetworkHPO(_Vector(3), train_loss, val_loss, [0], [0], {"lam": Hyper(0.1)}, best_response="cubic",
                        progress=False)

    class Wrong(nn.Module):
        def forward(self, raw):
            return {"w": torch.zeros(4, dtype=F64)}

    with pytest.raises(ValueError, match="shape"):
        HypernetworkHPO(_Vector(3), train_loss, val_loss, [0], [0], {"lam": Hyper(0.1)}, best_response=Wrong(),
                        progress=False)
    with pytest.raises(ValueError, match="sigma"):
        HypernetworkHPO(_Vector(3), train_loss, val_loss, [0], [0], {"lam": Hyper(0.1)}, sigma=0.0, progress=False)
    tuner = HypernetworkHPO(_Vector(3), train_loss, val_loss, [0], [0], {"lam": Hyper(0.1)}, progress=False)
    with pytest.raises(ValueError, match="lam"):
        tuner.best_response_at({"mu": 0.3})


# ============================================================================= 3. differentiable outside solvers


def _logreg_problem(n=50, d=4, seed=20):
    g = _gen(seed)
    X = torch.randn(n, d, generator=g, dtype=F64)
    y = (torch.rand(n, generator=g, dtype=F64) < torch.sigmoid(X @ torch.randn(d, generator=g, dtype=F64))).to(F64)
    return X, y


def _logreg_objective(w, lam, X, y):
    """Mean logistic loss + 0.5 sum_i lam_i w_i^2 (solution first, as custom_root expects)."""
    return nn.functional.binary_cross_entropy_with_logits(X @ w, y) + 0.5 * (lam * w * w).sum()


def _dense_ift_jacobian(objective, w, *args, argnum=0):
    """-H^-1 d(grad_w)/d args[argnum], dense, by torch.func (the reference of JAXopt's tests)."""
    H = hessian(objective)(w, *args)
    C = jacrev(grad(objective), argnums=1 + argnum)(w, *args)
    return -torch.linalg.solve(H, C.reshape(w.numel(), -1)).reshape(w.shape + args[argnum].shape)


def _known_ridge_bilevel():
    """The per-feature ridge problem with known lam* of the ImplicitHPO test, as bilevel.solve
    objectives in x = log lam (upper variable first)."""
    g = _gen(4)
    a = torch.tensor([2.0, 3.0, -4.0, 1.5, 0.8], dtype=F64)
    c = torch.tensor([1.0, 1.0, -2.0, 1.0, 0.4], dtype=F64)
    X, t = _orthogonal_design(50, a, 0.7, g)
    Xv, tv = _orthogonal_design(40, c, 0.3, g)

    def inner(x, w):
        return 0.5 * ((X @ w - t) ** 2).mean() + 0.5 * (x.exp() * w * w).sum()

    def outer(x, w):
        return 0.5 * ((Xv @ w - tv) ** 2).mean()

    return outer, inner, a / c - 1


@pytest.mark.parametrize("inner_solver", [LBFGS(), ScipyMinimize()], ids=["LBFGS", "scipy"])
def test_bilevel_solve_with_an_outside_inner_solver_reaches_the_known_optimum(inner_solver):
    """bilevel.solve(method="implicit") with a bridge solver as the inner solver: lam -> lam*
    (rel. 2e-3; Adam at lr 0.1 for 150 steps gets within ~2e-4) and the outer value to the
    irreducible 0.5 * 0.3^2 (its excess is quadratic in the lam error: ~1e-8)."""
    outer, inner, lam_star = _known_ridge_bilevel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # scipy: see the warm-start xfail test
        result = bilevel.solve(outer, inner, torch.zeros(5, dtype=F64), torch.zeros(5, dtype=F64), method="implicit",
                               inner_solver=inner_solver, lr=0.1, max_steps=150, progress=False)
    torch.testing.assert_close(result.x.exp(), lam_star, rtol=2e-3, atol=0)
    assert result.history["outer"][-1] == pytest.approx(0.5 * 0.3 ** 2, abs=1e-6)


def _warm_starts_on_a_summed_ridge(count=10):
    """Ridge summed over 500 examples (|f*| ~ 240, L ~ 580) and warm starts next to w*, where
    ||grad f(init)|| ~ 2e-4 < 1: the default threshold is then sqrt(eps) * 1 = 1.5e-8 absolute."""
    g = _gen(33)
    n, d = 500, 5
    X = torch.randn(n, d, generator=g, dtype=F64)
    t = X @ torch.randn(d, generator=g, dtype=F64) + torch.randn(n, generator=g, dtype=F64)
    lam = torch.full((d,), 0.5, dtype=F64)

    def f(w, lam):
        return 0.5 * ((X @ w - t) ** 2).sum() + 0.5 * (lam * w * w).sum()

    w_star = torch.linalg.solve(X.T @ X + torch.diag(lam), X.T @ t)
    inits = [w_star + 2e-7 * torch.randn(d, generator=g, dtype=F64) for _ in range(count)]
    return f, lam, inits


@pytest.mark.parametrize("solver", [LBFGS(), bilevel.solvers.GradientDescent()], ids=["LBFGS", "GradientDescent"])
def test_warm_started_solvers_reach_the_default_tolerance_on_a_large_objective(solver):
    """The warm starts of a bilevel loop: near w*, on an objective whose value is large.  The
    default tolerance (documented as reachable 'whatever the scale of the objective') must be
    met, without a ConvergenceWarning."""
    f, lam, inits = _warm_starts_on_a_summed_ridge()
    for init in inits:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            _, info = solver.run(f, init, lam)
        assert bool(info.converged) and _no_bilevel_warnings(record) == []


@pytest.mark.parametrize("method", ["L-BFGS-B", "BFGS"])
def test_warm_started_scipy_bridge_reaches_its_default_tolerance_on_a_large_objective(method):
    f, lam, inits = _warm_starts_on_a_summed_ridge()
    solver = ScipyMinimize(method=method)
    failures = 0
    for init in inits:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            _, info = solver.run(f, init, lam)
        failures += (not bool(info.converged)) or bool(_no_bilevel_warnings(record))
    assert failures == 0, f"{failures} of {len(inits)} warm starts ended in BREAKDOWN"


def test_outer_learning_through_levenberg_marquardt_fits_theseus_style():
    """Theseus-style: learn a data offset theta so that the LM fit of y + theta by a exp(b t)
    recovers target parameters; the gradient reaches theta only through the IFT of the inner
    least-squares problem.  The outer loss has optimum 0 (theta = y_target - y is one), and
    Adam must drive it down by four orders of magnitude."""
    t = torch.linspace(0, 1, 10, dtype=F64)
    y = 1.5 * torch.exp(-0.8 * t)
    target = torch.tensor([2.0, -1.2], dtype=F64)
    theta = torch.zeros(10, dtype=F64, requires_grad=True)
    solver = LevenbergMarquardt()
    opt = torch.optim.Adam([theta], lr=0.05)

    def residual(p, data):
        return p[0] * torch.exp(p[1] * t) - data

    losses = []
    for _ in range(80):
        p = solver(residual, torch.tensor([1.0, -1.0], dtype=F64), y + theta)
        loss = ((p - target) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item() if not loss.requires_grad else loss.detach().item())
    assert losses[-1] < 1e-4 * losses[0], losses[::10]


def test_scipy_minimize_inside_custom_root_matches_dense_ift_and_gradcheck():
    """JAXopt's implicit_diff test pattern: an outside solver that knows nothing of torch
    (scipy trust-exact on NumPy functions, converged to a gradient below 1e-11) wrapped by
    custom_root(stationarity).  Its Jacobian must match the dense IFT formula, and gradcheck
    (central differences, eps 1e-6) must pass on lam and on the data X: the solution is
    accurate to ~1e-11 / 0.05 = 2e-10, well below the eps^2 ~ 1e-12 the finite differences resolve."""
    X, y = _logreg_problem(n=24, d=3)
    n = X.shape[0]

    def solve_np(lam, X, y):
        lam, X, y = lam.numpy(), X.numpy(), y.numpy()

        def fun(w):
            z = X @ w
            return np.mean(np.logaddexp(0, z) - y * z) + 0.5 * np.sum(lam * w * w)

        def jac(w):
            return X.T @ (1 / (1 + np.exp(-X @ w)) - y) / n + lam * w

        def hess(w):
            p = 1 / (1 + np.exp(-X @ w))
            return (X.T * (p * (1 - p))) @ X / n + np.diag(lam)

        res = scipy.optimize.minimize(fun, np.zeros(X.shape[1]), jac=jac, hess=hess, method="trust-exact",
                                      options={"gtol": 1e-13})
        return torch.as_tensor(res.x, dtype=F64)

    @bilevel.custom_root(stationarity(_logreg_objective))
    def argmin(lam, X, y):
        return solve_np(lam, X, y)

    lam = torch.tensor([0.1, 0.5, 0.05], dtype=F64, requires_grad=True)
    w = argmin(lam, X, y)
    assert float(grad(_logreg_objective)(w.detach(), lam.detach(), X, y).norm()) < 1e-11
    J = torch.autograd.functional.jacobian(lambda l_: argmin(l_, X, y), lam)
    torch.testing.assert_close(J, _dense_ift_jacobian(_logreg_objective, w.detach(), lam.detach(), X, y),
                               rtol=1e-9, atol=1e-12)
    Xr = X.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda l_, x_: argmin(l_, x_, y), (lam, Xr), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_scipy_root_on_a_nonsymmetric_system_gradcheck():
    """A nonlinear, non-symmetric root problem F(x; A, b, s) = x + s * tanh(A x) - b = 0 solved by
    scipy.optimize.root (MINPACK hybr, xtol 1e-14) and made differentiable by custom_root with
    the default (non-symmetric) adjoint solve.  gradcheck in float64 against central differences."""
    g = _gen(21)
    A = 0.4 * torch.randn(4, 4, generator=g, dtype=F64)
    b = torch.randn(4, generator=g, dtype=F64)
    s = torch.tensor(0.8, dtype=F64)

    def F(x, A, b, s):
        return x + s * torch.tanh(A @ x) - b

    @bilevel.custom_root(F)
    def root(A, b, s):
        res = scipy.optimize.root(lambda x: F(torch.as_tensor(x), A, b, s).numpy(), b.numpy(), method="hybr",
                                  jac=lambda x: jacrev(F)(torch.as_tensor(x), A, b, s).numpy(), options={"xtol": 1e-12})
        assert res.success, res.message
        return torch.as_tensor(res.x)

    inputs = tuple(t.clone().requires_grad_() for t in (A, b, s))
    x = root(*inputs)
    assert float(F(x.detach(), A, b, s).norm()) < 1e-13
    assert torch.autograd.gradcheck(root, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    # and the closed form dx/db = (I + s diag(1 - tanh^2(Ax)) A)^-1
    J = torch.autograd.functional.jacobian(lambda b_: root(A, b_, s), b)
    D = torch.diag(1 - torch.tanh(A @ x.detach()) ** 2)
    torch.testing.assert_close(J, torch.linalg.inv(torch.eye(4, dtype=F64) + s * D @ A), rtol=1e-10, atol=1e-12)


def _user_scipy_ridge():
    """A user's scipy BFGS ridge solver (NumPy only) made differentiable by custom_root, returning
    scipy's OptimizeResult as aux; closed form dw*/dlam = -H^-1 diag(w*), H = X^T X + diag(lam)."""
    g = _gen(32)
    X, t = torch.randn(20, 3, generator=g, dtype=F64), torch.randn(20, generator=g, dtype=F64)

    def objective(w, lam):
        return 0.5 * ((X @ w - t) ** 2).sum() + 0.5 * (lam * w * w).sum()

    @bilevel.custom_root(stationarity(objective), has_aux=True)
    def argmin(lam):
        Xn, tn, ln = X.numpy(), t.numpy(), lam.numpy()
        res = scipy.optimize.minimize(lambda w: 0.5 * np.sum((Xn @ w - tn) ** 2) + 0.5 * np.sum(ln * w * w),
                                      np.zeros(3), jac=lambda w: Xn.T @ (Xn @ w - tn) + ln * w, method="BFGS",
                                      options={"gtol": 1e-12})
        return torch.as_tensor(res.x), res

    def jacobian(lam):
        H = X.T @ X + torch.diag(lam)
        return -torch.linalg.solve(H, torch.diag(torch.linalg.solve(H, X.T @ t)))

    return argmin, jacobian


def test_user_scipy_solver_under_jacrev_jacfwd_vmap_with_aux():
    """JAXopt-style composability: jax.jacrev / jacfwd / vmap of a wrapped scipy solver.  BFGS to
    gtol 1e-12 on an SPD problem: Jacobian error ~1e-12 / lambda_min(H) ~ 1e-12, rtol 1e-8."""
    argmin, jacobian = _user_scipy_ridge()
    lam = torch.tensor([0.1, 1.0, 3.0], dtype=F64)
    sol, aux = argmin(lam.clone().requires_grad_())
    assert isinstance(aux, scipy.optimize.OptimizeResult) and aux.success and sol.requires_grad
    for transform in (jacrev, torch.func.jacfwd):
        torch.testing.assert_close(transform(lambda l_: argmin(l_)[0])(lam), jacobian(lam), rtol=1e-8, atol=1e-12)
    lams = torch.stack([lam, 2 * lam, 0.5 * lam])
    batched = torch.func.vmap(jacrev(lambda l_: argmin(l_)[0]))(lams)
    torch.testing.assert_close(batched, torch.stack([jacobian(l_) for l_ in lams]), rtol=1e-8, atol=1e-12)


def test_user_scipy_solver_forward_mode_with_torch_autograd_forward_ad():
    """root.py documents 'a forward-mode rule'; torch's own forward AD (dual tensors, as used
    by gradcheck(check_forward_ad=True)) should then work, not only torch.func.jacfwd."""
    argmin, jacobian = _user_scipy_ridge()
    lam = torch.tensor([0.1, 1.0, 3.0], dtype=F64)
    tangent = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        out = argmin(fwAD.make_dual(lam, tangent))[0]
        jvp = fwAD.unpack_dual(out).tangent
    torch.testing.assert_close(jvp, jacobian(lam) @ tangent, rtol=1e-8, atol=1e-12)


def test_scipy_fixed_point_inside_custom_fixed_point():
    """scipy.optimize.fixed_point on the contraction T(x; a) = 0.5 cos(x) + a (elementwise), made
    differentiable by custom_fixed_point: dx/da = 1 / (1 + 0.5 sin(x)) (implicit derivative of
    x = 0.5 cos x + a)."""
    a = torch.tensor([0.1, 0.7, -0.4], dtype=F64, requires_grad=True)

    def T(x, a):
        return 0.5 * torch.cos(x) + a

    @bilevel.custom_fixed_point(T)
    def fixed_point(a):
        return torch.as_tensor(scipy.optimize.fixed_point(lambda x: T(torch.as_tensor(x), a).numpy(),
                                                          np.zeros(3), xtol=1e-14, maxiter=2000))

    x = fixed_point(a)
    (g,) = torch.autograd.grad(x.sum(), a)
    torch.testing.assert_close(g, 1 / (1 + 0.5 * torch.sin(x.detach())), rtol=1e-10, atol=1e-13)


def test_torch_optim_lbfgs_loop_on_module_parameter_dicts_with_functional_call():
    """A user's own torch.optim.LBFGS loop over a softmax-regression nn.Module, wrapped by
    custom_root; the solution and the hyper-parameters are dicts (one decay tensor per named
    parameter) and the objective calls the module through torch.func.functional_call.  The
    gradient w.r.t. the decay dict and w.r.t. the data must equal the dense IFT reference on the
    flattened problem.  Solver tolerance 1e-12 on a problem with Hessian eigenvalues >= 0.01:
    solution error <= 1e-10, gradient error of the same order, so rtol 1e-6 is safe."""
    g = _gen(22)
    n, d, k = 40, 3, 3
    X = torch.randn(n, d, generator=g, dtype=F64)
    labels = torch.randint(0, k, (n,), generator=g)
    net = nn.Linear(d, k).to(F64)
    for p in net.parameters():
        p.requires_grad_(False)  # the module is only a function here; its weights are the solution
    names = [name for name, _ in net.named_parameters()]

    def objective(params, decay, X):
        logits = functional_call(net, params, (X,))
        return nn.functional.cross_entropy(logits, labels) + 0.5 * sum((decay[k_] * params[k_] ** 2).sum()
                                                                       for k_ in params)

    def lbfgs(decay, X):
        params = {name: torch.zeros_like(p).requires_grad_() for name, p in net.named_parameters()}
        opt = torch.optim.LBFGS(list(params.values()), lr=1, max_iter=500, tolerance_grad=1e-12,
                                tolerance_change=0, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = objective(params, decay, X)
            loss.backward()
            return loss

        with torch.enable_grad():  # custom_root runs the solver under no_grad
            opt.step(closure)
        return {name: p.detach() for name, p in params.items()}

    solver = bilevel.custom_root(stationarity(objective))(lbfgs)
    decay = {"weight": torch.full((k, d), 0.05, dtype=F64, requires_grad=True),
             "bias": torch.full((k,), 0.01, dtype=F64, requires_grad=True)}
    Xr = X.clone().requires_grad_()
    sol = solver(decay, Xr)
    assert set(sol) == set(names)
    probe = {name: torch.randn(p.shape, generator=g, dtype=F64) for name, p in sol.items()}
    loss = sum((sol[k_] * probe[k_]).sum() for k_ in sol)
    g_w, g_b, g_X = torch.autograd.grad(loss, [decay["weight"], decay["bias"], Xr])

    shapes = {name: sol[name].shape for name in names}
    sizes = [sol[name].numel() for name in names]

    def unflat(v):
        return {name: part.reshape(shapes[name]) for name, part in zip(names, torch.split(v, sizes))}

    def flat_obj(v, dv, X):
        return objective(unflat(v), unflat(dv), X)

    v0 = _flat({name: sol[name].detach() for name in names})
    dv0 = _flat({name: decay[name].detach() for name in names})
    u = _flat(probe)
    J_decay = _dense_ift_jacobian(flat_obj, v0, dv0, X, argnum=0)
    J_X = _dense_ift_jacobian(flat_obj, v0, dv0, X, argnum=1)
    torch.testing.assert_close(torch.cat([g_w.reshape(-1), g_b]), u @ J_decay, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(g_X, torch.tensordot(u, J_X, dims=1), rtol=1e-6, atol=1e-10)


def test_library_lbfgs_and_scipy_bridge_agree_with_closed_form_on_a_nonlinear_problem():
    """f(w; c) = 0.5||w - c||^2 + 0.25 sum w^4 + 0.5 (sum w)^2 is strongly convex with
    dw*/dc = (I + diag(3 w^2) + 1 1^T)^-1 exactly.  Both bridges stop at the default relative
    gradient tolerance sqrt(eps) ~ 1.5e-8; with Hessian >= I the solution error is <= 1.5e-8 *
    ||g0|| and the Jacobian error of the same order: rtol 1e-6."""
    c = torch.tensor([1.0, -2.0, 0.3, 1.5], dtype=F64)

    def f(w, c):
        return 0.5 * ((w - c) ** 2).sum() + 0.25 * (w ** 4).sum() + 0.5 * w.sum() ** 2

    init = torch.zeros(4, dtype=F64)
    for solver in (LBFGS(), ScipyMinimize(), ScipyMinimize(method="BFGS"), ScipyMinimize(method="Newton-CG")):
        w = solver(f, init, c).detach()
        J = torch.autograd.functional.jacobian(lambda c_, s_=solver: s_(f, init, c_), c)
        expected = torch.linalg.inv(torch.eye(4, dtype=F64) + torch.diag(3 * w ** 2) + torch.ones(4, 4, dtype=F64))
        torch.testing.assert_close(J, expected, rtol=1e-6, atol=1e-9, msg=f"{solver}")
        assert w.dtype == F64


@pytest.mark.parametrize("solver", [LBFGS(), ScipyMinimize(method="Newton-CG")], ids=["LBFGS", "scipy"])
def test_bridge_solvers_take_dict_pytrees_for_solution_and_hyper_parameters(solver):
    """Pytrees both ways: the solution {"w", "b"} (weights and intercept) and the hyper-parameters
    {"l2": per-feature, "l2_b": intercept}.  Closed form: z = (w, b) solves (A + diag(lam)) z = r
    with A = [X 1]^T [X 1] / n, so dz/dlam_j = -(A + diag lam)^-1 e_j z_j (rtol 1e-6 for the
    default relative tolerance sqrt(eps), Hessian >= 0.1 I)."""
    (X, t), _ = _regression_data(n=30, d=3, seed=34)
    n = X.shape[0]
    Z = torch.cat([X, torch.ones(n, 1, dtype=F64)], dim=1)

    def f(sol, hp):
        pred = X @ sol["w"] + sol["b"]
        penalty = 0.5 * (hp["l2"] * sol["w"] ** 2).sum() + 0.5 * hp["l2_b"] * sol["b"] ** 2
        return 0.5 * ((pred - t) ** 2).mean() + penalty

    hp = {"l2": torch.tensor([0.1, 0.5, 1.0], dtype=F64, requires_grad=True),
          "l2_b": torch.tensor(0.2, dtype=F64, requires_grad=True)}
    init = {"w": torch.zeros(3, dtype=F64), "b": torch.zeros((), dtype=F64)}
    sol = solver(f, init, hp)
    assert set(sol) == {"w", "b"} and sol["w"].shape == (3,) and sol["b"].shape == ()
    lam = torch.cat([hp["l2"].detach(), hp["l2_b"].detach().reshape(1)])
    M = Z.T @ Z / n + torch.diag(lam)
    z = torch.linalg.solve(M, Z.T @ t / n)
    torch.testing.assert_close(torch.cat([sol["w"].detach(), sol["b"].detach().reshape(1)]), z, rtol=1e-6, atol=1e-9)
    probe = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
    g_l2, g_b = torch.autograd.grad((sol["w"] * probe[:3]).sum() + sol["b"] * probe[3], [hp["l2"], hp["l2_b"]])
    expected = -z * torch.linalg.solve(M, probe)  # probe^T dz/dlam_j = -(M^-1 probe)_j z_j
    torch.testing.assert_close(torch.cat([g_l2, g_b.reshape(1)]), expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("solver", [OptimizerLoop("sgd", lr=0.1, maxiter=5000),
                                    OptimizerLoop("rprop", lr=0.01, step_sizes=(1e-12, 1.0)),
                                    OptimizerLoop(torch.optim.SGD, lr=0.1, momentum=0.5, maxiter=5000)],
                         ids=["sgd", "rprop", "sgd-momentum-class"])
def test_torch_optim_loops_are_differentiable_on_per_feature_ridge(solver):
    """OptimizerLoop around torch.optim, per-feature ridge with the closed form
    dw*/dlam = -H^-1 diag(w*).  Converged to sqrt(eps) relative gradient; H >= 0.1 I so the
    solution error is <= 1.5e-7 ||g0|| and rtol 1e-5 on the Jacobian has ample margin."""
    (X, t), _ = _regression_data(n=30, d=4, seed=23)
    n = X.shape[0]
    lam = torch.tensor([0.1, 0.3, 1.0, 0.5], dtype=F64, requires_grad=True)

    def f(w, lam):
        return 0.5 * ((X @ w - t) ** 2).mean() + 0.5 * (lam * w * w).sum()

    w = solver(f, torch.zeros(4, dtype=F64), lam)
    H = X.T @ X / n + torch.diag(lam.detach())
    torch.testing.assert_close(w.detach(), torch.linalg.solve(H, X.T @ t / n), rtol=1e-6, atol=1e-8)
    J = torch.autograd.functional.jacobian(lambda l_: solver(f, torch.zeros(4, dtype=F64), l_), lam)
    torch.testing.assert_close(J, -torch.linalg.solve(H, torch.diag(w.detach())), rtol=1e-5, atol=1e-8)


def test_gauss_newton_and_levenberg_marquardt_fits_are_differentiable_gradcheck():
    """Nonlinear least squares y ~ a exp(b t) + c with noisy data (non-zero residual, so the exact
    Hessian J^T J + sum r_i grad^2 r_i differs from J^T J).  With tol 1e-12 both solvers converge
    to ~1e-12; gradcheck of the fitted parameters w.r.t. the data, and both solvers' Jacobians
    agree with the dense IFT of 0.5||r||^2 and with each other."""
    g = _gen(24)
    t = torch.linspace(0, 1, 15, dtype=F64)
    y = 2.0 * torch.exp(-1.3 * t) + 0.5 + 0.05 * torch.randn(15, generator=g, dtype=F64)
    init = torch.tensor([1.0, -1.0, 0.0], dtype=F64)

    def residual(p, y):
        return p[0] * torch.exp(p[1] * t) + p[2] - y

    def half_sq(p, y):
        return 0.5 * (residual(p, y) ** 2).sum()

    jacobians = []
    for solver in (GaussNewton(tol=1e-12), LevenbergMarquardt(tol=1e-12)):
        p, info = solver.run(residual, init, y)
        assert bool(info.converged)
        yr = y.clone().requires_grad_()
        J = torch.autograd.functional.jacobian(lambda y_, s_=solver: s_(residual, init, y_), yr)
        torch.testing.assert_close(J, _dense_ift_jacobian(half_sq, p, y), rtol=1e-8, atol=1e-10)
        assert torch.autograd.gradcheck(lambda y_, s_=solver: s_(residual, init, y_), (yr,), eps=1e-6, atol=1e-6, rtol=1e-4)
        jacobians.append(J)
    torch.testing.assert_close(jacobians[0], jacobians[1], rtol=1e-8, atol=1e-10)


def test_batched_levenberg_marquardt_backward_equals_a_loop_over_problems():
    """The MoE-style batch: K independent fits in one call; gradients w.r.t. each problem's data
    equal those of K separate fits, and never leak across problems."""
    g = _gen(25)
    t = torch.linspace(0, 1, 12, dtype=F64)
    truth = torch.tensor([[1.0, -0.5], [2.0, 0.7], [0.5, -2.0]], dtype=F64)
    y = truth[:, :1] * torch.exp(truth[:, 1:] * t) + 0.01 * torch.randn(3, 12, generator=g, dtype=F64)
    y = y.requires_grad_()
    weights = torch.randn(3, 2, generator=g, dtype=F64)

    def batched(p, y):
        return p[:, :1] * torch.exp(p[:, 1:] * t) - y

    def single(p, y):
        return p[0] * torch.exp(p[1] * t) - y

    p = LevenbergMarquardt(batch_dims=1, tol=1e-12)(batched, torch.ones(3, 2, dtype=F64), y)
    (g_batch,) = torch.autograd.grad((p * weights).sum(), y)
    for k in range(3):
        yk = y.detach()[k].clone().requires_grad_()
        pk = LevenbergMarquardt(tol=1e-12)(single, torch.ones(2, dtype=F64), yk)
        torch.testing.assert_close(p[k].detach(), pk.detach(), rtol=1e-9, atol=1e-12)
        (gk,) = torch.autograd.grad((pk * weights[k]).sum(), yk)
        torch.testing.assert_close(g_batch[k], gk, rtol=1e-7, atol=1e-10)


def test_warm_start_changes_iterations_not_the_solution_or_its_gradient():
    """A warm start is a keyword (not differentiated): from a point near the solution the solver
    takes fewer iterations, and the solution and its implicit gradient are those of a cold start
    (both within the solver tolerance).  An init that requires grad receives no gradient."""
    X, y = _logreg_problem(seed=26)
    lam = torch.tensor([0.1, 0.2, 0.05, 0.3], dtype=F64, requires_grad=True)
    solver = LBFGS(tol=1e-10)
    cold_init = torch.zeros(4, dtype=F64)
    w_cold, info_cold = solver.run(_logreg_objective, cold_init, lam.detach(), X, y)
    warm_init = (w_cold + 1e-3).clone().requires_grad_()
    _, info_warm = solver.run(_logreg_objective, warm_init.detach(), lam.detach(), X, y)
    assert int(info_warm.iterations) < int(info_cold.iterations)

    (g_cold,) = torch.autograd.grad(solver(_logreg_objective, cold_init, lam, X, y).sum(), lam)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        w_warm = solver(_logreg_objective, warm_init, lam, X, y)
        (g_warm,) = torch.autograd.grad(w_warm.sum(), lam)
    assert _no_bilevel_warnings(record) == []
    assert warm_init.grad is None
    torch.testing.assert_close(w_warm.detach(), w_cold, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(g_warm, g_cold, rtol=1e-7, atol=1e-10)


def test_warm_start_keyword_of_custom_root_is_not_differentiated_and_a_grad_tensor_is_reported():
    """custom_root passes keywords to the solver only.  A keyword tensor that requires grad
    would silently get no gradient in most peers: it is reported."""
    c = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    f = lambda w, c: 0.5 * ((w - c) ** 2).sum() + 0.25 * (w ** 4).sum()

    @bilevel.custom_root(stationarity(f))
    def solve(c, init=None):
        return LBFGS().run(f, init if init is not None else torch.zeros(2, dtype=F64), c)[0]

    w = solve(c, init=torch.ones(2, dtype=F64))
    (g,) = torch.autograd.grad(w.sum(), c)
    torch.testing.assert_close(g, 1 / (1 + 3 * w.detach() ** 2), rtol=1e-7, atol=1e-10)
    with pytest.warns(CapturedTensorWarning):
        solve(c, init=torch.ones(2, dtype=F64, requires_grad=True))


def test_captured_hyper_parameter_in_the_condition_is_reported():
    """DESIGN: 'Every tensor the solution depends on is an argument' - a lam captured by the
    objective's closure gets no implicit gradient; the library must say so."""
    lam = torch.tensor(0.5, dtype=F64, requires_grad=True)
    c = torch.tensor([1.0, -1.0], dtype=F64)

    def objective(w, c):
        return 0.5 * ((w - c) ** 2).sum() + 0.5 * lam * (w ** 2).sum()

    solve = bilevel.custom_root(stationarity(objective))(lambda c: c.detach() / (1 + lam.detach()))
    with pytest.warns(CapturedTensorWarning, match="lam"):
        solve(c)


def test_vmap_and_jacrev_through_an_outside_solver():
    """torch.func composability: jacrev through ScipyMinimize and vmap over a batch of
    hyper-parameters (the black-box solver runs once per element) against the closed form of
    ridge: w*(lam) = (X^T X + lam I)^-1 X^T t, dw*/dlam = -H^-1 w*."""
    (X, t), _ = _regression_data(n=20, d=3, seed=27)

    def f(w, lam):
        return 0.5 * ((X @ w - t) ** 2).sum() + 0.5 * lam * (w ** 2).sum()

    solver = ScipyMinimize(method="Newton-CG", tol=1e-12)  # Hessian products from torch
    init = torch.zeros(3, dtype=F64)
    lams = torch.tensor([0.1, 1.0, 10.0], dtype=F64)
    eye = torch.eye(3, dtype=F64)
    expected = torch.stack([-torch.linalg.solve(X.T @ X + l_ * eye, torch.linalg.solve(X.T @ X + l_ * eye, X.T @ t))
                            for l_ in lams])
    per_lam = torch.func.vmap(jacrev(lambda l_: solver(f, init, l_)))(lams)
    torch.testing.assert_close(per_lam, expected, rtol=1e-7, atol=1e-10)


def test_float32_inputs_stay_float32_with_dtype_scaled_defaults():
    """float32 problem (the default dtype), default tolerances: no convergence/optimality
    warnings, outputs in float32, and the implicit gradient within float32 accuracy of the
    float64 closed form (relative gradient tolerance sqrt(eps32) ~ 3.5e-4 times cond(H) ~ 10:
    rtol 1e-2 is the justified bound; a float64-tolerance run would warn instead)."""
    (X, t), _ = _regression_data(n=30, d=4, seed=28, dtype=torch.float32)
    lam = torch.tensor([0.5, 1.0, 2.0, 0.2], requires_grad=True)

    def f(w, lam):
        return 0.5 * ((X @ w - t) ** 2).mean() + 0.5 * (lam * w * w).sum()

    X64, t64, lam64 = X.double(), t.double(), lam.detach().double()
    H = X64.T @ X64 / 30 + torch.diag(lam64)
    w64 = torch.linalg.solve(H, X64.T @ t64 / 30)
    expected = -w64 * torch.linalg.solve(H, torch.ones(4, dtype=F64))  # d sum(w*)/d lam = -diag(w*) H^-1 1
    for solver in (LBFGS(), bilevel.solvers.GradientDescent(), ScipyMinimize()):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            w = solver(f, torch.zeros(4), lam)
            (g,) = torch.autograd.grad(w.sum(), lam)
        assert _no_bilevel_warnings(record) == [], solver
        assert w.dtype == torch.float32 and g.dtype == torch.float32
        torch.testing.assert_close(g.double(), expected, rtol=1e-2, atol=1e-4)


def test_unconverged_outside_solver_is_reported():
    """A solver that stops short warns (ConvergenceWarning with the residual); its gradient is then
    flagged by the IFT certificate rather than passed off as exact."""
    c = torch.tensor([1.0, -2.0, 3.0], dtype=F64, requires_grad=True)
    f = lambda w, c: 0.5 * ((w - c) ** 2).sum() + 0.25 * (w ** 4).sum()
    with pytest.warns(ConvergenceWarning, match="LBFGS"):
        _, info = LBFGS(maxiter=1).run(f, torch.zeros(3, dtype=F64), c)
    assert not bool(info.converged) and float(info.residual_norm) > float(info.tolerance)

    @bilevel.custom_root(stationarity(f))
    def too_short(c):
        return torch.zeros(3, dtype=F64)  # far from the root

    with pytest.warns(BilevelWarning):
        torch.autograd.grad(too_short(c).sum(), c)
    assert not too_short.last_info.ok


def test_bad_solver_input_gives_clear_errors():
    f = lambda w, c: ((w - c) ** 2).sum()
    c = torch.ones(2, dtype=F64)
    with pytest.raises(ValueError, match="LBFGS"):
        OptimizerLoop("lbfgs")
    with pytest.raises(ValueError, match="method"):
        ScipyMinimize(method="simplex-ish")
    with pytest.raises(ValueError, match="tol"):
        LBFGS(tol=2.0)
    with pytest.raises(TypeError, match="floating"):
        LBFGS().run(f, torch.zeros(2, dtype=torch.int64), c)
    with pytest.raises(TypeError, match="fun"):
        LBFGS().run("not callable", torch.zeros(2, dtype=F64), c)
    with pytest.raises(ValueError, match="scalar"):
        LBFGS().run(lambda w, c: (w - c) ** 2, torch.zeros(2, dtype=F64), c)
    with pytest.raises(FloatingPointError):
        ScipyMinimize().run(lambda w, c: (w.log() * c).sum(), -torch.ones(2, dtype=F64), c)

    @bilevel.custom_root(stationarity(f))
    def nan_solver(c):
        return torch.full_like(c, float("nan"))

    with pytest.raises(FloatingPointError, match="non-finite"):
        nan_solver(c.clone().requires_grad_())

    @bilevel.custom_root(lambda w, c: (w - c).sum())  # residual of the wrong shape
    def shaped(c):
        return c.detach().clone()

    cr = c.clone().requires_grad_()
    with pytest.raises(ValueError, match="shape"):
        torch.autograd.grad(shaped(cr).sum(), cr)
