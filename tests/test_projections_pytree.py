"""Projections and proximal operators on trees of tensors (float64 oracles).

Oracles: an elementwise operator on a tree equals the single-tensor operator
on each leaf; a vector operator on a tree equals the single-tensor operator on
the concatenation of the flattened leaves (computed here independently of
:mod:`bilevel._tree`), split back into the tree's structure.
"""

from __future__ import annotations

import pytest
import torch
from helpers import seeded_randn
from torch.func import jacrev, vmap
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten

import bilevel
from bilevel.implicit.conditions import projected_gradient, proximal_gradient
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


def make_tree(seed=0, scale=1.0):
    """A nested tree with a matrix, a vector and a 0-d leaf (9 entries in all)."""
    return {
        "w": rand(2, 3, seed=seed, scale=scale),
        "rest": (rand(2, seed=seed + 1, scale=scale), rand(seed=seed + 2, scale=scale)),
    }


def flat(tree):
    return torch.cat([x.reshape(-1) for x in tree_leaves(tree)])


def unflat(vector, like):
    leaves, spec = tree_flatten(like)
    out, start = [], 0
    for leaf in leaves:
        out.append(vector[start:start + leaf.numel()].reshape(leaf.shape))
        start += leaf.numel()
    return tree_unflatten(out, spec)


def assert_tree_close(a, b, **kw):
    leaves_a, spec_a = tree_flatten(a)
    leaves_b, spec_b = tree_flatten(b)
    assert spec_a == spec_b
    for x, y in zip(leaves_a, leaves_b):
        assert x.shape == y.shape and x.dtype == y.dtype
        torch.testing.assert_close(x, y, **kw)


def leafwise_params(tree, values):
    """A parameter tree of ``tree``'s structure from a list of per-leaf values."""
    return tree_unflatten(list(values), tree_flatten(tree)[1])


# ------------------------------------------------------------------ elementwise operators

PER_LEAF = [0.3, torch.tensor(0.7, dtype=DT), torch.full((3,), 0.2, dtype=DT)]  # broadcast to each leaf
SEPARABLE = {
    "nonnegative": (lambda z: project_nonnegative(z), None),
    "box_scalars": (lambda z: project_box(z, -0.5, torch.tensor(0.4, dtype=DT)), None),
    "box_leafwise": (lambda z, lo=None: project_box(z, lo, 0.9), [-0.1, torch.tensor(-0.6, dtype=DT), None]),
    "linf": (lambda z: project_linf_ball(z, 0.6), None),
    "linf_leafwise": (lambda z, r=None: project_linf_ball(z, r), [torch.tensor([0.5, 0.3], dtype=DT), 0.3, 0.2]),
    "prox_none": (lambda z: prox_none(z, None, 0.5), None),
    "lasso": (lambda z: prox_lasso(z, torch.tensor(0.4, dtype=DT), 0.5), None),
    "lasso_leafwise": (lambda z, lam=None: prox_lasso(z, lam, 0.5), PER_LEAF),
    "nonnegative_lasso": (lambda z, lam=None: prox_nonnegative_lasso(z, lam, 0.5), PER_LEAF),
    "ridge": (lambda z, lam=None: prox_ridge(z, lam, 2.0), PER_LEAF),
    "elastic_net": (lambda z, lam=None: prox_elastic_net(z, (lam, 0.5), 0.5), PER_LEAF),
    "elastic_net_l2_leafwise": (lambda z, lam=None: prox_elastic_net(z, (0.3, lam), 0.5), PER_LEAF),
}


def _leaf_value(fn, leaf, value):
    """The single-tensor oracle on one leaf (a 0-d leaf of linf is a vector of length one)."""
    if fn is SEPARABLE["linf_leafwise"][0] and leaf.dim() == 0:
        return fn(leaf.reshape(1), value).reshape(())
    return fn(leaf) if value is None else fn(leaf, value)


