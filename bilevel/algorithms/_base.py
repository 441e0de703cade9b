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
import functools
import math
import numbers
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Sequence, Union

import torch

from .._tree import check_same_structure, tree_flatten, tree_leaves, tree_map, tree_unflatten
from ..problems import BilevelProblem
from ..problems.base import level_batch
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


def host_floats(values: Sequence[Any]) -> list:
    """Python floats of numbers and one-element tensors, with one host read per
    device (instead of one ``float(t)`` per tensor): the values are stacked on
    their device, in float64 (float32 on MPS), and read together."""
    out: list = [None] * len(values)
    groups: dict = {}
    for i, value in enumerate(values):
        if torch.is_tensor(value):
            groups.setdefault(value.device, []).append(i)
        else:
            out[i] = float(value)
    for device, where in groups.items():
        dtype = torch.float32 if device.type == "mps" else torch.float64
        stacked = torch.stack([values[i].detach().reshape(()).to(dtype) for i in where])
        for i, number in zip(where, stacked.tolist()):
            out[i] = number
    return out


_NAN = float("nan")
_STEP_FIELDS = ("outer", "hypergradient_norm", "inner_residual", "linear_residual")


class StepInfo:
    """What one outer step measured, for the history.

    The values may be Python numbers or one-element tensors: a step that keeps
    them on its device reports without a host synchronization, and the first
    read of an attribute converts all four to Python floats at once (one read,
    cached).  :func:`bilevel.solve` converts the records of several steps
    together.

    Attributes:
        outer: :math:`F` at the new iterate.
        hypergradient_norm: norm of the hypergradient (or of its estimate).
        inner_residual: the lower level's optimality residual.
        linear_residual: relative residual of the linear solve (if any).
        rolled_back_at: set by a step that went back to a saved state: the
            step at which the iterates blew up (the records from there on
            are void); ``None`` otherwise.

    Example:
        >>> import torch
        >>> from bilevel.algorithms import StepInfo
        >>> info = StepInfo(outer=torch.tensor(0.5), hypergradient_norm=torch.tensor(2.0))
        >>> info.outer, info.hypergradient_norm      # read when asked, all four at once
        (0.5, 2.0)
    """

    __slots__ = ("_values", "_floats", "rolled_back_at")

    def __init__(self, outer: Any = _NAN, hypergradient_norm: Any = _NAN, inner_residual: Any = _NAN,
                 linear_residual: Any = _NAN, rolled_back_at: Optional[int] = None):
        self._values = (outer, hypergradient_norm, inner_residual, linear_residual)
        self._floats: Optional[tuple] = None
        self.rolled_back_at = rolled_back_at

    def values(self) -> tuple:
        """The four values as given (numbers or tensors), without a host read."""
        return self._values if self._floats is None else self._floats

    def floats(self) -> tuple:
        """The four values as Python floats (one host read the first time)."""
        if self._floats is None:
            self.set_floats(host_floats(self._values))
        return self._floats

    def set_floats(self, numbers: Sequence[float]) -> None:
        """Cache the values read by the caller (``numbers`` in the order of :meth:`values`)."""
        self._floats = tuple(numbers)
        self._values = self._floats

    outer = property(lambda self: self.floats()[0])
    hypergradient_norm = property(lambda self: self.floats()[1])
    inner_residual = property(lambda self: self.floats()[2])
    linear_residual = property(lambda self: self.floats()[3])

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in zip(_STEP_FIELDS, self.floats()))
        return f"StepInfo({fields})"

    def __eq__(self, other) -> bool:
        if not isinstance(other, StepInfo):
            return NotImplemented
        return self.floats() == other.floats() and self.rolled_back_at == other.rolled_back_at


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

    Example:
        >>> import bilevel
        >>> p = bilevel.problems.quadratic()
        >>> algorithm = bilevel.algorithms.Implicit(outer_optimizer="sgd", lr=0.5)
        >>> state = algorithm.init(p)                  # copies of x0, y0 and a fresh optimizer
        >>> for _ in range(3):
        ...     state = algorithm.step(p, state)
        >>> checkpoint = state.state_dict()            # tensors and plain data: torch.save-able
        >>> sorted(checkpoint)
        ['extras', 'iteration', 'optimizer', 'x', 'y']
        >>> x3 = state.x.clone()
        >>> state = algorithm.step(p, state)
        >>> state.iteration
        4
        >>> state = state.load_state_dict(checkpoint)  # back to step 3, in place
        >>> state.iteration, bool((state.x == x3).all())
        (3, True)
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
        check_same_structure(checkpoint["x"], self.x, "the checkpoint's x", "the state's x")
        check_same_structure(checkpoint["y"], self.y, "the checkpoint's y", "the state's y")
        with torch.no_grad():
            for mine, saved in zip(tree_leaves(self.x), tree_leaves(checkpoint["x"])):
                mine.copy_(saved)
        self.y = tree_map(lambda t: t.detach().clone(), checkpoint["y"])
        self.__dict__.pop("_deferred", None)  # checks a step deferred belong to the iterates replaced here
        self.iteration = int(checkpoint["iteration"])
        self.extras = copy.deepcopy(checkpoint.get("extras", {}))
        if self.optimizer is not None and checkpoint.get("optimizer") is not None:
            # a copy: torch's load_state_dict keeps the checkpoint's tensors (Adam's moments),
            # which the next steps would update in place, changing the caller's checkpoint
            self.optimizer.load_state_dict(copy.deepcopy(checkpoint["optimizer"]))
        return self


