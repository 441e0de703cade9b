r"""Hyper-parameter optimization for ``torch.nn.Module`` models and data loaders.

Two tuners, one interface (a model, ``train_loss(model, batch, hparams)``,
``val_loss(model, batch)``, two loaders and a :class:`HyperSpec`); both show
progress, keep a history, checkpoint (``state_dict`` / ``load_state_dict``) and
return an :class:`HPOResult` with the tuned hyper-parameters and model:

* :class:`ImplicitHPO` / :func:`implicit_hpo` — warm-started training and
  implicit (IFT) hypergradients with a Neumann series or CG, for as many
  hyper-parameters as weights (Lorraine, Vicol & Duvenaud, AISTATS 2020);
* :class:`HypernetworkHPO` / :func:`hypernetwork_hpo` — a best-response
  hypernetwork trained jointly with a few hyper-parameters (Lorraine & Duvenaud
  2018; Self-Tuning Networks, MacKay et al., ICLR 2019).
"""

from ._loop import HPOResult, Tuner
from .best_response import GatedBestResponse, LinearBestResponse
from .hypernetwork import HypernetworkHPO, hypernetwork_hpo
from .implicit_hpo import ImplicitHPO, implicit_hpo
from .penalties import l2_penalty
from .spec import Hyper, HyperSpec

__all__ = [
    "Hyper",
    "HyperSpec",
    "HPOResult",
    "Tuner",
    "ImplicitHPO",
    "implicit_hpo",
    "HypernetworkHPO",
    "hypernetwork_hpo",
    "LinearBestResponse",
    "GatedBestResponse",
    "l2_penalty",
]
