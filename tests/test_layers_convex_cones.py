"""ConvexLayer with exponential and power cones: the cone projections, then layers.

The projections are checked against their characterization (Moreau): ``p = Π_K(v)``
if and only if ``p ∈ K``, ``v - p ∈ K°`` and ``<p, v - p> = 0``; their Jacobians
against central differences, in reverse mode, in forward mode and under ``vmap``.
The layers are checked against closed forms, CVXPY's own solve, central differences,
``gradcheck``, cvxpylayers (exponential cones; its diffcp backend has no power
cones) and a loop over the batch.
"""

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_layers_convex import _assert_fd, _direct, _directional_fd
from torch.func import jacfwd, jacrev, vmap

from bilevel.layers import ConvexLayer
from bilevel.layers._cones import (
    _Cones,
    _project_exp,
    _project_exp_dual,
    _project_power,
    _project_power_dual,
    _project_soc,
    _Recent,
)

cp = pytest.importorskip("cvxpy")

# CVXPY's own solve at 1e-12 tolerances (the reference) may stop one digit short of them
pytestmark = pytest.mark.filterwarnings("ignore:Solution may be inaccurate:UserWarning")

TINY = 1e-300


# ----------------------------------------------------------------------------- membership, in logarithms
# (tolerant of rounding where an exponential amplifies it: K's condition r <= s log(t / s) instead of
# s e^(r/s) <= t, and likewise for the polar)


def in_exp(p, tol):
    r, s, t = p.unbind(-1)
    bound = torch.where(s > 0, s * torch.log((t + tol).clamp_min(TINY) / s.clamp_min(TINY)), torch.zeros_like(s))
    return (s >= -tol) & (t >= -tol) & (r <= bound + tol)


def in_exp_polar(d, tol):
    r, s, t = d.unbind(-1)
    bound = torch.where(r > 0, r * (1 + torch.log((-t + tol).clamp_min(TINY) / r.clamp_min(TINY))), torch.zeros_like(r))
    return (r >= -tol) & (t <= tol) & (s <= bound + tol)


def geo(x, alpha):
    return torch.exp((alpha * torch.log(x.clamp_min(TINY))).sum(-1))


def in_power(p, alpha, tol, scale=1.0):
    """Within ``tol`` of the power cone: raising each x_i by tol must lift geo(x) to |z| - tol
    (geo's slope is unbounded near the faces, so the check compares points, not values)."""
    x, z = p[..., :-1], p[..., -1]
    lifted = (x.clamp_min(0) + tol.unsqueeze(-1)) * scale
    return (x >= -tol.unsqueeze(-1)).all(-1) & (geo(lifted, alpha) >= z.abs() - tol)


def in_power_polar(d, alpha, tol):
    return in_power(torch.cat([-d[..., :-1], d[..., -1:]], -1), alpha, tol, scale=1 / alpha)


def assert_moreau(v, p, inside, inside_polar, rtol=1e-12):
    """``p`` is the projection of ``v``: in the cone, ``v - p`` in the polar, orthogonal."""
    scale = torch.linalg.vector_norm(v, dim=-1)
    tol = rtol * scale
    assert torch.isfinite(p).all()
    assert inside(p, tol).all(), v[~inside(p, tol)]
    assert inside_polar(v - p, tol).all(), v[~inside_polar(v - p, tol)]
    assert ((p * (v - p)).sum(-1).abs() <= rtol * scale**2).all()


# ----------------------------------------------------------------------------- points of each region


def exp_points(region, n, seed):
    g = torch.Generator().manual_seed(seed)

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=g)

    if region == "cone":  # s e^(r/s) < t
        r, s = u(-2, 2), u(0.2, 2)
        return torch.stack([r, s, s * torch.exp(r / s) + u(0.1, 1)], -1)
    if region == "polar":  # r e^(s/r - 1) < -t
        r, s = u(0.2, 2), u(-2, 2)
        return torch.stack([r, s, -r * torch.exp(s / r - 1) - u(0.1, 1)], -1)
    if region == "corner":  # r < 0, s < 0: projection (r, 0, max(t, 0))
        t = u(0.1, 2) * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        return torch.stack([u(-2, -0.2), u(-2, -0.2), t], -1)
    # the general case: neither in the cone, nor in the polar, nor in the corner, and not near them
    v = torch.randn(4 * n, 3, generator=g)
    p = _project_exp(v)
    keep = (torch.linalg.vector_norm(p, dim=-1) > 0.1) & (torch.linalg.vector_norm(v - p, dim=-1) > 0.1)
    keep &= ~((v[:, 0] < 0.1) & (v[:, 1] < 0.1))
    return v[keep][:n]


