"""Acceptance tests: scaling, conditioning and size changes that real users hit.

Every scenario is written against the public API (``bilevel.hypergrad``,
``bilevel.custom_root``, ``bilevel.custom_fixed_point``, the linear solvers of
``bilevel.implicit`` and ``bilevel.solve``) and checked against a closed form, a
dense ``torch.linalg.solve`` reference or finite differences, in float64 unless the
test is about float32:

* invariance: rescaling the inner objective, the outer objective, the units of
  ``x`` or ``y``, or a residual by a constant changes neither the hypergradient
  (beyond rounding) nor the certificate, and triggers no warning;
* conditioning: the default solves are accurate or warn with the residual, never
  silently wrong, in float64 and in float32;
* sizes: 0-d, one-element and empty solutions, 20 000 unknowns (matrix-free),
  pytrees whose leaves have very different scales;
* magnitudes: tiny and huge hyper-parameters, an exactly zero outer gradient, an
  inexact inner solution whose error must be reported and scale with the inexactness;
* batches: ``torch.func.vmap`` over ``hypergrad`` and ``custom_root(batch_dims=1)``
  with elements of very different scales and conditioning;
* ``bilevel.solve`` on problem Q with the objectives rescaled.

Tests marked ``xfail(strict=True)`` document library bugs found by these scenarios;
each reason names the symptom.
"""

from __future__ import annotations

import itertools
import math
import resource
import time
import warnings

import pytest
import torch
from torch.func import grad, jacfwd, jacrev, vmap

import bilevel
from bilevel.implicit import (
    CG,
    GMRES,
    MINRES,
    Auto,
    BiCGStab,
    Direct,
    Neumann,
    NormalCG,
    stationarity,
)
from bilevel.status import (
    BilevelError,
    BilevelWarning,
    ConvergenceWarning,
    CurvatureWarning,
    OptimalityWarning,
)

D = torch.float64
F32 = torch.float32


# ------------------------------------------------------------------------- helpers


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, dtype=D):
    return torch.randn(*shape, generator=_gen(seed), dtype=D).to(dtype)


def _rel(a, b):
    """Relative error ||a - b|| / ||b||, safe for tiny or huge ``b`` (no underflow in the norms)."""
    a, b = a.double(), b.double()
    s = b.abs().max().clamp_min(1e-300)
    return float(((a - b) / s).norm() / (b / s).norm().clamp_min(1e-300))


class _Record:
    """Collects the warnings of bilevel raised inside the block."""

    def __enter__(self):
        self._cm = warnings.catch_warnings(record=True)
        self.records = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)

    @property
    def bilevel(self):
        return [w for w in self.records if issubclass(w.category, BilevelWarning)]

    def categories(self):
        return {w.category for w in self.bilevel}

    def messages(self):
        return [str(w.message) for w in self.bilevel]


def _spd(d, cond, seed=0, dtype=D):
    """A random symmetric positive-definite matrix with eigenvalues log-spaced in [1, cond]."""
    Q, _ = torch.linalg.qr(_randn(d, d, seed=seed))
    ev = torch.logspace(0, math.log10(cond), d, dtype=D)
    return ((Q * ev) @ Q.T).to(dtype)


class _Quad:
    """Problem Q of ALGORITHMS.md: f = 1/2 y'Ay - y'Bx, F = 1/2 ||y - t||^2 (+ rho/2 ||x||^2)."""

    def __init__(self, d=6, m=3, cond=None, seed=0, rho=0.0):
        if cond is None:
            M = _randn(d, d, seed=seed)
            self.A = M @ M.T / d + torch.eye(d, dtype=D)
        else:
            self.A = _spd(d, cond, seed=seed)
        self.B = _randn(d, m, seed=seed + 1)
        self.t = _randn(d, seed=seed + 2)
        self.x = _randn(m, seed=seed + 3)
        self.rho = rho

    def y(self, x=None):
        x = self.x if x is None else x
        return torch.linalg.solve(self.A, self.B @ x)

    def grad(self, x=None):
        x = self.x if x is None else x
        return self.B.T @ torch.linalg.solve(self.A, self.y(x) - self.t) + self.rho * x

    def objectives(self, inner_scale=1.0, outer_scale=1.0, dtype=D):
        A, B, t = (z.to(dtype) for z in (self.A, self.B, self.t))
        rho = self.rho

        def inner(x, y):
            return inner_scale * (0.5 * y @ A @ y - y @ B @ x)

        def outer(x, y):
            return outer_scale * (0.5 * ((y - t) ** 2).sum() + 0.5 * rho * (x**2).sum())

        return outer, inner


# ------------------------------------------------------- invariance under rescaling


@pytest.mark.parametrize("d", [6, 300], ids=["dense", "krylov"])
@pytest.mark.parametrize("scale", [1e-8, 1e8])
def test_inner_objective_rescaled_leaves_hypergradient_and_certificate_unchanged(scale, d):
    q = _Quad(d=d, seed=1)
    outer, inner = q.objectives()
    _, inner_s = q.objectives(inner_scale=scale)
    y = q.y()
    g1, info1 = bilevel.hypergrad(outer, inner, q.x, y, return_info=True)
    with _Record() as rec:
        gs, infos = bilevel.hypergrad(outer, inner_s, q.x, y, return_info=True)
    assert rec.bilevel == []
    assert infos.ok and info1.ok
    # the Krylov path stops at a relative residual of sqrt(eps): compare at that level
    tol = 1e-12 if d <= 128 else 1e-6
    assert _rel(gs, q.grad()) < tol
    assert _rel(gs, g1) < tol
    # the certificate's distance to the root is scale-free
    assert float(infos.distance_to_root) <= 1e-10 * max(1.0, float(y.norm()))