@pytest.mark.parametrize("name", sorted(SEPARABLE))
def test_separable_operators_act_leaf_by_leaf(name):
    fn, values = SEPARABLE[name]
    z = make_tree(seed=1, scale=1.2)
    out = fn(z) if values is None else fn(z, leafwise_params(z, values))
    leaves = tree_leaves(z)
    if name == "linf":  # 0-d leaves are vectors of length one
        expected = [project_linf_ball(x.reshape(-1), 0.6).reshape(x.shape) for x in leaves]
    else:
        per_leaf = values or [None] * len(leaves)
        expected = [_leaf_value(fn, x, v) for x, v in zip(leaves, per_leaf)]
    assert_tree_close(out, leafwise_params(z, expected), rtol=0, atol=0)


@pytest.mark.parametrize("container", [list, tuple])
def test_separable_operators_on_lists_and_tuples_and_shared_scalars(container):
    z = container([rand(4, seed=2), rand(2, 2, seed=3)])
    out = prox_lasso(z, 0.5)
    assert type(out) is container
    for o, x in zip(out, z):
        torch.testing.assert_close(o, prox_lasso(x, 0.5), rtol=0, atol=0)
    # a scalar bound equals the same bound given leaf by leaf
    assert_tree_close(project_box(z, -0.2, 0.3), project_box(z, container([-0.2, -0.2]), container([0.3, 0.3])))


# ------------------------------------------------------------------ vector operators

A_TREE = make_tree(seed=30)
A_MAT = rand(2, 9, seed=31)
B_VEC = rand(2, seed=32)
NON_SEPARABLE = {
    "simplex": (lambda z: project_simplex(z, 1.5), lambda v: project_simplex(v, 1.5)),
    "simplex_tensor_radius": (
        lambda z: project_simplex(z, torch.tensor(0.7, dtype=DT)),
        lambda v: project_simplex(v, torch.tensor(0.7, dtype=DT)),
    ),
    "l1_ball": (lambda z: project_l1_ball(z, 0.8), lambda v: project_l1_ball(v, 0.8)),
    "l2_ball": (lambda z: project_l2_ball(z, 0.8), lambda v: project_l2_ball(v, 0.8)),
    "affine": (lambda z: project_affine_set(z, A_MAT, B_VEC), lambda v: project_affine_set(v, A_MAT, B_VEC)),
    "hyperplane": (lambda z: project_hyperplane(z, A_TREE, 0.3), lambda v: project_hyperplane(v, flat(A_TREE), 0.3)),
    "halfspace": (lambda z: project_halfspace(z, A_TREE, -0.2), lambda v: project_halfspace(v, flat(A_TREE), -0.2)),
    "kl_simplex": (lambda z: kl_projection_simplex(z, 2.0), lambda v: kl_projection_simplex(v, 2.0)),
    "group_lasso": (lambda z: prox_group_lasso(z, 0.9, 0.5), lambda v: prox_group_lasso(v, 0.9, 0.5)),
}


@pytest.mark.parametrize("name", sorted(NON_SEPARABLE))
def test_vector_operators_treat_the_tree_as_one_vector(name):
    on_tree, on_vector = NON_SEPARABLE[name]
    z = make_tree(seed=4, scale=1.5)
    out = on_tree(z)
    assert_tree_close(out, unflat(on_vector(flat(z)), z), rtol=0, atol=1e-15)
    if name not in ("kl_simplex", "group_lasso"):  # projections are idempotent
        assert_tree_close(on_tree(out), out, rtol=0, atol=1e-13)


def test_vector_operators_on_a_single_leaf_tree_and_mixed_dtypes():
    z = {"only": rand(3, 2, seed=5)}
    torch.testing.assert_close(project_simplex(z)["only"], project_simplex(z["only"].reshape(-1)).reshape(3, 2))
    mixed = (rand(3, seed=6), rand(2, seed=7).float())
    out = project_l2_ball(mixed, 0.5)
    assert out[0].dtype == DT and out[1].dtype == torch.float32
    torch.testing.assert_close(flat(out).norm(), torch.tensor(0.5, dtype=DT), rtol=1e-6, atol=1e-7)


