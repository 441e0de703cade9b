"""Linear solvers against torch.linalg.solve, their failure modes and contracts.

A registry of solvers (each with the problem kinds it is meant for) is crossed
with a registry of problems with known answers, as in lineax's tests/helpers.py.
"""

import dataclasses
import math

import pytest
import torch

from bilevel.implicit.linear_solve import CG, GMRES, MINRES, BiCGStab, Direct, LinearSolver, Neumann, NormalCG
from bilevel.status import Status

N = 8
ALL_KINDS = {"spd", "indefinite", "nonsymmetric"}

# name -> (solver, the problem kinds it must solve)
SOLVERS = {
    "CG": (CG(tol=1e-12), {"spd"}),
    "Neumann": (Neumann(terms=200, alpha=None), {"spd"}),
    "GMRES": (GMRES(tol=1e-12), ALL_KINDS),
    "GMRES-restart3": (GMRES(tol=1e-12, restart=3, maxiter=600), {"spd", "nonsymmetric"}),
    "BiCGStab": (BiCGStab(tol=1e-12), ALL_KINDS),
    "MINRES": (MINRES(tol=1e-12), {"spd", "indefinite"}),
    "NormalCG": (NormalCG(CG(tol=1e-12)), ALL_KINDS),
    "Direct-cholesky": (Direct("cholesky"), {"spd"}),
    "Direct-lu": (Direct("lu"), ALL_KINDS),
    "Direct-lstsq": (Direct("lstsq"), ALL_KINDS),
}
ITERATIVE = ["CG", "GMRES", "GMRES-restart3", "BiCGStab", "MINRES", "NormalCG"]
CASES = [(name, kind) for name, (_, kinds) in SOLVERS.items() for kind in sorted(kinds)]


