r"""Euclidean projections onto simple convex sets, and set objects for ``x_set=`` / ``y_set=``.

Each ``project_*`` function returns

.. math:: P_C(z) = \operatorname*{argmin}_{x \in C} \tfrac12 \|x - z\|_2^2,

is written with pure tensor operations (``clamp``, ``where``, ``sort``, ``gather``),
and is differentiable almost everywhere in ``z`` and in the set's parameters, also
through :mod:`torch.func` (``grad``, ``jacrev``, ``jvp``, ``vmap``).  Sets defined
along a vector (simplex, balls, affine sets) act on the **last** dimension, and
every leading dimension of ``z`` indexes independent problems.  dtype and device
follow ``z``.

**Trees.**  ``z`` may also be a tree (dict / list / tuple nesting) of floating
tensors, e.g. ``dict(model.named_parameters())``; the result has its structure.

* Elementwise sets (:func:`project_nonnegative`, :func:`project_box`,
  :func:`project_linf_ball`) are applied leaf by leaf, each leaf as the single
  tensor would be.  A parameter (bound, radius) is then a number or a 0-d
  tensor shared by every leaf, or a tree of the structure of ``z`` holding
  one parameter per leaf (each broadcastable to its leaf as in the tensor case).
* Sets defined along a vector (:func:`project_simplex`, :func:`project_l1_ball`,
  :func:`project_l2_ball`, :func:`project_affine_set`, :func:`project_hyperplane`,
  :func:`project_halfspace`, :func:`kl_projection_simplex`) treat the whole tree
  as **one vector**: the concatenation of its flattened leaves (in the order of
  :func:`torch.utils._pytree.tree_leaves`, in the promoted dtype).  A tree is
  one problem, with no batch dimension: scalar parameters must be numbers or
  0-d tensors (a ``ValueError`` otherwise); for a batch of trees, map over it
  with :func:`torch.func.vmap`.

Parameters that are Python numbers are checked when the function is called (a
negative radius is a ``ValueError``); tensor parameters are not inspected, since
that would need a host synchronization and would break ``vmap``.  The set
objects (:class:`Box`, :class:`Simplex`, ...) check their fields, tensors
included, once at construction.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .._linalg import solve
from .._tree import (
    Raveler,
    check_same_structure,
    describe,
    tensor_leaves,
    tree_flatten,
    tree_leaves,
    tree_unflatten,
)
from ..typing import TensorTree

Scalar = Union[float, torch.Tensor]

__all__ = [
    "project_nonnegative",
    "project_box",
    "project_simplex",
    "project_l1_ball",
    "project_l2_ball",
    "project_linf_ball",
    "project_affine_set",
    "project_hyperplane",
    "project_halfspace",
    "kl_projection_simplex",
    "ConvexSet",
    "NonNegative",
    "Box",
    "Simplex",
    "L1Ball",
    "L2Ball",
]


# --------------------------------------------------------------------------- checks


def _check_tensor(z, name: str = "z", min_dim: int = 0) -> None:
    if not torch.is_tensor(z):
        raise TypeError(f"`{name}` must be a torch.Tensor; got {type(z).__name__}.")
    if not z.is_floating_point():
        raise TypeError(
            f"`{name}` must have a floating dtype; got {z.dtype}. Convert it with `.double()` or `.float()`."
        )
    if z.dim() < min_dim:
        raise ValueError(
            f"`{name}` must have at least {min_dim} dimension(s) (the set acts on the last one); "
            f"got shape {tuple(z.shape)}."
        )


def _check_radius(radius, name: str = "radius", strict: bool = True) -> None:
    """Check a Python-number radius; tensors are left alone (vmap-friendly)."""
    if torch.is_tensor(radius):
        return
    if isinstance(radius, bool) or not isinstance(radius, numbers.Real):
        raise TypeError(f"`{name}` must be a positive number or a tensor; got {type(radius).__name__}.")
    if not math.isfinite(radius) or radius < 0 or (strict and radius == 0):
        bound = "> 0" if strict else ">= 0"
        raise ValueError(f"`{name}` must be finite and {bound}; got {radius}.")


def _as_batch_scalar(radius: Scalar, z: torch.Tensor, name: str = "radius") -> Scalar:
    """A radius broadcastable to ``z.shape[:-1]``, unsqueezed to act on the last dim."""
    if not torch.is_tensor(radius):
        return float(radius)
    if radius.dim() == 0:
        return radius
    if radius.dim() > z.dim() - 1:
        raise ValueError(
            f"`{name}` must be a scalar or broadcastable to the batch shape {tuple(z.shape[:-1])} of `z`; "
            f"got shape {tuple(radius.shape)}."
        )
    return radius.unsqueeze(-1)


def _sq_norm(z: torch.Tensor) -> torch.Tensor:
    return (z * z).sum(-1, keepdim=True)


# --------------------------------------------------------------------------- trees
# Shared with :mod:`bilevel.implicit.prox`: a tensor ``z`` never reaches these.


def _tree_leaves(z, name: str = "z") -> tuple[list, object]:
    """The leaves and spec of a (non-tensor) tree of floating tensors."""
    leaves, spec = tree_flatten(z)
    if spec.is_leaf():
        raise TypeError(
            f"`{name}` must be a torch.Tensor or a tree (dict / list / tuple) of tensors; got {type(z).__name__}."
        )
    leaves, spec = tensor_leaves(z, name)
    for i, leaf in enumerate(leaves):
        if not leaf.is_floating_point():
            raise TypeError(
                f"`{name}` must have floating leaves; leaf {i} has dtype {leaf.dtype}. "
                "Convert it with `.double()` or `.float()`."
            )
    return leaves, spec


def _per_leaf(value, spec, count: int, name: str, z) -> list:
    """The per-leaf values of a parameter of an elementwise operator applied to the tree ``z``:
    a number / 0-d tensor / ``None`` shared by every leaf, or the leaves of a tree of ``z``'s structure."""
    if torch.is_tensor(value):
        if value.dim() == 0:
            return [value] * count
        raise ValueError(
            f"`{name}` must be a number, a 0-d tensor, or a tree with the structure of `z` (one value per "
            f"leaf) when `z` is a tree; got a tensor of shape {tuple(value.shape)} for `z` {describe(z)}."
        )
    leaves, value_spec = tree_flatten(value)
    if value_spec.is_leaf():  # a number, None or a wrong type: the tensor operator checks it
        return [value] * count
    if value_spec != spec:
        raise ValueError(
            f"`{name}` must be a number, a 0-d tensor, or a tree with the same structure as `z` (one value "
            f"per leaf); got {describe(value)} for `z` {describe(z)}."
        )
    return leaves


