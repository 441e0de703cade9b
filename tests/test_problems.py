"""bilevel.problems: closed forms checked numerically, validation errors, dtypes, bundled data."""

from __future__ import annotations

import ast
import math
import pathlib

import pytest
import torch
from torch.utils import _pytree as pytree

import bilevel.problems as P
from bilevel.problems import BilevelProblem, Solution

HAS_SKLEARN = True
try:
    import sklearn  # noqa: F401
except ImportError:  # pragma: no cover
    HAS_SKLEARN = False
needs_sklearn = pytest.mark.skipif(not HAS_SKLEARN, reason="needs scikit-learn")


def _grad(fn, *args, argnum=1):
    return torch.func.grad(fn, argnums=argnum)(*args)


def _flat(tree):
    return torch.cat([t.reshape(-1) for t in pytree.tree_leaves(tree)])


def _unflatten_like(z, like):
    leaves, spec = pytree.tree_flatten(like)
    out, i = [], 0
    for leaf in leaves:
        out.append(z[i : i + leaf.numel()].view_as(leaf))
        i += leaf.numel()
    return pytree.tree_unflatten(out, spec)


def _fit_inner(problem, x, iters=300):
    """Minimize inner(x, .) by L-BFGS over the flattened lower variable."""
    z = _flat(problem.y0).clone().requires_grad_()
    opt = torch.optim.LBFGS([z], lr=1, max_iter=iters, tolerance_grad=1e-10, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = problem.inner(x, _unflatten_like(z, problem.y0))
        loss.backward()
        return loss

    opt.step(closure)
    return _unflatten_like(z.detach(), problem.y0)


# ----- layering ---------------------------------------------------------------
def test_problems_import_nothing_from_other_subpackages():
    allowed = {"base", "classification", "ridge", "pde", "toys", "typing"}
    for path in pathlib.Path(P.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                assert (node.module or "").split(".")[0] in allowed, f"{path.name}: from {node.module}"
            elif isinstance(node, ast.ImportFrom):
                assert not node.module.startswith("bilevel"), f"{path.name}: from {node.module}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("bilevel") for a in node.names), path.name


# ----- Q -------------------------------------------------------------------------
def test_quadratic_closed_forms():
    p = P.quadratic(d=5, m=3, rho=0.1, seed=0)
    x = torch.randn(3)
    y = p.inner_solution(x)
    torch.testing.assert_close(_grad(p.inner, x, y), torch.zeros(5), atol=1e-12, rtol=0)
    x_ = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(p.outer(x_, p.inner_solution(x_)), x_)
    torch.testing.assert_close(p.hypergradient(x), g)
    s = p.solution
    torch.testing.assert_close(p.hypergradient(s.x), torch.zeros(3), atol=1e-12, rtol=0)
    torch.testing.assert_close(p.inner_solution(s.x), s.y)
    assert math.isclose(float(p.outer(s.x, s.y)), s.value, rel_tol=1e-12)
    # x* is the minimum: the hyper-objective is a strongly convex quadratic
    phi = lambda x: p.outer(x, p.inner_solution(x))  # noqa: E731
    assert all(float(phi(s.x + 1e-2 * torch.randn(3))) > s.value for _ in range(20))
    # batched x
    X = torch.randn(4, 3)
    torch.testing.assert_close(p.hypergradient(X), torch.stack([p.hypergradient(r) for r in X]))


def test_quadratic_matches_the_tests_helper_instance():
    from helpers import Quadratic

    q, p = Quadratic.make(d=5, m=3, seed=0), P.quadratic(d=5, m=3, seed=0)
    torch.testing.assert_close(p.data["A"], q.A)
    torch.testing.assert_close(p.data["B"], q.B)
    x = torch.randn(3)
    torch.testing.assert_close(p.hypergradient(x), q.hypergradient(x))


def test_evaluate_and_distance_to_solution():
    p = P.quadratic()
    s = p.solution
    at = p.distance_to_solution(s.x, s.y)
    assert at == {"x": 0.0, "y": 0.0, "value": 0.0}
    away = p.distance_to_solution(p.x0, p.y0)
    assert math.isclose(away["x"], float(s.x.norm())) and away["value"] > 0
    assert p.distance_to_solution(p.x0) == {"x": away["x"]}
    ev = p.evaluate(s.x, s.y)
    assert set(ev) == {"outer", "inner"} and math.isclose(ev["outer"], s.value)


# ----- M1 ---------------------------------------------------------------------
def test_nonunique_lower_level_known_optimum_and_stall_point():
    n = 100
    p = P.nonunique_lower_level(n)
    e = torch.ones(n)
    s = p.solution
    torch.testing.assert_close(s.x, e)
    assert s.value == 0.0 and p.evaluate(s.x, s.y)["outer"] == 0.0
    g1, g2 = _grad(p.inner, s.x, s.y)  # the optimum is inner-optimal
    assert float(g1.abs().max()) == 0.0 and float(g2.abs().max()) == 0.0
    # every (x, y2) is inner-optimal; y2 never moves under the inner gradient
    y2 = torch.randn(n)
    g1, g2 = _grad(p.inner, s.x, p.data["inner_solutions"](s.x, y2))
    assert float(g1.abs().max()) == 0.0 and float(g2.abs().max()) == 0.0
    torch.testing.assert_close(p.x0, 0.01 * e)
    torch.testing.assert_close(p.y0[1], 0.01 * e)
    # x = (e + y2_0)/2 = 0.505 e is stationary for Phi(x) = F(x, (x, y2_0)): where implicit methods stall
    x_stall = p.data["stall_point"]
    torch.testing.assert_close(x_stall, 0.505 * e)
    phi = lambda x: p.outer(x, (x, p.y0[1]))  # noqa: E731
    torch.testing.assert_close(torch.func.grad(phi)(x_stall), torch.zeros(n), atol=1e-14, rtol=0)
    assert float(phi(x_stall)) > 10.0  # ... and far from F* = 0


# ----- L -----------------------------------------------------------------------
def test_coupled_constraint_solution_is_feasible_active_and_optimal():
    n = 10
    p = P.coupled_constraint(n)
    s = p.solution
    torch.testing.assert_close(s.x, torch.full((n,), 0.5))
    torch.testing.assert_close(s.y, torch.full((n,), 0.5))
    g = p.constraints(s.x, s.y)
    assert float(g.abs().max()) == 0.0  # feasible and active
    assert math.isclose(s.value, n / 4) and math.isclose(p.evaluate(s.x, s.y)["outer"], n / 4)
    assert p.evaluate(s.x, s.y)["constraint_violation"] == 0.0
    # y* is the constrained inner minimizer at x*: KKT with multiplier b - y = 1.5 >= 0
    mult = -_grad(p.inner, s.x, s.y)
    assert bool((mult > 0).all())
    torch.testing.assert_close(p.inner_solution(s.x), s.y)
    # optimal among bilevel-feasible points: per coordinate, a grid over x, and random perturbations
    grid = torch.linspace(-3, 5, 8001)
    phi1 = 0.5 * grid**2 + 0.5 * (grid.clamp(max=2.0) - 1) ** 2
    assert math.isclose(float(grid[phi1.argmin()]), 0.5, abs_tol=1e-3)
    phi = lambda x: p.outer(x, p.inner_solution(x))  # noqa: E731
    for _ in range(50):
        assert float(phi(s.x + 0.1 * torch.randn(n))) > n / 4


def test_coupled_constraint_hypergradient_and_projection():
    p = P.coupled_constraint(10)
    x = torch.linspace(-1, 3, 10) + 0.013  # away from the kink at x = 2
    x_ = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(p.outer(x_, p.inner_solution(x_)), x_)
    torch.testing.assert_close(p.hypergradient(x), g)
    torch.testing.assert_close(p.hypergradient(p.solution.x), torch.zeros(10), atol=1e-15, rtol=0)
    project = p.data["project"]
    zx, zy = torch.randn(10), torch.randn(10)
    px, py = project(zx, zy)
    assert bool((py <= px).all())
    torch.testing.assert_close(project(px, py), (px, py))  # idempotent
    # Euclidean projection onto a convex set: <z - P z, q - P z> <= 0 for every q in C
    for _ in range(20):
        qx = torch.randn(10)
        qy = qx - torch.rand(10)
        assert float((zx - px) @ (qx - px) + (zy - py) @ (qy - py)) <= 1e-12
    assert P.project_below_diagonal is project


# ----- ridge ---------------------------------------------------------------------
def test_ridge_closed_forms_agree_with_autograd():
    p = P.ridge(n=60, d=6, n_val=30, seed=1)
    lam = p.x0
    w = p.inner_solution(lam)
    torch.testing.assert_close(_grad(p.inner, lam, w), torch.zeros(6), atol=1e-10, rtol=0)
    lam_ = lam.clone().requires_grad_()
    (g,) = torch.autograd.grad(p.outer(lam_, p.inner_solution(lam_)), lam_)
    torch.testing.assert_close(p.hypergradient(lam), g)
    assert p.data["X"].shape == (60, 6) and p.data["X_val"].shape == (30, 6)
    assert isinstance(p.data["hpo"], P.RidgeHPO)


def test_ridge_follows_the_targets_recipe():
    import numpy as np

    p = P.ridge(n=20, d=4, n_val=10, seed=0)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((30, 4)) * np.logspace(0, -1, 4)
    torch.testing.assert_close(p.data["X"], torch.as_tensor(X[:20]))
    big = P.ridge(d=100)  # n = 2000: the inner Hessian's condition number of TARGETS.md
    eig = torch.linalg.eigvalsh(big.data["hessian"](big.x0))
    assert round(float(eig[-1] / eig[0])) == 108


@needs_sklearn
def test_ridge_diabetes_as_problem():
    hpo = P.ridge_diabetes()
    p = hpo.as_problem()
    lam = torch.linspace(-1, 1, 10)
    torch.testing.assert_close(p.hypergradient(lam), hpo.hypergradient(lam))
    torch.testing.assert_close(p.x0, torch.zeros(10))
    p32 = p.with_dtype(torch.float32)
    assert p32.data["X"].dtype == torch.float32 and p32.hypergradient(lam.float()).dtype == torch.float32


# ----- validation ---------------------------------------------------------------
def _ok_outer(x, y):
    return ((y - 1) ** 2).sum() + (x**2).sum()


def _ok_inner(x, y):
    return ((y - x) ** 2).sum()


def test_valid_problem_and_repr():
    p = BilevelProblem(_ok_outer, _ok_inner, torch.zeros(2), torch.zeros(2), name="toy")
    assert p.data == {} and p.dtype == torch.float64 and p.solution is None
    assert "toy" in repr(p) and "shape (2,)" in repr(p)
    with pytest.raises(ValueError, match="no known solution"):
        p.distance_to_solution(p.x0, p.y0)
    with pytest.raises(NotImplementedError, match="no closed-form hypergradient"):
        p.hypergradient(p.x0)
    with pytest.raises(NotImplementedError, match="no closed-form inner solution"):
        p.inner_solution(p.x0)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(outer=3.0), TypeError, r"`outer` must be callable"),
        (dict(inner="f"), TypeError, r"`inner` must be callable"),
        (dict(constraints=1), TypeError, r"`constraints` must be None or callable"),
        (dict(outer=lambda x, y: y - 1), ValueError, r"`outer\(x0, y0\)` must return a scalar .* got shape \(2,\)"),
        (dict(inner=lambda x, y: (y * torch.nan).sum()), FloatingPointError, r"`inner\(x0, y0\)` is not finite"),
        (dict(outer=lambda x, y: torch.log(-(y + 1)).sum()), FloatingPointError, r"`outer\(x0, y0\)` is not finite"),
        (dict(outer=lambda x, y: 1.0), TypeError, r"`outer\(x0, y0\)` must return a tensor; got float"),
        (dict(outer=lambda x, y: (y > 0).sum()), TypeError, r"floating-point tensor; got dtype torch.int64"),
        (dict(x0=torch.zeros(2, dtype=torch.int64)), TypeError,
         r"`x0` must be a floating-point tensor; got dtype torch.int64"),
        (dict(y0=(torch.zeros(2), torch.zeros(2, dtype=torch.int32))), TypeError,
         r"`y0 \(leaf 1\)` must be a floating-point"),
        (dict(y0=(torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float32))), TypeError,
         r"`y0` mixes dtypes"),
        (dict(x0=[1.0, 2.0]), TypeError, r"`x0 \(leaf 0\)` must be a tensor; got float"),
        (dict(x0=()), ValueError, r"`x0` is empty"),
        (dict(y0=torch.zeros(3, dtype=torch.float64)), ValueError,
         r"`inner\(x0, y0\)` raised RuntimeError.*x0: tensor of shape \(2,\).*y0: tensor of shape \(3,\)"),
        (dict(constraints=lambda x, y: y / 0 * 0), FloatingPointError, r"`constraints\(x0, y0\)` has non-finite"),
        (dict(solution={"x": torch.zeros(3)}), ValueError, r"`solution.x` must have the structure and shapes of `x0`"),
        (dict(solution={"z": 1}), ValueError, r"unknown \['z'\]"),
        (dict(solution=(1, 2)), TypeError, r"`solution` must be None, a tensor \(the optimal x\), a bilevel.problems.Solution"),
        (dict(solution=Solution(value=float("nan"))), FloatingPointError, r"`solution.value` must be finite"),
        (dict(data=[1]), TypeError, r"`data` must be None or a dict"),
    ],
)
def test_validation_errors(kwargs, error, message):
    args = dict(outer=_ok_outer, inner=_ok_inner, x0=torch.zeros(2), y0=torch.zeros(2))
    args.update(kwargs)
    with pytest.raises(error, match=message):
        BilevelProblem(**args)


