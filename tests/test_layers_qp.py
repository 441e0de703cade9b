"""Batched QP solver and QPLayer: solutions, KKT gradients, batching, failures."""

import math
import warnings

import numpy as np
import pytest
import torch

from bilevel.layers import QPLayer, QPStatus, SolveError, SolveWarning, qp_solve
from bilevel.status import CurvatureWarning


def _problem(B=None, n=6, p=2, m=8, active=3, seed=0):
    """A strictly complementary QP with a known solution (z, nu, lam)."""
    g = torch.Generator().manual_seed(seed)
    lead = () if B is None else (B,)
    L = torch.randn(lead + (n, n), generator=g)
    Q = L @ L.mT / n + 0.5 * torch.eye(n)
    A = torch.randn(lead + (p, n), generator=g)
    G = torch.randn(lead + (m, n), generator=g)
    z = torch.randn(lead + (n,), generator=g)
    nu = torch.randn(lead + (p,), generator=g)
    slack = torch.rand(lead + (m,), generator=g) + 0.5
    lam = torch.rand(lead + (m,), generator=g) + 0.5
    slack[..., :active] = 0
    lam[..., active:] = 0
    mv = lambda M, v: (M @ v.unsqueeze(-1)).squeeze(-1)
    q = -(mv(Q, z) + mv(A.mT, nu) + mv(G.mT, lam))
    return {"Q": Q, "q": q, "A": A, "b": mv(A, z), "G": G, "h": mv(G, z) + slack}, z


def test_known_solution_and_duals():
    data, z = _problem()
    sol, info = qp_solve(**data, return_info=True)
    assert torch.allclose(sol, z, atol=1e-10)
    assert info.status == QPStatus.SOLVED and info.primal_residual < 1e-10
    assert torch.all(info.ineq_dual >= 0) and torch.all(info.slack >= 0)


def test_closed_forms_unconstrained_box_and_lp():
    Q = torch.diag(torch.tensor([1.0, 2.0, 4.0]))
    q = torch.tensor([1.0, -2.0, 8.0])
    assert torch.allclose(qp_solve(Q, q), -q / Q.diagonal())
    G, h = torch.cat([torch.eye(3), -torch.eye(3)]), torch.ones(6)
    assert torch.allclose(qp_solve(Q, q, G=G, h=h), (-q / Q.diagonal()).clamp(-1, 1), atol=1e-10)
    c = torch.tensor([1.0, -1.0, 0.5])  # LP over the box: a vertex
    assert torch.allclose(qp_solve(torch.zeros(3, 3), c, G=G, h=h), -c.sign(), atol=1e-9)


def test_gradcheck_all_inputs():
    data, _ = _problem(n=4, p=1, m=5, active=2)
    names = ["Q", "q", "A", "b", "G", "h"]
    inputs = [data[k].clone().requires_grad_() for k in names]
    assert torch.autograd.gradcheck(lambda *t: qp_solve(*t), inputs, eps=1e-6, atol=1e-6)


def test_second_derivatives_follow_the_implicit_rule_gradgradcheck():
    """The OptNet backward is built from differentiable operations on the saved solution,
    so second derivatives (Hessians of losses through the layer) are those of the
    solution map where the active set is locally constant: gradgradcheck on every input."""
    data, _ = _problem(n=4, p=1, m=5, active=2)
    names = ["Q", "q", "A", "b", "G", "h"]
    inputs = [data[k].clone().requires_grad_() for k in names]
    assert torch.autograd.gradgradcheck(lambda *t: qp_solve(*t, tol=1e-12), inputs, eps=1e-6, atol=1e-5)


def test_lp_gradient_against_finite_differences():
    # min c^T z over {z >= 0, 1^T z = 1, z_i <= u_i}: a non-degenerate vertex depends on u and b.
    c = torch.tensor([1.0, 2.0, 3.0])
    A, b = torch.ones(1, 3), torch.tensor([1.0], requires_grad=True)
    u = torch.tensor([0.4, 0.35, 0.9], requires_grad=True)
    G = torch.cat([-torch.eye(3), torch.eye(3)])
    h = lambda u: torch.cat([torch.zeros(3), u])
    z = qp_solve(torch.zeros(3, 3), c, A, b, G, h(u))
    assert torch.allclose(z, torch.tensor([0.4, 0.35, 0.25]), atol=1e-9)
    assert torch.autograd.gradcheck(lambda b, u: qp_solve(torch.zeros(3, 3), c, A, b, G, h(u)), (b, u))


def test_batched_equals_loop_forward_and_backward():
    data, z = _problem(B=5)
    inputs = {k: v.clone().requires_grad_() for k, v in data.items()}
    w = torch.randn(5, 6)
    sol = qp_solve(**inputs)
    assert sol.shape == (5, 6) and torch.allclose(sol, z, atol=1e-9)
    grads = torch.autograd.grad((sol * w).sum(), list(inputs.values()))
    for i in range(5):
        one = {k: v[i].detach().clone().requires_grad_() for k, v in data.items()}
        zi = qp_solve(**one)
        assert torch.allclose(zi, sol[i].detach(), atol=1e-10)
        gi = torch.autograd.grad((zi * w[i]).sum(), list(one.values()))
        for g_batch, g_one in zip(grads, gi):
            assert torch.allclose(g_batch[i], g_one, atol=1e-8)


def test_shared_inputs_broadcast_and_sum_gradients():
    data, _ = _problem(n=4, p=1, m=5, active=2)
    q = data["q"] + 0.1 * torch.randn(3, 4)  # batched q, everything else shared
    h = data["h"].clone().requires_grad_()
    z = qp_solve(data["Q"], q, data["A"], data["b"], data["G"], h)
    (g,) = torch.autograd.grad(z.sum(), h)
    expected = sum(torch.autograd.grad(qp_solve(data["Q"], q[i], data["A"], data["b"], data["G"], h).sum(), h)[0]
                   for i in range(3))
    assert torch.allclose(g, expected, atol=1e-8)


def test_layer_module_dtype_and_float32():
    layer = QPLayer(maxiter=50)
    data, z = _problem()
    data32 = {k: v.float() for k, v in data.items()}
    z32 = layer(**data32)
    assert z32.dtype == torch.float32 and torch.allclose(z32, z.float(), atol=1e-3)
    assert layer.last_info.status == QPStatus.SOLVED
    assert "maxiter=50" in repr(layer)


def test_infeasible_element_is_named():
    data, _ = _problem(B=3, n=3, p=0, m=2, active=0)
    G = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]]).expand(3, 2, 3)
    h = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [2.0, 0.0]])  # element 1: z1 <= -1 and z1 >= 1
    with pytest.raises(SolveError, match=r"batch element 1: INFEASIBLE") as err:
        qp_solve(data["Q"], data["q"], G=G, h=h)
    assert err.value.elements == [1] and err.value.statuses == ["INFEASIBLE"]
    _, info = qp_solve(data["Q"], data["q"], G=G, h=h, check=False, return_info=True)
    assert info.status.tolist() == [0, int(QPStatus.INFEASIBLE), 0]


def test_masked_failed_element_leaves_the_backward_alone():
    """The failed element (inconsistent equalities, a singular KKT matrix) is out of
    the loss: no CurvatureWarning for it, and a zero gradient."""
    y = torch.tensor([[0.5, 0.2], [0.3, 0.1]], requires_grad=True)
    A = torch.tensor([[[1.0, 1.0], [1.0, -1.0]], [[1.0, 0.0], [1.0, 0.0]]])  # 1: z1 = 0 and z1 = 1
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    layer = QPLayer()
    with pytest.warns(SolveWarning, match="batch element 1"):
        z = layer(torch.eye(2).expand(2, 2, 2), -y, A=A, b=b)
    torch.testing.assert_close(z[0], torch.tensor([0.5, 0.5]))
    (gy,) = torch.autograd.grad(z[0].sum(), y)  # error::BilevelWarning: no CurvatureWarning
    torch.testing.assert_close(gy, torch.zeros(2, 2))