@pytest.mark.parametrize("scale", [1e-8, 1e8])
def test_outer_objective_rescaled_scales_hypergradient_linearly(scale):
    q = _Quad(d=8, seed=2)
    outer, inner = q.objectives()
    outer_s, _ = q.objectives(outer_scale=scale)
    g1 = bilevel.hypergrad(outer, inner, q.x, q.y())
    with _Record() as rec:
        gs, info = bilevel.hypergrad(outer_s, inner, q.x, q.y(), return_info=True)
    assert rec.bilevel == [] and info.ok
    torch.testing.assert_close(gs, scale * g1, rtol=1e-13, atol=0)


_SOLVERS = [
    Auto(symmetric=True), CG(), GMRES(), MINRES(), BiCGStab(), NormalCG(),
    Direct(), Direct("lu"), Direct("lstsq"), Neumann(terms=200, alpha=None),
]


@pytest.mark.parametrize("solve", _SOLVERS, ids=lambda s: repr(s).split("(")[0] + getattr(s, "method", ""))
def test_every_linear_solver_is_invariant_to_the_inner_scale(solve):
    q = _Quad(d=20, seed=3)
    outer, _ = q.objectives()
    y, ref = q.y(), q.grad()
    results = []
    for scale in (1e-8, 1.0, 1e8):
        _, inner = q.objectives(inner_scale=scale)
        with _Record() as rec:
            g, info = bilevel.hypergrad(outer, inner, q.x, y, solve=solve, return_info=True)
        assert rec.bilevel == [], (scale, rec.messages())
        assert info.ok
        results.append(g)
    for g in results:
        assert _rel(g, ref) < 1e-7  # the Krylov solvers stop at sqrt(eps) relative residual
        assert _rel(g, results[1]) < 1e-7


def test_neumann_with_fixed_alpha_reports_what_it_did_at_any_scale():
    """Neumann(alpha=1) has no tolerance (documented); at a scale where alpha >= 2/L it
    must say DIVERGED, and where alpha << 1/L its info must show the true residual."""
    q = _Quad(d=20, seed=3)
    outer, _ = q.objectives()
    _, big = q.objectives(inner_scale=1e8)
    with _Record() as rec:
        g, info = bilevel.hypergrad(outer, big, q.x, q.y(), solve=Neumann(terms=50), return_info=True)
    assert ConvergenceWarning in rec.categories() and not info.ok
    assert torch.isfinite(g).all()
    assert "DIVERGED" in " ".join(rec.messages())
    _, small = q.objectives(inner_scale=1e-8)
    _, info = bilevel.hypergrad(outer, small, q.x, q.y(), solve=Neumann(terms=50), return_info=True)
    assert float(info.linear_solve.relative_residual) > 0.5  # no progress at all, and the info says so


@pytest.mark.parametrize("scale", [1e-8, 1e8])
def test_certificate_of_an_inexact_solution_does_not_flip_with_the_inner_scale(scale):
    q = _Quad(d=10, seed=4)
    outer, inner = q.objectives()
    _, inner_s = q.objectives(inner_scale=scale)
    direction = _randn(10, seed=40)
    direction = direction / direction.norm()
    for delta, should_warn in ((1e-2, True), (1e-7, False)):
        y = q.y() + delta * direction
        with _Record() as rec1:
            _, info1 = bilevel.hypergrad(outer, inner, q.x, y, return_info=True)
        with _Record() as recs:
            _, infos = bilevel.hypergrad(outer, inner_s, q.x, y, return_info=True)
        assert (OptimalityWarning in rec1.categories()) == should_warn
        assert (OptimalityWarning in recs.categories()) == should_warn
        assert infos.ok == info1.ok == (not should_warn)
        torch.testing.assert_close(infos.distance_to_root, info1.distance_to_root, rtol=1e-6, atol=0)


@pytest.mark.parametrize("units", [1e-6, 1e6])
def test_y_expressed_in_other_units_gives_the_same_hypergradient(units):
    """y = units * z: the same problem written in other units of the lower variable."""
    q = _Quad(d=8, seed=5)
    A, B, t = q.A, q.B, q.t

    def inner(x, y):
        z = y / units
        return 0.5 * z @ A @ z - z @ B @ x

    def outer(x, y):
        return 0.5 * ((y / units - t) ** 2).sum()

    with _Record() as rec:
        g, info = bilevel.hypergrad(outer, inner, q.x, units * q.y(), return_info=True)
    assert rec.bilevel == [] and info.ok
    assert _rel(g, q.grad()) < 1e-12


