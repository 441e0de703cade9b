"""The estimate of the hyper-objective's curvature behind SOBA's default x step, against
closed forms and a dense reference, and what it changes for SOBA's defaults."""

import warnings

import pytest
import torch
from torch.func import hessian

import bilevel
from bilevel._tree import tree_flatten
from bilevel.algorithms import SOBA
from bilevel.algorithms._hyper_curvature import hyper_curvature
from bilevel.problems import logistic_breast_cancer, quadratic
from bilevel.solvers import LBFGS
from bilevel.status import StepSizeWarning


def estimate(problem, x, y, **options):
    xs, x_spec = tree_flatten(x)
    ys, y_spec = tree_flatten(y)
    return hyper_curvature(problem.outer, problem.inner, xs, ys, x_spec, y_spec, **options)


@pytest.mark.parametrize("d, m, seed", [(5, 3, 0), (40, 6, 1), (100, 3, 1)])
def test_matches_the_closed_form_on_quadratics(d, m, seed):
    """Problem Q: Phi''(x) = B^T A^-2 B + rho I exactly (f quadratic, no third derivatives);
    its norm is up to 9 times below the block-norm bound."""
    problem = quadratic(d=d, m=m, seed=seed)
    A, B, rho = problem.data["A"], problem.data["B"], problem.data["rho"]
    AiB = torch.linalg.solve(A, B)
    exact = float(torch.linalg.eigvalsh(AiB.T @ AiB + rho * torch.eye(m, dtype=A.dtype))[-1])
    x = torch.randn(m, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = problem.inner_solution(x)
    # the inner solves stop at a relative residual of 1e-3
    measured = estimate(problem, x, y, iterations=30, solve_iterations=200)
    assert measured.norm == pytest.approx(exact, rel=2e-3)
    # the tracking curvature: the Rayleigh quotient of A along w = A^-1 B u, u the top eigenvector
    u = torch.linalg.eigh(AiB.T @ AiB)[1][:, -1]
    w = AiB @ u
    ray = float(w @ A @ w / (w @ w))
    assert measured.tracking == pytest.approx(ray, rel=1e-2)
    eigenvalues = torch.linalg.eigvalsh(A)
    assert eigenvalues[0] < measured.tracking < eigenvalues[-1]


def test_matches_a_dense_reference_on_logistic_penalties():
    """30 log-penalties of logistic regression: the norm of
    A_F - E_F^T H^-1 B - B^T H^-1 E_F + B^T H^-1 C_F H^-1 B from dense Hessians at y*(x)."""
    problem = logistic_breast_cancer()
    x = problem.x0 + 0.3
    y, _ = LBFGS(maxiter=2000, tol=1e-12).run(lambda y_, x_: problem.inner(x_, y_), problem.y0, x)
    (_, _), (B, H) = hessian(problem.inner, argnums=(0, 1))(x, y)
    (A_F, _), (E_F, C_F) = hessian(problem.outer, argnums=(0, 1))(x, y)
    HiB, HiE = torch.linalg.solve(H, B), torch.linalg.solve(H, E_F)
    reference = A_F - E_F.T @ HiB - B.T @ HiE + HiB.T @ C_F @ HiB
    exact = float(torch.linalg.matrix_norm(reference, 2))
    assert estimate(problem, x, y, iterations=30, solve_iterations=100).norm == pytest.approx(exact, rel=1e-4)


def test_an_outer_objective_without_curvature_gives_zero():
    inner = lambda x, y: 0.5 * ((y - x) ** 2).sum()  # noqa: E731
    outer = lambda x, y: y.sum() + x.sum()  # noqa: E731
    problem = bilevel.problems.BilevelProblem(outer, inner, torch.ones(3, dtype=torch.float64),
                                              torch.ones(3, dtype=torch.float64))
    assert estimate(problem, problem.x0, problem.y0).norm == 0.0


def test_soba_default_moves_hyper_cleaning():
    """The block-norm bound's term ||Hess_yy F|| ||B||^2 / mu^2 is about 2e3 times the
    curvature of Phi on hyper-cleaning, and the step derived from it left x where it was
    (Phi down by 0.03 % in 300 steps); with the estimate in its place Phi falls by a third
    in 500 steps."""
    problem = bilevel.problems.hyper_cleaning_digits(n_train=200, n_val=200)
    result = bilevel.solve(problem, method="soba", max_steps=500, progress=False)
    assert phi(problem, result.x) < 0.75 * phi(problem, problem.x0)


def test_soba_on_a_flat_hyper_objective_with_strong_coupling_does_not_blow_up():
    """F = |y - M x|^2 / 2 + eps |x - 1|^2 / 2 with y*(x) = M x: Phi'' = eps I, tiny, while
    the coupled (x, y, v) iteration feels ||Hess_xy F|| ||B|| / mu.  A step from the
    curvature estimate alone blew up three times and raised; the cross-term floor and
    the coupled-block cap keep the run finite, without a back-off."""
    g = torch.Generator().manual_seed(0)
    M = 3.0 * torch.randn(5, 3, generator=g, dtype=torch.float64)
    inner = lambda x, y: 0.5 * ((y - M @ x) ** 2).sum()  # noqa: E731
    outer = lambda x, y: 0.5 * ((y - M @ x) ** 2).sum() + 5e-4 * ((x - 1) ** 2).sum()  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error", StepSizeWarning)
        result = bilevel.solve(outer, inner, torch.zeros(3, dtype=torch.float64), torch.zeros(5, dtype=torch.float64),
                               method="soba", max_steps=500, progress=False)
    assert torch.isfinite(result.x).all() and float(result.x.abs().max()) < 1.0


def test_soba_survives_a_re_estimate_that_finds_no_lower_curvature():
    """f = sum(exp(x) y^2) / 2 - sum(y) from x0 = 3 with F pulling y to 20: the run
    diverges and backs off, and a curvature re-estimate in between found L = 0, where the
    step rule divided by mu = 0 and by L (ZeroDivisionError); it now ends as before the
    estimate did, after its back-offs."""
    inner = lambda x, y: 0.5 * (torch.exp(x) * y ** 2).sum() - y.sum()  # noqa: E731
    outer = lambda x, y: 0.5 * ((y - 20.0) ** 2).sum() + 0.01 * (x ** 2).sum()  # noqa: E731
    x0 = 3 * torch.ones(5, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StepSizeWarning)
        result = bilevel.solve(outer, inner, x0, torch.zeros(5, dtype=torch.float64), method="soba",
                               max_steps=2000, progress=False)
    assert torch.isfinite(result.x).all() and result.history["outer"][-1] < 0.5 * result.history["outer"][0]


def test_a_breakdown_of_the_inner_solves_is_an_error_not_an_estimate():
    """An indefinite lower Hessian (eigenvalue -0.01): CG breaks down, and the estimate
    (2.4e15 when the statuses were ignored) is refused; SOBA then keeps the bound."""
    A = torch.diag(torch.tensor([2.0, 1.0, -0.01], dtype=torch.float64))
    inner = lambda x, y: 0.5 * y @ A @ y - x @ y  # noqa: E731
    outer = lambda x, y: 0.5 * (y ** 2).sum()  # noqa: E731
    x, y = torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    with pytest.raises(FloatingPointError, match="broke down"):
        hyper_curvature(outer, inner, [x], [y], tree_flatten(x)[1], tree_flatten(y)[1])


def test_soba_decays_its_steps_exactly_when_fed_mini_batches():
    """y_decay / x_decay = None: the paper's 2/5 and 3/5 with mini-batches, constant steps
    without (bit-identical runs to the explicit settings)."""
    problem = logistic_breast_cancer()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randperm(142, generator=g)[:32] for _ in range(5)]

    def x_after(method, data=None):
        return bilevel.solve(problem, method=method, data=data, max_steps=12, progress=False).x

    assert torch.equal(x_after(SOBA(), batches), x_after(SOBA(y_decay=0.4, x_decay=0.6), batches))
    assert not torch.equal(x_after(SOBA(), batches), x_after(SOBA(y_decay=0.0, x_decay=0.0), batches))
    assert torch.equal(x_after(SOBA()), x_after(SOBA(y_decay=0.0, x_decay=0.0)))


def phi(problem, x) -> float:
    y, _ = LBFGS(maxiter=1000, tol=1e-7).run(lambda y_, x_: problem.inner(x_, y_), problem.y0, x)
    return float(problem.outer(x, y))
