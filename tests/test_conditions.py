"""Tests of bilevel.implicit.conditions: each condition is zero at a known solution, non-zero
off it, and its implicit Jacobian -J_sol^{-1} J_theta (dense, via torch.func.jacrev) matches the
closed-form derivative of the solution.  Float64 throughout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import jacrev, jvp, vmap

from bilevel.implicit.conditions import (
    Condition,
    fixed_point_residual,
    is_symmetric,
    kkt,
    mirror_descent,
    projected_gradient,
    proximal_gradient,
    stationarity,
)
from bilevel.implicit.projections import (
    Simplex,
    kl_projection_simplex,
    project_box,
    project_l2_ball,
    project_nonnegative,
    project_simplex,
)
from bilevel.implicit.prox import prox_elastic_net, prox_lasso, prox_ridge

DT = torch.float64
ZERO = 1e-10  # residual at an exact / tightly solved solution
OFF = 1e-4  # residual at a perturbed point must exceed this


def rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=DT)


def maxabs(tree):
    leaves = [t for t in (tree if isinstance(tree, (tuple, list)) else (tree,)) if torch.is_tensor(t)]
    return max(float(t.abs().max()) for t in leaves)


def implicit_jacobian(F, sol, theta):
    """d sol / d theta = -(dF/dsol)^{-1} dF/dtheta for flat tensors sol (n,) and theta (p,)."""
    J_sol = jacrev(F, argnums=0)(sol, theta)
    J_theta = jacrev(F, argnums=1)(sol, theta)
    return -torch.linalg.solve(J_sol, J_theta.reshape(sol.numel(), -1))


def least_squares(X, y):
    return lambda w, X_, y_: 0.5 * ((X_ @ w - y_) ** 2).sum()


def lsq_objective(w, X, y):
    return 0.5 * ((X @ w - y) ** 2).sum()


def lasso_cd(X, y, l1, l2=0.0, sweeps=20000):
    """Coordinate descent for 0.5||Xw - y||^2 + l1 ||w||_1 + 0.5 l2 ||w||^2 (numpy, to ~1e-15)."""
    X, y = X.numpy(), y.numpy()
    w = np.zeros(X.shape[1])
    r = y.copy()
    col = (X**2).sum(0)
    for _ in range(sweeps):
        delta = 0.0
        for j in range(X.shape[1]):
            old = w[j]
            rho = X[:, j] @ r + col[j] * old
            w[j] = np.sign(rho) * max(abs(rho) - l1, 0.0) / (col[j] + l2)
            r -= X[:, j] * (w[j] - old)
            delta = max(delta, abs(w[j] - old))
        if delta < 1e-16:
            break
    return torch.from_numpy(w)


# ---------------------------------------------------------------- lead's conditions (unchanged)


def test_stationarity_and_fixed_point_residual():
    X, y = rand(10, 3, seed=1), rand(10, seed=2)
    obj = lambda w, lam: lsq_objective(w, X, y) + 0.5 * lam * (w**2).sum()  # noqa: E731
    lam = torch.tensor(0.5, dtype=DT)
    w = torch.linalg.solve(X.T @ X + lam * torch.eye(3, dtype=DT), X.T @ y)
    cond = stationarity(obj)
    assert isinstance(cond, Condition) and is_symmetric(cond)
    assert maxabs(cond(w, lam)) < ZERO
    T = lambda s, a: 0.5 * (s + a / s)  # noqa: E731
    fp = fixed_point_residual(T)
    assert not is_symmetric(fp) and fp.fixed_point_map is T
    assert maxabs(fp(torch.tensor(2.0, dtype=DT), torch.tensor(4.0, dtype=DT))) == 0


# ---------------------------------------------------------------- projected gradient


def nnls_problem():
    scipy_optimize = pytest.importorskip("scipy.optimize")
    X, y = rand(20, 6, seed=3), rand(20, seed=4)
    w, _ = scipy_optimize.nnls(X.numpy(), y.numpy())
    w = torch.from_numpy(w)
    grad_w = X.T @ (X @ w - y)
    support = w > 0
    assert 0 < support.sum() < 6, "want active and inactive constraints"
    assert (grad_w[~support] > 1e-6).all(), "want strict complementarity"
    return X, y, w, support


def test_projected_gradient_nnls_zero_and_ift():
    X, y, w, S = nnls_problem()
    eta = 1.0 / float(torch.linalg.matrix_norm(X, 2) ** 2)
    cond = projected_gradient(lsq_objective, project_nonnegative, stepsize=eta)
    assert not is_symmetric(cond) and callable(cond.fixed_point_map)
    assert maxabs(cond(w, (X, y), ())) < ZERO
    # fixed-point map: T(w) = w
    torch.testing.assert_close(cond.fixed_point_map(w, (X, y), ()), w, rtol=0, atol=ZERO)
    # perturbed: off the solution (feasible perturbation too)
    assert maxabs(cond(w + 0.1, (X, y), ())) > OFF
    assert maxabs(cond(torch.where(S, w, w + 0.05), (X, y), ())) > OFF
    # IFT: dw/dy = (X_S^T X_S)^{-1} X_S^T on the support, 0 off it
    dw_dy = implicit_jacobian(lambda s, t: cond(s, (X, t)), w, y)
    XS = X[:, S]
    expected = torch.zeros(6, 20, dtype=DT)
    expected[S] = torch.linalg.solve(XS.T @ XS, XS.T)
    torch.testing.assert_close(dw_dy, expected, rtol=1e-10, atol=1e-12)
    # args may be given as a single tensor / None instead of tuples
    assert maxabs(cond(w, [X, y], None)) < ZERO


def test_projected_gradient_box_with_differentiable_bounds():
    """min 0.5 sum d_i (x_i - z_i)^2 over [l, u]: x = clamp(z, l, u)."""
    d = torch.linspace(0.5, 2.0, 6, dtype=DT)
    z = torch.tensor([-2.0, -0.5, 0.1, 0.4, 1.7, 3.0], dtype=DT)
    lo, hi = torch.full((6,), -1.0, dtype=DT), torch.ones(6, dtype=DT)
    f = lambda x, z_: 0.5 * (d * (x - z_) ** 2).sum()  # noqa: E731
    cond = projected_gradient(f, project_box, stepsize=0.3)
    x = torch.clamp(z, lo, hi)
    assert maxabs(cond(x, (z,), (lo, hi))) < ZERO
    assert maxabs(cond(x + 0.01, (z,), (lo, hi))) > OFF
    theta = torch.cat([z, lo, hi])
    F = lambda s, t: cond(s, (t[:6],), (t[6:12], t[12:]))  # noqa: E731
    J = implicit_jacobian(F, x, theta)
    inside = ((z > lo) & (z < hi)).to(DT)
    torch.testing.assert_close(J[:, :6], torch.diag(inside), rtol=0, atol=1e-14)
    torch.testing.assert_close(J[:, 6:12], torch.diag((z < lo).to(DT)), rtol=0, atol=1e-14)
    torch.testing.assert_close(J[:, 12:], torch.diag((z > hi).to(DT)), rtol=0, atol=1e-14)
    # the same derivative as the projection's own Jacobian
    torch.testing.assert_close(J[:, :6], jacrev(project_box)(z, lo, hi), rtol=0, atol=1e-14)


def test_projected_gradient_simplex_projection_ift():
    """min 0.5||x - z||^2 over the simplex of radius r: x = P(z); dx/dz = I_S - 11^T/|S|, dx/dr = 1_S/|S|."""
    z, r = rand(7, seed=5, scale=0.5), torch.tensor(1.3, dtype=DT)
    f = lambda x, z_: 0.5 * ((x - z_) ** 2).sum()  # noqa: E731
    cond = projected_gradient(f, project_simplex, stepsize=0.5)
    x = project_simplex(z, r)
    S = (x > 0).to(DT)
    assert 1 < S.sum() < 7
    assert maxabs(cond(x, (z,), (r,))) < ZERO
    assert maxabs(cond(project_simplex(z + 0.3 * rand(7, seed=6), r), (z,), (r,))) > OFF
    theta = torch.cat([z, r[None]])
    J = implicit_jacobian(lambda s, t: cond(s, (t[:7],), (t[7],)), x, theta)
    torch.testing.assert_close(J[:, :7], torch.diag(S) - torch.outer(S, S) / S.sum(), rtol=0, atol=1e-13)
    torch.testing.assert_close(J[:, 7], S / S.sum(), rtol=0, atol=1e-13)
    # a set object works as the projection
    cond_set = projected_gradient(f, Simplex(1.3), stepsize=0.5)
    assert maxabs(cond_set(x, (z,))) < ZERO


def simplex_qp():
    """min 0.5 x^T Q x + c^T x over the simplex, with a planted solution x* and multipliers."""
    n = 6
    A = rand(n, n, seed=7)
    Q = A @ A.T + 0.5 * torch.eye(n, dtype=DT)
    S = torch.tensor([True, True, False, True, False, False])
    x = torch.zeros(n, dtype=DT)
    x[S] = torch.tensor([0.2, 0.5, 0.3], dtype=DT)
    mu = torch.where(S, 0.0, 0.4 + rand(n, seed=8).abs()).to(DT)  # > 0 off the support
    nu = 0.7
    c = mu - nu - Q @ x  # stationarity: Qx + c + nu 1 - mu = 0
    return Q, c, x, S


def test_projected_gradient_simplex_qp_zero_and_ift():
    Q, c, x, S = simplex_qp()
    f = lambda x_, Q_, c_: 0.5 * x_ @ Q_ @ x_ + c_ @ x_  # noqa: E731
    eta = 1.0 / float(torch.linalg.eigvalsh(Q).max())
    cond = projected_gradient(f, project_simplex, stepsize=eta)
    assert maxabs(cond(x, (Q, c), ())) < ZERO
    other = project_simplex(x + 0.1 * rand(6, seed=9))
    assert maxabs(cond(other, (Q, c), ())) > OFF
    # closed form: on the support, [Q_SS 1; 1^T 0] [x_S; nu] = [-c_S; 1]
    k = int(S.sum())
    K = torch.zeros(k + 1, k + 1, dtype=DT)
    K[:k, :k] = Q[S][:, S]
    K[:k, k] = 1.0
    K[k, :k] = 1.0
    rhs = torch.zeros(k + 1, 6, dtype=DT)
    rhs[:k] = -torch.eye(6, dtype=DT)[S]
    expected = torch.zeros(6, 6, dtype=DT)
    expected[S] = torch.linalg.solve(K, rhs)[:k]
    J = implicit_jacobian(lambda s, t: cond(s, (Q, t), ()), x, c)
    torch.testing.assert_close(J, expected, rtol=1e-10, atol=1e-12)


def test_projected_gradient_vmap_and_jvp():
    """Batched problems through vmap; forward mode through the residual."""
    zs = rand(4, 5, seed=10)
    f = lambda x, z_: 0.5 * ((x - z_) ** 2).sum()  # noqa: E731
    cond = projected_gradient(f, project_simplex, stepsize=0.5)
    xs = project_simplex(zs)
    out = vmap(lambda x, z_: cond(x, (z_,), ()))(xs, zs)
    assert out.shape == (4, 5) and maxabs(out) < ZERO
    v = rand(5, seed=11)
    _, tangent = jvp(lambda s: cond(s, (zs[0],), ()), (xs[0],), (v,))
    J = jacrev(lambda s: cond(s, (zs[0],), ()))(xs[0])
    torch.testing.assert_close(tangent, J @ v)


def test_condition_constructor_errors():
    f = lambda x: (x**2).sum()  # noqa: E731
    with pytest.raises(TypeError, match="`objective`"):
        projected_gradient(1.0, project_simplex)
    with pytest.raises(TypeError, match="`projection`"):
        projected_gradient(f, "simplex")
    with pytest.raises(ValueError, match="`stepsize`"):
        projected_gradient(f, project_simplex, stepsize=0.0)
    with pytest.raises(TypeError, match="`stepsize`"):
        proximal_gradient(f, prox_lasso, stepsize=torch.tensor(1.0))
    with pytest.raises(TypeError, match="`prox`"):
        proximal_gradient(f, None)
    with pytest.raises(ValueError, match="together"):
        mirror_descent(f, projection=kl_projection_simplex)
    with pytest.raises(TypeError, match="`eq_constraints`"):
        kkt(f, eq_constraints=3)


# ---------------------------------------------------------------- proximal gradient


def lasso_problem(l2=0.0):
    X, y = rand(30, 8, seed=12), rand(30, seed=13)
    lam = 0.3 * float((X.T @ y).abs().max())
    w = lasso_cd(X, y, lam, l2)
    S = w != 0
    corr = X.T @ (y - X @ w) - l2 * w
    assert 1 < S.sum() < 8
    assert (corr[~S].abs() < lam - 1e-6).all(), "want strict complementarity"
    return X, y, torch.tensor(lam, dtype=DT), w, S


def test_proximal_gradient_lasso_zero_and_ift():
    X, y, lam, w, S = lasso_problem()
    eta = 1.0 / float(torch.linalg.matrix_norm(X, 2) ** 2)
    cond = proximal_gradient(lsq_objective, prox_lasso, stepsize=eta)
    assert not is_symmetric(cond)
    assert maxabs(cond(w, (X, y), lam)) < ZERO
    assert maxabs(cond(w + 0.01 * rand(8, seed=14), (X, y), lam)) > OFF
    assert maxabs(cond(w, (X, y), 1.1 * lam)) > OFF  # wrong hyper-parameter
    XS = X[:, S]
    G = XS.T @ XS
    # dw/dy: (X_S^T X_S)^{-1} X_S^T on the support, zero off it
    expected = torch.zeros(8, 30, dtype=DT)
    expected[S] = torch.linalg.solve(G, XS.T)
    J = implicit_jacobian(lambda s, t: cond(s, (X, t), lam), w, y)
    torch.testing.assert_close(J, expected, rtol=1e-9, atol=1e-11)
    # dw/dlam: -(X_S^T X_S)^{-1} sign(w_S)
    Jl = implicit_jacobian(lambda s, t: cond(s, (X, y), t[0]), w, lam[None])
    expected_l = torch.zeros(8, dtype=DT)
    expected_l[S] = -torch.linalg.solve(G, torch.sign(w[S]))
    torch.testing.assert_close(Jl[:, 0], expected_l, rtol=1e-9, atol=1e-11)
    # per-coordinate l1reg: dw_S/dlam_j = -G^{-1} e_j sign(w_j) for j in S, 0 for j off S
    lam_vec = lam * torch.ones(8, dtype=DT)
    Jv = implicit_jacobian(lambda s, t: cond(s, (X, y), t), w, lam_vec)
    expected_v = torch.zeros(8, 8, dtype=DT)
    idx = torch.nonzero(S).squeeze(-1)
    expected_v[idx[:, None], idx[None, :]] = -torch.linalg.inv(G) * torch.sign(w[S])[None, :]
    torch.testing.assert_close(Jv, expected_v, rtol=1e-9, atol=1e-11)


def test_proximal_gradient_ridge_closed_form():
    X, y = rand(15, 5, seed=15), rand(15, seed=16)
    lam = torch.tensor(0.8, dtype=DT)
    H = X.T @ X + lam * torch.eye(5, dtype=DT)
    w = torch.linalg.solve(H, X.T @ y)
    cond = proximal_gradient(lsq_objective, prox_ridge, stepsize=0.05)
    assert maxabs(cond(w, (X, y), lam)) < ZERO
    assert maxabs(cond(w * 1.01, (X, y), lam)) > OFF
    J = implicit_jacobian(lambda s, t: cond(s, (X, y), t[0]), w, lam[None])
    torch.testing.assert_close(J[:, 0], -torch.linalg.solve(H, w), rtol=1e-10, atol=1e-12)


def test_proximal_gradient_elastic_net():
    l2 = 0.7
    X, y, lam, w, S = lasso_problem(l2)
    cond = proximal_gradient(lsq_objective, prox_elastic_net, stepsize=0.01)
    hyper = (lam, torch.tensor(l2, dtype=DT))
    assert maxabs(cond(w, (X, y), hyper)) < ZERO
    assert maxabs(cond(w, (X, y), (lam, torch.tensor(2 * l2, dtype=DT)))) > OFF
    XS = X[:, S]
    expected = torch.zeros(8, 30, dtype=DT)
    expected[S] = torch.linalg.solve(XS.T @ XS + l2 * torch.eye(int(S.sum()), dtype=DT), XS.T)
    J = implicit_jacobian(lambda s, t: cond(s, (X, t), hyper), w, y)
    torch.testing.assert_close(J, expected, rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------- mirror descent


def entropic(x, c, tau):
    return (c * x).sum() + tau * (x * torch.log(x)).sum()


@pytest.mark.parametrize("radius", [1.0, 2.5])
def test_mirror_descent_entropy_zero_and_ift(radius):
    """min c^T x + tau sum x log x over {x >= 0, 1^T x = r}: x = r softmax(-c/tau)."""
    c, tau = rand(6, seed=17), torch.tensor(0.7, dtype=DT)
    x = radius * torch.softmax(-c / tau, -1)
    cond = mirror_descent(entropic, stepsize=0.5)
    assert not is_symmetric(cond)
    assert maxabs(cond(x, (c, tau), (radius,))) < ZERO
    torch.testing.assert_close(cond.fixed_point_map(x, (c, tau), (radius,)), x, rtol=0, atol=ZERO)
    other = radius * torch.softmax(-c / tau + 0.2 * rand(6, seed=18), -1)
    assert maxabs(cond(other, (c, tau), (radius,))) > OFF
    # dx/dc = -(diag(x) - x x^T / r) / tau ; dx/dtau = (diag(x) - x x^T / r) c / tau^2
    Sig = torch.diag(x) - torch.outer(x, x) / radius
    theta = torch.cat([c, tau[None]])
    J = implicit_jacobian(lambda s, t: cond(s, (t[:6], t[6]), (radius,)), x, theta)
    torch.testing.assert_close(J[:, :6], -Sig / tau, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(J[:, 6], Sig @ c / tau**2, rtol=1e-10, atol=1e-12)


def test_mirror_descent_euclidean_is_projected_gradient():
    Q, c, x, _ = simplex_qp()
    f = lambda x_, Q_, c_: 0.5 * x_ @ Q_ @ x_ + c_ @ x_  # noqa: E731
    md = mirror_descent(f, project_simplex, lambda s: s, stepsize=0.1)
    pg = projected_gradient(f, project_simplex, stepsize=0.1)
    assert maxabs(md(x, (Q, c), ())) < ZERO
    y = project_simplex(x + 0.1 * rand(6, seed=19))
    torch.testing.assert_close(md(y, (Q, c), ()), pg(y, (Q, c), ()), rtol=0, atol=1e-15)


# ---------------------------------------------------------------- KKT


def qp_objective(x, Q, c):
    return 0.5 * x @ Q @ x + c @ x


def eq_qp():
    n, m = 5, 2
    A = rand(n, n, seed=20)
    Q = A @ A.T + torch.eye(n, dtype=DT)
    c, E, b = rand(n, seed=21), rand(m, n, seed=22), rand(m, seed=23)
    K = torch.zeros(n + m, n + m, dtype=DT)
    K[:n, :n], K[:n, n:], K[n:, :n] = Q, E.T, E
    sol = torch.linalg.solve(K, torch.cat([-c, b]))
    return Q, c, E, b, K, sol[:n], sol[n:]


def test_kkt_equality_qp_zero_and_ift():
    Q, c, E, b, K, x, nu = eq_qp()
    cond = kkt(qp_objective, eq_constraints=lambda x_, E_, b_: E_ @ x_ - b_)
    assert not is_symmetric(cond)
    out = cond((x, nu, ()), (Q, c), (E, b), ())
    assert isinstance(out, tuple) and out[2] == () and maxabs(out) < ZERO
    # None placeholders are accepted and returned as given
    assert cond((x, nu, None), (Q, c), (E, b))[2] is None
    assert maxabs(cond((x, nu + 0.1, ()), (Q, c), (E, b), ())) > OFF
    assert maxabs(cond((x + 0.1, nu, ()), (Q, c), (E, b), ())) > OFF

    def F(s, t):
        r = cond((s[:5], s[5:], ()), (Q, t[:5]), (E, t[5:]), ())
        return torch.cat([r[0], r[1]])

    J = implicit_jacobian(F, torch.cat([x, nu]), torch.cat([c, b]))
    # closed form: K [x; nu] = [-c; b]  =>  d/dc = -K^{-1}[I; 0], d/db = K^{-1}[0; I]
    Kinv = torch.linalg.inv(K)
    torch.testing.assert_close(J[:, :5], -Kinv[:, :5], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(J[:, 5:], Kinv[:, 5:], rtol=1e-10, atol=1e-12)


def ineq_qp():
    """min 0.5 x^T Q x + c^T x s.t. E x = b, G x <= h; planted solution with 2 of 4 inequalities active."""
    n = 5
    A = rand(n, n, seed=24)
    Q = A @ A.T + torch.eye(n, dtype=DT)
    E, G = rand(1, n, seed=25), rand(4, n, seed=26)
    x = rand(n, seed=27)
    active = torch.tensor([True, False, True, False])
    mu = torch.where(active, torch.tensor([0.8, 0.0, 1.5, 0.0], dtype=DT), torch.zeros(4, dtype=DT))
    nu = torch.tensor([0.3], dtype=DT)
    b = E @ x
    h = G @ x + torch.where(active, 0.0, 0.5).to(DT)
    c = -(Q @ x + E.T @ nu + G.T @ mu)
    return Q, c, E, b, G, h, x, nu, mu, active


def test_kkt_inequality_qp_zero_and_ift():
    Q, c, E, b, G, h, x, nu, mu, active = ineq_qp()
    cond = kkt(qp_objective, lambda x_, E_, b_: E_ @ x_ - b_, lambda x_, G_, h_: G_ @ x_ - h_)
    sol = (x, nu, mu)
    args = ((Q, c), (E, b), (G, h))
    assert maxabs(cond(sol, *args)) < ZERO
    assert maxabs(cond((x, nu, mu + 0.1), *args)) > OFF  # complementary slackness broken
    assert maxabs(cond((x + 0.05, nu, mu), *args)) > OFF

    def F(s, t):
        r = cond((s[:5], s[5:6], s[6:]), (Q, t[:5]), (E, b), (G, t[5:]))
        return torch.cat(r)

    J = implicit_jacobian(F, torch.cat([x, nu, mu]), torch.cat([c, h]))
    # closed form: the equality QP of the active set, [Q  C^T; C 0], C = [E; G_A]
    C = torch.cat([E, G[active]])
    k = C.shape[0]
    K = torch.zeros(5 + k, 5 + k, dtype=DT)
    K[:5, :5], K[:5, 5:], K[5:, :5] = Q, C.T, C
    Kinv = torch.linalg.inv(K)
    torch.testing.assert_close(J[:5, :5], -Kinv[:5, :5], rtol=1e-10, atol=1e-12)
    dx_dh = torch.zeros(5, 4, dtype=DT)
    dx_dh[:, active] = Kinv[:5, 6:]
    torch.testing.assert_close(J[:5, 5:], dx_dh, rtol=1e-10, atol=1e-12)
    # multipliers: active ones from the same system, inactive stay zero
    dmu_dc = torch.zeros(4, 5, dtype=DT)
    dmu_dc[active] = -Kinv[6:, :5]
    torch.testing.assert_close(J[6:, :5], dmu_dc, rtol=1e-10, atol=1e-12)


def test_kkt_nonlinear_ball_constraint_matches_projection():
    """min 0.5||x - z||^2 s.t. ||x||^2 - r^2 <= 0: x = r z/||z||, mu = (||z||/r - 1)/2; dx/dz = d P_ball/dz."""
    z, r = rand(4, seed=28, scale=2.0), 1.5
    nz = torch.linalg.vector_norm(z)
    assert nz > r
    x, mu = r * z / nz, (nz / r - 1) / 2
    cond = kkt(
        lambda x_, z_: 0.5 * ((x_ - z_) ** 2).sum(),
        ineq_constraints=lambda x_: (x_**2).sum(-1, keepdim=True) - r**2,
    )
    assert maxabs(cond((x, (), mu[None]), (z,))) < ZERO
    assert maxabs(cond((x, (), 1.1 * mu[None]), (z,))) > OFF

    def F(s, t):
        stat, _, slack = cond((s[:4], (), s[4:]), (t,))
        return torch.cat([stat, slack])

    J = implicit_jacobian(F, torch.cat([x, mu[None]]), z)
    torch.testing.assert_close(J[:4], jacrev(project_l2_ball)(z, r), rtol=1e-10, atol=1e-12)


def test_kkt_vmap_over_problems():
    Q, c, E, b, _, _, _ = eq_qp()
    bs = rand(3, 2, seed=29)
    n = 5
    K = torch.zeros(n + 2, n + 2, dtype=DT)
    K[:n, :n], K[:n, n:], K[n:, :n] = Q, E.T, E
    sols = torch.linalg.solve(K, torch.cat([-c.expand(3, n), bs], -1).unsqueeze(-1)).squeeze(-1)
    cond = kkt(qp_objective, eq_constraints=lambda x_, b_: E @ x_ - b_)
    out = vmap(lambda s, b_: cond((s[:n], s[n:], ()), (Q, c), (b_,)))(sols, bs)
    assert out[0].shape == (3, n) and maxabs(out) < ZERO


def test_kkt_errors():
    f = lambda x: (x**2).sum()  # noqa: E731
    h = lambda x: x.sum(-1, keepdim=True) - 1  # noqa: E731
    cond = kkt(f, eq_constraints=h)
    x = torch.tensor([0.5, 0.5], dtype=DT)
    with pytest.raises(ValueError, match="triple"):
        cond(x)
    with pytest.raises(ValueError, match="eq_dual"):
        cond((x, (), ()))
    with pytest.raises(ValueError, match="ineq_dual"):
        cond((x, torch.zeros(1, dtype=DT), torch.zeros(1, dtype=DT)))
    with pytest.raises(ValueError, match="eq_dual"):
        cond((x, torch.zeros(3, dtype=DT), ()))


# ---------------------------------------------------------------- through custom_root (if present)

try:  # the decorator is written concurrently; these tests run once it exists
    from bilevel.implicit.root import custom_fixed_point, custom_root

    HAVE_ROOT = True
except Exception:  # pragma: no cover - depends on the state of the tree
    HAVE_ROOT = False

needs_root = pytest.mark.skipif(not HAVE_ROOT, reason="bilevel.implicit.root is not importable")


@needs_root
def test_root_lasso_gradients_match_closed_form():
    X, y, lam, w_star, S = lasso_problem()
    eta = 1.0 / float(torch.linalg.matrix_norm(X, 2) ** 2)

    @custom_root(proximal_gradient(lsq_objective, prox_lasso, stepsize=eta))
    def lasso(objective_args, l1reg):
        X_, y_ = objective_args
        return lasso_cd(X_.detach(), y_.detach(), float(l1reg))

    yv = y.clone().requires_grad_()
    lv = lam.clone().requires_grad_()
    w = lasso((X, yv), lv)
    torch.testing.assert_close(w.detach(), w_star, rtol=0, atol=1e-12)
    v = rand(8, seed=30)
    gy, gl = torch.autograd.grad(w, (yv, lv), v)
    XS = X[:, S]
    G = XS.T @ XS
    vS = v[S]
    torch.testing.assert_close(gy, XS @ torch.linalg.solve(G, vS), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(gl, -(vS @ torch.linalg.solve(G, torch.sign(w_star[S]))), rtol=1e-6, atol=1e-8)


@needs_root
def test_root_nnls_fixed_point_map():
    scipy_optimize = pytest.importorskip("scipy.optimize")
    X, y, w_star, S = nnls_problem()
    eta = 1.0 / float(torch.linalg.matrix_norm(X, 2) ** 2)
    cond = projected_gradient(lsq_objective, project_nonnegative, stepsize=eta)

    @custom_fixed_point(cond.fixed_point_map)
    def nnls(objective_args, projection_args):
        X_, y_ = objective_args
        return torch.from_numpy(scipy_optimize.nnls(X_.detach().numpy(), y_.detach().numpy())[0])

    yv = y.clone().requires_grad_()
    w = nnls((X, yv), ())
    v = rand(6, seed=31)
    (gy,) = torch.autograd.grad(w, yv, v)
    XS = X[:, S]
    torch.testing.assert_close(gy, XS @ torch.linalg.solve(XS.T @ XS, v[S]), rtol=1e-6, atol=1e-8)


@needs_root
def test_root_simplex_projection_and_mirror_descent():
    z = rand(7, seed=5, scale=0.5)
    f = lambda x, z_: 0.5 * ((x - z_) ** 2).sum()  # noqa: E731

    @custom_root(projected_gradient(f, project_simplex, stepsize=0.5))
    def proj(objective_args, projection_args):
        return project_simplex(objective_args[0].detach(), *projection_args)

    zv = z.clone().requires_grad_()
    x = proj((zv,), ())
    S = (x.detach() > 0).to(DT)
    v = rand(7, seed=32)
    (gz,) = torch.autograd.grad(x, zv, v)
    torch.testing.assert_close(gz, (torch.diag(S) - torch.outer(S, S) / S.sum()) @ v, rtol=1e-6, atol=1e-8)

    c, tau = rand(6, seed=17), torch.tensor(0.7, dtype=DT)

    @custom_root(mirror_descent(entropic, stepsize=0.5))
    def softmin(objective_args, projection_args):
        c_, tau_ = objective_args
        return torch.softmax(-c_.detach() / tau_.detach(), -1)

    cv = c.clone().requires_grad_()
    p = softmin((cv, tau), ())
    u = rand(6, seed=33)
    (gc,) = torch.autograd.grad(p, cv, u)
    pd = p.detach()
    torch.testing.assert_close(gc, -(torch.diag(pd) - torch.outer(pd, pd)) @ u / tau, rtol=1e-6, atol=1e-8)


@needs_root
def test_root_kkt_equality_qp():
    Q, c, E, b, K, x_star, nu_star = eq_qp()
    cond = kkt(qp_objective, eq_constraints=lambda x_, E_, b_: E_ @ x_ - b_)

    @custom_root(cond)
    def qp(objective_args, eq_args, ineq_args):
        Q_, c_ = objective_args
        E_, b_ = eq_args
        n, m = Q_.shape[0], E_.shape[0]
        K_ = torch.zeros(n + m, n + m, dtype=DT)
        K_[:n, :n], K_[:n, n:], K_[n:, :n] = Q_, E_.T, E_
        s = torch.linalg.solve(K_, torch.cat([-c_, b_]))
        return (s[:n], s[n:], ())

    cv, bv = c.clone().requires_grad_(), b.clone().requires_grad_()
    x, nu, _ = qp((Q, cv), (E, bv), ())
    torch.testing.assert_close(x.detach(), x_star)
    v = rand(5, seed=34)
    gc, gb = torch.autograd.grad(x, (cv, bv), v)
    Kinv = torch.linalg.inv(K)
    torch.testing.assert_close(gc, -Kinv[:5, :5].T @ v, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(gb, Kinv[:5, 5:].T @ v, rtol=1e-6, atol=1e-8)
