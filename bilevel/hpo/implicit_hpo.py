r"""Implicit hyper-parameter optimization with many hyper-parameters (IFT + Neumann).

Lorraine, Vicol and Duvenaud (2020) tune as many hyper-parameters as weights
by alternating ordinary, warm-started training of the weights :math:`w` with a
hyper-step on :math:`\lambda` whose gradient comes from the implicit function
theorem at the current weights:

.. math::

    \frac{d L_V}{d\lambda} = \nabla_\lambda L_V
        - \nabla^2_{\lambda w} L_T \; v, \qquad
    v \approx \bigl[\nabla^2_{ww} L_T\bigr]^{-1} \nabla_w L_V
      \approx \alpha \sum_{k=0}^{K-1} \bigl(I - \alpha \nabla^2_{ww} L_T\bigr)^k \nabla_w L_V,

with :math:`L_T` the training loss (mini-batch, depends on :math:`\lambda`),
:math:`L_V` the validation loss, :math:`K` Neumann terms and :math:`\alpha` the
training learning rate.  A hyper-step costs one linearization of
:math:`\nabla_w L_T` and :math:`K` Hessian-vector products — a few training
steps — and no autograd graph outlives it.  Built on :func:`bilevel.hypergrad`
over ``dict(model.named_parameters())`` with :func:`torch.func.functional_call`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from .._tree import tree_leaves
from ..implicit.hypergrad import hypergrad
from ..implicit.linear_solve import LinearSolver, Neumann
from ._functional import trainable
from ._loop import HPOResult, OptimizerSpec, Tuner, make_optimizer, tune

__all__ = ["ImplicitHPO", "implicit_hpo"]


class ImplicitHPO(Tuner):
    r"""Gradient-based tuning of many hyper-parameters by implicit differentiation.

    Each hyper-step runs ``inner_steps`` training steps of the weights
    (warm-started: never restarted) with ``inner_optimizer`` at the current
    hyper-parameters, then one hypergradient step on the raw hyper-parameters
    :math:`\rho` (:math:`\lambda = T(\rho)`, see :mod:`bilevel.hpo.spec`) with
    ``hyper_optimizer``:

    .. math::

        \frac{dL_V}{d\rho} = -\bigl(\nabla^2_{\rho w} L_T(w, T(\rho))\bigr)\, v, \qquad
        \nabla^2_{ww} L_T \, v = \nabla_w L_V(w),

    on one training and one validation mini-batch, ``v`` from ``solve``
    (default a Neumann series of 10 terms with :math:`\alpha` = ``inner_lr``).

    Args:
        model: the network, a :class:`torch.nn.Module` (copied; the copy is trained).
        train_loss: ``train_loss(model, batch, hparams) -> scalar``, ordinary
            PyTorch calling ``model(...)``; ``hparams`` maps each name of the
            spec to its constrained value (a tensor, or a dict of tensors for
            ``per_weight``).  It is evaluated at other weights by
            :func:`torch.func.functional_call`.
        val_loss: ``val_loss(model, batch) -> scalar``, run with the model in
            evaluation mode (``model.eval()``: dropout off, batch norm on its running
            statistics); ``train_loss`` runs in training mode, and only the
            training steps update the model's buffers (the hypergradient's own
            evaluations use copies: validation data never enter the statistics).
        train_loader, val_loader: re-iterable sources of batches (``DataLoader``,
            list); cycled.  Batches move to the model's device (floating tensors
            to its dtype).
        spec: a :class:`~bilevel.hpo.HyperSpec` (or a dict of
            :class:`~bilevel.hpo.Hyper`).
        inner_steps: training steps per hyper-step, :math:`T \ge 1` (default 10).
        inner_optimizer, inner_lr: the weights' optimizer (name, class or
            factory; default ``"sgd"``) and learning rate (default 0.1).
        hyper_optimizer, hyper_lr: the hyper-parameters' optimizer (default
            ``"adam"``) and learning rate (default 0.01).
        solve: linear solver for the Hessian system, any
            :mod:`bilevel.implicit.linear_solve` solver; default
            ``Neumann(terms=10, alpha=inner_lr)`` (Lorraine et al.); ``CG(maxiter=...)``
            for a more exact, costlier solve.
        damping: :math:`\epsilon \ge 0` added to the Hessian (non-convex losses).
        residual_tol: tolerance of :func:`bilevel.hypergrad`'s certificate on the
            distance of the weights to a stationary point; default ``None``:
            not checked (the method applies the IFT at approximate, warm-started
            weights by design), only recorded as ``history["inner_residual"]``.
        warmup_steps: training steps before the first hyper-step (default 0).
        progress: show a tqdm bar in :meth:`run` (default ``True``).

    History keys (besides :class:`~bilevel.hpo.HPOResult`'s): ``inner_residual``
    (:math:`\|\nabla_w L_T\|` on the hyper-step's batch) and ``linear_residual``
    (:math:`\|b - Hv\| / \|b\|` of the linear solve).

    Raises:
        ValueError / TypeError: naming the argument: a bad spec (bounds, a
            ``per_weight`` parameter the model lacks), an empty loader, a
            non-positive learning rate, a loss that is not scalar.

    Example:
        >>> import torch
        >>> from bilevel.hpo import Hyper, ImplicitHPO
        >>> g = torch.Generator().manual_seed(0)
        >>> X, Xv = torch.randn(40, 3, generator=g), torch.randn(40, 3, generator=g)
        >>> w = torch.tensor([1.0, -2.0, 0.5])
        >>> train = [(X, X @ w + torch.randn(40, generator=g))]
        >>> val = [(Xv, Xv @ w)]
        >>> model = torch.nn.Linear(3, 1, bias=False)
        >>> def train_loss(m, batch, hp):
        ...     x, t = batch
        ...     return ((m(x).squeeze(-1) - t) ** 2).mean() + (hp["decay"]["weight"] * m.weight ** 2).sum()
        >>> val_loss = lambda m, batch: ((m(batch[0]).squeeze(-1) - batch[1]) ** 2).mean()
        >>> tuner = ImplicitHPO(model, train_loss, val_loss, train, val,
        ...                     {"decay": Hyper(0.5, low=0.0, per_weight="weight")},
        ...                     inner_steps=20, hyper_lr=0.1, progress=False)
        >>> result = tuner.run(30)
        >>> result.history["val_loss"][-1] < result.history["val_loss"][0]
        True

    References:
        Lorraine, J., Vicol, P. and Duvenaud, D. `Optimizing Millions of
        Hyperparameters by Implicit Differentiation
        <https://proceedings.mlr.press/v108/lorraine20a.html>`_. AISTATS 2020.
        Pedregosa, F. `Hyperparameter optimization with approximate gradient
        <https://arxiv.org/abs/1602.02355>`_. ICML 2016.
    """

    _desc = "implicit HPO"
    _extra_keys = ("inner_residual", "linear_residual")

    def __init__(
        self,
        model: nn.Module,
        train_loss: Callable[[nn.Module, Any, dict], torch.Tensor],
        val_loss: Callable[[nn.Module, Any], torch.Tensor],
        train_loader: Iterable,
        val_loader: Iterable,
        spec: Any,
        *,
        inner_steps: int = 10,
        inner_optimizer: OptimizerSpec = "sgd",
        inner_lr: float = 0.1,
        hyper_optimizer: OptimizerSpec = "adam",
        hyper_lr: float = 0.01,
        solve: Optional[LinearSolver] = None,
        damping: float = 0.0,
        residual_tol: Optional[float] = None,
        warmup_steps: int = 0,
        progress: bool = True,
    ):
        super().__init__(model, train_loss, val_loss, train_loader, val_loader, spec,
                         hyper_optimizer=hyper_optimizer, hyper_lr=hyper_lr,
                         warmup_steps=warmup_steps, progress=progress)
        if not isinstance(inner_steps, int) or isinstance(inner_steps, bool) or inner_steps < 1:
            raise ValueError(f"`inner_steps` must be a positive int; got {inner_steps!r}.")
        if solve is not None and not isinstance(solve, LinearSolver):
            raise TypeError(f"`solve` must be a bilevel.implicit linear solver (Neumann, CG, ...); got {solve!r}.")
        if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping >= 0):
            raise ValueError(f"`damping` must be a non-negative float; got {damping!r}.")
        self.params = trainable(self.model)
        self.inner_optimizer = make_optimizer(inner_optimizer, list(self.params.values()), inner_lr, "inner_optimizer")
        self.inner_steps = inner_steps
        self.solve = Neumann(terms=10, alpha=float(inner_lr)) if solve is None else solve
        self.damping = float(damping)
        self.residual_tol = math.inf if residual_tol is None else residual_tol

    def _train_step(self, hp: Optional[dict] = None) -> float:
        batch = self._batch(self.train_stream)
        hp = self._hparams() if hp is None else hp
        with torch.enable_grad():
            loss = self.losses.train(self.params, batch, hp, step=True)
            grads = torch.autograd.grad(loss, list(self.params.values()), allow_unused=True)
        for p, g in zip(self.params.values(), grads):
            p.grad = torch.zeros_like(p) if g is None else g
        self.inner_optimizer.step()
        self.inner_optimizer.zero_grad(set_to_none=True)
        return self._checked_train_loss(loss)

    def _hyper_step(self) -> dict:
        losses, hp = [], self._hparams()  # fixed during the training steps
        for _ in range(self.inner_steps):
            losses.append(self._train_step(hp))
            self.train_steps += 1
        train_batch, val_batch = self.train_stream.next(), self.val_stream.next()
        g, info = self.hypergradient(train_batch, val_batch)
        val_batch = self.losses.batch(val_batch)
        for leaf, grad in zip(tree_leaves(self.raw), tree_leaves(g)):
            leaf.grad = grad
        self.hyper_optimizer.step()
        self.hyper_optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            val = float(self.losses.val(self._weights(), val_batch))
        norm = torch.sqrt(sum((t * t).sum() for t in tree_leaves(g)))
        return {
            "train_loss": sum(losses) / len(losses), "val_loss": val, "hypergradient_norm": float(norm),
            "inner_residual": float(info.optimality_residual),
            "linear_residual": float(info.linear_solve.relative_residual),
        }

    def hypergradient(self, train_batch: Any, val_batch: Any, solve: Optional[LinearSolver] = None):
        r"""The implicit hypergradient :math:`dL_V/d\rho` at the current weights and
        hyper-parameters on the given batches, and :func:`bilevel.hypergrad`'s
        certificate; ``solve`` overrides the tuner's linear solver (e.g. to
        compare a Neumann series with CG).  Nothing is updated.

        Returns:
            ``(g, info)``: ``g`` shaped like the raw hyper-parameters
            (``{name: tensor}`` or ``{name: {param: tensor}}``), ``info`` an
            :class:`~bilevel.implicit.ImplicitInfo`.
        """
        train_batch, val_batch = self.losses.batch(train_batch), self.losses.batch(val_batch)

        def inner(raw, w):
            return self.losses.train(w, train_batch, self.spec.constrain(raw))

        def outer(raw, w):
            return self.losses.val(w, val_batch)

        raw = {k: v.detach() if torch.is_tensor(v) else {n: t.detach() for n, t in v.items()}
               for k, v in self.raw.items()}
        return hypergrad(outer, inner, raw, self._weights(), solve=self.solve if solve is None else solve,
                         damping=self.damping, residual_tol=self.residual_tol, return_info=True)

    def _weights(self) -> dict:
        return {k: p.detach() for k, p in self.params.items()}

    def _extra_state(self) -> dict:
        return {"weights": {k: p.detach().clone() for k, p in self.params.items()},
                "inner_optimizer": self.inner_optimizer.state_dict()}

    def _load_extra(self, state: dict) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(state["weights"][k])
        self.inner_optimizer.load_state_dict(state["inner_optimizer"])


def implicit_hpo(
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
    r"""Tune hyper-parameters by implicit differentiation: :class:`ImplicitHPO` in one call.

    ``max_steps`` hyper-steps in all (each after ``inner_steps`` training
    steps); ``resume`` is a checkpoint (``result.state``) to continue from, and
    the resumed run ends where an uninterrupted one would.  ``options`` are
    :class:`ImplicitHPO`'s keyword arguments.

    Args:
        model: the network, a :class:`torch.nn.Module` (copied; the copy is trained).
        train_loss: ``train_loss(model, batch, hparams) -> scalar``; ``hparams``
            maps each name of the spec to its constrained value.
        val_loss: ``val_loss(model, batch) -> scalar``.
        train_loader, val_loader: re-iterable sources of batches, cycled.
        spec: a :class:`~bilevel.hpo.HyperSpec` (or a dict of
            :class:`~bilevel.hpo.Hyper`).
        max_steps: hyper-steps in all, those of a resumed run included (default 100).
        resume: a checkpoint (``result.state`` or ``tuner.state_dict()``) to
            continue from; ``None`` starts afresh.
        callback: ``callback(tuner, record)`` after each hyper-step; returning
            ``True`` stops the run.
        options: keyword arguments of :class:`ImplicitHPO` (``inner_steps``,
            ``inner_lr``, ``hyper_lr``, ``solve``, ``progress``, ...).

    Returns:
        An :class:`~bilevel.hpo.HPOResult`: the tuned hyper-parameters and
        model, the history and a checkpoint.

    Raises:
        ValueError / TypeError: as :class:`ImplicitHPO`, naming the argument.

    Example:
        >>> import torch
        >>> from bilevel.hpo import Hyper, implicit_hpo
        >>> X = torch.randn(30, 2, generator=torch.Generator().manual_seed(1))
        >>> data = [(X, X.sum(-1))]
        >>> loss = lambda m, b, hp=None: ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean() + (
        ...     0 if hp is None else hp["decay"] * (m.weight ** 2).sum())
        >>> result = implicit_hpo(torch.nn.Linear(2, 1), loss, loss, data, data,
        ...                       {"decay": Hyper(0.1, low=0.0)}, max_steps=20, progress=False)
        >>> float(result.hparams["decay"]) < 0.1                  # less decay fits better
        True
    """
    return tune(ImplicitHPO, (model, train_loss, val_loss, train_loader, val_loader, spec), max_steps, resume, callback,
                options)
