"""Acceptance tests of the linear solvers of :mod:`bilevel.implicit.linear_solve`.

Written against the public API and the documented contract only
(``solver(matvec, b, x0=None, *, batch_dims=0) -> (x, info)``), after the
scenarios of JAXopt's, Lineax's and SciPy's linear-solver test suites.  Every
answer is compared with a dense reference (``torch.linalg.solve``, ``pinv``,
``lstsq``) or with the same solver run element by element, never with a value
the library produced before.

They aim at what ``tests/test_linear_solve.py`` and the linear-solver part of
``tests/test_acceptance_jaxopt.py`` leave out: ill-conditioned systems (condition
number up to 1e6), float32 across every matrix class, solvers given matrices
outside their class (a success must never be false), 1 x 1 systems of both
signs, trees combined with batches, per-element stopping and warm starts inside
a batch, ``vmap`` of every solver (over the matrix, the right-hand side or
both; nested), singular systems (consistent and inconsistent), failures inside
batches and under ``vmap``, scale invariance, right-hand sides of zero with a
warm start, empty systems, preconditioning, ``materialize`` and its
``chunk_size``, argument validation, and reverse mode through the solution.

Tests that expose a library bug are kept, marked ``xfail(strict=True)`` with the
symptom and the suspected cause.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch

import bilevel.implicit as implicit
from bilevel.implicit.linear_solve import (
    CG,
    GMRES,
    MINRES,
    Auto,
    BiCGStab,
    Direct,
    LinearSolveInfo,
    Neumann,
    NormalCG,
    materialize,
)
from bilevel.status import Status

D64, D32 = torch.float64, torch.float32


# --------------------------------------------------------------------------- data


def _randn(*shape, seed, dtype=D64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D64).to(dtype)


def _orthogonal(n, seed):
    Q, _ = torch.linalg.qr(_randn(n, n, seed=seed))
    return Q


def _symmetric(eigenvalues, seed):
    Q = _orthogonal(eigenvalues.shape[-1], seed)
    return (Q * eigenvalues) @ Q.T


def _spectrum(n, cond):
    return torch.logspace(0, math.log10(cond), n, dtype=D64)


def make_matrix(kind, n, seed=0, dtype=D64):
    """An ``n x n`` matrix built in float64 (then cast to ``dtype``) and its condition number."""
    if kind == "spd":
        A = _symmetric(_spectrum(n, 10.0), seed)
    elif kind == "spd_ill":
        A = _symmetric(_spectrum(n, 1e6), seed)
    elif kind == "indefinite":  # eigenvalues +-[1, 10], alternating signs
        signs = torch.tensor([(-1.0) ** i for i in range(n)], dtype=D64)
        A = _symmetric(signs * _spectrum(n, 10.0), seed)
    elif kind == "nonsymmetric":  # non-normal, eigenvalues in [1, 10]: Q (D + strictly upper) Q^T
        Q = _orthogonal(n, seed)
        A = Q @ (torch.diag(_spectrum(n, 10.0)) + torch.triu(_randn(n, n, seed=seed + 100), 1) / n**0.5) @ Q.T
    elif kind == "rotation":  # singular values in [1, 10] between unrelated orthogonal factors:
        # eigenvalues all around the origin, the hard case for BiCGStab and restarted GMRES
        A = (_orthogonal(n, seed) * _spectrum(n, 10.0)) @ _orthogonal(n, seed + 100).T
    elif kind == "diagonal":  # positive, spread over three decades, in random order
        A = torch.diag(_spectrum(n, 1e3)[torch.randperm(n, generator=torch.Generator().manual_seed(seed))])
    else:
        raise ValueError(kind)
    return A.to(dtype), float(torch.linalg.cond(A))


def matvec_of(A):
    """``v -> A v`` for ``A`` of shape ``(*batch, n, n)``, ``v`` of shape ``(*batch, n)``."""
    return lambda v: (A @ v.unsqueeze(-1)).squeeze(-1)


def singular_psd(n, rank, seed=0, negative=False):
    """A symmetric matrix of the given rank (eigenvalues in [1, 10], optionally of both signs)."""
    eig = torch.linspace(1.0, 10.0, n, dtype=D64)
    if negative:
        eig = eig * torch.tensor([(-1.0) ** i for i in range(n)], dtype=D64)
    eig[rank:] = 0
    return _symmetric(eig, seed)


def relative(a, b):
    return float(torch.linalg.vector_norm((a - b).double()) / torch.linalg.vector_norm(b.double()))


def status_name(info, index=()):
    return Status(int(info.status[index])).name


# --------------------------------------------------------------------------- solvers

SYMMETRIC_SPD = {"spd", "spd_ill", "diagonal"}
SYMMETRIC = SYMMETRIC_SPD | {"indefinite"}
WELL = {"spd", "indefinite", "nonsymmetric", "diagonal"}
EVERY = WELL | {"spd_ill", "rotation"}
KINDS = sorted(EVERY)

# name -> (factory(tol, n), matrix kinds it is documented to solve)
SOLVERS = {
    "CG": (lambda tol, n: CG(maxiter=20 * n, tol=tol), SYMMETRIC_SPD),
    "Neumann": (lambda tol, n: Neumann(terms=400, alpha=None), {"spd"}),
    "GMRES": (lambda tol, n: GMRES(maxiter=20 * n, tol=tol, restart=n), EVERY),
    "GMRES-restart8": (lambda tol, n: GMRES(maxiter=40 * n, tol=tol, restart=8), WELL),
    "BiCGStab": (lambda tol, n: BiCGStab(maxiter=40 * n, tol=tol), WELL),
    "MINRES": (lambda tol, n: MINRES(maxiter=20 * n, tol=tol), SYMMETRIC),
    "NormalCG": (lambda tol, n: NormalCG(CG(maxiter=40 * n, tol=tol)), {"spd", "indefinite", "nonsymmetric", "rotation"}),
    "Direct-cholesky": (lambda tol, n: Direct("cholesky"), SYMMETRIC_SPD),
    "Direct-lu": (lambda tol, n: Direct("lu"), EVERY),
    "Direct-lstsq": (lambda tol, n: Direct("lstsq"), EVERY),
    "Auto-symmetric": (lambda tol, n: Auto(symmetric=True, tol=tol), SYMMETRIC_SPD),
    "Auto": (lambda tol, n: Auto(tol=tol), EVERY),
    "Auto-krylov": (lambda tol, n: Auto(max_direct=0, tol=tol, maxiter=20 * n), WELL),
}
KRYLOV = ["CG", "GMRES", "BiCGStab", "MINRES", "NormalCG"]
DIRECT = ["Direct-cholesky", "Direct-lu", "Direct-lstsq"]
INDEFINITE_OK = ["GMRES", "GMRES-restart8", "BiCGStab", "MINRES", "NormalCG", "Direct-lu", "Direct-lstsq", "Auto", "Auto-krylov"]


def solver_for(name, dtype=D64, n=8, tight=True, tol=None):
    """The solver ``name``: tolerance ``tol`` if given, else 1e-11 in float64 when
    ``tight``, else the default (``sqrt(eps)`` of the dtype)."""
    if tol is None and tight and dtype == D64:
        tol = 1e-11
    return SOLVERS[name][0](tol, n)


def _tolerances(dtype, cond, tol=None):
    """(relative residual, relative forward error) that a solve to ``tol`` (None:
    the dtype's default) must meet, with a factor 10 for rounding."""
    tol = math.sqrt(torch.finfo(dtype).eps) if tol is None else tol
    return 10 * tol, 10 * tol * cond


# --------------------------------------------------------------------------- correctness


CASES = [
    (name, kind, dtype)
    for name, (_, kinds) in SOLVERS.items()
    for kind in sorted(kinds)
    for dtype in (D64, D32)
    if not (dtype == D32 and kind == "spd_ill")  # condition 1e6 is beyond float32's sqrt(eps)
]


@pytest.mark.parametrize("name, kind, dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_matches_dense_reference(name, kind, dtype):
    """Each solver on each matrix class it is documented for, n = 30: success, the
    true residual within the tolerance (1e-11 in float64, 1e-9 at condition 1e6;
    the default sqrt(eps) in float32), the forward error within condition x
    tolerance, the dtype kept, and the reported residual the true one."""
    n = 30
    A, cond = make_matrix(kind, n, seed=3, dtype=dtype)
    b = _randn(n, seed=4, dtype=dtype)
    tol = None if dtype == D32 else (1e-9 if kind == "spd_ill" else 1e-11)
    x, info = solver_for(name, dtype, n, tol=tol)(matvec_of(A), b)
    assert x.dtype == dtype and x.shape == (n,)
    assert info.residual_norm.dtype == dtype and info.status.dtype == torch.int64
    assert bool(info.converged), info.summary()
    max_res, max_err = _tolerances(dtype, cond, tol)
    A64, b64, x64 = A.double(), b.double(), x.double()
    true = torch.linalg.vector_norm(b64 - A64 @ x64)
    assert float(true / b64.norm()) <= max_res
    assert relative(x64, torch.linalg.solve(A64, b64)) <= max_err
    # the reported residual is the true one, up to the rounding of b - A x in the dtype
    rounding = 10 * n * torch.finfo(dtype).eps * float(b64.norm() + torch.linalg.matrix_norm(A64, 2) * x64.norm())
    torch.testing.assert_close(info.residual_norm.double(), true, rtol=1e-6, atol=rounding)


OUTSIDE = [(name, kind) for name, (_, kinds) in SOLVERS.items() for kind in KINDS
           if kind not in kinds and name != "Neumann"]  # Neumann has no tolerance: success = no divergence


@pytest.mark.parametrize("name, kind", OUTSIDE)
def test_outside_its_class_a_solver_never_claims_a_false_success(name, kind):
    """Each solver on the matrix classes it is *not* made for (CG on indefinite or
    non-symmetric, MINRES on non-symmetric, BiCGStab on the rotation-like matrix,
    ...): whatever it returns, a SUCCESS must be a true solution, a failure must be
    reported with its true residual, and x must be finite.  (NormalCG's success is
    documented on the normal residual ||A^T (b - A x)||.)"""
    n = 30
    A, cond = make_matrix(kind, n, seed=3)
    b = _randn(n, seed=4)
    x, info = solver_for(name, D64, n, tight=False)(matvec_of(A), b)
    assert bool(torch.isfinite(x).all()) and bool(torch.isfinite(info.residual_norm))
    true = torch.linalg.vector_norm(b - A @ x)
    if bool(info.converged) and name == "NormalCG":
        normal = torch.linalg.vector_norm(A.T @ (b - A @ x)) / torch.linalg.vector_norm(A.T @ b)
        assert float(normal) <= 10 * math.sqrt(torch.finfo(D64).eps)
    elif bool(info.converged):
        max_res, max_err = _tolerances(D64, cond)
        assert float(true / b.norm()) <= max_res
        assert relative(x, torch.linalg.solve(A, b)) <= max_err
    else:
        torch.testing.assert_close(info.residual_norm, true, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_batch_of_one_by_one_systems_of_both_signs(name):
    """Scalars 2, -3, 0.5, -1e-3 as four 1 x 1 systems: the solvers for indefinite
    systems solve every one; CG, Cholesky and the symmetric Auto flag exactly the
    negative ones; Neumann(alpha=None) diverges on them."""
    a = torch.tensor([2.0, -3.0, 0.5, -1e-3], dtype=D64)
    b = torch.tensor([[1.0], [2.0], [-1.0], [1e-3]], dtype=D64)
    x, info = solver_for(name, D64, 1)(lambda v: a.unsqueeze(-1) * v, b, batch_dims=1)
    assert x.shape == (4, 1) and info.status.shape == (4,)
    negative = a < 0
    if name in INDEFINITE_OK:
        assert bool(info.converged.all()), info.summary()
        torch.testing.assert_close(x[:, 0], b[:, 0] / a, rtol=1e-10, atol=0)
        return
    torch.testing.assert_close(x[~negative, 0], b[~negative, 0] / a[~negative], rtol=1e-10, atol=0)
    assert info.converged.tolist() == (~negative).tolist(), info
    expected = Status.DIVERGED if name == "Neumann" else Status.BREAKDOWN
    assert bool((info.status[negative] == expected).all()), info
    assert bool(torch.isfinite(x).all())


@pytest.mark.parametrize("name", list(SOLVERS))
def test_zero_dimensional_negative_scalar(name):
    x, info = solver_for(name, D64, 1)(lambda v: -4.0 * v, torch.tensor(2.0, dtype=D64))
    assert x.shape == () and info.status.shape == () and info.iterations.shape == ()
    if name in INDEFINITE_OK:
        assert bool(info.converged)
        torch.testing.assert_close(x, torch.tensor(-0.5, dtype=D64), rtol=1e-12, atol=0)
    else:
        assert not bool(info.converged) and bool(torch.isfinite(x))


TREE_NAMES = ["GMRES", "BiCGStab", "NormalCG", "Direct-lu", "Direct-lstsq", "Auto", "Auto-krylov"]


@pytest.mark.parametrize("name", TREE_NAMES)
@pytest.mark.parametrize("batch", [(), (3,)], ids=["single", "batch3"])
def test_tree_rhs_of_mixed_shapes_with_batch_and_warm_start(name, batch):
    """A dict holding a (2, 3) matrix, a scalar and a tuple of a (4,) vector and a
    (1, 1) matrix (11 unknowns), a non-symmetric operator, optionally with one
    batch dimension, and a tree ``x0``: the answer is the flat dense solve."""
    n = 11
    A = torch.stack([make_matrix("nonsymmetric", n, seed=10 + i)[0] for i in range(3)])
    A = A[0] if not batch else A
    flat_b = _randn(*batch, n, seed=11)

    def unflatten(v):
        lead = v.shape[:-1]
        return {"W": v[..., :6].reshape(*lead, 2, 3), "s": v[..., 6],
                "pair": (v[..., 7:10], v[..., 10:].reshape(*lead, 1, 1))}

    def flatten(t):
        lead = t["s"].shape
        return torch.cat([t["W"].reshape(*lead, 6), t["s"].unsqueeze(-1),
                          t["pair"][0], t["pair"][1].reshape(*lead, 1)], -1)

    def tree_matvec(t):
        return unflatten(matvec_of(A)(flatten(t)))

    ref = torch.linalg.solve(A, flat_b.unsqueeze(-1)).squeeze(-1)
    solver = solver_for(name, D64, n)
    x0 = unflatten(ref + 1e-3 * _randn(*batch, n, seed=12))
    x, info = solver(tree_matvec, unflatten(flat_b), x0, batch_dims=len(batch))
    assert x["W"].shape == (*batch, 2, 3) and x["s"].shape == batch
    assert isinstance(x["pair"], tuple) and x["pair"][1].shape == (*batch, 1, 1)
    assert info.status.shape == batch and bool(info.converged.all()), info.summary()
    torch.testing.assert_close(flatten(x), ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("dtype", [D64, D32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", KRYLOV + ["Auto-krylov"])
def test_default_tol_is_sqrt_eps_of_the_dtype(name, dtype):
    """``tol=None`` behaves exactly as ``tol=sqrt(eps)`` of the dtype (same
    iterations, same answer), and meets that tolerance on the true residual."""
    n = 30
    A, _ = make_matrix("spd", n, seed=5, dtype=dtype)
    b = _randn(n, seed=6, dtype=dtype)
    eps_tol = math.sqrt(torch.finfo(dtype).eps)
    default = solver_for(name, dtype, n, tight=False)
    explicit = (NormalCG(dataclasses.replace(default.inner, tol=eps_tol)) if name == "NormalCG"
                else dataclasses.replace(default, tol=eps_tol))
    x1, info1 = default(matvec_of(A), b)
    x2, info2 = explicit(matvec_of(A), b)
    assert torch.equal(x1, x2) and int(info1.iterations) == int(info2.iterations)
    assert bool(info1.converged)
    if name != "NormalCG":  # NormalCG tests the normal residual A^T r instead
        assert float(info1.relative_residual) <= 10 * eps_tol


@pytest.mark.parametrize("name", KRYLOV)
def test_exact_warm_start_takes_no_iteration_for_that_element_only(name):
    """Batch of three: x0 exact for element 0, zero for element 1, slightly off for
    element 2.  Element 0 takes 0 iterations, the others run; all match the reference."""
    n = 20
    A = torch.stack([make_matrix("spd", n, seed=s)[0] for s in (1, 2, 3)])
    b = _randn(3, n, seed=7)
    ref = torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)
    x0 = torch.stack([ref[0], torch.zeros(n, dtype=D64), ref[2] + 1e-4 * _randn(n, seed=8)])
    x, info = solver_for(name, D64, n)(matvec_of(A), b, x0, batch_dims=1)
    assert bool(info.converged.all()), info.summary()
    assert int(info.iterations[0]) == 0 and int(info.iterations[1]) > 0 and int(info.iterations[2]) > 0
    assert int(info.iterations[2]) <= int(info.iterations[1])
    torch.testing.assert_close(x, ref, rtol=1e-9, atol=1e-11)




@pytest.mark.parametrize(
    "name", list(SOLVERS))
def test_system_with_no_unknowns(name):
    """An empty b (e.g. a parameter group with no elements): an empty x, a success."""
    for b in (torch.zeros(0, dtype=D64), torch.zeros(3, 0, dtype=D64)):
        x, info = solver_for(name)(lambda v: 2 * v, b, batch_dims=b.dim() - 1)
        assert x.shape == b.shape and bool(info.converged.all())


@pytest.mark.parametrize("name", ["Neumann"] + DIRECT)
def test_x0_is_ignored_where_documented(name):
    n = 10
    A, _ = make_matrix("spd", n, seed=9)
    b = _randn(n, seed=10)
    solver = solver_for(name, D64, n)
    x, info = solver(matvec_of(A), b)
    x_warm, info_warm = solver(matvec_of(A), b, x0=1e6 * _randn(n, seed=11))
    assert torch.equal(x, x_warm) and int(info.iterations) == int(info_warm.iterations)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_zero_rhs_gives_zero_without_nan(name):
    """b = 0 (alone, and as one element of a batch): x = 0 exactly, success,
    relative residual 0 (not NaN), and the other elements unaffected."""
    n = 6
    A, _ = make_matrix("spd", n, seed=12)
    solver = solver_for(name, D64, n)
    x, info = solver(matvec_of(A), torch.zeros(n, dtype=D64))
    assert torch.equal(x, torch.zeros(n, dtype=D64)), x
    assert bool(info.converged) and float(info.relative_residual) == 0.0
    b = torch.stack([_randn(n, seed=13), torch.zeros(n, dtype=D64)])
    x, info = solver(matvec_of(A), b, batch_dims=1)
    assert torch.equal(x[1], torch.zeros(n, dtype=D64)) and bool(info.converged.all())
    assert bool(torch.isfinite(info.relative_residual).all())
    torch.testing.assert_close(x[0], torch.linalg.solve(A, b[0]), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", ["CG", "GMRES", "BiCGStab", "MINRES", "NormalCG"])
def test_zero_rhs_with_a_warm_start_is_solved_by_zero(name):
    """A warm-started adjoint solve whose right-hand side became exactly 0 (an
    outer loss that no longer depends on y): the answer is x = 0, a success."""
    n = 8
    A, _ = make_matrix("spd", n, seed=14)
    x, info = solver_for(name, D64, n, tight=False)(matvec_of(A), torch.zeros(n, dtype=D64), x0=_randn(n, seed=15))
    assert float(x.abs().max()) <= 1e-12
    assert bool(info.converged), info.summary()
    assert bool(torch.isfinite(info.relative_residual))


@pytest.mark.parametrize("name", KRYLOV)
def test_atol_met_by_zero_stops_at_once(name):
    """||b|| below ``atol``: x = 0 already meets max(tol ||b||, atol), 0 iterations."""
    n = 8
    A, _ = make_matrix("spd", n, seed=16)
    b = 1e-6 * _randn(n, seed=17)
    solver = (NormalCG(CG(atol=1e-3)) if name == "NormalCG"
              else dataclasses.replace(solver_for(name, D64, n), atol=1e-3))
    x, info = solver(matvec_of(A), b)
    assert bool(info.converged) and int(info.iterations) == 0
    assert torch.equal(x, torch.zeros(n, dtype=D64))


def _scale_cases():
    cases = []
    for name in list(SOLVERS):
        for dtype, scales in ((D64, (1e-8, 1e8)), (D32, (1e-4, 1e4))):
            for scale in scales:
                cases.append(pytest.param(name, dtype, scale,
                                          id=f"{name}-{str(dtype)[6:]}-{scale:g}"))
    return cases


@pytest.mark.parametrize("name, dtype, scale", _scale_cases())
def test_scale_invariance_of_the_rhs(name, dtype, scale):
    """x(s b) = s x(b): a linear solve does not depend on the units of b (the
    relative tolerance is relative to ||b||)."""
    n = 12
    A, cond = make_matrix("spd", n, seed=18, dtype=dtype)
    b = _randn(n, seed=19, dtype=dtype)
    solver = solver_for(name, dtype, n, tight=False)  # the default tolerance of the dtype
    xs, info_s = solver(matvec_of(A), scale * b)
    assert bool(info_s.converged), info_s.summary()
    _, max_err = _tolerances(dtype, cond)
    assert relative(xs.double() / scale, torch.linalg.solve(A.double(), b.double())) <= max_err


# --------------------------------------------------------------------------- batching


@pytest.mark.parametrize("name", KRYLOV)
@pytest.mark.parametrize("batch_shape", [(2,), (2, 2)], ids=["batch_dims=1", "batch_dims=2"])
def test_elements_stop_independently(name, batch_shape):
    """A batch mixing 2 I (solved in one step) with SPD systems of condition 10 to
    1e3: iterations differ per element and match those of each system solved alone
    (up to rounding: the batched and the single-system paths round differently)."""
    n = 40
    count = math.prod(batch_shape)
    mats = [2 * torch.eye(n, dtype=D64)] + [
        _symmetric(_spectrum(n, 10.0 ** (1 + k)), seed=20 + k) for k in range(count - 1)]
    A = torch.stack(mats).reshape(*batch_shape, n, n)
    b = _randn(*batch_shape, n, seed=21)
    solver = solver_for(name, D64, n)
    x, info = solver(matvec_of(A), b, batch_dims=len(batch_shape))
    assert info.iterations.shape == batch_shape and bool(info.converged.all()), info.summary()
    flat_iters = info.iterations.reshape(-1)
    assert int(flat_iters[0]) <= 2 and int(flat_iters[1:].min()) > 5
    if count > 2:
        assert int(flat_iters[-1]) > int(flat_iters[1])  # condition 1e3 takes longer than 10
    for i in range(count):
        idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), batch_shape))
        x_i, info_i = solver(matvec_of(A[idx]), b[idx])
        solo = int(info_i.iterations)
        assert abs(int(info.iterations[idx]) - solo) <= max(1, solo // 10), (i, info, info_i)
        torch.testing.assert_close(x[idx], x_i, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_identical_systems_in_a_batch_get_identical_answers(name):
    """Four copies of one system: every row is the same, and equals the solve of the
    system alone.  Neumann(alpha=None) with few terms makes its answer depend on its
    power-iteration start: that start must not differ between batch elements."""
    n = 10
    A, _ = make_matrix("spd", n, seed=22)
    b = _randn(n, seed=23)
    solver = solver_for(name, D64, n)
    if name == "Neumann":
        solver = Neumann(terms=15, alpha=None)
    xs, infos = solver(matvec_of(A), b.expand(4, n).clone(), batch_dims=1)
    x, info = solver(matvec_of(A), b)
    for i in range(4):
        torch.testing.assert_close(xs[i], xs[0], rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(xs[i], x, rtol=1e-9, atol=1e-12)
        assert int(infos.status[i]) == int(info.status) and int(infos.iterations[i]) == int(info.iterations)


def _vmapped(solver, in_dims):
    def one(A_, b_):
        x, info = solver(lambda v: A_ @ v, b_)
        return x, info.status, info.iterations, info.residual_norm

    return torch.func.vmap(one, in_dims=in_dims)


VMAP_SOLVERS = {
    "CG": CG(tol=1e-12),
    "GMRES": GMRES(tol=1e-12),
    "GMRES-restart3": GMRES(tol=1e-12, restart=3, maxiter=300),
    "BiCGStab": BiCGStab(tol=1e-12),
    "MINRES": MINRES(tol=1e-12),
    "NormalCG": NormalCG(CG(tol=1e-12)),
    "NormalCG-MINRES": NormalCG(MINRES(tol=1e-12)),
    "Neumann-alpha=None": Neumann(terms=300, alpha=None),
    "Neumann-alpha=0.1": Neumann(terms=400, alpha=0.1),
    "Direct-cholesky": Direct("cholesky"),
    "Direct-lu": Direct("lu"),
    "Direct-lstsq": Direct("lstsq"),
    "Auto": Auto(),
    "Auto-symmetric": Auto(symmetric=True),
    "Auto-krylov": Auto(symmetric=True, max_direct=0),
}




def _vmap_cases():
    for name in VMAP_SOLVERS:
        for in_dims, label in (((0, 0), "A,b"), ((0, None), "A"), ((None, 0), "b")):
            yield pytest.param(name, in_dims, id=f"{name}-{label}")


@pytest.mark.parametrize("name, in_dims", list(_vmap_cases()))
def test_vmap_over_the_solver_call_equals_a_loop(name, in_dims):
    """``torch.func.vmap`` over ``solver(lambda v: A_i @ v, b_i)``: x, status,
    iterations and residual per element equal a Python loop over the elements."""
    n, B = 6, 4
    M = _randn(B, n, n, seed=24)
    A = M @ M.mT / n + torch.eye(n, dtype=D64)  # eigenvalues in [1, ~4]
    b = _randn(B, n, seed=25)
    A_in = A if in_dims[0] == 0 else A[0]
    b_in = b if in_dims[1] == 0 else b[0]
    solver = VMAP_SOLVERS[name]
    x, status, iterations, residual = _vmapped(solver, in_dims)(A_in, b_in)
    for i in range(B):
        A_i = A[i] if in_dims[0] == 0 else A[0]
        b_i = b[i] if in_dims[1] == 0 else b[0]
        x_i, info_i = solver(lambda v: A_i @ v, b_i)
        torch.testing.assert_close(x[i], x_i, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(x[i], torch.linalg.solve(A_i, b_i), rtol=1e-8, atol=1e-10)
        assert int(status[i]) == int(info_i.status) == Status.SUCCESS
        assert int(iterations[i]) == int(info_i.iterations)
        torch.testing.assert_close(residual[i], info_i.residual_norm, rtol=1e-3, atol=1e-12)


@pytest.mark.parametrize("name", ["CG", "GMRES", "BiCGStab", "MINRES", "NormalCG", "Auto-krylov"])
def test_nested_vmap_equals_batch_dims_two(name):
    n = 6
    M = _randn(2, 3, n, n, seed=26)
    A = M @ M.mT / n + torch.eye(n, dtype=D64)
    b = _randn(2, 3, n, seed=27)
    solver = VMAP_SOLVERS[name]
    one = lambda A_, b_: solver(lambda v: A_ @ v, b_)[0]  # noqa: E731
    x_vmap = torch.func.vmap(torch.func.vmap(one))(A, b)
    x_batch, info = solver(matvec_of(A), b, batch_dims=2)
    assert bool(info.converged.all())
    torch.testing.assert_close(x_vmap, x_batch, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["CG", "GMRES", "BiCGStab", "MINRES", "NormalCG"])
def test_vmap_reports_budget_failures_per_element(name):
    """Under vmap the loop cannot stop early: an element out of budget must still be
    reported as MAX_ITERATIONS, the one solved in time as SUCCESS, as in a loop."""
    n = 30
    A = torch.stack([2 * torch.eye(n, dtype=D64), _symmetric(_spectrum(n, 1e4), seed=28)])
    b = _randn(2, n, seed=29)
    inner = CG(maxiter=5, tol=1e-10)
    solver = NormalCG(inner) if name == "NormalCG" else dataclasses.replace(solver_for(name), maxiter=5, tol=1e-10)
    x, status, iterations, residual = _vmapped(solver, (0, 0))(A, b)
    assert status.tolist() == [Status.SUCCESS, Status.MAX_ITERATIONS]
    for i in range(2):
        x_i, info_i = solver(lambda v: A[i] @ v, b[i])
        assert int(status[i]) == int(info_i.status) and int(iterations[i]) == int(info_i.iterations)
        torch.testing.assert_close(x[i], x_i, rtol=1e-9, atol=1e-12)
    true = torch.linalg.vector_norm(b[1] - A[1] @ x[1])
    torch.testing.assert_close(residual[1], true, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- singular systems


CONSISTENT_SINGULAR = ["CG", "GMRES", "BiCGStab", "MINRES", "NormalCG", "Direct-lstsq", "Auto", "Auto-symmetric"]


@pytest.mark.parametrize("negative", [False, True], ids=["psd", "indefinite"])
@pytest.mark.parametrize("name", CONSISTENT_SINGULAR + ["Direct-cholesky", "Direct-lu"])
def test_singular_consistent_system(name, negative):
    """Rank 14 of 20, b in the range of A: from x0 = 0 the Krylov solvers stay in the
    range and reach the minimum-norm solution A^+ b; so do NormalCG and lstsq.  The
    factorizations report BREAKDOWN (x = 0).  CG needs a semi-definite A."""
    n = 20
    A = singular_psd(n, 14, seed=30, negative=negative)
    b = A @ _randn(n, seed=31)
    x, info = solver_for(name, D64, n, tight=False)(matvec_of(A), b)
    ref = torch.linalg.pinv(A) @ b
    expect_success = name in CONSISTENT_SINGULAR and not (negative and name in ("CG", "Auto-symmetric"))
    if not expect_success:
        assert not bool(info.converged) and bool(torch.isfinite(x).all())
        return
    assert bool(info.converged), info.summary()
    tol = 1e-6 if name == "BiCGStab" else 1e-9
    assert relative(x, ref) <= tol


def test_least_squares_solvers_on_a_mixed_batch():
    """One batch: a consistent singular, an inconsistent singular and a regular
    non-symmetric system.  NormalCG and lstsq give A^+ b for each (a success each:
    the normal equations are solved); Auto gives A^+ b too, a success only where the
    system is consistent (documented)."""
    n = 12
    S = singular_psd(n, 8, seed=32)
    A = torch.stack([S, S, make_matrix("nonsymmetric", n, seed=33)[0]])
    b = torch.stack([S @ _randn(n, seed=34), _randn(n, seed=35), _randn(n, seed=36)])
    ref = (torch.linalg.pinv(A) @ b.unsqueeze(-1)).squeeze(-1)
    for solver in (NormalCG(CG(tol=1e-12, maxiter=500)), NormalCG(MINRES(tol=1e-12, maxiter=500)), Direct("lstsq")):
        x, info = solver(matvec_of(A), b, batch_dims=1)
        assert bool(info.converged.all()), (solver, info.summary())
        torch.testing.assert_close(x, ref, rtol=1e-8, atol=1e-10)
        ls_residual = torch.linalg.vector_norm(b - matvec_of(A)(ref), dim=-1)
        torch.testing.assert_close(info.residual_norm, ls_residual, rtol=1e-6, atol=1e-10)
    x, info = Auto()(matvec_of(A), b, batch_dims=1)
    assert info.converged.tolist() == [True, False, True], info
    torch.testing.assert_close(x, ref, rtol=1e-8, atol=1e-10)




@pytest.mark.parametrize(
    "solver",
    [
        MINRES(),
        MINRES(tol=1e-12),
        GMRES(),
        GMRES(tol=1e-12),
    ],
    ids=["MINRES", "MINRES-tol1e-12", "GMRES", "GMRES-tol1e-12"],
)
def test_minimum_residual_solvers_stop_at_the_least_squares_residual(solver):
    """MINRES (documented: a least-squares residual is reported as BREAKDOWN and the
    element stops there) and GMRES (stagnation is BREAKDOWN and it keeps the
    minimum-residual iterate): on a rank-14 symmetric system with b outside the
    range, the returned residual is the least-squares one, reached soon after 14
    steps, with a bounded x, reported truthfully and not as a success."""
    n = 20
    A = singular_psd(n, 14, seed=0)
    b = _randn(n, seed=37)
    ref = torch.linalg.pinv(A) @ b
    ls_residual = float(torch.linalg.vector_norm(b - A @ ref))
    x, info = solver(lambda v: A @ v, b)
    assert int(info.status) == Status.BREAKDOWN, info.summary()
    true = float(torch.linalg.vector_norm(b - A @ x))
    assert true <= 1.001 * ls_residual
    torch.testing.assert_close(info.residual_norm, torch.tensor(true, dtype=D64), rtol=1e-6, atol=0)
    assert int(info.iterations) <= 14 + 4
    assert float(x.norm()) <= 100 * float(ref.norm())


@pytest.mark.parametrize("name", ["CG", "BiCGStab", "Direct-cholesky", "Direct-lu", "Auto-symmetric"])
def test_singular_inconsistent_system_is_reported_with_its_true_residual(name):
    n = 20
    A = singular_psd(n, 14, seed=0)
    b = _randn(n, seed=37)
    x, info = solver_for(name, D64, n, tight=False)(lambda v: A @ v, b)
    assert not bool(info.converged)
    assert bool(torch.isfinite(x).all()) and bool(torch.isfinite(info.residual_norm))
    torch.testing.assert_close(info.residual_norm, torch.linalg.vector_norm(b - A @ x), rtol=1e-6, atol=1e-12)


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("name", KRYLOV + ["GMRES-restart8", "Auto-krylov"])
def test_out_of_budget_element_in_a_batch(name):
    """Element 0 (2 I) converges in the budget of 4 products, element 1 (condition
    1e4) does not: statuses [SUCCESS, MAX_ITERATIONS], the residual of the failed
    element is its true residual, x finite, and the summary names element 1."""
    n = 30
    A = torch.stack([2 * torch.eye(n, dtype=D64), _symmetric(_spectrum(n, 1e4), seed=38)])
    b = _randn(2, n, seed=39)
    if name == "NormalCG":
        solver = NormalCG(CG(maxiter=4, tol=1e-10))
    elif name == "Auto-krylov":
        solver = Auto(symmetric=True, max_direct=0, maxiter=4, tol=1e-10)
    else:
        solver = dataclasses.replace(solver_for(name, D64, n), maxiter=4, tol=1e-10)
    x, info = solver(matvec_of(A), b, batch_dims=1)
    assert info.status.tolist() == [Status.SUCCESS, Status.MAX_ITERATIONS], info
    assert int(info.iterations[1]) <= 4 and bool(torch.isfinite(x).all())
    true = torch.linalg.vector_norm(b - matvec_of(A)(x), dim=-1)
    torch.testing.assert_close(info.residual_norm, true, rtol=1e-6, atol=1e-12)
    assert float(info.relative_residual[1]) > 1e-10
    summary = info.summary()
    assert "batch elements [1]" in summary and "MAX_ITERATIONS" in summary


def test_neumann_reports_the_true_residual_of_a_truncated_series():
    """Neumann has no tolerance (every element that stays finite is a success), so
    its residual is what tells a truncated series: it must be the true one."""
    n = 20
    A = torch.stack([_symmetric(_spectrum(n, 2.0), seed=40), _symmetric(_spectrum(n, 100.0), seed=41)])
    b = _randn(2, n, seed=42)
    x, info = Neumann(terms=10, alpha=None)(matvec_of(A), b, batch_dims=1)
    true = torch.linalg.vector_norm(b - matvec_of(A)(x), dim=-1)
    torch.testing.assert_close(info.residual_norm, true, rtol=1e-10, atol=1e-14)
    assert float(info.relative_residual[1]) > 10 * float(info.relative_residual[0])
    assert int(info.iterations[0]) == 9


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_nonfinite_rhs_raises_a_floating_point_error(name, bad):
    """Documented: a non-finite ``b`` raises FloatingPointError naming ``b`` -- in a
    batch and inside a tree leaf too."""
    n = 6
    A, _ = make_matrix("spd", n, seed=43)
    solver = solver_for(name, D64, n)
    b = _randn(3, n, seed=44)
    b[1, 2] = float(bad)
    with pytest.raises(FloatingPointError, match="`b`"):
        solver(matvec_of(A), b, batch_dims=1)
    tree = {"head": _randn(2, seed=45), "tail": b[1, 2:]}

    def tree_matvec(t):
        out = A @ torch.cat([t["head"], t["tail"]])
        return {"head": out[:2], "tail": out[2:]}

    with pytest.raises(FloatingPointError, match="`b`"):
        solver(tree_matvec, tree)




@pytest.mark.parametrize(
    "name",
    list(VMAP_SOLVERS),
)
def test_nonfinite_rhs_under_vmap_is_that_elements_status(name):
    """Under vmap the values of b cannot be read, so no error can be raised: the
    element with NaN must get a non-success status, the others their own answer."""
    n = 6
    M = _randn(n, n, seed=46)
    A = M @ M.T / n + torch.eye(n, dtype=D64)
    b = _randn(3, n, seed=47)
    b[1, 3] = float("nan")
    solver = VMAP_SOLVERS[name]
    x, status, _, _ = _vmapped(solver, (None, 0))(A, b)
    assert int(status[1]) != Status.SUCCESS and int(status[0]) == int(status[2]) == Status.SUCCESS
    for i in (0, 2):
        torch.testing.assert_close(x[i], solver(lambda v: A @ v, b[i])[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(x[i], torch.linalg.solve(A, b[i]), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("mode", ["batch", "vmap", "single"])
@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("name", list(VMAP_SOLVERS))
def test_nonfinite_matrix_is_isolated_and_reported(name, bad, mode):
    """A NaN or inf entry in one element's matrix: that element is NONFINITE, the
    others equal their own solves (batch_dims=1 and vmap); alone, it is NONFINITE."""
    n = 6
    M = _randn(3, n, n, seed=48)
    A = M @ M.mT / n + torch.eye(n, dtype=D64)
    b = _randn(3, n, seed=49)
    A_bad = A.clone()
    A_bad[1, 2, 3] = float(bad)
    solver = VMAP_SOLVERS[name]
    if mode == "single":
        x, info = solver(lambda v: A_bad[1] @ v, b[1])
        assert int(info.status) == Status.NONFINITE, info
        return
    if mode == "batch":
        x, info = solver(matvec_of(A_bad), b, batch_dims=1)
        status = info.status
    else:
        x, status, _, _ = _vmapped(solver, (0, 0))(A_bad, b)
    assert int(status[1]) == Status.NONFINITE, status
    for i in (0, 2):
        x_i, info_i = solver(lambda v: A[i] @ v, b[i])
        assert int(status[i]) == int(info_i.status) == Status.SUCCESS
        torch.testing.assert_close(x[i], x_i, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", KRYLOV)
def test_nonfinite_warm_start_is_not_a_success(name):
    n = 6
    A, _ = make_matrix("spd", n, seed=50)
    x0 = torch.zeros(2, n, dtype=D64)
    x0[1, 0] = float("nan")
    x, info = solver_for(name, D64, n)(matvec_of(A), _randn(2, n, seed=51), x0, batch_dims=1)
    assert int(info.status[1]) == Status.NONFINITE and int(info.status[0]) == Status.SUCCESS


def test_indefinite_or_negative_definite_systems_for_spd_solvers_are_flagged():
    """CG, Cholesky and the symmetric Auto on -A (A SPD) and on an indefinite matrix,
    in one batch with an SPD element, single and under vmap: the SPD element is solved,
    the others are BREAKDOWN with finite x; Neumann(alpha=None) diverges on them."""
    n = 10
    spd, _ = make_matrix("spd", n, seed=52)
    indefinite, _ = make_matrix("indefinite", n, seed=53)
    A = torch.stack([spd, -spd, indefinite])
    b = _randn(3, n, seed=54)
    for solver in (CG(), Direct("cholesky"), Auto(symmetric=True), Auto(symmetric=True, max_direct=0)):
        x, info = solver(matvec_of(A), b, batch_dims=1)
        assert info.status.tolist() == [Status.SUCCESS, Status.BREAKDOWN, Status.BREAKDOWN], (solver, info)
        assert bool(torch.isfinite(x).all())
        torch.testing.assert_close(x[0], torch.linalg.solve(spd, b[0]), rtol=1e-6, atol=1e-8)
        _, status, _, _ = _vmapped(solver, (0, 0))(A, b)
        assert status.tolist() == info.status.tolist()
    x, info = Neumann(terms=50, alpha=None)(matvec_of(A), b, batch_dims=1)
    assert info.status.tolist() == [Status.SUCCESS, Status.DIVERGED, Status.DIVERGED]
    assert bool(torch.isfinite(x).all())
    x, info = MINRES(tol=1e-12)(matvec_of(A), b, batch_dims=1)  # the remedy solves all three
    assert bool(info.converged.all())
    torch.testing.assert_close(x, torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1), rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: CG(tol=0.0), "tol"),
        (lambda: CG(tol=float("nan")), "tol"),
        (lambda: GMRES(tol=1.0), "tol"),
        (lambda: MINRES(tol="1e-6"), "tol"),
        (lambda: CG(maxiter=0), "maxiter"),
        (lambda: GMRES(maxiter=-5), "maxiter"),
        (lambda: CG(maxiter=True), "maxiter"),
        (lambda: BiCGStab(maxiter=1e3), "maxiter"),
        (lambda: CG(atol=float("inf")), "atol"),
        (lambda: GMRES(atol=float("nan")), "atol"),
        (lambda: CG(M="jacobi"), "M"),
        (lambda: Neumann(alpha=0.0), "alpha"),
        (lambda: Neumann(alpha=float("inf")), "alpha"),
        (lambda: Neumann(terms=True), "terms"),
        (lambda: Neumann(terms=2.0), "terms"),
        (lambda: GMRES(restart=-1), "restart"),
        (lambda: Direct(None), "method"),
        (lambda: Direct("LU"), "method"),
        (lambda: NormalCG(CG), "inner"),
        (lambda: Auto(symmetric="yes"), "symmetric"),
        (lambda: Auto(tol=-1.0), "tol"),
        (lambda: Auto(maxiter=0), "maxiter"),
        (lambda: Auto(max_direct=1.5), "max_direct"),
    ],
)
def test_bad_settings_raise_naming_the_field(make, field):
    with pytest.raises(ValueError, match=rf"`{field}` must be .*; got "):
        make()


@pytest.mark.parametrize("name", ["CG", "GMRES", "Neumann", "Direct-lu", "NormalCG", "Auto"])
def test_bad_call_arguments_raise_naming_the_argument(name):
    n = 4
    A, _ = make_matrix("spd", n, seed=55)
    mv = matvec_of(A)
    b = _randn(2, n, seed=56)
    solver = solver_for(name, D64, n)
    with pytest.raises(ValueError, match="`batch_dims`"):
        solver(mv, b, batch_dims=-1)
    with pytest.raises(ValueError, match="`batch_dims`"):
        solver(mv, b, batch_dims=1.0)
    with pytest.raises(ValueError, match="`b`.*batch"):
        solver(mv, b, batch_dims=3)
    with pytest.raises(TypeError, match="`b` must be floating point"):
        solver(mv, torch.ones(n, dtype=torch.int64))
    for not_a_tensor in ([1.0, 2.0], None, 3.0):
        with pytest.raises(TypeError, match="`b` must be a tensor or a tree of tensors"):
            solver(mv, not_a_tensor)
    with pytest.raises(ValueError, match="`b` is empty"):
        solver(mv, {})
    with pytest.raises(ValueError, match="every leaf of `b` must share the batch shape"):
        solver(lambda t: t, {"u": b, "w": torch.ones(3, dtype=D64)}, batch_dims=1)
    with pytest.raises(ValueError, match="`x0` and `b`"):
        solver(mv, b, torch.zeros(n, dtype=D64), batch_dims=1)
    with pytest.raises(ValueError, match="`x0` and `b`"):
        solver(lambda t: t, {"u": b[0]}, {"v": b[0]})
    with pytest.raises(TypeError, match="`matvec` must be callable"):
        solver(A, b[0])


def test_matvec_of_the_wrong_shape_is_an_error():
    """A matvec returning twice the size of b must raise (it does, from a reshape)."""
    b = torch.ones(4, dtype=D64)
    for solver in (CG(), GMRES(), Direct("lu")):
        with pytest.raises((RuntimeError, ValueError)):
            solver(lambda v: torch.cat([v, v]), b)


@pytest.mark.parametrize("solver", [CG(), GMRES(), Direct("lu")], ids=["CG", "GMRES", "Direct-lu"])
def test_tree_matvec_returning_keys_in_another_order(solver):
    """Dicts with the same keys are equal in Python whatever their order; a matvec
    written as {k: ... for k in sorted(v)} or by hand in another order must either
    be understood by key or refused -- never silently permuted."""
    b = {"u": torch.tensor([1.0, 2.0], dtype=D64), "w": torch.tensor([3.0], dtype=D64)}

    def matvec(v):
        return {"w": 3 * v["w"], "u": 2 * v["u"]}

    try:
        x, info = solver(matvec, b)
    except (ValueError, TypeError) as err:  # refusing is fine if the message says what is wrong
        assert "matvec" in str(err)
        return
    assert bool(info.converged)
    torch.testing.assert_close(x["u"], torch.tensor([0.5, 1.0], dtype=D64))
    torch.testing.assert_close(x["w"], torch.tensor([1.0], dtype=D64))


# --------------------------------------------------------------------------- preconditioning


def _diagonally_dominant(n, seed):
    """SPD, diagonal spread over 1..1e4, off-diagonal part small against each row's diagonal."""
    d = _spectrum(n, 1e4)[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    E = 0.1 * _randn(n, n, seed=seed + 1) / n
    E = (E + E.T) / 2
    S = d.sqrt()
    return torch.diag(d) + S[:, None] * E * S[None, :]


def test_jacobi_preconditioner_cuts_cg_iterations():
    n = 50
    A = _diagonally_dominant(n, seed=57)
    b = _randn(n, seed=58)
    diag = torch.diagonal(A)
    plain_x, plain = CG(maxiter=1000, tol=1e-10)(lambda v: A @ v, b)
    x, info = CG(maxiter=1000, tol=1e-10, M=lambda r: r / diag)(lambda v: A @ v, b)
    ref = torch.linalg.solve(A, b)
    assert bool(info.converged) and bool(plain.converged)
    assert 3 * int(info.iterations) < int(plain.iterations), (int(info.iterations), int(plain.iterations))
    torch.testing.assert_close(x, ref, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(plain_x, ref, rtol=1e-6, atol=1e-10)


def test_jacobi_preconditioner_on_a_batch_and_on_a_tree():
    """The preconditioner gets the batch (per-element diagonals) and the tree of b."""
    n = 40
    A = torch.stack([_diagonally_dominant(n, seed=59), _diagonally_dominant(n, seed=61)])
    diag = torch.diagonal(A, dim1=-2, dim2=-1)
    b = _randn(2, n, seed=63)
    solver = CG(maxiter=1000, tol=1e-10, M=lambda r: r / diag)
    x, info = solver(matvec_of(A), b, batch_dims=1)
    _, plain = CG(maxiter=1000, tol=1e-10)(matvec_of(A), b, batch_dims=1)
    assert bool(info.converged.all()) and bool((3 * info.iterations < plain.iterations).all())
    torch.testing.assert_close(x, torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1), rtol=1e-8, atol=1e-12)

    A0, d0 = A[0], diag[0]
    split = lambda v: {"a": v[:15], "b": v[15:].reshape(5, 5)}  # noqa: E731
    join = lambda t: torch.cat([t["a"], t["b"].reshape(-1)])  # noqa: E731
    tree_solver = CG(maxiter=1000, tol=1e-10, M=lambda t: split(join(t) / d0))
    x, info = tree_solver(lambda t: split(A0 @ join(t)), split(b[0]))
    assert bool(info.converged) and 3 * int(info.iterations) < int(plain.iterations[0])
    torch.testing.assert_close(join(x), torch.linalg.solve(A0, b[0]), rtol=1e-8, atol=1e-12)


# --------------------------------------------------------------------------- materialize


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 7, 100])
def test_materialize_equals_the_dense_matrices(chunk_size):
    A = _randn(3, 7, 7, seed=64)
    M = materialize(matvec_of(A), torch.zeros(3, 7, dtype=D64), chunk_size=chunk_size)
    assert M.shape == (3, 7, 7) and M.dtype == D64
    torch.testing.assert_close(M, A, rtol=0, atol=0)
    M32 = materialize(matvec_of(A.float()), torch.zeros(3, 7), chunk_size=chunk_size)
    assert M32.dtype == D32
    torch.testing.assert_close(M32, A.float(), rtol=0, atol=0)


def test_materialize_of_a_structured_operator():
    """An operator given by a formula (a 1-D Laplacian plus a rank-one term)."""
    n = 9
    u = _randn(n, seed=65)

    def matvec(v):  # (B, n) -> (B, n)
        lap = 2 * v - torch.nn.functional.pad(v[..., 1:], (0, 1)) - torch.nn.functional.pad(v[..., :-1], (1, 0))
        return lap + (v @ u).unsqueeze(-1) * u

    dense = 2 * torch.eye(n, dtype=D64) - torch.diag(torch.ones(n - 1, dtype=D64), 1) \
        - torch.diag(torch.ones(n - 1, dtype=D64), -1) + torch.outer(u, u)
    M = materialize(matvec, torch.zeros(1, n, dtype=D64), chunk_size=4)
    torch.testing.assert_close(M[0], dense, rtol=1e-15, atol=1e-15)


def test_materialize_errors():
    A = _randn(1, 4, 4, seed=66)

    def host_read(v):  # .item() cannot be batched by vmap
        return matvec_of(A)(v) * (1.0 if v.sum().item() >= 0 else 1.0)

    with pytest.raises(RuntimeError, match="vmap"):
        materialize(host_read, torch.zeros(1, 4, dtype=D64))

    def broken(v):  # fails without vmap too: its own error comes through (documented)
        raise KeyError("broken matvec")

    with pytest.raises(KeyError, match="broken matvec"):
        materialize(broken, torch.zeros(1, 4, dtype=D64))
    with pytest.raises((ValueError, RuntimeError), match="chunk_size"):
        materialize(matvec_of(A), torch.zeros(1, 4, dtype=D64), chunk_size=0)


# --------------------------------------------------------------------------- info


def test_info_of_a_two_dimensional_batch():
    n = 5
    A = torch.stack([make_matrix(k, n, seed=67)[0] for k in ("spd", "indefinite", "spd",
                                                            "indefinite", "spd", "spd")]).reshape(2, 3, n, n)
    b = _randn(2, 3, n, seed=68)
    b[1, 2] = 0
    x, info = CG(tol=1e-12)(matvec_of(A), b, batch_dims=2)
    assert isinstance(info, LinearSolveInfo)
    for field in ("iterations", "residual_norm", "b_norm", "status", "converged", "relative_residual"):
        assert getattr(info, field).shape == (2, 3), field
    assert info.iterations.dtype == info.status.dtype == torch.int64
    assert info.converged.dtype == torch.bool
    expected = [[Status.SUCCESS, Status.BREAKDOWN, Status.SUCCESS], [Status.BREAKDOWN, Status.SUCCESS, Status.SUCCESS]]
    assert info.status.tolist() == expected
    torch.testing.assert_close(info.b_norm, torch.linalg.vector_norm(b, dim=-1))
    assert float(info.relative_residual[1, 2]) == 0.0 and int(info.iterations[1, 2]) == 0
    assert {int(s) for s in info.status.reshape(-1)} <= {int(s) for s in Status}
    assert "batch elements [1, 3]" in info.summary()  # flat indices of the failed elements
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.status = info.status


def test_summary_of_many_failures_is_short():
    n = 4
    A = -torch.eye(n, dtype=D64).expand(12, n, n)
    _, info = CG()(matvec_of(A), _randn(12, n, seed=69), batch_dims=1)
    summary = info.summary()
    assert not bool(info.converged.any())
    assert "batch elements [0, 1, 2, 3, 4, 5, 6, 7]..." in summary and "BREAKDOWN" in summary and len(summary) < 600


def test_linear_solvers_are_reexported_from_bilevel_implicit():
    for name in ("CG", "Neumann", "GMRES", "BiCGStab", "MINRES", "NormalCG", "Direct", "Auto", "LinearSolveInfo"):
        assert getattr(implicit, name) is getattr(implicit.linear_solve, name)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("method", ["cholesky", "lu", "lstsq"])
def test_direct_solution_is_differentiable_by_autograd(method):
    """``Direct`` is a dense factorization with torch.linalg: x(S, b) with
    A = S + S^T + 6 I (kept exactly symmetric for Cholesky) passes gradcheck."""
    n = 4
    S = _randn(n, n, seed=70).requires_grad_()
    b = _randn(n, seed=71).requires_grad_()

    def solve(S, b):
        A = S + S.T + 6 * torch.eye(n, dtype=D64)
        x, info = Direct(method)(lambda v: A @ v, b)
        return x

    with warnings.catch_warnings():
        # torch warns (once per process) when the solver reads float(||b||) of a b that requires grad
        warnings.simplefilter("ignore", UserWarning)
        assert torch.autograd.gradcheck(solve, (S, b))
        x = solve(S, b)
    A = S.detach() + S.detach().T + 6 * torch.eye(n, dtype=D64)
    g = torch.autograd.grad(x.sum(), b)[0]
    torch.testing.assert_close(g, torch.linalg.solve(A.T, torch.ones(n, dtype=D64)))


@pytest.mark.parametrize("batch", [(), (2,)], ids=["single", "batch2"])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_gradient_of_the_solution_matches_a_dense_solve(name, batch):
    """Reverse mode through ``x = solver(A(S), b)`` w.r.t. ``b`` and the tensor ``S``
    the matvec captures equals reverse mode through ``torch.linalg.solve``: a
    symmetric positive-definite A = S S^T / n + I for the solvers that need it,
    A = 3 I + S / 2 otherwise."""
    n = 5
    symmetric = "nonsymmetric" not in SOLVERS[name][1]
    S0, b0, w = _randn(*batch, n, n, seed=72), _randn(*batch, n, seed=73), _randn(*batch, n, seed=74)

    def operator(S):
        eye = torch.eye(n, dtype=D64)
        return S @ S.mT / n + eye if symmetric else 3 * eye + S / 2

    solver = Neumann(terms=400, alpha=None) if name == "Neumann" else solver_for(name, D64, n, tol=1e-12)
    grads = []
    for solve in (lambda A, b: solver(matvec_of(A), b, batch_dims=len(batch))[0],
                  lambda A, b: torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)):
        S, b = S0.clone().requires_grad_(), b0.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's warn-once on float() of a tensor requiring grad
            x = solve(operator(S), b)
        grads.append(torch.autograd.grad((w * x).sum(), (S, b)))
    for got, ref in zip(*grads):
        torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", ["CG", "GMRES", "Direct-cholesky", "Direct-lu"])
def test_second_order_through_a_solve_is_right_or_refused(name):
    """The solve is documented as first order only: a second derivative must then be
    refused (an error naming the remedy), never silently wrong."""
    n = 4
    S0, b0 = _randn(n, n, seed=75), _randn(n, seed=76)

    def operator(S):
        return S @ S.T / n + torch.eye(n, dtype=D64)

    solver = solver_for(name, D64, n, tol=1e-12)
    results = []
    for solve in (lambda A, b: solver(lambda v: A @ v, b)[0], lambda A, b: torch.linalg.solve(A, b)):
        b = b0.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            x = solve(operator(S0), b)
            (gb,) = torch.autograd.grad((x**2).sum(), b, create_graph=True)
            try:
                (h,) = torch.autograd.grad((gb * b).sum(), b)
            except RuntimeError as err:  # refused: fine if it says what to do instead
                assert "custom_root" in str(err) or "second" in str(err), err
                return
        results.append(h)
    torch.testing.assert_close(results[0], results[1], rtol=1e-7, atol=1e-9)