def test_large_y_units_keep_the_certificate_relative():
    """For ||y|| >= 1 the optimality tolerance is relative to ||y||: an inexact solution
    (relative error 1e-2) is flagged in units 1 and in units 1e6 alike, and a good one
    (1e-8) in neither."""
    q = _Quad(d=8, seed=6)
    assert float(q.y().norm()) > 1
    A, B, t = q.A, q.B, q.t
    direction = _randn(8, seed=60)
    direction = direction / direction.norm() * q.y().norm()
    for units in (1.0, 1e6):
        def inner(x, y, units=units):
            z = y / units
            return 0.5 * z @ A @ z - z @ B @ x

        def outer(x, y, units=units):
            return 0.5 * ((y / units - t) ** 2).sum()

        for rel, flagged in ((1e-2, True), (1e-8, False)):
            with _Record() as rec:
                _, info = bilevel.hypergrad(outer, inner, q.x, units * (q.y() + rel * direction),
                                            return_info=True)
            assert (OptimalityWarning in rec.categories()) == flagged, (units, rel)
            assert info.ok == (not flagged)


@pytest.mark.parametrize("units", [1e-6, 1e6])
def test_x_expressed_in_other_units_gives_the_rescaled_hypergradient(units):
    q = _Quad(d=8, seed=7)
    A, B, t = q.A, q.B, q.t

    def inner(x, y):
        return 0.5 * y @ A @ y - y @ B @ (x / units)

    def outer(x, y):
        return 0.5 * ((y - t) ** 2).sum()

    with _Record() as rec:
        g, info = bilevel.hypergrad(outer, inner, units * q.x, q.y(), return_info=True)
    assert rec.bilevel == [] and info.ok
    torch.testing.assert_close(g, q.grad() / units, rtol=1e-12, atol=0)


@pytest.mark.parametrize("n", [12, 200], ids=["dense", "krylov"])
@pytest.mark.parametrize("c", [1e-10, 1e10])
def test_custom_root_residual_scaled_by_a_constant(c, n):
    """Stationarity of c * objective (symmetric path) and a plain residual c * (A y - b)
    (non-symmetric path): the same gradient, certificates pass, no warning."""
    A, b = _spd(n, 50.0, seed=8), _randn(n, seed=9)
    cot = _randn(n, seed=10)
    expected = torch.linalg.solve(A, cot)  # d<cot, A^{-1} b>/db

    def objective(y, b):
        return c * (0.5 * y @ A @ y - b @ y)

    def residual(y, b):
        return c * (A @ y - b)

    for condition in (stationarity(objective), residual):
        @bilevel.custom_root(condition)
        def solver(b):
            return torch.linalg.solve(A, b)

        br = b.clone().requires_grad_()
        with _Record() as rec:
            (g,) = torch.autograd.grad(solver(br) @ cot, br)
        assert rec.bilevel == [], rec.messages()
        assert solver.last_info.ok
        assert _rel(g, expected) < (1e-12 if n <= 128 else 1e-6)


@pytest.mark.parametrize("eta", [1e-8, 1e-3, None])
def test_custom_fixed_point_step_size_does_not_change_the_gradient(eta):
    """T(y) = y - eta (A y - b): any eta > 0 has the same fixed point and gradient."""
    A, b = _spd(10, 100.0, seed=11), _randn(10, seed=12)
    eta = 1.0 / 100.0 if eta is None else eta
    cot = _randn(10, seed=13)

    @bilevel.custom_fixed_point(lambda y, b: y - eta * (A @ y - b))
    def solver(b):
        return torch.linalg.solve(A, b)

    with _Record() as rec:
        J = jacrev(solver)(b)
        g = grad(lambda b_: solver(b_) @ cot)(b)
    assert rec.bilevel == []
    torch.testing.assert_close(J, torch.linalg.inv(A), rtol=1e-9, atol=1e-12)
    assert _rel(g, torch.linalg.solve(A, cot)) < 1e-10


# ----------------------------------------------------------------- ill-conditioning


@pytest.mark.parametrize("d", [40, 300], ids=["dense", "krylov"])
@pytest.mark.parametrize("cond", [1e2, 1e4, 1e6, 1e8])
def test_ill_conditioned_default_solve_is_accurate_or_loud(cond, d):
    """Never a silently wrong hypergradient: quiet results are within the documented
    tolerance (relative residual sqrt(eps), so an error of at most ~cond * sqrt(eps))
    and anything else warns naming the residual."""
    q = _Quad(d=d, cond=cond, seed=14)
    outer, inner = q.objectives()
    with _Record() as rec:
        g, info = bilevel.hypergrad(outer, inner, q.x, q.y(), return_info=True)
    assert torch.isfinite(g).all()
    err = _rel(g, q.grad())
    if rec.bilevel:
        assert not info.ok
        assert rec.categories() <= {ConvergenceWarning, CurvatureWarning, OptimalityWarning}
        assert any("relative residual" in m for m in rec.messages())
    else:
        assert info.ok
        assert err <= max(1e-10, 10 * cond * 1.5e-8) and err < 1e-2, err
    if d <= 128:  # the dense solve is exact up to rounding (cond * eps)
        assert rec.bilevel == [] and err < 1e3 * cond * 2.2e-16


def test_ill_conditioned_large_system_with_an_explicit_direct_solve_is_accurate():
    q = _Quad(d=300, cond=1e6, seed=14)
    outer, inner = q.objectives()
    with _Record() as rec:
        g, info = bilevel.hypergrad(outer, inner, q.x, q.y(), solve=Direct(), return_info=True)
    assert rec.bilevel == [] and info.ok
    assert _rel(g, q.grad()) < 1e-8


