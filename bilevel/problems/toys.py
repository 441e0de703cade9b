r"""Small bilevel problems with known answers (ALGORITHMS.md, section 8).

* :func:`quadratic` — problem **Q**, a strongly convex quadratic: every method
  must reach :math:`x^\star`; closed-form :math:`y^\star(x)`, hypergradient
  and :math:`x^\star`.
* :func:`nonunique_lower_level` — problem **M1**, the non-unique lower level
  counter-example of the BDA / sl-BAMM / MEHA papers: methods that assume a
  unique inner solution stall at :math:`0.505\,e`.
* :func:`coupled_constraint` — problem **L**, an active coupled inequality
  :math:`y \le x` for LV-HBA, with the exact projection onto the feasible set.
"""

from __future__ import annotations

import torch

from .base import BilevelProblem, Solution, _builder

__all__ = ["quadratic", "nonunique_lower_level", "coupled_constraint"]


def _check_positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int; got {value!r}.")


def quadratic(
    d: int = 5, m: int = 3, rho: float = 0.1, seed: int = 0, dtype: torch.dtype = torch.float64
) -> BilevelProblem:
    r"""Problem Q: a strongly convex quadratic bilevel problem with every answer in closed form.

    .. math::

        f(x, y) = \tfrac12 y^\top A y - y^\top B x, \qquad
        F(x, y) = \tfrac12 \|y - y_t\|^2 + \tfrac{\rho}{2}\|x\|^2,

    with :math:`y \in \mathbb{R}^d`, :math:`x \in \mathbb{R}^m`,
    :math:`A = M M^\top / 5 + I` (:math:`M`, :math:`B`, :math:`y_t` standard
    normal, drawn in that order from ``torch.Generator().manual_seed(seed)``).
    Then

    .. math::

        y^\star(x) = A^{-1} B x, \quad
        \nabla\Phi(x) = B^\top A^{-1}(y^\star(x) - y_t) + \rho x, \quad
        x^\star = (B^\top A^{-2} B + \rho I)^{-1} B^\top A^{-1} y_t.

    Args:
        d: dimension of the lower variable ``y`` (default 5).
        m: dimension of the upper variable ``x`` (default 3).
        rho: outer ridge weight :math:`\rho > 0` (default 0.1).
        seed: seed of the data.
        dtype: floating dtype of data and start point.

    Returns:
        A :class:`BilevelProblem` starting at ``x0 = 0``, ``y0 = 0`` with the
        solution ``(x*, y*, F*)``; ``data`` holds ``A``, ``B``, ``y_target``,
        ``rho`` and the callables ``inner_solution(x)`` and ``hypergradient(x)``
        (also reachable as ``problem.inner_solution`` / ``problem.hypergradient``;
        ``x`` may carry leading batch dimensions).

    Example:
        >>> p = quadratic()
        >>> float(p.hypergradient(p.solution.x).abs().max()) < 1e-12
        True

    References:
        Pedregosa, `Hyperparameter optimization with approximate gradient
        <https://arxiv.org/abs/1602.02355>`_, ICML 2016 (the quadratic setting);
        Grazzi et al., `On the iteration complexity of hypergradient computation
        <https://arxiv.org/abs/2006.16218>`_, ICML 2020.
    """
    _check_positive_int(d, "d")
    _check_positive_int(m, "m")
    if not rho > 0:
        raise ValueError(f"`rho` must be positive (it makes x* unique); got {rho!r}.")
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(d, d, generator=g, dtype=torch.float64)
    A = M @ M.T / 5 + torch.eye(d, dtype=torch.float64)
    B = torch.randn(d, m, generator=g, dtype=torch.float64)
    y_t = torch.randn(d, generator=g, dtype=torch.float64)
    # closed forms in float64, then cast
    Ainv_B = torch.linalg.solve(A, B)
    x_star = torch.linalg.solve(Ainv_B.T @ Ainv_B + rho * torch.eye(m, dtype=torch.float64), Ainv_B.T @ y_t)
    y_star = Ainv_B @ x_star
    value = float(0.5 * ((y_star - y_t) ** 2).sum() + 0.5 * rho * (x_star**2).sum())
    A, B, y_t, x_star, y_star = (t.to(dtype) for t in (A, B, y_t, x_star, y_star))

    def inner(x, y, batch=None):
        return 0.5 * y @ (A @ y) - y @ (B @ x)

    def outer(x, y, batch=None):
        return 0.5 * ((y - y_t) ** 2).sum() + 0.5 * rho * (x**2).sum()

    def inner_solution(x):
        return torch.linalg.solve(A, (B @ x.unsqueeze(-1))).squeeze(-1)

    def hypergradient(x):
        r = torch.linalg.solve(A, (inner_solution(x) - y_t).unsqueeze(-1)).squeeze(-1)
        return r @ B + rho * x

    problem = BilevelProblem(
        outer, inner, torch.zeros(m, dtype=dtype), torch.zeros(d, dtype=dtype),
        solution=Solution(x_star, y_star, value), name=f"quadratic d={d} m={m}",
        data=dict(A=A, B=B, y_target=y_t, rho=rho, inner_solution=inner_solution,
                  hypergradient=hypergradient),
    )
    return _builder(problem, lambda dt: quadratic(d, m, rho, seed, dt))


