"""Acceptance scenarios for the optimization layers, modelled on the test suites of
cvxpylayers, qpth / OptNet and Theseus, written against bilevel's public API.

Covered: :func:`bilevel.layers.qp_solve` / :class:`~bilevel.layers.QPLayer`,
:class:`~bilevel.layers.ConvexLayer`, :class:`~bilevel.layers.ArgminLayer`,
:class:`~bilevel.layers.HardConstraint` / :class:`~bilevel.layers.HardConstraintMoE`
and the least-squares solvers :class:`~bilevel.solvers.GaussNewton` /
:class:`~bilevel.solvers.LevenbergMarquardt` used as differentiable layers.

Oracles: closed forms (unconstrained and equality-constrained QPs through a
dense KKT solve, projections onto boxes, half-spaces, the simplex and the
Euclidean ball, ridge regression, Rosenbrock's minimizer), central finite
differences, ``torch.autograd.gradcheck`` in float64, a hand-unrolled
Gauss-Newton loop (Theseus' backward modes), and cvxpylayers where installed
(with tolerances that reflect its accuracy).  Tests of known bugs or missing
features are ``xfail(strict=True)`` with the reason.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import jacrev, vmap

from bilevel.implicit import Direct
from bilevel.layers import (
    ArgminLayer,
    BoxPartition,
    ConvexLayer,
    HardConstraint,
    HardConstraintMoE,
    QPLayer,
    QPStatus,
    SolveError,
    SolveWarning,
    qp_solve,
)
from bilevel.solvers import LBFGS, GaussNewton, LevenbergMarquardt
from bilevel.status import BilevelError, ConvergenceWarning, CurvatureWarning

try:  # ConvexLayer needs CVXPY (the bilevel[cvxpy] extra)
    import cvxpy as cp
except ImportError:  # pragma: no cover - depends on the environment
    cp = None
try:  # the reference implementation, where installed
    from cvxpylayers.torch import CvxpyLayer
except ImportError:  # pragma: no cover - depends on the environment
    CvxpyLayer = None

needs_cvxpy = pytest.mark.skipif(cp is None, reason="cvxpy is not installed")
needs_cvxpylayers = pytest.mark.skipif(CvxpyLayer is None or cp is None, reason="cvxpylayers is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CLARABEL = {"solve_method": "Clarabel"}  # diffcp's most accurate forward solver

# --------------------------------------------------------------------------- closed forms


def _mv(M, v):
    return (M @ v.unsqueeze(-1)).squeeze(-1)


def kkt_solution(Q, q, A, b):
    """argmin 0.5 z'Qz + q'z s.t. Az = b by one dense KKT solve (differentiable by autograd)."""
    Qs = 0.5 * (Q + Q.mT)
    n, p = Q.shape[-1], A.shape[-2]
    top = torch.cat([Qs, A.mT], -1)
    bottom = torch.cat([A, torch.zeros(A.shape[:-2] + (p, p), dtype=A.dtype)], -1)
    rhs = torch.cat([-q, b], -1)
    return torch.linalg.solve(torch.cat([top, bottom], -2), rhs)[..., :n]


def project_simplex(y):
    """Euclidean projection of each row of y onto the probability simplex (sort-based;
    differentiable by autograd away from ties)."""
    u, _ = torch.sort(y, dim=-1, descending=True)
    css = torch.cumsum(u, -1) - 1
    k = torch.arange(1, y.shape[-1] + 1, dtype=y.dtype)
    support = (u - css / k) > 0
    rho = support.to(torch.int64).cumsum(-1).argmax(-1, keepdim=True)  # last index in the support
    theta = css.gather(-1, rho) / (rho + 1).to(y.dtype)
    return torch.clamp(y - theta, min=0)


def project_box(y, lo, hi):
    return torch.minimum(torch.maximum(y, lo), hi)


def project_halfspace(y, a, h):
    """Projection of y onto {z : a'z <= h}."""
    return y - torch.relu(y @ a - h) / (a @ a) * a


def random_qp(n=5, p=2, m=6, batch=(), seed=0):
    """A strictly feasible, strongly convex QP whose solution has some active inequalities."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*batch, *s, generator=g)
    L = rnd(n, n)
    Q = L @ L.mT + 0.5 * torch.eye(n)
    q, A, z0, G = rnd(n), rnd(p, n), rnd(n), rnd(m, n)
    b = _mv(A, z0)
    h = _mv(G, z0) + torch.rand(*batch, m, generator=g)
    return Q, q, A, b, G, h


def _grads(out, inputs, weights=None):
    weights = torch.ones_like(out) if weights is None else weights
    return torch.autograd.grad((out * weights).sum(), inputs, allow_unused=True)


# =========================================================================== qp_solve / QPLayer


def test_qp_unconstrained_matches_closed_form_value_and_gradients():
    n = 6
    g = torch.Generator().manual_seed(1)
    L = torch.randn(n, n, generator=g)
    skew = torch.randn(n, n, generator=g)
    Q = (L @ L.T + torch.eye(n) + (skew - skew.T)).requires_grad_()  # only its symmetric part counts
    q = torch.randn(n, generator=g, requires_grad=True)
    z = qp_solve(Q, q)
    z_ref = -torch.linalg.solve(0.5 * (Q + Q.T), q)
    torch.testing.assert_close(z, z_ref, atol=1e-10, rtol=1e-9)
    w = torch.randn(n, generator=g)
    gQ, gq = _grads(z, (Q, q), w)
    rQ, rq = _grads(z_ref, (Q, q), w)
    torch.testing.assert_close(gq, rq, atol=1e-9, rtol=1e-8)  # -Q^{-1} w
    torch.testing.assert_close(gQ, rQ, atol=1e-9, rtol=1e-8)  # symmetric part of Q^{-1} w z'


def test_qp_equality_constrained_matches_kkt_solve_all_gradients():
    n, p = 5, 2
    g = torch.Generator().manual_seed(2)
    L = torch.randn(n, n, generator=g)
    Q = (L @ L.T + torch.eye(n)).requires_grad_()
    q, A, b = (torch.randn(*s, generator=g).requires_grad_() for s in ((n,), (p, n), (p,)))
    z = qp_solve(Q, q, A, b)
    z_ref = kkt_solution(Q, q, A, b)
    torch.testing.assert_close(z, z_ref, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(_mv(A, z), b, atol=1e-10, rtol=0)
    w = torch.randn(n, generator=g)
    for got, ref, name in zip(_grads(z, (Q, q, A, b), w), _grads(z_ref, (Q, q, A, b), w), "QqAb"):
        torch.testing.assert_close(got, ref, atol=1e-8, rtol=1e-7, msg=f"gradient w.r.t. {name}")


def test_qp_box_projection_closed_form_and_gradients_of_bounds():
    # z = argmin 0.5||z - y||^2 s.t. lo <= z <= hi  ==  clamp(y, lo, hi)
    y = torch.tensor([[-2.0, 0.3, 1.7, 0.9], [0.5, -0.4, 3.0, -3.0]], requires_grad=True)
    lo = torch.tensor([-1.0, -1.0, -1.0, -1.0], requires_grad=True)
    hi = torch.tensor([1.0, 1.0, 1.5, 2.0], requires_grad=True)
    n = y.shape[-1]
    G = torch.cat([torch.eye(n), -torch.eye(n)])
    z = qp_solve(torch.eye(n), -y, G=G, h=torch.cat([hi, -lo]))
    z_ref = project_box(y, lo, hi)
    torch.testing.assert_close(z, z_ref, atol=1e-9, rtol=0)
    w = torch.randn(2, n)
    for got, ref, name in zip(_grads(z, (y, lo, hi), w), _grads(z_ref, (y, lo, hi), w), ("y", "lo", "hi")):
        torch.testing.assert_close(got, ref, atol=1e-8, rtol=0, msg=f"gradient w.r.t. {name}")


def test_qp_simplex_projection_batched_jacobian_matches_closed_form():
    g = torch.Generator().manual_seed(3)
    n, B = 7, 5
    y = (torch.randn(B, n, generator=g) * 0.7).requires_grad_()
    ones = torch.ones(1, n)
    z = qp_solve(torch.eye(n), -y, A=ones, b=torch.ones(1), G=-torch.eye(n), h=torch.zeros(n))
    z_ref = project_simplex(y)
    assert ((z_ref > 0).sum(-1) > 1).all() and ((z_ref == 0).sum(-1) > 0).all()  # both kinds of coordinates
    torch.testing.assert_close(z, z_ref, atol=1e-9, rtol=0)
    torch.testing.assert_close(z.sum(-1), torch.ones(B), atol=1e-10, rtol=0)
    for i in range(n):  # the full Jacobian, row by row: (I - 11'/|S|) on the support, 0 off it
        (got,) = torch.autograd.grad(z[:, i].sum(), y, retain_graph=True)
        (ref,) = torch.autograd.grad(z_ref[:, i].sum(), y, retain_graph=True)
        torch.testing.assert_close(got, ref, atol=1e-8, rtol=0)


def test_qp_gradcheck_all_six_inputs_unbatched_and_batched():
    for batch in ((), (2,)):
        inputs = [t.requires_grad_() for t in random_qp(n=3, p=1, m=4, batch=batch, seed=4)]
        _, info = qp_solve(*inputs, return_info=True)
        assert int((info.ineq_dual > 1e-6).sum()) >= 1  # some constraints are active
        assert torch.autograd.gradcheck(lambda *a: qp_solve(*a), inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_qp_finite_differences_of_a_random_loss():
    inputs = list(random_qp(n=4, p=1, m=5, seed=5))
    w = torch.randn(4)
    loss = lambda *a: (qp_solve(*a) * w).sum()
    leaves = [t.clone().requires_grad_() for t in inputs]
    grads = torch.autograd.grad(loss(*leaves), leaves)
    eps = 1e-6
    for k, (t, gk) in enumerate(zip(inputs, grads)):
        d = torch.randn_like(t)
        plus = [x + eps * d if j == k else x for j, x in enumerate(inputs)]
        minus = [x - eps * d if j == k else x for j, x in enumerate(inputs)]
        fd = (loss(*plus) - loss(*minus)) / (2 * eps)
        assert abs(float(fd - (gk * d).sum())) < 1e-6 * max(1.0, abs(float(fd))), f"input {'QqAbGh'[k]}"


def test_qp_batched_with_shared_parameters_equals_loop_and_sums_gradients():
    B = 4
    Q, _, A, _, G, _ = random_qp(n=5, p=1, m=4, seed=6)
    _, q, _, b, _, h = random_qp(n=5, p=1, m=4, batch=(B,), seed=7)
    shared = [t.clone().requires_grad_() for t in (Q, A, G)]
    per = [t.clone().requires_grad_() for t in (q, b, h)]
    z = qp_solve(shared[0], per[0], shared[1], per[1], shared[2], per[2])
    assert z.shape == (B, 5)
    w = torch.randn(B, 5)
    grads = _grads(z, shared + per, w)
    loop_shared = [torch.zeros_like(t) for t in shared]
    for i in range(B):
        s = [t.clone().requires_grad_() for t in (Q, A, G)]
        pi = [t[i].clone().requires_grad_() for t in (q, b, h)]
        zi = qp_solve(s[0], pi[0], s[1], pi[1], s[2], pi[2])
        torch.testing.assert_close(z[i], zi, atol=1e-10, rtol=0)
        gi = _grads(zi, s + pi, w[i])
        for acc, gs in zip(loop_shared, gi[:3]):
            acc += gs
        for gb, gp in zip(grads[3:], gi[3:]):
            torch.testing.assert_close(gb[i], gp, atol=1e-9, rtol=1e-8)
    for got, ref in zip(grads[:3], loop_shared):  # a shared input's gradient is the sum over the batch
        torch.testing.assert_close(got, ref, atol=1e-9, rtol=1e-8)


def test_qp_requires_grad_on_only_some_inputs():
    Q, q, A, b, G, h = random_qp(seed=8)
    h = h.clone().requires_grad_()
    z = qp_solve(Q, q, A, b, G, h)
    assert z.requires_grad
    (gh,) = torch.autograd.grad(z.sum(), h)
    assert gh.shape == h.shape and torch.isfinite(gh).all()
    assert Q.grad is None and q.grad is None
    z_const = qp_solve(Q, q, A, b, G, h.detach())
    assert not z_const.requires_grad
    with torch.no_grad():
        assert not qp_solve(Q, q, A, b, G, h).requires_grad


def test_qp_inactive_constraint_has_zero_gradient_active_blocks_its_normal():
    a = torch.tensor([1.0, 2.0, -1.0])
    # inactive: y strictly inside a'z <= 5
    y = torch.tensor([0.1, 0.2, 0.3], requires_grad=True)
    G, h = a[None].clone().requires_grad_(), torch.tensor([5.0], requires_grad=True)
    z, info = qp_solve(torch.eye(3), -y, G=G, h=h, return_info=True)
    torch.testing.assert_close(z, y, atol=1e-9, rtol=0)
    assert float(info.ineq_dual) < 1e-8 and float(info.slack) > 1
    gy, gG, gh = _grads(z, (y, G, h), torch.tensor([0.3, -1.0, 2.0]))
    torch.testing.assert_close(gy, torch.tensor([0.3, -1.0, 2.0]), atol=1e-8, rtol=0)
    assert gG.abs().max() < 1e-8 and gh.abs().max() < 1e-8  # the constraint does not matter
    # active: y outside a'z <= 0.5; z moves with y only along the plane
    y = torch.tensor([1.0, 1.0, 0.0], requires_grad=True)
    h = torch.tensor([0.5], requires_grad=True)
    z, info = qp_solve(torch.eye(3), -y, G=a[None], h=h, return_info=True)
    torch.testing.assert_close(z, project_halfspace(y, a, h), atol=1e-9, rtol=0)
    assert float(info.ineq_dual) > 0.1 and float(info.slack) < 1e-8
    J = torch.stack([torch.autograd.grad(z[i], y, retain_graph=True)[0] for i in range(3)])
    torch.testing.assert_close(a @ J, torch.zeros(3), atol=1e-8, rtol=0)  # a'z stays at h
    torch.testing.assert_close(J, torch.eye(3) - torch.outer(a, a) / (a @ a), atol=1e-8, rtol=0)
    (gh,) = torch.autograd.grad(z @ a, h)
    torch.testing.assert_close(gh, torch.ones(1), atol=1e-8, rtol=0)


def test_qp_zero_constraints_given_as_empty_tensors():
    Q, q, *_ = random_qp(seed=9)
    n = q.shape[0]
    A, b, G, h = torch.zeros(0, n), torch.zeros(0), torch.zeros(0, n), torch.zeros(0)
    inputs = [t.clone().requires_grad_() for t in (Q, q, A, b, G, h)]
    z, info = qp_solve(*inputs, return_info=True)
    torch.testing.assert_close(z, -torch.linalg.solve(Q, q), atol=1e-10, rtol=1e-9)
    assert info.eq_dual.shape == (0,) and info.ineq_dual.shape == (0,)
    grads = _grads(z, inputs)
    assert [tuple(g.shape) for g in grads] == [tuple(t.shape) for t in inputs]
    batched = qp_solve(Q, q.expand(3, n), A, b, G, h)
    torch.testing.assert_close(batched, z.detach().expand(3, n), atol=1e-10, rtol=0)


def test_qp_duplicate_active_inequalities_degenerate_but_right_gradient():
    a = torch.tensor([1.0, 1.0])
    y = torch.tensor([2.0, 0.5], requires_grad=True)
    h = torch.tensor([1.0, 1.0], requires_grad=True)  # the same constraint twice
    z, info = qp_solve(torch.eye(2), -y, G=torch.stack([a, a]), h=h, return_info=True)
    torch.testing.assert_close(z, project_halfspace(y, a, 1.0), atol=1e-8, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CurvatureWarning)  # whether it warns is the next test's subject
        gy, gh = _grads(z, (y, h), torch.tensor([1.0, -2.0]))
    gy_ref = (torch.eye(2) - torch.outer(a, a) / 2) @ torch.tensor([1.0, -2.0])
    torch.testing.assert_close(gy, gy_ref, atol=1e-7, rtol=0)
    # moving both copies together is differentiable: d z / d(h1 + h2 direction) = a / ||a||^2
    torch.testing.assert_close(gh.sum(), torch.tensor([1.0, -2.0]) @ a / 2, atol=1e-7, rtol=0)


def test_qp_dependent_active_constraints_are_flagged_degenerate():
    G = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # z1 <= h1, z2 <= h2, z1 + z2 <= h3: all active
    h = torch.zeros(3, requires_grad=True)
    z, info = qp_solve(torch.eye(2), -torch.ones(2), G=G, h=h, return_info=True)
    torch.testing.assert_close(z, torch.zeros(2), atol=1e-9, rtol=0)
    assert (info.ineq_dual > 0.1).all()  # three positive multipliers for two dimensions: not unique
    with pytest.warns(CurvatureWarning, match="degenerate"):
        torch.autograd.grad(z.sum(), h)
    assert bool(info.degenerate)


def test_qp_duplicate_equalities_rank_deficient_a():
    y = torch.tensor([3.0, -1.0, 0.5], requires_grad=True)
    A = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    b = torch.tensor([1.0, 1.0], requires_grad=True)
    z = qp_solve(torch.eye(3), -y, A=A, b=b)
    torch.testing.assert_close(z, y - (y.sum() - 1) / 3, atol=1e-7, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CurvatureWarning)  # dependent equality rows: one generalized gradient
        gy, gb = _grads(z, (y, b), torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(gy, torch.tensor([2 / 3, -1 / 3, -1 / 3]), atol=1e-6, rtol=0)
    torch.testing.assert_close(gb.sum(), torch.tensor(1 / 3), atol=1e-6, rtol=0)


def test_qp_lp_over_a_box_picks_vertices_and_differentiates_bounds():
    c = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    lo = torch.tensor([-1.0, -2.0, 0.0], requires_grad=True)
    hi = torch.tensor([1.0, 3.0, 4.0], requires_grad=True)
    G = torch.cat([torch.eye(3), -torch.eye(3)])
    z = qp_solve(torch.zeros(3, 3), c, G=G, h=torch.cat([hi, -lo]))
    torch.testing.assert_close(z, torch.where(c > 0, lo, hi).detach(), atol=1e-7, rtol=0)
    gc, glo, ghi = _grads(z, (c, lo, hi))
    assert gc.abs().max() < 1e-6  # piecewise constant in c
    torch.testing.assert_close(glo, (c > 0).double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(ghi, (c <= 0).double(), atol=1e-6, rtol=0)


def test_qp_infeasible_and_unbounded_are_reported_not_nan():
    G, h = torch.tensor([[1.0], [-1.0]]), torch.tensor([-1.0, -1.0])  # z <= -1 and z >= 1
    with pytest.raises(SolveError, match="INFEASIBLE") as err:
        qp_solve(torch.eye(1), torch.zeros(1), G=G, h=h)
    assert err.value.statuses == ["INFEASIBLE"]
    A, b = torch.tensor([[1.0, 1.0], [2.0, 2.0]]), torch.tensor([1.0, 3.0])  # inconsistent equalities
    with pytest.raises(SolveError, match="INFEASIBLE"):
        qp_solve(torch.eye(2), torch.zeros(2), A, b)
    with pytest.raises(SolveError, match="UNBOUNDED"):  # an LP with a free descent ray
        qp_solve(torch.zeros(2, 2), torch.tensor([1.0, 0.0]), G=torch.tensor([[0.0, 1.0]]), h=torch.ones(1))
    with pytest.raises(SolveError, match="UNBOUNDED"):  # no constraints at all
        qp_solve(torch.zeros(2, 2), torch.tensor([1.0, 0.0]))


def test_qp_one_infeasible_element_does_not_poison_the_batch():
    y = torch.tensor([[0.5, 0.2], [0.3, 0.1], [2.0, 2.0]])
    n = 2
    G = torch.cat([torch.eye(n), -torch.eye(n)])
    hi = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, 1.0]])  # element 1: z1 <= -1 and z1 >= 0
    h = torch.cat([hi, torch.zeros(3, n)], -1)
    with pytest.raises(SolveError, match="batch element 1") as err:
        qp_solve(torch.eye(n), -y, G=G, h=h)
    assert err.value.elements == [1]
    z, info = qp_solve(torch.eye(n), -y, G=G, h=h, check=False, return_info=True)
    assert info.status.tolist() == [QPStatus.SOLVED, QPStatus.INFEASIBLE, QPStatus.SOLVED]
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z[[0, 2]], project_box(y[[0, 2]], torch.zeros(n), hi[[0, 2]]), atol=1e-9, rtol=0)


def test_qp_bad_inputs_raise_clear_errors():
    Q, q = torch.eye(3), torch.zeros(3)
    with pytest.raises(ValueError, match="`G`"):
        qp_solve(Q, q, G=torch.zeros(2, 4), h=torch.zeros(2))
    with pytest.raises(ValueError, match="`h`"):
        qp_solve(Q, q, G=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="batch sizes"):
        qp_solve(Q, torch.zeros(2, 3), G=torch.zeros(4, 2, 3), h=torch.zeros(2))
    with pytest.raises(TypeError, match="dtype"):
        qp_solve(Q.float(), q)
    with pytest.raises(FloatingPointError, match="`q`"):
        qp_solve(Q, torch.tensor([0.0, float("nan"), 1.0]))


def test_qp_float32_and_float64_dtype_preserved_and_consistent():
    inputs64 = random_qp(seed=10)
    inputs32 = [t.float().requires_grad_() for t in inputs64]
    z32 = qp_solve(*inputs32)
    assert z32.dtype == torch.float32 and z32.device == inputs32[1].device
    z64 = qp_solve(*inputs64)
    torch.testing.assert_close(z32.double(), z64, atol=2e-5, rtol=1e-5)
    grads32 = _grads(z32, inputs32)
    leaves64 = [t.clone().requires_grad_() for t in inputs64]
    grads64 = _grads(qp_solve(*leaves64), leaves64)
    for g32, g64 in zip(grads32, grads64):
        assert g32.dtype == torch.float32
        torch.testing.assert_close(g32.double(), g64, atol=1e-3, rtol=1e-3)


class _SimplexNet(nn.Module):
    """A linear map followed by a projection onto the simplex, given as ``project(y)``."""

    def __init__(self, d, n, project):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(d, n).double()
        self.project = project

    def forward(self, x):
        return self.project(self.lin(x))


def _train(net, X, target, steps=12, lr=0.05):
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((net(X) - target) ** 2).sum()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _simplex_task(n=4, d=3, N=16, seed=11):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, d, generator=g)
    return X, project_simplex(X @ torch.randn(d, n, generator=g))


def test_qp_layer_trains_inside_a_module_like_the_closed_form():
    """OptNet-style: a linear map predicts q, a QPLayer projects onto the simplex; the
    training run matches the one through the sort-based projection step by step."""
    X, target = _simplex_task()
    n, d = target.shape[1], X.shape[1]
    qp = QPLayer()
    eye, ones = torch.eye(n), torch.ones(1, n)
    net = _SimplexNet(d, n, lambda y: qp(eye, -y, ones, torch.ones(1), -eye, torch.zeros(n)))
    reference = _SimplexNet(d, n, project_simplex)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CurvatureWarning)  # a coordinate may sit exactly at 0
        losses = _train(net, X, target)
    assert qp.last_info.converged.all()
    expected = _train(reference, X, target)
    assert losses[-1] < 0.5 * losses[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), atol=1e-7, rtol=1e-6)


def test_qp_info_reports_duals_consistent_with_kkt():
    Q, q, A, b, G, h = random_qp(seed=12)
    z, info = qp_solve(Q, q, A, b, G, h, return_info=True)
    stationarity = Q @ z + q + A.T @ info.eq_dual + G.T @ info.ineq_dual
    assert stationarity.abs().max() < 1e-8
    assert (info.ineq_dual >= -1e-12).all() and (info.slack >= -1e-12).all()
    torch.testing.assert_close(info.slack, h - G @ z, atol=1e-9, rtol=0)
    assert float((info.ineq_dual * info.slack).abs().max()) < 1e-9  # complementarity


def test_qp_iteration_budget_and_settings_are_checked():
    y = torch.tensor([2.0, -0.7, 0.5])
    G, h = torch.cat([torch.eye(3), -torch.eye(3)]), torch.ones(6)
    with pytest.raises(SolveError, match="MAX_ITERATIONS"):
        qp_solve(torch.eye(3), -y, G=G, h=h, maxiter=2)
    z, info = qp_solve(torch.eye(3), -y, G=G, h=h, maxiter=2, check=False, return_info=True)
    assert int(info.status) == QPStatus.MAX_ITERATIONS and torch.isfinite(z).all()
    z = qp_solve(torch.eye(3), -y, G=G, h=h, tol=1e-6)  # a looser tolerance still solves it
    torch.testing.assert_close(z, y.clamp(-1, 1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="tol"):
        qp_solve(torch.eye(3), -y, tol=2.0)
    with pytest.raises(ValueError, match="maxiter"):
        QPLayer(maxiter=0)


@pytest.mark.parametrize("objective_scale, constraint_scale", [
    (1e-2, 1.0), (1e2, 1.0), (1.0, 1e2), (1.0, 1e4), (1e4, 1.0), (1.0, 1e-2), (1e-6, 1.0), (1e6, 1e-4),
])
def test_qp_solution_invariant_to_scaling_the_data(objective_scale, constraint_scale):
    """argmin of s*(0.5 z'Qz + q'z) s.t. c*(Az - b) = 0, c*(Gz - h) <= 0 does not depend on s, c > 0."""
    Q, q, A, b, G, h = random_qp(seed=3)
    z_ref = qp_solve(Q, q, A, b, G, h)
    s, c = objective_scale, constraint_scale
    z = qp_solve(s * Q, s * q, c * A, c * b, c * G, c * h)
    torch.testing.assert_close(z, z_ref, atol=1e-8, rtol=1e-8)


def test_qp_jacrev_and_vmap_compose():
    n = 3
    Q = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 3.0]])
    J = jacrev(lambda q: qp_solve(Q, q))(torch.tensor([1.0, -1.0, 0.5]))
    torch.testing.assert_close(J, -torch.linalg.inv(Q))
    qs = torch.randn(4, n)
    torch.testing.assert_close(vmap(lambda q: qp_solve(Q, q))(qs), qp_solve(Q, qs))


# =========================================================================== ConvexLayer


def _ridge_problem(m, n):
    A, b, x = cp.Parameter((m, n)), cp.Parameter(m), cp.Variable(n)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b) + cp.sum_squares(x)))
    return problem, A, b, x


def _ridge_closed_form(A, b):
    n = A.shape[-1]
    return torch.linalg.solve(A.mT @ A + torch.eye(n), (A.mT @ b.unsqueeze(-1))).squeeze(-1)


@needs_cvxpy
def test_convex_ridge_closed_form_broadcast_shared_matrix():
    """cvxpylayers' test_broadcasting: A shared, b batched; A's gradient sums over the batch."""
    m, n, B = 8, 3, 3
    problem, A, b, x = _ridge_problem(m, n)
    layer = ConvexLayer(problem, parameters=[A, b], variables=[x])
    g = torch.Generator().manual_seed(20)
    A_t = torch.randn(m, n, generator=g, requires_grad=True)
    b_t = torch.randn(B, m, generator=g, requires_grad=True)
    (sol,) = layer(A_t, b_t)
    assert sol.shape == (B, n)
    ref = _ridge_closed_form(A_t, b_t)
    torch.testing.assert_close(sol, ref, atol=1e-9, rtol=1e-8)
    w = torch.randn(B, n, generator=g)
    for got, want, name in zip(_grads(sol, (A_t, b_t), w), _grads(ref, (A_t, b_t), w), "Ab"):
        torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-7, msg=f"gradient w.r.t. {name}")


@needs_cvxpy
def test_convex_unbatched_and_batched_agree():
    m, n = 6, 3
    problem, A, b, x = _ridge_problem(m, n)
    layer = ConvexLayer(problem, parameters=[A, b], variables=[x])
    A_t, b_t = torch.randn(2, m, n), torch.randn(2, m)
    (batched,) = layer(A_t, b_t)
    for i in range(2):
        (single,) = layer(A_t[i], b_t[i])
        assert single.shape == (n,)
        torch.testing.assert_close(single, batched[i], atol=1e-10, rtol=0)


@needs_cvxpy
def test_convex_simplex_projection_closed_form_and_gradcheck():
    n = 5
    x, y = cp.Variable(n), cp.Parameter(n)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [cp.sum(x) == 1, x >= 0])
    layer = ConvexLayer(problem, parameters=[y], variables=[x])
    Y = torch.tensor([[0.9, 0.1, -0.4, 0.5, 0.25], [2.0, -1.0, 0.3, 0.1, 1.5]], requires_grad=True)  # no ties
    (sol,) = layer(Y)
    torch.testing.assert_close(sol, project_simplex(Y), atol=1e-9, rtol=0)
    w = torch.randn(2, n)
    torch.testing.assert_close(_grads(sol, (Y,), w)[0], _grads(project_simplex(Y), (Y,), w)[0], atol=1e-8, rtol=0)
    assert torch.autograd.gradcheck(lambda t: layer(t)[0], (Y[0].detach().clone().requires_grad_(),),
                                    eps=1e-6, atol=1e-6, rtol=1e-5)


def _ball_layer(n, **kwargs):
    x, y, r = cp.Variable(n), cp.Parameter(n), cp.Parameter(nonneg=True)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [cp.norm(x, 2) <= r])
    return ConvexLayer(problem, parameters=[y, r], variables=[x], **kwargs)


def _ball_projection(Y, R):
    return Y * torch.clamp(R / Y.norm(dim=-1, keepdim=True), max=1.0)


@needs_cvxpy
def test_convex_ball_projection_second_order_cone_closed_form():
    layer = _ball_layer(4)
    assert layer.method == "conic"
    Y = torch.tensor([[1.0, -2.0, 0.5, 1.0], [0.3, 0.9, -0.4, 0.2]], requires_grad=True)  # both outside
    R = torch.tensor(0.8, requires_grad=True)
    (sol,) = layer(Y, R)
    ref = _ball_projection(Y, R)
    torch.testing.assert_close(sol, ref, atol=1e-8, rtol=0)
    w = torch.tensor([[0.3, 1.0, -0.5, 2.0], [1.0, -1.0, 0.5, 0.2]])
    for got, want, name in zip(_grads(sol, (Y, R), w), _grads(ref, (Y, R), w), ("y", "r")):
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-6, msg=f"gradient w.r.t. {name}")


@needs_cvxpy
def test_convex_inactive_cone_constraint_with_least_squares_adjoint():
    """Inside the ball the constraint is inactive: the map is the identity and r has no effect."""
    layer = _ball_layer(4, solve=Direct("lstsq"))
    Y = torch.tensor([[0.1, 0.2, -0.1, 0.0], [1.0, -2.0, 0.5, 1.0]], requires_grad=True)  # inside, outside
    R = torch.tensor(0.8, requires_grad=True)
    (sol,) = layer(Y, R)
    ref = _ball_projection(Y, R)
    torch.testing.assert_close(sol, ref, atol=1e-8, rtol=0)
    w = torch.tensor([[0.3, 1.0, -0.5, 2.0], [1.0, -1.0, 0.5, 0.2]])
    gY, gR = _grads(sol, (Y, R), w)
    rY, rR = _grads(ref, (Y, R), w)
    torch.testing.assert_close(gY, rY, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(gR, rR, atol=1e-7, rtol=1e-6)


@needs_cvxpy
def test_convex_inactive_cone_constraint_default_solve():
    layer = _ball_layer(4)
    Y = torch.tensor([[0.1, 0.2, -0.1, 0.0], [1.0, -2.0, 0.5, 1.0]], requires_grad=True)  # inside, outside
    R = torch.tensor(0.8, requires_grad=True)
    (sol,) = layer(Y, R)
    w = torch.tensor([[0.3, 1.0, -0.5, 2.0], [1.0, -1.0, 0.5, 0.2]])
    gY, gR = _grads(sol, (Y, R), w)  # the CurvatureWarning is an error under the project's filterwarnings
    rY, rR = _grads(_ball_projection(Y, R), (Y, R), w)
    torch.testing.assert_close(gY, rY, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(gR, rR, atol=1e-7, rtol=1e-6)


@needs_cvxpy
def test_convex_psd_projection_closed_form():
    """Projection onto the PSD cone (eigenvalues clipped at 0); the gradient through eigh."""
    k = 3
    X, Y = cp.Variable((k, k), symmetric=True), cp.Parameter((k, k), symmetric=True)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(X - Y)), [X >> 0])
    layer = ConvexLayer(problem, parameters=[Y], variables=[X])
    g = torch.Generator().manual_seed(21)
    M = torch.randn(k, k, generator=g)
    Yt = (0.5 * (M + M.T)).requires_grad_()

    def reference(S):
        evals, evecs = torch.linalg.eigh(0.5 * (S + S.T))
        return evecs @ torch.diag(evals.clamp_min(0)) @ evecs.T

    (sol,) = layer(Yt)
    ref = reference(Yt)
    assert (torch.linalg.eigvalsh(Yt.detach()) < 0).any() and (torch.linalg.eigvalsh(Yt.detach()) > 0).any()
    torch.testing.assert_close(sol, ref, atol=1e-7, rtol=0)
    W = torch.randn(k, k, generator=g)
    W = W + W.T  # a symmetric direction: Y's tangent space
    (got,) = _grads(sol, (Yt,), W)
    (want,) = _grads(ref, (Yt,), W)
    torch.testing.assert_close(0.5 * (got + got.T), 0.5 * (want + want.T), atol=1e-6, rtol=1e-5)


@needs_cvxpy
def test_convex_equality_constraint_identity_map_gradcheck():
    """cvxpylayers' test_equality: argmin ||x||^2 s.t. x == b is b."""
    n = 6
    x, b = cp.Variable(n), cp.Parameter(n)
    layer = ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(x)), [x == b]), parameters=[b], variables=[x])
    b_t = torch.randn(n, requires_grad=True)
    (sol,) = layer(b_t)
    torch.testing.assert_close(sol, b_t, atol=1e-10, rtol=0)
    assert torch.autograd.gradcheck(lambda t: layer(t)[0].sum(), (b_t,), eps=1e-6, atol=1e-6)