def test_with_dtype_on_a_hand_built_problem():
    outer = lambda x, y: _ok_outer(x, y["w"])  # noqa: E731
    inner = lambda x, y: _ok_inner(x, y["w"])  # noqa: E731
    p = BilevelProblem(outer, inner, torch.zeros(2), {"w": torch.zeros(2)}, solution={"x": torch.ones(2)})
    q = p.with_dtype(torch.float32)
    assert q.x0.dtype == torch.float32 and q.y0["w"].dtype == torch.float32 and q.solution.x.dtype == torch.float32
    assert q.outer(q.x0, q.y0).dtype == torch.float32
    assert p.with_dtype(torch.float64) is p
    with pytest.raises(TypeError, match="floating torch.dtype"):
        p.with_dtype(torch.int32)


# ----- dtypes --------------------------------------------------------------------
BUILDERS = {
    "quadratic": lambda dt: P.quadratic(dtype=dt),
    "nonunique": lambda dt: P.nonunique_lower_level(10, dtype=dt),
    "coupled": lambda dt: P.coupled_constraint(dtype=dt),
    "ridge": lambda dt: P.ridge(n=40, d=5, n_val=20, dtype=dt),
    "logistic": lambda dt: P.logistic_breast_cancer(dtype=dt),
    "cleaning": lambda dt: P.hyper_cleaning_digits(n_train=100, n_val=100, dtype=dt),
}