def make_matrix(kind, n=N, seed=0, low=1.0, high=4.0, dtype=torch.float64):
    """A well-conditioned ``n x n`` matrix of the given kind (spectrum in [low, high])."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=dtype))
    eig = torch.linspace(low, high, n, dtype=dtype)
    if kind == "spd":
        return Q @ torch.diag(eig) @ Q.T
    if kind == "indefinite":
        signs = torch.tensor([(-1.0) ** i for i in range(n)], dtype=dtype)
        return Q @ torch.diag(signs * eig) @ Q.T
    if kind == "nonsymmetric":
        return 3 * torch.eye(n, dtype=dtype) + torch.randn(n, n, generator=g, dtype=dtype) / n**0.5
    if kind == "singular":  # symmetric, rank n - 2
        eig[:2] = 0
        return Q @ torch.diag(eig) @ Q.T
    raise ValueError(kind)


def make_rhs(shape, seed=1, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def matvec_of(A):
    """``v -> A v`` for ``A`` of shape ``(*batch, n, n)`` and ``v`` of shape ``(*batch, n)``."""
    return lambda v: (A @ v.unsqueeze(-1)).squeeze(-1)


def with_default_tol(solver):
    if isinstance(solver, NormalCG):
        return NormalCG(with_default_tol(solver.inner))
    if hasattr(solver, "tol"):
        return dataclasses.replace(solver, tol=None)
    return solver


def assert_all(info, status):
    assert bool((info.status == status).all()), info


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("name, kind", CASES)
def test_matches_dense_solve(name, kind):
    solver, _ = SOLVERS[name]
    A, b = make_matrix(kind), make_rhs(N)
    x, info = solver(matvec_of(A), b)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-10)
    assert_all(info, Status.SUCCESS)
    assert bool(info.converged) and float(info.relative_residual) < 1e-10
    assert info.iterations.dtype == torch.int64 and int(info.iterations) >= 1


@pytest.mark.parametrize("terms", [1, 2, 5, 30])
def test_neumann_exact_identity(terms):
    A, b, alpha = make_matrix("spd"), make_rhs(N), 0.2
    x, info = Neumann(terms=terms, alpha=alpha)(matvec_of(A), b)
    eye = torch.eye(N)
    expected = torch.linalg.solve(A, (eye - torch.linalg.matrix_power(eye - alpha * A, terms)) @ b)
    torch.testing.assert_close(x, expected, rtol=1e-12, atol=1e-12)
    assert int(info.iterations) == terms - 1 and int(info.status) == Status.SUCCESS


def test_neumann_alpha_none_uses_inverse_spectral_radius():
    A, b = 10 * make_matrix("spd"), make_rhs(N)  # L = 40: alpha = 1.0 would diverge
    x, info = Neumann(terms=300, alpha=None)(matvec_of(A), b)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-10, atol=1e-12)
    assert int(info.status) == Status.SUCCESS


@pytest.mark.parametrize("name", ["NormalCG", "Direct-lstsq"])
def test_singular_least_squares_solvers_give_minimum_norm_solution(name):
    A, b = make_matrix("singular"), make_rhs(N)  # inconsistent: b has a null-space part
    x, info = SOLVERS[name][0](matvec_of(A), b)
    torch.testing.assert_close(x, torch.linalg.pinv(A) @ b, rtol=1e-8, atol=1e-9)
    assert int(info.status) == Status.SUCCESS
    assert float(info.relative_residual) > 1e-3  # the original system is not solved


@pytest.mark.parametrize("inner", [MINRES(tol=1e-12), Direct("cholesky")], ids=["MINRES", "Direct"])
def test_normal_equations_compose_with_other_inner_solvers(inner):
    A, b = make_matrix("nonsymmetric"), make_rhs(N)
    x, info = NormalCG(inner)(matvec_of(A), b)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-10)
    assert int(info.status) == Status.SUCCESS


@pytest.mark.parametrize("batch_shape", [(3,), (2, 2)], ids=["batch_dims=1", "batch_dims=2"])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_batched_equals_loop(name, batch_shape):
    solver, kinds = SOLVERS[name]
    kind = "nonsymmetric" if "nonsymmetric" in kinds else "spd"
    count = batch_shape[0] * (batch_shape[1] if len(batch_shape) > 1 else 1)
    A = torch.stack([make_matrix(kind, seed=s) * (1 + s) for s in range(count)]).reshape(*batch_shape, N, N)
    b = make_rhs((*batch_shape, N))
    x, info = solver(matvec_of(A), b, batch_dims=len(batch_shape))
    for field in ("iterations", "residual_norm", "b_norm", "status"):
        assert getattr(info, field).shape == batch_shape
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in batch_shape]).reshape(count, -1).tolist():
        idx = tuple(idx)
        x_i, info_i = solver(matvec_of(A[idx]), b[idx])
        torch.testing.assert_close(x[idx], x_i, rtol=1e-10, atol=1e-12)
        assert int(info.status[idx]) == int(info_i.status) == Status.SUCCESS


@pytest.mark.parametrize("name", list(SOLVERS))
def test_pytree_rhs_equals_flat(name):
    solver, _ = SOLVERS[name]
    A, flat_b = make_matrix("spd"), make_rhs(N)
    b = {"w": flat_b[:6].reshape(2, 3), "bias": flat_b[6:]}

    def tree_matvec(v):
        out = A @ torch.cat([v["w"].reshape(-1), v["bias"]])
        return {"w": out[:6].reshape(2, 3), "bias": out[6:]}

    x, info = solver(tree_matvec, b)
    x_flat, _ = solver(matvec_of(A), flat_b)
    assert set(x) == {"w", "bias"} and x["w"].shape == (2, 3) and x["bias"].shape == (2,)
    torch.testing.assert_close(torch.cat([x["w"].reshape(-1), x["bias"]]), x_flat, rtol=1e-12, atol=1e-13)
    assert int(info.status) == Status.SUCCESS


@pytest.mark.parametrize("name", list(SOLVERS))
def test_scalar_system(name):
    solver, _ = SOLVERS[name]
    x, info = solver(lambda v: 2.5 * v, torch.tensor(3.0))
    assert x.shape == () and info.status.shape == ()
    torch.testing.assert_close(x, torch.tensor(1.2), rtol=1e-12, atol=1e-12)
    assert int(info.status) == Status.SUCCESS and int(info.iterations) >= 1


@pytest.mark.parametrize("name", ITERATIVE)
def test_warm_start_reduces_iterations(name):
    solver, _ = SOLVERS[name]
    A, b = make_matrix("spd", n=30, high=30.0), make_rhs(30)
    x_star = torch.linalg.solve(A, b)
    _, cold = solver(matvec_of(A), b)
    x, warm = solver(matvec_of(A), b, x0=x_star + 1e-7 * make_rhs(30, seed=5))
    assert int(warm.iterations) < int(cold.iterations)
    assert int(warm.status) == Status.SUCCESS
    torch.testing.assert_close(x, x_star, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_float32_default_tol_converges_and_keeps_dtype(name):
    solver = with_default_tol(SOLVERS[name][0])
    A = make_matrix("spd", dtype=torch.float32)
    b = make_rhs(N, dtype=torch.float32)
    x, info = solver(matvec_of(A), b)
    assert x.dtype == torch.float32 and info.residual_norm.dtype == torch.float32
    assert int(info.status) == Status.SUCCESS, info.summary()
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-3, atol=1e-3)
    tree, _ = solver(lambda v: {"a": 2 * v["a"]}, {"a": b})
    assert tree["a"].dtype == torch.float32


# --------------------------------------------------------------------------- failures


def test_cg_on_indefinite_breaks_down():
    x, info = CG()(matvec_of(make_matrix("indefinite")), make_rhs(N))
    assert int(info.status) == Status.BREAKDOWN and bool(torch.isfinite(x).all())


@pytest.mark.parametrize("name", ITERATIVE)
def test_small_maxiter_reports_max_iterations(name):
    solver, _ = SOLVERS[name]
    if name == "NormalCG":
        solver = NormalCG(CG(maxiter=2, tol=1e-12))
    else:
        solver = dataclasses.replace(solver, maxiter=2)
    A, b = make_matrix("spd", n=30, high=30.0), make_rhs(30)
    x, info = solver(matvec_of(A), b)
    assert int(info.status) == Status.MAX_ITERATIONS
    assert int(info.iterations) == 2
    assert 1e-6 < float(info.relative_residual) < 1 and bool(torch.isfinite(x).all())
    assert "MAX_ITERATIONS" in info.summary()


@pytest.mark.parametrize("preconditioned", [False, True])
def test_cg_out_of_budget_spends_no_extra_product_and_reports_the_residual(preconditioned):
    """A CG solve that runs out of budget takes exactly ``maxiter`` products (no
    confirming product: its recursive residual is reported, within rounding of
    the true one); a converged solve takes one more, to confirm the success."""
    A, b = make_matrix("spd", n=30, high=30.0), make_rhs(30)
    calls = []

    def matvec(v):
        calls.append(1)
        return A @ v

    M = (lambda r: r / torch.diagonal(A)) if preconditioned else None
    with torch.no_grad():  # as in a backward pass; recording gradients costs one product more
        x, info = CG(maxiter=4, tol=1e-12, M=M)(matvec, b)
    assert int(info.status) == Status.MAX_ITERATIONS and len(calls) == 4
    true = torch.linalg.vector_norm(b - A @ x)
    torch.testing.assert_close(info.residual_norm, true, rtol=1e-10, atol=0)
    calls.clear()
    x, info = CG(maxiter=100, tol=1e-10, M=M)(matvec, b)
    assert bool(info.converged) and len(calls) == int(info.iterations) + 1
    torch.testing.assert_close(info.residual_norm, torch.linalg.vector_norm(b - A @ x), rtol=0, atol=0)


def test_recursive_residual_met_but_true_residual_missed_is_inaccurate():
    """float32 CG on a condition number 1e4 system: its recursive residual reaches
    tol = 1e-5, the true residual stays about 40 times above it.  That is INACCURATE
    (rounding), not MAX_ITERATIONS (the budget of 5000 was far from spent)."""
    g = torch.Generator().manual_seed(0)
    n = 200
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    A = ((Q * torch.logspace(0, 4, n, dtype=torch.float64)) @ Q.T).float()
    b = torch.randn(n, generator=g).float()
    x, info = CG(tol=1e-5, maxiter=5000)(lambda v: A @ v, b)
    relative = float(torch.linalg.vector_norm(b - A @ x) / torch.linalg.vector_norm(b))
    assert int(info.iterations) < 5000 and relative > 10 * 1e-5
    assert int(info.status) == Status.INACCURATE and not bool(info.converged)
    assert "too ill-conditioned" in info.summary()


def test_auto_non_symmetric_singular_consistent_system_gets_the_minimum_norm_solution():
    """A singular LU hands over to least squares: the minimum-norm solution of a
    consistent system is a success; an inconsistent one stays a failure."""
    from bilevel.implicit.linear_solve import Auto

    A = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0], [1.0, 3.0, 1.0]])  # row 3 = row 1 + row 2
    b = A @ torch.tensor([1.0, -1.0, 2.0])
    x, info = Auto()(lambda v: A @ v, b)
    assert bool(info.converged)
    torch.testing.assert_close(x, torch.linalg.pinv(A) @ b)
    x, info = Auto()(lambda v: A @ v, torch.tensor([1.0, 0.0, 0.0]))
    assert not bool(info.converged)


def test_neumann_alpha_too_big_diverges():
    x, info = Neumann(terms=100, alpha=1.0)(matvec_of(make_matrix("spd")), make_rhs(N))  # 1 - 4 alpha = -3
    assert int(info.status) == Status.DIVERGED
    assert bool(torch.isfinite(x).all()) and bool(torch.isfinite(info.residual_norm))


def test_direct_cholesky_on_indefinite_or_nonsymmetric_breaks_down():
    for kind in ("indefinite", "nonsymmetric"):
        x, info = Direct("cholesky")(matvec_of(make_matrix(kind)), make_rhs(N))
        assert int(info.status) == Status.BREAKDOWN and bool(torch.isfinite(x).all())


@pytest.mark.parametrize(
    "name", ["CG", "GMRES", "GMRES-restart3", "BiCGStab", "MINRES", "Direct-cholesky", "Direct-lu"]
)
def test_singular_inconsistent_system_is_not_success(name):
    solver, _ = SOLVERS[name]
    x, info = solver(matvec_of(make_matrix("singular")), make_rhs(N))
    assert int(info.status) != Status.SUCCESS, info
    assert bool(torch.isfinite(x).all())


def test_gmres_stagnation_is_breakdown():
    P = torch.roll(torch.eye(N), 1, 0)  # cyclic shift: GMRES(m < n) makes no progress from e_1
    b = torch.zeros(N)
    b[0] = 1
    x, info = GMRES(restart=2)(matvec_of(P), b)
    assert int(info.status) == Status.BREAKDOWN and int(info.iterations) == 2
    x, info = GMRES(restart=N)(matvec_of(P), b)
    assert int(info.status) == Status.SUCCESS
    torch.testing.assert_close(x, P.T @ b)


# (solver, kind of the good element, kind or matrix of the bad one, expected bad status)
ISOLATION = {
    "CG": (CG(tol=1e-12), "spd", "indefinite", Status.BREAKDOWN),
    "Neumann": (Neumann(terms=100, alpha=0.2), "spd", "spd*10", Status.DIVERGED),
    "GMRES": (GMRES(tol=1e-12), "nonsymmetric", "singular", None),
    "BiCGStab": (BiCGStab(tol=1e-12), "nonsymmetric", "singular", None),
    "MINRES": (MINRES(tol=1e-12), "indefinite", "singular", None),
    "NormalCG": (NormalCG(CG(tol=1e-12, maxiter=3)), "scalar", "spd", Status.MAX_ITERATIONS),
    "Direct-cholesky": (Direct("cholesky"), "spd", "indefinite", Status.BREAKDOWN),
    "Direct-lu": (Direct("lu"), "nonsymmetric", "zero", Status.BREAKDOWN),
}


def _isolation_matrix(kind):
    if kind == "spd*10":
        return 10 * make_matrix("spd")
    if kind == "zero":
        return torch.zeros(N, N)
    if kind == "scalar":
        return 2 * torch.eye(N)
    return make_matrix(kind)


@pytest.mark.parametrize("name", list(ISOLATION))
def test_failing_element_does_not_change_the_others(name):
    solver, good, bad, bad_status = ISOLATION[name]
    A = torch.stack([_isolation_matrix(good), _isolation_matrix(bad), _isolation_matrix(good) * 2])
    b = make_rhs((3, N))
    x, info = solver(matvec_of(A), b, batch_dims=1)
    if bad_status is None:
        assert int(info.status[1]) != Status.SUCCESS
    else:
        assert int(info.status[1]) == bad_status
    assert bool(torch.isfinite(x).all())
    for i in (0, 2):
        x_i, info_i = solver(matvec_of(A[i]), b[i])
        assert int(info.status[i]) == int(info_i.status) == Status.SUCCESS
        torch.testing.assert_close(x[i], x_i, rtol=1e-12, atol=1e-13)
    assert "batch elements [1]" in info.summary()


def test_summary_names_failing_elements():
    A = torch.stack([make_matrix(kind) for kind in ("spd", "indefinite", "spd", "indefinite")])
    _, info = CG()(matvec_of(A), make_rhs((4, N)), batch_dims=1)
    summary = info.summary()
    assert "batch elements [1, 3]" in summary and "BREAKDOWN" in summary
    _, ok = CG()(matvec_of(A[0]), make_rhs(N))
    assert ok.summary() == "linear solve converged"


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: CG(maxiter=-1), "maxiter"),
        (lambda: GMRES(maxiter=-1), "maxiter"),
        (lambda: BiCGStab(maxiter=0), "maxiter"),
        (lambda: MINRES(maxiter=1.5), "maxiter"),
        (lambda: CG(tol=1.5), "tol"),
        (lambda: GMRES(tol=0.0), "tol"),
        (lambda: BiCGStab(tol=-1e-3), "tol"),
        (lambda: MINRES(atol=-1.0), "atol"),
        (lambda: GMRES(restart=0), "restart"),
        (lambda: Neumann(terms=0), "terms"),
        (lambda: Neumann(alpha=-0.1), "alpha"),
        (lambda: Direct("qr"), "method"),
        (lambda: NormalCG(inner="cg"), "inner"),
    ],
)
def test_bad_settings_name_the_field(make, field):
    with pytest.raises(ValueError, match=f"`{field}` must be"):
        make()


def test_unknown_direct_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match="'cholesky', 'lu', 'lstsq'.*got 'qr'"):
        Direct("qr")


@pytest.mark.parametrize("name", list(SOLVERS))
def test_bad_call_arguments(name):
    solver, _ = SOLVERS[name]
    A, b = make_matrix("spd"), make_rhs(N)
    with pytest.raises(TypeError, match="`matvec` must be callable"):
        solver(A, b)
    if name in ("NormalCG", "Direct-lstsq"):  # x0 gives the unknowns of a rectangular A: matvec fails on it
        with pytest.raises(RuntimeError, match=r"`matvec` raised RuntimeError on a tree shaped like `x0`.*"
                                               r"`x0` and `b` of different structures or shapes"):
            solver(matvec_of(A), b, x0=torch.zeros(N + 1))
    else:
        with pytest.raises(ValueError, match=r"`x0` and `b` must have the same structure.*solves square "
                                             r'systems.*NormalCG or Direct\("lstsq"\)'):
            solver(matvec_of(A), b, x0=torch.zeros(N + 1))
    with pytest.raises(FloatingPointError, match="contains NaN"):
        solver(matvec_of(A), torch.full((N,), float("nan")))


def test_matvec_that_torch_func_cannot_transform():
    A = make_matrix("spd")
    numpy_matvec = lambda v: torch.from_numpy(A.numpy() @ v.numpy())  # noqa: E731
    with pytest.raises(RuntimeError, match="could not be batched with torch.func.vmap"):
        Direct()(numpy_matvec, make_rhs(N))
    with pytest.raises(RuntimeError, match="torch.func.vjp"):
        NormalCG()(numpy_matvec, make_rhs(N))
    x, info = GMRES()(numpy_matvec, make_rhs(N))  # iterative solvers only call it
    assert int(info.status) == Status.SUCCESS


def test_solvers_are_linear_solvers_with_a_repr():
    for solver, _ in SOLVERS.values():
        assert isinstance(solver, LinearSolver) and type(solver).__name__ in repr(solver)
    with pytest.raises(dataclasses.FrozenInstanceError):
        GMRES().restart = 5


def test_normal_cg_refuses_a_matvec_it_cannot_transpose():
    """A matvec built on torch.autograd.grad is invisible to torch.func.vjp; NormalCG
    must detect the wrong transpose (adjoint test) instead of returning a wrong x."""
    A = torch.tensor([[3.0, 1.0], [0.5, 2.0]])
    z = torch.zeros(2, requires_grad=True)
    with torch.enable_grad():
        Az = A @ z

    def matvec(v):  # v -> A^T v through a recorded graph
        return torch.autograd.grad(Az, z, v, retain_graph=True)[0]

    with pytest.raises(RuntimeError, match="adjoint test"):
        NormalCG()(matvec, torch.ones(2))
    matvec.transpose = lambda v: A @ v
    x, info = NormalCG()(matvec, torch.ones(2))
    torch.testing.assert_close(A.T @ x, torch.ones(2))
    assert bool(info.converged)


def test_auto_is_dense_when_small_krylov_when_large_or_not_vmappable():
    from bilevel.implicit.linear_solve import Auto

    torch.manual_seed(0)
    M = torch.randn(6, 6)
    A = M @ M.T + 6 * torch.eye(6)
    b = torch.randn(6)
    x, info = Auto(symmetric=True)(lambda v: A @ v, b)
    torch.testing.assert_close(x, torch.linalg.solve(A, b))
    assert int(info.iterations) == 6 and bool(info.converged)  # one dense factorization
    x, info = Auto(symmetric=True, max_direct=2)(lambda v: A @ v, b)
    torch.testing.assert_close(x, torch.linalg.solve(A, b))
    assert bool(info.converged)  # CG this time

    def host_read(v):  # vmap cannot batch it: Auto stays matrix-free
        return A @ v if float(v.abs().sum()) >= 0 else v

    x, info = Auto(symmetric=True)(host_read, b)
    torch.testing.assert_close(x, torch.linalg.solve(A, b))
    N = torch.randn(6, 6) + 6 * torch.eye(6)  # not symmetric: LU
    x, _ = Auto()(lambda v: N @ v, b)
    torch.testing.assert_close(x, torch.linalg.solve(N, b))
    with pytest.raises(ValueError, match="max_direct"):
        Auto(max_direct=-1)


def _counted(A):
    calls = []

    def matvec(v):
        calls.append(v.shape)
        return (A @ v.unsqueeze(-1)).squeeze(-1)

    return matvec, calls


@pytest.mark.parametrize("symmetric", [True, False])
def test_auto_materializes_a_mid_sized_system_krylov_does_not_solve_quickly(symmetric):
    """n = 320 > max_direct: n/16 = 20 Krylov products, then (not converged: the
    condition number is 1e4) one chunked materialization and a factorization,
    exact to rounding, whose products are counted in ``iterations``."""
    from bilevel.implicit.linear_solve import Auto

    n = 320
    A = make_matrix("spd", n=n, low=1.0, high=1e4)
    if not symmetric:
        A = A + torch.triu(make_matrix("nonsymmetric", n=n, seed=3), 1)
    b = make_rhs(n)
    matvec, calls = _counted(A)
    x, info = Auto(symmetric=symmetric, max_dense=1024)(matvec, b)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-12)
    assert bool(info.converged) and int(info.iterations) == n // 16 + n
    assert float(info.relative_residual) < 1e-12
    # every probe product is one vector; the basis goes in chunks of 128 (vmapped calls)
    assert len(calls) <= n // 16 + math.ceil(n / 128) + 3  # GMRES adds its restart residuals


def test_auto_does_not_materialize_a_system_krylov_solves_quickly():
    from bilevel.implicit.linear_solve import Auto

    n = 320
    A = make_matrix("spd", n=n, low=1.0, high=1.5)  # CG converges in a handful of steps
    b = make_rhs(n)
    matvec, calls = _counted(A)
    x, info = Auto(symmetric=True, max_dense=1024)(matvec, b)
    assert bool(info.converged) and int(info.iterations) < n // 16
    assert len(calls) == int(info.iterations) + 1  # the products and the confirming one, no matrix
    torch.testing.assert_close(x, torch.linalg.solve(A, b))


def test_auto_mid_sized_krylov_goes_on_when_the_operator_cannot_be_vmapped():
    from bilevel.implicit.linear_solve import Auto

    n = 200
    A = make_matrix("spd", n=n, low=1.0, high=1e3)
    b = make_rhs(n)

    def host_read(v):  # vmap cannot batch it
        return A @ v if float(v.abs().sum()) >= 0 else v

    x, info = Auto(symmetric=True, max_dense=1024)(host_read, b)
    assert bool(info.converged) and n // 16 < int(info.iterations) < n + n // 16
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-6, atol=1e-8)


def test_auto_keeps_krylov_for_batches_large_systems_and_max_dense_zero():
    from bilevel.implicit.linear_solve import Auto

    n = 200
    A = make_matrix("spd", n=n, low=1.0, high=1e3)
    b = make_rhs(n)
    for solver, rhs, batch_dims in [(Auto(symmetric=True, max_dense=0), b, 0),
                                    (Auto(symmetric=True, max_dense=n - 1), b, 0),
                                    (Auto(symmetric=True), torch.stack([b, 2 * b]), 1)]:
        x, info = solver(lambda v: (A @ v.unsqueeze(-1)).squeeze(-1), rhs, batch_dims=batch_dims)
        assert bool(info.converged.all()) and bool((info.iterations < n).all())  # CG alone, no n-product matrix
        torch.testing.assert_close(x, torch.linalg.solve(A, rhs.unsqueeze(-1)).squeeze(-1), rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="max_dense"):
        Auto(max_dense=-1)


def test_positional_settings_follow_the_design_order():
    """CG(maxiter, tol, M) and GMRES(maxiter, tol, restart): ``atol`` is keyword-only,
    so a third positional argument is never taken for it."""
    precondition = lambda r: r  # noqa: E731
    assert CG(50, 1e-8, precondition).M is precondition
    gmres = GMRES(100, 1e-6, 5)
    assert (gmres.maxiter, gmres.tol, gmres.restart, gmres.atol) == (100, 1e-6, 5, 0.0)
    with pytest.raises(TypeError):
        MINRES(10, 1e-6, 0.5)


@pytest.mark.parametrize("name", ["CG", "MINRES", "BiCGStab", "GMRES"])
def test_krylov_solvers_run_under_vmap(name):
    """Inside torch.func.vmap the values cannot be read: the loop runs its budget
    with finished elements frozen by their masks, and gives the batched answer."""
    solver = {"CG": CG(), "MINRES": MINRES(), "BiCGStab": BiCGStab(), "GMRES": GMRES()}[name]
    g = torch.Generator().manual_seed(0)
    M = torch.randn(4, 6, 6, generator=g)
    A = M @ M.mT / 6 + torch.eye(6)
    b = torch.randn(4, 6, generator=g)
    x, converged = torch.func.vmap(lambda A_, b_: (lambda out: (out[0], out[1].converged))(
        solver(lambda v: A_ @ v, b_)))(A, b)
    torch.testing.assert_close(x, torch.linalg.solve(A, b))
    assert converged.all()
    x_short, ok = torch.func.vmap(lambda A_, b_: (lambda out: (out[0], out[1].converged))(
        dataclasses.replace(solver, maxiter=2)(lambda v: A_ @ v, b_)))(A, b)
    assert not ok.any()


@pytest.mark.parametrize("solver", [Direct("cholesky"), Direct("lstsq")], ids=["cholesky", "lstsq"])
def test_direct_under_vmap_over_the_right_hand_side(solver):
    """The matrix is shared (status a plain tensor), the residuals are batched: the
    final checks must not read them on the host."""
    A = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    X = torch.func.vmap(lambda b: solver(lambda v: A @ v, b)[0])(torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(X, torch.linalg.inv(A))


# --------------------------------------------------------------------------- vmap, NaN and singular systems


@pytest.mark.parametrize("name", list(SOLVERS))
def test_vmap_over_the_solver_equals_the_loop(name):
    solver, kinds = SOLVERS[name]
    kind = "spd" if "spd" in kinds else sorted(kinds)[0]
    A = torch.stack([make_matrix(kind, seed=s) * (1 + s) for s in range(3)])
    b = make_rhs((3, N))
    solve = lambda A_i, b_i: solver(matvec_of(A_i), b_i)[0]  # noqa: E731
    looped = torch.stack([solve(A[i], b[i]) for i in range(3)])
    torch.testing.assert_close(torch.func.vmap(solve)(A, b), looped, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(looped, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("name", ["Neumann", "NormalCG"])
def test_identical_systems_in_a_batch_get_identical_answers(name):
    solver, _ = SOLVERS[name]
    A = make_matrix("spd").expand(4, N, N)
    b = make_rhs(N).expand(4, N)
    x, info = solver(matvec_of(A), b, batch_dims=1)
    assert bool((x == x[0]).all()) and bool((info.iterations == info.iterations[0]).all())


@pytest.mark.parametrize("method", ["cholesky", "lu", "lstsq"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_direct_non_finite_matrix_fails_only_its_element(method, bad):
    A = torch.stack([make_matrix("spd", seed=s) for s in range(3)])
    A[1, 2, 3] = bad
    b = make_rhs((3, N))
    x, info = Direct(method)(matvec_of(A), b, batch_dims=1)
    assert info.status.tolist() == [Status.SUCCESS, Status.NONFINITE, Status.SUCCESS]
    assert bool((x[1] == 0).all())
    for i in (0, 2):
        torch.testing.assert_close(x[i], torch.linalg.solve(A[i], b[i]))


@pytest.mark.parametrize("n, rank", [(7, 5), (30, 20), (60, 40)])
def test_minres_stops_at_a_least_squares_solution_of_an_inconsistent_system(n, rank):
    g = torch.Generator().manual_seed(n)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    eig = torch.cat([torch.linspace(-3, 5, rank), torch.zeros(n - rank)])
    A = Q @ torch.diag(eig) @ Q.T
    b = torch.randn(n, generator=g)
    x, info = MINRES(maxiter=10 * n)(matvec_of(A), b)
    assert int(info.status) == Status.BREAKDOWN and int(info.iterations) <= rank + 5
    # normal equations A (A x - b) = 0 to the tolerance, with a bounded iterate
    normal = torch.linalg.norm(A @ (A @ x - b)) / (torch.linalg.matrix_norm(A, 2) ** 2 * b.norm())
    assert float(normal) < 1e-7
    assert float(x.norm()) < 100 * float((torch.linalg.pinv(A) @ b).norm())


def test_cg_float32_failure_near_attainable_accuracy_reports_the_true_residual():
    # the recursive residual keeps shrinking below float32's floor; the true one stalls
    g = torch.Generator().manual_seed(0)
    n = 200
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    A = (Q @ torch.diag(torch.logspace(0, 4, n)) @ Q.T).float()
    b = torch.randn(n, generator=g).float()
    x, info = CG(maxiter=400, tol=1e-9)(matvec_of(A), b)
    assert int(info.status) == Status.MAX_ITERATIONS
    torch.testing.assert_close(info.residual_norm, (b - A @ x).norm(), rtol=1e-2, atol=0)


def test_auto_materializes_when_restarted_gmres_stagnates():
    from bilevel.implicit.linear_solve import Auto

    n = 320
    P = torch.roll(torch.eye(n), 1, 0)  # cyclic shift: GMRES(20) makes no progress from e_1
    b = torch.zeros(n)
    b[0] = 1
    _, info = GMRES(restart=20)(matvec_of(P), b)
    assert int(info.status) == Status.BREAKDOWN
    x, info = Auto(max_dense=1024)(matvec_of(P), b)
    assert int(info.status) == Status.SUCCESS
    torch.testing.assert_close(x, P.T @ b)
    assert int(info.iterations) > n  # the products of the matrix are counted


# --------------------------------------------------------------------------- gradients through a solve


def _symmetrized(A):
    return (A + A.mT) / 2


@pytest.mark.parametrize("name", list(SOLVERS))
def test_gradient_through_the_solve_matches_finite_differences(name):
    """x(A, b) = A^{-1} b differentiated by the implicit rule, for every solver."""
    solver, kinds = SOLVERS[name]
    kind = "spd" if "spd" in kinds else "nonsymmetric"
    symmetric_only = name in ("CG", "MINRES", "Neumann", "Direct-cholesky")
    A = make_matrix(kind, n=5).requires_grad_()
    b = make_rhs(5).requires_grad_()

    def x_of(A, b):
        A = _symmetrized(A) if symmetric_only else A  # a perturbation must stay in the solver's class
        return solver(matvec_of(A), b)[0]

    assert torch.autograd.gradcheck(x_of, (A, b), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("solver", [CG(tol=1e-13), GMRES(tol=1e-13), Direct("lu")], ids=["CG", "GMRES", "LU"])
def test_gradient_of_a_batched_tree_solve(solver):
    A = torch.stack([make_matrix("spd", n=5, seed=s) for s in range(3)]).requires_grad_()
    b_u, b_w = make_rhs((3, 2)).requires_grad_(), make_rhs((3, 3), seed=2).requires_grad_()

    def x_of(A, b_u, b_w):
        def matvec(v):
            out = matvec_of(A)(torch.cat([v["u"], v["w"]], -1))
            return {"u": out[:, :2], "w": out[:, 2:]}

        x, info = solver(matvec, {"u": b_u, "w": b_w}, batch_dims=1)
        assert not info.residual_norm.requires_grad
        return x["u"], x["w"]

    assert torch.autograd.gradcheck(x_of, (A, b_u, b_w), atol=1e-6, rtol=1e-5)


def test_gradient_records_no_iteration_and_values_are_unchanged():
    A = make_matrix("spd").requires_grad_()
    b = make_rhs(N)
    x, info = CG(tol=1e-12)(matvec_of(A), b)
    with torch.no_grad():
        x_plain, _ = CG(tol=1e-12)(matvec_of(A), b)
    assert torch.equal(x.detach(), x_plain) and int(info.iterations) > 1
    graph, stack = set(), [x.grad_fn]  # the graph holds one product, not one per iteration
    while stack:
        node = stack.pop()
        if node is not None and node not in graph:
            graph.add(node)
            stack.extend(fn for fn, _ in node.next_functions)
    assert sum(type(node).__name__ in ("MmBackward0", "MvBackward0", "BmmBackward0") for node in graph) == 1
    (gA,) = torch.autograd.grad(x.sum(), A)
    u = torch.linalg.solve(A.detach(), torch.ones(N))
    torch.testing.assert_close(gA, -torch.outer(u, x.detach()))


def test_backward_solve_that_misses_its_tolerance_warns():
    from bilevel.status import ConvergenceWarning

    A = make_matrix("spd", low=1.0, high=1e4).requires_grad_()
    x, _ = CG(tol=1e-2, maxiter=3)(matvec_of(A), make_rhs(N))
    with pytest.warns(ConvergenceWarning, match="for the derivative of the solution did not converge"):
        x.sum().backward()


@pytest.mark.parametrize("loss", ["quadratic", "linear"])
def test_a_second_derivative_through_a_plain_solve_raises(loss):
    """Never silently wrong: whether or not the cotangent depends on the inputs
    (linear loss: the first gradient looks like a constant), differentiating it
    again raises and names custom_root."""
    A = make_matrix("spd").requires_grad_()
    b = make_rhs(N).requires_grad_()
    x, _ = CG(tol=1e-12)(matvec_of(A), b)
    value = (x**2).sum() if loss == "quadratic" else x.sum()
    gA, gb = torch.autograd.grad(value, (A, b), create_graph=True)
    with pytest.raises(RuntimeError, match="custom_root"):
        torch.autograd.grad(gA.sum() + gb.sum(), A)


def test_the_second_derivative_of_a_solve_written_as_a_root_is_exact():
    from bilevel.implicit import custom_root

    A = make_matrix("nonsymmetric", n=4).requires_grad_()
    b = make_rhs(4).requires_grad_()

    def x_of(A, b):
        solver = custom_root(lambda x, A, b: A @ x - b)(lambda A, b: torch.linalg.solve(A, b))
        return solver(A, b)

    assert torch.autograd.gradgradcheck(x_of, (A, b), atol=1e-6, rtol=1e-5)


def test_operator_of_the_wrong_size_and_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"`matvec` \(or the preconditioner\) returned 16 values where 8"):
        CG()(lambda v: torch.cat([v, v]), make_rhs(N))
    with pytest.raises(ValueError, match=r"returned 48 values where 24"):
        GMRES()(lambda v: torch.cat([v, v], -1), make_rhs((3, N)), batch_dims=1)
    with pytest.raises(ValueError, match="batch_dims"):
        CG()(lambda v: v, make_rhs(N), batch_dims=True)
    from bilevel.implicit.linear_solve import materialize

    with pytest.raises(ValueError, match=r"`b` must be a \(B, n\) tensor"):
        materialize(lambda v: v, make_rhs(N))
    with pytest.raises(ValueError, match="chunk_size"):
        materialize(lambda v: v, make_rhs((1, N)), chunk_size=0)


@pytest.mark.parametrize("name", ["CG", "GMRES", "Direct-lu", "NormalCG", "Direct-lstsq"])
def test_forward_mode_through_a_solve(name):
    """x_dot = A^{-1} (b_dot - A_dot x), one solve per tangent, whatever the solver."""
    import torch.autograd.forward_ad as fwAD

    solver, _ = SOLVERS[name]
    symmetric = name == "CG"
    A = make_matrix("spd" if symmetric else "nonsymmetric", n=5)
    A_dot = make_rhs((5, 5), seed=3)
    A_dot = _symmetrized(A_dot) if symmetric else A_dot
    b, b_dot = make_rhs(5), make_rhs(5, seed=4)
    with fwAD.dual_level():
        A_dual, b_dual = fwAD.make_dual(A, A_dot), fwAD.make_dual(b, b_dot)
        x, _ = solver(matvec_of(A_dual), b_dual)
        x_dot = fwAD.unpack_dual(x).tangent
    x_ref = torch.linalg.solve(A, b)
    torch.testing.assert_close(x_dot, torch.linalg.solve(A, b_dot - A_dot @ x_ref), rtol=1e-9, atol=1e-11)


def test_forward_mode_with_an_operator_whose_parameters_require_grad():
    import torch.autograd.forward_ad as fwAD

    layer = torch.nn.Linear(5, 5, bias=False)
    with torch.no_grad():
        layer.weight.copy_(make_matrix("nonsymmetric", n=5))
    b, b_dot = make_rhs(5), make_rhs(5, seed=4)
    with fwAD.dual_level():
        x, _ = GMRES(tol=1e-13)(layer, fwAD.make_dual(b, b_dot))
        x_dot = fwAD.unpack_dual(x).tangent
    torch.testing.assert_close(x_dot, torch.linalg.solve(layer.weight.detach(), b_dot))


@pytest.mark.parametrize("solver", [Direct("lu"), BiCGStab(tol=1e-13)], ids=["LU", "BiCGStab"])
def test_gradient_of_a_complex_solve(solver):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 4, dtype=torch.complex128, generator=g) + 4 * torch.eye(4)
    b = torch.randn(4, dtype=torch.complex128, generator=g).requires_grad_()
    x, _ = solver(lambda v: A @ v, b)
    (got,) = torch.autograd.grad(x.abs().sum(), b)
    (want,) = torch.autograd.grad(torch.linalg.solve(A, b).abs().sum(), b)
    torch.testing.assert_close(got, want)


def test_gradient_with_a_matvec_computing_in_float32():
    A = make_matrix("nonsymmetric", n=5)
    A32 = A.float()
    b = make_rhs(5).requires_grad_()
    x, _ = Direct("lu")(lambda v: (A32 @ v.float()).double(), b)
    (gb,) = torch.autograd.grad(x.sum(), b)
    torch.testing.assert_close(gb, torch.linalg.solve(A.T, torch.ones(5)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["NormalCG", "Direct-lstsq"])
def test_least_squares_gradient_for_a_rank_deficient_matrix(name):
    """x = A^+ b with rank(A) = 4 < 6: d<x, c>/db = (A^+)^T c (the adjoint of the
    normal equations has no solution; the minimum-norm one is taken in two stages)."""
    solver, _ = SOLVERS[name]
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 4, generator=g) @ torch.randn(4, 6, generator=g)
    b, c = torch.randn(6, generator=g).requires_grad_(), torch.randn(6, generator=g)
    x, _ = solver(matvec_of(A), b)
    torch.testing.assert_close(x, torch.linalg.pinv(A) @ b)
    (gb,) = torch.autograd.grad((x * c).sum(), b)
    torch.testing.assert_close(gb, torch.linalg.pinv(A).T @ c, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("dtype, small", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_minres_solves_a_nonsingular_system_with_a_tiny_eigenvalue(dtype, small):
    """A small eigenvalue is not a singular operator: the least-squares stop must not fire."""
    d = torch.ones(10, dtype=dtype)
    d[0], d[-1] = -1, small
    b = torch.ones(10, dtype=dtype)
    x, info = MINRES()(lambda v: d * v, b)
    assert int(info.status) == Status.SUCCESS, info
    torch.testing.assert_close(x, b / d, rtol=1e-3 if dtype == torch.float32 else 1e-7, atol=0)


@pytest.mark.parametrize("name", ["CG", "GMRES", "MINRES", "BiCGStab", "NormalCG", "Direct-lu"])
def test_torch_func_grad_and_jacrev_through_a_solve(name):
    """Under torch.func the implicit rule applies too (no differentiation of the
    iterations: GMRES's in-place updates and MINRES's hypot at 0 are never traced)."""
    solver, kinds = SOLVERS[name]
    kind = "spd" if "spd" in kinds else "nonsymmetric"
    A, b = make_matrix(kind, n=5), make_rhs(5)
    grad_b = torch.func.grad(lambda b_: solver(matvec_of(A), b_)[0].sum())(b)
    torch.testing.assert_close(grad_b, torch.linalg.solve(A.T, torch.ones(5)), rtol=1e-9, atol=1e-11)
    jac_b = torch.func.jacrev(lambda b_: solver(matvec_of(A), b_)[0])(b)
    torch.testing.assert_close(jac_b, torch.linalg.inv(A), rtol=1e-9, atol=1e-11)
    jac_A = torch.func.jacrev(lambda A_: solver(matvec_of(A_), b)[0])(A)
    want = torch.func.jacrev(lambda A_: torch.linalg.solve(A_, b))(A)
    torch.testing.assert_close(jac_A, want, rtol=1e-8, atol=1e-10)


def test_info_leaves_vmap_stacked_per_element():
    """LinearSolveInfo is a pytree node: vmap over a solve returns one row per element."""
    A = torch.stack([make_matrix("spd", seed=s) for s in range(3)])
    b = make_rhs((3, N))
    x, info = torch.func.vmap(lambda A_, b_: CG(tol=1e-12)(matvec_of(A_), b_))(A, b)
    _, batched = CG(tol=1e-12)(matvec_of(A), b, batch_dims=1)
    torch.testing.assert_close(x, torch.linalg.solve(A, b))
    assert info.status.shape == (3,) and bool(info.converged.all())
    assert torch.equal(info.iterations, batched.iterations)
    leaves, spec = torch.utils._pytree.tree_flatten(info)
    assert len(leaves) == 4 and torch.utils._pytree.tree_unflatten(leaves, spec) == info


def test_reverse_over_forward_through_a_solve_raises():
    """The forward-mode tangent is first order too: differentiating it raises."""
    from torch.func import jacfwd, jacrev

    A, b = make_matrix("spd", n=3), make_rhs(3)
    with pytest.raises(RuntimeError, match="custom_root"):
        jacrev(jacfwd(lambda M: CG(tol=1e-12)(matvec_of(M), b)[0].sum()))(A)
    with pytest.raises(RuntimeError, match="custom_root"):
        torch.func.hessian(lambda b_: CG(tol=1e-12)(matvec_of(A), b_)[0].pow(2).sum())(b)


def test_vmap_of_grad_with_the_operator_batched_and_b_shared():
    from torch.func import grad, vmap

    A = torch.stack([make_matrix("nonsymmetric", n=4, seed=s) for s in range(3)])
    b = make_rhs(4)
    got = vmap(grad(lambda M: GMRES(tol=1e-13)(matvec_of(M), b)[0].pow(2).sum()))(A)
    want = vmap(grad(lambda M: torch.linalg.solve(M, b).pow(2).sum()))(A)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_forward_mode_of_a_rank_deficient_least_squares_solve_matches_reverse_mode():
    from torch.func import jacfwd, jacrev

    g = torch.Generator().manual_seed(1)
    A = torch.randn(5, 3, generator=g) @ torch.randn(3, 5, generator=g)
    b = torch.randn(5, generator=g)  # inconsistent
    solve = lambda M: NormalCG(CG(tol=1e-13))(matvec_of(M), b)[0]  # noqa: E731
    torch.testing.assert_close(jacfwd(solve)(A), jacrev(solve)(A), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("solver", [CG(), MINRES(), GMRES(), BiCGStab(), NormalCG(), CG(atol=1e-40)])
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_krylov_solvers_are_invariant_to_the_scale_of_b_in_float32(solver, scale):
    """b of size 1e-30 or 1e30 in float32 (squared norms under- or overflow): the iterations
    run on b / s with s a power of two, so x is scale times the solution for unit b, up to
    rounding, with the same iteration count."""
    gen = torch.Generator().manual_seed(7)
    M = torch.randn(40, 40, generator=gen)
    A = M @ M.T / 40 + torch.eye(40)
    b = torch.randn(40, generator=gen)
    x1, info1 = solver(lambda v: A @ v, b)
    xs, infos = solver(lambda v: A @ v, scale * b)
    assert bool(torch.isfinite(xs).all())
    torch.testing.assert_close(xs / scale, x1, rtol=1e-5, atol=1e-6)
    assert int(infos.iterations) == int(info1.iterations)


@pytest.mark.parametrize("seed", [9, 20, 23])
def test_minres_stops_at_a_least_squares_point_when_its_krylov_space_is_exhausted(seed):
    """A singular symmetric A (two zero eigenvalues) and an inconsistent b."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.tensor([0, 0, 1, 1.5, 2, 2.5, 3, 4], dtype=torch.float64)) @ Q.T
    b = torch.randn(8, generator=g, dtype=torch.float64)
    x, info = MINRES()(lambda v: A @ v, b)
    assert int(info.status) == Status.BREAKDOWN
    assert float(x.norm()) < 10 * float((torch.linalg.pinv(A) @ b).norm())