def test_set_objects_project_trees_and_check_membership():
    z = make_tree(seed=8, scale=2.0)
    for s, fn in [
        (NonNegative(), project_nonnegative),
        (Box(-0.5, 0.5), lambda t: project_box(t, -0.5, 0.5)),
        (Simplex(2.0), lambda t: project_simplex(t, 2.0)),
        (L1Ball(1.0), lambda t: project_l1_ball(t, 1.0)),
        (L2Ball(1.0), lambda t: project_l2_ball(t, 1.0)),
    ]:
        p = s(z)
        assert_tree_close(p, fn(z), rtol=0, atol=0)
        assert bool(s.contains(p)) and not bool(s.contains(z))
        assert s.contains(p).shape == ()


# ------------------------------------------------------------------ differentiability


def test_gradcheck_through_tree_operators():
    z = make_tree(seed=9, scale=1.3)
    leaves, spec = tree_flatten(z)
    leaves = [x.detach().requires_grad_() for x in leaves]
    lam = torch.tensor([0.1, 0.2, 0.3], dtype=DT, requires_grad=True)
    radius = torch.tensor(1.1, dtype=DT, requires_grad=True)

    def simplex(r, *ls):
        return tuple(tree_leaves(project_simplex(tree_unflatten(list(ls), spec), r)))

    def lasso(l0, l1, l2, *ls):
        return tuple(tree_leaves(prox_lasso(tree_unflatten(list(ls), spec), tree_unflatten([l0, l1, l2], spec), 0.5)))

    def l2_ball(r, *ls):
        return tuple(tree_leaves(project_l2_ball(tree_unflatten(list(ls), spec), r)))

    assert torch.autograd.gradcheck(simplex, (radius, *leaves))
    assert torch.autograd.gradcheck(lasso, (lam[0], lam[1], lam[2], *leaves))
    assert torch.autograd.gradcheck(l2_ball, (radius, *leaves))