@pytest.mark.parametrize("name", BUILDERS)
@pytest.mark.parametrize("build", ["argument", "with_dtype"])
def test_float32_problems_produce_float32(name, build):
    if name in ("logistic", "cleaning") and not HAS_SKLEARN:
        pytest.skip("needs scikit-learn")
    if build == "argument":
        p = BUILDERS[name](torch.float32)
    else:
        p = BUILDERS[name](torch.float64).with_dtype(torch.float32)
    assert p.dtype == torch.float32
    for leaf in pytree.tree_leaves((p.x0, p.y0)):
        assert leaf.dtype == torch.float32
    assert p.outer(p.x0, p.y0).dtype == torch.float32 and p.inner(p.x0, p.y0).dtype == torch.float32
    if p.solution is not None:
        for leaf in pytree.tree_leaves((p.solution.x, p.solution.y)):
            assert leaf.dtype == torch.float32
    for key in ("hypergradient", "inner_solution"):
        if key in p.data:
            assert getattr(p, key)(p.x0).dtype == torch.float32
    for value in p.data.values():
        if torch.is_tensor(value) and value.is_floating_point():
            assert value.dtype == torch.float32
    # same problem as in float64, up to float32 rounding
    p64 = BUILDERS[name](torch.float64)
    assert math.isclose(p.evaluate(p.x0, p.y0)["outer"], p64.evaluate(p64.x0, p64.y0)["outer"], rel_tol=1e-5)