def _leafwise(op, z, name: str = "z", **params):
    """``op(leaf, **leaf_params)`` on every leaf of the tree ``z`` (an elementwise operator)."""
    leaves, spec = _tree_leaves(z, name)
    split = {key: _per_leaf(value, spec, len(leaves), key, z) for key, value in params.items()}
    out = [op(leaf, **{key: values[i] for key, values in split.items()}) for i, leaf in enumerate(leaves)]
    return tree_unflatten(out, spec)


def _tree_scalar(value, name: str, tree: str = "z", one_vector: bool = True) -> None:
    """A parameter that must be one number for a whole tree: a number or a 0-d tensor.

    ``one_vector``: the parameter belongs to a vector operator (so the message
    explains that a tree is one vector, without a batch dimension)."""
    if torch.is_tensor(value) and value.dim() > 0:
        why = (
            " (the tree is one vector, the concatenation of its flattened leaves, with no batch dimension)"
            if one_vector else ""
        )
        hint = " For a batch of problems, map over them with torch.func.vmap." if one_vector else ""
        raise ValueError(
            f"`{name}` must be a number or a 0-d tensor when `{tree}` is a tree{why}; got a tensor of shape "
            f"{tuple(value.shape)}.{hint}"
        )


def _raveler(z, name: str = "z") -> Raveler:
    """The map between the tree ``z`` and the concatenation of its flattened leaves."""
    _tree_leaves(z, name)
    return Raveler(z, name=name)


def _as_one_vector(op, z, name: str = "z", **scalars):
    """``op(flat, **scalars)`` on the concatenated leaves of the tree ``z``, returned with its structure."""
    for key, value in scalars.items():
        _tree_scalar(value, key, name)
    rav = _raveler(z, name)
    return rav.unravel(op(rav.ravel(z), **scalars))


def _linf_leaf(leaf: torch.Tensor, radius) -> torch.Tensor:
    """:func:`project_linf_ball` on one leaf of a tree; a 0-d leaf is a vector of length one."""
    if leaf.dim() == 0:
        return project_linf_ball(leaf.reshape(1), radius).reshape(())
    return project_linf_ball(leaf, radius)


# ---------------------------------------------------------------- projections


def project_nonnegative(z: TensorTree) -> TensorTree:
    r"""Projection onto the non-negative orthant :math:`\{x : x \ge 0\}`.

    .. math:: P(z) = \max(z, 0) \quad \text{(elementwise)},\qquad
              \partial P / \partial z = \operatorname{diag}(\mathbb 1[z > 0]).

    Args:
        z: tensor of any shape, or a tree of them (projected leaf by leaf).

    Returns:
        A tensor shaped like ``z`` (a tree of ``z``'s structure for a tree).

    Example:
        >>> import torch
        >>> project_nonnegative(torch.tensor([-1.0, 2.0]))
        tensor([0., 2.])
        >>> project_nonnegative({"w": torch.tensor([-1.0, 2.0]), "b": torch.tensor(-3.0)})
        {'w': tensor([0., 2.]), 'b': tensor(0.)}
    """
    if not torch.is_tensor(z):
        return _leafwise(project_nonnegative, z)
    _check_tensor(z)
    return torch.clamp(z, min=0)