def power_points(region, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    alpha = torch.rand(n, k, generator=g) + 0.2
    alpha = alpha / alpha.sum(-1, keepdim=True)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    frac = 0.2 + 0.6 * torch.rand(n, generator=g)
    x = 0.2 + 2 * torch.rand(n, k, generator=g)
    if region == "cone":
        return torch.cat([x, (sign * frac * geo(x, alpha)).unsqueeze(-1)], -1), alpha
    if region == "polar":
        return torch.cat([-x, (sign * frac * geo(x / alpha, alpha)).unsqueeze(-1)], -1), alpha
    v = 1.5 * torch.randn(4 * n, k + 1, generator=g)
    alpha = alpha.repeat(4, 1)
    p = _project_power(v, alpha)
    keep = (torch.linalg.vector_norm(p, dim=-1) > 0.1) & (torch.linalg.vector_norm(v - p, dim=-1) > 0.1)
    keep &= (v[:, -1].abs() > 0.1) & ((p[:, :-1] > 0.05).all(-1))
    return v[keep][:n], alpha[keep][:n]


# ----------------------------------------------------------------------------- the exponential cone


@pytest.mark.parametrize("region", ["cone", "polar", "corner", "general"])
def test_exp_projection_is_the_projection(region):
    v = exp_points(region, 200, seed=1)
    assert len(v) > 100
    p = _project_exp(v)
    assert_moreau(v, p, in_exp, in_exp_polar)
    assert torch.allclose(_project_exp(p), p, rtol=0, atol=1e-13)  # idempotent
    if region == "cone":
        assert torch.equal(p, v)
    elif region == "polar":
        assert torch.equal(p, torch.zeros_like(v))
    elif region == "corner":
        assert torch.equal(p, torch.stack([v[:, 0], torch.zeros(len(v)), v[:, 2].clamp_min(0)], -1))


def test_exp_projection_at_extreme_scales():
    """Entries spread over 1e-6..1e6 and points next to the cone's and polar's faces."""
    g = torch.Generator().manual_seed(2)
    v = torch.randn(20000, 3, generator=g) * torch.exp(3 * torch.randn(20000, 3, generator=g))
    p = _project_exp(v)
    assert_moreau(v, p, in_exp, in_exp_polar, rtol=1e-11)
    rel = torch.linalg.vector_norm(_project_exp(p) - p, dim=-1) / torch.linalg.vector_norm(v, dim=-1)
    assert rel.max() < 1e-11


def test_exp_dual_projection_is_moreau():
    """Π_{K*}(v) lies in K* = -K°, v - Π_{K*}(v) in -K, and the two are orthogonal."""
    v = torch.randn(500, 3, generator=torch.Generator().manual_seed(3))
    q = _project_exp_dual(v)
    tol = 1e-12 * torch.linalg.vector_norm(v, dim=-1)
    assert in_exp_polar(-q, tol).all() and in_exp(q - v, tol).all()
    assert ((q * (q - v)).sum(-1).abs() <= tol).all()


def _fd_jacobian(f, v, eps=1e-6):
    cols = []
    for i in range(v.shape[-1]):
        e = torch.zeros_like(v)
        e[..., i] = eps
        cols.append((f(v + e) - f(v - e)) / (2 * eps))
    return torch.stack(cols, -1)


@pytest.mark.parametrize("region", ["cone", "polar", "corner", "general"])
def test_exp_jacobian_is_exact_in_every_mode(region):
    v = exp_points(region, 12, seed=4)
    fd = _fd_jacobian(_project_exp, v)
    rev = torch.stack([torch.autograd.functional.jacobian(_project_exp, vi) for vi in v])
    fwd = vmap(jacfwd(_project_exp))(v)
    assert torch.isfinite(rev).all() and torch.isfinite(fwd).all()
    assert torch.allclose(rev, fd, atol=1e-7), (rev - fd).abs().max()
    assert torch.allclose(fwd, rev, atol=1e-12)
    if region == "general":  # a nontrivial derivative, not that of a face
        assert (fd - torch.eye(3)).abs().amax((-2, -1)).min() > 1e-2 and fd.abs().amax((-2, -1)).min() > 1e-2


def test_exp_gradients_stay_finite_everywhere():
    """The branches not taken must not leak NaN or inf into gradients (double-where)."""
    g = torch.Generator().manual_seed(5)
    v = (torch.randn(3000, 3, generator=g) * torch.exp(2 * torch.randn(3000, 1, generator=g))).requires_grad_()
    (grad,) = torch.autograd.grad((_project_exp_dual(v) * torch.randn(3000, 3, generator=g)).sum(), v)
    assert torch.isfinite(grad).all()
    jac = vmap(jacfwd(_project_exp_dual))(v.detach()[:300])
    assert torch.isfinite(jac).all()


def test_exp_projection_float32():
    v = torch.cat([exp_points(r, 30, seed=6) for r in ("cone", "polar", "corner", "general")])
    p32 = _project_exp(v.float())
    assert p32.dtype == torch.float32
    assert torch.allclose(p32.double(), _project_exp(v), atol=1e-5)
    jac = vmap(jacfwd(_project_exp))(v.float())
    assert torch.allclose(jac.double(), vmap(jacfwd(_project_exp))(v), atol=1e-3)


# ----------------------------------------------------------------------------- the power cone


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("region", ["cone", "polar", "general"])
def test_power_projection_is_the_projection(region, k):
    v, alpha = power_points(region, 200, k, seed=7)
    assert len(v) > 100
    p = _project_power(v, alpha)
    assert_moreau(v, p, lambda q, tol: in_power(q, alpha, tol), lambda d, tol: in_power_polar(d, alpha, tol))
    assert torch.allclose(_project_power(p, alpha), p, rtol=0, atol=1e-13)
    if region == "cone":
        assert torch.equal(p, v)
    elif region == "polar":
        assert torch.equal(p, torch.zeros_like(v))


def test_power_projection_flat_and_extreme_points():
    g = torch.Generator().manual_seed(8)
    alpha = torch.tensor([[0.3, 0.7]]).expand(4, 2)
    flat = torch.tensor([[1.0, -2.0, 0.0], [-1.0, 3.0, 0.0], [0.5, 0.0, 0.0], [-1.0, -1.0, 0.0]])
    expected = torch.cat([flat[:, :2].clamp_min(0), torch.zeros(4, 1)], -1)
    assert torch.equal(_project_power(flat, alpha), expected)
    v = torch.randn(20000, 4, generator=g) * torch.exp(3 * torch.randn(20000, 4, generator=g))
    a = torch.rand(20000, 3, generator=g) + 0.05
    a = a / a.sum(-1, keepdim=True)
    p = _project_power(v, a)
    assert torch.isfinite(p).all()
    scale = torch.linalg.vector_norm(v, dim=-1)
    assert ((p * (v - p)).sum(-1).abs() <= 1e-12 * scale**2).all()
    assert in_power(p, a, 1e-12 * scale).all()
    assert (torch.linalg.vector_norm(_project_power(p, a) - p, dim=-1) <= 1e-11 * scale).all()


def test_power_dual_projection_is_moreau():
    g = torch.Generator().manual_seed(9)
    v = torch.randn(500, 3, generator=g)
    alpha = torch.tensor([0.25, 0.75]).expand(500, 2)
    q = _project_power_dual(v, alpha)
    tol = 1e-12 * torch.linalg.vector_norm(v, dim=-1)
    assert in_power_polar(-q, alpha, tol).all() and in_power(q - v, alpha, tol).all()
    assert ((q * (q - v)).sum(-1).abs() <= tol).all()


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("region", ["cone", "polar", "general"])
def test_power_jacobian_is_exact_in_every_mode(region, k):
    v, alpha = power_points(region, 12, k, seed=10)
    fd = _fd_jacobian(lambda x: _project_power(x, alpha), v)
    rev = torch.stack([torch.autograd.functional.jacobian(lambda x, a=a: _project_power(x, a), x)
                       for x, a in zip(v, alpha)])
    fwd = vmap(jacfwd(_project_power))(v, alpha)
    assert torch.isfinite(rev).all() and torch.isfinite(fwd).all()
    assert torch.allclose(rev, fd, atol=1e-7), (rev - fd).abs().max()
    assert torch.allclose(fwd, rev, atol=1e-12)
    if region == "general":
        eye = torch.eye(k + 1)
        assert (fd - eye).abs().amax((-2, -1)).min() > 1e-2 and fd.abs().amax((-2, -1)).min() > 1e-2


def test_power_gradients_stay_finite_and_float32():
    g = torch.Generator().manual_seed(11)
    v = torch.randn(3000, 3, generator=g) * torch.exp(2 * torch.randn(3000, 1, generator=g))
    v[:100, -1] = 0.0  # the flat case
    alpha = torch.tensor([0.4, 0.6]).expand(3000, 2)
    vg = v.clone().requires_grad_()
    (grad,) = torch.autograd.grad((_project_power_dual(vg, alpha) * torch.randn(3000, 3, generator=g)).sum(), vg)
    assert torch.isfinite(grad).all()
    assert torch.isfinite(vmap(jacfwd(_project_power_dual))(v[:300], alpha[:300])).all()
    w, a = power_points("general", 50, 2, seed=12)
    p32 = _project_power(w.float(), a.float())
    assert p32.dtype == torch.float32 and torch.allclose(p32.double(), _project_power(w, a), atol=1e-5)


# ----------------------------------------------------------------------------- both cones: Jacobians, transforms


def test_jacobians_are_those_of_projections():
    """The Jacobian of a projection onto a closed convex set, where it exists, is symmetric with
    eigenvalues in [0, 1]: a check of the closed-form blocks at every scale that finite
    differences cannot reach."""
    g = torch.Generator().manual_seed(18)
    scale = torch.exp(2 * torch.randn(5000, 1, generator=g))
    alpha = torch.rand(5000, 3, generator=g) + 0.05
    alpha = alpha / alpha.sum(-1, keepdim=True)
    for jac in (vmap(jacfwd(_project_exp))(torch.randn(5000, 3, generator=g) * scale),
                vmap(jacfwd(_project_power))(torch.randn(5000, 4, generator=g) * scale, alpha)):
        assert torch.isfinite(jac).all()
        size = jac.abs().amax((-2, -1)).clamp_min(1)
        assert ((jac - jac.mT).abs().amax((-2, -1)) <= 1e-10 * size).all()
        eig = torch.linalg.eigvalsh(0.5 * (jac + jac.mT))
        assert eig.min() >= -1e-10 and eig.max() <= 1 + 1e-10


def test_projections_under_every_transform():
    """The projections' vmap rule (batch dim anywhere, weights shared or batched, nested vmap) and
    their reverse mode under vmap give the unbatched results."""
    g = torch.Generator().manual_seed(19)
    v = torch.randn(5, 7, 4, generator=g)
    alpha = torch.rand(7, 3, generator=g) + 0.1
    alpha = alpha / alpha.sum(-1, keepdim=True)
    ref = _project_power(v, alpha.expand(5, 7, 3))
    assert torch.equal(vmap(_project_power, in_dims=(0, None))(v, alpha), ref)
    assert torch.equal(vmap(_project_power, in_dims=(1, 0), out_dims=1)(v, alpha), ref)
    assert torch.equal(vmap(vmap(_project_power), in_dims=(0, None))(v, alpha), ref)
    assert torch.equal(vmap(_project_power, in_dims=(None, 0))(v[0], alpha.expand(5, 7, 3)), ref[0].expand(5, 7, 4))
    w = alpha[:5]  # one weight vector per batch element, shared by its 7 cones
    assert torch.equal(vmap(_project_power)(v, w), _project_power(v, w[:, None].expand(5, 7, 3)))
    x = exp_points("general", 12, seed=20)
    rev = torch.stack([torch.autograd.functional.jacobian(_project_exp, xi) for xi in x])
    assert torch.allclose(vmap(jacrev(_project_exp))(x), rev, rtol=0, atol=1e-14)
    assert torch.allclose(vmap(jacrev(_project_power))(v[0], alpha), vmap(jacfwd(_project_power))(v[0], alpha),
                          rtol=0, atol=1e-14)


def test_recent_projections_are_reused_exactly():
    """A projection with ``recent`` returns, for an input equal to a recent one, the values and
    derivatives of a fresh call, in tensors of its own; another input is computed afresh."""
    recent = _Recent()
    x = exp_points("general", 12, seed=21)
    first = _project_exp(x, recent)
    again = _project_exp(x.clone(), recent)
    assert torch.equal(again, _project_exp(x)) and again.data_ptr() != first.data_ptr()
    again.zero_()  # the kept copy is not handed out
    assert torch.equal(vmap(jacfwd(lambda r: _project_exp(r, recent)))(x), vmap(jacfwd(_project_exp))(x))
    y = x.clone()
    y[0, 0] += 1e-3
    assert torch.equal(_project_exp(y, recent), _project_exp(y))
    v, alpha = power_points("general", 12, 3, seed=22)
    _project_power(v, alpha, recent)
    assert torch.equal(_project_power(v, alpha, recent), _project_power(v, alpha))
    assert torch.equal(_project_power(v, alpha.flip(-1), recent), _project_power(v, alpha.flip(-1)))


# ----------------------------------------------------------------------------- the product cone


def test_cones_project_each_block_in_cvxpy_order():
    dims = SimpleNamespace(zero=1, nonneg=2, soc=[3], psd=[], exp=2, p3d=[0.3, 0.6], pnd=[[0.2, 0.3, 0.5], [0.5, 0.5]])
    cones = _Cones(dims, rows=1 + 2 + 3 + 6 + 6 + 4 + 3)
    assert cones.size == 25 and not cones.polyhedral
    v = torch.randn(25, generator=torch.Generator().manual_seed(13))
    out = cones.project_dual(v)
    expected = torch.cat([
        v[:1], v[1:3].clamp_min(0), _project_soc(v[3:6]),
        _project_exp_dual(v[6:12].reshape(2, 3)).reshape(-1),
        _project_power_dual(v[12:15], torch.tensor([0.3, 0.7])),
        _project_power_dual(v[15:18], torch.tensor([0.6, 0.4])),
        _project_power_dual(v[18:22], torch.tensor([0.2, 0.3, 0.5])),
        _project_power_dual(v[22:25], torch.tensor([0.5, 0.5])),
    ])
    assert torch.allclose(out, expected, atol=1e-15)
    assert torch.allclose(vmap(cones.project_dual)(v.expand(2, 25)), out.expand(2, 25), atol=1e-15)


def test_an_unknown_cone_is_refused():
    dims = SimpleNamespace(zero=1, nonneg=2, soc=[], psd=[], exp=0, p3d=[], pnd=[])
    with pytest.raises(NotImplementedError, match="has 7 cone rows .* account for 3 .* cannot project onto"):
        _Cones(dims, rows=7)


# ----------------------------------------------------------------------------- layers with exponential cones


def softmax_problem(n=4):
    x, theta = cp.Variable(n), cp.Parameter(n)
    return cp.Problem(cp.Minimize(-theta @ x - cp.sum(cp.entr(x))), [cp.sum(x) == 1]), [theta], [x]


def barrier_problem(n=3):
    x, y, mu = cp.Variable(n), cp.Parameter(n), cp.Parameter(nonneg=True)
    return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x - y) - mu * cp.sum(cp.log(x)))), [y, mu], [x]