def test_direct_lu_solves_a_system_whose_rows_and_unknowns_have_very_different_units():
    """D A D with D = diag(1e-8 .. 1e8): well posed after equilibration (rows and columns
    scaled by powers of two, exactly); LU must solve it, not call it singular; a
    genuinely singular matrix is still a BREAKDOWN."""
    g = torch.Generator().manual_seed(0)
    M = torch.randn(6, 6, generator=g) + 3 * torch.eye(6)
    D = torch.diag(torch.tensor([1e-8, 1e-8, 1.0, 1.0, 1e8, 1e8]))
    A, b = D @ M @ D, torch.randn(6, generator=g)
    x, info = Direct("lu")(lambda v: A @ v, b)
    assert int(info.status) == Status.SUCCESS
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-10, atol=0)
    S = torch.zeros(4, 4)
    S[:3, :3] = torch.randn(3, 3, generator=g)
    _, info = Direct("lu")(lambda v: S @ v, torch.ones(4))
    assert int(info.status) == Status.BREAKDOWN


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_krylov_solvers_handle_a_subnormal_right_hand_side(dtype):
    """b below the smallest normal number: the unit scaling is clamped at finfo.tiny (a
    power of two with a finite reciprocal), so the solve stays exact instead of NONFINITE."""
    tiny = torch.finfo(dtype).tiny / 64
    b = torch.full((4,), tiny, dtype=dtype)
    for solver in (CG(), GMRES(), MINRES(), BiCGStab()):
        x, info = solver(lambda v: 2 * v, b)
        assert int(info.status) == Status.SUCCESS, (solver, info)
        torch.testing.assert_close(x, b / 2, rtol=1e-6, atol=0)
        xb, infob = solver(lambda v: 2 * v, b.expand(2, 4), batch_dims=1)
        assert bool((infob.status == Status.SUCCESS).all())
        torch.testing.assert_close(xb, (b / 2).expand(2, 4), rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", ["cholesky", "lu"])
def test_direct_never_reports_success_with_a_large_residual(method):
    """Rank-(n-1) projectors I - u u^T: the pivot test may pass on a rounding-noise pivot,
    and x is then garbage; the residual check must report it (INACCURATE or BREAKDOWN),
    never SUCCESS with a residual far above sqrt(eps)."""
    flagged = 0
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        u = torch.randn(6, 1, generator=g, dtype=torch.float64)
        P = torch.eye(6, dtype=torch.float64) - u @ u.T / (u.T @ u)
        b = torch.randn(6, generator=g, dtype=torch.float64)
        x, info = Direct(method)(lambda v: P @ v, b)
        if int(info.status) == Status.SUCCESS:
            assert float((P @ x - b).norm()) <= 1e-6 * float(b.norm())
        else:
            assert int(info.status) in (Status.INACCURATE, Status.BREAKDOWN)
            flagged += 1
    assert flagged == 60  # b has a component along u: no seed is solvable


@pytest.mark.parametrize("method", ["cholesky", "lu"])
def test_direct_residual_check_is_blind_to_units_and_passes_solvable_ill_conditioned_systems(method):
    """D M D with D spanning 1e-6..1e6 (M SPD, condition 1e4) and a unit-scale matrix with
    condition 1e8: both are solved to full accuracy and reported SUCCESS."""
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    M = Q @ torch.diag(torch.logspace(0, 4, 8, dtype=torch.float64)) @ Q.T
    D = torch.diag(torch.logspace(-6, 6, 8, dtype=torch.float64))
    ill = Q @ torch.diag(torch.logspace(0, 8, 8, dtype=torch.float64)) @ Q.T
    for A in (D @ M @ D, ill):
        b = torch.randn(8, generator=g, dtype=torch.float64)
        x, info = Direct(method)(lambda v: A @ v, b)
        assert int(info.status) == Status.SUCCESS
        torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-6, atol=0)


