"""Acceptance tests of the bilevel *algorithms*, written from the outside.

They exercise ``bilevel.solve`` and the config objects of ``bilevel.algorithms``
the way a user coming from the papers (F2SA / penalty, MEHA, sl-BAMM, LV-HBA, BDA,
ITD / AID, DARTS) and from other libraries' test suites (BOAT, Betty, hypertorch)
would check them:

* every method on problems whose answer is known in closed form, and where a
  method has a *known bias* (a penalty, an aggregation weight, a finite unroll)
  the exact limit of that biased iteration is computed independently and the
  library must land on it to near machine precision;
* the non-unique lower level M1 and a non-convex (sin) lower level, where the
  single-loop methods are meant to work and the implicit method is not;
* coupled lower-level constraints for LV-HBA (affine and non-affine);
* pytrees (dicts, tuples, ``nn.Module`` parameters), float32 vs float64;
* ``result`` fields, resume, callbacks, ``tol``, ``max_time``, mini-batches;
* bad input.

Tolerances come from the mathematics (contraction factors, O(1/lambda), O(mu)
biases computed from the problem data) or from figures reported in
ALGORITHMS.md for the papers' settings; see each test.
"""

from __future__ import annotations

import dataclasses
import io
import math
import warnings

import pytest
import torch
from torch.autograd.functional import hessian, jacobian

import bilevel
from bilevel.algorithms import (
    BAMM,
    BDA,
    LVHBA,
    MEHA,
    METHODS,
    Implicit,
    OneStep,
    Penalty,
    Unrolled,
)
from bilevel.problems import (
    BilevelProblem,
    coupled_constraint,
    nonunique_lower_level,
    quadratic,
)
from bilevel.status import BilevelWarning, CurvatureWarning, StepSizeWarning

F64 = torch.float64
ALL_METHODS = ["implicit", "unrolled", "one_step", "penalty", "meha", "bamm", "lvhba", "bda"]


def run(*args, **kwargs):
    kwargs.setdefault("progress", False)
    return bilevel.solve(*args, **kwargs)


def rel_err(x, x_star) -> float:
    return float((x - x_star).norm() / x_star.norm())


def q_data(p):
    d = p.data
    return d["A"], d["B"], d["y_target"], d["rho"]


def q_phi_hessian(p) -> torch.Tensor:
    """Hessian of Phi(x) = F(x, y*(x)) on problem Q: B^T A^-2 B + rho I."""
    A, B, _, rho = q_data(p)
    C = torch.linalg.solve(A, B)
    return C.T @ C + rho * torch.eye(B.shape[1], dtype=A.dtype)


def sgd_contraction(H: torch.Tensor, lr: float) -> float:
    """max |1 - lr * eig(H)|: gradient descent on a quadratic contracts by this per step."""
    ev = torch.linalg.eigvalsh(H)
    return float(torch.max((1 - lr * ev).abs()))


def quadratic_argmin(G, n, dtype=F64) -> torch.Tensor:
    """Minimizer of a strictly convex quadratic G: R^n -> R (one Newton step from 0)."""
    z0 = torch.zeros(n, dtype=dtype)
    return -torch.linalg.solve(hessian(G, z0), jacobian(G, z0))


# =====================================================================================
# 1. The ready-made problems carry correct answers (everything below relies on them)
# =====================================================================================

def test_problem_q_closed_forms_agree_with_autograd():
    p = quadratic()
    A, B, _y_t, _rho = q_data(p)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, generator=g, dtype=F64)
    # y*(x) is the inner stationary point
    y = p.inner_solution(x)
    assert torch.allclose(A @ y - B @ x, torch.zeros(5, dtype=F64), atol=1e-12)
    # hypergradient = d/dx F(x, y*(x)) by plain autograd through the closed form
    auto = torch.func.grad(lambda x_: p.outer(x_, p.inner_solution(x_)))(x)
    assert torch.allclose(p.hypergradient(x), auto, atol=1e-12)
    # x* is stationary for Phi and F(x*, y*) is the stored value
    assert float(p.hypergradient(p.solution.x).norm()) < 1e-12
    assert torch.allclose(p.solution.y, p.inner_solution(p.solution.x), atol=1e-12)
    assert abs(float(p.outer(p.solution.x, p.solution.y)) - p.solution.value) < 1e-12
    # Phi is strongly convex: x* is THE minimizer
    assert float(torch.linalg.eigvalsh(q_phi_hessian(p)).min()) > 0


def test_problem_l_solution_is_the_minimum_of_phi_and_is_feasible():
    p = coupled_constraint()
    # Phi is separable: Phi_i(t) = t^2/2 + (min(2, t) - 1)^2 / 2; scan it
    t = torch.linspace(-1, 3, 40001, dtype=F64)
    phi = 0.5 * t ** 2 + 0.5 * (torch.clamp(t, max=2.0) - 1) ** 2
    assert abs(float(t[phi.argmin()]) - 0.5) < 1e-4
    xs, ys = p.solution.x, p.solution.y
    assert torch.allclose(xs, torch.full((10,), 0.5, dtype=F64))
    assert float(p.constraints(xs, ys).max()) == 0.0            # active constraint
    assert p.evaluate(xs, ys)["outer"] == pytest.approx(10 / 4)
    # the bundled projection onto {y <= x} is a projection
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, generator=g, dtype=F64), torch.randn(10, generator=g, dtype=F64)
    px, py = p.data["project"](x, y)
    assert float((py - px).max()) <= 0
    ppx, ppy = p.data["project"](px, py)
    assert torch.equal(ppx, px) and torch.equal(ppy, py)


def test_problem_m1_solution_is_lower_level_optimal_with_zero_outer_value():
    p = nonunique_lower_level(n=7)
    xs, (y1, y2) = p.solution.x, p.solution.y
    gy1, gy2 = torch.func.grad(lambda y: p.inner(xs, y))((y1, y2))
    assert float(gy1.abs().max()) == 0.0 and float(gy2.abs().max()) == 0.0
    assert p.solution.value == 0.0 and float(p.outer(xs, (y1, y2))) == 0.0
    assert torch.allclose(p.data["stall_point"], 0.505 * torch.ones(7, dtype=F64))


def test_with_dtype_rebuilds_problem_data_in_float32():
    p = quadratic().with_dtype(torch.float32)
    assert p.x0.dtype == p.y0.dtype == torch.float32
    assert p.solution.x.dtype == torch.float32
    assert p.data["A"].dtype == torch.float32
    assert p.outer(p.x0, p.y0).dtype == torch.float32


# =====================================================================================
# 2. Problem Q (strongly convex): exact methods reach x*, biased ones reach THEIR limit
# =====================================================================================