@needs_cvxpy
def test_convex_unconstrained_problem_zero_constraints():
    n = 4
    x, y = cp.Variable(n), cp.Parameter(n)
    layer = ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(x - y))), parameters=[y], variables=[x])
    Y = torch.randn(3, n, requires_grad=True)
    (sol,) = layer(Y)
    torch.testing.assert_close(sol, Y, atol=1e-10, rtol=0)
    (gy,) = _grads(sol, (Y,))
    torch.testing.assert_close(gy, torch.ones(3, n), atol=1e-9, rtol=0)


@needs_cvxpy
def test_convex_matrix_and_scalar_variables_keep_their_layout():
    X, Y = cp.Variable((2, 3)), cp.Parameter((2, 3))
    layer = ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(X - Y)), [X >= 0]), parameters=[Y], variables=[X])
    Yt = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]], requires_grad=True)
    (sol,) = layer(torch.stack([Yt, -Yt]))
    assert sol.shape == (2, 2, 3)
    torch.testing.assert_close(sol, torch.stack([Yt, -Yt]).clamp_min(0), atol=1e-9, rtol=0)
    (g,) = torch.autograd.grad(sol[0, 1, 1] + 2 * sol[1, 0, 1], Yt)  # rows and columns not swapped
    torch.testing.assert_close(g, torch.tensor([[0.0, -2.0, 0.0], [0.0, 1.0, 0.0]]), atol=1e-7, rtol=0)
    x, a = cp.Variable(), cp.Parameter()
    scalar = ConvexLayer(cp.Problem(cp.Minimize(cp.square(x - a)), [x >= 0]), parameters=[a], variables=[x])
    (one,) = scalar(torch.tensor(2.0))
    assert one.shape == ()
    (many,) = scalar(torch.tensor([2.0, -1.0]))
    assert many.shape == (2,)
    torch.testing.assert_close(many, torch.tensor([2.0, 0.0]), atol=1e-9, rtol=0)