def project_box(z: TensorTree, lower: Optional[Scalar] = None, upper: Optional[Scalar] = None) -> TensorTree:
    r"""Projection onto the box :math:`\{x : l \le x \le u\}`.

    .. math:: P(z) = \min(\max(z, l), u) \quad \text{(elementwise)}.

    Its derivative is :math:`\mathbb 1[l < z < u]` in ``z``, :math:`\mathbb 1[z < l]`
    in ``lower`` and :math:`\mathbb 1[z > u]` in ``upper`` (elementwise).

    Args:
        z: tensor of any shape, or a tree of them (projected leaf by leaf).
        lower: :math:`l`, a number or a tensor broadcastable to ``z`` (may require
            grad); ``None`` for no lower bound.  For a tree ``z``: a number, a
            0-d tensor, ``None``, or a tree of ``z``'s structure holding one such
            bound (or a tensor broadcastable to that leaf) per leaf.
        upper: :math:`u`, likewise; ``None`` for no upper bound.  Where
            ``lower > upper`` the result is ``upper``.

    Returns:
        A tensor of the broadcast shape of ``z``, ``lower`` and ``upper``; for a
        tree, a tree of ``z``'s structure.

    Raises:
        ValueError: if both bounds are numbers and ``lower > upper``, or a bound
            of a tree ``z`` is neither a scalar nor a tree of its structure.

    Example:
        >>> import torch
        >>> project_box(torch.tensor([-2.0, 0.5, 3.0]), -1.0, torch.tensor([1.0, 1.0, 2.0]))
        tensor([-1.0000,  0.5000,  2.0000])
        >>> project_box({"a": torch.tensor([-2.0, 3.0]), "b": torch.tensor([5.0])}, 0.0, {"a": 1.0, "b": 4.0})
        {'a': tensor([0., 1.]), 'b': tensor([4.])}
    """
    if not torch.is_tensor(z):
        return _leafwise(project_box, z, lower=lower, upper=upper)
    _check_tensor(z)
    bounds = {}
    for name, bound in (("lower", lower), ("upper", upper)):
        if bound is None:
            continue
        if torch.is_tensor(bound):
            try:
                fits = torch.broadcast_shapes(bound.shape, z.shape) == z.shape
            except RuntimeError:
                fits = False
            if not fits:
                raise ValueError(
                    f"Box (project_box): the bound `{name}` has shape {tuple(bound.shape)}, which does not "
                    f"broadcast to the point's shape {tuple(z.shape)}."
                )
            bounds[name] = bound.to(dtype=z.dtype) if bound.dtype != z.dtype else bound
        elif isinstance(bound, numbers.Real) and not isinstance(bound, bool):
            bounds[name] = torch.full((), float(bound), dtype=z.dtype, device=z.device)  # no host-to-device copy
        else:
            raise TypeError(f"`{name}` must be a number, a tensor or None; got {type(bound).__name__}.")
    if isinstance(lower, numbers.Real) and isinstance(upper, numbers.Real) and lower > upper:
        raise ValueError(f"`lower` must be <= `upper`; got lower={lower}, upper={upper}.")
    out = z
    if "lower" in bounds:
        out = torch.maximum(out, bounds["lower"])
    if "upper" in bounds:
        out = torch.minimum(out, bounds["upper"])
    return out


