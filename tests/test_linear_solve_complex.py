"""Linear solvers on complex systems (complex128 / complex64), against torch.linalg.

Hermitian positive-definite systems for every solver, Hermitian indefinite ones
for the solvers that allow them, general (non-Hermitian) ones for GMRES,
BiCGStab, LU, lstsq and the normal equations; batching, warm starts, trees,
``vmap``, and the implicit gradient under PyTorch's conjugate Wirtinger
convention (``torch.autograd.gradcheck`` on complex inputs).
"""

import warnings

import pytest
import torch

from bilevel.implicit.linear_solve import (
    CG,
    GMRES,
    MINRES,
    Auto,
    BiCGStab,
    Direct,
    Neumann,
    NormalCG,
)
from bilevel.status import Status

N = 8
C128, C64 = torch.complex128, torch.complex64
KINDS = ("hpd", "hermitian_indefinite", "general")
HERMITIAN_ONLY = {"hpd"}

# name -> (solver, the problem kinds it must solve)
SOLVERS = {
    "CG": (CG(tol=1e-12), {"hpd"}),
    "MINRES": (MINRES(tol=1e-12), {"hpd", "hermitian_indefinite"}),
    "GMRES": (GMRES(tol=1e-12), set(KINDS)),
    "GMRES-restart3": (GMRES(tol=1e-12, restart=3, maxiter=600), {"hpd", "general"}),
    "BiCGStab": (BiCGStab(tol=1e-12), set(KINDS)),
    "NormalCG": (NormalCG(CG(tol=1e-12)), set(KINDS)),
    "NormalCG-MINRES": (NormalCG(MINRES(tol=1e-12)), {"general"}),
    "Direct-cholesky": (Direct("cholesky"), {"hpd"}),
    "Direct-lu": (Direct("lu"), set(KINDS)),
    "Direct-lstsq": (Direct("lstsq"), set(KINDS)),
    "Neumann": (Neumann(terms=300, alpha=None), {"hpd"}),
    "Auto": (Auto(), set(KINDS)),
    "Auto-symmetric": (Auto(symmetric=True), {"hpd"}),
    "Auto-krylov": (Auto(max_direct=0, tol=1e-12), set(KINDS)),
    "Auto-symmetric-krylov": (Auto(symmetric=True, max_direct=0, tol=1e-12), {"hpd"}),
}
CASES = [(name, kind) for name, (_, kinds) in SOLVERS.items() for kind in sorted(kinds)]
# the solvers whose operator must be Hermitian: a gradient check keeps it so
HERMITIAN_SOLVERS = {name for name, (_, kinds) in SOLVERS.items() if "general" not in kinds}