@pytest.mark.parametrize("solver", [CG(), GMRES(), MINRES(), BiCGStab(), NormalCG(), Direct(), Direct("lu"),
                                    Neumann(terms=200, alpha=0.25)], ids=lambda s: repr(s)[:24])
def test_a_float32_rhs_whose_sum_of_squares_overflows_is_solved(solver):
    """b = [1e30, 1, 1, 1] in float32: ||b||^2 overflows although ||b|| = 1e30 is representable.
    The norms are then taken as m ||b / m||: a correct x, SUCCESS and ||b|| reported, for one
    system and for a batch; a b whose norm itself exceeds the range is refused by name."""
    b = torch.tensor([1e30, 1.0, 1.0, 1.0], dtype=torch.float32)
    x, info = solver(lambda v: 2 * v, b)
    assert int(info.status) == Status.SUCCESS
    torch.testing.assert_close(x, b / 2, rtol=1e-6, atol=0)
    assert float(info.b_norm) == pytest.approx(1e30, rel=1e-6)
    xb, infob = solver(lambda v: 2 * v, torch.stack([b, torch.ones_like(b)]), batch_dims=1)
    assert bool((infob.status == Status.SUCCESS).all())
    torch.testing.assert_close(xb[0], b / 2, rtol=1e-6, atol=0)
    with pytest.raises(FloatingPointError, match="overflows"):
        solver(lambda v: 2 * v, torch.full((2,), 3e38, dtype=torch.float32))
    # under vmap (values unreadable) the norms are scaled too
    b_norm = torch.func.vmap(lambda b_: solver(lambda v: 2 * v, b_)[1].b_norm)(b[None])
    assert float(b_norm[0]) == pytest.approx(1e30, rel=1e-6)


