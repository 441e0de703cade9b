"""SOBA and sl-BAMM on a constrained lower level (``y_set``): their linear systems live on
the directions the active constraints leave free (``tangent_map``), so they reach the
constrained problem's solution, which the unconstrained system misses by far."""

import pytest
import torch

import bilevel
from bilevel.algorithms._single_loop import tangent_map
from bilevel.implicit import NonNegative, Simplex
from bilevel.implicit.projections import project_simplex

D = torch.float64
A_STAR = 0.2 / 0.55  # y_1 - y_2 at the solution of the simplex problem below


def simplex_problem():
    r"""inner :math:`\tfrac12\|y - x\|^2 + y_3` over the simplex, so :math:`y^\star(x)` is the
    projection of :math:`x - e_3`; outer :math:`\tfrac12\|y - t\|^2 + 0.05\|x\|^2`,
    :math:`t = (0.8, 0.4, -0.3)`.  The face :math:`y_3 = 0` is active with margin 1/2 at the
    solution; there :math:`y_{1,2} = (1 \pm a)/2` with :math:`a = x_1 - x_2`, the outer value
    is smallest at :math:`a = 0.2 / 0.55` with :math:`x_1 + x_2 = 0`, :math:`x_3 = 0`."""
    t = torch.tensor([0.8, 0.4, -0.3], dtype=D)
    e3 = torch.tensor([0.0, 0.0, 1.0], dtype=D)
    inner = lambda x, y: 0.5 * ((y - x) ** 2).sum() + (e3 * y).sum()  # noqa: E731
    outer = lambda x, y: 0.5 * ((y - t) ** 2).sum() + 0.05 * (x ** 2).sum()  # noqa: E731
    x_star = torch.tensor([A_STAR / 2, -A_STAR / 2, 0.0], dtype=D)
    return outer, inner, torch.zeros(3, dtype=D), torch.full((3,), 1 / 3, dtype=D), x_star


def nonnegative_problem():
    r"""inner :math:`\tfrac12\|y - x\|^2 + y_2` over :math:`y \ge 0`: :math:`y^\star = \max(x - e_2, 0)`;
    outer :math:`\tfrac12\|y - (1, -1)\|^2 + 0.05\|x\|^2`: :math:`x^\star = (1/1.1, 0)`, where
    :math:`y_2 \ge 0` is active with margin 1.  Ignoring the bound, the hypergradient in
    :math:`x_2` is :math:`x_2 + 1 + 0.1 x_2`, which drives :math:`x_2` to -10."""
    t, e2 = torch.tensor([1.0, -1.0], dtype=D), torch.tensor([0.0, 1.0], dtype=D)
    inner = lambda x, y: 0.5 * ((y - x) ** 2).sum() + (e2 * y).sum()  # noqa: E731
    outer = lambda x, y: 0.5 * ((y - t) ** 2).sum() + 0.05 * (x ** 2).sum()  # noqa: E731
    return outer, inner, torch.tensor([0.0, -0.5], dtype=D), torch.zeros(2, dtype=D), torch.tensor([1 / 1.1, 0.0])


@pytest.mark.parametrize("method, make, y_set, tol", [
    ("soba", simplex_problem, Simplex(), 1e-8),
    ("soba", nonnegative_problem, NonNegative(), 1e-5),
    ("bamm", simplex_problem, Simplex(), 5e-3),  # sl-BAMM's x step decays with its mu_k schedule
])
def test_single_loop_methods_with_hessian_products_respect_an_active_lower_level_constraint(method, make, y_set, tol):
    outer, inner, x0, y0, x_star = make()
    result = bilevel.solve(outer, inner, x0, y0, method=method, y_set=y_set, max_steps=600, progress=False)
    assert float((result.x - x_star.to(D)).norm()) < tol
    assert float(y_set(result.y).sub(result.y).norm()) == 0.0  # feasible


def test_bamm_moves_toward_the_bound_instead_of_past_it():
    """Before the correction sl-BAMM drove x_2 to -6.75 by 1000 steps (the unconstrained
    stationary point is -10); now x_2 climbs toward 0 at the pace of its decaying x step."""
    outer, inner, x0, y0, x_star = nonnegative_problem()
    x2 = [float(bilevel.solve(outer, inner, x0, y0, method="bamm", y_set=NonNegative(), max_steps=steps,
                              progress=False).x[1]) for steps in (100, 400)]
    assert -0.5 < x2[0] < x2[1] < 0


def test_tangent_map_is_the_derivative_of_the_projection():
    """Non-negativity: the free coordinates' mask; the simplex: the orthogonal projector
    onto the active face's directions, I - 11^T/|S| on the support S, zero elsewhere."""
    y = torch.tensor([0.5, 0.0, 0.2, 0.0], dtype=D)
    g = torch.tensor([0.1, 1.0, -0.3, -2.0], dtype=D)  # w = y - g: (0.4, -1, 0.5, 2)
    J = tangent_map(lambda leaves: [t.clamp_min(0) for t in leaves], [y], [g], 1.0)
    v = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=D)
    torch.testing.assert_close(J([v])[0], torch.tensor([1.0, 0.0, 3.0, 4.0], dtype=D))

    w = torch.tensor([0.9, 0.6, -0.5, 0.1], dtype=D)  # projects onto the face with support {0, 1}
    J = tangent_map(lambda leaves: [project_simplex(t) for t in leaves], [w], [torch.zeros_like(w)], 1.0)
    P = torch.zeros(4, 4, dtype=D)
    P[:2, :2] = torch.eye(2, dtype=D) - 0.5
    torch.testing.assert_close(J([v])[0], P @ v)
    assert tangent_map(None, [y], [g], 1.0) is None


def test_a_curved_active_boundary_is_named_not_certified():
    """On a ball the projection's derivative is (r / |w|)(I - w w^T / |w|^2), no projector:
    the restricted system misses the sphere's curvature, and SOBA settles near x* = (1.5,
    0.866); it says so instead of reporting a plain convergence."""
    from bilevel.implicit import L2Ball
    from bilevel.status import OptimalityWarning

    a, b = torch.tensor([0.0, 2.0], dtype=D), torch.tensor([2.0, 0.0], dtype=D)
    inner = lambda x, y: 0.5 * ((y - x) ** 2).sum()  # noqa: E731
    outer = lambda x, y: 0.5 * ((y - a) ** 2).sum() + 0.5 * ((x - b) ** 2).sum()  # noqa: E731
    with pytest.warns(OptimalityWarning, match="curved part of the boundary of `y_set`"):
        bilevel.solve(outer, inner, torch.tensor([1.5, 0.5], dtype=D), torch.zeros(2, dtype=D), method="soba",
                      y_set=L2Ball(1.0), max_steps=100, progress=False)


def test_an_in_place_projection_and_a_nan_start_value_are_handled():
    outer, inner, x0, y0, x_star = nonnegative_problem()
    result = bilevel.solve(outer, inner, x0, y0, method="soba", y_set=lambda z: z.clamp_(min=0), max_steps=600,
                           progress=False)
    assert float((result.x - x_star.to(D)).norm()) < 1e-5
    # the warm-up cannot descend from a NaN inner value: it keeps y0
    nan_inner = lambda x, y: 0.5 * ((y - x) ** 2).sum() + torch.where(y.sum() > 0.4, 0.0, float("nan"))  # noqa: E731
    problem = bilevel.BilevelProblem(outer, nan_inner, x0, torch.ones(2, dtype=D))
    state = bilevel.algorithms.METHODS["soba"](y_set=bilevel.implicit.Box(0.0, 0.1)).init(problem)
    assert torch.isfinite(state.y).all()