# ----- hyper-cleaning -------------------------------------------------------------
@needs_sklearn
@pytest.mark.parametrize("corruption", [0.0, 0.3, 0.5, 1.0])
def test_hyper_cleaning_corruption(corruption):
    p = P.hyper_cleaning_digits(corruption=corruption, n_train=200, n_val=100, seed=3)
    d = p.data
    mask, noisy, clean = d["corrupted"], d["labels_train"], d["labels_train_clean"]
    assert int(mask.sum()) == round(corruption * 200)
    assert bool((noisy[mask] != clean[mask]).all())  # every corrupted label is wrong
    assert bool((noisy[~mask] == clean[~mask]).all())
    assert int(noisy.min()) >= 0 and int(noisy.max()) <= 9
    if corruption > 0.2:  # wrong labels spread over the other classes
        assert len(set((noisy[mask] - clean[mask]).remainder(10).tolist())) >= 5


@needs_sklearn
def test_hyper_cleaning_shapes_splits_and_batches():
    p = P.hyper_cleaning_digits(n_train=300, n_val=200, seed=1)
    d = p.data
    assert p.x0.shape == (300,) and p.y0["weight"].shape == (10, 64) and p.y0["bias"].shape == (10,)
    assert d["X_train"].shape == (300, 64) and d["X_val"].shape == (200, 64) and d["X_test"].shape == (1297, 64)
    idx = [set(d["indices"][k].tolist()) for k in ("train", "val", "test")]
    assert not (idx[0] & idx[1] or idx[0] & idx[2] or idx[1] & idx[2]) and len(set.union(*idx)) == 1797
    torch.testing.assert_close(d["X_train"].mean(0), torch.zeros(64), atol=1e-12, rtol=0)
    y = {"weight": torch.randn(10, 64), "bias": torch.randn(10)}
    x = torch.randn(300)
    torch.testing.assert_close(p.inner(x, y, torch.arange(300)), p.inner(x, y))
    torch.testing.assert_close(p.outer(x, y, torch.arange(200)), p.outer(x, y))
    assert d["cleaning_f1"](torch.where(d["corrupted"], -1.0, 1.0)) == 1.0
    assert 0.0 <= p.evaluate(x, y)["accuracy"] <= 1.0