def test_neumann_reports_a_series_that_made_no_progress():
    """alpha = 1 on an operator of scale 1e-8: the terms (I - alpha A)^k b do not shrink and
    x ~ alpha K b is off by 1e8; the status says so (MAX_ITERATIONS), per element.  A
    series that does make progress, even a crude one (5 terms, residual ~ 0.5), and
    alpha=None on the tiny operator, stay SUCCESS."""
    g = torch.Generator().manual_seed(0)
    M = torch.randn(6, 6, generator=g, dtype=torch.float64)
    A = M @ M.T / 6 + torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    tiny = 1e-8 * A
    _, info = Neumann(terms=20, alpha=1.0)(lambda v: tiny @ v, b)
    assert int(info.status) == Status.MAX_ITERATIONS
    assert float(info.relative_residual) > 0.99
    x, info = Neumann(terms=200, alpha=None)(lambda v: tiny @ v, b)
    assert int(info.status) == Status.SUCCESS
    torch.testing.assert_close(x, torch.linalg.solve(tiny, b), rtol=1e-6, atol=0)
    alpha = 0.1 / float(torch.linalg.eigvalsh(A)[-1])
    _, info = Neumann(terms=5, alpha=alpha)(lambda v: A @ v, b)
    assert int(info.status) == Status.SUCCESS and 0.3 < float(info.relative_residual) < 0.999
    batch = torch.stack([tiny, A])  # per element: the stalled one is flagged, the other is not
    _, info = Neumann(terms=20, alpha=1.0 / float(torch.linalg.eigvalsh(A)[-1]))(
        lambda v: (batch @ v.unsqueeze(-1)).squeeze(-1), b.expand(2, 6), batch_dims=1)
    assert info.status.tolist() == [Status.MAX_ITERATIONS, Status.SUCCESS]