def make_optimizer(spec: OptimizerSpec, params: list, lr: float) -> torch.optim.Optimizer:
    """A ``torch.optim`` optimizer over ``params`` from a name, a class, a factory
    ``params -> optimizer``, or an instance (its class and settings are reused).

    This is how the algorithms turn their ``outer_optimizer`` setting into the
    optimizer of the upper variable.

    Args:
        spec: one of the names ``"adam"``, ``"adamw"``, ``"sgd"``, ``"rmsprop"``,
            ``"adagrad"``, ``"rprop"`` (any case); a ``torch.optim.Optimizer``
            subclass; a callable ``params -> optimizer``; or an optimizer
            instance, whose class and ``defaults`` (its own learning rate
            included) are applied to ``params``; its parameters and state are
            not used.
        params: the tensors to optimize (a list of leaves).
        lr: the learning rate for a name or a class; a factory or an instance
            brings its own.

    Returns:
        A new ``torch.optim.Optimizer`` over ``params``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
        TypeError: a ``spec`` of another kind, or a factory that does not
            return an optimizer.

    Example:
        >>> import torch
        >>> from bilevel.algorithms import make_optimizer
        >>> x = [torch.zeros(3)]
        >>> opt = make_optimizer("sgd", x, lr=0.1)
        >>> type(opt).__name__, opt.defaults["lr"], opt.param_groups[0]["params"][0] is x[0]
        ('SGD', 0.1, True)
        >>> template = torch.optim.Adam([torch.zeros(1)], lr=1e-3, betas=(0.8, 0.99))
        >>> opt = make_optimizer(template, x, lr=0.1)   # the template's settings, over x
        >>> type(opt).__name__, opt.defaults["betas"], opt.defaults["lr"]
        ('Adam', (0.8, 0.99), 0.001)
    """
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
    """``outer(x, y)`` and ``inner(x, y)`` with the mini-batch bound (if any); a
    :class:`~bilevel.problems.LevelBatches` gives each level its own."""
    if batch is None:
        return problem.outer, problem.inner
    outer_batch, inner_batch = level_batch(batch, "outer"), level_batch(batch, "inner")
    return (lambda x, y: problem.outer(x, y, outer_batch)), (lambda x, y: problem.inner(x, y, inner_batch))


_Y_SET = "_y_set"
"""Attribute of a :class:`State` during a step of a method that takes ``y_set``
(not part of its checkpoint): the projection of a list of ``y``'s leaves."""


def y_projection(state: State) -> Optional[Callable[[TensorTree], TensorTree]]:
    """During a step of a method with ``handles_y_set``: the projection of a tree
    shaped like ``y`` onto ``y_set`` (``None`` where ``y`` is free)."""
    project = state.__dict__.get(_Y_SET)
    if project is None:
        return None
    spec = tree_flatten(state.y)[1]
    return lambda tree: tree_unflatten(project(tree_leaves(tree)), spec)


def set_projection(spec: Any, tree_example: Any, name: str) -> Optional[Callable[[list], list]]:
    """A projection on a list of leaves from ``x_set`` / ``y_set``: ``None``, a set
    (or callable ``z -> P(z)``) applied to every leaf, or a tree of sets / ``None``
    with the variable's structure."""
    if spec is None:
        return None
    leaves, treedef = tree_flatten(tree_example)
    if callable(spec):
        return lambda ls: [spec(t) for t in ls]
    sets, set_def = tree_flatten(spec, is_leaf=lambda s: s is None or callable(s))
    if set_def != treedef or not all(s is None or callable(s) for s in sets):
        raise TypeError(
            f"`{name}` must be a set object (e.g. bilevel.implicit.projections.Box(0, 1)), a callable "
            f"projection, or a tree of them (None for free leaves) with the structure of the variable "
            f"({treedef}); got {spec!r}."
        )
    return lambda ls: [t if s is None else s(t) for s, t in zip(sets, ls)]


