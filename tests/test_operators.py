"""Hessian-vector and cross-derivative products against dense references."""

import pytest
import torch
from torch.func import functional_call, hessian, jacrev, vmap

from bilevel.implicit.operators import (
    batched,
    cross_transpose,
    damped,
    hessian_operator,
    hvp,
    jacobian_matvec,
    linearize,
)


def objective(w, lam, scale):  # non-quadratic, with a non-tensor argument
    return (torch.exp(lam) * w**2).sum() + scale * torch.log1p(w**4).sum() + (w[0] * w[1] * lam).sum()


def point():
    return torch.randn(5), torch.randn(5), 0.7


def test_hvp_and_hessian_operator_match_dense_hessian():
    w, lam, scale = point()
    H = hessian(objective)(w, lam, scale)
    v = torch.randn(5)
    torch.testing.assert_close(hvp(objective, w, v, lam, scale), H @ v)
    g, matvec = hessian_operator(objective, w, lam, scale)
    torch.testing.assert_close(g, torch.func.grad(objective)(w, lam, scale))
    for _ in range(3):  # linearized once, applied many times
        v = torch.randn(5)
        torch.testing.assert_close(matvec(v), H @ v)


def test_batched_products_equal_a_loop():
    w, lam, scale = point()
    _, matvec = hessian_operator(objective, w, lam, scale)
    V = torch.randn(7, 5)
    torch.testing.assert_close(batched(matvec)(V), torch.stack([matvec(v) for v in V]))


def test_pytree_parameters_through_functional_call():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    data = torch.randn(10, 3)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p):
        return (functional_call(net, p, (data,)) ** 2).mean()

    flat = torch.cat([p.reshape(-1) for p in params.values()])
    shapes = {k: v.shape for k, v in params.items()}

    def unflatten(vec):
        out, i = {}, 0
        for k, s in shapes.items():
            out[k] = vec[i : i + s.numel()].reshape(s)
            i += s.numel()
        return out

    H = hessian(lambda vec: loss(unflatten(vec)))(flat)
    v = torch.randn_like(flat)
    _, matvec = hessian_operator(loss, params)
    Hv = matvec(unflatten(v))
    torch.testing.assert_close(torch.cat([Hv[k].reshape(-1) for k in shapes]), H @ v)


def test_cross_derivative_product():
    w, lam, scale = point()
    residual = torch.func.grad(objective)
    u = torch.randn(5)
    (cross,) = cross_transpose(residual, w, (lam, scale), u)
    J_lam = jacrev(residual, argnums=1)(w, lam, scale)  # d grad_w / d lam
    torch.testing.assert_close(cross, J_lam.T @ u)


def test_linearize_engines_agree_and_carry_transposes():
    w, lam, scale = point()

    def residual(s, l, c):  # a non-symmetric condition
        return torch.tanh(s) * l.exp() + c * s.roll(1)

    J = jacrev(residual)(w, lam, scale)
    J_lam = jacrev(residual, argnums=1)(w, lam, scale)
    u = torch.randn(5)
    lin = linearize(residual, w, (lam, scale), wrt_args=True)  # autograd engine
    torch.testing.assert_close(lin.value, residual(w, lam, scale))
    torch.testing.assert_close(lin.transpose_matvec(u), J.T @ u)
    torch.testing.assert_close(lin.transpose_matvec.transpose(u), J @ u)
    torch.testing.assert_close(lin.cross(u)[0], J_lam.T @ u)
    torch.testing.assert_close(jacobian_matvec(residual, w, lam, scale)(u), J @ u)
    # inside a transform the torch.func engine takes over, with the same results
    U = torch.randn(4, 5)
    out = vmap(lambda u_: linearize(residual, w, (lam, scale)).transpose_matvec(u_))(U)
    torch.testing.assert_close(out, U @ J)


def test_stationarity_linearization_is_self_adjoint_and_damped():
    w, lam, scale = point()
    grad = torch.func.grad(objective)
    lin = linearize(grad, w, (lam, scale), objective=objective)
    H = hessian(objective)(w, lam, scale)
    u = torch.randn(5)
    torch.testing.assert_close(lin.transpose_matvec(u), H @ u)
    assert lin.transpose_matvec.self_adjoint
    shifted = damped(lin.transpose_matvec, 0.5)
    torch.testing.assert_close(shifted(u), H @ u + 0.5 * u)
    assert shifted.self_adjoint