def test_layer_keeps_a_batch_with_an_infeasible_element():
    """QPLayer: a failed element of a batch is NaN with a SolveWarning naming it (the
    others solved and differentiable); check=True raises; an unbatched failure raises."""
    y = torch.tensor([[0.5, 0.2], [0.3, 0.1], [2.0, 2.0]], requires_grad=True)
    G = torch.cat([torch.eye(2), -torch.eye(2)])
    h = torch.cat([torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, 1.0]]), torch.zeros(3, 2)], -1)  # 1: z1 <= -1, z1 >= 0
    layer = QPLayer()
    with pytest.warns(SolveWarning, match=r"batch element 1: INFEASIBLE") as record:
        z = layer(torch.eye(2), -y, G=G, h=h)
    assert record[0].message.elements == [1] and record[0].message.statuses == ["INFEASIBLE"]
    assert layer.last_failed == [1] and int(layer.last_info.status[1]) == QPStatus.INFEASIBLE
    assert bool(z[1].isnan().all())
    torch.testing.assert_close(z[[0, 2]], torch.tensor([[0.5, 0.2], [1.0, 1.0]]), atol=1e-9, rtol=0)
    z[[0, 2]].sum().backward()
    torch.testing.assert_close(y.grad, torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]), atol=1e-6, rtol=0)
    with pytest.raises(SolveError, match="batch element 1"):
        QPLayer(check=True)(torch.eye(2), -y, G=G, h=h)
    with pytest.raises(SolveError, match="the problem: INFEASIBLE"):
        layer(torch.eye(2), -y[1], G=G, h=h[1])
    with pytest.warns(SolveWarning):
        assert bool(QPLayer(check=False)(torch.eye(2), -y[1], G=G, h=h[1]).isnan().all())
    with pytest.raises(ValueError, match="check"):
        QPLayer(check="yes")


def test_unbounded_problem_is_reported():
    with pytest.raises(SolveError, match=r"UNBOUNDED.*primal residual"):
        qp_solve(torch.zeros(2, 2), torch.tensor([1.0, 0.0]), G=torch.tensor([[0.0, 1.0]]), h=torch.ones(1))


def test_bad_inputs_name_the_argument():
    Q, q = torch.eye(3), torch.zeros(3)
    with pytest.raises(ValueError, match=r"`G` must have shape \(m=2, n=3\)"):
        qp_solve(Q, q, G=torch.ones(2, 4), h=torch.ones(2))
    with pytest.raises(ValueError, match="`A` and `b` must be given together"):
        qp_solve(Q, q, A=torch.ones(1, 3))
    with pytest.raises(ValueError, match="different batch sizes"):
        qp_solve(Q.expand(2, 3, 3), torch.zeros(3, 3))
    with pytest.raises(TypeError, match="`h` has dtype torch.float32"):
        qp_solve(Q, q, G=torch.ones(1, 3), h=torch.ones(1, dtype=torch.float32))
    with pytest.raises(FloatingPointError, match="`q` contains NaN"):
        qp_solve(Q, torch.tensor([0.0, float("nan"), 0.0]))
    with pytest.raises(ValueError, match="`maxiter`"):
        QPLayer(maxiter=0)


def test_degenerate_solution_warns_and_gives_finite_gradient():
    # z = 0 with the constraint z1 <= 0 weakly active (lambda = 0): K is singular.
    q = torch.tensor([0.0, 1.0], requires_grad=True)
    z = qp_solve(torch.eye(2), q, G=torch.tensor([[1.0, 0.0]]), h=torch.zeros(1))
    with pytest.warns(CurvatureWarning, match="degenerate"):
        (g,) = torch.autograd.grad(z.sum(), q)
    assert torch.isfinite(g).all()


def test_degenerate_elements_are_marked_in_the_info():
    # element 0 weakly active (q1 = 0 puts the unconstrained optimum on z1 <= 0), element 1 not
    q = torch.tensor([[0.0, 1.0], [2.0, 1.0]], dtype=torch.float64, requires_grad=True)
    Q = torch.eye(2, dtype=torch.float64).expand(2, 2, 2)
    G, h = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64).expand(2, 1, 2), torch.zeros(2, 1, dtype=torch.float64)
    z, info = qp_solve(Q, q, G=G, h=h, return_info=True)
    assert not info.degenerate.any()                     # not known before the backward pass
    with pytest.warns(CurvatureWarning, match="info.degenerate"):
        z.sum().backward()
    assert info.degenerate.tolist() == [True, False]


def test_qp_solve_under_torch_func_grad_matches_autograd():
    torch.manual_seed(0)
    M = torch.randn(4, 4, dtype=torch.float64)
    Q = M @ M.T + torch.eye(4, dtype=torch.float64)
    G, h = torch.randn(3, 4, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    A, b = torch.ones(1, 4, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    q = torch.randn(4, dtype=torch.float64)
    loss = lambda q_, h_: (qp_solve(Q, q_, A, b, G, h_) ** 2).sum()
    g_func = torch.func.grad(loss, argnums=(0, 1))(q, h)
    q_, h_ = q.clone().requires_grad_(), h.clone().requires_grad_()
    g_auto = torch.autograd.grad(loss(q_, h_), (q_, h_))
    for a, b_ in zip(g_func, g_auto):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-12)


def test_an_empty_batch_gives_empty_outputs_and_a_zero_gradient():
    """A data loader's last, empty batch: z of shape (0, n) in the graph of the batched
    input (a zero gradient flows back), whichever input carries the batch; empty infos."""
    Q, q = torch.eye(3), torch.ones(3)
    qb = torch.zeros(0, 3, requires_grad=True)
    z, info = qp_solve(Q, qb, G=torch.eye(3), h=torch.ones(3), return_info=True)
    assert z.shape == (0, 3) and info.status.shape == (0,) and info.ineq_dual.shape == (0, 3)
    (g,) = torch.autograd.grad(z.sum(), qb)
    assert g.shape == (0, 3)
    Qb = torch.eye(3).expand(0, 3, 3)
    assert qp_solve(Qb, q).shape == (0, 3)
    assert QPLayer()(Q, qb).shape == (0, 3)


def test_second_derivatives_at_a_singular_kkt_matrix_are_finite():
    """Duplicate equality rows make the KKT matrix singular (the pinv adjoint): the second
    derivative is finite (here 0: z is affine in q on the constraint line)."""
    import warnings

    q = torch.tensor([0.3, -1.0], requires_grad=True)
    A = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CurvatureWarning)
        z = qp_solve(torch.eye(2), q, A=A, b=torch.ones(2))
        (g,) = torch.autograd.grad((z**2).sum() + z.sum(), q, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), q)
    assert bool(torch.isfinite(h).all()) and float(h.abs().max()) < 1e-10