def test_implicit_reaches_x_star_at_the_gradient_descent_rate():
    """With exact hypergradients, SGD on the quadratic Phi contracts by q = max|1 - lr*eig(H)|
    per step; after k steps ||x_k - x*|| <= q^k ||x0 - x*|| (x0 = 0)."""
    p = quadratic()
    lr, steps = 0.5, 60
    q = sgd_contraction(q_phi_hessian(p), lr)
    assert q < 1
    r = run(p, method="implicit", outer_optimizer="sgd", lr=lr, max_steps=steps)
    bound = q ** steps * float(p.solution.x.norm())
    # + the inner solve's own error, sqrt(eps64)-level
    assert float((r.x - p.solution.x).norm()) <= bound + 1e-7
    # result.y is the inner solution at the x of the last hypergradient, one SGD step before
    # result.x: they differ by at most |A^-1 B| * lr * (last hypergradient norm)
    A, B, _, _ = q_data(p)
    lag = float(torch.linalg.matrix_norm(torch.linalg.solve(A, B), 2)) * lr * r.history["hypergradient_norm"][-1]
    assert float((r.y - p.inner_solution(r.x)).norm()) <= lag + 1e-7


def test_implicit_with_all_defaults_reaches_x_star():
    """The library's defaults (Adam, lr=1e-2, L-BFGS inner, automatic linear solve) on a
    3-dimensional strongly convex problem: a user expects x* to 1e-4 within 300 steps (Adam's
    steps are ~lr = 1e-2 and |x*| = 0.84, so ~100 steps just to get there)."""
    p = quadratic()
    r = run(p, max_steps=300)
    assert rel_err(r.x, p.solution.x) < 1e-4
    assert r.history["hypergradient_norm"][-1] < 1e-4


@pytest.mark.parametrize("step_size", [0.2, None])
def test_unrolled_converges_to_the_exact_minimizer_of_the_unrolled_objective(step_size):
    """ITD with T steps from y0 = 0 and step a: y_T(x) = (I - (I - aA)^T) A^-1 B x (a matrix
    power, ALGORITHMS.md section 8), so the unrolled problem is a least squares in x whose
    minimizer x_T is known exactly. step_size=None must use a = 1/L, L = lambda_max(A)."""
    p = quadratic()
    A, B, y_t, rho = q_data(p)
    T = 10
    a = step_size if step_size is not None else 1.0 / float(torch.linalg.eigvalsh(A).max())
    I5 = torch.eye(5, dtype=F64)
    C = (I5 - torch.linalg.matrix_power(I5 - a * A, T)) @ torch.linalg.solve(A, B)
    x_T = torch.linalg.solve(C.T @ C + rho * torch.eye(3, dtype=F64), C.T @ y_t)
    r = run(p, method="unrolled", steps=T, step_size=step_size, outer_optimizer="sgd", lr=0.5,
            max_steps=150)
    assert float((r.x - x_T).norm()) < 1e-8
    # and that limit is NOT x*: T = 10 steps leave a visible bias (the test discriminates)
    assert float((x_T - p.solution.x).norm()) > 1e-3


def test_warm_started_unrolling_converges_to_its_closed_form_fixed_point():
    """warm_start=True restarts the T steps from the previous y_T, so at the fixed point y is
    y*(x) and the hypergradient is C_T^T (y*(x) - y_t) + rho x with C_T the T-step Jacobian:
    x_w = (C_T^T A^-1 B + rho I)^-1 C_T^T y_t (different from cold-start unrolling and from x*)."""
    p = quadratic()
    A, B, y_t, rho = q_data(p)
    a, T = 0.2, 10
    I5 = torch.eye(5, dtype=F64)
    Ainv_B = torch.linalg.solve(A, B)
    C = (I5 - torch.linalg.matrix_power(I5 - a * A, T)) @ Ainv_B
    x_w = torch.linalg.solve(C.T @ Ainv_B + rho * torch.eye(3, dtype=F64), C.T @ y_t)
    r = run(p, method="unrolled", steps=T, step_size=a, warm_start=True, outer_optimizer="sgd", lr=0.5,
            max_steps=200)
    assert float((r.x - x_w).norm()) < 1e-8
    assert float((x_w - p.solution.x).norm()) > 1e-2


def test_implicit_with_user_chosen_inner_solver_and_linear_solve():
    """GradientDescent to 1e-12 and CG with maxiter = dim(y) = 5 (exact for a 5x5 SPD system):
    the same contraction bound as exact hypergradients. One CG iteration is not enough and the
    library must say so (ConvergenceWarning, and the residual in the history)."""
    p = quadratic()
    lr, steps = 0.5, 60
    q = sgd_contraction(q_phi_hessian(p), lr)
    r = run(p, method="implicit", inner_solver=bilevel.solvers.GradientDescent(tol=1e-12),
            solve=bilevel.implicit.CG(maxiter=5, tol=1e-12), outer_optimizer="sgd", lr=lr, max_steps=steps)
    assert float((r.x - p.solution.x).norm()) <= q ** steps * float(p.solution.x.norm()) + 1e-9
    assert r.history["linear_residual"][-1] < 1e-10
    with pytest.warns(bilevel.ConvergenceWarning, match="linear solve"):
        r = run(p, method="implicit", solve=bilevel.implicit.CG(maxiter=1), outer_optimizer="sgd", lr=lr,
                max_steps=10)
    assert r.history["linear_residual"][-1] > 0.1


def _box_constrained_q_answer(p, lo, hi, grad=None):
    """argmin of the convex Phi (or psi) over a box: projected gradient descent on the closed form."""
    grad = grad or p.hypergradient
    x = torch.zeros(3, dtype=F64)
    for _ in range(3000):
        x = (x - 0.5 * grad(x)).clamp(lo, hi)
    return x


def test_x_set_gives_the_box_constrained_optimum():
    """x in [-0.3, 0.3]^3 cuts off x* = (0.42, 0.12, -0.71): two bounds become active."""
    p = quadratic()
    box = bilevel.implicit.projections.Box(-0.3, 0.3)
    x_box = _box_constrained_q_answer(p, -0.3, 0.3)
    assert float((x_box - p.solution.x).norm()) > 0.1
    r = run(p, method="implicit", outer_optimizer="sgd", lr=0.5, x_set=box, max_steps=100)
    assert float((r.x - x_box).norm()) < 1e-7
    # penalty with fixed lambda = 100: its own box-constrained limit argmin_{box} psi_100
    A, B, y_t, rho = q_data(p)

    def grad_psi(x, lam=100.0):
        y_lam = torch.linalg.solve(torch.eye(5, dtype=F64) + lam * A, y_t + lam * B @ x)
        return rho * x - lam * B.T @ (y_lam - torch.linalg.solve(A, B @ x))

    x_pen = _box_constrained_q_answer(p, -0.3, 0.3, grad_psi)
    r = run(p, method="penalty", lam0=100.0, lam_growth=0.0, x_set=box, max_steps=300)
    assert float((r.x - x_pen).norm()) < 1e-7
    assert float(r.x.abs().max()) <= 0.3


