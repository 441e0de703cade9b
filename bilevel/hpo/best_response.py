r"""Best-response hypernetworks: weights as a function of the hyper-parameters.

A best-response approximation :math:`w_\phi(\lambda) \approx \arg\min_w
L_T(w, \lambda)` only needs to be accurate *near the current*
:math:`\lambda` (Lorraine & Duvenaud 2018; MacKay et al. 2019), so a model
linear in :math:`\lambda` suffices.  Both modules take the raw (unconstrained)
hyper-parameters as one flat vector :math:`\rho \in \mathbb{R}^d`, centred at
a fixed point :math:`c` (the initial value), and return a dict of weights
shaped like the model's parameters:

* :class:`LinearBestResponse`: :math:`w_P(\rho) = w_P^0 + \sum_j (\rho_j - c_j) D_{P,j}`,
  a full linear map; :math:`(d + 1)` copies of the weights;
* :class:`GatedBestResponse`: :math:`w_P(\rho) = w_P^0 + \operatorname{diag}\bigl(A_P^\top
  (\rho - c)\bigr) w_P^1`, one gate per output unit (row) scaling a second copy
  of the weights — the structured best response of Self-Tuning Networks,
  about twice the model's size whatever :math:`d`.

Any ``nn.Module`` with the same call signature can be used instead.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
from torch import nn

__all__ = ["LinearBestResponse", "GatedBestResponse"]


class _BestResponse(nn.Module):
    def __init__(self, weights: Mapping[str, torch.Tensor], center: torch.Tensor):
        super().__init__()
        if center.dim() != 1 or center.numel() == 0:
            raise ValueError(f"`center` must be a non-empty vector; got shape {tuple(center.shape)}.")
        self.names = list(weights)
        self.base = nn.ParameterList([nn.Parameter(w.detach().clone()) for w in weights.values()])
        self.register_buffer("center", center.detach().clone())

    def forward(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        delta = raw - self.center
        return {name: base + self._offset(i, delta) for i, (name, base) in enumerate(zip(self.names, self.base))}

    def _offset(self, i: int, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LinearBestResponse(_BestResponse):
    r"""Linear best response :math:`w(\rho) = w^0 + D\,(\rho - c)` (Lorraine & Duvenaud 2018).

    Args:
        weights: the model's parameters ``{name: tensor}``; :math:`w^0` starts there.
        center: :math:`c`, the raw hyper-parameters (flat, length :math:`d`)
            around which the map is linear; :math:`D` starts at 0.

    Example:
        >>> import torch
        >>> from bilevel.hpo import LinearBestResponse
        >>> br = LinearBestResponse({"w": torch.ones(3)}, center=torch.zeros(2))
        >>> br(torch.tensor([0.5, -1.0]))["w"]                  # D = 0 at the start
        tensor([1., 1., 1.], grad_fn=<AddBackward0>)
    """

    def __init__(self, weights: Mapping[str, torch.Tensor], center: torch.Tensor):
        super().__init__(weights, center)
        d = self.center.numel()
        self.slopes = nn.ParameterList([nn.Parameter(torch.zeros((d,) + tuple(w.shape), dtype=w.dtype,
                                                                 device=w.device)) for w in self.base])

    def _offset(self, i, delta):
        return torch.tensordot(delta, self.slopes[i], dims=1)


class GatedBestResponse(_BestResponse):
    r"""STN-style best response :math:`w_P(\rho) = w_P^0 + \mathrm{diag}(A_P^\top(\rho - c))\, w_P^1`.

    Each parameter's rows (output units; a 0-d or 1-d parameter counts as
    rows of one entry) are scaled by a gate linear in :math:`\rho`.

    Args:
        weights: the model's parameters; :math:`w^0` starts there, :math:`w^1` at 0.
        center: :math:`c` (flat raw hyper-parameters).
        generator: random generator for the gates' start :math:`A \sim N(0, 1/d)`
            (default: torch's global generator).

    Example:
        >>> import torch
        >>> from bilevel.hpo import GatedBestResponse
        >>> br = GatedBestResponse({"w": torch.ones(2, 3)}, center=torch.zeros(1),
        ...                        generator=torch.Generator().manual_seed(0))
        >>> br(torch.tensor([0.7]))["w"]                    # w^1 = 0 at the start
        tensor([[1., 1., 1.],
                [1., 1., 1.]], grad_fn=<AddBackward0>)
        >>> [tuple(p.shape) for p in br.parameters()]       # w^0, w^1, one gate per row
        [(2, 3), (2, 3), (1, 2)]

    References:
        MacKay, M., Vicol, P., Lorraine, J., Duvenaud, D. and Grosse, R.
        `Self-Tuning Networks: Bilevel Optimization of Hyperparameters using
        Structured Best-Response Functions <https://arxiv.org/abs/1903.03088>`_.
        ICLR 2019.
    """

    def __init__(self, weights: Mapping[str, torch.Tensor], center: torch.Tensor,
                 generator: Optional[torch.Generator] = None):
        super().__init__(weights, center)
        d = self.center.numel()
        self.delta = nn.ParameterList([nn.Parameter(torch.zeros_like(w)) for w in self.base])
        gates = []
        for w in self.base:
            rows = w.shape[0] if w.dim() > 0 else 1
            device = "cpu" if generator is None else generator.device  # a generator draws on its own device
            a = torch.randn(d, rows, generator=generator, dtype=w.dtype, device=device) / math.sqrt(d)
            gates.append(nn.Parameter(a.to(w.device)))
        self.gates = nn.ParameterList(gates)

    def _offset(self, i, delta):
        w1 = self.delta[i]
        gate = delta @ self.gates[i]  # one gate per row
        if w1.dim() == 0:
            return gate.reshape(()) * w1
        return gate.reshape((-1,) + (1,) * (w1.dim() - 1)) * w1