def project_simplex(z: TensorTree, radius: Scalar = 1.0) -> TensorTree:
    r"""Projection onto the simplex :math:`\{x : x \ge 0,\ \mathbf 1^\top x = r\}` along the last dim.

    Sort-based (Held, Wolfe and Crowder 1974; Duchi et al. 2008):

    .. math::
        u = \operatorname{sort}(z)\ \text{descending},\quad
        \rho = \max\{j : u_j - (\textstyle\sum_{i \le j} u_i - r)/j > 0\},\quad
        \theta = (\textstyle\sum_{i \le \rho} u_i - r)/\rho,\quad
        P(z) = \max(z - \theta, 0).

    On the support :math:`S = \{i : P(z)_i > 0\}` the Jacobian is
    :math:`I_S - \tfrac{1}{|S|}\mathbf 1_S \mathbf 1_S^\top` (zero elsewhere), and
    :math:`\partial P / \partial r = \mathbf 1_S / |S|`.

    Args:
        z: tensor of shape ``(*batch, n)``, ``n >= 1``; or a tree of tensors,
            projected as one vector (the concatenation of its flattened leaves,
            no batch dimension).
        radius: :math:`r > 0`, a number, or a tensor broadcastable to ``batch``
            (may require grad); a number or a 0-d tensor for a tree.  Default 1.

    Returns:
        A tensor of shape ``(*batch, n)``; for a tree, a tree of ``z``'s structure.

    Raises:
        TypeError / ValueError: ``z`` not a floating tensor of dim >= 1 (nor a
            tree of floating tensors), a numeric ``radius`` that is not
            positive, or a non-scalar ``radius`` with a tree ``z``.

    Example:
        >>> import torch
        >>> project_simplex(torch.tensor([0.5, 1.0, -1.0]))
        tensor([0.2500, 0.7500, 0.0000])
        >>> project_simplex({"a": torch.tensor([0.5, 1.0]), "b": torch.tensor([-1.0])})
        {'a': tensor([0.2500, 0.7500]), 'b': tensor([0.])}

    References:
        Duchi, Shalev-Shwartz, Singer, Chandra, "Efficient projections onto the
        l1-ball for learning in high dimensions", ICML 2008.
    """
    if not torch.is_tensor(z):
        return _as_one_vector(project_simplex, z, radius=radius)
    _check_tensor(z, min_dim=1)
    _check_radius(radius)
    if z.shape[-1] == 0:
        raise ValueError(f"`z` is empty along its last dimension (shape {tuple(z.shape)}): the simplex needs a point.")
    r = _as_batch_scalar(radius, z)
    n = z.shape[-1]
    # P(z + c 1) = P(z): shifting the largest entry to 0 keeps cumsum(u) - r exact
    # when the entries are large compared with r.
    z = z - z.detach().amax(dim=-1, keepdim=True)
    u, _ = torch.sort(z, dim=-1, descending=True)
    cssv = torch.cumsum(u, dim=-1) - r
    ind = torch.arange(1, n + 1, dtype=z.dtype, device=z.device)
    # The condition is true for a prefix of indices; rho is its length (>= 1 for r > 0).
    rho = (u * ind > cssv).sum(dim=-1, keepdim=True).clamp(min=1)
    theta = torch.gather(cssv, -1, rho - 1) / rho.to(z.dtype)
    return torch.clamp(z - theta, min=0)


def project_l1_ball(z: TensorTree, radius: Scalar = 1.0) -> TensorTree:
    r"""Projection onto the l1 ball :math:`\{x : \|x\|_1 \le r\}` along the last dim.

    .. math::
        P(z) = z \ \text{if}\ \|z\|_1 \le r, \quad\text{else}\quad
        \operatorname{sign}(z) \odot P_{\Delta_r}(|z|),

    with :math:`P_{\Delta_r}` the projection onto the simplex of radius ``r``
    (:func:`project_simplex`), i.e. soft thresholding at the level that makes
    the l1 norm equal to ``r``.

    Args:
        z: tensor of shape ``(*batch, n)``; or a tree of tensors, projected as one
            vector (the concatenation of its flattened leaves, no batch dimension).
        radius: :math:`r > 0`, a number or a tensor broadcastable to ``batch``;
            a number or a 0-d tensor for a tree.

    Returns:
        A tensor of shape ``(*batch, n)``; for a tree, a tree of ``z``'s structure.

    Example:
        >>> import torch
        >>> project_l1_ball(torch.tensor([1.0, -1.0, 0.5]))
        tensor([ 0.5000, -0.5000,  0.0000])
        >>> project_l1_ball((torch.tensor([1.0, -1.0]), torch.tensor(0.5)))
        (tensor([ 0.5000, -0.5000]), tensor(0.))

    References:
        Duchi et al., ICML 2008 (as :func:`project_simplex`).
    """
    if not torch.is_tensor(z):
        return _as_one_vector(project_l1_ball, z, radius=radius)
    _check_tensor(z, min_dim=1)
    _check_radius(radius)
    r = _as_batch_scalar(radius, z)
    inside = z.abs().sum(-1, keepdim=True) <= r
    return torch.where(inside, z, torch.sign(z) * project_simplex(z.abs(), radius))


def project_l2_ball(z: TensorTree, radius: Scalar = 1.0) -> TensorTree:
    r"""Projection onto the Euclidean ball :math:`\{x : \|x\|_2 \le r\}` along the last dim.

    .. math:: P(z) = z \cdot \frac{r}{\max(\|z\|_2, r)}, \qquad
              \frac{\partial P}{\partial z} = \frac{r}{\|z\|}\Bigl(I - \frac{z z^\top}{\|z\|^2}\Bigr)
              \ \text{outside the ball},\ I\ \text{inside}.

    Gradients are finite everywhere, ``z = 0`` included.

    Args:
        z: tensor of shape ``(*batch, n)``; or a tree of tensors, projected as one
            vector (the concatenation of its flattened leaves, no batch dimension):
            the norm is that of all leaves together.
        radius: :math:`r > 0`, a number or a tensor broadcastable to ``batch``;
            a number or a 0-d tensor for a tree.

    Returns:
        A tensor of shape ``(*batch, n)``; for a tree, a tree of ``z``'s structure.

    Example:
        >>> import torch
        >>> project_l2_ball(torch.tensor([3.0, 4.0]))
        tensor([0.6000, 0.8000])
        >>> project_l2_ball({"w": torch.tensor([[3.0]]), "b": torch.tensor(4.0)})
        {'w': tensor([[0.6000]]), 'b': tensor(0.8000)}
    """
    if not torch.is_tensor(z):
        return _as_one_vector(project_l2_ball, z, radius=radius)
    _check_tensor(z, min_dim=1)
    _check_radius(radius)
    r = _as_batch_scalar(radius, z)
    sq = _sq_norm(z)
    outside = sq > r * r
    # Double `where`: inside the ball the norm is never differentiated, so z = 0 is safe.
    norm = torch.sqrt(torch.where(outside, sq, torch.ones_like(sq)))
    return torch.where(outside, z * (r / norm), z)


