"""The math behind the Sinkhorn re-basin tutorial (examples/plot_sinkhorn_rebasin.py).

A log-domain Sinkhorn solver with a gauge-fixed fixed-point map, made
differentiable by ``bilevel.custom_fixed_point``, is checked against its own
oracles: ``gradcheck`` (finite differences, float64), autograd through unrolled
iterations, the closed-form plan of a separable cost, the marginals, and the
per-element results of batched and vmapped calls.  The last test runs the
tutorial itself and checks the numbers it prints its claims about.
"""

import pytest
import torch

import bilevel

pytestmark = pytest.mark.filterwarnings("error::bilevel.status.BilevelWarning")

DTYPE = torch.float64


# The same maps as the example's, written independently in the primal (scaling) form of
# Sinkhorn: K = exp(-C / eps), u = a / (K v), v = b / (K^T u), with f = eps log u and
# g = eps log v (the costs here keep exp(-C / eps) far from underflow).
def sweep(potentials, C, eps):
    K = torch.exp(-C / eps)
    n, m = C.shape[-2:]
    u = (1.0 / n) / (K * torch.exp(potentials[1] / eps).unsqueeze(-2)).sum(-1)
    v = (1.0 / m) / (K * u.unsqueeze(-1)).sum(-2)
    return eps * torch.log(u), eps * torch.log(v)


def T(potentials, C, eps):
    f, g = sweep(potentials, C, eps)
    return f + g[..., -1:], g - g[..., -1:]  # the gauge g_m = 0


def plan(potentials, C, eps):
    u, v = (torch.exp(p / eps) for p in potentials)
    return u.unsqueeze(-1) * torch.exp(-C / eps) * v.unsqueeze(-2)


def solve(C, eps, tol=1e-14, maxiter=20_000, fixed_point_map=T):
    """Sinkhorn to a tight tolerance; works on any leading batch dimensions."""
    n = C.shape[-2]
    f = torch.zeros(C.shape[:-1], dtype=C.dtype)
    g = torch.zeros(C.shape[:-2] + C.shape[-1:], dtype=C.dtype)
    for k in range(maxiter):
        f, g = fixed_point_map((f, g), C, eps)
        if k % 10 == 0 and float((n * plan((f, g), C, eps).sum(-1) - 1).abs().max()) < tol:
            break
    return f, g


sinkhorn = bilevel.custom_fixed_point(T)(solve)
sinkhorn_batched = bilevel.custom_fixed_point(T, batch_dims=1)(solve)