@pytest.mark.parametrize("name", ["simplex", "l1_ball", "l2_ball", "hyperplane", "group_lasso"])
def test_jacrev_on_a_tree_matches_the_flat_jacobian(name):
    on_tree, on_vector = NON_SEPARABLE[name]
    z = make_tree(seed=10, scale=1.5)
    J_flat = jacrev(on_vector)(flat(z))
    J_tree = jacrev(lambda v: flat(on_tree(unflat(v, z))))(flat(z))
    torch.testing.assert_close(J_tree, J_flat, rtol=0, atol=1e-14)
    # the Jacobian of tree outputs with respect to tree inputs has nested structure
    J_nested = jacrev(on_tree)(z)
    torch.testing.assert_close(J_nested["w"]["w"].reshape(6, 6), J_flat[:6, :6], rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", ["simplex", "l2_ball", "lasso_leafwise", "box_leafwise"])
def test_vmap_over_a_batch_of_trees_equals_a_loop(name):
    batch = {"w": rand(4, 2, 3, seed=11), "rest": (rand(4, 2, seed=12), rand(4, seed=13))}
    if name in NON_SEPARABLE:
        fn = NON_SEPARABLE[name][0]
    else:
        op, values = SEPARABLE[name]
        params = leafwise_params(make_tree(), values)
        fn = lambda z: op(z, params)  # noqa: E731
    out = vmap(fn)(batch)
    for i in range(4):
        assert_tree_close(tree_map(lambda x: x[i], out), fn(tree_map(lambda x: x[i], batch)), rtol=0, atol=1e-14)


def test_vmap_over_a_leafwise_hyperparameter():
    z = make_tree(seed=14)
    lams = torch.tensor([0.1, 0.5, 1.0], dtype=DT)
    out = vmap(lambda lam: prox_lasso(z, {"w": lam, "rest": (0.2, lam)}))(lams)
    for i, lam in enumerate(lams):
        assert_tree_close(tree_map(lambda x: x[i], out), prox_lasso(z, {"w": lam, "rest": (0.2, lam)}))


# ------------------------------------------------------------------ errors


def test_errors_name_the_argument():
    z = make_tree(seed=15)
    with pytest.raises(ValueError, match=r"`l1reg` must be .* tree with the same structure as `z`"):
        prox_lasso(z, {"w": 0.1, "other": (0.1, 0.1)})
    with pytest.raises(ValueError, match=r"`lower` must be .*got a tensor of shape \(3,\)"):
        project_box(z, torch.zeros(3, dtype=DT))
    with pytest.raises(ValueError, match=r"`radius` must be a number or a 0-d tensor when `z` is a tree.*vmap"):
        project_simplex(z, torch.ones(2, dtype=DT))
    with pytest.raises(ValueError, match=r"`l2reg` must be a number or a 0-d tensor when `z` is a tree"):
        prox_group_lasso(z, torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match=r"`radius` must be a number or a 0-d tensor when `y` is a tree"):
        kl_projection_simplex(z, torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match=r"`a` and `z` must have the same structure"):
        project_hyperplane(z, {"w": rand(2, 3), "rest": (rand(3), rand())}, 0.0)
    with pytest.raises(TypeError, match=r"`a` must be a tree"):
        project_halfspace(z, rand(9), 0.0)
    with pytest.raises(ValueError, match=r"`A` must have shape \(m, 9\) when `z` is a tree"):
        project_affine_set(z, rand(3, 2, 9), rand(3, 2))
    with pytest.raises(ValueError, match=r"`A` must have shape"):
        project_affine_set(z, rand(2, 8), rand(2))
    with pytest.raises(TypeError, match=r"`z` must be a tensor or a tree of tensors; leaf 1 is a float"):
        prox_lasso({"a": rand(2), "b": 1.0}, 0.1)
    with pytest.raises(TypeError, match=r"`z` must have floating leaves; leaf 0 has dtype torch.int64"):
        project_l2_ball([torch.arange(3), rand(2)])
    with pytest.raises(TypeError, match=r"`z` must be a torch.Tensor or a tree"):
        project_simplex(3.0)
    with pytest.raises(ValueError, match=r"`z` is empty"):
        project_l2_ball({})
    with pytest.raises(ValueError, match="l1reg"):  # per-leaf values are checked as in the tensor case
        prox_lasso(z, {"w": -1.0, "rest": (0.1, 0.1)})
    with pytest.raises(TypeError, match="`scaling`"):
        prox_ridge(z, 0.1, {"w": 1.0})
    with pytest.raises(ValueError, match="`scaling` must be a number or a 0-d tensor"):
        prox_lasso(z, 0.1, torch.ones(2, dtype=DT))
    with pytest.raises(TypeError, match="hyperparams"):
        prox_elastic_net(z, 0.1)


# ------------------------------------------------------------------ solvers and implicit differentiation

_N, _P = 30, 7
_X = rand(_N, _P, seed=20)
_Y = _X @ torch.tensor([1.5, -2.0, 0.0, 0.0, 0.7, 0.0, 0.3], dtype=DT) + 0.3 * rand(_N, seed=21)


def _to_tree(v):
    return {"first": v[:3], "second": v[3:].reshape(2, 2)}


def _lasso_flat(w, X, y):
    return 0.5 / X.shape[0] * ((X @ w - y) ** 2).sum()


def _lasso_tree(w, X, y):
    return _lasso_flat(torch.cat([w["first"], w["second"].reshape(-1)]), X, y)


def _tree_init():
    return {"first": torch.zeros(3, dtype=DT), "second": torch.zeros(2, 2, dtype=DT)}


def _lams():
    lam_a = torch.tensor(0.15, dtype=DT, requires_grad=True)
    lam_b = torch.tensor(0.05, dtype=DT, requires_grad=True)
    flat_lam = torch.cat([lam_a.expand(3), lam_b.expand(4)])
    return lam_a, lam_b, flat_lam


def _outer(w):  # a linear outer loss, the same on both representations
    return (torch.arange(1, _P + 1, dtype=DT) * w).sum()


def test_proximal_gradient_on_a_dict_matches_the_flat_problem_and_its_gradient():
    solver = bilevel.solvers.ProximalGradient(prox_lasso, tol=1e-12, maxiter=5000)
    lam_a, lam_b, flat_lam = _lams()
    w_flat = solver(_lasso_flat, torch.zeros(_P, dtype=DT), _X, _Y, prox_args=flat_lam)
    w_tree = solver(_lasso_tree, _tree_init(), _X, _Y, prox_args={"first": lam_a, "second": lam_b})
    assert set(w_tree) == {"first", "second"} and w_tree["second"].shape == (2, 2)
    torch.testing.assert_close(flat(w_tree), w_flat, rtol=0, atol=1e-9)
    assert int((w_flat == 0).sum()) >= 1  # some coordinates thresholded away
    g_flat = torch.autograd.grad(_outer(w_flat), (lam_a, lam_b))
    g_tree = torch.autograd.grad(_outer(flat(w_tree)), (lam_a, lam_b))
    for a, b in zip(g_tree, g_flat):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    # a shared scalar l1reg on the tree equals the same scalar on the flat vector
    lam = torch.tensor(0.1, dtype=DT)
    torch.testing.assert_close(
        flat(solver(_lasso_tree, _tree_init(), _X, _Y, prox_args=lam)),
        solver(_lasso_flat, torch.zeros(_P, dtype=DT), _X, _Y, prox_args=lam),
        rtol=0, atol=1e-9,
    )


def test_custom_root_through_the_tree_proximal_gradient_condition():
    L = float(torch.linalg.eigvalsh(_X.T @ _X / _N).max())
    inner = bilevel.solvers.ProximalGradient(prox_lasso, tol=1e-13, maxiter=5000)

    def tree_solver(data, lam):
        return inner.run(_lasso_tree, _tree_init(), *data, prox_args=lam)[0]

    def flat_solver(data, lam):
        return inner.run(_lasso_flat, torch.zeros(_P, dtype=DT), *data, prox_args=lam)[0]

    solve = bilevel.implicit.GMRES(tol=1e-12, maxiter=200)
    tree_root = bilevel.custom_root(proximal_gradient(_lasso_tree, prox_lasso, stepsize=1 / L), solve=solve)(
        tree_solver
    )
    flat_root = bilevel.custom_root(proximal_gradient(_lasso_flat, prox_lasso, stepsize=1 / L), solve=solve)(
        flat_solver
    )
    lam_a, lam_b, flat_lam = _lams()
    X = _X.clone().requires_grad_()
    w_tree = tree_root((X, _Y), {"first": lam_a, "second": lam_b})
    w_flat = flat_root((X, _Y), flat_lam)
    torch.testing.assert_close(flat(w_tree), w_flat, rtol=0, atol=1e-10)
    g_tree = torch.autograd.grad(_outer(flat(w_tree)), (lam_a, lam_b, X))
    g_flat = torch.autograd.grad(_outer(w_flat), (lam_a, lam_b, X))
    for a, b in zip(g_tree, g_flat):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    # jacrev through the decorated tree solver, with respect to a shared scalar l1reg
    lam = torch.tensor(0.1, dtype=DT)
    J_tree = jacrev(lambda l: flat(tree_root((_X, _Y), l)))(lam)
    J_flat = jacrev(lambda l: flat_root((_X, _Y), l))(lam)
    torch.testing.assert_close(J_tree, J_flat, rtol=1e-7, atol=1e-9)


def test_projected_gradient_on_a_tree_simplex_matches_the_flat_problem():
    # min_w 0.5 ||w - c||^2 over the simplex of the concatenated leaves: w = P(c)
    c_flat = rand(5, seed=22).requires_grad_()

    def objective(w, c):
        return 0.5 * ((flat(w) - c) ** 2).sum()

    condition = projected_gradient(objective, project_simplex)

    @bilevel.custom_root(condition, solve=bilevel.implicit.Direct(method="lu"))
    def solver(objective_args, projection_args):
        (c,) = objective_args
        return unflat(project_simplex(c.detach(), *projection_args), {"a": torch.zeros(2), "b": torch.zeros(3)})

    radius = torch.tensor(1.3, dtype=DT, requires_grad=True)
    w = solver((c_flat,), (radius,))
    torch.testing.assert_close(flat(w), project_simplex(c_flat, radius), rtol=0, atol=1e-14)
    weights = torch.arange(1.0, 6.0, dtype=DT)
    g = torch.autograd.grad((weights * flat(w)).sum(), (c_flat, radius))
    g_ref = torch.autograd.grad((weights * project_simplex(c_flat, radius)).sum(), (c_flat, radius))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