@pytest.mark.parametrize("d", [30, 250], ids=["dense", "krylov"])
def test_float32_well_conditioned_is_quiet_and_accurate(d):
    q = _Quad(d=d, cond=10.0, seed=15)
    outer, inner = q.objectives(dtype=F32)
    x, y = q.x.to(F32), q.y().to(F32)
    with _Record() as rec:
        g, info = bilevel.hypergrad(outer, inner, x, y, return_info=True)
    assert rec.bilevel == [] and info.ok
    assert g.dtype == F32
    assert _rel(g, q.grad()) < 1e-3

    # the same through custom_root, differentiating with respect to b
    A, cot = q.A.to(F32), _randn(d, seed=16, dtype=F32)

    @bilevel.custom_root(stationarity(lambda y, b: 0.5 * y @ A @ y - b @ y))
    def solver(b):
        return torch.linalg.solve(A, b)

    b = (q.B @ q.x).to(F32).requires_grad_()
    with _Record() as rec:
        (gb,) = torch.autograd.grad(solver(b) @ cot, b)
    assert rec.bilevel == [] and solver.last_info.ok
    assert gb.dtype == F32
    assert _rel(gb, torch.linalg.solve(q.A, cot.double())) < 1e-3


@pytest.mark.parametrize("d", [30, 250], ids=["dense", "krylov"])
def test_float32_badly_conditioned_warns_and_stays_finite(d):
    q = _Quad(d=d, cond=1e8, seed=17)
    outer, inner = q.objectives(dtype=F32)
    x, y = q.x.to(F32), q.y().to(F32)
    with _Record() as rec:
        g, info = bilevel.hypergrad(outer, inner, x, y, return_info=True)
    assert torch.isfinite(g).all()
    assert not info.ok
    assert rec.categories() & {ConvergenceWarning, CurvatureWarning, OptimalityWarning}
    with pytest.raises(BilevelError):
        bilevel.hypergrad(outer, inner, x, y, strict=True)


# ---------------------------------------------------------------------------- sizes


def _scalar_problem():
    # f = 1/2 exp(x) y^2 - y: y* = exp(-x); F = 1/2 (y - 2)^2: dF/dx = -(y* - 2) exp(-x)
    inner = lambda x, y: 0.5 * x.exp() * y**2 - y
    outer = lambda x, y: 0.5 * (y - 2) ** 2
    x = torch.tensor(0.3, dtype=D)
    y = torch.exp(-x)
    return outer, inner, x, y, -(y - 2) * torch.exp(-x)


@pytest.mark.parametrize("solve", [None] + _SOLVERS[1:], ids=lambda s: repr(s).split("(")[0])
def test_zero_dimensional_solution_every_solver(solve):
    outer, inner, x, y, ref = _scalar_problem()
    with _Record() as rec:
        g, info = bilevel.hypergrad(outer, inner, x, y, solve=solve, return_info=True)
    assert rec.bilevel == [] and info.ok
    assert g.shape == ()
    torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-14)


def test_zero_dimensional_custom_root_in_every_mode():
    @bilevel.custom_root(stationarity(lambda y, x: 0.5 * x.exp() * y**2 - y))
    def solver(x):
        return torch.exp(-x)

    x = torch.tensor(0.3, dtype=D)
    ref = -torch.exp(-x)
    torch.testing.assert_close(grad(solver)(x), ref)
    torch.testing.assert_close(jacfwd(solver)(x), ref)
    xs = torch.tensor([1e-6, 0.1, 5.0], dtype=D)
    torch.testing.assert_close(vmap(grad(solver))(xs), -torch.exp(-xs))
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(solver(xr), xr)
    torch.testing.assert_close(g, ref)


def test_one_element_solution():
    outer, inner, x, y, ref = _scalar_problem()
    outer1 = lambda x, y: outer(x[0], y[0])
    inner1 = lambda x, y: inner(x[0], y[0])
    for solve in (None, CG(), MINRES(), Direct()):
        with _Record() as rec:
            g = bilevel.hypergrad(outer1, inner1, x.reshape(1), y.reshape(1), solve=solve)
        assert rec.bilevel == [] and g.shape == (1,)
        torch.testing.assert_close(g, ref.reshape(1), rtol=1e-12, atol=1e-14)


def test_empty_solution_gives_the_direct_gradient():
    x = _randn(3, seed=18)
    g = bilevel.hypergrad(lambda x, y: (x**2).sum() + (y**2).sum(),
                          lambda x, y: (y**2).sum() + (x * y.sum()).sum(), x, torch.zeros(0, dtype=D))
    torch.testing.assert_close(g, 2 * x)


def _diag_plus_rank_one(n, seed=19):
    d = 1 + 9 * torch.rand(n, generator=_gen(seed), dtype=D)
    u = _randn(n, seed=seed + 1) * 3 / math.sqrt(n)

    def solve(b):  # Sherman-Morrison: (diag(d) + u u^T)^{-1} b, O(n)
        db, du = b / d, u / d
        return db - du * (u @ db) / (1 + u @ du)

    return d, u, solve