def test_truncated_unrolling_converges_to_its_closed_form_fixed_point():
    """Back-propagating through the last K of T steps (Shaban et al. 2019) uses the Jacobian
    J_K = (I - (I - aA)^K) A^-1 B instead of C_T: the fixed point solves
    J_K^T (C_T x - y_t) + rho x = 0."""
    p = quadratic()
    A, B, y_t, rho = q_data(p)
    a, T, K = 0.2, 10, 3
    I5 = torch.eye(5, dtype=F64)
    Ainv_B = torch.linalg.solve(A, B)
    C = (I5 - torch.linalg.matrix_power(I5 - a * A, T)) @ Ainv_B
    J = (I5 - torch.linalg.matrix_power(I5 - a * A, K)) @ Ainv_B
    x_K = torch.linalg.solve(J.T @ C + rho * torch.eye(3, dtype=F64), J.T @ y_t)
    r = run(p, method="unrolled", steps=T, step_size=a, truncate=K, outer_optimizer="sgd", lr=0.5,
            max_steps=150)
    assert float((r.x - x_K).norm()) < 1e-8


def test_one_step_darts_converges_to_its_closed_form_biased_point():
    """With y tracking y*(x), the DARTS estimate is rho x + xi B^T (y* - y_t): xi I stands in
    for A^-1, and the fixed point is (xi B^T A^-1 B + rho I)^-1 xi B^T y_t, not x*."""
    p = quadratic()
    A, B, y_t, rho = q_data(p)
    xi = 0.3
    x_d = torch.linalg.solve(xi * B.T @ torch.linalg.solve(A, B) + rho * torch.eye(3, dtype=F64),
                             xi * B.T @ y_t)
    r = run(p, method="one_step", step_size=xi, outer_optimizer="sgd", lr=0.5, max_steps=300)
    assert float((r.x - x_d).norm()) < 1e-8
    assert rel_err(x_d, p.solution.x) > 0.1


def _penalty_limit(p, lam: float) -> torch.Tensor:
    """argmin psi_lam, with grad psi_lam(x) = rho x - lam B^T (y_lam(x) - z*(x)),
    y_lam = (I + lam A)^-1 (y_t + lam B x), z* = A^-1 B x (ALGORITHMS.md section 2)."""
    A, B, y_t, rho = q_data(p)

    def grad_psi(x):
        y_lam = torch.linalg.solve(torch.eye(5, dtype=F64) + lam * A, y_t + lam * B @ x)
        return rho * x - lam * B.T @ (y_lam - torch.linalg.solve(A, B @ x))

    x0 = torch.zeros(3, dtype=F64)
    return x0 - torch.linalg.solve(jacobian(grad_psi, x0), grad_psi(x0))


def test_penalty_with_fixed_lambda_lands_on_argmin_psi_and_its_bias_is_order_one_over_lambda():
    p = quadratic()
    errors = {}
    for lam in (10.0, 100.0):
        x_lam = _penalty_limit(p, lam)
        r = run(p, method="penalty", lam0=lam, lam_growth=0.0, max_steps=300)
        assert float((r.x - x_lam).norm()) < 1e-8, lam      # the iteration's exact fixed point
        errors[lam] = float((x_lam - p.solution.x).norm())
    # ||x_lam - x*|| = c/lam + O(1/lam^2): a factor ~10 from lam = 10 to 100
    assert 7 < errors[10.0] / errors[100.0] < 13


def test_penalty_with_growing_lambda_reaches_x_star_with_default_settings():
    """Deterministic default: lam_k = lam0 (1 + k/10), lam0 = 1 here, so lam_500 ~ 51 and the
    O(1/lam) bias is ~2e-2 * (c = 0.22 from the fixed-lambda limits above) ~ 5e-3 relative."""
    p = quadratic()
    r = run(p, method="penalty", max_steps=500)
    assert rel_err(r.x, p.solution.x) < 1e-2


def _meha_limit(p, c: float, gamma: float):
    """Stationary point of F/c + f - v_gamma (the MEHA reformulation with a constant c_k = c),
    v_gamma(x, y) = min_t f(x, t) + |t - y|^2/(2 gamma): a strictly convex quadratic on Q."""
    A, B, _, _ = q_data(p)
    I5 = torch.eye(5, dtype=F64)

    def G(w):
        x, y = w[:3], w[3:]
        theta = torch.linalg.solve(A + I5 / gamma, B @ x + y / gamma)
        v = p.inner(x, theta) + ((theta - y) ** 2).sum() / (2 * gamma)
        return p.outer(x, y) / c + p.inner(x, y) - v

    w = quadratic_argmin(G, 8)
    return w[:3], w[3:]


def test_meha_with_constant_penalty_lands_on_the_moreau_envelope_reformulation():
    """MEHA's x/y/theta updates are gradient steps on F/c + phi - v_gamma (ALGORITHMS.md
    section 3): with p = 0 (c_k = c) it must converge to that quadratic's minimizer, which is
    O(1/c) away from x*. Steps: eta < 1/(L_f + 1/gamma) = 0.198, beta, alpha small."""
    p = quadratic()
    x_c, y_c = _meha_limit(p, c=10.0, gamma=1.0)
    r = run(p, method="meha", c=10.0, p=0.0, gamma=1.0, eta=0.19, beta=0.15, lr=1.0, max_steps=500)
    assert float((r.x - x_c).norm()) < 1e-6
    assert float((r.y - y_c).norm()) < 1e-6
    assert 0.01 < rel_err(x_c, p.solution.x) < 0.2                 # the O(1/c) relaxation bias


def _bamm_limit(p, mu: float) -> torch.Tensor:
    """sl-BAMM fixed point with a constant aggregation weight mu: y = argmin mu F + (1-mu) f,
    H z = grad_y F with H = mu I + (1-mu) A, and grad_x F - grad2_xy phi z = rho x + (1-mu) B^T z = 0."""
    A, B, y_t, rho = q_data(p)
    Hi = torch.linalg.inv(mu * torch.eye(5, dtype=F64) + (1 - mu) * A)
    M = rho * torch.eye(3, dtype=F64) + (1 - mu) ** 2 * B.T @ Hi @ Hi @ B
    return torch.linalg.solve(M, -(1 - mu) * B.T @ Hi @ (Hi @ (mu * y_t) - y_t))


def test_bamm_with_constant_weight_lands_on_its_fixed_point_and_the_bias_is_order_mu():
    p = quadratic()
    errors = {}
    for mu in (0.1, 0.01):
        x_mu = _bamm_limit(p, mu)
        # q huge: mu_k = mu0 (k+1)^(-1/q) is constant
        r = run(p, method="bamm", mu0=mu, q=1e12, max_steps=500)
        assert float((r.x - x_mu).norm()) < 1e-7, mu
        errors[mu] = float((x_mu - p.solution.x).norm())
    assert 7 < errors[0.1] / errors[0.01] < 13