def lse_problem(n=4):
    x, y, q = cp.Variable(n), cp.Parameter(n), cp.Parameter(n, pos=True)
    objective = cp.log_sum_exp(x) + 0.5 * cp.sum_squares(x - y) + cp.sum(cp.kl_div(q, x + 2))
    return cp.Problem(cp.Minimize(objective)), [y, q], [x]


def test_softmax_layer_closed_form_and_cvxpy():
    problem, params, variables = softmax_problem()
    layer = ConvexLayer(problem, params, variables)
    assert layer.method == "conic" and layer.cones.exp == 4
    theta = torch.tensor([0.3, -1.2, 2.0, 0.5], requires_grad=True)
    (x,) = layer(theta)
    s = torch.softmax(theta.detach(), 0)
    assert torch.allclose(x, s, atol=1e-12)
    assert torch.allclose(x, _direct(problem, params, variables, [theta])[0], atol=1e-8)
    jac = torch.autograd.functional.jacobian(lambda t: layer(t)[0], theta.detach())
    assert torch.allclose(jac, torch.diag(s) - torch.outer(s, s), atol=1e-10)


def test_barrier_layer_closed_form_and_finite_differences():
    problem, params, variables = barrier_problem()
    layer = ConvexLayer(problem, params, variables)
    y = torch.tensor([0.7, -1.5, 0.1], requires_grad=True)
    mu = torch.tensor(0.3, requires_grad=True)
    (x,) = layer(y, mu)
    root = torch.sqrt(y.detach() ** 2 + 4 * mu.detach())
    assert torch.allclose(x, (y.detach() + root) / 2, atol=1e-12)  # x - y - mu / x = 0
    w = torch.tensor([1.0, -2.0, 0.5])
    gy, gmu = torch.autograd.grad((x * w).sum(), (y, mu))
    assert torch.allclose(gy, w * (1 + y.detach() / root) / 2, atol=1e-10)
    assert torch.allclose(gmu, (w / root).sum(), atol=1e-10)
    _assert_fd(_directional_fd(layer, [y.detach(), mu.detach()]), rtol=1e-6, atol=1e-8)