def project_linf_ball(z: TensorTree, radius: Scalar = 1.0) -> TensorTree:
    r"""Projection onto the l-infinity ball :math:`\{x : \|x\|_\infty \le r\}`: ``clamp(z, -r, r)``.

    The set is elementwise, so a tree ``z`` is projected leaf by leaf (with a
    shared radius, that is the l-infinity ball of the concatenated leaves).

    Args:
        z: tensor of shape ``(*batch, n)``; or a tree of tensors (a 0-d leaf is a
            vector of length one).
        radius: :math:`r > 0`, a number or a tensor broadcastable to ``batch``.
            For a tree: a number, a 0-d tensor, or a tree of ``z``'s structure
            with one radius per leaf (broadcastable to that leaf's batch shape).

    Returns:
        A tensor of shape ``(*batch, n)``; for a tree, a tree of ``z``'s structure.

    Example:
        >>> import torch
        >>> project_linf_ball(torch.tensor([2.0, -0.5]))
        tensor([ 1.0000, -0.5000])
        >>> project_linf_ball({"a": torch.tensor([2.0, -0.5]), "b": torch.tensor(-3.0)}, {"a": 1.0, "b": 2.0})
        {'a': tensor([ 1.0000, -0.5000]), 'b': tensor(-2.)}
    """
    if not torch.is_tensor(z):
        return _leafwise(_linf_leaf, z, radius=radius)
    _check_tensor(z, min_dim=1)
    _check_radius(radius)
    r = _as_batch_scalar(radius, z)
    if not torch.is_tensor(r):
        return torch.clamp(z, -r, r)
    return torch.minimum(torch.maximum(z, -r), r)


def project_affine_set(z: TensorTree, A: torch.Tensor, b: torch.Tensor) -> TensorTree:
    r"""Projection onto the affine set :math:`\{x : A x = b\}` (``A`` of full row rank).

    .. math:: P(z) = z - A^\top (A A^\top)^{-1} (A z - b).

    Args:
        z: tensor of shape ``(*batch, n)``; or a tree of tensors, projected as one
            vector (the concatenation of its flattened leaves, ``n`` entries in all,
            no batch dimension).
        A: tensor of shape ``(*batch, m, n)`` with ``m <= n`` and full row rank;
            a matrix ``(m, n)`` acting on the concatenated leaves for a tree ``z``.
        b: tensor of shape ``(*batch, m)``; of shape ``(m,)`` for a tree ``z``.
            Batch shapes broadcast.

    Returns:
        A tensor of shape ``(*batch, n)``; for a tree, a tree of ``z``'s structure.

    Raises:
        ValueError: on inconsistent shapes.

    Example:
        >>> import torch
        >>> project_affine_set(torch.tensor([1.0, 0.0]), torch.tensor([[1.0, 1.0]]), torch.tensor([0.0]))
        tensor([ 0.5000, -0.5000])
        >>> project_affine_set([torch.tensor(1.0), torch.tensor(0.0)], torch.tensor([[1.0, 1.0]]), torch.tensor([0.0]))
        [tensor(0.5000), tensor(-0.5000)]
    """
    if not torch.is_tensor(z):
        return _project_affine_tree(z, A, b)
    _check_tensor(z, min_dim=1)
    _check_tensor(A, "A", min_dim=2)
    _check_tensor(b, "b", min_dim=1)
    m, n = A.shape[-2], A.shape[-1]
    if n != z.shape[-1] or b.shape[-1] != m:
        raise ValueError(
            f"`A` must have shape (*batch, m, n) with n = z.shape[-1] and m = b.shape[-1]; got A "
            f"{tuple(A.shape)}, z {tuple(z.shape)}, b {tuple(b.shape)}."
        )
    if m > n:
        raise ValueError(
            f"`A` must have at most as many rows as columns (full row rank); got shape {tuple(A.shape)}."
        )
    residual = (A @ z.unsqueeze(-1)).squeeze(-1) - b
    gram = A @ A.transpose(-1, -2)
    mult = solve(gram, residual.unsqueeze(-1))
    return z - (A.transpose(-1, -2) @ mult).squeeze(-1)