@dataclass(frozen=True)
class Algorithm:
    """Base class: a gradient-based outer loop around a hypergradient estimate.

    Subclasses implement :meth:`hypergradient`; :meth:`step` applies the outer
    optimizer to it.  Single-loop methods override :meth:`step` entirely.

    Attributes:
        outer_optimizer: name (``"adam"``, ``"sgd"``, ...), ``torch.optim`` class,
            or factory ``params -> optimizer`` for the upper variable
            (:func:`make_optimizer`).
        lr: learning rate of the outer optimizer.
        x_set: a simple convex set for ``x`` (e.g.
            :class:`~bilevel.implicit.projections.Box`), a callable projection,
            or a tree of them; ``x`` is projected onto it after each outer step
            (projected hypergradient descent).  ``None``: the problem's
            ``x_set``.  A problem's ``y_set`` (a constrained lower level) is
            refused by methods that differentiate the unconstrained inner
            stationarity; :class:`~bilevel.algorithms.Implicit` takes it (the
            projected-gradient fixed point), and the single-loop methods project ``y``.

    Example:
        A new method only supplies :meth:`hypergradient`, which returns the
        lower variable, the hypergradient at ``state.x`` and a
        :class:`StepInfo`.  Here the closed-form hypergradient of problem Q:

        >>> import dataclasses, torch, bilevel
        >>> from bilevel.algorithms import Algorithm, StepInfo
        >>> p = bilevel.problems.quadratic()
        >>> @dataclasses.dataclass(frozen=True)
        ... class Exact(Algorithm):
        ...     def hypergradient(self, outer, inner, state, batch):
        ...         y, g = p.inner_solution(state.x), p.hypergradient(state.x)
        ...         info = StepInfo(outer=float(outer(state.x, y)), hypergradient_norm=float(g.norm()))
        ...         return y, g, info
        >>> method = Exact(outer_optimizer="sgd", lr=0.5)
        >>> r = bilevel.solve(p, method=method, max_steps=100, progress=False)
        >>> torch.allclose(r.x, p.solution.x, rtol=0, atol=1e-10)
        True
        >>> method.replace(lr=0.1)                     # configs are frozen: changed copies
        Exact(outer_optimizer='sgd', lr=0.1, x_set=None)
    """

    outer_optimizer: OptimizerSpec = "adam"
    lr: float = 1e-2
    x_set: Any = None

    field_rules: ClassVar[dict] = {}
    """Ranges of fields beyond their annotated types: ``name -> (predicate, "what is expected")``."""

    optional_extras: ClassVar[tuple] = ()
    """Keys of ``state.extras`` a checkpoint may lack (kept since a later version, and
    rebuilt when missing): resuming refuses a checkpoint without the others."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is not None and not getattr(own, "_checks_fields", False):
            cls.__post_init__ = _checking_fields(own)

    def __post_init__(self):
        check_field_values(self)

    def init(self, problem: BilevelProblem, x0: TensorTree = None, y0: TensorTree = None) -> State:
        if problem.y_set is not None and not getattr(self, "handles_y_set", False):
            raise ValueError(
                f"{type(self).__name__}: the problem constrains y (`y_set`), which this method cannot "
                "respect: it differentiates the unconstrained inner stationarity. Use a single-loop "
                "method (method='penalty', 'meha', 'bamm', 'bda' or 'lvhba'), the 'implicit' method, or "
                "write the constraint into the inner problem's optimality condition "
                "(bilevel.implicit.projected_gradient)."
            )
        x = fresh_leaves(problem.x0 if x0 is None else x0)
        y = fresh_leaves(problem.y0 if y0 is None else y0)
        self._project_x(problem, x)
        optimizer = make_optimizer(self.outer_optimizer, tree_leaves(x), self.lr)
        return State(x=x, y=y, optimizer=optimizer)

    def _project_x(self, problem: BilevelProblem, x: TensorTree) -> None:
        """``x`` onto ``x_set`` (or the problem's), in place."""
        project = set_projection(self.x_set if self.x_set is not None else problem.x_set, x, "x_set")
        if project is not None:
            leaves = tree_leaves(x)
            with torch.no_grad():
                for leaf, new in zip(leaves, project(leaves)):
                    leaf.copy_(new)

    def step(self, problem: BilevelProblem, state: State, batch: Any = None) -> State:
        outer, inner = bind_batch(problem, batch)
        if getattr(self, "handles_y_set", False):  # the projection onto y_set, for this step
            spec = self.y_set if getattr(self, "y_set", None) is not None else problem.y_set
            state.__dict__[_Y_SET] = set_projection(spec, state.y, "y_set")
        try:
            y, g, info = self.hypergradient(outer, inner, state, batch)
        finally:
            state.__dict__.pop(_Y_SET, None)
        for leaf, grad in zip(tree_leaves(state.x), tree_leaves(g)):
            leaf.grad = grad.detach()
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        self._project_x(problem, state.x)
        state.y = y
        state.iteration += 1
        state.info = info
        return state

    def hypergradient(self, outer, inner, state: State, batch: Any) -> tuple[TensorTree, TensorTree, StepInfo]:
        """Returns ``(y, dF/dx, info)`` at ``state.x``."""
        raise NotImplementedError

    def settle(self, problem: BilevelProblem, state: State, batch: Any = None) -> State:
        """Finish the checks that steps deferred to avoid host synchronizations
        (on accelerators; nothing to do on the CPU, nor for most algorithms).
        :func:`bilevel.solve` calls it before it reads the step records.  A
        check that fails acts as it would have in its step: it raises, or goes
        back to a saved state (then ``state.info.rolled_back_at`` is set)."""
        return state

    def replace(self, **changes) -> "Algorithm":
        return dataclasses.replace(self, **changes)


def _checking_fields(post_init: Callable) -> Callable:
    """A subclass's ``__post_init__`` preceded by :func:`check_field_values`."""

    @functools.wraps(post_init)
    def wrapper(self):
        check_field_values(self)
        post_init(self)

    wrapper._checks_fields = True
    return wrapper


class FieldError(ValueError, TypeError):
    """A configuration field of the wrong type or out of range: both a ``ValueError``
    and a ``TypeError``, as callers catching either expect (like NumPy's ``AxisError``)."""


def check_field_values(config: Any) -> None:
    """Refuse, naming it, a field whose value does not fit its annotation (``bool``,
    ``int``, ``float``, optionally ``None``; a float must be finite) or its
    ``field_rules`` entry: a string, a ``bool`` for a number or a NaN step size would
    otherwise fail much later, or not at all."""
    name = type(config).__name__
    try:
        hints = typing.get_type_hints(type(config))
    except Exception:  # an annotation that cannot be resolved here: no type checks
        hints = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        kind = hints.get(f.name)
        optional = typing.get_origin(kind) is Union and type(None) in typing.get_args(kind)
        if optional:
            rest = [a for a in typing.get_args(kind) if a is not type(None)]
            kind = rest[0] if len(rest) == 1 else None
        if value is None and optional:
            continue
        if kind is bool and not isinstance(value, bool):
            raise FieldError(f"{name}: `{f.name}` must be True or False; got {value!r}.")
        if kind is int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise FieldError(f"{name}: `{f.name}` must be an int; got {value!r}.")
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise FieldError(f"{name}: `{f.name}` must be a number; got {value!r}.")
            if not math.isfinite(value):
                raise FieldError(f"{name}: `{f.name}` must be finite; got {value!r}.")
        rule = config.field_rules.get(f.name)
        if rule is not None and not (value is None and optional) and not rule[0](value):
            raise FieldError(f"{name}: `{f.name}` must be {rule[1]}; got {value!r}.")


def tree_norm(tree: TensorTree) -> torch.Tensor:
    """The Euclidean norm of all leaves together, as a 0-d tensor (no host read)."""
    leaves = tree_leaves(tree)
    return torch.sqrt(sum((t.detach() ** 2).sum() for t in leaves))


def tree_norm_float(tree: TensorTree) -> float:
    return float(tree_norm(tree))


def report_value(value: torch.Tensor) -> torch.Tensor:
    """A user objective's value for a :class:`StepInfo`: detached and copied, since
    it is read later and may share memory with an iterate updated in place."""
    return value.detach().reshape(()).clone()


__all__ = [
    "Algorithm",
    "State",
    "StepInfo",
    "make_optimizer",
    "bind_batch",
    "fresh_leaves",
    "host_floats",
    "report_value",
    "tree_norm",
    "tree_norm_float",
]
