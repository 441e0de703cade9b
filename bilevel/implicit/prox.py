r"""Proximal operators ``prox(z, hyperparams, scaling=1.0)``.

Every operator here computes

.. math:: \operatorname{prox}_{s g}(z) = \operatorname*{argmin}_x \tfrac12 \|x - z\|_2^2 + s\, g(x, \lambda),

with :math:`z` = ``z``, :math:`\lambda` = ``hyperparams`` and :math:`s` = ``scaling``
(the step size of a proximal-gradient method).  They are pure tensor code,
differentiable almost everywhere in ``z`` and in ``hyperparams`` (also through
:mod:`torch.func`), and act elementwise except :func:`prox_group_lasso`, which
treats the last dimension as a group.  Tensor hyper-parameters broadcast
against ``z``; those given as Python numbers are checked (non-negative).

The signature is the one :func:`~bilevel.implicit.conditions.proximal_gradient`
calls: ``prox(z, hyperparams, scaling)``.

**Trees.**  ``z`` may also be a tree (dict / list / tuple nesting) of floating
tensors, e.g. the parameters handed to :class:`~bilevel.solvers.ProximalGradient`;
the result has its structure.  The separable operators (:func:`prox_none`,
:func:`prox_lasso`, :func:`prox_nonnegative_lasso`, :func:`prox_ridge`,
:func:`prox_elastic_net`) act leaf by leaf, each leaf as the single tensor
would be; each hyper-parameter is then a number or a 0-d tensor shared by
every leaf, or a tree of ``z``'s structure with one value per leaf (each
broadcastable to its leaf).  :func:`prox_group_lasso` treats the tree as **one
group**: the concatenation of its flattened leaves (so a tree has no batch of
groups, and its ``l2reg`` is a scalar).  ``scaling`` is always a scalar.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Tuple, Union

import torch

from ..typing import TensorTree
from .projections import _as_one_vector, _leafwise, _tree_leaves, _tree_scalar

Scalar = Union[float, torch.Tensor]

__all__ = [
    "prox_none",
    "prox_lasso",
    "prox_nonnegative_lasso",
    "prox_ridge",
    "prox_elastic_net",
    "prox_group_lasso",
]


def _check_z(z) -> None:
    if not torch.is_tensor(z):
        raise TypeError(f"`z` must be a torch.Tensor; got {type(z).__name__}.")
    if not z.is_floating_point():
        raise TypeError(f"`z` must have a floating dtype; got {z.dtype}.")


def _check_nonneg(value, name: str) -> None:
    """Check a hyper-parameter; tensors are not inspected (vmap-friendly)."""
    if value is None:
        raise ValueError(f"`{name}` is required (a non-negative number or tensor); got None.")
    if torch.is_tensor(value):
        if not value.is_floating_point():
            raise TypeError(f"`{name}` must be a number or a floating tensor; got dtype {value.dtype}.")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a non-negative number or a tensor; got {type(value).__name__}.")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be finite and >= 0; got {value}.")


def _soft_threshold(z: torch.Tensor, t) -> torch.Tensor:
    return torch.sign(z) * torch.clamp(z.abs() - t, min=0)


def prox_none(z: TensorTree, hyperparams: Any = None, scaling: Scalar = 1.0) -> TensorTree:
    r"""Proximal operator of :math:`g = 0`: the identity, :math:`\operatorname{prox}(z) = z`.

    Args:
        z: tensor of any shape, or a tree of them.
        hyperparams: ignored (there is no hyper-parameter); accepted so that
            every operator has the signature ``prox(z, hyperparams, scaling)``.
        scaling: ignored (the identity does not depend on the step size).

    Returns:
        ``z`` itself.

    Example:
        >>> import torch
        >>> prox_none(torch.tensor([1.0, -2.0]))
        tensor([ 1., -2.])
    """
    if not torch.is_tensor(z):
        _tree_leaves(z)
        return z
    _check_z(z)
    return z


def prox_lasso(z: TensorTree, l1reg: Union[Scalar, TensorTree] = 1.0, scaling: Scalar = 1.0) -> TensorTree:
    r"""Proximal operator of the l1 norm (soft thresholding).

    .. math::
        g(x) = \sum_i \lambda_i |x_i|, \qquad
        \operatorname{prox}_{s g}(z)_i = \operatorname{sign}(z_i)\max(|z_i| - s\lambda_i, 0).

    Derivatives: :math:`\mathbb 1[|z_i| > s\lambda_i]` in :math:`z_i`, and
    :math:`-s\operatorname{sign}(z_i)\mathbb 1[|z_i| > s\lambda_i]` in :math:`\lambda_i`.

    Args:
        z: tensor of any shape, or a tree of them (thresholded leaf by leaf).
        l1reg: :math:`\lambda \ge 0`, a number or a tensor broadcastable to ``z``
            (one per coordinate), may require grad.  For a tree ``z``: a number,
            a 0-d tensor, or a tree of ``z``'s structure (one per leaf).
        scaling: :math:`s \ge 0` (step size).

    Returns:
        :math:`\operatorname{prox}_{s g}(z)`, shaped like ``z`` (a tree of its
        structure for a tree).

    Example:
        >>> import torch
        >>> prox_lasso(torch.tensor([2.0, -0.5, -3.0]), 1.0)
        tensor([ 1., -0., -2.])
        >>> prox_lasso({"w": torch.tensor([2.0, -0.5]), "b": torch.tensor(-3.0)}, {"w": 1.0, "b": 0.5})
        {'w': tensor([1., -0.]), 'b': tensor(-2.5000)}
    """
    if not torch.is_tensor(z):
        _tree_scalar(scaling, "scaling", one_vector=False)
        return _leafwise(lambda leaf, l1reg: prox_lasso(leaf, l1reg, scaling), z, l1reg=l1reg)
    _check_z(z)
    _check_nonneg(l1reg, "l1reg")
    _check_nonneg(scaling, "scaling")
    return _soft_threshold(z, scaling * l1reg)


def prox_nonnegative_lasso(
    z: TensorTree, l1reg: Union[Scalar, TensorTree] = 1.0, scaling: Scalar = 1.0
) -> TensorTree:
    r"""Proximal operator of the l1 norm restricted to :math:`x \ge 0`.

    .. math::
        g(x) = \sum_i \lambda_i x_i + \iota_{x \ge 0}(x), \qquad
        \operatorname{prox}_{s g}(z)_i = \max(z_i - s\lambda_i, 0).

    Args:
        z: tensor of any shape, or a tree of them (leaf by leaf).
        l1reg: :math:`\lambda \ge 0`, a number or a tensor broadcastable to ``z``;
            for a tree ``z``, a number, a 0-d tensor or a tree of its structure.
        scaling: :math:`s \ge 0`.

    Returns:
        :math:`\operatorname{prox}_{s g}(z)`, shaped like ``z``.

    Example:
        >>> import torch
        >>> prox_nonnegative_lasso(torch.tensor([2.0, -0.5]), 1.0)
        tensor([1., 0.])
        >>> prox_nonnegative_lasso([torch.tensor([2.0]), torch.tensor([-0.5])], 1.0)
        [tensor([1.]), tensor([0.])]
    """
    if not torch.is_tensor(z):
        _tree_scalar(scaling, "scaling", one_vector=False)
        return _leafwise(lambda leaf, l1reg: prox_nonnegative_lasso(leaf, l1reg, scaling), z, l1reg=l1reg)
    _check_z(z)
    _check_nonneg(l1reg, "l1reg")
    _check_nonneg(scaling, "scaling")
    return torch.clamp(z - scaling * l1reg, min=0)


def prox_ridge(z: TensorTree, l2reg: Union[Scalar, TensorTree] = 1.0, scaling: Scalar = 1.0) -> TensorTree:
    r"""Proximal operator of the squared l2 norm.

    .. math::
        g(x) = \tfrac{\lambda}{2}\|x\|_2^2, \qquad
        \operatorname{prox}_{s g}(z) = \frac{z}{1 + s\lambda}.

    Args:
        z: tensor of any shape, or a tree of them (leaf by leaf).
        l2reg: :math:`\lambda \ge 0`, a number or a tensor broadcastable to ``z``;
            for a tree ``z``, a number, a 0-d tensor or a tree of its structure.
        scaling: :math:`s \ge 0`.

    Returns:
        :math:`\operatorname{prox}_{s g}(z)`, shaped like ``z``.

    Example:
        >>> import torch
        >>> prox_ridge(torch.tensor([2.0, -4.0]), 1.0)
        tensor([ 1., -2.])
        >>> prox_ridge({"a": torch.tensor([2.0]), "b": torch.tensor([-4.0])}, {"a": 1.0, "b": 3.0})
        {'a': tensor([1.]), 'b': tensor([-1.])}
    """
    if not torch.is_tensor(z):
        _tree_scalar(scaling, "scaling", one_vector=False)
        return _leafwise(lambda leaf, l2reg: prox_ridge(leaf, l2reg, scaling), z, l2reg=l2reg)
    _check_z(z)
    _check_nonneg(l2reg, "l2reg")
    _check_nonneg(scaling, "scaling")
    return z / (1 + scaling * l2reg)


def prox_elastic_net(
    z: TensorTree, hyperparams: Tuple[Any, Any] = (1.0, 1.0), scaling: Scalar = 1.0
) -> TensorTree:
    r"""Proximal operator of the elastic-net penalty.

    .. math::
        g(x) = \lambda_1 \|x\|_1 + \tfrac{\lambda_2}{2}\|x\|_2^2, \qquad
        \operatorname{prox}_{s g}(z)_i = \frac{\operatorname{sign}(z_i)\max(|z_i| - s\lambda_1, 0)}{1 + s\lambda_2}.

    Args:
        z: tensor of any shape, or a tree of them (leaf by leaf).
        hyperparams: the pair ``(l1reg, l2reg)`` = :math:`(\lambda_1, \lambda_2)`,
            each a non-negative number or a tensor broadcastable to ``z``; for a
            tree ``z``, each a number, a 0-d tensor or a tree of its structure.
        scaling: :math:`s \ge 0`.

    Returns:
        :math:`\operatorname{prox}_{s g}(z)`, shaped like ``z``.

    Example:
        >>> import torch
        >>> prox_elastic_net(torch.tensor([3.0, -0.5]), (1.0, 1.0))
        tensor([1., -0.])
        >>> prox_elastic_net({"a": torch.tensor([3.0]), "b": torch.tensor([-5.0])}, (1.0, {"a": 1.0, "b": 3.0}))
        {'a': tensor([1.]), 'b': tensor([-1.])}
    """
    if torch.is_tensor(z):
        _check_z(z)
    if not isinstance(hyperparams, (tuple, list)) or len(hyperparams) != 2:
        raise TypeError(
            f"`hyperparams` must be the pair (l1reg, l2reg); got {type(hyperparams).__name__}"
            + (f" of length {len(hyperparams)}" if isinstance(hyperparams, (tuple, list)) else "")
            + "."
        )
    l1reg, l2reg = hyperparams
    if not torch.is_tensor(z):
        _tree_scalar(scaling, "scaling", one_vector=False)
        return _leafwise(
            lambda leaf, l1reg, l2reg: prox_elastic_net(leaf, (l1reg, l2reg), scaling), z, l1reg=l1reg, l2reg=l2reg
        )
    _check_nonneg(l1reg, "l1reg")
    _check_nonneg(l2reg, "l2reg")
    _check_nonneg(scaling, "scaling")
    return _soft_threshold(z, scaling * l1reg) / (1 + scaling * l2reg)


def prox_group_lasso(z: TensorTree, l2reg: Scalar = 1.0, scaling: Scalar = 1.0) -> TensorTree:
    r"""Proximal operator of the (unsquared) l2 norm, i.e. block soft thresholding.

    The last dimension of ``z`` is one group; leading dimensions index groups
    (so a ``(groups, size)`` tensor gives the group lasso with equal group sizes).
    A tree ``z`` is **one** group: the concatenation of its flattened leaves (as
    JAXopt's ``prox_group_lasso``); for one group per leaf, apply the operator
    to each leaf, e.g. with ``torch.utils._pytree.tree_map``.

    .. math::
        g(x) = \lambda \|x\|_2, \qquad
        \operatorname{prox}_{s g}(z) = \max\Bigl(1 - \frac{s\lambda}{\|z\|_2}, 0\Bigr) z.

    Gradients are finite everywhere, including ``z = 0``.

    Args:
        z: tensor of shape ``(*groups, size)``, or a tree of tensors (one group).
        l2reg: :math:`\lambda \ge 0`, a number or a tensor broadcastable to
            ``groups``; a number or a 0-d tensor for a tree ``z``.
        scaling: :math:`s \ge 0`.

    Returns:
        :math:`\operatorname{prox}_{s g}(z)`, shaped like ``z`` (a tree of its
        structure for a tree).

    Raises:
        ValueError: a 0-d tensor ``z``, a negative numeric hyper-parameter, or a
            non-scalar ``l2reg`` / ``scaling`` with a tree ``z``.

    Example:
        >>> import torch
        >>> prox_group_lasso(torch.tensor([[3.0, 4.0], [0.3, 0.4]]), 1.0)
        tensor([[2.4000, 3.2000],
                [0.0000, 0.0000]])
        >>> prox_group_lasso({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, 1.0)
        {'a': tensor([2.4000]), 'b': tensor([3.2000])}
    """
    if not torch.is_tensor(z):
        return _as_one_vector(prox_group_lasso, z, l2reg=l2reg, scaling=scaling)
    _check_z(z)
    if z.dim() < 1:
        raise ValueError(f"`z` must have at least one dimension (the group); got shape {tuple(z.shape)}.")
    _check_nonneg(l2reg, "l2reg")
    _check_nonneg(scaling, "scaling")
    t = scaling * l2reg
    if torch.is_tensor(t) and t.dim() > 0:
        t = t.unsqueeze(-1)
    sq = (z * z).sum(-1, keepdim=True)
    # a zero threshold is the identity, with the identity Jacobian also at z = 0
    active = (sq > t * t) | (t == 0) if torch.is_tensor(t) else (sq > float(t) ** 2) | (float(t) == 0)
    norm = torch.sqrt(torch.where(sq > 0, sq, torch.ones_like(sq)))
    return torch.where(active, z * (1 - t / norm), torch.zeros_like(z))
