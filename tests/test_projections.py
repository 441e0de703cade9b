"""Tests of bilevel.implicit.projections and bilevel.implicit.prox (float64 oracles)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import seeded_randn
from torch.func import grad, jacrev, jvp, vmap

from bilevel.implicit.projections import (
    Box,
    L1Ball,
    L2Ball,
    NonNegative,
    Simplex,
    kl_projection_simplex,
    project_affine_set,
    project_box,
    project_halfspace,
    project_hyperplane,
    project_l1_ball,
    project_l2_ball,
    project_linf_ball,
    project_nonnegative,
    project_simplex,
)
from bilevel.implicit.prox import (
    prox_elastic_net,
    prox_group_lasso,
    prox_lasso,
    prox_none,
    prox_nonnegative_lasso,
    prox_ridge,
)

DT = torch.float64


def rand(*shape, seed=0, scale=1.0):
    return seeded_randn(*shape, seed=seed, scale=scale, dtype=DT)


def simplex_reference(z: torch.Tensor, radius: float = 1.0) -> torch.Tensor:
    """Independent oracle: bisection on the threshold theta with sum(max(z - theta, 0)) = r."""
    lo = z.min(-1, keepdim=True).values - radius
    hi = z.max(-1, keepdim=True).values
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        too_big = torch.clamp(z - mid, min=0).sum(-1, keepdim=True) > radius
        lo = torch.where(too_big, mid, lo)
        hi = torch.where(too_big, hi, mid)
    return torch.clamp(z - 0.5 * (lo + hi), min=0)


def vertex_certificate(z, x, vertices):
    """Projection optimality onto conv(vertices): <z - x, v - x> <= 0 for every vertex v."""
    return ((vertices - x) @ (z - x)).max()


# ------------------------------------------------------------------ nonnegative / box


def test_nonnegative_and_box_match_clamp():
    z = rand(5, 7)
    assert torch.equal(project_nonnegative(z), torch.clamp(z, min=0))
    lo, hi = -0.3 * torch.ones(7, dtype=DT), rand(7, seed=1).abs()
    torch.testing.assert_close(project_box(z, lo, hi), torch.clamp(z, lo, hi), rtol=0, atol=0)
    torch.testing.assert_close(project_box(z, -0.5, 0.5), torch.clamp(z, -0.5, 0.5), rtol=0, atol=0)
    torch.testing.assert_close(project_box(z, None, 0.5), torch.clamp(z, max=0.5), rtol=0, atol=0)
    torch.testing.assert_close(project_box(z, -0.5, None), torch.clamp(z, min=-0.5), rtol=0, atol=0)
    assert project_box(z.float(), -0.5, 0.5).dtype == torch.float32


def test_box_jacobians_are_indicators():
    z = torch.tensor([-2.0, -0.2, 0.3, 1.5], dtype=DT)
    lo = torch.full((4,), -1.0, dtype=DT)
    hi = torch.ones(4, dtype=DT)
    jz, jl, ju = jacrev(project_box, argnums=(0, 1, 2))(z, lo, hi)
    torch.testing.assert_close(jz, torch.diag(((z > lo) & (z < hi)).to(DT)))
    torch.testing.assert_close(jl, torch.diag((z < lo).to(DT)))
    torch.testing.assert_close(ju, torch.diag((z > hi).to(DT)))
    # Broadcast scalar tensor bound: d/dl sums the clamped-below entries.
    lo0 = torch.tensor(-1.0, dtype=DT)
    torch.testing.assert_close(jacrev(project_box, argnums=1)(z, lo0, hi), (z < -1).to(DT))


def test_box_errors():
    with pytest.raises(ValueError, match="lower"):
        project_box(torch.zeros(2, dtype=DT), 1.0, 0.0)
    with pytest.raises(TypeError, match="`upper`"):
        project_box(torch.zeros(2, dtype=DT), 0.0, "1")
    with pytest.raises(TypeError, match="`z`"):
        project_box([1.0, 2.0], 0.0, 1.0)
    with pytest.raises(TypeError, match="floating"):
        project_nonnegative(torch.arange(3))


# ------------------------------------------------------------------ simplex


@pytest.mark.parametrize("radius", [1.0, 0.3, 5.0])
def test_simplex_against_bisection(radius):
    z = rand(64, 9, seed=2, scale=2.0)
    x = project_simplex(z, radius)
    torch.testing.assert_close(x, simplex_reference(z, radius), rtol=0, atol=1e-12)
    assert (x >= 0).all()
    torch.testing.assert_close(x.sum(-1), torch.full((64,), radius, dtype=DT), rtol=0, atol=1e-12)
    # optimality certificate against the vertices r e_i
    vertices = radius * torch.eye(9, dtype=DT)
    for zi, xi in zip(z, x):
        assert vertex_certificate(zi, xi, vertices) <= 1e-12


def test_simplex_known_values_and_edge_cases():
    torch.testing.assert_close(
        project_simplex(torch.tensor([0.5, 1.0, -1.0], dtype=DT)), torch.tensor([0.25, 0.75, 0.0], dtype=DT)
    )
    # already on the simplex: unchanged (idempotence)
    p = torch.tensor([0.2, 0.3, 0.5], dtype=DT)
    torch.testing.assert_close(project_simplex(p), p, rtol=0, atol=1e-15)
    # single coordinate, constant vector, ties
    torch.testing.assert_close(project_simplex(torch.tensor([-3.0], dtype=DT), 2.0), torch.tensor([2.0], dtype=DT))
    torch.testing.assert_close(project_simplex(torch.full((4,), 7.0, dtype=DT)), torch.full((4,), 0.25, dtype=DT))
    z = rand(10, 6, seed=3)
    x = project_simplex(z)
    torch.testing.assert_close(project_simplex(x), x, rtol=0, atol=1e-14)


def test_simplex_batched_equals_loop_and_vmap():
    z = rand(3, 4, 7, seed=4)
    radius = torch.tensor([[0.5, 1.0, 2.0, 3.0]] * 3, dtype=DT)
    batched = project_simplex(z, radius)
    looped = torch.stack([torch.stack([project_simplex(z[i, j], radius[i, j]) for j in range(4)]) for i in range(3)])
    torch.testing.assert_close(batched, looped, rtol=0, atol=1e-14)
    torch.testing.assert_close(vmap(vmap(project_simplex))(z, radius), batched, rtol=0, atol=1e-14)


def test_simplex_jacobian_closed_form():
    z = rand(8, seed=5)
    radius = torch.tensor(2.0, dtype=DT)
    x = project_simplex(z, radius)
    support = (x > 0).to(DT)
    k = support.sum()
    assert 1 < k < 8  # a nontrivial support
    expected = torch.diag(support) - torch.outer(support, support) / k
    jz, jr = jacrev(project_simplex, argnums=(0, 1))(z, radius)
    torch.testing.assert_close(jz, expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(jr, support / k, rtol=0, atol=1e-14)
    # forward mode agrees
    v = rand(8, seed=6)
    torch.testing.assert_close(jvp(lambda t: project_simplex(t, radius), (z,), (v,))[1], expected @ v)


def test_simplex_gradcheck():
    z = rand(3, 6, seed=7).requires_grad_()
    r = torch.tensor([0.5, 1.0, 1.5], dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(project_simplex, (z, r))


def test_simplex_errors():
    with pytest.raises(ValueError, match="at least 1 dimension"):
        project_simplex(torch.tensor(1.0, dtype=DT))
    with pytest.raises(ValueError, match="radius"):
        project_simplex(torch.ones(3, dtype=DT), -1.0)
    with pytest.raises(ValueError, match="radius"):
        project_simplex(torch.ones(3, dtype=DT), 0.0)
    with pytest.raises(ValueError, match="radius"):
        project_simplex(torch.ones(2, 3, dtype=DT), torch.ones(2, 2, 2, dtype=DT))


# ------------------------------------------------------------------ l1 / l2 / linf balls


def test_l1_ball_known_cases_and_reference():
    torch.testing.assert_close(project_l1_ball(torch.tensor([2.0, 0.5], dtype=DT)), torch.tensor([1.0, 0.0], dtype=DT))
    torch.testing.assert_close(
        project_l1_ball(torch.tensor([1.0, -1.0, 0.5], dtype=DT)), torch.tensor([0.5, -0.5, 0.0], dtype=DT)
    )
    inside = torch.tensor([0.2, -0.3, 0.1], dtype=DT)
    torch.testing.assert_close(project_l1_ball(inside), inside, rtol=0, atol=0)
    z = rand(32, 6, seed=8, scale=2.0)
    x = project_l1_ball(z, 1.5)
    outside = z.abs().sum(-1) > 1.5
    assert outside.any() and (~outside).any() or outside.all()
    ref = torch.where(outside[:, None], torch.sign(z) * simplex_reference(z.abs(), 1.5), z)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-12)
    vertices = 1.5 * torch.cat([torch.eye(6, dtype=DT), -torch.eye(6, dtype=DT)])
    for zi, xi in zip(z, x):
        assert vertex_certificate(zi, xi, vertices) <= 1e-12
    torch.testing.assert_close(project_l1_ball(x, 1.5), x, rtol=0, atol=1e-14)


def test_l1_ball_gradcheck_and_batched():
    z = rand(4, 5, seed=9, scale=2.0)
    looped = torch.stack([project_l1_ball(zi, 0.8) for zi in z])
    torch.testing.assert_close(project_l1_ball(z, 0.8), looped, rtol=0, atol=1e-15)
    assert torch.autograd.gradcheck(lambda t: project_l1_ball(t, 0.8), (z.requires_grad_(),))


def test_l2_ball_values_and_jacobian():
    z = torch.tensor([3.0, 4.0, 0.0], dtype=DT)
    torch.testing.assert_close(project_l2_ball(z, 2.0), z * 2.0 / 5.0)
    inside = torch.tensor([0.1, -0.2, 0.3], dtype=DT)
    torch.testing.assert_close(project_l2_ball(inside), inside, rtol=0, atol=0)
    r = 2.0
    n = torch.linalg.vector_norm(z)
    expected = (torch.eye(3, dtype=DT) - torch.outer(z, z) / n**2) * r / n
    torch.testing.assert_close(jacrev(project_l2_ball)(z, r), expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(jacrev(project_l2_ball)(inside), torch.eye(3, dtype=DT))
    # finite gradient at the origin
    g = grad(lambda t: project_l2_ball(t).sum())(torch.zeros(3, dtype=DT))
    torch.testing.assert_close(g, torch.ones(3, dtype=DT))
    # batched, radius per problem, idempotent
    zb = rand(6, 4, seed=10, scale=2.0)
    rb = torch.linspace(0.5, 3.0, 6, dtype=DT)
    xb = project_l2_ball(zb, rb)
    looped = torch.stack([project_l2_ball(a, b) for a, b in zip(zb, rb)])
    torch.testing.assert_close(xb, looped, rtol=0, atol=1e-15)
    torch.testing.assert_close(project_l2_ball(xb, rb), xb, rtol=0, atol=1e-15)
    assert torch.autograd.gradcheck(project_l2_ball, (zb.requires_grad_(), rb.clone().requires_grad_()))


def test_linf_ball():
    z = rand(5, 3, seed=11, scale=2.0)
    torch.testing.assert_close(project_linf_ball(z, 0.7), torch.clamp(z, -0.7, 0.7), rtol=0, atol=0)
    r = torch.tensor([0.5, 1.0, 1.5, 2.0, 2.5], dtype=DT)
    torch.testing.assert_close(project_linf_ball(z, r), torch.clamp(z, -r[:, None], r[:, None]), rtol=0, atol=0)


# ------------------------------------------------------------------ affine sets


def test_affine_set_projection():
    A, b, z = rand(3, 6, seed=12), rand(3, seed=13), rand(6, seed=14)
    x = project_affine_set(z, A, b)
    torch.testing.assert_close(A @ x, b, rtol=0, atol=1e-13)
    # z - x lies in the row space of A: z - x = A^T lam
    lam = torch.linalg.lstsq(A.T, z - x).solution
    torch.testing.assert_close(A.T @ lam, z - x, rtol=0, atol=1e-13)
    torch.testing.assert_close(project_affine_set(x, A, b), x, rtol=0, atol=1e-13)
    # Jacobian in z: the orthogonal projector onto null(A)
    P = torch.eye(6, dtype=DT) - A.T @ torch.linalg.solve(A @ A.T, A)
    torch.testing.assert_close(jacrev(project_affine_set)(z, A, b), P, rtol=0, atol=1e-13)
    assert torch.autograd.gradcheck(
        project_affine_set, (z.clone().requires_grad_(), A.clone().requires_grad_(), b.clone().requires_grad_())
    )
    # batched
    Ab, bb, zb = rand(4, 2, 5, seed=15), rand(4, 2, seed=16), rand(4, 5, seed=17)
    looped = torch.stack([project_affine_set(zi, Ai, bi) for zi, Ai, bi in zip(zb, Ab, bb)])
    torch.testing.assert_close(project_affine_set(zb, Ab, bb), looped, rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="`A`"):
        project_affine_set(z, A, rand(2))


def test_hyperplane_and_halfspace():
    a, z = rand(5, seed=18), rand(5, seed=19)
    b = float(a @ z) - 1.0  # z violates a^T x <= b
    xh = project_hyperplane(z, a, b)
    torch.testing.assert_close(xh, project_affine_set(z, a[None], torch.tensor([b], dtype=DT)))
    torch.testing.assert_close(project_halfspace(z, a, b), xh)
    torch.testing.assert_close(project_halfspace(z, a, b + 2.0), z, rtol=0, atol=0)  # feasible: unchanged
    x = project_halfspace(z, a, torch.tensor(b, dtype=DT))
    torch.testing.assert_close(a @ x, torch.tensor(b, dtype=DT))


def test_kl_projection_simplex():
    y = rand(3, 4, seed=20)
    torch.testing.assert_close(kl_projection_simplex(y, 2.0), 2.0 * torch.softmax(y, -1))
    # it is the KL projection of exp(y): minimizes KL(x || exp(y)) over the simplex; check against
    # random simplex points
    x = kl_projection_simplex(y[0])
    kl = lambda p: (p * (p.log() - y[0])).sum()  # noqa: E731 - KL up to constants
    e = -torch.log(torch.rand(500, 4, generator=torch.Generator().manual_seed(0), dtype=DT))
    others = e / e.sum(-1, keepdim=True)  # uniform on the simplex
    assert all(kl(x) <= kl(p) + 1e-14 for p in others)


# ------------------------------------------------------------------ set objects


def test_set_objects_project_and_check_fields():
    z = rand(4, 5, seed=21, scale=2.0)
    torch.testing.assert_close(NonNegative().project(z), project_nonnegative(z))
    torch.testing.assert_close(Box(-0.5, 0.5)(z), project_box(z, -0.5, 0.5))
    torch.testing.assert_close(Simplex(2.0).project(z), project_simplex(z, 2.0))
    torch.testing.assert_close(L1Ball(0.5).project(z), project_l1_ball(z, 0.5))
    torch.testing.assert_close(L2Ball(0.5).project(z), project_l2_ball(z, 0.5))
    assert Simplex().contains(project_simplex(z)).all()
    assert not Simplex().contains(z).any()
    assert bool(Box(0.0, 1.0).contains(torch.tensor([0.0, 0.5, 1.0], dtype=DT)))
    assert not bool(Box(0.0, 1.0).contains(torch.tensor([0.0, 1.5], dtype=DT)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        Simplex().radius = 2.0
    with pytest.raises(ValueError, match=r"Simplex.radius"):
        Simplex(-1.0)
    with pytest.raises(ValueError, match=r"L2Ball.radius"):
        L2Ball(torch.tensor([1.0, 0.0]))
    with pytest.raises(TypeError, match=r"L1Ball.radius"):
        L1Ball("1")
    with pytest.raises(ValueError, match=r"Box.lower must be <= Box.upper"):
        Box(torch.tensor([0.0, 2.0]), 1.0)
    with pytest.raises(ValueError, match="broadcast"):
        Box(torch.zeros(2), torch.ones(3))
    with pytest.raises(TypeError, match=r"Box.lower"):
        Box("a", 1.0)
    # bounds as tensors that require grad flow gradients
    lo = torch.tensor(0.0, dtype=DT, requires_grad=True)
    Box(lo, 1.0).project(torch.tensor([-1.0, -2.0, 0.5], dtype=DT)).sum().backward()
    assert lo.grad == 2.0


# ------------------------------------------------------------------ proximal operators


def _lasso_subgradient_gap(z, x, t):
    """Max violation of z - x in t * d|x| (exact optimality of soft thresholding)."""
    on = x != 0
    gap_on = (z - x - t * torch.sign(x)).abs()
    gap_off = torch.clamp((z - x).abs() - t, min=0)
    return torch.where(on, gap_on, gap_off).max()


def test_prox_lasso_closed_form_and_optimality():
    z = rand(50, seed=22, scale=2.0)
    lam = rand(50, seed=23).abs()
    x = prox_lasso(z, lam, 0.7)
    torch.testing.assert_close(x, torch.sign(z) * torch.clamp(z.abs() - 0.7 * lam, min=0), rtol=0, atol=0)
    assert _lasso_subgradient_gap(z, x, 0.7 * lam) <= 1e-14
    # no perturbation lowers the prox objective
    obj = lambda v: 0.5 * ((v - z) ** 2).sum() + 0.7 * (lam * v.abs()).sum()  # noqa: E731
    for seed in range(20):
        assert obj(x) <= obj(x + 1e-3 * rand(50, seed=100 + seed))
    # derivative in the hyper-parameter: -s sign(z) on the support
    jl = jacrev(prox_lasso, argnums=1)(z, lam, 0.7)
    torch.testing.assert_close(jl, torch.diag(-0.7 * torch.sign(z) * (z.abs() > 0.7 * lam)))
    assert torch.autograd.gradcheck(prox_lasso, (z.clone().requires_grad_(), lam.clone().requires_grad_(), 0.7))


def test_prox_lasso_numerical_minimum():
    """Against L-BFGS-B on the smooth split x = p - n, p, n >= 0."""
    scipy_optimize = pytest.importorskip("scipy.optimize")
    import numpy as np

    z = rand(8, seed=24, scale=2.0).numpy()
    lam = 0.6

    def fun(pn):
        p, n = pn[:8], pn[8:]
        r = p - n - z
        return 0.5 * r @ r + lam * (p.sum() + n.sum()), np.concatenate([r + lam, -r + lam])

    res = scipy_optimize.minimize(fun, np.zeros(16), jac=True, method="L-BFGS-B", bounds=[(0, None)] * 16,
                                  options=dict(ftol=1e-15, gtol=1e-12, maxiter=1000))
    x_ref = torch.from_numpy(res.x[:8] - res.x[8:])
    torch.testing.assert_close(prox_lasso(torch.from_numpy(z), lam), x_ref, rtol=0, atol=1e-7)


def test_prox_elastic_net_ridge_nonneg_none():
    z = rand(30, seed=25, scale=2.0)
    l1, l2, s = 0.4, 1.3, 0.5
    x = prox_elastic_net(z, (l1, l2), s)
    torch.testing.assert_close(x, torch.sign(z) * torch.clamp(z.abs() - s * l1, min=0) / (1 + s * l2))
    # optimality: z - x - s*l2*x in s*l1*d|x|
    assert _lasso_subgradient_gap(z - s * l2 * x, x, s * l1) <= 1e-14
    torch.testing.assert_close(prox_ridge(z, l2, s), z / (1 + s * l2))
    # ridge prox minimizes its objective: gradient zero
    xr = prox_ridge(z, torch.tensor(l2, dtype=DT), s)
    torch.testing.assert_close(xr - z + s * l2 * xr, torch.zeros_like(z), rtol=0, atol=1e-14)
    xn = prox_nonnegative_lasso(z, l1, s)
    torch.testing.assert_close(xn, torch.clamp(z - s * l1, min=0))
    # nonnegative lasso = lasso followed by nonnegativity (they commute here)
    torch.testing.assert_close(xn, torch.clamp(prox_lasso(z, l1, s), min=0))
    assert prox_none(z, None, 3.0) is z
    with pytest.raises(TypeError, match="hyperparams"):
        prox_elastic_net(z, 0.5)
    with pytest.raises(ValueError, match="l1reg"):
        prox_lasso(z, -1.0)
    with pytest.raises(ValueError, match="l1reg"):
        prox_lasso(z, None)
    with pytest.raises(ValueError, match="scaling"):
        prox_ridge(z, 1.0, -0.1)


def test_prox_group_lasso():
    z = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]], dtype=DT)
    x = prox_group_lasso(z, 1.0)
    torch.testing.assert_close(x, torch.tensor([[2.4, 3.2], [0.0, 0.0], [0.0, 0.0]], dtype=DT))
    # optimality: z - x = t x/||x|| on active groups; ||z|| <= t on inactive
    zr = rand(20, 3, seed=26)
    t = 0.9
    xr = prox_group_lasso(zr, t)
    nz = xr.norm(dim=-1) > 0
    assert nz.any() and (~nz).any()
    torch.testing.assert_close((zr - xr)[nz], t * xr[nz] / xr[nz].norm(dim=-1, keepdim=True))
    assert (zr[~nz].norm(dim=-1) <= t).all()
    # finite gradients everywhere, and gradcheck on a generic point
    g = grad(lambda v: prox_group_lasso(v, 1.0).sum())(z)
    assert torch.isfinite(g).all()
    lam = torch.tensor([0.5, 0.9, 1.1], dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(prox_group_lasso, (rand(3, 4, seed=27).requires_grad_(), lam))


@pytest.mark.parametrize("l2reg, scaling", [(0.0, 1.0), (1.0, 0.0), (torch.tensor(0.0, dtype=DT), 1.0)])
def test_prox_group_lasso_with_a_zero_threshold_is_the_identity_with_its_jacobian_at_zero(l2reg, scaling):
    """s * lambda = 0: the operator is the identity, whose Jacobian is I also at z = 0 (the
    group's norm is 0 there and the factor 1 - t / ||z|| must not become 0 / 0 or 0)."""
    for z in (torch.zeros(3, dtype=DT), rand(3, seed=28)):
        torch.testing.assert_close(prox_group_lasso(z, l2reg, scaling), z)
        J = torch.func.jacrev(lambda v: prox_group_lasso(v, l2reg, scaling))(z)
        torch.testing.assert_close(J, torch.eye(3, dtype=DT))


# ------------------------------------------------------------------ torch.func / dtype contract

A_AFF = rand(2, 5, seed=40)
B_AFF = rand(2, seed=41)
PROJECTIONS = {
    "nonnegative": project_nonnegative,
    "box": lambda z: project_box(z, -0.5, torch.full((5,), 0.7, dtype=z.dtype)),
    "simplex": lambda z: project_simplex(z, 1.5),
    "l1_ball": lambda z: project_l1_ball(z, 0.8),
    "l2_ball": lambda z: project_l2_ball(z, 0.8),
    "linf_ball": lambda z: project_linf_ball(z, 0.8),
    "affine": lambda z: project_affine_set(z, A_AFF.to(z.dtype), B_AFF.to(z.dtype)),
    "halfspace": lambda z: project_halfspace(z, A_AFF[0].to(z.dtype), 0.1),
    "kl_simplex": kl_projection_simplex,
}


@pytest.mark.parametrize("name", sorted(PROJECTIONS))
def test_projection_contract(name):
    """vmap == batched == loop, idempotent (projections), dtype kept, jacrev/jvp agree, finite."""
    f = PROJECTIONS[name]
    z = rand(6, 5, seed=42, scale=1.5)
    batched = f(z)
    looped = torch.stack([f(zi) for zi in z])
    torch.testing.assert_close(batched, looped, rtol=0, atol=1e-14)
    torch.testing.assert_close(vmap(f)(z), batched, rtol=0, atol=1e-14)
    if name != "kl_simplex":  # a Bregman map from the dual space, not idempotent
        torch.testing.assert_close(f(batched), batched, rtol=0, atol=1e-13)
    assert f(z.float()).dtype == torch.float32
    J = jacrev(f)(z[0])
    v = rand(5, seed=43)
    torch.testing.assert_close(jvp(f, (z[0],), (v,))[1], J @ v, rtol=1e-12, atol=1e-13)
    assert torch.isfinite(J).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_simplex_keeps_its_mass_for_large_entries(dtype):
    # cumsum(u) - r loses r next to entries of 1e9 unless the entries are shifted first
    z = torch.tensor([3e8, 1e9, 2e9], dtype=dtype)
    torch.testing.assert_close(project_simplex(z), torch.tensor([0.0, 0.0, 1.0], dtype=dtype))
    big = 1e9 * torch.randn(4, 50, generator=torch.Generator().manual_seed(0), dtype=dtype)
    torch.testing.assert_close(project_simplex(big).sum(-1), torch.ones(4, dtype=dtype))
    shifted = torch.tensor([0.5, 1.0, -1.0], dtype=dtype)
    torch.testing.assert_close(project_simplex(shifted + 1e3), project_simplex(shifted))