@needs_sklearn
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # inside torch.func
def test_hyper_cleaning_inner_is_strongly_convex():
    p = P.hyper_cleaning_digits(n_train=40, n_val=40, seed=0, l2=1e-3)
    x = 2 * torch.randn(40)
    y = {"weight": 0.3 * torch.randn(10, 64), "bias": 0.3 * torch.randn(10)}
    H = torch.func.hessian(lambda z: p.inner(x, _unflatten_like(z, y)))(_flat(y))
    eig = torch.linalg.eigvalsh(0.5 * (H + H.T))
    assert float(eig[0]) >= 1e-3 * (1 - 1e-8)  # at least the L2 weight


@needs_sklearn
def test_hyper_cleaning_clean_weights_beat_uniform_weights(capsys):
    p = P.hyper_cleaning_digits(corruption=0.5, seed=0)
    mask = p.data["corrupted"]
    y_clean = _fit_inner(p, torch.where(mask, -40.0, 40.0))  # weight 1 on clean rows, 0 on corrupted
    y_noisy = _fit_inner(p, torch.full_like(p.x0, 40.0))  # every corrupted label counts
    acc_clean, acc_noisy = p.data["accuracy"](y_clean), p.data["accuracy"](y_noisy)
    with capsys.disabled():
        print(f"\n  hyper-cleaning digits test accuracy: clean-only weights {acc_clean:.3f}, "
              f"uniform weights on 50% corrupted labels {acc_noisy:.3f}")
    assert acc_clean > 0.85
    assert acc_noisy < acc_clean - 0.1
    assert p.outer(p.x0, y_clean) < p.outer(p.x0, y_noisy)  # the outer objective sees it


# ----- logistic --------------------------------------------------------------
@needs_sklearn
def test_logistic_breast_cancer_data_and_fit():
    p = P.logistic_breast_cancer(seed=0)
    d = p.data
    assert d["X_train"].shape == (284, 30) and d["X_val"].shape == (142, 30) and d["X_test"].shape == (143, 30)
    torch.testing.assert_close(d["X_train"].mean(0), torch.zeros(30), atol=1e-12, rtol=0)
    torch.testing.assert_close(d["X_train"].std(0, unbiased=False), torch.ones(30))
    idx = [set(d["indices"][k].tolist()) for k in ("train", "val", "test")]
    assert not (idx[0] & idx[1] or idx[0] & idx[2] or idx[1] & idx[2]) and len(set.union(*idx)) == 569
    assert set(d["t_train"].tolist()) == {-1.0, 1.0}
    w = _fit_inner(p, p.x0)
    torch.testing.assert_close(_grad(p.inner, p.x0, w), torch.zeros(31), atol=1e-6, rtol=0)
    acc = d["accuracy"](w)
    assert acc > 0.9, acc
    assert p.evaluate(p.x0, w)["accuracy"] == acc
    torch.testing.assert_close(p.inner(p.x0, w, torch.arange(284)), p.inner(p.x0, w))
    with pytest.raises(ValueError, match="`split` must be"):
        d["accuracy"](w, split="nope")