def test_twenty_thousand_unknowns_matrix_free():
    """H = diag(d) + u u^T with n = 20 000 (a dense H would be 3.2 GB): the default
    solve must stay matrix-free and match the Sherman-Morrison closed form."""
    n = 20_000
    d, u, H_inv = _diag_plus_rank_one(n)
    t, x = _randn(n, seed=21), _randn(n, seed=22)

    def inner(x, y):
        return 0.5 * (d * y * y).sum() + 0.5 * (u @ y) ** 2 - x @ y

    def outer(x, y):
        return 0.5 * ((y - t) ** 2).sum() + 0.5 * (x**2).sum()

    y = H_inv(x)
    expected = x + H_inv(y - t)  # grad_x F - (d2 f/dx dy) v, with d2 f/dx dy = -I
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    for solve in (None, CG(maxiter=200)):
        with _Record() as rec:
            g, info = bilevel.hypergrad(outer, inner, x, y, solve=solve, return_info=True)
        assert rec.bilevel == [] and info.ok
        assert _rel(g, expected) < 1e-7
        assert int(info.linear_solve.iterations) < 200
    assert time.perf_counter() - start < 10
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024  # KiB on Linux
    assert grown_mb < 1000, grown_mb


def test_twenty_thousand_unknowns_custom_root():
    n = 20_000
    d, u, H_inv = _diag_plus_rank_one(n, seed=23)
    cot = _randn(n, seed=24)

    @bilevel.custom_root(stationarity(lambda y, b: 0.5 * (d * y * y).sum() + 0.5 * (u @ y) ** 2 - b @ y))
    def solver(b):
        return H_inv(b)

    b = _randn(n, seed=25).requires_grad_()
    with _Record() as rec:
        (g,) = torch.autograd.grad(solver(b) @ cot, b)
    assert rec.bilevel == [] and solver.last_info.ok
    assert _rel(g, H_inv(cot)) < 1e-7


def _two_leaf_problem(na, nb, sa, sb, seed=26):
    """Problem Q with y = {"a": sa * z[:na], "b": sb * z[na:]}: leaves in different units."""
    q = _Quad(d=na + nb, seed=seed)
    A, B, t = q.A, q.B, q.t

    def unpack(y):
        return torch.cat([y["a"] / sa, y["b"] / sb])

    def inner(x, y):
        z = unpack(y)
        return 0.5 * z @ A @ z - z @ B @ x

    def outer(x, y):
        return 0.5 * ((unpack(y) - t) ** 2).sum()

    z = q.y()
    return q, outer, inner, {"a": sa * z[:na], "b": sb * z[na:]}


@pytest.mark.parametrize("na,nb", [(10, 5), (150, 100)], ids=["dense", "krylov"])
def test_pytree_leaves_of_different_scales(na, nb):
    """Leaves in units 1e-3 and 1e3 (Hessian blocks 1e6 and 1e-6)."""
    q, outer, inner, y = _two_leaf_problem(na, nb, 1e-3, 1e3)
    with _Record() as rec:
        g, info = bilevel.hypergrad(outer, inner, q.x, y, return_info=True)
    assert g.shape == q.x.shape
    err = _rel(g, q.grad())
    if rec.bilevel:
        assert not info.ok
    else:
        assert err < 1e-2, err
    if na + nb <= 128:
        assert rec.bilevel == [] and err < 1e-10


def test_pytree_leaves_of_extreme_scales_default_solve_is_accurate_or_loud():
    """Leaves in units 1e-4 / 1e4 (Hessian blocks 1e8 / 1e-8): the dense Cholesky's
    pivot test runs on the unit-diagonal matrix, so the well-posed system is solved."""
    q, outer, inner, y = _two_leaf_problem(10, 5, 1e-4, 1e4)
    with _Record() as rec:
        g, info = bilevel.hypergrad(outer, inner, q.x, y, return_info=True)
    assert rec.bilevel or not info.ok or _rel(g, q.grad()) < 1e-6, _rel(g, q.grad())


def test_direct_cholesky_on_a_diagonally_scaled_spd_hessian_is_accurate_or_loud():
    """Leaves in units 1e-4 / 1e4 (Hessian blocks 1e8 / 1e-8). Plain Cholesky solves this
    system to rounding; Direct's documented pivot test calls it numerically singular. Either
    is acceptable here as long as a rejected solve is loud and finite."""
    q, outer, inner, y = _two_leaf_problem(10, 5, 1e-4, 1e4)
    with _Record() as rec:
        g, info = bilevel.hypergrad(outer, inner, q.x, y, solve=Direct(), return_info=True)
    assert torch.isfinite(g).all()
    if rec.bilevel:
        assert CurvatureWarning in rec.categories() and not info.ok
    else:
        assert _rel(g, q.grad()) < 1e-10


# ----------------------------------------------------------------------- magnitudes


@pytest.mark.parametrize("magnitude", [1e-6, 1e6])
def test_tiny_and_huge_hyperparameters_ridge_closed_form(magnitude):
    """Per-feature ridge penalty lam (not log-parametrized) of size 1e-6 or 1e6:
    dF/dlam_i = -w_i [H^{-1} X_v^T (X_v w - t_v)]_i."""
    X, t = _randn(80, 6, seed=27), _randn(80, seed=28)
    Xv, tv = _randn(30, 6, seed=29), _randn(30, seed=30)
    lam = magnitude * torch.linspace(0.5, 2.0, 6, dtype=D)
    H = X.T @ X + torch.diag(lam)
    w = torch.linalg.solve(H, X.T @ t)
    expected = -w * torch.linalg.solve(H, Xv.T @ (Xv @ w - tv))

    def inner(lam, w):
        return 0.5 * ((X @ w - t) ** 2).sum() + 0.5 * (lam * w * w).sum()

    def outer(lam, w):
        return 0.5 * ((Xv @ w - tv) ** 2).sum()

    for solve in (None, CG(), MINRES()):
        with _Record() as rec:
            g, info = bilevel.hypergrad(outer, inner, lam, w, solve=solve, return_info=True)
        assert rec.bilevel == [] and info.ok
        assert _rel(g, expected) < 1e-10