@pytest.mark.parametrize("far", [1e2, 1e3, 1e6, 1e9, 1e12])
def test_a_distant_bound_is_solved_and_not_degenerate(far):
    """A box with one bound far away (the usual stand-in for "no bound"): the merit of the
    first interior-point iterations grows before it falls, and a stall of 3 iterations stopped
    the solver (MAX_ITERATIONS after 3); and a distant bound elsewhere made the near rows count
    as active (degenerate) when activity was judged against max |h|."""
    G = torch.cat([torch.eye(2, dtype=torch.float64), -torch.eye(2, dtype=torch.float64)])
    q = torch.tensor([-0.5, 0.3], dtype=torch.float64, requires_grad=True)
    h = torch.tensor([far, 1.0, 1.0, 1.0], dtype=torch.float64, requires_grad=True)
    z, info = qp_solve(torch.eye(2, dtype=torch.float64), q, G=G, h=h, return_info=True)
    torch.testing.assert_close(z, torch.tensor([0.5, -0.3], dtype=torch.float64), atol=1e-9, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no CurvatureWarning: nothing is degenerate here
        gq, gh = torch.autograd.grad(z.sum(), (q, h))
    torch.testing.assert_close(gq, -torch.ones(2, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(gh, torch.zeros(4, dtype=torch.float64), atol=1e-9, rtol=0)
    assert not bool(info.degenerate)


def test_activity_is_judged_in_each_row_s_own_units():
    """z1 <= 0 written as s * z1 <= 0 with a weakly active optimum (q1 = 0): the same
    constraint whatever s, so the same degenerate flag; and a near row is not made active by a
    distant bound elsewhere (h = 50)."""
    flags = []
    for s in (1.0, 1e3, 1e6):
        G = torch.tensor([[s, 0.0], [0.0, 1.0]], dtype=torch.float64)
        q = torch.tensor([0.0, 0.3], dtype=torch.float64, requires_grad=True)
        z, info = qp_solve(torch.eye(2, dtype=torch.float64), q, G=G, h=torch.tensor([0.0, 50.0], dtype=torch.float64),
                           return_info=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CurvatureWarning)
            torch.autograd.grad(z.sum(), q)
        flags.append(bool(info.degenerate))
    assert flags == [True, True, True]



def test_infeasible_and_unbounded_elements_stop_at_their_certificate():
    """Each element is classified at the first iterate that carries a Farkas certificate or
    a ray (a proof, whatever the merit does), so the longer stall allowed far from a solution
    neither delays it nor loses it: x1 + x2 = 3 with x <= 1 is infeasible, min x1 s.t. x2 <= 1
    unbounded; a solvable element in the same batch is solved."""
    D = torch.float64
    Q = torch.stack([torch.eye(2, dtype=D), torch.zeros(2, 2, dtype=D), torch.eye(2, dtype=D)])
    q = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-0.5, 0.3]], dtype=D)
    G = torch.stack([torch.eye(2, dtype=D), torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=D), torch.eye(2, dtype=D)])
    h = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]], dtype=D)
    A = torch.tensor([[[1.0, 1.0]], [[0.0, 0.0]], [[0.0, 0.0]]], dtype=D)
    b = torch.tensor([[3.0], [0.0], [0.0]], dtype=D)
    z, info = qp_solve(Q, q, A, b, G, h, check=False, return_info=True)
    assert [QPStatus(int(s)).name for s in info.status] == ["INFEASIBLE", "UNBOUNDED", "SOLVED"]
    assert int(info.iterations[:2].max()) <= 10
    torch.testing.assert_close(z[2], torch.tensor([0.5, -0.3], dtype=D), atol=1e-9, rtol=0)


# -- torch.func: vmap and jacrev ----------------------------------------------------------------
_ARGS = ("Q", "q", "A", "b", "G", "h")


def _jacobian_rows(fun, inputs: dict, wrt: str) -> torch.Tensor:
    """The Jacobian of ``fun(**inputs)`` w.r.t. ``inputs[wrt]``, one autograd row at a time."""
    leaf = inputs[wrt].clone().requires_grad_()
    z = fun(**{**inputs, wrt: leaf})
    rows = [torch.autograd.grad(z.reshape(-1)[i], leaf, retain_graph=True)[0] for i in range(z.numel())]
    return torch.stack(rows).reshape(z.shape + leaf.shape)


@pytest.mark.parametrize("wrt", _ARGS)
def test_jacrev_equals_the_jacobian_row_by_row(wrt):
    data, _ = _problem()
    data = {k: v.double() for k, v in data.items()}
    solve = lambda **kw: qp_solve(kw["Q"], kw["q"], kw["A"], kw["b"], kw["G"], kw["h"])
    J = torch.func.jacrev(lambda t: solve(**{**data, wrt: t}))(data[wrt])
    torch.testing.assert_close(J, _jacobian_rows(solve, data, wrt), rtol=1e-9, atol=1e-11)


def test_jacrev_of_a_box_projection_is_the_mask():
    q = torch.tensor([0.5, -1.0, 0.1, 0.35, 2.0], dtype=torch.float64)
    eye = torch.eye(5, dtype=torch.float64)
    G, h = torch.cat([eye, -eye]), torch.cat([torch.full((5,), 0.4), torch.full((5,), 0.3)]).double()
    J = torch.func.jacrev(lambda q_: qp_solve(eye, -q_, G=G, h=h))(q)   # z = clip(q, -0.3, 0.4)
    torch.testing.assert_close(J, torch.diag(((q > -0.3) & (q < 0.4)).double()), rtol=0, atol=1e-7)


def test_vmap_equals_the_batched_call_for_mapped_and_shared_inputs():
    data, _ = _problem(B=3)
    data = {k: v.double() for k, v in data.items()}
    batched = qp_solve(*(data[k] for k in _ARGS))
    z = torch.func.vmap(lambda *t: qp_solve(*t))(*(data[k] for k in _ARGS))
    torch.testing.assert_close(z, batched, rtol=1e-10, atol=1e-12)
    # one mapped input over a batch of two problems (the vmap dimension in front)
    Q = data["Q"][0]
    scaled = torch.stack([Q, 2 * Q, 3 * Q, 4 * Q])
    rest = [data[k][:2] for k in _ARGS[1:]]
    z = torch.func.vmap(lambda Q_: qp_solve(Q_, *rest))(scaled)
    assert z.shape == (4, 2, data["q"].shape[-1])
    for i in range(4):
        torch.testing.assert_close(z[i], qp_solve(scaled[i], *rest), rtol=1e-10, atol=1e-12)
    # in_dims other than 0
    z = torch.func.vmap(lambda q_: qp_solve(data["Q"][0], q_), in_dims=1)(data["q"].mT)
    torch.testing.assert_close(z, qp_solve(data["Q"][0], data["q"]), rtol=1e-10, atol=1e-12)


def test_gradients_through_vmap_and_vmap_of_jacrev_match_the_batched_call():
    data, _ = _problem()
    shared = {k: v.double() for k, v in data.items()}
    solve = lambda q_, h_: qp_solve(shared["Q"], q_, shared["A"], shared["b"], shared["G"], h_)
    g = torch.Generator().manual_seed(1)
    q = shared["q"] + 0.1 * torch.randn((4,) + shared["q"].shape, generator=g, dtype=torch.float64)
    h = shared["h"] + 0.1 * torch.rand((4,) + shared["h"].shape, generator=g, dtype=torch.float64)  # still feasible
    g = torch.func.grad(lambda q_, h_: (torch.func.vmap(solve)(q_, h_) ** 2).sum(), argnums=(0, 1))(q, h)
    q_, h_ = q.clone().requires_grad_(), h.clone().requires_grad_()
    reference = torch.autograd.grad((solve(q_, h_) ** 2).sum(), (q_, h_))
    for a, b in zip(g, reference):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # vmap over jacrev, and a gradient inside vmap
    J = torch.func.vmap(torch.func.jacrev(solve, argnums=1))(q, h)
    for i in range(4):
        torch.testing.assert_close(J[i], torch.func.jacrev(solve, argnums=1)(q[i], h[i]), rtol=1e-10, atol=1e-12)
    g_inside = torch.func.vmap(torch.func.grad(lambda q_, h_: solve(q_, h_).sum()))(q, h)
    torch.testing.assert_close(g_inside, torch.autograd.grad(solve(q_, h_).sum(), q_)[0], rtol=1e-10, atol=1e-12)