def _project_affine_tree(z, A, b):
    rav = _raveler(z)
    for name, value, dim, shape in (("A", A, 2, f"(m, {rav.size})"), ("b", b, 1, "(m,)")):
        if torch.is_tensor(value) and value.dim() != dim:
            raise ValueError(
                f"`{name}` must have shape {shape} when `z` is a tree (the tree is one vector of {rav.size} "
                f"entries, with no batch dimension); got shape {tuple(value.shape)}. For a batch of "
                "problems, map over them with torch.func.vmap."
            )
    return rav.unravel(project_affine_set(rav.ravel(z), A, b))


def _halfspace_tree(project, z, a, b):
    """A hyperplane / half-space projection of the tree ``z`` as one vector; ``a`` has its structure."""
    rav = _raveler(z)
    if torch.is_tensor(a):
        raise TypeError(
            f"`a` must be a tree with the structure and shapes of `z` when `z` is a tree; got a tensor of "
            f"shape {tuple(a.shape)} for `z` {describe(z)}."
        )
    check_same_structure(a, z, "a", "z")
    _tree_scalar(b, "b")
    return rav.unravel(project(rav.ravel(z), rav.ravel(a), b))


def _halfspace_parts(z, a, b):
    _check_tensor(z, min_dim=1)
    _check_tensor(a, "a", min_dim=1)
    if a.shape[-1] != z.shape[-1]:
        raise ValueError(f"`a` must have last dim {z.shape[-1]} like `z`; got shape {tuple(a.shape)}.")
    if not torch.is_tensor(b):
        if isinstance(b, bool) or not isinstance(b, numbers.Real):
            raise TypeError(f"`b` must be a number or a tensor; got {type(b).__name__}.")
        b = torch.full((), float(b), dtype=z.dtype, device=z.device)
    gap = (a * z).sum(-1) - b
    return gap, (a * a).sum(-1)


def project_hyperplane(z: TensorTree, a: TensorTree, b: Scalar) -> TensorTree:
    r"""Projection onto the hyperplane :math:`\{x : a^\top x = b\}` along the last dim.

    .. math:: P(z) = z - \frac{a^\top z - b}{\|a\|^2}\, a.

    Args:
        z: tensor of shape ``(*batch, n)``; or a tree of tensors, projected as one
            vector (the concatenation of its flattened leaves, no batch dimension).
        a: non-zero tensor of shape ``(*batch, n)`` (broadcasting); for a tree
            ``z``, a tree of the same structure and leaf shapes (so that
            :math:`a^\top z` sums over all leaves).
        b: number or tensor of shape ``batch``; a number or a 0-d tensor for a tree.

    Returns:
        A tensor of shape ``(*batch, n)`` (the broadcast batch shape of ``z`` and
        ``a``); for a tree, a tree of ``z``'s structure.

    Example:
        >>> import torch
        >>> project_hyperplane(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]), 0.0)
        tensor([0., 1.])
        >>> z, a = {"u": torch.tensor(1.0), "v": torch.tensor(1.0)}, {"u": torch.tensor(1.0), "v": torch.tensor(0.0)}
        >>> project_hyperplane(z, a, 0.0)
        {'u': tensor(0.), 'v': tensor(1.)}
    """
    if not torch.is_tensor(z):
        return _halfspace_tree(project_hyperplane, z, a, b)
    gap, sq = _halfspace_parts(z, a, b)
    return z - (gap / sq).unsqueeze(-1) * a


def project_halfspace(z: TensorTree, a: TensorTree, b: Scalar) -> TensorTree:
    r"""Projection onto the half-space :math:`\{x : a^\top x \le b\}` along the last dim.

    .. math:: P(z) = z - \frac{\max(a^\top z - b, 0)}{\|a\|^2}\, a.

    Args:
        z: tensor of shape ``(*batch, n)``; or a tree of tensors, projected as one
            vector (the concatenation of its flattened leaves, no batch dimension).
        a: non-zero tensor of shape ``(*batch, n)`` (broadcasting); for a tree
            ``z``, a tree of the same structure and leaf shapes (so that
            :math:`a^\top z` sums over all leaves).
        b: number or tensor of shape ``batch``; a number or a 0-d tensor for a tree.

    Returns:
        A tensor of shape ``(*batch, n)`` (the broadcast batch shape of ``z`` and
        ``a``); for a tree, a tree of ``z``'s structure.

    Example:
        >>> import torch
        >>> project_halfspace(torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.0]), 1.0)
        tensor([1., 1.])
        >>> z, a = (torch.tensor([2.0]), torch.tensor([1.0])), (torch.tensor([1.0]), torch.tensor([0.0]))
        >>> project_halfspace(z, a, 1.0)
        (tensor([1.]), tensor([1.]))
    """
    if not torch.is_tensor(z):
        return _halfspace_tree(project_halfspace, z, a, b)
    gap, sq = _halfspace_parts(z, a, b)
    return z - (torch.clamp(gap, min=0) / sq).unsqueeze(-1) * a


