"""The Lanczos estimate of the lower level's smallest curvature (``inner_y_min``),
against eigenvalues of dense matrices, and its warm start through a run and a resume."""

import math
import warnings

import pytest
import torch

import bilevel
import bilevel.problems as P
from bilevel.algorithms import SOBA
from bilevel.algorithms._lanczos import lowest_eigenpair
from bilevel.algorithms._single_loop import lowest_curvature


def _spd(eigenvalues: torch.Tensor, seed: int = 1) -> torch.Tensor:
    d = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q @ torch.diag(eigenvalues.to(torch.float64)) @ q.T


def _lowest(matrix: torch.Tensor, iterations: int, start=None):
    return lowest_eigenpair(lambda v: matrix @ v, matrix.shape[0], iterations, dtype=matrix.dtype,
                            device=matrix.device, start=start, generator=torch.Generator().manual_seed(0))


def test_full_krylov_space_gives_the_exact_eigenpair():
    h = _spd(torch.linspace(-2.0, 5.0, 30))
    theta, u = _lowest(h, 30)
    assert theta == pytest.approx(-2.0, abs=1e-10)
    assert float((h @ u - theta * u).norm()) < 1e-8
    assert float(u.norm()) == pytest.approx(1.0)


def test_estimate_is_from_above_and_close_on_a_spread_spectrum():
    """200 eigenvalues evenly over [0.01, 1]: 20 steps come within 1.5x (shifted power
    iteration, the estimate this replaced, is 4.4x off there)."""
    mu = 0.01
    h = _spd(torch.linspace(mu, 1.0, 200))
    theta, _ = _lowest(h, 20)
    assert mu <= theta < 1.5 * mu


def test_warm_starts_accumulate():
    """Eight steps at a time, each started from the last Ritz vector, converge to mu."""
    mu = 0.01
    h = _spd(torch.linspace(mu, 1.0, 200))
    cold, u = _lowest(h, 8)
    for _ in range(10):
        theta, u = _lowest(h, 8, start=u)
    assert mu <= theta < 1.1 * mu < cold


def test_a_closed_krylov_space_adds_no_spurious_eigenvalue():
    """H = 3 I closes the Krylov space after one step: the rest of the tridiagonal must not
    show up as zero eigenvalues."""
    theta, u = _lowest(3.0 * torch.eye(40, dtype=torch.float64), 10)
    assert theta == pytest.approx(3.0)
    singular = torch.diag(torch.cat([torch.zeros(3), torch.ones(5)])).to(torch.float64)
    theta, _ = _lowest(singular, 8)
    assert theta == pytest.approx(0.0, abs=1e-12)


def test_float32_and_non_finite_products():
    h = _spd(torch.linspace(0.5, 4.0, 12)).to(torch.float32)
    theta, u = _lowest(h, 12)
    assert theta == pytest.approx(0.5, rel=1e-4) and u.dtype == torch.float64  # the basis is float64
    with pytest.raises(FloatingPointError, match="not finite"):
        _lowest(torch.full((4, 4), math.nan), 3)


@pytest.mark.parametrize("keep_basis", [True, False])
@pytest.mark.parametrize("dtype, rel", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-3)])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_low_precision_lower_level_with_a_bias_leaf(keep_basis, dtype, rel, sign, monkeypatch):
    """f = 1/2 ||w||^2 +- 1/4 b^2 (a weight leaf and a bias, lambda_min = +-0.5 on b).  The
    Krylov space closes, to the products' accuracy, after two steps: a float32 basis run
    on past that lost its orthogonality (1.0 for 0.5, +1 for -0.5), and a closure test at
    the products' rounding unit stopped bfloat16 and float16 after one step (1.0).  Cold
    and warm starts, with the full basis and with the O(n) recurrence of large lower
    levels (no Ritz vector); the warm start is kept in y's dtype."""
    if not keep_basis:
        monkeypatch.setattr("bilevel.algorithms._lanczos.BASIS_BYTES", 0)
    n = 20_000
    y = {"w": torch.randn(n).to(dtype), "b": torch.zeros(1, dtype=dtype)}
    x = torch.ones(1, dtype=dtype)

    def f(x, y):
        return 0.5 * (y["w"] ** 2).sum() + sign * 0.25 * (y["b"] ** 2).sum() + (x * y["w"][:1]).sum()

    xs, x_spec = torch.utils._pytree.tree_flatten(x)
    ys, y_spec = torch.utils._pytree.tree_flatten(y)
    u = None
    for k in (8, 20, 8):
        theta, u = lowest_curvature(f, xs, ys, x_spec, y_spec, k, start=u)
        assert theta == pytest.approx(sign * 0.5, rel=rel)
        assert (u is None) == (not keep_basis)
        assert u is None or u.dtype == dtype
    if dtype is not torch.float32:
        return
    # a warm start from an old Ritz vector that is an eigenvector of the new Hessian, with
    # lambda_min along a direction the start holds 1e-4 of: resolvable in float32
    d = torch.ones(n, dtype=torch.float32)
    d[1] = 0.5
    start = torch.zeros(n, dtype=torch.float32)
    start[0] = 1.0
    theta, _ = lowest_eigenpair(lambda v: d * v, n, 8, dtype=torch.float32, device=torch.device("cpu"), start=start,
                                generator=torch.Generator().manual_seed(1))
    assert theta == pytest.approx(0.5, rel=1e-5)