def test_log_sum_exp_kl_layer_matches_cvxpy_and_finite_differences():
    problem, params, variables = lse_problem()
    layer = ConvexLayer(problem, params, variables)
    g = torch.Generator().manual_seed(14)
    values = [torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.5]
    (x,) = layer(*values)
    assert torch.allclose(x, _direct(problem, params, variables, values)[0], atol=1e-8)
    _assert_fd(_directional_fd(layer, values), rtol=1e-6, atol=1e-8)


def assert_agrees_with_cvxpylayers(ours, values, theirs, weights, grad_atol, grad_rtol):
    """Our solution ``ours`` (a function of ``values``) against ``theirs()``, cvxpylayers' solve of
    the same problem: the solutions to 1e-7, and the gradients of ``<solution, weights>``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy-2 deprecations inside cvxpylayers / diffcp
        solution = theirs()
        g_theirs = torch.autograd.grad((solution * weights).sum(), values)
    assert torch.allclose(ours, solution, atol=1e-7)
    g_ours = torch.autograd.grad((ours * weights).sum(), values)
    for a, b in zip(g_ours, g_theirs):
        assert torch.allclose(a, b, atol=grad_atol, rtol=grad_rtol)


def test_exp_layers_agree_with_cvxpylayers():
    cvxpylayers_torch = pytest.importorskip("cvxpylayers.torch", reason="cvxpylayers is not installed")
    g = torch.Generator().manual_seed(15)
    for problem, params, variables in (softmax_problem(), lse_problem()):
        values = [torch.randn(2, 4, generator=g)] + [torch.rand(4, generator=g) + 0.5 for _ in params[1:]]
        values = [v.requires_grad_() for v in values]
        ours = ConvexLayer(problem, params, variables)(*values)[0]
        assert_agrees_with_cvxpylayers(
            ours, values, lambda: cvxpylayers_torch.CvxpyLayer(problem, params, variables)(
                *values, solver_args={"eps": 1e-12, "max_iters": 100000})[0],
            torch.randn(ours.shape, generator=g), grad_atol=1e-5, grad_rtol=1e-5)


def test_power_layer_forward_agrees_with_cvxpylayers():
    """cvxpylayers solves power-cone problems (SCS) but cannot differentiate them (diffcp has no
    power cones): compare the solutions only."""
    cvxpylayers_torch = pytest.importorskip("cvxpylayers.torch", reason="cvxpylayers is not installed")
    problem, params, variables = cube_problem()
    y = torch.tensor([[1.3, -0.4, 2.2], [-0.7, 0.2, 0.9]])
    ours = ConvexLayer(problem, params, variables)(y)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = cvxpylayers_torch.CvxpyLayer(problem, params, variables)(
            y, solver_args={"eps": 1e-12, "max_iters": 100000})[0]
    assert torch.allclose(ours, theirs, atol=1e-7)


# ----------------------------------------------------------------------------- layers with power cones


def geo_mean_problem(weights=(1.0, 2.0, 3.0)):
    x, c = cp.Variable(len(weights)), cp.Parameter(len(weights), pos=True)
    return cp.Problem(cp.Maximize(cp.geo_mean(x, p=list(weights), approx=False)), [c @ x <= 1]), [c], [x]


def cube_problem(n=3):
    x, y = cp.Variable(n), cp.Parameter(n)
    return cp.Problem(cp.Minimize(cp.sum(cp.power(cp.abs(x), 3, approx=False)) / 3 - y @ x)), [y], [x]


def pnorm_problem(n=3):
    x, y, lam = cp.Variable(n), cp.Parameter(n), cp.Parameter(nonneg=True)
    objective = 0.5 * cp.sum_squares(x - y) + lam * cp.pnorm(x, 3, approx=False)
    return cp.Problem(cp.Minimize(objective), [cp.sum(x) >= -1]), [y, lam], [x]


def test_geo_mean_layer_closed_form():
    """max prod x_i^(w_i) s.t. c'x <= 1 (an n-d power cone): x_i = w_i / c_i."""
    problem, params, variables = geo_mean_problem()
    layer = ConvexLayer(problem, params, variables)
    assert layer.cones.power == [[1 / 6, 1 / 3, 1 / 2]]
    c = torch.tensor([0.8, 1.7, 0.6], requires_grad=True)
    w = torch.tensor([1.0, 2.0, 3.0]) / 6
    (x,) = layer(c)
    assert torch.allclose(x, w / c.detach(), atol=1e-12)
    assert torch.allclose(x, _direct(problem, params, variables, [c])[0], atol=1e-8)
    jac = torch.autograd.functional.jacobian(lambda t: layer(t)[0], c.detach())
    assert torch.allclose(jac, torch.diag(-w / c.detach() ** 2), atol=1e-10)