@pytest.mark.parametrize("solve", [None] + _SOLVERS[1:] + [Neumann()], ids=lambda s: repr(s).split("(")[0])
def test_exactly_zero_outer_gradient_gives_exactly_zero(solve):
    q = _Quad(d=6, seed=31)
    _, inner = q.objectives()

    def outer(x, y):
        return 0.0 * (y**2).sum() + 0.0 * x.sum()

    with _Record() as rec:
        g, info = bilevel.hypergrad(outer, inner, q.x, q.y(), solve=solve, return_info=True)
    assert rec.bilevel == [] and info.ok
    assert torch.equal(g, torch.zeros_like(q.x))
    # also at a point that is not an inner solution: the gradient is exactly 0 wherever y is
    g = bilevel.hypergrad(outer, inner, q.x, q.y() + 1.0, solve=solve)
    assert torch.equal(g, torch.zeros_like(q.x))


def test_constant_outer_objective_gives_zero_hypergradient():
    q = _Quad(d=6, seed=31)
    _, inner = q.objectives()

    def outer(x, y):
        return torch.tensor(3.0, dtype=D)

    # the differentiable path already does the right thing
    torch.testing.assert_close(bilevel.hypergrad(outer, inner, q.x, q.y(), create_graph=True),
                               torch.zeros_like(q.x))
    g = bilevel.hypergrad(outer, inner, q.x, q.y())
    assert torch.equal(g, torch.zeros_like(q.x))


@pytest.mark.parametrize("scale", [1e-18, 1e18])
def test_float32_tiny_and_huge_outer_objective(scale):
    """float32 with the outer objective scaled by 1e-18 / 1e18 (gradients of size 1e-18 /
    1e18, whose squares under- / overflow): correct, or a clear error; never NaN."""
    q = _Quad(d=200, seed=3)
    outer, inner = q.objectives(outer_scale=scale, dtype=F32)
    try:
        with _Record() as rec:
            g, info = bilevel.hypergrad(outer, inner, q.x.to(F32), q.y().to(F32), return_info=True)
    except FloatingPointError as err:
        assert "overflow" in str(err) or "NaN" in str(err)
        return
    assert torch.isfinite(g).all()
    assert (rec.bilevel and not info.ok) or _rel(g, scale * q.grad()) < 1e-3


def test_float32_tiny_outer_gradient_krylov_solve_is_accurate_or_loud():
    """||grad_y F|| ~ 1e-25 in float32: squared norms would underflow; the Krylov solvers
    iterate on b scaled to unit size (by a power of two), so the solve is as accurate as
    at any scale."""
    q = _Quad(d=200, seed=3)
    outer, inner = q.objectives(outer_scale=1e-25, dtype=F32)
    with _Record() as rec:
        g, info = bilevel.hypergrad(outer, inner, q.x.to(F32), q.y().to(F32), return_info=True)
    assert rec.bilevel or _rel(g, 1e-25 * q.grad()) < 1e-3, (_rel(g, 1e-25 * q.grad()), info)


def _logistic_problem():
    X, lab = _randn(60, 8, seed=32), (torch.rand(60, generator=_gen(33), dtype=D) > 0.5).to(D)
    Xv, labv = _randn(30, 8, seed=34), (torch.rand(30, generator=_gen(35), dtype=D) > 0.5).to(D)
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def inner(lam, w):
        return bce(X @ w, lab, reduction="sum") + 0.5 * (lam.exp() * w * w).sum()

    def outer(lam, w):
        return bce(Xv @ w, labv, reduction="sum")

    def argmin(lam):
        w = torch.zeros(8, dtype=D)
        for _ in range(12):  # Newton, with the closed-form gradient and Hessian
            s = torch.sigmoid(X @ w)
            gradient = X.T @ (s - lab) + lam.exp() * w
            hessian = X.T @ (X * (s * (1 - s)).unsqueeze(-1)) + torch.diag(lam.exp())
            w = w - torch.linalg.solve(hessian, gradient)
        return w

    return inner, outer, argmin


def test_logistic_hypergradient_matches_finite_differences():
    inner, outer, argmin = _logistic_problem()
    lam = torch.linspace(-1, 1, 8, dtype=D)
    g = bilevel.hypergrad(outer, inner, lam, argmin(lam))
    eps = 1e-5
    fd = torch.stack([(outer(lam + eps * e, argmin(lam + eps * e)) - outer(lam - eps * e, argmin(lam - eps * e)))
                      / (2 * eps) for e in torch.eye(8, dtype=D)])
    assert _rel(g, fd) < 1e-7