def nonunique_lower_level(n: int = 100, dtype: torch.dtype = torch.float64) -> BilevelProblem:
    r"""Problem M1: a lower level with a continuum of solutions.

    .. math::

        \min_x \tfrac12 \|x - y_2\|^2 + \tfrac12 \|y_1 - e\|^2 \quad\text{s.t.}\quad
        (y_1, y_2) \in \arg\min_{y_1, y_2} \tfrac12 \|y_1\|^2 - x^\top y_1,

    :math:`x, y_1, y_2 \in \mathbb{R}^n`, :math:`e` the all-ones vector.  The
    inner solutions are :math:`\{y_1 = x, y_2 \text{ free}\}`; the optimistic
    bilevel optimum is :math:`x^\star = y_1^\star = y_2^\star = e`,
    :math:`F^\star = 0`.  The start is :math:`x_0 = y_{1,0} = y_{2,0} = 0.01 e`.

    Methods that assume a unique inner solution (implicit differentiation,
    plain unrolling) never move :math:`y_2` (:math:`\nabla_{y_2} f = 0`) and
    converge to the stationary point of
    :math:`x \mapsto F(x, (x, y_{2,0}))`, i.e. :math:`x = (e + y_{2,0})/2 = 0.505\,e`
    (kept in ``data["stall_point"]``); the inner Hessian is singular in
    :math:`y_2`.  Single-loop methods (MEHA, sl-BAMM, BDA, penalty) reach
    :math:`e`.

    Args:
        n: dimension of ``x``, ``y1`` and ``y2`` (default 100).
        dtype: floating dtype.

    Returns:
        A :class:`BilevelProblem` with ``y`` the tuple ``(y1, y2)``, the known
        solution, and ``data`` keys ``"stall_point"`` (``0.505 e``) and
        ``"inner_solutions"`` (``(x, y2) -> (x, y2)``: every inner solution).

    Example:
        >>> p = nonunique_lower_level(n=3)
        >>> p.evaluate(p.solution.x, p.solution.y)["outer"]
        0.0

    References:
        Liu, Mu, Yuan, Zeng, Zhang, `A generic first-order algorithmic framework
        for bi-level programming beyond lower-level singleton
        <https://arxiv.org/abs/2006.04045>`_, ICML 2020 (BDA);
        Liu, Liu, Zeng, Zhang, `Averaged method of multipliers for bi-level
        optimization without lower-level strong convexity
        <https://arxiv.org/abs/2302.03407>`_, ICML 2023 (sl-BAMM);
        Liu, Liu, Yao, Zeng, Zhang, `Moreau envelope based difference-of-weakly-convex
        reformulation and algorithm for bilevel programs
        <https://arxiv.org/abs/2306.16761>`_, ICML 2024 (MEHA).
    """
    _check_positive_int(n, "n")
    e = torch.ones(n, dtype=dtype)

    def outer(x, y, batch=None):
        y1, y2 = y
        return 0.5 * ((x - y2) ** 2).sum() + 0.5 * ((y1 - e) ** 2).sum()

    def inner(x, y, batch=None):
        y1, _ = y
        return 0.5 * (y1**2).sum() - x @ y1

    problem = BilevelProblem(
        outer, inner, 0.01 * e, (0.01 * e, 0.01 * e),
        solution=Solution(e.clone(), (e.clone(), e.clone()), 0.0), name=f"nonunique_lower_level n={n}",
        data=dict(stall_point=0.505 * e, inner_solutions=lambda x, y2: (x, y2)),
    )
    return _builder(problem, lambda dt: nonunique_lower_level(n, dt))


