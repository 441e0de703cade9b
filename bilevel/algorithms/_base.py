"""What every bilevel algorithm shares: its state, the outer optimizer, the registry.

An algorithm is a frozen config dataclass with two pure-ish methods,

    state = algorithm.init(problem)                 # from problem.x0, problem.y0
    state = algorithm.step(problem, state, batch)   # one outer iteration

and :func:`bilevel.solve` owns the loop (stopping rules, history, progress,
checkpoints).  The state holds everything needed to resume: the variables, the
iteration count, algorithm-specific tensors (warm starts) and the outer
optimizer's state, all reachable from :meth:`State.state_dict`.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch

from .._tree import tree_flatten, tree_leaves, tree_map, tree_unflatten
from ..problems import BilevelProblem
from ..typing import TensorTree

OptimizerSpec = Union[str, type, Callable[[list], torch.optim.Optimizer]]

_OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
    "rprop": torch.optim.Rprop,
}


@dataclass
class StepInfo:
    """What one outer step measured (floats, for the history)."""

    outer: float = float("nan")
    hypergradient_norm: float = float("nan")
    inner_residual: float = float("nan")
    linear_residual: float = float("nan")


@dataclass
class State:
    """The state of a bilevel algorithm.

    Attributes:
        x: upper variable (a tensor tree whose leaves the outer optimizer updates
            in place).
        y: lower variable (warm start of the inner solver).
        iteration: outer steps taken.
        extras: algorithm-specific tensors (e.g. the adjoint warm start).
        optimizer: the outer ``torch.optim`` optimizer over the leaves of ``x``.
        info: what the last step measured.
    """

    x: TensorTree
    y: TensorTree
    iteration: int = 0
    extras: dict = field(default_factory=dict)
    optimizer: Optional[torch.optim.Optimizer] = None
    info: StepInfo = field(default_factory=StepInfo)

    def state_dict(self) -> dict:
        """A checkpoint: tensors and plain data only (``torch.save``-able)."""
        return {
            "x": tree_map(lambda t: t.detach().clone(), self.x),
            "y": tree_map(lambda t: t.detach().clone(), self.y),
            "iteration": self.iteration,
            "extras": copy.deepcopy(self.extras),
            "optimizer": None if self.optimizer is None else copy.deepcopy(self.optimizer.state_dict()),
        }

    def load_state_dict(self, checkpoint: dict) -> "State":
        """Restore a checkpoint in place (the optimizer keeps pointing at ``x``)."""
        missing = {"x", "y", "iteration"} - set(checkpoint)
        if missing:
            raise KeyError(f"State.load_state_dict: the checkpoint lacks {sorted(missing)}.")
        with torch.no_grad():
            for mine, saved in zip(tree_leaves(self.x), tree_leaves(checkpoint["x"])):
                if mine.shape != saved.shape:
                    raise ValueError(
                        f"State.load_state_dict: checkpoint x has shape {tuple(saved.shape)}, "
                        f"the state {tuple(mine.shape)}."
                    )
                mine.copy_(saved)
        self.y = tree_map(lambda t: t.detach().clone(), checkpoint["y"])
        self.iteration = int(checkpoint["iteration"])
        self.extras = copy.deepcopy(checkpoint.get("extras", {}))
        if self.optimizer is not None and checkpoint.get("optimizer") is not None:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        return self


def make_optimizer(spec: OptimizerSpec, params: list, lr: float) -> torch.optim.Optimizer:
    """A ``torch.optim`` optimizer over ``params`` from a name, a class, a factory
    ``params -> optimizer``, or an instance (its class and settings are reused)."""
    if isinstance(spec, str):
        key = spec.lower()
        if key not in _OPTIMIZERS:
            raise ValueError(
                f"unknown outer_optimizer {spec!r}; known names: {', '.join(sorted(_OPTIMIZERS))} "
                "(or pass a torch.optim class or a factory params -> optimizer)."
            )
        return _OPTIMIZERS[key](params, lr=lr)
    if isinstance(spec, type) and issubclass(spec, torch.optim.Optimizer):
        return spec(params, lr=lr)
    if isinstance(spec, torch.optim.Optimizer):
        # The library owns the upper variable's tensors: the same optimizer with the
        # same settings over them (its own parameters and state are not used).
        return type(spec)(params, **spec.defaults)
    if callable(spec):
        optimizer = spec(params)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"outer_optimizer factory returned {type(optimizer).__name__}, not an optimizer.")
        return optimizer
    raise TypeError(f"outer_optimizer must be a name, a torch.optim class or a factory; got {spec!r}.")


def fresh_leaves(tree: TensorTree) -> TensorTree:
    """Detached copies of a tree's tensors (the algorithm's own, updated in place)."""
    leaves, spec = tree_flatten(tree)
    return tree_unflatten([t.detach().clone() for t in leaves], spec)


def bind_batch(problem: BilevelProblem, batch: Any) -> tuple[Callable, Callable]:
    """``outer(x, y)`` and ``inner(x, y)`` with the mini-batch bound (if any)."""
    if batch is None:
        return problem.outer, problem.inner
    return (lambda x, y: problem.outer(x, y, batch)), (lambda x, y: problem.inner(x, y, batch))


@dataclass(frozen=True)
class Algorithm:
    """Base class: a gradient-based outer loop around a hypergradient estimate.

    Subclasses implement :meth:`hypergradient`; :meth:`step` applies the outer
    optimizer to it.  Single-loop methods override :meth:`step` entirely.

    Attributes:
        outer_optimizer: name (``"adam"``, ``"sgd"``, ...), ``torch.optim`` class,
            or factory ``params -> optimizer`` for the upper variable.
        lr: learning rate of the outer optimizer.
    """

    outer_optimizer: OptimizerSpec = "adam"
    lr: float = 1e-2

    def init(self, problem: BilevelProblem, x0: TensorTree = None, y0: TensorTree = None) -> State:
        x = fresh_leaves(problem.x0 if x0 is None else x0)
        y = fresh_leaves(problem.y0 if y0 is None else y0)
        optimizer = make_optimizer(self.outer_optimizer, tree_leaves(x), self.lr)
        return State(x=x, y=y, optimizer=optimizer)

    def step(self, problem: BilevelProblem, state: State, batch: Any = None) -> State:
        outer, inner = bind_batch(problem, batch)
        y, g, info = self.hypergradient(outer, inner, state, batch)
        for leaf, grad in zip(tree_leaves(state.x), tree_leaves(g)):
            leaf.grad = grad.detach()
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.y = y
        state.iteration += 1
        state.info = info
        return state

    def hypergradient(self, outer, inner, state: State, batch: Any) -> tuple[TensorTree, TensorTree, StepInfo]:
        """Returns ``(y, dF/dx, info)`` at ``state.x``."""
        raise NotImplementedError

    def replace(self, **changes) -> "Algorithm":
        return dataclasses.replace(self, **changes)


def tree_norm_float(tree: TensorTree) -> float:
    leaves = tree_leaves(tree)
    return float(torch.sqrt(sum((t.detach() ** 2).sum() for t in leaves)))


__all__ = [
    "Algorithm",
    "State",
    "StepInfo",
    "make_optimizer",
    "bind_batch",
    "fresh_leaves",
    "tree_norm_float",
]