@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e8])
def test_inexact_inner_solution_error_scales_with_inexactness_and_is_reported(scale):
    inner0, outer, argmin = _logistic_problem()
    inner = lambda lam, w: scale * inner0(lam, w)
    lam = torch.zeros(8, dtype=D)
    w = argmin(lam)
    exact = bilevel.hypergrad(outer, inner, lam, w)
    direction = _randn(8, seed=36)
    direction = direction / direction.norm()
    errors = []
    for delta in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6):
        with _Record() as rec:
            g, info = bilevel.hypergrad(outer, inner, lam, w + delta * direction, return_info=True)
        errors.append(_rel(g, exact))
        distance = float(info.distance_to_root)
        # an estimate of the true distance delta within the curvature spread of the Hessian
        assert delta / 20 < distance < 20 * delta
        tol = info.residual_tol * max(1.0, float((w + delta * direction).norm()))
        assert (OptimalityWarning in rec.categories()) == (distance > tol)
        assert info.ok == (distance <= tol)
    assert (OptimalityWarning in rec.categories()) is False  # delta = 1e-6 passes
    ratios = [a / b for a, b in itertools.pairwise(errors)]
    assert all(7 < r < 13 for r in ratios[1:]), ratios  # first-order in delta
    with pytest.raises(BilevelError):
        bilevel.hypergrad(outer, inner, lam, w + 1e-2 * direction, strict=True)


# -------------------------------------------------------------------------- batches


def _mixed_batch(d=6, scales=(1e-6, 1.0, 1e6, 1e3), conds=(1e1, 1e3, 1e5, 1e7)):
    As = torch.stack([s * _spd(d, c, seed=40 + i) for i, (s, c) in enumerate(zip(scales, conds))])
    Bs = torch.stack([s * _randn(d, 3, seed=50 + i) for i, s in enumerate(scales)])
    ts, xs = _randn(len(scales), d, seed=60), _randn(len(scales), 3, seed=61)
    ys = torch.linalg.solve(As, (Bs @ xs.unsqueeze(-1)).squeeze(-1))
    ref = torch.stack([Bs[i].T @ torch.linalg.solve(As[i], ys[i] - ts[i]) for i in range(len(scales))])
    return As, Bs, ts, xs, ys, ref


def _one_hypergrad(A, B, t, x, y, solve=None):
    return bilevel.hypergrad(lambda x, y: 0.5 * ((y - t) ** 2).sum(),
                             lambda x, y: 0.5 * y @ A @ y - y @ B @ x, x, y, solve=solve, return_info=True)


@pytest.mark.parametrize("solve", [None, CG(), MINRES(), GMRES(), Direct()], ids=lambda s: repr(s).split("(")[0])
def test_vmap_hypergrad_over_elements_of_very_different_scales(solve):
    As, Bs, ts, xs, ys, ref = _mixed_batch()
    with _Record() as rec:
        g, info = vmap(lambda *a: _one_hypergrad(*a, solve=solve), out_dims=(0, None))(As, Bs, ts, xs, ys)
    assert rec.bilevel == []
    assert info.linear_solve.converged.all() and info.optimal.all()
    assert info.linear_solve.status.shape == (4,)
    loop = torch.stack([_one_hypergrad(As[i], Bs[i], ts[i], xs[i], ys[i], solve)[0] for i in range(4)])
    for i in range(4):
        assert _rel(g[i], ref[i]) < 1e-8, i
        assert _rel(g[i], loop[i]) < 1e-8, i


def test_vmap_hypergrad_per_element_convergence():
    """With a CG budget of 3 steps for 6 unknowns, the element of condition number 1 is
    solved in one step and that of condition number 1e7 cannot be: the converged ones
    must be exact, and the failures named, not hidden."""
    As, Bs, ts, xs, ys, ref = _mixed_batch(conds=(1.0, 1e1, 1e5, 1e7))
    with _Record() as rec:
        g, info = vmap(lambda *a: _one_hypergrad(*a, solve=CG(maxiter=3)), out_dims=(0, None))(As, Bs, ts, xs, ys)
    converged = info.linear_solve.converged
    assert bool(converged[0]) and not bool(converged[3])
    for i in range(4):
        if converged[i]:
            assert _rel(g[i], ref[i]) < 1e-8
    failed = [i for i in range(4) if not converged[i]]
    assert ConvergenceWarning in rec.categories()
    assert f"batch elements {failed}" in " ".join(rec.messages())
    assert torch.isfinite(g).all()


def _batched_root(solve, batch_dims=1):
    @bilevel.custom_root(stationarity(lambda y, A, b: 0.5 * y @ A @ y - b @ y), solve=solve,
                         batch_dims=batch_dims)
    def solver(A, b):
        return torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)

    return solver