@needs_cvxpy
def test_convex_several_variables_and_parameters_with_attributes():
    n = 3
    x, s = cp.Variable(n), cp.Variable(n, nonneg=True)
    y, lam = cp.Parameter(n), cp.Parameter(nonneg=True)
    # coordinate-wise: min (x - y)^2 + 2 lam s s.t. x <= s, s >= 0 (a nonneg variable, a nonneg parameter)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - y) + 2 * lam * cp.sum(s)), [x <= s])
    layer = ConvexLayer(problem, parameters=[y, lam], variables=[x, s])
    Y = torch.tensor([2.0, -1.0, 0.3], requires_grad=True)
    L = torch.tensor(0.5, requires_grad=True)
    x_t, s_t = layer(Y, L)
    # x = y - lam where y > lam, 0 where 0 <= y <= lam, y where y < 0; s = max(x, 0)
    x_ref = torch.where(Y > L, Y - L, torch.where(Y < 0, Y, torch.zeros_like(Y)))
    torch.testing.assert_close(x_t, x_ref, atol=1e-7, rtol=0)
    torch.testing.assert_close(s_t, x_ref.clamp_min(0), atol=1e-7, rtol=0)
    assert (s_t >= -1e-9).all()
    gY, gL = _grads(x_t, (Y, L))
    torch.testing.assert_close(gY, torch.tensor([1.0, 1.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(gL, torch.tensor(-1.0), atol=1e-6, rtol=0)


@needs_cvxpy
def test_convex_infeasible_and_unbounded_raise_solve_error():
    x, p = cp.Variable(1), cp.Parameter(1)
    infeasible = ConvexLayer(cp.Problem(cp.Minimize(p @ x), [x >= 1, x <= -1]), parameters=[p], variables=[x])
    with pytest.raises(SolveError, match="infeasible"):
        infeasible(torch.ones(1))
    unbounded = ConvexLayer(cp.Problem(cp.Minimize(cp.sum(x)), [x <= p]), parameters=[p], variables=[x])
    with pytest.raises(SolveError, match="unbounded"):
        unbounded(torch.ones(1))
    # conic route: a ball that misses a half-space
    z, r = cp.Variable(2), cp.Parameter(nonneg=True)
    conic = ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(z)), [cp.norm(z, 2) <= r, z[0] >= 2]),
                        parameters=[r], variables=[z])
    assert conic.method == "conic"
    torch.testing.assert_close(conic(torch.tensor(3.0))[0], torch.tensor([2.0, 0.0]), atol=1e-7, rtol=0)
    with pytest.raises(SolveError, match="infeasible"):
        conic(torch.tensor(1.0))


