"""A model's losses as pure functions of its weights (:func:`torch.func.functional_call`).

Users write ordinary PyTorch: ``train_loss(model, batch, hparams)`` and
``val_loss(model, batch)`` call ``model(inputs)`` and may read
``model.named_parameters()``.  The tuners evaluate them at *other* weights (a
detached copy for the implicit function theorem, a hypernetwork's output) by
calling them inside :func:`torch.func.functional_call` on a wrapper module that
holds the model, so every use of the model inside the loss sees those weights.

Modes and buffers, as a PyTorch training loop has them: ``train_loss`` runs with
the model in training mode and ``val_loss`` in evaluation mode (``model.eval()``:
dropout off, batch norm on its running statistics), and only the training steps
themselves update the model's buffers (batch-norm running statistics): the
evaluations a hypergradient adds (``train_loss`` at the current weights for the
Hessian, ``val_loss``) run on copies of the buffers, so that they neither move
the statistics nor let the validation data into them.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from torch.func import functional_call

from .._tree import tree_map


class _Bound(nn.Module):
    """``forward(*args) = fn(model, *args)``; its parameters are the model's, prefixed ``model.``."""

    def __init__(self, model: nn.Module, fn: Callable):
        super().__init__()
        self.model = model
        object.__setattr__(self, "_fn", fn)  # not registered: a loss module keeps its own state

    def forward(self, *args):
        return self._fn(self.model, *args)


class Losses:
    """``train(weights, batch, hparams)`` and ``val(weights, batch)``: the user's
    losses evaluated at ``weights`` (a dict name -> tensor), checked to be scalars."""

    def __init__(self, model: nn.Module, train_loss: Callable, val_loss: Callable):
        for name, fn in (("train_loss", train_loss), ("val_loss", val_loss)):
            if not callable(fn):
                raise TypeError(f"`{name}` must be callable; got {type(fn).__name__}.")
        self._train = _Bound(model, train_loss)
        self._val = _Bound(model, val_loss)
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype

    def batch(self, batch: Any) -> Any:
        """``batch`` on the model's device, floating tensors in the model's dtype."""
        def move(t):
            if not torch.is_tensor(t):
                return t
            return t.to(self.device, self.dtype) if t.is_floating_point() else t.to(self.device)

        return tree_map(move, batch)

    def train(self, weights: Mapping[str, torch.Tensor], batch: Any, hparams: Mapping, *,
              step: bool = False) -> torch.Tensor:
        """``train_loss`` at ``weights`` in training mode; ``step``: a training step,
        which updates the model's buffers (else they are left as they are)."""
        with _mode(self._train.model, True):
            value = _call(self._train, weights, (batch, hparams), keep_buffers=not step)
        return _scalar(value, "train_loss(model, batch, hparams)")

    def val(self, weights: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        """``val_loss`` at ``weights`` in evaluation mode, the buffers left as they are."""
        with _mode(self._val.model, False):
            value = _call(self._val, weights, (batch,), keep_buffers=True)
        return _scalar(value, "val_loss(model, batch)")


@contextlib.contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[None]:
    """``model.train(training)`` for the block; every submodule's own flag is restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for m, flag in modes:
            m.training = flag


def _call(bound: _Bound, weights: Mapping[str, torch.Tensor], args: tuple, keep_buffers: bool = False) -> Any:
    tensors = {"model." + k: v for k, v in weights.items()}
    if keep_buffers:  # in-place updates (batch-norm statistics) land on copies
        tensors.update({"model." + k: b.clone() for k, b in bound.model.named_buffers() if ("model." + k) not in tensors})
    return functional_call(bound, tensors, args)


def _scalar(value: Any, what: str) -> torch.Tensor:
    if not torch.is_tensor(value) or value.numel() != 1:
        got = f"shape {tuple(value.shape)}" if torch.is_tensor(value) else type(value).__name__
        raise ValueError(f"`{what}` must return a scalar tensor; got {got}.")
    return value.reshape(())


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's trainable parameters by name."""
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def model_with(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """A deep copy of ``model`` whose parameters hold ``weights`` (detached)."""
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.detach())
    return out