def test_cube_layer_closed_form():
    """min sum |x|^3 / 3 - y'x (3-d power cones): x = sign(y) sqrt|y|."""
    problem, params, variables = cube_problem()
    layer = ConvexLayer(problem, params, variables)
    assert len(layer.cones.power) == 3 and layer.cones.exp == 0
    y = torch.tensor([1.3, -0.4, 2.2])
    (x,) = layer(y)
    assert torch.allclose(x, torch.sign(y) * y.abs().sqrt(), atol=1e-12)
    jac = torch.autograd.functional.jacobian(lambda t: layer(t)[0], y)
    assert torch.allclose(jac, torch.diag(0.5 / y.abs().sqrt()), atol=1e-10)


def test_pnorm_layer_matches_cvxpy_and_finite_differences():
    problem, params, variables = pnorm_problem()
    layer = ConvexLayer(problem, params, variables)
    values = [torch.tensor([0.9, -0.3, 1.4]), torch.tensor(0.7)]
    (x,) = layer(*values)
    assert torch.allclose(x, _direct(problem, params, variables, values)[0], atol=1e-8)
    assert x.abs().min() > 1e-3  # away from the kinks of the norm
    _assert_fd(_directional_fd(layer, values), rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- batching, gradcheck, float32


@pytest.mark.parametrize("make", [lse_problem, pnorm_problem])
def test_batched_equals_loop(make):
    problem, params, variables = make()
    layer = ConvexLayer(problem, params, variables)
    g = torch.Generator().manual_seed(16)
    values = [torch.randn(3, 3 if make is pnorm_problem else 4, generator=g).requires_grad_(),
              (torch.tensor(0.5) if make is pnorm_problem else torch.rand(4, generator=g) + 0.5).requires_grad_()]
    (x,) = layer(*values)
    w = torch.randn(x.shape, generator=g)
    gb, gs = torch.autograd.grad((x * w).sum(), values)
    shared = torch.zeros_like(values[1])
    for i in range(3):
        one = [values[0][i].detach().requires_grad_(), values[1].detach().requires_grad_()]
        (xi,) = layer(*one)
        assert torch.allclose(xi, x[i].detach(), atol=1e-10)
        g0, g1 = torch.autograd.grad((xi * w[i]).sum(), one)
        assert torch.allclose(gb[i], g0, atol=1e-9)
        shared += g1
    assert torch.allclose(gs, shared, atol=1e-9)


def test_gradcheck_exp_and_power_layers():
    problem, params, variables = softmax_problem(3)
    layer = ConvexLayer(problem, params, variables)
    theta = torch.tensor([0.2, -0.5, 1.0], requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t)[0], (theta,), eps=1e-6, atol=1e-7)
    problem, params, variables = pnorm_problem(2)
    layer = ConvexLayer(problem, params, variables)
    inputs = (torch.tensor([0.8, -0.6], requires_grad=True), torch.tensor(0.4, requires_grad=True))
    assert torch.autograd.gradcheck(lambda *v: layer(*v)[0], inputs, eps=1e-6, atol=1e-7)