def make_matrix(kind, n=N, seed=0, dtype=C128, low=1.0, high=4.0):
    """A well-conditioned complex ``n x n`` matrix of the given kind (|spectrum| in [low, high])."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=C128))
    eig = torch.linspace(low, high, n, dtype=torch.float64)
    if kind == "hpd":
        A = Q @ torch.diag(eig.to(C128)) @ Q.mH
    elif kind == "hermitian_indefinite":
        signs = torch.tensor([(-1.0) ** i for i in range(n)], dtype=torch.float64)
        A = Q @ torch.diag((signs * eig).to(C128)) @ Q.mH
    elif kind == "general":
        A = 3 * torch.eye(n, dtype=C128) + torch.randn(n, n, generator=g, dtype=C128) / n**0.5
    elif kind == "singular":  # Hermitian, rank n - 2
        eig[:2] = 0
        A = Q @ torch.diag(eig.to(C128)) @ Q.mH
    else:
        raise ValueError(kind)
    return A.to(dtype)


def make_rhs(shape, seed=1, dtype=C128):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=C128).to(dtype)


def matvec_of(A):
    """``v -> A v`` for ``A`` of shape ``(*batch, n, n)`` and ``v`` of shape ``(*batch, n)``."""
    return lambda v: (A @ v.unsqueeze(-1)).squeeze(-1)


def reference(A, b):
    return torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)


def check_info(info, dtype=torch.float64):
    """The norms of ``info`` are real tensors of ``dtype``."""
    assert info.residual_norm.dtype == dtype and info.b_norm.dtype == dtype
    assert info.relative_residual.dtype == dtype
    assert info.status.dtype == torch.int64 and info.iterations.dtype == torch.int64


# --------------------------------------------------------------------------- correctness


def test_example_of_the_brief():
    """The 2 x 2 Hermitian positive-definite system every solver got wrong or refused."""
    A = torch.tensor([[2, 1j], [-1j, 3]], dtype=C128)
    b = torch.tensor([1, 1j], dtype=C128)
    expected = torch.linalg.solve(A, b)
    for solver in (CG(), MINRES(), GMRES(), BiCGStab(), Direct("lu"), Direct("cholesky"), Direct("lstsq"),
                   NormalCG(), Neumann(terms=100, alpha=0.25), Auto(), Auto(symmetric=True)):
        x, info = solver(lambda v: A @ v, b)
        torch.testing.assert_close(x, expected, rtol=1e-7, atol=1e-8, msg=lambda m: f"{solver}: {m}")
        assert int(info.status) == Status.SUCCESS, (solver, info)
        check_info(info)


@pytest.mark.parametrize("name, kind", CASES)
def test_matches_dense_solve(name, kind):
    solver, _ = SOLVERS[name]
    A, b = make_matrix(kind), make_rhs(N)
    x, info = solver(matvec_of(A), b)
    assert x.dtype == C128
    torch.testing.assert_close(x, reference(A, b), rtol=1e-9, atol=1e-10)
    assert int(info.status) == Status.SUCCESS, info.summary()
    assert float(info.relative_residual) < 1e-9
    check_info(info)


@pytest.mark.parametrize("name", ["CG", "MINRES", "GMRES", "BiCGStab"])
def test_default_tolerance(name):
    """``tol=None`` is ``sqrt(eps)`` of the real dtype behind the complex one."""
    solver = type(SOLVERS[name][0])()
    A, b = make_matrix("hpd"), make_rhs(N)
    x, info = solver(matvec_of(A), b)
    assert int(info.status) == Status.SUCCESS
    assert float(info.relative_residual) <= 10 * 1.5e-8


@pytest.mark.parametrize("name", ["CG", "Direct-cholesky", "Auto-symmetric-krylov"])
def test_hermitian_solvers_report_an_indefinite_operator(name):
    A, b = make_matrix("hermitian_indefinite"), make_rhs(N)
    _, info = SOLVERS[name][0](matvec_of(A), b)
    assert int(info.status) == Status.BREAKDOWN


def test_cholesky_checks_hermitian_not_symmetric():
    """A complex *symmetric* matrix (``A = A^T``, not ``A^H``) is no Cholesky input,
    even with a positive-definite real part; a Hermitian one is."""
    H = make_matrix("hpd")
    S = (H.real + H.real.mT) / 2 + 0.3j * torch.eye(N, dtype=torch.float64)  # symmetric, not Hermitian
    assert torch.equal(S, S.mT) and not torch.allclose(S, S.mH)
    _, info = Direct("cholesky")(matvec_of(S), make_rhs(N))
    assert int(info.status) == Status.BREAKDOWN
    x, info = Direct("cholesky")(matvec_of(H), make_rhs(N))
    assert int(info.status) == Status.SUCCESS
    torch.testing.assert_close(x, reference(H, make_rhs(N)))


@pytest.mark.parametrize("name", ["NormalCG", "Direct-lstsq"])
def test_singular_least_squares_solvers_give_minimum_norm_solution(name):
    A, b = make_matrix("singular"), make_rhs(N)  # inconsistent: b has a null-space part
    x, info = SOLVERS[name][0](matvec_of(A), b)
    torch.testing.assert_close(x, torch.linalg.pinv(A) @ b, rtol=1e-8, atol=1e-9)
    assert int(info.status) == Status.SUCCESS
    assert float(info.relative_residual) > 1e-3  # the original system is not solved


@pytest.mark.parametrize("n, rank", [(7, 5), (30, 20), (60, 40)])
def test_minres_stops_at_a_least_squares_solution_of_an_inconsistent_system(n, rank):
    """As for real systems: a Hermitian singular operator, b outside its range."""
    g = torch.Generator().manual_seed(n)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=C128))
    eig = torch.cat([torch.linspace(-3, 5, rank, dtype=torch.float64), torch.zeros(n - rank, dtype=torch.float64)])
    A = Q @ torch.diag(eig.to(C128)) @ Q.mH
    b = torch.randn(n, generator=g, dtype=C128)
    x, info = MINRES(maxiter=10 * n)(matvec_of(A), b)
    assert int(info.status) == Status.BREAKDOWN and int(info.iterations) <= rank + 5
    # normal equations A^H (A x - b) = 0 to the tolerance, with a bounded iterate
    normal = torch.linalg.norm(A.mH @ (A @ x - b)) / (torch.linalg.matrix_norm(A, 2) ** 2 * b.norm())
    assert float(normal) < 1e-7
    assert float(x.norm()) < 100 * float((torch.linalg.pinv(A) @ b).norm())


def test_preconditioned_cg():
    """A Hermitian positive-definite (Jacobi) preconditioner, on the single-system
    fast path (one system on the CPU) and on the batched one."""
    A = make_matrix("hpd") + torch.diag(torch.linspace(0, 50, N, dtype=torch.float64)).to(C128)
    b = make_rhs(N)
    d = A.diagonal().real
    solver = CG(tol=1e-12, M=lambda r: r / d)
    x, info = solver(matvec_of(A), b)
    torch.testing.assert_close(x, reference(A, b), rtol=1e-9, atol=1e-10)
    assert int(info.status) == Status.SUCCESS
    xb, infob = solver(matvec_of(A), torch.stack([b, 2 * b]), batch_dims=1)
    torch.testing.assert_close(xb, torch.stack([x, 2 * x]), rtol=1e-9, atol=1e-10)
    assert infob.status.tolist() == [Status.SUCCESS] * 2


def test_cg_single_and_batched_paths_agree():
    A, b = make_matrix("hpd"), make_rhs(N)
    x1, info1 = CG(tol=1e-12)(matvec_of(A), b)  # B = 1 on the CPU: the scalar path
    x2, info2 = CG(tol=1e-12)(matvec_of(A), torch.stack([b, b]), batch_dims=1)
    torch.testing.assert_close(x2, torch.stack([x1, x1]), rtol=1e-10, atol=1e-12)
    assert info2.iterations.tolist() == [int(info1.iterations)] * 2


def test_cg_out_of_budget_reports_a_real_residual():
    """A failed single-system CG reports its recursive residual: a real tensor."""
    A = make_matrix("hpd", high=1e3)
    x, info = CG(maxiter=2)(matvec_of(A), make_rhs(N))
    assert int(info.status) == Status.MAX_ITERATIONS
    check_info(info)
    true = float((make_rhs(N) - A @ x).norm())
    assert abs(float(info.residual_norm) - true) <= 1e-8 * true


def test_gmres_arnoldi_coefficients_are_conjugated():
    """An operator whose Krylov space needs the conjugated inner product: a unitary
    (normal, non-Hermitian) matrix with eigenvalues on the unit circle."""
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=C128))
    phases = torch.exp(1j * torch.linspace(0.1, 2.5, N, dtype=torch.float64))
    A = Q @ torch.diag(2 + phases) @ Q.mH
    b = make_rhs(N)
    for solver in (GMRES(tol=1e-12), GMRES(tol=1e-12, restart=2, maxiter=400), BiCGStab(tol=1e-12)):
        x, info = solver(matvec_of(A), b)
        torch.testing.assert_close(x, reference(A, b), rtol=1e-9, atol=1e-10)
        assert int(info.status) == Status.SUCCESS


# --------------------------------------------------------------------------- batching, warm starts, trees


@pytest.mark.parametrize("name", list(SOLVERS))
def test_batched_equals_loop(name):
    solver, kinds = SOLVERS[name]
    kind = "general" if "general" in kinds else "hpd"
    A = torch.stack([make_matrix(kind, seed=s) * (1 + s) for s in range(3)])
    b = make_rhs((3, N))
    x, info = solver(matvec_of(A), b, batch_dims=1)
    for field in ("iterations", "residual_norm", "b_norm", "status"):
        assert getattr(info, field).shape == (3,)
    check_info(info)
    for i in range(3):
        x_i, info_i = solver(matvec_of(A[i]), b[i])
        torch.testing.assert_close(x[i], x_i, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(x[i], reference(A[i], b[i]), rtol=1e-8, atol=1e-10)
        assert int(info.status[i]) == int(info_i.status) == Status.SUCCESS


def test_batch_with_a_zero_rhs_and_a_failing_element():
    """Per-element masks: b = 0 is solved at once, an indefinite element breaks down
    for CG, the others converge."""
    A = torch.stack([make_matrix("hpd"), make_matrix("hermitian_indefinite"), make_matrix("hpd", seed=2)])
    b = make_rhs((3, N))
    b[0] = 0
    x, info = CG(tol=1e-12)(matvec_of(A), b, batch_dims=1)
    assert info.status.tolist() == [Status.SUCCESS, Status.BREAKDOWN, Status.SUCCESS]
    assert int(info.iterations[0]) == 0 and bool((x[0] == 0).all())
    torch.testing.assert_close(x[2], reference(A[2], b[2]), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["CG", "MINRES", "GMRES", "BiCGStab", "NormalCG", "Auto-krylov"])
def test_warm_start(name):
    solver, kinds = SOLVERS[name]
    n = 40  # large enough for the warm start to save iterations at tol=1e-12
    A = make_matrix("general" if "general" in kinds else "hpd", n=n)
    b = make_rhs(n)
    exact = reference(A, b)
    x, info = solver(matvec_of(A), b, x0=exact)
    torch.testing.assert_close(x, exact, rtol=1e-9, atol=1e-10)
    if not name.startswith("NormalCG"):  # (its normal residual has its own scale)
        assert int(info.iterations) == 0
    close = exact + 1e-6 * make_rhs(n, seed=5)
    _, cold = solver(matvec_of(A), b)
    x, warm = solver(matvec_of(A), b, x0=close)
    torch.testing.assert_close(x, exact, rtol=1e-9, atol=1e-10)
    assert int(warm.status) == Status.SUCCESS and int(warm.iterations) < int(cold.iterations)


def test_warm_start_batched():
    A = torch.stack([make_matrix("general", seed=s) for s in range(3)])
    b = make_rhs((3, N))
    exact = reference(A, b)
    x0 = exact.clone()
    x0[1] = 0
    x, info = GMRES(tol=1e-12)(matvec_of(A), b, x0, batch_dims=1)
    torch.testing.assert_close(x, exact, rtol=1e-9, atol=1e-10)
    assert int(info.iterations[0]) == 0 and int(info.iterations[1]) > 0


@pytest.mark.parametrize("name, kind", [(n, k) for n, k in CASES if not n.startswith("Neumann")])
def test_complex64(name, kind):
    solver, _ = SOLVERS[name]
    if hasattr(solver, "tol") and solver.tol is not None:  # tol=1e-12 is below float32's reach
        solver = type(solver)(**{**solver.__dict__, "tol": None})
    if isinstance(solver, NormalCG):
        solver = NormalCG(type(solver.inner)())
    A, b = make_matrix(kind, dtype=C64), make_rhs(N, dtype=C64)
    x, info = solver(matvec_of(A), b)
    assert x.dtype == C64
    check_info(info, torch.float32)
    assert int(info.status) == Status.SUCCESS, info.summary()
    expected = reference(A.to(C128), b.to(C128)).to(C64)
    torch.testing.assert_close(x, expected, rtol=2e-3, atol=2e-3)


def test_tree_rhs():
    """A dict of complex leaves: one system over all of them."""
    A = make_matrix("hpd")
    b = {"u": make_rhs(5), "w": make_rhs((1, 3), seed=2)}

    def matvec(v):
        out = A @ torch.cat([v["u"], v["w"].reshape(3)])
        return {"u": out[:5], "w": out[5:].reshape(1, 3)}

    expected = reference(A, torch.cat([b["u"], b["w"].reshape(3)]))
    for solver in (CG(tol=1e-12), MINRES(tol=1e-12), GMRES(tol=1e-12), BiCGStab(tol=1e-12),
                   NormalCG(CG(tol=1e-12)), Direct("cholesky"), Direct("lu"), Auto()):
        x, info = solver(matvec, b)
        assert x["u"].dtype == x["w"].dtype == C128 and x["w"].shape == (1, 3)
        torch.testing.assert_close(torch.cat([x["u"], x["w"].reshape(3)]), expected, rtol=1e-9, atol=1e-10)
        assert int(info.status) == Status.SUCCESS


def test_tree_mixing_real_and_complex_leaves_is_refused():
    b = {"a": torch.ones(2, dtype=torch.float64), "c": torch.ones(1, dtype=C128)}
    with pytest.raises(TypeError, match="GMRES: `b` mixes real and complex leaves"):
        GMRES()(lambda v: v, b)


def test_no_unknowns():
    x, info = CG()(lambda v: v, torch.zeros(0, dtype=C64))
    assert x.shape == (0,) and x.dtype == C64
    check_info(info, torch.float32)


# --------------------------------------------------------------------------- vmap


@pytest.mark.parametrize("name", ["CG", "MINRES", "GMRES", "BiCGStab", "NormalCG", "Direct-lu", "Auto"])
def test_vmap_over_rhs_and_over_operator(name):
    solver, kinds = SOLVERS[name]
    A = make_matrix("general" if "general" in kinds else "hpd")
    b = make_rhs((3, N))
    x, info = torch.func.vmap(lambda bb: solver(matvec_of(A), bb))(b)
    torch.testing.assert_close(x, reference(A, b), rtol=1e-9, atol=1e-10)
    assert info.status.tolist() == [Status.SUCCESS] * 3
    check_info(info)
    As = torch.stack([A, 2 * A, A + A.mH + 20 * torch.eye(N, dtype=C128)])
    x, info = torch.func.vmap(lambda M: solver(matvec_of(M), b[0]))(As)
    torch.testing.assert_close(x, reference(As, b[0].expand(3, N)), rtol=1e-9, atol=1e-10)
    assert info.status.tolist() == [Status.SUCCESS] * 3


# --------------------------------------------------------------------------- adjoints


def test_normal_equations_need_the_adjoint_not_the_transpose():
    """A ``.transpose`` attribute of a complex operator is its adjoint ``A^H``; the
    plain transpose ``A^T`` fails the adjoint test."""
    A, b = make_matrix("general"), make_rhs(N)

    def matvec(v):
        return A @ v

    matvec.transpose = lambda v: A.mH @ v
    x, info = NormalCG(CG(tol=1e-12))(matvec, b)
    torch.testing.assert_close(x, reference(A, b), rtol=1e-9, atol=1e-10)
    assert int(info.status) == Status.SUCCESS
    matvec.transpose = lambda v: A.mT @ v
    with pytest.raises(RuntimeError, match="adjoint test"):
        NormalCG()(matvec, b)


def test_vjp_of_a_complex_matvec_is_the_adjoint():
    """What the transposing solvers rely on: ``torch.func.vjp`` returns ``A^H u``."""
    A, u = make_matrix("general"), make_rhs(N, seed=7)
    _, vjp = torch.func.vjp(lambda v: A @ v, make_rhs(N))
    torch.testing.assert_close(vjp(u)[0], A.mH @ u)


def test_conjugating_matvec_fails_the_adjoint_test():
    """``v -> conj(v)`` is real-linear but not complex-linear: no solver can use it."""
    with pytest.raises(RuntimeError, match="adjoint test"):
        NormalCG()(lambda v: v.conj(), make_rhs(N))


# --------------------------------------------------------------------------- gradients


GRAD_CASES = [
    "CG", "MINRES", "GMRES", "BiCGStab", "NormalCG", "Direct-cholesky", "Direct-lu", "Direct-lstsq",
    "Auto", "Auto-symmetric", "Auto-krylov", "Neumann",
]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "Neumann" else n
                                  for n in GRAD_CASES])  # Neumann's many terms: about 8 s
def test_gradcheck_wrt_rhs_and_captured_matrix(name):
    """Reverse and forward mode, w.r.t. ``b`` and a complex matrix the matvec captures
    (through its Hermitian part for the solvers that assume a Hermitian operator)."""
    solver, kinds = SOLVERS[name]
    hermitian = name in HERMITIAN_SOLVERS
    n = 4
    A = make_matrix("hpd" if hermitian else "general", n=n).requires_grad_()
    b = make_rhs(n).requires_grad_()

    def solve(b, M):
        if hermitian:
            M = (M + M.mH) / 2
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the derivative's own solves must converge
            return solver(lambda v: M @ v, b)[0]

    assert torch.autograd.gradcheck(solve, (b, A), eps=1e-6, atol=1e-6, rtol=1e-5, check_forward_ad=True)


@pytest.mark.parametrize("name", ["CG", "GMRES", "BiCGStab", "Direct-lu", "NormalCG"])
def test_gradient_matches_torch_linalg_solve(name):
    """A real loss of the complex solution: the same gradients as through
    ``torch.linalg.solve`` (conjugate Wirtinger convention), batched."""
    solver, kinds = SOLVERS[name]
    A0 = torch.stack([make_matrix("general" if "general" in kinds else "hpd", seed=s) for s in range(2)])
    b0 = make_rhs((2, N))
    target = make_rhs((2, N), seed=9)
    grads = []
    for how in ("solver", "dense"):
        A, b = A0.clone().requires_grad_(), b0.clone().requires_grad_()
        if how == "solver":
            x = solver(matvec_of(A), b, batch_dims=1)[0]
        else:
            x = reference(A, b)
        ((x - target).abs() ** 2).sum().backward()
        grads.append((A.grad, b.grad))
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-8, atol=1e-10)
    if name != "CG":  # CG differentiates w.r.t. a Hermitian operator, the dense solve does not
        torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-8, atol=1e-10)


def test_func_grad_through_a_complex_solve():
    A, b = make_matrix("general"), make_rhs(N)

    def loss(M, solve):
        return (solve(M, b).abs() ** 2).sum()

    via_solver = torch.func.grad(loss)(A, lambda M, b: GMRES(tol=1e-12)(matvec_of(M), b)[0])
    via_dense = torch.func.grad(loss)(A, reference)
    torch.testing.assert_close(via_solver, via_dense, rtol=1e-8, atol=1e-10)


def test_second_derivative_still_refused():
    A, b = make_matrix("general", n=3).requires_grad_(), make_rhs(3).requires_grad_()
    x = GMRES(tol=1e-12)(lambda v: A @ v, b)[0]
    (g,) = torch.autograd.grad((x.abs() ** 2).sum(), b, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivative"):
        torch.autograd.grad(g.abs().sum(), A)


def test_review_fixes_densify_adjoint_and_nonfinite_complex_b():
    """A densified complex operator's transpose is A^H (NormalCG and the transpose rule
    accept it); a NaN in a complex b is named as such, not as an overflow."""
    from bilevel.implicit.linear_solve import GMRES, NormalCG
    from bilevel.implicit.operators import densify

    gen = torch.Generator().manual_seed(5)
    A = torch.randn(6, 6, generator=gen, dtype=torch.complex128) + 3 * torch.eye(6, dtype=torch.complex128)
    b = torch.randn(6, generator=gen, dtype=torch.complex128)
    op = densify(lambda v: A @ v, b, 0, NormalCG())
    assert op is not None and getattr(op, "transpose", None) is not None
    torch.testing.assert_close(op.transpose(b), A.mH @ b)
    x, info = NormalCG()(op, b)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-10)
    Ar = A.clone().requires_grad_()
    x = GMRES()(densify(lambda v: Ar @ v, b, 0, GMRES()), b)[0]
    (g,) = torch.autograd.grad(x.abs().square().sum(), Ar)
    Ar2 = A.clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(torch.linalg.solve(Ar2, b).abs().square().sum(), Ar2)
    torch.testing.assert_close(g, g_ref, rtol=1e-7, atol=1e-10)
    bad = torch.tensor([1, complex("nan")], dtype=torch.complex128)
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        CG()(lambda v: v, bad)