def kl_projection_simplex(y: TensorTree, radius: Scalar = 1.0) -> TensorTree:
    r"""KL (Bregman) projection onto the simplex of a point given in the dual (log) space.

    For the entropy mirror map :math:`\phi(x) = \sum_i x_i \log x_i`, the
    Bregman projection of :math:`\nabla\phi^*(y) = e^{y - 1}` onto
    :math:`\{x \ge 0, \mathbf 1^\top x = r\}` is

    .. math:: \operatorname*{argmin}_{x \in \Delta_r} \mathrm{KL}(x \,\|\, e^{y}) = r\,\operatorname{softmax}(y),

    along the last dim.  With the mapping :math:`x \mapsto \log x` this gives the
    exponentiated-gradient step used by :func:`~bilevel.implicit.conditions.mirror_descent`.

    Args:
        y: tensor of shape ``(*batch, n)`` (dual / log-space point); or a tree of
            tensors, one vector (the concatenation of its flattened leaves, no
            batch dimension): the softmax runs over all leaves together.
        radius: :math:`r > 0`, a number or a tensor broadcastable to ``batch``;
            a number or a 0-d tensor for a tree.

    Returns:
        :math:`r\,\operatorname{softmax}(y)`, a tensor of shape ``(*batch, n)`` on
        the simplex; for a tree, a tree of ``y``'s structure.

    Example:
        >>> import torch
        >>> kl_projection_simplex(torch.zeros(4))
        tensor([0.2500, 0.2500, 0.2500, 0.2500])
        >>> kl_projection_simplex({"a": torch.zeros(3), "b": torch.zeros(1)})
        {'a': tensor([0.2500, 0.2500, 0.2500]), 'b': tensor([0.2500])}
    """
    if not torch.is_tensor(y):
        return _as_one_vector(kl_projection_simplex, y, name="y", radius=radius)
    _check_tensor(y, "y", min_dim=1)
    _check_radius(radius)
    r = _as_batch_scalar(radius, y)
    return r * torch.softmax(y, dim=-1)


# ---------------------------------------------------------------- set objects


def _check_field(value, name: str, cls: str, positive: bool = True):
    """Check a numeric or tensor field of a set object at construction."""
    if torch.is_tensor(value):
        if not value.is_floating_point():
            raise TypeError(f"{cls}.{name} must be a number or a floating tensor; got dtype {value.dtype}.")
        bad = ~torch.isfinite(value) | ((value <= 0) if positive else torch.zeros_like(value, dtype=torch.bool))
        if bool(bad.any()):
            raise ValueError(f"{cls}.{name} must be finite{' and > 0' if positive else ''}; got {value}.")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{cls}.{name} must be a number or a tensor; got {type(value).__name__}.")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{cls}.{name} must be finite{' and > 0' if positive else ''}; got {value}.")


class ConvexSet:
    """Base class of the simple sets passed as ``x_set=`` / ``y_set=``.

    Subclasses implement :meth:`project`; calling the set projects too.  The
    fields of a set are constants for implicit differentiation: to differentiate
    a solution with respect to a bound or a radius, use the ``project_*``
    function and pass that tensor among the condition's ``projection_args``
    (e.g. ``projected_gradient(f, project_box)`` with ``projection_args=(lo, hi)``).
    The built-in sets project a tree of tensors as their ``project_*`` function
    does (leaf by leaf for :class:`NonNegative` and :class:`Box`, as one
    concatenated vector for the others).

    Example:
        A set of one's own needs only :meth:`project`:

        >>> import torch
        >>> class AtMost(ConvexSet):                 # {x : x_i <= c}
        ...     def __init__(self, c):
        ...         self.c = c
        ...     def project(self, z):
        ...         return torch.clamp(z, max=self.c)
        >>> s = AtMost(1.0)
        >>> s(torch.tensor([0.5, 2.0]))
        tensor([0.5000, 1.0000])
        >>> s.contains(torch.tensor([0.5, 2.0]))
        tensor(False)
    """

    def project(self, z: TensorTree) -> TensorTree:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, z: TensorTree) -> TensorTree:
        return self.project(z)

    def contains(self, z: TensorTree, atol: Optional[float] = None) -> torch.Tensor:
        """Whether ``z`` lies in the set, up to ``atol`` (default ``sqrt(eps)`` of ``z``'s dtype).

        Returns a boolean tensor over the batch dims (for vector sets) or a 0-d
        one; a 0-d one for a tree ``z`` (one point).
        """
        if not torch.is_tensor(z):
            leaves, _ = _tree_leaves(z)
            eps = max(float(torch.finfo(x.dtype).eps) for x in leaves)
            tol = eps**0.5 if atol is None else float(atol)
            flags = [
                ((p - x).abs() <= tol * (1.0 + x.abs())).all()
                for p, x in zip(tree_leaves(self.project(z)), leaves)
            ]
            return torch.stack(flags).all()
        _check_tensor(z)
        tol = float(torch.finfo(z.dtype).eps) ** 0.5 if atol is None else float(atol)
        gap = (self.project(z) - z).abs()
        scale = 1.0 + z.abs()
        ok = gap <= tol * scale
        return ok.all() if self._elementwise else ok.all(dim=-1)

    _elementwise = False


