r"""What the single-loop, first-order bilevel methods share.

Penalty, MEHA, sl-BAMM and LV-HBA move the upper variable :math:`x`, the lower
variable :math:`y` and a few auxiliary variables by one explicit step each per
iteration.  This module holds their common parts:

* first-order oracles: value and gradients of an objective in :math:`(x, y)`
  from one reverse pass (:func:`value_and_grads`);
* curvature scales for default step sizes: the spectral norm of the joint
  Hessian :math:`\|\nabla^2_{(x,y)} h\|` and of the lower block
  :math:`\|\nabla^2_{yy} h\|`, each by a few power iterations with
  Hessian-vector products (:func:`curvature`), so that no step size is a
  constant tuned to one problem;
* projections onto the simple sets ``x_set`` / ``y_set`` (:func:`set_projection`);
* :class:`SingleLoop`, the base config: the :math:`x` step goes through a
  ``torch.optim`` optimizer (plain SGD by default, which is the papers' rule
  :math:`x \leftarrow P_X(x - \alpha_k d_x)`), and a step whose iterates blow up
  is reported with its number instead of returning NaN.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch

from .._tree import seeded_normal_like, tree_flatten, tree_leaves, tree_unflatten
from ..implicit.linear_solve._base import _sync_every
from ..problems import BilevelProblem
from ..status import OptimalityWarning, StepSizeWarning
from ._base import (
    Algorithm,
    State,
    StepInfo,
    bind_batch,
    fresh_leaves,
    host_floats,
    make_optimizer,
    report_value,
    set_projection,
)
from ._lanczos import lowest_eigenpair

Leaves = list
_LOWEST = "lowest_direction"
r"""Key of ``state.extras``: the Ritz vector of the last estimate of :math:`\lambda_{\min}(\nabla^2_{yy} f)`."""


def value_and_grads(fun: Callable, x_leaves: Leaves, y_leaves: Leaves, x_spec, y_spec, wrt: str = "xy"):
    """``fun(x, y)`` and its gradients in the leaves of ``x`` and/or ``y``.

    One reverse pass; leaves that ``fun`` does not use get zero gradients.
    ``wrt`` is ``"xy"``, ``"x"`` or ``"y"``; the gradients not asked for are ``None``.
    """
    with torch.enable_grad():
        xs = [t.detach().requires_grad_("x" in wrt) for t in x_leaves]
        ys = [t.detach().requires_grad_("y" in wrt) for t in y_leaves]
        value = fun(tree_unflatten(xs, x_spec), tree_unflatten(ys, y_spec))
        if not (torch.is_tensor(value) and value.numel() == 1):
            raise ValueError(f"objectives must return a scalar tensor; got {type(value).__name__} "
                             f"of shape {tuple(getattr(value, 'shape', ()))}.")
        inputs = (xs if "x" in wrt else []) + (ys if "y" in wrt else [])
        grads = autograd_grads(value.reshape(()), inputs)
    gx = grads[: len(xs)] if "x" in wrt else None
    gy = grads[len(xs) if "x" in wrt else 0:] if "y" in wrt else None
    return value.detach().reshape(()), gx, gy


def tracked(leaves: Leaves, spec) -> tuple[Leaves, Any]:
    """Fresh leaves that require grad, detached from ``leaves``, and their tree."""
    fresh = [t.detach().requires_grad_(True) for t in leaves]
    return fresh, tree_unflatten(fresh, spec)


def autograd_grads(outputs, inputs, grad_outputs=None, create_graph=False, retain_graph=None):
    """``torch.autograd.grad`` with zeros for inputs the outputs do not depend on."""
    if isinstance(outputs, list):
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
        outputs, grad_outputs = [o for o, _ in pairs], [g for _, g in pairs]
        if not outputs:
            return [torch.zeros_like(t) for t in inputs]
    elif not outputs.requires_grad:  # an objective that depends on none of the inputs
        return [torch.zeros_like(t) for t in inputs]
    grads = torch.autograd.grad(
        outputs, inputs, grad_outputs=grad_outputs, create_graph=create_graph,
        retain_graph=retain_graph, allow_unused=True,
    )
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]


def tangent_map(project_y: Optional[Callable], y_leaves: Leaves, grads: Leaves, step) -> Optional[Callable]:
    r"""The derivative :math:`J = \partial P_Y(w)` of the projection onto ``y_set`` at the
    point :math:`w = y - s\, g` it is applied to in this step, as a map on lists of
    leaves (``None`` without ``y_set``).

    Near a solution of :math:`\min_{y \in Y} f(x, y)` whose active constraints do not
    change, :math:`y^\star(x) = P_Y(y^\star - s \nabla_y f)` moves only inside the range
    of :math:`J`, the directions the active constraints leave free (for a box, the free
    coordinates; for a polyhedral set, :math:`J` is the orthogonal projector onto the
    active face's subspace).  The implicit system of the constrained lower level is then
    :math:`J \nabla^2_{yy} f\, J v = J \nabla_y F` with :math:`v = J v`: the methods that
    track :math:`v` by Hessian-vector products (SOBA, sl-BAMM) take their products on
    :math:`J v` and keep the residual in the range of :math:`J`, which leaves them
    unchanged where no constraint is active.  :math:`J` is symmetric (the Jacobian of a
    projection onto a convex set), so it is applied by one backward pass through the
    projection, recorded once per step.
    """
    if project_y is None:
        return None
    with torch.enable_grad():
        w = [(y - step * g).detach().requires_grad_(True) for y, g in zip(y_leaves, grads)]
        projected = project_y([t.clone() for t in w])  # copies: a projection may work in place
    if not all(torch.is_tensor(t) and t.requires_grad for t in projected):
        raise TypeError(
            "y_set: the projection onto the lower level's set must be differentiable by autograd (built "
            "from torch operations): this method corrects its linear system with the projection's "
            "derivative (the directions the active constraints leave free).")

    def apply(vectors: Leaves) -> Leaves:
        return autograd_grads(list(projected), w, grad_outputs=list(vectors), retain_graph=True)

    return apply


_CURVED_SET = "y_set_curved_warned"


def check_flat_set(tangent: Callable, vectors: Leaves, extras: dict, method: str) -> None:
    r"""Warn once where the derivative :math:`J` of the projection onto ``y_set`` is not a
    projector (:math:`J^2 \ne J` on ``vectors``): a curved piece of the boundary is active
    (a ball's sphere), where :math:`J = \tfrac{r}{\|w\|}(I - \hat w \hat w^\top)` and the
    system restricted by it misses the boundary's curvature, so the method settles near,
    not at, the constrained solution.  One host read; called now and then."""
    if extras.get(_CURVED_SET):
        return
    once = tangent(vectors)
    twice = tangent(once)
    gap, size = host_floats([tree_sq_norm([a - b for a, b in zip(twice, once)]), tree_sq_norm(once)])
    if gap > 1e-10 * size:
        extras[_CURVED_SET] = True
        warnings.warn(
            f"{method}: a curved part of the boundary of `y_set` is active (e.g. a ball's sphere): this "
            "method restricts its linear system to the directions the constraint leaves free, which "
            "ignores the boundary's curvature, so it settles near, not at, the constrained solution. For "
            "an exact answer use method='implicit', 'penalty', 'meha' or 'lvhba'.",
            OptimalityWarning, stacklevel=4)


def curvature(
    fun: Callable, x_leaves: Leaves, y_leaves: Leaves, x_spec, y_spec, block: str = "xy", iterations: int = 20,
) -> float:
    r"""Spectral norm :math:`\|\nabla^2 h\|` over ``block`` (``"xy"``: both
    variables, ``"y"``: the lower one), by power iteration on Hessian-vector products.

    The start vector is drawn from a fixed seed, so the estimate (and every default
    step size built on it) is reproducible.  Returns 0 for an objective that is
    linear in the block.
    """
    gen = torch.Generator().manual_seed(0)
    with torch.enable_grad():
        xs = [t.detach().requires_grad_("x" in block) for t in x_leaves]
        ys = [t.detach().requires_grad_(True) for t in y_leaves]
        inputs = (xs if "x" in block else []) + ys
        value = fun(tree_unflatten(xs, x_spec), tree_unflatten(ys, y_spec)).reshape(())
        grads = torch.autograd.grad(value, inputs, create_graph=True, allow_unused=True)
        curved = [g is not None and g.requires_grad for g in grads]
        if not any(curved):
            return 0.0
        # a leaf the gradient does not depend on adds nothing to the norm
        inputs, grads = [t for t, c in zip(inputs, curved) if c], [g for g, c in zip(grads, curved) if c]
        v = seeded_normal_like(inputs, gen)
        norm = torch.zeros((), dtype=inputs[0].dtype)
        for i in range(iterations):
            size = torch.sqrt(sum((a * a).sum() for a in v)).clamp_min(torch.finfo(inputs[0].dtype).tiny)
            v = [a / size for a in v]
            hv = torch.autograd.grad(grads, inputs, v, retain_graph=i < iterations - 1, allow_unused=True)
            v = [torch.zeros_like(t) if h is None else h.detach() for t, h in zip(inputs, hv)]
            norm = torch.sqrt(sum((a * a).sum() for a in v))
    estimate = float(norm)
    if not math.isfinite(estimate):
        raise FloatingPointError("the Hessian-vector products of the curvature estimate are not finite.")
    return estimate


def lowest_curvature(
    fun: Callable, x_leaves: Leaves, y_leaves: Leaves, x_spec, y_spec, iterations: int = 20,
    start: Optional[torch.Tensor] = None,
) -> tuple[float, Optional[torch.Tensor]]:
    r"""The smallest eigenvalue of :math:`\nabla^2_{yy} h` (an estimate from above),
    by ``iterations`` Lanczos steps on Hessian-vector products
    (:func:`~bilevel.algorithms._lanczos.lowest_eigenpair`), and its Ritz vector
    (flat over the leaves of ``y``, in their dtype; ``None`` for a lower level too large to
    keep the Lanczos basis of) to warm-start the next estimate with ``start``.

    Every leaf counts: one that ``h`` is linear in (or ignores) has Hessian eigenvalue
    0 there, which may be the smallest one.  The random part of the start is drawn
    from a fixed seed, so the estimate is reproducible.
    """
    gen = torch.Generator().manual_seed(1)
    device = y_leaves[0].device
    with torch.enable_grad():
        xs = [t.detach() for t in x_leaves]
        ys = [t.detach().requires_grad_(True) for t in y_leaves]
        value = fun(tree_unflatten(xs, x_spec), tree_unflatten(ys, y_spec)).reshape(())
        grads = torch.autograd.grad(value, ys, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        sizes = [t.numel() for t in ys]
        live_grads, live_ys = [grads[i] for i in live], [ys[i] for i in live]

        def matvec(v: torch.Tensor) -> torch.Tensor:
            pieces = v.split(sizes)
            products = torch.autograd.grad(live_grads, live_ys, [pieces[i].view_as(ys[i]).to(ys[i].dtype) for i in live],
                                           retain_graph=True, allow_unused=True)
            out = [torch.zeros_like(p) for p in pieces]  # leaves f is linear in (or ignores): 0
            for i, h in zip(live, products):
                if h is not None:
                    out[i] = h.detach().reshape(-1).to(device=device, dtype=v.dtype)
            return torch.cat(out)

        if not live:
            return 0.0, None
        if start is not None and start.numel() != sum(sizes):
            start = None  # from other variables: start afresh
        # the vectors in float64 (float32 on MPS), each leaf's product in its own dtype
        theta, direction = lowest_eigenpair(matvec, sum(sizes), iterations, dtype=_wide(ys[0]), device=device,
                                            start=start, generator=gen)
        # kept in the state: in y's dtype, as every tensor of a float32 run's checkpoint
        dtype = functools.reduce(torch.promote_types, [t.dtype for t in ys])
        return theta, None if direction is None else direction.to(dtype)


def block_curvature(
    fun: Callable, x_leaves: Leaves, y_leaves: Leaves, x_spec, y_spec, iterations: int = 20,
) -> dict:
    r"""Norms of the three blocks of :math:`\nabla^2 h = \begin{pmatrix} A & B \\ B^\top & C\end{pmatrix}`
    (:math:`A = \nabla^2_{xx} h`, :math:`B = \nabla^2_{xy} h`, :math:`C = \nabla^2_{yy} h`)
    as ``{"x": ||A||, "y": ||C||, "cross": ||B||}``.

    Three power iterations run side by side on Hessian-vector products from one
    linearization: on :math:`A` with tangents :math:`(v_x, 0)`, on :math:`C` with
    :math:`(0, v_y)`, and on the symmetric :math:`\begin{pmatrix}0 & B\\ B^\top & 0\end{pmatrix}`
    (whose norm is :math:`\|B\|`) from the off-diagonal parts of
    :math:`\nabla^2 h\,(m_x, 0)` and :math:`\nabla^2 h\,(0, m_y)`: four products per
    iteration, evaluated as one batched backward pass where the objective allows it.
    The joint norm is at most :math:`\max(\|A\|, \|C\|) + \|B\|`.  Start vectors come
    from a fixed seed, so every step size built on the estimates is reproducible.
    """
    return _checked_blocks(*_block_norms(fun, x_leaves, y_leaves, x_spec, y_spec, iterations).tolist())


def _checked_blocks(x_norm: float, y_norm: float, cross: float) -> dict:
    if not all(math.isfinite(t) for t in (x_norm, y_norm, cross)):
        raise FloatingPointError("the Hessian-vector products of the curvature estimate are not finite.")
    return {"x": x_norm, "y": y_norm, "cross": cross}


def _block_norms(fun: Callable, x_leaves: Leaves, y_leaves: Leaves, x_spec, y_spec, iterations: int) -> torch.Tensor:
    """The three norms of :func:`block_curvature` as a tensor on the device (no host read)."""
    gen = torch.Generator().manual_seed(0)
    n_x = len(x_leaves)
    with torch.enable_grad():
        xs = [t.detach().requires_grad_(True) for t in x_leaves]
        ys = [t.detach().requires_grad_(True) for t in y_leaves]
        inputs = xs + ys
        value = fun(tree_unflatten(xs, x_spec), tree_unflatten(ys, y_spec)).reshape(())
        grads = torch.autograd.grad(value, inputs, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        if not live:
            return torch.zeros(3, dtype=inputs[0].dtype, device=inputs[0].device)
        dtype = inputs[0].dtype
        tiny = max(torch.finfo(t.dtype).tiny for t in inputs)  # representable in every leaf's dtype

        def draw(is_x: bool) -> list:
            drawn = iter(seeded_normal_like([t for i, t in enumerate(inputs) if (i < n_x) == is_x], gen))
            return [next(drawn) if (i < n_x) == is_x else torch.zeros_like(t) for i, t in enumerate(inputs)]

        def unit(v: list) -> list:
            size = torch.sqrt(sum((a * a).sum() for a in v)).clamp_min(tiny)
            return [a / size for a in v]

        def products(tangents: list) -> list:
            """``H t`` for each tangent ``t`` (lists over all inputs), one batched pass if possible."""
            stacked = [torch.stack([t[i] for t in tangents]) for i in live]
            outs = [grads[i] for i in live]
            try:
                hv = torch.autograd.grad(outs, inputs, stacked, retain_graph=True, allow_unused=True,
                                         is_grads_batched=True)
                return [[torch.zeros_like(t) if h is None else h[j].detach() for t, h in zip(inputs, hv)]
                        for j in range(len(tangents))]
            except RuntimeError:  # an operation without a batching rule: one product at a time
                results = []
                for t in tangents:
                    hv = torch.autograd.grad(outs, inputs, [t[i] for i in live], retain_graph=True,
                                             allow_unused=True)
                    results.append([torch.zeros_like(a) if h is None else h.detach() for a, h in zip(inputs, hv)])
                return results

        def part(v: list, is_x: bool) -> list:
            return [a if (i < n_x) == is_x else torch.zeros_like(a) for i, a in enumerate(v)]

        a, c, m = unit(draw(True)), unit(draw(False)), unit([p + q for p, q in zip(draw(True), draw(False))])
        norms = torch.zeros(3, dtype=dtype, device=inputs[0].device)
        for _ in range(iterations):
            ha, hc, hmx, hmy = products([a, c, part(m, True), part(m, False)])
            a, c = part(ha, True), part(hc, False)
            m = [p + q for p, q in zip(part(hmy, True), part(hmx, False))]  # (B m_y, B^T m_x)
            norms = torch.stack([torch.sqrt(sum((t * t).sum() for t in v)) for v in (a, c, m)])
            a, c, m = unit(a), unit(c), unit(m)
    return norms


def coupled_step(x_curv: float, y_curv: float, cross: float) -> float:
    r"""The largest step :math:`\alpha` for :math:`x` that keeps joint gradient steps
    stable when :math:`y` moves with step :math:`1/\|C\|`.

    With step :math:`\alpha` on :math:`x` and :math:`\tau = 1/\|C\|` on :math:`y`, the
    scaled Hessian :math:`P^{1/2}\nabla^2 h\,P^{1/2}`, :math:`P = \operatorname{diag}(\alpha I, \tau I)`,
    has norm at most :math:`\max(\alpha\|A\|, 1) + \sqrt{\alpha\tau}\,\|B\|`; asking
    :math:`\alpha\|A\| \le \tfrac12` and :math:`\sqrt{\alpha\tau}\|B\| \le \tfrac12` gives

    .. math:: \alpha = \min\Bigl(\frac{1}{2\|A\|},\ \frac{\|C\|}{4\|B\|^2}\Bigr),

    which, unlike :math:`\tfrac12/\|\nabla^2 h\|`, lets :math:`x` move fast when it is
    weakly coupled to a stiff :math:`y` (e.g. one weight per training example in
    data hyper-cleaning, where :math:`\|B\| = O(n^{-1/2})`).  Without coupling or
    curvature in :math:`x` the bound falls back to :math:`\tfrac12/\max(\|C\|, 1)`.
    """
    bounds = []
    if x_curv > 0:
        bounds.append(0.5 / x_curv)
    if cross > 0:
        bounds.append(y_curv / (4.0 * cross ** 2) if y_curv > 0 else 0.5 / cross)
    return min(bounds) if bounds else 0.5 / max(y_curv, 1.0)


def _wide(t: torch.Tensor) -> torch.dtype:
    """float64 where the device has it: comparisons then match the host's, in double."""
    return torch.float32 if t.device.type == "mps" else torch.float64


def tree_sq_norm(leaves: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((t * t).sum() for t in leaves)


def check_constraint_value(value: Any, expected_shape: Optional[torch.Size] = None, step: Optional[int] = None):
    """``constraints(x, y)`` must return one real tensor of a fixed shape."""
    where = "at the start point" if step is None else f"at step {step}"
    if not torch.is_tensor(value) or not value.is_floating_point():
        raise TypeError(
            f"`constraints(x, y)` must return a floating-point tensor whose entries must be <= 0; got "
            f"{type(value).__name__} {where}."
        )
    if expected_shape is not None and value.shape != expected_shape:
        raise ValueError(
            f"`constraints(x, y)` returned shape {tuple(value.shape)} {where}, but shape "
            f"{tuple(expected_shape)} at the start: the number of constraints must not change."
        )


_SHARED_ARGS = r"""outer_optimizer: see :class:`~bilevel.algorithms.Algorithm`; default ``"sgd"``, the
    papers' plain step, with the method's step :math:`\alpha_k` as its learning rate.
x_set, y_set: simple convex sets projected onto after each step (objects of
    :mod:`bilevel.implicit.projections`, callables ``z -> P(z)``, or trees of them
    matching the variable); ``None``: the problem's.  The methods that solve a linear
    system by Hessian-vector products (SOBA, sl-BAMM) keep it on the directions that the
    active constraints of ``y_set`` leave free (``tangent_map`` in ``_single_loop``).
curvature_iterations: power iterations per curvature estimate (default <curvature_iterations>).
warmup: at most this many gradient steps on :math:`y` at ``x0`` before the first
    curvature estimates (default <warmup>; they stop once :math:`\|\nabla_y f\|` fell by
    1e-3): curvature at a far-off :math:`y_0` misjudges the scale of the coupling.
rescale_every: re-estimate the curvature (8 power iterations), and the steps derived
    from it, every this many steps (default <rescale_every>; 0: never, and the state is
    saved and the growth test below runs every 25 steps).
backoffs: how many times a run whose iterates blow up goes back to a saved state and
    continues with the :math:`x` step divided by 10 (:math:`10^{-j}` times the original
    after the :math:`j`-th back-off<backoff_note>), warning :class:`~bilevel.status.StepSizeWarning`
    with :math:`\|(x, y)\|`, before ``FloatingPointError`` naming the step,
    :math:`\|(x, y)\|` and the limit (default <backoffs>; 0: raise at once).  A blow-up
    is an iterate that is not finite or has :math:`\|(x, y)\| > 10^8 s`, with the scale
    :math:`s = \max(1, \|(x_0, y_0)\|, \text{the largest } \|(x, y)\| \text{ of the steps
    before the first re-estimate})` (until then, without the last term).  The state is
    saved at the start and at each re-estimate where :math:`\|(x, y)\| \le 10 s` and at
    most 10 times its value at the previous re-estimate (or :math:`\max(1, \|(x_0,
    y_0)\|)`): a state farther out may be part of a slow blow-up.  A back-off goes to
    the newest save (after a slow divergence, first to the save that ended the window of
    the lowest median :math:`\|d_x\|`, before the growth), or to the start where the
    previous back-off went to that same save already (:math:`s` is then measured anew), so a step that is stable once
    divided by :math:`10^k`, :math:`k \le` ``backoffs``, goes on from near the scale
    :math:`s` instead of raising.  A slow divergence counts as a blow-up: at a
    re-estimate, a median of :math:`\|d_x\|` over the (at least 10) steps since the
    last test ten times its lowest value before (from the second window on) and
    above the first window's, with :math:`\|(x, y)\|^2` ten times larger than both
    :math:`s^2` and its largest value in the window of the lowest median, and the median outer
    value more than doubled (or, negative, risen above 0) since that window (with
    mini-batches, whose outer values are noisy, a hundred times instead of ten).
    Steps that ``lr`` also sets (LV-HBA's :math:`y` step,
    and its :math:`\beta` unless given) shrink alike; other :math:`y` steps are
    unchanged.  On accelerators the test reads the iterates' norms every 8 steps, at
    each re-estimate and when a step fails, and acts on the first blown-up step as
    on the CPU.
"""
"""The ``Args:`` entries of the fields every single-loop method shares; ``<name>`` is
replaced by the class's default."""


def shared_args(cls: type) -> type:
    """Class decorator: put :data:`_SHARED_ARGS`, with ``cls``'s defaults, at the
    ``{single_loop_args}`` line of its docstring (one text for every method)."""
    text = _SHARED_ARGS
    for f in dataclasses.fields(cls):
        text = text.replace(f"<{f.name}>", str(f.default))
    text = text.replace("<backoff_note>", cls._backoff_note)
    entries = "".join(f"        {line}\n" if line else "\n" for line in text.splitlines())
    marker = "        {single_loop_args}\n"
    if cls.__doc__ is None or marker not in cls.__doc__:
        raise AssertionError(f"{cls.__name__}: the docstring needs a {marker.strip()!r} line in its Args")
    cls.__doc__ = cls.__doc__.replace(marker, entries)
    return cls


@dataclass(frozen=True)
class SingleLoop(Algorithm):
    r"""Base class of the single-loop methods.

    The upper variable moves by the ``outer_optimizer`` (default plain SGD, the
    papers' rule) with the method's step :math:`\alpha_k` set as the learning
    rate at every iteration; ``lr`` overrides the base step that the method
    otherwise derives from curvature estimates at the start point.  ``x_set`` /
    ``y_set`` (or the problem's) are projected onto after each step.

    Its fields (``lr`` and those of :data:`_SHARED_ARGS`) are documented on each
    method's class, by :func:`shared_args`.
    """

    outer_optimizer: Any = "sgd"
    lr: Optional[float] = None
    x_set: Any = None
    y_set: Any = None
    curvature_iterations: int = 20
    warmup: int = 200
    rescale_every: int = 25
    backoffs: int = 3

    optional_extras: ClassVar[tuple] = (_LOWEST,)

    tol_patience: ClassVar[int] = 10
    """Consecutive steps on which :func:`bilevel.solve`'s ``tol`` must hold: the
    estimate of a step uses auxiliary variables (:math:`\theta`, :math:`v`,
    :math:`z`) that lag behind, and it vanishes at the first step wherever
    :math:`\nabla_x F(x_0, y_0) = 0` (e.g. an outer objective of ``y`` only)."""

    field_rules: ClassVar[dict] = {
        "curvature_iterations": (lambda v: v >= 1, "a positive int"),
        "warmup": (lambda v: v >= 0, "a non-negative int"),
        "rescale_every": (lambda v: v >= 0, "a non-negative int (0: never)"),
        "backoffs": (lambda v: v >= 0, "a non-negative int"),
        "lr": (lambda v: v > 0, "a positive number or None"),
    }

    # -- set-up ---------------------------------------------------------------
    def init(self, problem: BilevelProblem, x0=None, y0=None) -> State:
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"{type(self).__name__}: `lr` must be a positive number or None; got {self.lr!r}.")
        x = fresh_leaves(problem.x0 if x0 is None else x0)
        y = fresh_leaves(problem.y0 if y0 is None else y0)
        state = State(x=x, y=y)
        project_x, project_y = self._projections(problem, x, y)
        if project_x is not None or project_y is not None:  # start inside the sets
            self._assign(state, project_x, project_y, tree_leaves(x), tree_leaves(y))
        if self.warmup:
            self._warm_up(problem, state, project_y)
        extras = self.setup(problem, state)
        state.extras.update(extras)
        base = float(self.lr) if self.lr is not None else float(state.extras["x_step"])
        state.optimizer = make_optimizer(self.outer_optimizer, tree_leaves(state.x), base)
        state.extras["x_step"] = base
        state.extras["start_size"] = float(tree_sq_norm(tree_leaves(state.x) + tree_leaves(state.y)))
        return state

    def setup(self, problem: BilevelProblem, state: State) -> dict:
        """Algorithm-specific extras (step sizes, auxiliary variables); must set ``x_step``."""
        raise NotImplementedError

    def step_sizes(self, scales: dict, extras: dict) -> dict:
        """The derived step sizes from curvature ``scales`` (user settings kept);
        called at the start and at every re-estimate."""
        return {}

    def scales(self, problem: BilevelProblem, state: State, batch: Any = None, iterations: Optional[int] = None) -> dict:
        r"""Curvature scales at the current point, from Hessian-vector products.

        For ``h`` = ``outer`` (prefix ``outer_``) and ``inner`` (``inner_``): ``_x``,
        ``_y`` and ``_cross``, the norms of the blocks :math:`\nabla^2_{xx} h`,
        :math:`\nabla^2_{yy} h`, :math:`\nabla^2_{xy} h` (:func:`block_curvature`);
        ``_xy``, the bound :math:`\max(\|A\|, \|C\|) + \|B\|` on the joint
        Hessian norm; ``inner_y_min``, :math:`\lambda_{\min}(\nabla^2_{yy} f)` by Lanczos
        (:func:`lowest_curvature`, warm-started from the direction the last estimate
        found, kept in ``state.extras``); and ``inner_weak_convexity``,
        :math:`\max(0, -\lambda_{\min}(\nabla^2_{yy} f))`.
        """
        outer, inner = bind_batch(problem, batch if batch is not None else problem.example_batch)
        xs, x_spec = tree_flatten(state.x)
        ys, y_spec = tree_flatten(state.y)
        k = self.curvature_iterations if iterations is None else iterations
        out = {}
        norms = [_block_norms(fun, xs, ys, x_spec, y_spec, k) for fun in (outer, inner)]
        same_device = norms[0].device == norms[1].device
        numbers = torch.cat(norms).tolist() if same_device else norms[0].tolist() + norms[1].tolist()  # one read
        for name, (x_norm, y_norm, cross) in (("outer", numbers[:3]), ("inner", numbers[3:])):
            blocks = _checked_blocks(x_norm, y_norm, cross)
            out.update({f"{name}_{key}": value for key, value in blocks.items()})
            out[f"{name}_xy"] = max(blocks["x"], blocks["y"]) + blocks["cross"]
        inner_y = out["inner_y"]
        lowest = 0.0
        if inner_y > 0:
            lowest, direction = lowest_curvature(inner, xs, ys, x_spec, y_spec, k, state.extras.get(_LOWEST))
            if direction is None:  # too large to keep: the next estimate starts afresh
                state.extras.pop(_LOWEST, None)
            else:
                state.extras[_LOWEST] = direction
        # weak-convexity modulus rho of f(x, .) (0 when convex there)
        out["inner_weak_convexity"] = max(0.0, -lowest) if -lowest > 1e-6 * inner_y else 0.0
        out["inner_y_min"] = lowest  # the smallest eigenvalue of the lower Hessian (estimate)
        return out

    def _warm_up(self, problem: BilevelProblem, state: State, project_y) -> None:
        r"""Up to ``warmup`` projected gradient steps :math:`y \leftarrow P_Y(y - s \nabla_y f)`
        at ``x0``, :math:`s = 1/L` with :math:`L = \|\nabla^2_{yy} f(x_0, y_0)\|`, stopping
        once the gradient norm fell by a factor 1e3.  A step that lands above
        :math:`f(x_0, y_0)` (the curvature met on the way exceeds the one at :math:`y_0`, as
        on a non-convex lower level started near an inflection point, where :math:`1/L`
        throws :math:`y` into the walls) is undone and :math:`s` halved: the warm-up never
        leaves :math:`y` worse than it found it."""
        inner = bind_batch(problem, problem.example_batch)[1]
        xs, x_spec = tree_flatten(state.x)
        ys, y_spec = tree_flatten(state.y)
        lipschitz = curvature(inner, xs, ys, x_spec, y_spec, "y", self.curvature_iterations)
        if not lipschitz > 0:
            return
        sync = _sync_every(ys[0])
        step = 1.0 / lipschitz
        first = stopped = accepted = ceiling = None  # accepted: (ys, value, gy) of the last step kept
        for i in range(self.warmup):
            value, _, gy = value_and_grads(inner, xs, ys, x_spec, y_spec, "y")
            if sync == 1:  # on the host: stop as soon as the rule says so
                value = float(value)
                ceiling = value if ceiling is None else ceiling
                if accepted is None and not math.isfinite(value):  # no finite start to descend from
                    break
                if not value <= ceiling:  # above the start (or NaN): back, with half the step
                    (ys, value, gy), step = accepted, 0.5 * step
                size = float(tree_sq_norm(gy))
                first = size if first is None else first
                if not math.isfinite(size) or size <= 1e-6 * first:
                    break
                accepted = ys, value, gy
                moves = [step * g for g in gy]
            else:  # on the device: freeze y once the rule holds, look every `sync` steps
                value = value.to(_wide(gy[0]))
                if accepted is None:
                    step, ceiling = torch.full_like(value, step), value
                else:
                    rose = ~(value <= ceiling)
                    ys, gy = ([torch.where(rose, a, b) for a, b in zip(kept, new)]
                              for kept, new in ((accepted[0], ys), (accepted[2], gy)))
                    value, step = torch.where(rose, accepted[1], value), torch.where(rose, 0.5 * step, step)
                size = tree_sq_norm(gy).detach().to(value.dtype)
                first = size if first is None else first
                stop = ~torch.isfinite(size) | (size <= 1e-6 * first)
                stopped = stop if stopped is None else stopped | stop
                accepted = ys, value, gy
                moves = [step.to(g.dtype) * g for g in gy]
            with torch.no_grad():
                new = [t - m for t, m in zip(ys, moves)]
            if project_y is not None:
                new = project_y(new)
            ys = new if stopped is None else [torch.where(stopped, old, t) for old, t in zip(ys, new)]
            if stopped is not None and (i + 1) % sync == 0 and bool(stopped):
                break
        if accepted is not None and ys is not accepted[0]:  # the budget's last step, judged alike
            last = value_and_grads(inner, xs, ys, x_spec, y_spec, "y")[0]
            if sync == 1:
                ys = ys if float(last) <= ceiling else accepted[0]
            else:
                rose = ~(last.to(ceiling.dtype) <= ceiling)
                ys = [torch.where(rose, a, b) for a, b in zip(accepted[0], ys)]
        if all(host_floats([torch.isfinite(t).all() for t in ys])):
            state.y = tree_unflatten(ys, y_spec)

    def _projections(self, problem: BilevelProblem, x, y):
        x_set = self.x_set if self.x_set is not None else problem.x_set
        y_set = self.y_set if self.y_set is not None else problem.y_set
        return set_projection(x_set, x, "x_set"), set_projection(y_set, y, "y_set")

    # -- one iteration --------------------------------------------------------
    def step(self, problem: BilevelProblem, state: State, batch: Any = None) -> State:
        outer, inner = bind_batch(problem, batch)
        if batch is not None:
            state.extras[_MINI_BATCHES] = True
        project_x, project_y = self._projections(problem, state.x, state.y)
        boundary = state.iteration % self._check_every == 0
        if boundary and self._settle_divergence(state, outer):
            return state  # a deferred check found a blow-up before the state is saved anew: went back
        if boundary and self._growth_diverged(state, outer):
            return state  # the direction and the iterates grew: a slow divergence; went back
        if boundary:
            _at_boundary(state, self.backoffs)
        if self.rescale_every and state.iteration and state.iteration % self.rescale_every == 0:
            # on the problem's example batch: one mini-batch's curvature is too noisy a scale
            try:
                scales = self.scales(problem, state, None, iterations=8)
            except FloatingPointError as error:  # the iterates left the functions' finite range: a blow-up
                size = float(tree_sq_norm(tree_leaves(state.x) + tree_leaves(state.y)))
                self._diverged(state, state.iteration, size, _scale(state.extras), error, what=(
                    f"the curvature re-estimate at step {state.iteration} met non-finite Hessian-vector products "
                    f"(|(x, y)| = {math.sqrt(size) if math.isfinite(size) else size:.3g})"))
                with torch.no_grad():
                    state.info = StepInfo(outer=report_value(outer(state.x, state.y)),
                                          rolled_back_at=state.iteration + 1)
                return state
            state.extras["scales"] = scales
            state.extras.update(self.step_sizes(scales, state.extras))
            if self.lr is not None:
                state.extras["x_step"] = float(self.lr)
        try:
            info = self.update(problem, outer, inner, state, batch, project_x, project_y)
        except Exception as error:  # blown-up iterates of a step not checked yet may be the cause
            if self._settle_divergence(state, outer, cause=error):
                return state
            raise
        state.iteration += 1
        state.info = info
        checks = state.__dict__.setdefault(_DEFERRED, [])
        checks.append((state.iteration, tree_sq_norm(tree_leaves(state.x) + tree_leaves(state.y)).detach(),
                       state.__dict__.pop(_DX_NORM, math.nan), info.values()[0], outer))
        if len(checks) >= _sync_every(checks[-1][1]):  # every step on the CPU, every few on accelerators
            self._settle_divergence(state, outer)
        return state

    @property
    def _check_every(self) -> int:
        """Steps between the points where the state is saved and the growth test runs: the
        re-estimates, or every 25 steps where there are none (a slow divergence is no less
        silent without them)."""
        return self.rescale_every or _CHECK_EVERY

    def settle(self, problem: BilevelProblem, state: State, batch: Any = None) -> State:
        self._settle_divergence(state, bind_batch(problem, batch)[0])
        return state

    def update(self, problem, outer, inner, state: State, batch, project_x, project_y) -> StepInfo:
        """Moves ``state`` by one iteration (``x`` through :meth:`move_x`)."""
        raise NotImplementedError

    def move_x(self, state: State, direction: Leaves, step: float, project_x) -> None:
        r""":math:`x \leftarrow P_X(x - \text{step}\cdot d_x)` through the outer optimizer."""
        step = step * state.extras.get("x_step_scale", 1.0)
        for group in state.optimizer.param_groups:
            group["lr"] = step
        for leaf, d in zip(tree_leaves(state.x), direction):
            leaf.grad = d.detach()
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        if project_x is not None:
            with torch.no_grad():
                for leaf, p in zip(tree_leaves(state.x), project_x(tree_leaves(state.x))):
                    leaf.copy_(p)

    @staticmethod
    def _assign(state: State, project_x, project_y, x_leaves: Leaves, y_leaves: Leaves) -> None:
        with torch.no_grad():
            if project_x is not None:
                for leaf, p in zip(tree_leaves(state.x), project_x(x_leaves)):
                    leaf.copy_(p)
            if project_y is not None:
                y_leaves = project_y(y_leaves)
        state.y = tree_unflatten(list(y_leaves), tree_flatten(state.y)[1])

    def _settle_divergence(self, state: State, outer: Callable, cause: Optional[BaseException] = None) -> bool:
        r"""Read the squared norms :math:`\|(x, y)\|^2` that the steps since the last look
        left on the device (one host read) and act on the first blown-up one
        (non-finite, or :math:`10^{16} s^2` with the scale :math:`s` of :func:`_scale`):
        go back to a saved state and return ``True``, or raise naming its step.  The
        sizes of the healthy steps feed :math:`s` and the choice of states to save."""
        checks = state.__dict__.pop(_DEFERRED, None)
        if not checks:
            return False
        ex = state.extras
        scale = _scale(ex)
        measuring = _SCALE not in ex  # the largest size before the first re-estimate becomes part of s
        count = len(checks)
        numbers = host_floats([c[1] for c in checks] + [c[2] for c in checks] + [c[3] for c in checks])
        window = ex.setdefault(_DX_WINDOW, [])
        previous = ex.get(_SIZE_LAST, (None, None))[1]
        for (step, *_, outer_then), size, dx, value in zip(
                checks, numbers[:count], numbers[count:2 * count], numbers[2 * count:]):
            if not math.isfinite(size) or size > _BLOW_UP * scale:
                # NaN straight from a modest size: no overflow, a NaN that the functions returned
                sudden = math.isnan(size) and previous is not None and previous <= _FAR_OUT * scale
                self._diverged(state, step, size, scale, cause, sudden_nan=sudden)
                with torch.no_grad():  # went back to a saved state: report where it stands
                    value = report_value(outer_then(state.x, state.y))  # on the failed step's batch
                if not math.isfinite(size) and not all(host_floats([torch.isfinite(value)])):
                    raise FloatingPointError(
                        f"{type(self).__name__}: the iterates became non-finite at step {step}, and `outer` "
                        f"is not finite on that step's mini-batch even at the saved state of step "
                        f"{state.iteration} that the run went back to: the batch or the objectives give "
                        "NaN/inf, which a smaller step does not cure."
                    ) from cause
                state.info = StepInfo(outer=value, rolled_back_at=step)
                return True
            if measuring:
                ex[_SIZE_MAX] = max(ex.get(_SIZE_MAX, 0.0), size)
            window.append((dx, size, value))
            previous = size
        ex[_SIZE_LAST] = (step, size)
        return False

    def _growth_diverged(self, state: State, outer: Callable) -> bool:
        r"""At a re-estimate with at least 10 steps read since the last test: the medians
        :math:`m_j` of :math:`\|d_x\|` (unscaled, also where the history reports
        :math:`c_k\|d_x\|`) and :math:`F_j` of the outer value over them (window :math:`j`,
        counted from the start or the last back-off).

        A run whose iterates diverge slowly (an x step too large for the coupled iteration,
        where :math:`\|(x, y)\|` would reach the blow-up limit only after many steps) shows
        a growing direction, growing iterates and a rising outer objective; it is taken for
        a blow-up (going back to a saved state with a smaller x step) where, with
        window :math:`l` the one of the lowest :math:`m` before,

        * :math:`m_j > g\, m_l` and :math:`m_j > m_0` (the first window, a transient, is
          no reference for the minimum),
        * :math:`\|(x, y)\|^2 > g \max(s^2, \|(x, y)\|^2_l)` at the last step read, with
          :math:`s` the scale of the blow-up test and the largest size of window :math:`l`,
        * :math:`F_j > F_l + |F_l|`: the objective the method minimizes went up,

        with :math:`g = 10`, or :math:`g = 100` in a run that draws mini-batches: there
        :math:`F_j` is a median of per-batch values, which can double from one window to
        the next by chance (SOBA on mini-batches of the breast-cancer logistic problem
        took a needless back-off at step 200 with :math:`g = 10`).

        Each condition alone also holds in healthy runs: a direction that grows from near
        zero while :math:`x` leaves a stationary point (with :math:`\|(x, y)\|` bounded, or
        travelling far to a distant solution while :math:`F` falls).  Together, with
        factors of 10, they caught the oscillating divergence of sl-BAMM on problem Q
        (:math:`d = 100`, about tenfold per 1000 steps) near step 800, where factors of
        100 saw it at step 1725, and flagged none of 96 stable runs (4 methods, Q with
        :math:`d` = 10 to 100).
        """
        ex = state.extras
        window = _window(ex)
        if len(window) < _MIN_WINDOW:
            return False
        ex.pop(_DX_WINDOW)
        median = statistics.median_high([dx for dx, _, _ in window])
        value = statistics.median_high([f for _, _, f in window])
        largest, last = max(size for _, size, _ in window), window[-1][1]
        first, low = ex.get(_DX_FIRST), ex.get(_DX_LOW)
        if first is None:
            ex[_DX_FIRST] = median
            return False
        if low is not None:
            low_value = ex[_DX_LOW_OUTER]
            factor = _NOISY_GROWTH if ex.get(_MINI_BATCHES) else _GROWTH  # per-batch values are noisy
            growing = median > factor * low and median > first
            farther = last > factor * max(_scale(ex), ex[_DX_LOW_SIZE])
            rising = value > low_value + abs(low_value)
            if growing and farther and rising:
                step = state.iteration
                grew = f"{median / low:.3g}-fold" if low > 0 else "from 0"
                self._slow_back_off(state, outer,
                                    f"the iterates diverged slowly: |d_x| grew {grew} by step {step} (median "
                                    f"of the last {len(window)} steps {median:.3g}, {low:.3g} at its lowest), "
                                    f"|(x, y)| to {math.sqrt(last):.3g} and the outer value from {low_value:.3g} "
                                    f"to {value:.3g}", size=last)
                return True
        if low is None or median < low:
            ex[_DX_LOW], ex[_DX_LOW_SIZE], ex[_DX_LOW_OUTER] = median, largest, value
            ex[_LOW_PENDING] = True  # the state saved at this re-estimate ends the window
        return False

    def _slow_back_off(self, state: State, outer: Callable, what: str, size: Optional[float] = None) -> None:
        r"""Take the back-off of a slow divergence (``what``), at a re-estimate: go back to
        the save before the growth with a smaller x step, or raise after the last one.
        ``size``: :math:`\|(x, y)\|^2` for the error (default: that of the last step read)."""
        step = state.iteration
        if size is None:
            size = state.extras.get(_SIZE_LAST, (step, math.nan))[1]
        self._diverged(state, step, size, _scale(state.extras), None, slow=True, what=what)
        with torch.no_grad():
            state.info = StepInfo(outer=report_value(outer(state.x, state.y)), rolled_back_at=step + 1)

    _backoff_scope = "the y steps are unchanged"
    """How a back-off's warning describes the steps it leaves alone (or shrinks too)."""
    _backoff_note = ""
    """What else a back-off changes, for the ``backoffs`` entry of the docstring."""

    def _backoff_change(self, extras: dict, slow: bool) -> tuple[float, dict, str]:
        """At a back-off: the factor the x step is divided by, the entries of ``extras`` to
        set once the saved state is restored, and how the warning describes the other
        steps.  ``slow``: a slow divergence (:meth:`_growth_diverged`), not a blow-up."""
        return 10.0, {}, self._backoff_scope

    def _diverged(self, state: State, failed: int, size: float, scale: float, cause,
                  what: Optional[str] = None, slow: bool = False, sudden_nan: bool = False) -> None:
        """Go back to a saved state (warning), or raise after the last back-off.  ``what``
        describes the divergence (default: the blow-up of ``size`` at step ``failed``);
        ``sudden_nan``: the iterates turned NaN from a modest size (no overflow)."""
        used = state.extras.get("x_step", float("nan")) * state.extras.get("x_step_scale", 1.0)
        norm = f"|(x, y)| = {math.sqrt(size) if math.isfinite(size) else size:.3g}"
        start = state.extras.get("start_size", 0.0)
        factor, changes, scope = self._backoff_change(state.extras, slow)
        if _roll_back(state, self.backoffs, factor, changes, slow):
            now = state.extras.get("x_step", float("nan")) * state.extras["x_step_scale"]
            warnings.warn(
                f"{type(self).__name__}: {what or f'the iterates blew up at step {failed} ({norm})'} with an x step of "
                f"{used:.3g}; went back to step {state.iteration} and go on with an x step of {now:.3g} "
                f"(back-off {state.extras['backoffs_taken']} of {self.backoffs}; {scope}).",
                StepSizeWarning, stacklevel=5,
            )
            return
        taken = state.extras.get("backoffs_taken", 0)
        what = what or (f"the iterates diverged at step {failed} ({norm}, {math.sqrt(max(start, 0.0)):.3g} at "
                        f"the start, blow-up limit {math.sqrt(_BLOW_UP * scale):.3g})")
        error = FloatingPointError(
            f"{type(self).__name__}: {what} with an x step of {used:.3g}"
            + (f", after {taken} back-off(s) that divided it by {1 / state.extras['x_step_scale']:g} in all"
               if taken else "")
            + "; lower the step sizes (`lr`, and the method's own inner step options where it has them). "
            "The inner steps follow the lower level's curvature measured at the start and every "
            "`rescale_every` steps: where it grows faster than that (a lower level flat at the start and "
            "steep further on, e.g. quartic), `rescale_every=1` measures it at every step."
            + (" The iterates turned NaN from a modest size, without overflowing: if smaller steps do not "
               "help, an objective (or constraint) or its gradient is NaN at finite points near there, e.g. "
               "torch.where with a NaN branch, or sqrt / log at 0; check them at the last finite iterate."
               if sudden_nan else "")
        )
        if cause is not None:  # the error a blown-up iterate caused in a later step
            raise error from cause
        raise error


_DEFERRED = "_deferred"
"""Attribute of a :class:`State` (not part of its checkpoint): the ``(step, |(x, y)|^2)``
pairs whose blow-up check waits for the next host read."""

_BLOW_UP = 1e16
"""A squared norm :math:`\\|(x, y)\\|^2` above this times the squared scale is a blow-up."""
_FAR_OUT = 1e2
"""A state whose squared norm exceeds this times the squared scale is not saved: it may
belong to a slow blow-up, and going back there would not rescue the run."""

# Keys of ``state.extras`` (plain floats and copies: checkpointed with the state).
_ROLLBACK = "rollback"              # the newest saved state after the start (a state_dict)
_ROLLBACK_START = "rollback_start"  # the state at the start of the run
_ROLLBACK_USED = "rollback_used"    # a back-off went to _ROLLBACK already
_ROLLBACK_LOW = "rollback_low"      # the save at the end of the window of the lowest |d_x| median
_LOW_PENDING = "low_pending"        # the next save is that one
_DIVISOR = "x_step_divisor"         # the product of the back-offs' factors (x_step_scale = 1 / it)
_SCALE = "size_scale"               # s^2, fixed at the first re-estimate
_SIZE_MAX = "size_max"              # the largest |(x, y)|^2 read before that
_SIZE_LAST = "size_last"            # (step, |(x, y)|^2) of the last step read
_SIZE_BOUNDARY = "size_boundary"    # |(x, y)|^2 at the last re-estimate
_DX_WINDOW = "dx_window"            # (|d_x|, |(x, y)|^2) of the steps read since the last growth test
_DX_FIRST = "dx_first"              # the median of the first window (from the start or a back-off)
_DX_LOW = "dx_low"                  # the lowest median of the later windows
_DX_LOW_SIZE = "dx_low_size"        # the largest |(x, y)|^2 of that window
_DX_LOW_OUTER = "dx_low_outer"      # the median outer value of that window
_DX_NORM = "_dx_norm"
"""Attribute of a :class:`State` (not part of its checkpoint): the step's unscaled |d_x|."""
_GROWTH = 10.0
"""Growth factor of the median |d_x|, and of |(x, y)|^2, in a slow divergence."""
_NOISY_GROWTH = 100.0
"""The same with mini-batches, whose per-batch outer values swing from window to window."""
_MINI_BATCHES = "mini_batches"      # the run draws mini-batches (state.extras)
_MIN_WINDOW = 10
"""Fewest steps whose median is a window of the growth test."""
_CHECK_EVERY = 25
"""Steps between saves and growth tests of a method without curvature re-estimates."""
_KEPT = (_ROLLBACK, _ROLLBACK_START, _ROLLBACK_LOW)  # not copied into the saved states


def _window(extras: dict) -> list:
    """The ``(|d_x|, |(x, y)|^2, outer value)`` of the steps read since the last growth test."""
    return [entry for entry in extras.get(_DX_WINDOW, []) if not math.isnan(entry[0])]


def outer_rose(extras: dict) -> bool:
    r"""Whether the median outer value of the steps read since the last growth test is
    above that of the window of the lowest median :math:`\|d_x\|` (``False`` before there
    is such a window, or with too few steps read)."""
    window = _window(extras)
    if len(window) < _MIN_WINDOW or extras.get(_DX_LOW_OUTER) is None:
        return False
    return statistics.median_high([f for _, _, f in window]) > extras[_DX_LOW_OUTER]


def _scale(extras: dict) -> float:
    r"""The squared scale :math:`s^2 = \max(1, \|(x_0, y_0)\|^2, \text{the sizes read before the
    first re-estimate})` of the blow-up test (before that re-estimate: without the last term)."""
    if _SCALE in extras:
        return extras[_SCALE]
    return max(1.0, extras.get("start_size", 0.0))


def _at_boundary(state: State, backoffs: int) -> None:
    """At the start and at each re-estimate (after the deferred checks were read): fix the
    scale at the first re-estimate, and save the state to go back to where it is not far out."""
    ex = state.extras
    low = ex.pop(_LOW_PENDING, False)  # the save of this re-estimate ends the lowest window (if it is made)
    if state.iteration > 0 and _SCALE not in ex:
        ex[_SCALE] = max(_scale(ex), ex.get(_SIZE_MAX, 0.0))
    if not backoffs:
        return
    if _ROLLBACK_START not in ex:  # the start (or, resuming an older checkpoint, the earliest state known)
        ex[_ROLLBACK_START] = _snapshot(state)
        return
    if state.iteration == 0:
        return  # back at the start: nothing newer to save
    newest = ex.get(_ROLLBACK)
    if newest is not None and newest["iteration"] == state.iteration:
        return  # went back to this save: it stays the one used
    last = ex.get(_SIZE_LAST)
    if last is None or last[0] != state.iteration:
        return  # its size was not read (a resumed run): keep the older save
    size, before = last[1], ex.get(_SIZE_BOUNDARY, ex.get("start_size", 0.0))
    ex[_SIZE_BOUNDARY] = size
    if size > _FAR_OUT * ex[_SCALE] or size > _FAR_OUT * max(before, 1.0, ex.get("start_size", 0.0)):
        return  # far out, or grown 10 times since the last re-estimate: maybe a blow-up; keep the older save
    ex[_ROLLBACK] = _snapshot(state)
    ex.pop(_ROLLBACK_USED, None)
    if low:
        ex[_ROLLBACK_LOW] = ex[_ROLLBACK]


def _snapshot(state: State) -> dict:
    """A copy of the state (without the saved copies) to go back to."""
    kept = {key: state.extras.pop(key) for key in _KEPT if key in state.extras}
    try:
        return state.state_dict()
    finally:
        state.extras.update(kept)


def _roll_back(state: State, limit: int, factor: float = 10.0, changes: Optional[dict] = None,
               slow: bool = False) -> bool:
    r"""Restore a saved state with an x step ``factor`` times smaller than the one in use
    (and the extras ``changes``), unless ``limit`` back-offs were taken already or there
    is no saved state.  The target is, after a ``slow`` divergence, the save that ended
    the window of the lowest median :math:`\|d_x\|` (before the growth; once), else
    the newest save, or the start where a back-off went to that save already (it did
    not rescue the run: the save may be part of the blow-up, or the step still too
    large)."""
    ex = state.extras
    taken = ex.get("backoffs_taken", 0)
    start, newest, low = ex.get(_ROLLBACK_START), ex.get(_ROLLBACK), ex.get(_ROLLBACK_LOW)
    if taken >= limit or (start is None and newest is None):
        return False
    divisor = ex.get(_DIVISOR, 1.0 / ex.get("x_step_scale", 1.0)) * factor  # exact for products of 10s
    to_low = slow and low is not None
    to_newest = not to_low and newest is not None and (start is None or not ex.get(_ROLLBACK_USED, False))
    state.load_state_dict(low if to_low else newest if to_newest else start)
    for key in (_DX_WINDOW, _DX_FIRST, _DX_LOW, _DX_LOW_SIZE, _DX_LOW_OUTER, _LOW_PENDING):  # the growth test starts over
        state.extras.pop(key, None)
    state.extras.update({"x_step_scale": 1.0 / divisor, _DIVISOR: divisor, "backoffs_taken": taken + 1,
                         **(changes or {})})
    if start is not None:
        state.extras[_ROLLBACK_START] = start
    if to_low or to_newest:  # the save went back to: the next back-off goes to the start
        state.extras.update({_ROLLBACK: low if to_low else newest, _ROLLBACK_USED: True})
    return True


def step_report(outer, state: State, d_x: Leaves, inner_residual, scale: float = 1.0,
                linear_residual=float("nan")) -> StepInfo:
    r"""The history record of a step: :math:`F` at the new iterate, ``scale`` times
    :math:`\|d_x\|` as the hypergradient estimate, and the residuals given."""
    with torch.no_grad():
        value = outer(tree_unflatten([t.detach() for t in tree_leaves(state.x)], tree_flatten(state.x)[1]), state.y)
        norm = torch.sqrt(tree_sq_norm(d_x)).detach()
        state.__dict__[_DX_NORM] = norm  # for the growth test of the divergence checks
        return StepInfo(  # tensors, read by the driver with other steps' (no host read here)
            outer=report_value(value),
            hypergradient_norm=scale * norm,
            inner_residual=_detached(inner_residual),
            linear_residual=_detached(linear_residual),
        )


def _detached(value: Any) -> Any:
    return value.detach() if torch.is_tensor(value) else value


STOCHASTIC_DECAYS = (0.4, 0.6)
"""Decay exponents ``(a, b)`` of the lower-level and upper-level steps, :math:`(k+1)^{-a}` and
:math:`(k+1)^{-b}`, for noisy mini-batch directions: those of the SOBA analysis (Dagréou et
al., 2022), the lower level on the faster time scale."""


def power_schedule(base: float, k: int, exponent: float) -> float:
    r""":math:`\text{base} \cdot (k + 1)^{\text{exponent}}`."""
    return base * (k + 1) ** exponent


__all__ = ["SingleLoop", "value_and_grads", "tracked", "autograd_grads", "curvature", "lowest_curvature", "block_curvature", "coupled_step", "set_projection", "power_schedule"]