def test_densify_is_the_same_operator_and_keeps_cg_iterates():
    from bilevel.implicit import CG
    from bilevel.implicit.operators import densify

    def convex(w, lam, scale):  # strictly convex: CG runs its full budget
        return (torch.exp(lam) * w**2).sum() + scale * torch.logsumexp(w, 0)

    w, lam, scale = point()
    lin = linearize(torch.func.grad(convex), w, (lam, scale), objective=convex)
    b = torch.randn(5)
    dense = densify(lin.transpose_matvec, b, 0, CG())
    assert dense is not lin.transpose_matvec and dense.self_adjoint
    for _ in range(3):
        u = torch.randn(5)
        torch.testing.assert_close(dense(u), lin.transpose_matvec(u))
    solver = CG(maxiter=3, tol=1e-30)
    x_dense, info_dense = solver(dense, b)
    x_op, info_op = solver(lin.transpose_matvec, b)
    torch.testing.assert_close(x_dense, x_op)
    assert int(info_dense.iterations) == int(info_op.iterations) == 3


def test_densify_pytree_and_when_it_declines():
    from bilevel.implicit import CG, Direct
    from bilevel.implicit.operators import densify

    A = torch.randn(4, 4)  # 4 unknowns in a tree of 3 + 1

    def to_flat(tree):
        return torch.cat([tree["a"], tree["b"].unsqueeze(-1)], -1)

    def to_tree(flat):
        return {"a": flat[..., :3], "b": flat[..., 3]}

    def op(tree):
        return to_tree((A @ to_flat(tree).unsqueeze(-1)).squeeze(-1))

    example = to_tree(torch.randn(4))
    dense = densify(op, example, 0, CG())
    assert dense is not op
    u = to_tree(torch.randn(4))
    torch.testing.assert_close(to_flat(dense(u)), to_flat(op(u)))
    torch.testing.assert_close(to_flat(dense.transpose(u)), A.mT @ to_flat(u))
    assert densify(op, example, 0, Direct()) is op  # Direct materializes by itself
    assert densify(op, example, 0, object()) is op  # an unknown solver has no budget
    assert densify(op, example, 0, CG(maxiter=1)) is not op  # 1 product >= 4 / 4
    # a batch of systems is never materialized: the vmap over the basis would copy
    # each system's data once per basis vector
    batched_example = to_tree(torch.randn(3, 4))
    assert densify(op, batched_example, 1, CG()) is op
    double = lambda v: 2 * v  # noqa: E731
    assert densify(double, torch.randn(500), 0, CG()) is double  # too large to materialize
    assert densify(double, torch.randn(100), 0, CG(maxiter=24)) is double  # 24 products < 100 / 4
    assert densify(double, torch.randn(100), 0, CG(maxiter=25)) is not double

    def not_vmappable(v):
        return v * float(v.sum())  # a host read: vmap refuses, densify keeps the operator

    assert densify(not_vmappable, torch.randn(4), 0, CG()) is not_vmappable


def test_linearize_cross_for_chosen_argument_leaves_and_bad_positions():
    """``wrt_args`` as positions: cross products for those floating leaves only (the integer
    leaf does not count), equal to the full products there; positions out of range are refused."""
    from bilevel.implicit.operators import linearize

    F = lambda s, a, k, b: a * s ** 2 + k * b * s  # noqa: E731
    s, a, b = (torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([3.0, 0.5], dtype=torch.float64),
               torch.tensor([-1.0, 4.0], dtype=torch.float64))
    u = torch.tensor([1.0, -2.0], dtype=torch.float64)
    full = linearize(F, s, (a, 2, b), wrt_args=True).cross(u)
    (only_b,) = linearize(F, s, (a, 2, b), wrt_args=[1]).cross(u)
    torch.testing.assert_close(only_b, full[1])
    torch.testing.assert_close(only_b, 2 * s * u)  # d/db (k b s) = k s
    with pytest.raises(ValueError, match="wrt_args"):
        linearize(F, s, (a, 2, b), wrt_args=[2])
