"""What both tuners share: data streams, the run loop, history, progress, checkpoints.

A tuner subclasses :class:`Tuner` and implements one training step
(:meth:`Tuner._train_step`, also used for the warm-up) and one hyper-step
(:meth:`Tuner._hyper_step`, which returns the step's record).  :meth:`Tuner.run`
owns the loop: stopping at ``max_steps`` hyper-steps, progress bar, history,
finiteness check, callback, and warnings issued once at the end.
:meth:`Tuner.state_dict` captures everything that decides the rest of the run
— weights, raw hyper-parameters, optimizer states, the position in each data
loader and the random number generators — so a resumed run ends where the
uninterrupted one ends.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .._interrupt import StopRequest
from .._tree import tree_leaves, tree_map
from ..solvers import known_optimizers
from ..status import BilevelWarning
from ._functional import Losses
from .spec import HyperValues, as_spec

OptimizerSpec = Union[str, type, Callable[[list], torch.optim.Optimizer]]


@dataclass
class HPOResult:
    """What a tuner's :meth:`~Tuner.run` returns.

    Attributes:
        hparams: the tuned hyper-parameters, constrained values
            (``{name: tensor}`` or ``{name: {param: tensor}}``).
        model: the tuned model (a copy; the model passed in is not modified).
        history: per hyper-step lists (``step``, ``train_loss``, ``val_loss``,
            ``hypergradient_norm``, ``train_steps``, ``time`` and the tuner's
            own keys) and ``history["hparams"]``: one list per hyper-parameter
            leaf (its value, or its mean for a tensor).
        state: a checkpoint, ``tuner.state_dict()`` at the end.
        train_steps: training (weight) steps taken in all, warm-up included.
        message: why the run stopped.

    Example:
        Tuning one weight decay of a linear model for three hyper-steps:

        >>> import torch
        >>> from bilevel.hpo import Hyper, implicit_hpo
        >>> g = torch.Generator().manual_seed(1)
        >>> inputs = torch.randn(30, 2, generator=g)
        >>> batches = [(inputs, inputs @ torch.tensor([1.0, -2.0]))]
        >>> def fit(model, batch, hp=None):
        ...     mse = ((model(batch[0]).squeeze(-1) - batch[1]) ** 2).mean()
        ...     return mse if hp is None else mse + hp["decay"] * model.weight.square().sum()
        >>> out = implicit_hpo(torch.nn.Linear(2, 1), fit, fit, batches, batches,
        ...                    {"decay": Hyper(0.1, low=0.0)}, max_steps=3, progress=False)
        >>> out.message, out.train_steps               # 3 hyper-steps of 10 training steps
        ('reached max_steps=3', 30)
        >>> sorted(out.hparams), len(out.history["val_loss"]), out.state["iteration"]
        (['decay'], 3, 3)
    """

    hparams: dict
    model: nn.Module
    history: dict
    state: dict
    train_steps: int
    message: str = ""


def make_optimizer(spec: OptimizerSpec, params: list, lr: float, name: str) -> torch.optim.Optimizer:
    """A :mod:`torch.optim` optimizer from a name, a class or a factory ``params -> optimizer``."""
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"`{name}` learning rate must be a positive float; got {lr!r}.")
    if isinstance(spec, str):
        known = known_optimizers()
        if spec.lower() not in known:
            raise ValueError(f"unknown `{name}` {spec!r}; known names: {', '.join(sorted(known))}.")
        return known[spec.lower()](params, lr=lr)
    if isinstance(spec, type) and issubclass(spec, torch.optim.Optimizer):
        return spec(params, lr=lr)
    if callable(spec):
        optimizer = spec(params)
        if isinstance(optimizer, torch.optim.Optimizer):
            return optimizer
    raise TypeError(f"`{name}` must be a torch.optim name, class or factory params -> optimizer; got {spec!r}.")


def _rng_snapshot(loader: Any) -> dict:
    """The random states an ``iter(loader)`` may draw from."""
    snap = {"cpu": torch.get_rng_state()}
    for key in ("generator", "sampler"):
        owner = loader if key == "generator" else getattr(loader, "sampler", None)
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator):
            snap[key] = generator.get_state()
    return snap


def _rng_restore(loader: Any, snap: dict) -> None:
    torch.set_rng_state(snap["cpu"])
    for key in ("generator", "sampler"):
        owner = loader if key == "generator" else getattr(loader, "sampler", None)
        if key in snap:
            owner.generator.set_state(snap[key])


class Stream:
    """Cycles a re-iterable data loader, one batch at a time, and can resume.

    The checkpoint is the random state at the start of the current pass (a
    shuffling ``DataLoader`` draws its order from it) and the number of
    batches served in that pass; resuming replays the pass's start and skips
    those batches.
    """

    def __init__(self, loader: Iterable, name: str):
        if not hasattr(loader, "__iter__") or iter(loader) is loader:
            raise TypeError(
                f"`{name}` must be a re-iterable of batches (a DataLoader, a list); got "
                f"{type(loader).__name__}, which {'is a one-shot iterator' if hasattr(loader, '__iter__') else 'is not iterable'}."
            )
        size = len(loader) if hasattr(loader, "__len__") else None
        if size == 0 or (size is None and next(iter(loader), _EMPTY) is _EMPTY):
            raise ValueError(f"`{name}` is empty: it yields no batch. Give it at least one batch of data.")
        self.loader, self.name = loader, name
        self._iterator: Optional[Any] = None
        self._snapshot: Optional[dict] = None
        self.consumed = 0

    def next(self) -> Any:
        if self._iterator is None:
            self._start()
        batch = next(self._iterator, _EMPTY)
        if batch is _EMPTY:
            self._start()
            batch = next(self._iterator, _EMPTY)
            if batch is _EMPTY:
                raise ValueError(f"`{self.name}` yielded no batch on a new pass over it.")
        self.consumed += 1
        return batch

    def _start(self) -> None:
        self._snapshot = _rng_snapshot(self.loader)
        self._iterator = iter(self.loader)
        self.consumed = 0

    def state_dict(self) -> dict:
        return {"snapshot": copy.deepcopy(self._snapshot), "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self._iterator, self.consumed = None, 0
        if state["snapshot"] is None:
            return
        _rng_restore(self.loader, state["snapshot"])
        self._snapshot = copy.deepcopy(state["snapshot"])
        self._iterator = iter(self.loader)
        for _ in range(state["consumed"]):
            next(self._iterator)
        self.consumed = state["consumed"]


_EMPTY = object()
_COMMON_KEYS = ("step", "train_loss", "val_loss", "hypergradient_norm", "train_steps", "time")


def _dataset_len(loader: Any) -> Optional[int]:
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


class Tuner:
    """Base class of :class:`~bilevel.hpo.ImplicitHPO` and
    :class:`~bilevel.hpo.HypernetworkHPO`: the hyper-step loop, progress,
    history and checkpoints they share.

    A subclass provides one training step, one hyper-step and the current
    weights; :meth:`run` does the warm-up, the loop, the history and the
    warnings, and :meth:`state_dict` / :meth:`load_state_dict` checkpoint it.
    The subclasses document their own arguments in full.

    Args:
        model: the network (copied; the copy is trained).
        train_loss: ``train_loss(model, batch, hparams) -> scalar``.
        val_loss: ``val_loss(model, batch) -> scalar``.
        train_loader, val_loader: re-iterable sources of batches, cycled.
        spec: a :class:`~bilevel.hpo.HyperSpec` (or a dict of
            :class:`~bilevel.hpo.Hyper`).
        hyper_optimizer, hyper_lr: the hyper-parameters' optimizer (name,
            ``torch.optim`` class or factory) and learning rate.
        warmup_steps: training steps before the first hyper-step.
        progress: show a tqdm bar in :meth:`run`.

    Example:
        A run interrupted after 2 hyper-steps and resumed from its checkpoint
        ends where an uninterrupted run of 4 does:

        >>> import torch
        >>> from bilevel.hpo import Hyper, ImplicitHPO, Tuner
        >>> X = torch.randn(30, 2, generator=torch.Generator().manual_seed(1))
        >>> data = [(X, X.sum(-1))]
        >>> loss = lambda m, b, hp=None: ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean() + (
        ...     0 if hp is None else hp["decay"] * (m.weight ** 2).sum())
        >>> def make():
        ...     torch.manual_seed(0)
        ...     return ImplicitHPO(torch.nn.Linear(2, 1), loss, loss, data, data,
        ...                        {"decay": Hyper(0.1, low=0.0)}, progress=False)
        >>> whole = make(); _ = whole.run(4)
        >>> first = make(); _ = first.run(2)
        >>> second = make().load_state_dict(first.state_dict())
        >>> result = second.run(4)
        >>> isinstance(second, Tuner), result.history["step"]
        (True, [1, 2, 3, 4])
        >>> torch.equal(result.hparams["decay"], whole.hparams["decay"])
        True
    """

    _desc = "hpo"
    _extra_keys: tuple = ()

    def __init__(self, model, train_loss, val_loss, train_loader, val_loader, spec, *,
                 hyper_optimizer: OptimizerSpec, hyper_lr: float, warmup_steps: int, progress: bool):
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module; got {type(model).__name__}.")
        if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be a non-negative int; got {warmup_steps!r}.")
        self.model = copy.deepcopy(model)
        self.spec = as_spec(spec).resolve(self.model, _dataset_len(train_loader))
        self.losses = Losses(self.model, train_loss, val_loss)
        self.train_stream = Stream(train_loader, "train_loader")
        self.val_stream = Stream(val_loader, "val_loader")
        self.raw = {k: _leaf_tree(v) for k, v in self.spec.init_raw().items()}
        self.hyper_optimizer = make_optimizer(hyper_optimizer, self._hyper_leaves(), hyper_lr, "hyper_optimizer")
        self.warmup_steps, self.progress = warmup_steps, progress
        self.iteration, self.train_steps, self.warmup_done = 0, 0, 0
        self.history: dict = {key: [] for key in _COMMON_KEYS + self._extra_keys}
        self.history["hparams"] = {key: [] for key in self.spec.summary(self.hparams)}

    # -- what subclasses provide ---------------------------------------------------------
    def _train_step(self) -> float:
        """One training (weight) step; returns its training loss."""
        raise NotImplementedError

    def _hyper_step(self) -> dict:
        """One hyper-step (with its training steps); returns the record's floats."""
        raise NotImplementedError

    def _weights(self) -> dict:
        """The weights of the tuned model now."""
        raise NotImplementedError

    def _extra_state(self) -> dict:
        return {}

    def _load_extra(self, state: dict) -> None:
        pass

    def _hyper_leaves(self) -> list:
        return tree_leaves(self.raw)

    # -- public --------------------------------------------------------------------------
    @property
    def hparams(self) -> dict:
        """The current hyper-parameters (constrained values): detached copies, which
        later steps leave alone."""
        return {name: tree_map(lambda t: t.detach().clone(), value) for name, value in self._hparams().items()}

    def _hparams(self) -> HyperValues:
        with torch.no_grad():
            return self.spec.constrain(self.raw)

    def run(self, max_steps: int, *, callback: Optional[Callable[["Tuner", dict], Optional[bool]]] = None,
            progress: Optional[bool] = None) -> HPOResult:
        """Run until ``max_steps`` hyper-steps have been taken in all (a resumed
        tuner continues from its count), after the warm-up training steps.

        Args:
            max_steps: total number of hyper-steps.
            callback: ``callback(tuner, record)`` after each hyper-step;
                returning ``True`` stops the run.  So does Ctrl-C (SIGINT, in the
                main thread): the run returns after the step in progress, and the
                result's ``state`` resumes it; a second Ctrl-C interrupts at once.
            progress: show a tqdm bar (default: the tuner's ``progress``).

        Returns:
            An :class:`HPOResult`.

        Raises:
            FloatingPointError: the losses or hyper-parameters became non-finite.
        """
        if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 0:
            raise ValueError(f"`max_steps` must be a non-negative int; got {max_steps!r}.")
        show = self.progress if progress is None else progress
        caught: dict = {}
        message = f"reached max_steps={max_steps}"
        bar = tqdm(total=max_steps, initial=min(self.iteration, max_steps), disable=not show, desc=self._desc)
        with StopRequest(self._desc) as stop:
            try:
                while self.warmup_done < self.warmup_steps and not stop.requested:
                    self._guarded(self._train_step, caught)
                    self.warmup_done += 1
                    self.train_steps += 1
                while self.iteration < max_steps and not stop.requested:
                    tick = time.perf_counter()
                    record = self._guarded(self._hyper_step, caught)
                    self.iteration += 1
                    record = self._record(record, time.perf_counter() - tick)
                    bar.update(1)
                    bar.set_postfix(val=f"{record['val_loss']:.4g}", train=f"{record['train_loss']:.4g}")
                    if callback is not None and callback(self, record):
                        message = "stopped by the callback"
                        break
            finally:
                bar.close()
        if stop.requested and message.startswith("reached") and self.iteration < max_steps:
            message = (f"stopped by Ctrl-C after hyper-step {self.iteration} of {max_steps} ({self.train_steps} "
                       "training steps); the result's `state` resumes the run")
            warnings.warn(f"{self._desc}: {message}.", BilevelWarning, stacklevel=2)
        for category, (count, first_step, text) in caught.items():
            warnings.warn(f"{self._desc}: {category.__name__} at {count} hyper-step(s) (first at step "
                          f"{first_step}): {text}", category, stacklevel=2)
        return HPOResult(self.hparams, self.tuned_model(), copy.deepcopy(self.history), self.state_dict(),
                         self.train_steps, message)

    def tuned_model(self) -> nn.Module:
        """A copy of the model with the tuned weights."""
        from ._functional import model_with

        return model_with(self.model, self._weights())

    def state_dict(self) -> dict:
        """A checkpoint (tensors and plain data, ``torch.save``-able)."""
        return copy.deepcopy({
            "iteration": self.iteration, "train_steps": self.train_steps, "warmup_done": self.warmup_done,
            "raw": {k: _detached(v) for k, v in self.raw.items()},
            "hyper_optimizer": self.hyper_optimizer.state_dict(),
            "streams": {"train": self.train_stream.state_dict(), "val": self.val_stream.state_dict()},
            "history": self.history, "rng": torch.get_rng_state(), "extra": self._extra_state(),
            # noise drawn on a GPU (dropout of a CUDA model) comes from the CUDA generators
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        })

    def load_state_dict(self, state: dict) -> "Tuner":
        """Restore a checkpoint of a tuner built with the same arguments; also
        restores the global torch random states, the CPU's and (where the run
        used CUDA) the GPUs' (the data order and any noise drawn in the losses
        depend on them)."""
        missing = {"iteration", "raw", "hyper_optimizer", "streams", "rng", "extra"} - set(state)
        if missing:
            raise KeyError(f"{type(self).__name__}.load_state_dict: the checkpoint lacks {sorted(missing)}.")
        mine, saved = tree_leaves(self.raw), tree_leaves(state["raw"])
        if len(mine) != len(saved) or any(a.shape != b.shape for a, b in zip(mine, saved)):
            raise ValueError(f"{type(self).__name__}.load_state_dict: the checkpoint's hyper-parameters do not "
                             "match this tuner's spec (different names or shapes).")
        with torch.no_grad():
            for a, b in zip(mine, saved):
                a.copy_(b)
        self.hyper_optimizer.load_state_dict(copy.deepcopy(state["hyper_optimizer"]))
        self.iteration, self.train_steps = int(state["iteration"]), int(state["train_steps"])
        self.warmup_done = int(state["warmup_done"])
        self.history = copy.deepcopy(state["history"])
        self._load_extra(state["extra"])
        self.train_stream.load_state_dict(state["streams"]["train"])
        self.val_stream.load_state_dict(state["streams"]["val"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return self

    # -- helpers ------------------------------------------------------------------------
    def _record(self, record: dict, seconds: float) -> dict:
        record = {"step": self.iteration, "train_steps": self.train_steps, "time": seconds, **record}
        summary = self.spec.summary(self.hparams)
        finite = all(math.isfinite(v) for v in summary.values()) and math.isfinite(record["val_loss"])
        if not finite:
            raise FloatingPointError(
                f"{self._desc}: hyper-step {self.iteration}: the validation loss or the hyper-parameters became "
                f"non-finite (val_loss={record['val_loss']}, hparams={summary}); lower `hyper_lr` or the "
                "training learning rate, or check the losses for NaN."
            )
        for key in self.history:
            if key != "hparams":
                self.history[key].append(record.get(key, float("nan")))
        for key, value in summary.items():
            self.history["hparams"][key].append(value)
        return record

    def _checked_train_loss(self, loss: torch.Tensor) -> float:
        """The training loss as a float; a non-finite one stops the run with the step named."""
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(
                f"{self._desc}: hyper-step {self.iteration + 1} (training step {self.train_steps + 1}): the training "
                f"loss is {value}; lower the training learning rate or check the loss for NaN."
            )
        return value

    def _guarded(self, fn: Callable, caught: dict) -> Any:
        """``fn()`` with the library's warnings collected into ``caught``."""
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always", BilevelWarning)
            out = fn()
        _sort(records, caught, self.iteration + 1)
        return out

    def _batch(self, stream: Stream) -> Any:
        return self.losses.batch(stream.next())


def tune(cls: type, args: tuple, max_steps: int, resume: Optional[dict], callback: Optional[Callable],
         options: dict) -> HPOResult:
    """Build ``cls(*args, **options)``, restore ``resume`` if given, run to ``max_steps``."""
    tuner = cls(*args, **options)
    if resume is not None:
        tuner.load_state_dict(resume)
    return tuner.run(max_steps, callback=callback)


def _leaf_tree(value):
    if isinstance(value, dict):
        return {k: v.detach().clone().requires_grad_() for k, v in value.items()}
    return value.detach().clone().requires_grad_()


def _detached(value):
    if isinstance(value, dict):
        return {k: v.detach().clone() for k, v in value.items()}
    return value.detach().clone()


def _sort(records: list, caught: dict, step: int) -> None:
    """Move the warnings recorded so far into ``caught`` (ours, one entry per
    category) or re-issue them (others')."""
    for w in records:
        if issubclass(w.category, BilevelWarning):
            count, first_step, text = caught.get(w.category, (0, step, str(w.message)))
            caught[w.category] = (count + 1, first_step, text)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