def test_under_vmap_failures_and_bad_values_are_named():
    eye = torch.eye(2, dtype=torch.float64)
    G = torch.cat([eye, -eye])
    h = torch.ones(4, dtype=torch.float64)
    hs = torch.stack([h, h, torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=torch.float64)])  # z1 <= -1 and z1 >= 1
    q = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(SolveError, match="batch element 2: INFEASIBLE") as error:
        torch.func.vmap(lambda h_: qp_solve(eye, q, G=G, h=h_))(hs)
    assert error.value.elements == [2]
    bad = torch.stack([q, torch.tensor([0.0, float("nan")], dtype=torch.float64)])
    with pytest.raises(FloatingPointError, match="`q` contains NaN"):
        torch.func.vmap(lambda q_: qp_solve(eye, q_, G=G, h=h))(bad)


def test_hessians_by_nested_jacrev_and_what_is_refused():
    eye = torch.eye(3, dtype=torch.float64)
    G, h = eye, torch.full((3,), 0.5, dtype=torch.float64)
    M = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 3.0]], dtype=torch.float64)
    q = torch.tensor([1.0, -2.0, 0.2], dtype=torch.float64)   # one bound active
    loss = lambda q_: (qp_solve(M, q_, G=G, h=h) ** 3).sum()
    q_ = q.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(q_), q_, create_graph=True)
    reference = torch.stack([torch.autograd.grad(g[i], q_, retain_graph=True)[0] for i in range(3)])
    for hessian in (torch.func.jacrev(torch.func.jacrev(loss)), torch.func.jacrev(torch.func.grad(loss))):
        torch.testing.assert_close(hessian(q), reference, rtol=1e-9, atol=1e-11)
    with pytest.raises(NotImplementedError, match="no forward-mode rule.*jacrev"):
        torch.func.jacfwd(lambda q_: qp_solve(eye, q_, G=G, h=h))(q)
    qs = torch.stack([q, 2 * q])
    with pytest.raises(NotImplementedError, match=r"second derivatives.*jacrev\(torch.func.grad"):
        torch.func.grad(lambda r: torch.func.vmap(torch.func.grad(loss))(r).sum())(qs)


def test_nested_vmap_and_jacrev_over_a_batch():
    eye = torch.eye(2, dtype=torch.float64)
    G, h = torch.cat([eye, -eye]), torch.full((4,), 0.5, dtype=torch.float64)
    qs = torch.linspace(-1, 1, 24, dtype=torch.float64).reshape(3, 4, 2)
    z = torch.func.vmap(torch.func.vmap(lambda q_: qp_solve(eye, q_, G=G, h=h)))(qs)
    torch.testing.assert_close(z, (-qs).clamp(-0.5, 0.5), rtol=0, atol=1e-7)
    J = torch.func.vmap(torch.func.vmap(torch.func.jacrev(lambda q_: qp_solve(eye, q_, G=G, h=h))))(qs)
    inside = ((-qs > -0.5) & (-qs < 0.5)).double()
    torch.testing.assert_close(J, -torch.diag_embed(inside), rtol=0, atol=1e-7)
    # jacrev over a batch: the (B, n, B, n) Jacobian is block diagonal
    flat = qs.reshape(12, 2)
    J = torch.func.jacrev(lambda q_: qp_solve(eye, q_, G=G, h=h))(flat)
    expected = torch.zeros(12, 2, 12, 2, dtype=torch.float64)
    expected[torch.arange(12), :, torch.arange(12), :] = -torch.diag_embed(inside.reshape(12, 2))
    torch.testing.assert_close(J, expected, rtol=0, atol=1e-7)
    bad = qs.clone()
    bad[1, 2, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="`q` contains NaN or inf"):
        torch.func.vmap(torch.func.vmap(lambda q_: qp_solve(eye, q_, G=G, h=h)))(bad)
    infeasible = h.expand(3, 2, 4).clone()
    infeasible[1, 0] = torch.tensor([-1.0, 0.5, -1.0, 0.5], dtype=torch.float64)  # z1 <= -1 and z1 >= 1
    with pytest.raises(SolveError) as error:
        torch.func.vmap(torch.func.vmap(lambda h_: qp_solve(eye, qs[0, 0], G=G, h=h_)))(infeasible)
    assert error.value.elements == [2]                    # (1, 0) of the (3, 2) nest, flattened


def test_layer_under_vmap_and_degenerate_flags_of_a_vmapped_backward():
    layer = QPLayer()
    Q = torch.eye(2, dtype=torch.float64)
    G, h = torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    # element 1 weakly active (q1 = 0 puts the unconstrained optimum on z1 <= 0)
    qs = torch.tensor([[2.0, 1.0], [0.0, 1.0], [-3.0, 1.0]], dtype=torch.float64)
    z = torch.func.vmap(lambda q_: layer(Q, q_, G=G, h=h))(qs)
    torch.testing.assert_close(z, qp_solve(Q, qs, G=G, h=h), rtol=1e-10, atol=1e-12)
    assert layer.last_info.status.shape == (3,) and layer.last_failed == []
    with pytest.warns(CurvatureWarning, match="degenerate"):
        torch.func.grad(lambda q_: torch.func.vmap(lambda r: layer(Q, r, G=G, h=h))(q_).sum())(qs)
    assert layer.last_info.degenerate.tolist() == [False, True, False]
    with pytest.warns(CurvatureWarning, match="degenerate"):
        torch.func.jacrev(lambda q_: torch.func.vmap(lambda r: layer(Q, r, G=G, h=h))(q_))(qs)
    assert layer.last_info.degenerate.tolist() == [False, True, False]


@pytest.mark.parametrize("check", [None, False])
def test_layer_under_vmap_gives_nan_rows_for_unsolved_problems_and_no_gradient_there(check):
    eye = torch.eye(2, dtype=torch.float64)
    G = torch.cat([eye, -eye])
    hs = torch.stack([torch.ones(4), torch.tensor([-1.0, 1.0, -1.0, 1.0])]).double()   # 1: infeasible
    q = torch.tensor([0.5, -2.0], dtype=torch.float64)
    with pytest.raises(SolveError, match="batch element 1"):
        torch.func.vmap(lambda h_: QPLayer(check=True)(eye, q, G=G, h=h_))(hs)
    layer = QPLayer(check=check)
    with pytest.warns(SolveWarning, match="QPLayer: 1 of 2 problems not solved"):
        z = torch.func.vmap(lambda h_: layer(eye, q, G=G, h=h_))(hs)
    assert layer.last_failed == [1] and torch.isnan(z[1]).all()
    torch.testing.assert_close(z[0], torch.tensor([-0.5, 1.0], dtype=torch.float64), rtol=0, atol=1e-7)
    with pytest.warns(SolveWarning):
        g = torch.func.grad(lambda G_: torch.func.vmap(lambda h_: layer(eye, q, G=G_, h=h_))(hs).nansum())(G)
    G_ = G.clone().requires_grad_()
    with pytest.warns(SolveWarning):
        QPLayer(check=False)(eye.expand(2, 2, 2), q.expand(2, 2), G=G_.expand(2, 4, 2), h=hs).nansum().backward()
    torch.testing.assert_close(g, G_.grad, rtol=1e-10, atol=1e-12)    # finite: the NaN row adds nothing


# -- degenerate LPs, LPs with ties, dependent equalities (they ended MAX_ITERATIONS) ---------------
# The reduced KKT matrix of these problems is (nearly) singular: at a degenerate vertex or with
# non-unique multipliers its pivots span mu .. 1/mu, with dependent rows of A it is singular, and
# along an optimal face of an LP it has no curvature left.  Its regularization, scaled to max|M|
# (~ 1/mu), grew to 1e6..4e9: the Newton steps stopped reducing the residuals.


