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
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Tuple, Union

import torch

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


def prox_none(z: torch.Tensor, hyperparams: Any = None, scaling: Scalar = 1.0) -> torch.Tensor:
    r"""Proximal operator of :math:`g = 0`: the identity, :math:`\operatorname{prox}(z) = z`.

    Args:
        z: tensor of any shape.
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
    _check_z(z)
    return z


def prox_lasso(z: torch.Tensor, l1reg: Scalar = 1.0, scaling: Scalar = 1.0) -> torch.Tensor:
    r"""Proximal operator of the l1 norm (soft thresholding).

    .. math::
        g(x) = \sum_i \lambda_i |x_i|, \qquad
        \operatorname{prox}_{s g}(z)_i = \operatorname{sign}(z_i)\max(|z_i| - s\lambda_i, 0).

    Derivatives: :math:`\mathbb 1[|z_i| > s\lambda_i]` in :math:`z_i`, and
    :math:`-s\operatorname{sign}(z_i)\mathbb 1[|z_i| > s\lambda_i]` in :math:`\lambda_i`.

    Args:
        z: tensor of any shape.
        l1reg: :math:`\lambda \ge 0`, a number or a tensor broadcastable to ``z``
            (one per coordinate), may require grad.
        scaling: :math:`s \ge 0` (step size).

    Returns:
        :math:`\operatorname{prox}_{s g}(z)`, shaped like ``z``.

    Example:
        >>> import torch
        >>> prox_lasso(torch.tensor([2.0, -0.5, -3.0]), 1.0)
        tensor([ 1., -0., -2.])
    """
    _check_z(z)
    _check_nonneg(l1reg, "l1reg")
    _check_nonneg(scaling, "scaling")
    return _soft_threshold(z, scaling * l1reg)


def prox_nonnegative_lasso(z: torch.Tensor, l1reg: Scalar = 1.0, scaling: Scalar = 1.0) -> torch.Tensor:
    r"""Proximal operator of the l1 norm restricted to :math:`x \ge 0`.

    .. math::
        g(x) = \sum_i \lambda_i x_i + \iota_{x \ge 0}(x), \qquad
        \operatorname{prox}_{s g}(z)_i = \max(z_i - s\lambda_i, 0).

    Args:
        z: tensor of any shape.
        l1reg: :math:`\lambda \ge 0`, a number or a tensor broadcastable to ``z``.
        scaling: :math:`s \ge 0`.

    Returns:
        :math:`\operatorname{prox}_{s g}(z)`, shaped like ``z``.

    Example:
        >>> import torch
        >>> prox_nonnegative_lasso(torch.tensor([2.0, -0.5]), 1.0)
        tensor([1., 0.])
    """
    _check_z(z)
    _check_nonneg(l1reg, "l1reg")
    _check_nonneg(scaling, "scaling")
    return torch.clamp(z - scaling * l1reg, min=0)


def prox_ridge(z: torch.Tensor, l2reg: Scalar = 1.0, scaling: Scalar = 1.0) -> torch.Tensor:
    r"""Proximal operator of the squared l2 norm.

    .. math::
        g(x) = \tfrac{\lambda}{2}\|x\|_2^2, \qquad
        \operatorname{prox}_{s g}(z) = \frac{z}{1 + s\lambda}.

    Args:
        z: tensor of any shape.
        l2reg: :math:`\lambda \ge 0`, a number or a tensor broadcastable to ``z``.
        scaling: :math:`s \ge 0`.

    Returns:
        :math:`\operatorname{prox}_{s g}(z)`, shaped like ``z``.

    Example:
        >>> import torch
        >>> prox_ridge(torch.tensor([2.0, -4.0]), 1.0)
        tensor([ 1., -2.])
    """
    _check_z(z)
    _check_nonneg(l2reg, "l2reg")
    _check_nonneg(scaling, "scaling")
    return z / (1 + scaling * l2reg)


def prox_elastic_net(
    z: torch.Tensor, hyperparams: Tuple[Scalar, Scalar] = (1.0, 1.0), scaling: Scalar = 1.0
) -> torch.Tensor:
    r"""Proximal operator of the elastic-net penalty.

    .. math::
        g(x) = \lambda_1 \|x\|_1 + \tfrac{\lambda_2}{2}\|x\|_2^2, \qquad
        \operatorname{prox}_{s g}(z)_i = \frac{\operatorname{sign}(z_i)\max(|z_i| - s\lambda_1, 0)}{1 + s\lambda_2}.

    Args:
        z: tensor of any shape.
        hyperparams: the pair ``(l1reg, l2reg)`` = :math:`(\lambda_1, \lambda_2)`,
            each a non-negative number or a tensor broadcastable to ``z``.
        scaling: :math:`s \ge 0`.

    Returns:
        :math:`\operatorname{prox}_{s g}(z)`, shaped like ``z``.

    Example:
        >>> import torch
        >>> prox_elastic_net(torch.tensor([3.0, -0.5]), (1.0, 1.0))
        tensor([1., -0.])
    """
    _check_z(z)
    if not isinstance(hyperparams, (tuple, list)) or len(hyperparams) != 2:
        raise TypeError(
            f"`hyperparams` must be the pair (l1reg, l2reg); got {type(hyperparams).__name__}"
            + (f" of length {len(hyperparams)}" if isinstance(hyperparams, (tuple, list)) else "")
            + "."
        )
    l1reg, l2reg = hyperparams
    _check_nonneg(l1reg, "l1reg")
    _check_nonneg(l2reg, "l2reg")
    _check_nonneg(scaling, "scaling")
    return _soft_threshold(z, scaling * l1reg) / (1 + scaling * l2reg)


def prox_group_lasso(z: torch.Tensor, l2reg: Scalar = 1.0, scaling: Scalar = 1.0) -> torch.Tensor:
    r"""Proximal operator of the (unsquared) l2 norm, i.e. block soft thresholding.

    The last dimension of ``z`` is one group; leading dimensions index groups
    (so a ``(groups, size)`` tensor gives the group lasso with equal group sizes).

    .. math::
        g(x) = \lambda \|x\|_2, \qquad
        \operatorname{prox}_{s g}(z) = \max\Bigl(1 - \frac{s\lambda}{\|z\|_2}, 0\Bigr) z.

    Gradients are finite everywhere, including ``z = 0``.

    Args:
        z: tensor of shape ``(*groups, size)``.
        l2reg: :math:`\lambda \ge 0`, a number or a tensor broadcastable to ``groups``.
        scaling: :math:`s \ge 0`.

    Returns:
        :math:`\operatorname{prox}_{s g}(z)`, shaped like ``z``.

    Example:
        >>> import torch
        >>> prox_group_lasso(torch.tensor([[3.0, 4.0], [0.3, 0.4]]), 1.0)
        tensor([[2.4000, 3.2000],
                [0.0000, 0.0000]])
    """
    _check_z(z)
    if z.dim() < 1:
        raise ValueError(f"`z` must have at least one dimension (the group); got shape {tuple(z.shape)}.")
    _check_nonneg(l2reg, "l2reg")
    _check_nonneg(scaling, "scaling")
    t = scaling * l2reg
    if torch.is_tensor(t) and t.dim() > 0:
        t = t.unsqueeze(-1)
    sq = (z * z).sum(-1, keepdim=True)
    active = sq > t * t if torch.is_tensor(t) else sq > float(t) ** 2
    norm = torch.sqrt(torch.where(active, sq, torch.ones_like(sq)))
    return torch.where(active, z * (1 - t / norm), torch.zeros_like(z))