@needs_cvxpy
def test_convex_infeasible_element_of_a_batch_is_named():
    x, p = cp.Variable(1), cp.Parameter(1)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x)), [x >= 1, x <= p])
    layer = ConvexLayer(problem, parameters=[p], variables=[x])
    with pytest.warns(SolveWarning, match="batch element 1") as record:  # DESIGN: the batch is not aborted
        (out,) = layer(torch.tensor([[2.0], [0.0], [3.0]]))
    assert record[0].message.elements == [1] and bool(out[1].isnan().all())
    torch.testing.assert_close(out[[0, 2]], torch.ones(2, 1), atol=1e-8, rtol=0)
    with pytest.raises(SolveError, match="batch element 1") as err:
        ConvexLayer(problem, parameters=[p], variables=[x], check=True)(torch.tensor([[2.0], [0.0], [3.0]]))
    assert err.value.elements == [1]
    torch.testing.assert_close(layer(torch.tensor([[2.0], [3.0]]))[0], torch.ones(2, 1), atol=1e-8, rtol=0)


@needs_cvxpy
def test_convex_bad_construction_and_call_arguments():
    m, n = 5, 3
    problem, A, b, x = _ridge_problem(m, n)
    with pytest.raises(ValueError, match="missing"):  # not all parameters listed
        ConvexLayer(problem, parameters=[A], variables=[x])
    with pytest.raises(ValueError, match="not a variable of the problem"):
        ConvexLayer(problem, parameters=[A, b], variables=[cp.Variable(2)])
    a = cp.Parameter()
    with pytest.raises(ValueError, match="DPP"):
        ConvexLayer(cp.Problem(cp.Minimize(a * a * cp.sum_squares(x))), parameters=[a], variables=[x])
    with pytest.raises(ValueError, match="method"):
        ConvexLayer(problem, parameters=[A, b], variables=[x], method="newton")
    r = cp.Parameter(nonneg=True)
    with pytest.raises(NotImplementedError, match="not an LP/QP"):
        ConvexLayer(cp.Problem(cp.Minimize(cp.norm(x, 2)), [cp.sum(x) == r]), parameters=[r], variables=[x],
                    method="qp")
    layer = ConvexLayer(problem, parameters=[A, b], variables=[x])
    with pytest.raises(ValueError, match="expected 2 parameter tensors"):
        layer(torch.randn(m, n))
    with pytest.raises(ValueError, match="batch sizes"):
        layer(torch.randn(4, m, n), torch.randn(3, m))
    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(m, n), torch.randn(2 * m))
    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(4, m, n), torch.randn(4, 4, m))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(m, n), torch.randn(m).float())
    with pytest.raises(FloatingPointError, match="NaN"):
        layer(torch.full((m, n), float("nan")), torch.randn(m))
    with pytest.raises(ValueError, match="solver_args"):
        layer(torch.randn(m, n), torch.randn(m), solver_args={"alpha": 1.8})