@pytest.mark.slow
@pytest.mark.parametrize("method, claim", [("meha", 1e-2), ("bamm", 1e-2)])
def test_meha_and_bamm_defaults_reach_x_star_on_q_in_20000_steps(method, claim):
    """Docstrings: MEHA 0.8 %, sl-BAMM 0.4 % relative error after 20 000 steps on Q."""
    p = quadratic()
    r = run(p, method=method, max_steps=20000)
    assert rel_err(r.x, p.solution.x) < claim


# =====================================================================================
# 3. Problem M1: lower level with a continuum of solutions (BDA / sl-BAMM / MEHA papers)
# =====================================================================================

def test_meha_with_the_paper_settings_reproduces_the_reported_errors_on_m1():
    """ALGORITHMS.md: alpha = beta = 0.1, eta = 0.5, gamma = 1, c_k = (k+1)^0.3 gives
    4.9e-2 relative error at 500 iterations and 2.6e-4 at 2000 (n = 100)."""
    p = nonunique_lower_level(n=100)
    seen = {}

    def grab(state, record):
        if state.iteration == 500:
            seen[500] = rel_err(state.x, p.solution.x)

    r = run(p, method="meha", lr=0.1, beta=0.1, eta=0.5, gamma=1.0, c=1.0, p=0.3, max_steps=2000,
            callback=grab)
    assert seen[500] < 6e-2
    assert rel_err(r.x, p.solution.x) < 5e-4
    y1, y2 = r.y
    # the upper level picked y2 = e among the lower-level solutions {y1 = x, y2 free}
    assert float((y2 - 1).abs().max()) < 1e-2 and float((y1 - r.x).abs().max()) < 1e-2


def test_bda_warm_start_reaches_e_while_reinitialized_inner_runs_stall():
    """BDA paper rule (constant mu, mu_decay=0), T = 16: warm-started y reaches x* = e; with y
    re-initialised every outer step x stalls near 0.85 (ALGORITHMS.md section 8)."""
    p = nonunique_lower_level(n=100)
    warm = run(p, method="bda", mu_decay=0.0, warm_start=True, max_steps=100)
    cold = run(p, method="bda", mu_decay=0.0, warm_start=False, max_steps=100)
    assert rel_err(warm.x, p.solution.x) < 1e-4
    assert 0.8 < float(cold.x.mean()) < 0.9


@pytest.mark.parametrize("method, steps, tol", [
    # documented: sl-BAMM < 5e-2 after 500 steps (docstring example);
    # penalty: lam_1000 ~ 100 lam0, O(1/lam) ~ 1e-2, measured well inside.
    ("bamm", 500, 5e-2), ("penalty", 1000, 1e-2),
])
def test_single_loop_defaults_select_the_optimistic_solution_on_m1(method, steps, tol):
    p = nonunique_lower_level(n=100)
    r = run(p, method=method, max_steps=steps)
    assert rel_err(r.x, p.solution.x) < tol
    assert float(r.y[1].mean()) > 0.9      # y2 moved from 0.01 towards e: UL chose among LL solutions


def test_implicit_on_m1_warns_and_its_documented_remedies_give_the_stall_point():
    """The IFT does not apply (inner Hessian singular in y2): the default must warn, naming the
    curvature problem and pointing to the single-loop methods. The remedies it names (damping,
    a least-squares adjoint) give the unique-solution answer x = (e + y2_0)/2 = 0.505 e, as does
    plain unrolling (ALGORITHMS.md section 8)."""
    p = nonunique_lower_level(n=20)
    stall = p.data["stall_point"]
    with pytest.warns(CurvatureWarning, match="single-loop"):
        run(p, method="implicit", max_steps=20)
    for options in ({"damping": 1e-3}, {"solve": bilevel.implicit.Direct("lstsq")}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BilevelWarning)
            r = run(p, method="implicit", outer_optimizer="sgd", lr=0.5, max_steps=60, **options)
        # damping 1e-3 shrinks v1 by 1/(1 + 1e-3): x moves by ~5e-4 * 0.5
        assert float((r.x - stall).abs().max()) < 1e-3, options
    r = run(p, method="unrolled", steps=10, outer_optimizer="sgd", lr=0.5, max_steps=60)
    assert float((r.x - stall).abs().max()) < 1e-6


# =====================================================================================
# 4. A non-convex lower level: y_i in argmin sin(x_i + y_i - c_i) (BOME / MEHA-style toy)
# =====================================================================================
#   F = |x - a|^2 + |y - a - c|^2. LL minimizers: u = x + y - c = -pi/2 + 2k pi. On the branch
#   u = s the UL optimum is x = s/2 with value 2 (s/2 - a)^2; with a = -1/2 the best branch is
#   s = -pi/2: x* = -pi/4 e, y* = c - pi/4 e (the LL maxima u = pi/2 + 2k pi are worse, 3.3 vs 0.16).

N_SIN = 5


def _sin_problem(u0: float) -> BilevelProblem:
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(N_SIN, generator=gen, dtype=F64)
    a = torch.full((N_SIN,), -0.5, dtype=F64)

    def outer(x, y):
        return ((x - a) ** 2).sum() + ((y - a - c) ** 2).sum()

    def inner(x, y):
        return torch.sin(x + y - c).sum()

    x_star = torch.full((N_SIN,), -math.pi / 4, dtype=F64)
    return BilevelProblem(outer, inner, torch.zeros(N_SIN, dtype=F64), c + u0,
                          solution={"x": x_star, "y": c - math.pi / 4})


@pytest.mark.parametrize("method, steps, tol", [
    # penalty: lam_k = lam0 (1 + k/10), lam0 = 2: O(1/lam_1000) ~ 5e-3
    ("penalty", 1000, 1 / (2 * 101)),
    # MEHA: relaxation bias O(1/c_k), c_1000 = 1001^0.4 ~ 15.8
    ("meha", 1000, 1 / 1001 ** 0.4),
    # sl-BAMM: O(mu_k) bias, mu_1000 = 0.9/sqrt(1001) ~ 0.028 (constant |grad_y F|/f'' ~ 0.57 < 1)
    ("bamm", 1000, 0.9 / 1001 ** 0.5),
    # BDA: aggregation weight mu_k = 0.5/sqrt(k+1) ~ 0.05 at k = 100
    ("bda", 100, 0.5 / 101 ** 0.5),
    # the lower level is strongly convex near its minimizer: AID works there too
    ("implicit", 300, 1e-3),
])
def test_nonconvex_lower_level_from_a_start_in_the_basin_reaches_the_global_answer(method, steps, tol):
    p = _sin_problem(u0=-1.2)          # start at u = -1.2, inside the basin of u = -pi/2
    r = run(p, method=method, max_steps=steps)
    assert float((r.x - p.solution.x).abs().max()) < tol
    assert float((r.y - p.solution.y).abs().max()) < tol


def test_bda_from_a_flat_lower_level_start_does_not_blow_up():
    p = _sin_problem(u0=0.0)           # u0 = 0: sin'' = 0 at the start
    r = run(p, method="bda", max_steps=100)
    assert float((r.x - p.solution.x).abs().max()) < 0.5 / 101 ** 0.5


