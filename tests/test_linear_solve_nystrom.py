"""The randomized Nyström solver: exact at full rank, the Nyström formula at low rank,
a preconditioner that cuts CG's iterations, batched, differentiable, and its failures."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import Ridge

import bilevel
from bilevel.implicit.linear_solve import CG, Nystrom
from bilevel.status import Status

F64 = torch.float64


def spectrum_matrix(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    n = eigenvalues.numel()
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=eigenvalues.dtype))
    return Q @ torch.diag(eigenvalues) @ Q.T


def decaying(n: int = 120, head: int = 25, dtype=F64) -> torch.Tensor:
    """25 eigenvalues from 1e4 down by 0.7 each, then a flat tail in [1, 2]."""
    return torch.cat([1e4 * 0.7 ** torch.arange(head, dtype=dtype), torch.linspace(1, 2, n - head, dtype=dtype)])


def test_full_rank_sketch_solves_exactly():
    A = spectrum_matrix(torch.logspace(3, 0, 40, dtype=F64))
    b = torch.randn(40, generator=torch.Generator().manual_seed(1), dtype=F64)
    x, info = Nystrom(rank=40)(lambda v: A @ v, b)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-10, atol=0)
    assert int(info.status) == Status.SUCCESS and int(info.iterations) == 40  # the sketch's products


@pytest.mark.parametrize("rho", [None, 0.5])
def test_low_rank_formula_against_the_dense_nystrom_approximation(rho):
    """x = U max(L, rho)^-1 U^T b + (b - U U^T b) / rho, with U L U^T the Nyström approximation
    A Om (Om^T A Om)^-1 Om^T A for the same orthonormal sketch, computed densely here
    (rho = None: the smallest captured eigenvalue)."""
    n, k = 60, 12
    A = spectrum_matrix(decaying(n, 20))
    b = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=F64)
    x, info = Nystrom(rank=k, seed=3, rho=rho)(lambda v: A @ v, b)
    draw = torch.randn(n * k, generator=torch.Generator().manual_seed(3), dtype=F64).reshape(n, k)
    omega, _ = torch.linalg.qr(draw)
    Y = A @ omega
    approx = Y @ torch.linalg.solve(omega.T @ Y, Y.T)
    eigenvalues, vectors = torch.linalg.eigh(approx)
    L, U = eigenvalues[-k:], vectors[:, -k:]
    tail = L.min() if rho is None else torch.tensor(rho, dtype=F64)
    expected = U @ ((U.T @ b) / torch.maximum(L, tail)) + (b - U @ (U.T @ b)) / tail
    torch.testing.assert_close(x, expected, rtol=1e-8, atol=1e-12)
    # no tolerance without CG (like Neumann's terms): a success, with the residual it reached
    assert int(info.status) == Status.SUCCESS and float(info.relative_residual) > 1e-3
    assert float(info.residual_norm) == pytest.approx(float((b - A @ x).norm()), rel=1e-12)


def test_a_singular_operator_of_rank_at_most_the_sketch_gives_the_minimum_norm_solution():
    """A = diag(100, 50, 0, ..., 0) rotated: the Nyström approximation is A itself once the
    sketch has at least 2 columns, and for b in the range of A, x = A^+ b."""
    eigenvalues = torch.cat([torch.tensor([100.0, 50.0], dtype=F64), torch.zeros(8, dtype=F64)])
    A = spectrum_matrix(eigenvalues)
    b = A @ torch.randn(10, generator=torch.Generator().manual_seed(4), dtype=F64)
    x, info = Nystrom(rank=4)(lambda v: A @ v, b)
    torch.testing.assert_close(x, torch.linalg.pinv(A) @ b, rtol=1e-10, atol=1e-12)
    assert bool(info.converged)


@pytest.mark.parametrize("rank", [10, 25])
def test_as_preconditioner_cg_needs_fewer_products(rank):
    """The 25 leading eigenvalues (1e4 down to 0.2 over the tail's 1..2) are what CG
    spends its iterations on; preconditioned, the same tolerance takes fewer products
    in all (sketch included)."""
    A = spectrum_matrix(decaying())
    b = torch.randn(120, generator=torch.Generator().manual_seed(5), dtype=F64)
    exact = torch.linalg.solve(A, b)
    x_cg, info_cg = CG(maxiter=500, tol=1e-10)(lambda v: A @ v, b)
    x, info = Nystrom(rank=rank, maxiter=500, tol=1e-10)(lambda v: A @ v, b)
    assert bool(info.converged) and bool(info_cg.converged)
    torch.testing.assert_close(x, exact, rtol=1e-6, atol=0)  # tol 1e-10 on the residual, cond 1e4
    assert int(info.iterations) < int(info_cg.iterations)


def test_batched_systems_equal_a_loop():
    mats = torch.stack([spectrum_matrix(decaying(40, 10), seed=s) * (1 + s) for s in range(3)])
    b = torch.randn(3, 40, generator=torch.Generator().manual_seed(6), dtype=F64)
    solver = Nystrom(rank=12, maxiter=200, tol=1e-11)
    x, info = solver(lambda v: (mats @ v.unsqueeze(-1)).squeeze(-1), b, batch_dims=1)
    assert info.status.shape == (3,) and bool(info.converged.all())
    for i in range(3):
        torch.testing.assert_close(x[i], torch.linalg.solve(mats[i], b[i]), rtol=1e-9, atol=0)


def test_pytree_scalar_and_float32():
    d = {"u": torch.tensor([2.0, 4.0]), "w": torch.tensor(8.0)}
    x, info = Nystrom(rank=3)(lambda v: {k: d[k] * v[k] for k in v}, {"u": torch.ones(2), "w": torch.tensor(2.0)})
    torch.testing.assert_close(x["u"], torch.tensor([0.5, 0.25]))
    torch.testing.assert_close(x["w"], torch.tensor(0.25))
    assert x["u"].dtype == torch.float32 and bool(info.converged)
    x, info = Nystrom()(lambda v: 3 * v, torch.tensor(2.0, dtype=F64))  # 0-d: rank 1 is all there is
    assert float(x) == pytest.approx(2 / 3) and int(info.iterations) == 1


def test_reproducible_from_its_seed():
    A = spectrum_matrix(decaying(50, 15))
    b = torch.ones(50, dtype=F64)
    first, _ = Nystrom(rank=8, seed=7)(lambda v: A @ v, b)
    again, _ = Nystrom(rank=8, seed=7)(lambda v: A @ v, b)
    other, _ = Nystrom(rank=8, seed=8)(lambda v: A @ v, b)
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize("solver", [Nystrom(rank=6), Nystrom(rank=3, maxiter=60, tol=1e-12)],
                         ids=["full-rank", "preconditioned"])
def test_gradcheck_through_a_solve(solver):
    S = torch.randn(6, 6, generator=torch.Generator().manual_seed(9), dtype=F64)
    S = (S @ S.T + 6 * torch.eye(6, dtype=F64)).requires_grad_()
    b = torch.randn(6, generator=torch.Generator().manual_seed(10), dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda M, v: solver(lambda u: (0.5 * (M + M.T)) @ u, v)[0], (S, b))


def test_under_vmap_each_right_hand_side_is_solved():
    A = spectrum_matrix(torch.logspace(2, 0, 8, dtype=F64))
    bs = torch.randn(5, 8, generator=torch.Generator().manual_seed(11), dtype=F64)
    xs = torch.func.vmap(lambda v: Nystrom(rank=8)(lambda u: A @ u, v)[0])(bs)
    torch.testing.assert_close(xs, torch.linalg.solve(A, bs.T).T, rtol=1e-10, atol=1e-12)


def test_ridge_hypergradient_with_nystrom_pcg():
    problem = Ridge.make(n=40, d=15)
    lam = torch.full((15,), -1.0, dtype=F64)
    g = bilevel.hypergrad(problem.outer, problem.inner, lam, problem.solution(lam),
                          solve=Nystrom(rank=5, maxiter=100, tol=1e-12))
    torch.testing.assert_close(g, problem.hypergradient(lam), rtol=1e-8, atol=1e-10)


def test_an_indefinite_operator_is_a_breakdown_not_a_number():
    A = torch.diag(torch.tensor([1.0, -1.0, 2.0], dtype=F64))
    x, info = Nystrom(rank=3)(lambda v: A @ v, torch.ones(3, dtype=F64))
    assert int(info.status) == Status.BREAKDOWN and torch.equal(x, torch.zeros(3, dtype=F64))


def test_a_non_finite_operator_is_reported():
    x, info = Nystrom(rank=2)(lambda v: v * math.nan, torch.ones(3, dtype=F64))
    assert int(info.status) == Status.NONFINITE and bool(torch.isfinite(x).all())


@pytest.mark.parametrize("field, value", [("rank", 0), ("rank", 2.5), ("maxiter", -1), ("tol", 2.0),
                                          ("rho", 0.0), ("rho", math.inf), ("seed", -1), ("rank", True)])
def test_bad_settings_are_named(field, value):
    with pytest.raises((ValueError, TypeError), match=field):
        Nystrom(**{field: value})


def test_a_matvec_that_cannot_be_vmapped_is_named():
    def matvec(v):
        return v * float(v.sum() != 0)  # a host read: not vmappable

    with pytest.raises(RuntimeError, match="Nystrom.*vmap"):
        Nystrom(rank=2)(matvec, torch.ones(3, dtype=F64))


@pytest.mark.parametrize("maxiter", [0, 50])
def test_hermitian_complex_systems(maxiter):
    g = torch.Generator().manual_seed(12)
    M = torch.randn(8, 8, dtype=torch.complex128, generator=g)
    A = M @ M.mH + 8 * torch.eye(8, dtype=torch.complex128)
    b = torch.randn(8, dtype=torch.complex128, generator=g)
    x, info = Nystrom(rank=8 if maxiter == 0 else 3, maxiter=maxiter)(lambda v: A @ v, b)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-10, atol=1e-12)
    assert bool(info.converged) and info.residual_norm.dtype == F64


@pytest.mark.parametrize("dtype, scale", [(F64, 1e-170), (F64, 1e160), (torch.float32, 1e-30), (torch.float32, 1e30)])
@pytest.mark.parametrize("maxiter", [0, 100])
def test_tiny_and_huge_right_hand_sides(dtype, scale, maxiter):
    """Solved on b / s like the Krylov solvers: no underflow to a zero residual, no inf threshold."""
    A = spectrum_matrix(torch.logspace(2, 0, 30, dtype=F64)).to(dtype)
    b = torch.ones(30, dtype=dtype) * scale
    x, info = Nystrom(rank=30 if maxiter == 0 else 5, maxiter=maxiter, tol=1e-5)(lambda v: A @ v, b)
    reference = torch.linalg.solve(A.double(), torch.ones(30, dtype=F64)) * scale
    assert bool(info.converged)
    assert float(((x.double() - reference) / scale).norm() / (reference / scale).norm()) < 1e-3


def test_a_huge_operator_in_float32():
    A = spectrum_matrix(torch.logspace(2, 0, 20, dtype=F64)).float() * 1e30
    b = torch.ones(20)
    x, info = Nystrom(rank=20)(lambda v: A @ v, b)
    assert bool(info.converged) and bool(torch.isfinite(x).all())


def test_full_rank_is_exact_up_to_condition_1e9_in_float64():
    A = spectrum_matrix(torch.logspace(9, 0, 40, dtype=F64))
    b = torch.randn(40, generator=torch.Generator().manual_seed(13), dtype=F64)
    x, _ = Nystrom(rank=40)(lambda v: A @ v, b)
    exact = torch.linalg.solve(A, b)
    assert float((x - exact).norm() / exact.norm()) < 1e-5


def test_the_zero_operator_is_a_breakdown():
    x, info = Nystrom(rank=3)(lambda v: 0 * v, torch.ones(3, dtype=F64))
    assert int(info.status) == Status.BREAKDOWN and torch.equal(x, torch.zeros(3, dtype=F64))


def test_alone_the_solve_is_linear_and_its_jacobian_symmetric():
    """x = P b with P fixed by the operator: linear in b, and jacrev = jacfwd = P, a symmetric
    matrix (a b-dependent rescaling made the derivatives inconsistent)."""
    A = spectrum_matrix(decaying(8, 3))
    solve = lambda v: Nystrom(rank=3)(lambda u: A @ u, v)[0]  # noqa: E731
    g = torch.Generator().manual_seed(15)
    b1, b2 = torch.randn(8, generator=g, dtype=F64), torch.randn(8, generator=g, dtype=F64)
    torch.testing.assert_close(solve(b1 + b2), solve(b1) + solve(b2), rtol=1e-12, atol=1e-14)
    P = torch.stack([solve(e) for e in torch.eye(8, dtype=F64)], 1)
    torch.testing.assert_close(P, P.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.func.jacfwd(solve)(b1), P, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.func.jacrev(solve)(b1), P, rtol=1e-10, atol=1e-12)