def cost(n=5, m=4, batch=(), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(*batch, n, m, generator=generator, dtype=DTYPE)


def test_plan_marginals_and_gauge():
    C, eps = cost(6, 4), 0.05
    f, g = sinkhorn(C, eps)
    P = plan((f, g), C, eps)
    assert torch.allclose(P.sum(-1), torch.full((6,), 1 / 6, dtype=DTYPE), atol=1e-13)
    assert torch.allclose(P.sum(-2), torch.full((4,), 1 / 4, dtype=DTYPE), atol=1e-13)
    assert float(g[-1]) == 0.0  # the gauge
    # a fixed point of T, and of the plain sweep too (the gauge shift is zero there)
    for a, b in zip(T((f, g), C, eps), (f, g)):
        assert torch.allclose(a, b, atol=1e-13)
    for a, b in zip(sweep((f, g), C, eps), (f, g)):
        assert torch.allclose(a, b, atol=1e-13)


def test_separable_cost_gives_the_independent_plan():
    """C_ij = u_i + v_j: the optimal plan is a b^T, whatever eps."""
    u, v = torch.randn(5, dtype=DTYPE), torch.randn(3, dtype=DTYPE)
    C = u[:, None] + v[None, :]
    for eps in (0.05, 1.0):
        P = plan(sinkhorn(C, eps), C, eps)
        assert torch.allclose(P, torch.full((5, 3), 1 / 15, dtype=DTYPE), atol=1e-13)


def test_gauge_makes_the_implicit_system_invertible():
    C, eps = cost(5, 5), 0.1
    f, g = solve(C, eps)

    def smallest_singular_value(fixed_point_map):
        jac = torch.func.jacrev(lambda f, g: torch.cat(fixed_point_map((f, g), C, eps)), argnums=(0, 1))(f, g)
        return float(torch.linalg.svdvals(torch.eye(10, dtype=DTYPE) - torch.cat(jac, dim=1))[-1])

    assert smallest_singular_value(sweep) < 1e-12  # null vector (1, -1)
    assert smallest_singular_value(T) > 1e-2


def test_gradcheck_of_the_plan():
    eps = 0.5

    def P_of(C):
        return plan(sinkhorn(C, eps), C, eps)

    C = cost(4, 3).requires_grad_()
    assert torch.autograd.gradcheck(P_of, (C,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_implicit_gradient_matches_unrolled_autograd():
    C, eps = cost(6, 5, seed=1), 0.1
    W = torch.randn(6, 5, dtype=DTYPE)

    def loss(C, potentials):
        P = plan(potentials, C, eps)
        return (W * P).sum() + (P**2).sum()

    C1 = C.clone().requires_grad_()
    (g_implicit,) = torch.autograd.grad(loss(C1, sinkhorn(C1, eps)), C1)
    C2 = C.clone().requires_grad_()
    potentials = (torch.zeros(6, dtype=DTYPE), torch.zeros(5, dtype=DTYPE))
    for _ in range(2000):
        potentials = T(potentials, C2, eps)
    (g_unrolled,) = torch.autograd.grad(loss(C2, potentials), C2)
    assert float((g_implicit - g_unrolled).norm() / g_unrolled.norm()) < 1e-10
    assert sinkhorn.last_info.ok


def test_plain_sweep_gives_the_same_gradient_of_the_plan():
    """Without the gauge the adjoint system is singular but consistent for a loss of P."""
    C, eps = cost(6, 6, seed=2), 0.1
    W = torch.randn(6, 6, dtype=DTYPE)
    plain = bilevel.custom_fixed_point(sweep)(solve)
    grads = []
    for solver in (sinkhorn, plain):
        C_ = C.clone().requires_grad_()
        grads.append(torch.autograd.grad((W * plan(solver(C_, eps), C_, eps)).sum(), C_)[0])
    assert torch.allclose(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_loss_of_the_potentials_without_a_gauge_warns():
    """f alone is not defined without a gauge: the adjoint system is inconsistent."""
    C, eps = cost(6, 6, seed=3), 0.1
    plain = bilevel.custom_fixed_point(sweep)(solve)
    C_ = C.clone().requires_grad_()
    with pytest.warns(bilevel.CurvatureWarning, match="singular"):
        torch.autograd.grad(plain(C_, eps)[0][0], C_)
    # with the gauge g_m = 0, f_1 is a function of C and its gradient is certified
    torch.autograd.grad(sinkhorn(C_, eps)[0][0], C_)
    assert sinkhorn.last_info.ok


def test_batched_costs_match_single_solves():
    C, eps = cost(5, 4, batch=(3,), seed=4), 0.1
    W = torch.randn(3, 5, 4, dtype=DTYPE)

    def loss(C, potentials):
        return (W * plan(potentials, C, eps)).sum()

    Cb = C.clone().requires_grad_()
    (g_batched,) = torch.autograd.grad(loss(Cb, sinkhorn_batched(Cb, eps)), Cb)
    assert sinkhorn_batched.last_info.linear_solve.converged.shape == (3,)
    assert bool(sinkhorn_batched.last_info.linear_solve.converged.all())
    Cv = C.clone().requires_grad_()
    (g_vmap,) = torch.autograd.grad(
        loss(Cv, torch.func.vmap(lambda c: sinkhorn(c, eps))(Cv)), Cv)
    for i in range(3):
        Ci = C[i].clone().requires_grad_()
        (g_i,) = torch.autograd.grad((W[i] * plan(sinkhorn(Ci, eps), Ci, eps)).sum(), Ci)
        assert torch.allclose(g_batched[i], g_i, rtol=1e-9, atol=1e-12), i
        assert torch.allclose(g_vmap[i], g_i, rtol=1e-9, atol=1e-12), i


def test_jacobian_of_the_plan_under_torch_func():
    """jacrev through the implicit plan equals the Jacobian of the unrolled iterations."""
    C, eps = cost(3, 3, seed=5), 0.3

    def implicit(C):
        return plan(sinkhorn(C, eps), C, eps)

    def unrolled(C):
        potentials = (torch.zeros(3, dtype=DTYPE), torch.zeros(3, dtype=DTYPE))
        for _ in range(500):
            potentials = T(potentials, C, eps)
        return plan(potentials, C, eps)

    J = torch.func.jacrev(implicit)(C)
    assert J.shape == (3, 3, 3, 3)
    assert torch.allclose(J, torch.func.jacrev(unrolled)(C), atol=1e-11)
    # each entry of C moves mass within the plan but not its total: the rows of dP/dC sum to zero
    assert torch.allclose(J.sum(dim=(0, 1)), torch.zeros(3, 3, dtype=DTYPE), atol=1e-12)


@pytest.mark.slow  # about 13 s; the docs build runs the example too, this checks what it claims
def test_sinkhorn_rebasin_example():
    from test_examples import run

    pytest.importorskip("scipy")
    # the example itself records the warnings it expects; outside them none may fire
    ns = run("plot_sinkhorn_rebasin")
    assert ns["sigma_plain"] < 1e-12 and ns["sigma_gauge"] > 1e-2
    assert ns["plain_difference"] < 1e-10
    assert ns["caught"] and issubclass(ns["caught"][0].category, bilevel.CurvatureWarning)
    assert ns["error_fd"] < 1e-6 and ns["error_unrolled"] < 1e-10
    # time / memory table: the implicit route's memory is flat, unrolling's grows linearly
    table = ns["table"]
    counts = ns["iteration_counts"]
    assert len({row["bytes_ift"] for row in table.values()}) == 1
    assert table[counts[-1]]["bytes_unrolled"] > 50 * table[counts[-1]]["bytes_ift"]
    assert table[counts[-1]]["bytes_unrolled"] > 0.9 * (counts[-1] / counts[1]) * table[counts[1]]["bytes_unrolled"]
    assert not table[counts[0]]["certificate_ok"]  # too few iterations: the certificate warns
    assert table[counts[-1]]["certificate_ok"] and table[counts[-1]]["error_ift"] < 1e-10
    # re-basin: every alignment lowers the barrier, the learned ones several-fold, with no warning
    barriers = ns["barriers"]
    naive = barriers["no alignment"]
    assert naive > 0.1
    assert barriers["learned, weight distance"] < naive / 3
    assert barriers["learned, midpoint loss"] < naive / 3
    assert not ns["learning_warnings"]
    assert ns["function_change"] < 1e-12