@dataclass(frozen=True, eq=False)
class NonNegative(ConvexSet):
    r"""The non-negative orthant :math:`\{x : x \ge 0\}` (elementwise).

    Example:
        >>> import torch
        >>> NonNegative().project(torch.tensor([-1.0, 1.0]))
        tensor([0., 1.])
    """

    _elementwise = True

    def project(self, z: TensorTree) -> TensorTree:
        return project_nonnegative(z)


@dataclass(frozen=True, eq=False)
class Box(ConvexSet):
    r"""The box :math:`\{x : l \le x \le u\}` (elementwise, bounds broadcast against ``z``).

    Args:
        lower: number or tensor; ``None`` (or ``-inf``) for no lower bound.
        upper: number or tensor; ``None`` (or ``+inf``) for no upper bound.

    Raises:
        ValueError: if some ``lower > upper`` or a bound is NaN.

    Example:
        >>> import torch
        >>> Box(0.0, 1.0).project(torch.tensor([-1.0, 0.5, 2.0]))
        tensor([0.0000, 0.5000, 1.0000])
    """

    lower: Optional[Scalar] = None
    upper: Optional[Scalar] = None

    _elementwise = True

    def __post_init__(self):
        for name in ("lower", "upper"):
            value = getattr(self, name)
            if value is None:
                continue
            if torch.is_tensor(value):
                if not value.is_floating_point():
                    raise TypeError(f"Box.{name} must be a number or a floating tensor; got dtype {value.dtype}.")
                if bool(torch.isnan(value).any()):
                    raise ValueError(f"Box.{name} contains NaN.")
            elif isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"Box.{name} must be a number, a tensor or None; got {type(value).__name__}.")
            elif math.isnan(value):
                raise ValueError(f"Box.{name} is NaN.")
        if self.lower is not None and self.upper is not None:
            lo = torch.as_tensor(self.lower).detach().cpu().double()
            hi = torch.as_tensor(self.upper).detach().cpu().double()
            try:
                lo, hi = torch.broadcast_tensors(lo, hi)
            except RuntimeError as err:
                raise ValueError(
                    f"Box.lower and Box.upper must broadcast; got shapes {tuple(lo.shape)} and {tuple(hi.shape)}."
                ) from err
            if bool((lo > hi).any()):
                raise ValueError(
                    f"Box.lower must be <= Box.upper everywhere; got lower={self.lower}, upper={self.upper}."
                )

    def project(self, z: TensorTree) -> TensorTree:
        return project_box(z, self.lower, self.upper)


@dataclass(frozen=True, eq=False)
class _RadiusSet(ConvexSet):
    """A set of vectors along the last dim, scaled by a radius ``r > 0``; the
    subclass names its projection ``(z, r) -> P(z)``."""

    radius: Scalar = 1.0

    def __post_init__(self):
        _check_field(self.radius, "radius", type(self).__name__)

    def project(self, z: TensorTree) -> TensorTree:
        return type(self)._projection(z, self.radius)


@dataclass(frozen=True, eq=False)
class Simplex(_RadiusSet):
    r"""The simplex :math:`\{x : x \ge 0, \mathbf 1^\top x = r\}` along the last dim.

    Args:
        radius: :math:`r > 0` (number or tensor broadcastable to the batch shape).

    Example:
        >>> import torch
        >>> Simplex().project(torch.tensor([2.0, 0.0]))
        tensor([1., 0.])
    """

    _projection = staticmethod(project_simplex)


@dataclass(frozen=True, eq=False)
class L1Ball(_RadiusSet):
    r"""The l1 ball :math:`\{x : \|x\|_1 \le r\}` along the last dim.

    Args:
        radius: :math:`r > 0` (number or tensor broadcastable to the batch shape;
            default 1).

    Example:
        >>> import torch
        >>> L1Ball(1.0).project(torch.tensor([2.0, 0.0]))
        tensor([1., 0.])
    """

    _projection = staticmethod(project_l1_ball)


@dataclass(frozen=True, eq=False)
class L2Ball(_RadiusSet):
    r"""The Euclidean ball :math:`\{x : \|x\|_2 \le r\}` along the last dim.

    Args:
        radius: :math:`r > 0` (number or tensor broadcastable to the batch shape;
            default 1).

    Example:
        >>> import torch
        >>> L2Ball(1.0).project(torch.tensor([3.0, 4.0]))
        tensor([0.6000, 0.8000])
    """

    _projection = staticmethod(project_l2_ball)