def test_penalty_and_meha_from_a_flat_lower_level_start_still_reach_the_answer():
    """The same flat start that trips BDA: the other first-order methods cope."""
    p = _sin_problem(u0=0.0)
    r = run(p, method="penalty", max_steps=300)
    assert float((r.x - p.solution.x).abs().max()) < 1 / (2 * 31)        # O(1/lam_300), lam0 = 2
    r = run(p, method="meha", max_steps=300)
    assert float((r.x - p.solution.x).abs().max()) < 1 / 301 ** 0.4      # O(1/c_300)


# =====================================================================================
# 5. LV-HBA: lower-level constraints that couple x and y
# =====================================================================================

def test_lvhba_with_the_paper_settings_on_problem_l():
    """ALGORITHMS.md: alpha = beta = 0.05, eta = 0.1, gamma1 = gamma2 = 1, c_k = (k+1)^0.3,
    r = 100: max error 7e-3 at 1000 iterations; the constraint y <= x must hold throughout."""
    p = coupled_constraint()
    violations = []
    r = run(p, method="lvhba", lr=0.05, beta=0.05, eta=0.1, gamma1=1.0, gamma2=1.0, c=1.0, p=0.3,
            r=100.0, max_steps=1000,
            callback=lambda s, rec: violations.append(float((s.y - s.x).max())))
    assert float((r.x - 0.5).abs().max()) < 7e-3
    assert float((r.y - 0.5).abs().max()) < 7e-3
    assert max(violations) <= 1e-12


def test_lvhba_defaults_with_a_hand_written_affine_constraint_and_no_projection():
    """A user passes only g(x, y) = y - x <= 0: the library must project onto C itself (a small QP
    for affine g, DESIGN.md). Defaults; 1000 steps; same accuracy yardstick as the paper's."""
    n = 10

    def outer(x, y):
        return 0.5 * (x ** 2).sum() + 0.5 * ((y - 1.0) ** 2).sum()

    def inner(x, y):
        return 0.5 * ((y - 2.0) ** 2).sum()

    r = run(outer, inner, torch.zeros(n, dtype=F64), torch.zeros(n, dtype=F64), method="lvhba",
            constraints=lambda x, y: y - x, max_steps=1000)
    assert float((r.x - 0.5).abs().max()) < 7e-3
    assert float((r.y - r.x).max()) < 1e-6                  # feasible up to the projection's tolerance
    # without the constraint the lower level would give y = 2e and x -> 0: LV-HBA is not that
    assert float(r.y.max()) < 0.6


def test_lvhba_with_a_nonaffine_convex_coupled_constraint():
    """min_x x^2/2 + |y - c|^2/2, y in argmin {|y - b|^2/2 : |y|^2 <= x}, b = (2, 0), c = (1.5, 0).
    y*(x) = sqrt(x) b/|b| for x < 4, so Phi(x) = x^2/2 + (sqrt(x) - 1.5)^2/2 and with s = sqrt(x*):
    s^3 + s/2 - 3/4 = 0; the constraint is active at the answer."""
    b = torch.tensor([2.0, 0.0], dtype=F64)
    c = torch.tensor([1.5, 0.0], dtype=F64)
    s = 0.7
    for _ in range(50):                                  # Newton on s^3 + s/2 - 3/4
        s -= (s ** 3 + s / 2 - 0.75) / (3 * s ** 2 + 0.5)
    x_star = s * s
    r = run(lambda x, y: 0.5 * (x ** 2).sum() + 0.5 * ((y - c) ** 2).sum(),
            lambda x, y: 0.5 * ((y - b) ** 2).sum(),
            torch.ones(1, dtype=F64), torch.zeros(2, dtype=F64), method="lvhba",
            constraints=lambda x, y: ((y ** 2).sum() - x).reshape(1), max_steps=300)
    assert abs(float(r.x) - x_star) < 1e-2
    assert abs(float(r.y[0]) - s) < 1e-2 and abs(float(r.y[1])) < 1e-6
    assert float((r.y ** 2).sum() - r.x) < 1e-6          # feasible


def test_lvhba_requires_constraints_and_others_refuse_them():
    p = quadratic()
    with pytest.raises(ValueError, match="constraint"):
        run(p, method="lvhba", max_steps=1)
    with pytest.raises(ValueError, match="lvhba"):
        run(p.outer, p.inner, p.x0, p.y0, method="meha", constraints=lambda x, y: y[:3] - x, max_steps=1)


# =====================================================================================
# 6. Pytrees: dicts, tuples, nn.Module parameters
# =====================================================================================

def _split_q(p):
    """Q with x = {'a': x[:2], 'b': x[2:]} and y = (y[:2], y[2:])."""
    def cat_x(x):
        return torch.cat([x["a"], x["b"]])

    def cat_y(y):
        return torch.cat(list(y))

    x0 = {"a": p.x0[:2].clone(), "b": p.x0[2:].clone()}
    y0 = (p.y0[:2].clone(), p.y0[2:].clone())
    return (lambda x, y: p.outer(cat_x(x), cat_y(y)), lambda x, y: p.inner(cat_x(x), cat_y(y)),
            x0, y0, cat_x, cat_y)


@pytest.mark.parametrize("method, options", [
    ("implicit", {"outer_optimizer": "sgd", "lr": 0.5, "max_steps": 30}),
    ("unrolled", {"steps": 10, "step_size": 0.2, "outer_optimizer": "sgd", "lr": 0.5, "max_steps": 30}),
    ("penalty", {"max_steps": 100}),
    ("meha", {"max_steps": 100}),
])
def test_splitting_variables_into_dicts_and_tuples_reaches_the_same_answer(method, options):
    p = quadratic()
    outer, inner, x0, y0, cat_x, cat_y = _split_q(p)
    plain = run(p, method=method, **options)
    tree = run(outer, inner, x0, y0, method=method, **options)
    assert isinstance(tree.x, dict) and set(tree.x) == {"a", "b"}
    assert isinstance(tree.y, tuple) and len(tree.y) == 2
    # same iteration on the same numbers; the single-loop methods' curvature estimates use
    # random probes per leaf, so only agreement to the power-iteration accuracy is asked there
    tol = 1e-10 if method in ("implicit", "unrolled") else 1e-4
    assert float((cat_x(tree.x) - plain.x).abs().max()) < tol
    assert float((cat_y(tree.y) - plain.y).abs().max()) < tol


@pytest.mark.parametrize("method", ["meha", "bamm", "penalty", "bda"])
def test_m1_with_a_dict_lower_variable_matches_the_tuple_version(method):
    p = nonunique_lower_level(n=10)
    steps = 20 if method == "bda" else 100
    as_tuple = run(p, method=method, max_steps=steps)
    as_dict = run(lambda x, y: p.outer(x, (y["y1"], y["y2"])), lambda x, y: p.inner(x, (y["y1"], y["y2"])),
                  p.x0, {"y1": p.y0[0], "y2": p.y0[1]}, method=method, max_steps=steps)
    assert torch.allclose(as_dict.x, as_tuple.x, atol=1e-10)
    assert torch.allclose(as_dict.y["y2"], as_tuple.y[1], atol=1e-10)