def test_gmres_never_returns_an_iterate_worse_than_its_start():
    """The adjoint of a Sinkhorn fixed point without its gauge: singular (the potentials are
    defined up to a shift) with an inconsistent b.  A 20-step cycle solves a rotated H that
    is numerically singular as a whole although each pivot passes, and its update would
    blow x up to ~1e17 with 19x the residual; it is discarded: BREAKDOWN at the previous
    iterate, whose residual is at most ||b||."""
    torch.manual_seed(1)
    n, eps = 100, 0.05
    C = torch.rand(n, n, dtype=torch.float64)

    def sweep(f, g):
        f = -eps * math.log(n) - eps * torch.logsumexp((g[None, :] - C) / eps, 1)
        return f, -eps * math.log(n) - eps * torch.logsumexp((f[:, None] - C) / eps, 0)

    f = g = torch.zeros(n, dtype=torch.float64)
    for _ in range(2000):
        f, g = sweep(f, g)
    J = torch.cat(torch.func.jacrev(lambda f, g: torch.cat(sweep(f, g)), argnums=(0, 1))(f, g), 1)
    A = (torch.eye(2 * n, dtype=torch.float64) - J).T
    b = torch.cat([torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)])
    x, info = GMRES()(lambda v: A @ v, b)
    assert int(info.status) == Status.BREAKDOWN
    assert float((A @ x - b).norm()) <= float(b.norm()) * (1 + 1e-12)
    consistent = A @ torch.randn(2 * n, dtype=torch.float64)  # same operator, b in the range: solved
    xb, infob = GMRES()(lambda v: v @ A.T, torch.stack([b, consistent]), batch_dims=1)
    assert infob.status.tolist() == [Status.BREAKDOWN, Status.SUCCESS]
    assert float((A @ xb[1] - consistent).norm()) <= 1e-6 * float(consistent.norm())