def project_below_diagonal(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Exact Euclidean projection of ``(x, y)`` onto :math:`C = \{(x, y) : y \le x\}`.

    The set is a product of half-planes :math:`\{y_i \le x_i\}`: where
    :math:`y_i > x_i` both move to :math:`(x_i + y_i)/2`, elsewhere nothing moves.

    Args:
        x: the upper-level variable, a tensor.
        y: the lower-level variable, a tensor of ``x``'s shape.

    Returns:
        The pair ``(x', y')``, the point of :math:`C` nearest to ``(x, y)``.

    Example:
        >>> project_below_diagonal(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]))
        (tensor([0.5000, 1.0000]), tensor([0.5000, 0.0000]))
    """
    mid = 0.5 * (x + y)
    violated = y > x
    return torch.where(violated, mid, x), torch.where(violated, mid, y)


def coupled_constraint(
    n: int = 10, a: float = 0.0, c: float = 1.0, b: float = 2.0, dtype: torch.dtype = torch.float64
) -> BilevelProblem:
    r"""Problem L: a lower level with an active coupled inequality :math:`y \le x`.

    .. math::

        \min_x \tfrac12 \|x - a e\|^2 + \tfrac12 \|y - c e\|^2 \quad\text{s.t.}\quad
        y \in \arg\min_{y'} \{ \tfrac12 \|y' - b e\|^2 : y' - x \le 0 \},

    so :math:`y^\star(x) = \min(b e, x)`.  With the defaults :math:`a = 0`,
    :math:`c = 1`, :math:`b = 2`, :math:`n = 10`: **x* = y* = 0.5 e**, the
    constraint is active and :math:`F^\star = n/4`.  In general (for
    :math:`a < b` and :math:`(a + c)/2 \le b`) :math:`x^\star = y^\star = (a + c)/2\,e`
    and :math:`F^\star = n (c - a)^2 / 4`.

    Args:
        n: dimension of ``x`` and ``y`` (default 10).
        a, c, b: the constants of the objectives (defaults 0, 1, 2).
        dtype: floating dtype.

    Returns:
        A :class:`BilevelProblem` with ``constraints(x, y) = y - x`` starting at
        ``x0 = y0 = 0``, the known solution, and ``data`` keys ``"project"``
        (:func:`project_below_diagonal`, the exact projection onto
        :math:`\{y \le x\}`), ``"inner_solution"`` and ``"hypergradient"`` (of
        :math:`\Phi(x) = F(x, \min(b e, x))`, valid away from :math:`x_i = b`).

    Example:
        >>> p = coupled_constraint()
        >>> p.evaluate(p.solution.x, p.solution.y)
        {'outer': 2.5, 'inner': 11.25, 'constraint_violation': 0.0}

    References:
        Yao, Yu, Zeng, Zhang, `Constrained bi-level optimization: proximal
        Lagrangian value function approach and Hessian-free algorithm
        <https://arxiv.org/abs/2401.16164>`_, ICLR 2024 (LV-HBA).
    """
    _check_positive_int(n, "n")
    if not (a < b and (a + c) / 2 <= b):
        raise ValueError(f"the closed form needs a < b and (a + c)/2 <= b; got a={a}, b={b}, c={c}.")

    def outer(x, y, batch=None):
        return 0.5 * ((x - a) ** 2).sum() + 0.5 * ((y - c) ** 2).sum()

    def inner(x, y, batch=None):
        return 0.5 * ((y - b) ** 2).sum()

    def constraints(x, y):
        return y - x

    def inner_solution(x):
        return x.clamp(max=b)

    def hypergradient(x):
        return (x - a) + torch.where(x < b, x - c, torch.zeros_like(x))

    star = torch.full((n,), (a + c) / 2, dtype=dtype)
    problem = BilevelProblem(
        outer, inner, torch.zeros(n, dtype=dtype), torch.zeros(n, dtype=dtype), constraints=constraints,
        solution=Solution(star, star.clone(), n * (c - a) ** 2 / 4), name=f"coupled_constraint n={n}",
        data=dict(project=project_below_diagonal, inner_solution=inner_solution, hypergradient=hypergradient),
    )
    return _builder(problem, lambda dt: coupled_constraint(n, a, c, b, dt))