class _Distill:
    """Lower level: an nn.Linear(4, 1) fit by ridge to targets X_tr @ w (w = the upper variable,
    a dict); upper level: validation MSE + rho/2 |w|^2. Parameters enter through
    torch.func.functional_call. y*(w) = S w is linear, so Phi is quadratic with a closed form."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        d, n = 4, 30
        self.mu, self.rho = 0.1, 0.1
        X = torch.randn(2 * n, d, generator=g, dtype=F64)
        self.Xtr, self.Xv = X[:n], X[n:]
        self.tv = self.Xv @ torch.randn(d, generator=g, dtype=F64) + 0.3 + 0.1 * torch.randn(n, generator=g, dtype=F64)
        self.model = torch.nn.Linear(d, 1).to(F64)
        with torch.no_grad():                              # a seeded init, without touching the global RNG
            for q in self.model.parameters():
                q.copy_(torch.randn(q.shape, generator=g, dtype=F64))
        Z = torch.cat([self.Xtr, torch.ones(n, 1, dtype=F64)], 1)
        Zv = torch.cat([self.Xv, torch.ones(n, 1, dtype=F64)], 1)
        S = torch.linalg.solve(Z.T @ Z / n + self.mu * torch.eye(d + 1, dtype=F64), Z.T @ self.Xtr / n)
        self.H = S.T @ Zv.T @ Zv @ S / n + self.rho * torch.eye(d, dtype=F64)
        self.w_star = torch.linalg.solve(self.H, S.T @ Zv.T @ self.tv / n)
        self.S = S

    def inner(self, x, params):
        pred = torch.func.functional_call(self.model, params, (self.Xtr,)).squeeze(-1)
        return 0.5 * ((pred - self.Xtr @ x["w"]) ** 2).mean() + 0.5 * self.mu * sum((q ** 2).sum() for q in params.values())

    def outer(self, x, params):
        pred = torch.func.functional_call(self.model, params, (self.Xv,)).squeeze(-1)
        return 0.5 * ((pred - self.tv) ** 2).mean() + 0.5 * self.rho * (x["w"] ** 2).sum()


def test_nn_module_parameters_as_the_lower_variable():
    prob = _Distill()
    before = {k: v.detach().clone() for k, v in prob.model.named_parameters()}
    y0 = dict(prob.model.named_parameters())            # Parameters, requires_grad=True, as users pass them
    x0 = {"w": torch.zeros(4, dtype=F64)}
    ev = torch.linalg.eigvalsh(prob.H)
    lr, steps = 1 / float(ev[-1]), 60
    q = sgd_contraction(prob.H, lr)
    r = run(prob.outer, prob.inner, x0, y0, method="implicit", outer_optimizer="sgd", lr=lr, max_steps=steps)
    assert set(r.y) == {"weight", "bias"} and r.y["weight"].shape == (1, 4) and r.y["bias"].shape == (1,)
    assert float((r.x["w"] - prob.w_star).norm()) <= q ** steps * float(prob.w_star.norm()) + 1e-7
    wb = prob.S @ r.x["w"]                                   # y*(x) in closed form
    assert torch.allclose(r.y["weight"].reshape(-1), wb[:4], atol=1e-6)
    assert torch.allclose(r.y["bias"], wb[4:], atol=1e-6)
    # the user's model was not modified, and x0 neither
    for k, v in prob.model.named_parameters():
        assert torch.equal(v.detach(), before[k])
    assert torch.equal(x0["w"], torch.zeros(4, dtype=F64))
    # a first-order single-loop method on the same module (O(1/lam) bias, lam_500 ~ 50 lam0)
    r = run(prob.outer, prob.inner, x0, y0, method="penalty", max_steps=500)
    assert rel_err(r.x["w"], prob.w_star) < 2e-2


# =====================================================================================
# 7. float32 vs float64
# =====================================================================================

@pytest.mark.parametrize("method", ALL_METHODS)
def test_float32_problems_stay_float32(method):
    p = coupled_constraint() if method == "lvhba" else quadratic()
    p32 = p.with_dtype(torch.float32)
    options = {"steps": 10} if method == "unrolled" else {}
    r = run(p32, method=method, max_steps=20, **options)
    for leaf in [r.x, r.y]:
        assert leaf.dtype == torch.float32
    assert all(math.isfinite(v) for v in r.history["outer"])
    r64 = run(p, method=method, max_steps=20, **options)
    # same iteration in another precision: agreement to float32 resolution of O(1) numbers
    assert float((r.x.double() - r64.x).abs().max()) < 1e-3


def test_float32_accuracy_is_limited_by_the_dtype_not_by_float64_tolerances():
    """float32: the default inner tolerance is sqrt(eps32) ~ 3.5e-4 (gradient norm), which
    bounds x's accuracy to a few 1e-4 (propagated by |A^-1| ~ 1 and |H_Phi^-1| ~ 0.8); float64
    reaches the contraction bound. Both must run without warnings about unmet tolerances."""
    p64 = quadratic()
    p32 = p64.with_dtype(torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BilevelWarning)
        r32 = run(p32, method="implicit", outer_optimizer="sgd", lr=0.5, max_steps=60)
        r64 = run(p64, method="implicit", outer_optimizer="sgd", lr=0.5, max_steps=60)
    eps32 = torch.finfo(torch.float32).eps
    assert rel_err(r32.x.double(), p64.solution.x) < 10 * eps32 ** 0.5
    assert rel_err(r64.x, p64.solution.x) < 1e-5


def test_default_dtype_tensors_as_users_write_them():
    """torch.zeros(3) is float32 under torch's default dtype: the docstring example must work."""
    inner = lambda x, y: 0.5 * ((y - x) ** 2).sum()      # y*(x) = x
    outer = lambda x, y: 0.5 * ((y - 1.0) ** 2).sum()    # so x* = 1
    r = run(outer, inner, torch.zeros(3), torch.zeros(3), outer_optimizer="sgd", lr=0.5, max_steps=60)
    assert r.x.dtype == torch.get_default_dtype()
    assert torch.allclose(r.x, torch.ones(3, dtype=r.x.dtype), atol=1e-4)


# =====================================================================================
# 8. Results, resume, callbacks, stopping rules, mini-batches, configs
# =====================================================================================

def test_result_fields_and_history():
    p = quadratic()
    r = run(p, method="implicit", outer_optimizer="sgd", lr=0.5, max_steps=7)
    assert set(r.history) >= {"step", "outer", "hypergradient_norm", "inner_residual", "linear_residual", "time"}
    assert r.history["step"] == list(range(1, 8))
    assert all(len(v) == 7 for v in r.history.values())
    assert r.converged is False and "max_steps" in r.message
    assert r.state.iteration == 7
    assert torch.equal(r.state.x, r.x)
    # the recorded outer value is F at the (x, y) of that step: decreasing on this problem
    assert r.history["outer"][-1] < r.history["outer"][0]
    assert all(t >= 0 for t in r.history["time"])
    assert r.history["linear_residual"][-1] < 1e-6              # the IFT certificate


