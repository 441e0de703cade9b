r"""Hypernetwork (best-response) hyper-parameter optimization.

Lorraine & Duvenaud (2018) collapse the nested problem
:math:`\min_\lambda L_V(w^\star(\lambda))`, :math:`w^\star(\lambda) =
\arg\min_w L_T(w, \lambda)` into one stochastic loop by training a
hypernetwork :math:`w_\phi(\lambda) \approx w^\star(\lambda)` near the current
hyper-parameters; Self-Tuning Networks (MacKay et al., 2019) make it scale
with a structured best response and a learned perturbation scale.  In raw
(unconstrained) coordinates :math:`\rho`, :math:`\lambda = T(\rho)`, the loop
alternates

1. a weight phase, ``weight_steps`` steps on :math:`\phi` of
   :math:`L_T\bigl(w_\phi(\tilde\rho), T(\tilde\rho)\bigr)` with
   :math:`\tilde\rho = \rho + \sigma \odot \varepsilon`, :math:`\varepsilon \sim N(0, I)`;
2. a hyper phase, one step on :math:`\rho` of :math:`L_V(w_\phi(\rho))` by
   ordinary backpropagation through the hypernetwork — with a learned
   :math:`\sigma`, of :math:`L_V(w_\phi(\rho + \sigma\odot\varepsilon)) -
   \tau \sum_j \log\sigma_j` (the entropy term keeps the perturbation from
   collapsing).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from .._tree import tree_leaves
from ._functional import model_with, trainable
from ._loop import HPOResult, OptimizerSpec, Tuner, make_optimizer, tune
from .best_response import GatedBestResponse, LinearBestResponse

__all__ = ["HypernetworkHPO", "hypernetwork_hpo"]

_KINDS = {"linear": LinearBestResponse, "gated": GatedBestResponse}


class HypernetworkHPO(Tuner):
    r"""Joint training of a best-response hypernetwork and a few hyper-parameters.

    Args:
        model: the network (copied); its parameters start the hypernetwork's
            :math:`w^0` and give the weights' names and shapes.
        train_loss: ``train_loss(model, batch, hparams) -> scalar`` (may draw
            random noise whose rate is a hyper-parameter).
        val_loss: ``val_loss(model, batch) -> scalar``, run with the model in
            evaluation mode (``model.eval()``: dropout off, batch norm on its running
            statistics); ``train_loss`` runs in training mode, and only the
            training steps update the model's buffers (the hypergradient's own
            evaluations use copies: validation data never enter the statistics).
        train_loader, val_loader: re-iterable sources of batches, cycled.
        spec: a :class:`~bilevel.hpo.HyperSpec` of fixed-shape hyper-parameters
            (no ``per_weight`` / ``per_example``: use
            :class:`~bilevel.hpo.ImplicitHPO` for those); :math:`d` numbers in all.
        best_response: ``"linear"`` (default, :class:`~bilevel.hpo.LinearBestResponse`,
            :math:`(d+1)\times` the weights), ``"gated"``
            (:class:`~bilevel.hpo.GatedBestResponse`, STN, about :math:`2\times`)
            or an ``nn.Module`` mapping the flat raw vector :math:`\rho` to a dict
            ``{parameter name: tensor}``.
        weight_steps: weight-phase steps per hyper-step (default 5).
        weight_optimizer, weight_lr: the hypernetwork's optimizer (default
            ``"adam"``, 1e-3).
        hyper_optimizer, hyper_lr: the hyper-parameters' optimizer (default
            ``"adam"``, 0.01).
        sigma: perturbation scale :math:`\sigma > 0` in raw units (default 0.5).
        learn_sigma: tune :math:`\sigma` in the hyper phase with the entropy
            bonus (default ``False``: fixed :math:`\sigma`, deterministic hyper phase).
        entropy_weight: :math:`\tau \ge 0` (default 1e-3).
        warmup_steps: weight-phase steps before the first hyper-step.
        seed: seed of the perturbations' random generator (checkpointed).
        progress: show a tqdm bar in :meth:`run`.

    History keys (besides :class:`~bilevel.hpo.HPOResult`'s): ``sigma`` (mean
    perturbation scale).

    Raises:
        ValueError / TypeError: naming the argument (bad spec, per-weight
            hyper-parameters, a hypernetwork whose output does not match the
            model's parameters, an empty loader, ...).

    Example:
        >>> import torch
        >>> from bilevel.hpo import Hyper, HypernetworkHPO
        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.randn(64, 4, generator=g)
        >>> t = X @ torch.tensor([1.0, -1.0, 0.5, 0.0]) + 0.3 * torch.randn(64, generator=g)
        >>> train, val = [(X[:32], t[:32])], [(X[32:], t[32:])]
        >>> mse = lambda m, b: ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean()
        >>> train_loss = lambda m, b, hp: mse(m, b) + hp["decay"] * (m.weight ** 2).sum()
        >>> tuner = HypernetworkHPO(torch.nn.Linear(4, 1), train_loss, mse, train, val,
        ...                         {"decay": Hyper(1.0, low=0.0)}, weight_lr=0.05, hyper_lr=0.05,
        ...                         warmup_steps=50, progress=False)
        >>> result = tuner.run(60)
        >>> float(result.hparams["decay"]) < 1.0                    # strong decay hurts here
        True

    References:
        Lorraine, J. and Duvenaud, D. `Stochastic Hyperparameter Optimization
        through Hypernetworks <https://arxiv.org/abs/1802.09419>`_. 2018.
        MacKay, M., Vicol, P., Lorraine, J., Duvenaud, D. and Grosse, R.
        `Self-Tuning Networks <https://arxiv.org/abs/1903.03088>`_. ICLR 2019.
    """

    _desc = "hypernetwork HPO"
    _extra_keys = ("sigma",)

    def __init__(
        self,
        model: nn.Module,
        train_loss: Callable[[nn.Module, Any, dict], torch.Tensor],
        val_loss: Callable[[nn.Module, Any], torch.Tensor],
        train_loader: Iterable,
        val_loader: Iterable,
        spec: Any,
        *,
        best_response: Union[str, nn.Module] = "linear",
        weight_steps: int = 5,
        weight_optimizer: OptimizerSpec = "adam",
        weight_lr: float = 1e-3,
        hyper_optimizer: OptimizerSpec = "adam",
        hyper_lr: float = 0.01,
        sigma: float = 0.5,
        learn_sigma: bool = False,
        entropy_weight: float = 1e-3,
        warmup_steps: int = 0,
        seed: int = 0,
        progress: bool = True,
    ):
        super().__init__(model, train_loss, val_loss, train_loader, val_loader, spec,
                         hyper_optimizer=hyper_optimizer, hyper_lr=hyper_lr,
                         warmup_steps=warmup_steps, progress=progress)
        for entry in self.spec.entries:
            if entry.tree or entry.hyper.per_example:
                raise ValueError(
                    f"spec {entry.name!r}: hypernetwork HPO tunes a few fixed-shape hyper-parameters; "
                    "per_weight / per_example ones need ImplicitHPO."
                )
        if not isinstance(weight_steps, int) or isinstance(weight_steps, bool) or weight_steps < 1:
            raise ValueError(f"`weight_steps` must be a positive int; got {weight_steps!r}.")
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"`sigma` must be a positive float; got {sigma!r}.")
        if not (isinstance(entropy_weight, (int, float)) and math.isfinite(entropy_weight) and entropy_weight >= 0):
            raise ValueError(f"`entropy_weight` must be a non-negative float; got {entropy_weight!r}.")
        center = self._flat().detach()
        self.generator = torch.Generator(device=center.device).manual_seed(int(seed))
        self.best_response = self._build(best_response, center)
        self.weight_optimizer = make_optimizer(weight_optimizer, list(self.best_response.parameters()),
                                               weight_lr, "weight_optimizer")
        self.weight_steps, self.learn_sigma, self.entropy_weight = weight_steps, bool(learn_sigma), entropy_weight
        self.log_sigma = torch.full_like(center, math.log(sigma)).requires_grad_(self.learn_sigma)
        if self.learn_sigma:
            self.hyper_optimizer.add_param_group({"params": [self.log_sigma]})

    def _build(self, best_response, center) -> nn.Module:
        params = trainable(self.model)
        if isinstance(best_response, str):
            if best_response not in _KINDS:
                raise ValueError(f"`best_response` must be one of {sorted(_KINDS)} or an nn.Module; "
                                 f"got {best_response!r}.")
            extra = {"generator": self.generator} if best_response == "gated" else {}
            return _KINDS[best_response](params, center, **extra)
        if not isinstance(best_response, nn.Module):
            raise TypeError(f"`best_response` must be a name or an nn.Module; got {type(best_response).__name__}.")
        with torch.no_grad():
            out = best_response(center)
        missing = [k for k in params if not isinstance(out, Mapping) or k not in out]
        wrong = [k for k in params if k not in missing and tuple(out[k].shape) != tuple(params[k].shape)]
        if missing or wrong:
            raise ValueError(
                "`best_response` must return a dict of the model's parameters {name: tensor of its shape}; "
                f"missing {missing}, wrong shape {[(k, tuple(out[k].shape), tuple(params[k].shape)) for k in wrong]}."
            )
        return best_response

    # -- raw hyper-parameters as one vector -------------------------------------------
    def _flat(self) -> torch.Tensor:
        return torch.cat([self.raw[name].reshape(-1) for name in self.spec.names])

    def _unflat(self, flat: torch.Tensor) -> dict:
        out, start = {}, 0
        for name in self.spec.names:
            n = self.raw[name].numel()
            out[name] = flat[start:start + n].reshape(self.raw[name].shape)
            start += n
        return out

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=self.generator, dtype=like.dtype, device=like.device)

    # -- the two phases ------------------------------------------------------------------
    def _train_step(self) -> float:
        batch = self._batch(self.train_stream)
        with torch.no_grad():
            raw = self._flat() + self.log_sigma.exp() * self._noise(self.log_sigma)
            hp = self.spec.constrain(self._unflat(raw))
        with torch.enable_grad():
            loss = self.losses.train(self.best_response(raw), batch, hp, step=True)
            self.weight_optimizer.zero_grad(set_to_none=True)
            loss.backward()
        value = self._checked_train_loss(loss)
        self.weight_optimizer.step()
        self.weight_optimizer.zero_grad(set_to_none=True)
        return value

    def _hyper_step(self) -> dict:
        losses = []
        for _ in range(self.weight_steps):
            losses.append(self._train_step())
            self.train_steps += 1
        batch = self._batch(self.val_stream)
        leaves = tree_leaves(self.raw) + ([self.log_sigma] if self.learn_sigma else [])
        with torch.enable_grad():
            raw = self._flat()
            if self.learn_sigma:
                raw = raw + self.log_sigma.exp() * self._noise(self.log_sigma)
            val = self.losses.val(self.best_response(raw), batch)
            objective = val - self.entropy_weight * self.log_sigma.sum() if self.learn_sigma else val
            grads = torch.autograd.grad(objective, leaves, allow_unused=True)
        for leaf, g in zip(leaves, grads):
            leaf.grad = torch.zeros_like(leaf) if g is None else g
        self.hyper_optimizer.step()
        self.hyper_optimizer.zero_grad(set_to_none=True)
        norm = torch.sqrt(sum((g * g).sum() for g in grads[: len(tree_leaves(self.raw))] if g is not None))
        return {"train_loss": sum(losses) / len(losses), "val_loss": float(val.detach()),
                "hypergradient_norm": float(norm), "sigma": float(self.log_sigma.detach().exp().mean())}

    # -- weights -------------------------------------------------------------------------
    def best_response_at(self, hparams: Optional[Mapping[str, Any]] = None) -> dict:
        r"""The hypernetwork's weights :math:`w_\phi(\rho)` at ``hparams`` (constrained
        values ``{name: value}``; default the current ones), detached."""
        if hparams is None:
            raw = self._flat()
        else:
            unknown = sorted(set(hparams) - set(self.spec.names))
            if unknown or set(hparams) != set(self.spec.names):
                raise ValueError(f"`hparams` must give exactly the spec's names {self.spec.names}; got "
                                 f"{sorted(hparams)}.")
            parts = []
            for e in self.spec.entries:
                value = torch.as_tensor(hparams[e.name], dtype=self.spec.dtype, device=self.spec.device)
                shape = self.raw[e.name].shape
                try:
                    value = value.expand(shape)
                except RuntimeError:
                    raise ValueError(f"`hparams[{e.name!r}]` must have shape {tuple(shape)} (or broadcast to it); "
                                     f"got {tuple(value.shape)}.") from None
                try:
                    parts.append(e.hyper.to_raw(value).reshape(-1))
                except ValueError as err:
                    raise ValueError(f"`hparams[{e.name!r}]`: {err}") from None
            raw = torch.cat(parts)
        with torch.no_grad():
            return {k: v.detach() for k, v in self.best_response(raw).items()}

    def model_at(self, hparams: Optional[Mapping[str, Any]] = None) -> nn.Module:
        """A copy of the model holding :meth:`best_response_at` ``(hparams)``."""
        return model_with(self.model, self.best_response_at(hparams))

    def _weights(self) -> dict:
        return self.best_response_at()

    def _extra_state(self) -> dict:
        return {"best_response": self.best_response.state_dict(),
                "weight_optimizer": self.weight_optimizer.state_dict(),
                "log_sigma": self.log_sigma.detach().clone(), "generator": self.generator.get_state()}

    def _load_extra(self, state: dict) -> None:
        self.best_response.load_state_dict(state["best_response"])
        self.weight_optimizer.load_state_dict(state["weight_optimizer"])
        with torch.no_grad():
            self.log_sigma.copy_(state["log_sigma"])
        self.generator.set_state(state["generator"])


def hypernetwork_hpo(
    model: nn.Module,
    train_loss: Callable,
    val_loss: Callable,
    train_loader: Iterable,
    val_loader: Iterable,
    spec: Any,
    *,
    max_steps: int = 100,
    resume: Optional[dict] = None,
    callback: Optional[Callable] = None,
    **options: Any,
) -> HPOResult:
    r"""Tune a few hyper-parameters with a best-response hypernetwork:
    :class:`HypernetworkHPO` in one call.

    ``max_steps`` hyper-steps in all; ``resume`` a checkpoint (``result.state``)
    to continue from; ``options`` are :class:`HypernetworkHPO`'s keyword arguments.

    Args:
        model: the network (copied); its parameters start the hypernetwork.
        train_loss: ``train_loss(model, batch, hparams) -> scalar``.
        val_loss: ``val_loss(model, batch) -> scalar``.
        train_loader, val_loader: re-iterable sources of batches, cycled.
        spec: a :class:`~bilevel.hpo.HyperSpec` of fixed-shape hyper-parameters
            (or a dict of :class:`~bilevel.hpo.Hyper`).
        max_steps: hyper-steps in all, those of a resumed run included (default 100).
        resume: a checkpoint (``result.state`` or ``tuner.state_dict()``) to
            continue from; ``None`` starts afresh.
        callback: ``callback(tuner, record)`` after each hyper-step; returning
            ``True`` stops the run.
        options: keyword arguments of :class:`HypernetworkHPO`
            (``best_response``, ``weight_steps``, ``weight_lr``, ``hyper_lr``,
            ``sigma``, ``progress``, ...).

    Returns:
        An :class:`~bilevel.hpo.HPOResult`: the tuned hyper-parameters and
        model (its weights the best response at them), the history and a
        checkpoint.

    Raises:
        ValueError / TypeError: as :class:`HypernetworkHPO`, naming the argument.

    Example:
        >>> import torch
        >>> from bilevel.hpo import Hyper, hypernetwork_hpo
        >>> X = torch.randn(40, 2, generator=torch.Generator().manual_seed(2))
        >>> data = [(X, X.sum(-1))]
        >>> mse = lambda m, b: ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean()
        >>> result = hypernetwork_hpo(torch.nn.Linear(2, 1), lambda m, b, hp: mse(m, b) + hp["decay"] *
        ...                           (m.weight ** 2).sum(), mse, data, data, {"decay": Hyper(0.5, low=0.0)},
        ...                           max_steps=40, weight_lr=0.05, hyper_lr=0.05, progress=False)
        >>> float(result.hparams["decay"]) < 0.5
        True
    """
    return tune(HypernetworkHPO, (model, train_loss, val_loss, train_loader, val_loader, spec), max_steps, resume, callback,
                options)