@pytest.mark.parametrize("solve", [None, CG(), GMRES(), MINRES()], ids=lambda s: repr(s).split("(")[0])
def test_custom_root_batch_dims_elements_of_very_different_scales(solve):
    d = 8
    scales, conds = (1e-6, 1.0, 1e6, 1e3), (1e1, 1e3, 1e5, 1e2)
    As = torch.stack([s * _spd(d, c, seed=70 + i) for i, (s, c) in enumerate(zip(scales, conds))])
    bs, cot = _randn(4, d, seed=71), _randn(4, d, seed=72)
    solver = _batched_root(solve)
    b, A = bs.clone().requires_grad_(), As.clone().requires_grad_()
    with _Record() as rec:
        y = solver(A, b)
        gb, gA = torch.autograd.grad((y * cot).sum(), (b, A))
    assert rec.bilevel == []
    info = solver.last_info
    assert info.linear_solve.status.shape == (4,) and info.linear_solve.converged.all() and info.optimal.all()
    u = torch.linalg.solve(As, cot.unsqueeze(-1)).squeeze(-1)
    yd = y.detach()
    gA_ref = -0.5 * (u.unsqueeze(-1) * yd.unsqueeze(-2) + yd.unsqueeze(-1) * u.unsqueeze(-2))
    single = _batched_root(solve, batch_dims=0)
    for i in range(4):
        assert _rel(gb[i], u[i]) < 1e-8, i
        assert _rel(gA[i], gA_ref[i]) < 1e-8, i
        bi = bs[i].clone().requires_grad_()
        (gi,) = torch.autograd.grad(single(As[i], bi) @ cot[i], bi)
        assert _rel(gb[i], gi) < 1e-8, i


def test_custom_root_batch_dims_one_bad_element_does_not_poison_the_batch():
    d = 12
    conds = (1e1, 1e1, 1e6, 1.0)
    scales = (1e-6, 1.0, 1e6, 1e3)
    As = torch.stack([s * _spd(d, c, seed=80 + i) for i, (s, c) in enumerate(zip(scales, conds))])
    bs, cot = _randn(4, d, seed=81), _randn(4, d, seed=82)
    solver = _batched_root(CG(maxiter=12))
    b = bs.clone().requires_grad_()
    with _Record() as rec:
        (gb,) = torch.autograd.grad((solver(As, b) * cot).sum(), b)
    status = solver.last_info.linear_solve.converged.tolist()
    assert status == [True, True, False, True]
    assert "batch elements [2]" in " ".join(rec.messages())
    assert ConvergenceWarning in rec.categories()
    u = torch.linalg.solve(As, cot.unsqueeze(-1)).squeeze(-1)
    for i in (0, 1, 3):
        assert _rel(gb[i], u[i]) < 1e-8, i
    assert torch.isfinite(gb).all()


def test_vmap_of_jacrev_through_custom_root_with_mixed_scales():
    d = 6
    As = torch.stack([s * _spd(d, c, seed=90 + i) for i, (s, c) in
                      enumerate(zip((1e-6, 1.0, 1e6), (1e1, 1e4, 1e2)))])
    bs = _randn(3, d, seed=91)
    solver = _batched_root(None, batch_dims=0)
    with _Record() as rec:
        J = vmap(jacrev(solver, argnums=1))(As, bs)
    assert rec.bilevel == []
    inv = torch.linalg.inv(As)
    for i in range(3):
        assert _rel(J[i], inv[i]) < 1e-9, i


def test_float32_batch_mixed_conditioning_per_element():
    """float32, vmap over hypergrad: the well-conditioned elements stay accurate and the
    hopeless one (condition 1e8) is reported, with no NaN anywhere."""
    As, Bs, ts, xs, ys, ref = _mixed_batch(d=30, scales=(1e-3, 1.0, 1e3), conds=(1e1, 1e2, 1e8))
    args = [z.to(F32) for z in (As, Bs, ts, xs, ys)]
    with _Record() as rec:
        g, info = vmap(_one_hypergrad, out_dims=(0, None))(*args)
    assert torch.isfinite(g).all() and g.dtype == F32
    assert _rel(g[0], ref[0]) < 1e-3 and _rel(g[1], ref[1]) < 1e-3
    ok = info.linear_solve.converged & info.optimal
    assert ok[:2].all() and not bool(ok[2])
    assert rec.bilevel


# -------------------------------------------------------------------- bilevel.solve


def _solve_q(inner_scale=1.0, outer_scale=1.0):
    p = bilevel.problems.quadratic()
    A, B, yt, rho = (p.data[k] for k in ("A", "B", "y_target", "rho"))

    def inner(x, y):
        return inner_scale * (0.5 * y @ A @ y - y @ B @ x)

    def outer(x, y):
        return outer_scale * (0.5 * ((y - yt) ** 2).sum() + 0.5 * rho * (x**2).sum())

    with _Record() as rec:
        r = bilevel.solve(outer, inner, torch.zeros(3, dtype=D), torch.zeros(5, dtype=D),
                          lr=0.05, max_steps=300, progress=False)
    return _rel(r.x, p.solution.x), rec


@pytest.mark.parametrize("inner_scale,outer_scale", [(1.0, 1e-4), (1.0, 1e4), (1e4, 1e4)])
def test_solve_with_rescaled_objectives_converges_with_defaults(inner_scale, outer_scale):
    err, rec = _solve_q(inner_scale, outer_scale)
    assert rec.bilevel == [], rec.messages()
    assert err < 1e-5, err


@pytest.mark.parametrize("inner_scale", [1e-4, 1e-6])
def test_solve_with_inner_objective_scaled_down_converges_with_defaults(inner_scale):
    """The default inner L-BFGS stops at a gradient norm that scales with f (its gradient
    and curvature at the start), so a rescaled inner objective gives the same run."""
    err, rec = _solve_q(inner_scale=inner_scale)
    assert rec.bilevel == [], rec.messages()
    assert err < 1e-5, err
