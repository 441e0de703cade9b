"""ImplicitHPO's hypergradient: Neumann vs CG vs a dense exact solve, closed forms, finite differences."""

import pytest
import torch
from torch import nn
from torch.func import grad, hessian, jacrev

from bilevel._tree import tree_flatten, tree_leaves, tree_unflatten
from bilevel.hpo import Hyper, ImplicitHPO, l2_penalty
from bilevel.implicit import CG, Neumann


def _mse(m, batch):
    x, t = batch
    return 0.5 * ((m(x).squeeze(-1) - t) ** 2).mean()


def _train_loss(m, batch, hp):
    return _mse(m, batch) + l2_penalty(m, hp["decay"])


def _data(n=40, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    w = torch.randn(d, generator=g)
    return (X, X @ w + 0.5 * torch.randn(n, generator=g)), (Xv, Xv @ w + 0.5 * torch.randn(n, generator=g))


def _tuner(model, train, val, decay=0.05, **options):
    spec = {"decay": Hyper(decay, low=0.0, per_weight=True)}
    return ImplicitHPO(model, _train_loss, _mse, [train], [val], spec, progress=False, **options)


def _flat(tree):
    return torch.cat([t.reshape(-1) for t in tree_leaves(tree)])


def _unflatten_like(tree):
    leaves, spec = tree_flatten(tree)
    sizes = [t.numel() for t in leaves]

    def unflat(v):
        return tree_unflatten([p.reshape(t.shape) for p, t in zip(torch.split(v, sizes), leaves)], spec)

    return unflat


def _dense(tuner, train, val):
    """Train Hessian H, validation gradient b and the cross Jacobian C = d(grad_w L_T)/d raw, densely."""
    weights = {k: p.detach() for k, p in tuner.params.items()}
    raw = {k: {n: t.detach() for n, t in v.items()} for k, v in tuner.raw.items()}
    w_of, r_of = _unflatten_like(weights), _unflatten_like(raw)
    w0, r0 = _flat(weights), _flat(raw)

    def train_loss(r, w):
        return tuner.losses.train(w_of(w), train, tuner.spec.constrain(r_of(r)))

    H = hessian(train_loss, argnums=1)(r0, w0)
    b = grad(lambda w: tuner.losses.val(w_of(w), val))(w0)
    C = jacrev(lambda r: grad(train_loss, argnums=1)(r, w0))(r0)
    return H, b, C


def _fit(tuner, train, steps=200):
    """Weights at a stationary point of the full-batch training loss (L-BFGS)."""
    params = list(tuner.params.values())
    opt = torch.optim.LBFGS(params, lr=1, max_iter=steps, tolerance_grad=1e-13, tolerance_change=0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = tuner.losses.train(tuner.params, train, tuner.hparams)
        loss.backward()
        return loss

    opt.step(closure)


def _newton(tuner, train, steps=2):
    """Newton steps on the training loss (exact in one step for a quadratic loss)."""
    for _ in range(steps):
        weights = {k: p.detach() for k, p in tuner.params.items()}
        w_of, w0 = _unflatten_like(weights), _flat(weights)
        loss = lambda w: tuner.losses.train(w_of(w), train, tuner.hparams)
        step = torch.linalg.solve(hessian(loss)(w0), grad(loss)(w0))
        with torch.no_grad():
            for p, new in zip(tuner.params.values(), tree_leaves(w_of(w0 - step))):
                p.copy_(new)


def test_neumann_error_decreases_with_terms_and_cg_is_exact_on_a_tiny_mlp():
    torch.manual_seed(0)
    train, val = _data()
    tuner = _tuner(nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)), train, val)
    _fit(tuner, train)
    H, b, C = _dense(tuner, train, val)
    eigenvalues = torch.linalg.eigvalsh(H)
    assert eigenvalues[0] > 0  # a strict local minimum: the IFT applies
    exact = -C.T @ torch.linalg.solve(H, b)
    alpha = float(1 / eigenvalues[-1])
    errors = []
    for terms in (5, 20, 80, 320):
        g, info = tuner.hypergradient(train, val, solve=Neumann(terms=terms, alpha=alpha))
        errors.append(float((_flat(g) - exact).norm() / exact.norm()))
        assert bool(info.linear_solve.converged)
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    g_cg, info = tuner.hypergradient(train, val, solve=CG(maxiter=200, tol=1e-12))
    assert float((_flat(g_cg) - exact).norm() / exact.norm()) < 1e-8
    assert float(info.optimality_residual) < 1e-8  # the weights were at a stationary point