def test_tol_stops_with_a_certified_distance_to_x_star():
    """||grad Phi(x)|| <= tol at the last evaluated x; Phi is mu-strongly convex with
    mu = lambda_min(H_Phi), so ||x - x*|| <= tol / mu (and one more SGD step only contracts)."""
    p = quadratic()
    tol = 1e-6
    r = run(p, method="implicit", outer_optimizer="sgd", lr=0.5, tol=tol, max_steps=500)
    assert r.converged is True and "tol" in r.message
    assert r.history["hypergradient_norm"][-1] <= tol
    assert r.state.iteration < 500
    mu = float(torch.linalg.eigvalsh(q_phi_hessian(p)).min())
    assert float((r.x - p.solution.x).norm()) <= tol / mu + 1e-9


@pytest.mark.parametrize("arity", [1, 2])
def test_callback_sees_every_step_and_can_stop_the_run(arity):
    p = quadratic()
    seen = []
    if arity == 2:
        def callback(state, record):
            seen.append((state.iteration, record["step"], record["outer"]))
            return state.iteration >= 5
    else:
        def callback(state):
            seen.append((state.iteration,))
            return state.iteration >= 5
    r = run(p, method="penalty", max_steps=100, callback=callback)
    assert [s[0] for s in seen] == [1, 2, 3, 4, 5]
    if arity == 2:
        assert all(a == b for a, b, _ in seen)
        assert [s[2] for s in seen] == r.history["outer"]
    assert r.state.iteration == 5 and len(r.history["step"]) == 5
    assert r.converged is False and "callback" in r.message


def test_max_steps_zero_and_max_time():
    p = quadratic()
    x0 = p.x0.clone()
    r = run(p, method="implicit", max_steps=0)
    assert torch.equal(r.x, x0) and r.history["step"] == [] and r.state.iteration == 0
    assert torch.equal(p.x0, x0)                   # the problem's start point is not mutated
    r = run(p, method="meha", max_steps=10_000, max_time=0.0)
    assert r.state.iteration == 1 and "max_time" in r.message


def _resume_setup(method):
    if method == "lvhba":
        return coupled_constraint(), {}
    options = {"unrolled": {"steps": 20}, "bda": {"steps": 8}}.get(method, {})
    return quadratic(), options


@pytest.mark.parametrize("method", ALL_METHODS)
def test_resume_from_state_or_saved_checkpoint_ends_where_the_uninterrupted_run_ends(method):
    """30 steps in one go vs 12 + 18; the single-loop methods re-estimate curvature every
    25 steps, so the resumed part crosses a re-estimate."""
    p, options = _resume_setup(method)
    full = run(p, method=method, max_steps=30, **options)
    first = run(p, method=method, max_steps=12, **options)
    resumed = run(p, method=method, max_steps=30, resume=first.state, **options)
    assert torch.allclose(resumed.x, full.x, rtol=0, atol=1e-12)
    assert torch.allclose(resumed.y, full.y, rtol=0, atol=1e-12)
    assert resumed.history["step"] == list(range(13, 31))
    buffer = io.BytesIO()
    torch.save(first.state.state_dict(), buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)
    reloaded = run(p, method=method, max_steps=30, resume=checkpoint, **options)
    assert torch.allclose(reloaded.x, full.x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method, options", [
    ("implicit", {"outer_optimizer": "sgd", "lr": 0.5}), ("penalty", {}), ("meha", {}),
])
def test_resume_with_minibatches_skips_the_batches_already_used(method, options):
    p = quadratic()
    _A, _B, y_t, rho = q_data(p)
    batches = [y_t + 0.1 * k for k in range(-2, 3)]
    outer = lambda x, y, b: 0.5 * ((y - b) ** 2).sum() + 0.5 * rho * (x ** 2).sum()
    inner = lambda x, y, b: p.inner(x, y)
    kw = dict(method=method, data=batches, **options)
    full = run(outer, inner, p.x0, p.y0, max_steps=30, **kw)
    first = run(outer, inner, p.x0, p.y0, max_steps=12, **kw)
    resumed = run(outer, inner, p.x0, p.y0, max_steps=30, resume=first.state, **kw)
    assert torch.allclose(resumed.x, full.x, rtol=0, atol=1e-12)


def test_minibatches_are_consumed_one_per_step_in_order_and_cycled():
    """Cyclic mini-batches b_1..b_K of the outer target: SGD with exact per-batch
    hypergradients g_i(x) = H x - C^T b_i (H = H_Phi, C = A^-1 B) is an affine map per batch;
    the end-of-cycle iterate converges to the fixed point of their composition, computed here."""
    p = quadratic()
    A, B, y_t, rho = q_data(p)
    K, lr = 4, 0.5
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(K, 5, generator=gen, dtype=F64)
    batches = [y_t + 0.3 * (nz - noise.mean(0)) for nz in noise]
    H = q_phi_hessian(p)
    C = torch.linalg.solve(A, B)
    M = torch.eye(3, dtype=F64) - lr * H
    P, v = torch.eye(3, dtype=F64), torch.zeros(3, dtype=F64)
    for b in batches:                                   # compose x -> M x + lr C^T b
        P, v = M @ P, M @ v + lr * C.T @ b
    x_cycle = torch.linalg.solve(torch.eye(3, dtype=F64) - P, v)

    served = []
    cycles = 25

    def stream():                                        # a one-shot iterator: nothing is re-read
        for i in range(cycles * K):
            served.append(i)
            yield batches[i % K]

    outer = lambda x, y, b: 0.5 * ((y - b) ** 2).sum() + 0.5 * rho * (x ** 2).sum()
    inner = lambda x, y, b: p.inner(x, y)
    r = run(outer, inner, p.x0, p.y0, method="implicit", outer_optimizer="sgd", lr=lr,
            data=stream(), max_steps=cycles * K)
    assert served == list(range(cycles * K))            # one batch per step, none read twice
    # M is the same for every batch, so the cycle map contracts by q^K: after N steps the
    # distance to x_cycle is at most q^N |x_cycle| (+ the inner solve's sqrt(eps64) error)
    q = sgd_contraction(H, lr)
    assert float((r.x - x_cycle).norm()) < q ** (cycles * K) * float(x_cycle.norm()) + 1e-7
    assert float((x_cycle - p.solution.x).norm()) > 1e-3      # the cycle point is not x*: order matters
    # the same with a list (re-iterable, cycled)
    r_list = run(outer, inner, p.x0, p.y0, method="implicit", outer_optimizer="sgd", lr=lr,
                 data=batches, max_steps=cycles * K)
    assert torch.allclose(r_list.x, r.x, atol=1e-12)