def test_float32_layers():
    problem, params, variables = softmax_problem()
    theta = torch.tensor([0.3, -1.2, 2.0, 0.5], dtype=torch.float32, requires_grad=True)
    (x,) = ConvexLayer(problem, params, variables)(theta)
    assert x.dtype == torch.float32 and torch.allclose(x, torch.softmax(theta, 0), atol=1e-6)
    (g,) = torch.autograd.grad(x[0], theta)
    s = torch.softmax(theta.detach(), 0)
    assert torch.allclose(g, s[0] * (torch.eye(4, dtype=torch.float32)[0] - s), atol=1e-5)
    problem, params, variables = cube_problem()
    (x,) = ConvexLayer(problem, params, variables)(torch.tensor([1.3, -0.4, 2.2], dtype=torch.float32))
    assert x.dtype == torch.float32 and torch.allclose(x, torch.tensor([1.3, -0.4, 2.2]).float().sign()
                                                       * torch.tensor([1.3, 0.4, 2.2]).float().sqrt(), atol=1e-5)


def test_qp_method_is_refused_for_exp_and_power_cones():
    for problem, params, variables in (softmax_problem(), cube_problem()):
        with pytest.raises(NotImplementedError, match="exponential or power cones"):
            ConvexLayer(problem, params, variables, method="qp")