def _cvxpy_qp(Q, q, A, b, G, h):
    """(optimal value, solution) of one QP by cvxpy (Clarabel), in float64."""
    cp = pytest.importorskip("cvxpy")
    Q, q, A, b, G, h = (t.double().numpy() for t in (Q, q, A, b, G, h))
    x = cp.Variable(q.shape[0])
    objective = 0.5 * cp.quad_form(x, cp.psd_wrap(Q)) + q @ x
    problem = cp.Problem(cp.Minimize(objective), [A @ x == b, G @ x <= h])
    problem.solve(solver=cp.CLARABEL)
    assert problem.status == "optimal"
    return problem.value, torch.tensor(x.value)


def _check_against_cvxpy(Q, q, A, b, G, h, unique, dtype):
    """Solve the batch (float64 inputs cast to ``dtype``) with the default tolerance and the
    default check=True; compare every element with cvxpy: the solution where it is unique, the
    optimal value and feasibility where it is not.  Then the same problems one at a time."""
    data = [t.to(dtype) for t in (Q, q, A, b, G, h)]
    z, info = qp_solve(*data, return_info=True)  # check=True: raises if an element is not solved
    assert z.dtype == dtype and info.converged.all(), info.status
    atol = 1e-7 if dtype == torch.float64 else 2e-5
    for i in range(q.shape[0]):
        value, x = _cvxpy_qp(*(t[i] for t in (Q, q, A, b, G, h)))
        zi = z[i].double()
        Qi, qi, Ai, bi, Gi, hi = (t[i] for t in (Q, q, A, b, G, h))
        assert abs(float(0.5 * zi @ Qi @ zi + qi @ zi) - value) <= atol * (1 + abs(value))
        assert all(float(r.max()) <= atol for r in ((Ai @ zi - bi).abs(), Gi @ zi - hi) if r.numel())
        if unique[i]:
            torch.testing.assert_close(zi, x, rtol=0, atol=10 * atol)
        zi_alone = qp_solve(*(t[i] for t in data))  # unbatched: raised SolveError
        torch.testing.assert_close(zi_alone, z[i], rtol=0, atol=atol)
    return z


def _topk_lps(costs, k):
    """max c^T x  s.t.  sum(x) = k, 0 <= x <= 1: a batch of top-k LPs."""
    B, n = costs.shape
    eye = torch.eye(n, dtype=torch.float64)
    return (torch.zeros(B, n, n, dtype=torch.float64), -costs, torch.ones(B, 1, n, dtype=torch.float64),
            torch.full((B, 1), float(k), dtype=torch.float64), torch.cat([-eye, eye]).expand(B, 2 * n, n),
            torch.cat([torch.zeros(n), torch.ones(n)]).to(torch.float64).expand(B, 2 * n))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_degenerate_lp_vertices_are_solved(dtype):
    """Case 1: a top-k LP's optimal vertex is primal degenerate (x_1 <= 1 active together with
    sum(x) = 1 and x_j >= 0): MAX_ITERATIONS with a gap of 2e-8 after 9 iterations, although
    the optimum is unique.  An assignment LP (doubly stochastic, unique optimum) too."""
    costs = torch.tensor([[3.0, 1.0, 0.0, 0.0], [0.0, 2.0, 5.0, 1.0], [1.0, 4.0, 2.0, 3.0]], dtype=torch.float64)
    z = _check_against_cvxpy(*_topk_lps(costs, 1), unique=[True] * 3, dtype=dtype)
    torch.testing.assert_close(z.double(), torch.eye(4, dtype=torch.float64)[[0, 2, 1]], rtol=0, atol=1e-6)
    _check_against_cvxpy(*_topk_lps(costs, 2), unique=[True] * 3, dtype=dtype)
    # assignment: min <C, X> over doubly stochastic X, 0 <= X <= 1 (dependent rows, degenerate vertex)
    k, g = 4, torch.Generator().manual_seed(2)
    C = torch.randn(3, k * k, generator=g, dtype=torch.float64)
    rows, cols = torch.kron(torch.eye(k), torch.ones(1, k)), torch.kron(torch.ones(1, k), torch.eye(k))
    A = torch.cat([rows, cols]).to(torch.float64).expand(3, 2 * k, k * k)
    eye = torch.eye(k * k, dtype=torch.float64)
    G, h = torch.cat([-eye, eye]).expand(3, 2 * k * k, k * k), torch.cat([torch.zeros(k * k), torch.ones(k * k)])
    _check_against_cvxpy(torch.zeros(3, k * k, k * k, dtype=torch.float64), C, A,
                         torch.ones(3, 2 * k, dtype=torch.float64), G, h.to(torch.float64).expand(3, -1),
                         unique=[True] * 3, dtype=dtype)