@needs_cvxpy
def test_convex_no_grad_and_requires_grad_false_outputs():
    m, n = 4, 2
    problem, A, b, x = _ridge_problem(m, n)
    layer = ConvexLayer(problem, parameters=[A, b], variables=[x])
    A_t, b_t = torch.randn(m, n, requires_grad=True), torch.randn(m, requires_grad=True)
    with torch.no_grad():
        (sol,) = layer(A_t, b_t)
    assert not sol.requires_grad
    (sol,) = layer(A_t.detach(), b_t.detach())
    assert not sol.requires_grad
    (sol,) = layer(A_t.detach(), b_t)  # only b requires grad
    (gb,) = torch.autograd.grad(sol.sum(), b_t)
    (gb_ref,) = torch.autograd.grad(_ridge_closed_form(A_t.detach(), b_t).sum(), b_t)
    torch.testing.assert_close(gb, gb_ref, atol=1e-9, rtol=1e-8)


@needs_cvxpy
def test_convex_shared_parameter_in_two_layers_gradcheck():
    """cvxpylayers' test_shared_parameter: one tensor feeds two layers."""
    m, n = 6, 3
    g = torch.Generator().manual_seed(22)
    A = cp.Parameter((m, n))
    x = cp.Variable(n)
    b1, b2 = (torch.randn(m, generator=g).numpy() for _ in range(2))
    layer1 = ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b1))), parameters=[A], variables=[x])
    layer2 = ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b2))), parameters=[A], variables=[x])
    A_t = torch.randn(m, n, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.cat([layer1(t)[0], layer2(t)[0]]), (A_t,),
                                    eps=1e-6, atol=1e-6, rtol=1e-5)


@needs_cvxpy
def test_convex_float32_outputs_float32():
    m, n = 5, 3
    problem, A, b, x = _ridge_problem(m, n)
    layer = ConvexLayer(problem, parameters=[A, b], variables=[x])
    A_t = torch.randn(2, m, n)
    b_t = torch.randn(2, m)
    A32, b32 = A_t.float().requires_grad_(), b_t.float().requires_grad_()
    (sol,) = layer(A32, b32)
    assert sol.dtype == torch.float32
    torch.testing.assert_close(sol.double(), _ridge_closed_form(A_t, b_t), atol=1e-5, rtol=1e-5)
    gA, gb = _grads(sol, (A32, b32))
    assert gA.dtype == torch.float32 and gb.dtype == torch.float32


@needs_cvxpy
def test_convex_float32_on_the_conic_route():
    n = 3
    x, y = cp.Variable(n), cp.Parameter(n)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [cp.norm(x, 2) <= 1])
    layer = ConvexLayer(problem, parameters=[y], variables=[x])
    Y = torch.tensor([3.0, 0.0, 4.0], dtype=torch.float32, requires_grad=True)
    (sol,) = layer(Y)
    assert sol.dtype == torch.float32
    torch.testing.assert_close(sol, torch.tensor([0.6, 0.0, 0.8], dtype=torch.float32), atol=1e-5, rtol=0)
    (g,) = torch.autograd.grad(sol[0], Y)
    assert g.dtype == torch.float32
    torch.testing.assert_close(g, torch.tensor([0.128, 0.0, -0.096], dtype=torch.float32), atol=1e-4, rtol=0)


@needs_cvxpy
def test_convex_layer_trains_inside_a_module_like_the_closed_form():
    """The simplex projection as a ConvexLayer inside a model (cvxpylayers' tutorials)."""
    X, target = _simplex_task(seed=23)
    n, d = target.shape[1], X.shape[1]
    z, y = cp.Variable(n), cp.Parameter(n)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(z - y)), [cp.sum(z) == 1, z >= 0])
    layer = ConvexLayer(problem, parameters=[y], variables=[z])
    net = _SimplexNet(d, n, lambda t: layer(t)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CurvatureWarning)
        losses = _train(net, X, target)
    expected = _train(_SimplexNet(d, n, project_simplex), X, target)
    assert losses[-1] < 0.5 * losses[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), atol=1e-7, rtol=1e-6)


@needs_cvxpylayers
def test_convex_qp_all_parameters_against_cvxpylayers():
    """A random QP with every datum a parameter, against cvxpylayers (diffcp + Clarabel)."""
    n, p, m = 4, 1, 5
    Q0, q0, A0, b0, G0, h0 = random_qp(n, p, m, seed=24)
    Lq = torch.linalg.cholesky(Q0)
    L, q, A, b, G, h = (cp.Parameter(s) for s in ((n, n), n, (p, n), p, (m, n), m))
    z = cp.Variable(n)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(L.T @ z) + q @ z), [A @ z == b, G @ z <= h])
    params = [L, q, A, b, G, h]
    ours = ConvexLayer(problem, parameters=params, variables=[z])
    ref = CvxpyLayer(problem, parameters=params, variables=[z], solver_args=CLARABEL)
    values = [t.clone().requires_grad_() for t in (Lq, q0, A0, b0, G0, h0)]
    (z_ours,) = ours(*values)
    (z_ref,) = ref(*values)
    torch.testing.assert_close(z_ours, z_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z_ours, qp_solve(Q0, q0, A0, b0, G0, h0), atol=1e-9, rtol=0)
    w = torch.randn(n)
    for got, want, name in zip(_grads(z_ours, values, w), _grads(z_ref, values, w), "LqAbGh"):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3, msg=f"gradient w.r.t. {name}")