def test_penalty_f2sa_with_minibatches_does_not_diverge_on_q():
    p = quadratic()
    _A, _B, y_t, rho = q_data(p)
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(8, 5, generator=gen, dtype=F64)
    batches = [y_t + 0.5 * (nz - noise.mean(0)) for nz in noise]     # exactly zero-mean noise
    outer = lambda x, y, b: 0.5 * ((y - b) ** 2).sum() + 0.5 * rho * (x ** 2).sum()
    inner = lambda x, y, b: p.inner(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StepSizeWarning)
        r = run(outer, inner, p.x0, p.y0, method="penalty", data=batches, max_steps=1000)
    # any lambda >= lambda0 = 1 has ||x_lam - x*|| <= ||x_1 - x*|| (0.27 relative here)
    assert rel_err(r.x, p.solution.x) < 0.5


def test_config_objects_and_string_options_are_the_same_method():
    p = quadratic()
    by_name = run(p, method="unrolled", steps=10, step_size=0.2, outer_optimizer="sgd", lr=0.5, max_steps=20)
    config = Unrolled(steps=10, step_size=0.2, outer_optimizer="sgd", lr=0.5)
    by_object = run(p, method=config, max_steps=20)
    assert torch.equal(by_name.x, by_object.x)
    # options on top of a config object replace its fields; the config itself is frozen
    changed = run(p, method=config, max_steps=20, lr=0.25)
    assert not torch.equal(changed.x, by_object.x)
    assert config.lr == 0.5 and config.replace(lr=0.25).lr == 0.25
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0
    assert METHODS["meha"] is MEHA and METHODS["unrolled"] is Unrolled
    assert set(ALL_METHODS) <= set(METHODS)


def test_outer_optimizer_can_be_a_class_or_a_factory():
    p = quadratic()
    a = run(p, method="implicit", outer_optimizer="sgd", lr=0.5, max_steps=10)
    b = run(p, method="implicit", outer_optimizer=torch.optim.SGD, lr=0.5, max_steps=10)
    c = run(p, method="implicit", outer_optimizer=lambda params: torch.optim.SGD(params, lr=0.5), max_steps=10)
    assert torch.allclose(a.x, b.x, atol=1e-14) and torch.allclose(a.x, c.x, atol=1e-14)


# =====================================================================================
# 9. Bad input gets a clear error
# =====================================================================================

_OUTER = lambda x, y: ((y - 1) ** 2).sum()
_INNER = lambda x, y: ((y - x) ** 2).sum()
_Z = torch.zeros(3, dtype=F64)


@pytest.mark.parametrize("call, error, match", [
    (lambda: run(_OUTER, _INNER, _Z, _Z, method="implicitt"), ValueError, "known methods.*implicit"),
    (lambda: run(_OUTER, _INNER, _Z, _Z, method="unrolled", step=10), TypeError, "step.*steps"),
    (lambda: run(_OUTER, _INNER, _Z, _Z, method="implicit", gamma=1.0), TypeError, "gamma"),
    (lambda: run(lambda x, y: (y - 1) ** 2, _INNER, _Z, _Z), ValueError, "scalar"),
    (lambda: run(_OUTER, lambda x, y: (y - x) ** 2, _Z, _Z, method="meha"), ValueError, "scalar"),
    (lambda: run(lambda x, y: 1.0, _INNER, _Z, _Z), TypeError, "tensor"),
    (lambda: run(_OUTER, _INNER, torch.tensor([0.0, math.nan, 0.0], dtype=F64), _Z), FloatingPointError, "finite"),
    (lambda: run(_OUTER, _INNER, _Z, torch.tensor([0.0, math.inf, 0.0], dtype=F64)), FloatingPointError, "finite"),
    (lambda: run(_OUTER, _INNER, torch.zeros(3, dtype=torch.long), _Z), TypeError, "floating"),
    (lambda: run(_OUTER, lambda x, y: ((torch.ones(4, 4, dtype=F64) @ y - x) ** 2).sum(), _Z, _Z),
     ValueError, r"shape \(3,\)"),
    (lambda: run(_OUTER, _INNER, _Z, _Z, max_steps=-1), ValueError, "max_steps"),
    (lambda: run(_OUTER, _INNER, _Z, _Z, outer_optimizer="adamm"), ValueError, "adam"),
    (lambda: run(_OUTER, _INNER, _Z, _Z, callback=3), TypeError, "callback"),
    (lambda: run(lambda x, y, b: _OUTER(x, y), lambda x, y, b: _INNER(x, y), _Z, _Z, data=iter([1, 2, 3]),
                 max_steps=5), ValueError, "ran out"),
    (lambda: run(lambda x, y, b: _OUTER(x, y), lambda x, y, b: _INNER(x, y), _Z, _Z, data=[]),
     ValueError, "empty"),
    (lambda: run(quadratic(), _INNER, _Z, _Z), TypeError, "either"),
    (lambda: Unrolled(steps=0), ValueError, "steps"),
    (lambda: BDA(mu=2.0), ValueError, "mu"),
    (lambda: MEHA(p=1.5), ValueError, "p"),
    (lambda: Penalty(lam0=-1.0), ValueError, "lam0"),
    (lambda: BAMM(mu0=1.5), ValueError, "mu0"),
    (lambda: LVHBA(eta=0.0), ValueError, "eta"),
    (lambda: OneStep(inner_steps=-1), ValueError, "inner_steps"),
    (lambda: Implicit(inner_solver="lbfgs"), TypeError, "inner_solver"),
], ids=lambda v: None if callable(v) or isinstance(v, type) else str(v)[:25])
def test_bad_input_is_rejected_with_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_objective_turning_nan_mid_run_names_the_step():
    """log(1.5 - sum(x)) is finite at x0 = 0 but NaN once sum(x) > 1.5, where the iterates go."""
    outer = lambda x, y: ((y - 1) ** 2).sum() + torch.log(1.5 - x.sum())
    for method in ("implicit", "meha"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(FloatingPointError, match="step"):
                run(outer, _INNER, _Z, _Z, method=method, outer_optimizer="sgd", lr=0.1, max_steps=300)


def test_a_too_large_x_step_is_detected_backed_off_and_recovers():
    """Penalty with lr = 5 (the derived step is ~0.07) blows up; the run goes back, shrinks the x
    step by 10, warns, and still reaches the answer within the default's O(1/lambda_300) ~ 1e-2."""
    p = quadratic()
    with pytest.warns(StepSizeWarning, match="blew up at step"):
        r = run(p, method="penalty", lr=5.0, max_steps=300)
    assert rel_err(r.x, p.solution.x) < 1e-2


def test_a_hopeless_x_step_ends_in_an_error_naming_the_step_after_the_back_offs():
    p = quadratic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(FloatingPointError, match=r"diverged at step \d+"):
            run(p, method="meha", lr=1e4, max_steps=200)
    assert any(issubclass(w.category, StepSizeWarning) for w in caught)