@pytest.mark.parametrize("warm", [False, True])
def test_cg_breakdown_never_returns_an_iterate_worse_than_its_start(warm):
    """A = diag(I, 0) (a lower level singular in half its variables, as problem M1), b =
    (b1, b2): the first CG iterate is x1 = x0 + (||r0||^2 / ||r0_1||^2) r0, whose residual
    exceeds ||r0|| when the null-space part dominates; the second step breaks down.  That
    element stops at its start, the other one (range part dominant) at x1, and the batched
    solve agrees with the single ones."""
    n = 4
    A = torch.diag(torch.cat([torch.ones(n), torch.zeros(n)])).to(torch.float64)
    ones = torch.ones(n, dtype=torch.float64)
    B = torch.stack([torch.cat([0.1 * ones, ones]), torch.cat([ones, 0.1 * ones])])
    X0 = torch.stack([torch.cat([0.5 * ones, -ones]), torch.cat([-ones, 2 * ones])]) if warm else torch.zeros_like(B)
    R0 = B - X0 @ A
    first = X0 + (R0.square().sum(1) / R0[:, :n].square().sum(1)).unsqueeze(1) * R0  # x1 in closed form
    assert float((B[0] - A @ first[0]).norm()) > float(R0[0].norm())  # worse than the start
    assert float((B[1] - A @ first[1]).norm()) < float(R0[1].norm())
    expected = torch.stack([X0[0], first[1]])
    xb, infob = CG()(lambda v: v @ A, B, X0 if warm else None, batch_dims=1)
    assert infob.status.tolist() == [Status.BREAKDOWN, Status.BREAKDOWN]
    torch.testing.assert_close(xb, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(infob.residual_norm, (B - expected @ A).norm(dim=1), rtol=1e-12, atol=1e-12)
    for i in range(2):
        x, info = CG()(lambda v: A @ v, B[i], X0[i] if warm else None)
        assert int(info.status) == Status.BREAKDOWN
        torch.testing.assert_close(x, expected[i], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(info.residual_norm, (B[i] - A @ x).norm(), rtol=1e-12, atol=1e-12)


def test_cg_breakdown_on_a_nan_product_agrees_between_single_and_batched_solves():
    """Element 0's second product is NaN (a breakdown): its residual must stay the last
    finite one (0 * NaN in the update would make it NaN, and the comparison with the
    start would then keep the worse iterate); element 1 goes on and converges."""
    n = 8
    A = torch.diag(torch.cat([torch.ones(4), torch.zeros(4)])).to(torch.float64) + 1e-3 * torch.eye(n, dtype=torch.float64)
    b0 = torch.cat([0.1 * torch.ones(4), torch.ones(4)]).to(torch.float64)
    b1 = torch.linspace(1, 2, n, dtype=torch.float64)

    def poisoned(batched):
        calls = [0]

        def matvec(v):
            calls[0] += 1
            out = v @ A if batched else A @ v
            if calls[0] == 2:
                out = out.clone()
                out[0 if batched else ...] = math.nan
            return out
        return matvec

    x, info = CG(maxiter=50)(poisoned(False), b0)
    xb, infob = CG(maxiter=50)(poisoned(True), torch.stack([b0, b1]), batch_dims=1)
    assert int(info.status) == Status.BREAKDOWN and infob.status.tolist() == [Status.BREAKDOWN, Status.SUCCESS]
    torch.testing.assert_close(xb[0], x, rtol=1e-12, atol=1e-12)
    assert float((b0 - A @ x).norm()) <= float(b0.norm()) * (1 + 1e-12)
    assert float((b1 - A @ xb[1]).norm()) <= 1e-6 * float(b1.norm())


def test_cg_breakdown_on_a_nan_preconditioner_keeps_the_iterate_in_both_paths():
    """M's second output is NaN for element 0: the direction p turns NaN, and 0 * NaN in
    the update of x made the batched element NaN (NONFINITE) where the single solve stops
    at a finite iterate (BREAKDOWN)."""
    n = 8
    A = torch.diag(torch.linspace(1, 4, n, dtype=torch.float64))
    b0, b1 = torch.linspace(1, 2, n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)

    def poisoned(batched):
        calls = [0]

        def M(r):
            calls[0] += 1
            out = r / 2
            if calls[0] == 2:
                out = out.clone()
                out[0 if batched else ...] = math.nan
            return out
        return M

    x, info = CG(maxiter=50, M=poisoned(False))(lambda v: A @ v, b0)
    xb, infob = CG(maxiter=50, M=poisoned(True))(lambda v: v @ A, torch.stack([b0, b1]), batch_dims=1)
    assert int(info.status) == Status.BREAKDOWN and infob.status.tolist() == [Status.BREAKDOWN, Status.SUCCESS]
    assert bool(torch.isfinite(x).all())
    torch.testing.assert_close(xb[0], x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xb[1], b1 / torch.diagonal(A), rtol=1e-7, atol=1e-9)


# --------------------------------------------------------------------------- rectangular systems
# NormalCG and Direct("lstsq") solve A x = b with A of shape m x n (x0 gives the unknown's
# structure, shape and dtype): the minimum-norm least-squares solution pinv(A) b, as JAXopt's
# solve_normal_cg(matvec, b, init=zeros(n)) and Lineax's least-squares solvers do.

LEAST_SQUARES = {"NormalCG": NormalCG(CG(tol=1e-12)), "Direct-lstsq": Direct("lstsq")}
RECTANGULAR = [(2, 3), (5, 3)]  # under-determined (min-norm), over-determined (least squares)


def rect_problem(m, n, seed=0, dtype=torch.float64, batch=()):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*batch, m, n, generator=g, dtype=dtype)
    b = torch.randn(*batch, m, generator=g, dtype=dtype)
    return A, b


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("m, n", RECTANGULAR)
@pytest.mark.parametrize("name", list(LEAST_SQUARES))
def test_solve_normal_cg_nonsquare(name, m, n, dtype):
    """JAXopt's linear_solve_test.test_solve_normal_cg_nonsquare: x = pinv(A) b; the info
    reports the residual of the original system (not small when m > n) and success by
    the normal residual A^T (b - A x)."""
    A, b = rect_problem(m, n, dtype=dtype)
    solver = LEAST_SQUARES[name] if dtype == torch.float64 else with_default_tol(LEAST_SQUARES[name])
    x, info = solver(lambda v: A @ v, b, x0=torch.zeros(n, dtype=dtype))
    assert x.shape == (n,) and x.dtype == dtype
    tight = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(x, torch.linalg.pinv(A.double()).to(dtype) @ b, **tight)
    assert int(info.status) == Status.SUCCESS and bool(info.converged)
    torch.testing.assert_close(info.residual_norm, torch.linalg.vector_norm(b - A @ x), **tight)
    torch.testing.assert_close(info.b_norm, torch.linalg.vector_norm(b))
    if m > n:  # inconsistent: the residual stays, orthogonal to the range of A
        assert float(info.residual_norm) > 0.1 * float(info.b_norm)
        torch.testing.assert_close(A.T @ (b - A @ x), torch.zeros(n, dtype=dtype), **tight)
        torch.testing.assert_close(x, torch.linalg.lstsq(A, b.unsqueeze(-1)).solution.squeeze(-1), **tight)


def test_normal_cg_rectangular_warm_start_keeps_its_null_space_part():
    """From x0 != 0, CG on the normal equations returns pinv(A) b plus x0's null-space part
    (the least-squares solution nearest x0); Direct ignores x0."""
    A, b = rect_problem(2, 3)
    x0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    P = torch.eye(3, dtype=torch.float64) - torch.linalg.pinv(A) @ A
    x, _ = NormalCG(CG(tol=1e-12))(lambda v: A @ v, b, x0)
    torch.testing.assert_close(x, torch.linalg.pinv(A) @ b + P @ x0)
    x, _ = Direct("lstsq")(lambda v: A @ v, b, x0)
    torch.testing.assert_close(x, torch.linalg.pinv(A) @ b)


@pytest.mark.parametrize("name", list(LEAST_SQUARES))
def test_rectangular_pytree_unknown_and_pytree_b(name):
    """x0 a dict (its structure, shapes and dtypes are x's), b a tuple: A maps one to the other."""
    A, b = rect_problem(4, 6, seed=3)
    x0 = {"u": torch.zeros(2, dtype=torch.float64), "w": torch.zeros(2, 2, dtype=torch.float64)}

    def matvec(t):
        Av = A[:, :2] @ t["u"].double() + A[:, 2:] @ t["w"].reshape(4)  # leaves in x0's dtypes
        return Av[:1], Av[1:]

    x, info = LEAST_SQUARES[name](matvec, (b[:1], b[1:]), x0)
    assert set(x) == {"u", "w"} and x["u"].shape == (2,) and x["w"].shape == (2, 2)
    flat = torch.cat([x["u"], x["w"].reshape(4)])
    torch.testing.assert_close(flat, torch.linalg.pinv(A) @ b)
    assert bool(info.converged)
    # the unknowns keep x0's dtypes (computed in the promoted one)
    x0_mixed = {"u": torch.zeros(2, dtype=torch.float32), "w": torch.zeros(2, 2, dtype=torch.float64)}
    x, _ = LEAST_SQUARES[name](matvec, (b[:1], b[1:]), x0_mixed)
    assert x["u"].dtype == torch.float32 and x["w"].dtype == torch.float64


@pytest.mark.parametrize("m, n", RECTANGULAR)
@pytest.mark.parametrize("name", list(LEAST_SQUARES))
def test_rectangular_batched_and_vmapped(name, m, n):
    """batch_dims=1 (one system per element, one with b = 0) and torch.func.vmap, over
    (A, b) and over A alone, all equal the batched pinv(A) b."""
    solver = LEAST_SQUARES[name]
    A, b = rect_problem(m, n, seed=4, batch=(3,))
    b[1] = 0
    want = (torch.linalg.pinv(A) @ b.unsqueeze(-1)).squeeze(-1)
    x0 = torch.ones(3, n, dtype=torch.float64)  # ignored where b = 0
    x0[0] = 0
    x0[2] = 0
    x, info = solver(matvec_of(A), b, x0, batch_dims=1)
    torch.testing.assert_close(x, want)
    assert info.status.tolist() == [Status.SUCCESS] * 3 and info.residual_norm.shape == (3,)
    residual = b - (A @ x.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(info.residual_norm, torch.linalg.vector_norm(residual, dim=-1))
    zeros = torch.zeros(n, dtype=torch.float64)
    x, info = torch.func.vmap(lambda A_, b_: solver(lambda v: A_ @ v, b_, zeros))(A, b)
    torch.testing.assert_close(x, want)
    assert info.status.shape == (3,) and bool(info.converged.all())
    x = torch.func.vmap(lambda A_: solver(lambda v: A_ @ v, b[0], zeros)[0])(A)
    torch.testing.assert_close(x, (torch.linalg.pinv(A) @ b[0].unsqueeze(-1)).squeeze(-1))


@pytest.mark.parametrize("name", list(LEAST_SQUARES))
def test_rectangular_complex(name):
    g = torch.Generator().manual_seed(5)
    for m, n in RECTANGULAR:
        A = torch.randn(m, n, generator=g, dtype=torch.complex128)
        b = torch.randn(m, generator=g, dtype=torch.complex128)
        x, info = LEAST_SQUARES[name](matvec_of(A), b, torch.zeros(n, dtype=torch.complex128))
        torch.testing.assert_close(x, torch.linalg.pinv(A) @ b)
        assert bool(info.converged)
    with pytest.raises(TypeError, match="`x0`.*and `b`.*both real or both complex"):
        LEAST_SQUARES[name](lambda v: A @ v, b, torch.zeros(n, dtype=torch.float64))


@pytest.mark.parametrize("m, n", RECTANGULAR)
@pytest.mark.parametrize("name", list(LEAST_SQUARES))
def test_rectangular_gradients_match_pinv(name, m, n):
    """Derivatives with respect to A (captured by matvec) and b: gradcheck, and reverse and
    forward mode against those of pinv(A) b (with the null space's motion for m < n)."""
    solver = LEAST_SQUARES[name]
    A, b = rect_problem(m, n, seed=6)
    A.requires_grad_()
    b.requires_grad_()
    zeros = torch.zeros(n, dtype=torch.float64)

    def solve(A_, b_):
        return solver(lambda v: A_ @ v, b_, zeros)[0]

    def reference(A_, b_):
        return torch.linalg.pinv(A_) @ b_

    assert torch.autograd.gradcheck(solve, (A, b), atol=1e-7, rtol=1e-6)
    want = torch.func.jacrev(reference, argnums=(0, 1))(A, b)
    for jac in (torch.func.jacrev, torch.func.jacfwd):
        got = jac(solve, argnums=(0, 1))(A, b)
        for g_, w_ in zip(got, want):
            torch.testing.assert_close(g_, w_, rtol=1e-8, atol=1e-10)
    c = torch.randn(n, dtype=torch.float64)
    gA, gb = torch.autograd.grad((solve(A, b) * c).sum(), (A, b))
    wA, wb = torch.autograd.grad((reference(A, b) * c).sum(), (A, b))
    torch.testing.assert_close(gA, wA)
    torch.testing.assert_close(gb, wb)
    import torch.autograd.forward_ad as fwAD

    dA, db = torch.randn_like(A), torch.randn_like(b)
    with fwAD.dual_level():
        x = solve(fwAD.make_dual(A.detach(), dA), fwAD.make_dual(b.detach(), db))
        tangent = fwAD.unpack_dual(x).tangent
    torch.testing.assert_close(tangent, torch.func.jvp(reference, (A.detach(), b.detach()), (dA, db))[1])


def test_rectangular_gradients_batched_with_preconditioner_and_transpose():
    """A batch of 2 x 4 systems (batch_dims=1), CG with a preconditioner of the unknowns'
    normal equations (the b-space stage of the adjoint runs without it), and a matvec
    with its own .transpose: the gradients of pinv(A) b."""
    A, b = rect_problem(2, 4, seed=7, batch=(3,))
    A.requires_grad_()
    b.requires_grad_()
    zeros = torch.zeros(3, 4, dtype=torch.float64)
    solver = NormalCG(CG(tol=1e-12, M=lambda r: 0.5 * r))

    def matvec_with_transpose(A_):
        mv = matvec_of(A_)
        mv.transpose = lambda w: (A_.mT @ w.unsqueeze(-1)).squeeze(-1)
        return mv

    want = torch.autograd.grad(((torch.linalg.pinv(A) @ b.unsqueeze(-1)).squeeze(-1) ** 2).sum(), (A, b))
    for make in (matvec_of, matvec_with_transpose):
        x, info = solver(make(A), b, zeros, batch_dims=1)
        assert bool(info.converged.all())
        got = torch.autograd.grad((x ** 2).sum(), (A, b))
        for g_, w_ in zip(got, want):
            torch.testing.assert_close(g_, w_)


def normal_equations_derivative(A, b):
    """The derivative of x = pinv(A) b left without the null space's motion (NormalCG's
    rule for a square or over-determined A): dx = (A^T A)^+ (dA^T r - A^T dA x)."""
    x = torch.linalg.pinv(A) @ b
    r, gram = b - A @ x, torch.linalg.pinv(A.T @ A)
    return torch.func.jacrev(lambda M: gram @ (M.T @ r - A.T @ (M @ x)))(A)


@pytest.mark.parametrize("name", list(LEAST_SQUARES))
def test_rank_deficient_square_gradient_with_respect_to_the_operator(name):
    """Direct("lstsq") reads the rank off its SVD: the null space's motion is part of the
    derivative for a square rank-deficient A too (also under vmap, where the rank cannot be
    read and the term is always taken).  NormalCG cannot tell a rank-deficient square A
    from a full-rank one without an extra solve: the term is left out (documented)."""
    g = torch.Generator().manual_seed(8)
    A = torch.randn(5, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 5, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)  # inconsistent
    got = torch.func.jacrev(lambda M: LEAST_SQUARES[name](matvec_of(M), b)[0])(A)
    if name == "NormalCG":
        want = normal_equations_derivative(A, b)
        assert float((want - torch.func.jacrev(lambda M: torch.linalg.pinv(M) @ b)(A)).abs().max()) > 0.1
    else:
        want = torch.func.jacrev(lambda M: torch.linalg.pinv(M) @ b)(A)
        batched = torch.func.vmap(torch.func.jacrev(lambda M: LEAST_SQUARES[name](matvec_of(M), b)[0]))(
            torch.stack([A, A]))
        torch.testing.assert_close(batched, torch.stack([want, want]), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


def test_rectangular_without_unknowns_or_equations():
    b = make_rhs(3)
    for solver in LEAST_SQUARES.values():
        no_unknowns = torch.zeros(0, dtype=torch.float64)
        x, info = solver(lambda v: torch.zeros(3, dtype=torch.float64) + v.sum(), b, no_unknowns)
        assert x.shape == (0,) and bool(info.converged)
        torch.testing.assert_close(info.residual_norm, b.norm())
        x, info = solver(lambda v: v[:0], torch.zeros(0, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
        assert torch.equal(x, torch.zeros(4, dtype=torch.float64)) and float(info.residual_norm) == 0.0


@pytest.mark.parametrize("name", [n for n in SOLVERS if n not in ("NormalCG", "Direct-lstsq")])
def test_square_solvers_refuse_a_rectangular_system_naming_the_remedy(name):
    A, b = rect_problem(2, 3)
    with pytest.raises(ValueError, match=r"`x0` and `b` must have the same structure and shapes; got tensor of "
                                         r"shape \(3,\) and tensor of shape \(2,\)\. .* solves square systems.*"
                                         r'NormalCG or Direct\("lstsq"\)'):
        SOLVERS[name][0](lambda v: A @ v, b, x0=torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("m, n", RECTANGULAR)
def test_rectangular_matvec_without_x0_says_to_pass_x0(name, m, n):
    """Without x0 the unknown is taken shaped like b: the operator's shape error says so
    (not a bare size mismatch from inside torch.func.vjp or vmap)."""
    A, b = rect_problem(m, n)
    with pytest.raises(RuntimeError, match=r"`matvec` raised RuntimeError on a tree shaped like `b`.*pass "
                                           r'`x0` shaped like the unknown.*NormalCG or\s+Direct\("lstsq"\)'):
        SOLVERS[name][0](lambda v: A @ v, b)
    with pytest.raises(ValueError, match=r"returned 3 values where 2 were expected.*If A is rectangular.*pass `x0`"):
        SOLVERS[name][0](lambda v: torch.cat([v, v[:1]]), b[:2])


@pytest.mark.parametrize("name", list(LEAST_SQUARES))
def test_rectangular_argument_errors(name):
    solver = LEAST_SQUARES[name]
    A, b = rect_problem(2, 3, batch=(4,))
    with pytest.raises(ValueError, match=r"`x0` and `b` must share the batch shape \(4,\)"):
        solver(matvec_of(A), b, torch.zeros(5, 3, dtype=torch.float64), batch_dims=1)
    with pytest.raises(ValueError, match=r"returned tree .*'v'.* where a tree shaped like `b` was expected.*"
                                         r"`matvec` maps a tree shaped like `x0`"):
        solver(lambda t: {"v": A[0] @ t["u"]}, {"w": b[0]}, {"u": torch.zeros(3, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"returned 3 values where 2 were expected.*shaped like `x0`"):
        solver(lambda v: 2 * v, b[0], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("name", list(LEAST_SQUARES))
def test_rectangular_warm_start_is_not_differentiated(name):
    """From x0 != 0 NormalCG returns pinv(A) b + P x0 (P: the null-space projector); its
    derivatives are those of pinv(A) b, as documented (the derivative once took the x0 part
    into -A^+ dA x, matching neither map).  Over-determined (full column rank: P = 0), the
    map is pinv(A) b whatever x0, and gradcheck passes."""
    solver = LEAST_SQUARES[name]
    A, b = rect_problem(2, 4, seed=9)
    x0 = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)

    def solve(A_, b_):
        return solver(lambda v: A_ @ v, b_, x0)[0]

    def reference(A_, b_):
        return torch.linalg.pinv(A_) @ b_

    want = torch.func.jacrev(reference, argnums=(0, 1))(A, b)
    for jac in (torch.func.jacrev, torch.func.jacfwd):
        for g_, w_ in zip(jac(solve, argnums=(0, 1))(A, b), want):
            torch.testing.assert_close(g_, w_, rtol=1e-8, atol=1e-10)
    A_, b_ = A.clone().requires_grad_(), b.clone().requires_grad_()
    c = torch.randn(4, dtype=torch.float64)
    got = torch.autograd.grad((solve(A_, b_) * c).sum(), (A_, b_))
    wanted = torch.autograd.grad((reference(A_, b_) * c).sum(), (A_, b_))
    for g_, w_ in zip(got, wanted):
        torch.testing.assert_close(g_, w_)
    # batched, one warm start per element
    Ab, bb = rect_problem(2, 4, seed=10, batch=(3,))
    x0b = torch.randn(3, 4, dtype=torch.float64)
    got = torch.func.jacrev(lambda M: solver(matvec_of(M), bb, x0b, batch_dims=1)[0])(Ab)
    wanted = torch.func.jacrev(lambda M: (torch.linalg.pinv(M) @ bb.unsqueeze(-1)).squeeze(-1))(Ab)
    torch.testing.assert_close(got, wanted, rtol=1e-8, atol=1e-10)
    A, b = rect_problem(5, 3, seed=9)
    x0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    assert torch.autograd.gradcheck(solve, (A.requires_grad_(), b.requires_grad_()), atol=1e-7, rtol=1e-6)


def _counting(A):
    calls = [0]

    def matvec(v):
        calls[0] += 1
        return A @ v

    return matvec, calls


@pytest.mark.parametrize("m, n", [(6, 6), (8, 6)])
def test_least_squares_full_rank_operator_requiring_grad_costs_no_extra_solve(m, n):
    """For a square or over-determined A, NormalCG takes no null-space solve (the term is
    left out), and Direct("lstsq") none where its SVD finds full rank: an operator that
    requires grad costs the same products as before the null-space term existed, even with
    a tight inner budget (no ConvergenceWarning from a solve of the derivative)."""
    import warnings

    A, b = rect_problem(m, n, seed=11)
    A = A + 3 * torch.eye(m, n, dtype=torch.float64)
    x0 = None if m == n else torch.zeros(n, dtype=torch.float64)
    for solver in (NormalCG(CG(maxiter=3)), NormalCG(CG(tol=1e-12)), Direct("lstsq")):
        counts = []
        for requires_grad in (False, True):
            matvec, calls = _counting(A.clone().requires_grad_(requires_grad))
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a ConvergenceWarning of a derivative solve fails
                solver(matvec, b, x0)
            counts.append(calls[0])
        # recording adds the residual's product and the VJP's linearization, nothing more
        assert counts[1] <= counts[0] + 1, (solver, counts)


def test_direct_lstsq_full_rank_gradient_unchanged_and_under_determined_takes_the_term():
    """Direct("lstsq"): rank read off the SVD, so the derivative of a full-rank A needs no
    null-space solve (and equals pinv's); an under-determined one gets the term."""
    import bilevel.implicit.linear_solve._gradient as gradient

    taken = []
    original = gradient._Solves.coefficients

    def spy(self, x):
        taken.append(True)
        return original(self, x)

    for (m, n), expected in (((4, 4), False), ((6, 4), False), ((3, 5), True)):
        A, b = rect_problem(m, n, seed=12)
        A.requires_grad_()
        taken.clear()
        gradient._Solves.coefficients = spy
        try:
            for solver in (Direct("lstsq"), NormalCG(CG(tol=1e-12))):
                x = solver(matvec_of(A), b, torch.zeros(n, dtype=torch.float64))[0]
                (got,) = torch.autograd.grad(x.sum(), A)
                (want,) = torch.autograd.grad((torch.linalg.pinv(A) @ b).sum(), A)
                torch.testing.assert_close(got, want)
        finally:
            gradient._Solves.coefficients = original
        assert bool(taken) == expected and len(taken) in (0, 2)


def test_pinv_solve_off_cpu_path_matches_pinv():
    """The SVD solve that stands for LAPACK's gelsd off the CPU: pinv(A) b and the rank, with
    pinv's cut-off (here run on the CPU)."""
    from bilevel.implicit.linear_solve.direct import _pinv_solve

    g = torch.Generator().manual_seed(13)
    for dtype in (torch.float64, torch.complex128):
        full = torch.randn(3, 5, 4, generator=g, dtype=dtype)
        deficient = torch.randn(3, 5, 2, generator=g, dtype=dtype) @ torch.randn(3, 2, 4, generator=g, dtype=dtype)
        rhs = torch.randn(3, 5, 1, generator=g, dtype=dtype)
        for A, rank in ((full, 4), (deficient, 2), (full.mT[..., :4], 4)):
            r = rhs[..., : A.shape[-2], :]
            x, got_rank = _pinv_solve(A, r)
            torch.testing.assert_close(x, (torch.linalg.pinv(A) @ r).squeeze(-1))
            assert got_rank.tolist() == [rank] * 3


def test_rectangular_transpose_of_the_wrong_size_is_named():
    A, b = rect_problem(3, 5)

    def matvec(v):
        return A @ v

    matvec.transpose = lambda w: torch.cat([A.T @ w, w[:1]])
    with pytest.raises(ValueError, match=r"`matvec\.transpose` returned 6 values where 5 were expected: .*"
                                         r"`matvec` maps a tree shaped like `x0` \(the unknown; leaf shapes "
                                         r"\[\(5,\)\]\) to one shaped like `b` \(leaf shapes \[\(3,\)\]\), and "
                                         r"`matvec\.transpose` maps back\."):
        NormalCG()(matvec, b, x0=torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"`matvec` \(or the preconditioner\) returned 4 values where 3 were "
                                         r"expected: .*`matvec` maps a tree shaped like `x0` \(the unknown; leaf "
                                         r"shapes \[\(5,\)\]\) to one shaped like `b` \(leaf shapes \[\(3,\)\]\)\.$"):
        NormalCG()(lambda v: v[:4], b, x0=torch.zeros(5, dtype=torch.float64))


def _raise(err):
    raise err


@pytest.mark.parametrize("name", ["CG", "GMRES", "NormalCG", "Direct-lstsq"])
def test_unrelated_operator_errors_pass_through_without_the_shape_hint(name):
    """Only torch's shape-mismatch messages get the hint on the unknown's shape: an index out
    of bounds, a user's own ValueError mentioning a size and vmap's dynamic-shape refusal
    reach the caller as they were raised."""
    solver = SOLVERS[name][0]
    A, b = make_matrix("spd", n=4), make_rhs(4)
    cases = [
        (IndexError, "index 7 is out of bounds", lambda v: A @ v[torch.tensor([0, 1, 2, 7])]),
        (ValueError, "batch size must be positive", lambda v: _raise(ValueError("batch size must be positive"))),
    ]
    for kind, message, matvec in cases:
        with pytest.raises((kind, RuntimeError)) as caught:
            solver(matvec, b)
        assert message in str(caught.value) and "x0" not in str(caught.value)
        if name in ("CG", "GMRES"):  # untouched (NormalCG's VJP and Direct's vmap name themselves)
            assert type(caught.value) is kind and str(caught.value).startswith(message)

    def dynamic(v):
        return A @ v[torch.nonzero(v > -1e9).squeeze(-1)]

    with pytest.raises(RuntimeError) as caught:
        torch.func.vmap(lambda b_: solver(dynamic, b_)[0])(torch.stack([b, b]))
    assert "dynamic shape" in str(caught.value) and "x0" not in str(caught.value)


@pytest.mark.parametrize("name", ["CG", "GMRES", "NormalCG", "Direct-lstsq"])
def test_genuine_rectangular_misuse_still_gets_the_hint(name):
    """A rectangular matvec without x0 (plain, as a callable object, through a partial, and a
    matmul of a batch), and a broadcast of mismatched sizes: the hint; a preconditioner's own
    shape error is not blamed on `matvec`."""
    import functools

    solver = SOLVERS[name][0]
    A, b = rect_problem(3, 5)

    class Operator:
        def __call__(self, v):
            return A @ v

    hint = r"`matvec` raised RuntimeError on a tree shaped like `b`.*pass `x0` shaped like the unknown"
    for matvec in (lambda v: A @ v, Operator(), functools.partial(torch.mv, A), lambda v: v * torch.ones(5)):
        with pytest.raises(RuntimeError, match=hint):
            solver(matvec, b)
    if name == "CG":
        S = make_matrix("spd", n=3)
        with pytest.raises(RuntimeError) as caught:
            CG(M=lambda r: A @ r)(lambda v: S @ v, make_rhs(3))
        assert "size mismatch" in str(caught.value) and "`matvec` raised" not in str(caught.value)