def test_gradient_at_a_degenerate_vertex_is_finite_and_that_of_the_locally_constant_solution():
    """x = e_1 for every cost near c = (3, 1, 0, 0): dz/dc = 0 (the KKT matrix is singular:
    more active constraints than variables; the degeneracy is reported)."""
    Q, q, A, b, G, h = (t[0] for t in _topk_lps(torch.tensor([[3.0, 1.0, 0.0, 0.0]], dtype=torch.float64), 1))
    q = q.clone().requires_grad_()
    z, info = qp_solve(Q, q, A, b, G, h, return_info=True)
    with pytest.warns(CurvatureWarning, match="degenerate"):
        (g,) = torch.autograd.grad((z * torch.arange(1.0, 5.0, dtype=torch.float64)).sum(), q)
    assert bool(info.degenerate) and float(g.abs().max()) < 1e-8


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lps_with_ties_are_solved_and_their_gradient_is_finite(dtype):
    """Case 2: LPs whose optimum is not unique (a whole optimal face) ended MAX_ITERATIONS
    (gap 9e-10); their forward is an optimal point, their backward finite, with the
    degeneracy reported (the solution map is not differentiable there)."""
    # min z1 + z2  s.t.  z >= 0, z1 + z2 >= 1 (the segment z1 + z2 = 1), and one with a unique optimum
    q = torch.tensor([[1.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    G = torch.tensor([[-1.0, 0.0], [0.0, -1.0], [-1.0, -1.0]], dtype=torch.float64).expand(2, 3, 2)
    h = torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64).expand(2, 3)
    none = torch.zeros(2, 0, 2, dtype=torch.float64), torch.zeros(2, 0, dtype=torch.float64)
    _check_against_cvxpy(torch.zeros(2, 2, 2, dtype=torch.float64), q, *none, G, h, unique=[False, True], dtype=dtype)
    # top-1 / top-2 with tied costs, and min c^T x over the simplex with c = (1, 1, 3)
    costs = torch.tensor([[1.0, 1.0, 0.0, 0.0], [3.0, 1.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    _check_against_cvxpy(*_topk_lps(costs, 1), unique=[False] * 3, dtype=dtype)
    _check_against_cvxpy(*_topk_lps(costs, 2), unique=[False] * 3, dtype=dtype)
    c = torch.tensor([[1.0, 1.0, 3.0]], dtype=torch.float64, requires_grad=True)
    z = qp_solve(torch.zeros(3, 3, dtype=dtype), c.to(dtype), torch.ones(1, 3, dtype=dtype), torch.ones(1, dtype=dtype),
                 -torch.eye(3, dtype=dtype), torch.zeros(3, dtype=dtype))
    assert abs(float(z[0, :2].sum()) - 1) < 1e-6 and float(z[0, 2].abs()) < 1e-6
    # the backward: finite (its tiny multipliers of the inactive bounds gave dz/dc ~ 1e12)
    with pytest.warns(CurvatureWarning, match="degenerate"):
        (g,) = torch.autograd.grad((z * torch.tensor([1.0, 2.0, 3.0], dtype=dtype)).sum(), c)
    assert bool(torch.isfinite(g).all()) and float(g.abs().max()) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dependent_equalities_with_inequalities_are_solved(dtype):
    """Case 3: linearly dependent but consistent rows of A with inequalities ended MAX_ITERATIONS
    ([sum x = 1, 2 sum x = 2, x >= 0], duplicate rows), and so did the projection onto the
    doubly stochastic matrices (row sums and column sums: always dependent)."""
    y = torch.tensor([[0.3, 0.5, -0.2], [2.0, -1.0, 0.5], [0.1, 0.2, 0.3]], dtype=torch.float64)
    Q = 2 * torch.eye(3, dtype=torch.float64).expand(3, 3, 3)
    G, h = -torch.eye(3, dtype=torch.float64).expand(3, 3, 3), torch.zeros(3, 3, dtype=torch.float64)
    for A, b in [([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]], [1.0, 2.0]), ([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], [1.0, 1.0]),
                 ([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]], [0.6, 0.4, 1.0])]:
        A, b = torch.tensor(A, dtype=torch.float64).expand(3, -1, -1), torch.tensor(b, dtype=torch.float64).expand(3, -1)
        _check_against_cvxpy(Q, -2 * y, A, b, G, h, unique=[True] * 3, dtype=dtype)
    # the Euclidean projection of Y onto the doubly stochastic matrices
    k, B = 4, 3
    Y = torch.randn(B, k * k, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows, cols = torch.kron(torch.eye(k), torch.ones(1, k)), torch.kron(torch.ones(1, k), torch.eye(k))
    A = torch.cat([rows, cols]).to(torch.float64).expand(B, 2 * k, k * k)
    b = torch.ones(B, 2 * k, dtype=torch.float64)
    Q = 2 * torch.eye(k * k, dtype=torch.float64).expand(B, -1, -1)
    G, h = -torch.eye(k * k, dtype=torch.float64).expand(B, -1, -1), torch.zeros(B, k * k, dtype=torch.float64)
    _check_against_cvxpy(Q, -2 * Y, A, b, G, h, unique=[True] * B, dtype=dtype)
    # the solution is unique (only the multipliers are not): its gradient matches finite differences
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CurvatureWarning)  # dependent rows of A: reported as degenerate
        q = (-2 * Y[0]).clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda q: qp_solve(Q[0], q, A[0], b[0], G[0], h[0]), (q,), eps=1e-6, atol=1e-6)


def test_convex_layer_default_route_solves_ties_and_dependent_equalities():
    """The same problems through ConvexLayer's default route (the torch QP solver), batched and
    not: they raised SolveError / returned NaN rows where cvxpy said optimal."""
    cp = pytest.importorskip("cvxpy")
    from bilevel.layers import ConvexLayer

    x, c = cp.Variable(3), cp.Parameter(3)
    simplex = cp.Problem(cp.Minimize(c @ x), [cp.sum(x) == 1, x >= 0])
    layer = ConvexLayer(simplex, [c], [x])
    (xo,) = layer(torch.tensor([[1.0, 1.0, 3.0], [1.0, 2.0, 3.0]], dtype=torch.float64))
    assert layer.method == "qp" and layer.last_failed == []
    torch.testing.assert_close(xo[:, :2].sum(-1), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-8)
    assert float(xo[:, 2].abs().max()) < 1e-8 and float(xo[1, 1].abs()) < 1e-8
    (xo,) = layer(torch.tensor([1.0, 1.0, 3.0], dtype=torch.float32))  # unbatched
    assert xo.dtype == torch.float32 and abs(float(xo[:2].sum()) - 1) < 1e-6
    top1 = cp.Problem(cp.Maximize(c @ x), [cp.sum(x) == 1, x >= 0, x <= 1])
    (xo,) = ConvexLayer(top1, [c], [x])(torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(xo, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-8)

    k = 3
    Y, X = cp.Parameter((k, k)), cp.Variable((k, k))
    projection = cp.Problem(cp.Minimize(cp.sum_squares(X - Y)), [cp.sum(X, axis=0) == 1, cp.sum(X, axis=1) == 1, X >= 0])
    values = torch.randn(2, k, k, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    layer = ConvexLayer(projection, [Y], [X])
    for dtype in (torch.float64, torch.float32):
        (Xo,) = layer(values.to(dtype))
        assert layer.method == "qp" and Xo.dtype == dtype
        for i in range(2):
            Y.value = values[i].numpy()
            projection.solve(solver=cp.CLARABEL)
            torch.testing.assert_close(Xo[i].double(), torch.tensor(X.value), rtol=0,
                                       atol=1e-6 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("diagonal", [True, False])
@pytest.mark.parametrize("p", [0, 2])
def test_bound_rows_in_any_order_give_the_known_solution_and_duals(diagonal, p):
    """Rows of G with one nonzero (bounds, with per-element coefficients of either sign) are
    kept out of the dense algebra and put first; interleaved with general rows, active and
    not, the solver must still return the known z, nu, lam and slack in the caller's order,
    with a diagonal Q (where H is diagonal without general rows) and a dense one."""
    g = torch.Generator().manual_seed(5)
    B, n, m = 3, 6, 9
    problem, _ = _problem(B=B, n=n, p=p, m=m, active=0, seed=5)
    Q = torch.diag_embed(torch.rand(B, n, generator=g, dtype=torch.float64) + 0.5) if diagonal else problem["Q"].double()
    A, G = problem["A"].double(), problem["G"].double()
    for row, col in ((1, 2), (3, 0), (4, 2), (6, 5), (8, 1)):
        G[:, row] = 0
        G[:, row, col] = (torch.rand(B, generator=g, dtype=torch.float64) + 0.5) * torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    z = torch.randn(B, n, generator=g, dtype=torch.float64)
    nu = torch.randn(B, p, generator=g, dtype=torch.float64)
    active = torch.tensor([0, 1, 0, 1, 0, 0, 1, 1, 0], dtype=torch.bool)  # bound rows 1, 3, 6 and general row 7
    slack = torch.where(active, 0.0, torch.rand(B, m, generator=g, dtype=torch.float64) + 0.5)
    lam = torch.where(active, torch.rand(B, m, generator=g, dtype=torch.float64) + 0.5, 0.0)
    mv = lambda M, v: (M @ v.unsqueeze(-1)).squeeze(-1)
    q = -(mv(Q, z) + mv(A.mT, nu) + mv(G.mT, lam))
    out, info = qp_solve(Q, q, A if p else None, mv(A, z) if p else None, G, mv(G, z) + slack, return_info=True)
    torch.testing.assert_close(out, z, atol=1e-9, rtol=0)
    torch.testing.assert_close(info.ineq_dual, lam, atol=1e-8, rtol=0)
    torch.testing.assert_close(info.slack, slack, atol=1e-9, rtol=0)
    torch.testing.assert_close(info.eq_dual, nu, atol=1e-8, rtol=0)


def test_a_variable_without_curvature_or_bound_is_solved():
    """min -z1 s.t. z1 - z2 = 0, z1 <= 1 (an LP whose z2 appears in the equality only): H is
    diagonal with a zero entry, which the regularized factorization handles."""
    z, info = qp_solve(torch.zeros(2, 2, dtype=torch.float64), torch.tensor([-1.0, 0.0], dtype=torch.float64),
                       torch.tensor([[1.0, -1.0]], dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                       torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.ones(1, dtype=torch.float64),
                       return_info=True)
    torch.testing.assert_close(z, torch.ones(2, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(info.ineq_dual, torch.ones(1, dtype=torch.float64), atol=1e-8, rtol=0)
    torch.testing.assert_close(info.eq_dual, torch.zeros(1, dtype=torch.float64), atol=1e-8, rtol=0)


def _mixed_problem(B=2, n=5, p=1, seed=7):
    """A batch of QPs with a known solution whose rows are active and inactive bounds, active
    and inactive general rows and equalities (every block of the reduced adjoint system)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    L = r(B, n, n)
    Q = L @ L.mT / n + 0.5 * torch.eye(n, dtype=torch.float64)
    A, G = r(B, p, n), r(B, 7, n)
    for row, col, sign in ((0, 1, 1.0), (2, 3, -1.0), (3, 0, 2.0), (5, 4, -0.5)):  # bound rows
        G[:, row] = 0
        G[:, row, col] = sign
    active = torch.tensor([1, 1, 0, 1, 0, 0, 1], dtype=torch.bool)   # bounds 0, 3; general rows 1, 6
    z, nu = r(B, n), r(B, p)
    slack = torch.where(active, 0.0, torch.rand(B, 7, generator=g, dtype=torch.float64) + 0.5)
    lam = torch.where(active, torch.rand(B, 7, generator=g, dtype=torch.float64) + 0.5, 0.0)
    mv = lambda M, v: (M @ v.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    q = -(mv(Q, z) + mv(A.mT, nu) + mv(G.mT, lam))
    return [Q, q, A, mv(A, z), G, mv(G, z) + slack]


def test_gradients_with_bounds_general_rows_and_equalities_gradcheck():
    """The reduced adjoint (active bounds fix their variables, inactive rows drop out, the rest
    is a system of the free variables, the equalities and the active general rows) against
    finite differences: first order w.r.t. every input, second order w.r.t. the vectors
    q, b, h (every input: the slow test below)."""
    inputs = [t.clone().requires_grad_() for t in _mixed_problem()]
    solve = lambda *t: qp_solve(*t, tol=1e-12)  # noqa: E731
    assert torch.autograd.gradcheck(solve, inputs, eps=1e-6, atol=1e-6)
    Q, _, A, _, G, _ = (t.detach() for t in inputs)
    assert torch.autograd.gradgradcheck(lambda q, b, h: solve(Q, q, A, b, G, h), inputs[1::2], eps=1e-6, atol=1e-5)
    jacobian = torch.func.jacrev(lambda q: qp_solve(inputs[0].detach(), q, *(t.detach() for t in inputs[2:])))(
        inputs[1].detach())
    rows = [torch.autograd.functional.jacobian(
        lambda q: qp_solve(inputs[0].detach(), q, *(t.detach() for t in inputs[2:]))[b], inputs[1].detach())
        for b in range(2)]
    torch.testing.assert_close(jacobian, torch.stack([rows[0], rows[1]], 1).transpose(0, 1).reshape(jacobian.shape))


@pytest.mark.slow
def test_second_order_gradients_with_bounds_general_rows_and_equalities_wrt_every_input():
    """Second order through the reduced adjoint w.r.t. every input, matrices included
    (about 20 s)."""
    inputs = [t.clone().requires_grad_() for t in _mixed_problem()]
    assert torch.autograd.gradgradcheck(lambda *t: qp_solve(*t, tol=1e-12), inputs, eps=1e-6, atol=1e-5)


def test_box_qp_gradient_equals_the_closed_form_to_rounding():
    """dz/dq of a box-constrained QP is -[Q_FF^-1 on the free set F, 0 on the bounds].  The
    adjoint in the full KKT form with the last iterate's slacks of the active rows was off by
    their ratio to the multipliers (relative errors up to 1e-5 on this batch); the reduced
    form (active bounds fix their variables) is exact to rounding."""
    g = torch.Generator().manual_seed(0)
    B, n = 16, 20
    L = torch.randn(B, 30, n, generator=g, dtype=torch.float64)
    Q = L.mT @ L / 30
    q = torch.randn(B, n, generator=g, dtype=torch.float64, requires_grad=True)
    G = torch.cat([torch.eye(n, dtype=torch.float64), -torch.eye(n, dtype=torch.float64)])
    z, info = qp_solve(Q, q, G=G, h=torch.full((2 * n,), 0.3, dtype=torch.float64), return_info=True)
    w = torch.randn(B, n, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((z * w).sum(), q)
    assert not bool(info.degenerate.any())
    for b in range(B):
        free = (z[b].detach().abs() < 0.3 - 1e-7).nonzero().squeeze(-1)
        expected = torch.zeros(n, dtype=torch.float64)
        expected[free] = -torch.linalg.solve(Q[b][free][:, free], w[b][free])
        torch.testing.assert_close(grad[b], expected, rtol=1e-10, atol=1e-12)


def test_small_margins_and_a_scaled_objective_are_not_degenerate():
    """Activity is decided by which of slack and multiplier is smaller, in their own units:
    a bound 5e-5 away from the solution is inactive, a multiplier of 5e-5 belongs to an
    active bound, and the same QP with its objective scaled by 1e-6 is not degenerate.  The
    former thresholds (eps ** 0.25 on each) flagged all three and returned a generalized
    gradient, off by 0.1 on the first two."""
    Q = torch.eye(2, dtype=torch.float64)
    G = torch.cat([torch.eye(2, dtype=torch.float64), -torch.eye(2, dtype=torch.float64)])
    h = torch.ones(4, dtype=torch.float64)
    for q0, scale in ((-(1 - 5e-5), 1.0), (-(1 + 5e-5), 1.0), (-0.5, 1e-6)):
        q = (scale * torch.tensor([q0, 0.3], dtype=torch.float64)).requires_grad_()
        z, info = qp_solve(scale * Q, q, G=G, h=h, return_info=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no CurvatureWarning
            (grad,) = torch.autograd.grad(z[0], q)
        expected = torch.tensor([0.0 if q0 < -1 else -1.0 / scale, 0.0], dtype=torch.float64)
        torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-9)
        assert not bool(info.degenerate)


def test_curvature_through_equalities_only_cvxpy_form():
    """CVXPY writes a projection as min ||t||^2 with t = x - y: no curvature on x, which the
    equalities carry.  Its H = Q + G^T diag(lambda/s) G is singular up to the inactive
    bounds' multipliers; solved through its Schur complement without the A^T A term (the
    first version of the Cholesky route), an element stalled at a dual residual of 1e-8
    (MAX_ITERATIONS).  The saddle-point LU before it had no such trouble."""
    g = torch.Generator().manual_seed(103)
    B, n = 16, 30
    torch.randn(B, 5, generator=g, dtype=torch.float64)
    y = torch.randn(B, n, generator=g, dtype=torch.float64)
    eye, zero = torch.eye(n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    Q = torch.block_diag(zero, eye)
    A = torch.cat([eye, -eye], 1)
    G = torch.cat([torch.cat([-eye, zero], 1), torch.cat([torch.ones(1, n), torch.zeros(1, n)], 1).double()])
    h = torch.cat([torch.zeros(n), torch.ones(1)]).double()
    z = qp_solve(Q, torch.zeros(B, 2 * n, dtype=torch.float64), A, y, G, h)  # raises if any element fails
    x = z[:, :n]
    reference = qp_solve(eye, -y, G=G[:, :n], h=h)  # the same projection written directly
    torch.testing.assert_close(x, reference, atol=1e-7, rtol=0)


def test_dependent_equality_rows_battery_is_solved():
    """256 strictly convex QPs whose third equality row is the sum of the first two
    (consistent) with general inequalities: all solved.  The Schur complement A H^-1 A^T is
    singular there; judged against eps alone its rounding pivot slipped through unshifted in
    a few (7 of 3200) and those elements stalled (MAX_ITERATIONS); it is judged against
    eps cond(H) now."""
    rng = np.random.default_rng(1)
    for _ in range(32):
        B, n = 8, int(rng.integers(3, 10))
        p, m = int(rng.integers(2, min(n, 4) + 1)), int(rng.integers(2, 12))
        L = rng.standard_normal((B, n, n))
        Q = L @ L.transpose(0, 2, 1) / n + 0.1 * np.eye(n)
        A = rng.standard_normal((B, p, n))
        A[:, -1] = A[:, 0] + A[:, 1]
        z0 = rng.standard_normal((B, n))
        G = rng.standard_normal((B, m, n))
        h = np.einsum("bij,bj->bi", G, z0) + rng.exponential(1, (B, m))
        q = rng.standard_normal((B, n)) * 3
        data = [torch.tensor(x) for x in (Q, q, A, np.einsum("bij,bj->bi", A, z0), G, h)]
        _, info = qp_solve(*data, check=False, return_info=True)
        assert bool(info.converged.all()), info.status


def test_second_derivatives_are_finite_beside_a_singular_reduced_adjoint():
    """A batch of an LP with a tie (its reduced adjoint matrix is singular: the full form
    answers for it) and a well-posed projection: second derivatives of the projection's
    gradient are those of the projection alone, finite (the singular LU's NaN derivatives,
    multiplied by 0, made them NaN)."""
    eye = torch.eye(2, dtype=torch.float64)
    G = torch.cat([eye, -eye]).requires_grad_()
    h = torch.ones(4, dtype=torch.float64, requires_grad=True)
    Q = torch.stack([torch.zeros(2, 2, dtype=torch.float64), eye]).requires_grad_()
    q = torch.tensor([[1.0, 0.0], [-0.5, 0.3]], dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CurvatureWarning)
        z, info = qp_solve(Q, q, G=G, h=h, return_info=True)
        w = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
        (gq,) = torch.autograd.grad((w * z).sum(), q, create_graph=True)
        second = torch.autograd.grad(gq[1].sum(), (q, Q, G, h), allow_unused=True)
    assert info.degenerate.tolist() == [True, False]
    torch.testing.assert_close(gq[1], -torch.tensor([3.0, 4.0], dtype=torch.float64))
    # sum(dL/dq_1) = -1^T Q_1^-1 w_1: its derivative w.r.t. the (symmetric) Q_1 at Q_1 = I is
    # sym(1 w_1^T); w.r.t. q, G, h (and the LP's Q_0) it is 0
    g_q, g_Q, g_G, g_h = second
    expected = torch.zeros(2, 2, 2, dtype=torch.float64)
    expected[1] = torch.tensor([[3.0, 3.5], [3.5, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(g_Q, expected, atol=1e-9, rtol=0)
    for g in (g_q, g_G, g_h):
        assert g is None or (bool(torch.isfinite(g).all()) and float(g.abs().max()) < 1e-9)


def test_a_non_finite_adjoint_of_a_degenerate_element_raises(monkeypatch):
    """The full-form adjoint that answers for a degenerate element is checked too: NaN there
    (simulated) raises FloatingPointError instead of returning NaN gradients."""
    import bilevel.layers._qp_adjoint as adjoint_module

    original = adjoint_module.dense_adjoint

    def nan_adjoint(*args):
        u, degenerate = original(*args)
        return torch.full_like(u, math.nan), degenerate

    monkeypatch.setattr(adjoint_module, "dense_adjoint", nan_adjoint)
    q = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64, requires_grad=True)  # an LP with a tie
    z = qp_solve(torch.zeros(3, 3, dtype=torch.float64), q, torch.ones(1, 3, dtype=torch.float64),
                 torch.ones(1, dtype=torch.float64), -torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CurvatureWarning)
        with pytest.raises(FloatingPointError, match="adjoint KKT solve returned NaN"):
            torch.autograd.grad(z.sum(), q)


# A well-posed QP (strictly complementary, LICQ, KKT condition number ~2e6) found by review
_WELL_POSED = {
    "Q": [
        [0.663648, -0.248542, 0.412964, -0.302842, -0.002927, 0.152646, -0.080269],
        [-0.248542, 1.275102, 0.275539, 0.063218, -0.115679, -0.40848, 0.278507],
        [0.412964, 0.275539, 1.716723, -0.818431, -0.503982, -0.093263, -0.007702],
        [-0.302842, 0.063218, -0.818431, 1.302883, 0.303707, -0.230725, 0.717036],
        [-0.002927, -0.115679, -0.503982, 0.303707, 1.098103, -0.257526, 0.165097],
        [0.152646, -0.40848, -0.093263, -0.230725, -0.257526, 0.617523, -0.292001],
        [-0.080269, 0.278507, -0.007702, 0.717036, 0.165097, -0.292001, 1.131224],
    ],
    "q": [-5.505392, 3.300679, -1.968106, -1.176947, 0.408809, -2.072289, 1.740213],
    "A": [
        [-1.676242, 1.408358, -0.175999, -0.292326, -0.116135, 0.098155, 0.629295],
        [-0.080925, -1.274082, 0.395063, 0.519205, -0.322087, 0.355491, 0.651348],
    ],
    "b": [-3.494863, 0.193733],
    "G": [
        [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [-1.040427, 0.796345, -0.218474, 0.403298, 0.242045, 0.614854, -0.66845],
        [0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0],
        [2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [0.869576, 0.700317, 0.003131, 1.429186, 1.243377, 0.308619, 0.970487],
        [0.0, 0.0, 0.0, 0.0, -0.5, 0.0, 0.0],
        [-0.66807, 1.506912, 1.384354, 1.387428, 0.056092, -0.781188, 1.318342],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0],
        [-0.200625, 0.914121, -0.584123, -0.764967, 1.123807, -0.917995, 1.456344],
    ],
    "h": [-0.694433, -0.800119, 1.063661, 2.533971, -0.162382, 1.443383, -4.871594, -1.064247, 1.850822, -2.215686],
}


@pytest.mark.parametrize("rows, objective", [(1e-6, 1.0), (1.0, 1e6), (1e-4, 1.0)])
def test_gradients_do_not_depend_on_the_units_of_rows_and_objective(rows, objective):
    """The same QP with its constraint rows (and right-hand sides) or its objective rescaled:
    the same z, gradients that rescale accordingly, and no degenerate flag.  The pivot test
    of the adjoint's LU judged the rows' units: rows x 1e-6 made this well-posed QP
    'singular' and its gradient w.r.t. h was off by 100%."""
    Q, q, A, b, G, h = (torch.tensor(_WELL_POSED[k], dtype=torch.float64) for k in ("Q", "q", "A", "b", "G", "h"))
    w = torch.randn(q.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def solve(r, o):
        inputs = [t.clone().requires_grad_() for t in (Q * o, q * o, A * r, b * r, G * r, h * r)]
        z, info = qp_solve(*inputs, return_info=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no CurvatureWarning
            grads = torch.autograd.grad((w * z).sum(), inputs)
        assert not bool(info.degenerate.any())
        return z.detach(), grads

    z0, g0 = solve(1.0, 1.0)
    z, g = solve(rows, objective)
    torch.testing.assert_close(z, z0, atol=1e-9, rtol=0)
    # d/dh' with h' = r h is (d/dh) / r; d/dq' with q' = o q is (d/dq) / o
    torch.testing.assert_close(g[5] * rows, g0[5], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g[1] * objective, g0[1], rtol=1e-6, atol=1e-9)