@needs_cvxpylayers
def test_convex_logistic_regression_against_cvxpylayers():
    """cvxpylayers' test_logistic_regression (exponential cones): gradient w.r.t. the data."""
    N, n = 10, 2
    g = torch.Generator().manual_seed(25)
    X_np = torch.randn(N, n, generator=g)
    y = (torch.rand(N, generator=g) > 0.5).double()
    X, lam = cp.Parameter((N, n)), cp.Parameter(nonneg=True)
    beta = cp.Variable(n)
    loss = -cp.sum(cp.multiply(y.numpy(), X @ beta) - cp.logistic(X @ beta)) / N
    problem = cp.Problem(cp.Minimize(loss + lam * cp.sum_squares(beta)))
    ours = ConvexLayer(problem, parameters=[X, lam], variables=[beta])
    ref = CvxpyLayer(problem, parameters=[X, lam], variables=[beta], solver_args=CLARABEL)
    Xt, lt = X_np.clone().requires_grad_(), torch.tensor(0.1, requires_grad=True)
    (b_ours,) = ours(Xt, lt)
    (b_ref,) = ref(Xt, lt)
    torch.testing.assert_close(b_ours, b_ref, atol=1e-5, rtol=1e-5)
    # stationarity of the smooth objective at our solution, to solver precision
    obj = lambda b: -(y * (X_np @ b) - torch.nn.functional.softplus(X_np @ b)).sum() / N + 0.1 * (b * b).sum()
    b0 = b_ours.detach().clone().requires_grad_()
    assert torch.autograd.grad(obj(b0), b0)[0].abs().max() < 1e-7
    for got, want in zip(_grads(b_ours, (Xt, lt)), _grads(b_ref, (Xt, lt))):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


@needs_cvxpylayers
def test_convex_entropy_maximization_softmax_against_cvxpylayers():
    n = 4
    x, theta = cp.Variable(n), cp.Parameter(n)
    problem = cp.Problem(cp.Minimize(-theta @ x - cp.sum(cp.entr(x))), [cp.sum(x) == 1])
    ours = ConvexLayer(problem, parameters=[theta], variables=[x])
    ref = CvxpyLayer(problem, parameters=[theta], variables=[x], solver_args=CLARABEL)
    T = torch.tensor([[0.5, 1.0, -2.0, 0.0], [1.0, 1.0, 3.0, -1.0]], requires_grad=True)
    (p_ours,) = ours(T)
    (p_ref,) = ref(T)
    torch.testing.assert_close(p_ours, torch.softmax(T, -1), atol=1e-8, rtol=0)
    torch.testing.assert_close(p_ours, p_ref, atol=1e-5, rtol=0)
    w = torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.5, 0.5, 0.0, 1.0]])
    (g,) = _grads(p_ours, (T,), w)
    (g_exact,) = _grads(torch.softmax(T, -1), (T,), w)
    torch.testing.assert_close(g, g_exact, atol=1e-7, rtol=0)
    (g_ref,) = _grads(p_ref, (T,), w)
    torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-3)


# =========================================================================== ArgminLayer


def _ridge_data(N=12, d=3, seed=30):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, d, generator=g), torch.randn(N, generator=g)


def _ridge_objective(w, X, y, log_lam):
    return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * log_lam.exp() * (w * w).sum()


def _ridge_exact(X, y, log_lam):
    return torch.linalg.solve(X.T @ X + log_lam.exp() * torch.eye(X.shape[1]), X.T @ y)


def test_argmin_lbfgs_ridge_gradients_w_r_t_every_input():
    X, y = (t.requires_grad_() for t in _ridge_data())
    log_lam = torch.tensor(0.3, requires_grad=True)
    layer = ArgminLayer(_ridge_objective, LBFGS(), init=torch.zeros(3))
    w = layer(X, y, log_lam)
    ref = _ridge_exact(X, y, log_lam)
    torch.testing.assert_close(w, ref, atol=1e-7, rtol=1e-6)
    v = torch.tensor([1.0, -2.0, 0.5])
    for got, want, name in zip(_grads(w, (X, y, log_lam), v), _grads(ref, (X, y, log_lam), v), ("X", "y", "lam")):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=f"gradient w.r.t. {name}")
    assert layer.implicit_info is not None


def test_argmin_jacrev_and_vmap_compose():
    X, y = _ridge_data(N=8, d=2)
    log_lam = torch.tensor(0.0)
    layer = ArgminLayer(_ridge_objective, LBFGS(), init=torch.zeros(2))
    J = jacrev(lambda t: layer(X, t, log_lam))(y)
    torch.testing.assert_close(J, torch.linalg.solve(X.T @ X + torch.eye(2), X.T), atol=1e-6, rtol=1e-5)
    ys = torch.stack([y, 2 * y, -y])
    W = vmap(lambda t: layer(X, t, log_lam))(ys)
    torch.testing.assert_close(W, torch.stack([_ridge_exact(X, t, log_lam) for t in ys]), atol=1e-6, rtol=1e-5)


def test_argmin_batched_inputs_with_shared_ones_sum_gradients():
    X, y = _ridge_data(N=10, d=3)
    ys = torch.stack([y, y + 1, 0.5 * y]).requires_grad_()
    log_lam = torch.tensor(-0.5, requires_grad=True)
    Xs = X.clone().requires_grad_()
    layer = ArgminLayer(_ridge_objective, LBFGS(), init=torch.zeros(3),
                        input_ndims=[2, 1, 0])
    W = layer(Xs, ys, log_lam)
    assert W.shape == (3, 3)
    ref = torch.stack([_ridge_exact(Xs, ys[i], log_lam) for i in range(3)])
    torch.testing.assert_close(W, ref, atol=1e-6, rtol=1e-5)
    v = torch.randn(3, 3)
    for got, want in zip(_grads(W, (Xs, ys, log_lam), v), _grads(ref, (Xs, ys, log_lam), v)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_argmin_float32_dtype_and_module_objective_training():
    class Fit(nn.Module):
        """A learnable quadratic pulling z towards scale * x (solution: scale * x / (1 + reg))."""

        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(0.5))

        def forward(self, z, x):
            return 0.5 * ((z - self.scale * x) ** 2).sum() + 0.05 * (z * z).sum()

    x = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float32)
    fit = Fit().float()
    layer = ArgminLayer(fit, LBFGS(), init=torch.zeros(3, dtype=torch.float32))
    z = layer(x)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, fit.scale.detach() * x / 1.1, atol=1e-5, rtol=1e-4)
    target = 2.0 * x / 1.1
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = ((layer(x) - target) ** 2).sum()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.1 * losses[0]
    assert abs(float(fit.scale.detach()) - 2.0) < 0.2


# =========================================================================== Gauss-Newton / Levenberg-Marquardt


def rosenbrock(z, a, b):
    """Rosenbrock's function as residuals: minimizer (a, a^2) for every b > 0."""
    return torch.stack([a - z[0], b.sqrt() * (z[1] - z[0] ** 2)])


@pytest.mark.parametrize("solver", [GaussNewton(), LevenbergMarquardt()], ids=lambda s: s.name)
def test_least_squares_rosenbrock_minimizer_and_implicit_jacobian(solver):
    a = torch.tensor(1.5, requires_grad=True)
    b = torch.tensor(100.0, requires_grad=True)
    z = solver(rosenbrock, torch.tensor([-1.2, 1.0]), a, b)
    torch.testing.assert_close(z, torch.tensor([1.5, 2.25]), atol=1e-8, rtol=0)
    J_a = torch.stack([torch.autograd.grad(z[i], a, retain_graph=True)[0] for i in range(2)])
    torch.testing.assert_close(J_a, torch.tensor([1.0, 3.0]), atol=1e-7, rtol=0)  # d(a, a^2)/da
    (g_b,) = torch.autograd.grad(z.sum(), b)
    assert abs(float(g_b)) < 1e-8  # the minimizer does not depend on b
    J = jacrev(lambda t: solver(rosenbrock, torch.tensor([-1.2, 1.0]), t, b.detach()))(a.detach())
    torch.testing.assert_close(J, torch.tensor([1.0, 3.0]), atol=1e-7, rtol=0)


def _exp_model(p, t):
    return p[..., :1] * torch.exp(p[..., 1:2] * t) + p[..., 2:3]


def _curve_data(seed=31):
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 2, 15)
    y = _exp_model(torch.tensor([1.5, -0.8, 0.3]), t) + 0.05 * torch.randn(15, generator=g)
    return t, y