def test_lowest_curvature_over_a_tree_with_an_ignored_leaf():
    """f(x, y) = 1/2 a^T K a - x b^T a + sum(c) over y = {"a", "b", "c"}: the Hessian has K on
    the a block, -x I between a and b, and zeros on c (linear, still counted)."""
    k = _spd(torch.tensor([1.0, 2.0, 7.0]))
    x = torch.tensor(0.5, dtype=torch.float64)

    def f(x, y):
        return 0.5 * y["a"] @ k @ y["a"] - x * y["b"] @ y["a"] + y["c"].sum()

    y = {"a": torch.ones(3, dtype=torch.float64), "b": torch.ones(3, dtype=torch.float64),
         "c": torch.ones(2, dtype=torch.float64)}
    leaves, spec = torch.utils._pytree.tree_flatten(y)
    dense = torch.zeros(8, 8, dtype=torch.float64)
    a, b = slice(0, 3), slice(3, 6)  # the leaves flatten as a, b, c
    dense[a, a] = k
    dense[a, b] = dense[b, a] = -x * torch.eye(3, dtype=torch.float64)
    theta, u = lowest_curvature(f, [x], leaves, torch.utils._pytree.tree_flatten(x)[1], spec, iterations=8)
    assert theta == pytest.approx(float(torch.linalg.eigvalsh(dense)[0]), abs=1e-8)
    assert u.shape == (8,)


def test_scales_track_mu_of_a_quadratic_through_a_run_and_a_resume():
    """SOBA's mu on a d = 200 quadratic: the 8-step re-estimates, warm-started, stay close to
    the truth along the run; a checkpoint without the warm start (an older version) resumes."""
    p = P.quadratic(200, 10, 0.1, 0)
    mu = float(torch.linalg.eigvalsh(p.data["A"])[0])
    seen = []

    def record(state, info):
        if state.iteration % 25 == 1:
            seen.append(state.extras["scales"]["inner_y_min"] / mu)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bilevel.status.BilevelWarning)
        first = bilevel.solve(p, method=SOBA(), max_steps=300, progress=False, callback=record)
    assert all(1.0 - 1e-6 <= ratio for ratio in seen)
    assert max(seen[4:]) < 1.2, seen
    checkpoint = first.state.state_dict()
    for key in ("lowest_direction", "phi_curvature", "phi_measured_at", "phi_tracking"):  # kept since
        del checkpoint["extras"][key]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bilevel.status.BilevelWarning)
        resumed = bilevel.solve(p, method=SOBA(), max_steps=400, progress=False, resume=checkpoint)
    assert resumed.state.iteration == 400
    assert "lowest_direction" in resumed.state.extras and resumed.state.extras["phi_curvature"] > 0
    assert resumed.state.extras["phi_tracking"] >= mu


def test_a_checkpoint_without_the_tracking_curvature_takes_it_at_the_next_re_estimate():
    """A checkpoint from the version that estimated ||Hess Phi|| but not mu_t (it holds
    phi_measured_at, lacks phi_tracking): the resumed run measures mu_t at its first
    re-estimate, so by step 80 its x step is the uninterrupted run's."""
    p = P.quadratic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bilevel.status.BilevelWarning)
        full = bilevel.solve(p, method="soba", max_steps=80, progress=False)
        checkpoint = bilevel.solve(p, method="soba", max_steps=12, progress=False).state.state_dict()
        for key in ("phi_tracking", "lowest_direction"):
            del checkpoint["extras"][key]
        resumed = bilevel.solve(p, method="soba", max_steps=80, progress=False, resume=checkpoint)
    assert full.state.extras["phi_tracking"] > 0
    assert resumed.state.extras["phi_tracking"] == pytest.approx(full.state.extras["phi_tracking"], rel=1e-6)
    assert resumed.state.extras["x_step"] == pytest.approx(full.state.extras["x_step"], rel=1e-6)