@pytest.mark.parametrize("make", [lse_problem, cube_problem, geo_mean_problem])
def test_clarabel_slack_and_dual_are_laid_out_as_read(make):
    """The layout _Cones reads is Clarabel's: its slack s lies in K and its dual z in K*, cone by
    cone in the order and coordinates read, so that Π_{K*}(z - s) = z (to the solver's accuracy)."""
    problem, params, _ = make()
    g = np.random.default_rng(17)
    for p in params:
        p.value = g.uniform(0.5, 1.5, p.shape)
    data, chain, _ = problem.get_problem_data(cp.CLARABEL)
    for p in params:
        p.value = None
    tight = {"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12}
    sol = chain.solver.solve_via_data(data, False, False, tight)
    cones = _Cones(data["dims"], rows=data["A"].shape[0])
    s, z = torch.as_tensor(np.asarray(sol.s)), torch.as_tensor(np.asarray(sol.z))
    assert cones.exp + len(cones.power) > 0
    if cones.exp:
        blk = slice(cones.exp_start, cones.power_start)
        s3, z3 = s[blk].reshape(-1, 3), z[blk].reshape(-1, 3)
        tol = torch.full((cones.exp,), 1e-7)
        assert in_exp(s3, tol).all() and in_exp_polar(-z3, tol).all()
    power_s, power_z = s[cones.power_start:], z[cones.power_start:]
    for index, alpha in cones.power_groups:
        alpha, tol = torch.as_tensor(alpha), torch.full((len(index),), 1e-7)
        idx = torch.as_tensor(index)
        assert in_power(power_s[idx], alpha, tol).all() and in_power_polar(-power_z[idx], alpha, tol).all()
    assert torch.allclose(cones.project_dual(z - s), z, atol=1e-5)
