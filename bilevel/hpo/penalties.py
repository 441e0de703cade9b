r"""Regularizers whose strengths are hyper-parameters, for use inside a training loss."""

from __future__ import annotations

from typing import Mapping, Union

import torch
from torch import nn

__all__ = ["l2_penalty"]


def l2_penalty(model: nn.Module, decay: Union[float, torch.Tensor, Mapping[str, torch.Tensor]]) -> torch.Tensor:
    r"""Weight decay :math:`\tfrac12 \sum_P \sum_i \lambda_{P,i}\, w_{P,i}^2`.

    Args:
        model: the model whose parameters are penalized (inside a tuner's
            training loss: the ``model`` it hands over, whose parameters are the
            weights being evaluated).
        decay: one strength for every parameter (a float or 0-d tensor), or a dict ``{parameter name: tensor}`` broadcastable to
            each named parameter (the value of a ``Hyper(per_weight=...)``);
            parameters not in the dict are not penalized.

    Returns:
        A 0-d tensor.

    Raises:
        KeyError: ``decay`` names a parameter the model does not have.

    Example:
        >>> import torch
        >>> from bilevel.hpo import l2_penalty
        >>> model = torch.nn.Linear(2, 1)
        >>> with torch.no_grad():
        ...     _ = model.weight.fill_(1.0), model.bias.fill_(2.0)
        >>> with torch.no_grad():
        ...     float(l2_penalty(model, 0.5)), float(l2_penalty(model, {"bias": torch.tensor(1.0)}))
        (1.5, 2.0)
    """
    params = dict(model.named_parameters())
    if isinstance(decay, Mapping):
        unknown = [k for k in decay if k not in params]
        if unknown:
            raise KeyError(f"l2_penalty: `decay` names {unknown}, which the model does not have; "
                           f"its parameters are {list(params)}.")
        terms = [(decay[k] * params[k] ** 2).sum() for k in decay]
    else:
        terms = [decay * (p ** 2).sum() for p in params.values()]
    return 0.5 * torch.stack([torch.as_tensor(t) for t in terms]).sum()