@pytest.mark.parametrize("solver", [GaussNewton(tol=1e-12), LevenbergMarquardt(tol=1e-12)], ids=lambda s: s.name)
def test_least_squares_curve_fit_implicit_gradient_matches_finite_differences(solver):
    t, y = _curve_data()
    fit = lambda p, y: _exp_model(p, t) - y
    init = torch.tensor([1.0, -0.5, 0.0])
    y_leaf = y.clone().requires_grad_()
    p = solver(fit, init, y_leaf)
    v = torch.tensor([1.0, -1.0, 2.0])
    (g,) = torch.autograd.grad(p @ v, y_leaf)
    eps = 1e-6
    fd = torch.empty_like(y)
    for i in range(len(y)):
        e = torch.zeros_like(y)
        e[i] = eps
        p_plus, _ = solver.run(fit, init, y + e)
        p_minus, _ = solver.run(fit, init, y - e)
        fd[i] = (p_plus - p_minus) @ v / (2 * eps)
    torch.testing.assert_close(g, fd, atol=1e-6, rtol=1e-5)


def test_least_squares_large_residual_gradient_uses_the_exact_hessian():
    """A fit with large residuals: J'J alone (the Gauss-Newton matrix) would give a visibly wrong
    implicit gradient; the exact Hessian J'J + sum r_i H_i matches finite differences."""
    t = torch.linspace(0, 1, 8)
    y = torch.tensor([1.0, 3.0, 0.5, 4.0, 0.2, 2.5, 1.0, 3.5])
    fit = lambda p, y: p[0] * torch.exp(p[1] * t) - y
    init = torch.tensor([1.0, 0.5])
    solver = LevenbergMarquardt(tol=1e-13)
    y_leaf = y.clone().requires_grad_()
    (g,) = torch.autograd.grad(solver(fit, init, y_leaf).sum(), y_leaf)
    eps = 1e-6
    fd = torch.stack([(solver.run(fit, init, y + eps * e)[0].sum() - solver.run(fit, init, y - eps * e)[0].sum())
                      / (2 * eps) for e in torch.eye(8)])
    torch.testing.assert_close(g, fd, atol=1e-7, rtol=1e-6)
    p = solver.run(fit, init, y)[0]
    J = torch.autograd.functional.jacobian(lambda q: fit(q, y), p)
    gauss_newton_only = torch.linalg.solve(J.T @ J, J.T).sum(0)
    assert (gauss_newton_only - fd).abs().max() > 1e-3  # the test can tell the two apart


def test_least_squares_implicit_gradient_equals_long_unrolled_gauss_newton():
    """Theseus' backward modes: unrolling a converged Gauss-Newton loop gives the implicit gradient."""
    t, y = _curve_data(seed=32)
    fit = lambda p, y: _exp_model(p, t) - y
    init = torch.tensor([1.0, -0.5, 0.0])
    y_imp = y.clone().requires_grad_()
    (g_imp,) = torch.autograd.grad(GaussNewton(tol=1e-12)(fit, init, y_imp).sum(), y_imp)

    y_unr = y.clone().requires_grad_()
    p = init.clone()
    for _ in range(40):
        J = torch.autograd.functional.jacobian(lambda q: fit(q, y_unr), p, create_graph=True)
        r = fit(p, y_unr)
        p = p - torch.linalg.solve(J.T @ J, J.T @ r)
    (g_unr,) = torch.autograd.grad(p.sum(), y_unr)
    torch.testing.assert_close(g_imp, g_unr, atol=1e-7, rtol=1e-6)


def test_least_squares_gradcheck_float64():
    t, y = _curve_data(seed=33)
    init = torch.tensor([1.0, -0.5, 0.0])
    t_leaf = t.clone().requires_grad_()
    y_leaf = y.clone().requires_grad_()
    fit = lambda p, t, y: _exp_model(p, t) - y
    assert torch.autograd.gradcheck(lambda t, y: GaussNewton(tol=1e-12)(fit, init, t, y), (t_leaf, y_leaf),
                                    eps=1e-6, atol=1e-5, rtol=1e-4)


def test_batched_levenberg_marquardt_elements_are_independent_and_shared_data_sums():
    t = torch.linspace(0, 2, 12)
    truth = torch.tensor([[1.5, -0.8, 0.3], [0.8, 1.0, -0.5], [2.0, -1.5, 0.0]])
    Y = (_exp_model(truth, t) + 0.01 * torch.randn(3, 12)).requires_grad_()
    t_leaf = t.clone().requires_grad_()
    fit = lambda P, t, Y: _exp_model(P, t) - Y  # already batched over the 3 problems; t shared
    init = torch.tensor([1.0, -0.5, 0.0]).expand(3, 3).clone()
    P = LevenbergMarquardt(batch_dims=1)(fit, init, t_leaf, Y)
    assert P.shape == (3, 3)
    (gY0,) = torch.autograd.grad(P[0].sum(), Y, retain_graph=True)
    assert gY0[1:].abs().max() == 0  # problem 0 ignores the data of problems 1 and 2
    (gt,) = torch.autograd.grad(P.sum(), t_leaf, retain_graph=True)
    one = lambda p, t, y: _exp_model(p, t) - y
    gt_loop = torch.zeros_like(t)
    for i in range(3):
        ti, yi = t.clone().requires_grad_(), Y[i].detach().clone().requires_grad_()
        pi = LevenbergMarquardt()(one, init[i], ti, yi)
        torch.testing.assert_close(P[i], pi, atol=1e-8, rtol=1e-7)
        (gti, gyi) = torch.autograd.grad(pi.sum(), (ti, yi))
        gt_loop += gti
        (gYi,) = torch.autograd.grad(P[i].sum(), Y, retain_graph=True)
        torch.testing.assert_close(gYi[i], gyi, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(gt, gt_loop, atol=1e-7, rtol=1e-6)  # the shared tensor's gradient sums


def test_least_squares_float32_dtype_preserved():
    t, y = _curve_data(seed=34)
    t32, y32 = t.float(), y.float().requires_grad_()
    fit = lambda p, y: _exp_model(p, t32) - y
    for solver in (GaussNewton(), LevenbergMarquardt()):
        p, info = solver.run(fit, torch.tensor([1.0, -0.5, 0.0], dtype=torch.float32), y32)
        assert p.dtype == torch.float32 and bool(info.converged)
        p64, _ = solver.run(lambda p, y: _exp_model(p, t) - y, torch.tensor([1.0, -0.5, 0.0]), y)
        torch.testing.assert_close(p.double(), p64, atol=5e-3, rtol=5e-3)
        p = solver(fit, torch.tensor([1.0, -0.5, 0.0], dtype=torch.float32), y32)
        (g,) = torch.autograd.grad(p.sum(), y32)
        assert g.dtype == torch.float32 and torch.isfinite(g).all()


def test_least_squares_failures_are_reported():
    t, y = _curve_data(seed=35)
    fit = lambda p, y: _exp_model(p, t) - y
    init = torch.tensor([1.0, -0.5, 0.0])
    with pytest.warns(ConvergenceWarning, match="MAX_ITERATIONS"):
        _, info = LevenbergMarquardt(maxiter=1).run(fit, init, y)
    assert not bool(info.converged)
    bad = y.clone()
    bad[3] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite"):
        GaussNewton().run(fit, init, bad)


def test_batched_least_squares_report_status_per_element():
    """Theseus-style per-element status: element 0 starts at its minimizer, element 1 far away."""
    a, b = torch.tensor([1.0, 1.0]), torch.tensor([100.0, 100.0])
    fun = lambda Z, a, b: torch.stack([a - Z[:, 0], b.sqrt() * (Z[:, 1] - Z[:, 0] ** 2)], -1)
    init = torch.tensor([[1.0, 1.0], [-1.2, 1.0]])
    with pytest.warns(ConvergenceWarning, match=r"batch elements \[1\]"):
        Z, info = LevenbergMarquardt(batch_dims=1, maxiter=5).run(fun, init, a, b)
    assert info.status.tolist() == [0, 1] and info.converged.tolist() == [True, False]
    torch.testing.assert_close(Z[0], torch.ones(2), atol=1e-12, rtol=0)
    Z, info = LevenbergMarquardt(batch_dims=1).run(fun, init, a, b)
    assert info.converged.all() and int(info.iterations[0]) <= 1 < int(info.iterations[1])
    torch.testing.assert_close(Z, torch.ones(2, 2), atol=1e-8, rtol=0)
    bad = torch.tensor([1.0, float("nan")])
    with pytest.raises(FloatingPointError, match=r"batch elements \[1\]"):
        GaussNewton(batch_dims=1).run(fun, init, bad, b)


def test_argmin_pytree_solution():
    """A dict-valued minimizer (DESIGN.md: variables are pytrees), for LBFGS and Levenberg-Marquardt."""
    c = torch.tensor([1.0, 2.0], requires_grad=True)
    init = {"a": torch.zeros(2), "b": torch.zeros(3)}
    smooth = ArgminLayer(lambda z, c: ((z["a"] - c) ** 2).sum() + ((z["b"] - c.sum()) ** 2).sum(), LBFGS(), init=init)
    residuals = ArgminLayer(lambda z, c: torch.cat([z["a"] - c, z["b"] - c.sum()]), LevenbergMarquardt(), init=init)
    for layer in (smooth, residuals):
        z = layer(c)
        assert set(z) == {"a", "b"} and z["a"].shape == (2,) and z["b"].shape == (3,)
        torch.testing.assert_close(z["a"], c, atol=1e-6, rtol=0)
        torch.testing.assert_close(z["b"], c.sum().expand(3), atol=1e-6, rtol=0)
        (g,) = torch.autograd.grad(z["a"].sum() + 2 * z["b"].sum(), c)
        torch.testing.assert_close(g, torch.tensor([7.0, 7.0]), atol=1e-6, rtol=0)


def test_argmin_layer_with_levenberg_marquardt_trains_data_offset():
    """Theseus-style outer loop: learn an offset of the data so that the fitted curve's
    parameters hit a target, through the implicit gradient of the inner fit."""
    t, y = _curve_data(seed=36)
    layer = ArgminLayer(lambda p, y: _exp_model(p, t) - y, LevenbergMarquardt(),
                        init=torch.tensor([1.0, -0.5, 0.0]))
    offset = torch.zeros((), requires_grad=True)
    target_c = torch.tensor(1.0)  # the constant term of the fit
    opt = torch.optim.SGD([offset], lr=0.5)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        p = layer(y + offset)
        loss = (p[2] - target_c) ** 2
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 1e-3 * losses[0]  # the constant term is linear in the offset: d c / d offset = 1


# =========================================================================== HardConstraint / MoE


def _poly_basis(x, N=3):
    return torch.stack([x**k for k in range(N)], -1)


def test_hard_constraint_linear_residual_is_least_squares_with_closed_form_gradients():
    x = torch.linspace(-1, 1, 9)
    basis = _poly_basis(x).requires_grad_()
    y = (torch.sin(2 * x)).requires_grad_()
    layer = HardConstraint(lambda u, y: u - y)
    omega = layer(basis, y)
    assert omega.shape == (1, 3)
    ref = torch.linalg.solve(basis.T @ basis, basis.T @ y)
    torch.testing.assert_close(omega[0], ref, atol=1e-9, rtol=1e-8)
    v = torch.tensor([1.0, 2.0, -1.0])
    for got, want, name in zip(_grads(omega[0], (basis, y), v), _grads(ref, (basis, y), v), ("basis", "y")):
        torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-7, msg=f"gradient w.r.t. {name}")


