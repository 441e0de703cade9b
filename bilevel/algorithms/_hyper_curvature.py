r"""An estimate of the curvature :math:`\|\nabla^2\Phi\|` of the hyper-objective
:math:`\Phi(x) = F(x, y^\star(x))`, from Hessian-vector products and two inner solves
per power iteration.

Step-size rules of the single-loop methods bound :math:`\|\nabla^2\Phi\|` by norms of
Hessian blocks, :math:`\|\nabla^2_{xx}F\| + 2\|\nabla^2_{xy}F\|\|B\|/\mu +
\|\nabla^2_{yy}F\|\|B\|^2/\mu^2`, which assumes that :math:`B = \nabla^2_{yx} f` points
into the flattest direction of :math:`H = \nabla^2_{yy} f`.  Where it does not (one
weight per training example: :math:`B` lies in the span of the data, the flat
directions of :math:`H` are those only the L2 term curves), the bound is loose by
orders of magnitude: about 2e3 times on data hyper-cleaning (with the estimated
:math:`\mu`), 200 times on per-feature logistic-regression penalties, up to 9 times on
the random quadratics of problem Q (and too low where :math:`\mu` is overestimated).

The estimate is the second-order part of :math:`\nabla^2\Phi` at the given :math:`y`:
it leaves out the third derivatives of :math:`f` (weighted by the adjoint
:math:`v = -H^{-1}\nabla_y F`), and a :math:`y` short of :math:`y^\star(x)` shifts it
(on the logistic penalties, after SOBA's warm-up, the true curvature is about 5 times
the estimate), so step rules that use it keep the caps that guard those terms.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from .._tree import seeded_normal_like, tree_unflatten
from ..implicit.linear_solve import CG
from ..status import Status
from ._single_loop import Leaves, autograd_grads


class HyperCurvature(NamedTuple):
    """What :func:`hyper_curvature` measures."""

    norm: float
    r"""The estimate of :math:`\|\nabla^2\Phi\|`."""
    tracking: float
    r"""The curvature of :math:`f` along the way :math:`y^\star` moves with :math:`x`: the
    Rayleigh quotient :math:`w^\top H w / w^\top w` of :math:`w = H^{-1}Bu` for the last power-iteration
    direction :math:`u` (0 where :math:`Bu = 0`).  Between :math:`\lambda_{\min}(H)` and
    :math:`\|H\|`, it sets how fast gradient steps on :math:`y` catch up with a move of
    :math:`x` along the stiffest direction of :math:`\Phi`."""


def hyper_curvature(
    outer: Callable, inner: Callable, x_leaves: Leaves, y_leaves: Leaves, x_spec, y_spec,
    iterations: int = 10, solve_iterations: int = 50,
) -> HyperCurvature:
    r"""Power-iteration estimate of :math:`\|\nabla^2\Phi(x)\|` at :math:`(x, y)`, with
    :math:`y` taken for :math:`y^\star(x)`.

    Differentiating :math:`\nabla_y f(x, y^\star(x)) = 0` gives
    :math:`\partial y^\star/\partial x = -H^{-1}B` (:math:`H = \nabla^2_{yy} f`,
    :math:`B = \nabla^2_{yx} f`) and, leaving out the third derivatives of :math:`f`,

    .. math::

        \nabla^2\Phi\, u = t_x - B^\top H^{-1} t_y, \qquad
        (t_x, t_y) = \nabla^2 F\,(u, -w), \quad w = H^{-1} B u,

    with :math:`\nabla^2 F` the joint Hessian of the outer objective.  Each iteration
    takes two products with the joint Hessian of :math:`f`, one with that of :math:`F`
    and two conjugate-gradient solves with :math:`H` (``solve_iterations`` products at
    most, relative tolerance 1e-3, warm-started from the previous iteration's
    solutions).  The start vector comes from a fixed seed.  The norm is 0 where
    :math:`\Phi` has no curvature that this formula sees (:math:`F` linear); with it
    comes the tracking curvature :math:`w^\top H w / w^\top w = w^\top B u / w^\top w`
    (:class:`HyperCurvature`), at no extra product.

    Raises:
        FloatingPointError: the products are not finite, or CG broke down on :math:`H`
            (singular or indefinite).
    """
    gen = torch.Generator().manual_seed(0)
    n_x = len(x_leaves)
    solve = CG(maxiter=solve_iterations, tol=1e-3)
    with torch.enable_grad():
        xs = [t.detach().requires_grad_(True) for t in x_leaves]
        ys = [t.detach().requires_grad_(True) for t in y_leaves]
        inputs = xs + ys
        x_tree, y_tree = tree_unflatten(xs, x_spec), tree_unflatten(ys, y_spec)

        def linearized(fun: Callable) -> list:
            value = fun(x_tree, y_tree).reshape(())
            if not value.requires_grad:
                return [torch.zeros_like(t) for t in inputs]
            grads = torch.autograd.grad(value, inputs, create_graph=True, allow_unused=True)
            return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]

        grad_f, grad_F = linearized(inner), linearized(outer)

        def product(grads: list, tangent: list) -> list:
            """The joint Hessian of the linearized objective times ``tangent`` (x leaves, then y)."""
            return [h.detach() for h in autograd_grads(grads, inputs, grad_outputs=tangent, retain_graph=True)]

        zeros_x, zeros_y = [torch.zeros_like(t) for t in xs], [torch.zeros_like(t) for t in ys]

        def inner_hessian(p: list) -> list:
            """:math:`H p`: the lower-level block alone (the products of the CG solves)."""
            return [h.detach() for h in autograd_grads(grad_f[n_x:], ys, grad_outputs=list(p), retain_graph=True)]

        def unit(v: list) -> tuple[list, torch.Tensor]:
            size = torch.sqrt(sum((a * a).sum() for a in v))
            return [a / size.clamp_min(torch.finfo(size.dtype).tiny) for a in v], size

        u, _ = unit(seeded_normal_like(xs, gen))
        w = z = None
        size = torch.zeros(())
        for _ in range(max(1, iterations)):
            pushed = product(grad_f, u + zeros_y)[n_x:]  # B u
            w, info_w = solve(inner_hessian, pushed, w)
            t = product(grad_F, u + [-a for a in w])
            z, info_z = solve(inner_hessian, t[n_x:], z)
            if any(int(info.status) == Status.BREAKDOWN for info in (info_w, info_z)):
                raise FloatingPointError("hyper_curvature: CG broke down on the lower-level Hessian, which is "
                                         "singular or indefinite here: no inverse to estimate with.")
            back = product(grad_f, zeros_x + list(z))[:n_x]
            u, size = unit([a - b for a, b in zip(t[:n_x], back)])
        moved = sum((a * a).sum() for a in w)
        along = sum((a * b).sum() for a, b in zip(w, pushed)) / moved.clamp_min(torch.finfo(moved.dtype).tiny)
    estimate, tracking = torch.stack([size.to(along.dtype), along]).tolist()  # one host read
    if not (math.isfinite(estimate) and math.isfinite(tracking)):
        raise FloatingPointError("the Hessian-vector products of the hyper-curvature estimate are not finite.")
    return HyperCurvature(estimate, max(tracking, 0.0))