def test_neumann_is_exact_on_a_quadratic_training_loss():
    train, val = _data(d=4)
    tuner = _tuner(nn.Linear(4, 1, bias=False), train, val, decay=0.1)
    X, t = train
    n = X.shape[0]
    raw = tuner.raw["decay"]["weight"].detach().reshape(-1)

    def solution(r):  # w*(raw) of 0.5/n ||Xw - t||^2 + 0.5 sum exp(r) w^2
        return torch.linalg.solve(X.T @ X / n + torch.diag(r.exp()), X.T @ t / n)

    def phi(r):
        return _mse(lambda x: (x @ solution(r)).unsqueeze(-1), val)

    with torch.no_grad():
        tuner.params["weight"].copy_(solution(raw).reshape(1, -1))
    closed_form = grad(phi)(raw)
    H, b, C = _dense(tuner, train, val)
    alpha = float(1 / torch.linalg.eigvalsh(H)[-1])
    eye = torch.eye(4)
    for terms in (1, 5, 20):  # the truncated series, term by term: H^-1 (I - (I - aH)^K) b
        g, _ = tuner.hypergradient(train, val, solve=Neumann(terms=terms, alpha=alpha))
        truncated = -C.T @ torch.linalg.solve(H, (eye - torch.linalg.matrix_power(eye - alpha * H, terms)) @ b)
        torch.testing.assert_close(_flat(g), truncated, rtol=1e-10, atol=1e-12)
    g, _ = tuner.hypergradient(train, val, solve=Neumann(terms=3000, alpha=alpha))
    torch.testing.assert_close(_flat(g), closed_form, rtol=1e-9, atol=1e-12)


def test_per_weight_decay_hypergradient_matches_finite_differences():
    train, val = _data(n=30, d=5, seed=3)
    tuner = _tuner(nn.Linear(5, 1), train, val, decay=0.2)
    _newton(tuner, train)
    g, _ = tuner.hypergradient(train, val, solve=CG(maxiter=100, tol=1e-13))
    raw0 = {k: {n: t.detach().clone() for n, t in v.items()} for k, v in tuner.raw.items()}
    r_of = _unflatten_like(raw0)
    direction = torch.randn(_flat(raw0).shape, generator=torch.Generator().manual_seed(1))

    def phi(r):  # validation loss at the training minimum for raw hyper-parameters r
        with torch.no_grad():
            for leaf, value in zip(tree_leaves(tuner.raw), tree_leaves(r_of(r))):
                leaf.copy_(value)
        _newton(tuner, train)
        with torch.no_grad():
            return float(tuner.losses.val(tuner.params, val))

    eps = 1e-5
    fd = (phi(_flat(raw0) + eps * direction) - phi(_flat(raw0) - eps * direction)) / (2 * eps)
    assert float(_flat(g) @ direction) == pytest.approx(fd, rel=1e-5)


def test_tuning_per_weight_decay_lowers_the_validation_loss():
    train, val = _data(n=30, d=5, seed=3)
    tuner = _tuner(nn.Linear(5, 1), train, val, decay=1.0, inner_steps=20, hyper_lr=0.1)
    result = tuner.run(40)
    assert result.history["val_loss"][-1] < 0.8 * result.history["val_loss"][0]
    assert result.train_steps == 40 * 20
    assert set(result.hparams["decay"]) == {"weight", "bias"}
    assert all(bool((v > 0).all()) for v in result.hparams["decay"].values())


# ----- modes and buffers: validation is evaluation, only training steps move statistics -----
def _shifted_data(seed=2):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(64, 5, generator=g)
    Xv = 10 + torch.randn(64, 5, generator=g)  # the validation inputs sit far from the training ones
    return (X, X.sum(-1)), (Xv, Xv.sum(-1))


def _bn_train_loss(m, batch, hp):
    return _mse(m, batch) + hp["decay"] * (m[0].weight ** 2).sum()


@pytest.mark.parametrize("tuner", ["implicit", "hypernetwork"])
def test_only_training_steps_update_batch_norm_statistics(tuner):
    """The hypergradient's extra train_loss calls and the val_loss calls ran in training
    mode on the model's own buffers: the running mean moved toward the validation inputs
    (about -7 where the training features average 0.2) and counted 4 batches per step."""
    from bilevel.hpo import HypernetworkHPO

    train, val = _shifted_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    spec = {"decay": Hyper(0.1, low=0.0)}
    if tuner == "implicit":
        run = ImplicitHPO(model, _bn_train_loss, _mse, [train], [val], spec, inner_steps=2, progress=False)
    else:
        run = HypernetworkHPO(model, _bn_train_loss, _mse, [train], [val], spec, weight_steps=2, progress=False)
    result = run.run(3)
    bn = result.model[1]
    assert int(bn.num_batches_tracked) == result.train_steps == 6
    # the statistics of the training features alone: an exponential average of batch means
    with torch.no_grad():
        train_mean = result.model[0](train[0]).mean(0)
    assert float((bn.running_mean - train_mean).abs().max()) < 1.0
    assert result.model.training  # the tuned model is handed back in the mode it was given


def test_val_loss_runs_in_evaluation_mode_dropout_off():
    """With dropout active in validation, val_loss moved between hyper-steps whose weights
    did not change (inner_lr = 1e-12); in evaluation mode it is the deterministic loss."""
    train, _ = _data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.5), nn.Linear(16, 1))
    tuner = ImplicitHPO(model, _train_loss, _mse, [train], [train], {"decay": Hyper(0.1, low=0.0)},
                        inner_lr=1e-12, hyper_lr=1e-12, progress=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny step makes no progress on purpose
        result = tuner.run(3)
    model.eval()
    with torch.no_grad():
        expected = float(_mse(result.model.eval(), train))
    assert result.history["val_loss"] == pytest.approx([expected] * 3, rel=1e-5)