def test_hard_constraint_regularization_closed_form():
    x = torch.linspace(0, 1, 4)
    basis = _poly_basis(x, N=6)  # more basis functions than points: needs regularization
    y = (1 + x).requires_grad_()
    with pytest.raises(ValueError, match="regularization"):
        HardConstraint(lambda u, y: u - y)(basis, y)
    gamma = 1e-2
    omega = HardConstraint(lambda u, y: u - y, regularization=gamma)(basis, y)[0]
    ref = torch.linalg.solve(basis.T @ basis + gamma * torch.eye(6), basis.T @ y)
    torch.testing.assert_close(omega, ref, atol=1e-8, rtol=1e-7)
    torch.testing.assert_close(_grads(omega, (y,))[0], _grads(ref, (y,))[0], atol=1e-7, rtol=1e-6)


def test_hard_constraint_moe_equals_independent_experts_and_blocks_cross_gradients():
    x = torch.linspace(0, 1, 17)
    experts = BoxPartition([0.0], [1.0], [3])(x[:, None])
    assert len(set(torch.bincount(experts).tolist())) > 1  # uneven experts: padded and masked
    basis = _poly_basis(x).requires_grad_()
    y = torch.where(x < 0.5, torch.cos(3 * x), x**2 - 1).requires_grad_()
    layer = HardConstraintMoE(lambda u, y: u - y, experts)
    omega = layer(basis, y)
    assert omega.shape == (3, 3) and layer.last_info.converged.all()
    (gy0,) = torch.autograd.grad(omega[0].sum(), y, retain_graph=True)
    assert gy0[experts != 0].abs().max() == 0  # expert 0 does not see the points of the others
    single = HardConstraint(lambda u, y: u - y)
    for k in range(3):
        idx = (experts == k).nonzero().reshape(-1)
        yk = y.detach()[idx].clone().requires_grad_()
        omega_k = single(basis.detach()[idx], yk)[0]
        torch.testing.assert_close(omega[k], omega_k, atol=1e-9, rtol=1e-8)
        (gk,) = torch.autograd.grad(omega[k].sum(), y, retain_graph=True)
        torch.testing.assert_close(gk[idx], torch.autograd.grad(omega_k.sum(), yk)[0], atol=1e-8, rtol=1e-7)


def test_hard_constraint_nonlinear_residual_gradient_matches_finite_differences():
    """A pointwise nonlinear constraint u^3 + u = f at each point, u in a cubic basis."""
    x = torch.linspace(-1, 1, 8)
    basis = _poly_basis(x, N=4)
    f = (1 + 0.5 * x).requires_grad_()
    residual = lambda u, f: u**3 + u - f
    layer = HardConstraint(residual, solver=GaussNewton())
    omega = layer(basis, f)[0]
    u = basis @ omega
    assert (u**3 + u - f).abs().max() < 0.1  # a least-squares fit in a 4-dim space
    v = torch.tensor([0.5, -1.0, 2.0, 1.0])
    (g,) = torch.autograd.grad(omega @ v, f)
    eps = 1e-6
    fd = torch.empty_like(f)
    with torch.no_grad():
        for i in range(len(f)):
            e = torch.zeros_like(f)
            e[i] = eps
            fd[i] = (layer(basis, f + e)[0] - layer(basis, f - e)[0]) @ v / (2 * eps)
    torch.testing.assert_close(g, fd, atol=1e-6, rtol=1e-5)


def test_hard_constraint_moe_module_residual_coefficient_trains():
    """A learnable PDE-like coefficient: residual u - c * g(x); fit c so that u matches data."""

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Parameter(torch.tensor(0.2))

        def forward(self, u, source):
            return u - self.c * source

    x = torch.linspace(0, 1, 12)
    experts = BoxPartition([0.0], [1.0], [3])(x[:, None])
    basis = _poly_basis(x)
    source = torch.exp(x)
    layer = HardConstraintMoE(Residual(), experts)
    target = 1.5 * torch.exp(x)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        omega = layer(basis, source)
        u = layer.fields(omega, basis)
        loss = ((u - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.1 * losses[0]
    assert abs(float(layer.residual.c.detach()) - 1.5) < 0.2


def test_hard_constraint_nonconvergence_warns_or_raises_in_strict_mode():
    x = torch.linspace(-1, 1, 8)
    basis, f = _poly_basis(x, N=4), 1 + 0.5 * x
    residual = lambda u, f: u**3 + u - f
    with pytest.warns(ConvergenceWarning, match="expert"):
        HardConstraint(residual, solver=GaussNewton(maxiter=1))(basis, f)
    with pytest.raises(BilevelError, match="did not converge"):
        HardConstraint(residual, solver=GaussNewton(maxiter=1), strict=True)(basis, f)


def test_hard_constraint_float32_dtype_preserved():
    x = torch.linspace(-1, 1, 10, dtype=torch.float32)
    basis = _poly_basis(x).requires_grad_()
    y = torch.cos(x).requires_grad_()
    omega = HardConstraint(lambda u, y: u - y)(basis, y)
    assert omega.dtype == torch.float32
    ref = torch.linalg.solve(basis.double().T @ basis.double(), basis.double().T @ y.double())
    torch.testing.assert_close(omega[0].double(), ref.detach(), atol=1e-4, rtol=1e-4)
    gb, gy = _grads(omega, (basis, y))
    assert gb.dtype == torch.float32 and gy.dtype == torch.float32


# =========================================================================== devices


@pytest.mark.gpu
@needs_cuda
def test_layers_keep_the_cuda_device_and_dtype():
    dev = torch.device("cuda")
    for dtype in (torch.float32, torch.float64):
        Q, q, A, b, G, h = (t.to(dev, dtype) for t in random_qp(seed=40, batch=(3,)))
        h.requires_grad_()
        z = qp_solve(Q, q, A, b, G, h)
        assert z.device.type == "cuda" and z.dtype == dtype
        (gh,) = torch.autograd.grad(z.sum(), h)
        assert gh.device.type == "cuda" and gh.dtype == dtype
        cpu = qp_solve(*(t.detach().cpu().double() for t in (Q, q, A, b, G, h)))
        torch.testing.assert_close(z.detach().cpu().double(), cpu, atol=1e-4 if dtype == torch.float32 else 1e-9, rtol=0)
    a = torch.tensor([1.5, 0.5], device=dev, requires_grad=True)
    b = torch.tensor([100.0, 10.0], device=dev)
    fun = lambda Z, a, b: torch.stack([a - Z[:, 0], b.sqrt() * (Z[:, 1] - Z[:, 0] ** 2)], -1)
    Z = LevenbergMarquardt(batch_dims=1)(fun, torch.zeros(2, 2, device=dev), a, b)
    assert Z.device.type == "cuda"
    torch.testing.assert_close(Z, torch.stack([a, a**2], -1).detach(), atol=1e-7, rtol=0)
    (ga,) = torch.autograd.grad(Z[:, 1].sum(), a)
    torch.testing.assert_close(ga, 2 * a.detach(), atol=1e-6, rtol=0)
    x = torch.linspace(0, 1, 12, device=dev)
    basis = _poly_basis(x).requires_grad_()
    layer = HardConstraintMoE(lambda u, y: u - y, BoxPartition([0.0], [1.0], [2])(x[:, None].cpu())).to(dev)
    omega = layer(basis, torch.sin(x))
    assert omega.device.type == "cuda" and omega.shape == (2, 3)
    assert torch.autograd.grad(omega.sum(), basis)[0].device.type == "cuda"
